//! The worker's chunk store on local disk.
//!
//! ```text
//! <data dir>/LOCK                 held (flock) while a worker uses the directory
//! <data dir>/chunks/ab/<id>       chunk files (see crate::chunk for the format)
//! <data dir>/tmp/                 chunks being written; emptied at start
//! <data dir>/quarantine/          chunks that failed verification; never served again
//! <data dir>/volumes/<seq>.vol    small chunks, appended as records (see super::volume)
//! ```
//!
//! A large chunk is written under a temporary name, fsynced, renamed into place and its
//! directory fsynced, so after a crash a chunk file is either complete or absent. A small one
//! is appended to a volume and synced with its neighbours. All calls block.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk::{self, ChunkId, HEADER_REGION, decode_header, encode_header};
use crate::rpc::pb::{ChunkHeader, ChunkReport};

use super::error::WorkerError;
use super::reports::PendingReports;
use super::volume::{self, Place, SMALL_CHUNK_MAX, Volumes};

/// The largest chunk a worker accepts (the master's chunk size is at most this).
pub const MAX_CHUNK_LEN: u64 = 1 << 30;

/// A chunk as the worker's index knows it.
#[derive(Debug, Clone, Copy)]
pub struct Indexed {
    pub length: u64,
    pub crc32c: u32,
    /// Where a small chunk lies in a volume; None for a chunk file.
    pub place: Option<Place>,
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
    /// The disk's free space as last measured: see [`ChunkStore::disk_free`].
    disk_free: Mutex<DiskFree>,
    index: Mutex<HashMap<ChunkId, Indexed>>,
    volumes: Volumes,
    /// Chunks quarantined since the last heartbeat, to report to the master.
    quarantined: Mutex<Vec<String>>,
    /// Chunks stored since the last heartbeat (client writes and repair copies), so that the
    /// master learns of one it lists nowhere without waiting for a full report: one written
    /// to an upload the master forgot when it restarted would otherwise stay on disk until
    /// this worker restarts (as HDFS's incremental block reports).
    pub received: PendingReports,
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

/// Most stored chunks held for the master while heartbeats fail (~6 MiB); past it the worker
/// makes a full report.
const MAX_RECEIVED_HELD: usize = 100_000;

/// How long a measure of the disk's free space is reused.
const DISK_FREE_TTL: std::time::Duration = std::time::Duration::from_millis(250);
/// Below this much free space (beyond the writes in flight) the disk is measured every time.
const DISK_FREE_MARGIN: u64 = 1 << 30;

/// One `statvfs` of the worker's disk, and this store's usage when it was taken.
#[derive(Default)]
struct DiskFree {
    at: Option<std::time::Instant>,
    free: u64,
    used: u64,
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
        let volumes = root.join("volumes");
        for d in [&chunks, &tmp, &quarantine, &volumes] {
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
        let mut store = ChunkStore {
            root: root.to_path_buf(),
            chunks,
            tmp,
            quarantine,
            capacity,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            disk_free: Mutex::new(DiskFree::default()),
            index: Mutex::new(HashMap::new()),
            volumes: Volumes::new(volumes, 0, HashMap::new())?,
            quarantined: Mutex::new(Vec::new()),
            received: PendingReports::new(MAX_RECEIVED_HELD),
            _lock: lock,
        };
        store.scan()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Rebuilds the index from the headers on disk; unreadable chunk files are quarantined.
    fn scan(&mut self) -> Result<(), WorkerError> {
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
                                place: None,
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
        let (last, usage) = scan_volumes(self.volumes.dir(), &mut index);
        self.volumes = Volumes::new(self.volumes.dir().to_path_buf(), last, usage)?;
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
        for (id, place) in self.places() {
            let header = match place {
                None => read_header(&self.chunk_path(&id), &id).map(|(h, _)| h),
                Some(p) => self
                    .volumes
                    .open(p.volume)
                    .map_err(|e| format!("volume unreadable: {e}"))
                    .and_then(|f| volume::read_header_at(&f, &p)),
            };
            match header {
                Ok(header) => out.push(ChunkReport {
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

    /// Every chunk held with where it lies (a snapshot).
    fn places(&self) -> Vec<(ChunkId, Option<Place>)> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, i)| (*id, i.place))
            .collect()
    }

    fn place_of(&self, id: &ChunkId) -> Option<Option<Place>> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|i| i.place)
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
        let used = self.used.load(Ordering::Relaxed) + self.volumes.disk_bytes();
        let reserved = self.reserved.load(Ordering::Relaxed);
        let by_capacity = self.capacity.saturating_sub(used);
        let by_disk = self.disk_free(used, reserved);
        (
            self.capacity,
            used,
            by_capacity.min(by_disk).saturating_sub(reserved),
        )
    }

    /// The disk's free space. A `statvfs` on every write was one system call per small chunk,
    /// so a measure is reused for [`DISK_FREE_TTL`], less what this store has written since;
    /// when little room is left (under [`DISK_FREE_MARGIN`] beyond the writes in flight) the
    /// disk is measured every time, so a filling disk is seen as it fills.
    fn disk_free(&self, used: u64, reserved: u64) -> u64 {
        let mut d = self.disk_free.lock().unwrap_or_else(|p| p.into_inner());
        let estimate = d.free.saturating_sub(used.saturating_sub(d.used));
        let recent = d.at.is_some_and(|t| t.elapsed() < DISK_FREE_TTL);
        if recent && estimate > reserved.saturating_add(DISK_FREE_MARGIN) {
            return estimate;
        }
        let free = disk_space(&self.root).map(|(_, f)| f).unwrap_or(0);
        *d = DiskFree {
            at: Some(std::time::Instant::now()),
            free,
            used,
        };
        free
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
        if header.length <= SMALL_CHUNK_MAX {
            return Ok(ChunkWriter {
                store: self.clone(),
                id,
                sink: Sink::Memory(Vec::with_capacity(header.length as usize)),
                header,
                crc: 0,
                written: 0,
                flushed: 0,
                done: false,
            });
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
            sink: Sink::File { file, tmp_path },
            crc: 0,
            written: 0,
            flushed: 0,
            done: false,
        })
    }

