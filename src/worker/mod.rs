//! The worker: stores chunks durably on local disk, serves them, and keeps the master informed.

pub mod error;
pub mod heartbeat;
pub mod read;
pub mod replicate;
pub mod reports;
pub mod scrub;
pub mod service;
pub mod store;
pub mod volume;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

pub use error::WorkerError;
use store::ChunkStore;

use crate::rpc::pb::WorkerUsage;

/// Worker settings (the `worker` binary's flags).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub data_dir: PathBuf,
    /// The master's "host:port".
    pub master: String,
    /// Host part of the address this worker advertises; the port is the bound one.
    pub host: String,
    /// Bytes this worker may use; None = the file system's size.
    pub capacity: Option<u64>,
    pub heartbeat_interval: Duration,
    pub scrub: scrub::ScrubConfig,
    /// With a secret, the worker authenticates to the master and serves only requests that
    /// carry a chunk capability signed by the master.
    pub cluster_secret: Option<crate::security::ClusterSecret>,
    /// TLS for the server and for calls to the master and to other workers.
    pub tls: Option<crate::security::tls::TlsMaterial>,
    pub limits: WorkerLimits,
}

impl WorkerConfig {
    /// Defaults for a worker storing in `data_dir` and reporting to `master`.
    pub fn new(data_dir: impl Into<PathBuf>, master: impl Into<String>) -> Self {
        WorkerConfig {
            data_dir: data_dir.into(),
            master: master.into(),
            host: "127.0.0.1".into(),
            capacity: None,
            heartbeat_interval: Duration::from_secs(1),
            scrub: scrub::ScrubConfig::default(),
            cluster_secret: None,
            tls: None,
            limits: WorkerLimits::default(),
        }
    }
}

/// Bounds that keep a client from pinning a worker's memory, threads or disk.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Largest gRPC message accepted (data messages are at most 1 MiB).
    pub max_message: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_conn: u32,
    /// Chunk reads, writes and copies running at once; more get ResourceExhausted.
    pub max_transfers: usize,
    /// A stream that neither sends nor accepts a message for this long is cut off with
    /// DeadlineExceeded and its resources released.
    pub idle_timeout: Duration,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        WorkerLimits {
            max_message: 4 << 20,
            max_streams_per_conn: 256,
            max_transfers: 256,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Bytes that all the large writes on one worker may hold between the network and the disk.
/// Each write queues a few messages toward its disk writer; without a shared bound, every
/// concurrent write adds its own queue (a client keeps several chunks in flight, and many
/// clients may write at once: up to `max_transfers` queues of 4 MiB). A write that finds the
/// budget spent stops reading its stream, and HTTP/2 flow control holds the sender back.
/// (One client's peaks did not move with it: those came from decode buffers pinned by the
/// messages in flight, which smaller write messages cut; see [`crate::rpc::WRITE_DATA_MESSAGE`].)
pub const WRITE_BUFFER_BYTES: u32 = 8 << 20;

/// How [`Worker::read_verified_framed`] hands a chunk over: in pieces of at most `size`
/// bytes (a read's or a write's message size), each in a buffer that starts with `headroom`
/// zero bytes, room for framing written in place (see `read::ZeroCopyReads`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pieces {
    pub size: usize,
    pub headroom: usize,
}

/// Sets a stop flag when dropped.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A running worker's shared state.
pub struct Worker {
    pub(crate) address: String,
    pub(crate) store: Arc<ChunkStore>,
    pub(crate) master: String,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) active_reads: AtomicU32,
    pub(crate) active_writes: AtomicU32,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) scrub_cfg: scrub::ScrubConfig,
    pub scrub_stats: Arc<scrub::ScrubStats>,
    peers: Mutex<HashMap<String, Channel>>,
    pub(crate) secret: Option<crate::security::ClusterSecret>,
    /// How this worker dials the master (with its worker token) and its peers.
    pub(crate) transport: crate::rpc::Transport,
    pub(crate) tls: Option<crate::security::tls::TlsMaterial>,
    pub(crate) limits: WorkerLimits,
    pub(crate) transfers: Arc<tokio::sync::Semaphore>,
    /// Bytes of large writes received and not yet on their way to the disk, shared by every
    /// write on this worker (see [`WRITE_BUFFER_BYTES`]).
    pub(crate) write_buffer: Arc<tokio::sync::Semaphore>,
    compacting: Arc<std::sync::atomic::AtomicBool>,
}

