//! The master's metadata journal: numbered records appended to preallocated segment files
//! and made durable by one `fdatasync` shared among every writer (group commit).
//!
//! Why not let the store sync itself: a durable redb commit writes the B-tree pages a
//! transaction touched, the allocator state and the header, scattered over the file, and
//! took 0.23-0.44 ms here, while one small record written into zero-filled space is made
//! durable in about 0.1 ms. So, as HDFS keeps an edit log beside its fsimage, every
//! transaction is committed to the store without fsync and its changes are appended here;
//! the store is made durable only now and then (a checkpoint), after which the segments it
//! covers are deleted. At start the records after the store's last durable transaction are
//! applied again.
//!
//! A record is `magic (4) | payload length (4) | number (8) | CRC32C (4) | payload`, the CRC
//! covering length, number and payload. Each segment opens with a record without payload
//! that holds the number the store was durable at when the segment began. Numbers follow each other without gaps. Reading a
//! segment stops at a zero magic (the zero-filled tail) or at the first record that does
//! not check out: a torn write left by a crash, which was never acknowledged because only
//! an `fdatasync` that covers a record lets its writer answer. A new segment is begun at
//! every start, so nothing is ever appended after a torn tail.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::groupsync::SyncTarget;
use crate::prealloc::zero_fill_ahead;

const MAGIC: &[u8; 4] = b"DFJ1";
/// Magic of the record that opens every segment: its number is the last record the store
/// had made durable when the segment was begun, so a store older than that (a restored
/// copy of meta.redb) is refused even when the segment holds no record yet.
const BASE_MAGIC: &[u8; 4] = b"DFJB";
const HEADER: usize = 20;
/// Largest record accepted when reading; a larger length is a torn or foreign header.
pub const MAX_RECORD: usize = 256 << 20;
const PREFIX: &str = "meta-journal-";
const SUFFIX: &str = ".log";

/// A journal failure.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("metadata journal: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Records the store needs are missing: the journal does not continue the store.
    #[error(
        "metadata journal: the store is durable up to record {after} but the journal goes on \
         at record {found}; records in between are missing (was meta.redb replaced?)"
    )]
    Gap { after: u64, found: u64 },
    #[error("metadata journal: record {lsn}: {message}")]
    Apply { lsn: u64, message: String },
    #[error("metadata journal: an earlier fsync failed ({0}); a checkpoint must come first")]
    Broken(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn segment_name(seq: u64) -> String {
    format!("{PREFIX}{seq:010}{SUFFIX}")
}

/// The journal's segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let seq = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.strip_suffix(SUFFIX))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every segment in `dir` in order and calls `apply` with each record numbered after
/// `after`, which must follow on from it without a gap. Returns the last record's number
/// (`after` if there is none).
pub fn replay(
    dir: &Path,
    after: u64,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, JournalError> {
    let mut last = after;
    for (_, path) in segments(dir)? {
        let file = File::open(&path).map_err(io("open", &path))?;
        let mut r = BufReader::with_capacity(256 << 10, file);
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; HEADER];
            match r.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io("read", &path)(e)),
            }
            if h[..4] == [0; 4] {
                break;
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let mut lsn_bytes = [0u8; 8];
            lsn_bytes.copy_from_slice(&h[8..16]);
            let lsn = u64::from_le_bytes(lsn_bytes);
            let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
            let base = &h[..4] == BASE_MAGIC;
            if (&h[..4] != MAGIC && !base) || len > MAX_RECORD {
                tracing::warn!(segment = %path.display(), "journal segment ends in a torn record");
                break;
            }
            payload.resize(len, 0);
            match r.read_exact(&mut payload) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::warn!(segment = %path.display(), "journal segment ends in a torn record");
                    break;
                }
                Err(e) => return Err(io("read", &path)(e)),
            }
            if crc32c::crc32c_append(crc32c::crc32c(&h[4..16]), &payload) != crc {
                tracing::warn!(segment = %path.display(), lsn, "journal segment ends in a torn record");
                break;
            }
            if base {
                if lsn > last {
                    return Err(JournalError::Gap {
                        after: last,
                        found: lsn + 1,
                    });
                }
                continue;
            }
            if lsn <= last {
                continue;
            }
            if lsn != last + 1 {
                return Err(JournalError::Gap {
                    after: last,
                    found: lsn,
                });
            }
            apply(lsn, &payload).map_err(|message| JournalError::Apply { lsn, message })?;
            last = lsn;
        }
    }
    Ok(last)
}

