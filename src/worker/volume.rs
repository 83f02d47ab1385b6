//! Append-only volume files for small chunks.
//!
//! A file per chunk costs an inode allocation, a rename and two fsyncs for every 4 KiB
//! file; on ext4 without a journal the inode allocation alone took a quarter of the CPU of a
//! small-file create. Small chunks are therefore appended as records to a few large volume
//! files, as Facebook's Haystack and SeaweedFS do, and concurrent writers share one
//! `fdatasync` (group commit).
//!
//! ```text
//! <data dir>/volumes/<seq:08>.vol
//!
//! record (8-byte aligned, little-endian):
//!   0   magic "DFV1"
//!   4   kind: 1 chunk, 2 tombstone
//!   5   3 zero bytes
//!   8   chunk id (u128)
//!   24  header length h (u32)
//!   28  data length d (u32)
//!   32  CRC32C of bytes 0..32 and of the header (u32)
//!   36  4 zero bytes
//!   40  ChunkHeader protobuf (h bytes; none for a tombstone)
//!   ..  data (d bytes), whose CRC32C is in the header and checked on every read
//!   ..  zero padding to a multiple of 8
//! ```
//!
//! Volumes are never rewritten in place: a delete appends a tombstone, and compaction copies
//! the live records of a mostly-dead volume to the active one before removing it. At start
//! the volumes are read in order (later records win) and a new active volume is begun, so a
//! torn tail left by a crash is never appended after; it was never acknowledged either,
//! because a write is acknowledged only after the `fdatasync` that covers it.
//!
//! The active volume is zero-filled [`PREALLOC_STEP`] ahead of its tail before records are
//! written into it, so that a record's `fdatasync` writes data only (see [`crate::prealloc`]
//! for why and what it saves). The zeros are not synced on their own: the next group
//! `fdatasync` carries them (and the inode) once per step, so the group commit stays the only
//! place a volume is synced. A record's magic is never zero, so reading stops cleanly at the
//! zero-filled tail.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;

use super::error::WorkerError;
use crate::chunk::{self, ChunkId};
use crate::groupsync::{GroupSync, SyncTarget};
use crate::rpc::pb::ChunkHeader;

/// Chunks up to this size go to volumes; larger ones get a file of their own, where the
/// per-file cost is small next to the data. A write buffers at most this much in memory.
pub const SMALL_CHUNK_MAX: u64 = 128 << 10;
/// A volume is sealed and a new one begun once it reaches this size.
const VOLUME_MAX: u64 = 256 << 20;
/// How far ahead of its tail the active volume is zero-filled.
pub use crate::prealloc::PREALLOC_STEP;
const MAGIC: &[u8; 4] = b"DFV1";
const FIXED: usize = 40;
const KIND_CHUNK: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// Largest encoded ChunkHeader accepted when reading a volume.
const MAX_HEADER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn padded(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

/// Where a record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub volume: u32,
    /// Offset of the record in the volume.
    pub record: u64,
    /// Offset of the chunk's data in the volume.
    pub data: u64,
    /// Bytes the record takes in the volume, padding included.
    pub size: u64,
}

/// Encodes a chunk record (`header` must carry the data's final CRC32C).
pub fn encode_chunk(id: &ChunkId, header: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    let body = header.encode_to_vec();
    let mut out = Vec::with_capacity(padded((FIXED + body.len() + data.len()) as u64) as usize);
    push_fixed(
        &mut out,
        KIND_CHUNK,
        id,
        body.len() as u32,
        data.len() as u32,
        &body,
    );
    out.extend_from_slice(&body);
    out.extend_from_slice(data);
    out.resize(padded(out.len() as u64) as usize, 0);
    out
}

fn encode_tombstone(id: &ChunkId) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED);
    push_fixed(&mut out, KIND_TOMBSTONE, id, 0, 0, &[]);
    out
}

