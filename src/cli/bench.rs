//! `dfs-tui --cmd bench`: a benchmark any user can run against any cluster (or an embedded one
//! with `--local N`). One long-lived client process; throughput is also reported as a fraction
//! of this machine's own limits measured in the same run (`--limits`), because only same-run
//! ratios compare on a noisy machine.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientError, Progress, UploadOptions};
use crate::config::human_bytes;
use crate::rpc::pb::ProcessStats;

/// Bench settings (the `bench` operation's flags).
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub size: u64,
    pub files: usize,
    pub concurrency: Vec<usize>,
    pub limits: bool,
    /// Keep the page cache (do not drop it before reads).
    pub warm: bool,
    /// Directory for local scratch files (and the disk limit measurements).
    pub scratch: PathBuf,
    /// Empty files for the metadata-scale phase (0 = skip).
    pub meta_files: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Throughput {
    pub phase: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    /// Fraction of the matching machine limit, when `--limits` ran.
    pub of_limit: Option<f64>,
    pub cache: String,
}

#[derive(Debug, Default, Serialize)]
pub struct OpStats {
    pub phase: String,
    pub concurrency: usize,
    /// Operations attempted; `failed` of them failed.
    pub ops: usize,
    pub failed: usize,
    /// Successful operations per second; failures count neither here nor in the latencies
    /// (a refused call is fast, and would flatter both).
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The first failure's message, empty when nothing failed.
    pub first_error: String,
    /// The first failure's code, for the exit status.
    #[serde(skip)]
    pub first_code: Option<tonic::Code>,
    /// Creates committed through an upload reserved ahead (one master call instead of two);
    /// 0 for the other phases.
    pub reserved: u64,
    /// Of those, the creates whose commit went beside their writes (`PrepareUploads`, one
    /// round trip instead of two in a row).
    pub prepared: u64,
    /// Reads whose bytes came from a worker asked beside the master's lookup (a location
    /// this client remembered from the create), and those whose remembered location the
    /// lookup did not confirm or whose early read failed (they read again as usual).
    pub beside: u64,
    pub beside_missed: u64,
    /// For reads: the page cache they started with (`cold` after a drop, as MooseFS's
    /// side-by-side script reads); empty for the other phases.
    pub cache: String,
    /// Creates and deletes: operations per second as a fraction of the machine's 4 KiB
    /// write+fsync rate, when `--limits` ran (each durable one needs at least one such).
    pub of_limit: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Limits {
    pub write_fsync_mib_s: f64,
    pub read_mib_s: f64,
    pub read_cache: String,
    pub loopback_tcp_mib_s: f64,
    /// 4 KiB writes, each followed by `fdatasync`, one at a time into zero-filled space (as
    /// the workers' volumes and the master's journal are written): what one durable small
    /// change costs this disk.
    pub small_write_fsync_per_s: f64,
}

/// The metadata-scale phase.
#[derive(Debug, Default, Serialize)]
pub struct MetaStats {
    pub files: usize,
    pub create_per_s: f64,
    /// Listing one page of 1,000 names at a random point.
    pub ls_page_p50_ms: f64,
    pub ls_page_p99_ms: f64,
    pub stat_p50_ms: f64,
    pub stat_p99_ms: f64,
    pub delete_per_s: f64,
    pub master_rss_before: u64,
    pub master_rss_after: u64,
    /// Growth of the master's resident memory divided by the files created.
    pub master_bytes_per_file: f64,
}

/// CPU and memory of one process during one phase.
#[derive(Debug, Default, Serialize)]
pub struct ResourceUse {
    pub phase: String,
    /// "client", "master", "worker ADDR", or "embedded" (master, workers and client in this
    /// one process with --local).
    pub process: String,
    pub cpu_s: f64,
    pub rss_end_bytes: u64,
    /// Peak during the phase for this process (each daemon is asked directly at the
    /// phase's start and end).
    pub peak_bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub master: String,
    pub limits: Option<Limits>,
    pub large: Vec<Throughput>,
    pub small: Vec<OpStats>,
    pub meta: Option<MetaStats>,
    pub resources: Vec<ResourceUse>,
}

/// Process figures of the client, master and workers at one moment.
struct Snapshot {
    client: ProcessStats,
    master: Option<ProcessStats>,
    workers: Vec<(String, ProcessStats)>,
}

impl Snapshot {
    /// Asks every daemon directly, all at once (heartbeat figures are up to a second old,
    /// longer than many phases); `reset_peak` then restarts each one's peak count, so the
    /// next snapshot's peaks are the phase's own. A daemon that cannot answer is left out
    /// of the phase's rows rather than shown with stale figures.
    async fn take(client: &Client, reset_peak: bool) -> Snapshot {
        let addrs: Vec<String> = client
            .status()
            .await
            .map(|s| {
                s.workers
                    .into_iter()
                    .filter(|w| w.state != "dead")
                    .map(|w| w.address)
                    .collect()
            })
            .unwrap_or_default();
        let (master, workers) = tokio::join!(
            ask(client.master_process(reset_peak)),
            futures::future::join_all(
                addrs
                    .iter()
                    .map(|a| ask(client.worker_process(a, reset_peak)))
            )
        );
        let me = crate::procstat::current();
        if reset_peak {
            crate::procstat::reset_peak();
        }
        Snapshot {
            client: me,
            master,
            workers: addrs
                .into_iter()
                .zip(workers)
                .filter_map(|(a, p)| p.map(|p| (a, p)))
                .collect(),
        }
    }
}

/// A daemon's answer, or `None` if it fails or takes over two seconds: a stopped daemon
/// must not hang the benchmark, and its row is left out instead.
async fn ask(
    call: impl std::future::Future<Output = Result<ProcessStats, ClientError>>,
) -> Option<ProcessStats> {
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(Ok(p)) => Some(p),
        _ => None,
    }
}

