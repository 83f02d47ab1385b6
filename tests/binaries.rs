//! The real binaries, driven like a user would: four terminals' worth of daemons, the CLI,
//! `kill -9` of a worker and of the master, and the CLI's errors and exit codes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn upload(b: &Binaries, path: &Path) -> CliOut {
    let out = b.cli(&["--cmd", "upload", path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "upload failed: {}", out.stderr);
    out
}

/// The version `stat` reports for `name`.
fn version_of(b: &Binaries, name: &str) -> u64 {
    let out = b.cli(&["--cmd", "stat", name]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("version:"))
        .unwrap_or_else(|| panic!("no version in {}", out.stdout));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn download_and_compare(b: &Binaries, name: &str, original: &Path) {
    let dest = b.cwd().join(format!("dl-{}", dfs::chunk::random_u128()));
    let out = b.cli(&["--cmd", "download", name, "-o", dest.to_str().unwrap()]);
    assert_eq!(out.code, 0, "download of {name} failed: {}", out.stderr);
    assert_files_equal(&dest, original);
    std::fs::remove_file(dest).ok();
}

#[test]
fn cli_round_trip_then_kill9_a_worker_then_the_master() {
    let mut b = Binaries::start(3);
    b.wait_alive(3);
    let files: Vec<PathBuf> = [(20 * MIB + 3, "photo.jpg"), (1, "one.txt"), (0, "empty")]
        .iter()
        .enumerate()
        .map(|(i, (size, name))| make_file(&b.cwd().join(name), *size, i as u64))
        .collect();

    let out = upload(&b, &files[0]);
    assert!(
        out.stdout.contains("photo.jpg")
            && out.stdout.contains("3 chunks")
            && out.stdout.contains("3/3 replicas"),
        "{}",
        out.stdout
    );
    upload(&b, &files[1]);
    upload(&b, &files[2]);

    let ls = b.cli(&["--cmd", "ls"]);
    assert_eq!(ls.code, 0);
    for n in ["photo.jpg", "one.txt", "empty"] {
        assert!(ls.stdout.contains(n), "{}", ls.stdout);
    }
    let stat = b.cli(&["--cmd", "stat", "photo.jpg"]);
    assert!(
        stat.stdout
            .contains(&format!("blake3:     {}", blake3_file(&files[0]))),
        "{}",
        stat.stdout
    );
    let json = b.cli(&["--cmd", "stat", "photo.jpg", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["chunks"].as_array().unwrap().len(), 3);
    assert_eq!(v["chunks"][0]["replicas"].as_array().unwrap().len(), 3);
    // Chunks are in the workers' default directories; logs in logs/.
    for (port, _) in &b.workers {
        let d = b.cwd().join(format!("worker_localhost_{port}"));
        assert_eq!(chunk_files(&d).len(), 4, "{}", d.display());
        assert!(b.cwd().join(format!("logs/worker-{port}.log")).exists());
    }
    assert!(b.cwd().join("logs/master.log").exists());
    assert!(b.cwd().join("master_data").is_dir());

    // kill -9 one worker: downloads stay byte-exact and uploads still succeed.
    b.workers[0].1.as_mut().unwrap().kill9();
    for (f, n) in files.iter().zip(["photo.jpg", "one.txt", "empty"]) {
        download_and_compare(&b, n, f);
    }
    let late = make_file(&b.cwd().join("late.bin"), 9 * MIB, 7);
    let out = upload(&b, &late);
    assert!(out.stdout.contains("2/3 replicas"), "{}", out.stdout);
    download_and_compare(&b, "late.bin", &late);
    b.wait_alive(2);
    let st = b.cli(&["--cmd", "status"]);
    assert!(st.stdout.contains("dead"), "{}", st.stdout);

    // An upload left open when the master dies: uploads are held in the master's memory.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = b.master_addr();
    let open_upload = rt.block_on(async {
        let mut m = dfs::rpc::master_client(dfs::rpc::control_channel(&addr).unwrap());
        m.start_upload(dfs::rpc::pb::StartUploadRequest {
            name: "in-flight".into(),
            size: 10,
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    let old_version = version_of(&b, "one.txt");

    // A daemon's stderr here is a file, not a terminal: no colour codes. The worker's
    // warning ("suspect", then "dead") comes from the master's health watcher and a batched
    // log writer, so it may land a little after `status` shows the worker dead.
    let mut stderr = String::new();
    for _ in 0..100 {
        stderr = b.master.as_mut().unwrap().stderr_text();
        if stderr.contains("WARN") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in a non-terminal stderr: {stderr}"
    );

    // kill -9 the master and restart it on the same directory: nothing acknowledged is lost.
    b.master.as_mut().unwrap().kill9();
    b.start_master();
    b.wait_alive(2);
    // What was acknowledged came back from the journal (the store itself is made durable
    // only at checkpoints).
    let log = std::fs::read_to_string(b.cwd().join("logs/master.log")).unwrap();
    assert!(log.contains("metadata journal replayed"), "{log}");
    // The upload open at the crash cannot be committed, so nothing of it ever shows.
    let e = rt
        .block_on(async {
            let mut m = dfs::rpc::master_client(dfs::rpc::control_channel(&addr).unwrap());
            m.commit_upload(dfs::rpc::pb::CommitUploadRequest {
                upload_id: open_upload.upload_id.clone(),
                chunks: vec![],
                sha256: "0".repeat(64),
                ..Default::default()
            })
            .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(b.cli(&["--cmd", "stat", "in-flight"]).code != 0);
    let ls = b.cli(&["--cmd", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
    let names: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["empty", "late.bin", "one.txt", "photo.jpg"]);
    for (f, n) in files.iter().zip(["photo.jpg", "one.txt", "empty"]) {
        download_and_compare(&b, n, f);
    }
    download_and_compare(&b, "late.bin", &late);
    // Versions handed out after the restart are above every one committed before it (one
    // handed to an upload that never committed may come again).
    let newest = old_version.max(version_of(&b, "late.bin"));
    upload(&b, &files[1]);
    assert!(version_of(&b, "one.txt") > newest);
    download_and_compare(&b, "one.txt", &files[1]);

    // Delete works after all that, and the name is gone.
    let out = b.cli(&["--cmd", "delete", "photo.jpg"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = b.cli(&["--cmd", "stat", "photo.jpg"]);
    assert_eq!(out.code, 1);
}

/// Small files live as records in the workers' volume files: after `kill -9` of every
/// worker at once, each restarted worker serves every acknowledged file byte-exact, and a
/// delete acknowledged before the kill stays deleted.
#[test]
fn small_files_in_volumes_survive_kill9_of_every_worker() {
    let mut b = Binaries::start_with(3, &["--gc-grace", "200ms"]);
    b.wait_alive(3);
    let files: Vec<(String, PathBuf)> = (0..12u64)
        .map(|i| {
            let name = format!("small-{i}");
            let path = make_file(&b.cwd().join(&name), 1 + i * 9973, 100 + i);
            (name, path)
        })
        .collect();
    for (_, p) in &files {
        upload(&b, p);
    }
    let out = b.cli(&["--cmd", "delete", "small-0"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    b.wait_status(
        "the delete applied on the workers",
        Duration::from_secs(30),
        |v| v["pending_deletions"].as_u64() == Some(0),
    );
    let dirs: Vec<PathBuf> = b
        .workers
        .iter()
        .map(|(port, _)| b.cwd().join(format!("worker_localhost_{port}")))
        .collect();
    for d in &dirs {
        let held = chunk_files(d);
        assert_eq!(held.len(), 11, "{}", d.display());
        assert!(
            held.iter()
                .all(|c| c.path.extension().is_some_and(|e| e == "vol")),
            "small chunks are volume records: {held:?}"
        );
    }
    for i in 0..3 {
        b.workers[i].1.as_mut().unwrap().kill9();
    }
    for i in 0..3 {
        b.start_worker(i);
    }
    b.wait_alive(3);
    for (name, path) in &files[1..] {
        download_and_compare(&b, name, path);
    }
    for d in &dirs {
        assert_eq!(chunk_files(d).len(), 11, "{}", d.display());
    }
}

#[test]
fn cli_errors_are_one_line_and_non_zero() {
    let mut b = Binaries::start(1);
    b.wait_alive(1);
    let one_line = |o: &CliOut| {
        assert_ne!(o.code, 0, "expected failure: {}", o.stdout);
        assert_eq!(
            o.stderr.trim_end().lines().count(),
            1,
            "not one line: {:?}",
            o.stderr
        );
    };
    let src = make_file(&b.cwd().join("a.txt"), 1000, 1);

    let o = b.cli(&["--cmd", "upload", "missing.bin"]);
    one_line(&o);
    assert!(o.stderr.contains("missing.bin"), "{}", o.stderr);
    let o = b.cli(&["--cmd", "upload", "a.txt", "--name", "bad/name"]);
    one_line(&o);
    assert!(o.stderr.contains("file name"), "{}", o.stderr);
    let o = b.cli(&["--cmd", "download", "nothing-here"]);
    one_line(&o);
    assert!(o.stderr.contains("not found"), "{}", o.stderr);
    assert!(!b.cwd().join("nothing-here").exists());
    let o = b.cli(&["--cmd", "delete", "nothing-here", "--json"]);
    one_line(&o);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["code"], "NotFound");

    // The destination exists: refused, untouched; --force replaces it.
    upload(&b, &src);
    std::fs::write(b.cwd().join("a.txt.keep"), b"mine").unwrap();
    let o = b.cli(&["--cmd", "download", "a.txt", "-o", "a.txt.keep"]);
    one_line(&o);
    assert!(o.stderr.contains("--force"), "{}", o.stderr);
    assert_eq!(std::fs::read(b.cwd().join("a.txt.keep")).unwrap(), b"mine");
    let o = b.cli(&["--cmd", "download", "a.txt", "-o", "a.txt.keep", "--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_files_equal(&b.cwd().join("a.txt.keep"), &src);

    // Usage errors are one line too, and a missing argument is named.
    let o = b.cli(&["--cmd", "frobnicate"]);
    one_line(&o);
    let o = b.cli(&["--cmd", "stat"]);
    one_line(&o);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("<NAME>"), "{}", o.stderr);
    let o = b.cli(&["--async-threads", "0", "--cmd", "ls"]);
    one_line(&o);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--async-threads"), "{}", o.stderr);
    // More async threads than the default work the same.
    let o = b.cli(&["--async-threads", "4", "--cmd", "ls"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("a.txt"), "{}", o.stdout);

    // Master unreachable: a bounded, clear failure.
    let nobody = format!("127.0.0.1:{}", free_port());
    let o = cli(&nobody, b.cwd(), &["--cmd", "ls"]);
    one_line(&o);
    assert!(o.stderr.contains("cannot reach the master"), "{}", o.stderr);
    assert!(o.elapsed < Duration::from_secs(15), "took {:?}", o.elapsed);

    // A worker on a port in use, or with a data dir it cannot write, exits with a clear error.
    let used = b.workers[0].0.to_string();
    let mut w = Daemon::spawn(
        WORKER,
        &["--port", &used, "--master", &b.master_addr()],
        b.cwd(),
    );
    let status = w.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    let err = w.stderr_text();
    assert!(err.contains("cannot listen"), "{err}");
    // A listen address that is no address fails before any warning about what it exposes.
    let mut m = Daemon::spawn(MASTER, &["--listen", "not-an-address"], b.cwd());
    let status = m.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    let err = m.stderr_text();
    assert!(err.contains("cannot listen on not-an-address"), "{err}");
    assert!(!err.contains("beyond loopback"), "{err}");
    std::fs::write(b.cwd().join("plainfile"), b"x").unwrap();
    let port = free_port().to_string();
    let mut w = Daemon::spawn(
        WORKER,
        &[
            "--port",
            &port,
            "--master",
            &b.master_addr(),
            "--data-dir",
            "plainfile/sub",
        ],
        b.cwd(),
    );
    let status = w.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    let err = w.stderr_text();
    assert!(err.contains("data dir"), "{err}");

    // SIGTERM: graceful shutdown with exit code 0.
    let m = b.master.as_mut().unwrap();
    m.signal(libc::SIGTERM);
    let status = m
        .wait_exit(Duration::from_secs(15))
        .expect("master exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let w = b.workers[0].1.as_mut().unwrap();
    w.signal(libc::SIGTERM);
    let status = w
        .wait_exit(Duration::from_secs(15))
        .expect("worker exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn bench_runs_every_phase_on_an_embedded_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let o = cli(
        "127.0.0.1:1",
        dir.path(),
        &[
            "--local",
            "3",
            "--cmd",
            "bench",
            "--size",
            "3MiB",
            "--files",
            "12",
            "--concurrency",
            "1,4",
            "--limits",
            "--warm",
            "--meta-files",
            "25000",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    let large = v["large"].as_array().unwrap();
    let phases: Vec<&str> = large.iter().map(|t| t["phase"].as_str().unwrap()).collect();
    assert_eq!(
        phases,
        [
            "upload, 1 replica(s)",
            "download, 1 replica(s)",
            "upload, 3 replica(s)",
            "download, 3 replica(s)"
        ]
    );
    assert!(
        large
            .iter()
            .all(|t| t["bytes"] == 3 << 20 && t["of_limit"].is_number())
    );
    let small = v["small"].as_array().unwrap();
    assert_eq!(small.len(), 8);
    for s in small {
        assert_eq!(
            (s["ops"].as_u64(), s["failed"].as_u64()),
            (Some(12), Some(0)),
            "{s}"
        );
    }
    assert!(v["limits"]["write_fsync_mib_s"].as_f64().unwrap() > 0.0);
    assert!(v["limits"]["small_write_fsync_per_s"].as_f64().unwrap() > 0.0);
    // Creates and deletes are set against the 4 KiB write+fsync rate; reads and stats not.
    for s in small {
        let writes = matches!(s["phase"].as_str(), Some("create" | "delete"));
        assert_eq!(s["of_limit"].is_number(), writes, "{s}");
    }
    // Metadata scale: 25,000 names in three batches, measured, then deleted.
    let meta = &v["meta"];
    assert_eq!(meta["files"], 25_000);
    assert!(meta["create_per_s"].as_f64().unwrap() > 0.0);
    assert!(meta["stat_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(meta["master_rss_after"].as_u64().unwrap() > 0);
    // Every phase has its resource row; with --local it is the one embedded process.
    let res = v["resources"].as_array().unwrap();
    assert_eq!(res.len(), 4 + 8 + 1, "{res:?}");
    assert!(
        res.iter()
            .all(|r| r["process"] == "embedded" && r["peak_bytes"].as_u64() > Some(0))
    );
    // Reads at one client went to a worker beside their lookups, every one of them (the
    // client remembers where each small file it created went), and none missed.
    let read1 = small
        .iter()
        .find(|s| s["phase"] == "read" && s["concurrency"] == 1)
        .unwrap();
    assert_eq!(
        (read1["beside"].as_u64(), read1["beside_missed"].as_u64()),
        (Some(12), Some(0))
    );
    // It cleans up after itself: nothing left in the cluster or the scratch dir, and the
    // deleted files' chunks are gone from the workers' disks (not left for the garbage grace).
    assert!(!dir.path().join("dfs-bench").exists());
    for i in 0..3 {
        let w = dir.path().join(format!("dfs-local/worker-{i}"));
        assert!(w.is_dir(), "{}", w.display());
        let left = chunk_files(&w);
        assert!(
            left.is_empty(),
            "worker {i} still holds {} chunk(s)",
            left.len()
        );
    }
}

/// Against real daemons the benchmark's resource rows come from each daemon, asked at the
/// start and end of every phase (heartbeat figures lag by up to an interval, which showed
/// workers at 0 CPU through whole phases).
#[test]
fn bench_against_real_daemons_asks_each_daemon_for_its_figures() {
    let b = Binaries::start(3);
    b.wait_alive(3);
    let rt = runtime();
    let (worker_pid, master_pid) = (
        b.workers[0].1.as_ref().unwrap().child.id(),
        b.master.as_ref().unwrap().child.id(),
    );
    let (w, m) = rt.block_on(async {
        let addr = format!("127.0.0.1:{}", b.workers[0].0);
        let mut wc = dfs::rpc::worker_client(dfs::rpc::data_channel(&addr).unwrap());
        let ask = dfs::rpc::pb::ProcessStatsRequest { reset_peak: true };
        let w = wc
            .process_stats(ask)
            .await
            .expect("worker answers")
            .into_inner();
        let ch = dfs::rpc::data_channel(&b.master_addr()).unwrap();
        let mut mc = dfs::rpc::master_client(ch);
        let m = mc
            .process_stats(ask)
            .await
            .expect("master answers")
            .into_inner();
        (w, m)
    });
    assert_eq!((w.pid, m.pid), (worker_pid, master_pid));
    for p in [&w, &m] {
        assert!(p.rss_bytes > 0 && p.peak_rss_bytes >= p.rss_bytes, "{p:?}");
    }

    let o = b.cli(&[
        "--cmd",
        "bench",
        "--no-large",
        "--files",
        "200",
        "--concurrency",
        "1",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    let res = v["resources"].as_array().unwrap();
    let mut workers: Vec<String> = b
        .workers
        .iter()
        .map(|(port, _)| format!("worker 127.0.0.1:{port}"))
        .collect();
    workers.sort();
    for phase in ["create", "read", "stat", "delete"] {
        let phase = format!("4 KiB {phase}, c=1");
        let rows: Vec<&serde_json::Value> = res.iter().filter(|r| r["phase"] == phase).collect();
        let mut names: Vec<&str> = rows
            .iter()
            .map(|r| r["process"].as_str().unwrap())
            .collect();
        names.sort();
        let mut want = vec!["client", "master"];
        want.extend(workers.iter().map(String::as_str));
        assert_eq!(names, want, "{phase}");
        assert!(
            rows.iter().all(|r| r["peak_bytes"].as_u64() > Some(0)),
            "{rows:?}"
        );
    }
    // 200 fsynced chunk writes cost every worker CPU time in the create phase itself.
    for r in res.iter().filter(|r| r["phase"] == "4 KiB create, c=1") {
        assert!(r["cpu_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// A bench that stops on an error removes what it made: here the cluster has no room for
/// the large file, so the run fails with the cluster's error and leaves neither the scratch
/// file (`--size` bytes) nor any name behind.
#[test]
fn a_failed_bench_leaves_nothing_behind() {
    let b = Binaries::start_with_args(3, &[], &["--capacity", "4MiB"], &[]);
    b.wait_alive(3);
    let o = b.cli(&[
        "--cmd",
        "bench",
        "--size",
        "24MiB",
        "--files",
        "5",
        "--concurrency",
        "1",
    ]);
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.stderr);
    assert_no_bench_left(&b);
}

/// No scratch dir and no bench name in the cluster.
fn assert_no_bench_left(b: &Binaries) {
    assert!(
        !b.cwd().join("dfs-bench").exists(),
        "scratch dir left behind"
    );
    let ls = b.cli(&["--cmd", "ls"]);
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    assert!(!ls.stdout.contains("dfs-bench-"), "{}", ls.stdout);
}

/// A bench against `b` that has begun creating its small files (it runs for minutes more).
fn bench_creating_files(b: &Binaries) -> Daemon {
    let master = b.master_addr();
    let mut bench = Daemon::spawn_logging(
        env!("CARGO_BIN_EXE_dfs-tui"),
        &[
            "--master",
            &master,
            "--cmd",
            "bench",
            "--no-large",
            "--files",
            "1000000",
            "--concurrency",
            "16",
        ],
        b.cwd(),
        None,
    );
    for _ in 0..200 {
        if b.cli(&["--cmd", "stat", "dfs-bench-small-16-0"]).code == 0 {
            return bench;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the bench never created a file: {}", bench.stderr_text());
}

/// Ctrl-C stops a bench cleanly: the operations in flight finish, everything it created is
/// deleted (so no commit lands after the cleanup), and it exits 130 with one line.
#[test]
fn an_interrupted_bench_cleans_up_and_exits_130() {
    let b = Binaries::start(3);
    b.wait_alive(3);
    // Interrupt it once it is creating files.
    let mut bench = bench_creating_files(&b);
    bench.signal(libc::SIGINT);
    let status = bench
        .wait_exit(Duration::from_secs(60))
        .expect("the bench exits after SIGINT");
    let stderr = bench.stderr_text();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_no_bench_left(&b);
}

/// A bench killed with -9 cannot clean up; `--cmd bench --clean` deletes what it left (its
/// names and scratch files) and nothing else.
#[test]
fn bench_clean_removes_what_a_killed_bench_left() {
    let b = Binaries::start(3);
    b.wait_alive(3);
    // Names around the bench's own: they stay. And 25,000 of the bench's metadata names, more
    // than one page of the listing.
    std::fs::create_dir(b.cwd().join("mine")).unwrap();
    for n in ["keep.txt", "dfs-benchmark.txt", "dfs-bench"] {
        let f = make_file(&b.cwd().join("mine").join(n), 10, 1);
        assert_eq!(upload(&b, &f).code, 0);
    }
    let rt = runtime();
    rt.block_on(async {
        let c = dfs::client::Client::connect(&b.master_addr())
            .await
            .unwrap();
        for start in (0..25_000).step_by(10_000) {
            let names = (start..(start + 10_000).min(25_000))
                .map(|i| format!("dfs-bench-meta-{i:09}"))
                .collect();
            c.create_empty(names).await.unwrap();
        }
    });
    let mut bench = bench_creating_files(&b);
    bench.kill9();
    assert!(b.cwd().join("dfs-bench/dfs-bench-4k.bin").exists());

    let o = b.cli(&["--cmd", "bench", "--clean"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let n: u64 = o
        .stdout
        .strip_prefix("deleted ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", o.stdout));
    assert!(n > 25_000, "{}", o.stdout);
    assert!(o.stdout.contains("and 1 scratch file(s)"), "{}", o.stdout);
    assert_no_bench_left(&b);
    let ls = b.cli(&["--cmd", "ls"]);
    for n in ["keep.txt", "dfs-benchmark.txt", "dfs-bench "] {
        assert!(ls.stdout.contains(n), "{n}: {}", ls.stdout);
    }
    let again = b.cli(&["--cmd", "bench", "--clean", "--json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let v: serde_json::Value = serde_json::from_str(&again.stdout).expect("json");
    assert_eq!(v["names_deleted"], 0);
}

/// The security quick start exactly as the README gives it: `gen-certs`, `gen-secret` and
/// `token` from the CLI, then daemons and clients with the TLS, secret and token flags.
#[test]
fn secure_cluster_from_the_command_line() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let run = |args: &[&str]| {
        let out = cli("127.0.0.1:1", k, args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        out.stdout
    };
    run(&["--cmd", "gen-certs", "certs"]);
    run(&["--cmd", "gen-secret", "cluster.secret"]);
    let rw = run(&["--cmd", "token", "--cluster-secret-file", "cluster.secret"]);
    let ro = run(&[
        "--cmd",
        "token",
        "--cluster-secret-file",
        "cluster.secret",
        "--read-only",
        "--subject",
        "reader",
    ]);
    std::fs::write(k.join("rw.token"), rw.trim()).unwrap();
    std::fs::write(k.join("ro.token"), ro.trim()).unwrap();
    // Nothing is overwritten.
    let again = cli("127.0.0.1:1", k, &["--cmd", "gen-secret", "cluster.secret"]);
    assert_eq!(again.code, 1);

    let p = |f: &str| k.join(f).display().to_string();
    let daemon = |role: &str| {
        vec![
            "--tls-cert".to_string(),
            p(&format!("certs/{role}.pem")),
            "--tls-key".into(),
            p(&format!("certs/{role}.key")),
            "--tls-ca".into(),
            p("certs/ca.pem"),
            "--cluster-secret-file".into(),
            p("cluster.secret"),
        ]
    };
    let tls_client = [
        "--tls-cert".to_string(),
        p("certs/client.pem"),
        "--tls-key".into(),
        p("certs/client.key"),
        "--tls-ca".into(),
        p("certs/ca.pem"),
    ];
    let mut client = tls_client.to_vec();
    client.extend(["--token-file".to_string(), p("rw.token")]);
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let b = Binaries::start_with_args(
        3,
        &refs(&daemon("master")),
        &refs(&daemon("worker")),
        &refs(&client),
    );
    b.wait_alive(3);
    let src = make_file(&b.cwd().join("secret-plans.bin"), 3 * MIB + 17, 9);
    upload(&b, &src);
    download_and_compare(&b, "secret-plans.bin", &src);

    let master = b.master_addr();
    let ro_file = p("ro.token");
    let as_reader = |args: &[&str]| {
        let mut all = refs(&tls_client);
        all.extend(["--token-file", ro_file.as_str()]);
        all.extend_from_slice(args);
        cli(&master, b.cwd(), &all)
    };
    // A read-only token reads, and is refused any change with a one-line error.
    let dest = b.cwd().join("read-back");
    let out = as_reader(&[
        "--cmd",
        "download",
        "secret-plans.bin",
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_files_equal(&dest, &src);
    for args in [
        &["--cmd", "delete", "secret-plans.bin"][..],
        &["--cmd", "upload", src.to_str().unwrap(), "--name", "x"][..],
        &["--cmd", "drain", "127.0.0.1:1"][..],
    ] {
        let out = as_reader(args);
        assert_eq!(out.code, 1, "{args:?}");
        assert!(
            out.stderr.contains("read-only token may not"),
            "{}",
            out.stderr
        );
        assert_eq!(out.stderr.trim().lines().count(), 1);
    }
    // The benchmark over TLS with tokens: every daemon answers for its figures. With a
    // read-only token every operation is refused: the table shows it, with the first
    // error of each phase, and the run ends with a one-line error and exit code 1.
    let bench = [
        "--cmd",
        "bench",
        "--no-large",
        "--files",
        "20",
        "--concurrency",
        "1",
    ];
    let mut json = bench.to_vec();
    json.push("--json");
    let out = b.cli(&json);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let rows = v["resources"].as_array().unwrap();
    for who in ["client", "master", "worker "] {
        let n = rows
            .iter()
            .filter(|r| r["phase"] == "4 KiB create, c=1")
            .filter(|r| r["process"].as_str().unwrap().starts_with(who))
            .count();
        assert_eq!(n, if who == "worker " { 3 } else { 1 }, "{who}: {rows:?}");
    }
    let out = as_reader(&bench);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout
            .contains("create c=1: 20 of 20 failed; the first: a read-only token may not"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("80 of 80 small-file operations failed"),
        "{}",
        out.stderr
    );
    // No token, and no TLS: refused with a message that says what to do.
    let mut no_token = refs(&tls_client);
    no_token.extend(["--cmd", "ls"]);
    let out = cli(&master, b.cwd(), &no_token);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("requires a token"), "{}", out.stderr);
    let out = cli(
        &master,
        b.cwd(),
        &["--token-file", &p("rw.token"), "--cmd", "ls"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--tls-ca"), "{}", out.stderr);
    // The file is intact and still listed.
    let out = b.cli(&["--cmd", "ls"]);
    assert!(out.stdout.contains("secret-plans.bin"), "{}", out.stdout);
}

/// A client holding reserved uploads when the master is killed (`kill -9`) and restarted:
/// the master kept them in memory only, so the first small upload after the restart finds
/// its reservation gone, drops the rest of the pool and is sent again the usual way. Every
/// upload, before and after, lands byte-exact, and nothing is left behind.
#[test]
fn reserved_uploads_survive_kill9_of_the_master() {
    let mut b = Binaries::start_with(3, &["--gc-grace", "200ms"]);
    b.wait_alive(3);
    let rt = runtime();
    let client = rt
        .block_on(dfs::client::Client::connect(&b.master_addr()))
        .unwrap();
    let files: Vec<(String, PathBuf)> = (0..60u64)
        .map(|i| {
            let name = format!("s{i}");
            let path = make_file(&b.cwd().join(&name), 100 + i * 997, 300 + i);
            (name, path)
        })
        .collect();
    let up = |name: &str, path: &Path| {
        let opts = dfs::client::UploadOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        rt.block_on(client.upload(path, opts))
            .unwrap_or_else(|e| panic!("upload of {name}: {e}"));
    };
    for (name, path) in &files[..40] {
        up(name, path);
    }
    let before = client.reservations();
    assert!(before.committed > 0 && before.ready > 0, "{before:?}");

    b.master.as_mut().unwrap().kill9();
    b.start_master();
    b.wait_alive(3);
    for (name, path) in &files[40..] {
        up(name, path);
    }
    let after = client.reservations();
    assert_eq!(
        after.fell_back, 1,
        "one stale reservation, then the pool is dropped: {after:?}"
    );
    for (name, path) in &files {
        download_and_compare(&b, name, path);
    }
    // Nothing is left open; the new master holds at least the client's pool as reserved
    // (unused ones expire with their lease).
    let st = b.cli(&["--cmd", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["open_uploads"].as_u64(), Some(0), "{}", st.stdout);
    assert!(
        v["reserved_uploads"].as_u64().unwrap() >= after.ready as u64,
        "{}",
        st.stdout
    );
}

/// Small files committed beside their writes and not yet confirmed when the master is
/// killed (`kill -9`): the restarted master finds them in doubt in its store (so does it one
/// whose confirmation it held in memory only). Those whose chunk every worker holds are
/// readable at once (the read asks the workers); the one that no worker holds is dropped
/// after the grace, so `stat` says it is not found.
#[test]
fn files_in_doubt_when_the_master_is_killed_are_settled_after_its_restart() {
    use dfs::rpc::pb;
    let mut b = Binaries::start_with(3, &["--in-doubt-grace", "1s"]);
    b.wait_alive(3);
    let rt = runtime();
    let data = b"prepared, written, never confirmed".as_slice();
    let original = b.cwd().join("kept.bin");
    std::fs::write(&original, data).unwrap();
    rt.block_on(async {
        let mut m = dfs::rpc::master_client(dfs::rpc::control_channel(&b.master_addr()).unwrap());
        let plans = m
            .reserve_uploads(pb::ReserveUploadsRequest {
                count: 3,
                replicas: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .uploads;
        for plan in [&plans[0], &plans[2]] {
            write_chunk_direct(&plan.chunks[0], "x", data, None)
                .await
                .unwrap();
        }
        let commits: Vec<pb::CommitUploadRequest> = [
            ("kept", &plans[0]),
            ("never-written", &plans[1]),
            ("confirmed", &plans[2]),
        ]
        .into_iter()
        .map(|(name, plan)| reserved_commit(plan, name, data))
        .collect();
        let r = m
            .prepare_uploads(pb::CommitUploadsRequest {
                commits: commits.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(r.iter().all(|r| r.commit.is_some()), "{r:?}");
        // Confirmed in the master's memory; its record is rewritten later, so the kill
        // most likely lands before that.
        let r = m
            .commit_uploads(pb::CommitUploadsRequest {
                commits: vec![commits[2].clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(r[0].commit.is_some(), "{r:?}");
    });

    b.master.as_mut().unwrap().kill9();
    b.start_master();
    b.wait_alive(3);
    download_and_compare(&b, "kept", &original);
    download_and_compare(&b, "confirmed", &original);
    let out = b.cli(&["--cmd", "stat", "never-written"]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let ls = b.cli(&["--cmd", "ls"]);
    assert_eq!(ls.code, 0, "{}", ls.stderr);
    assert!(
        ls.stdout.contains("kept") && !ls.stdout.contains("never-written"),
        "{}",
        ls.stdout
    );
}

/// With the same filter for both (the default), a daemon whose stderr is not a terminal
/// writes each line once formatted to both outputs: the same text, with no colour codes.
#[test]
fn daemon_stderr_off_a_terminal_carries_the_log_file_lines_uncoloured() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut master = Daemon::spawn_logging(MASTER, &["--listen", &listen], dir.path(), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = cli(&listen, dir.path(), &["--cmd", "ls"]);
        if out.code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "master never answered: {}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file_lines = |stderr: &str| -> Vec<String> {
        let file = std::fs::read_to_string(dir.path().join("logs/master.log")).unwrap_or_default();
        let in_file: std::collections::HashSet<&str> = file.lines().collect();
        stderr
            .lines()
            .filter(|l| !in_file.contains(l))
            .map(str::to_string)
            .collect()
    };
    // Both outputs are written in batches by threads of their own: wait (bounded) for the
    // file to hold every line stderr has.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stderr = master.stderr_text();
        let missing = file_lines(&stderr);
        if stderr.contains("op=\"list_files\"") && missing.is_empty() {
            assert!(!stderr.contains('\x1b'), "escape codes: {stderr}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stderr {stderr:?} has lines master.log lacks: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `dfs-tui` against `b` with its stdout going to `stdout`: (exit code, stdout, stderr).
fn cli_to(b: &Binaries, args: &[&str], stdout: std::process::Stdio) -> (i32, Vec<u8>, String) {
    let o = cli_raw(&b.master_addr(), b.cwd(), args, None, stdout, &[]);
    (o.code, o.stdout, o.stderr)
}

/// `download NAME -o /dev/stdout` puts exactly the file's bytes on stdout, and its report on
/// stderr. Before, the report ("downloaded … (… blake3 verified)") was appended to the bytes,
/// so `dfs-tui --cmd download x -o /dev/stdout > copy` gave a corrupt copy; and with stdout
/// redirected to a file the download was refused as "already exists".
#[test]
fn a_download_to_stdout_is_exactly_the_files_bytes() {
    use std::process::Stdio;
    let b = Binaries::start(1);
    b.wait_alive(1);
    let src = make_file(&b.cwd().join("s.bin"), 3 * MIB + 17, 5);
    let o = b.cli(&["--cmd", "upload", "s.bin", "--replicas", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let original = std::fs::read(&src).unwrap();

    // Into a pipe, as `| b3sum` would read it; the same through /dev/fd/1 with --json, and
    // through `-`.
    for (dest, json) in [("/dev/stdout", false), ("/dev/fd/1", true), ("-", false)] {
        let mut args = vec!["--cmd", "download", "s.bin", "-o", dest];
        if json {
            args.insert(0, "--json");
        }
        let (code, out, err) = cli_to(&b, &args, Stdio::piped());
        assert_eq!(code, 0, "{err}");
        assert!(out == original, "{dest}: {} bytes on stdout", out.len());
        assert!(err.contains("s.bin"), "the report went nowhere: {err}");
    }

    // Appended to a file the shell opened (`>> log`): what was there stays, the bytes follow.
    let log = b.cwd().join("appended");
    std::fs::write(&log, b"before\n").unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let (code, _, err) = cli_to(
        &b,
        &["--cmd", "download", "s.bin", "-o", "/dev/stdout"],
        f.into(),
    );
    assert_eq!(code, 0, "{err}");
    let got = std::fs::read(&log).unwrap();
    assert!(
        got.starts_with(b"before\n") && got[7..] == original[..],
        "{} bytes",
        got.len()
    );

    // An error with --json: the JSON goes to stderr too, and stdout stays empty.
    let (code, out, err) = cli_to(
        &b,
        &[
            "--json",
            "--cmd",
            "download",
            "nothing",
            "-o",
            "/dev/stdout",
        ],
        Stdio::piped(),
    );
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(err.contains("\"code\":\"NotFound\""), "{err}");
}

/// `upload - --name NAME` stores what arrives on standard input, and so does a FIFO named by
/// its path: read to the end into an unlinked temporary file in `$TMPDIR` (nothing is left
/// there), then uploaded as a file. Before, both were refused as "not a regular file".
#[test]
fn an_upload_from_a_pipe_stores_its_bytes() {
    use std::process::Stdio;
    let b = Binaries::start(1);
    b.wait_alive(1);
    let src = make_file(&b.cwd().join("p.bin"), 3 * MIB + 17, 9);
    let original = std::fs::read(&src).unwrap();
    let tmp = b.cwd().join("tmpdir");
    std::fs::create_dir(&tmp).unwrap();
    let upload = |args: &[&str], input: Option<Vec<u8>>| {
        let env = [("TMPDIR", tmp.as_os_str())];
        let o = cli_raw(&b.master_addr(), b.cwd(), args, input, Stdio::piped(), &env);
        (o.code, o.stderr)
    };
    let stored = |name: &str| {
        let dest = b.cwd().join(format!("{name}.out"));
        let o = b.cli(&["--cmd", "download", name, "-o", dest.to_str().unwrap()]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        std::fs::read(&dest).unwrap()
    };

    let (code, err) = upload(
        &[
            "--cmd",
            "upload",
            "-",
            "--name",
            "piped.bin",
            "--replicas",
            "1",
        ],
        Some(original.clone()),
    );
    assert_eq!(code, 0, "{err}");
    assert!(stored("piped.bin") == original, "the piped upload differs");

    // A FIFO by its path, fed by another writer.
    let fifo = b.cwd().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let writer = {
        let (fifo, data) = (fifo.clone(), original.clone());
        std::thread::spawn(move || std::fs::write(&fifo, data).unwrap())
    };
    let (code, err) = upload(&["--cmd", "upload", "fifo", "--replicas", "1"], None);
    writer.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(stored("fifo") == original, "the FIFO's upload differs");

    // Empty input is an empty file; standard input without --name is a one-line error.
    let (code, err) = upload(
        &[
            "--cmd",
            "upload",
            "-",
            "--name",
            "nothing",
            "--replicas",
            "1",
        ],
        Some(Vec::new()),
    );
    assert_eq!(code, 0, "{err}");
    assert!(stored("nothing").is_empty());
    let (code, err) = upload(&["--cmd", "upload", "-"], Some(b"x".to_vec()));
    assert_eq!(code, 1);
    assert!(
        err.trim_end().lines().count() == 1 && err.contains("--name"),
        "{err}"
    );

    // No spool was left behind.
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Bytes of the unlinked spool file `pid` holds open (its size or its blocks on disk,
/// whichever is more), if it holds one.
fn spool_bytes(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten().find_map(|fd| {
        let target = std::fs::read_link(fd.path()).ok()?;
        target
            .to_string_lossy()
            .contains(".dfs-upload-")
            .then(|| std::fs::metadata(fd.path()).ok())
            .flatten()
            .map(|m| m.len().max(m.blocks() * 512))
    })
}

/// `dfs-tui --cmd upload - --name NAME --replicas N` with its standard input left to the
/// caller, `$TMPDIR` set to `tmp`, its stdout in `upload-NAME.out`, and, if given, a limit
/// on the size of any file it writes (`RLIMIT_FSIZE`: a temporary directory with no room,
/// since a test cannot mount a small file system).
fn piped_upload(
    b: &Binaries,
    name: &str,
    replicas: &str,
    tmp: &Path,
    file_limit: Option<u64>,
) -> (Daemon, std::process::ChildStdin) {
    use std::process::{Command, Stdio};
    let stderr_path = b.cwd().join(format!("upload-{name}.err"));
    let stdout = std::fs::File::create(b.cwd().join(format!("upload-{name}.out"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dfs-tui"));
    cmd.args([
        "--master",
        &b.master_addr(),
        "--json",
        "--cmd",
        "upload",
        "-",
    ])
    .args(["--name", name, "--replicas", replicas])
    .current_dir(b.cwd())
    .env_remove("RUST_LOG")
    .env("TMPDIR", tmp)
    .stdin(Stdio::piped())
    .stdout(stdout)
    .stderr(std::fs::File::create(&stderr_path).unwrap());
    if let Some(bytes) = file_limit {
        // SAFETY: between fork and exec only async-signal-safe calls: signal(2),
        // setrlimit(2).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
                Ok(())
            });
        }
    }
    let mut cli = Daemon {
        child: cmd.spawn().unwrap(),
        name: format!("dfs-tui --cmd upload - --name {name}"),
        stderr_path,
    };
    let input = cli.child.stdin.take().unwrap();
    (cli, input)
}

/// A file of `size` bytes to pipe, its bytes, and an empty directory for `$TMPDIR`.
fn pipe_input(b: &Binaries, size: u64, seed: u64) -> (PathBuf, Vec<u8>, PathBuf) {
    let src = make_file(&b.cwd().join("s.bin"), size, seed);
    let data = std::fs::read(&src).unwrap();
    let tmp = b.cwd().join("tmpdir");
    std::fs::create_dir(&tmp).unwrap();
    (src, data, tmp)
}

#[test]
fn a_piped_upload_is_stored_while_its_input_is_still_coming() {
    use std::io::Write;
    use std::process::Stdio;
    let b = Binaries::start_with(1, &["--chunk-size", "1MiB"]);
    b.wait_alive(1);
    let (src, data, tmp) = pipe_input(&b, 40 * MIB + 5, 11);
    let (mut cli, mut input) = piped_upload(&b, "stream.bin", "1", &tmp, None);
    let pid = cli.child.id();
    let worker_dir = b.cwd().join(format!("worker_localhost_{}", b.workers[0].0));

    // Most of the input, and the pipe kept open: chunks are stored as they come.
    input.write_all(&data[..24 * MIB as usize]).unwrap();
    let mut stored = 0;
    let mut most_staged = 0;
    for _ in 0..300 {
        stored = chunk_files(&worker_dir).len();
        most_staged = most_staged.max(spool_bytes(pid).unwrap_or(0));
        if stored >= 12 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stored >= 12,
        "only {stored} chunks stored while the input was open"
    );
    assert_eq!(
        cli.child.try_wait().unwrap(),
        None,
        "the upload ended before its input"
    );
    input.write_all(&data[24 * MIB as usize..]).unwrap();
    drop(input);
    let status = cli
        .wait_exit(Duration::from_secs(60))
        .expect("the upload ends with its input");
    assert!(status.success(), "{}", cli.stderr_text());
    // The spool holds the chunks in flight and the next one (9 of 1 MiB here), not the
    // input: with the whole input staged it would have reached 24 MiB above.
    assert!(
        most_staged <= 9 * MIB,
        "the spool held {most_staged} bytes on disk"
    );

    download_and_compare(&b, "stream.bin", &src);
    let o = b.cli(&["--cmd", "stat", "stream.bin", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["size"].as_u64(), Some(40 * MIB + 5));
    assert_eq!(v["chunks"].as_array().map(Vec::len), Some(41));

    // An input that ends exactly at a chunk's end has no empty chunk after it.
    let exact = data[..3 * MIB as usize].to_vec();
    let args = [
        "--cmd",
        "upload",
        "-",
        "--name",
        "exact.bin",
        "--replicas",
        "1",
    ];
    let o = cli_raw(
        &b.master_addr(),
        b.cwd(),
        &args,
        Some(exact.clone()),
        Stdio::null(),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = b.cli(&["--cmd", "stat", "exact.bin", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["size"].as_u64(), Some(3 * MIB));
    assert_eq!(v["chunks"].as_array().map(Vec::len), Some(3));
    let o = cli_raw(
        &b.master_addr(),
        b.cwd(),
        &["--cmd", "download", "exact.bin", "-o", "-"],
        None,
        Stdio::piped(),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout == exact, "exact.bin differs");

    // Ctrl-C while the input is silent: the wait for it ends, the upload is aborted.
    let (mut cli, mut input) = piped_upload(&b, "silent.bin", "1", &tmp, None);
    input.write_all(&data[..2 * MIB as usize]).unwrap();
    b.wait_status("the piped upload to open", Duration::from_secs(20), |v| {
        v["open_uploads"].as_u64() == Some(1)
    });
    cli.signal(libc::SIGINT);
    let status = cli.wait_exit(Duration::from_secs(10));
    let err = cli.stderr_text();
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{err}");
    assert!(err.contains("interrupted; the upload was aborted"), "{err}");
    b.wait_status("no open upload", Duration::from_secs(10), |v| {
        v["open_uploads"].as_u64().unwrap_or(0) == 0
    });
    assert_eq!(b.cli(&["--cmd", "stat", "silent.bin"]).code, 1);
    drop(input);

    // No room for the spool (a file size limit of 4 MiB here: a test cannot mount a small
    // file system): a one-line error that names the directory, and nothing stored.
    let (mut cli, mut feed) = piped_upload(&b, "full.bin", "1", &tmp, Some(4 * MIB));
    let part = data[..8 * MIB as usize].to_vec();
    // The upload stops reading when it fails: the broken pipe is not the test's error.
    let feeder = std::thread::spawn(move || {
        let _ = feed.write_all(&part);
    });
    let status = cli.wait_exit(Duration::from_secs(60));
    if status.is_none() {
        // Hung: killed, so that the feeder's write ends too.
        cli.kill9();
    }
    let _ = feeder.join();
    let err = cli.stderr_text();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.trim_end().lines().count() == 1
            && err.contains("cannot stage the input in")
            && err.contains("TMPDIR"),
        "{err}"
    );
    assert_eq!(b.cli(&["--cmd", "stat", "full.bin"]).code, 1);

    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_piped_upload_survives_kill9_of_a_worker_mid_stream() {
    use std::io::Write;
    let mut b = Binaries::start_with(3, &["--chunk-size", "1MiB"]);
    b.wait_alive(3);
    let (src, data, tmp) = pipe_input(&b, 40 * MIB + 7, 12);
    let (mut cli, mut input) = piped_upload(&b, "survivor.bin", "2", &tmp, None);
    let dirs: Vec<PathBuf> = b
        .workers
        .iter()
        .map(|(port, _)| b.cwd().join(format!("worker_localhost_{port}")))
        .collect();
    let stored = || dirs.iter().map(|d| chunk_files(d).len()).sum::<usize>();
    input.write_all(&data[..12 * MIB as usize]).unwrap();
    let mut seen = 0;
    for _ in 0..300 {
        seen = stored();
        if seen >= 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen >= 8, "only {seen} chunk copies stored");
    // Mid-stream: chunks in flight to it fail, and later ones are placed on it until it
    // misses its heartbeats. Each is sent again from the spool, which still holds it.
    b.workers[0].1.as_mut().unwrap().kill9();
    input.write_all(&data[12 * MIB as usize..]).unwrap();
    drop(input);
    let status = cli.wait_exit(Duration::from_secs(90));
    let err = cli.stderr_text();
    assert!(status.is_some_and(|s| s.success()), "{err}");
    let out = std::fs::read_to_string(b.cwd().join("upload-survivor.bin.out")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["file"]["size"].as_u64(), Some(40 * MIB + 7), "{out}");
    assert!(
        v["retried_chunks"].as_u64() >= Some(1),
        "no chunk was retried: {out}"
    );
    download_and_compare(&b, "survivor.bin", &src);
}

/// Two large uploads in flight, one from a file and one from a pipe, while the master is
/// killed (`kill -9`) and restarted on the same directory: both finish and read back
/// byte-exact. The master keeps a large upload and its allocations durably, and the clients
/// wait for it (and for its workers to register again) instead of failing. Before, an open
/// upload lived in the master's memory only: the file's upload failed with "upload not
/// found" and the pipe's with "cannot reach the master", its input lost. The workers are
/// held with SIGSTOP across the restart, so both uploads are mid-transfer whatever the
/// machine's speed.
#[test]
fn large_uploads_in_flight_survive_kill9_and_restart_of_the_master() {
    use std::io::Write;
    // A long heartbeat timeout keeps the stopped workers alive meanwhile.
    let mut b = Binaries::start_with(3, &["--chunk-size", "1MiB", "--heartbeat-timeout", "30s"]);
    b.wait_alive(3);
    let (piped, data, tmp) = pipe_input(&b, 24 * MIB + 3, 21);
    let (mut pipe_cli, mut input) = piped_upload(&b, "piped.bin", "2", &tmp, None);
    input.write_all(&data[..6 * MIB as usize]).unwrap();
    let file = make_file(&b.cwd().join("file.bin"), 40 * MIB + 9, 22);
    let stop_workers = |b: &Binaries, sig: i32| {
        for (_, w) in &b.workers {
            w.as_ref().expect("worker runs").signal(sig);
        }
    };
    b.wait_status("the piped upload open", Duration::from_secs(30), |v| {
        v["open_uploads"].as_u64() == Some(1)
    });
    stop_workers(&b, libc::SIGSTOP);
    let mut file_cli = Daemon::spawn_logging(
        env!("CARGO_BIN_EXE_dfs-tui"),
        &[
            "--master",
            &b.master_addr(),
            "--cmd",
            "upload",
            "file.bin",
            "--replicas",
            "3",
        ],
        b.cwd(),
        None,
    );
    b.wait_status("both uploads open", Duration::from_secs(30), |v| {
        v["open_uploads"].as_u64() == Some(2)
    });
    // Let the file's client get its first chunks under way to the stopped workers.
    std::thread::sleep(Duration::from_millis(300));
    b.master.as_mut().expect("master runs").kill9();
    std::thread::sleep(Duration::from_millis(500));
    b.start_master();
    stop_workers(&b, libc::SIGCONT);
    // A client that failed has closed its end of the pipe: its status below says why.
    let _ = input.write_all(&data[6 * MIB as usize..]);
    drop(input);

    for (cli, what) in [(&mut pipe_cli, "piped"), (&mut file_cli, "file")] {
        let status = cli.wait_exit(Duration::from_secs(90));
        let err = cli.stderr_text();
        assert!(
            status.is_some_and(|s| s.success()),
            "{what}: {status:?} {err}"
        );
    }
    let restored = std::fs::read_to_string(b.cwd().join("logs").join("master.log")).unwrap();
    assert!(
        restored.contains("uploads open at the last stop were restored")
            && restored.contains("uploads=2"),
        "{}",
        b.log_tail("master.log", 40)
    );
    download_and_compare(&b, "piped.bin", &piped);
    download_and_compare(&b, "file.bin", &file);
    let st = b.cli(&["--cmd", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(v["open_uploads"].as_u64(), Some(0), "{}", st.stdout);
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A download whose only replica's worker is down (`kill -9`) when it starts, and back
/// a moment later: it tries again after a pause, with the locations the master gives then,
/// and the file is byte-exact. Before, it failed at once with "could not be read from any
/// replica". With the worker gone for good, the same download still ends, with that one-line
/// error, after its pauses (about 7 s).
#[test]
fn a_download_rides_out_the_restart_of_the_worker_holding_its_only_replica() {
    // A long heartbeat timeout: the master still lists the killed worker's replica.
    let mut b = Binaries::start_with(1, &["--chunk-size", "1MiB", "--heartbeat-timeout", "30s"]);
    b.wait_alive(1);
    let src = make_file(&b.cwd().join("only.bin"), 6 * MIB + 5, 31);
    let up = b.cli(&["--cmd", "upload", "only.bin", "--replicas", "1"]);
    assert_eq!(up.code, 0, "{}", up.stderr);

    b.workers[0].1.as_mut().expect("worker runs").kill9();
    let dest = b.cwd().join("back.bin");
    let mut dl = Daemon::spawn_logging(
        env!("CARGO_BIN_EXE_dfs-tui"),
        &[
            "--master",
            &b.master_addr(),
            "--cmd",
            "download",
            "only.bin",
            "-o",
            dest.to_str().unwrap(),
        ],
        b.cwd(),
        None,
    );
    std::thread::sleep(Duration::from_millis(1500));
    b.start_worker(0);
    let status = dl.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} {}",
        dl.stderr_text()
    );
    assert_files_equal(&dest, &src);

    b.workers[0].1.as_mut().expect("worker runs").kill9();
    let gone = b.cwd().join("gone.bin");
    let out = b.cli(&[
        "--cmd",
        "download",
        "only.bin",
        "-o",
        gone.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("could not be read from any replica"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
    assert!(!gone.exists());
}

/// Waits (bounded) until `begun` holds for `cli`, a transfer stuck on the SIGSTOPped
/// `worker`; then sends it SIGINT, lets the worker go on half a second later, and returns
/// the CLI's exit code and stderr.
fn interrupt_once(
    worker: &Daemon,
    cli: &mut Daemon,
    what: &str,
    begun: impl Fn() -> bool,
) -> (Option<i32>, String) {
    let mut seen = false;
    for _ in 0..200 {
        if begun() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    cli.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    worker.signal(libc::SIGCONT);
    assert!(seen, "timed out waiting for {what}: {}", cli.stderr_text());
    let status = cli
        .wait_exit(Duration::from_secs(30))
        .expect("exits after SIGINT");
    (status.code(), cli.stderr_text())
}

/// Ctrl-C during `--cmd upload` aborts the upload on the master (nothing stored, no open
/// upload left) and exits 130; during `--cmd download` it removes the partial file. Before,
/// the signal killed the process on the spot and the open upload held its chunks until its
/// lease ran out (10 minutes). The worker is stopped (SIGSTOP) while the upload starts, so
/// the signal lands mid-transfer whatever the machine's speed.
#[test]
fn ctrl_c_during_a_transfer_cleans_up_and_exits_130() {
    // The worker is held with SIGSTOP below: a long timeout keeps it alive meanwhile.
    let b = Binaries::start_with(1, &["--heartbeat-timeout", "30s"]);
    b.wait_alive(1);
    let src = make_file(&b.cwd().join("big.bin"), 40 * MIB, 3);
    let master = b.master_addr();
    let worker = b.workers[0].1.as_ref().expect("worker runs");
    worker.signal(libc::SIGSTOP);
    let mut up = Daemon::spawn_logging(
        env!("CARGO_BIN_EXE_dfs-tui"),
        &[
            "--master",
            &master,
            "--cmd",
            "upload",
            "big.bin",
            "--replicas",
            "1",
        ],
        b.cwd(),
        None,
    );
    // Started: the master holds the open upload, its first chunk stuck on the worker.
    let (code, err) = interrupt_once(worker, &mut up, "the upload to open", || {
        let o = b.cli(&["--json", "--cmd", "status"]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
        v["open_uploads"].as_u64() == Some(1)
    });
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted; the upload was aborted"), "{err}");
    b.wait_status("no open upload", Duration::from_secs(10), |v| {
        v["open_uploads"].as_u64().unwrap_or(0) == 0
    });
    let o = b.cli(&["--cmd", "stat", "big.bin"]);
    assert_eq!(o.code, 1, "the interrupted upload was stored: {}", o.stdout);

    // A download interrupted the same way leaves no partial file beside its destination.
    let o = b.cli(&["--cmd", "upload", "big.bin", "--replicas", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let out = b.cwd().join("out");
    std::fs::create_dir(&out).unwrap();
    worker.signal(libc::SIGSTOP);
    let dest = out.join("copy.bin");
    let mut down = Daemon::spawn_logging(
        env!("CARGO_BIN_EXE_dfs-tui"),
        &[
            "--master",
            &master,
            "--cmd",
            "download",
            "big.bin",
            "-o",
            dest.to_str().unwrap(),
        ],
        b.cwd(),
        None,
    );
    // The partial file appears once the download has begun.
    let (code, err) = interrupt_once(worker, &mut down, "the download to begin", || {
        std::fs::read_dir(&out).unwrap().flatten().next().is_some()
    });
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted; the download stopped"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(src);
}
