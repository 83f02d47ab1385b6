//! The embedded [`MetaStore`] backend: one redb file and a journal beside it.
//!
//! A transaction commits to redb without fsync and its changes (the keys it put or removed)
//! are appended to the journal (see [`super::journal`]); one shared `fdatasync` of the
//! journal makes every transaction appended by then durable (group commit), and the master
//! waits for it before it answers. Every [`CHECKPOINT_BYTES`] of journal, one durable redb
//! commit persists everything so far and the journal begins a new segment. At start, the
//! journal's records after the last durable redb commit are applied again, in one durable
//! transaction.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::journal::{self, Journal};
use super::store::{
    Allocation, CommitSeq, FileRecord, GarbageRecord, MetaStore, ReadTxn, StoreError, SyncFuture,
    UploadRecord, WorkerRecord, WriteTxn,
};
use crate::groupsync::GroupSync;

const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// Allocations of durable uploads after their start, keyed `upload_id/chunk_id`.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("upload_allocations");
const GARBAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("garbage");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// Key in [`COUNTERS`] of the last journal record applied; durable with the store.
const JOURNAL_LSN: &str = "journal_lsn";
/// A checkpoint (one durable redb commit, then a new journal segment) follows once the
/// active segment holds this much: it bounds both the journal on disk and the replay at
/// start (a few seconds at most), at the cost of one commit of a few ms per this many bytes.
pub const CHECKPOINT_BYTES: u64 = 32 << 20;

/// One put or remove of a transaction, as the journal records it.
#[derive(Clone, PartialEq, prost::Message)]
struct JournalOp {
    /// Which table ([`TableId`]).
    #[prost(uint32, tag = "1")]
    table: u32,
    #[prost(string, tag = "2")]
    key: String,
    /// The encoded record; empty for a remove.
    #[prost(bytes = "vec", tag = "3")]
    value: Vec<u8>,
    #[prost(bool, tag = "4")]
    remove: bool,
    /// The value, for the counters table.
    #[prost(uint64, tag = "5")]
    counter: u64,
}

/// A transaction's changes, in order.
#[derive(Clone, PartialEq, prost::Message)]
struct JournalTxn {
    #[prost(message, repeated, tag = "1")]
    ops: Vec<JournalOp>,
}

/// Table numbers in the journal.
const T_FILES: u32 = 1;
const T_UPLOADS: u32 = 2;
const T_GARBAGE: u32 = 3;
const T_WORKERS: u32 = 4;
const T_COUNTERS: u32 = 5;
const T_ALLOCATIONS: u32 = 6;

fn record_table(id: u32) -> Option<TableDefinition<'static, &'static str, &'static [u8]>> {
    match id {
        T_FILES => Some(FILES),
        T_UPLOADS => Some(UPLOADS),
        T_GARBAGE => Some(GARBAGE),
        T_WORKERS => Some(WORKERS),
        T_ALLOCATIONS => Some(ALLOCATIONS),
        _ => None,
    }
}

/// The redb-backed store.
pub struct RedbStore {
    db: Arc<Database>,
    journal: Arc<Journal>,
    /// Number of the last transaction committed; held across commit and append so that the
    /// journal's order is the store's.
    writer: Mutex<u64>,
    group: GroupSync,
    /// [`CHECKPOINT_BYTES`], smaller in tests.
    checkpoint_bytes: u64,
    /// Journal records applied at open (none after a clean stop).
    replayed: u64,
}

