//! An input of unknown size (standard input, a pipe, a FIFO) staged for an upload a few
//! chunks at a time.
//!
//! An upload reads each chunk again to retry it on a fresh pipeline, and a pipe can be read
//! only once. So a thread copies the input into an unlinked temporary file while the upload
//! sends the chunks from that file: the upload starts at once, not when the input ends. The
//! file is a ring of whole-chunk slots (chunk `i` in slot `i % slots`), and the thread
//! overwrites a slot only once the chunk that held it is stored. So the file never grows
//! past `slots` chunks however long the input (no hole punching that a file system might
//! not do), and nothing is left behind even after `kill -9`: it has no name from the moment
//! it is made.
//!
//! The thread is a plain one, not a task of the blocking pool: a read from a pipe whose
//! writer is silent cannot be interrupted, and such a thread must not hold up the end of
//! the process.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::ClientError;
use crate::chunk;

/// What the thread reads: a descriptor already open (standard input), or a path it opens
/// itself, since opening a FIFO waits for its writer.
pub(super) enum Input {
    Open(File),
    Path(PathBuf),
}

/// The staged input, shared by the upload and the thread that fills it.
pub(super) struct Spool {
    file: Arc<File>,
    shared: Arc<Shared>,
    /// Bytes of the ring: whole chunks.
    ring: u64,
    /// The input's path and the temporary file's directory, for errors.
    path: PathBuf,
    dir: PathBuf,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the thread when a slot is freed or the upload is gone.
    room: Condvar,
    /// Wakes the upload when more of the input is in.
    more: Notify,
}

struct State {
    /// Bytes of the input staged so far.
    spooled: u64,
    /// Set when the input ended: `Ok` at its end, `Err` if reading or staging failed.
    end: Option<Result<(), Failure>>,
    /// Bytes of the input, from its start, that are stored and whose slots may be reused.
    released: u64,
    /// The upload is gone: the thread stops at its next step.
    closed: bool,
}

