//! Worker registration, heartbeats, deletion orders, and the health watcher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::registry::{Health, health_of};
use super::store::{GarbageRecord, MetaStoreExt, WorkerRecord};
use super::{Inner, Master, MasterError};
use crate::chunk::ChunkId;
use crate::config::human_bytes;
use crate::events::Level;
use crate::rpc::now_unix_ms;
use crate::rpc::pb;

/// Deletion orders sent in one heartbeat answer.
const DELETES_PER_HEARTBEAT: usize = 1000;

fn validate_address(addr: &str) -> Result<(), MasterError> {
    let ok = addr.len() <= 255
        && addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        && !addr
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '/');
    if ok {
        Ok(())
    } else {
        Err(MasterError::InvalidArgument(format!(
            "invalid worker address {:?}: expected host:port",
            addr.chars().take(64).collect::<String>()
        )))
    }
}

/// Where a chunk a worker holds, and no file lists there, was filed.
enum Unlisted {
    /// A deletion's: the worker is (now) among those told to delete it; the entry is
    /// returned when this changed it.
    Garbage(Option<GarbageRecord>),
    /// An open upload's: its commit or abort decides.
    Upload,
    /// Nothing's.
    Orphan,
}

impl Inner {
    /// Files a chunk held by `address` that is no file's chunk. An orphan is never deleted on
    /// a guess: the collector purges it only after the grace period, and only if it still
    /// belongs to nothing.
    fn file_unlisted(&mut self, chunk_id: &str, address: &str) -> Unlisted {
        if let Some(g) = self.garbage.get_mut(chunk_id) {
            if g.workers.iter().any(|w| w == address) {
                return Unlisted::Garbage(None);
            }
            g.workers.push(address.to_string());
            return Unlisted::Garbage(Some(g.clone()));
        }
        if self.upload_chunks.contains(chunk_id) {
            return Unlisted::Upload;
        }
        let now = Instant::now();
        let o = self
            .orphans
            .entry(chunk_id.to_string())
            .or_insert_with(|| super::repair::Orphan {
                workers: Vec::new(),
                first_seen: now,
            });
        if !o.workers.iter().any(|w| w == address) {
            o.workers.push(address.to_string());
        }
        Unlisted::Orphan
    }
}

