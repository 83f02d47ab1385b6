//! Self-healing figures on an embedded cluster (4 workers, one disk): time to declare a
//! killed worker dead, time and throughput to re-replicate its data, and the scrub rate.
//!
//! Run: `cargo bench --bench healing` (DFS_BENCH_SIZE=256MiB for a quicker run).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dfs::client::{Client, UploadOptions};
use dfs::cluster::{LocalCluster, LocalClusterConfig};
use dfs::config::{ByteSize, human_bytes};

fn main() {
    let size: u64 = std::env::var("DFS_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse::<ByteSize>().ok())
        .map(|b| b.0)
        .unwrap_or(1 << 30);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src.bin");
    dfs::cli::bench::write_pattern(&src, size, false).expect("write the source file");
    let cfg = LocalClusterConfig {
        workers: 4,
        scrub_rate: 0,
        ..Default::default()
    };
    let (declare, heal, repaired, worker_dir) = rt.block_on(async {
        let mut cluster = LocalCluster::start(&dir.path().join("cluster"), cfg)
            .await
            .expect("cluster");
        let client = Client::connect(cluster.master_addr())
            .await
            .expect("client");
        let t = Instant::now();
        client
            .upload(
                &src,
                UploadOptions {
                    name: Some("big".into()),
                    ..Default::default()
                },
            )
            .await
            .expect("upload");
        eprintln!(
            "uploaded {} at 3 replicas in {:.1?}",
            human_bytes(size),
            t.elapsed()
        );
        let master = cluster.master().clone();
        let st = master.cluster_status();
        let victim = st
            .workers
            .iter()
            .enumerate()
            .max_by_key(|(_, w)| w.chunks_mapped)
            .map(|(i, _)| i)
            .expect("a worker");
        let addrs = cluster.worker_addrs();
        let victim_idx = addrs
            .iter()
            .position(|a| *a == st.workers[victim].address)
            .expect("victim");
        let before = master.cluster_status().repaired_bytes_total;
        let killed = Instant::now();
        cluster.kill_worker(victim_idx).expect("kill");
        let mut declare = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let s = master.cluster_status();
            if declare.is_none() && s.workers_dead == 1 {
                declare = Some(killed.elapsed());
            }
            if declare.is_some()
                && s.under_replicated_chunks == 0
                && s.repair_queue == 0
                && s.repairs_in_flight == 0
            {
                break;
            }
            assert!(Instant::now() < deadline, "did not heal: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let heal = killed.elapsed();
        let repaired = master.cluster_status().repaired_bytes_total - before;
        let survivor = (0..4).find(|&i| i != victim_idx).expect("survivor");
        let wdir = cluster.worker_dir(survivor).expect("dir").to_path_buf();
        cluster.shutdown().await;
        (declare.unwrap_or_default(), heal, repaired, wdir)
    });
    let repair_secs = (heal - declare).as_secs_f64();
    println!(
        "healing benchmark: 4 workers on one disk, {} file at 3 replicas",
        human_bytes(size)
    );
    println!("{:<44} {:>12}", "figure", "value");
    println!(
        "{:<44} {:>12.2?}",
        "time to declare the worker dead (timeout 5s)", declare
    );
    println!("{:<44} {:>12}", "data re-replicated", human_bytes(repaired));
    println!(
        "{:<44} {:>11.2}s",
        "time from dead to full replication", repair_secs
    );
    println!(
        "{:<44} {:>9}/s",
        "re-replication throughput",
        human_bytes((repaired as f64 / repair_secs.max(0.001)) as u64)
    );

    // Scrub rate: one unthrottled pass over a surviving worker's chunks.
    let store = Arc::new(dfs::worker::store::ChunkStore::open(&worker_dir, None).expect("store"));
    let stats = Arc::new(dfs::worker::scrub::ScrubStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2, stop2) = (store.clone(), stats.clone(), stop.clone());
    let t = Instant::now();
    let h = std::thread::spawn(move || {
        dfs::worker::scrub::run(
            s2,
            dfs::worker::scrub::ScrubConfig {
                rate: u64::MAX / 4,
                interval: Duration::from_secs(3600),
            },
            st2,
            stop2,
        )
    });
    while stats.passes.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let scrub = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    let bytes = stats.bytes.load(Ordering::Relaxed);
    println!(
        "{:<44} {:>9}/s",
        "scrub rate, unthrottled (page cache warm)",
        human_bytes((bytes as f64 / scrub.as_secs_f64().max(0.001)) as u64)
    );
    println!(
        "{:<44} {:>12}",
        "corrupt chunks found",
        stats.corrupt.load(Ordering::Relaxed)
    );
}
