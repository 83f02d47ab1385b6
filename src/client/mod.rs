//! The client library: what the CLI, the console and the tests use to talk to a cluster.
//!
//! Control calls go to the master; file bytes stream straight to and from workers.

mod batch;
mod calls;
mod confirm;
mod download;
pub(crate) use download::{is_stdout, writes_in_place};
pub(crate) use upload::STDIN;
mod error;
mod locations;
mod read_stream;
mod reserve;
mod send;
mod spool;
mod upload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

pub use download::{DownloadOptions, DownloadReport};
pub use error::ClientError;
pub use locations::LocationStats;
pub use reserve::ReservationStats;
pub use upload::{UploadOptions, UploadReport};

use crate::rpc::pb::{
    self, ClusterStatusResponse, FileInfo, LogEvent, worker_client::WorkerClient,
};
use crate::rpc::{MasterRpc, Transport};

/// Bytes done and total of a transfer, updated as it runs (for progress bars), and a flag
/// that cancels it: the transfer stops at the next message and cleans up after itself.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancel: std::sync::atomic::AtomicBool,
    /// Set while the transfer waits for an unreachable master to come back, or for a
    /// live worker (see `Client::patiently`), so that a meter can say why it stalls.
    pub waiting_for_master: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Asks the transfer to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// How long a large or piped upload waits for an unreachable master (restarting, say)
/// before it fails.
pub const MASTER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a failed call never reached the master or lost its connection: the transport's
/// own error (a status the master sent has no source), or a refused connection.
fn master_unreachable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && (std::error::Error::source(s).is_some()
        || s.message().contains("transport error")
        || s.message().contains("tcp connect error"))
}

/// The pauses before a call whose connection broke is tried again (`Client::once_more`).
const BROKEN_CONNECTION_PAUSES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(20),
    std::time::Duration::from_millis(200),
];

/// The master's answer while no worker is alive (as just after it restarted).
fn no_live_workers(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().starts_with("no live workers")
}

/// Aborts a spawned task when dropped: the task of a transfer that ended (failed, cancelled
/// or abandoned) must not go on in the background.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection to one cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    addr: String,
    master: MasterRpc,
    batches: calls::MasterBatches,
    workers: Arc<Mutex<HashMap<String, Channel>>>,
    /// Per worker address: the tasks that batch small chunk writes and reads to it.
    small_writes: Arc<Mutex<HashMap<String, batch::Batcher<calls::SmallWrites>>>>,
    small_reads: Arc<Mutex<HashMap<String, batch::Batcher<calls::SmallReads>>>>,
    /// Uploads opened ahead for small files.
    reservations: Arc<reserve::Reservations>,
    /// Small files committed beside their writes, confirmed behind them.
    confirmations: Arc<confirm::Confirmations>,
    /// Where recent small files were put or found, for reads that ask the worker beside
    /// the master.
    locations: Arc<locations::Locations>,
    transport: Transport,
    /// Where this client starts in a chunk's list of replicas (random per client): clients
    /// spread their reads over the replicas, and one client's reads of small files gather
    /// on fewer workers, where they batch.
    read_seed: u64,
}

