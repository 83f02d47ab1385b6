//! Reads of small files that go to a remembered worker at the same time as the master's
//! lookup (the client's `locations`): they return the master's current bytes whatever the
//! remembered location says, after overwrites, deletes and a replica gone bad or dead.

mod common;

use std::time::Duration;

use common::*;
use dfs::client::{Client, LocationStats};

/// Uploads `path` as `name` through `client`, waiting first (bounded) for a reserved upload,
/// so that the client remembers where the file went.
async fn upload_reserved(client: &Client, path: &std::path::Path, name: &str) {
    let ready = wait_until(Duration::from_secs(5), || client.reservations().ready > 0).await;
    assert!(ready, "no reserved upload became ready");
    let before = client.reservations().committed;
    must_upload_with(client, path, name).await;
    assert_eq!(
        client.reservations().committed,
        before + 1,
        "{name} did not go through a reservation"
    );
}

/// A burst of small uploads, so that the client keeps reservations ready (it reserves only
/// once several small files go out within a short window).
async fn warm_up(t: &TestCluster) {
    let path = make_file(&t.scratch().join("warm"), 100, 9);
    for i in 0..8 {
        t.must_upload(&path, &format!("warm-{i}")).await;
    }
}

/// Reads every file through `client`, one after another, and checks its bytes.
async fn read_all_equal(client: &Client, files: &[(String, std::path::PathBuf)]) {
    for (name, path) in files {
        assert_eq!(
            client.read(name).await.unwrap(),
            std::fs::read(path).unwrap(),
            "{name}"
        );
    }
}

