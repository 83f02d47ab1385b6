//! Streamed uploads: each chunk goes to the first worker of its pipeline in bounded messages
//! while its CRC32C and the file's BLAKE3 digest are computed; a failed pipeline is retried on a
//! fresh one; the master makes the file visible only when every chunk is durable.
//!
//! A small chunk (at most [`SMALL_CHUNK_MAX`]) is sent to all of its workers at once instead
//! of along the pipeline: for a few KiB the chain's hops cost more than the bandwidth it
//! saves, so its latency becomes one round trip instead of one per replica.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::locations::Location;
use super::spool::{Input, Spool};
use super::{AbortOnDrop, Client, ClientError, Progress, reserve, send};
use crate::chunk;
use crate::digest::FileHasher;
use crate::rpc::now_unix_ms;
use crate::rpc::pb::{self, ChunkHeader, ChunkPlacement, CommittedChunk, FileInfo};
use crate::worker::volume::SMALL_CHUNK_MAX;

/// Attempts per chunk before the upload gives up.
pub const MAX_ATTEMPTS: u32 = 5;
/// How often an upload tells the master it is still alive.
const RENEW_EVERY: Duration = Duration::from_secs(30);

/// Options of one upload.
#[derive(Debug, Default, Clone)]
pub struct UploadOptions {
    /// Stored name; defaults to the local file's name.
    pub name: Option<String>,
    /// Replication factor; None = the master's default.
    pub replicas: Option<u32>,
    pub progress: Option<Arc<Progress>>,
}

/// What an upload achieved.
#[derive(Debug, Clone)]
pub struct UploadReport {
    pub file: FileInfo,
    pub replaced: bool,
    /// Replicas achieved for every chunk (the minimum over chunks).
    pub replicas_achieved: u32,
    pub attempts_retried: u32,
    pub elapsed: Duration,
}

/// One failed attempt at a chunk, and which worker it blames.
pub(super) struct AttemptError {
    pub blame: Option<String>,
    pub message: String,
    pub local: Option<ClientError>,
}

fn default_name(path: &Path) -> Result<String, ClientError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            ClientError::InvalidInput(format!(
                "cannot derive a name from {}; pass --name",
                path.display()
            ))
        })
}

/// The path that names standard input (`upload - --name NAME`).
pub const STDIN: &str = "-";

/// What an upload reads.
enum Source {
    /// A regular file, with its size.
    File(std::fs::File, u64),
    /// Standard input (`-`), a pipe or a character device (`/dev/stdin`, a FIFO): its size
    /// is known only at its end, so it is staged a few chunks at a time (`spool`).
    Stream(Input),
}

/// Opens what an upload reads. A FIFO is not opened here: that waits for its writer (on
/// an async thread, which may also run an embedded cluster), so the spool's thread opens
/// it. Nor is it opened without waiting: a reader that comes and goes can break a writer's
/// pipe. A block device, socket or directory is refused.
fn open_source(path: &Path) -> Result<Source, ClientError> {
    use std::os::unix::fs::FileTypeExt;
    let local_err = |source: std::io::Error| ClientError::LocalIo {
        op: "read",
        path: path.to_path_buf(),
        source,
    };
    let f = if path == Path::new(STDIN) {
        use std::os::fd::AsFd;
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(local_err)?;
        std::fs::File::from(fd)
    } else if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        return Ok(Source::Stream(Input::Path(path.to_path_buf())));
    } else {
        std::fs::File::open(path).map_err(local_err)?
    };
    let meta = f.metadata().map_err(local_err)?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(Source::File(f, meta.len()))
    } else if kind.is_fifo() || kind.is_char_device() {
        Ok(Source::Stream(Input::Open(f)))
    } else {
        Err(ClientError::InvalidInput(format!(
            "{} is not a regular file, a pipe or standard input",
            path.display()
        )))
    }
}

/// Refuses a streamed upload the master started as an empty file of known size: a master
/// older than uploads of unknown size ignores the request's flag, and the first chunk would
/// then fail with "chunk index 0 is out of range", which says nothing of the cause.
fn streamed_plan_honoured(
    streamed: bool,
    plan: &pb::StartUploadResponse,
    master: &str,
) -> Result<(), ClientError> {
    if streamed && !plan.size_unknown {
        return Err(ClientError::Master {
            code: tonic::Code::Unimplemented,
            message: format!(
                "the master at {master} does not take uploads of unknown size (it is older than this client): upgrade it, or upload from a file"
            ),
        });
    }
    Ok(())
}

