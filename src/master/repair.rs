//! Self-healing: the repair loop re-replicates chunks below their target (worker → worker,
//! the most endangered first, a bounded number of copies per worker at once), trims surplus
//! replicas, and collects orphan chunks after the grace period.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::namespace::add_garbage;
use super::registry::{Health, WorkerIdx, WorkerView};
use super::store::{GarbageRecord, MetaStoreExt};
use super::{Master, MasterError};
use crate::chunk::ChunkId;
use crate::events::Level;
use crate::rpc::now_unix_ms;
use crate::rpc::pb;

/// Copies started per planning round at most (the per-worker limit bounds them further).
const JOBS_PER_ROUND: usize = 256;
/// How long a failed copy waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(3);
/// Window over which repair throughput is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A chunk a worker reported that belongs to no file, open upload or garbage entry.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub workers: Vec<String>,
    pub first_seen: Instant,
}

/// The longest the planner goes without a full scan of the chunk map, even when nothing it
/// tracks changed: a safety net for any change that does not pass through the map's API.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(10);

/// The repair loop's state, kept in the master's `Inner`.
#[derive(Debug, Default)]
pub struct RepairState {
    /// Copies running: chunk → (source, target).
    pub in_flight: HashMap<ChunkId, (WorkerIdx, WorkerIdx)>,
    /// Chunks whose last copy failed, and when they may be tried again.
    pub backoff: HashMap<ChunkId, Instant>,
    pub chunks_total: u64,
    pub bytes_total: u64,
    recent: VecDeque<(Instant, u64)>,
    /// Chunks below target with a live source, as of the last round.
    pub queue: u64,
    /// Set by a full scan that found nothing to do: the workers' health and when. Later
    /// rounds look only at the chunks touched since (see [`ChunkMap::take_dirty`]) while the
    /// health is unchanged and those need nothing, with a full scan at least every
    /// [`FULL_SCAN_EVERY`] regardless.
    quiet: Option<(WorkerView, Instant)>,
    /// Full scans done (for tests and the benchmark).
    pub scans: u64,
    degraded: bool,
    last_orphan_warning: Option<Instant>,
}

impl RepairState {
    /// Repair throughput (bytes/s) over the last few seconds.
    pub fn rate(&self, now: Instant) -> u64 {
        let bytes: u64 = self
            .recent
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= RATE_WINDOW)
            .map(|(_, b)| b)
            .sum();
        bytes / RATE_WINDOW.as_secs()
    }

    fn record(&mut self, now: Instant, bytes: u64) {
        self.chunks_total += 1;
        self.bytes_total += bytes;
        self.recent.push_back((now, bytes));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.recent.pop_front();
        }
    }
}

/// One copy to order.
struct Job {
    chunk: ChunkId,
    length: u64,
    source: String,
    target: String,
    target_idx: WorkerIdx,
}

/// Runs repair rounds until `stop`.
pub(crate) async fn repair_loop(master: Arc<Master>, mut stop: watch::Receiver<bool>) {
    let mut copies = tokio::task::JoinSet::new();
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => {
                copies.abort_all();
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        while copies.try_join_next().is_some() {}
        round += 1;
        let (jobs, trims) = master.plan();
        for job in jobs {
            copies.spawn(master.clone().copy(job));
        }
        if !trims.is_empty()
            && let Err(e) = master.trim(trims).await
        {
            tracing::warn!(error = %e, "could not trim surplus replicas");
        }
        if round.is_multiple_of(4)
            && let Err(e) = master.collect_orphans().await
        {
            tracing::warn!(error = %e, "orphan collection failed");
        }
    }
}

/// A chunk at its target, or one that cannot be helped (no live copy to copy from).
fn needs_nothing(e: &super::chunkmap::ChunkEntry, view: &WorkerView) -> bool {
    let (mut alive, mut serving) = (0usize, 0usize);
    for &w in &e.replicas {
        if view.alive(w) {
            alive += 1;
            if !view.draining(w) {
                serving += 1;
            }
        }
    }
    let target = e.target as usize;
    serving == target || (serving < target && alive == 0)
}

