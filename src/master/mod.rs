//! The master: names, placement, the worker registry and health, cluster status and events.
//!
//! It never carries file bytes. Mutations of the namespace are committed to the
//! [`store::MetaStore`] before the master answers; replica locations live in memory and are
//! rebuilt from worker reports (see [`chunkmap`]).

pub mod chunkmap;
pub mod error;
pub mod in_doubt;
pub mod journal;
pub mod namespace;
pub mod operator;
pub mod rebuild;
pub mod redb_store;
pub mod registry;
pub mod repair;
pub mod retry_cache;
pub mod service;
pub mod status;
pub mod store;
pub mod workers;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::chunk::ChunkId;
use crate::events::EventLog;
use chunkmap::ChunkMap;
pub use error::MasterError;
use registry::{HealthPolicy, Registry};
use store::{GarbageRecord, MetaStore, MetaStoreExt};

/// Master settings (the `master` binary's flags).
#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub data_dir: PathBuf,
    pub chunk_size: u64,
    pub default_replicas: u32,
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// An upload with no sign of life for this long is aborted and its chunks collected.
    pub upload_lease: Duration,
    /// Garbage and orphan chunks are deleted only after this long.
    pub gc_grace: Duration,
    /// How long a commit made beside its writes (`PrepareUploads`) waits for its client to
    /// confirm it before the master asks the workers whether they hold its chunk. Clients
    /// acknowledge such a write unconfirmed only within half of this.
    pub in_doubt_grace: Duration,
    pub max_repairs_per_worker: usize,
    /// Rebuild the namespace from worker chunk headers, collecting reports this long first.
    /// Refused unless the metadata store is empty.
    pub rebuild_window: Option<Duration>,
    /// Bytes of the metadata store's page cache.
    pub metadata_cache: u64,
    /// Run the repair loop (re-replication, trim, orphan collection). Off only to hold a
    /// degraded state still: maintenance, or tests that inspect it.
    pub repair: bool,
    /// Authentication: with a secret, every RPC needs a token and chunk access needs a
    /// capability signed by this master. `None` = open cluster (the loopback quick start).
    pub cluster_secret: Option<crate::security::ClusterSecret>,
    /// TLS for the server and for the master's own calls to workers.
    pub tls: Option<crate::security::tls::TlsMaterial>,
    /// How long a chunk capability handed to a client stays valid.
    pub chunk_token_ttl: Duration,
    pub limits: MasterLimits,
}

/// Bounds that keep one client from exhausting the master.
#[derive(Debug, Clone, Copy)]
pub struct MasterLimits {
    /// Largest gRPC message accepted (worker chunk reports are the big ones).
    pub max_message: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_conn: u32,
    /// Deadline for a unary request, after which the caller gets DeadlineExceeded.
    pub request_timeout: Duration,
    /// Open uploads one client (token subject, or IP address without tokens) may hold.
    pub max_open_uploads_per_client: usize,
}

impl Default for MasterLimits {
    fn default() -> Self {
        MasterLimits {
            max_message: crate::rpc::MAX_GRPC_MESSAGE,
            max_streams_per_conn: 256,
            request_timeout: Duration::from_secs(60),
            max_open_uploads_per_client: 256,
        }
    }
}

impl MasterConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        MasterConfig {
            data_dir: data_dir.into(),
            chunk_size: 8 << 20,
            default_replicas: 3,
            heartbeat_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            upload_lease: Duration::from_secs(600),
            gc_grace: Duration::from_secs(60),
            in_doubt_grace: Duration::from_secs(4),
            max_repairs_per_worker: 2,
            rebuild_window: None,
            repair: true,
            metadata_cache: 64 << 20,
            cluster_secret: None,
            tls: None,
            chunk_token_ttl: Duration::from_secs(3600),
            limits: MasterLimits::default(),
        }
    }
}

/// Largest replication factor a file may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// An upload between its start and its commit or abort.
pub(crate) struct OpenUpload {
    /// What it was allocated.
    pub record: store::UploadRecord,
    /// When it last showed a sign of life (its lease).
    pub last_seen: Instant,
    /// Opened ahead by `ReserveUploads`: no name or size until its commit, a shorter lease,
    /// its own per-client cap, and no event when it is aborted or expires.
    pub reserved: bool,
}

impl Master {
    /// How long a reserved upload lives: short, since a client takes one for its next small
    /// file and drops those it did not use within half of this.
    pub(crate) fn reservation_lease(&self) -> Duration {
        self.cfg.upload_lease.min(RESERVATION_LEASE)
    }
}