impl Client {
    /// Uploads the local file at `path`. `-` (standard input), `/dev/stdin` or a FIFO is
    /// uploaded as it is read, its size fixed at its end; a few chunks of it at a time are
    /// staged in an unlinked temporary file in `$TMPDIR` (see `spool`), since an upload
    /// rereads a chunk to retry it. The file becomes visible atomically when this returns
    /// `Ok`; on error nothing is visible and the chunks already written are collected (but
    /// see `give_up_reservation` for an error that left the master unreachable).
    pub async fn upload(
        &self,
        path: &Path,
        opts: UploadOptions,
    ) -> Result<UploadReport, ClientError> {
        let started = std::time::Instant::now();
        let name = match &opts.name {
            Some(n) => n.clone(),
            None if path == Path::new(STDIN) => {
                return Err(ClientError::InvalidInput(
                    "standard input has no name of its own; pass --name".into(),
                ));
            }
            None => default_name(path)?,
        };
        // Checked before anything is read, with a clearer message than the master's.
        crate::names::validate(&name)
            .map_err(|e| ClientError::InvalidInput(format!("invalid file name: {e}")))?;
        let progress = opts.progress.clone().unwrap_or_default();
        let source = open_source(path)?;
        let (size, streamed) = match &source {
            Source::File(_, size) => (*size, false),
            Source::Stream(_) => (0, true),
        };
        // Whatever this name held is about to be replaced; a reserved upload below
        // remembers where its new bytes went.
        self.locations.forget(&name);
        // A stream's total stays 0: its size is not known until it ends.
        progress.total.store(size, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);

        if let Source::File(file, _) = &source
            && size > 0
            && size <= SMALL_CHUNK_MAX
            && let Some(slot) = self.reservations.take(opts.replicas.unwrap_or(0))
            && size <= slot.max_size
        {
            match self
                .upload_reserved(slot, &name, size, file, &progress, started)
                .await
            {
                Ok(report) => {
                    self.reservations.record(true);
                    return Ok(report);
                }
                Err(Reserved::Failed(e, upload_id)) => {
                    self.give_up_reservation(upload_id).await;
                    return Err(e);
                }
                Err(Reserved::Retry(why, upload_id)) => {
                    self.reservations.record(false);
                    // Aborted as a failed upload is, so that what reached some of its workers
                    // is deleted now rather than found later as an orphan.
                    self.give_up_reservation(upload_id).await;
                    progress.done.store(0, Ordering::Relaxed);
                    tracing::debug!(name = %name, error = %why, "a reserved upload failed; uploading again as usual");
                }
            }
        }
        // Kept by the master through a restart (its `UploadRecord::durable`): renewed, and
        // its master calls waited through an outage. A small file is written and committed
        // within its attempts' time limits, far inside the lease (minutes): it needs no
        // renewal task, which would be a task and a timer for every small file.
        let durable = streamed || size > SMALL_CHUNK_MAX;
        let request = pb::StartUploadRequest {
            name: name.clone(),
            size,
            replicas: opts.replicas.unwrap_or(0),
            size_unknown: streamed,
        };
        let start = || self.batches.starts.call(request.clone());
        let plan = if durable {
            self.patiently("start_upload", &progress, start).await
        } else {
            self.once_more("start_upload", start).await
        }
        .map_err(|s| self.err(s))?;
        tracing::debug!(name = %name, size, streamed, upload = %plan.upload_id, "upload started");
        if let Err(e) = streamed_plan_honoured(streamed, &plan, self.master_addr()) {
            let _ = self
                .master()
                .abort_upload(pb::AbortUploadRequest {
                    upload_id: plan.upload_id.clone(),
                })
                .await;
            return Err(e);
        }
        let _renew = durable.then(|| {
            let mut master = self.master();
            let id = plan.upload_id.clone();
            AbortOnDrop(
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(RENEW_EVERY).await;
                        let _ = master
                            .renew_upload(pb::RenewUploadRequest {
                                upload_id: id.clone(),
                            })
                            .await;
                    }
                })
                .abort_handle(),
            )
        });

        let staged = match source {
            Source::File(f, _) => Ok((Arc::new(f), None)),
            Source::Stream(input) => {
                let (cs, dir) = (plan.chunk_size, std::env::temp_dir());
                Spool::start(input, path, &dir, cs, send::spool_slots(cs))
                    .map(|s| (s.file(), Some(s)))
            }
        };
        let result = match staged {
            Err(e) => Err(e),
            Ok((file, stream)) => {
                let up = send::Upload {
                    plan: &plan,
                    name: &name,
                    size,
                    file,
                    stream: stream.as_ref(),
                    progress: &progress,
                };
                // With the size a stream's commit fixes (a started upload's is known: 0).
                self.send_chunks(&up).await.and_then(|sent| match &stream {
                    None => Ok((sent, 0)),
                    Some(s) => s.len().map(|len| (sent, len)).ok_or_else(|| {
                        ClientError::Integrity("the input's end was not seen".into())
                    }),
                })
            }
        };
        let ((chunks, digest, retried, landed_on), commit_size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = self
                    .master()
                    .abort_upload(pb::AbortUploadRequest {
                        upload_id: plan.upload_id.clone(),
                    })
                    .await;
                tracing::warn!(name = %name, error = %e, "upload failed and was aborted");
                return Err(e);
            }
        };
        let replicas_achieved = chunks
            .iter()
            .map(|c| c.workers.len() as u32)
            .min()
            .unwrap_or(plan.replicas_effective);
        // A one-chunk small file: where it went, for a read beside its lookup.
        let location = match (chunks.as_slice(), &landed_on) {
            ([c], Some(p)) if !streamed && size <= SMALL_CHUNK_MAX => {
                self.written_location(p, c.length, c.crc32c, &c.workers)
            }
            _ => None,
        };
        let req = pb::CommitUploadRequest {
            upload_id: plan.upload_id.clone(),
            chunks,
            sha256: String::new(),
            name: String::new(),
            size: commit_size,
            blake3: digest,
        };
        let commit = self
            .commit_resolving(&name, &plan, req, &progress, durable)
            .await?;
        let report = committed(&name, commit, replicas_achieved, retried, started)?;
        if let Some(l) = location {
            self.locations.put(&name, l);
        }
        Ok(report)
    }

    /// Commits an upload, a durable one waiting through a master restart
    /// (`Client::patiently`), any other tried once more if its connection broke
    /// (`Client::once_more`). A commit that went unanswered may have landed: if a retry
    /// then finds the upload gone, the file's version says whether it was this commit
    /// that landed. Before, a small file whose commit answer was lost was reported failed
    /// although it was there.
    async fn commit_resolving(
        &self,
        name: &str,
        plan: &pb::StartUploadResponse,
        req: pb::CommitUploadRequest,
        progress: &Progress,
        durable: bool,
    ) -> Result<pb::CommitUploadResponse, ClientError> {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let commit = || {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.batches.commits.call(req.clone())
        };
        let answer = if durable {
            self.patiently("commit_upload", progress, commit).await
        } else {
            self.once_more("commit_upload", commit).await
        };
        match answer {
            Err(s) if s.code() == tonic::Code::NotFound && attempts.into_inner() > 1 => {
                match self.stat(name).await {
                    Ok(file) if file.version == plan.version => {
                        tracing::info!(name = %name, upload = %plan.upload_id, "the commit landed before the master's answer was lost");
                        Ok(pb::CommitUploadResponse {
                            file: Some(file),
                            replaced: false,
                            in_doubt_ms: 0,
                        })
                    }
                    _ => Err(self.err(s)),
                }
            }
            other => other.map_err(|s| self.err(s)),
        }
    }

    /// Aborts a reserved upload that did not land, prepared or not. Best effort: if the
    /// master cannot be told, the reservation expires and is aborted there, and a prepared
    /// one is settled by asking its workers (so it may stay, if some of them hold it: the
    /// outcome of an upload whose error said the master was unreachable is unknown).
    async fn give_up_reservation(&self, upload_id: String) {
        let _ = self
            .master()
            .abort_upload(pb::AbortUploadRequest { upload_id })
            .await;
    }

    /// Uploads a small file through a reserved upload: one write to each of its workers and,
    /// at the same time, its commit as a prepare (the master's `in_doubt` module), so the
    /// master's fsync runs beside the workers'. Against a master without prepares, or for a
    /// name that exists, the commit goes after the writes. Anything that goes wrong short of
    /// reading the local file is `Retry`: the caller then aborts the reservation (so a chunk
    /// written here is deleted) and uploads the file the usual way, with its retries on
    /// fresh placements.
    async fn upload_reserved(
        &self,
        slot: reserve::Slot,
        name: &str,
        size: u64,
        file: &std::fs::File,
        progress: &Arc<Progress>,
        started: std::time::Instant,
    ) -> Result<UploadReport, Reserved> {
        let (plan, replicas) = (slot.plan, slot.replicas);
        let id = plan.upload_id.clone();
        let placement = plan.chunks.first().ok_or_else(|| {
            Reserved::Retry("the reservation holds no placement".into(), id.clone())
        })?;
        let header = ChunkHeader {
            format_version: chunk::FORMAT_VERSION,
            chunk_id: placement.chunk_id.clone(),
            // Fixed by the master at commit (a new version of a name keeps its id).
            file_id: 0,
            file_name: name.to_string(),
            chunk_index: 0,
            file_version: plan.version,
            length: size,
            crc32c: 0,
            created_unix_ms: now_unix_ms(),
            file_size: size,
            chunk_size: plan.chunk_size,
        };
        let (data, crc, hash) =
            read_small(file, 0, size, FileHasher::new()).map_err(|e| attempt_failed(e, &id))?;
        let req = pb::CommitUploadRequest {
            upload_id: plan.upload_id.clone(),
            chunks: vec![CommittedChunk {
                index: 0,
                chunk_id: placement.chunk_id.clone(),
                length: size,
                crc32c: crc,
                workers: placement.workers.clone(),
            }],
            sha256: String::new(),
            name: name.to_string(),
            size,
            blake3: hash.finalize_hex(),
        };
        let writes = self.write_small(placement, header, data, crc, progress);
        let prepared = if self.confirmations.supported() {
            let sent = std::time::Instant::now();
            let (written, prepared) = tokio::join!(writes, self.batches.prepares.call(req.clone()));
            let took = sent.elapsed();
            match (written, prepared) {
                (Ok(_), Ok(p)) => Some((p, took)),
                // In doubt on the master if the prepare went through: the caller's abort of
                // the reservation (before it starts afresh) drops it.
                (Err(e), _) => return Err(attempt_failed(e, &id)),
                (Ok(_), Err(s)) => match s.code() {
                    // A name that exists, or a master without prepares: commit as before.
                    tonic::Code::AlreadyExists => None,
                    tonic::Code::Unimplemented => {
                        self.confirmations.set_unsupported();
                        None
                    }
                    _ => return Err(self.reserved_refused(s, replicas, &id)),
                },
            }
        } else {
            writes.await.map_err(|e| attempt_failed(e, &id))?;
            None
        };
        if progress.is_cancelled() {
            return Err(Reserved::Failed(ClientError::Cancelled, id));
        }
        let replicas_achieved = placement.workers.len() as u32;
        let commit = match prepared {
            // Every write was done well inside the time the master leaves it in doubt: the
            // workers hold the chunk durably before the master would ask them, so the write
            // is acknowledged now and confirmed behind it.
            Some((p, took)) if took < Duration::from_millis(p.in_doubt_ms / 2) => {
                self.reservations.record_prepared();
                // Rides on the next prepare (see `confirm`).
                self.confirmations.push(req.upload_id);
                p
            }
            // Late: the master may have asked the workers already and dropped it, so the
            // write counts only once confirmed. Or committed only now, after the writes.
            _ => self
                .batches
                .commits
                .call(req)
                .await
                .map_err(|s| self.reserved_refused(s, replicas, &id))?,
        };
        let report = committed(name, commit, replicas_achieved, 0, started)
            .map_err(|e| Reserved::Failed(e, id))?;
        if let Some(l) = self.written_location(placement, size, crc, &placement.workers) {
            self.locations.put(name, l);
        }
        Ok(report)
    }

    /// Where a small chunk just written to `workers` through `placement` can be read back
    /// beside a lookup, with the placement's read capability. None when the placement has
    /// none on a cluster that needs one (an older master).
    fn written_location(
        &self,
        placement: &ChunkPlacement,
        length: u64,
        crc: u32,
        workers: &[String],
    ) -> Option<Location> {
        if !placement.token.is_empty() && placement.read_token.is_empty() {
            return None;
        }
        let w = self.first_reader(workers)?;
        Location::new(&placement.chunk_id, length, crc, &placement.read_token, w)
    }

    /// Waits for the confirmations of small files already acknowledged (see
    /// [`Client::upload`]): not needed for their safety or visibility, but a process about to
    /// exit leaves no name for the master to settle alone.
    pub async fn settle(&self) {
        self.confirmations.idle().await
    }

    /// The retry of a reserved upload that the master refused.
    fn reserved_refused(&self, s: tonic::Status, replicas: u32, id: &str) -> Reserved {
        // The master no longer knows it: it restarted (it keeps reservations in memory
        // only), so the others in the pool are gone too.
        if s.code() == tonic::Code::NotFound {
            self.reservations.forget(replicas);
        }
        Reserved::Retry(s.message().to_string(), id.to_string())
    }

    /// Writes a small chunk read by [`read_small`] to every worker of its placement.
    pub(super) async fn write_small(
        &self,
        placement: &ChunkPlacement,
        header: ChunkHeader,
        data: bytes::Bytes,
        crc: u32,
        progress: &Arc<Progress>,
    ) -> Result<Vec<String>, AttemptError> {
        let len = header.length;
        let calls = placement.workers.iter().map(|worker| {
            let chunk = pb::SmallChunk {
                header: Some(header.clone()),
                token: placement.token.clone(),
                data: data.clone(),
                crc32c: crc,
            };
            async move {
                let failed = |message: String| AttemptError {
                    blame: Some(worker.clone()),
                    message,
                    local: None,
                };
                let writes = self
                    .small_writes(worker)
                    .map_err(|e| failed(e.to_string()))?;
                match writes.call(chunk).await {
                    Err(s) => Err(failed(s.message().to_string())),
                    Ok(()) => Ok(vec![worker.clone()]),
                }
            }
        });
        let mut stored_on = Vec::with_capacity(placement.workers.len());
        for r in futures::future::join_all(calls).await {
            stored_on.extend(r?);
        }
        let stored_on = all_stored(stored_on, placement)?;
        progress.done.fetch_add(len, Ordering::Relaxed);
        Ok(stored_on)
    }
}