/// What changed in `client`'s location counts since `before`.
fn since(client: &Client, before: LocationStats) -> LocationStats {
    let now = client.read_locations();
    LocationStats {
        used: now.used - before.used,
        stale: now.stale - before.stale,
        failed: now.failed - before.failed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_just_written_or_read_are_read_beside_the_lookup() {
    let t = TestCluster::start(small_chunks(3)).await;
    let dir = t.scratch();
    let mut files = Vec::new();
    for i in 0..12u64 {
        let name = format!("s{i}");
        let path = make_file(&dir.join(&name), 1 + i * 997, 70 + i);
        t.must_upload(&path, &name).await;
        files.push((name, path));
    }
    // Not small: never remembered, read the usual way.
    let big = make_file(&dir.join("big"), 2 * MIB + 5, 3);
    t.must_upload(&big, "big").await;
    let empty = make_file(&dir.join("empty"), 0, 4);
    t.must_upload(&empty, "empty").await;
    // Some went through reservations, the first ones the usual way: both are remembered.
    let reserved = t.client.reservations().committed;
    assert!((1..12).contains(&reserved), "{:?}", t.client.reservations());

    let before = t.client.read_locations();
    read_all_equal(&t.client, &files).await;
    for _ in 0..2 {
        assert_eq!(
            t.client.read("big").await.unwrap(),
            std::fs::read(&big).unwrap()
        );
        assert!(t.client.read("empty").await.unwrap().is_empty());
    }
    let d = since(&t.client, before);
    assert_eq!(
        d,
        LocationStats {
            used: files.len() as u64,
            stale: 0,
            failed: 0
        },
        "every small file just written, and nothing else, was read beside its lookup"
    );

    // Read once, they are remembered with the answer's capability: all twelve again.
    let before = t.client.read_locations();
    read_all_equal(&t.client, &files).await;
    assert_eq!(since(&t.client, before).used, files.len() as u64);
    // A new client remembers nothing and reads the same bytes.
    let other = Client::connect(t.cluster.master_addr()).await.unwrap();
    read_all_equal(&other, &files).await;
    assert_eq!(other.read_locations(), LocationStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_location_never_serves_a_replaced_or_deleted_file() {
    let t = TestCluster::start(small_chunks(3)).await;
    let dir = t.scratch();
    let writer = Client::connect(t.cluster.master_addr()).await.unwrap();
    let v1 = make_file(&dir.join("v1"), 4096, 1);
    let v2 = make_file(&dir.join("v2"), 4096, 2);
    let large = make_file(&dir.join("large"), MIB + MIB / 2, 3);
    warm_up(&t).await;

    // Replaced by another client with bytes of the same size.
    upload_reserved(&t.client, &v1, "x").await;
    must_upload_with(&writer, &v2, "x").await;
    let before = t.client.read_locations();
    assert_eq!(
        t.client.read("x").await.unwrap(),
        std::fs::read(&v2).unwrap()
    );
    assert_eq!(
        since(&t.client, before).stale,
        1,
        "the old location was dropped"
    );
    // That read remembered the new location.
    let before = t.client.read_locations();
    assert_eq!(
        t.client.read("x").await.unwrap(),
        std::fs::read(&v2).unwrap()
    );
    assert_eq!(since(&t.client, before).used, 1);

    // Deleted by another client: not found, although the old chunk is still on the workers
    // for the garbage grace.
    writer.delete("x").await.unwrap();
    let e = t.client.read("x").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // And a new file under the name is the one read.
    must_upload_with(&writer, &v1, "x").await;
    assert_eq!(
        t.client.read("x").await.unwrap(),
        std::fs::read(&v1).unwrap()
    );

    // Replaced by a file of several chunks.
    upload_reserved(&t.client, &v2, "y").await;
    must_upload_with(&writer, &large, "y").await;
    let before = t.client.read_locations();
    assert_eq!(
        t.client.read("y").await.unwrap(),
        std::fs::read(&large).unwrap()
    );
    assert_eq!(since(&t.client, before).stale, 1);

    // Deleted by this client: forgotten at once, and not found.
    upload_reserved(&t.client, &v2, "z").await;
    t.client.delete("z").await.unwrap();
    let before = t.client.read_locations();
    let e = t.client.read("z").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert_eq!(since(&t.client, before), LocationStats::default());
}

/// The worker a client remembers for `name`: the one it reads first while all are alive.
async fn remembered_worker(t: &TestCluster, name: &str) -> usize {
    let st = t.client.stat(name).await.unwrap();
    let first = t.client.read_order(&st.chunks[0])[0].to_string();
    t.cluster
        .worker_addrs()
        .iter()
        .position(|a| *a == first)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_dead_remembered_replica_falls_back_to_the_others() {
    let mut cfg = small_chunks(3);
    cfg.repair = false;
    let mut t = TestCluster::start(cfg).await;
    let dir = t.scratch();
    let a = make_file(&dir.join("a"), 4096, 11);
    let b = make_file(&dir.join("b"), 5000, 12);
    warm_up(&t).await;
    upload_reserved(&t.client, &a, "a").await;
    upload_reserved(&t.client, &b, "b").await;

    // A corrupt copy where the client looks first: the early read fails its CRC and is
    // dropped; the usual read skips that copy and reports it.
    let w = remembered_worker(&t, "a").await;
    let id = t.client.stat("a").await.unwrap().chunks[0].chunk_id.clone();
    let wdir = t.cluster.worker_dir(w).unwrap().to_path_buf();
    corrupt_stored(&chunk_path(&wdir, &id).unwrap(), 10, 0x40).unwrap();
    let before = t.client.read_locations();
    assert_eq!(
        t.client.read("a").await.unwrap(),
        std::fs::read(&a).unwrap()
    );
    assert_eq!(since(&t.client, before).failed, 1);
    let reported = wait_until(Duration::from_secs(10), || {
        t.cluster.master().cluster_status().corrupt_replicas == 1
    })
    .await;
    assert!(reported, "the corrupt copy was never reported");

    // The remembered worker is killed: the read still returns the bytes, from another copy
    // (the early read fails, or the master already no longer lists that worker as live).
    let w = remembered_worker(&t, "b").await;
    kill_worker_and_wait(&mut t.cluster, w).await;
    let before = t.client.read_locations();
    let read = tokio::time::timeout(Duration::from_secs(20), t.client.read("b")).await;
    assert_eq!(
        read.expect("the read did not hang").unwrap(),
        std::fs::read(&b).unwrap()
    );
    let d = since(&t.client, before);
    assert_eq!((d.used, d.failed + d.stale), (0, 1), "{d:?}");
}
