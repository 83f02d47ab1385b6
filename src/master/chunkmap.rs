//! The master's in-memory map from chunk to the workers holding it.
//!
//! Replica locations are not persisted: as in GFS and HDFS, workers are the source of truth
//! for the bytes they hold and tell the master with a full chunk report when they register.
//! The map starts empty for every committed chunk and fills as reports arrive; the commit of
//! an upload seeds it with the workers that acknowledged each chunk.

use std::collections::HashMap;
use std::time::Instant;

use super::registry::{Health, HealthPolicy, Registry, WorkerIdx};
use crate::chunk::ChunkId;

/// What the master knows of one committed chunk.
#[derive(Debug, Clone, Default)]
pub struct ChunkEntry {
    pub target: u8,
    pub length: u64,
    pub replicas: Vec<WorkerIdx>,
    /// Replicas reported corrupt (not served, not counted as replicas).
    pub corrupt: Vec<WorkerIdx>,
    /// Of those, the workers that confirmed they quarantined their copy: they no longer hold
    /// the chunk and may receive a fresh one.
    pub quarantined: Vec<WorkerIdx>,
}

/// Replication health counts over every chunk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplicationCounts {
    pub chunks: u64,
    /// At least one live copy but fewer than the target.
    pub under_replicated: u64,
    pub missing: u64,
    /// Exactly one live copy of a chunk whose target is higher.
    pub endangered: u64,
    pub stable: u64,
    pub over_target: u64,
    pub corrupt_replicas: u64,
    /// (target, live copies) → chunks.
    pub matrix: std::collections::BTreeMap<(u32, u32), u64>,
}

/// Chunk → replicas for every committed chunk.
#[derive(Debug, Default)]
pub struct ChunkMap {
    entries: HashMap<ChunkId, ChunkEntry>,
}

impl ChunkMap {
    pub fn insert(&mut self, id: ChunkId, target: u32, length: u64, replicas: Vec<WorkerIdx>) {
        self.entries.insert(
            id,
            ChunkEntry {
                target: target.min(u8::MAX as u32) as u8,
                length,
                replicas,
                corrupt: Vec::new(),
                quarantined: Vec::new(),
            },
        );
    }

    pub fn remove(&mut self, id: &ChunkId) -> Option<ChunkEntry> {
        self.entries.remove(id)
    }

    pub fn get(&self, id: &ChunkId) -> Option<&ChunkEntry> {
        self.entries.get(id)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.entries.contains_key(id)
    }

    /// Records that `worker` holds `id`; false if the chunk belongs to no committed file.
    pub fn add_replica(&mut self, id: &ChunkId, worker: WorkerIdx) -> bool {
        match self.entries.get_mut(id) {
            Some(e) => {
                // A worker that quarantined its copy and then received a fresh one holds a
                // good replica again.
                if e.quarantined.contains(&worker) {
                    e.quarantined.retain(|&w| w != worker);
                    e.corrupt.retain(|&w| w != worker);
                }
                if !e.replicas.contains(&worker) && !e.corrupt.contains(&worker) {
                    e.replicas.push(worker);
                }
                true
            }
            None => false,
        }
    }

    /// Forgets the replica of `id` on `worker`.
    pub fn remove_replica(&mut self, id: &ChunkId, worker: WorkerIdx) {
        if let Some(e) = self.entries.get_mut(id) {
            e.replicas.retain(|&w| w != worker);
        }
    }

    pub fn get_mut(&mut self, id: &ChunkId) -> Option<&mut ChunkEntry> {
        self.entries.get_mut(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &ChunkEntry)> {
        self.entries.iter()
    }

    /// Forgets every replica on `worker` (before applying its full report).
    pub fn drop_worker(&mut self, worker: WorkerIdx) {
        for e in self.entries.values_mut() {
            e.replicas.retain(|&w| w != worker);
        }
    }

    /// Marks the replica of `id` on `worker` corrupt; true if it was a known replica.
    pub fn mark_corrupt(&mut self, id: &ChunkId, worker: WorkerIdx) -> bool {
        match self.entries.get_mut(id) {
            Some(e) => {
                let had = e.replicas.contains(&worker);
                e.replicas.retain(|&w| w != worker);
                if !e.corrupt.contains(&worker) {
                    e.corrupt.push(worker);
                }
                had
            }
            None => false,
        }
    }

    /// A worker quarantined its copy of `id` (it no longer holds it); true if it was a replica.
    pub fn mark_quarantined(&mut self, id: &ChunkId, worker: WorkerIdx) -> bool {
        let had = self.mark_corrupt(id, worker);
        if let Some(e) = self.entries.get_mut(id)
            && !e.quarantined.contains(&worker)
        {
            e.quarantined.push(worker);
        }
        had
    }

    /// How many replicas of `entry` are on alive workers.
    pub fn live_replicas(
        entry: &ChunkEntry,
        reg: &Registry,
        policy: &HealthPolicy,
        now: Instant,
    ) -> usize {
        entry
            .replicas
            .iter()
            .filter(|&&w| reg.health(w, policy, now) == Health::Alive)
            .count()
    }

    /// Counts chunks by replication health and replicas per worker.
    pub fn counts(
        &self,
        reg: &Registry,
        policy: &HealthPolicy,
        now: Instant,
    ) -> (ReplicationCounts, HashMap<WorkerIdx, u64>) {
        let mut c = ReplicationCounts::default();
        let mut cells: HashMap<(u32, u32), u64> = HashMap::new();
        let mut per_worker: HashMap<WorkerIdx, u64> = HashMap::new();
        for e in self.entries.values() {
            c.chunks += 1;
            c.corrupt_replicas += e.corrupt.len() as u64;
            for &w in &e.replicas {
                *per_worker.entry(w).or_default() += 1;
            }
            let live = Self::live_replicas(e, reg, policy, now);
            let target = e.target as usize;
            *cells.entry((e.target as u32, live as u32)).or_default() += 1;
            if live == 0 {
                c.missing += 1;
            } else if live < target {
                c.under_replicated += 1;
                if live == 1 {
                    c.endangered += 1;
                }
            } else if live == target {
                c.stable += 1;
            } else {
                c.over_target += 1;
            }
        }
        c.matrix = cells.into_iter().collect();
        (c, per_worker)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
