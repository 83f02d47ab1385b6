//! Sending a file's chunks, several at once.
//!
//! A chunk's answer comes only once every worker of its pipeline has fsynced it. Sent one at
//! a time, the stream waited for those fsyncs after every chunk and the disk waited for the
//! stream before the next: a 1 GiB upload ran at about half the disk's write+fsync speed. Now
//! the next chunk streams while the last ones are synced, with up to
//! [`UPLOAD_IN_FLIGHT_BYTES`] of chunks awaiting their answers.
//!
//! The chunks are still read in file order, one after another, so the file's digest is
//! computed once as the bytes go out. A chunk whose attempt failed after all of its bytes were
//! read is sent again on a fresh pipeline and must read back with the same CRC32C (the
//! digest already covers those bytes); one that failed part-way is retried before the next
//! chunk starts, from the digest as it stood before it.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::spool::Spool;
use super::upload::{AttemptError, MAX_ATTEMPTS, all_stored, read_small};
use super::{AbortOnDrop, Client, ClientError, Progress};
use crate::chunk;
use crate::digest::FileHasher;
use crate::rpc::pb::{
    self, ChunkHeader, ChunkPlacement, CommittedChunk, WriteChunkRequest, WriteFinish, WriteStart,
    write_chunk_request,
};
use crate::rpc::{FAILED_WORKER_KEY, WRITE_DATA_MESSAGE, now_unix_ms};
use crate::worker::volume::SMALL_CHUNK_MAX;

/// Bytes of an upload's chunks sent and awaiting their workers' answers at once (three chunks
/// of the default 8 MiB). Measured with 1 GiB and 4 GiB uploads (README, Performance): one
/// chunk ran at half the disk's speed, three reach 80-90 % of it, six gain a little more but
/// put several streams on a worker at once, and its memory past 64 MiB.
const UPLOAD_IN_FLIGHT_BYTES: u64 = 24 << 20;
/// Chunks awaiting their answers at once, however small.
const MAX_UPLOAD_IN_FLIGHT: usize = 8;

/// Chunks sent at once for a file of `chunk_size` chunks.
fn in_flight(chunk_size: u64) -> usize {
    ((UPLOAD_IN_FLIGHT_BYTES / chunk_size.max(1)) as usize).clamp(1, MAX_UPLOAD_IN_FLIGHT)
}

/// The chunks a stream's spool holds: those in flight and the next one (whose first byte
/// tells whether the one before it is the last), so that reading the input never waits
/// for the sending, nor holds more than that.
pub(super) fn spool_slots(chunk_size: u64) -> u64 {
    in_flight(chunk_size) as u64 + 1
}

/// What every chunk of one upload shares.
pub(super) struct Upload<'a> {
    pub plan: &'a pb::StartUploadResponse,
    pub name: &'a str,
    /// The file's size; 0 for a stream, whose chunks come as `stream` has them.
    pub size: u64,
    pub file: Arc<std::fs::File>,
    /// An input of unknown size, staged in `file` as it is read.
    pub stream: Option<&'a Spool>,
    pub progress: &'a Arc<Progress>,
}

/// What the attempts of one upload have learnt so far.
#[derive(Default)]
struct Attempts {
    retried: u32,
    /// Workers blamed for a failed attempt. Later chunks are placed without them where the
    /// cluster has enough others: the master goes on placing chunks on a worker that died
    /// until it misses its heartbeats, and every chunk sent to it would fail once first.
    avoid: Vec<String>,
}

/// One chunk through its attempts.
struct ChunkJob {
    index: u32,
    offset: u64,
    /// Where its bytes are in `Upload::file`: `offset`, or a stream's slot.
    at: u64,
    len: u64,
    /// For its header: the file's size, or for a stream's chunk before the last 0 (not
    /// known yet; a metadata rebuild takes the size from the last chunk).
    file_size: u64,
    placement: ChunkPlacement,
    attempt: u32,
    exclude: Vec<String>,
    /// The file's digest up to this chunk, until an attempt has read all of its bytes.
    hash_before: Option<FileHasher>,
    /// The chunk's CRC32C, once an attempt has read all of its bytes.
    crc: Option<u32>,
}

/// The workers' answer to one attempt, awaited in a task of its own so that it runs while
/// the next chunks stream. Dropping it (an upload that failed or was cancelled) aborts it.
struct Answer {
    task: tokio::task::JoinHandle<Result<Vec<String>, AttemptError>>,
    _abort: AbortOnDrop,
}