    /// Opens chunk `id` for reading, positioned at its data, with its verified header.
    pub fn open_read(&self, id: &ChunkId) -> Result<(File, ChunkHeader), WorkerError> {
        // A second look covers a volume compacted away between the lookup and the open.
        for _ in 0..2 {
            match self.place_of(id) {
                None => break,
                Some(None) => return self.open_file(id),
                Some(Some(place)) => match self.volumes.open(place.volume) {
                    Ok(mut file) => {
                        let header = volume::read_header_at(&file, &place).map_err(|reason| {
                            self.quarantine(id, &reason);
                            WorkerError::Corrupt {
                                chunk: id.to_string(),
                                reason,
                            }
                        })?;
                        file.seek(SeekFrom::Start(place.data))
                            .map_err(|e| WorkerError::io("seek", e))?;
                        return Ok((file, header));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(WorkerError::io(format!("open volume {}", place.volume), e));
                    }
                },
            }
        }
        // Not indexed: a chunk file may still be there (the index is rebuilt from them).
        self.open_file(id)
    }

    /// A small chunk's header and data, if it is a volume record whose bytes are all in the
    /// page cache: read without blocking (`RWF_NOWAIT`) and verified, so an async thread
    /// may serve it without a hand-off to the blocking pool. `None` sends the caller down
    /// the blocking path, which also deals with whatever does not verify here.
    pub fn read_small_cached(&self, id: &ChunkId) -> Option<(ChunkHeader, bytes::Bytes)> {
        let place = self.place_of(id)??;
        if place.size > SMALL_CHUNK_MAX + 8192 {
            return None;
        }
        let file = self.volumes.reader(place.volume).ok()?;
        let record = volume::read_record_cached(&file, &place)?;
        let (header, data) = volume::check_record(&record, &place, id).ok()?;
        Some((header, bytes::Bytes::from(record).slice(data)))
    }