fn record(magic: &[u8; 4], lsn: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(HEADER + payload.len());
    rec.extend_from_slice(magic);
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[4..16]), payload);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.extend_from_slice(payload);
    rec
}

struct State {
    seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where the next record goes.
    tail: u64,
    /// The segment is zero-filled up to here.
    alloc: u64,
    /// Number of the last record appended.
    last: u64,
    /// A sync of this segment failed: nothing more may be appended to it.
    broken: Option<String>,
}

/// The journal's active segment (see the module documentation).
pub struct Journal {
    dir: PathBuf,
    state: Mutex<State>,
}

impl Journal {
    /// Begins a new segment after every existing one and deletes the older ones. Every
    /// record up to `last` must already be durable in the store.
    pub fn start(dir: &Path, last: u64) -> Result<Journal, JournalError> {
        let old = segments(dir)?;
        let seq = old.last().map_or(1, |(s, _)| s + 1);
        let state = Self::new_segment(dir, seq, last)?;
        let journal = Journal {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        };
        journal.remove_before(seq);
        Ok(journal)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates segment `seq`, zero-filled one step ahead, and makes it and its name durable,
    /// so that a record synced into it can be found after a crash.
    fn new_segment(dir: &Path, seq: u64, last: u64) -> Result<State, JournalError> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io("create", &path))?;
        let (alloc, err) = zero_fill_ahead(&file, 0, 1);
        let written = match err {
            Some(e) => Err(e),
            None => file.write_all_at(&record(BASE_MAGIC, last, 0, &[]), 0),
        };
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io("begin", &path)(e));
        }
        file.sync_all().map_err(io("sync", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", dir))?;
        Ok(State {
            seq,
            path,
            file: Arc::new(file),
            tail: HEADER as u64,
            alloc,
            last,
            broken: None,
        })
    }

    fn remove_before(&self, seq: u64) {
        let Ok(all) = segments(&self.dir) else { return };
        for (s, path) in all.into_iter().filter(|(s, _)| *s < seq) {
            // Harmless if it fails: its records are all in the store and are skipped.
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(segment = s, error = %e, "cannot remove an old journal segment");
            }
        }
    }

    /// Appends record `lsn` (the next number) to the page cache; durable after a sync.
    /// Returns the bytes now in the active segment (when to checkpoint).
    pub fn append(&self, lsn: u64, payload: &[u8]) -> Result<u64, JournalError> {
        let mut st = self.lock();
        if let Some(e) = &st.broken {
            return Err(JournalError::Broken(e.clone()));
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RECORD)
            .ok_or_else(|| JournalError::Apply {
                lsn,
                message: format!("a transaction of {} bytes is too large", payload.len()),
            })?;
        let rec = record(MAGIC, lsn, len, payload);
        let end = st.tail + rec.len() as u64;
        if end > st.alloc {
            let (alloc, err) = zero_fill_ahead(&st.file, st.alloc, end);
            if let Some(e) = err {
                tracing::debug!(error = %e, "cannot zero-fill ahead in the journal");
            }
            st.alloc = alloc.max(st.alloc);
        }
        st.file
            .write_all_at(&rec, st.tail)
            .map_err(io("append to", &st.path))?;
        st.tail = end;
        st.last = lsn;
        Ok(end)
    }

    /// Begins a new segment and deletes the older ones. Call it only once the store is
    /// durable up to record `durable` (the last one committed, appended or not), with no
    /// append running.
    pub fn rotate(&self, durable: u64) -> Result<(), JournalError> {
        let seq = self.lock().seq + 1;
        let state = Self::new_segment(&self.dir, seq, durable)?;
        *self.lock() = state;
        self.remove_before(seq);
        Ok(())
    }

    /// A sync of the active segment failed; it must be rotated away from.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    /// A record could not be appended and no checkpoint covered it: the next record would
    /// leave a gap, so nothing more may be appended until a rotation.
    pub fn mark_broken(&self, why: String) {
        self.lock().broken = Some(why);
    }
}

