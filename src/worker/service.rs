//! The `dfs.v1.Worker` service: the pipelined chunk write and the checksum-verified read.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::error::WorkerError;
use super::store::{Appended, ChunkWriter, MAX_CHUNK_LEN, Reservation};
use super::volume::SMALL_CHUNK_MAX;
use super::{WRITE_BUFFER_BYTES, Worker};
use crate::chunk::{self, ChunkId};
use crate::rpc::pb::{
    self, ChunkHeader, WriteChunkRequest, WriteChunkResponse, WriteFinish, WriteStart,
    worker_server::WorkerServer, write_chunk_request,
};
use crate::rpc::{FAILED_WORKER_KEY, MAX_GRPC_MESSAGE};

/// Longest pipeline accepted (one hop per replica).
const MAX_PIPELINE: usize = 16;
/// Most chunks one WriteSmallChunks call may carry (the message size bounds their bytes).
pub const MAX_SMALL_BATCH: usize = 64;

/// The service object handed to tonic.
pub struct WorkerService {
    worker: Arc<Worker>,
}

/// Data messages (1 MiB each) queued toward the disk and toward the next worker. Deep enough
/// that neither side waits on the other, shallow enough that a worker stays well under
/// 64 MiB while a 4 GiB file streams through it (with the HTTP/2 window on top).
const PIPELINE_DEPTH: usize = 4;

impl WorkerService {
    pub fn new(worker: Arc<Worker>) -> Self {
        WorkerService { worker }
    }

    /// The tonic server, accepting messages of at most `max_message` bytes.
    pub fn into_server(self, max_message: usize) -> WorkerServer<WorkerService> {
        WorkerServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(MAX_GRPC_MESSAGE)
    }
}

/// The next message of a write stream, or DeadlineExceeded if the sender goes quiet for
/// longer than `idle`: a client that opens a write and stops must not pin the worker.
async fn next_message(
    stream: &mut Streaming<WriteChunkRequest>,
    idle: std::time::Duration,
) -> Result<Option<WriteChunkRequest>, WorkerError> {
    match tokio::time::timeout(idle, stream.message()).await {
        Err(_) => Err(WorkerError::Idle(format!(
            "no message for {} s; write abandoned",
            idle.as_secs_f64()
        ))),
        Ok(r) => r.map_err(|s| match s.code() {
            Code::OutOfRange => WorkerError::Busy(format!("message too large: {}", s.message())),
            _ => WorkerError::InvalidArgument(format!("upstream failed: {}", s.message())),
        }),
    }
}

pub(crate) struct Gauge<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Gauge<'a> {
    pub(crate) fn enter(g: &'a std::sync::atomic::AtomicU32) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn validate_start(start: &WriteStart, me: &str) -> Result<(ChunkHeader, ChunkId), WorkerError> {
    let header = start
        .header
        .clone()
        .ok_or_else(|| WorkerError::InvalidArgument("write start carries no header".into()))?;
    let id = header
        .chunk_id
        .parse::<ChunkId>()
        .map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
    if header.length > MAX_CHUNK_LEN {
        return Err(WorkerError::InvalidArgument(format!(
            "chunk length {} exceeds the limit of {MAX_CHUNK_LEN}",
            header.length
        )));
    }
    crate::names::validate(&header.file_name)
        .map_err(|e| WorkerError::InvalidArgument(format!("invalid file name: {e}")))?;
    if start.downstream.len() >= MAX_PIPELINE {
        return Err(WorkerError::InvalidArgument("pipeline too long".into()));
    }
    if start.downstream.iter().any(|d| d == me) {
        return Err(WorkerError::InvalidArgument(
            "pipeline names this worker twice".into(),
        ));
    }
    Ok((header, id))
}

/// Which worker a failed downstream call blames: the deepest one named, else the next hop.
fn blame(next: &str, status: &Status) -> String {
    status
        .metadata()
        .get(FAILED_WORKER_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| next.to_string())
}

