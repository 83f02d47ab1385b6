//! The master's metadata store behind a narrow, transactional interface.
//!
//! Placement, RPC and repair code talk to [`MetaStore`] only, so the embedded redb backend can
//! later be replaced by a replicated key-value engine (etcd with several masters) without
//! touching them. Records are protobuf-encoded so that fields can be added compatibly.

use thiserror::Error;

/// A store failure; always an internal error for callers (the request is not applied).
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Backend(String),
    #[error("metadata record {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: prost::DecodeError,
    },
    /// The transaction body asked for a rollback; nothing was written.
    #[error("transaction aborted")]
    Aborted,
}

/// One chunk of a committed file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChunkRef {
    #[prost(string, tag = "1")]
    pub chunk_id: String,
    #[prost(uint64, tag = "2")]
    pub length: u64,
    #[prost(uint32, tag = "3")]
    pub crc32c: u32,
}

/// A visible file: its committed version and the chunks that hold its bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub file_id: u64,
    #[prost(uint64, tag = "3")]
    pub version: u64,
    #[prost(uint64, tag = "4")]
    pub size: u64,
    #[prost(uint64, tag = "5")]
    pub chunk_size: u64,
    #[prost(uint32, tag = "6")]
    pub replicas: u32,
    #[prost(int64, tag = "7")]
    pub modified_unix_ms: i64,
    /// Whole-file SHA-256 (files committed by clients before BLAKE3).
    #[prost(string, tag = "8")]
    pub sha256: String,
    #[prost(message, repeated, tag = "9")]
    pub chunks: Vec<ChunkRef>,
    /// Whole-file BLAKE3 (what current clients record).
    #[prost(string, tag = "10")]
    pub blake3: String,
    /// The upload id while the commit is in doubt (see `Master::prepare_uploads`): made
    /// durable before its chunk was known to be, so reads wait until the client or the
    /// workers settle it. Empty for a settled file.
    #[prost(string, tag = "11")]
    pub pending_upload: String,
    /// The workers an in-doubt commit's chunk was sent to: it is abandoned only once every
    /// one of them says it does not hold it.
    #[prost(string, repeated, tag = "12")]
    pub pending_workers: Vec<String>,
}

/// A chunk id handed out for an upload, with the workers of its pipeline (who may hold it).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Allocation {
    #[prost(uint32, tag = "1")]
    pub index: u32,
    #[prost(string, tag = "2")]
    pub chunk_id: String,
    #[prost(string, repeated, tag = "3")]
    pub workers: Vec<String>,
}

/// An upload in progress: invisible until committed; its allocations become garbage if it is
/// aborted or abandoned (its lease expires).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UploadRecord {
    #[prost(string, tag = "1")]
    pub upload_id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub file_id: u64,
    #[prost(uint64, tag = "4")]
    pub version: u64,
    #[prost(uint64, tag = "5")]
    pub size: u64,
    #[prost(uint64, tag = "6")]
    pub chunk_size: u64,
    #[prost(uint32, tag = "7")]
    pub replicas: u32,
    #[prost(int64, tag = "8")]
    pub created_unix_ms: i64,
    #[prost(message, repeated, tag = "9")]
    pub allocations: Vec<Allocation>,
    /// Opened with no size (a pipe): `size` is 0 until the commit fixes it.
    #[prost(bool, tag = "10")]
    pub size_unknown: bool,
    /// Who opened it (the per-client cap), kept for a restart.
    #[prost(string, tag = "11")]
    pub owner: String,
    /// Kept in the store (with each later allocation) so that it survives a master restart:
    /// a large or piped upload, whose client would otherwise send it all again (or, from a
    /// pipe, could not). A small one lives in memory only, saving an fsync per create.
    #[prost(bool, tag = "12")]
    pub durable: bool,
}

/// A chunk to delete, and the workers that may still hold a copy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GarbageRecord {
    #[prost(string, repeated, tag = "1")]
    pub workers: Vec<String>,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(int64, tag = "3")]
    pub since_unix_ms: i64,
}

/// A worker the master has seen, kept so `status` can list it after a master restart.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRecord {
    #[prost(string, tag = "1")]
    pub address: String,
    #[prost(int64, tag = "2")]
    pub first_seen_unix_ms: i64,
    #[prost(uint64, tag = "3")]
    pub capacity_bytes: u64,
    /// Set by an operator: no new chunks, copy its chunks elsewhere.
    #[prost(bool, tag = "4")]
    pub draining: bool,
}

/// Reads inside a transaction (or a read-only snapshot).
pub trait ReadTxn {
    fn get_file(&self, name: &str) -> Result<Option<FileRecord>, StoreError>;
    /// Files with names after `start_after`, in bytewise name order, at most `limit`.
    fn list_files(&self, start_after: &str, limit: usize) -> Result<Vec<FileRecord>, StoreError>;
    fn get_upload(&self, upload_id: &str) -> Result<Option<UploadRecord>, StoreError>;
    fn list_uploads(&self) -> Result<Vec<UploadRecord>, StoreError>;
    /// Every allocation made to a durable upload after its start, with its upload's id.
    fn list_upload_allocations(&self) -> Result<Vec<(String, Allocation)>, StoreError>;
    fn get_garbage(&self, chunk_id: &str) -> Result<Option<GarbageRecord>, StoreError>;
    fn list_garbage(&self) -> Result<Vec<(String, GarbageRecord)>, StoreError>;
    fn list_workers(&self) -> Result<Vec<WorkerRecord>, StoreError>;
}