impl Master {
    /// Decides which chunks to copy (and where) and which surplus replicas to drop.
    fn plan(&self) -> (Vec<Job>, Vec<(ChunkId, WorkerIdx)>) {
        let now = Instant::now();
        let max = self.cfg.max_repairs_per_worker.max(1);
        let mut guard = self.lock();
        let inner = &mut *guard;
        let view = inner.registry.view(&self.policy, now);
        // Taken every round, so that the list only ever spans one round.
        let dirty = inner.chunks.take_dirty();
        if let (Some((v, at)), Some(dirty)) = (&inner.repair.quiet, &dirty)
            && *v == view
            && now.saturating_duration_since(*at) < FULL_SCAN_EVERY
            && dirty
                .iter()
                .all(|id| inner.chunks.get(id).is_none_or(|e| needs_nothing(e, &view)))
        {
            return (Vec::new(), Vec::new());
        }
        inner.repair.scans += 1;
        let mut load: HashMap<WorkerIdx, usize> = HashMap::new();
        for (s, t) in inner.repair.in_flight.values() {
            *load.entry(*s).or_default() += 1;
            *load.entry(*t).or_default() += 1;
        }
        let mut need: Vec<(usize, ChunkId)> = Vec::new();
        let mut trims = Vec::new();
        let mut queue = 0u64;
        let reg = &inner.registry;
        for (id, e) in inner.chunks.iter() {
            // Count first, allocate only for the few chunks that need work.
            if needs_nothing(e, &view) {
                continue;
            }
            let target = e.target as usize;
            if inner.repair.in_flight.contains_key(id) {
                continue;
            }
            let serving: Vec<WorkerIdx> = e
                .replicas
                .iter()
                .copied()
                .filter(|&w| view.serving(w))
                .collect();
            if serving.len() < target {
                queue += 1;
                if inner.repair.backoff.get(id).is_some_and(|t| *t > now) {
                    continue;
                }
                need.push((serving.len(), *id));
            } else if serving.len() > target {
                // Drop the surplus from the fullest workers.
                let mut by_free: Vec<WorkerIdx> = serving.clone();
                by_free.sort_by_key(|&w| reg.get(w).map(|x| x.usage.free_bytes).unwrap_or(0));
                for &w in by_free.iter().take(serving.len() - target) {
                    trims.push((*id, w));
                }
            }
        }
        // The most endangered first.
        need.sort();
        let mut jobs = Vec::new();
        for (_, id) in need {
            if jobs.len() >= JOBS_PER_ROUND {
                break;
            }
            let Some(e) = inner.chunks.get(&id) else {
                continue;
            };
            // Unconfirmed bad copies may still be on their workers: not a target for them.
            let unconfirmed: Vec<WorkerIdx> = e
                .corrupt
                .iter()
                .copied()
                .filter(|w| !e.quarantined.contains(w))
                .collect();
            let (length, replicas, corrupt) = (e.length, e.replicas.clone(), unconfirmed);
            let source = replicas
                .iter()
                .copied()
                .filter(|&w| inner.registry.health(w, &self.policy, now) == Health::Alive)
                .filter(|w| load.get(w).copied().unwrap_or(0) < max)
                .min_by_key(|w| load.get(w).copied().unwrap_or(0));
            let Some(source) = source else { continue };
            let mut exclude: Vec<String> = replicas
                .iter()
                .chain(corrupt.iter())
                .map(|&w| inner.registry.address(w).to_string())
                .collect();
            if let Some(g) = inner.garbage.get(&id.to_string()) {
                exclude.extend(g.workers.iter().cloned());
            }
            for (&w, &n) in &load {
                if n >= max {
                    exclude.push(inner.registry.address(w).to_string());
                }
            }
            let Some(&target) = inner
                .registry
                .place(1, length, &exclude, &self.policy, now)
                .first()
            else {
                continue;
            };
            *load.entry(source).or_default() += 1;
            *load.entry(target).or_default() += 1;
            inner.repair.in_flight.insert(id, (source, target));
            jobs.push(Job {
                chunk: id,
                length,
                source: inner.registry.address(source).to_string(),
                target: inner.registry.address(target).to_string(),
                target_idx: target,
            });
        }
        let was = inner.repair.degraded;
        // Nothing below target (so no retry is pending either), nothing to trim or copying.
        let quiet =
            queue == 0 && jobs.is_empty() && trims.is_empty() && inner.repair.in_flight.is_empty();
        if quiet {
            inner.repair.backoff.clear();
        }
        inner.repair.quiet = quiet.then_some((view, now));
        inner.repair.queue = queue;
        inner.repair.degraded = queue > 0 || !inner.repair.in_flight.is_empty();
        let now_degraded = inner.repair.degraded;
        drop(guard);
        if !was && now_degraded {
            self.events.record(
                Level::Warn,
                format!("{queue} chunk(s) below their replica target; re-replicating"),
            );
        } else if was && !now_degraded {
            self.events.record(
                Level::Info,
                "re-replication done: every chunk with a live copy is at its target",
            );
        }
        (jobs, trims)
    }

