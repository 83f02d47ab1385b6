//! The embedded [`MetaStore`] backend: one redb file, every write transaction fsynced before
//! the master answers.

use std::path::Path;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::store::{
    FileRecord, GarbageRecord, MetaStore, ReadTxn, StoreError, UploadRecord, WorkerRecord, WriteTxn,
};

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
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) `<dir>/meta.redb`. Fails if another master holds it open.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("meta.redb");
        let db = Database::create(&path)
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
        Ok(RedbStore { db })
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

    fn write(
        &self,
        body: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut txn = RedbWrite {
            txn: self.db.begin_write().map_err(backend)?,
        };
        match body(&mut txn) {
            Ok(()) => txn.txn.commit().map_err(backend),
            Err(e) => {
                let _ = txn.txn.abort();
                Err(e)
            }
        }
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
}
