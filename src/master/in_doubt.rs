//! Commits made beside their writes (`PrepareUploads`), and how each one is settled.
//!
//! A small file's create used to be two durable steps in a row: the chunk's write, fsynced
//! on every worker, then the commit, fsynced on the master. Each costs a round trip and an
//! fsync, so the master's disk flush waited for the workers' to end. Here a client sends
//! the commit of a reserved upload of a new name at the same time as its writes. The master
//! makes the file durable at once, but in doubt: it is not known yet that its chunk is.
//!
//! - Reads of an in-doubt name (lookups, listings) wait until it is settled, so a reader
//!   never sees a file whose bytes may not exist, nor misses one whose writer was told it
//!   was stored.
//! - The client acknowledges its write once every write and the prepare succeeded. It then
//!   confirms, without waiting for the answer: the upload id rides on its next
//!   `PrepareUploads` (or `CommitUpload(s)` of the same request, when it must wait). It
//!   aborts instead (`AbortUpload`) if a write failed.
//! - A client that vanishes settles nothing. After `in_doubt_grace` the master reads the
//!   chunk from the workers it was sent to:
//!   - any that holds it with the length and CRC of the commit confirms it, with those
//!     workers as its replicas (repair makes up the rest);
//!   - it is dropped only once every one of them said it does not hold it. A worker that
//!     cannot be reached decides nothing, so an acknowledged file is never dropped for a
//!     worker that is down.
//! - Why the client may acknowledge without the confirmation: it does so only if its
//!   writes were done within half of the grace after it sent the prepare (the master tells
//!   it the grace). So by the time the master asks, every worker that answered the client
//!   holds the chunk durably, and the file is confirmed. Later writes wait for the
//!   confirmation's answer before they are acknowledged.
//! - The in-doubt state is in the file's record (`pending_upload`), so a master that
//!   restarts settles those left the same way.
//!
//! Confirmations are written without waiting for an fsync: the chunk is durable on its
//! workers by then, and a confirmation lost in a crash is made again by asking them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::namespace::add_garbage;
use super::store::{ChunkRef, CommitSeq, FileRecord, GarbageRecord, MetaStoreExt};
use super::{Master, MasterError};
use crate::chunk::ChunkId;
use crate::events::Level;
use crate::rpc::now_unix_ms;
use crate::rpc::pb;

/// How much longer than the grace a read waits for an in-doubt name before it is told to
/// try again: past the grace the master asks the workers, a round trip to each (bounded by
/// [`PROBE_TIMEOUT`]).
const READ_WAIT_PAST_GRACE: Duration = Duration::from_secs(6);

/// The longest a read waits whatever the grace: under a client's deadline for a control
/// call (15 s), so that it is answered `Unavailable` rather than timed out.
const READ_WAIT_MAX: Duration = Duration::from_secs(10);

/// Longest the master waits for a worker's answer about in-doubt chunks.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A read asks the workers about a name at most this often (many readers of one name, or
/// one reader retrying, make one probe).
const EARLY_PROBE_EVERY: Duration = Duration::from_millis(200);

/// Commits a worker probe asks about per call (the worker's batch limit).
const PROBE_BATCH: usize = 64;

/// Confirmations kept in memory that start a write of their records at once, and the most
/// records one transaction rewrites.
const FLUSH_AT: usize = 512;
const FLUSH_BATCH: usize = 1024;

/// A commit made beside its writes and not yet settled.
#[derive(Debug, Clone)]
pub(crate) struct InDoubt {
    pub name: String,
    pub chunk: ChunkRef,
    /// The workers the chunk was sent to.
    pub workers: Vec<String>,
    /// When it was prepared. For one found at start, from the record's wall-clock time (a
    /// clock set back only makes the wait longer).
    pub since: Instant,
    /// When a read last had the workers asked about it.
    pub probed: Option<Instant>,
}

