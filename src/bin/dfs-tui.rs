//! `dfs-tui`: the cluster console, and with `--cmd` the scriptable command line.

use std::path::PathBuf;

use clap::Parser;
use dfs::cli::Op;

/// The dfs console. `dfs-tui --cmd OP ARGS…` runs one operation and exits (scriptable).
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
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Directory for the log file (dfs-tui.log).
    #[arg(long, env = "DFS_LOG_DIR", default_value = "logs", global = true)]
    log_dir: PathBuf,
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

fn main() {
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
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see dfs-tui --help)", first.trim_end());
            std::process::exit(2);
        }
    };
    // Scripts get a quiet stderr: logs go to the file (RUST_LOG turns stderr logging on).
    let _guard = dfs::logging::init(&args.log_dir, "dfs-tui.log", Some("off"));
    let code = match args.op {
        Some(op) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(dfs::cli::run(&args.master, op, args.json)),
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                1
            }
        },
        None => {
            eprintln!(
                "error: the interactive console is not available yet; run one operation with --cmd OP (upload, download, delete, ls, stat, status)"
            );
            2
        }
    };
    std::process::exit(code);
}