/// The error for a failed downstream call; a message that already names the failed worker
/// (from deeper in the pipeline) is passed on without another prefix.
fn downstream_error(next: &str, status: &Status) -> WorkerError {
    let worker = blame(next, status);
    let prefix = format!("pipeline worker {worker} failed: ");
    let message = status
        .message()
        .strip_prefix(&prefix)
        .unwrap_or(status.message())
        .to_string();
    WorkerError::Downstream {
        worker,
        code: status.code(),
        message,
    }
}

/// Where a write's local copy is gathered while the stream comes in.
enum LocalCopy {
    /// A small chunk, held in memory by the writer itself.
    Inline(Option<ChunkWriter>),
    /// A large chunk, written by a blocking task as data arrives; each message holds its
    /// share of the worker's write buffer until it is written.
    Task(
        Option<mpsc::Sender<(Bytes, OwnedSemaphorePermit)>>,
        Option<tokio::task::JoinHandle<Result<ChunkWriter, WorkerError>>>,
        Arc<Semaphore>,
    ),
}

impl LocalCopy {
    async fn write(&mut self, b: Bytes) -> Result<(), WorkerError> {
        match self {
            LocalCopy::Inline(Some(w)) => w.write(&b),
            LocalCopy::Task(Some(tx), _, budget) => {
                let n = (b.len() as u32).clamp(1, WRITE_BUFFER_BYTES);
                let permit = budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| WorkerError::InvalidArgument("local write failed".into()))?;
                tx.send((b, permit))
                    .await
                    .map_err(|_| WorkerError::InvalidArgument("local write failed".into()))
            }
            _ => Err(WorkerError::InvalidArgument("local write failed".into())),
        }
    }

    /// The writer, once every byte is in (the disk task's own error if it failed).
    async fn writer(&mut self) -> Result<Result<ChunkWriter, WorkerError>, WorkerError> {
        match self {
            LocalCopy::Inline(w) => Ok(w
                .take()
                .ok_or_else(|| WorkerError::InvalidArgument("local write failed".into()))),
            LocalCopy::Task(tx, task, _) => {
                drop(tx.take());
                match task.take() {
                    Some(t) => t
                        .await
                        .map_err(|e| WorkerError::Startup(format!("writer task failed: {e}"))),
                    None => Ok(Err(WorkerError::InvalidArgument(
                        "local write failed".into(),
                    ))),
                }
            }
        }
    }
}

