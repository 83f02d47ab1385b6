//! A non-blocking log writer that batches lines: a log line is appended to a shared buffer
//! and one thread writes the buffer out at most every [`FLUSH_EVERY`].
//!
//! A writer that wakes its thread for every line (as a channel-based one does) costs a
//! context switch per line; on a small-file workload, where every operation logs a line on
//! the client, the master and each worker, that was a sixth of all context switches of a
//! busy embedded cluster. Batching keeps the daemons' promise the same (a slow terminal or
//! a full pipe never stalls a daemon: past [`MAX_BUFFERED`] lines are dropped and counted)
//! while the log thread sleeps when nothing is logged.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the log thread gathers lines before it writes them.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Bytes held for a writer that cannot keep up; lines beyond are dropped (and counted).
pub const MAX_BUFFERED: usize = 8 << 20;
/// How long dropping the guard waits for the last lines to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    dropped: u64,
    closed: bool,
    done: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when the buffer stops being empty, on close, and when the thread ends.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` handed to a `tracing_subscriber::fmt` layer.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is still buffered when dropped (waiting at most `CLOSE_WAIT`).
pub struct FlushGuard {
    shared: Arc<Shared>,
}

/// One event's writer: appends to the shared buffer.
pub struct LineSink<'a> {
    shared: &'a Shared,
}

impl Write for LineSink<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut st = self.shared.lock();
        if st.closed || st.buf.len() + bytes.len() > MAX_BUFFERED {
            st.dropped += 1;
            return Ok(bytes.len());
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(bytes);
        drop(st);
        if was_empty {
            self.shared.wake.notify_all();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink {
            shared: &self.shared,
        }
    }
}

/// Two batched writers fed the same formatted line: a daemon whose terminal and file logs
/// take the same lines formats each once instead of twice. Per-operation lines are a tenth
/// of a busy small-file cluster's CPU when formatted for both (README, Performance).
#[derive(Clone)]
pub struct TeeWriter {
    first: BatchedWriter,
    second: BatchedWriter,
}

impl TeeWriter {
    pub fn new(first: BatchedWriter, second: BatchedWriter) -> TeeWriter {
        TeeWriter { first, second }
    }
}

/// One event's writer for [`TeeWriter`].
pub struct TeeSink<'a> {
    first: LineSink<'a>,
    second: LineSink<'a>,
}

impl Write for TeeSink<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        // Each sink takes every byte or drops the line; neither ever fails.
        self.first.write_all(bytes)?;
        self.second.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for TeeWriter {
    type Writer = TeeSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        TeeSink {
            first: self.first.make_writer(),
            second: self.second.make_writer(),
        }
    }
}

/// Starts the log thread writing to `out`. Returns the writer for the layer and the guard
/// to keep until exit. If the thread cannot be started, lines are refused: logging must
/// never take the process down or grow without bound.
pub fn batched<W: Write + Send + 'static>(name: &str, out: W) -> (BatchedWriter, FlushGuard) {
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || run(&s, out));
    if spawned.is_err() {
        // No thread: refuse lines rather than grow without bound.
        shared.lock().closed = true;
    }
    (
        BatchedWriter {
            shared: shared.clone(),
        },
        FlushGuard { shared },
    )
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let mut st = shared.lock();
        while st.buf.is_empty() && !st.closed {
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if !st.closed {
            // Gather a batch: lines logged in the next moment share this write.
            drop(st);
            std::thread::sleep(FLUSH_EVERY);
            st = shared.lock();
        }
        std::mem::swap(&mut st.buf, &mut spare);
        let dropped = std::mem::take(&mut st.dropped);
        let closing = st.closed;
        drop(st);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "(log writer: {dropped} lines dropped because the output could not keep up)"
            );
        }
        let _ = out.write_all(&spare);
        let _ = out.flush();
        spare.clear();
        if spare.capacity() > MAX_BUFFERED {
            spare = Vec::new();
        }
        if closing {
            let mut st = shared.lock();
            if st.buf.is_empty() {
                st.done = true;
                drop(st);
                shared.wake.notify_all();
                return;
            }
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.wake.notify_all();
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        while !st.done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                // A blocked output (a full pipe) must not hang the exit.
                return;
            }
            st = self
                .shared
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read back, shared with the log thread.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_are_all_written_once_in_order_per_thread() {
        let sink = Sink::default();
        let (w, guard) = batched("test-log", sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let mut line = w.make_writer();
                        line.write_all(format!("t{t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_line_is_written_without_waiting_for_exit() {
        let sink = Sink::default();
        let (w, _guard) = batched("test-log", sink.clone());
        w.make_writer().write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
    }

    #[test]
    fn a_tee_puts_every_line_whole_into_both_outputs() {
        let (a, b) = (Sink::default(), Sink::default());
        let (wa, ga) = batched("test-log-a", a.clone());
        let (wb, gb) = batched("test-log-b", b.clone());
        let tee = TeeWriter::new(wa, wb);
        for i in 0..300 {
            tee.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop((ga, gb));
        let expected: String = (0..300).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            String::from_utf8(a.0.lock().unwrap().clone()).unwrap(),
            expected
        );
        assert_eq!(
            String::from_utf8(b.0.lock().unwrap().clone()).unwrap(),
            expected
        );
    }

    /// An output that blocks forever (a stopped reader of a pipe).
    struct Stuck;

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::park();
            Ok(0)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_and_never_blocks_the_logger_or_the_exit() {
        let (w, guard) = batched("test-log", Stuck);
        let line = vec![b'x'; 64 << 10];
        let t = std::time::Instant::now();
        // Far more than MAX_BUFFERED: must return promptly, dropping the excess.
        for _ in 0..(4 * MAX_BUFFERED / line.len()) {
            w.make_writer().write_all(&line).unwrap();
        }
        assert!(w.shared.lock().dropped > 0);
        assert!(w.shared.lock().buf.len() <= MAX_BUFFERED);
        drop(guard);
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}