/// The longest a reserved upload lives (less if `upload_lease` is shorter).
const RESERVATION_LEASE: Duration = Duration::from_secs(60);

/// In-memory state guarded by one mutex that is never held across an `.await`.
#[derive(Default)]
pub(crate) struct Inner {
    pub registry: Registry,
    pub chunks: ChunkMap,
    /// Open uploads by id. Held in memory only: an upload open when the master stops
    /// cannot be committed after it restarts (the client's commit gets `UploadNotFound` and
    /// nothing it wrote becomes visible), and its chunks are collected as orphans. That
    /// keeps the store out of every upload's start.
    pub uploads: HashMap<String, OpenUpload>,
    /// The next file version to hand out; the store persists, with every commit, a bound
    /// above every version committed.
    pub next_version: u64,
    /// Mirror of the store's garbage table.
    pub garbage: HashMap<String, GarbageRecord>,
    pub files: u64,
    pub logical_bytes: u64,
    /// Commits made beside their writes and not yet settled, by upload id.
    pub in_doubt: HashMap<String, in_doubt::InDoubt>,
    /// Bumped whenever an in-doubt commit is settled, for the reads waiting on one.
    pub settled: watch::Sender<u64>,
    /// Confirmed commits (name, upload id) whose records still say in doubt: written in
    /// bulk by `Master::flush_confirmed`.
    pub confirmed_unwritten: Vec<(String, String)>,
    /// Chunk ids allocated to open uploads (never orphans).
    pub upload_chunks: std::collections::HashSet<String>,
    /// Chunks reported by workers that belong to no file, upload or garbage entry.
    pub orphans: HashMap<String, repair::Orphan>,
    pub repair: repair::RepairState,
    /// Replication counts of the last status, valid while the chunk map's generation and
    /// the workers' health are unchanged.
    pub counts_cache: Option<(
        u64,
        registry::WorkerView,
        (chunkmap::ReplicationCounts, Vec<u64>),
    )>,
    /// Chunk reports (with headers) collected while rebuilding, by worker.
    pub rebuild_reports: HashMap<String, Vec<crate::rpc::pb::ChunkReport>>,
}

/// The master's shared state; the gRPC service and background tasks hold an `Arc` of it.
pub struct Master {
    pub(crate) cfg: MasterConfig,
    pub(crate) store: Arc<dyn MetaStore>,
    pub(crate) events: EventLog,
    pub(crate) policy: HealthPolicy,
    pub(crate) inner: Mutex<Inner>,
    /// Serialises namespace mutations (store transaction + memory update) so both orders agree.
    pub(crate) ns_lock: Arc<tokio::sync::Mutex<()>>,
    pub(crate) address: Mutex<String>,
    /// True while the namespace is being rebuilt from workers: no namespace changes.
    pub(crate) rebuilding: std::sync::atomic::AtomicBool,
    /// Channels to workers for repair orders.
    pub(crate) worker_channels: Mutex<HashMap<String, tonic::transport::Channel>>,
    /// How the master dials workers (TLS or not).
    pub(crate) transport: crate::rpc::Transport,
    /// Wakes the resolver to write the confirmations kept in memory.
    pub(crate) flush_wanted: Arc<tokio::sync::Notify>,
    /// Garbage marked at or before this time (Unix ms) is purged without waiting out the
    /// grace (see [`Master::expedite_garbage`]); 0 when never asked.
    pub(crate) gc_expedited_to: std::sync::atomic::AtomicI64,
    /// Recent deletes' answers by call id, for their clients' repeats.
    pub(crate) retries: retry_cache::RetryCache,
}

