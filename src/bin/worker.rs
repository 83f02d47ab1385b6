//! `worker`: the storage daemon. Parses flags and runs [`dfs::worker::Worker`].
// The flags' doc comments are their `--help` text, written for a terminal (`<PORT>`,
// `[default: …]`), not rustdoc markup.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dfs::config::{ByteSize, HumanDuration};
use dfs::worker::{Worker, WorkerConfig};

/// A dfs worker: stores chunks on local disk and serves them to clients and other workers.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Args {
    /// Port to serve gRPC on.
    #[arg(long, env = "DFS_WORKER_PORT")]
    port: u16,
    /// Host to bind and to advertise to the master and clients.
    #[arg(long, env = "DFS_WORKER_HOST", default_value = "127.0.0.1")]
    host: String,
    /// The master's address.
    #[arg(long, env = "DFS_MASTER", default_value = "127.0.0.1:50050")]
    master: String,
    /// Chunk directory [default: worker_localhost_<PORT>].
    #[arg(long, env = "DFS_WORKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Space this worker may use (e.g. 10GiB) [default: the file system's size].
    #[arg(long, env = "DFS_WORKER_CAPACITY")]
    capacity: Option<ByteSize>,
    /// Directory for the log file (worker-<PORT>.log).
    #[arg(long, env = "DFS_LOG_DIR", default_value = "logs")]
    log_dir: PathBuf,
    /// Interval between heartbeats to the master.
    #[arg(long, env = "DFS_HEARTBEAT_INTERVAL", default_value = "1s")]
    heartbeat_interval: HumanDuration,
    /// Scrubber read rate: how fast stored chunks are re-verified in the background (0 = off).
    #[arg(long, env = "DFS_SCRUB_RATE", default_value = "32MiB")]
    scrub_rate: ByteSize,
    /// Pause between two scrub passes over all chunks.
    #[arg(long, env = "DFS_SCRUB_INTERVAL", default_value = "1h")]
    scrub_interval: HumanDuration,
    #[command(flatten)]
    access: dfs::cli::access::DaemonAccessArgs,
    /// Largest message accepted (data messages carry at most 1 MiB).
    #[arg(long, env = "DFS_MAX_MESSAGE_SIZE", default_value = "4MiB")]
    max_message_size: ByteSize,
    /// Concurrent HTTP/2 streams one connection may open.
    #[arg(long, env = "DFS_MAX_STREAMS_PER_CONN", default_value_t = 256)]
    max_streams_per_conn: u32,
    /// Chunk reads, writes and copies served at once; more get ResourceExhausted.
    #[arg(long, env = "DFS_MAX_TRANSFERS", default_value_t = 256)]
    max_transfers: usize,
    /// A chunk stream that neither sends nor takes data for this long is cut off
    /// (DeadlineExceeded) and its resources freed.
    #[arg(long, env = "DFS_IDLE_TIMEOUT", default_value = "30s")]
    idle_timeout: HumanDuration,
}

fn main() {
    dfs::procstat::tune_allocator();
    let args = Args::parse();
    let _guard = dfs::logging::init(&args.log_dir, &format!("worker-{}.log", args.port), None);
    if let Err(e) = run(args) {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        drop(_guard); // flush the log file before exiting
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let listen = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("cannot listen on {listen}"))?;
    let (secret, tls) = args.access.load()?;
    dfs::cli::access::log_exposure("worker", bound, secret.is_some(), tls.is_some());
    anyhow::ensure!(
        args.max_message_size.0 >= 2 << 20 && args.max_message_size.0 <= 1 << 30,
        "--max-message-size must be between 2MiB and 1GiB (data messages carry 1 MiB)"
    );
    anyhow::ensure!(
        args.max_transfers > 0 && args.max_streams_per_conn > 0,
        "--max-transfers and --max-streams-per-conn must be at least 1"
    );
    anyhow::ensure!(
        args.idle_timeout.0 >= std::time::Duration::from_millis(100),
        "--idle-timeout must be at least 100ms"
    );
    let cfg = WorkerConfig {
        data_dir: args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("worker_localhost_{}", args.port))),
        master: args.master.clone(),
        host: args.host.clone(),
        capacity: args.capacity.map(|c| c.0),
        heartbeat_interval: args.heartbeat_interval.0,
        scrub: dfs::worker::scrub::ScrubConfig {
            rate: args.scrub_rate.0,
            interval: args.scrub_interval.0,
        },
        cluster_secret: secret,
        tls,
        limits: dfs::worker::WorkerLimits {
            max_message: args.max_message_size.0 as usize,
            max_streams_per_conn: args.max_streams_per_conn,
            max_transfers: args.max_transfers,
            idle_timeout: args.idle_timeout.0,
        },
    };
    let worker = Worker::open(&cfg, &listener)?;
    tracing::info!(address = %worker.address(), master = %args.master, data_dir = %cfg.data_dir.display(), "worker starting");
    worker
        .serve(listener, dfs::cluster::shutdown_signal())
        .await
        .context("worker failed")?;
    Ok(())
}
