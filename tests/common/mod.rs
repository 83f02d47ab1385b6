//! Shared fixtures: an in-process cluster in a temp dir, real-binary daemons that are killed on
//! drop, deterministic test data, and bounded polling.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dfs::client::{Client, DownloadOptions, UploadOptions};
use dfs::cluster::{LocalCluster, LocalClusterConfig};
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1 << 20;

/// A local cluster and the temp dir that holds its data (removed after the cluster stops).
pub struct TestCluster {
    pub cluster: LocalCluster,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    pub async fn start(cfg: LocalClusterConfig) -> TestCluster {
        Self::start_with(cfg, dfs::rpc::Transport::plain()).await
    }

    /// A cluster whose client connects with `transport` (TLS, token).
    pub async fn start_with(
        cfg: LocalClusterConfig,
        transport: dfs::rpc::Transport,
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let cluster = LocalCluster::start(dir.path(), cfg)
            .await
            .expect("cluster starts");
        let client = Client::connect_with(cluster.master_addr(), transport)
            .await
            .expect("client connects");
        TestCluster {
            cluster,
            client,
            dir,
        }
    }

    /// A scratch directory for local files of the test.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    pub async fn must_upload(&self, path: &Path, name: &str) -> dfs::client::UploadReport {
        must_upload_with(&self.client, path, name).await
    }

    /// Downloads `name` and asserts the bytes equal those of `expected`.
    pub async fn must_download_equal(&self, name: &str, expected: &Path) {
        let dest = self
            .scratch()
            .join(format!("dl-{}", dfs::chunk::random_u128()));
        self.client
            .download(name, &dest, DownloadOptions::default())
            .await
            .unwrap_or_else(|e| panic!("download of {name} failed: {e}"));
        assert_files_equal(&dest, expected);
        std::fs::remove_file(&dest).ok();
    }
}

/// Uploads `path` as `name` through `client`, or panics with the error.
pub async fn must_upload_with(
    client: &Client,
    path: &Path,
    name: &str,
) -> dfs::client::UploadReport {
    client
        .upload(
            path,
            UploadOptions {
                name: Some(name.to_string()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("upload of {name} failed: {e}"))
}

/// Small chunks keep multi-chunk tests fast.
pub fn small_chunks(workers: usize) -> LocalClusterConfig {
    LocalClusterConfig {
        workers,
        chunk_size: MIB,
        heartbeat_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(200),
        gc_grace: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Writes `size` deterministic pseudo-random bytes (seeded) to `path`, streaming.
pub fn make_file(path: &Path, size: u64, seed: u64) -> PathBuf {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create test file"));
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = Vec::with_capacity(64 * 1024);
    while left > 0 {
        buf.clear();
        let n = left.min(64 * 1024);
        while (buf.len() as u64) < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(n as usize);
        f.write_all(&buf).expect("write test file");
        left -= n;
    }
    f.flush().expect("flush test file");
    path.to_path_buf()
}

/// The file's BLAKE3, as `b3sum` prints it: what uploads record now.
pub fn blake3_file(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).expect("open for hashing"))
        .expect("hash file");
    h.finalize().to_hex().to_string()
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open for hashing");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash file");
    hex::encode(h.finalize())
}

/// Compares two files by length and streamed hash (never loads them whole).
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = std::fs::metadata(a).expect("stat a").len();
    let lb = std::fs::metadata(b).expect("stat b").len();
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    assert_eq!(
        sha256_file(a),
        sha256_file(b),
        "{} and {} differ in content",
        a.display(),
        b.display()
    );
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every chunk (chunk files and live volume records; not tmp, not quarantine) under a
/// worker's data dir, read from the disk itself.
pub fn chunk_files(worker_dir: &Path) -> Vec<dfs::worker::store::StoredChunk> {
    dfs::worker::store::stored_chunks(worker_dir)
}

/// Chunk `id` as stored under a worker's data dir, if it is there.
pub fn chunk_path(worker_dir: &Path, id: &str) -> Option<dfs::worker::store::StoredChunk> {
    chunk_files(worker_dir).into_iter().find(|c| c.id == id)
}

/// Flips bits of the byte at `at` within a stored chunk's data, on disk.
pub fn corrupt_stored(
    c: &dfs::worker::store::StoredChunk,
    at: u64,
    mask: u8,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&c.path)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, c.data_offset + at)?;
    b[0] ^= mask;
    f.write_all_at(&b, c.data_offset + at)
}