impl InDoubt {
    /// The in-doubt state of `f`'s record, prepared `age` ago.
    pub(crate) fn of(f: &FileRecord, age: Duration) -> InDoubt {
        let now = Instant::now();
        InDoubt {
            name: f.name.clone(),
            chunk: f.chunks.first().cloned().unwrap_or_default(),
            workers: f.pending_workers.clone(),
            since: now.checked_sub(age).unwrap_or(now),
            probed: None,
        }
    }

    /// The in-doubt state of a record loaded at start.
    pub(crate) fn loaded(f: &FileRecord, grace: Duration) -> InDoubt {
        let age_ms = now_unix_ms().saturating_sub(f.modified_unix_ms).max(0) as u64;
        InDoubt::of(f, Duration::from_millis(age_ms).min(grace))
    }
}

/// How an in-doubt commit ends.
#[derive(Debug, Clone)]
enum Settle {
    /// Its chunk is stored: by the workers of its placement (the client confirmed), or by
    /// those that answered the master's probe.
    Confirm(Option<Vec<String>>),
    /// Its chunk is not stored anywhere: the file goes, the chunk's copies become garbage.
    Abort(&'static str),
}

impl Master {
    /// How many commits are in doubt now (status and tests: a client that confirms what it
    /// prepares leaves none for long).
    pub fn in_doubt_count(&self) -> usize {
        self.lock().in_doubt.len()
    }

    /// Commits reserved uploads of new names beside their writes: each is durable when
    /// answered, but in doubt until settled (see the module comment). Answered in order,
    /// each on its own, as [`Master::commit_uploads`].
    ///
    /// `confirm_ids` are earlier prepares the client confirms on the way (see
    /// `Master::confirm_ids`), settled first.
    pub async fn prepare_uploads(
        self: &Arc<Self>,
        reqs: Vec<pb::CommitUploadRequest>,
        confirm_ids: Vec<String>,
    ) -> Vec<Result<pb::CommitUploadResponse, MasterError>> {
        if !confirm_ids.is_empty() {
            self.confirm_ids(&confirm_ids).await;
        }
        if reqs.is_empty() {
            return Vec::new();
        }
        self.commit_many(reqs, true).await
    }

    /// Confirms in-doubt uploads by id alone, as a client does on its next prepare: the id
    /// is a random 128-bit value only the master and the client that prepared it know, so it
    /// names the prepare as surely as the whole request. Ids not in doubt (settled, deleted
    /// or replaced meanwhile, or unknown) are skipped; returns how many were confirmed.
    pub(crate) async fn confirm_ids(self: &Arc<Self>, ids: &[String]) -> usize {
        let _serial = self.ns_lock.lock().await;
        let mut n = 0;
        for id in ids {
            if let Ok(r) = self.confirm_id(id) {
                self.record_commit(&r);
                n += 1;
            }
        }
        if self.lock().confirmed_unwritten.len() >= FLUSH_AT {
            self.flush_wanted.notify_one();
        }
        n
    }

    /// Confirms the in-doubt commits of these requests (positions kept): each must repeat
    /// its prepare's name and chunk. In memory only, under the namespace lock (so in order
    /// with settling, deletes and replacements): the records are rewritten in bulk later
    /// ([`Master::flush_confirmed`]), since one that is lost in a crash comes back in doubt
    /// and is confirmed again by asking its workers, all of which hold it.
    pub(crate) async fn confirm(
        self: &Arc<Self>,
        reqs: Vec<(usize, pb::CommitUploadRequest)>,
    ) -> Vec<(usize, Result<pb::CommitUploadResponse, MasterError>)> {
        let mut out = Vec::with_capacity(reqs.len());
        let _serial = self.ns_lock.lock().await;
        for (i, req) in reqs {
            let answer = self.confirm_one(&req);
            if let Ok(r) = &answer {
                self.record_commit(r);
            }
            out.push((i, answer));
        }
        if self.lock().confirmed_unwritten.len() >= FLUSH_AT {
            self.flush_wanted.notify_one();
        }
        out
    }

