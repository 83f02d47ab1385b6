//! Small files committed beside their writes (`PrepareUploads`): in doubt until their client
//! confirms them or the master settles them by asking the workers; reads wait meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dfs::client::UploadOptions;
use dfs::cluster::LocalClusterConfig;
use dfs::rpc::pb;

type Master = MasterRpc;

fn grace(grace: Duration) -> LocalClusterConfig {
    LocalClusterConfig {
        in_doubt_grace: grace,
        ..small_chunks(3)
    }
}

fn master_of(t: &TestCluster) -> Master {
    dfs::rpc::master_client(dfs::rpc::control_channel(t.cluster.master_addr()).unwrap())
}

/// Writes `data` as the chunk of `plan` to its first `copies` workers.
async fn write_to(plan: &pb::StartUploadResponse, copies: usize, data: &[u8]) {
    let mut p = plan.chunks[0].clone();
    p.workers.truncate(copies);
    write_chunk_direct(&p, "x", data, None).await.unwrap();
}

async fn prepare(m: &mut Master, commit: pb::CommitUploadRequest) -> pb::CommitUploadResult {
    commit_alone(m, commit, true).await
}

async fn commit(m: &mut Master, commit: pb::CommitUploadRequest) -> pb::CommitUploadResult {
    commit_alone(m, commit, false).await
}

/// A lookup of `name` that has not finished after `ms` milliseconds.
async fn still_waiting(lookup: &tokio::task::JoinHandle<Result<pb::FileInfo, String>>, ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    assert!(
        !lookup.is_finished(),
        "a read of an in-doubt name did not wait"
    );
}

fn spawn_stat(
    t: &TestCluster,
    name: &str,
) -> tokio::task::JoinHandle<Result<pb::FileInfo, String>> {
    let (c, name) = (t.client.clone(), name.to_string());
    tokio::spawn(async move { c.stat(&name).await.map_err(|e| e.to_string()) })
}

