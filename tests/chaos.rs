//! The chaos test: clients upload, overwrite, download and delete while a seeded fault loop
//! kills and restarts workers and the master, pauses workers, and corrupts stored chunks.
//!
//! Checked throughout: no read ever returns wrong bytes; an acknowledged upload stays readable
//! (the latest acknowledged version) until deleted; a deleted name never reappears. Checked
//! at the end: the cluster heals by itself, and no orphan chunk remains on any worker.
//!
//! Short in CI (`DFS_CHAOS_SECS`, default 30); `DFS_CHAOS_SEED` replays a run.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dfs::client::{Client, DownloadOptions, UploadOptions};

/// xorshift64*: small, seeded, good enough to pick faults and sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a name may hold: the versions it could legitimately show (a failed operation may or
/// may not have taken effect), `None` meaning "absent".
type Possible = Vec<Option<String>>;

#[derive(Default)]
struct Summary {
    uploads: u64,
    downloads: u64,
    deletes: u64,
    failed_ops: u64,
    errors: HashMap<String, u64>,
    bytes_verified: u64,
    faults: Vec<String>,
}

const CHUNK: u64 = 256 << 10;

/// An error message without addresses and ids, to group failures by kind.
fn short(e: &str) -> String {
    e.split(|c: char| c.is_ascii_digit())
        .next()
        .unwrap_or(e)
        .chars()
        .take(70)
        .collect()
}

fn content(dir: &Path, name: &str, version: u64) -> (PathBuf, String) {
    let size = (version * 7919 + name.len() as u64 * 104_729) % (5 * CHUNK);
    let size = if version.is_multiple_of(7) { 0 } else { size };
    let p = dir.join(format!("{name}.v{version}"));
    make_file(&p, size, version * 31 + name.len() as u64);
    let h = blake3_file(&p);
    (p, h)
}