    fn confirm_one(
        &self,
        req: &pb::CommitUploadRequest,
    ) -> Result<pb::CommitUploadResponse, MasterError> {
        let id = &req.upload_id;
        {
            let inner = self.lock();
            let d = inner
                .in_doubt
                .get(id)
                .ok_or_else(|| MasterError::UploadNotFound(id.clone()))?;
            let same = req.name == d.name
                && req.chunks.len() == 1
                && req.chunks[0].chunk_id == d.chunk.chunk_id
                && req.chunks[0].length == d.chunk.length
                && req.chunks[0].crc32c == d.chunk.crc32c;
            if !same {
                return Err(MasterError::InvalidArgument(format!(
                    "the confirmation of upload {id:?} does not repeat its prepared commit"
                )));
            }
        }
        self.confirm_id(id)
    }

    /// Confirms in-doubt upload `id` (the caller holds the namespace lock).
    fn confirm_id(&self, id: &String) -> Result<pb::CommitUploadResponse, MasterError> {
        let name = self
            .lock()
            .in_doubt
            .get(id)
            .map(|d| d.name.clone())
            .ok_or_else(|| MasterError::UploadNotFound(id.clone()))?;
        // A point lookup on this thread, as a lookup is: the record for the answer.
        let f = self.store.read_with(|t| t.get_file(&name))?;
        let mut inner = self.lock();
        let Some(f) = f.filter(|f| f.pending_upload == *id) else {
            // Deleted or replaced since (after it was created): nothing left to confirm.
            inner.in_doubt.remove(id);
            return Err(MasterError::UploadNotFound(id.clone()));
        };
        inner.in_doubt.remove(id);
        inner.confirmed_unwritten.push((name, id.clone()));
        inner.settled.send_modify(|n| *n += 1);
        Ok(pb::CommitUploadResponse {
            file: Some(self.file_info(&inner, &f, false)),
            replaced: false,
            in_doubt_ms: 0,
        })
    }

