//! The embedded [`MetaStore`] backend: one redb file. Transactions commit without fsync and
//! become durable through a shared empty durable commit (group commit), which the master
//! waits for before it answers.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::store::{
    CommitSeq, FileRecord, GarbageRecord, MetaStore, ReadTxn, StoreError, SyncFuture, UploadRecord,
    WorkerRecord, WriteTxn,
};
use crate::groupsync::{GroupSync, SyncTarget};

const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
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

/// The redb-backed store.
pub struct RedbStore {
    db: Arc<Database>,
    sync: Arc<SyncShared>,
    group: GroupSync,
}

/// Group commit bookkeeping: transactions are committed without fsync and numbered; one
/// durable (empty) commit on the sync thread then persists every one before it, for all
/// waiters at once.
#[derive(Default)]
struct SyncState {
    committed: CommitSeq,
    /// Mutations announced (see [`MetaStore::announce`]) and not yet committed.
    announced: usize,
}

#[derive(Default)]
struct SyncShared {
    state: Mutex<SyncState>,
    /// Signalled when an announced mutation lands (or is withdrawn).
    joined: Condvar,
}

impl SyncShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sync thread's side: waits briefly for announced mutations, then one empty durable
/// commit persists every non-durable commit before it.
struct DurableCommit {
    db: Arc<Database>,
    sync: Arc<SyncShared>,
}

impl SyncTarget for DurableCommit {
    fn sync_once(&self) -> (u64, Result<(), String>) {
        let mut st = self.sync.lock();
        let deadline = std::time::Instant::now() + JOIN_WAIT;
        while st.announced > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .sync
                .joined
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let target = st.committed;
        drop(st);
        let r = self.db.begin_write().map_err(backend).and_then(|mut t| {
            t.set_durability(Durability::Immediate).map_err(backend)?;
            t.commit().map_err(backend)
        });
        if let Err(e) = &r {
            tracing::error!(error = %e, "metadata sync failed");
        }
        (target, r.map_err(|e| e.to_string()))
    }
}

/// How long a sync waits for announced mutations to join it. A durable commit holds redb's
/// writer lock while it fsyncs, so syncing the moment the first commit lands would let one
/// commit through per fsync; waiting for the ones already queued batches them.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

impl RedbStore {
    /// Opens (or creates) `<dir>/meta.redb`. Fails if another master holds it open.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(dir, 64 << 20)
    }

    /// Opens the store with a page cache of `cache_bytes` (redb's default is 1 GiB, which
    /// would let the master grow with the namespace).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("meta.redb");
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(FILES).map_err(backend)?;
            txn.open_table(UPLOADS).map_err(backend)?;
            txn.open_table(GARBAGE).map_err(backend)?;
            txn.open_table(WORKERS).map_err(backend)?;
            txn.open_table(COUNTERS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let sync = Arc::new(SyncShared::default());
        let group = GroupSync::new(
            "meta-sync",
            Arc::new(DurableCommit {
                db: db.clone(),
                sync: sync.clone(),
            }),
        )
        .map_err(|e| StoreError::Backend(format!("cannot start the sync thread: {e}")))?;
        Ok(RedbStore { db, sync, group })
    }
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
}

impl ReadTxn for RedbWrite {
    read_methods!();
}

impl WriteTxn for RedbWrite {
    fn put_file(&mut self, file: &FileRecord) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(FILES).map_err(backend)?;
        t.insert(file.name.as_str(), file.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn remove_file(&mut self, name: &str) -> Result<Option<FileRecord>, StoreError> {
        let mut t = self.txn.open_table(FILES).map_err(backend)?;
        let old = t.remove(name).map_err(backend)?;
        match old {
            Some(v) => Ok(Some(decode(name, v.value())?)),
            None => Ok(None),
        }
    }

    fn put_upload(&mut self, upload: &UploadRecord) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(UPLOADS).map_err(backend)?;
        t.insert(upload.upload_id.as_str(), upload.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn remove_upload(&mut self, upload_id: &str) -> Result<Option<UploadRecord>, StoreError> {
        let mut t = self.txn.open_table(UPLOADS).map_err(backend)?;
        let old = t.remove(upload_id).map_err(backend)?;
        match old {
            Some(v) => Ok(Some(decode(upload_id, v.value())?)),
            None => Ok(None),
        }
    }

    fn put_garbage(&mut self, chunk_id: &str, record: &GarbageRecord) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(GARBAGE).map_err(backend)?;
        t.insert(chunk_id, record.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn remove_garbage(&mut self, chunk_id: &str) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(GARBAGE).map_err(backend)?;
        t.remove(chunk_id).map_err(backend)?;
        Ok(())
    }

    fn put_worker(&mut self, worker: &WorkerRecord) -> Result<(), StoreError> {
        let mut t = self.txn.open_table(WORKERS).map_err(backend)?;
        t.insert(worker.address.as_str(), worker.encode_to_vec().as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn next_file_id(&mut self) -> Result<u64, StoreError> {
        let mut t = self.txn.open_table(COUNTERS).map_err(backend)?;
        let next = t
            .get("next_file_id")
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(1);
        t.insert("next_file_id", next + 1).map_err(backend)?;
        Ok(next)
    }

    fn ensure_file_id_above(&mut self, v: u64) -> Result<(), StoreError> {
        if self.counter()? <= v {
            let mut t = self.txn.open_table(COUNTERS).map_err(backend)?;
            t.insert("next_file_id", v + 1).map_err(backend)?;
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
        let mut txn = RedbWrite {
            txn: self.db.begin_write().map_err(backend)?,
        };
        txn.txn.set_durability(Durability::None).map_err(backend)?;
        match body(&mut txn) {
            Ok(()) => {
                txn.txn.commit().map_err(backend)?;
                // Numbered after the commit: a sync that starts later covers it.
                let mut st = self.sync.lock();
                st.committed += 1;
                Ok(st.committed)
            }
            Err(e) => {
                let _ = txn.txn.abort();
                Err(e)
            }
        }
    }

    fn announce(&self, coming: bool) {
        let mut st = self.sync.lock();
        if coming {
            st.announced += 1;
        } else {
            st.announced = st.announced.saturating_sub(1);
            self.sync.joined.notify_all();
        }
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
                            let _a = super::super::store::Announced::new(store.clone());
                            let ((), seq) = store
                                .write_deferred_with(|tx| -> Result<(), StoreError> {
                                    tx.put_file(&file(&format!("t{t}-{i}")))
                                })
                                .unwrap();
                            // Visible before it is durable.
                            let name = format!("t{t}-{i}");
                            assert!(store.read_with(|r| r.get_file(&name)).unwrap().is_some());
                            drop(_a);
                            store.sync(seq).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(store.sync.lock().committed, 200);
            assert_eq!(store.sync.lock().announced, 0);
        }
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            store.read_with(|t| t.list_files("", 1000)).unwrap().len(),
            200
        );
    }
}