/// Reads a small chunk of `len` bytes at `offset`, with its CRC32C, adding it to `hash`.
pub(super) fn read_small(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    mut hash: FileHasher,
) -> Result<(bytes::Bytes, u32, FileHasher), AttemptError> {
    // At most SMALL_CHUNK_MAX bytes: read on this thread, as the file was opened; a hand-off
    // to the blocking pool would cost more than the read.
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map(|()| {
            let crc = chunk::crc32c_append(0, &buf);
            hash.update(&buf);
            (bytes::Bytes::from(buf), crc, hash)
        })
        .map_err(|e| AttemptError {
            blame: None,
            message: e.to_string(),
            local: Some(ClientError::InvalidInput(format!(
                "reading the local file failed at offset {offset} (did it change during the upload?): {e}"
            ))),
        })
}

/// A failed attempt of a reserved upload as the caller handles it.
fn attempt_failed(e: AttemptError, id: &str) -> Reserved {
    match e.local {
        Some(local) => Reserved::Failed(local, id.to_string()),
        None => Reserved::Retry(e.message, id.to_string()),
    }
}

/// Why an upload through a reservation (the upload id) did not land.
enum Reserved {
    /// Reading the local file failed, or the upload was cancelled: the upload fails.
    Failed(ClientError, String),
    /// Anything else: upload the file the usual way.
    Retry(String, String),
}

