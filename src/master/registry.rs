//! The worker registry: what each worker last reported, and health derived from heartbeat age.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::chunk::{HEADER_REGION, random_u128};
use crate::rpc::pb::WorkerUsage;

/// Index of a worker in the registry (stable for the master's lifetime).
pub type WorkerIdx = u32;

/// Health derived from the age of the last heartbeat, never set by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Alive,
    Suspect,
    Dead,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Dead => "dead",
        }
    }
}

/// One known worker.
#[derive(Debug)]
pub struct WorkerEntry {
    pub address: String,
    pub usage: WorkerUsage,
    /// None until the worker is heard from after this master started.
    pub last_heartbeat: Option<Instant>,
    /// True once the worker has sent a full chunk report to this master.
    pub reported: bool,
    /// Bytes placed on the worker since its last heartbeat (not yet in its reported usage).
    pub pending_bytes: u64,
    /// Health as of the last watcher pass, to log transitions once.
    pub last_health: Health,
    /// Draining: no new chunks; its replicas do not count toward targets.
    pub draining: bool,
    /// The worker process's memory and CPU as of its last heartbeat.
    pub process: Option<crate::rpc::pb::ProcessStats>,
}

/// Timeouts that turn heartbeat age into health.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    pub suspect_after: Duration,
    pub dead_after: Duration,
}

impl HealthPolicy {
    /// Suspect after half the timeout without a heartbeat, dead after the whole timeout.
    pub fn from_timeout(timeout: Duration) -> Self {
        HealthPolicy {
            suspect_after: timeout / 2,
            dead_after: timeout,
        }
    }
}

/// A snapshot of which workers are alive and which are draining, indexed by [`WorkerIdx`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// (alive, draining) per worker.
    serving: Vec<(bool, bool)>,
}

impl WorkerView {
    pub fn alive(&self, w: WorkerIdx) -> bool {
        self.serving.get(w as usize).is_some_and(|s| s.0)
    }

    /// Alive and not draining: a copy that counts toward a chunk's target.
    pub fn serving(&self, w: WorkerIdx) -> bool {
        self.serving.get(w as usize).is_some_and(|s| s.0 && !s.1)
    }

    pub fn draining(&self, w: WorkerIdx) -> bool {
        self.serving.get(w as usize).is_some_and(|s| s.1)
    }

    pub fn any_draining(&self) -> bool {
        self.serving.iter().any(|s| s.1)
    }

    pub fn len(&self) -> usize {
        self.serving.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serving.is_empty()
    }
}

/// All workers the master knows, by address.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Vec<WorkerEntry>,
    by_address: HashMap<String, WorkerIdx>,
}

impl Registry {
    /// The worker's index, adding an entry never heard from if it is new.
    pub fn intern(&mut self, address: &str) -> WorkerIdx {
        if let Some(&i) = self.by_address.get(address) {
            return i;
        }
        let i = self.workers.len() as WorkerIdx;
        self.workers.push(WorkerEntry {
            address: address.to_string(),
            usage: WorkerUsage::default(),
            last_heartbeat: None,
            reported: false,
            pending_bytes: 0,
            last_health: Health::Dead,
            draining: false,
            process: None,
        });
        self.by_address.insert(address.to_string(), i);
        i
    }

    pub fn find(&self, address: &str) -> Option<WorkerIdx> {
        self.by_address.get(address).copied()
    }

    pub fn get(&self, i: WorkerIdx) -> Option<&WorkerEntry> {
        self.workers.get(i as usize)
    }

    pub fn get_mut(&mut self, i: WorkerIdx) -> Option<&mut WorkerEntry> {
        self.workers.get_mut(i as usize)
    }

    pub fn address(&self, i: WorkerIdx) -> &str {
        self.workers
            .get(i as usize)
            .map(|w| w.address.as_str())
            .unwrap_or("?")
    }