/// Streams `data` as chunk `placement` through its pipeline, with an optional wrong CRC.
pub async fn write_chunk_direct(
    placement: &dfs::rpc::pb::ChunkPlacement,
    name: &str,
    data: &[u8],
    crc_override: Option<u32>,
) -> Result<dfs::rpc::pb::WriteChunkResponse, tonic::Status> {
    use dfs::rpc::pb;
    use pb::write_chunk_request::Msg;
    let crc = crc_override.unwrap_or_else(|| crc32c::crc32c(data));
    let mut msgs = vec![pb::WriteChunkRequest {
        msg: Some(Msg::Start(pb::WriteStart {
            header: Some(pb::ChunkHeader {
                format_version: 1,
                chunk_id: placement.chunk_id.clone(),
                file_id: 1,
                file_name: name.into(),
                chunk_index: placement.index,
                file_version: 1,
                length: data.len() as u64,
                crc32c: 0,
                created_unix_ms: 0,
                ..Default::default()
            }),
            downstream: placement.workers[1..].to_vec(),
            token: placement.token.clone(),
        })),
    }];
    for part in data.chunks(256 * 1024) {
        msgs.push(pb::WriteChunkRequest {
            msg: Some(Msg::Data(bytes::Bytes::copy_from_slice(part))),
        });
    }
    msgs.push(pb::WriteChunkRequest {
        msg: Some(Msg::Finish(pb::WriteFinish { crc32c: crc })),
    });
    let mut w = dfs::rpc::worker_client(dfs::rpc::data_channel(&placement.workers[0]).unwrap());
    w.write_chunk(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// A master client over a control channel to `addr`.
pub type MasterRpc = dfs::rpc::pb::master_client::MasterClient<tonic::transport::Channel>;

/// Reserves `count` uploads through one `ReserveUploads` call.
pub async fn reserve(m: &mut MasterRpc, count: u32) -> dfs::rpc::pb::ReserveUploadsResponse {
    m.reserve_uploads(dfs::rpc::pb::ReserveUploadsRequest { count, replicas: 0 })
        .await
        .unwrap()
        .into_inner()
}

/// Commits one upload alone (`CommitUploads`, or `PrepareUploads` with `prepare`) and
/// returns its answer.
pub async fn commit_alone(
    m: &mut MasterRpc,
    commit: dfs::rpc::pb::CommitUploadRequest,
    prepare: bool,
) -> dfs::rpc::pb::CommitUploadResult {
    let req = dfs::rpc::pb::CommitUploadsRequest {
        commits: vec![commit],
        ..Default::default()
    };
    let mut r = if prepare {
        m.prepare_uploads(req).await
    } else {
        m.commit_uploads(req).await
    }
    .unwrap()
    .into_inner()
    .results;
    assert_eq!(r.len(), 1);
    r.remove(0)
}

/// The commit of reserved upload `plan` as `name` holding `data`, as a client sends it
/// (to `CommitUploads`, or to `PrepareUploads` beside its writes).
pub fn reserved_commit(
    plan: &dfs::rpc::pb::StartUploadResponse,
    name: &str,
    data: &[u8],
) -> dfs::rpc::pb::CommitUploadRequest {
    let p = &plan.chunks[0];
    dfs::rpc::pb::CommitUploadRequest {
        upload_id: plan.upload_id.clone(),
        chunks: vec![dfs::rpc::pb::CommittedChunk {
            index: 0,
            chunk_id: p.chunk_id.clone(),
            length: data.len() as u64,
            crc32c: crc32c::crc32c(data),
            workers: p.workers.clone(),
        }],
        name: name.to_string(),
        size: data.len() as u64,
        blake3: blake3::hash(data).to_hex().to_string(),
        ..Default::default()
    }
}

/// Kills in-process worker `i` and waits until it is gone for its clients too: the kill
/// aborts the worker's task at its next poll, so first its listener goes, then its open
/// connections, which close with a GOAWAY a round trip later.
pub async fn kill_worker_and_wait(cluster: &mut LocalCluster, i: usize) {
    cluster.kill_worker(i).unwrap();
    let dead = cluster.worker_addrs()[i].clone();
    let gone = wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&dead).is_err()
    })
    .await;
    assert!(gone, "the killed worker still accepts connections");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------------
