//! `master`: the metadata daemon. Parses flags and runs [`dfs::master::Master`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dfs::config::{ByteSize, HumanDuration};
use dfs::master::{Master, MasterConfig};

/// The dfs master: file metadata, worker registry, placement and health. Never carries file
/// bytes.
#[derive(Debug, Parser)]
#[command(name = "master", version)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "DFS_LISTEN", default_value = "127.0.0.1:50050")]
    listen: String,
    /// Directory of the metadata store (created if missing).
    #[arg(long, env = "DFS_MASTER_DATA_DIR", default_value = "master_data")]
    data_dir: PathBuf,
    /// Directory for the log file (master.log).
    #[arg(long, env = "DFS_LOG_DIR", default_value = "logs")]
    log_dir: PathBuf,
    /// Size of the chunks files are split into (e.g. 8MiB, 64MiB).
    #[arg(long, env = "DFS_CHUNK_SIZE", default_value = "8MiB")]
    chunk_size: ByteSize,
    /// Default number of replicas per chunk (capped by the number of live workers).
    #[arg(long, env = "DFS_REPLICAS", default_value_t = 3)]
    replicas: u32,
    /// A worker silent this long is dead (suspect after half of it).
    #[arg(long, env = "DFS_HEARTBEAT_TIMEOUT", default_value = "5s")]
    heartbeat_timeout: HumanDuration,
    /// An upload with no sign of life this long is aborted and its chunks deleted.
    #[arg(long, env = "DFS_UPLOAD_LEASE", default_value = "10m")]
    upload_lease: HumanDuration,
    /// Deleted chunks and orphan chunks are purged from workers only after this grace period.
    #[arg(long, env = "DFS_GC_GRACE", default_value = "1m")]
    gc_grace: HumanDuration,
    /// A small file committed beside its writes and not confirmed by its client this long
    /// is settled by asking its workers (kept if one holds it, dropped if none does).
    /// Clients acknowledge such a write without its confirmation only within half of this.
    #[arg(long, env = "DFS_IN_DOUBT_GRACE", default_value = "4s")]
    in_doubt_grace: HumanDuration,
    /// Re-replication copies that may run at once per worker (as source or target).
    #[arg(long, env = "DFS_MAX_REPAIRS_PER_WORKER", default_value_t = 2)]
    max_repairs_per_worker: usize,
    /// Memory for the metadata store's page cache; the master's resident size is about this
    /// plus a few dozen bytes per chunk, whatever the number of files.
    #[arg(long, env = "DFS_METADATA_CACHE", default_value = "64MiB")]
    metadata_cache: ByteSize,
    /// Rebuild lost metadata from the chunk headers the workers hold (needs an empty data dir).
    #[arg(long)]
    rebuild_from_workers: bool,
    /// With --rebuild-from-workers: how long to collect worker reports before rebuilding.
    #[arg(long, env = "DFS_REBUILD_WINDOW", default_value = "15s")]
    rebuild_window: HumanDuration,
    #[command(flatten)]
    access: dfs::cli::access::DaemonAccessArgs,
    /// How long a chunk capability handed to a client stays valid.
    #[arg(long, env = "DFS_CHUNK_TOKEN_TTL", default_value = "1h")]
    chunk_token_ttl: HumanDuration,
    /// Largest request accepted (worker chunk reports are the largest); larger ones get
    /// ResourceExhausted.
    #[arg(long, env = "DFS_MAX_MESSAGE_SIZE", default_value = "64MiB")]
    max_message_size: ByteSize,
    /// Concurrent HTTP/2 streams one connection may open.
    #[arg(long, env = "DFS_MAX_STREAMS_PER_CONN", default_value_t = 256)]
    max_streams_per_conn: u32,
    /// Deadline for one request; slower ones get DeadlineExceeded.
    #[arg(long, env = "DFS_REQUEST_TIMEOUT", default_value = "60s")]
    request_timeout: HumanDuration,
    /// Open uploads one client (token subject, or IP address without tokens) may hold;
    /// more get ResourceExhausted.
    #[arg(long, env = "DFS_MAX_OPEN_UPLOADS_PER_CLIENT", default_value_t = 256)]
    max_open_uploads_per_client: usize,
}

fn main() {
    dfs::procstat::tune_allocator();
    let args = Args::parse();
    let _guard = dfs::logging::init(&args.log_dir, "master.log", None);
    if let Err(e) = run(args) {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        drop(_guard); // flush the log file before exiting
        std::process::exit(1);
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = MasterConfig::new(&args.data_dir);
    cfg.chunk_size = args.chunk_size.0;
    cfg.default_replicas = args.replicas;
    cfg.heartbeat_timeout = args.heartbeat_timeout.0;
    cfg.upload_lease = args.upload_lease.0;
    cfg.gc_grace = args.gc_grace.0;
    cfg.in_doubt_grace = args.in_doubt_grace.0;
    cfg.metadata_cache = args.metadata_cache.0;
    cfg.max_repairs_per_worker = args.max_repairs_per_worker;
    if args.rebuild_from_workers {
        cfg.rebuild_window = Some(args.rebuild_window.0);
    }
    let (secret, tls) = args.access.load()?;
    let (has_secret, has_tls) = (secret.is_some(), tls.is_some());
    cfg.cluster_secret = secret;
    cfg.tls = tls;
    cfg.chunk_token_ttl = args.chunk_token_ttl.0;
    anyhow::ensure!(
        args.max_message_size.0 >= 1 << 20 && args.max_message_size.0 <= 1 << 30,
        "--max-message-size must be between 1MiB and 1GiB"
    );
    anyhow::ensure!(
        args.max_open_uploads_per_client > 0 && args.max_streams_per_conn > 0,
        "--max-open-uploads-per-client and --max-streams-per-conn must be at least 1"
    );
    cfg.limits = dfs::master::MasterLimits {
        max_message: args.max_message_size.0 as usize,
        max_streams_per_conn: args.max_streams_per_conn,
        request_timeout: args.request_timeout.0,
        max_open_uploads_per_client: args.max_open_uploads_per_client,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    dfs::cli::access::log_exposure("master", bound, has_secret, has_tls);
    let master = Master::open(cfg)
        .with_context(|| format!("cannot open metadata in {}", args.data_dir.display()))?;
    tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), chunk_size = %args.chunk_size, replicas = args.replicas, "master starting");
    master
        .serve(listener, dfs::cluster::shutdown_signal())
        .await
        .context("master failed")?;
    Ok(())
}