fn push_fixed(out: &mut Vec<u8>, kind: u8, id: &ChunkId, hlen: u32, dlen: u32, body: &[u8]) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(&dlen.to_le_bytes());
    let crc = chunk::crc32c_append(chunk::crc32c_append(0, &out[out.len() - 32..]), body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

/// One record as read back from a volume.
#[derive(Debug)]
pub struct Record {
    pub id: ChunkId,
    /// None for a tombstone.
    pub header: Option<ChunkHeader>,
    pub place: Place,
}

/// Why a volume could not be read past some offset.
#[derive(Debug)]
pub struct Stop {
    pub offset: u64,
    pub reason: String,
}

/// Reads every record of a volume in order (data is skipped, not read). Reading stops at the
/// first record that does not check out: after a crash that is the torn, unacknowledged tail.
/// Zeros where a record would begin are the zero-filled space past the last record, the end.
pub fn read_records(path: &Path, volume: u32) -> std::io::Result<(Vec<Record>, Option<Stop>)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 16, file);
    let mut out = Vec::new();
    let mut at = 0u64;
    let stop = |offset: u64, reason: &str| Stop {
        offset,
        reason: reason.to_string(),
    };
    while at < len {
        if len - at < FIXED as u64 {
            return Ok((out, Some(stop(at, "truncated record"))));
        }
        let mut fixed = [0u8; FIXED];
        r.read_exact(&mut fixed)?;
        if fixed[..4] == [0; 4] {
            return Ok((out, None));
        }
        if &fixed[..4] != MAGIC {
            return Ok((out, Some(stop(at, "bad record magic"))));
        }
        let word =
            |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let kind = fixed[4];
        let mut idb = [0u8; 16];
        idb.copy_from_slice(&fixed[8..24]);
        let id = ChunkId(u128::from_le_bytes(idb));
        let (hlen, dlen, crc) = (word(24) as usize, word(28) as u64, word(32));
        if hlen > MAX_HEADER || dlen > super::store::MAX_CHUNK_LEN {
            return Ok((out, Some(stop(at, "record lengths out of range"))));
        }
        let size = padded(FIXED as u64 + hlen as u64 + dlen);
        if at + size > len {
            return Ok((out, Some(stop(at, "truncated record"))));
        }
        let mut body = vec![0u8; hlen];
        r.read_exact(&mut body)?;
        if chunk::crc32c_append(chunk::crc32c_append(0, &fixed[..32]), &body) != crc {
            return Ok((out, Some(stop(at, "record checksum mismatch"))));
        }
        let place = Place {
            volume,
            record: at,
            data: at + FIXED as u64 + hlen as u64,
            size,
        };
        let header = match kind {
            KIND_TOMBSTONE if hlen == 0 && dlen == 0 => None,
            KIND_CHUNK => match ChunkHeader::decode(body.as_slice()) {
                Ok(h) if h.length == dlen && h.chunk_id == id.to_string() => Some(h),
                _ => return Ok((out, Some(stop(at, "record header does not match")))),
            },
            _ => return Ok((out, Some(stop(at, "unknown record kind")))),
        };
        r.seek_relative((size - FIXED as u64 - hlen as u64) as i64)?;
        out.push(Record { id, header, place });
        at += size;
    }
    Ok((out, None))
}

/// Reads the whole record at `place` only if every byte of it is in the page cache
/// (`RWF_NOWAIT`): an async thread may call this, a miss costs one syscall.
pub fn read_record_cached(file: &File, place: &Place) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(place.size).ok()?];
    let flags = rustix::io::ReadWriteFlags::NOWAIT;
    match rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        place.record,
        flags,
    ) {
        Ok(n) if n == buf.len() => Some(buf),
        _ => None,
    }
}

/// Checks a whole record read from `place` (framing checksum, header, chunk id, data
/// checksum) and returns its header and the data's range in `record`.
pub fn check_record(
    record: &[u8],
    place: &Place,
    id: &ChunkId,
) -> Result<(ChunkHeader, std::ops::Range<usize>), String> {
    let hlen = usize::try_from(place.data - place.record).map_err(|e| e.to_string())?;
    if record.len() < hlen || hlen < FIXED {
        return Err("record shorter than its header".into());
    }
    let crc = u32::from_le_bytes([record[32], record[33], record[34], record[35]]);
    if &record[..4] != MAGIC
        || chunk::crc32c_append(chunk::crc32c_append(0, &record[..32]), &record[FIXED..hlen]) != crc
    {
        return Err("record header checksum mismatch".into());
    }
    let header = ChunkHeader::decode(&record[FIXED..hlen])
        .map_err(|e| format!("record header does not decode: {e}"))?;
    let len = usize::try_from(header.length).map_err(|e| e.to_string())?;
    if header.chunk_id != id.to_string() || record.len() < hlen + len {
        return Err("record does not hold this chunk".into());
    }
    let data = hlen..hlen + len;
    if chunk::crc32c_append(0, &record[data.clone()]) != header.crc32c {
        return Err("data checksum mismatch".into());
    }
    Ok((header, data))
}