async fn client_loop(
    id: usize,
    master: String,
    dir: PathBuf,
    seed: u64,
    until: Instant,
    model: Arc<Mutex<HashMap<String, Possible>>>,
    summary: Arc<Mutex<Summary>>,
) {
    let mut rng = Rng(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let names: Vec<String> = (0..6).map(|i| format!("c{id}-n{i}")).collect();
    let mut version = id as u64 * 1_000_000;
    let mut client = None;
    while Instant::now() < until {
        if client.is_none() {
            client = Client::connect(&master).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let Some(c) = client.as_ref() else { continue };
        let failed_before = summary.lock().unwrap().failed_ops;
        let name = names[rng.below(names.len() as u64) as usize].clone();
        let op = rng.below(10);
        if op < 4 {
            version += 1;
            let (path, hash) = content(&dir, &name, version);
            let r = c
                .upload(
                    &path,
                    UploadOptions {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                )
                .await;
            let mut m = model.lock().unwrap();
            let entry = m.entry(name.clone()).or_insert_with(|| vec![None]);
            let mut s = summary.lock().unwrap();
            s.uploads += 1;
            match r {
                Ok(rep) => {
                    assert_eq!(
                        rep.file.blake3, hash,
                        "upload of {name} stored another digest"
                    );
                    *entry = vec![Some(hash)];
                }
                Err(e) => {
                    s.failed_ops += 1;
                    *s.errors
                        .entry(format!("upload: {}", short(&e.to_string())))
                        .or_default() += 1;
                    entry.push(Some(hash));
                }
            }
            std::fs::remove_file(path).ok();
        } else if op < 8 {
            let dest = dir.join(format!("dl-{id}"));
            std::fs::remove_file(&dest).ok();
            let r = c
                .download(
                    &name,
                    &dest,
                    DownloadOptions {
                        force: true,
                        ..Default::default()
                    },
                )
                .await;
            let mut m = model.lock().unwrap();
            let entry = m.entry(name.clone()).or_insert_with(|| vec![None]);
            let mut s = summary.lock().unwrap();
            s.downloads += 1;
            match r {
                Ok(rep) => {
                    let got = blake3_file(&dest);
                    assert_eq!(
                        got, rep.file.blake3,
                        "download of {name} returned wrong bytes"
                    );
                    assert!(
                        entry.contains(&Some(got.clone())),
                        "{name}: read a version that was never acknowledged or was replaced ({got}; possible {entry:?})"
                    );
                    s.bytes_verified += rep.file.size;
                    *entry = vec![Some(got)];
                }
                Err(e) if e.code() == tonic::Code::NotFound => {
                    assert!(
                        entry.contains(&None),
                        "{name}: an acknowledged file is gone ({e}); possible {entry:?}"
                    );
                    *entry = vec![None];
                }
                Err(e) => {
                    s.failed_ops += 1;
                    *s.errors
                        .entry(format!("download: {}", short(&e.to_string())))
                        .or_default() += 1;
                }
            }
        } else {
            let r = c.delete(&name).await;
            let mut m = model.lock().unwrap();
            let entry = m.entry(name.clone()).or_insert_with(|| vec![None]);
            let mut s = summary.lock().unwrap();
            s.deletes += 1;
            match r {
                Ok(_) => *entry = vec![None],
                Err(e) if e.code() == tonic::Code::NotFound => {
                    assert!(
                        entry.contains(&None),
                        "{name}: delete says missing; possible {entry:?}"
                    );
                    *entry = vec![None];
                }
                Err(e) => {
                    s.failed_ops += 1;
                    *s.errors
                        .entry(format!("delete: {}", short(&e.to_string())))
                        .or_default() += 1;
                    entry.push(None);
                }
            }
        }
        // Back off after a failure, as a real client would, instead of spinning.
        if summary.lock().unwrap().failed_ops > failed_before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[test]
fn chaos() {
    let seed: u64 = std::env::var("DFS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| dfs::chunk::random_u128() as u64 | 1);
    let secs: u64 = std::env::var("DFS_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eprintln!("chaos: seed {seed} ({secs}s); replay with DFS_CHAOS_SEED={seed}");
    let mut b = Binaries::start_with(
        5,
        &[
            "--chunk-size",
            "256KiB",
            "--gc-grace",
            "1s",
            "--upload-lease",
            "5s",
        ],
    );
    b.wait_alive(5);
    let scratch = b.cwd().join("chaos-files");
    std::fs::create_dir_all(&scratch).unwrap();
    let model: Arc<Mutex<HashMap<String, Possible>>> = Arc::default();
    let summary: Arc<Mutex<Summary>> = Arc::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let rt = runtime();
    let clients: Vec<_> = (0..3)
        .map(|i| {
            rt.spawn(client_loop(
                i,
                b.master_addr(),
                scratch.clone(),
                seed,
                until,
                model.clone(),
                summary.clone(),
            ))
        })
        .collect();

    // The fault loop: at most one worker down or paused at a time, plus master restarts.
    let mut rng = Rng(seed);
    while Instant::now() + Duration::from_secs(3) < until {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
        let w = rng.below(5) as usize;
        let what = match rng.below(10) {
            0..=2 => {
                b.workers[w].1.as_mut().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
                b.start_worker(w);
                format!("kill -9 worker {w}, restart")
            }
            3..=4 => {
                let d = b.workers[w].1.as_ref().unwrap();
                d.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(500 + rng.below(3500)));
                d.signal(libc::SIGCONT);
                format!("pause worker {w}")
            }
            5..=7 => {
                let dir = b.cwd().join(format!("worker_localhost_{}", b.workers[w].0));
                let files = chunk_files(&dir);
                if files.is_empty() {
                    continue;
                }
                let f = &files[rng.below(files.len() as u64) as usize];
                if f.data_len == 0 || corrupt_stored(f, rng.below(f.data_len), 0x20).is_err() {
                    continue;
                }
                format!("corrupt a chunk on worker {w}")
            }
            _ => {
                b.master.as_mut().unwrap().kill9();
                std::thread::sleep(Duration::from_millis(200 + rng.below(1500)));
                b.start_master();
                "kill -9 master, restart".to_string()
            }
        };
        summary.lock().unwrap().faults.push(what);
    }
    for c in clients {
        rt.block_on(c).expect("a client found a violation");
    }

    // Faults stop: the cluster must heal by itself.
    let healing = Instant::now();
    b.wait_alive(5);
    let c = rt.block_on(Client::connect(&b.master_addr())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = rt.block_on(c.status()).unwrap();
        if s.under_replicated_chunks == 0
            && s.missing_chunks == 0
            && s.repair_queue == 0
            && s.repairs_in_flight == 0
            && s.over_target_chunks == 0
            && s.pending_deletions == 0
            && s.orphan_chunks == 0
            && s.open_uploads == 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not heal: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let heal = healing.elapsed();

    // Every name holds one of its possible states, byte-exact.
    let model = model.lock().unwrap().clone();
    let mut live_chunks: HashSet<String> = HashSet::new();
    for (name, possible) in &model {
        let dest = scratch.join("final");
        std::fs::remove_file(&dest).ok();
        let r = rt.block_on(c.download(
            name,
            &dest,
            DownloadOptions {
                force: true,
                ..Default::default()
            },
        ));
        match r {
            Ok(rep) => {
                let got = blake3_file(&dest);
                assert!(
                    possible.contains(&Some(got.clone())),
                    "{name}: final {got} not in {possible:?}"
                );
                let st = rt.block_on(c.stat(name)).unwrap();
                live_chunks.extend(st.chunks.into_iter().map(|c| c.chunk_id));
                summary.lock().unwrap().bytes_verified += rep.file.size;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::NotFound, "{name}: {e}");
                assert!(
                    possible.contains(&None),
                    "{name}: acknowledged file lost; {possible:?}"
                );
            }
        }
    }
    // No orphan on any worker: every chunk file belongs to a live file, 3 copies each.
    let mut copies: HashMap<String, usize> = HashMap::new();
    for (port, _) in &b.workers {
        for f in chunk_files(&b.cwd().join(format!("worker_localhost_{port}"))) {
            let id = f.id;
            assert!(
                live_chunks.contains(&id),
                "orphan chunk {id} left on worker {port}"
            );
            *copies.entry(id).or_default() += 1;
        }
    }
    for id in &live_chunks {
        assert_eq!(copies.get(id).copied().unwrap_or(0), 3, "chunk {id}");
    }
    let s = summary.lock().unwrap();
    let mut errs: Vec<_> = s.errors.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    eprintln!("failures by kind: {errs:?}");
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for f in &s.faults {
        *kinds
            .entry(f.split(" worker").next().unwrap_or(f))
            .or_default() += 1;
    }
    eprintln!(
        "chaos summary (seed {seed}): {} uploads, {} downloads, {} deletes ({} failed during faults); {} faults {:?}; {} verified; healed {:.1}s after the faults stopped; {} files, {} chunks at 3 copies, 0 orphans",
        s.uploads,
        s.downloads,
        s.deletes,
        s.failed_ops,
        s.faults.len(),
        kinds,
        dfs::config::human_bytes(s.bytes_verified),
        heal.as_secs_f64(),
        model
            .values()
            .filter(|p| p.iter().any(Option::is_some))
            .count(),
        live_chunks.len()
    );
}