/// The report of a committed upload.
fn committed(
    name: &str,
    commit: pb::CommitUploadResponse,
    replicas_achieved: u32,
    retried: u32,
    started: std::time::Instant,
) -> Result<UploadReport, ClientError> {
    let file = commit
        .file
        .ok_or_else(|| ClientError::Integrity("master committed without a file".into()))?;
    tracing::info!(name = %name, size = file.size, chunks = file.chunk_count, replicas = replicas_achieved, ms = started.elapsed().as_millis() as u64, "upload committed");
    Ok(UploadReport {
        file,
        replaced: commit.replaced,
        replicas_achieved,
        attempts_retried: retried,
        elapsed: started.elapsed(),
    })
}

/// The workers that stored a chunk, if every one of its placement did.
pub(super) fn all_stored(
    stored_on: Vec<String>,
    placement: &ChunkPlacement,
) -> Result<Vec<String>, AttemptError> {
    if stored_on.len() != placement.workers.len() {
        return Err(AttemptError {
            blame: None,
            message: format!(
                "stored {} of {} replicas",
                stored_on.len(),
                placement.workers.len()
            ),
            local: None,
        });
    }
    Ok(stored_on)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_that_ignores_an_unknown_size_is_named_before_any_chunk_is_sent() {
        let old = pb::StartUploadResponse {
            upload_id: "u".into(),
            chunk_size: 8 << 20,
            ..Default::default()
        };
        let e = streamed_plan_honoured(true, &old, "127.0.0.1:7600").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let said = e.to_string();
        assert!(said.contains("127.0.0.1:7600"), "{said}");
        assert!(
            said.contains("does not take uploads of unknown size"),
            "{said}"
        );
        // A file of known size needs nothing from the master beyond what every version does.
        assert!(streamed_plan_honoured(false, &old, "m").is_ok());
        let honoured = pb::StartUploadResponse {
            size_unknown: true,
            ..old
        };
        assert!(streamed_plan_honoured(true, &honoured, "m").is_ok());
    }
}
