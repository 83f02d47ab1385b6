//! `dfs-tui --cmd bench`: a benchmark any user can run against any cluster (or an embedded one
//! with `--local N`). One long-lived client process; throughput is also reported as a fraction
//! of this machine's own limits measured in the same run (`--limits`), because only same-run
//! ratios compare on a noisy machine.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientError, UploadOptions};
use crate::config::human_bytes;

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
    pub ops: usize,
    pub failed: usize,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Limits {
    pub write_fsync_mib_s: f64,
    pub read_mib_s: f64,
    pub read_cache: String,
    pub loopback_tcp_mib_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub master: String,
    pub limits: Option<Limits>,
    pub large: Vec<Throughput>,
    pub small: Vec<OpStats>,
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

/// Runs the benchmark phases against `client`.
pub async fn run(client: &Client, cfg: &BenchConfig) -> Result<BenchReport, ClientError> {
    std::fs::create_dir_all(&cfg.scratch).map_err(|e| local("create", &cfg.scratch, e))?;
    let mut report = BenchReport {
        master: client.master_addr().to_string(),
        ..Default::default()
    };
    let big = cfg.scratch.join("dfs-bench-large.bin");
    progress("writing the source file…");
    let write_secs = tokio::task::block_in_place(|| write_pattern(&big, cfg.size, cfg.limits))
        .map_err(|e| local("write", &big, e))?;
    if cfg.limits {
        progress("measuring the machine's limits…");
        let cache = drop_caches(cfg.warm);
        let (n, secs) =
            tokio::task::block_in_place(|| read_all(&big)).map_err(|e| local("read", &big, e))?;
        let tcp = tokio::task::block_in_place(|| loopback_tcp(cfg.size.max(256 << 20)))
            .map_err(|e| local("measure loopback with", Path::new("127.0.0.1"), e))?;
        report.limits = Some(Limits {
            write_fsync_mib_s: mib_s(cfg.size, write_secs),
            read_mib_s: mib_s(n, secs),
            read_cache: cache,
            loopback_tcp_mib_s: tcp,
        });
    }

    // Large files at replication 1 and 3.
    for replicas in [1u32, 3] {
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
                    progress: None,
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
        let cache = drop_caches(cfg.warm);
        progress(&format!("downloading {}…", human_bytes(cfg.size)));
        let t = Instant::now();
        // Read and verified (CRC32C per chunk, SHA-256 of the file) into a sink, as `dd
        // of=/dev/null` reads a mounted file system: this measures the cluster, not the
        // client's disk.
        let info = client.stat(&name).await?;
        client
            .read_file_to(&info, std::io::sink(), &Default::default())
            .await?;
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
        client.delete(&name).await?;
    }
    let _ = std::fs::remove_file(&big);

    // Small files: 4 KiB at replication 3, create / read / stat / delete.
    let small = cfg.scratch.join("dfs-bench-4k.bin");
    std::fs::write(&small, vec![42u8; 4096]).map_err(|e| local("write", &small, e))?;
    for &c in &cfg.concurrency {
        let c = c.max(1);
        for phase in ["create", "read", "stat", "delete"] {
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
                tasks.spawn(async move {
                    let mut lat = Vec::with_capacity(names.len());
                    let mut failed = 0;
                    for n in names {
                        let t = Instant::now();
                        let ok = match phase {
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
                                .is_ok(),
                            "read" => client.read(&n).await.is_ok_and(|b| b.len() == 4096),
                            "stat" => client.stat(&n).await.is_ok(),
                            _ => client.delete(&n).await.is_ok(),
                        };
                        lat.push(t.elapsed());
                        if !ok {
                            failed += 1;
                        }
                    }
                    (lat, failed)
                });
            }
            let mut lat = Vec::new();
            let mut failed = 0;
            while let Some(r) = tasks.join_next().await {
                if let Ok((l, f)) = r {
                    lat.extend(l);
                    failed += f;
                }
            }
            let secs = started.elapsed().as_secs_f64();
            lat.sort();
            report.small.push(OpStats {
                phase: phase.into(),
                concurrency: c,
                ops: lat.len(),
                failed,
                ops_per_s: lat.len() as f64 / secs.max(1e-9),
                p50_ms: percentile(&lat, 0.5),
                p99_ms: percentile(&lat, 0.99),
            });
        }
    }
    let _ = std::fs::remove_file(&small);
    progress("");
    Ok(report)
}

/// The report as a table.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = format!("dfs bench against {}\n", r.master);
    if let Some(l) = &r.limits {
        let _ = writeln!(
            s,
            "machine limits: write+fsync {:.0} MiB/s, sequential read {:.0} MiB/s ({}), loopback TCP {:.0} MiB/s",
            l.write_fsync_mib_s, l.read_mib_s, l.read_cache, l.loopback_tcp_mib_s
        );
    }
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
            t.of_limit
                .map(|f| format!("{:.0}%", f * 100.0))
                .unwrap_or_else(|| "-".into()),
            t.cache
        );
    }
    let _ = writeln!(
        s,
        "\n{:<10} {:>11} {:>7} {:>7} {:>10} {:>9} {:>9}",
        "4 KiB files", "concurrency", "ops", "failed", "ops/s", "p50 ms", "p99 ms"
    );
    for o in &r.small {
        let _ = writeln!(
            s,
            "{:<10} {:>11} {:>7} {:>7} {:>10.0} {:>9.2} {:>9.2}",
            o.phase, o.concurrency, o.ops, o.failed, o.ops_per_s, o.p50_ms, o.p99_ms
        );
    }
    s
}
