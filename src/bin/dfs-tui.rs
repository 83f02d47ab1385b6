//! `dfs-tui`: the cluster console, and with `--cmd` the scriptable command line.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use dfs::cli::Op;
use dfs::cluster::{LocalCluster, LocalClusterConfig};
use dfs::rpc::Transport;
use dfs::security::tls::TlsMaterial;

/// The dfs console: a live dashboard of workers, files, transfers and logs.
/// `dfs-tui --cmd OP ARGS…` runs one operation and exits (scriptable).
#[derive(Debug, Parser)]
#[command(name = "dfs-tui", version, subcommand_value_name = "OP")]
struct Args {
    /// The master's address.
    #[arg(
        long,
        env = "DFS_MASTER",
        default_value = "127.0.0.1:50050",
        global = true
    )]
    master: String,
    /// Start an embedded cluster (a master and N workers in this process) and use it.
    #[arg(long, value_name = "N")]
    local: Option<usize>,
    /// Data directory of the embedded cluster.
    #[arg(long, env = "DFS_LOCAL_DIR", default_value = "dfs-local")]
    data_dir: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Directory for the log file (dfs-tui.log).
    #[arg(long, env = "DFS_LOG_DIR", default_value = "logs", global = true)]
    log_dir: PathBuf,
    /// Threads that run the async tasks: the network and the metadata, of the client and of
    /// an embedded cluster. File reads and writes, checksums and fsyncs have threads of their
    /// own. One is fastest on small machines: handing a request from one async thread to
    /// another cost ~30 µs of wake-up per hop on a 2-core VM (README, Performance); raise it
    /// for many large transfers at once on a big machine.
    #[arg(long, env = "DFS_ASYNC_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), global = true)]
    async_threads: u16,
    #[command(flatten)]
    access: dfs::cli::access::AccessArgs,
    /// Run one operation (given as `--cmd OP ARGS…`).
    #[command(subcommand)]
    op: Option<Op>,
}

/// `--cmd OP` is spelled as a flag for users; clap sees `OP` as a subcommand.
fn normalize(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    for a in args {
        if a == "--cmd" {
            continue;
        }
        match a.strip_prefix("--cmd=") {
            Some(op) => out.push(op.to_string()),
            None => out.push(a),
        }
    }
    out
}

/// A clap error on one line: its first line, and when that ends in a colon, the list below
/// it (clap puts the missing arguments there, so `stat` without a name used to say only
/// "the following required arguments were not provided:").
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let mut out = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .trim_end()
        .to_string();
    if out.ends_with(':') {
        let listed: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        if !listed.is_empty() {
            out.push(' ');
            out.push_str(&listed.join(", "));
        }
    }
    out
}

fn main() {
    dfs::procstat::tune_allocator();
    let argv = normalize(std::env::args());
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line, like every other error of this tool.
            eprintln!("{} (see dfs-tui --help)", one_line(&e.render().to_string()));
            std::process::exit(2);
        }
    };
    if args.local == Some(0) || args.local.is_some_and(|n| n > 64) {
        eprintln!("error: --local takes 1 to 64 workers");
        std::process::exit(2);
    }
    if let Some(op) = &args.op
        && op.is_offline()
    {
        std::process::exit(dfs::cli::run_offline(op, &args.access, args.json));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.async_threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match args.op.clone() {
        Some(op) => {
            // Scripts get a quiet stderr: logs go to the file (RUST_LOG turns stderr on).
            let guard = dfs::logging::init(&args.log_dir, "dfs-tui.log", Some("off"));
            let code = rt.block_on(async {
                match start_local(&args).await {
                    Ok((addr, transport, cluster)) => {
                        let bench = matches!(op, Op::Bench { .. });
                        let code = dfs::cli::run(&addr, transport, op, args.json).await;
                        if let Some(c) = cluster {
                            if bench {
                                free_bench_garbage(&c, &args.data_dir).await;
                            }
                            c.shutdown().await;
                        }
                        code
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                }
            });
            drop(guard);
            code
        }
        None => {
            if !std::io::stdout().is_terminal() {
                eprintln!(
                    "error: the console needs a terminal; use --cmd OP for scripts (see dfs-tui --help)"
                );
                std::process::exit(2);
            }
            let guard = dfs::ui::runtime::init_logging(&args.log_dir);
            let r = rt.block_on(async {
                let (addr, transport, cluster) = start_local(&args).await?;
                let r = dfs::ui::runtime::run(addr, transport, cluster.is_some()).await;
                if let Some(c) = cluster {
                    c.shutdown().await;
                }
                r
            });
            drop(guard);
            match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
    };
    // Background tasks of the console may still hold the runtime; do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}

/// After a bench on the embedded cluster: deletes from the workers' disks what the bench
/// deleted, instead of leaving it (several times `--size`) for the cluster's next run past
/// the garbage grace. The bench was this cluster's only reader, so no read can still need
/// those chunks.
async fn free_bench_garbage(cluster: &LocalCluster, dir: &std::path::Path) {
    if std::io::stderr().is_terminal() {
        eprintln!("freeing the deleted chunks in {}…", dir.display());
    }
    // Ctrl-C here skips the wait (the bench's own handler is gone, and with it the default
    // one, so without this the wait could not be cut short).
    let left = tokio::select! {
        left = cluster.collect_garbage_now(std::time::Duration::from_secs(30)) => left,
        _ = tokio::signal::ctrl_c() => cluster.master().pending_garbage(),
    };
    if left > 0 {
        eprintln!(
            "note: {left} deleted chunk(s) are still on the workers' disks in {}; the local cluster purges them when it next runs",
            dir.display()
        );
    }
}

/// With `--local N`, starts the embedded cluster; returns the master address to use and how
/// to reach it.
async fn start_local(args: &Args) -> anyhow::Result<(String, Transport, Option<LocalCluster>)> {
    let Some(n) = args.local else {
        return Ok((args.master.clone(), args.access.client_transport()?, None));
    };
    let secret = args.access.secret()?;
    let tls = TlsMaterial::for_daemon(&args.access.tls_files())?;
    // The console of an embedded cluster is its owner: without a token of its own, it signs
    // one with the cluster's secret.
    let token = match (args.access.token()?, &secret) {
        (Some(t), _) => Some(t),
        (None, Some(s)) => Some(dfs::cli::access::mint_token(
            s,
            false,
            "local-console",
            None,
        )?),
        (None, None) => None,
    };
    let transport = Transport::new(tls.as_ref(), token.as_deref())?;
    let cfg = LocalClusterConfig {
        workers: n,
        sticky_ports: true,
        cluster_secret: secret,
        tls,
        ..Default::default()
    };
    let cluster = LocalCluster::start(&args.data_dir, cfg)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start the local cluster in {}: {e}",
                args.data_dir.display()
            )
        })?;
    Ok((cluster.master_addr().to_string(), transport, Some(cluster)))
}
