//! An input of unknown size (standard input, a pipe, a FIFO) staged for an upload a few
//! chunks at a time.
//!
//! An upload reads each chunk again to retry it on a fresh pipeline, and a pipe can be read
//! only once. So a thread copies the input into an unlinked temporary file, at the same
//! offsets, while the upload sends the chunks from that file: the upload starts at once,
//! not when the input ends. The thread stays at most `ahead` bytes past the oldest chunk not
//! yet stored, and each stored chunk's bytes are given back (a hole is punched), so the
//! temporary space stays about `ahead` however long the input is. Nothing is left behind,
//! even after `kill -9`: the file has no name from the moment it is made.
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
    /// The input's path, for error messages.
    path: PathBuf,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the thread when space is given back or the upload is gone.
    room: Condvar,
    /// Wakes the upload when more of the input is in.
    more: Notify,
}

struct State {
    /// Bytes of the input in the file so far (from offset 0).
    spooled: u64,
    /// Set when the input ended: `Ok` at its end, `Err` (kind, message) if reading failed.
    end: Option<Result<(), (ErrorKind, String)>>,
    /// Bytes from offset 0 that the upload no longer needs.
    released: u64,
    /// How far past `released` the thread may read.
    ahead: u64,
    /// The upload is gone: the thread stops at its next step.
    closed: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One read of the input at most (and the thread's one buffer).
const READ_BYTES: usize = 1 << 20;

impl Spool {
    /// Makes the unlinked temporary file in `dir` and starts the thread reading `input`
    /// (`path` names it in messages).
    pub fn start(input: Input, path: &Path, dir: &Path, ahead: u64) -> Result<Spool, ClientError> {
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                spooled: 0,
                end: None,
                released: 0,
                ahead: ahead.max(READ_BYTES as u64),
                closed: false,
            }),
            room: Condvar::new(),
            more: Notify::new(),
        });
        let (f, s, d) = (file.clone(), shared.clone(), dir.to_path_buf());
        std::thread::Builder::new()
            .name("dfs-spool".into())
            .spawn(move || fill(input, &f, &s, &d))
            .map_err(|e| ClientError::LocalIo {
                op: "start reading",
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(Spool {
            file,
            shared,
            path: path.to_path_buf(),
        })
    }

    /// The file the chunks are read from, at the input's own offsets.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
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
                    Some(Err((kind, message))) => {
                        return Err(ClientError::LocalIo {
                            op: "read",
                            path: self.path.clone(),
                            source: std::io::Error::new(*kind, message.clone()),
                        });
                    }
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

    /// The input's whole length, once it has ended.
    pub fn len(&self) -> Option<u64> {
        let s = lock(&self.shared.state);
        matches!(s.end, Some(Ok(()))).then_some(s.spooled)
    }

    /// Gives back the bytes before `upto` (stored chunks), so the thread may read further.
    /// The space is freed before the thread is let on, so the file never holds more than
    /// `ahead`.
    pub fn release(&self, upto: u64) {
        let from = lock(&self.shared.state).released;
        if upto <= from {
            return;
        }
        use rustix::fs::{FallocateFlags, fallocate};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if let Err(e) = fallocate(&*self.file, flags, from, upto - from) {
            // The bytes stay until the upload ends: more temporary space, nothing worse.
            tracing::debug!(error = %e, "cannot punch a hole in the upload's temporary file");
        }
        lock(&self.shared.state).released = upto;
        self.shared.room.notify_all();
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.room.notify_all();
    }
}

/// The thread: copies `input` into `file` while there is room, then records how it ended.
fn fill(input: Input, file: &File, shared: &Shared, dir: &Path) {
    let end = copy(input, file, shared, dir);
    if let Err(e) = &end {
        tracing::debug!(error = %e, "reading the upload's input failed");
    }
    lock(&shared.state).end = Some(end.map_err(|e| (e.kind(), e.to_string())));
    shared.more.notify_waiters();
}

fn copy(input: Input, file: &File, shared: &Shared, dir: &Path) -> std::io::Result<()> {
    let mut source = match input {
        Input::Open(f) => f,
        Input::Path(p) => File::open(p)?,
    };
    let mut buf = vec![0u8; READ_BYTES];
    let mut pos = 0u64;
    loop {
        let room = {
            let mut s = lock(&shared.state);
            loop {
                if s.closed {
                    return Ok(());
                }
                let limit = s.released + s.ahead;
                if pos < limit {
                    break (limit - pos).min(READ_BYTES as u64) as usize;
                }
                s = shared.room.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let n = match source.read(&mut buf[..room]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all_at(&buf[..n], pos).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("temporary file in {}: {e}", dir.display()),
            )
        })?;
        pos += n as u64;
        lock(&shared.state).spooled = pos;
        shared.more.notify_waiters();
    }
}