impl Master {
    /// Opens the metadata store in `cfg.data_dir` and loads the namespace into memory.
    pub fn open(cfg: MasterConfig) -> Result<Arc<Master>, MasterError> {
        if cfg.chunk_size == 0 || cfg.chunk_size > (1 << 30) {
            return Err(MasterError::InvalidArgument(format!(
                "chunk size must be between 1 byte and 1 GiB, not {}",
                cfg.chunk_size
            )));
        }
        if cfg.default_replicas == 0 || cfg.default_replicas > MAX_REPLICAS {
            return Err(MasterError::InvalidArgument(format!(
                "replicas must be between 1 and {MAX_REPLICAS}, not {}",
                cfg.default_replicas
            )));
        }
        let store: Arc<dyn MetaStore> = Arc::new(redb_store::RedbStore::open_with_cache(
            &cfg.data_dir,
            cfg.metadata_cache as usize,
        )?);
        let transport = crate::rpc::Transport::new(cfg.tls.as_ref(), None)
            .map_err(|e| MasterError::InvalidArgument(e.to_string()))?;
        let master = Master {
            transport,
            policy: HealthPolicy::from_timeout(cfg.heartbeat_timeout),
            cfg,
            store,
            events: EventLog::new(),
            inner: Mutex::new(Inner::default()),
            ns_lock: Arc::new(tokio::sync::Mutex::new(())),
            address: Mutex::new(String::new()),
            worker_channels: Mutex::new(HashMap::new()),
            rebuilding: std::sync::atomic::AtomicBool::new(false),
            flush_wanted: Default::default(),
            retries: Default::default(),
            gc_expedited_to: Default::default(),
        };
        master.load()?;
        if master.cfg.rebuild_window.is_some() {
            let (files, uploads) = {
                let inner = master.lock();
                (inner.files, inner.uploads.len())
            };
            if files > 0 || uploads > 0 {
                return Err(MasterError::InvalidArgument(format!(
                    "refusing to rebuild: {} already holds {files} file(s); --rebuild-from-workers needs an empty data dir",
                    master.cfg.data_dir.display()
                )));
            }
            master
                .rebuilding
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Arc::new(master))
    }