impl Answer {
    fn spawn(
        call: impl Future<Output = Result<Vec<String>, AttemptError>> + Send + 'static,
    ) -> Answer {
        let task = tokio::spawn(call);
        let _abort = AbortOnDrop(task.abort_handle());
        Answer { task, _abort }
    }

    async fn result(self) -> Result<Vec<String>, AttemptError> {
        self.task.await.unwrap_or_else(|e| {
            Err(AttemptError {
                blame: None,
                message: format!("chunk write task failed: {e}"),
                local: None,
            })
        })
    }
}

/// The placement of the chunk after the one being sent, asked for ahead of its turn.
/// Dropping it (an upload that failed or ended) aborts the call.
struct Ahead {
    index: u32,
    task: tokio::task::JoinHandle<Result<ChunkPlacement, ClientError>>,
    _abort: AbortOnDrop,
}

impl Ahead {
    /// The placement, or `None` if it could not be had (asked again the usual way, which
    /// then reports the error).
    async fn placement(self) -> Option<ChunkPlacement> {
        match self.task.await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        }
    }
}

/// An attempt whose bytes have been read and handed to its pipeline.
struct Launched {
    answer: Answer,
    /// The digest past this chunk, if this attempt was the first to read all of it.
    hash_after: Option<FileHasher>,
    /// Bytes this attempt added to the progress, taken back if it fails.
    counted: u64,
}

impl Client {
    /// Sends every chunk of an upload; returns them as committed, the file's BLAKE3 digest,
    /// how many attempts were retried, and the placement the last chunk landed on (for a
    /// small file's location: see `locations`).
    pub(super) async fn send_chunks(
        &self,
        up: &Upload<'_>,
    ) -> Result<(Vec<CommittedChunk>, String, u32, Option<ChunkPlacement>), ClientError> {
        let cs = up.plan.chunk_size.max(1);
        let n = up.size.div_ceil(cs);
        let window = in_flight(cs);
        let mut hash = Some(FileHasher::new());
        let mut committed = Vec::with_capacity(n as usize);
        let mut tries = Attempts::default();
        let mut sent: VecDeque<(ChunkJob, Launched)> = VecDeque::with_capacity(window);
        let mut ahead: Option<Ahead> = None;
        for index in 0.. {
            if up.progress.is_cancelled() {
                return Err(ClientError::Cancelled);
            }
            while sent.len() >= window {
                if let Some((job, l)) = sent.pop_front() {
                    committed.push(self.land(up, job, l, &mut tries).await?.0);
                }
            }
            let offset = index * cs;
            let (len, file_size) = match up.stream {
                None if index >= n => break,
                None => ((up.size - offset).min(cs), up.size),
                Some(s) => match s.chunk(offset, cs, || up.progress.is_cancelled()).await? {
                    None => break,
                    Some((len, last)) => (len, if last { offset + len } else { 0 }),
                },
            };
            let index = u32::try_from(index).map_err(|_| {
                ClientError::InvalidInput(format!(
                    "the input is too large for chunks of {cs} bytes"
                ))
            })?;
            let planned = up.plan.chunks.iter().find(|c| c.index == index);
            let fits = |p: &ChunkPlacement| !p.workers.iter().any(|w| tries.avoid.contains(w));
            let placement = match planned {
                Some(p) if fits(p) => p.clone(),
                _ => match ahead.take().filter(|a| a.index == index) {
                    Some(a) => match a.placement().await {
                        Some(p)
                            if fits(&p) && p.workers.len() as u32 >= up.plan.replicas_effective =>
                        {
                            p
                        }
                        // Failed, or placed before a worker was blamed: the usual way (an
                        // unused allocation is collected at the commit).
                        _ => self.place(up, index, &[], &tries.avoid).await?,
                    },
                    None => self.place(up, index, &[], &tries.avoid).await?,
                },
            };
            // The next chunk's placement is asked for now, so that its allocation (durable
            // on the master, see `UploadRecord::durable`) overlaps this chunk's sending
            // instead of stalling the stream before the next one. (A stream's chunk is
            // known to be its last once the spool has seen the input end after it.)
            let next = index.saturating_add(1);
            let more = match up.stream {
                Some(_) => file_size == 0,
                None => u64::from(next) < n,
            };
            if more && !up.plan.chunks.iter().any(|c| c.index == next) {
                ahead = Some(self.allocate_ahead(up, next, &tries.avoid));
            }
            let mut job = ChunkJob {
                index,
                offset,
                at: up.stream.map_or(offset, |s| s.at(offset)),
                len,
                file_size,
                placement,
                attempt: 1,
                exclude: Vec::new(),
                hash_before: hash.take(),
                crc: None,
            };
            // Until one attempt has read the whole chunk: the next chunk's digest needs it.
            loop {
                let mut l = self.launch(up, &mut job).await?;
                if let Some(h) = l.hash_after.take() {
                    hash = Some(h);
                    sent.push_back((job, l));
                    break;
                }
                let e = match l.answer.result().await {
                    Err(e) => e,
                    Ok(_) => AttemptError {
                        blame: None,
                        message: "a write ended before its last byte was sent".into(),
                        local: None,
                    },
                };
                up.progress.done.fetch_sub(l.counted, Ordering::Relaxed);
                self.next_attempt(up, &mut job, e, &mut tries).await?;
            }
        }
        let mut last = None;
        while let Some((job, l)) = sent.pop_front() {
            let (c, placement) = self.land(up, job, l, &mut tries).await?;
            committed.push(c);
            last = Some(placement);
        }
        let hash = hash.ok_or_else(|| ClientError::Integrity("file digest lost".into()))?;
        Ok((committed, hash.finalize_hex(), tries.retried, last))
    }