impl RedbStore {
    /// Opens (or creates) `<dir>/meta.redb`. Fails if another master holds it open.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(dir, 64 << 20)
    }

    /// Opens the store with a page cache of `cache_bytes` (redb's default is 1 GiB, which
    /// would let the master grow with the namespace), and applies the journal's records
    /// that the store does not have yet.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("meta.redb");
        let existed = path.exists();
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        if !existed {
            set_aside_stale_journal(dir)?;
        }
        let txn = db.begin_write().map_err(backend)?;
        let applied = {
            txn.open_table(FILES).map_err(backend)?;
            txn.open_table(UPLOADS).map_err(backend)?;
            txn.open_table(ALLOCATIONS).map_err(backend)?;
            txn.open_table(GARBAGE).map_err(backend)?;
            txn.open_table(WORKERS).map_err(backend)?;
            let counters = txn.open_table(COUNTERS).map_err(backend)?;
            let v = counters.get(JOURNAL_LSN).map_err(backend)?;
            v.map_or(0, |v| v.value())
        };
        let mut replayed = 0u64;
        let last = journal::replay(dir, applied, |_, payload| {
            let rec = JournalTxn::decode(payload).map_err(|e| e.to_string())?;
            apply_ops(&txn, &rec.ops).map_err(|e| e.to_string())?;
            replayed += 1;
            Ok(())
        })
        .map_err(backend)?;
        txn.open_table(COUNTERS)
            .map_err(backend)?
            .insert(JOURNAL_LSN, last)
            .map_err(backend)?;
        // Durable (the default): the journal's old segments are deleted next.
        txn.commit().map_err(backend)?;
        let journal = Arc::new(Journal::start(dir, last).map_err(backend)?);
        let group = GroupSync::new("meta-sync", journal.clone())
            .map_err(|e| StoreError::Backend(format!("cannot start the sync thread: {e}")))?;
        let store = RedbStore {
            db: Arc::new(db),
            journal,
            writer: Mutex::new(last),
            group,
            checkpoint_bytes: CHECKPOINT_BYTES,
            replayed,
        };
        if store.replayed > 0 {
            tracing::info!(records = store.replayed, last, "metadata journal replayed");
        }
        Ok(store)
    }

    fn lock_writer(&self) -> MutexGuard<'_, u64> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every committed transaction durable in redb and begins a new journal segment.
    /// The caller holds the writer lock, so no append runs meanwhile.
    fn checkpoint(&self, last: u64) -> Result<(), StoreError> {
        let mut t = self.db.begin_write().map_err(backend)?;
        t.set_durability(Durability::Immediate).map_err(backend)?;
        // Every transaction up to `last` is in redb (committed, not yet durable): this commit
        // makes them durable and records that replay starts after `last`.
        t.open_table(COUNTERS)
            .map_err(backend)?
            .insert(JOURNAL_LSN, last)
            .map_err(backend)?;
        t.commit().map_err(backend)?;
        self.journal.rotate(last).map_err(backend)
    }
}

/// A clean stop checkpoints, so the next start has no journal to apply (the position of
/// the journal is written by durable commits only; without this, a restart would apply
/// again everything since the last checkpoint, up to [`CHECKPOINT_BYTES`] of it).
impl Drop for RedbStore {
    fn drop(&mut self) {
        let last = *self.lock_writer();
        if let Err(e) = self.checkpoint(last) {
            tracing::warn!(error = %e, "cannot checkpoint the metadata store at close; the journal will be applied at the next start");
        }
    }
}

/// A new store cannot continue an old journal: its segments are renamed out of the way (not
/// deleted: they are the only trace of the metadata that was lost).
fn set_aside_stale_journal(dir: &Path) -> Result<(), StoreError> {
    for (_, seg) in journal::segments(dir).map_err(backend)? {
        let mut to = seg.clone().into_os_string();
        to.push(".stale");
        let to = PathBuf::from(to);
        tracing::warn!(
            segment = %seg.display(),
            "meta.redb was missing: its journal is set aside as {}",
            to.display()
        );
        std::fs::rename(&seg, &to)
            .map_err(|e| StoreError::Backend(format!("cannot rename {}: {e}", seg.display())))?;
    }
    Ok(())
}

/// Applies a journal record's changes inside `txn`.
fn apply_ops(txn: &redb::WriteTransaction, ops: &[JournalOp]) -> Result<(), StoreError> {
    for op in ops {
        if op.table == T_COUNTERS {
            let mut t = txn.open_table(COUNTERS).map_err(backend)?;
            if op.remove {
                t.remove(op.key.as_str()).map_err(backend)?;
            } else {
                t.insert(op.key.as_str(), op.counter).map_err(backend)?;
            }
            continue;
        }
        let def = record_table(op.table).ok_or_else(|| {
            StoreError::Backend(format!("unknown table {} in the journal", op.table))
        })?;
        let mut t = txn.open_table(def).map_err(backend)?;
        if op.remove {
            t.remove(op.key.as_str()).map_err(backend)?;
        } else {
            t.insert(op.key.as_str(), op.value.as_slice())
                .map_err(backend)?;
        }
    }
    Ok(())
}