// Real binaries.
// ---------------------------------------------------------------------------------------------

/// A daemon started from the real binary; SIGKILLed on drop so a failing test leaves nothing.
pub struct Daemon {
    pub child: Child,
    pub name: String,
    /// Where its stderr goes (a file, never an unread pipe that could fill up).
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn spawn(bin: &str, args: &[&str], cwd: &Path) -> Daemon {
        Self::spawn_logging(bin, args, cwd, Some("warn"))
    }

    /// [`Daemon::spawn`] with `RUST_LOG` (the stderr filter) set to `rust_log`, or unset.
    pub fn spawn_logging(bin: &str, args: &[&str], cwd: &Path, rust_log: Option<&str>) -> Daemon {
        let stderr_path = cwd.join(format!(
            "stderr-{}-{}.log",
            Path::new(bin)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("daemon"),
            dfs::chunk::random_u128() as u32
        ));
        let err = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(bin);
        match rust_log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        let child = cmd
            .args(args)
            .current_dir(cwd)
            .env_remove("DFS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Daemon {
            child,
            name: format!("{bin} {}", args.join(" ")),
            stderr_path,
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits (bounded) for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_text(&mut self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A two-thread runtime for tests that drive the client library beside real binaries (the
/// test itself stays synchronous so its process guards run on every exit path).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
}

/// A port that was free a moment ago, for a daemon started later with `--port`/`--listen`.
/// Chosen below the kernel's ephemeral range (32768 and up here): a port from `bind(0)`
/// comes from that range, where any outgoing connection of a parallel test could take it
/// before the daemon binds it (a worker of a CI run once never started that way).
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (dfs::chunk::random_u128() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Output of a finished CLI run.
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `dfs-tui` with `args` in `cwd` against `master`, bounded by a timeout.
pub fn cli(master: &str, cwd: &Path, args: &[&str]) -> CliOut {
    let o = cli_raw(master, cwd, args, None, Stdio::piped(), &[]);
    CliOut {
        code: o.code,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: o.stderr,
        elapsed: o.elapsed,
    }
}

/// Output of a finished CLI run, with its stdout as bytes.
pub struct RawCliOut {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

/// [`cli`] with standard input fed `input` (else empty), stdout going to `stdout` (read
/// back only when piped) and extra environment variables. Killed after 120 s.
pub fn cli_raw(
    master: &str,
    cwd: &Path,
    args: &[&str],
    input: Option<Vec<u8>>,
    stdout: Stdio,
    env: &[(&str, &std::ffi::OsStr)],
) -> RawCliOut {
    use std::io::Write;
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dfs-tui"))
        .arg("--master")
        .arg(master)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dfs-tui");
    // Fed from a thread, as the command reads it (a pipe holds 64 KiB). A command that
    // refuses its input exits without reading it: the broken pipe is not the test's error.
    let feeder = child.stdin.take().zip(input).map(|(mut stdin, data)| {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    // Collect output on a thread (pipes are drained while the child runs) with a bound.
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(out)) => out,
        _ => {
            // SAFETY: kill(2) on the child we spawned.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("dfs-tui {args:?} did not finish in time");
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    RawCliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

pub const MASTER: &str = env!("CARGO_BIN_EXE_master");
pub const WORKER: &str = env!("CARGO_BIN_EXE_worker");

/// Real `master` and `worker` processes in a temp dir, killed on drop (through `Daemon`).
pub struct Binaries {
    pub dir: tempfile::TempDir,
    pub master_port: u16,
    pub master: Option<Daemon>,
    pub workers: Vec<(u16, Option<Daemon>)>,
    pub master_args: Vec<String>,
    pub worker_args: Vec<String>,
    /// Flags every `cli` call adds (TLS files, token).
    pub client_args: Vec<String>,
}

impl Binaries {
    pub fn master_addr(&self) -> String {
        format!("127.0.0.1:{}", self.master_port)
    }

    pub fn cwd(&self) -> &Path {
        self.dir.path()
    }

    pub fn start_master(&mut self) {
        let listen = self.master_addr();
        let mut args: Vec<&str> = vec!["--listen", &listen];
        // 2 s unless the test sets its own (one that holds a worker with SIGSTOP for a while
        // keeps it alive with a longer one).
        if !self.master_args.iter().any(|a| a == "--heartbeat-timeout") {
            args.extend(["--heartbeat-timeout", "2s"]);
        }
        args.extend(self.master_args.iter().map(String::as_str));
        self.master = Some(Daemon::spawn(MASTER, &args, self.dir.path()));
    }

    pub fn start_worker(&mut self, i: usize) {
        let port = self.workers[i].0.to_string();
        let master = self.master_addr();
        let mut args: Vec<&str> = vec![
            "--port",
            &port,
            "--master",
            &master,
            "--heartbeat-interval",
            "200ms",
        ];
        args.extend(self.worker_args.iter().map(String::as_str));
        let d = Daemon::spawn(WORKER, &args, self.dir.path());
        self.workers[i].1 = Some(d);
    }

    pub fn start(workers: usize) -> Binaries {
        Self::start_with(workers, &[])
    }

    /// Starts with extra master flags (e.g. a short GC grace).
    pub fn start_with(workers: usize, master_args: &[&str]) -> Binaries {
        Self::start_with_args(workers, master_args, &[], &[])
    }

    /// Starts with extra flags for the master, the workers and every `cli` call.
    pub fn start_with_args(
        workers: usize,
        master_args: &[&str],
        worker_args: &[&str],
        client_args: &[&str],
    ) -> Binaries {
        let own = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut b = Binaries {
            dir: tempfile::tempdir().expect("temp dir"),
            master_port: free_port(),
            master: None,
            workers: (0..workers).map(|_| (free_port(), None)).collect(),
            master_args: own(master_args),
            worker_args: own(worker_args),
            client_args: own(client_args),
        };
        b.start_master();
        for i in 0..workers {
            b.start_worker(i);
        }
        b
    }

    /// The last `n` lines of a log file under `logs/`.
    pub fn log_tail(&self, file: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.cwd().join("logs").join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn cli(&self, args: &[&str]) -> CliOut {
        let mut all: Vec<&str> = self.client_args.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        cli(&self.master_addr(), self.cwd(), &all)
    }

    /// The end of every worker's stderr (a worker that could not start says why there).
    pub fn workers_stderr(&self) -> String {
        let mut out = String::new();
        for (port, d) in &self.workers {
            if let Some(d) = d {
                let text = std::fs::read_to_string(&d.stderr_path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(10)..].join("\n");
                out.push_str(&format!("worker {port} stderr:\n{tail}\n"));
            }
        }
        out
    }

    /// Polls `status --json` until `alive` workers are alive (bounded).
    pub fn wait_alive(&self, alive: u64) {
        self.wait_status(
            &format!("{alive} alive workers"),
            Duration::from_secs(30),
            |v| v["workers_alive"].as_u64() == Some(alive),
        );
    }

    /// Polls `status --json` until `pred` holds (a master that is down is polled again);
    /// panics with the last answer and the master's log after `timeout`. Returns the wait.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let out = self.cli(&["--cmd", "status", "--json"]);
            if out.code == 0 {
                let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
                if pred(&v) {
                    return started.elapsed();
                }
            }
            assert!(
                started.elapsed() < timeout,
                "timed out waiting for {what}: {} {}\nmaster.log tail:\n{}\n{}",
                out.stdout,
                out.stderr,
                self.log_tail("master.log", 40),
                self.workers_stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