    /// Waits for a chunk's answer, sending it again on fresh pipelines while attempts fail.
    /// Returns the chunk as committed and the placement it landed on.
    async fn land(
        &self,
        up: &Upload<'_>,
        mut job: ChunkJob,
        mut l: Launched,
        tries: &mut Attempts,
    ) -> Result<(CommittedChunk, ChunkPlacement), ClientError> {
        loop {
            match l.answer.result().await {
                Ok(stored_on) => {
                    if let Some(s) = up.stream {
                        s.release(job.offset + job.len);
                    }
                    let chunk = CommittedChunk {
                        index: job.index,
                        chunk_id: job.placement.chunk_id.clone(),
                        length: job.len,
                        crc32c: job.crc.unwrap_or_default(),
                        workers: stored_on,
                    };
                    return Ok((chunk, job.placement));
                }
                Err(e) => {
                    up.progress.done.fetch_sub(l.counted, Ordering::Relaxed);
                    self.next_attempt(up, &mut job, e, tries).await?;
                    l = self.launch(up, &mut job).await?;
                }
            }
        }
    }

    /// After a failed attempt: gives up (a local failure, cancelled, or out of attempts) or
    /// places the chunk on a fresh pipeline that avoids the worker blamed.
    async fn next_attempt(
        &self,
        up: &Upload<'_>,
        job: &mut ChunkJob,
        e: AttemptError,
        tries: &mut Attempts,
    ) -> Result<(), ClientError> {
        if up.progress.is_cancelled() {
            return Err(ClientError::Cancelled);
        }
        if let Some(local) = e.local {
            return Err(local);
        }
        let (index, attempt) = (job.index, job.attempt);
        tracing::warn!(chunk = index, attempt, blame = ?e.blame, error = %e.message, "chunk write failed; retrying on a fresh pipeline");
        if attempt >= MAX_ATTEMPTS {
            return Err(ClientError::WriteFailed {
                index,
                attempts: attempt,
                last: e.message,
            });
        }
        if let Some(b) = e.blame {
            if !tries.avoid.contains(&b) {
                tries.avoid.push(b.clone());
            }
            if !job.exclude.contains(&b) {
                job.exclude.push(b);
            }
        }
        job.attempt += 1;
        tries.retried += 1;
        tokio::time::sleep(Duration::from_millis(100 * job.attempt as u64)).await;
        job.placement = self.place(up, index, &job.exclude, &tries.avoid).await?;
        Ok(())
    }

