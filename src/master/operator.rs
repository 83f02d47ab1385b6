//! Operator requests: drain / undrain, the blast radius of a drain, fsck, and what garbage
//! collection will delete.

use std::sync::Arc;
use std::time::Instant;

use super::registry::Health;
use super::store::{FileRecord, MetaStoreExt};
use super::{Master, MasterError};
use crate::chunk::ChunkId;
use crate::config::human_bytes;
use crate::events::Level;
use crate::rpc::now_unix_ms;
use crate::rpc::pb;

/// Rate assumed for a drain estimate when nothing was repaired lately (bytes/s).
const ASSUMED_RATE: u64 = 50 << 20;

impl Master {
    /// Every committed file, read page by page off the async threads.
    async fn all_files(self: &Arc<Self>) -> Result<Vec<FileRecord>, MasterError> {
        self.blocking(|m| {
            let mut out = Vec::new();
            let mut after = String::new();
            loop {
                let page = m.store.read_with(|t| t.list_files(&after, 10_000))?;
                let Some(last) = page.last() else { break };
                after = last.name.clone();
                out.extend(page);
            }
            Ok(out)
        })
        .await
    }

    /// Marks `worker` draining (or not) and persists the mark.
    pub async fn set_draining(
        self: &Arc<Self>,
        worker: &str,
        draining: bool,
    ) -> Result<pb::WorkerStatus, MasterError> {
        {
            let mut inner = self.lock();
            let idx = inner
                .registry
                .find(worker)
                .ok_or_else(|| MasterError::WorkerNotFound(worker.to_string()))?;
            if let Some(w) = inner.registry.get_mut(idx) {
                w.draining = draining;
            }
        }
        let addr = worker.to_string();
        self.blocking(move |m| {
            m.store.write_with(|t| -> Result<(), MasterError> {
                let mut rec = t
                    .list_workers()?
                    .into_iter()
                    .find(|w| w.address == addr)
                    .unwrap_or_else(|| super::store::WorkerRecord {
                        address: addr.clone(),
                        first_seen_unix_ms: now_unix_ms(),
                        ..Default::default()
                    });
                rec.draining = draining;
                t.put_worker(&rec)?;
                Ok(())
            })
        })
        .await?;
        let status = self
            .cluster_status()
            .workers
            .into_iter()
            .find(|w| w.address == worker)
            .ok_or_else(|| MasterError::WorkerNotFound(worker.to_string()))?;
        self.events.record(
            Level::Warn,
            if draining {
                format!(
                    "worker {worker} is draining: no new chunks; {} chunk(s) to copy elsewhere",
                    status.drain_remaining
                )
            } else {
                format!("worker {worker} is no longer draining")
            },
        );
        Ok(status)
    }

    /// What losing `worker` now would do: its chunks and bytes, the files that would drop to
    /// one or zero live replicas, and how long copying its data would take.
    pub async fn drain_plan(
        self: &Arc<Self>,
        worker: &str,
    ) -> Result<pb::DrainPlanResponse, MasterError> {
        let files = self.all_files().await?;
        let now = Instant::now();
        let inner = self.lock();
        let idx = inner
            .registry
            .find(worker)
            .ok_or_else(|| MasterError::WorkerNotFound(worker.to_string()))?;
        let mut out = pb::DrainPlanResponse {
            worker: worker.to_string(),
            ..Default::default()
        };
        for f in &files {
            let mut holds = false;
            let mut min_after = u32::MAX;
            for c in &f.chunks {
                let Ok(id) = c.chunk_id.parse::<ChunkId>() else {
                    continue;
                };
                let Some(e) = inner.chunks.get(&id) else {
                    continue;
                };
                if e.replicas.contains(&idx) {
                    holds = true;
                    out.chunks += 1;
                    out.bytes += c.length;
                }
                let after = e
                    .replicas
                    .iter()
                    .filter(|&&w| w != idx)
                    .filter(|&&w| inner.registry.health(w, &self.policy, now) == Health::Alive)
                    .count() as u32;
                min_after = min_after.min(after);
            }
            if holds && min_after <= 1 {
                out.at_risk.push(pb::AtRiskFile {
                    name: f.name.clone(),
                    live_after: min_after,
                    target: f.replicas,
                });
            }
        }
        let rate = inner.repair.rate(now);
        out.repair_bytes_per_sec = rate;
        out.rate_assumed = rate == 0;
        out.estimated_seconds = out.bytes / if rate == 0 { ASSUMED_RATE } else { rate }.max(1);
        Ok(out)
    }

    /// Files with a chunk below its target (live copies), for `--cmd fsck`.
    pub async fn fsck(self: &Arc<Self>) -> Result<pb::FsckResponse, MasterError> {
        let files = self.all_files().await?;
        let now = Instant::now();
        let inner = self.lock();
        let view = inner.registry.view(&self.policy, now);
        let mut out = pb::FsckResponse::default();
        for f in &files {
            out.files_checked += 1;
            let mut short = 0;
            let mut missing = 0;
            let mut min_live = u32::MAX;
            for c in &f.chunks {
                out.chunks_checked += 1;
                let live = c
                    .chunk_id
                    .parse::<ChunkId>()
                    .ok()
                    .and_then(|id| inner.chunks.get(&id))
                    .map(|e| e.replicas.iter().filter(|&&w| view.alive(w)).count())
                    .unwrap_or(0) as u32;
                min_live = min_live.min(live);
                if live < f.replicas {
                    short += 1;
                }
                if live == 0 {
                    missing += 1;
                }
            }
            if short > 0 {
                out.files.push(pb::FsckFile {
                    name: f.name.clone(),
                    target: f.replicas,
                    min_live,
                    chunks_short: short,
                    chunks_missing: missing,
                });
            }
        }
        Ok(out)
    }

    /// Pending deletions and orphans, with why and when each will be purged.
    pub fn gc_status(&self) -> pb::GcStatusResponse {
        let grace = self.cfg.gc_grace.as_millis() as i64;
        let now = now_unix_ms();
        let ripe = self.garbage_ripe_at(now);
        let inner = self.lock();
        let mut entries: Vec<pb::GcEntry> = inner
            .garbage
            .iter()
            .map(|(id, g)| pb::GcEntry {
                chunk_id: id.clone(),
                workers: g.workers.clone(),
                reason: g.reason.clone(),
                purge_in_ms: if g.since_unix_ms <= ripe {
                    0
                } else {
                    g.since_unix_ms + grace - now
                },
            })
            .collect();
        entries.extend(inner.orphans.iter().map(|(id, o)| pb::GcEntry {
            chunk_id: id.clone(),
            workers: o.workers.clone(),
            reason: "orphan chunk (belongs to no file)".into(),
            purge_in_ms: (grace - o.first_seen.elapsed().as_millis() as i64).max(0),
        }));
        entries.sort_by(|a, b| {
            a.purge_in_ms
                .cmp(&b.purge_in_ms)
                .then(a.chunk_id.cmp(&b.chunk_id))
        });
        pb::GcStatusResponse {
            entries,
            grace_ms: grace,
        }
    }
}

/// A one-line summary of a drain plan, for events and the CLI.
pub fn summarize(plan: &pb::DrainPlanResponse) -> String {
    format!(
        "{} holds {} chunk(s), {}; {} file(s) would drop to one or zero live replicas",
        plan.worker,
        plan.chunks,
        human_bytes(plan.bytes),
        plan.at_risk.len()
    )
}
