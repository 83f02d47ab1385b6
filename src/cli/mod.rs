//! The scriptable front end: `dfs-tui --cmd OP ARGS… [--json]`.
//!
//! Each operation prints a short human summary, or with `--json` one JSON document on stdout.
//! Failures print one line on stderr (and a JSON error object with `--json`) and exit non-zero.

mod output;

use std::path::PathBuf;

use clap::Subcommand;

use crate::client::{Client, ClientError, DownloadOptions, UploadOptions};

/// The operations of `--cmd`.
#[derive(Debug, Clone, Subcommand)]
pub enum Op {
    /// Upload a local file (prints the stored name, size, chunk count and replicas).
    Upload {
        /// Local file to upload.
        file: PathBuf,
        /// Name to store it under (default: the file's own name).
        #[arg(long)]
        name: Option<String>,
        /// Replication factor (default: the master's, usually 3); capped by live workers.
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// Download a file to ./NAME or -o PATH (never overwrites without --force).
    Download {
        name: String,
        /// Destination file, or an existing directory to put NAME in.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Replace the destination if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Delete a file.
    Delete { name: String },
    /// List files: name, size, chunks, replication, modified.
    Ls,
    /// Show a file with its checksum and its chunk -> workers map.
    Stat { name: String },
    /// Show workers (address, state, capacity, used, chunks, last heartbeat) and totals.
    Status,
}

/// Runs one operation against the master at `master`; returns the process exit code.
pub async fn run(master: &str, op: Op, json: bool) -> i32 {
    match execute(master, op, json).await {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": msg, "code": format!("{:?}", e.code())})
                );
            }
            eprintln!("error: {msg}");
            1
        }
    }
}

async fn execute(master: &str, op: Op, json: bool) -> Result<String, ClientError> {
    let client = Client::connect(master).await?;
    match op {
        Op::Upload {
            file,
            name,
            replicas,
        } => {
            if replicas == Some(0) {
                return Err(ClientError::InvalidInput(
                    "--replicas must be at least 1".into(),
                ));
            }
            let r = client
                .upload(
                    &file,
                    UploadOptions {
                        name,
                        replicas,
                        progress: None,
                    },
                )
                .await?;
            Ok(output::upload(&r, json))
        }
        Op::Download {
            name,
            output: out,
            force,
        } => {
            let dest = match out {
                Some(p) if p.is_dir() => p.join(&name),
                Some(p) => p,
                None => {
                    crate::names::validate(&name).map_err(|e| {
                        ClientError::InvalidInput(format!("invalid file name: {e}"))
                    })?;
                    PathBuf::from(&name)
                }
            };
            let r = client
                .download(
                    &name,
                    &dest,
                    DownloadOptions {
                        force,
                        progress: None,
                    },
                )
                .await?;
            Ok(output::download(&r, json))
        }
        Op::Delete { name } => {
            let f = client.delete(&name).await?;
            Ok(output::delete(&f, json))
        }
        Op::Ls => {
            let files = client.list().await?;
            Ok(output::ls(&files, json))
        }
        Op::Stat { name } => {
            let f = client.stat(&name).await?;
            Ok(output::stat(&f, json))
        }
        Op::Status => {
            let s = client.status().await?;
            Ok(output::status(&s, json))
        }
    }
}
