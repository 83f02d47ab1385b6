//! `worker`: the storage daemon. Parses flags and runs [`dfs::worker::Worker`].

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
}

fn main() {
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
    };
    let worker = Worker::open(&cfg, &listener)?;
    tracing::info!(address = %worker.address(), master = %args.master, data_dir = %cfg.data_dir.display(), "worker starting");
    worker
        .serve(listener, dfs::cluster::shutdown_signal())
        .await
        .context("worker failed")?;
    Ok(())
}