    fn open_file(&self, id: &ChunkId) -> Result<(File, ChunkHeader), WorkerError> {
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
        if let Some(place) = self.take_volume_entry(id) {
            self.volumes.tombstone(id, &place)?;
            return Ok(true);
        }
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
        if let Some(Some(place)) = self.place_of(id) {
            // The record is copied out for inspection; the volume itself is never edited.
            let dest = self.quarantine.join(id.to_string());
            let copied = self
                .volumes
                .open(place.volume)
                .and_then(|f| volume::read_record(&f, &place))
                .and_then(|rec| fs::write(&dest, rec));
            if let Err(e) = copied {
                tracing::warn!(chunk = %id, error = %e, "could not copy a quarantined record out");
            }
            if self.take_volume_entry(id).is_some() {
                if let Err(e) = self.volumes.tombstone(id, &place) {
                    tracing::error!(chunk = %id, error = %e, "could not record a quarantine")
                }
                tracing::error!(chunk = %id, %reason, "chunk quarantined");
                self.quarantined
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(id.to_string());
            }
            return;
        }
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

    /// Removes a volume chunk from the index, returning where it lay.
    fn take_volume_entry(&self, id: &ChunkId) -> Option<Place> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let place = index.get(id)?.place?;
        index.remove(id);
        Some(place)
    }

    /// Makes the tombstones of deletes so far durable, so that acknowledged deletes stay
    /// deleted across a crash.
    pub fn sync_deletes(&self) -> Result<(), WorkerError> {
        self.volumes.sync_all()
    }

