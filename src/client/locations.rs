//! Where this client last put or found each of its recent small files: a bounded map from a
//! name to one chunk id, its length and CRC, a capability, and the worker to ask.
//!
//! A small file's read was two round trips in a row: the master's lookup, then the worker's
//! read. With a location remembered here, [`Client::read`](super::Client::read) sends both at
//! once and keeps the worker's bytes only if the master's answer names the same chunk, with
//! the same length and CRC, on that worker as a live replica. A chunk id is never reused and
//! a chunk's bytes never change, so a remembered location can be out of date (the file was
//! replaced or deleted meanwhile) but never yields other bytes than the master's answer
//! describes: a stale guess costs one wasted small read, and the read goes on as before.
//! The bytes are still checked against the master's CRC and the file's digest.
//!
//! Bounded as two generations of [`GENERATION`] names each: entries go into the young one,
//! and a hit in the old one moves there; when the young one is full it becomes the old one
//! and the old one is dropped. So the most recently used names stay, without an order list.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;

use crate::chunk::ChunkId;
use crate::rpc::pb::{ChunkInfo, ReplicaInfo};

/// Names per generation: up to twice this many are remembered, about 250 bytes each.
pub(crate) const GENERATION: usize = 8192;
/// A read asks a remembered worker early only while fewer than this many of the client's
/// reads are under way (itself included). Many reads at once already share their lookups in
/// one master call and their worker reads in another (see `batch`). On the 2-core bench
/// host, early reads gained 5–25 % at 8 readers (15,062–15,823 reads per second against
/// 12,482–14,310), but at 16, where its cores are saturated, they cost: a p50 of
/// 0.65–0.72 ms against 0.55–0.59 and a lower median rate, in seven alternating rounds.
pub(crate) const EARLY_BELOW: usize = 16;

/// Where a small file's one chunk was last put or found.
#[derive(Clone)]
pub(crate) struct Location {
    chunk_id: ChunkId,
    length: u32,
    crc32c: u32,
    /// A capability that allows reading the chunk (copied out of the message it came in,
    /// which it would otherwise keep alive whole).
    token: Box<[u8]>,
    worker: Arc<str>,
}

impl Location {
    /// The location of `chunk` on `worker`, if it is a small chunk with a valid id.
    pub(crate) fn new(
        chunk_id: &str,
        length: u64,
        crc32c: u32,
        token: &[u8],
        worker: &str,
    ) -> Option<Location> {
        Some(Location {
            chunk_id: chunk_id.parse().ok()?,
            length: u32::try_from(length).ok()?,
            crc32c,
            token: token.into(),
            worker: worker.into(),
        })
    }

    pub(crate) fn worker(&self) -> &str {
        &self.worker
    }

    /// The chunk as a read of it needs it: this location as its only replica.
    pub(crate) fn chunk(&self) -> ChunkInfo {
        ChunkInfo {
            index: 0,
            chunk_id: self.chunk_id.to_string(),
            length: u64::from(self.length),
            crc32c: self.crc32c,
            replicas: vec![ReplicaInfo {
                worker: self.worker.to_string(),
                state: "alive".into(),
            }],
            token: Bytes::copy_from_slice(&self.token),
        }
    }

    /// Whether the master's answer `c` is the chunk remembered, with this worker among its
    /// live replicas: only then may bytes read from here stand for the file.
    pub(crate) fn matches(&self, c: &ChunkInfo) -> bool {
        c.chunk_id.parse::<ChunkId>().ok() == Some(self.chunk_id)
            && c.length == u64::from(self.length)
            && c.crc32c == self.crc32c
            && c.replicas
                .iter()
                .any(|r| r.state == "alive" && *r.worker == *self.worker)
    }
}

/// What the remembered locations did for reads, since the client connected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LocationStats {
    /// Reads whose bytes came from the worker asked beside the master.
    pub used: u64,
    /// Reads whose remembered location the master's answer did not confirm (the file was
    /// replaced, or that replica is no longer live): the bytes, if any, were dropped.
    pub stale: u64,
    /// Reads whose early worker read failed: they read again as usual.
    pub failed: u64,
}

#[derive(Default)]
struct Generations {
    young: HashMap<String, Location>,
    old: HashMap<String, Location>,
}

/// The bounded map of [`Location`]s, shared by a client's clones.
#[derive(Default)]
pub(crate) struct Locations {
    gens: Mutex<Generations>,
    /// Reads under way (see [`EARLY_BELOW`]).
    reading: AtomicUsize,
    used: AtomicU64,
    stale: AtomicU64,
    failed: AtomicU64,
}

