//! Namespace operations: uploads (start, allocate, renew, commit, abort), lookups and deletes.
//!
//! Every mutation is one store transaction followed by the matching in-memory update; both
//! happen under `ns_lock` so memory follows the store's order. The fsync comes after the lock
//! is released and is shared by concurrent mutations (group commit); an answer that
//! acknowledges a change (commit, delete) waits for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::retry_cache::Claim;
use super::store::{
    Allocation, ChunkRef, CommitSeq, FileRecord, GarbageRecord, MetaStoreExt, UploadRecord,
    WriteTxn,
};
use super::{Inner, MAX_REPLICAS, Master, MasterError, OpenUpload};
use crate::chunk::{ChunkId, random_u128};
use crate::config::human_bytes;
use crate::digest::{EMPTY_BLAKE3, is_hex_digest};
use crate::events::Level;
use crate::rpc::now_unix_ms;
use crate::rpc::pb::{self, ChunkInfo, ChunkPlacement, FileInfo, ReplicaInfo};
use crate::worker::volume::SMALL_CHUNK_MAX;

/// The answers of [`Master::delete_files`], which calls itself for repeats that waited.
type DeleteAnswers<'a> =
    std::pin::Pin<Box<dyn Future<Output = Vec<Result<FileInfo, MasterError>>> + Send + 'a>>;
/// A delete to carry out: where its answer goes, the name, and its claim in the retry cache.
type ClaimedDelete = (
    usize,
    String,
    Option<(String, tokio::sync::watch::Sender<bool>)>,
);

/// Garbage entries written by a transaction, to mirror in memory.
type Garbage = Vec<(String, GarbageRecord)>;

/// The answers of one transaction of a batch of commits, by position in the batch.
type RoundAnswers = Vec<(usize, Result<pb::CommitUploadResponse, MasterError>)>;

/// What one commit wrote, to mirror in memory once its transaction is applied.
struct Installed {
    file: FileRecord,
    old: Option<FileRecord>,
    garbage: Garbage,
    /// Every chunk id allocated to the upload (committed or not).
    allocs: Vec<String>,
}

/// Most uploads one client may hold reserved (`ReserveUploads`), besides its open ones.
pub const MAX_RESERVED_PER_CLIENT: usize = 1024;
/// Placements returned with `StartUpload`; later chunks are allocated one by one.
const FIRST_PLACEMENTS: u64 = 64;
/// Largest listing page (and batch of names).
const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// Length of chunk `index` of a file of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u64, index: u64) -> u64 {
    size.saturating_sub(index * chunk_size).min(chunk_size)
}

/// Checks a commit's whole-file digests: at least one, each 64 lowercase hex digits.
fn validate_digests(req: &pb::CommitUploadRequest) -> Result<(), MasterError> {
    let bad = |alg: &str| {
        Err(MasterError::InvalidArgument(format!(
            "{alg} must be 64 lowercase hex digits"
        )))
    };
    if req.blake3.is_empty() && req.sha256.is_empty() {
        return Err(MasterError::InvalidArgument(
            "a commit needs the file's blake3 (or sha256) digest".into(),
        ));
    }
    if !req.blake3.is_empty() && !is_hex_digest(&req.blake3) {
        return bad("blake3");
    }
    if !req.sha256.is_empty() && !is_hex_digest(&req.sha256) {
        return bad("sha256");
    }
    Ok(())
}

/// Adds `workers` to the garbage entry of `chunk_id` (creating it) inside `txn`. A new entry's
/// grace period starts at `since_unix_ms`; an existing one keeps its own.
pub(crate) fn add_garbage(
    txn: &mut dyn WriteTxn,
    chunk_id: &str,
    workers: &[String],
    reason: &str,
    since_unix_ms: i64,
) -> Result<GarbageRecord, MasterError> {
    let mut rec = txn.get_garbage(chunk_id)?.unwrap_or_else(|| GarbageRecord {
        workers: Vec::new(),
        reason: reason.to_string(),
        since_unix_ms,
    });
    for w in workers {
        if !rec.workers.contains(w) {
            rec.workers.push(w.clone());
        }
    }
    txn.put_garbage(chunk_id, &rec)?;
    Ok(rec)
}