/// Reads and checks the header of the record at `place`.
pub fn read_header_at(file: &File, place: &Place) -> Result<ChunkHeader, String> {
    let hlen = (place.data - place.record) as usize - FIXED;
    let mut buf = vec![0u8; FIXED + hlen];
    file.read_exact_at(&mut buf, place.record)
        .map_err(|e| format!("record unreadable: {e}"))?;
    let crc = u32::from_le_bytes([buf[32], buf[33], buf[34], buf[35]]);
    if &buf[..4] != MAGIC
        || chunk::crc32c_append(chunk::crc32c_append(0, &buf[..32]), &buf[FIXED..]) != crc
    {
        return Err("record header checksum mismatch".into());
    }
    ChunkHeader::decode(&buf[FIXED..]).map_err(|e| format!("record header does not decode: {e}"))
}

/// The volume files in `dir`, by sequence number.
pub fn list(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name();
                    let seq = name.to_str()?.strip_suffix(".vol")?.parse().ok()?;
                    Some((seq, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn volume_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("{seq:08}.vol"))
}

/// Size and live bytes of one volume, for compaction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// Bytes of records (the end of the last one).
    pub size: u64,
    pub live: u64,
    /// Bytes the file takes, zero-filled space included.
    pub file: u64,
    /// Chunks appended whose writers have not yet indexed them: compaction must wait, or it
    /// would miss them.
    pub landing: u32,
}

struct Active {
    seq: u32,
    file: Option<Arc<File>>,
    len: u64,
    /// Bytes of the file that exist and are synced (zero-filled past `len`).
    alloc: u64,
    /// Records appended so far (all volumes), for the group commit.
    appended: u64,
    /// Set after a failed fsync: the next append begins a new volume.
    roll: bool,
    /// Volumes rolled away from since the last group sync: their records are synced by it.
    retired: Vec<Arc<File>>,
}

/// The group sync's view of the volumes: one `fdatasync` per file written since the last
/// round covers every record appended by then.
struct ActiveSync(Arc<Mutex<Active>>);

impl SyncTarget for ActiveSync {
    fn sync_once(&self) -> (u64, Result<(), String>) {
        let (target, seq, files) = {
            let mut a = lock(&self.0);
            let mut files = std::mem::take(&mut a.retired);
            files.extend(a.file.clone());
            (a.appended, a.seq, files)
        };
        for f in files {
            if let Err(e) = f.sync_data() {
                // Linux may report a failed writeback only once: never sync the same file
                // again and hope; every record it covered fails, appends move on.
                tracing::error!(volume = seq, error = %e, "fsync of a volume failed");
                lock(&self.0).roll = true;
                return (target, Err(format!("fsync of volume failed: {e}")));
            }
        }
        (target, Ok(()))
    }
}

