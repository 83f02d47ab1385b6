//! The cluster status view: workers with derived health and usage, totals, replication health.

use std::time::Instant;

use super::Master;
use super::registry::Health;
use crate::rpc::pb::{ClusterStatusResponse, WorkerStatus};

impl Master {
    /// A consistent snapshot of the cluster, computed from the live chunk → replica map.
    pub fn cluster_status(&self) -> ClusterStatusResponse {
        let now = Instant::now();
        let mut inner = self.lock();
        let view = inner.registry.view(&self.policy, now);
        // A full pass over the chunk map, unless nothing it depends on changed since the last.
        let generation = inner.chunks.generation();
        let (counts, per_worker) = match &inner.counts_cache {
            Some((g, v, c)) if *g == generation && *v == view => c.clone(),
            _ => {
                let c = inner.chunks.counts(&view);
                inner.counts_cache = Some((generation, view.clone(), c.clone()));
                c
            }
        };
        // Chunks on each draining worker that still lack enough copies elsewhere.
        let mut drain_remaining: std::collections::HashMap<u32, u64> = Default::default();
        if view.any_draining() {
            for (_, e) in inner.chunks.iter() {
                let serving = e.replicas.iter().filter(|&&w| view.serving(w)).count();
                if serving < e.target as usize {
                    for &w in &e.replicas {
                        if view.draining(w) {
                            *drain_remaining.entry(w).or_default() += 1;
                        }
                    }
                }
            }
        }
        let mut out = ClusterStatusResponse {
            master_address: self.address.lock().map(|a| a.clone()).unwrap_or_default(),
            master_process: Some(crate::procstat::current()),
            files: inner.files,
            logical_bytes: inner.logical_bytes,
            chunks: counts.chunks,
            under_replicated_chunks: counts.under_replicated,
            missing_chunks: counts.missing,
            corrupt_replicas: counts.corrupt_replicas,
            endangered_chunks: counts.endangered,
            stable_chunks: counts.stable,
            over_target_chunks: counts.over_target,
            matrix: counts
                .matrix
                .iter()
                .map(|(&(target, live), &chunks)| crate::rpc::pb::MatrixCell {
                    target,
                    live,
                    chunks,
                })
                .collect(),
            repair_queue: inner.repair.queue,
            repairs_in_flight: inner.repair.in_flight.len() as u32,
            repaired_chunks_total: inner.repair.chunks_total,
            repaired_bytes_total: inner.repair.bytes_total,
            repair_bytes_per_sec: inner.repair.rate(now),
            orphan_chunks: inner.orphans.len() as u64,
            pending_deletions: inner.garbage.len() as u64,
            open_uploads: inner.uploads.values().filter(|u| !u.reserved).count() as u64,
            reserved_uploads: inner.uploads.values().filter(|u| u.reserved).count() as u64,
            in_doubt_uploads: inner.in_doubt.len() as u64,
            chunk_size: self.cfg.chunk_size,
            default_replicas: self.cfg.default_replicas,
            ..Default::default()
        };
        for (i, w) in inner.registry.iter() {
            let h = inner.registry.health(i, &self.policy, now);
            match h {
                Health::Alive => out.workers_alive += 1,
                Health::Suspect => out.workers_suspect += 1,
                Health::Dead => out.workers_dead += 1,
            }
            if h != Health::Dead {
                out.capacity_bytes += w.usage.capacity_bytes;
                out.used_bytes += w.usage.used_bytes;
                out.free_bytes += w.usage.free_bytes;
            }
            out.workers.push(WorkerStatus {
                address: w.address.clone(),
                state: if w.draining && h == Health::Alive {
                    "draining".to_string()
                } else {
                    h.as_str().to_string()
                },
                draining: w.draining,
                drain_remaining: drain_remaining.get(&i).copied().unwrap_or(0),
                usage: Some(w.usage),
                last_heartbeat_ms_ago: w
                    .last_heartbeat
                    .map(|t| now.saturating_duration_since(t).as_millis() as i64)
                    .unwrap_or(-1),
                chunks_mapped: per_worker.get(i as usize).copied().unwrap_or(0),
                process: w.process,
            });
        }
        out.workers.sort_by(|a, b| a.address.cmp(&b.address));
        out
    }
}