    /// A placement for chunk `index` without the workers in `exclude`, and without those in
    /// `avoid` too if the cluster still gives the upload's full replication without them (a
    /// worker blamed wrongly, or back again, must not leave the rest of the file short).
    async fn place(
        &self,
        up: &Upload<'_>,
        index: u32,
        exclude: &[String],
        avoid: &[String],
    ) -> Result<ChunkPlacement, ClientError> {
        let mut wider = exclude.to_vec();
        wider.extend(avoid.iter().filter(|a| !exclude.contains(a)).cloned());
        if wider.len() > exclude.len()
            && let Ok(p) = self.allocate(up, index, &wider).await
            && p.workers.len() as u32 >= up.plan.replicas_effective
        {
            return Ok(p);
        }
        self.allocate(up, index, exclude).await
    }

    /// Asks for chunk `index`'s placement in a task of its own, without the workers in
    /// `avoid`.
    fn allocate_ahead(&self, up: &Upload<'_>, index: u32, avoid: &[String]) -> Ahead {
        let (me, id, progress, avoid) = (
            self.clone(),
            up.plan.upload_id.clone(),
            up.progress.clone(),
            avoid.to_vec(),
        );
        let task = tokio::spawn(async move { me.allocate_for(id, index, &avoid, &progress).await });
        let abort = AbortOnDrop(task.abort_handle());
        Ahead {
            index,
            task,
            _abort: abort,
        }
    }

    async fn allocate(
        &self,
        up: &Upload<'_>,
        index: u32,
        exclude: &[String],
    ) -> Result<ChunkPlacement, ClientError> {
        self.allocate_for(up.plan.upload_id.clone(), index, exclude, up.progress)
            .await
    }

    /// A placement from the master, waited for through a master restart (see
    /// `Client::patiently`; an upload the master forgot is then `NotFound`).
    async fn allocate_for(
        &self,
        upload_id: String,
        index: u32,
        exclude: &[String],
        progress: &Progress,
    ) -> Result<ChunkPlacement, ClientError> {
        let req = pb::AllocateChunkRequest {
            upload_id,
            index,
            exclude: exclude.to_vec(),
        };
        self.patiently("allocate_chunk", progress, || {
            let (mut master, req) = (self.master(), req.clone());
            async move { master.allocate_chunk(req).await }
        })
        .await
        .map_err(|s| self.err(s))?
        .into_inner()
        .chunk
        .ok_or_else(|| ClientError::Integrity("master allocated no chunk".into()))
    }

    /// Starts one attempt at a chunk and reads its bytes into the pipeline; returns once they
    /// are all handed over (or the call ended early), leaving the answer to come.
    async fn launch(&self, up: &Upload<'_>, job: &mut ChunkJob) -> Result<Launched, ClientError> {
        let header = ChunkHeader {
            format_version: chunk::FORMAT_VERSION,
            chunk_id: job.placement.chunk_id.clone(),
            file_id: up.plan.file_id,
            file_name: up.name.to_string(),
            chunk_index: job.index,
            file_version: up.plan.version,
            length: job.len,
            crc32c: 0,
            created_unix_ms: now_unix_ms(),
            file_size: job.file_size,
            chunk_size: up.plan.chunk_size,
        };
        let read = if job.len <= SMALL_CHUNK_MAX {
            let hash = job.hash_before.clone().unwrap_or_default();
            match read_small(&up.file, job.at, job.len, hash) {
                Err(e) => return Err(e.local.unwrap_or(ClientError::InvalidInput(e.message))),
                Ok((data, crc, hash)) => {
                    let (me, placement, progress) =
                        (self.clone(), job.placement.clone(), up.progress.clone());
                    let answer = Answer::spawn(async move {
                        me.write_small(&placement, header, data, crc, &progress)
                            .await
                    });
                    Read {
                        answer,
                        crc,
                        hash: job.hash_before.is_some().then_some(hash),
                        counted: 0,
                        complete: true,
                    }
                }
            }
        } else {
            match self.stream_chunk(up, job, header).await {
                Ok(r) => r,
                Err(AttemptError {
                    local: Some(local), ..
                }) => return Err(local),
                // Not started: an attempt that failed at once.
                Err(e) => {
                    return Ok(Launched {
                        answer: Answer::spawn(async move { Err(e) }),
                        hash_after: None,
                        counted: 0,
                    });
                }
            }
        };
        if !read.complete {
            return Ok(Launched {
                answer: read.answer,
                hash_after: None,
                counted: read.counted,
            });
        }
        match job.crc {
            // A retry: the digest already covers these bytes, so they must be the same.
            Some(crc) if crc != read.crc => Err(ClientError::InvalidInput(format!(
                "chunk {} of the local file read back differently on a retry (did it change during the upload?)",
                job.index
            ))),
            Some(_) => Ok(Launched {
                answer: read.answer,
                hash_after: None,
                counted: read.counted,
            }),
            None => {
                job.crc = Some(read.crc);
                job.hash_before = None;
                Ok(Launched {
                    answer: read.answer,
                    hash_after: read.hash,
                    counted: read.counted,
                })
            }
        }
    }