impl Master {
    /// A worker's full report: its replicas replace whatever the map had for it.
    pub async fn register(
        self: &Arc<Self>,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, MasterError> {
        validate_address(&req.address)?;
        if self.rebuilding.load(std::sync::atomic::Ordering::Relaxed) {
            if !req.with_headers {
                return Ok(pb::RegisterResponse {
                    heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
                    want_headers: true,
                });
            }
            self.lock()
                .rebuild_reports
                .insert(req.address.clone(), req.chunks.clone());
        }
        let usage = req.usage.unwrap_or_default();
        let (known, orphans, garbage_fix, is_new) = {
            let mut inner = self.lock();
            let is_new = inner.registry.find(&req.address).is_none();
            let idx = inner.registry.intern(&req.address);
            inner.chunks.drop_worker(idx);
            let mut known = 0u64;
            let mut orphans = 0u64;
            let mut garbage_fix = Vec::new();
            for c in &req.chunks {
                let Ok(id) = c.chunk_id.parse::<ChunkId>() else {
                    continue;
                };
                if inner.chunks.add_replica(&id, idx) {
                    known += 1;
                    continue;
                }
                match inner.file_unlisted(&c.chunk_id, &req.address) {
                    Unlisted::Orphan => orphans += 1,
                    Unlisted::Garbage(Some(g)) => garbage_fix.push((c.chunk_id.clone(), g)),
                    Unlisted::Garbage(None) | Unlisted::Upload => {}
                }
            }
            if let Some(w) = inner.registry.get_mut(idx) {
                w.usage = usage;
                w.last_heartbeat = Some(Instant::now());
                w.reported = true;
                w.pending_bytes = 0;
                // The registration is the event; the health watcher need not repeat it.
                w.last_health = super::registry::Health::Alive;
            }
            (known, orphans, garbage_fix, is_new)
        };
        let record = WorkerRecord {
            address: req.address.clone(),
            first_seen_unix_ms: now_unix_ms(),
            capacity_bytes: usage.capacity_bytes,
            draining: false,
        };
        self.blocking(move |m| {
            m.store.write_with(|t| -> Result<(), MasterError> {
                let existing = t
                    .list_workers()?
                    .into_iter()
                    .any(|w| w.address == record.address);
                if !existing {
                    t.put_worker(&record)?;
                }
                for (id, g) in &garbage_fix {
                    t.put_garbage(id, g)?;
                }
                Ok(())
            })
        })
        .await?;
        self.events.record(
            Level::Info,
            format!(
                "worker {} {}: {} chunk(s) reported ({} known, {} not in any file), {} free of {}",
                req.address,
                if is_new {
                    "registered"
                } else {
                    "re-registered"
                },
                req.chunks.len(),
                known,
                orphans,
                human_bytes(usage.free_bytes),
                human_bytes(usage.capacity_bytes),
            ),
        );
        Ok(pb::RegisterResponse {
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            want_headers: false,
        })
    }

    /// Usage and deletion acknowledgements in; deletion orders out.
    pub async fn heartbeat(
        self: &Arc<Self>,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, MasterError> {
        let mut corrupt = Vec::new();
        let (orders, acked, filed, orphaned) = {
            let mut inner = self.lock();
            let Some(idx) = inner.registry.find(&req.address) else {
                return Ok(pb::HeartbeatResponse {
                    reregister: true,
                    delete_chunks: Vec::new(),
                });
            };
            let Some(w) = inner.registry.get_mut(idx) else {
                return Ok(pb::HeartbeatResponse {
                    reregister: true,
                    delete_chunks: Vec::new(),
                });
            };
            if !w.reported {
                return Ok(pb::HeartbeatResponse {
                    reregister: true,
                    delete_chunks: Vec::new(),
                });
            }
            w.usage = req.usage.unwrap_or_default();
            w.process = req.process;
            w.last_heartbeat = Some(Instant::now());
            w.pending_bytes = 0;
            // Before the acknowledgements: a chunk stored and then deleted on an order is
            // still garbage here, not an orphan.
            let mut filed = Vec::new();
            let mut orphaned = 0usize;
            let rebuilding = self.rebuilding.load(std::sync::atomic::Ordering::Relaxed);
            for id in req.received_chunks.iter().filter(|_| !rebuilding) {
                // A listed chunk's replicas are the commits' and the repairs' to decide: one
                // this worker holds beyond them is found by its next full report.
                if id
                    .parse::<ChunkId>()
                    .is_ok_and(|c| inner.chunks.contains(&c))
                {
                    continue;
                }
                match inner.file_unlisted(id, &req.address) {
                    Unlisted::Orphan => orphaned += 1,
                    Unlisted::Garbage(Some(g)) => filed.push((id.clone(), g)),
                    Unlisted::Garbage(None) | Unlisted::Upload => {}
                }
            }
            let mut acked = Vec::new();
            for id in &req.deleted_chunks {
                if let Some(g) = inner.garbage.get_mut(id) {
                    g.workers.retain(|a| a != &req.address);
                    acked.push((id.clone(), g.clone()));
                    if g.workers.is_empty() {
                        inner.garbage.remove(id);
                    }
                }
                if let Ok(cid) = id.parse::<ChunkId>() {
                    // A deleted replica of a still-committed chunk is no longer a replica.
                    inner.chunks.remove_replica(&cid, idx);
                }
            }
            for id in &req.corrupt_chunks {
                if let Ok(cid) = id.parse::<ChunkId>()
                    && inner.chunks.mark_quarantined(&cid, idx)
                {
                    corrupt.push(id.clone());
                }
            }
            // Two-phase collection: an entry is purged only once it is older than the grace.
            let ripe = self.garbage_ripe_at(now_unix_ms());
            let orders: Vec<String> = inner
                .garbage
                .iter()
                .filter(|(_, g)| g.workers.contains(&req.address) && g.since_unix_ms <= ripe)
                .map(|(id, _)| id.clone())
                .take(DELETES_PER_HEARTBEAT)
                .collect();
            (orders, acked, filed, orphaned)
        };
        if orphaned > 0 {
            tracing::info!(worker = %req.address, chunks = orphaned, "stored chunk(s) belong to no file; collecting them after the grace period");
        }
        for id in &corrupt {
            self.events.record(
                Level::Error,
                format!(
                    "worker {} found chunk {id} corrupt and quarantined it; repairing from a good copy",
                    req.address
                ),
            );
        }
        if !acked.is_empty() || !filed.is_empty() {
            let n = acked.len();
            // Not waited for (durable with the next fsync): if a crash loses it, the worker
            // is told again to delete what it no longer holds, and acknowledges again. Waiting
            // held the worker's next heartbeat back by an fsync, which on a disk busy with
            // uploads took long enough to make workers suspect.
            self.blocking(move |m| {
                m.store
                    .write_deferred_with(|t| -> Result<(), MasterError> {
                        for (id, g) in filed.iter().chain(&acked) {
                            if g.workers.is_empty() {
                                t.remove_garbage(id)?;
                            } else {
                                t.put_garbage(id, g)?;
                            }
                        }
                        Ok(())
                    })
                    .map(|((), _seq)| ())
            })
            .await?;
            if n > 0 {
                tracing::info!(worker = %req.address, chunks = n, "chunk deletions acknowledged");
            }
        }
        Ok(pb::HeartbeatResponse {
            reregister: false,
            delete_chunks: orders,
        })
    }

    /// A client found a replica bad: it is no longer served or counted.
    pub fn report_bad_replica(&self, req: &pb::ReportBadReplicaRequest) -> Result<(), MasterError> {
        let id: ChunkId = req
            .chunk_id
            .parse()
            .map_err(|e: crate::chunk::BadChunkId| MasterError::InvalidArgument(e.to_string()))?;
        let reason: String = req.reason.chars().take(200).collect();
        let known = {
            let mut inner = self.lock();
            let w = inner.registry.find(&req.worker);
            // A client's report is a claim, not proof (the worker quarantines a copy it finds
            // bad itself). Never let one take the last listed copy out of service: readers
            // verify every byte anyway, so keeping it costs nothing and a false report (or a
            // hostile read-only client) cannot make a chunk unreadable.
            let last = inner
                .chunks
                .get(&id)
                .is_some_and(|e| w.is_some_and(|w| e.replicas.iter().all(|&r| r == w)));
            match w {
                Some(_) if last => {
                    tracing::warn!(chunk = %id, worker = %req.worker, %reason, "bad replica report for the last listed copy; kept in service");
                    return Ok(());
                }
                Some(w) => inner.chunks.mark_corrupt(&id, w),
                None => false,
            }
        };
        if known {
            self.events.record(
                Level::Error,
                format!(
                    "replica of chunk {id} on {} is bad ({reason}); no longer served",
                    req.worker
                ),
            );
        } else {
            tracing::warn!(chunk = %id, worker = %req.worker, %reason, "bad replica report for an unknown replica");
        }
        Ok(())
    }
}

/// Re-derives worker health periodically and records each transition once.
pub(crate) async fn health_watcher(master: Arc<Master>, mut stop: watch::Receiver<bool>) {
    let period = (master.policy.suspect_after / 4)
        .clamp(Duration::from_millis(50), Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = Instant::now();
        let mut changes = Vec::new();
        {
            let mut inner = master.lock();
            for w in inner.registry.iter_mut() {
                let h = health_of(w, &master.policy, now);
                if h != w.last_health {
                    changes.push((w.address.clone(), w.last_health, h, w.last_heartbeat));
                    w.last_health = h;
                }
            }
        }
        for (addr, from, to, last) in changes {
            let ago = last
                .map(|t| format!("{:.1}s ago", now.saturating_duration_since(t).as_secs_f64()))
                .unwrap_or_else(|| "never since the master started".into());
            let level = match to {
                Health::Alive => Level::Info,
                Health::Suspect => Level::Warn,
                Health::Dead => Level::Error,
            };
            if from == Health::Dead && to == Health::Alive {
                master
                    .events
                    .record(level, format!("worker {addr} is alive"));
            } else if !(last.is_none() && to == Health::Dead) {
                master.events.record(
                    level,
                    format!(
                        "worker {addr} is now {} (last heartbeat {ago})",
                        to.as_str()
                    ),
                );
            }
        }
    }
}