    /// Reclaims the space of deleted small chunks: a sealed volume that is at least half dead
    /// has its live records copied to the active volume and is then removed; an active volume
    /// of 1 MiB or more in that state is sealed first. Returns the bytes freed.
    pub fn compact(&self) -> Result<u64, WorkerError> {
        if let Some(seq) = self.volumes.active_seq()
            && let Some(u) = self.volumes.usage().get(&seq)
            && u.size >= 1 << 20
            && u.live.saturating_mul(2) <= u.size
        {
            self.volumes.seal();
        }
        let active = self.volumes.active_seq();
        let mut freed = 0u64;
        let mut usage: Vec<_> = self.volumes.usage().into_iter().collect();
        usage.sort_by_key(|(seq, _)| *seq);
        for (seq, u) in usage {
            if u.live.saturating_mul(2) > u.size || u.landing > 0 {
                continue;
            }
            if Some(seq) == active {
                continue;
            }
            let live: Vec<(ChunkId, Place)> = self
                .places()
                .into_iter()
                .filter_map(|(id, p)| p.filter(|p| p.volume == seq).map(|p| (id, p)))
                .collect();
            if !live.is_empty() {
                let file = self
                    .volumes
                    .open(seq)
                    .map_err(|e| WorkerError::io(format!("open volume {seq}"), e))?;
                for (id, place) in live {
                    let record = match volume::read_record(&file, &place) {
                        Ok(r) => r,
                        Err(e) => {
                            self.quarantine(&id, &format!("record unreadable: {e}"));
                            continue;
                        }
                    };
                    // Corrupt data is not carried over: it is quarantined instead.
                    let header = volume::read_header_at(&file, &place);
                    let data = &record[(place.data - place.record) as usize..];
                    match header {
                        Ok(h)
                            if data.len() as u64 >= h.length
                                && chunk::crc32c_append(0, &data[..h.length as usize])
                                    == h.crc32c => {}
                        Ok(_) => {
                            self.quarantine(&id, "compaction: checksum mismatch");
                            continue;
                        }
                        Err(reason) => {
                            self.quarantine(&id, &format!("compaction: {reason}"));
                            continue;
                        }
                    }
                    let new = self.volumes.put_unsynced(&record)?;
                    let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
                    match index.get_mut(&id) {
                        Some(e) if e.place == Some(place) => e.place = Some(new),
                        // Deleted meanwhile: the copy is garbage already.
                        _ => self.volumes.forget(&new),
                    }
                }
                self.volumes.sync_all()?;
            }
            let size = self.volumes.remove(seq)?;
            freed += size;
            tracing::info!(volume = seq, bytes = size, "volume compacted");
        }
        Ok(freed)
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

/// Where a chunk being written goes: a temporary file (large chunks) or memory, appended to
/// a volume at finish (small chunks, at most [`SMALL_CHUNK_MAX`] bytes).
enum Sink {
    File { file: File, tmp_path: PathBuf },
    Memory(Vec<u8>),
}

/// A chunk being written; removed unless [`ChunkWriter::finish`] succeeds.
pub struct ChunkWriter {
    store: Arc<ChunkStore>,
    id: ChunkId,
    header: ChunkHeader,
    sink: Sink,
    crc: u32,
    written: u64,
    /// Bytes already handed to the disk's writeback (see [`WRITEBACK_EVERY`]).
    flushed: u64,
    done: bool,
}

/// A large chunk's bytes are handed to the disk's writeback this often as they arrive, so
/// the fsync at its end has little left to write: the chunk's answer, which the client waits
/// for, comes that much sooner, and the disk writes while the network delivers instead of
/// after it. (As RocksDB's `bytes_per_sync` and HDFS's DataNode do with `sync_file_range`.)
const WRITEBACK_EVERY: u64 = 2 << 20;

/// Starts writing `len` bytes at `offset` of `file` back to the disk without waiting for
/// them. Only a hint: durability still comes from the fsync at the end, so an error is
/// ignored (that fsync reports it).
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads the descriptor and the numbers; it does not
        // touch memory of this process.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
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
        match &mut self.sink {
            Sink::File { file, .. } => {
                file.write_all(data)
                    .map_err(|e| WorkerError::io(format!("write chunk {}", self.id), e))?;
                if after - self.flushed >= WRITEBACK_EVERY {
                    start_writeback(file, HEADER_REGION + self.flushed, after - self.flushed);
                    self.flushed = after;
                }
            }
            Sink::Memory(buf) => buf.extend_from_slice(data),
        }
        self.crc = chunk::crc32c_append(self.crc, data);
        self.written = after;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies length and checksum, then makes the chunk durable: a small chunk is appended
    /// to a volume and synced; a large one gets its header written, is fsynced and renamed
    /// into place. Only after this returns is the chunk durable.
    pub fn finish(mut self, expected_crc: u32) -> Result<(), WorkerError> {
        self.verify(expected_crc)?;
        let store = self.store.clone();
        let place = match &mut self.sink {
            Sink::Memory(data) => {
                let record = volume::encode_chunk(&self.id, &self.header, data);
                Some(store.volumes.put(&record)?)
            }
            Sink::File { file, tmp_path } => {
                let region = encode_header(&self.header)
                    .map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.write_all(&region))
                    .and_then(|()| file.sync_all())
                    .map_err(|e| WorkerError::io(format!("write chunk {}", self.id), e))?;
                let dest = store.chunk_path(&self.id);
                let dir = dest
                    .parent()
                    .ok_or_else(|| WorkerError::Startup("chunk path has no parent".into()))?;
                let created = !dir.exists();
                fs::create_dir_all(dir)
                    .map_err(|e| WorkerError::io(format!("create {}", dir.display()), e))?;
                if created {
                    sync_dir(&store.chunks)?;
                }
                fs::rename(&*tmp_path, &dest)
                    .map_err(|e| WorkerError::io(format!("rename into {}", dest.display()), e))?;
                self.done = true;
                sync_dir(dir)?;
                store
                    .used
                    .fetch_add(HEADER_REGION + self.written, Ordering::Relaxed);
                None
            }
        };
        self.install(place);
        Ok(())
    }

    /// [`ChunkWriter::finish`] for async callers. A small chunk is appended on the calling
    /// thread and its fsync awaited without holding a thread (the group commit's thread
    /// syncs); a large one is finished on the blocking pool.
    pub async fn finish_async(self, expected_crc: u32) -> Result<(), WorkerError> {
        if matches!(self.sink, Sink::File { .. }) {
            return tokio::task::spawn_blocking(move || self.finish(expected_crc))
                .await
                .map_err(|e| WorkerError::Startup(format!("writer task failed: {e}")))?;
        }
        self.append_small(expected_crc)?.durable().await
    }

