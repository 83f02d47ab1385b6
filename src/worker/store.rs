//! The worker's chunk store on local disk.
//!
//! ```text
//! <data dir>/LOCK                 held (flock) while a worker uses the directory
//! <data dir>/chunks/ab/<id>       chunk files (see crate::chunk for the format)
//! <data dir>/tmp/                 chunks being written; emptied at start
//! <data dir>/quarantine/          chunks that failed verification; never served again
//! ```
//!
//! A chunk is written under a temporary name, fsynced, renamed into place and its directory
//! fsynced, so after a crash a chunk file is either complete or absent. All calls block.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk::{self, ChunkId, HEADER_REGION, decode_header, encode_header};
use crate::rpc::pb::{ChunkHeader, ChunkReport};

use super::error::WorkerError;

/// The largest chunk a worker accepts (the master's chunk size is at most this).
pub const MAX_CHUNK_LEN: u64 = 1 << 30;

/// A chunk as the worker's index knows it.
#[derive(Debug, Clone, Copy)]
pub struct Indexed {
    pub length: u64,
    pub crc32c: u32,
}

/// The store: directory layout, space accounting and an index of the chunks held.
pub struct ChunkStore {
    root: PathBuf,
    chunks: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    capacity: u64,
    used: AtomicU64,
    reserved: AtomicU64,
    index: Mutex<HashMap<ChunkId, Indexed>>,
    /// Chunks quarantined since the last heartbeat, to report to the master.
    quarantined: Mutex<Vec<String>>,
    _lock: File,
}

/// Space set aside for a write in flight; released when dropped.
pub struct Reservation {
    store: Arc<ChunkStore>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some((
        s.f_blocks.saturating_mul(s.f_frsize),
        s.f_bavail.saturating_mul(s.f_frsize),
    ))
}

fn sync_dir(path: &Path) -> Result<(), WorkerError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| WorkerError::io(format!("fsync {}", path.display()), e))
}