/// Reads and writes inside one atomic, durable transaction.
pub trait WriteTxn: ReadTxn {
    fn put_file(&mut self, file: &FileRecord) -> Result<(), StoreError>;
    fn remove_file(&mut self, name: &str) -> Result<Option<FileRecord>, StoreError>;
    fn put_upload(&mut self, upload: &UploadRecord) -> Result<(), StoreError>;
    /// One more allocation of a durable upload: a record of its own, so that a file of many
    /// chunks does not rewrite its whole upload record for each.
    fn put_upload_allocation(
        &mut self,
        upload_id: &str,
        allocation: &Allocation,
    ) -> Result<(), StoreError>;
    /// Removes an upload and every allocation put for it.
    fn remove_upload(&mut self, upload_id: &str) -> Result<Option<UploadRecord>, StoreError>;
    fn put_garbage(&mut self, chunk_id: &str, record: &GarbageRecord) -> Result<(), StoreError>;
    fn remove_garbage(&mut self, chunk_id: &str) -> Result<(), StoreError>;
    fn put_worker(&mut self, worker: &WorkerRecord) -> Result<(), StoreError>;
    /// A new, never reused file id.
    fn next_file_id(&mut self) -> Result<u64, StoreError>;
    /// Makes every later `next_file_id` larger than `v` (after a rebuild).
    fn ensure_file_id_above(&mut self, v: u64) -> Result<(), StoreError>;
}

/// What [`MetaStore::sync_async`] returns.
pub type SyncFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Position of a committed transaction in the store's commit order; [`MetaStore::sync`]
/// makes every transaction up to it durable.
pub type CommitSeq = u64;

/// A transactional metadata store. Calls block (disk I/O and fsync): call them from
/// `spawn_blocking`, never from an async task directly; the one exception is the point
/// lookup of `get_file` (see `Master::get_file`).
///
/// Commits come in two steps so that fsyncs can be shared (group commit, as HDFS syncs its
/// edit log outside the namespace lock): [`MetaStore::write_deferred`] applies a transaction
/// and makes it visible to later reads and writes at once, and [`MetaStore::sync`] waits until
/// it is on disk, sharing one fsync among every caller waiting at the same time. Nothing may
/// be acknowledged to a client before its transaction is synced.
pub trait MetaStore: Send + Sync + 'static {
    /// Runs `body` on a consistent snapshot.
    fn read(
        &self,
        body: &mut dyn FnMut(&dyn ReadTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs `body` in a write transaction and commits it (visible, not yet durable) if `body`
    /// returns `Ok`; any error rolls everything back.
    fn write_deferred(
        &self,
        body: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<CommitSeq, StoreError>;
    /// Returns once every transaction up to `seq` is durable.
    fn sync(&self, seq: CommitSeq) -> Result<(), StoreError>;
    /// [`MetaStore::sync`] for async callers: waits without holding a thread.
    fn sync_async(&self, seq: CommitSeq) -> SyncFuture<'_>;
    /// Syncs on the calling thread if no sync is running and says how it went; `None` if
    /// one is running (then [`MetaStore::sync_async`]).
    fn sync_if_idle(&self, seq: CommitSeq) -> Option<Result<(), StoreError>>;
    /// A write that is durable when it returns.
    fn write(
        &self,
        body: &mut dyn FnMut(&mut dyn WriteTxn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let seq = self.write_deferred(body)?;
        self.sync(seq)
    }
}

/// Typed helpers over the object-safe core.
pub trait MetaStoreExt: MetaStore {
    /// A read returning a value.
    fn read_with<T>(
        &self,
        f: impl FnOnce(&dyn ReadTxn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut f = Some(f);
        let mut out = None;
        self.read(&mut |txn| {
            let f = f.take().ok_or(StoreError::Aborted)?;
            out = Some(f(txn)?);
            Ok(())
        })?;
        out.ok_or(StoreError::Aborted)
    }

    /// A write returning a value, durable when it returns; a domain error `E` from `f` rolls
    /// back and is returned as is.
    fn write_with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut dyn WriteTxn) -> Result<T, E>,
    ) -> Result<T, E> {
        let (v, seq) = self.write_deferred_with(f)?;
        self.sync(seq)?;
        Ok(v)
    }

    /// A write returning a value and its commit position, visible but not yet durable: the
    /// caller must [`MetaStore::sync`] before acknowledging it.
    fn write_deferred_with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut dyn WriteTxn) -> Result<T, E>,
    ) -> Result<(T, CommitSeq), E> {
        let mut f = Some(f);
        let mut out: Option<Result<T, E>> = None;
        let res = self.write_deferred(&mut |txn| {
            let f = f.take().ok_or(StoreError::Aborted)?;
            match f(txn) {
                Ok(v) => {
                    out = Some(Ok(v));
                    Ok(())
                }
                Err(e) => {
                    out = Some(Err(e));
                    Err(StoreError::Aborted)
                }
            }
        });
        match (res, out) {
            (Ok(seq), Some(Ok(v))) => Ok((v, seq)),
            (Err(StoreError::Aborted), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(e.into()),
            (Ok(_), _) => Err(StoreError::Aborted.into()),
        }
    }
}

impl<S: MetaStore + ?Sized> MetaStoreExt for S {}