impl WorkerService {
    async fn write(
        &self,
        mut stream: Streaming<WriteChunkRequest>,
    ) -> Result<(WriteChunkResponse, String, u64), WorkerError> {
        let w = &self.worker;
        let _slot = w.transfer_slot()?;
        let idle = w.limits.idle_timeout;
        let first = next_message(&mut stream, idle)
            .await?
            .ok_or_else(|| WorkerError::InvalidArgument("empty write stream".into()))?;
        let Some(write_chunk_request::Msg::Start(start)) = first.msg else {
            return Err(WorkerError::InvalidArgument(
                "a write must begin with a start message".into(),
            ));
        };
        let (header, id) = validate_start(&start, &w.address)?;
        w.authorize(&start.token, &id, crate::security::ChunkOps::WRITE)?;
        let chunk_id = header.chunk_id.clone();
        let length = header.length;
        let reservation = w.store.reserve(length)?;

        // Local copy: a small chunk is gathered in memory right here (no file until finish);
        // a large one goes to a blocking disk writer fed through a bounded channel.
        let mut local = if length <= SMALL_CHUNK_MAX {
            LocalCopy::Inline(Some(w.store.create(header.clone())?))
        } else {
            let (disk_tx, mut disk_rx) =
                mpsc::channel::<(Bytes, OwnedSemaphorePermit)>(PIPELINE_DEPTH);
            let store = w.store.clone();
            let h2 = header.clone();
            let disk = tokio::task::spawn_blocking(move || {
                let mut writer = store.create(h2)?;
                while let Some((b, _permit)) = disk_rx.blocking_recv() {
                    writer.write(&b)?;
                }
                Ok::<_, WorkerError>(writer)
            });
            LocalCopy::Task(Some(disk_tx), Some(disk), w.write_buffer.clone())
        };

        // Downstream forwarder: the rest of the pipeline, fed the same buffers.
        let next = start.downstream.first().cloned();
        let (down_tx, down_task) = match &next {
            Some(next) => {
                let (tx, rx) = mpsc::channel::<WriteChunkRequest>(PIPELINE_DEPTH);
                let first = WriteChunkRequest {
                    msg: Some(write_chunk_request::Msg::Start(WriteStart {
                        header: Some(header.clone()),
                        downstream: start.downstream[1..].to_vec(),
                        token: start.token.clone(),
                    })),
                };
                let _ = tx.send(first).await;
                let mut client = w.worker_client(next).map_err(|e| WorkerError::Downstream {
                    worker: next.clone(),
                    code: Code::Unavailable,
                    message: e.to_string(),
                })?;
                let task = tokio::spawn(async move {
                    client
                        .write_chunk(ReceiverStream::new(rx))
                        .await
                        .map(|r| r.into_inner())
                });
                (Some(tx), Some(task))
            }
            None => (None, None),
        };

        let result: Result<u32, WorkerError> = async {
            let mut received = 0u64;
            loop {
                let msg = next_message(&mut stream, idle).await?;
                match msg.and_then(|m| m.msg) {
                    Some(write_chunk_request::Msg::Data(b)) => {
                        received += b.len() as u64;
                        if received > length {
                            return Err(WorkerError::InvalidArgument(format!(
                                "chunk {chunk_id} received more than its declared {length} bytes"
                            )));
                        }
                        w.bytes_written.fetch_add(b.len() as u64, Ordering::Relaxed);
                        if let Some(tx) = &down_tx
                            && tx
                                .send(WriteChunkRequest {
                                    msg: Some(write_chunk_request::Msg::Data(b.clone())),
                                })
                                .await
                                .is_err()
                            {
                                // The downstream call ended early; its result says why.
                                break Err(WorkerError::Downstream {
                                    worker: next.clone().unwrap_or_default(),
                                    code: Code::Unavailable,
                                    message: "stream closed".into(),
                                });
                            }
                        if let Err(e) = local.write(b).await {
                            break Err(e);
                        }
                    }
                    Some(write_chunk_request::Msg::Finish(WriteFinish { crc32c })) => {
                        break Ok(crc32c);
                    }
                    Some(write_chunk_request::Msg::Start(_)) => {
                        return Err(WorkerError::InvalidArgument(
                            "a write has exactly one start message".into(),
                        ));
                    }
                    None => {
                        return Err(WorkerError::InvalidArgument(format!(
                            "write of chunk {chunk_id} ended without a finish message after {received} bytes"
                        )));
                    }
                }
            }
        }
        .await;
        let local = local.writer().await;

        // Resolve downstream errors first: they say which worker to avoid.
        let expected_crc = match result {
            Ok(c) => c,
            Err(e) => {
                drop(down_tx);
                if let (Some(task), Some(next), WorkerError::Downstream { .. }) =
                    (down_task, &next, &e)
                    && let Ok(Err(s)) = task.await
                {
                    return Err(WorkerError::Downstream {
                        worker: blame(next, &s),
                        code: s.code(),
                        message: s.message().to_string(),
                    });
                }
                // The local writer's own failure (the chunk exists, the disk is full) is the
                // cause of a "local write failed".
                if let Ok(Err(disk_err)) = local {
                    return Err(disk_err);
                }
                return Err(e);
            }
        };
        let writer = local??;
        // Every replica checks the data against the client's checksum itself, so the finish
        // is forwarded while this one verifies and syncs: the pipeline's fsyncs overlap.
        let store = w.store.clone();
        let verify_and_sync = tokio::spawn(writer.finish_async(expected_crc));
        let down_result = match (down_tx, down_task) {
            (Some(tx), Some(task)) => {
                let _ = tx
                    .send(WriteChunkRequest {
                        msg: Some(write_chunk_request::Msg::Finish(WriteFinish {
                            crc32c: expected_crc,
                        })),
                    })
                    .await;
                drop(tx);
                Some(task.await)
            }
            _ => None,
        };
        let local_result = verify_and_sync
            .await
            .map_err(|e| WorkerError::Startup(format!("writer task failed: {e}")))?;
        drop(reservation);
        let mut stored_on = vec![w.address.clone()];
        if let (Some(res), Some(next)) = (down_result, &next) {
            let down = match res {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(s)) => Err(downstream_error(next, &s)),
                Err(e) => Err(WorkerError::Downstream {
                    worker: next.clone(),
                    code: Code::Internal,
                    message: e.to_string(),
                }),
            };
            match (local_result, down) {
                (Ok(()), Ok(r)) => stored_on.extend(r.stored_on),
                // This worker's own failure (bad input, or its disk) is the one to report:
                // blaming a downstream peer would make the client avoid a healthy worker.
                // Any downstream copy is an allocation of the failed attempt: garbage.
                (Err(e), _) => return Err(e),
                (Ok(()), Err(e)) => {
                    // The pipeline failed: do not keep a copy the client will not commit.
                    if let Ok(id) = chunk_id.parse::<ChunkId>() {
                        let _ = store.delete(&id);
                    }
                    return Err(e);
                }
            }
        } else {
            local_result?;
        }
        Ok((WriteChunkResponse { stored_on }, chunk_id, length))
    }
}