impl ChunkStore {
    /// Opens the store at `root`, creating it if needed; fails clearly if the directory cannot
    /// be written or another worker holds it. `capacity` defaults to the file system's size.
    pub fn open(root: &Path, capacity: Option<u64>) -> Result<ChunkStore, WorkerError> {
        let startup = |what: &str, e: std::io::Error| {
            WorkerError::Startup(format!("data dir {}: {what}: {e}", root.display()))
        };
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        let quarantine = root.join("quarantine");
        for d in [&chunks, &tmp, &quarantine] {
            fs::create_dir_all(d).map_err(|e| startup("cannot create directory", e))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))
            .map_err(|e| startup("cannot write", e))?;
        if lock.try_lock().is_err() {
            return Err(WorkerError::Startup(format!(
                "data dir {} is in use by another worker",
                root.display()
            )));
        }
        // Leftovers of writes interrupted by a crash were never acknowledged.
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let probe = tmp.join("write-probe");
        fs::write(&probe, b"ok")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| startup("cannot write", e))?;
        let capacity = match capacity {
            Some(c) => c,
            None => disk_space(root).map(|(total, _)| total).unwrap_or(0),
        };
        let store = ChunkStore {
            root: root.to_path_buf(),
            chunks,
            tmp,
            quarantine,
            capacity,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            index: Mutex::new(HashMap::new()),
            quarantined: Mutex::new(Vec::new()),
            _lock: lock,
        };
        store.scan()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Rebuilds the index from the headers on disk; unreadable chunk files are quarantined.
    fn scan(&self) -> Result<(), WorkerError> {
        let mut index = HashMap::new();
        let mut used = 0u64;
        let subdirs = fs::read_dir(&self.chunks)
            .map_err(|e| WorkerError::io(format!("read {}", self.chunks.display()), e))?;
        for sub in subdirs.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let Some(id) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<ChunkId>().ok())
                else {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a chunk");
                    continue;
                };
                match read_header(&path, &id) {
                    Ok((header, size)) => {
                        used += size;
                        index.insert(
                            id,
                            Indexed {
                                length: header.length,
                                crc32c: header.crc32c,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(chunk = %id, error = %e, "chunk header unreadable; quarantining");
                        let _ = fs::rename(&path, self.quarantine.join(id.to_string()));
                    }
                }
            }
        }
        self.used.store(used, Ordering::Relaxed);
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = index;
        Ok(())
    }

    /// Everything held, for the full report to the master.
    pub fn report(&self) -> Vec<ChunkReport> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, i)| ChunkReport {
                chunk_id: id.to_string(),
                length: i.length,
                crc32c: i.crc32c,
                header: None,
            })
            .collect()
    }

    /// The full report with every chunk's header read back from disk (for a master that
    /// rebuilds its metadata); unreadable headers are quarantined and left out. Blocking.
    pub fn report_with_headers(&self) -> Vec<ChunkReport> {
        let mut out = Vec::new();
        for id in self.ids() {
            let path = self.chunk_path(&id);
            match read_header(&path, &id) {
                Ok((header, _)) => out.push(ChunkReport {
                    chunk_id: id.to_string(),
                    length: header.length,
                    crc32c: header.crc32c,
                    header: Some(header),
                }),
                Err(reason) => self.quarantine(&id, &reason),
            }
        }
        out
    }

    /// Takes the chunks quarantined since the last call.
    pub fn take_quarantined(&self) -> Vec<String> {
        std::mem::take(&mut *self.quarantined.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back quarantine reports that could not be delivered.
    pub fn requeue_quarantined(&self, ids: Vec<String>) {
        self.quarantined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// The ids of every chunk held (a snapshot, for the scrubber).
    pub fn ids(&self) -> Vec<ChunkId> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    pub fn chunk_count(&self) -> u64 {
        self.index.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// (capacity, used, free): free is what a new chunk may use, bounded by both the
    /// configured capacity and the disk's real free space, minus writes in flight.
    pub fn usage(&self) -> (u64, u64, u64) {
        let used = self.used.load(Ordering::Relaxed);
        let reserved = self.reserved.load(Ordering::Relaxed);
        let by_capacity = self.capacity.saturating_sub(used);
        let by_disk = disk_space(&self.root).map(|(_, f)| f).unwrap_or(0);
        (
            self.capacity,
            used,
            by_capacity.min(by_disk).saturating_sub(reserved),
        )
    }

    /// Sets aside room for a chunk of `length` bytes, or says there is none.
    pub fn reserve(self: &Arc<Self>, length: u64) -> Result<Reservation, WorkerError> {
        let needed = length + HEADER_REGION;
        let (_, _, free) = self.usage();
        if needed > free {
            return Err(WorkerError::NoSpace { needed, free });
        }
        self.reserved.fetch_add(needed, Ordering::Relaxed);
        Ok(Reservation {
            store: self.clone(),
            bytes: needed,
        })
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let s = id.to_string();
        self.chunks.join(&s[..2]).join(s)
    }

    /// Starts writing chunk `header.chunk_id` under a temporary name.
    pub fn create(self: &Arc<Self>, header: ChunkHeader) -> Result<ChunkWriter, WorkerError> {
        let id: ChunkId = header
            .chunk_id
            .parse()
            .map_err(|e: chunk::BadChunkId| WorkerError::InvalidArgument(e.to_string()))?;
        if self.contains(&id) {
            return Err(WorkerError::AlreadyExists(id.to_string()));
        }
        let tmp_path = self
            .tmp
            .join(format!("{id}.{:016x}", chunk::random_u128() as u64));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&tmp_path)
            .map_err(|e| WorkerError::io(format!("create {}", tmp_path.display()), e))?;
        file.seek(SeekFrom::Start(HEADER_REGION))
            .map_err(|e| WorkerError::io("seek", e))?;
        Ok(ChunkWriter {
            store: self.clone(),
            id,
            header,
            file,
            tmp_path,
            crc: 0,
            written: 0,
            done: false,
        })
    }

    /// Opens chunk `id` for reading, positioned at its data, with its verified header.
    pub fn open_read(&self, id: &ChunkId) -> Result<(File, ChunkHeader), WorkerError> {
        let path = self.chunk_path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(WorkerError::NotFound(id.to_string()));
            }
            Err(e) => return Err(WorkerError::io(format!("open {}", path.display()), e)),
        };
        let (header, _) = read_header(&path, id).map_err(|reason| {
            self.quarantine(id, &reason);
            WorkerError::Corrupt {
                chunk: id.to_string(),
                reason,
            }
        })?;
        file.seek(SeekFrom::Start(HEADER_REGION))
            .map_err(|e| WorkerError::io("seek", e))?;
        Ok((file, header))
    }

    /// Deletes chunk `id`; true if it was there.
    pub fn delete(&self, id: &ChunkId) -> Result<bool, WorkerError> {
        let path = self.chunk_path(id);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.forget(id, size);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(id, 0);
                Ok(false)
            }
            Err(e) => Err(WorkerError::io(format!("delete {}", path.display()), e)),
        }
    }

    /// Moves a chunk that failed verification out of service, keeping it for inspection.
    pub fn quarantine(&self, id: &ChunkId, reason: &str) {
        let path = self.chunk_path(id);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match fs::rename(&path, self.quarantine.join(id.to_string())) {
            Ok(()) => {
                tracing::error!(chunk = %id, %reason, "chunk quarantined");
                self.forget(id, size);
                self.quarantined
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(id.to_string());
            }
            Err(e) => tracing::error!(chunk = %id, error = %e, "could not quarantine chunk"),
        }
    }

    fn forget(&self, id: &ChunkId, size: u64) {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(size))
            });
    }
}