    /// The first half of finishing a small chunk: verifies it and appends it to a volume,
    /// without waiting for the fsync. Appending several chunks before awaiting any of them
    /// ([`Appended::durable`]) lets one fsync cover them all.
    pub fn append_small(mut self, expected_crc: u32) -> Result<Appended, WorkerError> {
        self.verify(expected_crc)?;
        let Sink::Memory(data) = &self.sink else {
            return Err(WorkerError::InvalidArgument(format!(
                "chunk {} is not a small chunk",
                self.id
            )));
        };
        let record = volume::encode_chunk(&self.id, &self.header, data);
        let (place, n) = self.store.volumes.append_landing(&record)?;
        Ok(Appended {
            writer: self,
            landing: Some((place, n)),
        })
    }

    /// Checks length and checksum, and stamps the header with them.
    fn verify(&mut self, expected_crc: u32) -> Result<(), WorkerError> {
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
        Ok(())
    }

    /// Puts the durable chunk in the index (`place` for a volume record).
    fn install(&mut self, place: Option<volume::Place>) {
        let store = self.store.clone();
        self.done = true;
        let replaced = store
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                self.id,
                Indexed {
                    length: self.written,
                    crc32c: self.crc,
                    place,
                },
            );
        if let Some(p) = &place {
            store.volumes.landed(p);
        }
        store.received.push(self.id.to_string());
        if let Some(Indexed {
            place: Some(old), ..
        }) = replaced
        {
            store.volumes.forget(&old);
        }
    }
}

/// A small chunk appended to its volume, not yet durable: see [`ChunkWriter::append_small`].
pub struct Appended {
    writer: ChunkWriter,
    /// The record's place and number until it is indexed (or forgotten).
    landing: Option<(volume::Place, u64)>,
}

impl Appended {
    /// Waits for the fsync that covers the chunk, then indexes it. Only after this returns
    /// `Ok` is the chunk durable.
    pub async fn durable(mut self) -> Result<(), WorkerError> {
        let Some((place, n)) = self.landing else {
            return Err(WorkerError::Startup("chunk already landed".into()));
        };
        // Past this point a cancelled wait must still release the volume (see Drop).
        let wait = self.writer.store.volumes.wait_durable(&place, n).await;
        self.landing = None;
        wait?;
        self.writer.install(Some(place));
        Ok(())
    }
}

impl Drop for Appended {
    /// A wait that never finished (its request was cancelled): the record stays in the
    /// volume unindexed (an orphan the master collects), and the volume is released.
    fn drop(&mut self) {
        if let Some((place, _)) = self.landing.take() {
            let volumes = &self.writer.store.volumes;
            volumes.forget(&place);
            volumes.landed(&place);
        }
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if let (false, Sink::File { tmp_path, .. }) = (self.done, &self.sink) {
            let _ = fs::remove_file(tmp_path);
        }
    }
}

/// Reads the volumes in `dir` into `index` (later records win; tombstones remove). Returns
/// the bytes they take, the highest sequence number and each volume's usage.
fn scan_volumes(
    dir: &Path,
    index: &mut HashMap<ChunkId, Indexed>,
) -> (u32, HashMap<u32, volume::Usage>) {
    let mut last = 0u32;
    let mut usage: HashMap<u32, volume::Usage> = HashMap::new();
    for (seq, path) in volume::list(dir) {
        last = last.max(seq);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        usage.insert(
            seq,
            volume::Usage {
                size,
                file: size,
                ..Default::default()
            },
        );
        let (records, stop) = match volume::read_records(&path, seq) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(volume = %path.display(), error = %e, "volume unreadable; its chunks are not served");
                continue;
            }
        };
        if let Some(stop) = &stop {
            tracing::warn!(
                volume = %path.display(),
                offset = stop.offset,
                ignored_bytes = size - stop.offset,
                reason = %stop.reason,
                "volume read up to a bad record (after a crash: the unacknowledged tail)"
            );
        }
        // Bytes of records: the zero-filled space past them is not dead data to compact.
        let end = stop
            .as_ref()
            .map(|s| s.offset)
            .or_else(|| records.last().map(|r| r.place.record + r.place.size))
            .unwrap_or(0);
        if let Some(u) = usage.get_mut(&seq) {
            u.size = end;
        }
        for r in records {
            match r.header {
                Some(h) => {
                    index.insert(
                        r.id,
                        Indexed {
                            length: h.length,
                            crc32c: h.crc32c,
                            place: Some(r.place),
                        },
                    );
                }
                None => {
                    if index.get(&r.id).is_some_and(|i| i.place.is_some()) {
                        index.remove(&r.id);
                    }
                }
            }
        }
    }
    for i in index.values() {
        if let Some(p) = i.place
            && let Some(u) = usage.get_mut(&p.volume)
        {
            u.live += p.size;
        }
    }
    (last, usage)
}