impl Inner {
    /// Worker addresses that may hold `chunk` (replicas and corrupt copies).
    fn holders(&self, chunk: &str) -> Vec<String> {
        let Ok(id) = chunk.parse::<ChunkId>() else {
            return Vec::new();
        };
        match self.chunks.get(&id) {
            Some(e) => e
                .replicas
                .iter()
                .chain(e.corrupt.iter())
                .map(|&w| self.registry.address(w).to_string())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Whether `f` is in doubt now: its record says so and no confirmation came since (one
    /// that did is only in memory until written, see `Master::confirm`).
    pub(crate) fn is_in_doubt(&self, f: &FileRecord) -> bool {
        !f.pending_upload.is_empty() && self.in_doubt.contains_key(&f.pending_upload)
    }

    pub(crate) fn forget_file(&mut self, f: &FileRecord) {
        if !f.pending_upload.is_empty() && self.in_doubt.remove(&f.pending_upload).is_some() {
            // Deleted or replaced while in doubt: settled, for the reads waiting on it.
            self.settled.send_modify(|n| *n += 1);
        }
        self.files = self.files.saturating_sub(1);
        self.logical_bytes = self.logical_bytes.saturating_sub(f.size);
        for c in &f.chunks {
            if let Ok(id) = c.chunk_id.parse::<ChunkId>() {
                self.chunks.remove(&id);
            }
        }
    }
}

impl Master {
    fn placement(
        &self,
        inner: &mut Inner,
        index: u64,
        chunk_id: ChunkId,
        bytes: u64,
        replicas: u32,
        exclude: &[String],
    ) -> Result<ChunkPlacement, MasterError> {
        let now = Instant::now();
        let chosen = inner
            .registry
            .place(replicas as usize, bytes, exclude, &self.policy, now);
        if chosen.is_empty() {
            if inner.registry.alive_count(&self.policy, now) == 0 {
                return Err(MasterError::NoLiveWorkers);
            }
            return Err(MasterError::NoSpace {
                needed: human_bytes(bytes),
            });
        }
        let chunk_id = chunk_id.to_string();
        let read_token = if bytes <= SMALL_CHUNK_MAX {
            self.chunk_token(&chunk_id, crate::security::ChunkOps::READ)
        } else {
            bytes::Bytes::new()
        };
        Ok(ChunkPlacement {
            index: index as u32,
            read_token,
            token: self.chunk_token(&chunk_id, crate::security::ChunkOps::WRITE),
            chunk_id,
            workers: chosen
                .iter()
                .map(|&w| inner.registry.address(w).to_string())
                .collect(),
        })
    }

    /// Opens an upload: validates the request, places the first chunks and records the upload
    /// durably so its chunks can be collected if it is never committed.
    pub async fn start_upload(
        self: &Arc<Self>,
        req: pb::StartUploadRequest,
        caller: &str,
    ) -> Result<pb::StartUploadResponse, MasterError> {
        self.check_not_rebuilding()?;
        crate::names::validate(&req.name)?;
        let cap = self.cfg.limits.max_open_uploads_per_client;
        let open = self
            .lock()
            .uploads
            .values()
            .filter(|u| u.record.owner == caller && !u.reserved)
            .count();
        if open >= cap {
            return Err(MasterError::LimitReached(format!(
                "{caller} already has {open} open uploads (the limit is {cap}); finish or abort some first"
            )));
        }
        let target = self.replicas_target(req.replicas)?;
        let cs = self.cfg.chunk_size;
        if req.size_unknown && req.size != 0 {
            return Err(MasterError::InvalidArgument(format!(
                "an upload of unknown size gives size 0, not {}",
                req.size
            )));
        }
        // One of unknown size has its chunks placed as they come.
        let n = chunk_count(req.size, cs);
        if n > u32::MAX as u64 {
            return Err(MasterError::InvalidArgument(format!(
                "file of {} bytes is too large for chunks of {}",
                req.size,
                human_bytes(cs)
            )));
        }
        let upload_id = format!("{:032x}", random_u128());
        let (placements, effective) = {
            let mut inner = self.lock();
            let now = Instant::now();
            let alive = inner.registry.alive_count(&self.policy, now) as u32;
            if (n > 0 || req.size_unknown) && alive == 0 {
                return Err(MasterError::NoLiveWorkers);
            }
            let mut placements = Vec::new();
            for i in 0..n.min(FIRST_PLACEMENTS) {
                let len = chunk_len(req.size, cs, i);
                placements.push(self.placement(
                    &mut inner,
                    i,
                    ChunkId::generate(),
                    len,
                    target,
                    &[],
                )?);
            }
            let effective = placements
                .iter()
                .map(|p| p.workers.len() as u32)
                .min()
                .unwrap_or(target.min(alive));
            (placements, effective)
        };
        let allocations: Vec<Allocation> = placements
            .iter()
            .map(|p| Allocation {
                index: p.index,
                chunk_id: p.chunk_id.clone(),
                workers: p.workers.clone(),
            })
            .collect();
        // A point lookup, as in `get_file`: a new version of a file keeps its id.
        let existing = self.store.read_with(|t| t.get_file(&req.name))?;
        // What a master restart would cost its client to send again (from a pipe, what
        // it could not): a small file is quick to send again, and this costs an fsync.
        let durable = req.size_unknown || req.size > SMALL_CHUNK_MAX;
        let record = {
            let mut inner = self.lock();
            let version = inner.next_version;
            inner.next_version += 1;
            let record = UploadRecord {
                upload_id: upload_id.clone(),
                name: req.name.clone(),
                file_id: existing.map_or(version, |f| f.file_id),
                version,
                size: req.size,
                chunk_size: cs,
                replicas: target,
                created_unix_ms: now_unix_ms(),
                allocations,
                size_unknown: req.size_unknown,
                owner: caller.to_string(),
                durable,
            };
            for a in &record.allocations {
                inner.upload_chunks.insert(a.chunk_id.clone());
            }
            inner.uploads.insert(
                upload_id.clone(),
                OpenUpload {
                    record: record.clone(),
                    last_seen: Instant::now(),
                    reserved: false,
                },
            );
            record
        };
        if durable && let Err(e) = self.store_upload(&record).await {
            let mut inner = self.lock();
            inner.uploads.remove(&upload_id);
            for a in &record.allocations {
                inner.upload_chunks.remove(&a.chunk_id);
            }
            return Err(e);
        }
        // The commit's event says it at info; most uploads are small and short.
        tracing::debug!(upload = %upload_id, name = %req.name, size = req.size, chunks = n, replicas = target, "upload started");
        Ok(pb::StartUploadResponse {
            upload_id,
            file_id: record.file_id,
            version: record.version,
            chunk_size: cs,
            replicas_target: target,
            replicas_effective: effective,
            chunks: placements,
            size_unknown: req.size_unknown,
        })
    }

    /// The replication factor an upload asking for `replicas` gets (0 = the default).
    fn replicas_target(&self, replicas: u32) -> Result<u32, MasterError> {
        let target = if replicas == 0 {
            self.cfg.default_replicas
        } else {
            replicas
        };
        if target > MAX_REPLICAS {
            return Err(MasterError::InvalidArgument(format!(
                "replicas must be between 1 and {MAX_REPLICAS}, not {target}"
            )));
        }
        Ok(target)
    }

    /// Opens up to `req.count` uploads ahead of time, each one placed chunk with no name yet,
    /// so that a client writing many small files needs one call to the master per file (the
    /// commit) instead of two. The caller's reserved uploads are capped on their own
    /// ([`MAX_RESERVED_PER_CLIENT`]) and never count against its open uploads: past the cap
    /// fewer (or none) come back, and the client starts its uploads as usual. Reserving
    /// touches no store (as starting does); one that is never committed expires after
    /// `Master::reservation_lease` and is aborted like an abandoned upload, so a chunk
    /// written to it is deleted.
    pub fn reserve_uploads(
        &self,
        req: pb::ReserveUploadsRequest,
        caller: &str,
    ) -> Result<pb::ReserveUploadsResponse, MasterError> {
        self.check_not_rebuilding()?;
        let target = self.replicas_target(req.replicas)?;
        let cs = self.cfg.chunk_size;
        let max_size = SMALL_CHUNK_MAX.min(cs);
        // The write capabilities must outlive the time the client may still use them.
        let mut lease = self.reservation_lease();
        if self.cfg.cluster_secret.is_some() {
            lease = lease.min(self.cfg.chunk_token_ttl);
        }
        let lease_ms = lease.as_millis() as u64;
        let mut inner = self.lock();
        let held = inner
            .uploads
            .values()
            .filter(|u| u.record.owner == caller && u.reserved)
            .count();
        let n = (req.count as usize).min(MAX_RESERVED_PER_CLIENT.saturating_sub(held));
        let mut uploads = Vec::with_capacity(n);
        for _ in 0..n {
            let placement =
                match self.placement(&mut inner, 0, ChunkId::generate(), max_size, target, &[]) {
                    Ok(p) => p,
                    Err(e) if uploads.is_empty() => return Err(e),
                    // Out of space part way: what was placed is still good.
                    Err(_) => break,
                };
            let version = inner.next_version;
            inner.next_version += 1;
            let upload_id = format!("{:032x}", random_u128());
            inner.upload_chunks.insert(placement.chunk_id.clone());
            let record = UploadRecord {
                upload_id: upload_id.clone(),
                name: String::new(),
                file_id: 0,
                version,
                size: 0,
                chunk_size: cs,
                replicas: target,
                created_unix_ms: now_unix_ms(),
                allocations: vec![Allocation {
                    index: 0,
                    chunk_id: placement.chunk_id.clone(),
                    workers: placement.workers.clone(),
                }],
                // Bound by the commit, within `max_size`.
                size_unknown: false,
                owner: caller.to_string(),
                // Sent again by its client at once if the master restarts (see above).
                durable: false,
            };
            inner.uploads.insert(
                upload_id.clone(),
                OpenUpload {
                    record,
                    last_seen: Instant::now(),
                    reserved: true,
                },
            );
            uploads.push(pb::StartUploadResponse {
                upload_id,
                file_id: 0,
                version,
                chunk_size: cs,
                replicas_target: target,
                replicas_effective: placement.workers.len() as u32,
                chunks: vec![placement],
                size_unknown: false,
            });
        }
        Ok(pb::ReserveUploadsResponse {
            uploads,
            lease_ms,
            max_size,
        })
    }

    /// Writes a durable upload's record (with its first allocations) before its start is
    /// answered, with the version bound that keeps its version unused after a restart.
    async fn store_upload(self: &Arc<Self>, record: &UploadRecord) -> Result<(), MasterError> {
        let record = record.clone();
        self.mutate_durably(move |m| {
            m.store.write_deferred_with(|t| -> Result<(), MasterError> {
                t.put_upload(&record)?;
                t.ensure_file_id_above(record.version)?;
                Ok(())
            })
        })
        .await
    }

    /// A new chunk id and pipeline for chunk `index` of an open upload, avoiding `exclude`.
    /// Durable before it is answered if the upload is (see `UploadRecord::durable`): a
    /// commit after a restart names only chunks the master knows it handed out.
    pub async fn allocate_chunk(
        self: &Arc<Self>,
        req: pb::AllocateChunkRequest,
    ) -> Result<pb::AllocateChunkResponse, MasterError> {
        let (placement, durable) = self.place_chunk(&req)?;
        if durable {
            let (id, a) = (
                req.upload_id.clone(),
                Allocation {
                    index: placement.index,
                    chunk_id: placement.chunk_id.clone(),
                    workers: placement.workers.clone(),
                },
            );
            self.mutate_durably(move |m| {
                m.store.write_deferred_with(|t| -> Result<(), MasterError> {
                    // Not for an upload aborted (or committed) meanwhile: its record is gone,
                    // and this one would outlive it.
                    if t.get_upload(&id)?.is_some() {
                        t.put_upload_allocation(&id, &a)?;
                    }
                    Ok(())
                })
            })
            .await?;
        }
        Ok(pb::AllocateChunkResponse {
            chunk: Some(placement),
        })
    }

    /// The in-memory part of `allocate_chunk`: the placement, added to the upload's
    /// allocations, and whether the upload is durable.
    fn place_chunk(
        &self,
        req: &pb::AllocateChunkRequest,
    ) -> Result<(pb::ChunkPlacement, bool), MasterError> {
        let mut inner = self.lock();
        let (size, chunk_size, replicas, size_unknown, durable) = inner
            .uploads
            .get_mut(&req.upload_id)
            .map(|u| {
                u.last_seen = Instant::now();
                let r = &u.record;
                (r.size, r.chunk_size, r.replicas, r.size_unknown, r.durable)
            })
            .ok_or_else(|| MasterError::UploadNotFound(req.upload_id.clone()))?;
        // A chunk of an upload of unknown size may be its last, and shorter, but space is
        // found for a whole one.
        let len = if size_unknown {
            chunk_size
        } else {
            let n = chunk_count(size, chunk_size);
            if req.index as u64 >= n {
                return Err(MasterError::InvalidArgument(format!(
                    "chunk index {} is out of range: the upload has {n} chunks",
                    req.index
                )));
            }
            chunk_len(size, chunk_size, req.index as u64)
        };
        let placement = self.placement(
            &mut inner,
            req.index as u64,
            ChunkId::generate(),
            len,
            replicas,
            &req.exclude,
        )?;
        inner.upload_chunks.insert(placement.chunk_id.clone());
        if let Some(u) = inner.uploads.get_mut(&req.upload_id) {
            u.record.allocations.push(Allocation {
                index: placement.index,
                chunk_id: placement.chunk_id.clone(),
                workers: placement.workers.clone(),
            });
        }
        Ok((placement, durable))
    }

    /// Keeps an open upload's lease alive.
    pub fn renew_upload(&self, upload_id: &str) -> Result<(), MasterError> {
        let mut inner = self.lock();
        match inner.uploads.get_mut(upload_id) {
            Some(u) => {
                u.last_seen = Instant::now();
                Ok(())
            }
            None => Err(MasterError::UploadNotFound(upload_id.to_string())),
        }
    }

    /// Makes an upload visible: checks that every chunk was written as allocated, then in one
    /// transaction installs the file, drops the upload, and marks as garbage the chunks of the
    /// version it replaces and of failed attempts.
    pub async fn commit_upload(
        self: &Arc<Self>,
        req: pb::CommitUploadRequest,
    ) -> Result<pb::CommitUploadResponse, MasterError> {
        self.commit_uploads(vec![req])
            .await
            .pop()
            .unwrap_or_else(|| Err(MasterError::Internal("a commit went unanswered".into())))
    }

    /// Commits many uploads, each answered on its own (in order): one that fails its checks
    /// is refused alone while the others commit. Uploads of distinct names share one
    /// transaction and one fsync; a name listed again goes to a later transaction, so that it
    /// replaces the version committed before it exactly as two separate calls would.
    ///
    /// A commit of an upload that [`Master::prepare_uploads`] left in doubt confirms it.
    pub async fn commit_uploads(
        self: &Arc<Self>,
        reqs: Vec<pb::CommitUploadRequest>,
    ) -> Vec<Result<pb::CommitUploadResponse, MasterError>> {
        self.commit_many(reqs, false).await
    }

    /// [`Master::commit_uploads`], or with `prepare` [`Master::prepare_uploads`].
    pub(crate) async fn commit_many(
        self: &Arc<Self>,
        reqs: Vec<pb::CommitUploadRequest>,
        prepare: bool,
    ) -> Vec<Result<pb::CommitUploadResponse, MasterError>> {
        let mut confirms = Vec::new();
        let mut answers: Vec<Option<Result<pb::CommitUploadResponse, MasterError>>> =
            reqs.iter().map(|_| None).collect();
        // Rounds of distinct names, in the callers' order.
        let mut rounds: Vec<Vec<(usize, pb::CommitUploadRequest)>> = Vec::new();
        let mut round_names: Vec<std::collections::HashSet<String>> = Vec::new();
        for (i, req) in reqs.into_iter().enumerate() {
            if let Err(e) = validate_digests(&req) {
                answers[i] = Some(Err(e));
                continue;
            }
            let bound = {
                let inner = self.lock();
                match inner.uploads.get(&req.upload_id) {
                    Some(u) if prepare && !u.reserved => Err(MasterError::InvalidArgument(
                        "only a reserved upload can be committed beside its writes".into(),
                    )),
                    Some(u) => bind(u, &req),
                    None if !prepare && inner.in_doubt.contains_key(&req.upload_id) => {
                        confirms.push((i, req));
                        continue;
                    }
                    None => Err(MasterError::UploadNotFound(req.upload_id.clone())),
                }
            };
            let name = match bound {
                Ok(upload) => upload.name,
                Err(e) => {
                    answers[i] = Some(Err(e));
                    continue;
                }
            };
            // The first round after the last one that already holds this name.
            let r = round_names
                .iter()
                .rposition(|names| names.contains(&name))
                .map_or(0, |r| r + 1);
            if r == rounds.len() {
                rounds.push(Vec::new());
                round_names.push(Default::default());
            }
            round_names[r].insert(name);
            rounds[r].push((i, req));
        }
        for round in rounds {
            let members: Vec<usize> = round.iter().map(|(i, _)| *i).collect();
            match self
                .mutate_durably(move |m| m.commit_round(round, prepare))
                .await
            {
                Ok(done) => {
                    for (i, answer) in done {
                        if let Ok(r) = &answer
                            && !prepare
                        {
                            self.record_commit(r);
                        }
                        answers[i] = Some(answer);
                    }
                }
                // Not applied, or not known to be durable: no commit of the round is
                // acknowledged.
                Err(e) => fail_all(&mut answers, members, e),
            }
        }
        if !confirms.is_empty() {
            for (i, answer) in self.confirm(confirms).await {
                answers[i] = Some(answer);
            }
        }
        all_answered(answers, "commit")
    }

    /// One transaction of [`Master::commit_uploads`] (uploads of distinct names) and its
    /// mirror in memory. A commit that fails its checks writes nothing and is answered with
    /// its error; a store error fails the whole transaction, and every commit in it.
    fn commit_round(
        &self,
        round: Vec<(usize, pb::CommitUploadRequest)>,
        prepare: bool,
    ) -> Result<(RoundAnswers, CommitSeq), MasterError> {
        // Under the namespace lock: no other commit or abort of these uploads runs meanwhile.
        let uploads: Vec<Result<UploadRecord, MasterError>> = {
            let inner = self.lock();
            round
                .iter()
                .map(|(_, req)| {
                    inner
                        .uploads
                        .get(&req.upload_id)
                        .map(|u| bind(u, req))
                        .unwrap_or_else(|| Err(MasterError::UploadNotFound(req.upload_id.clone())))
                })
                .collect()
        };
        let (outcomes, seq) = self.store.write_deferred_with(
            |t| -> Result<Vec<Result<Installed, MasterError>>, MasterError> {
                let mut outcomes = Vec::with_capacity(round.len());
                for ((_, req), upload) in round.iter().zip(uploads) {
                    match upload {
                        Ok(upload) => outcomes.push(self.install_commit(t, &upload, req, prepare)?),
                        Err(e) => outcomes.push(Err(e)),
                    }
                }
                Ok(outcomes)
            },
        )?;
        let mut inner = self.lock();
        let mut answers = Vec::with_capacity(round.len());
        for ((i, req), outcome) in round.into_iter().zip(outcomes) {
            let it = match outcome {
                Ok(it) => it,
                Err(e) => {
                    answers.push((i, Err(e)));
                    continue;
                }
            };
            inner.uploads.remove(&req.upload_id);
            for a in &it.allocs {
                inner.upload_chunks.remove(a);
            }
            if let Some(o) = &it.old {
                inner.forget_file(o);
            }
            for c in &req.chunks {
                if let Ok(id) = c.chunk_id.parse::<ChunkId>() {
                    let replicas = c.workers.iter().map(|w| inner.registry.intern(w)).collect();
                    inner
                        .chunks
                        .insert(id, it.file.replicas, c.length, replicas);
                    inner.orphans.remove(&c.chunk_id);
                }
            }
            inner.files += 1;
            inner.logical_bytes += it.file.size;
            inner.garbage.extend(it.garbage);
            let mut in_doubt_ms = 0;
            if prepare {
                let d = super::in_doubt::InDoubt::of(&it.file, Duration::ZERO);
                inner.in_doubt.insert(req.upload_id.clone(), d);
                in_doubt_ms = self.cfg.in_doubt_grace.as_millis() as u64;
            }
            let info = self.file_info(&inner, &it.file, false);
            answers.push((
                i,
                Ok(pb::CommitUploadResponse {
                    file: Some(info),
                    replaced: it.old.is_some(),
                    in_doubt_ms,
                }),
            ));
        }
        Ok((answers, seq))
    }

    /// The cluster event of a durable commit.
    pub(crate) fn record_commit(&self, r: &pb::CommitUploadResponse) {
        let Some(f) = &r.file else { return };
        self.events.record(
            Level::Info,
            format!(
                "{} {:?}: {}, {} chunk(s), {}/{} replicas",
                if r.replaced { "replaced" } else { "uploaded" },
                f.name,
                human_bytes(f.size),
                f.chunk_count,
                f.replicas_min_live,
                f.replicas_target
            ),
        );
    }

    /// Checks one commit inside the transaction `t` and, if it passes, writes it: the file,
    /// the id bound, and the garbage it leaves. `Ok(Err(..))` is a refused commit (nothing
    /// written); `Err(..)` is a store error that must abort the transaction.
    fn install_commit(
        &self,
        t: &mut dyn WriteTxn,
        upload: &UploadRecord,
        req: &pb::CommitUploadRequest,
        prepare: bool,
    ) -> Result<Result<Installed, MasterError>, MasterError> {
        let mut file = match validate_commit(upload, req) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let old = t.get_file(&file.name)?;
        if prepare {
            // Only a new name: a replaced version must stay readable until the new one is
            // settled, and that would need both kept. The client commits it after its writes.
            if old.is_some() {
                return Ok(Err(MasterError::AlreadyExists(file.name)));
            }
            file.pending_upload = upload.upload_id.clone();
            file.pending_workers = req.chunks.iter().flat_map(|c| c.workers.clone()).collect();
        }
        // A reserved upload learns its name only now: a new version keeps the file's id.
        if file.file_id == 0 {
            file.file_id = old.as_ref().map_or(upload.version, |o| o.file_id);
        }
        if let Some(o) = &old
            && o.version > upload.version
        {
            return Ok(Err(MasterError::Conflict(format!(
                "a newer upload of {:?} was committed first; this one is discarded",
                file.name
            ))));
        }
        t.put_file(&file)?;
        if upload.durable {
            t.remove_upload(&upload.upload_id)?;
        }
        // Versions are handed out from memory; the store keeps a bound above every
        // committed one, so none is reused after a restart.
        t.ensure_file_id_above(upload.version.max(file.file_id))?;
        let committed: std::collections::HashSet<&str> =
            file.chunks.iter().map(|c| c.chunk_id.as_str()).collect();
        let mut garbage = Vec::new();
        for a in &upload.allocations {
            if committed.contains(a.chunk_id.as_str()) {
                continue;
            }
            garbage.push((
                a.chunk_id.clone(),
                add_garbage(
                    t,
                    &a.chunk_id,
                    &a.workers,
                    "failed upload attempt",
                    now_unix_ms(),
                )?,
            ));
        }
        for c in old.iter().flat_map(|o| o.chunks.iter()) {
            let holders = self.lock().holders(&c.chunk_id);
            garbage.push((
                c.chunk_id.clone(),
                add_garbage(t, &c.chunk_id, &holders, "replaced file", now_unix_ms())?,
            ));
        }
        let allocs = upload
            .allocations
            .iter()
            .map(|a| a.chunk_id.clone())
            .collect();
        Ok(Ok(Installed {
            file,
            old,
            garbage,
            allocs,
        }))
    }

    /// Runs `apply` (one deferred store transaction and its in-memory mirror) in one blocking
    /// step under the namespace lock, so memory follows the store's order; then waits, outside
    /// the lock, for the fsync it shares with concurrent mutations. Every change a client is
    /// told about goes through here.
    async fn mutate_durably<T: Send + 'static>(
        self: &Arc<Self>,
        apply: impl FnOnce(&Master) -> Result<(T, CommitSeq), MasterError> + Send + 'static,
    ) -> Result<T, MasterError> {
        self.mutate(true, apply).await
    }

    /// [`Master::mutate_durably`], or without `durable` the same minus the wait for the
    /// fsync: the change is durable with the next one (for what is safe to lose in a crash).
    pub(crate) async fn mutate<T: Send + 'static>(
        self: &Arc<Self>,
        durable: bool,
        apply: impl FnOnce(&Master) -> Result<(T, CommitSeq), MasterError> + Send + 'static,
    ) -> Result<T, MasterError> {
        let guard = self.ns_lock.clone().lock_owned().await;
        // The lock is released as soon as the transaction is applied, before the fsync. If
        // no sync is running this thread runs it (one hand-off for both); otherwise the
        // mutation joins the next one on the store's sync thread, waiting without a thread.
        let (value, seq, led) = self
            .blocking(move |m| {
                let applied = apply(m);
                drop(guard);
                let (value, seq) = applied?;
                Ok((
                    value,
                    seq,
                    durable.then(|| m.store.sync_if_idle(seq)).flatten(),
                ))
            })
            .await?;
        if !durable {
            return Ok(value);
        }
        match led {
            Some(r) => r?,
            None => self.store.sync_async(seq).await?,
        }
        Ok(value)
    }

    /// Drops an open upload; every chunk allocated to it becomes garbage.
    pub async fn abort_upload(self: &Arc<Self>, upload_id: &str) -> Result<(), MasterError> {
        // Before the namespace lock, which settling takes.
        if self.lock().in_doubt.contains_key(upload_id) {
            return match self.abort_in_doubt(upload_id).await? {
                true => Ok(()),
                false => Err(MasterError::UploadNotFound(upload_id.to_string())),
            };
        }
        let _guard = self.ns_lock.lock().await;
        let upload = self
            .lock()
            .uploads
            .remove(upload_id)
            .ok_or_else(|| MasterError::UploadNotFound(upload_id.to_string()))?;
        let (upload, reserved) = (upload.record, upload.reserved);
        // Deferred: if the garbage records are lost in a crash, the chunks are orphans and
        // collected as such.
        let allocated: Vec<String> = upload
            .allocations
            .iter()
            .map(|a| a.chunk_id.clone())
            .collect();
        let written = self
            .blocking(move |m| {
                m.store
                    .write_deferred_with(|t| -> Result<(UploadRecord, Garbage), MasterError> {
                        if upload.durable {
                            // Lost in a crash, it is restored and expires with its lease.
                            t.remove_upload(&upload.upload_id)?;
                        }
                        let mut garbage = Vec::new();
                        for a in &upload.allocations {
                            garbage.push((
                                a.chunk_id.clone(),
                                add_garbage(
                                    t,
                                    &a.chunk_id,
                                    &a.workers,
                                    "aborted upload",
                                    now_unix_ms(),
                                )?,
                            ));
                        }
                        Ok((upload, garbage))
                    })
            })
            .await;
        // Either way the chunks stop being an upload's: garbage now, or orphans (collected
        // too) if the garbage records could not be written.
        let upload = {
            let mut inner = self.lock();
            for id in &allocated {
                inner.upload_chunks.remove(id);
            }
            let ((upload, garbage), _seq) = written?;
            inner.garbage.extend(garbage);
            upload
        };
        // A reservation was given up (by a client that sends the file again the usual way)
        // or not needed: no news for the console.
        if reserved {
            tracing::debug!(upload = %upload_id, "reserved upload aborted");
            return Ok(());
        }
        self.events.record(
            Level::Warn,
            format!(
                "upload of {:?} aborted; {} chunk(s) will be deleted",
                upload.name,
                upload.allocations.len()
            ),
        );
        Ok(())
    }

    /// The file `name` with its chunk → replica map.
    ///
    /// The one store call made on the async thread itself: a point lookup is a B-tree
    /// descent through the store's page cache (microseconds), cheaper than the two thread
    /// hand-offs of `spawn_blocking`, which cost a fifth of a small-file read's CPU. Scans
    /// and writes still go through `Master::blocking`.
    pub async fn get_file(self: &Arc<Self>, name: &str) -> Result<FileInfo, MasterError> {
        crate::names::validate(name)?;
        let mut file = self
            .store
            .read_with(|t| t.get_file(name))?
            .ok_or_else(|| MasterError::FileNotFound(name.to_string()))?;
        if self.lock().is_in_doubt(&file) {
            file = self
                .settled_file(name)
                .await?
                .ok_or_else(|| MasterError::FileNotFound(name.to_string()))?;
        }
        let inner = self.lock();
        Ok(self.file_info(&inner, &file, true))
    }

    /// One page of the listing, in bytewise name order.
    pub async fn list_files(
        self: &Arc<Self>,
        start_after: String,
        limit: u32,
    ) -> Result<pb::ListFilesResponse, MasterError> {
        let limit = match limit as usize {
            0 => DEFAULT_PAGE,
            l => l.min(MAX_PAGE),
        };
        let mut files = self
            .blocking(move |m| {
                m.store
                    .read_with(|t| t.list_files(&start_after, limit))
                    .map_err(Into::into)
            })
            .await?;
        let next = if files.len() == limit {
            files.last().map(|f| f.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        // A listing shows an in-doubt name once it is settled, as a lookup does.
        let pending: Vec<String> = {
            let inner = self.lock();
            files
                .iter()
                .filter(|f| inner.is_in_doubt(f))
                .map(|f| f.name.clone())
                .collect()
        };
        if !pending.is_empty() {
            let now = self.settled_files(pending.clone()).await?;
            let mut settled: std::collections::HashMap<String, Option<FileRecord>> =
                pending.into_iter().zip(now).collect();
            files = files
                .into_iter()
                .filter_map(|f| match settled.remove(&f.name) {
                    Some(now) => now,
                    None => Some(f),
                })
                .collect();
        }
        let inner = self.lock();
        Ok(pb::ListFilesResponse {
            files: files
                .iter()
                .map(|f| self.file_info(&inner, f, false))
                .collect(),
            next_start_after: next,
        })
    }

    /// Removes `name` from the namespace; its chunks become garbage. A `call_id` (empty:
    /// none) makes the call safe to repeat (see `retry_cache`).
    pub async fn delete_file(
        self: &Arc<Self>,
        name: &str,
        call_id: &str,
    ) -> Result<FileInfo, MasterError> {
        self.delete_files(vec![name.to_string()], vec![call_id.to_string()])
            .await
            .pop()
            .unwrap_or_else(|| Err(MasterError::Internal("a delete went unanswered".into())))
    }

    /// Deletes every existing file of `names` in one transaction (missing names are skipped);
    /// returns how many were deleted.
    pub async fn delete_many(self: &Arc<Self>, names: Vec<String>) -> Result<u64, MasterError> {
        validate_batch(&names)?;
        let deleted = self
            .delete_names(names)
            .await?
            .into_iter()
            .flatten()
            .count();
        if deleted > 0 {
            self.events
                .record(Level::Info, format!("deleted {deleted} file(s)"));
        }
        Ok(deleted as u64)
    }

    /// Deletes `names` in one transaction and one fsync, each answered as
    /// [`Master::delete_file`] would answer it alone, in order: the deletes of many callers
    /// at once cost about what one costs. An invalid or missing name fails alone; a store
    /// error fails them all, since none of them is then known to be durable.
    /// `call_ids` is empty or holds one id per name (see [`Master::delete_file`]). The
    /// deletes run in a task of their own, so that one whose caller is gone (its connection
    /// broke) still keeps its answer for the caller's repeat.
    pub fn delete_files(
        self: &Arc<Self>,
        names: Vec<String>,
        call_ids: Vec<String>,
    ) -> DeleteAnswers<'_> {
        Box::pin(async move {
            let mut answers: Vec<Option<Result<FileInfo, MasterError>>> =
                names.iter().map(|_| None).collect();
            let mut batch = Vec::with_capacity(names.len());
            let mut busy = Vec::new();
            let mut ids = call_ids.into_iter();
            for (i, name) in names.into_iter().enumerate() {
                let id = ids.next().unwrap_or_default();
                if let Err(e) = crate::names::validate(&name)
                    .map_err(MasterError::from)
                    .and_then(|()| super::retry_cache::check_call_id(&id))
                {
                    answers[i] = Some(Err(e));
                    continue;
                }
                if id.is_empty() {
                    batch.push((i, name, None));
                    continue;
                }
                match self.retries.claim(&id) {
                    Claim::Answered(f) => {
                        tracing::info!(name = %name, call = %id, "a repeated delete answered as before");
                        answers[i] = Some(Ok(f));
                    }
                    Claim::Busy(rx) => busy.push((i, name, id, rx)),
                    Claim::Mine(tx) => batch.push((i, name, Some((id, tx)))),
                }
            }
            let me = self.clone();
            let done = if batch.is_empty() {
                Ok(Vec::new())
            } else {
                tokio::spawn(async move { me.delete_claimed(batch).await })
                    .await
                    .map_err(|e| MasterError::Internal(format!("delete task failed: {e}")))
            };
            match done {
                Ok(done) => done.into_iter().for_each(|(i, a)| answers[i] = Some(a)),
                Err(e) => {
                    for a in answers.iter_mut().filter(|a| a.is_none()) {
                        *a = Some(Err(MasterError::Internal(e.to_string())));
                    }
                }
            }
            // Repeats of calls still running when they came: answered once those end.
            for (i, name, id, mut rx) in busy {
                let _ = rx.wait_for(|finished| *finished).await;
                answers[i] = self.delete_files(vec![name], vec![id]).await.pop();
            }
            all_answered(answers, "delete")
        })
    }

    /// The deletes of [`Master::delete_files`] that are to be carried out, each finished in
    /// the retry cache if it has a call id.
    async fn delete_claimed(
        self: &Arc<Self>,
        batch: Vec<ClaimedDelete>,
    ) -> Vec<(usize, Result<FileInfo, MasterError>)> {
        let names: Vec<String> = batch.iter().map(|(_, n, _)| n.clone()).collect();
        let mut deleted = self.delete_names(names).await.map(|d| d.into_iter());
        let mut out = Vec::with_capacity(batch.len());
        for (i, name, claim) in batch {
            let answer = match &mut deleted {
                Ok(d) => match d.next().flatten() {
                    Some((file, info)) => {
                        self.record_delete(&file);
                        Ok(info)
                    }
                    None => Err(MasterError::FileNotFound(name)),
                },
                Err(e) => Err(e.clone()),
            };
            if let Some((id, tx)) = claim {
                self.retries.finish(&id, tx, answer.as_ref().ok());
            }
            out.push((i, answer));
        }
        out
    }

    /// The cluster event of a durable delete.
    fn record_delete(&self, file: &FileRecord) {
        self.events.record(
            Level::Info,
            format!("deleted {:?} ({})", file.name, human_bytes(file.size)),
        );
    }

    /// Removes `names` from the namespace in one transaction; their chunks become garbage.
    /// One answer per name, in order: `None` where the name did not exist (a name listed
    /// twice is deleted by its first mention).
    async fn delete_names(
        self: &Arc<Self>,
        names: Vec<String>,
    ) -> Result<Vec<Option<(FileRecord, FileInfo)>>, MasterError> {
        self.check_not_rebuilding()?;
        self.mutate_durably(move |m| {
            let ((files, garbage), seq) = m.store.write_deferred_with(
                |t| -> Result<(Vec<Option<FileRecord>>, Garbage), MasterError> {
                    let mut files = Vec::with_capacity(names.len());
                    let mut garbage = Vec::new();
                    for n in &names {
                        let file = t.remove_file(n)?;
                        for c in file.iter().flat_map(|f| f.chunks.iter()) {
                            let h = m.lock().holders(&c.chunk_id);
                            garbage.push((
                                c.chunk_id.clone(),
                                add_garbage(t, &c.chunk_id, &h, "deleted file", now_unix_ms())?,
                            ));
                        }
                        files.push(file);
                    }
                    Ok((files, garbage))
                },
            )?;
            let mut inner = m.lock();
            let mut deleted = Vec::with_capacity(files.len());
            for file in files {
                deleted.push(file.map(|file| {
                    let info = m.file_info(&inner, &file, false);
                    inner.forget_file(&file);
                    (file, info)
                }));
            }
            inner.garbage.extend(garbage);
            Ok((deleted, seq))
        })
        .await
    }

    /// Creates empty files in one transaction (all or none): the metadata fast path. An empty
    /// file has no chunks, so only the store changes; memory grows by nothing per file.
    pub async fn create_empty(self: &Arc<Self>, names: Vec<String>) -> Result<u64, MasterError> {
        self.check_not_rebuilding()?;
        validate_batch(&names)?;
        self.mutate_durably(move |m| {
            let ((), seq) = m
                .store
                .write_deferred_with(|t| -> Result<(), MasterError> {
                    let now = now_unix_ms();
                    // Versions from memory (as for uploads), the bound persisted with them.
                    let first = {
                        let mut inner = m.lock();
                        let first = inner.next_version;
                        inner.next_version += names.len() as u64;
                        first
                    };
                    t.ensure_file_id_above(first + names.len() as u64)?;
                    for (id, name) in (first..).zip(&names) {
                        if t.get_file(name)?.is_some() {
                            return Err(MasterError::AlreadyExists(name.clone()));
                        }
                        t.put_file(&FileRecord {
                            name: name.clone(),
                            file_id: id,
                            version: id,
                            size: 0,
                            chunk_size: m.cfg.chunk_size,
                            replicas: m.cfg.default_replicas,
                            modified_unix_ms: now,
                            sha256: String::new(),
                            chunks: Vec::new(),
                            blake3: EMPTY_BLAKE3.to_string(),
                            pending_upload: String::new(),
                            pending_workers: Vec::new(),
                        })?;
                    }
                    Ok(())
                })?;
            m.lock().files += names.len() as u64;
            Ok((names.len() as u64, seq))
        })
        .await
    }

    /// Builds the wire view of a file; replicas are ordered alive first.
    pub(crate) fn file_info(&self, inner: &Inner, f: &FileRecord, with_chunks: bool) -> FileInfo {
        let now = Instant::now();
        let mut min_live = u32::MAX;
        let mut chunks = Vec::new();
        for (i, c) in f.chunks.iter().enumerate() {
            let entry = c
                .chunk_id
                .parse::<ChunkId>()
                .ok()
                .and_then(|id| inner.chunks.get(&id));
            let mut reps: Vec<(super::registry::Health, String)> = entry
                .map(|e| {
                    e.replicas
                        .iter()
                        .map(|&w| {
                            (
                                inner.registry.health(w, &self.policy, now),
                                inner.registry.address(w).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            reps.sort();
            let live = reps
                .iter()
                .filter(|(h, _)| *h == super::registry::Health::Alive)
                .count() as u32;
            min_live = min_live.min(live);
            if with_chunks {
                chunks.push(ChunkInfo {
                    index: i as u32,
                    token: self.chunk_token(&c.chunk_id, crate::security::ChunkOps::READ),
                    chunk_id: c.chunk_id.clone(),
                    length: c.length,
                    crc32c: c.crc32c,
                    replicas: reps
                        .into_iter()
                        .map(|(h, w)| ReplicaInfo {
                            worker: w,
                            state: h.as_str().to_string(),
                        })
                        .collect(),
                });
            }
        }
        FileInfo {
            name: f.name.clone(),
            file_id: f.file_id,
            version: f.version,
            size: f.size,
            chunk_size: f.chunk_size,
            replicas_target: f.replicas,
            replicas_min_live: if f.chunks.is_empty() {
                f.replicas
            } else {
                min_live
            },
            chunk_count: f.chunks.len() as u64,
            modified_unix_ms: f.modified_unix_ms,
            sha256: f.sha256.clone(),
            chunks,
            blake3: f.blake3.clone(),
        }
    }
}

/// Answers every item of `members` with the error `e`, which failed them all, each with the
/// same code and message (a rebuilding master is `Unavailable` for every one, not only the
/// first).
fn fail_all<T>(
    answers: &mut [Option<Result<T, MasterError>>],
    members: impl IntoIterator<Item = usize>,
    e: MasterError,
) {
    for i in members {
        answers[i] = Some(Err(e.clone()));
    }
}

/// The answers of a batch, each item's own; one left unanswered (a bug) is an internal error
/// rather than a panic.
fn all_answered<T>(
    answers: Vec<Option<Result<T, MasterError>>>,
    what: &str,
) -> Vec<Result<T, MasterError>> {
    answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| Err(MasterError::Internal(format!("a {what} went unanswered"))))
        })
        .collect()
}

/// Checks a batch call's names: at most a listing page of them, each a valid name.
fn validate_batch(names: &[String]) -> Result<(), MasterError> {
    if names.len() > MAX_PAGE {
        return Err(MasterError::InvalidArgument(format!(
            "at most {MAX_PAGE} names per call, not {}",
            names.len()
        )));
    }
    for n in names {
        crate::names::validate(n)?;
    }
    Ok(())
}

/// The upload a commit completes: a reserved one takes its name and size from the commit
/// (checked here, as `StartUpload` checks them), one opened with no size takes its size;
/// a started one must not be given others.
fn bind(upload: &OpenUpload, req: &pb::CommitUploadRequest) -> Result<UploadRecord, MasterError> {
    let mut record = upload.record.clone();
    if upload.reserved {
        crate::names::validate(&req.name)?;
        let max = SMALL_CHUNK_MAX.min(record.chunk_size);
        if req.size == 0 || req.size > max {
            return Err(MasterError::InvalidArgument(format!(
                "a reserved upload holds 1 to {max} bytes, not {}",
                req.size
            )));
        }
        record.name = req.name.clone();
        record.size = req.size;
        return Ok(record);
    }
    if !req.name.is_empty() && req.name != record.name {
        return Err(MasterError::InvalidArgument(format!(
            "upload {} is of {:?}, not {:?}",
            record.upload_id, record.name, req.name
        )));
    }
    if record.size_unknown {
        // Any size the chunks add up to, 0 included; `validate_commit` checks that they do.
        record.size = req.size;
        record.size_unknown = false;
    } else if req.size != 0 && req.size != record.size {
        return Err(MasterError::InvalidArgument(format!(
            "upload {} is of {} bytes, not {}",
            record.upload_id, record.size, req.size
        )));
    }
    Ok(record)
}

/// Checks a commit against its upload and builds the file record it would install.
fn validate_commit(
    upload: &UploadRecord,
    req: &pb::CommitUploadRequest,
) -> Result<FileRecord, MasterError> {
    let n = chunk_count(upload.size, upload.chunk_size);
    if req.chunks.len() as u64 != n {
        return Err(MasterError::InvalidArgument(format!(
            "commit lists {} chunks; a file of {} bytes has {n}",
            req.chunks.len(),
            upload.size
        )));
    }
    let mut chunks: Vec<&pb::CommittedChunk> = req.chunks.iter().collect();
    chunks.sort_by_key(|c| c.index);
    let mut refs = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        if c.index as usize != i {
            return Err(MasterError::InvalidArgument(format!(
                "commit is missing chunk {i} (or lists a chunk twice)"
            )));
        }
        let alloc = upload
            .allocations
            .iter()
            .find(|a| a.chunk_id == c.chunk_id && a.index == c.index)
            .ok_or_else(|| {
                MasterError::InvalidArgument(format!(
                    "chunk {} was not allocated to this upload for index {i}",
                    c.chunk_id
                ))
            })?;
        let want = chunk_len(upload.size, upload.chunk_size, i as u64);
        if c.length != want {
            return Err(MasterError::InvalidArgument(format!(
                "chunk {i} is {} bytes; expected {want}",
                c.length
            )));
        }
        if c.workers.is_empty() || c.workers.iter().any(|w| !alloc.workers.contains(w)) {
            return Err(MasterError::InvalidArgument(format!(
                "chunk {i} lists workers outside its pipeline"
            )));
        }
        refs.push(ChunkRef {
            chunk_id: c.chunk_id.clone(),
            length: c.length,
            crc32c: c.crc32c,
        });
    }
    Ok(FileRecord {
        name: upload.name.clone(),
        file_id: upload.file_id,
        version: upload.version,
        size: upload.size,
        chunk_size: upload.chunk_size,
        replicas: upload.replicas,
        modified_unix_ms: now_unix_ms(),
        sha256: req.sha256.clone(),
        chunks: refs,
        blake3: req.blake3.clone(),
        pending_upload: String::new(),
        pending_workers: Vec::new(),
    })
}

/// Aborts uploads whose lease ran out (the client died or gave up without saying so).
pub(crate) async fn upload_expiry(master: Arc<Master>, mut stop: watch::Receiver<bool>) {
    let period = (master.reservation_lease() / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(30),
    );
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let mut expired = Vec::new();
        let mut reserved = 0;
        for (id, u) in master.lock().uploads.iter() {
            let lease = if u.reserved {
                master.reservation_lease()
            } else {
                master.cfg.upload_lease
            };
            if u.last_seen.elapsed() > lease {
                reserved += usize::from(u.reserved);
                expired.push((id.clone(), u.reserved));
            }
        }
        if reserved > 0 {
            // Most were simply not needed: the client that reserved them stopped writing.
            tracing::debug!(count = reserved, "reserved uploads expired");
        }
        for (id, reserved) in expired {
            if !reserved {
                tracing::warn!(upload = %id, "upload lease expired");
            }
            if let Err(e) = master.abort_upload(&id).await {
                tracing::warn!(upload = %id, error = %e, "could not expire upload");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_that_fails_a_batch_reaches_every_member_with_its_code() {
        let mut answers: Vec<Option<Result<(), MasterError>>> = vec![None, Some(Ok(())), None];
        fail_all(&mut answers, [0, 2], MasterError::Rebuilding);
        let codes: Vec<_> = all_answered(answers, "test")
            .into_iter()
            .map(|a| a.map_err(|e| tonic::Status::from(e).code()))
            .collect();
        let unavailable = Err(tonic::Code::Unavailable);
        assert_eq!(codes, [unavailable, Ok(()), unavailable]);
        let e = all_answered::<()>(vec![None], "delete")
            .remove(0)
            .unwrap_err();
        assert_eq!(e.to_string(), "internal error: a delete went unanswered");
    }

    #[test]
    fn chunk_arithmetic() {
        assert_eq!(chunk_count(0, 8), 0);
        assert_eq!(chunk_count(1, 8), 1);
        assert_eq!(chunk_count(8, 8), 1);
        assert_eq!(chunk_count(9, 8), 2);
        assert_eq!(chunk_len(9, 8, 0), 8);
        assert_eq!(chunk_len(9, 8, 1), 1);
        assert_eq!(chunk_len(16, 8, 1), 8);
    }
}