/// The volumes of one store: the active volume, per-volume usage and the group commit.
pub struct Volumes {
    dir: PathBuf,
    active: Arc<Mutex<Active>>,
    group: GroupSync,
    usage: Mutex<HashMap<u32, Usage>>,
    /// Open handles for reads from the page cache, one per volume read so far.
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

impl Volumes {
    /// Volumes in `dir` whose usage was found by the startup scan; appends go to a new
    /// volume numbered after `last`.
    pub fn new(
        dir: PathBuf,
        last: u32,
        usage: HashMap<u32, Usage>,
    ) -> Result<Volumes, WorkerError> {
        let active = Arc::new(Mutex::new(Active {
            seq: last,
            file: None,
            len: 0,
            alloc: 0,
            appended: 0,
            roll: true,
            retired: Vec::new(),
        }));
        let group = GroupSync::new("volume-sync", Arc::new(ActiveSync(active.clone())))
            .map_err(|e| WorkerError::io("start the volume sync thread", e))?;
        Ok(Volumes {
            dir,
            active,
            group,
            usage: Mutex::new(usage),
            readers: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The volume currently appended to (sealed volumes are the others).
    pub fn active_seq(&self) -> Option<u32> {
        let a = lock(&self.active);
        a.file.as_ref().filter(|_| !a.roll).map(|_| a.seq)
    }

    pub fn usage(&self) -> HashMap<u32, Usage> {
        lock(&self.usage).clone()
    }

    /// Bytes all volume files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.usage).values().map(|u| u.file).sum()
    }

    /// Seals the active volume, so that compaction may take it.
    pub fn seal(&self) {
        lock(&self.active).roll = true;
    }

    /// Appends `record` (not yet durable); returns where it lies and its sequence number
    /// for [`Volumes::sync`].
    fn append(&self, record: &[u8], landing: bool) -> Result<(Place, u64), WorkerError> {
        let mut a = lock(&self.active);
        if a.roll || a.file.is_none() || a.len + record.len() as u64 > VOLUME_MAX {
            // The old volume's records become durable in the next group sync.
            let mut retired = std::mem::take(&mut a.retired);
            retired.extend(a.file.take());
            a.retired = retired;
            let seq = a.seq + 1;
            let path = volume_path(&self.dir, seq);
            let file = OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| WorkerError::io(format!("create {}", path.display()), e))?;
            // Taken even if the directory sync below fails: the next try uses a new name.
            a.seq = seq;
            lock(&self.usage).insert(seq, Usage::default());
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| WorkerError::io(format!("fsync {}", self.dir.display()), e))?;
            *a = Active {
                seq,
                file: Some(Arc::new(file)),
                len: 0,
                alloc: 0,
                appended: a.appended,
                roll: false,
                retired: std::mem::take(&mut a.retired),
            };
        }
        let Some(file) = a.file.clone() else {
            return Err(WorkerError::Startup("no active volume".into()));
        };
        let offset = a.len;
        if offset + record.len() as u64 > a.alloc {
            self.grow(&mut a, &file, offset + record.len() as u64);
        }
        if let Err(e) = file.write_all_at(record, offset) {
            // Whatever part was written is garbage past the tail; start clean elsewhere.
            a.roll = true;
            return Err(WorkerError::io(format!("append to volume {}", a.seq), e));
        }
        a.len += record.len() as u64;
        a.appended += 1;
        let hlen = u32::from_le_bytes([record[24], record[25], record[26], record[27]]) as u64;
        let place = Place {
            volume: a.seq,
            record: offset,
            data: offset + FIXED as u64 + hlen,
            size: record.len() as u64,
        };
        let mut usage = lock(&self.usage);
        let u = usage.entry(a.seq).or_default();
        u.size += place.size;
        u.file = u.file.max(offset + place.size);
        if record[4] == KIND_CHUNK {
            u.live += place.size;
        }
        if landing {
            u.landing += 1;
        }
        Ok((place, a.appended))
    }

    /// Zero-fills the active volume past `needed`, so that the `fdatasync`s of the appends
    /// that follow write data only. Only an optimisation: if it fails (a full disk), the
    /// append goes on and reports its own error.
    fn grow(&self, a: &mut Active, file: &File, needed: u64) {
        let (at, err) = crate::prealloc::zero_fill_ahead(file, a.alloc.max(a.len), needed);
        if let Some(e) = err {
            // Debug, not warn: on a full disk every append tries again, and the append
            // itself reports the error that matters.
            tracing::debug!(volume = a.seq, error = %e, "cannot zero-fill ahead in a volume");
        }
        a.alloc = at;
        if let Some(u) = lock(&self.usage).get_mut(&a.seq) {
            u.file = u.file.max(at);
        }
    }

    /// Waits until record number `n` is durable (group commit: one `fdatasync` on the sync
    /// thread covers every record appended by then).
    fn sync(&self, n: u64) -> Result<(), WorkerError> {
        self.group.wait(n).map_err(sync_error)
    }