/// A chunk as found on disk by [`stored_chunks`].
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub id: String,
    /// The chunk file, or the volume holding the chunk's record.
    pub path: PathBuf,
    /// Where the chunk's data begins in `path`.
    pub data_offset: u64,
    pub data_len: u64,
    /// Bytes the chunk takes on disk.
    pub disk_bytes: u64,
}

/// Every chunk in a worker's data directory, read offline from the files themselves (chunk
/// files and live volume records), for inspection tools and tests.
pub fn stored_chunks(data_dir: &Path) -> Vec<StoredChunk> {
    let mut out = Vec::new();
    if let Ok(subs) = fs::read_dir(data_dir.join("chunks")) {
        for s in subs.flatten() {
            let Ok(files) = fs::read_dir(s.path()) else {
                continue;
            };
            for f in files.flatten() {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(StoredChunk {
                    id: f.file_name().to_string_lossy().into_owned(),
                    path: f.path(),
                    data_offset: HEADER_REGION,
                    data_len: size.saturating_sub(HEADER_REGION),
                    disk_bytes: size,
                });
            }
        }
    }
    let dir = data_dir.join("volumes");
    let mut index = HashMap::new();
    scan_volumes(&dir, &mut index);
    for (id, i) in index {
        if let Some(p) = i.place {
            out.push(StoredChunk {
                id: id.to_string(),
                path: volume::volume_path(&dir, p.volume),
                data_offset: p.data,
                data_len: i.length,
                disk_bytes: p.size,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: &ChunkId, len: u64) -> ChunkHeader {
        ChunkHeader {
            format_version: chunk::FORMAT_VERSION,
            chunk_id: id.to_string(),
            file_name: "f".into(),
            length: len,
            ..Default::default()
        }
    }

    fn put(store: &Arc<ChunkStore>, data: &[u8]) -> ChunkId {
        let id = ChunkId::generate();
        let mut w = store.create(header(&id, data.len() as u64)).unwrap();
        w.write(data).unwrap();
        w.finish(chunk::crc32c_append(0, data)).unwrap();
        id
    }

    fn get(store: &ChunkStore, id: &ChunkId) -> Result<Vec<u8>, WorkerError> {
        let (mut f, h) = store.open_read(id)?;
        let mut buf = vec![0u8; h.length as usize];
        f.read_exact(&mut buf)
            .map_err(|e| WorkerError::io("read", e))?;
        if chunk::crc32c_append(0, &buf) != h.crc32c {
            return Err(WorkerError::InvalidArgument("checksum".into()));
        }
        Ok(buf)
    }

    fn data(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
    }

    #[test]
    fn small_chunks_live_in_volumes_and_survive_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
            for i in 0..20 {
                ids.push(put(&store, &data(i, 100 + i * 500)));
            }
            let big = put(&store, &data(99, SMALL_CHUNK_MAX as usize + 1));
            assert!(
                store.chunk_path(&big).exists(),
                "a large chunk gets its own file"
            );
            assert!(store.delete(&big).unwrap());
            for id in &ids[..5] {
                assert!(store.delete(id).unwrap());
            }
            assert!(!store.delete(&ids[0]).unwrap());
            store.sync_deletes().unwrap();
            assert_eq!(store.chunk_count(), 15);
        }
        // A crash mid-append: a partial record after the last acknowledged one.
        let vols = volume::list(&dir.path().join("volumes"));
        assert_eq!(vols.len(), 1);
        let f = OpenOptions::new().append(true).open(&vols[0].1).unwrap();
        (&f).write_all(b"DFV1\x01\x00\x00\x00partial").unwrap();

        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        assert_eq!(store.chunk_count(), 15);
        for (i, id) in ids.iter().enumerate() {
            match get(&store, id) {
                Ok(d) => assert_eq!(d, data(i, 100 + i * 500), "chunk {i}"),
                Err(WorkerError::NotFound(_)) => assert!(i < 5, "chunk {i} lost"),
                Err(e) => panic!("chunk {i}: {e}"),
            }
        }
        // New writes go to a new volume, never after the torn tail.
        let id = put(&store, b"after");
        assert_eq!(get(&store, &id).unwrap(), b"after");
        assert_eq!(volume::list(&dir.path().join("volumes")).len(), 2);
        let listed = stored_chunks(dir.path());
        assert_eq!(listed.len(), 16);
    }

    /// Chunks appended together and then awaited are all durable and readable; an append
    /// whose wait is abandoned (a cancelled request) is never indexed and leaves its volume
    /// free to be compacted.
    #[tokio::test]
    async fn appended_chunks_land_together_and_an_abandoned_one_releases_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        let mut pending = Vec::new();
        let mut ids = Vec::new();
        for i in 0..5 {
            let d = data(i, 3000 + i);
            let id = ChunkId::generate();
            let mut w = store.create(header(&id, d.len() as u64)).unwrap();
            w.write(&d).unwrap();
            pending.push(w.append_small(chunk::crc32c_append(0, &d)).unwrap());
            ids.push(id);
        }
        // A wrong checksum is refused before anything is appended.
        let bad = ChunkId::generate();
        let mut w = store.create(header(&bad, 4)).unwrap();
        w.write(b"abcd").unwrap();
        assert!(matches!(
            w.append_small(1),
            Err(WorkerError::ChecksumMismatch { .. })
        ));
        let abandoned = pending.pop().unwrap();
        drop(abandoned);
        for p in pending {
            p.durable().await.unwrap();
        }
        for (i, id) in ids.iter().enumerate().take(4) {
            assert_eq!(get(&store, id).unwrap(), data(i, 3000 + i));
        }
        assert!(matches!(
            get(&store, &ids[4]),
            Err(WorkerError::NotFound(_))
        ));
        assert!(matches!(get(&store, &bad), Err(WorkerError::NotFound(_))));
        let landing: u32 = store.volumes.usage().values().map(|u| u.landing).sum();
        assert_eq!(landing, 0, "every append has landed or been released");
        // After a restart the abandoned record is on disk but was never acknowledged: it
        // comes back as a chunk the master does not know (an orphan it collects).
        drop(store);
        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        assert_eq!(store.chunk_count(), 5);
    }

    #[test]
    fn compaction_reclaims_dead_volumes_and_keeps_live_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        let ids: Vec<ChunkId> = (0..40).map(|i| put(&store, &data(i, 60_000))).collect();
        for id in ids.iter().step_by(4) {
            store.delete(id).unwrap();
        }
        // 75 % live: nothing to do; the active volume is not touched.
        assert_eq!(store.compact().unwrap(), 0);
        for id in ids.iter().skip(1).step_by(4) {
            store.delete(id).unwrap();
        }
        for id in ids.iter().skip(2).step_by(4) {
            store.delete(id).unwrap();
        }
        let (_, used_before, _) = store.usage();
        // Half dead or more: the active volume is sealed and compacted away.
        let freed = store.compact().unwrap();
        assert!(freed > 2_000_000, "freed {freed}");
        let (_, used_after, _) = store.usage();
        assert!(
            used_after < used_before / 2,
            "{used_after} of {used_before}"
        );
        let on_disk: u64 = volume::list(&dir.path().join("volumes"))
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(used_after, on_disk, "usage follows the files");
        for (i, id) in ids.iter().enumerate() {
            match get(&store, id) {
                Ok(d) => {
                    assert_eq!(i % 4, 3, "chunk {i} came back");
                    assert_eq!(d, data(i, 60_000));
                }
                Err(WorkerError::NotFound(_)) => assert_ne!(i % 4, 3, "chunk {i} lost"),
                Err(e) => panic!("chunk {i}: {e}"),
            }
        }
        drop(store);
        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        assert_eq!(store.chunk_count(), 10);
        assert_eq!(volume::list(&dir.path().join("volumes")).len(), 1);
    }

    #[test]
    fn a_corrupt_volume_record_is_quarantined_and_stays_out() {
        let dir = tempfile::tempdir().unwrap();
        let (bad, good) = {
            let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
            let bad = put(&store, &data(1, 5000));
            let good = put(&store, &data(2, 5000));
            let c = stored_chunks(dir.path())
                .into_iter()
                .find(|c| c.id == bad.to_string())
                .unwrap();
            let f = OpenOptions::new().write(true).open(&c.path).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"X", c.data_offset + 100).unwrap();
            // The page-cache path verifies too: it serves the good one, never the bad one.
            assert_eq!(
                store.read_small_cached(&good).map(|(_, d)| d.to_vec()),
                Some(data(2, 5000)),
                "a record just written is in the page cache"
            );
            assert!(store.read_small_cached(&bad).is_none());
            // The scrubber's and the read path's check: the data CRC in the header.
            assert!(get(&store, &bad).is_err());
            store.quarantine(&bad, "test");
            assert_eq!(store.take_quarantined(), vec![bad.to_string()]);
            assert!(matches!(
                store.open_read(&bad),
                Err(WorkerError::NotFound(_))
            ));
            store.sync_deletes().unwrap();
            (bad, good)
        };
        assert!(dir.path().join("quarantine").join(bad.to_string()).exists());
        let store = ChunkStore::open(dir.path(), Some(1 << 30)).unwrap();
        assert!(!store.contains(&bad));
        assert_eq!(get(&store, &good).unwrap(), data(2, 5000));
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;

    /// Writers, deleters and compaction at once: every chunk written and not deleted reads
    /// back byte for byte, before and after a reopen, and no deleted chunk comes back.
    #[test]
    fn compaction_during_writes_and_deletes_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ChunkStore::open(dir.path(), Some(1 << 30)).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let compactor = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut runs = 0;
                while !stop.load(Ordering::Relaxed) && runs < 50_000 {
                    store.compact().unwrap();
                    runs += 1;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            })
        };
        let writers: Vec<_> = (0..4u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    for i in 0..300u32 {
                        let data = vec![t ^ (i as u8); 2000 + (i as usize % 7) * 1000];
                        let id = ChunkId::generate();
                        let h = ChunkHeader {
                            format_version: chunk::FORMAT_VERSION,
                            chunk_id: id.to_string(),
                            file_name: "f".into(),
                            length: data.len() as u64,
                            ..Default::default()
                        };
                        let mut w = store.create(h).unwrap();
                        w.write(&data).unwrap();
                        w.finish(chunk::crc32c_append(0, &data)).unwrap();
                        // Most chunks die young, so volumes go half dead and get compacted.
                        if i % 5 == 0 {
                            kept.push((id, data));
                        } else {
                            assert!(store.delete(&id).unwrap());
                        }
                    }
                    kept
                })
            })
            .collect();
        let kept: Vec<(ChunkId, Vec<u8>)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        stop.store(true, Ordering::Relaxed);
        compactor.join().unwrap();
        store.sync_deletes().unwrap();
        store.compact().unwrap();
        let check = |store: &ChunkStore| {
            assert_eq!(store.chunk_count(), kept.len() as u64);
            for (id, data) in &kept {
                let (mut f, h) = store.open_read(id).unwrap();
                let mut buf = vec![0u8; h.length as usize];
                f.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, data);
            }
        };
        check(&store);
        let vols = volume::list(&dir.path().join("volumes"));
        assert!(vols[0].0 > 2, "compaction never removed a volume: {vols:?}");
        let (_, used, _) = store.usage();
        drop(store);
        let store = ChunkStore::open(dir.path(), Some(1 << 30)).unwrap();
        check(&store);
        assert_eq!(store.usage().1, used, "usage after reopen = usage before");
    }
}