impl Locations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.gens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a read under way until the guard drops, and says whether it may read early.
    pub(crate) fn start_read(&self) -> (Reading<'_>, bool) {
        let before = self.reading.fetch_add(1, Ordering::Relaxed);
        (Reading(&self.reading), before + 1 < EARLY_BELOW)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Location> {
        let mut g = self.lock();
        if let Some(l) = g.young.get(name) {
            return Some(l.clone());
        }
        let (name, l) = g.old.remove_entry(name)?;
        let out = l.clone();
        let dropped = insert(&mut g, name, l);
        drop(g);
        drop(dropped);
        Some(out)
    }

    pub(crate) fn put(&self, name: &str, l: Location) {
        let mut g = self.lock();
        g.old.remove(name);
        let dropped = insert(&mut g, name.to_string(), l);
        drop(g);
        drop(dropped);
    }

    pub(crate) fn forget(&self, name: &str) {
        let mut g = self.lock();
        g.young.remove(name);
        g.old.remove(name);
    }

    pub(crate) fn count_used(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> LocationStats {
        LocationStats {
            used: self.used.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.lock();
        g.young.len() + g.old.len()
    }
}

/// One read under way (see [`Locations::start_read`]).
pub(crate) struct Reading<'a>(&'a AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Inserts into the young generation, turning it old when full; returns the generation that
/// turn dropped, for the caller to free after it lets go of the lock (thousands of entries).
#[must_use]
fn insert(g: &mut Generations, name: String, l: Location) -> HashMap<String, Location> {
    let mut dropped = HashMap::new();
    if g.young.len() >= GENERATION && !g.young.contains_key(&name) {
        dropped = std::mem::replace(&mut g.old, std::mem::take(&mut g.young));
    }
    g.young.insert(name, l);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(i: u128) -> Location {
        Location::new(&ChunkId(i).to_string(), 4096, 7, b"tok", "127.0.0.1:1").unwrap()
    }

    #[test]
    fn bounded_and_the_recently_used_stay() {
        let g = GENERATION as u128;
        let l = Locations::default();
        for i in 0..=g {
            l.put(&format!("f{i}"), loc(i));
        }
        // The young generation filled and turned old; f0 is used again and moves back.
        assert!(l.get("f0").is_some());
        for i in g + 1..2 * g {
            l.put(&format!("f{i}"), loc(i));
        }
        // A second turn dropped the first generation, but not f0.
        assert!(l.len() <= 2 * GENERATION, "{}", l.len());
        assert!(l.get("f1").is_none(), "old entries are dropped");
        assert!(l.get("f0").is_some(), "a used entry survives a turn");
        let last = format!("f{}", 2 * g - 1);
        assert!(l.get(&last).is_some());
        l.forget(&last);
        assert!(l.get(&last).is_none());
    }

    #[test]
    fn reads_go_early_only_while_few_overlap() {
        let l = Locations::default();
        let mut under_way = Vec::new();
        for _ in 1..EARLY_BELOW {
            let (r, early) = l.start_read();
            assert!(early);
            under_way.push(r);
        }
        let (r, early) = l.start_read();
        assert!(
            !early,
            "the {EARLY_BELOW}th overlapping read goes the usual way"
        );
        drop(r);
        under_way.pop();
        assert!(l.start_read().1, "a read that ended makes room");
    }

    #[test]
    fn a_location_stands_only_for_the_same_chunk_on_a_live_replica() {
        let l = loc(5);
        let mut c = l.chunk();
        assert!(l.matches(&c));
        assert_eq!(c.token.as_ref(), b"tok");
        c.replicas[0].state = "suspect".into();
        assert!(!l.matches(&c), "not a live replica");
        let mut c = l.chunk();
        c.replicas[0].worker = "127.0.0.1:2".into();
        assert!(!l.matches(&c), "another worker");
        let mut c = l.chunk();
        c.chunk_id = ChunkId(6).to_string();
        assert!(!l.matches(&c), "another chunk");
        let mut c = l.chunk();
        c.crc32c = 8;
        assert!(!l.matches(&c), "another CRC");
        assert!(Location::new("not an id", 1, 0, b"", "w").is_none());
        assert!(Location::new(&ChunkId(1).to_string(), 1 << 40, 0, b"", "w").is_none());
    }
}
