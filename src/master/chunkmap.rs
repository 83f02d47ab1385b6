//! The master's in-memory map from chunk to the workers holding it.
//!
//! Replica locations are not persisted: as in GFS and HDFS, workers are the source of truth
//! for the bytes they hold and tell the master with a full chunk report when they register.
//! The map starts empty for every committed chunk and fills as reports arrive; the commit of
//! an upload seeds it with the workers that acknowledged each chunk.

use std::collections::HashMap;
use std::time::Instant;

use super::registry::{Health, HealthPolicy, Registry, WorkerIdx, WorkerView};
use crate::chunk::ChunkId;

/// Workers holding a chunk.
pub type Replicas = smallvec::SmallVec<[WorkerIdx; 3]>;

/// What the master knows of one committed chunk.
#[derive(Debug, Clone, Default)]
pub struct ChunkEntry {
    pub target: u8,
    pub length: u64,
    /// Up to three copies inline: no heap allocation per chunk, and a scan over every chunk
    /// reads the replicas without chasing a pointer.
    pub replicas: Replicas,
    /// Replicas reported corrupt (not served, not counted as replicas).
    pub corrupt: WorkerSet,
    /// Of those, the workers that confirmed they quarantined their copy: they no longer hold
    /// the chunk and may receive a fresh one.
    pub quarantined: WorkerSet,
}

/// A set of workers that is almost always empty: one pointer (8 bytes) until it holds
/// something, so the million healthy chunks of a large cluster do not each pay for two
/// empty vectors (48 bytes).
#[derive(Debug, Clone, Default)]
// The box is the point: `Option<Box<Vec>>` is one pointer, a `Vec` is three words.
#[allow(clippy::box_collection)]
pub struct WorkerSet(Option<Box<Vec<WorkerIdx>>>);

impl WorkerSet {
    pub fn contains(&self, w: &WorkerIdx) -> bool {
        self.0.as_ref().is_some_and(|v| v.contains(w))
    }

    /// Adds `w` if absent.
    pub fn insert(&mut self, w: WorkerIdx) {
        let v = self.0.get_or_insert_with(Default::default);
        if !v.contains(&w) {
            v.push(w);
        }
    }

    pub fn remove(&mut self, w: WorkerIdx) {
        if let Some(v) = &mut self.0 {
            v.retain(|&x| x != w);
            if v.is_empty() {
                self.0 = None;
            }
        }
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |v| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = &WorkerIdx> {
        self.0.iter().flat_map(|v| v.iter())
    }
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
    /// Bumped by every call that may change an entry, so that whole-map scans (the repair
    /// planner, status) can tell that nothing changed since their last pass and skip it.
    generation: u64,
    /// The chunks those calls touched since [`ChunkMap::take_dirty`] (None: too many, or a
    /// change to every chunk), so that the repair planner can look at just those.
    dirty: Option<Vec<ChunkId>>,
}

/// Touched chunks remembered between two planner rounds before giving up and asking for a
/// full scan (bounds memory when no planner runs).
const MAX_DIRTY: usize = 100_000;

impl ChunkMap {
    /// Changes whenever an entry may have changed (see the field).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn touch(&mut self, id: &ChunkId) {
        self.generation += 1;
        if let Some(d) = &mut self.dirty {
            if d.len() < MAX_DIRTY {
                d.push(*id);
            } else {
                self.dirty = None;
            }
        }
    }

    fn touch_all(&mut self) {
        self.generation += 1;
        self.dirty = None;
    }

    /// The chunks touched since the last call, or None if a full scan is needed (the first
    /// call, a change to every chunk, or too many to list).
    pub fn take_dirty(&mut self) -> Option<Vec<ChunkId>> {
        self.dirty.replace(Vec::new())
    }

    pub fn insert(&mut self, id: ChunkId, target: u32, length: u64, replicas: Vec<WorkerIdx>) {
        self.touch(&id);
        self.entries.insert(
            id,
            ChunkEntry {
                target: target.min(u8::MAX as u32) as u8,
                length,
                replicas: Replicas::from_vec(replicas),
                corrupt: WorkerSet::default(),
                quarantined: WorkerSet::default(),
            },
        );
    }