    /// Streams a large chunk into the first worker of its pipeline: a blocking reader preads
    /// it in bounded messages (CRC32C and, on a first read, the digest as it goes) while the
    /// call runs in a task of its own.
    async fn stream_chunk(
        &self,
        up: &Upload<'_>,
        job: &ChunkJob,
        header: ChunkHeader,
    ) -> Result<Read, AttemptError> {
        let placement = job.placement.clone();
        let first = placement.workers.first().cloned().ok_or(AttemptError {
            blame: None,
            message: "master returned an empty pipeline".into(),
            local: None,
        })?;
        let mut client = self.worker(&first).map_err(|e| AttemptError {
            blame: Some(first.clone()),
            message: e.to_string(),
            local: None,
        })?;
        let (len, offset, at) = (job.len, job.offset, job.at);
        let (tx, rx) = mpsc::channel::<WriteChunkRequest>(4);
        let start = WriteChunkRequest {
            msg: Some(write_chunk_request::Msg::Start(WriteStart {
                header: Some(header),
                downstream: placement.workers[1..].to_vec(),
                token: placement.token.clone(),
            })),
        };
        // A generous bound: a stalled worker must not hang the upload forever.
        let limit = crate::rpc::transfer_limit(len);
        let answer = Answer::spawn(async move {
            match tokio::time::timeout(limit, client.write_chunk(ReceiverStream::new(rx))).await {
                Err(_) => Err(AttemptError {
                    blame: Some(first),
                    message: format!("no answer within {}s", limit.as_secs()),
                    local: None,
                }),
                Ok(Err(s)) => {
                    let blame = s
                        .metadata()
                        .get(FAILED_WORKER_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                        .or(Some(first));
                    Err(AttemptError {
                        blame,
                        message: s.message().to_string(),
                        local: None,
                    })
                }
                Ok(Ok(resp)) => all_stored(resp.into_inner().stored_on, &placement),
            }
        });
        let file = up.file.clone();
        let progress = up.progress.clone();
        let mut hash = job.hash_before.clone();
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut crc = 0u32;
            let mut pos = 0u64;
            if tx.blocking_send(start).is_err() {
                return Ok((crc, hash, 0, false));
            }
            while pos < len {
                let n = (len - pos).min(WRITE_DATA_MESSAGE as u64) as usize;
                let mut buf = BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, at + pos)?;
                crc = chunk::crc32c_append(crc, &buf);
                if let Some(h) = hash.as_mut() {
                    h.update(&buf);
                }
                if tx
                    .blocking_send(WriteChunkRequest {
                        msg: Some(write_chunk_request::Msg::Data(buf.freeze())),
                    })
                    .is_err()
                {
                    return Ok((crc, hash, pos, false));
                }
                pos += n as u64;
                progress.done.fetch_add(n as u64, Ordering::Relaxed);
            }
            let complete = tx
                .blocking_send(WriteChunkRequest {
                    msg: Some(write_chunk_request::Msg::Finish(WriteFinish {
                        crc32c: crc,
                    })),
                })
                .is_ok();
            Ok((crc, hash, pos, complete))
        });
        match reader.await {
            Err(e) => Err(AttemptError {
                blame: None,
                message: format!("reader task failed: {e}"),
                local: None,
            }),
            Ok(Err(e)) => Err(AttemptError {
                blame: None,
                message: e.to_string(),
                local: Some(ClientError::InvalidInput(format!(
                    "reading the local file failed at offset {offset} (did it change during the upload?): {e}"
                ))),
            }),
            Ok(Ok((crc, hash, counted, complete))) => Ok(Read {
                answer,
                crc,
                hash,
                counted,
                complete,
            }),
        }
    }
}

/// One attempt's bytes as read.
struct Read {
    answer: Answer,
    crc: u32,
    /// The digest past the chunk, on a first read.
    hash: Option<FileHasher>,
    counted: u64,
    /// Every byte and the finish were handed to the call.
    complete: bool,
}