    pub(crate) fn worker_channel(
        &self,
        addr: &str,
    ) -> Result<tonic::transport::Channel, MasterError> {
        let mut map = self
            .worker_channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = self
            .transport
            .data_channel(addr)
            .map_err(|e| MasterError::Internal(format!("bad worker address {addr}: {e}")))?;
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Orders one copy and records its outcome.
    async fn copy(self: Arc<Self>, job: Job) {
        let started = Instant::now();
        let result = async {
            let mut client = crate::rpc::worker_client(self.worker_channel(&job.source)?);
            let limit = crate::rpc::transfer_limit(job.length);
            let chunk_id = job.chunk.to_string();
            let call = client.replicate_chunk(pb::ReplicateChunkRequest {
                token: self.chunk_token(&chunk_id, crate::security::ChunkOps::READ_WRITE),
                chunk_id,
                target: job.target.clone(),
            });
            match tokio::time::timeout(limit, call).await {
                Err(_) => Err(MasterError::Internal("copy timed out".into())),
                Ok(Err(s)) => Err(MasterError::Internal(s.message().to_string())),
                Ok(Ok(r)) => Ok(r.into_inner().bytes),
            }
        }
        .await;
        let now = Instant::now();
        let orphaned = {
            let mut inner = self.lock();
            inner.repair.in_flight.remove(&job.chunk);
            match &result {
                Ok(bytes) => {
                    inner.repair.record(now, *bytes);
                    inner.repair.backoff.remove(&job.chunk);
                    if inner.chunks.add_replica(&job.chunk, job.target_idx) {
                        let live = inner.chunks.get(&job.chunk).map(|e| {
                            let alive = super::chunkmap::ChunkMap::live_replicas(
                                e,
                                &inner.registry,
                                &self.policy,
                                now,
                            );
                            (alive, e.target as usize)
                        });
                        if let Some((alive, target)) = live
                            && alive >= target
                        {
                            // The bad copies were quarantined by their workers; the chunk
                            // is whole again.
                            if let Some(e) = inner.chunks.get_mut(&job.chunk) {
                                e.corrupt.clear();
                            }
                        }
                        false
                    } else {
                        true
                    }
                }
                Err(_) => {
                    inner.repair.backoff.insert(job.chunk, now + RETRY_AFTER);
                    false
                }
            }
        };
        match result {
            Ok(bytes) => {
                tracing::info!(op = "re-replicate", chunk = %job.chunk, source = %job.source, target = %job.target, bytes, ms = started.elapsed().as_millis() as u64, outcome = "ok");
                if orphaned {
                    // The file was deleted while the copy ran: the new copy is garbage.
                    let id = job.chunk.to_string();
                    let target = job.target.clone();
                    let _ = self
                        .garbage_now(
                            vec![(id, vec![target])],
                            "deleted during repair",
                            now_unix_ms(),
                        )
                        .await;
                }
            }
            Err(e) => {
                tracing::warn!(op = "re-replicate", chunk = %job.chunk, source = %job.source, target = %job.target, error = %e, outcome = "error");
            }
        }
    }

    /// Writes garbage entries (merging workers into existing ones) and mirrors them.
    pub(crate) async fn garbage_now(
        self: &Arc<Self>,
        entries: Vec<(String, Vec<String>)>,
        reason: &'static str,
        since_unix_ms: i64,
    ) -> Result<(), MasterError> {
        let _g = self.ns_lock.lock().await;
        let written = self
            .blocking(move |m| {
                m.store
                    .write_with(|t| -> Result<Vec<(String, GarbageRecord)>, MasterError> {
                        let mut out = Vec::new();
                        for (id, workers) in &entries {
                            out.push((
                                id.clone(),
                                add_garbage(t, id, workers, reason, since_unix_ms)?,
                            ));
                        }
                        Ok(out)
                    })
            })
            .await?;
        self.lock().garbage.extend(written);
        Ok(())
    }

    /// Drops surplus replicas: each becomes a garbage entry for its worker alone.
    async fn trim(self: &Arc<Self>, trims: Vec<(ChunkId, WorkerIdx)>) -> Result<(), MasterError> {
        let entries: Vec<(String, Vec<String>)> = {
            let mut inner = self.lock();
            let mut out = Vec::new();
            for (id, w) in &trims {
                inner.chunks.remove_replica(id, *w);
                out.push((id.to_string(), vec![inner.registry.address(*w).to_string()]));
            }
            out
        };
        let n = entries.len();
        self.garbage_now(entries, "surplus replica", now_unix_ms())
            .await?;
        self.events.record(
            Level::Info,
            format!("trimmed {n} surplus replica(s) (chunks above their target)"),
        );
        Ok(())
    }

    /// Turns orphans older than the grace period into garbage, unless there are so many that
    /// the metadata itself may be missing (then nothing is deleted and an operator is told).
    async fn collect_orphans(self: &Arc<Self>) -> Result<(), MasterError> {
        let grace = self.cfg.gc_grace;
        let ready: Vec<(String, Vec<String>)> = {
            let mut inner = self.lock();
            if inner.orphans.is_empty() {
                return Ok(());
            }
            let known = inner.chunks.len();
            let limit = (known / 10).max(1000);
            if inner.orphans.len() > limit {
                let warn = inner
                    .repair
                    .last_orphan_warning
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60));
                if warn {
                    inner.repair.last_orphan_warning = Some(Instant::now());
                    let n = inner.orphans.len();
                    drop(inner);
                    self.events.record(
                        Level::Error,
                        format!(
                            "{n} chunks on workers belong to no file ({known} known): not collecting them, the metadata may be incomplete"
                        ),
                    );
                }
                return Ok(());
            }
            let ripe: Vec<String> = inner
                .orphans
                .iter()
                .filter(|(_, o)| o.first_seen.elapsed() >= grace)
                .map(|(id, _)| id.clone())
                .collect();
            let mut out = Vec::new();
            for id in ripe {
                let still = id
                    .parse::<ChunkId>()
                    .is_ok_and(|c| !inner.chunks.contains(&c))
                    && !inner.upload_chunks.contains(&id)
                    && !inner.garbage.contains_key(&id);
                if let Some(o) = inner.orphans.remove(&id)
                    && still
                {
                    out.push((id, o.workers));
                }
            }
            out
        };
        if ready.is_empty() {
            return Ok(());
        }
        let n = ready.len();
        // Orphans already waited out the grace while being watched: their entries start
        // ripe, so the deletion orders go out with the next heartbeats.
        let ripe = now_unix_ms() - grace.as_millis() as i64;
        self.garbage_now(ready, "orphan chunk (belongs to no file)", ripe)
            .await?;
        self.events.record(
            Level::Info,
            format!("collecting {n} orphan chunk(s) that belong to no file"),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_cluster_is_not_rescanned_until_something_changes() {
        let dir = tempfile::tempdir().unwrap();
        let m = Master::open(crate::master::MasterConfig::new(dir.path())).unwrap();
        let now = Instant::now();
        let ws: Vec<WorkerIdx> = {
            let mut inner = m.lock();
            let ws: Vec<WorkerIdx> = (0..3)
                .map(|i| inner.registry.intern(&format!("w{i}:1")))
                .collect();
            for &w in &ws {
                if let Some(e) = inner.registry.get_mut(w) {
                    e.last_heartbeat = Some(now);
                }
            }
            for i in 0..100 {
                inner.chunks.insert(ChunkId(i), 3, 10, ws.clone());
            }
            ws
        };
        let scans = || m.lock().repair.scans;
        m.plan();
        assert_eq!(scans(), 1);
        m.plan();
        m.plan();
        assert_eq!(scans(), 1, "nothing changed: no rescan");
        // New chunks committed at their target (the usual commit): only they are looked at.
        for i in 100..200 {
            m.lock().chunks.insert(ChunkId(i), 3, 10, ws.clone());
            if i % 10 == 0 {
                m.plan();
            }
        }
        assert_eq!(scans(), 1, "commits at target: still no full scan");

        // A lost replica: rounds scan until the chunk is back at its target.
        m.lock().chunks.remove_replica(&ChunkId(5), ws[0]);
        m.plan();
        m.plan();
        assert_eq!(scans(), 3, "work pending: every round scans");
        assert_eq!(m.lock().repair.queue, 1);
        m.lock().chunks.add_replica(&ChunkId(5), ws[0]);
        m.plan();
        m.plan();
        assert_eq!(scans(), 4);
        assert_eq!(m.lock().repair.queue, 0);

        // A worker going silent changes the health view: scanned again.
        if let Some(e) = m.lock().registry.get_mut(ws[2]) {
            e.last_heartbeat = now.checked_sub(Duration::from_secs(3600));
        }
        m.plan();
        assert_eq!(scans(), 5);
        assert_eq!(m.lock().repair.queue, 200);
    }
}