    pub fn remove(&mut self, id: &ChunkId) -> Option<ChunkEntry> {
        self.touch(id);
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
        self.touch(id);
        match self.entries.get_mut(id) {
            Some(e) => {
                // A worker that quarantined its copy and then received a fresh one holds a
                // good replica again.
                if e.quarantined.contains(&worker) {
                    e.quarantined.remove(worker);
                    e.corrupt.remove(worker);
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
        self.touch(id);
        if let Some(e) = self.entries.get_mut(id) {
            e.replicas.retain(|w| *w != worker);
        }
    }

    pub fn get_mut(&mut self, id: &ChunkId) -> Option<&mut ChunkEntry> {
        self.touch(id);
        self.entries.get_mut(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &ChunkEntry)> {
        self.entries.iter()
    }

    /// Forgets every replica on `worker` (before applying its full report).
    pub fn drop_worker(&mut self, worker: WorkerIdx) {
        self.touch_all();
        for e in self.entries.values_mut() {
            e.replicas.retain(|w| *w != worker);
        }
    }

    /// Marks the replica of `id` on `worker` corrupt; true if it was a known replica.
    pub fn mark_corrupt(&mut self, id: &ChunkId, worker: WorkerIdx) -> bool {
        self.touch(id);
        match self.entries.get_mut(id) {
            Some(e) => {
                let had = e.replicas.contains(&worker);
                e.replicas.retain(|w| *w != worker);
                e.corrupt.insert(worker);
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
            e.quarantined.insert(worker);
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

    /// Counts chunks by replication health and replicas per worker (indexed by worker).
    pub fn counts(&self, view: &WorkerView) -> (ReplicationCounts, Vec<u64>) {
        let mut c = ReplicationCounts::default();
        // (target, live) cells: targets are at most 16; live copies past 64 share a cell.
        const LIVE: usize = 65;
        let mut cells = vec![0u64; 17 * LIVE];
        let mut per_worker = vec![0u64; view.len()];
        for e in self.entries.values() {
            c.chunks += 1;
            c.corrupt_replicas += e.corrupt.len() as u64;
            let mut live = 0usize;
            for &w in &e.replicas {
                if let Some(n) = per_worker.get_mut(w as usize) {
                    *n += 1;
                }
                if view.alive(w) {
                    live += 1;
                }
            }
            let target = e.target as usize;
            cells[target.min(16) * LIVE + live.min(LIVE - 1)] += 1;
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
        c.matrix = cells
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (((i / LIVE) as u32, (i % LIVE) as u32), *n))
            .collect();
        (c, per_worker)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_sets_stay_unallocated_until_used_and_free_when_emptied() {
        let mut s = WorkerSet::default();
        assert!(s.is_empty() && !s.contains(&1));
        assert_eq!(s.len(), 0);
        s.insert(1);
        s.insert(1);
        s.insert(2);
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
        s.remove(1);
        assert!(s.contains(&2) && !s.contains(&1));
        s.remove(2);
        assert!(s.is_empty());
        assert_eq!(std::mem::size_of::<WorkerSet>(), 8);
    }

    #[test]
    fn counts_use_the_worker_view() {
        let mut reg = Registry::default();
        let a = reg.intern("a:1");
        let b = reg.intern("b:1");
        let policy = HealthPolicy::from_timeout(std::time::Duration::from_secs(5));
        let now = Instant::now();
        for w in [a, b] {
            if let Some(e) = reg.get_mut(w) {
                e.last_heartbeat = Some(now);
            }
        }
        let mut m = ChunkMap::default();
        m.insert(ChunkId(1), 2, 10, vec![a, b]);
        m.insert(ChunkId(2), 2, 10, vec![a]);
        m.insert(ChunkId(3), 1, 10, vec![]);
        let (c, per_worker) = m.counts(&reg.view(&policy, now));
        assert_eq!(
            (c.chunks, c.stable, c.under_replicated, c.missing),
            (3, 1, 1, 1)
        );
        assert_eq!(per_worker, vec![2, 1]);
        assert_eq!(c.matrix.get(&(2, 1)), Some(&1));
    }
}