/// Starts a phase's resource accounting (restarts every process's peak).
async fn phase_start(client: &Client) -> Snapshot {
    Snapshot::take(client, true).await
}

/// Ends a phase: CPU used and memory per process since `before`.
async fn phase_end(client: &Client, phase: &str, before: Snapshot, out: &mut Vec<ResourceUse>) {
    let after = Snapshot::take(client, false).await;
    let row = |process: String, b: &ProcessStats, a: &ProcessStats| ResourceUse {
        phase: phase.to_string(),
        process,
        cpu_s: a.cpu_ms.saturating_sub(b.cpu_ms) as f64 / 1000.0,
        rss_end_bytes: a.rss_bytes,
        peak_bytes: a.peak_rss_bytes,
    };
    let embedded = after.master.is_some_and(|m| m.pid == after.client.pid);
    out.push(row(
        if embedded { "embedded" } else { "client" }.to_string(),
        &before.client,
        &after.client,
    ));
    if embedded {
        return;
    }
    if let (Some(b), Some(a)) = (&before.master, &after.master) {
        out.push(row("master".into(), b, a));
    }
    for (addr, a) in &after.workers {
        if let Some((_, b)) = before.workers.iter().find(|(w, _)| w == addr) {
            out.push(row(format!("worker {addr}"), b, a));
        }
    }
}

fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K{msg}");
        let _ = std::io::stderr().flush();
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// Drops the page cache if permitted (root on Linux); says which cache state reads saw.
fn drop_caches(warm: bool) -> String {
    if warm {
        return "warm (--warm)".into();
    }
    let _ = std::process::Command::new("sync").status();
    match std::fs::write("/proc/sys/vm/drop_caches", "3") {
        Ok(()) => "cold".into(),
        Err(_) => "warm (cannot drop caches without root)".into(),
    }
}