macro_rules! read_methods {
    () => {
        fn get_file(&self, name: &str) -> Result<Option<FileRecord>, StoreError> {
            get(&self.txn.open_table(FILES).map_err(backend)?, name)
        }

        fn list_files(
            &self,
            start_after: &str,
            limit: usize,
        ) -> Result<Vec<FileRecord>, StoreError> {
            let table = self.txn.open_table(FILES).map_err(backend)?;
            let range = table
                .range::<&str>((
                    std::ops::Bound::Excluded(start_after),
                    std::ops::Bound::Unbounded,
                ))
                .map_err(backend)?;
            let mut out = Vec::new();
            for item in range.take(limit) {
                let (k, v) = item.map_err(backend)?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        }

        fn get_upload(&self, upload_id: &str) -> Result<Option<UploadRecord>, StoreError> {
            get(&self.txn.open_table(UPLOADS).map_err(backend)?, upload_id)
        }

        fn list_uploads(&self) -> Result<Vec<UploadRecord>, StoreError> {
            Ok(all(&self.txn.open_table(UPLOADS).map_err(backend)?)?
                .into_iter()
                .map(|(_, v)| v)
                .collect())
        }

        fn list_upload_allocations(&self) -> Result<Vec<(String, Allocation)>, StoreError> {
            Ok(all(&self.txn.open_table(ALLOCATIONS).map_err(backend)?)?
                .into_iter()
                .filter_map(|(k, v)| k.split_once('/').map(|(u, _)| (u.to_string(), v)))
                .collect())
        }

        fn get_garbage(&self, chunk_id: &str) -> Result<Option<GarbageRecord>, StoreError> {
            get(&self.txn.open_table(GARBAGE).map_err(backend)?, chunk_id)
        }

        fn list_garbage(&self) -> Result<Vec<(String, GarbageRecord)>, StoreError> {
            all(&self.txn.open_table(GARBAGE).map_err(backend)?)
        }

        fn list_workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
            Ok(all(&self.txn.open_table(WORKERS).map_err(backend)?)?
                .into_iter()
                .map(|(_, v)| v)
                .collect())
        }
    };
}

fn get<M: Message + Default>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<M>, StoreError> {
    match table.get(key).map_err(backend)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

fn all<M: Message + Default>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, M)>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter().map_err(backend)? {
        let (k, v) = item.map_err(backend)?;
        out.push((k.value().to_string(), decode(k.value(), v.value())?));
    }
    Ok(out)
}

struct RedbRead {
    txn: redb::ReadTransaction,
}

impl ReadTxn for RedbRead {
    read_methods!();
}

struct RedbWrite {
    txn: redb::WriteTransaction,
    /// The changes so far, for the journal.
    ops: Vec<JournalOp>,
}

impl RedbWrite {
    fn put(&mut self, table: u32, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let def = record_table(table).ok_or(StoreError::Aborted)?;
        self.txn
            .open_table(def)
            .map_err(backend)?
            .insert(key, value.as_slice())
            .map_err(backend)?;
        self.ops.push(JournalOp {
            table,
            key: key.to_string(),
            value,
            ..Default::default()
        });
        Ok(())
    }

    fn remove<M: Message + Default>(
        &mut self,
        table: u32,
        key: &str,
    ) -> Result<Option<M>, StoreError> {
        let def = record_table(table).ok_or(StoreError::Aborted)?;
        let mut t = self.txn.open_table(def).map_err(backend)?;
        let old = match t.remove(key).map_err(backend)? {
            Some(v) => Some(decode(key, v.value())?),
            None => None,
        };
        drop(t);
        if old.is_some() {
            self.ops.push(JournalOp {
                table,
                key: key.to_string(),
                remove: true,
                ..Default::default()
            });
        }
        Ok(old)
    }

    fn set_counter(&mut self, key: &str, value: u64) -> Result<(), StoreError> {
        self.txn
            .open_table(COUNTERS)
            .map_err(backend)?
            .insert(key, value)
            .map_err(backend)?;
        self.ops.push(JournalOp {
            table: T_COUNTERS,
            key: key.to_string(),
            counter: value,
            ..Default::default()
        });
        Ok(())
    }
}

impl ReadTxn for RedbWrite {
    read_methods!();
}