impl SyncTarget for Journal {
    fn sync_once(&self) -> (u64, Result<(), String>) {
        let (last, seq, file, path) = {
            let st = self.lock();
            (st.last, st.seq, st.file.clone(), st.path.clone())
        };
        match file.sync_data() {
            Ok(()) => (last, Ok(())),
            Err(e) => {
                let msg = format!("cannot sync {}: {e}", path.display());
                tracing::error!(error = %msg, "metadata journal sync failed");
                let mut st = self.lock();
                // Linux reports a failed writeback once: this segment cannot be trusted.
                if st.seq == seq {
                    st.broken = Some(msg.clone());
                }
                (last, Err(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Records = Vec<(u64, Vec<u8>)>;

    fn collect(dir: &Path, after: u64) -> Result<(u64, Records), JournalError> {
        let mut out = Vec::new();
        let last = replay(dir, after, |lsn, p| {
            out.push((lsn, p.to_vec()));
            Ok(())
        })?;
        Ok((last, out))
    }

    #[test]
    fn records_come_back_in_order_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path(), 0).unwrap();
        let mut len = 0;
        for lsn in 1..=300u64 {
            len = j
                .append(lsn, &vec![lsn as u8; (lsn as usize * 37) % 5000])
                .unwrap();
        }
        assert!(len > crate::prealloc::PREALLOC_STEP);
        assert_eq!(j.sync_once(), (300, Ok(())));
        let (last, recs) = collect(dir.path(), 0).unwrap();
        assert_eq!(last, 300);
        assert_eq!(recs.len(), 300);
        for (i, (lsn, p)) in recs.iter().enumerate() {
            assert_eq!(*lsn, i as u64 + 1);
            assert_eq!(p, &vec![*lsn as u8; (*lsn as usize * 37) % 5000]);
        }
        // Only the records after the store's position are applied.
        let (_, recs) = collect(dir.path(), 250).unwrap();
        assert_eq!(recs.first().map(|r| r.0), Some(251));
        // A rotation deletes the old segment; records continue in the new one.
        j.rotate(300).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        j.append(301, b"after").unwrap();
        let (last, recs) = collect(dir.path(), 300).unwrap();
        assert_eq!((last, recs.len()), (301, 1));
        // A restart begins a new segment and keeps the records not yet in the store.
        drop(j);
        let (last, _) = collect(dir.path(), 300).unwrap();
        let j = Journal::start(dir.path(), last).unwrap();
        j.append(302, b"x").unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_torn_tail_ends_the_replay_and_a_gap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path(), 10).unwrap();
        for lsn in 11..=20u64 {
            j.append(lsn, b"0123456789").unwrap();
        }
        let (_, path) = segments(dir.path()).unwrap().pop().unwrap();
        // Corrupt record 16: 15 is the last one applied.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(
            b"X",
            HEADER as u64 + 5 * (HEADER as u64 + 10) + HEADER as u64 + 3,
        )
        .unwrap();
        let (last, recs) = collect(dir.path(), 10).unwrap();
        assert_eq!(last, 15);
        assert_eq!(recs.len(), 5);
        // A store that is durable only up to 5 cannot be continued by a journal begun at 10.
        match collect(dir.path(), 5) {
            Err(JournalError::Gap {
                after: 5,
                found: 11,
            }) => {}
            other => panic!("expected a gap, got {:?}", other.map(|r| r.0)),
        }
    }

    #[test]
    fn a_failed_apply_names_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path(), 0).unwrap();
        j.append(1, b"a").unwrap();
        j.append(2, b"b").unwrap();
        let r = replay(dir.path(), 0, |lsn, _| {
            if lsn == 2 { Err("bad".into()) } else { Ok(()) }
        });
        assert!(matches!(r, Err(JournalError::Apply { lsn: 2, .. })));
    }
}