/// Reads and checks the header of the chunk file at `path`; returns it with the file's size.
fn read_header(path: &Path, id: &ChunkId) -> Result<(ChunkHeader, u64), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut region = vec![0u8; HEADER_REGION as usize];
    f.read_exact(&mut region)
        .map_err(|e| format!("header unreadable: {e}"))?;
    let header = decode_header(&region).map_err(|e| e.to_string())?;
    if header.chunk_id != id.to_string() {
        return Err(format!("header names chunk {}", header.chunk_id));
    }
    if size != HEADER_REGION + header.length {
        return Err(format!(
            "file is {size} bytes; header says {} of data",
            header.length
        ));
    }
    Ok((header, size))
}

/// A chunk being written; removed unless [`ChunkWriter::finish`] succeeds.
pub struct ChunkWriter {
    store: Arc<ChunkStore>,
    id: ChunkId,
    header: ChunkHeader,
    file: File,
    tmp_path: PathBuf,
    crc: u32,
    written: u64,
    done: bool,
}

impl ChunkWriter {
    /// Appends data, refusing more than the header's declared length.
    pub fn write(&mut self, data: &[u8]) -> Result<(), WorkerError> {
        let after = self.written + data.len() as u64;
        if after > self.header.length {
            return Err(WorkerError::InvalidArgument(format!(
                "chunk {} received more than its declared {} bytes",
                self.id, self.header.length
            )));
        }
        self.file
            .write_all(data)
            .map_err(|e| WorkerError::io(format!("write chunk {}", self.id), e))?;
        self.crc = chunk::crc32c_append(self.crc, data);
        self.written = after;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies length and checksum, writes the header, fsyncs, and renames into place.
    /// Only after this returns is the chunk durable.
    pub fn finish(mut self, expected_crc: u32) -> Result<(), WorkerError> {
        if self.written != self.header.length {
            return Err(WorkerError::InvalidArgument(format!(
                "chunk {} ended after {} of {} declared bytes",
                self.id, self.written, self.header.length
            )));
        }
        if self.crc != expected_crc {
            return Err(WorkerError::ChecksumMismatch {
                chunk: self.id.to_string(),
                expected: expected_crc,
                actual: self.crc,
            });
        }
        self.header.crc32c = self.crc;
        self.header.format_version = chunk::FORMAT_VERSION;
        let region =
            encode_header(&self.header).map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(&region))
            .and_then(|()| self.file.sync_all())
            .map_err(|e| WorkerError::io(format!("write chunk {}", self.id), e))?;
        let dest = self.store.chunk_path(&self.id);
        let dir = dest
            .parent()
            .ok_or_else(|| WorkerError::Startup("chunk path has no parent".into()))?;
        let created = !dir.exists();
        fs::create_dir_all(dir)
            .map_err(|e| WorkerError::io(format!("create {}", dir.display()), e))?;
        if created {
            sync_dir(&self.store.chunks)?;
        }
        fs::rename(&self.tmp_path, &dest)
            .map_err(|e| WorkerError::io(format!("rename into {}", dest.display()), e))?;
        self.done = true;
        sync_dir(dir)?;
        self.store
            .used
            .fetch_add(HEADER_REGION + self.written, Ordering::Relaxed);
        self.store
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                self.id,
                Indexed {
                    length: self.written,
                    crc32c: self.crc,
                },
            );
        Ok(())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}