impl Worker {
    /// Opens the data directory (failing clearly if it is unusable) for a worker that will
    /// listen on `listener`.
    pub fn open(cfg: &WorkerConfig, listener: &TcpListener) -> Result<Arc<Worker>, WorkerError> {
        let port = listener
            .local_addr()
            .map_err(|e| WorkerError::Startup(format!("listener has no address: {e}")))?
            .port();
        let store = ChunkStore::open(&cfg.data_dir, cfg.capacity)?;
        let address = format!("{}:{port}", cfg.host);
        let token = match &cfg.cluster_secret {
            Some(secret) => Some(
                crate::security::AccessToken::mint(
                    secret,
                    crate::security::TokenKind::Worker,
                    &address,
                    0,
                )
                .map_err(|e| WorkerError::Startup(format!("worker token for {address}: {e}")))?
                .to_string(),
            ),
            None => None,
        };
        let transport = crate::rpc::Transport::new(cfg.tls.as_ref(), token.as_deref())
            .map_err(|e| WorkerError::Startup(e.to_string()))?;
        Ok(Arc::new(Worker {
            secret: cfg.cluster_secret.clone(),
            transport,
            tls: cfg.tls.clone(),
            limits: cfg.limits,
            transfers: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_transfers.max(1))),
            write_buffer: Arc::new(tokio::sync::Semaphore::new(WRITE_BUFFER_BYTES as usize)),
            compacting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            address,
            store: Arc::new(store),
            master: cfg.master.clone(),
            heartbeat_interval: cfg.heartbeat_interval,
            active_reads: AtomicU32::new(0),
            active_writes: AtomicU32::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            scrub_cfg: cfg.scrub,
            scrub_stats: Arc::new(scrub::ScrubStats::default()),
            peers: Mutex::new(HashMap::new()),
        }))
    }

    /// The address this worker advertises ("host:port").
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn data_dir(&self) -> &std::path::Path {
        self.store.root()
    }

    pub(crate) fn usage(&self) -> WorkerUsage {
        let (capacity, used, free) = self.store.usage();
        WorkerUsage {
            capacity_bytes: capacity,
            used_bytes: used,
            free_bytes: free,
            chunk_count: self.store.chunk_count(),
            active_reads: self.active_reads.load(Ordering::Relaxed),
            active_writes: self.active_writes.load(Ordering::Relaxed),
            bytes_read_total: self.bytes_read.load(Ordering::Relaxed),
            bytes_written_total: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Reclaims the space of deleted small chunks off the heartbeat's path (one run at a
    /// time); see [`ChunkStore::compact`].
    pub(crate) fn compact_in_background(&self) {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.store.clone();
        let flag = self.compacting.clone();
        tokio::task::spawn_blocking(move || {
            match store.compact() {
                Ok(0) => {}
                Ok(bytes) => tracing::info!(bytes, "compaction freed space"),
                Err(e) => tracing::warn!(error = %e, "volume compaction failed"),
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Reads chunk `id`'s data from `file` (positioned after the header) in bounded pieces,
    /// handing each to `sink`, and verifies it against `expected` CRC32C. A short read or a
    /// mismatch quarantines the chunk and is returned as an error; the sink has then seen bad
    /// bytes and must not treat them as a chunk. `Ok(None)` means the sink stopped early.
    /// Blocking.
    pub(crate) fn read_verified(
        &self,
        id: &crate::chunk::ChunkId,
        file: &mut std::fs::File,
        length: u64,
        expected: u32,
        mut sink: impl FnMut(bytes::Bytes) -> bool,
    ) -> Result<Option<u32>, WorkerError> {
        let pieces = Pieces {
            size: crate::rpc::MAX_DATA_MESSAGE,
            headroom: 0,
        };
        self.read_verified_framed(id, file, length, expected, pieces, |v| {
            sink(bytes::Bytes::from(v))
        })
    }

    /// [`Worker::read_verified`], cut as `pieces` says.
    pub(crate) fn read_verified_framed(
        &self,
        id: &crate::chunk::ChunkId,
        file: &mut std::fs::File,
        length: u64,
        expected: u32,
        pieces: Pieces,
        mut sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<Option<u32>, WorkerError> {
        use std::io::Read;
        let Pieces { size, headroom } = pieces;
        let mut crc = 0u32;
        let mut left = length;
        while left > 0 {
            let n = left.min(size.max(1) as u64) as usize;
            // Read into uninitialised capacity: zeroing 1 MiB only to overwrite it cost a
            // few per cent of a download's CPU.
            let mut buf = Vec::with_capacity(headroom + n);
            buf.resize(headroom, 0);
            let got = (&mut *file).take(n as u64).read_to_end(&mut buf);
            if let Err(e) = got.and_then(|k| {
                (k == n)
                    .then_some(())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            }) {
                let reason = format!("short read at data offset {}: {e}", length - left);
                self.store.quarantine(id, &reason);
                return Err(WorkerError::Corrupt {
                    chunk: id.to_string(),
                    reason,
                });
            }
            crc = crate::chunk::crc32c_append(crc, &buf[headroom..]);
            left -= n as u64;
            self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            if !sink(buf) {
                return Ok(None);
            }
        }
        if crc != expected {
            let e = WorkerError::ChecksumMismatch {
                chunk: id.to_string(),
                expected,
                actual: crc,
            };
            self.store.quarantine(id, &e.to_string());
            return Err(e);
        }
        Ok(Some(crc))
    }

    /// A client for a pipeline peer; channels are cached per address.
    pub(crate) fn worker_client(
        &self,
        addr: &str,
    ) -> Result<crate::rpc::pb::worker_client::WorkerClient<Channel>, tonic::transport::Error> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let ch = match peers.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.transport.data_channel(addr)?;
                peers.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(crate::rpc::worker_client(ch))
    }

    /// Checks a chunk capability; everything passes when the cluster has no secret.
    pub(crate) fn authorize(
        &self,
        token: &[u8],
        chunk: &crate::chunk::ChunkId,
        op: crate::security::ChunkOps,
    ) -> Result<(), WorkerError> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let now = crate::rpc::now_unix_ms().max(0) as u64;
        crate::security::capability::verify(secret, token, chunk, op, now)
            .map(|_| ())
            .map_err(WorkerError::Denied)
    }

    /// A slot for one transfer, or ResourceExhausted when the worker is at its limit.
    pub(crate) fn transfer_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, WorkerError> {
        self.transfers.clone().try_acquire_owned().map_err(|_| {
            WorkerError::Busy(format!(
                "worker {} is at its limit of {} concurrent transfers; retry shortly",
                self.address, self.limits.max_transfers
            ))
        })
    }

    /// Serves chunks on `listener` and heartbeats to the master until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WorkerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let hb = tokio::spawn(heartbeat::run(self.clone(), stop_rx));
        let scrub_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scrubber = {
            let (store, cfg, stats, stop) = (
                self.store.clone(),
                self.scrub_cfg,
                self.scrub_stats.clone(),
                scrub_stop.clone(),
            );
            tokio::task::spawn_blocking(move || scrub::run(store, cfg, stats, stop))
        };
        // A blocking thread cannot be aborted: stop it when this future ends in any way,
        // including being dropped (an aborted task), or the runtime would wait for it forever.
        let _scrub_guard = StopOnDrop(scrub_stop.clone());
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<crate::rpc::pb::worker_server::WorkerServer<service::WorkerService>>()
            .await;
        let reflection =
            crate::server::reflection().map_err(|e| WorkerError::Startup(e.to_string()))?;
        tracing::info!(address = %self.address, data_dir = %self.store.root().display(), chunks = self.store.chunk_count(), "worker serving");
        let stop = stop_tx.clone();
        let mut builder =
            crate::server::builder_with(self.tls.as_ref(), self.limits.max_streams_per_conn)
                .map_err(|e| WorkerError::Startup(e.to_string()))?;
        let result = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(crate::server::LimitStatus::new(
                read::ZeroCopyReads::new(
                    self.clone(),
                    service::WorkerService::new(self.clone()).into_server(self.limits.max_message),
                ),
                None,
            ))
            .serve_with_incoming_shutdown(crate::server::incoming(listener), async move {
                shutdown.await;
                let _ = stop.send(true);
            })
            .await;
        let _ = stop_tx.send(true);
        scrub_stop.store(true, Ordering::Relaxed);
        let _ = hb.await;
        let _ = scrubber.await;
        tracing::info!(address = %self.address, "worker stopped");
        result.map_err(|e| WorkerError::Startup(format!("server error: {e}")))
    }
}