    /// Appends a chunk record and returns once it is durable. The caller indexes it and
    /// then calls [`Volumes::landed`], whether or not this succeeded.
    pub fn put(&self, record: &[u8]) -> Result<Place, WorkerError> {
        let (place, n) = self.append(record, true)?;
        if let Err(e) = self.sync(n) {
            self.forget(&place);
            self.landed(&place);
            return Err(e);
        }
        Ok(place)
    }

    /// The first half of [`Volumes::put`] for async callers: appends a chunk record (a write
    /// into the page cache) and returns its place and number for [`Volumes::wait_durable`].
    /// Several appends and then their waits share one fsync.
    pub fn append_landing(&self, record: &[u8]) -> Result<(Place, u64), WorkerError> {
        self.append(record, true)
    }

    /// Waits, holding no thread, until record `n` (at `place`) is durable. On failure the
    /// record is forgotten and has landed; on success the caller indexes it and then calls
    /// [`Volumes::landed`].
    pub async fn wait_durable(&self, place: &Place, n: u64) -> Result<(), WorkerError> {
        if let Err(e) = self.group.wait_async(n).await {
            self.forget(place);
            self.landed(place);
            return Err(sync_error(e));
        }
        Ok(())
    }

    /// A chunk from [`Volumes::put`] is in the index now.
    pub fn landed(&self, place: &Place) {
        if let Some(u) = lock(&self.usage).get_mut(&place.volume) {
            u.landing = u.landing.saturating_sub(1);
        }
    }

    /// Appends a record for compaction; durable after [`Volumes::sync_all`].
    pub fn put_unsynced(&self, record: &[u8]) -> Result<Place, WorkerError> {
        self.append(record, false).map(|(p, _)| p)
    }

    /// Makes everything appended so far durable.
    pub fn sync_all(&self) -> Result<(), WorkerError> {
        let n = lock(&self.active).appended;
        self.sync(n)
    }

    /// Records that a chunk is gone. Not synced: a tombstone lost in a crash brings the chunk
    /// back, the master finds it belongs to no file and has it deleted again.
    /// Returns the bytes the tombstone takes.
    pub fn tombstone(&self, id: &ChunkId, dead: &Place) -> Result<u64, WorkerError> {
        self.forget(dead);
        self.append(&encode_tombstone(id), false)
            .map(|(p, _)| p.size)
    }

    /// Takes a record out of its volume's live bytes.
    pub fn forget(&self, dead: &Place) {
        if let Some(u) = lock(&self.usage).get_mut(&dead.volume) {
            u.live = u.live.saturating_sub(dead.size);
        }
    }

    /// Opens volume `seq` for reading.
    pub fn open(&self, seq: u32) -> std::io::Result<File> {
        File::open(volume_path(&self.dir, seq))
    }

    /// A shared handle on volume `seq` for positioned reads, opened once. A handle kept
    /// past compaction still reads the records it was asked for (the file is unlinked,
    /// not gone, until the handle drops).
    pub fn reader(&self, seq: u32) -> std::io::Result<Arc<File>> {
        if let Some(f) = lock(&self.readers).get(&seq) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.open(seq)?);
        lock(&self.readers).insert(seq, f.clone());
        Ok(f)
    }

    /// Removes a sealed volume whose live records have all been copied elsewhere.
    pub fn remove(&self, seq: u32) -> Result<u64, WorkerError> {
        let path = volume_path(&self.dir, seq);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let size = lock(&self.usage)
            .get(&seq)
            .map_or(size, |u| u.file.max(size));
        fs::remove_file(&path)
            .map_err(|e| WorkerError::io(format!("remove {}", path.display()), e))?;
        lock(&self.usage).remove(&seq);
        lock(&self.readers).remove(&seq);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| WorkerError::io(format!("fsync {}", self.dir.display()), e))?;
        Ok(size)
    }
}

fn sync_error(message: String) -> WorkerError {
    WorkerError::io("fsync volume", std::io::Error::other(message))
}

