//! Self-healing on an in-process cluster: re-replication after a worker dies, surplus trimmed
//! when it returns, the scrubber finding flipped bytes, drain, orphan collection, fsck.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use dfs::rpc::pb;

/// How many worker data dirs hold each chunk of `name` on disk.
fn copies_on_disk(t: &TestCluster, workers: usize, chunk_ids: &[String]) -> HashMap<String, usize> {
    let dirs: Vec<PathBuf> = (0..workers)
        .map(|i| t.cluster.worker_dir(i).unwrap().to_path_buf())
        .collect();
    chunk_ids
        .iter()
        .map(|id| {
            let n = dirs.iter().filter(|d| chunk_path(d, id).is_some()).count();
            (id.clone(), n)
        })
        .collect()
}

async fn chunk_ids(t: &TestCluster, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for n in names {
        out.extend(
            t.client
                .stat(n)
                .await
                .unwrap()
                .chunks
                .into_iter()
                .map(|c| c.chunk_id),
        );
    }
    out
}

fn healthy(s: &pb::ClusterStatusResponse) -> bool {
    s.under_replicated_chunks == 0
        && s.missing_chunks == 0
        && s.repair_queue == 0
        && s.repairs_in_flight == 0
        && s.over_target_chunks == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_re_replicated_and_its_surplus_trimmed_on_return() {
    let mut t = TestCluster::start(small_chunks(4)).await;
    let a = make_file(&t.scratch().join("a"), 5 * MIB + 11, 1);
    let b = make_file(&t.scratch().join("b"), MIB / 3, 2);
    t.must_upload(&a, "a").await;
    t.must_upload(&b, "b").await;
    let ids = chunk_ids(&t, &["a", "b"]).await;
    assert_eq!(ids.len(), 7);

    // Kill the worker holding the most chunks.
    let counts: Vec<usize> = (0..4)
        .map(|i| chunk_files(t.cluster.worker_dir(i).unwrap()).len())
        .collect();
    let victim = (0..4).max_by_key(|&i| counts[i]).unwrap();
    t.cluster.kill_worker(victim).unwrap();
    let master = t.cluster.master().clone();
    // Declared dead, then every chunk back at 3 live replicas on the other three.
    let healed = wait_until(Duration::from_secs(30), || {
        let s = master.cluster_status();
        s.workers_dead == 1 && healthy(&s)
    })
    .await;
    assert!(healed, "not healed: {:?}", master.cluster_status());
    let s = master.cluster_status();
    assert!(s.repaired_chunks_total >= counts[victim] as u64, "{s:?}");
    for id in &ids {
        let live: Vec<usize> = (0..4)
            .filter(|&i| i != victim)
            .filter(|&i| chunk_path(t.cluster.worker_dir(i).unwrap(), id).is_some())
            .collect();
        assert_eq!(live.len(), 3, "chunk {id} on {live:?}");
    }
    t.must_download_equal("a", &a).await;
    t.must_download_equal("b", &b).await;

    // The worker returns with its old copies: the surplus is trimmed back to 3 per chunk.
    t.cluster.restart_worker(victim).await.unwrap();
    let trimmed = wait_until(Duration::from_secs(30), || {
        let s = master.cluster_status();
        s.workers_alive == 4
            && healthy(&s)
            && s.pending_deletions == 0
            && copies_on_disk(&t, 4, &ids).values().all(|&n| n == 3)
    })
    .await;
    assert!(
        trimmed,
        "surplus not trimmed: {:?} {:?}",
        copies_on_disk(&t, 4, &ids),
        master.cluster_status()
    );
    t.must_download_equal("a", &a).await;
    t.must_download_equal("b", &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_finds_flipped_bytes_and_the_copy_is_repaired() {
    let mut cfg = small_chunks(3);
    cfg.scrub_rate = 256 << 20;
    cfg.scrub_interval = Duration::from_millis(200);
    let t = TestCluster::start(cfg).await;
    let a = make_file(&t.scratch().join("a"), 2 * MIB + 5, 3);
    t.must_upload(&a, "a").await;
    let st = t.client.stat("a").await.unwrap();
    let id = st.chunks[1].chunk_id.clone();
    let wdir = t.cluster.worker_dir(2).unwrap().to_path_buf();
    let stored = chunk_path(&wdir, &id).unwrap();
    corrupt_stored(&stored, 777, 0x01).unwrap();

    let master = t.cluster.master().clone();
    let quarantined = wait_until(Duration::from_secs(20), || {
        wdir.join("quarantine").join(&id).exists()
    })
    .await;
    assert!(quarantined, "the scrubber did not find the flipped byte");
    // The master hears of it and copies a good replica back: three good copies again.
    let repaired = wait_until(Duration::from_secs(20), || {
        let s = master.cluster_status();
        healthy(&s)
            && s.corrupt_replicas == 0
            && copies_on_disk(&t, 3, std::slice::from_ref(&id))[&id] == 3
    })
    .await;
    assert!(repaired, "not repaired: {:?}", master.cluster_status());
    // And the repaired copy is the right bytes: read every replica of that chunk.
    let st = t.client.stat("a").await.unwrap();
    for r in &st.chunks[1].replicas {
        let mut w = dfs::rpc::worker_client(dfs::rpc::data_channel(&r.worker).unwrap());
        let mut stream = w
            .read_chunk(pb::ReadChunkRequest {
                chunk_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut crc = 0;
        while let Some(m) = stream.message().await.unwrap() {
            if let Some(pb::read_chunk_response::Msg::Data(b)) = m.msg {
                crc = crc32c::crc32c_append(crc, &b);
            }
        }
        assert_eq!(crc, st.chunks[1].crc32c, "replica on {}", r.worker);
    }
    t.must_download_equal("a", &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_moves_its_chunks_and_takes_no_new_ones() {
    let t = TestCluster::start(small_chunks(4)).await;
    let a = make_file(&t.scratch().join("a"), 6 * MIB, 4);
    t.must_upload(&a, "a").await;
    let ids = chunk_ids(&t, &["a"]).await;
    let addrs = t.cluster.worker_addrs();
    let counts: Vec<usize> = (0..4)
        .map(|i| chunk_files(t.cluster.worker_dir(i).unwrap()).len())
        .collect();
    let d = (0..4).max_by_key(|&i| counts[i]).unwrap();

    // The dry run shows the blast radius without changing anything.
    let plan = t.client.drain_plan(&addrs[d]).await.unwrap();
    assert_eq!(plan.chunks as usize, counts[d]);
    assert!(plan.bytes > 0 && plan.estimated_seconds < 3600);
    assert!(plan.at_risk.is_empty(), "3 replicas: nothing drops to one");
    assert!(!t.client.status().await.unwrap().workers[d].draining);

    let w = t.client.set_draining(&addrs[d], true).await.unwrap();
    assert!(w.draining);
    let master = t.cluster.master().clone();
    let drained = wait_until(Duration::from_secs(30), || {
        let s = master.cluster_status();
        let w = s.workers.iter().find(|w| w.address == addrs[d]).unwrap();
        w.state == "draining" && w.drain_remaining == 0 && s.repair_queue == 0
    })
    .await;
    assert!(drained, "{:?}", master.cluster_status());
    // Every chunk now has 3 copies without the draining worker.
    for id in &ids {
        let elsewhere = (0..4)
            .filter(|&i| i != d)
            .filter(|&i| chunk_path(t.cluster.worker_dir(i).unwrap(), id).is_some())
            .count();
        assert_eq!(elsewhere, 3, "chunk {id}");
    }
    // New uploads avoid it.
    let before = chunk_files(t.cluster.worker_dir(d).unwrap()).len();
    let b = make_file(&t.scratch().join("b"), 3 * MIB, 5);
    t.must_upload(&b, "b").await;
    assert_eq!(chunk_files(t.cluster.worker_dir(d).unwrap()).len(), before);
    // Undrain: it takes writes again.
    let w = t.client.set_draining(&addrs[d], false).await.unwrap();
    assert!(!w.draining);
    let e = t.client.set_draining("10.1.1.1:1", true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_chunks_are_listed_then_collected_after_the_grace() {
    let mut cfg = small_chunks(2);
    cfg.gc_grace = Duration::from_secs(2);
    let mut t = TestCluster::start(cfg).await;
    let keep = make_file(&t.scratch().join("keep"), MIB + 1, 1);
    t.must_upload(&keep, "keep").await;
    // A chunk written straight to a worker, never allocated by the master: an orphan once
    // the worker reports it (at its next registration).
    let orphan = dfs::chunk::ChunkId::generate().to_string();
    let data = vec![9u8; 1000];
    let addr = t.cluster.worker_addrs()[0].clone();
    let placement = pb::ChunkPlacement {
        index: 0,
        chunk_id: orphan.clone(),
        workers: vec![addr.clone()],
        ..Default::default()
    };
    write_chunk_direct(&placement, "nobody", &data, None)
        .await
        .unwrap();
    t.cluster.restart_worker(0).await.unwrap();
    let master = t.cluster.master().clone();
    let seen = wait_until(Duration::from_secs(10), || {
        master.cluster_status().orphan_chunks == 1
    })
    .await;
    assert!(seen, "orphan not noticed");
    let gc = t.client.gc_status().await.unwrap();
    let e = gc
        .entries
        .iter()
        .find(|e| e.chunk_id == orphan)
        .expect("listed");
    assert!(e.reason.contains("orphan"), "{e:?}");
    assert_eq!(e.workers, vec![addr]);
    // Still there during the grace period; gone after it.
    let dir = t.cluster.worker_dir(0).unwrap().to_path_buf();
    assert!(chunk_path(&dir, &orphan).is_some());
    let gone = wait_until(Duration::from_secs(20), || {
        chunk_path(&dir, &orphan).is_none()
    })
    .await;
    assert!(gone, "orphan never collected");
    // The real file is untouched.
    t.must_download_equal("keep", &keep).await;
    assert_eq!(master.cluster_status().orphan_chunks, 0);
}

/// What an embedded cluster's owner does when it knows no reader is left (the bench at its
/// end): garbage goes at the next heartbeats instead of after the grace, live files and
/// garbage marked later keep their chunks, and `gc --dry-run` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expedited_garbage_goes_at_once_and_nothing_else_does() {
    let mut cfg = small_chunks(3);
    cfg.gc_grace = Duration::from_secs(600);
    let t = TestCluster::start(cfg).await;
    let dir = t.scratch();
    let keep = make_file(&dir.join("keep"), MIB + 7, 1);
    let gone = make_file(&dir.join("gone"), 2 * MIB + 3, 2);
    let small = make_file(&dir.join("small"), 4096, 3);
    t.must_upload(&keep, "keep").await;
    t.must_upload(&gone, "gone").await;
    t.must_upload(&small, "small").await;
    let dead = chunk_ids(&t, &["gone", "small"]).await;
    let live = chunk_ids(&t, &["keep"]).await;
    t.client.delete("gone").await.unwrap();
    t.client.delete("small").await.unwrap();
    let gc = t.client.gc_status().await.unwrap();
    assert!(gc.entries.iter().all(|e| e.purge_in_ms > 500_000), "{gc:?}");

    // Heartbeats every 200 ms: with a 10-minute grace nothing goes by itself meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(copies_on_disk(&t, 3, &dead).values().all(|&n| n == 3));

    t.cluster.master().expedite_garbage();
    let gc = t.cluster.master().gc_status();
    assert!(gc.entries.iter().all(|e| e.purge_in_ms == 0), "{gc:?}");
    let left = t.cluster.collect_garbage_now(Duration::from_secs(15)).await;
    assert_eq!(left, 0, "garbage still pending");
    assert!(
        copies_on_disk(&t, 3, &dead).values().all(|&n| n == 0),
        "{:?}",
        copies_on_disk(&t, 3, &dead)
    );
    assert!(copies_on_disk(&t, 3, &live).values().all(|&n| n == 3));
    t.must_download_equal("keep", &keep).await;

    // Garbage marked after the call waits out the grace as before.
    t.must_upload(&gone, "later").await;
    let later = chunk_ids(&t, &["later"]).await;
    t.client.delete("later").await.unwrap();
    let gc = t.client.gc_status().await.unwrap();
    assert!(!gc.entries.is_empty() && gc.entries.iter().all(|e| e.purge_in_ms > 500_000));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(copies_on_disk(&t, 3, &later).values().all(|&n| n == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_reports_short_and_missing_chunks() {
    let mut cfg = small_chunks(3);
    cfg.replicas = 2;
    let mut t = TestCluster::start(cfg).await;
    let a = make_file(&t.scratch().join("a"), 10, 1);
    t.must_upload(&a, "a").await;
    let r = t.client.fsck().await.unwrap();
    assert!(r.files.is_empty() && r.files_checked == 1);
    // Kill both holders: the chunk has no live replica.
    let st = t.client.stat("a").await.unwrap();
    let addrs = t.cluster.worker_addrs();
    for rep in &st.chunks[0].replicas {
        let i = addrs.iter().position(|a| a == &rep.worker).unwrap();
        t.cluster.kill_worker(i).unwrap();
    }
    let master = t.cluster.master().clone();
    assert!(
        wait_until(Duration::from_secs(10), || master
            .cluster_status()
            .missing_chunks
            == 1)
        .await
    );
    let r = t.client.fsck().await.unwrap();
    assert_eq!(r.files.len(), 1);
    assert_eq!((r.files[0].chunks_missing, r.files[0].min_live), (1, 0));
    let s = master.cluster_status();
    assert!(
        s.matrix
            .iter()
            .any(|c| c.target == 2 && c.live == 0 && c.chunks == 1),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_moves_on_when_a_worker_is_full() {
    // Every worker gets 3 MiB; with 2 replicas over 3 workers the cluster holds ~4.5 MiB.
    let mut cfg = small_chunks(3);
    cfg.replicas = 2;
    cfg.worker_capacity = Some(3 * MIB);
    let t = TestCluster::start(cfg).await;
    let mut stored = Vec::new();
    let mut refused = None;
    let mut short = 0;
    for i in 0..12 {
        let p = make_file(&t.scratch().join(format!("f{i}")), MIB / 2, i);
        match t
            .client
            .upload(
                &p,
                dfs::client::UploadOptions {
                    name: Some(format!("f{i}")),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(r) => {
                // With one worker left with room, fewer copies are written, and said so.
                assert!((1..=2).contains(&r.replicas_achieved), "f{i}");
                if r.replicas_achieved < 2 {
                    short += 1;
                }
                stored.push((format!("f{i}"), p));
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        // Let usage reach the master, as it would between real uploads.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // Several files fit (placement moved on as workers filled), then a clean refusal.
    assert!(stored.len() >= 6, "only {} stored", stored.len());
    let e = refused.expect("the cluster never filled up");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    for i in 0..3 {
        let used: u64 = chunk_files(t.cluster.worker_dir(i).unwrap())
            .iter()
            .map(|c| c.disk_bytes)
            .sum();
        assert!(
            used <= 3 * MIB,
            "worker {i} holds {used} bytes, over its capacity"
        );
    }
    let names: Vec<String> = t
        .client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names.len(), stored.len(), "a refused upload became visible");
    // Files written short are counted as such, never reported healthy.
    let s = t.client.status().await.unwrap();
    assert!(s.under_replicated_chunks >= short, "{s:?}");
    for (n, p) in &stored {
        t.must_download_equal(n, p).await;
    }
}