/// A prepared commit is durable but in doubt: lookups and listings wait for it, and its
/// client's confirmation (the same request through CommitUploads, or its id on a later
/// PrepareUploads) settles it. A
/// confirmation that does not repeat the prepare, a prepare of a name that exists or of an
/// upload that was not reserved are refused; an aborted one is gone at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_a_prepared_commit_until_its_client_confirms_or_aborts_it() {
    // A long grace: nothing here is settled by the workers.
    let t = TestCluster::start(grace(Duration::from_secs(60))).await;
    let mut m = master_of(&t);
    let plans = reserve(&mut m, 4).await.uploads;
    let data = b"written beside its commit".as_slice();

    // Prepared before its writes land, so a read's probe finds no copy and waits.
    let p = prepare(&mut m, reserved_commit(&plans[0], "confirmed", data)).await;
    let prepared = p.commit.expect("prepared");
    assert_eq!(prepared.in_doubt_ms, 60_000);
    assert_eq!(t.cluster.master().in_doubt_count(), 1);
    let lookup = spawn_stat(&t, "confirmed");
    let listing = {
        let c = t.client.clone();
        tokio::spawn(async move { c.list().await.map_err(|e| e.to_string()) })
    };
    still_waiting(&lookup, 300).await;
    assert!(!listing.is_finished(), "a listing showed an in-doubt name");
    write_to(&plans[0], 3, data).await;

    let mut wrong = reserved_commit(&plans[0], "confirmed", data);
    wrong.chunks[0].crc32c ^= 1;
    let r = commit(&mut m, wrong).await;
    assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{r:?}");
    assert!(r.message.contains("does not repeat"), "{r:?}");

    let r = commit(&mut m, reserved_commit(&plans[0], "confirmed", data)).await;
    assert!(r.commit.is_some(), "{r:?}");
    let info = tokio::time::timeout(Duration::from_secs(10), lookup)
        .await
        .expect("the lookup ends once confirmed")
        .unwrap()
        .unwrap();
    assert_eq!(info.size, data.len() as u64);
    let names: Vec<String> = tokio::time::timeout(Duration::from_secs(10), listing)
        .await
        .expect("the listing ends once confirmed")
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["confirmed"]);
    assert_eq!(t.client.read("confirmed").await.unwrap(), data);
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    // Settled: a second confirmation finds nothing in doubt.
    let r = commit(&mut m, reserved_commit(&plans[0], "confirmed", data)).await;
    assert_eq!(r.code, tonic::Code::NotFound as i32, "{r:?}");

    // A name that exists is committed after the writes, not beside them.
    let r = prepare(&mut m, reserved_commit(&plans[1], "confirmed", data)).await;
    assert_eq!(r.code, tonic::Code::AlreadyExists as i32, "{r:?}");
    assert_eq!(t.client.read("confirmed").await.unwrap(), data);
    // Only reserved uploads.
    let started = m
        .start_upload(pb::StartUploadRequest {
            name: "started".into(),
            size: data.len() as u64,
            replicas: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut c = reserved_commit(&started, "", data);
    c.size = 0;
    let r = prepare(&mut m, c).await;
    assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{r:?}");

    // Aborted by its client (a write failed): gone, and its chunk is garbage.
    let r = prepare(&mut m, reserved_commit(&plans[2], "aborted", data)).await;
    assert!(r.commit.is_some(), "{r:?}");
    let lookup = spawn_stat(&t, "aborted");
    still_waiting(&lookup, 200).await;
    m.abort_upload(pb::AbortUploadRequest {
        upload_id: plans[2].upload_id.clone(),
    })
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), lookup)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.contains("not found"), "{e}");
    let r = commit(&mut m, reserved_commit(&plans[2], "aborted", data)).await;
    assert_eq!(r.code, tonic::Code::NotFound as i32, "{r:?}");
    let gc = t.cluster.master().gc_status();
    assert!(
        gc.entries
            .iter()
            .any(|c| c.chunk_id == plans[2].chunks[0].chunk_id),
        "the aborted chunk is not garbage: {gc:?}"
    );

    // Confirmed by id, on a prepare call (as a client does on its next one); an unknown id
    // is skipped. Only PrepareUploads carries ids.
    let more = reserve(&mut m, 1).await.uploads;
    write_to(&more[0], 3, data).await;
    let r = prepare(&mut m, reserved_commit(&more[0], "by-id", data)).await;
    assert!(r.commit.is_some(), "{r:?}");
    let refused = m
        .commit_uploads(pb::CommitUploadsRequest {
            confirm_upload_ids: vec![more[0].upload_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let answered = m
        .prepare_uploads(pb::CommitUploadsRequest {
            commits: Vec::new(),
            confirm_upload_ids: vec![more[0].upload_id.clone(), "0".repeat(32)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(answered.is_empty(), "{answered:?}");
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    assert_eq!(t.client.read("by-id").await.unwrap(), data);

    // Deleted while in doubt: the delete wins, the confirmation finds nothing.
    let r = prepare(&mut m, reserved_commit(&plans[3], "deleted", data)).await;
    assert!(r.commit.is_some(), "{r:?}");
    t.client.delete("deleted").await.unwrap();
    let r = commit(&mut m, reserved_commit(&plans[3], "deleted", data)).await;
    assert_eq!(r.code, tonic::Code::NotFound as i32, "{r:?}");
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    t.cluster.shutdown().await;
}

/// A client that prepares and never confirms (it died): a read asks the workers at once and
/// gets the file if every worker of the placement holds it. After the grace, a copy on
/// some of them is enough (repair makes up the rest), and one that no worker holds is
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_settles_what_a_vanished_client_prepared_by_asking_the_workers() {
    let t = TestCluster::start(grace(Duration::from_millis(800))).await;
    let mut m = master_of(&t);
    let plans = reserve(&mut m, 3).await.uploads;
    let data = b"the client died before it confirmed".as_slice();

    write_to(&plans[0], 3, data).await;
    assert!(
        prepare(&mut m, reserved_commit(&plans[0], "all", data))
            .await
            .commit
            .is_some()
    );
    write_to(&plans[1], 2, data).await;
    assert!(
        prepare(&mut m, reserved_commit(&plans[1], "two", data))
            .await
            .commit
            .is_some()
    );
    assert!(
        prepare(&mut m, reserved_commit(&plans[2], "none", data))
            .await
            .commit
            .is_some()
    );

    // Every worker holds it: settled at the first read, inside the grace.
    let asked = Instant::now();
    assert_eq!(t.client.read("all").await.unwrap(), data);
    assert!(
        asked.elapsed() < Duration::from_millis(800),
        "waited for the grace"
    );
    let all = t.client.stat("all").await.unwrap();
    assert_eq!(all.chunks[0].replicas.len(), 3);

    // Two of three: kept after the grace, with those two, then repaired to three.
    assert_eq!(t.client.read("two").await.unwrap(), data);
    let mut live = 0;
    for _ in 0..200 {
        live = t.client.stat("two").await.unwrap().replicas_min_live;
        if live == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(live, 3, "the file kept from two copies was not repaired");

    // None: dropped, its chunk is garbage.
    let e = t.client.read("none").await.unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    let (backlog, _) = t.cluster.master().events().subscribe(1000);
    let said = |s: &str| backlog.iter().any(|e| e.message.contains(s));
    assert!(said(
        "uploaded \"two\": its client did not confirm it, its workers did"
    ));
    assert!(said(
        "dropped \"none\": its client did not confirm it and no worker holds it"
    ));
    t.cluster.shutdown().await;
}

/// Through the client: small files of new names go through prepares (and none is left in
/// doubt once the client settles); files that replace others commit after their writes; a
/// worker that fails a write makes the client abort its prepare and upload the file again
/// elsewhere, so every file reads back whole and none is in doubt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_creates_commit_beside_their_writes_and_fall_back_when_they_cannot() {
    // Three workers: every placement has all of them, so the one killed below is in every
    // reserved placement.
    let mut t = TestCluster::start(grace(Duration::from_secs(60))).await;
    let dir = t.scratch();
    let files: Vec<_> = (0..96)
        .map(|i| make_file(&dir.join(format!("f{i}")), 1000 + i, i))
        .collect();
    // 48 uploads at once, each of its own name.
    let upload_all = |prefix: &'static str, half: usize| {
        let tasks: Vec<_> = files[half * 48..(half + 1) * 48]
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let (c, f) = (t.client.clone(), f.clone());
                tokio::spawn(async move {
                    c.upload(
                        &f,
                        UploadOptions {
                            name: Some(format!("{prefix}-{i}")),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        async move {
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
    };
    let reads_back = |prefix: &'static str, half: usize| {
        let (c, files) = (t.client.clone(), files.clone());
        async move {
            for i in 0..48 {
                let name = format!("{prefix}-{i}");
                let want = std::fs::read(&files[half * 48 + i]).unwrap();
                assert!(c.read(&name).await.unwrap() == want, "{name}");
            }
        }
    };
    // The first round builds up the demand that reserves uploads ahead.
    upload_all("warm", 0).await;
    let before = t.client.reservations();
    upload_all("new", 0).await;
    t.client.settle().await;
    let after = t.client.reservations();
    assert!(
        after.prepared > before.prepared,
        "no create went beside its writes: {before:?} then {after:?}"
    );
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    reads_back("new", 0).await;

    // Replacing each of them: committed after the writes (or the usual way).
    upload_all("new", 1).await;
    t.client.settle().await;
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    reads_back("new", 1).await;

    // A worker stops: writes to it fail, their prepares are aborted, and the files go
    // again on the two left.
    let before = t.client.reservations();
    kill_worker_and_wait(&mut t.cluster, 0).await;
    upload_all("after-kill", 0).await;
    t.client.settle().await;
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    let after = t.client.reservations();
    assert!(
        after.fell_back > before.fell_back,
        "no reserved upload met the stopped worker: {before:?} then {after:?}"
    );
    reads_back("after-kill", 0).await;
    let names = t.client.list().await.unwrap();
    assert_eq!(names.len(), 3 * 48, "a failed attempt left a name behind");
    t.cluster.shutdown().await;
}

/// A worker that cannot be asked decides nothing: a prepare that the two others do not hold
/// stays in doubt while the third is down, reads of it say so (`Unavailable`) instead of
/// calling it gone, and deleting it works meanwhile. Once the worker is back and says it
/// does not hold the chunk either, the name is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_be_asked_keeps_a_name_in_doubt_and_reads_say_so() {
    let mut t = TestCluster::start(grace(Duration::from_millis(300))).await;
    let mut m = master_of(&t);
    let plans = reserve(&mut m, 2).await.uploads;
    let data = b"never written anywhere".as_slice();
    let down = t
        .cluster
        .worker_addrs()
        .iter()
        .position(|a| *a == plans[0].chunks[0].workers[0])
        .unwrap();
    t.cluster.kill_worker(down).unwrap();
    assert!(
        prepare(&mut m, reserved_commit(&plans[0], "stuck", data))
            .await
            .commit
            .is_some()
    );
    assert!(
        prepare(&mut m, reserved_commit(&plans[1], "deleted", data))
            .await
            .commit
            .is_some()
    );

    let e = t.client.stat("stuck").await.unwrap_err();
    assert!(e.to_string().contains("in doubt"), "{e}");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(t.cluster.master().in_doubt_count(), 2);
    t.client.delete("deleted").await.unwrap();
    assert_eq!(t.cluster.master().in_doubt_count(), 1);

    t.cluster.restart_worker(down).await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        match t.client.stat("stuck").await {
            Err(e) if e.to_string().contains("not found") => {
                gone = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        gone,
        "the name was not dropped once every worker said it holds nothing"
    );
    assert_eq!(t.cluster.master().in_doubt_count(), 0);
    t.cluster.shutdown().await;
}
