//! Faults with the real binaries: `kill -9` and `SIGSTOP` of a worker. The cluster must return
//! to full replication by itself, lose nothing, and trim the surplus when a worker returns.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn status(b: &Binaries) -> serde_json::Value {
    let out = b.cli(&["--cmd", "status", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("status json")
}

fn healed(v: &serde_json::Value) -> bool {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    n("under_replicated_chunks") == 0
        && n("missing_chunks") == 0
        && n("repair_queue") == 0
        && n("repairs_in_flight") == 0
        && n("over_target_chunks") == 0
}

fn chunk_ids(b: &Binaries, name: &str) -> Vec<String> {
    let out = b.cli(&["--cmd", "stat", name, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["chunk_id"].as_str().unwrap().to_string())
        .collect()
}

fn worker_dir(b: &Binaries, i: usize) -> PathBuf {
    b.cwd().join(format!("worker_localhost_{}", b.workers[i].0))
}

fn holders(b: &Binaries, id: &str) -> Vec<usize> {
    (0..b.workers.len())
        .filter(|&i| chunk_path(&worker_dir(b, i), id).is_some())
        .collect()
}

fn upload_files(b: &Binaries) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for (i, size) in [17 * MIB + 5, 3 * MIB, 1].into_iter().enumerate() {
        let name = format!("f{i}.bin");
        let p = make_file(&b.cwd().join(&name), size, 50 + i as u64);
        let o = b.cli(&["--cmd", "upload", p.to_str().unwrap()]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        out.push((name, p));
    }
    out
}

fn download_equal(b: &Binaries, name: &str, original: &Path) {
    let dest = b.cwd().join(format!("dl-{}", dfs::chunk::random_u128()));
    let o = b.cli(&["--cmd", "download", name, "-o", dest.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_files_equal(&dest, original);
    std::fs::remove_file(dest).ok();
}

#[test]
fn kill9_a_worker_and_every_chunk_is_re_replicated() {
    let mut b = Binaries::start_with(4, &["--gc-grace", "500ms"]);
    b.wait_alive(4);
    let files = upload_files(&b);
    let ids: Vec<String> = files.iter().flat_map(|(n, _)| chunk_ids(&b, n)).collect();
    let victim = (0..4)
        .max_by_key(|&i| chunk_files(&worker_dir(&b, i)).len())
        .unwrap();
    let started = Instant::now();
    b.workers[victim].1.as_mut().unwrap().kill9();
    // Downloads stay byte-exact throughout.
    for (n, p) in &files {
        download_equal(&b, n, p);
    }
    let dead = b.wait_status("the worker declared dead", Duration::from_secs(20), |v| {
        v["workers_dead"].as_u64() == Some(1)
    });
    b.wait_status("full replication", Duration::from_secs(60), |v| {
        v["workers_dead"].as_u64() == Some(1) && healed(v)
    });
    eprintln!(
        "kill -9: declared dead after {:.1}s, back to 3 replicas after {:.1}s",
        dead.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for id in &ids {
        let h = holders(&b, id);
        let live: Vec<usize> = h.into_iter().filter(|&i| i != victim).collect();
        assert_eq!(live.len(), 3, "chunk {id} on {live:?}");
    }
    for (n, p) in &files {
        download_equal(&b, n, p);
    }
}

#[test]
fn a_paused_worker_is_repaired_around_and_trimmed_on_return() {
    let b = Binaries::start_with(4, &["--gc-grace", "500ms"]);
    b.wait_alive(4);
    let files = upload_files(&b);
    let ids: Vec<String> = files.iter().flat_map(|(n, _)| chunk_ids(&b, n)).collect();
    let victim = 1;
    // SIGSTOP: a hung node (as in a partition); it keeps its sockets but answers nothing.
    b.workers[victim].1.as_ref().unwrap().signal(libc::SIGSTOP);
    b.wait_status(
        "repair around the hung worker",
        Duration::from_secs(60),
        |v| v["workers_dead"].as_u64() == Some(1) && healed(v),
    );
    for (n, p) in &files {
        download_equal(&b, n, p);
    }
    // SIGCONT: it returns with its old copies; the surplus is trimmed, nothing is lost.
    b.workers[victim].1.as_ref().unwrap().signal(libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status(&b);
        let exact = ids.iter().all(|id| holders(&b, id).len() == 3);
        if v["workers_alive"].as_u64() == Some(4)
            && healed(&v)
            && v["pending_deletions"].as_u64() == Some(0)
            && exact
        {
            break;
        }
        let spread: Vec<usize> = ids.iter().map(|id| holders(&b, id).len()).collect();
        assert!(Instant::now() < deadline, "not trimmed: {spread:?} {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (n, p) in &files {
        download_equal(&b, n, p);
    }
    let o = b.cli(&["--cmd", "fsck"]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("every chunk is at its replica target"),
        "{}",
        o.stdout
    );
}

#[test]
fn metadata_is_rebuilt_from_the_workers_after_the_master_loses_its_data_dir() {
    // A long grace keeps the replaced version's chunks on the workers: the rebuild must
    // still bring back the newest version.
    let mut b = Binaries::start_with(3, &["--gc-grace", "10m"]);
    b.wait_alive(3);
    let big = make_file(&b.cwd().join("big.bin"), 17 * MIB + 3, 1);
    let small = make_file(&b.cwd().join("small.txt"), 10, 2);
    let v1 = make_file(&b.cwd().join("doc-v1"), 9 * MIB, 3);
    let v2 = make_file(&b.cwd().join("doc-v2"), 2 * MIB + 1, 4);
    for (p, name) in [
        (&big, "big.bin"),
        (&small, "small.txt"),
        (&v1, "doc"),
        (&v2, "doc"),
    ] {
        let o = b.cli(&["--cmd", "upload", p.to_str().unwrap(), "--name", name]);
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    // Uploaded from a pipe: only its last chunk's header knew the file's size.
    let piped = make_file(&b.cwd().join("piped.bin"), 17 * MIB + 5, 5);
    let o = cli_raw(
        &b.master_addr(),
        b.cwd(),
        &["--cmd", "upload", "-", "--name", "piped.bin"],
        Some(std::fs::read(&piped).unwrap()),
        std::process::Stdio::null(),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The master loses everything.
    b.master.as_mut().unwrap().kill9();
    std::fs::remove_dir_all(b.cwd().join("master_data")).unwrap();
    b.master_args = ["--rebuild-from-workers", "--rebuild-window", "2s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    b.start_master();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = b.cli(&["--cmd", "ls", "--json"]);
        if o.code == 0 {
            let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
            if v["files"].as_array().map(|a| a.len()) == Some(4) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not rebuilt: {} {}\n{}",
            o.stdout,
            o.stderr,
            b.log_tail("master.log", 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    download_equal(&b, "big.bin", &big);
    download_equal(&b, "small.txt", &small);
    download_equal(&b, "doc", &v2);
    download_equal(&b, "piped.bin", &piped);
    let o = b.cli(&["--cmd", "stat", "doc"]);
    assert!(
        o.stdout.contains("rebuilt from worker chunk headers"),
        "{}",
        o.stdout
    );
    // It is a normal master again: uploads work and versions keep increasing.
    let o = b.cli(&["--cmd", "upload", v1.to_str().unwrap(), "--name", "doc"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    download_equal(&b, "doc", &v1);

    // Rebuilding over existing metadata is refused.
    b.master.as_mut().unwrap().kill9();
    b.start_master();
    let m = b.master.as_mut().unwrap();
    let status = m
        .wait_exit(Duration::from_secs(10))
        .expect("refuses and exits");
    assert!(!status.success());
    assert!(
        m.stderr_text().contains("refusing to rebuild"),
        "{}",
        m.stderr_text()
    );
}

#[test]
fn fsck_exits_non_zero_when_a_chunk_has_no_live_replica() {
    let mut b = Binaries::start(1);
    b.wait_alive(1);
    let p = make_file(&b.cwd().join("lonely.bin"), 1000, 9);
    let o = b.cli(&["--cmd", "upload", p.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = b.cli(&["--cmd", "fsck"]);
    assert_eq!(o.code, 0, "{}", o.stdout);
    b.workers[0].1.as_mut().unwrap().kill9();
    b.wait_status("the worker declared dead", Duration::from_secs(20), |v| {
        v["workers_dead"].as_u64() == Some(1)
    });
    let o = b.cli(&["--cmd", "fsck"]);
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("lonely.bin"), "{}", o.stdout);
    assert!(o.stderr.contains("no live replica"), "{}", o.stderr);
    assert_eq!(o.stderr.trim_end().lines().count(), 1);
}

/// A stream of small uploads through reserved uploads, from two clients at once, while a
/// worker and then the master are killed (`kill -9`) and restarted. Every upload that was
/// acknowledged reads back byte-exact; once the cluster settles, no upload is left open and
/// no chunk is left on a worker that belongs to no file (failed and expired reservations are
/// aborted, and their chunks deleted).
#[test]
fn small_uploads_through_reservations_survive_kill9_of_a_worker_and_the_master() {
    let mut b = Binaries::start_with(3, &["--gc-grace", "500ms", "--upload-lease", "3s"]);
    b.wait_alive(3);
    let rt = runtime();
    let src = b.cwd().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let until = Instant::now() + Duration::from_secs(8);
    let addr = b.master_addr();
    let clients: Vec<_> = (0..2u64)
        .map(|id| {
            let (addr, src) = (addr.clone(), src.clone());
            rt.spawn(async move {
                let client = dfs::client::Client::connect(&addr).await.unwrap();
                let mut acked: Vec<(String, PathBuf)> = Vec::new();
                let mut i = 0u64;
                while Instant::now() < until && i < 20_000 {
                    let name = format!("c{id}-{i}");
                    // 1 B to 16 KiB, and now and then the largest small file (128 KiB).
                    let size = if i % 50 == 49 {
                        128 * 1024
                    } else {
                        1 + (i * 7919 + id * 104_729) % (16 * 1024)
                    };
                    let path = make_file(&src.join(&name), size, id * 1_000_000 + i);
                    let opts = dfs::client::UploadOptions {
                        name: Some(name.clone()),
                        ..Default::default()
                    };
                    match client.upload(&path, opts).await {
                        Ok(_) => acked.push((name, path)),
                        // The master is down for a moment: not acknowledged, may or may not
                        // exist.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    i += 1;
                }
                let stats = client.reservations();
                (acked, stats, client)
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(2));
    b.workers[1].1.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    b.start_worker(1);
    std::thread::sleep(Duration::from_secs(2));
    b.master.as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(300));
    b.start_master();

    let mut acked = Vec::new();
    let mut committed = 0;
    let mut uploaders = Vec::new();
    for c in clients {
        let (a, stats, client) = rt.block_on(c).unwrap();
        eprintln!("client: {} acknowledged, {stats:?}", a.len());
        committed += stats.committed;
        uploaders.push((client, a.clone()));
        acked.extend(a);
    }
    assert!(committed > 0, "no upload went through a reservation");
    assert!(
        acked.len() > 100,
        "only {} uploads acknowledged",
        acked.len()
    );
    b.wait_alive(3);
    let client = rt
        .block_on(dfs::client::Client::connect(&b.master_addr()))
        .unwrap();
    for (name, path) in &acked {
        let got = rt
            .block_on(client.read(name))
            .unwrap_or_else(|e| panic!("acknowledged {name} lost: {e}"));
        assert_eq!(got, std::fs::read(path).unwrap(), "{name}");
    }
    // Each uploader reads its own files back too: it remembers where it wrote them, before
    // the worker and the master were killed, and those early reads must give way to what
    // the restarted master says.
    for (client, files) in &uploaders {
        for (name, path) in files {
            let got = rt
                .block_on(client.read(name))
                .unwrap_or_else(|e| panic!("acknowledged {name} lost for its uploader: {e}"));
            assert_eq!(got, std::fs::read(path).unwrap(), "{name}");
        }
        eprintln!("uploader's reads: {:?}", client.read_locations());
    }

    // Settled: nothing open, nothing pending, and every chunk on a worker is a live file's.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status(&b);
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        if healed(&v)
            && n("open_uploads") == 0
            && n("reserved_uploads") == 0
            && n("in_doubt_uploads") == 0
            && n("pending_deletions") == 0
            && n("orphan_chunks") == 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut live = std::collections::HashSet::new();
    for f in rt.block_on(client.list()).unwrap() {
        let st = rt.block_on(client.stat(&f.name)).unwrap();
        live.extend(st.chunks.into_iter().map(|c| c.chunk_id));
    }
    for i in 0..3 {
        for c in chunk_files(&worker_dir(&b, i)) {
            assert!(
                live.contains(&c.id),
                "chunk {} on worker {i} is no file's",
                c.id
            );
        }
    }
}

/// A client holding a reservation from before the master was killed writes its chunk after
/// the workers have re-registered with the new master (which never heard of it). The
/// worker reports the chunk with its next heartbeat, and the master collects it as an
/// orphan: it is not left on disk until the worker's next restart.
#[test]
fn a_chunk_written_to_an_upload_the_master_forgot_is_collected_without_a_worker_restart() {
    let mut b = Binaries::start_with(1, &["--gc-grace", "500ms"]);
    b.wait_alive(1);
    let rt = runtime();
    let addr = b.master_addr();
    let plan = rt.block_on(async {
        let mut m = dfs::rpc::master_client(dfs::rpc::control_channel(&addr).unwrap());
        reserve(&mut m, 1).await.uploads.remove(0)
    });
    b.master.as_mut().unwrap().kill9();
    b.start_master();
    // Alive again means the worker re-registered, with its full report, before the write.
    b.wait_alive(1);
    let data = vec![7u8; 5000];
    let placement = &plan.chunks[0];
    rt.block_on(write_chunk_direct(placement, "late", &data, None))
        .unwrap();
    let dir = worker_dir(&b, 0);
    assert!(chunk_path(&dir, &placement.chunk_id).is_some());
    let deadline = Instant::now() + Duration::from_secs(30);
    while chunk_path(&dir, &placement.chunk_id).is_some() {
        assert!(
            Instant::now() < deadline,
            "the forgotten upload's chunk was never collected: {}",
            status(&b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = status(&b);
    assert_eq!(v["orphan_chunks"].as_u64(), Some(0), "{v}");
}