    /// Writes the confirmations kept in memory into their records, a bounded batch per
    /// transaction, without waiting for an fsync (see [`Master::confirm`]).
    pub(crate) async fn flush_confirmed(self: &Arc<Self>) {
        loop {
            let batch: Vec<(String, String)> = {
                let mut inner = self.lock();
                let n = inner.confirmed_unwritten.len().min(FLUSH_BATCH);
                inner.confirmed_unwritten.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let n = batch.len();
            let written = self
                .mutate(false, move |m| {
                    let ((), seq) =
                        m.store
                            .write_deferred_with(|t| -> Result<(), MasterError> {
                                for (name, id) in &batch {
                                    if let Some(mut f) = t.get_file(name)?
                                        && f.pending_upload == *id
                                    {
                                        f.pending_upload.clear();
                                        f.pending_workers.clear();
                                        t.put_file(&f)?;
                                    }
                                }
                                Ok(())
                            })?;
                    Ok(((), seq))
                })
                .await;
            if let Err(e) = written {
                // Still confirmed in memory; after a restart they are confirmed again by
                // asking their workers.
                tracing::warn!(confirmations = n, error = %e, "could not write confirmations");
                return;
            }
        }
    }

    /// Drops the in-doubt commit of upload `id` because its client says a write failed;
    /// `false` if it is not in doubt (any more).
    pub(crate) async fn abort_in_doubt(self: &Arc<Self>, id: &str) -> Result<bool, MasterError> {
        if !self.lock().in_doubt.contains_key(id) {
            return Ok(false);
        }
        let settled = self
            .settle(
                vec![(id.to_string(), Settle::Abort("aborted by its client"))],
                true,
            )
            .await?;
        Ok(settled.into_iter().flatten().next().is_some())
    }

    /// Settles in-doubt commits in one transaction: the record of each that is still in
    /// doubt (`None` for one deleted, replaced or settled meanwhile). Aborts wait for the
    /// fsync (a lost one could bring a file back that its client gave up); confirmations
    /// need not (see the module comment).
    async fn settle(
        self: &Arc<Self>,
        items: Vec<(String, Settle)>,
        durable: bool,
    ) -> Result<Vec<Option<FileRecord>>, MasterError> {
        self.check_not_rebuilding()?;
        self.mutate(durable, move |m| m.settle_round(items)).await
    }

    fn settle_round(
        &self,
        items: Vec<(String, Settle)>,
    ) -> Result<(Vec<Option<FileRecord>>, CommitSeq), MasterError> {
        let names: Vec<Option<String>> = {
            let inner = self.lock();
            items
                .iter()
                .map(|(id, _)| inner.in_doubt.get(id).map(|d| d.name.clone()))
                .collect()
        };
        type Written = (Vec<Option<FileRecord>>, Vec<(String, GarbageRecord)>);
        let ((files, garbage), seq) =
            self.store
                .write_deferred_with(|t| -> Result<Written, MasterError> {
                    let mut files = Vec::with_capacity(items.len());
                    let mut garbage = Vec::new();
                    for ((id, how), name) in items.iter().zip(&names) {
                        let Some(name) = name else {
                            files.push(None);
                            continue;
                        };
                        let f = match t.get_file(name)? {
                            Some(f) if f.pending_upload == *id => f,
                            _ => {
                                files.push(None);
                                continue;
                            }
                        };
                        match how {
                            Settle::Confirm(_) => {
                                let mut f = f;
                                f.pending_upload.clear();
                                f.pending_workers.clear();
                                t.put_file(&f)?;
                                files.push(Some(f));
                            }
                            Settle::Abort(why) => {
                                t.remove_file(name)?;
                                for c in &f.chunks {
                                    garbage.push((
                                        c.chunk_id.clone(),
                                        add_garbage(
                                            t,
                                            &c.chunk_id,
                                            &f.pending_workers,
                                            why,
                                            now_unix_ms(),
                                        )?,
                                    ));
                                }
                                files.push(Some(f));
                            }
                        }
                    }
                    Ok((files, garbage))
                })?;
        let mut inner = self.lock();
        for ((id, how), f) in items.iter().zip(&files) {
            let Some(f) = f else {
                inner.in_doubt.remove(id);
                continue;
            };
            match how {
                Settle::Confirm(holders) => {
                    inner.in_doubt.remove(id);
                    if let Some(holders) = holders {
                        let replicas: Vec<_> =
                            holders.iter().map(|w| inner.registry.intern(w)).collect();
                        for c in &f.chunks {
                            if let Ok(cid) = c.chunk_id.parse::<ChunkId>() {
                                inner
                                    .chunks
                                    .insert(cid, f.replicas, c.length, replicas.clone());
                            }
                        }
                    }
                }
                // Counts the file out, drops its chunk from the map and it from `in_doubt`.
                Settle::Abort(_) => inner.forget_file(f),
            }
        }
        inner.garbage.extend(garbage);
        inner.settled.send_modify(|n| *n += 1);
        Ok((files, seq))
    }

    /// The record of `name` once it is not in doubt: a read waits here for its client or
    /// its workers to settle it, at most the grace and a probe (and at most
    /// [`READ_WAIT_MAX`]).
    pub(crate) async fn settled_file(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<FileRecord>, MasterError> {
        let mut files = self.settled_files(vec![name.to_string()]).await?;
        Ok(files.pop().flatten())
    }

    /// [`Master::settled_file`] for many names, waiting for all of them at once. At once it
    /// has the workers asked about those in doubt: one that every worker of its placement
    /// holds is confirmed without waiting for the grace (its client has written it all, so
    /// only its confirmation is missing: it died, or this master restarted). Dropping one
    /// that no worker holds waits for the grace, since its client may still be writing.
    pub(crate) async fn settled_files(
        self: &Arc<Self>,
        names: Vec<String>,
    ) -> Result<Vec<Option<FileRecord>>, MasterError> {
        let wait = (self.cfg.in_doubt_grace + READ_WAIT_PAST_GRACE).min(READ_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.lock().settled.subscribe();
        let mut probed = false;
        loop {
            rx.borrow_and_update();
            let files = self.store.read_with(|t| {
                names
                    .iter()
                    .map(|n| t.get_file(n))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            let pending: Vec<String> = {
                let inner = self.lock();
                files
                    .iter()
                    .flatten()
                    .filter(|f| inner.is_in_doubt(f))
                    .map(|f| f.pending_upload.clone())
                    .collect()
            };
            if pending.is_empty() {
                return Ok(files);
            }
            if !probed {
                probed = true;
                self.probe_early(&pending).await;
                continue;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let name = {
                    let inner = self.lock();
                    files
                        .into_iter()
                        .flatten()
                        .find(|f| inner.is_in_doubt(f))
                        .map(|f| f.name)
                        .unwrap_or_default()
                };
                return Err(MasterError::InDoubt(name));
            }
        }
    }

    /// Asks the workers about in-doubt uploads a read waits for, and confirms those that
    /// every worker of their placement holds.
    async fn probe_early(self: &Arc<Self>, ids: &[String]) {
        let batch: Vec<(String, InDoubt)> = {
            let mut inner = self.lock();
            let now = Instant::now();
            ids.iter()
                .filter_map(|id| {
                    let d = inner.in_doubt.get_mut(id)?;
                    if d.probed
                        .is_some_and(|t| now.duration_since(t) < EARLY_PROBE_EVERY)
                    {
                        return None;
                    }
                    d.probed = Some(now);
                    Some((id.clone(), d.clone()))
                })
                .collect()
        };
        self.probe_and_settle(batch, true).await;
    }

    /// Asks the workers about the in-doubt commits past their grace, and settles those
    /// they decide.
    async fn resolve_overdue(self: &Arc<Self>) {
        let overdue: Vec<(String, InDoubt)> = {
            let inner = self.lock();
            inner
                .in_doubt
                .iter()
                .filter(|(_, d)| d.since.elapsed() >= self.cfg.in_doubt_grace)
                .map(|(id, d)| (id.clone(), d.clone()))
                .collect()
        };
        self.probe_and_settle(overdue, false).await;
    }

    /// Probes `commits` and settles what the workers decide: with `early` (inside the
    /// grace) only confirmations by every worker of a placement.
    async fn probe_and_settle(self: &Arc<Self>, commits: Vec<(String, InDoubt)>, early: bool) {
        if commits.is_empty() {
            return;
        }
        let mut decided = Vec::new();
        for batch in commits.chunks(PROBE_BATCH) {
            decided.extend(self.probe(batch, early).await);
        }
        if decided.is_empty() {
            return;
        }
        let n = decided.len();
        let summary: Vec<bool> = decided
            .iter()
            .map(|(_, s)| matches!(s, Settle::Confirm(_)))
            .collect();
        match self.settle(decided, true).await {
            Ok(files) => {
                for (confirmed, f) in summary.into_iter().zip(files) {
                    let Some(f) = f else { continue };
                    if confirmed {
                        self.events.record(
                            Level::Info,
                            format!(
                                "uploaded {:?}: its client did not confirm it, its workers did",
                                f.name
                            ),
                        );
                    } else {
                        self.events.record(
                            Level::Warn,
                            format!(
                                "dropped {:?}: its client did not confirm it and no worker holds it",
                                f.name
                            ),
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(commits = n, error = %e, "could not settle in-doubt commits"),
        }
    }

    /// What the workers say about `batch`: a verdict for each they decide (with `early`,
    /// only confirmations by every worker of the placement).
    async fn probe(
        self: &Arc<Self>,
        batch: &[(String, InDoubt)],
        early: bool,
    ) -> Vec<(String, Settle)> {
        let mut workers: Vec<String> = batch
            .iter()
            .flat_map(|(_, d)| d.workers.iter().cloned())
            .collect();
        workers.sort();
        workers.dedup();
        // For each commit: the workers that hold it, and how many said they do not.
        let mut held: Vec<(Vec<String>, usize)> = vec![(Vec::new(), 0); batch.len()];
        let asks = workers.iter().map(|w| {
            let asked: Vec<usize> = (0..batch.len())
                .filter(|&i| batch[i].1.workers.contains(w))
                .collect();
            async move {
                let answers = self.ask(w, asked.iter().map(|&i| &batch[i].1)).await;
                (w, asked, answers)
            }
        });
        for (w, asked, answers) in futures::future::join_all(asks).await {
            let Ok(answers) = answers else { continue };
            for (&i, has) in asked.iter().zip(answers) {
                match has {
                    Some(true) => held[i].0.push(w.clone()),
                    Some(false) => held[i].1 += 1,
                    None => {}
                }
            }
        }
        // Dropped only when every listed worker said no (a record that lists none stays).
        let mut out = Vec::new();
        for ((id, d), (holders, absent)) in batch.iter().zip(held) {
            let all = !d.workers.is_empty() && holders.len() == d.workers.len();
            if all || (!early && !holders.is_empty()) {
                out.push((id.clone(), Settle::Confirm(Some(holders))));
            } else if !early && !d.workers.is_empty() && absent == d.workers.len() {
                out.push((
                    id.clone(),
                    Settle::Abort("in-doubt upload that no worker holds"),
                ));
            } else {
                tracing::debug!(upload = %id, name = %d.name, early, "in-doubt commit still undecided");
            }
        }
        out
    }

    /// Whether worker `w` holds each chunk, read back whole: `Some(true)` with the length
    /// and CRC of the commit, `Some(false)` when it says it has no such chunk or holds
    /// other bytes, `None` when it could not tell.
    async fn ask<'a>(
        self: &Arc<Self>,
        w: &str,
        commits: impl Iterator<Item = &'a InDoubt>,
    ) -> Result<Vec<Option<bool>>, MasterError> {
        let commits: Vec<&InDoubt> = commits.collect();
        let chunks = commits
            .iter()
            .map(|d| pb::ReadChunkRequest {
                chunk_id: d.chunk.chunk_id.clone(),
                token: self.chunk_token(&d.chunk.chunk_id, crate::security::ChunkOps::READ),
            })
            .collect();
        let mut client = crate::rpc::worker_client(self.worker_channel(w)?);
        let call = client.read_small_chunks(pb::ReadSmallChunksRequest { chunks });
        let results = match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            Ok(Ok(r)) => r.into_inner().results,
            Ok(Err(s)) => {
                tracing::debug!(worker = %w, error = %s.message(), "in-doubt probe failed");
                return Err(MasterError::Internal(s.message().to_string()));
            }
            Err(_) => return Err(MasterError::Internal("in-doubt probe timed out".into())),
        };
        Ok(commits
            .iter()
            .enumerate()
            .map(|(i, d)| match results.get(i) {
                Some(r) if r.header.is_some() => Some(
                    r.data.len() as u64 == d.chunk.length
                        && crate::chunk::crc32c_append(0, &r.data) == d.chunk.crc32c,
                ),
                Some(r) if r.code == tonic::Code::NotFound as i32 => Some(false),
                _ => None,
            })
            .collect())
    }
}

/// Settles the in-doubt commits whose clients did not, a few times per grace, and writes
/// the confirmations kept in memory.
pub(crate) async fn resolver(master: Arc<Master>, mut stop: watch::Receiver<bool>) {
    let period =
        (master.cfg.in_doubt_grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let wanted = master.flush_wanted.clone();
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // A clean stop leaves no confirmed file to be asked about again.
                master.flush_confirmed().await;
                return;
            }
            _ = wanted.notified() => {
                master.flush_confirmed().await;
                continue;
            }
            _ = tokio::time::sleep(period) => {}
        }
        if master.rebuilding.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        master.flush_confirmed().await;
        master.resolve_overdue().await;
    }
}