impl WorkerService {
    /// Admits a batched call of `n` chunks: at most [`MAX_SMALL_BATCH`], and one transfer
    /// slot for the whole call (its bytes are bounded by the message size).
    fn admit_batch(
        &self,
        op: &'static str,
        peer: &str,
        n: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let admitted = if n > MAX_SMALL_BATCH {
            Err(WorkerError::InvalidArgument(format!(
                "at most {MAX_SMALL_BATCH} chunks per call, not {n}"
            )))
        } else {
            self.worker.transfer_slot()
        };
        admitted.map_err(|e| {
            tracing::warn!(op, %peer, outcome = "error", error = %e);
            Status::from(e)
        })
    }

    /// Checks and appends one chunk of a WriteSmallChunks call (the checks of a pipelined
    /// write with no downstream), without waiting for its fsync: the call appends every
    /// chunk first so that one fsync covers them all.
    fn append_small(
        &self,
        c: pb::SmallChunk,
    ) -> Result<(Appended, Reservation, String, u64), WorkerError> {
        let w = &self.worker;
        let start = WriteStart {
            header: c.header,
            downstream: Vec::new(),
            token: c.token,
        };
        let (header, id) = validate_start(&start, &w.address)?;
        if header.length > SMALL_CHUNK_MAX {
            return Err(WorkerError::InvalidArgument(format!(
                "chunk {id} is {} bytes; a small write carries at most {SMALL_CHUNK_MAX}",
                header.length
            )));
        }
        w.authorize(&start.token, &id, crate::security::ChunkOps::WRITE)?;
        let length = header.length;
        let reservation = w.store.reserve(length)?;
        let mut writer = w.store.create(header)?;
        writer.write(&c.data)?;
        w.bytes_written
            .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        let appended = writer.append_small(c.crc32c)?;
        Ok((appended, reservation, id.to_string(), length))
    }
}