/// Why the thread stopped short of the input's end.
enum Failure {
    /// Reading the input.
    Read(ErrorKind, String),
    /// Writing the temporary file (its file system is full, say).
    Stage(ErrorKind, String),
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One read of the input at most (and the thread's one buffer).
const READ_BYTES: u64 = 1 << 20;

impl Spool {
    /// Makes the unlinked temporary file in `dir`, a ring of `slots` chunks of
    /// `chunk_size`, and starts the thread reading `input` (`path` names it in messages).
    pub fn start(
        input: Input,
        path: &Path,
        dir: &Path,
        chunk_size: u64,
        slots: u64,
    ) -> Result<Spool, ClientError> {
        let tmp_err = |e: std::io::Error| ClientError::LocalIo {
            op: "create a temporary file in",
            path: dir.to_path_buf(),
            source: e,
        };
        let tmp = dir.join(format!(".dfs-upload-{:08x}", chunk::random_u128() as u32));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(tmp_err)?;
        std::fs::remove_file(&tmp).map_err(tmp_err)?;
        let file = Arc::new(file);
        let ring = chunk_size.max(1) * slots.max(2);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                spooled: 0,
                end: None,
                released: 0,
                closed: false,
            }),
            room: Condvar::new(),
            more: Notify::new(),
        });
        let (f, s) = (file.clone(), shared.clone());
        std::thread::Builder::new()
            .name("dfs-spool".into())
            .spawn(move || fill(input, &f, &s, ring))
            .map_err(|e| ClientError::LocalIo {
                op: "start reading",
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(Spool {
            file,
            shared,
            ring,
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }

    /// The file the chunks are read from, each at [`Spool::at`].
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Where in the file the chunk that starts at `offset` of the input is staged.
    pub fn at(&self, offset: u64) -> u64 {
        offset % self.ring
    }

    /// Waits until the chunk of at most `chunk_size` bytes at `offset` is in: its length
    /// and whether it is the input's last, or `None` if the input ended before it. A chunk
    /// is known not to be the last once one byte past it is in. Checks `cancelled` while
    /// it waits.
    pub async fn chunk(
        &self,
        offset: u64,
        chunk_size: u64,
        cancelled: impl Fn() -> bool,
    ) -> Result<Option<(u64, bool)>, ClientError> {
        loop {
            let more = self.shared.more.notified();
            {
                let s = lock(&self.shared.state);
                match &s.end {
                    Some(Err(failure)) => return Err(self.error(failure)),
                    Some(Ok(())) if s.spooled <= offset => return Ok(None),
                    Some(Ok(())) => {
                        let len = (s.spooled - offset).min(chunk_size);
                        return Ok(Some((len, offset + len == s.spooled)));
                    }
                    None if s.spooled > offset + chunk_size => {
                        return Ok(Some((chunk_size, false)));
                    }
                    None => {}
                }
            }
            if cancelled() {
                return Err(ClientError::Cancelled);
            }
            // Bounded so that a cancel is seen even while the input is silent.
            let _ = tokio::time::timeout(Duration::from_millis(100), more).await;
        }
    }

    fn error(&self, failure: &Failure) -> ClientError {
        match failure {
            Failure::Read(kind, message) => ClientError::LocalIo {
                op: "read",
                path: self.path.clone(),
                source: std::io::Error::new(*kind, message.clone()),
            },
            Failure::Stage(kind, message) => {
                let most = crate::config::human_bytes(self.ring);
                ClientError::LocalIo {
                    op: "stage the input in",
                    path: self.dir.clone(),
                    source: std::io::Error::new(
                        *kind,
                        format!(
                            "{message} (a piped upload keeps up to {most} there; $TMPDIR picks the directory)"
                        ),
                    ),
                }
            }
        }
    }

    /// The input's whole length, once it has ended.
    pub fn len(&self) -> Option<u64> {
        let s = lock(&self.shared.state);
        matches!(s.end, Some(Ok(()))).then_some(s.spooled)
    }

    /// Frees the slots of the input before `upto` (stored chunks) for the thread to reuse.
    pub fn release(&self, upto: u64) {
        let mut s = lock(&self.shared.state);
        if upto > s.released {
            s.released = upto;
            self.shared.room.notify_all();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.room.notify_all();
    }
}

/// The thread: copies `input` into the ring while it has room, then records how it ended.
fn fill(input: Input, file: &File, shared: &Shared, ring: u64) {
    let end = copy(input, file, shared, ring);
    if let Err(Failure::Read(_, e) | Failure::Stage(_, e)) = &end {
        tracing::debug!(error = %e, "staging the upload's input stopped");
    }
    lock(&shared.state).end = Some(end);
    shared.more.notify_waiters();
}

fn copy(input: Input, file: &File, shared: &Shared, ring: u64) -> Result<(), Failure> {
    let read_err = |e: std::io::Error| Failure::Read(e.kind(), e.to_string());
    let mut source = match input {
        Input::Open(f) => f,
        Input::Path(p) => File::open(p).map_err(read_err)?,
    };
    let mut buf = vec![0u8; READ_BYTES as usize];
    let mut pos = 0u64;
    loop {
        // Up to the oldest slot still in use, and not across the ring's end.
        let room = {
            let mut s = lock(&shared.state);
            loop {
                if s.closed {
                    return Ok(());
                }
                let limit = s.released + ring;
                if pos < limit {
                    break (limit - pos).min(ring - pos % ring).min(READ_BYTES) as usize;
                }
                s = shared.room.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let n = match source.read(&mut buf[..room]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        file.write_all_at(&buf[..n], pos % ring)
            .map_err(|e| Failure::Stage(e.kind(), e.to_string()))?;
        pos += n as u64;
        lock(&shared.state).spooled = pos;
        shared.more.notify_waiters();
    }
}