    /// Purges every chunk that is garbage now at the workers' next heartbeats, without
    /// waiting out the grace. The grace keeps a deleted file's chunks for readers that looked
    /// it up just before; the owner of an embedded cluster that knows it has no such reader
    /// left (the bench, once its files are deleted) calls this so that gigabytes of deleted
    /// chunks do not stay on disk after it exits. Orphans still wait out the grace.
    pub fn expedite_garbage(&self) {
        self.gc_expedited_to.store(
            crate::rpc::now_unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Chunks marked garbage and not yet confirmed deleted by all their workers.
    pub fn pending_garbage(&self) -> usize {
        self.lock().garbage.len()
    }

    /// The newest garbage mark that is purged now: past the grace, or expedited.
    pub(crate) fn garbage_ripe_at(&self, now_unix_ms: i64) -> i64 {
        let expedited = self
            .gc_expedited_to
            .load(std::sync::atomic::Ordering::Relaxed);
        (now_unix_ms - self.cfg.gc_grace.as_millis() as i64).max(expedited)
    }

    fn load(&self) -> Result<(), MasterError> {
        let mut inner = self.lock();
        let mut after = String::new();
        loop {
            let page = self.store.read_with(|t| t.list_files(&after, 10_000))?;
            let Some(last) = page.last() else { break };
            after = last.name.clone();
            for f in &page {
                inner.files += 1;
                inner.logical_bytes += f.size;
                if !f.pending_upload.is_empty() {
                    // In doubt when the master stopped: the resolver asks its workers.
                    inner.in_doubt.insert(
                        f.pending_upload.clone(),
                        in_doubt::InDoubt::loaded(f, self.cfg.in_doubt_grace),
                    );
                }
                for c in &f.chunks {
                    if let Ok(id) = c.chunk_id.parse::<ChunkId>() {
                        inner.chunks.insert(id, f.replicas, c.length, Vec::new());
                    }
                }
            }
        }
        // A durable upload open at the last stop is open again, its lease started afresh,
        // so that its client can finish it. Records of an older version (every upload was
        // kept then, none marked durable) are dropped, their chunks collected as orphans,
        // and so are allocations whose upload is gone.
        let (stored, allocations) = self
            .store
            .read_with(|t| Ok((t.list_uploads()?, t.list_upload_allocations()?)))?;
        let (mut open, stale): (Vec<_>, Vec<_>) = stored.into_iter().partition(|u| u.durable);
        // A record's own allocations are those of its start; later ones are only here.
        let mut later: HashMap<String, Vec<store::Allocation>> = HashMap::new();
        for (id, a) in allocations {
            later.entry(id).or_default().push(a);
        }
        for u in &mut open {
            u.allocations
                .extend(later.remove(&u.upload_id).unwrap_or_default());
        }
        // What is left in `later` belongs to no upload kept: removed with the stale ones.
        let stale: Vec<String> = stale
            .into_iter()
            .map(|u| u.upload_id)
            .chain(later.into_keys())
            .collect();
        if !stale.is_empty() {
            self.store.write_with(|t| -> Result<(), MasterError> {
                for id in &stale {
                    t.remove_upload(id)?;
                }
                Ok(())
            })?;
            tracing::warn!(
                uploads = stale.len(),
                "upload records that cannot be resumed (from an older version) were dropped; their chunks will be collected"
            );
        }
        inner.next_version = self.store.write_with(|t| t.next_file_id())?;
        if !open.is_empty() {
            tracing::info!(
                uploads = open.len(),
                "uploads open at the last stop were restored; their clients can finish them"
            );
        }
        for record in open {
            inner.next_version = inner.next_version.max(record.version + 1);
            for a in &record.allocations {
                inner.upload_chunks.insert(a.chunk_id.clone());
            }
            inner.uploads.insert(
                record.upload_id.clone(),
                OpenUpload {
                    record,
                    last_seen: Instant::now(),
                    reserved: false,
                },
            );
        }
        inner.garbage = self
            .store
            .read_with(|t| t.list_garbage())?
            .into_iter()
            .collect();
        for w in self.store.read_with(|t| t.list_workers())? {
            let i = inner.registry.intern(&w.address);
            if let Some(e) = inner.registry.get_mut(i) {
                e.draining = w.draining;
            }
        }
        tracing::info!(
            files = inner.files,
            chunks = inner.chunks.len(),
            open_uploads = inner.uploads.len(),
            pending_deletions = inner.garbage.len(),
            "metadata loaded"
        );
        Ok(())
    }

    /// Refuses namespace changes while the metadata is being rebuilt.
    pub(crate) fn check_not_rebuilding(&self) -> Result<(), MasterError> {
        if self.rebuilding.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(MasterError::Rebuilding);
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough state (each update is small);
        // keep serving rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster event feed.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn config(&self) -> &MasterConfig {
        &self.cfg
    }

    /// A chunk capability for `chunk` allowing `ops`, valid for the configured lifetime;
    /// empty when the cluster runs without a secret (workers then check nothing).
    pub(crate) fn chunk_token(&self, chunk: &str, ops: crate::security::ChunkOps) -> bytes::Bytes {
        let (Some(secret), Ok(id)) = (&self.cfg.cluster_secret, chunk.parse::<ChunkId>()) else {
            return bytes::Bytes::new();
        };
        let expires =
            crate::rpc::now_unix_ms().max(0) as u64 + self.cfg.chunk_token_ttl.as_millis() as u64;
        crate::security::capability::mint(
            secret,
            &crate::security::capability::ChunkGrant {
                chunk: id,
                ops,
                expires_unix_ms: expires,
            },
        )
        .into()
    }

    /// Runs a blocking store operation off the async threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Master) -> Result<T, MasterError> + Send + 'static,
    ) -> Result<T, MasterError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| MasterError::Internal(format!("store task failed: {e}")))?
    }

    /// Serves gRPC on `listener` until `shutdown` resolves, with the background tasks (health
    /// watcher, upload expiry) running alongside; returns once streams are closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MasterError> {
        let addr = listener
            .local_addr()
            .map_err(|e| MasterError::Internal(e.to_string()))?;
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = addr.to_string();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(workers::health_watcher(self.clone(), stop_rx.clone()));
        tasks.spawn(namespace::upload_expiry(self.clone(), stop_rx.clone()));
        tasks.spawn(in_doubt::resolver(self.clone(), stop_rx.clone()));
        if self.cfg.repair {
            tasks.spawn(repair::repair_loop(self.clone(), stop_rx.clone()));
        }
        if let Some(window) = self.cfg.rebuild_window {
            tasks.spawn(rebuild::rebuild_after(
                self.clone(),
                window,
                stop_rx.clone(),
            ));
        }

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<crate::rpc::pb::master_server::MasterServer<service::MasterService>>()
            .await;
        let reflection = crate::server::reflection()?;
        let svc = service::MasterService::new(self.clone(), stop_rx.clone());
        self.events.record(
            crate::events::Level::Info,
            format!("master listening on {addr}"),
        );
        let stop_for_server = stop_tx.clone();
        let mut builder = crate::server::builder_with(
            self.cfg.tls.as_ref(),
            self.cfg.limits.max_streams_per_conn,
        )
        .map_err(|e| MasterError::InvalidArgument(e.to_string()))?;
        let guarded = crate::security::guard::AuthGuard::new(
            crate::server::LimitStatus::new(
                svc.into_server(self.cfg.limits.max_message),
                Some(self.cfg.limits.request_timeout),
            ),
            self.cfg.cluster_secret.clone(),
        );
        let result = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(guarded)
            .serve_with_incoming_shutdown(crate::server::incoming(listener), async move {
                shutdown.await;
                let _ = stop_for_server.send(true);
            })
            .await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        tracing::info!("master stopped");
        result.map_err(|e| MasterError::Internal(format!("server error: {e}")))
    }
}