/// Reads the whole record at `place` (for compaction and quarantine).
pub fn read_record(file: &File, place: &Place) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; place.size as usize];
    file.read_exact_at(&mut buf, place.record)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: &ChunkId, data: &[u8]) -> ChunkHeader {
        ChunkHeader {
            format_version: chunk::FORMAT_VERSION,
            chunk_id: id.to_string(),
            file_name: "f".into(),
            length: data.len() as u64,
            crc32c: chunk::crc32c_append(0, data),
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_stops_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().to_path_buf(), 0, HashMap::new()).unwrap();
        let a = ChunkId::generate();
        let b = ChunkId::generate();
        let pa = v
            .put(&encode_chunk(&a, &header(&a, b"hello"), b"hello"))
            .unwrap();
        let pb = v
            .put(&encode_chunk(&b, &header(&b, &[7; 1000]), &[7; 1000]))
            .unwrap();
        v.tombstone(&a, &pa).unwrap();
        v.sync_all().unwrap();
        assert_eq!(pa.record % 8, 0);
        assert_eq!(pb.record, pa.size);
        let path = volume_path(dir.path(), 1);
        let (recs, stop) = read_records(&path, 1).unwrap();
        assert!(stop.is_none());
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1].place, pb);
        assert!(recs[2].header.is_none());
        let f = File::open(&path).unwrap();
        let mut data = vec![0u8; 1000];
        f.read_exact_at(&mut data, pb.data).unwrap();
        assert_eq!(data, vec![7; 1000]);
        assert_eq!(read_header_at(&f, &pb).unwrap().length, 1000);

        // The file is zero-filled ahead of its records, and the scan ends cleanly there.
        assert_eq!(fs::metadata(&path).unwrap().len(), PREALLOC_STEP);
        assert_eq!(v.disk_bytes(), PREALLOC_STEP);
        let len = recs[2].place.record + recs[2].place.size;
        assert!(len < PREALLOC_STEP);

        // A torn append: half a record at the end.
        let c = ChunkId::generate();
        let rec = encode_chunk(&c, &header(&c, b"xyz"), b"xyz");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&rec[..30], len).unwrap();
        let (recs, stop) = read_records(&path, 1).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(stop.unwrap().offset, len);
        // A flipped header bit is caught by the record checksum.
        f.write_all_at(&[0xff], pb.record + 45).unwrap();
        let (recs, stop) = read_records(&path, 1).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(stop.unwrap().reason, "record checksum mismatch");
    }

    #[test]
    fn records_across_several_growth_steps_all_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::new(dir.path().to_path_buf(), 0, HashMap::new()).unwrap();
        let mut places = Vec::new();
        for i in 0..100u32 {
            let id = ChunkId::generate();
            let data = vec![i as u8; 30_000 + i as usize];
            places.push(
                v.put(&encode_chunk(&id, &header(&id, &data), &data))
                    .unwrap(),
            );
        }
        let end = places.last().map(|p| p.record + p.size).unwrap();
        assert!(end > 2 * PREALLOC_STEP);
        let path = volume_path(dir.path(), 1);
        let file_len = fs::metadata(&path).unwrap().len();
        assert_eq!(file_len, end.div_ceil(PREALLOC_STEP) * PREALLOC_STEP);
        assert_eq!(v.disk_bytes(), file_len);
        let (recs, stop) = read_records(&path, 1).unwrap();
        assert!(stop.is_none());
        assert_eq!(recs.iter().map(|r| r.place).collect::<Vec<_>>(), places);
        let f = File::open(&path).unwrap();
        let mut data = vec![0u8; 30_099];
        f.read_exact_at(&mut data, places[99].data).unwrap();
        assert_eq!(data, vec![99u8; 30_099]);
    }

    #[test]
    fn concurrent_puts_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let v = Arc::new(Volumes::new(dir.path().to_path_buf(), 4, HashMap::new()).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let v = v.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            let id = ChunkId::generate();
                            let data = vec![(t * 50 + i) as u8; 100 + i];
                            v.put(&encode_chunk(&id, &header(&id, &data), &data))
                                .unwrap()
                        })
                        .count()
                })
            })
            .collect();
        let n: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(n, 400);
        let (recs, stop) = read_records(&volume_path(dir.path(), 5), 5).unwrap();
        assert!(stop.is_none());
        assert_eq!(recs.len(), 400);
        assert_eq!(v.usage()[&5].live, v.usage()[&5].size);
    }
}