impl WorkerService {
    /// Reads one small chunk whole from disk and verifies it (the blocking half of
    /// ReadSmallChunks, for chunks not already in the page cache).
    fn read_small_blocking(
        worker: &Worker,
        id: &ChunkId,
    ) -> Result<(ChunkHeader, Bytes), WorkerError> {
        let (mut file, header) = worker.store.open_read(id)?;
        if header.length > SMALL_CHUNK_MAX {
            return Err(WorkerError::InvalidArgument(format!(
                "chunk {id} is {} bytes; a small read takes at most {SMALL_CHUNK_MAX}",
                header.length
            )));
        }
        let mut data = bytes::BytesMut::with_capacity(header.length as usize);
        worker.read_verified(id, &mut file, header.length, header.crc32c, |b| {
            data.extend_from_slice(&b);
            true
        })?;
        Ok((header, data.freeze()))
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn write_chunk(
        &self,
        req: Request<Streaming<WriteChunkRequest>>,
    ) -> Result<Response<WriteChunkResponse>, Status> {
        let started = Instant::now();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let _g = Gauge::enter(&self.worker.active_writes);
        match self.write(req.into_inner()).await {
            Ok((r, chunk, bytes)) => {
                tracing::info!(op = "write_chunk", %chunk, bytes, %peer, replicas = r.stored_on.len(), ms = crate::rpc::elapsed_ms(started), outcome = "ok");
                Ok(Response::new(r))
            }
            Err(e) => {
                tracing::warn!(op = "write_chunk", %peer, ms = crate::rpc::elapsed_ms(started), outcome = "error", error = %e);
                Err(e.into())
            }
        }
    }

    async fn write_small_chunks(
        &self,
        req: Request<pb::WriteSmallChunksRequest>,
    ) -> Result<Response<pb::WriteSmallChunksResponse>, Status> {
        let started = Instant::now();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let _g = Gauge::enter(&self.worker.active_writes);
        let chunks = req.into_inner().chunks;
        let _slot = self.admit_batch("write_small_chunks", &peer, chunks.len())?;
        let n = chunks.len();
        let appended: Vec<_> = chunks.into_iter().map(|c| self.append_small(c)).collect();
        let outcomes = futures::future::join_all(appended.into_iter().map(|a| async move {
            let (appended, reservation, chunk, length) = a?;
            appended.durable().await?;
            drop(reservation);
            Ok::<_, WorkerError>((chunk, length))
        }))
        .await;
        let ms = crate::rpc::elapsed_ms(started);
        let mut bytes = 0;
        let results = outcomes
            .into_iter()
            .map(|o| match o {
                Ok((chunk, len)) => {
                    bytes += len;
                    tracing::debug!(op = "write_chunk", %chunk, bytes = len, %peer, ms, outcome = "ok");
                    pb::SmallChunkResult {
                        stored: true,
                        ..Default::default()
                    }
                }
                Err(e) => {
                    tracing::warn!(op = "write_chunk", %peer, ms, outcome = "error", error = %e);
                    let s = Status::from(e);
                    pb::SmallChunkResult {
                        stored: false,
                        code: s.code() as i32,
                        message: s.message().to_string(),
                    }
                }
            })
            .collect();
        tracing::info!(op = "write_small_chunks", chunks = n, bytes, %peer, ms, outcome = "ok");
        Ok(Response::new(pb::WriteSmallChunksResponse { results }))
    }

    async fn replicate_chunk(
        &self,
        req: Request<pb::ReplicateChunkRequest>,
    ) -> Result<Response<pb::ReplicateChunkResponse>, Status> {
        let r = req.into_inner();
        let id: ChunkId = r
            .chunk_id
            .parse()
            .map_err(|e: chunk::BadChunkId| Status::invalid_argument(e.to_string()))?;
        self.worker
            .authorize(&r.token, &id, crate::security::ChunkOps::READ)
            .map_err(|e| {
                tracing::warn!(op = "replicate", chunk = %id, error = %e, outcome = "refused");
                Status::from(e)
            })?;
        let _slot = self.worker.transfer_slot()?;
        let _g = Gauge::enter(&self.worker.active_reads);
        match self.worker.replicate_to(id, &r.target, &r.token).await {
            Ok(bytes) => Ok(Response::new(pb::ReplicateChunkResponse { bytes })),
            Err(e) => {
                tracing::warn!(op = "replicate", chunk = %id, target = %r.target, error = %e, outcome = "error");
                Err(e.into())
            }
        }
    }

    type ReadChunkStream = super::read::Messages;

    async fn read_small_chunks(
        &self,
        req: Request<pb::ReadSmallChunksRequest>,
    ) -> Result<Response<pb::ReadSmallChunksResponse>, Status> {
        let started = Instant::now();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let chunks = req.into_inner().chunks;
        let _slot = self.admit_batch("read_small_chunks", &peer, chunks.len())?;
        let _g = Gauge::enter(&self.worker.active_reads);
        let n = chunks.len();
        // Chunks in the page cache are served here; the rest in one blocking step.
        let mut results: Vec<Option<Result<(ChunkHeader, Bytes), WorkerError>>> =
            Vec::with_capacity(n);
        let mut uncached = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let read = c
                .chunk_id
                .parse::<ChunkId>()
                .map_err(|e| WorkerError::InvalidArgument(e.to_string()))
                .and_then(|id| {
                    self.worker
                        .authorize(&c.token, &id, crate::security::ChunkOps::READ)?;
                    Ok(id)
                });
            results.push(match read {
                Err(e) => Some(Err(e)),
                Ok(id) => match self.worker.store.read_small_cached(&id) {
                    Some(hit) => {
                        // (The blocking reads count their own bytes.)
                        self.worker
                            .bytes_read
                            .fetch_add(hit.1.len() as u64, Ordering::Relaxed);
                        Some(Ok(hit))
                    }
                    None => {
                        uncached.push((i, id));
                        None
                    }
                },
            });
        }
        if !uncached.is_empty() {
            let worker = self.worker.clone();
            let read = tokio::task::spawn_blocking(move || {
                uncached
                    .into_iter()
                    .map(|(i, id)| (i, Self::read_small_blocking(&worker, &id)))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Status::internal(format!("reader task failed: {e}")))?;
            for (i, r) in read {
                results[i] = Some(r);
            }
        }
        let ms = crate::rpc::elapsed_ms(started);
        let mut bytes = 0u64;
        let results = results
            .into_iter()
            .zip(&chunks)
            .map(|(r, c)| {
                match r.unwrap_or_else(|| Err(WorkerError::Startup("chunk not read".into()))) {
                    Ok((header, data)) => {
                        bytes += data.len() as u64;
                        tracing::debug!(op = "read_chunk", chunk = %c.chunk_id, %peer, ms, outcome = "sent");
                        pb::SmallChunkData {
                            header: Some(header),
                            data,
                            ..Default::default()
                        }
                    }
                    Err(e) => {
                        tracing::warn!(op = "read_chunk", chunk = %c.chunk_id, %peer, ms, outcome = "error", error = %e);
                        let s = Status::from(e);
                        pb::SmallChunkData {
                            code: s.code() as i32,
                            message: s.message().to_string(),
                            ..Default::default()
                        }
                    }
                }
            })
            .collect();
        tracing::info!(op = "read_small_chunks", chunks = n, bytes, %peer, ms, outcome = "ok");
        Ok(Response::new(pb::ReadSmallChunksResponse { results }))
    }

    /// Open to any caller, like the health service: it reveals only this process's memory
    /// and CPU figures, and a peak reset changes nothing but the next answer's peak.
    async fn process_stats(
        &self,
        req: Request<pb::ProcessStatsRequest>,
    ) -> Result<Response<pb::ProcessStats>, Status> {
        Ok(crate::procstat::answer(req))
    }

    async fn read_chunk(
        &self,
        req: Request<pb::ReadChunkRequest>,
    ) -> Result<Response<Self::ReadChunkStream>, Status> {
        // Served by `read::ZeroCopyReads` in front of this service; this handler answers the
        // same from the same source when the service runs without it.
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let (id, source) = super::read::open(&self.worker, req.get_ref(), &peer).await?;
        Ok(Response::new(super::read::messages(
            &self.worker,
            id,
            source,
        )))
    }
}
