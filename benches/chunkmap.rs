//! The master's in-memory chunk map at scale: resident bytes per chunk, and how long one
//! scan over every chunk takes (status and the repair planner each do one, under the
//! master's lock).
//!
//! Run: `cargo bench --bench chunkmap` (DFS_BENCH_CHUNKS=N to change the default 1,000,000).

use std::time::{Duration, Instant};

use dfs::chunk::ChunkId;
use dfs::master::chunkmap::ChunkMap;
use dfs::master::registry::{HealthPolicy, Registry};

fn main() {
    let n: u64 = std::env::var("DFS_BENCH_CHUNKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mut reg = Registry::default();
    let workers: Vec<_> = (0..3)
        .map(|i| reg.intern(&format!("127.0.0.1:{}", 7000 + i)))
        .collect();
    let before = dfs::procstat::current().rss_bytes;
    let mut map = ChunkMap::default();
    for i in 0..n {
        map.insert(
            ChunkId(u128::from(i) * 7919 + 1),
            3,
            8 << 20,
            workers.clone(),
        );
    }
    let after = dfs::procstat::current().rss_bytes;
    let policy = HealthPolicy::from_timeout(Duration::from_secs(5));
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let view = reg.view(&policy, Instant::now());
        let (counts, _) = map.counts(&view);
        assert_eq!(counts.chunks, n);
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "chunk map, {n} chunks: {} resident bytes per chunk; full scan median {:.1} ms, max {:.1} ms",
        after.saturating_sub(before) / n.max(1),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    );
}