impl WriteTxn for RedbWrite {
    fn put_file(&mut self, file: &FileRecord) -> Result<(), StoreError> {
        self.put(T_FILES, &file.name, file.encode_to_vec())
    }

    fn remove_file(&mut self, name: &str) -> Result<Option<FileRecord>, StoreError> {
        self.remove(T_FILES, name)
    }

    fn put_upload(&mut self, upload: &UploadRecord) -> Result<(), StoreError> {
        self.put(T_UPLOADS, &upload.upload_id, upload.encode_to_vec())
    }

    fn put_upload_allocation(
        &mut self,
        upload_id: &str,
        allocation: &Allocation,
    ) -> Result<(), StoreError> {
        let key = format!("{upload_id}/{}", allocation.chunk_id);
        self.put(T_ALLOCATIONS, &key, allocation.encode_to_vec())
    }

    fn remove_upload(&mut self, upload_id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let prefix = format!("{upload_id}/");
        let keys = {
            let t = self.txn.open_table(ALLOCATIONS).map_err(backend)?;
            let mut keys = Vec::new();
            for item in t.range::<&str>(prefix.as_str()..).map_err(backend)? {
                let (k, _) = item.map_err(backend)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                keys.push(k.value().to_string());
            }
            keys
        };
        for k in keys {
            self.remove::<Allocation>(T_ALLOCATIONS, &k)?;
        }
        self.remove(T_UPLOADS, upload_id)
    }

    fn put_garbage(&mut self, chunk_id: &str, record: &GarbageRecord) -> Result<(), StoreError> {
        self.put(T_GARBAGE, chunk_id, record.encode_to_vec())
    }

    fn remove_garbage(&mut self, chunk_id: &str) -> Result<(), StoreError> {
        self.remove::<GarbageRecord>(T_GARBAGE, chunk_id)?;
        Ok(())
    }

    fn put_worker(&mut self, worker: &WorkerRecord) -> Result<(), StoreError> {
        self.put(T_WORKERS, &worker.address, worker.encode_to_vec())
    }

    fn next_file_id(&mut self) -> Result<u64, StoreError> {
        let next = self.counter()?;
        self.set_counter("next_file_id", next + 1)?;
        Ok(next)
    }

    fn ensure_file_id_above(&mut self, v: u64) -> Result<(), StoreError> {
        if self.counter()? <= v {
            self.set_counter("next_file_id", v + 1)?;
        }
        Ok(())
    }
}

impl RedbWrite {
    fn counter(&mut self) -> Result<u64, StoreError> {
        let t = self.txn.open_table(COUNTERS).map_err(backend)?;
        let v = t
            .get("next_file_id")
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(1);
        Ok(v)
    }
}

impl MetaStore for RedbStore {
    fn read(
        &self,
        body: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = RedbRead {
            txn: self.db.begin_read().map_err(backend)?,
        };
        body(&txn)
    }