impl Client {
    /// Connects to the master at `addr` ("host:port") in plaintext with no token, failing
    /// within the connect timeout.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, Transport::plain()).await
    }

    /// Connects with `transport`'s TLS settings and token.
    pub async fn connect_with(addr: &str, transport: Transport) -> Result<Client, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let endpoint = transport
            .endpoint(addr)
            .map_err(|e| connect_err(format!("invalid address: {e}")))?
            .timeout(crate::rpc::CONTROL_TIMEOUT);
        let channel = tokio::time::timeout(crate::rpc::CONNECT_TIMEOUT, endpoint.connect())
            .await
            .map_err(|_| connect_err("connection timed out".into()))?
            .map_err(|e| {
                // The outer errors say "transport error"; the causes say what went wrong
                // (refused, a TLS alert, a bad certificate).
                let reason = error_chain(&e);
                connect_err(explain_connect_failure(
                    &reason,
                    transport.is_tls(),
                    transport.has_identity(),
                ))
            })?;
        let master = transport.master(channel);
        let confirmations = confirm::Confirmations::start(master.clone());
        Ok(Client {
            addr: addr.to_string(),
            batches: calls::MasterBatches::start(&master, &confirmations),
            reservations: reserve::Reservations::new(master.clone()),
            confirmations,
            locations: Arc::default(),
            master,
            workers: Arc::new(Mutex::new(HashMap::new())),
            small_writes: Arc::new(Mutex::new(HashMap::new())),
            small_reads: Arc::new(Mutex::new(HashMap::new())),
            transport,
            read_seed: crate::chunk::random_u128() as u64,
        })
    }

    /// What the uploads reserved ahead for small files did (see `ReserveUploads`).
    pub fn reservations(&self) -> ReservationStats {
        self.reservations.stats()
    }

    /// What remembered locations did for small reads (see `locations`).
    pub fn read_locations(&self) -> LocationStats {
        self.locations.stats()
    }

    /// The master address this client talks to.
    pub fn master_addr(&self) -> &str {
        &self.addr
    }

    fn err(&self, s: tonic::Status) -> ClientError {
        // A connection that breaks under the first call (TLS refused after the handshake,
        // plaintext against TLS) surfaces here: say so, with the likely fix.
        let transport_failure = match s.code() {
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown => {
                std::error::Error::source(&s).is_some()
            }
            tonic::Code::Internal => s.message().starts_with("h2 protocol error"),
            _ => false,
        };
        if transport_failure {
            let reason = std::error::Error::source(&s)
                .map(error_chain)
                .unwrap_or_else(|| s.message().to_string());
            return ClientError::Connect {
                addr: self.addr.clone(),
                reason: explain_connect_failure(
                    &reason,
                    self.transport.is_tls(),
                    self.transport.has_identity(),
                ),
            };
        }
        ClientError::master(&self.addr, s)
    }

    /// Runs a master call of a durable upload (see `UploadRecord::durable`), again and again
    /// while the master cannot be reached or has no live worker, for up to
    /// [`MASTER_PATIENCE`]: a master that restarts keeps such an upload, so its client waits
    /// instead of failing it (and, from a pipe, losing input it cannot read again), also
    /// for the moment after the restart when no worker has registered yet. Any other
    /// answer from the master ends it.
    pub(crate) async fn patiently<T, F, Fut>(
        &self,
        what: &str,
        progress: &Progress,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(50);
        let result = loop {
            match call().await {
                Err(s)
                    if (master_unreachable(&s) || no_live_workers(&s))
                        && started.elapsed() < MASTER_PATIENCE
                        && !progress.is_cancelled() =>
                {
                    if !progress.waiting_for_master.swap(true, Ordering::Relaxed) {
                        tracing::warn!(master = %self.addr, call = what, error = %s, "the cluster cannot take this call now; retrying for up to {} s", MASTER_PATIENCE.as_secs());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                other => break other,
            }
        };
        if progress.waiting_for_master.swap(false, Ordering::Relaxed) {
            tracing::info!(master = %self.addr, call = what, waited_ms = started.elapsed().as_millis() as u64, "the master answered again");
        }
        result
    }

    /// Runs a master call again, after 20 and then 200 ms, when its connection broke under
    /// it (the master restarted, or something between cut the connection): the channel
    /// reconnects (the first try after a cut can still land on the dying connection), and a
    /// master that is really down fails it within a quarter of a second. Only for calls that
    /// are safe to repeat: a lookup, an upload's start (a start whose answer was lost leaves
    /// an upload nobody commits, which expires), a commit, whose repeat the caller resolves
    /// (see `commit_resolving`), or a delete with its call id.
    pub(crate) async fn once_more<T, F, Fut>(
        &self,
        what: &str,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut answer = call().await;
        for pause in BROKEN_CONNECTION_PAUSES {
            match &answer {
                Err(s) if master_unreachable(s) => {
                    tracing::info!(master = %self.addr, call = what, error = %s, "the connection to the master broke; trying again");
                    tokio::time::sleep(pause).await;
                    answer = call().await;
                }
                _ => break,
            }
        }
        answer
    }

    pub(crate) fn master(&self) -> MasterRpc {
        self.master.clone()
    }

    /// A data client for a worker (one cached channel per worker).
    pub(crate) fn worker(&self, addr: &str) -> Result<WorkerClient<Channel>, ClientError> {
        Ok(crate::rpc::worker_client(self.worker_channel(addr)?))
    }

    /// The cached data channel to the worker at `addr`.
    pub(crate) fn worker_channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match w.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.transport.data_channel(addr).map_err(|e| {
                    ClientError::InvalidInput(format!("bad worker address {addr:?}: {e}"))
                })?;
                w.insert(addr.to_string(), c.clone());
                c
            }
        })
    }

    /// The batching task for small chunk writes to the worker at `addr` (started on first use).
    fn small_writes(&self, addr: &str) -> Result<batch::Batcher<calls::SmallWrites>, ClientError> {
        self.per_worker(&self.small_writes, addr, calls::SmallWrites)
    }

    /// The batching task for small chunk reads from the worker at `addr` (started on first use).
    fn small_reads(&self, addr: &str) -> Result<batch::Batcher<calls::SmallReads>, ClientError> {
        self.per_worker(&self.small_reads, addr, calls::SmallReads)
    }

    fn per_worker<B: batch::Batched>(
        &self,
        map: &Mutex<HashMap<String, batch::Batcher<B>>>,
        addr: &str,
        make: impl FnOnce(crate::rpc::WorkerRpc) -> B,
    ) -> Result<batch::Batcher<B>, ClientError> {
        if let Some(b) = map.lock().unwrap_or_else(|p| p.into_inner()).get(addr) {
            return Ok(b.clone());
        }
        let rpc = self.worker(addr)?;
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .entry(addr.to_string())
            .or_insert_with(|| batch::Batcher::start(make(rpc)))
            .clone())
    }

    /// Every file, in name order (fetched page by page).
    pub async fn list(&self) -> Result<Vec<FileInfo>, ClientError> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.list_page(&after, 0).await?;
            out.extend(page.files);
            if page.next_start_after.is_empty() {
                return Ok(out);
            }
            after = page.next_start_after;
        }
    }

    /// One page of files after `start_after` (0 = the master's default page size).
    pub async fn list_page(
        &self,
        start_after: &str,
        limit: u32,
    ) -> Result<pb::ListFilesResponse, ClientError> {
        self.master()
            .list_files(pb::ListFilesRequest {
                start_after: start_after.to_string(),
                limit,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// A file with its chunk → replica map.
    /// Concurrent calls share round trips to the master (see `batch`).
    pub async fn stat(&self, name: &str) -> Result<FileInfo, ClientError> {
        self.once_more("get_file", || self.batches.lookups.call(name.to_string()))
            .await
            .map_err(|s| self.err(s))
    }

    /// Deletes a file; its chunks are removed from workers in the background.
    /// Concurrent calls share round trips and fsyncs on the master (see `batch`). A delete
    /// whose connection broke is repeated with the same call id, which the master answers
    /// as it answered the first (its `retry_cache`), so a delete that landed is not
    /// reported "not found", nor repeated on a file created since.
    pub async fn delete(&self, name: &str) -> Result<FileInfo, ClientError> {
        self.locations.forget(name);
        let call = (
            name.to_string(),
            format!("{:032x}", crate::chunk::random_u128()),
        );
        self.once_more("delete_file", || self.batches.deletes.call(call.clone()))
            .await
            .map_err(|s| self.err(s))
    }

    /// Creates empty files, all or none (at most 10,000 per call): the metadata fast path.
    pub async fn create_empty(&self, names: Vec<String>) -> Result<u64, ClientError> {
        self.master()
            .create_empty(pb::CreateEmptyRequest { names })
            .await
            .map(|r| r.into_inner().created)
            .map_err(|s| self.err(s))
    }

    /// Deletes the existing files among `names` (at most 10,000 per call) in one step.
    pub async fn delete_many(&self, names: Vec<String>) -> Result<u64, ClientError> {
        for n in &names {
            self.locations.forget(n);
        }
        self.master()
            .delete_many(pb::DeleteManyRequest { names })
            .await
            .map(|r| r.into_inner().deleted)
            .map_err(|s| self.err(s))
    }

    /// Workers with health and usage, totals and replication health.
    pub async fn status(&self) -> Result<ClusterStatusResponse, ClientError> {
        self.master()
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// The master's process figures now; `reset_peak` restarts its peak count afterwards.
    pub async fn master_process(&self, reset_peak: bool) -> Result<pb::ProcessStats, ClientError> {
        self.master()
            .process_stats(pb::ProcessStatsRequest { reset_peak })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// The process figures of the worker at `addr` now, asked of it directly (a heartbeat's
    /// are up to an interval old); `reset_peak` restarts its peak count afterwards.
    pub async fn worker_process(
        &self,
        addr: &str,
        reset_peak: bool,
    ) -> Result<pb::ProcessStats, ClientError> {
        self.worker(addr)?
            .process_stats(pb::ProcessStatsRequest { reset_peak })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| ClientError::worker(addr, s))
    }

    /// Marks a worker draining (or not); returns its status.
    pub async fn set_draining(
        &self,
        worker: &str,
        draining: bool,
    ) -> Result<pb::WorkerStatus, ClientError> {
        self.master()
            .set_draining(pb::SetDrainingRequest {
                worker: worker.to_string(),
                draining,
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner()
            .worker
            .ok_or_else(|| ClientError::Integrity("master answered without a worker".into()))
    }

    /// The blast radius of losing `worker` now.
    pub async fn drain_plan(&self, worker: &str) -> Result<pb::DrainPlanResponse, ClientError> {
        self.master()
            .drain_plan(pb::DrainPlanRequest {
                worker: worker.to_string(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// Files with chunks below their target.
    pub async fn fsck(&self) -> Result<pb::FsckResponse, ClientError> {
        self.master()
            .fsck(pb::FsckRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// What garbage collection will purge.
    pub async fn gc_status(&self) -> Result<pb::GcStatusResponse, ClientError> {
        self.master()
            .gc_status(pb::GcStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    /// The master's recent events (up to `backlog`), then live ones.
    pub async fn stream_logs(
        &self,
        backlog: u32,
    ) -> Result<tonic::Streaming<LogEvent>, ClientError> {
        // A log stream is long-lived: use a channel without the per-call deadline.
        let ch = self
            .transport
            .data_channel(&self.addr)
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        self.transport
            .master(ch)
            .stream_logs(pb::StreamLogsRequest { backlog })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.err(s))
    }

    pub(crate) async fn report_bad_replica(&self, chunk_id: &str, worker: &str, reason: &str) {
        let r = self
            .master()
            .report_bad_replica(pb::ReportBadReplicaRequest {
                chunk_id: chunk_id.to_string(),
                worker: worker.to_string(),
                reason: reason.to_string(),
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(chunk = chunk_id, worker, error = %e.message(), "could not report a bad replica");
        }
    }
}

/// Turns the transport's terse connect errors into advice when TLS is the likely cause.
fn explain_connect_failure(reason: &str, tls: bool, identity: bool) -> String {
    let r = reason.to_ascii_lowercase();
    let abrupt = [
        "closed",
        "broken pipe",
        "reset",
        "h2 protocol",
        "http2 error",
        "canceled",
    ]
    .iter()
    .any(|p| r.contains(p));
    let hint = if r.contains("certificaterequired") || (tls && !identity && abrupt) {
        "the cluster may require a client certificate: pass --tls-cert and --tls-key"
    } else if r.contains("unknownissuer") || r.contains("certificate") {
        "the certificates are not signed by the CA the other side trusts (--tls-ca)"
    } else if tls && (r.contains("corrupt message") || r.contains("invalidcontenttype")) {
        "the server does not speak TLS: drop --tls-ca, or turn TLS on there"
    } else if !tls && abrupt {
        "the server closed the connection: if the cluster uses TLS, pass --tls-ca"
    } else {
        return reason.to_string();
    };
    format!("{reason} ({hint})")
}

/// An error and its causes, joined, without repeats.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts
        .into_iter()
        .filter(|p| p != "transport error")
        .collect::<Vec<_>>()
        .join(": ")
}