    pub fn iter(&self) -> impl Iterator<Item = (WorkerIdx, &WorkerEntry)> {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, w)| (i as WorkerIdx, w))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut WorkerEntry> {
        self.workers.iter_mut()
    }

    /// Every worker's health and draining flag, derived once: scans over all chunks look
    /// replicas up in this instead of re-deriving health per replica (at a million chunks
    /// that was most of the ~240 ms a scan held the master's lock).
    pub fn view(&self, policy: &HealthPolicy, now: Instant) -> WorkerView {
        WorkerView {
            serving: self
                .workers
                .iter()
                .map(|w| {
                    let alive = health_of(w, policy, now) == Health::Alive;
                    (alive, w.draining)
                })
                .collect(),
        }
    }

    pub fn health(&self, i: WorkerIdx, policy: &HealthPolicy, now: Instant) -> Health {
        match self.get(i) {
            Some(w) => health_of(w, policy, now),
            None => Health::Dead,
        }
    }

    /// Picks up to `count` distinct alive workers with room for `bytes`, preferring the least
    /// loaded and then the emptiest; ties are broken at random so equal workers share the load.
    pub fn place(
        &mut self,
        count: usize,
        bytes: u64,
        exclude: &[String],
        policy: &HealthPolicy,
        now: Instant,
    ) -> Vec<WorkerIdx> {
        let need = bytes + HEADER_REGION;
        let mut candidates: Vec<(u32, std::cmp::Reverse<u64>, u128, WorkerIdx)> = self
            .iter()
            .filter(|(_, w)| health_of(w, policy, now) == Health::Alive && w.reported)
            .filter(|(_, w)| !w.draining)
            .filter(|(_, w)| !exclude.iter().any(|e| e == &w.address))
            .filter_map(|(i, w)| {
                let free = w.usage.free_bytes.saturating_sub(w.pending_bytes);
                (free >= need).then_some((
                    w.usage.active_writes,
                    std::cmp::Reverse(free),
                    random_u128(),
                    i,
                ))
            })
            .collect();
        candidates.sort_unstable();
        let chosen: Vec<WorkerIdx> = candidates.into_iter().take(count).map(|c| c.3).collect();
        for &i in &chosen {
            if let Some(w) = self.get_mut(i) {
                w.pending_bytes = w.pending_bytes.saturating_add(need);
            }
        }
        chosen
    }

    /// Workers that could take a write now (alive, reported, not draining).
    pub fn alive_count(&self, policy: &HealthPolicy, now: Instant) -> usize {
        self.iter()
            .filter(|(_, w)| {
                w.reported && !w.draining && health_of(w, policy, now) == Health::Alive
            })
            .count()
    }

    pub fn is_draining(&self, i: WorkerIdx) -> bool {
        self.get(i).is_some_and(|w| w.draining)
    }
}

/// Health of one entry at `now`. A worker not heard from since this master started is
/// suspect at first and dead after the timeout: it may be on its way, but nothing is promised.
pub fn health_of(w: &WorkerEntry, policy: &HealthPolicy, now: Instant) -> Health {
    match w.last_heartbeat {
        None => Health::Dead,
        Some(t) => {
            let age = now.saturating_duration_since(t);
            if age <= policy.suspect_after {
                Health::Alive
            } else if age <= policy.dead_after {
                Health::Suspect
            } else {
                Health::Dead
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(reg: &mut Registry, addr: &str, free: u64, now: Instant) -> WorkerIdx {
        let i = reg.intern(addr);
        let w = reg.get_mut(i).unwrap();
        w.last_heartbeat = Some(now);
        w.reported = true;
        w.usage.free_bytes = free;
        i
    }

    #[test]
    fn health_follows_heartbeat_age() {
        let policy = HealthPolicy::from_timeout(Duration::from_secs(4));
        let mut reg = Registry::default();
        let t0 = Instant::now();
        let i = alive(&mut reg, "a:1", 1 << 30, t0);
        assert_eq!(
            reg.health(i, &policy, t0 + Duration::from_secs(1)),
            Health::Alive
        );
        assert_eq!(
            reg.health(i, &policy, t0 + Duration::from_secs(3)),
            Health::Suspect
        );
        assert_eq!(
            reg.health(i, &policy, t0 + Duration::from_secs(5)),
            Health::Dead
        );
        let never = reg.intern("b:1");
        assert_eq!(reg.health(never, &policy, t0), Health::Dead);
    }

    #[test]
    fn placement_is_distinct_alive_and_has_room() {
        let policy = HealthPolicy::from_timeout(Duration::from_secs(4));
        let now = Instant::now();
        let mut reg = Registry::default();
        let a = alive(&mut reg, "a:1", 1 << 30, now);
        let b = alive(&mut reg, "b:1", 1 << 30, now);
        let _full = alive(&mut reg, "full:1", 100, now);
        let dead = alive(&mut reg, "dead:1", 1 << 30, now);
        reg.get_mut(dead).unwrap().last_heartbeat = Some(now - Duration::from_secs(60));
        let mut chosen = reg.place(3, 1 << 20, &[], &policy, now);
        chosen.sort();
        assert_eq!(chosen, vec![a, b]);
        let chosen = reg.place(3, 1 << 20, &["a:1".to_string()], &policy, now);
        assert_eq!(chosen, vec![b]);
    }

    #[test]
    fn placement_spreads_over_equal_workers() {
        let policy = HealthPolicy::from_timeout(Duration::from_secs(4));
        let now = Instant::now();
        let mut reg = Registry::default();
        for n in 0..4 {
            alive(&mut reg, &format!("w{n}:1"), 1 << 40, now);
        }
        let mut counts = [0u32; 4];
        for _ in 0..40 {
            for i in reg.place(3, 8 << 20, &[], &policy, now) {
                counts[i as usize] += 1;
            }
        }
        assert_eq!(counts.iter().sum::<u32>(), 120);
        assert!(counts.iter().all(|&c| c == 30), "{counts:?}");
    }
}