/// Writes `size` bytes of incompressible data to `path` (fsynced if asked); returns seconds.
pub fn write_pattern(path: &Path, size: u64, fsync: bool) -> std::io::Result<f64> {
    let started = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    if fsync {
        f.sync_all()?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn read_all(path: &Path) -> std::io::Result<(u64, f64)> {
    let started = Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

/// 4 KiB write+`fdatasync` per second, one at a time, into a zero-filled file in `dir`: up to
/// 2,000 of them or 2 s, whichever ends first (a slow disk does 400 a second).
fn small_write_fsync(dir: &Path) -> std::io::Result<f64> {
    use std::os::unix::fs::FileExt;
    const N: u64 = 2000;
    let path = dir.join("dfs-bench-fsync.bin");
    let run = || -> std::io::Result<f64> {
        let f = std::fs::File::create(&path)?;
        f.write_all_at(&vec![0u8; (N * 4096) as usize], 0)?;
        f.sync_all()?;
        let block = [0x5au8; 4096];
        let started = Instant::now();
        let mut done = 0u64;
        while done < N && started.elapsed() < Duration::from_secs(2) {
            f.write_all_at(&block, done * 4096)?;
            f.sync_data()?;
            done += 1;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64().max(1e-9))
    };
    let r = run();
    let _ = std::fs::remove_file(&path);
    r
}

fn loopback_tcp(bytes: u64) -> std::io::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![7u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread failed"))??;
    Ok(mib_s(got, started.elapsed().as_secs_f64()))
}

fn local(op: &'static str, path: &Path, e: std::io::Error) -> ClientError {
    ClientError::LocalIo {
        op,
        path: path.to_path_buf(),
        source: e,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

/// Runs a blocking measurement on the blocking pool (whatever the runtime's flavour), so the
/// cluster's tasks keep running meanwhile.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("measurement task failed: {e}")))?
}

/// Runs the benchmark phases against `client`. A run that stops on an error first removes
/// what it created (its files in the cluster, up to `--meta-files` names, and the scratch
/// files, one of them `--size` bytes), so a failed run leaves nothing behind either.
///
/// On SIGINT or SIGTERM it stops starting operations, lets the ones in flight finish (so none
/// lands after the cleanup), cleans up the same way and fails with `Interrupted`. A second
/// signal stops at once.
pub async fn run(client: &Client, cfg: &BenchConfig) -> Result<BenchReport, ClientError> {
    let stop = Arc::new(Progress::default());
    let phases = run_phases(client, cfg, &stop);
    tokio::pin!(phases);
    let r = tokio::select! {
        r = &mut phases => r,
        () = crate::cluster::shutdown_signal() => {
            progress("interrupted: finishing the operations in flight…");
            stop.cancel();
            tokio::select! {
                _ = &mut phases => {}
                () = crate::cluster::shutdown_signal() => {
                    progress("");
                    return Err(ClientError::Interrupted { cleaned: false });
                }
            }
            Err(ClientError::Interrupted { cleaned: true })
        }
    };
    if r.is_err() {
        progress("cleaning up…");
        tokio::select! {
            () = clean_up(client, cfg) => {}
            () = crate::cluster::shutdown_signal() => {
                progress("");
                return Err(ClientError::Interrupted { cleaned: false });
            }
        }
        progress("");
    }
    r
}

/// The scratch files a run writes (and removes).
const SCRATCH_FILES: [&str; 3] = [
    "dfs-bench-large.bin",
    "dfs-bench-4k.bin",
    "dfs-bench-fsync.bin",
];

/// Every name a run creates starts with this.
const NAME_PREFIX: &str = "dfs-bench-";

/// What [`clean_leftovers`] deleted.
pub struct Cleaned {
    pub names: u64,
    pub scratch_files: u64,
}

/// Deletes what an earlier run left behind when it could not clean up (killed with -9, a
/// crash): every file whose name starts with `dfs-bench-`, and the scratch files in
/// `scratch`. A run that ends in any other way cleans up after itself.
pub async fn clean_leftovers(client: &Client, scratch: &Path) -> Result<Cleaned, ClientError> {
    let mut scratch_files = 0;
    for f in SCRATCH_FILES {
        if std::fs::remove_file(scratch.join(f)).is_ok() {
            scratch_files += 1;
        }
    }
    const PAGE: u32 = 10_000;
    let mut names = 0;
    // Names sort bytewise, so the run's names are one stretch of the listing.
    let mut after = NAME_PREFIX.to_string();
    loop {
        let batch: Vec<String> = client
            .list_page(&after, PAGE)
            .await?
            .files
            .into_iter()
            .map(|f| f.name)
            .take_while(|n| n.starts_with(NAME_PREFIX))
            .collect();
        // A page cut short (by the end of the listing or of the prefix) is the last one.
        let more = batch.len() == PAGE as usize;
        let Some(last) = batch.last().cloned() else {
            break;
        };
        names += client.delete_many(batch).await?;
        progress(&format!("deleted {names} leftover names…"));
        if !more {
            break;
        }
        after = last;
    }
    progress("");
    Ok(Cleaned {
        names,
        scratch_files,
    })
}

/// `Interrupted` once the run was asked to stop.
fn check(stop: &Progress) -> Result<(), ClientError> {
    if stop.is_cancelled() {
        return Err(ClientError::Interrupted { cleaned: true });
    }
    Ok(())
}

/// Best-effort removal of everything a run may have created, as `--clean` does: it touches
/// only the names that exist (a run stopped early has made few of its `--files` and
/// `--meta-files`). If that fails too (the cluster is gone), the user is told how to finish.
async fn clean_up(client: &Client, cfg: &BenchConfig) {
    if let Err(e) = clean_leftovers(client, &cfg.scratch).await {
        progress("");
        eprintln!(
            "warning: the benchmark could not delete what it created ({e}); `dfs-tui --cmd bench --clean` deletes it"
        );
    }
}

async fn run_phases(
    client: &Client,
    cfg: &BenchConfig,
    stop: &Arc<Progress>,
) -> Result<BenchReport, ClientError> {
    std::fs::create_dir_all(&cfg.scratch).map_err(|e| local("create", &cfg.scratch, e))?;
    let mut report = BenchReport {
        master: client.master_addr().to_string(),
        ..Default::default()
    };
    let big = cfg.scratch.join("dfs-bench-large.bin");
    progress("writing the source file…");
    let (path, size, sync) = (big.clone(), cfg.size, cfg.limits);
    let write_secs = off_runtime(move || write_pattern(&path, size, sync))
        .await
        .map_err(|e| local("write", &big, e))?;
    check(stop)?;
    if cfg.limits {
        progress("measuring the machine's limits…");
        let cache = drop_caches(cfg.warm);
        let path = big.clone();
        let (n, secs) = off_runtime(move || read_all(&path))
            .await
            .map_err(|e| local("read", &big, e))?;
        let dir = cfg.scratch.clone();
        let small = off_runtime(move || small_write_fsync(&dir))
            .await
            .map_err(|e| local("measure 4 KiB write+fsync in", &cfg.scratch, e))?;
        let tcp_bytes = cfg.size.max(256 << 20);
        let tcp = off_runtime(move || loopback_tcp(tcp_bytes))
            .await
            .map_err(|e| local("measure loopback with", Path::new("127.0.0.1"), e))?;
        report.limits = Some(Limits {
            write_fsync_mib_s: mib_s(cfg.size, write_secs),
            read_mib_s: mib_s(n, secs),
            read_cache: cache,
            loopback_tcp_mib_s: tcp,
            small_write_fsync_per_s: small,
        });
    }

    // Large files at replication 1 and 3.
    let large_runs: &[u32] = if cfg.size == 0 { &[] } else { &[1, 3] };
    for &replicas in large_runs {
        check(stop)?;
        let res = phase_start(client).await;
        let name = format!("dfs-bench-large-r{replicas}");
        progress(&format!(
            "uploading {} at {replicas} replica(s)…",
            human_bytes(cfg.size)
        ));
        let t = Instant::now();
        let up = client
            .upload(
                &big,
                UploadOptions {
                    name: Some(name.clone()),
                    replicas: Some(replicas),
                    // Only for its cancel flag: an interrupted run stops the transfer.
                    progress: Some(stop.clone()),
                },
            )
            .await?;
        let secs = t.elapsed().as_secs_f64();
        let write_limit = report.limits.as_ref().map(|l| {
            // Every copy lands on the same disk here, so the ceiling divides by the copies.
            l.write_fsync_mib_s / up.replicas_achieved.max(1) as f64
        });
        let mbs = mib_s(cfg.size, secs);
        report.large.push(Throughput {
            phase: format!("upload, {} replica(s)", up.replicas_achieved),
            bytes: cfg.size,
            seconds: secs,
            mib_per_s: mbs,
            of_limit: write_limit.map(|l| mbs / l),
            cache: "-".into(),
        });
        phase_end(
            client,
            &format!("upload, {replicas} replica(s)"),
            res,
            &mut report.resources,
        )
        .await;
        let cache = drop_caches(cfg.warm);
        let res = phase_start(client).await;
        progress(&format!("downloading {}…", human_bytes(cfg.size)));
        let t = Instant::now();
        // Read and verified (CRC32C per chunk, BLAKE3 of the file) into a sink, as `dd
        // of=/dev/null` reads a mounted file system: this measures the cluster, not the
        // client's disk.
        let info = client.stat(&name).await?;
        client.read_file_to(&info, std::io::sink(), stop).await?;
        let secs = t.elapsed().as_secs_f64();
        let mbs = mib_s(cfg.size, secs);
        report.large.push(Throughput {
            phase: format!("download, {} replica(s)", up.replicas_achieved),
            bytes: cfg.size,
            seconds: secs,
            mib_per_s: mbs,
            of_limit: report.limits.as_ref().map(|l| mbs / l.read_mib_s),
            cache,
        });
        phase_end(
            client,
            &format!("download, {replicas} replica(s)"),
            res,
            &mut report.resources,
        )
        .await;
        client.delete(&name).await?;
    }
    let _ = std::fs::remove_file(&big);

    // Small files: 4 KiB at replication 3, create / read / stat / delete.
    let small = cfg.scratch.join("dfs-bench-4k.bin");
    std::fs::write(&small, vec![42u8; 4096]).map_err(|e| local("write", &small, e))?;
    let concurrency: &[usize] = if cfg.files == 0 {
        &[]
    } else {
        &cfg.concurrency
    };
    for &c in concurrency {
        let c = c.max(1);
        for phase in ["create", "read", "stat", "delete"] {
            check(stop)?;
            // Reads start cold where permitted: the workers' page cache is dropped, so each
            // read goes to the disk, as a cold read of any file system does.
            let cache = if phase == "read" {
                drop_caches(cfg.warm)
            } else {
                String::new()
            };
            let res = phase_start(client).await;
            let before = client.reservations();
            let guesses_before = client.read_locations();
            progress(&format!(
                "{phase}: {} files of 4 KiB, concurrency {c}…",
                cfg.files
            ));
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for k in 0..c {
                let client = client.clone();
                let small = small.clone();
                let names: Vec<String> = (k..cfg.files)
                    .step_by(c)
                    .map(|i| format!("dfs-bench-small-{c}-{i}"))
                    .collect();
                let stop = stop.clone();
                tasks.spawn(async move {
                    let mut lat = Vec::with_capacity(names.len());
                    let mut failed = 0;
                    let mut first: Option<ClientError> = None;
                    for n in names {
                        if stop.is_cancelled() {
                            break;
                        }
                        let t = Instant::now();
                        let outcome = match phase {
                            "create" => client
                                .upload(
                                    &small,
                                    UploadOptions {
                                        name: Some(n),
                                        replicas: Some(3),
                                        progress: None,
                                    },
                                )
                                .await
                                .map(|_| ()),
                            "read" => client.read(&n).await.and_then(|b| {
                                if b.len() == 4096 {
                                    Ok(())
                                } else {
                                    Err(ClientError::Integrity(format!(
                                        "{n} read back {} bytes, not 4096",
                                        b.len()
                                    )))
                                }
                            }),
                            "stat" => client.stat(&n).await.map(|_| ()),
                            _ => client.delete(&n).await.map(|_| ()),
                        };
                        match outcome {
                            Ok(()) => lat.push(t.elapsed()),
                            Err(e) => {
                                failed += 1;
                                first.get_or_insert(e);
                            }
                        }
                    }
                    (lat, failed, first)
                });
            }
            let mut lat = Vec::new();
            let mut failed = 0;
            let mut first: Option<ClientError> = None;
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok((l, f, e)) => {
                        lat.extend(l);
                        failed += f;
                        if first.is_none() {
                            first = e;
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        first.get_or_insert(ClientError::InvalidInput(format!(
                            "a benchmark task failed: {e}"
                        )));
                    }
                }
            }
            // An interrupted phase measured nothing whole.
            check(stop)?;
            let secs = started.elapsed().as_secs_f64();
            // Creates are answered before their confirmations land (see `Client::settle`);
            // the last few go out here, so that the next phase starts on a quiet master.
            client.settle().await;
            let after = client.reservations();
            let guesses = client.read_locations();
            let ops_per_s = lat.len() as f64 / secs.max(1e-9);
            lat.sort();
            report.small.push(OpStats {
                phase: phase.into(),
                concurrency: c,
                ops: cfg.files,
                failed,
                ops_per_s,
                p50_ms: percentile(&lat, 0.5),
                p99_ms: percentile(&lat, 0.99),
                first_error: first
                    .as_ref()
                    .map(|e| e.to_string().replace('\n', " "))
                    .unwrap_or_default(),
                first_code: first.as_ref().map(ClientError::code),
                reserved: after.committed - before.committed,
                prepared: after.prepared - before.prepared,
                beside: guesses.used - guesses_before.used,
                beside_missed: (guesses.stale + guesses.failed)
                    - (guesses_before.stale + guesses_before.failed),
                cache,
                of_limit: report
                    .limits
                    .as_ref()
                    .filter(|_| matches!(phase, "create" | "delete"))
                    .map(|l| ops_per_s / l.small_write_fsync_per_s.max(1e-9)),
            });
            phase_end(
                client,
                &format!("4 KiB {phase}, c={c}"),
                res,
                &mut report.resources,
            )
            .await;
        }
    }
    let _ = std::fs::remove_file(&small);
    if cfg.meta_files > 0 {
        let res = phase_start(client).await;
        report.meta = Some(meta_phase(client, cfg.meta_files, stop).await?);
        phase_end(client, "metadata scale", res, &mut report.resources).await;
    }
    progress("");
    Ok(report)
}

/// Names of the metadata phase, in batches the master accepts in one call.
fn meta_names(n: usize) -> impl Iterator<Item = Vec<String>> {
    const BATCH: usize = 10_000;
    (0..n).step_by(BATCH).map(move |start| {
        (start..(start + BATCH).min(n))
            .map(|i| format!("dfs-bench-meta-{i:09}"))
            .collect()
    })
}

/// Creates `n` empty files through the batch fast path, measures listing and stat at that
/// scale and the master's memory growth, then deletes them.
async fn meta_phase(client: &Client, n: usize, stop: &Progress) -> Result<MetaStats, ClientError> {
    let rss = |s: &Snapshot| s.master.map(|m| m.rss_bytes).unwrap_or(0);
    let before = Snapshot::take(client, false).await;
    let started = Instant::now();
    let mut done = 0usize;
    for batch in meta_names(n) {
        check(stop)?;
        done += batch.len();
        client.create_empty(batch).await?;
        progress(&format!("metadata: {done} of {n} names created…"));
    }
    let create_secs = started.elapsed().as_secs_f64();
    // The master's figure is read live by `status` (not from a heartbeat).
    let after = Snapshot::take(client, false).await;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ls = Vec::new();
    for _ in 0..200 {
        let after_name = format!("dfs-bench-meta-{:09}", next() % n as u64);
        let t = Instant::now();
        client.list_page(&after_name, 1000).await?;
        ls.push(t.elapsed());
    }
    let mut stat = Vec::new();
    for _ in 0..2000 {
        let name = format!("dfs-bench-meta-{:09}", next() % n as u64);
        let t = Instant::now();
        client.stat(&name).await?;
        stat.push(t.elapsed());
    }
    ls.sort();
    stat.sort();
    let started = Instant::now();
    let mut deleted = 0usize;
    for batch in meta_names(n) {
        deleted += batch.len();
        client.delete_many(batch).await?;
        progress(&format!("metadata: {deleted} of {n} names deleted…"));
    }
    let delete_secs = started.elapsed().as_secs_f64();
    Ok(MetaStats {
        files: n,
        create_per_s: n as f64 / create_secs.max(1e-9),
        ls_page_p50_ms: percentile(&ls, 0.5),
        ls_page_p99_ms: percentile(&ls, 0.99),
        stat_p50_ms: percentile(&stat, 0.5),
        stat_p99_ms: percentile(&stat, 0.99),
        delete_per_s: n as f64 / delete_secs.max(1e-9),
        master_rss_before: rss(&before),
        master_rss_after: rss(&after),
        master_bytes_per_file: rss(&after).saturating_sub(rss(&before)) as f64 / n as f64,
    })
}

impl BenchReport {
    /// An error if any small-file operation failed: the figures of such a run do not
    /// measure the cluster, so the bench exits non-zero after printing them.
    pub fn failures(&self) -> Option<ClientError> {
        let failed: usize = self.small.iter().map(|o| o.failed).sum();
        let first = self.small.iter().find(|o| o.failed > 0)?;
        Some(ClientError::BenchFailed {
            failed,
            total: self.small.iter().map(|o| o.ops).sum(),
            first: format!(
                "{} c={}: {}",
                first.phase, first.concurrency, first.first_error
            ),
            code: first.first_code.unwrap_or(tonic::Code::Unknown),
        })
    }
}

/// A fraction as a whole percentage, "-" where there is none.
fn percent(f: Option<f64>) -> String {
    f.map(|f| format!("{:.0}%", f * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// The report as a table.
/// One line of `label: ` and `item` of every concurrency's `phase`, joined (none if the
/// phase did not run).
fn summary_line(
    s: &mut String,
    r: &BenchReport,
    phase: &str,
    label: &str,
    item: impl Fn(&OpStats) -> String,
) {
    use std::fmt::Write as _;
    let items: Vec<String> = r
        .small
        .iter()
        .filter(|o| o.phase == phase)
        .map(item)
        .collect();
    if !items.is_empty() {
        let _ = writeln!(s, "{label}: {}", items.join(", "));
    }
}

pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = format!("dfs bench against {}\n", r.master);
    if let Some(l) = &r.limits {
        let _ = writeln!(
            s,
            "machine limits: write+fsync {:.0} MiB/s, sequential read {:.0} MiB/s ({}), loopback TCP {:.0} MiB/s, 4 KiB write+fsync {:.0}/s",
            l.write_fsync_mib_s,
            l.read_mib_s,
            l.read_cache,
            l.loopback_tcp_mib_s,
            l.small_write_fsync_per_s
        );
    }
    if !r.large.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<26} {:>10} {:>9} {:>10} {:>9}  cache",
            "large file", "size", "seconds", "MiB/s", "of limit"
        );
        for t in &r.large {
            let _ = writeln!(
                s,
                "{:<26} {:>10} {:>9.2} {:>10.1} {:>9}  {}",
                t.phase,
                human_bytes(t.bytes),
                t.seconds,
                t.mib_per_s,
                percent(t.of_limit),
                t.cache
            );
        }
    }
    if !r.small.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<10} {:>11} {:>7} {:>7} {:>10} {:>9} {:>9} {:>9}",
            "4 KiB files", "concurrency", "ops", "failed", "ops/s", "p50 ms", "p99 ms", "of limit"
        );
        for o in &r.small {
            let _ = writeln!(
                s,
                "{:<10} {:>11} {:>7} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9}",
                o.phase,
                o.concurrency,
                o.ops,
                o.failed,
                o.ops_per_s,
                o.p50_ms,
                o.p99_ms,
                percent(o.of_limit)
            );
        }
        for o in r.small.iter().filter(|o| o.failed > 0) {
            let _ = writeln!(
                s,
                "{} c={}: {} of {} failed; the first: {}",
                o.phase, o.concurrency, o.failed, o.ops, o.first_error
            );
        }
        summary_line(
            &mut s,
            r,
            "create",
            "creates through reserved uploads",
            |o| {
                format!(
                    "{} of {} at c={} ({} committed beside their writes)",
                    o.reserved, o.ops, o.concurrency, o.prepared
                )
            },
        );
        summary_line(
            &mut s,
            r,
            "read",
            "reads from a worker beside the lookup",
            |o| {
                format!(
                    "{} of {} at c={} ({} missed)",
                    o.beside, o.ops, o.concurrency, o.beside_missed
                )
            },
        );
        if let Some(o) = r.small.iter().find(|o| o.phase == "read") {
            let _ = writeln!(s, "reads began with the page cache {}", o.cache);
        }
    }
    if let Some(m) = &r.meta {
        let _ = writeln!(
            s,
            "\nmetadata scale: {} empty files created at {:.0}/s (batches of 10,000), deleted at {:.0}/s",
            m.files, m.create_per_s, m.delete_per_s
        );
        let _ = writeln!(
            s,
            "  ls page of 1,000: p50 {:.2} ms, p99 {:.2} ms; stat: p50 {:.2} ms, p99 {:.2} ms",
            m.ls_page_p50_ms, m.ls_page_p99_ms, m.stat_p50_ms, m.stat_p99_ms
        );
        let _ = writeln!(
            s,
            "  master resident memory {} -> {}: {:.0} bytes per file",
            human_bytes(m.master_rss_before),
            human_bytes(m.master_rss_after),
            m.master_bytes_per_file
        );
    }
    if !r.resources.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<26} {:<24} {:>8} {:>12} {:>12}",
            "resources", "process", "cpu s", "rss end", "peak"
        );
        for u in &r.resources {
            let _ = writeln!(
                s,
                "{:<26} {:<24} {:>8.2} {:>12} {:>12}",
                u.phase,
                u.process,
                u.cpu_s,
                human_bytes(u.rss_end_bytes),
                human_bytes(u.peak_bytes)
            );
        }
    }
    s
}