    fn write_deferred(
        &self,
        body: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<CommitSeq, StoreError> {
        let mut last = self.lock_writer();
        if self.journal.is_broken() {
            // A journal sync failed: make everything durable in redb and begin a new
            // segment before anything more is journaled.
            self.checkpoint(*last)?;
        }
        let mut txn = RedbWrite {
            txn: self.db.begin_write().map_err(backend)?,
            ops: Vec::new(),
        };
        txn.txn.set_durability(Durability::None).map_err(backend)?;
        if let Err(e) = body(&mut txn) {
            let _ = txn.txn.abort();
            return Err(e);
        }
        if txn.ops.is_empty() {
            // Nothing changed: nothing to journal; durable once what came before is.
            let _ = txn.txn.abort();
            return Ok(*last);
        }
        let lsn = *last + 1;
        let payload = JournalTxn {
            ops: std::mem::take(&mut txn.ops),
        }
        .encode_to_vec();
        // The journal position redb holds is written by the durable commits only (opening,
        // checkpoints): a crash brings redb back to the last of them, whose position says
        // where replay starts. Writing it here too dirtied one more table per transaction.
        txn.txn.commit().map_err(backend)?;
        *last = lsn;
        match self.journal.append(lsn, &payload) {
            Ok(len) if len >= self.checkpoint_bytes => self.checkpoint(lsn)?,
            Ok(_) => {}
            Err(e) => {
                // The transaction is visible but not journaled: a durable redb commit covers
                // it (and every one before), and the journal begins again after it.
                tracing::warn!(error = %e, "cannot append to the metadata journal; checkpointing");
                if let Err(c) = self.checkpoint(lsn) {
                    // Record `lsn` is in neither: appending the next one would leave a gap
                    // that stops the master at its next start. Every write now checkpoints
                    // first.
                    self.journal
                        .mark_broken(format!("record {lsn} could not be appended: {e}"));
                    return Err(c);
                }
            }
        }
        Ok(lsn)
    }

    fn sync(&self, seq: CommitSeq) -> Result<(), StoreError> {
        self.group.wait(seq).map_err(StoreError::Backend)
    }

    fn sync_if_idle(&self, seq: CommitSeq) -> Option<Result<(), StoreError>> {
        self.group
            .try_lead(seq)
            .map(|r| r.map_err(StoreError::Backend))
    }

    fn sync_async(&self, seq: CommitSeq) -> SyncFuture<'_> {
        Box::pin(async move {
            self.group
                .wait_async(seq)
                .await
                .map_err(StoreError::Backend)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::store::MetaStoreExt;

    fn file(name: &str) -> FileRecord {
        FileRecord {
            name: name.into(),
            file_id: 1,
            version: 1,
            size: 3,
            ..Default::default()
        }
    }

    #[test]
    fn commit_persists_and_rollback_does_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store
                .write_with(|t| -> Result<(), StoreError> {
                    t.put_file(&file("b"))?;
                    t.put_file(&file("a"))?;
                    Ok(())
                })
                .unwrap();
            let r: Result<(), StoreError> = store.write_with(|t| {
                t.put_file(&file("c"))?;
                Err(StoreError::Backend("domain says no".into()))
            });
            assert!(r.is_err());
            assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 1);
            assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 2);
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let names: Vec<String> = store
            .read_with(|t| t.list_files("", 10))
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let after_a = store.read_with(|t| t.list_files("a", 10)).unwrap();
        assert_eq!(after_a.len(), 1);
        assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 3);
    }

    #[test]
    fn concurrent_deferred_writes_share_syncs_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = std::sync::Arc::new(RedbStore::open(dir.path()).unwrap());
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        for i in 0..25 {
                            let ((), seq) = store
                                .write_deferred_with(|tx| -> Result<(), StoreError> {
                                    tx.put_file(&file(&format!("t{t}-{i}")))
                                })
                                .unwrap();
                            // Visible before it is durable.
                            let name = format!("t{t}-{i}");
                            assert!(store.read_with(|r| r.get_file(&name)).unwrap().is_some());
                            store.sync(seq).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(*store.lock_writer(), 200);
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            store.read_with(|t| t.list_files("", 1000)).unwrap().len(),
            200
        );
    }

    fn names(store: &RedbStore) -> Vec<String> {
        store
            .read_with(|t| t.list_files("", 100_000))
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect()
    }

    /// What `kill -9` leaves, in a new directory: the files as they are now (the store still
    /// open: a clean close would checkpoint), with `meta.redb` replaced by `saved_redb`, a
    /// copy taken at an earlier durable commit.
    fn crash_copy(dir: &Path, saved_redb: &Path) -> tempfile::TempDir {
        let crashed = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.path() != saved_redb {
                std::fs::copy(e.path(), crashed.path().join(e.file_name())).unwrap();
            }
        }
        std::fs::copy(saved_redb, crashed.path().join("meta.redb")).unwrap();
        crashed
    }

    /// A durable upload's later allocations are records of their own: they come back after
    /// a crash (from the journal), and removing one upload removes its allocations only
    /// (an id that is a prefix of another's is no prefix once the `/` is added).
    #[test]
    fn upload_allocations_survive_a_crash_and_go_with_their_upload() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("saved.redb");
        let upload = |id: &str| UploadRecord {
            upload_id: id.into(),
            name: format!("{id}.bin"),
            durable: true,
            ..Default::default()
        };
        let alloc = |index: u32| Allocation {
            index,
            chunk_id: format!("{index:032x}"),
            workers: vec!["127.0.0.1:1".into()],
        };
        let crashed = {
            let store = RedbStore::open(dir.path()).unwrap();
            std::fs::copy(dir.path().join("meta.redb"), &saved).unwrap();
            store
                .write_with(|t| -> Result<(), StoreError> {
                    t.put_upload(&upload("u1"))?;
                    t.put_upload(&upload("u10"))?;
                    t.put_upload_allocation("u1", &alloc(1))?;
                    t.put_upload_allocation("u1", &alloc(2))?;
                    t.put_upload_allocation("u10", &alloc(3))
                })
                .unwrap();
            crash_copy(dir.path(), &saved)
        };
        let store = RedbStore::open(crashed.path()).unwrap();
        let mut listed = store.read_with(|t| t.list_upload_allocations()).unwrap();
        listed.sort_by_key(|(_, a)| a.index);
        let ids: Vec<(&str, u32)> = listed.iter().map(|(u, a)| (u.as_str(), a.index)).collect();
        assert_eq!(ids, [("u1", 1), ("u1", 2), ("u10", 3)]);
        assert_eq!(listed[0].1, alloc(1));
        store
            .write_with(|t| t.remove_upload("u1").map(|r| assert!(r.is_some())))
            .unwrap();
        let left = store.read_with(|t| t.list_upload_allocations()).unwrap();
        assert_eq!(left, [("u10".to_string(), alloc(3))]);
        let uploads = store.read_with(|t| t.list_uploads()).unwrap();
        assert_eq!(uploads, [upload("u10")]);
    }

    /// What a crash leaves: redb as of its last durable commit (here, a copy taken then),
    /// and the journal as synced.
    #[test]
    fn the_journal_restores_what_redb_had_not_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("saved.redb");
        let crashed = {
            let store = RedbStore::open(dir.path()).unwrap();
            std::fs::copy(dir.path().join("meta.redb"), &saved).unwrap();
            for n in ["a", "b", "c"] {
                store.write_with(|t| t.put_file(&file(n))).unwrap();
            }
            store
                .write_with(|t| -> Result<(), StoreError> {
                    t.remove_file("b")?;
                    t.put_garbage(
                        "chunk1",
                        &GarbageRecord {
                            reason: "deleted".into(),
                            ..Default::default()
                        },
                    )
                })
                .unwrap();
            assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 1);
            assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 2);
            // A rolled-back transaction leaves no record.
            let r: Result<(), StoreError> = store.write_with(|t| {
                t.put_file(&file("rolled-back"))?;
                Err(StoreError::Aborted)
            });
            assert!(r.is_err());
            crash_copy(dir.path(), &saved)
        };
        let store = RedbStore::open(crashed.path()).unwrap();
        assert_eq!(names(&store), ["a", "c"]);
        assert!(
            store
                .read_with(|t| t.get_garbage("chunk1"))
                .unwrap()
                .is_some()
        );
        assert_eq!(store.write_with(|t| t.next_file_id()).unwrap(), 3);
        // The replay was made durable and the journal begun again.
        assert_eq!(journal::segments(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn checkpoints_bound_the_journal_and_a_gap_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("saved.redb");
        {
            let mut store = RedbStore::open(dir.path()).unwrap();
            store.checkpoint_bytes = 64 << 10;
            std::fs::copy(dir.path().join("meta.redb"), &saved).unwrap();
            for i in 0..300 {
                let mut f = file(&format!("f{i:03}"));
                f.sha256 = "x".repeat(1000);
                store.write_with(|t| t.put_file(&f)).unwrap();
            }
            let segs = journal::segments(dir.path()).unwrap();
            assert_eq!(segs.len(), 1);
            assert!(segs[0].0 > 3, "no checkpoint happened: {segs:?}");
            // What `kill -9` leaves is what the files hold now: a copy opens with all.
            let crashed = tempfile::tempdir().unwrap();
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), crashed.path().join(e.file_name())).unwrap();
            }
            let copy = RedbStore::open(crashed.path()).unwrap();
            assert_eq!(names(&copy).len(), 300);
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(names(&store).len(), 300);
        drop(store);
        // redb from before the checkpoints: the records it needs are gone.
        std::fs::copy(&saved, dir.path().join("meta.redb")).unwrap();
        match RedbStore::open(dir.path()) {
            Err(e) => assert!(e.to_string().contains("missing"), "{e}"),
            Ok(_) => panic!("a store that the journal does not continue opened"),
        }
    }

    /// The journal position is written only by durable commits (opening, checkpoints, a
    /// clean close). After a crash redb is back at the last checkpoint and the journal
    /// supplies the rest; should redb ever hold changes past its position, the records are
    /// applied again and, being whole puts and removals, give the same state. Overwrites,
    /// removals, counters and a name removed then put back, past a checkpoint, come back
    /// exactly after a clean close, after a crash, and after each twice.
    #[test]
    fn changes_past_a_checkpoint_come_back_exactly_after_a_close_or_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let ids = {
            let mut store = RedbStore::open(dir.path()).unwrap();
            store.checkpoint_bytes = 16 << 10;
            for i in 0..100 {
                let mut f = file(&format!("f{i:03}"));
                f.sha256 = "x".repeat(500);
                store.write_with(|t| t.put_file(&f)).unwrap();
            }
            assert!(
                journal::segments(dir.path()).unwrap()[0].0 > 1,
                "no checkpoint"
            );
            store.checkpoint_bytes = u64::MAX;
            let mut ids = Vec::new();
            for i in 0..10 {
                let mut f = file(&format!("f{i:03}"));
                f.version = 2;
                store.write_with(|t| t.put_file(&f)).unwrap();
                store
                    .write_with(|t| t.remove_file(&format!("f{:03}", 50 + i)).map(drop))
                    .unwrap();
                ids.push(store.write_with(|t| t.next_file_id()).unwrap());
            }
            store
                .write_with(|t| t.remove_file("f099").map(drop))
                .unwrap();
            store.write_with(|t| t.put_file(&file("f099"))).unwrap();
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), crashed.path().join(e.file_name())).unwrap();
            }
            ids
        };
        let check = |path: &Path, replays: bool| {
            let store = RedbStore::open(path).unwrap();
            assert_eq!(
                store.replayed > 0,
                replays,
                "{} records applied",
                store.replayed
            );
            let all = names(&store);
            assert_eq!(all.len(), 90, "{all:?}");
            for i in 0..10 {
                let f = store
                    .read_with(|t| t.get_file(&format!("f{i:03}")))
                    .unwrap()
                    .unwrap();
                assert_eq!(f.version, 2);
                assert!(!all.contains(&format!("f{:03}", 50 + i)));
            }
            let f099 = store.read_with(|t| t.get_file("f099")).unwrap().unwrap();
            assert_eq!(f099.version, 1);
            // The counter carries on past every id handed out before.
            let next = store.write_with(|t| t.next_file_id()).unwrap();
            assert!(next > *ids.iter().max().unwrap(), "{next} after {ids:?}");
        };
        // A clean close checkpointed: nothing to apply, then or after the next close.
        check(dir.path(), false);
        check(dir.path(), false);
        check(crashed.path(), true);
        check(crashed.path(), false);
    }

    /// After a failed sync or append, nothing is journaled until a checkpoint has made the
    /// store durable and a new segment has begun; the next write does both.
    #[test]
    fn a_broken_journal_is_checkpointed_away_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("saved.redb");
        let crashed = {
            let store = RedbStore::open(dir.path()).unwrap();
            store.write_with(|t| t.put_file(&file("a"))).unwrap();
            store.journal.mark_broken("simulated".into());
            assert!(matches!(
                store.journal.append(99, b"x"),
                Err(journal::JournalError::Broken(_))
            ));
            let seg_before = journal::segments(dir.path()).unwrap()[0].0;
            store.write_with(|t| t.put_file(&file("b"))).unwrap();
            assert!(!store.journal.is_broken());
            let segs = journal::segments(dir.path()).unwrap();
            assert_eq!(segs.len(), 1);
            assert!(segs[0].0 > seg_before);
            // What a crash would leave of redb: the checkpoint; `c` comes from the journal.
            std::fs::copy(dir.path().join("meta.redb"), &saved).unwrap();
            store.write_with(|t| t.put_file(&file("c"))).unwrap();
            crash_copy(dir.path(), &saved)
        };
        let store = RedbStore::open(crashed.path()).unwrap();
        assert_eq!(names(&store), ["a", "b", "c"]);
    }

    #[test]
    fn a_new_store_sets_an_old_journal_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store.write_with(|t| t.put_file(&file("a"))).unwrap();
        }
        std::fs::remove_file(dir.path().join("meta.redb")).unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(names(&store).is_empty());
        let stale = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".stale")
            })
            .count();
        assert_eq!(stale, 1);
    }
}
