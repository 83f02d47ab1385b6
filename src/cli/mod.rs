//! The scriptable front end: `dfs-tui --cmd OP ARGS… [--json]`.
//!
//! Each operation prints a short human summary, or with `--json` one JSON document on stdout.
//! Failures print one line on stderr (and a JSON error object with `--json`) and exit non-zero.

pub mod access;
pub mod bench;
mod output;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::client::{Client, ClientError, DownloadOptions, Progress, UploadOptions};
use crate::config::human_bytes;

/// Shows a transfer's progress on stderr while it runs, if stderr is a terminal; the line is
/// cleared when the meter is dropped, so the final output stays one clean summary.
struct Meter {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Meter {
    fn start(verb: &'static str, name: String, progress: Arc<Progress>, enabled: bool) -> Meter {
        if !enabled || !std::io::stderr().is_terminal() {
            return Meter { task: None };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (done, total) = progress.snapshot();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let amount = if total == 0 {
                    // No size: a pipe, uploaded as it is read.
                    format!(
                        "{} so far (size known at the input's end),",
                        human_bytes(done)
                    )
                } else {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    format!("{} / {} ({pct}%)", human_bytes(done), human_bytes(total))
                };
                let waiting = if progress
                    .waiting_for_master
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    " (waiting for the cluster: the master is unreachable or has no live worker)"
                } else {
                    ""
                };
                eprint!(
                    "\r\x1b[K{verb} {name}: {amount} {}/s{waiting}",
                    human_bytes(rate as u64)
                );
                let _ = std::io::stderr().flush();
            }
        });
        Meter { task: Some(task) }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            eprint!("\r\x1b[K");
        }
    }
}

/// The operations of `--cmd`.
#[derive(Debug, Clone, Subcommand)]
pub enum Op {
    /// Upload a local file (prints the stored name, size, chunk count and replicas).
    Upload {
        /// Local file to upload; `-` reads standard input (with --name).
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
        /// Destination file, or an existing directory to put NAME in; `-` is standard output.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Replace the destination if it exists.
        #[arg(long)]
        force: bool,
        /// fsync the downloaded file and its directory before reporting success.
        #[arg(long)]
        fsync: bool,
    },
    /// Delete a file.
    Delete { name: String },
    /// List files: name, size, chunks, replication, modified.
    Ls,
    /// Show a file with its checksum and its chunk -> workers map.
    Stat { name: String },
    /// Show workers (address, state, capacity, used, chunks, last heartbeat) and totals.
    Status,
    /// Drain a worker: no new chunks; its chunks are copied elsewhere. --dry-run shows the
    /// blast radius instead (chunks, files left with one or no live replica, time to move).
    Drain {
        /// The worker's address (host:port), as `status` shows it.
        worker: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop draining a worker.
    Undrain { worker: String },
    /// List every file with a chunk below its replica target; exit 1 if any chunk has no
    /// live replica.
    Fsck,
    /// Show what garbage collection will purge, and why (collection itself is automatic).
    Gc {
        #[arg(long)]
        dry_run: bool,
    },
    /// Benchmark the cluster: large files at 1 and 3 replicas, 4 KiB files at each
    /// concurrency, and with --limits this machine's own disk and loopback limits.
    Bench {
        /// Size of the large file.
        #[arg(long, default_value = "1GiB")]
        size: crate::config::ByteSize,
        /// Number of 4 KiB files per concurrency level.
        #[arg(long, default_value_t = 5000)]
        files: usize,
        /// Concurrent clients for the small-file phases (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        /// Also measure raw write+fsync, sequential read and loopback TCP in the same run.
        #[arg(long)]
        limits: bool,
        /// Do not drop the page cache before reads (by default it is dropped where permitted).
        #[arg(long)]
        warm: bool,
        /// Scratch directory for local files (put it on the workers' file system).
        #[arg(long, default_value = "dfs-bench")]
        scratch_dir: PathBuf,
        /// Metadata scale: create this many empty files through the batch fast path, then
        /// measure ls/stat latency and the master's memory per file (0 = skip).
        #[arg(long, default_value_t = 0)]
        meta_files: usize,
        /// Skip the large-file phases (e.g. to run only --meta-files).
        #[arg(long)]
        no_large: bool,
        /// Skip the small-file phases.
        #[arg(long)]
        no_small: bool,
        /// Run nothing: delete what an earlier run left behind (a run killed with -9 or by a
        /// crash): every file named dfs-bench-*, and the scratch files.
        #[arg(long)]
        clean: bool,
    },
    /// Write a development CA and certificates for master, workers and clients into DIR
    /// (offline; nothing is overwritten).
    GenCerts {
        dir: PathBuf,
        /// Extra host name or IP address the certificates are valid for (repeatable);
        /// localhost, 127.0.0.1 and ::1 are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Write a new random cluster secret to FILE, readable by its owner only (offline).
    GenSecret { file: PathBuf },
    /// Print an access token signed with --cluster-secret-file (offline).
    Token {
        /// A token that may list, stat, download and watch, but not change anything.
        #[arg(long)]
        read_only: bool,
        /// Who holds it: shown in the master's logs and keys per-client limits.
        #[arg(long, default_value = "client")]
        subject: String,
        /// Lifetime (e.g. 30d); default: no expiry (revoke by changing the secret).
        #[arg(long)]
        ttl: Option<crate::config::HumanDuration>,
    },
}

impl Op {
    /// True for the operations that make security material and need no cluster.
    pub fn is_offline(&self) -> bool {
        matches!(
            self,
            Op::GenCerts { .. } | Op::GenSecret { .. } | Op::Token { .. }
        )
    }
}

/// Runs an offline operation; returns the exit code.
pub fn run_offline(op: &Op, access: &access::AccessArgs, json: bool) -> i32 {
    let r: Result<String, crate::security::SecurityError> = match op {
        Op::GenCerts { dir, hosts, days } => {
            crate::security::certs::generate(dir, hosts, *days).map(|files| {
                if json {
                    format!("{}\n", serde_json::json!({ "files": files }))
                } else {
                    format!(
                        "wrote {} files to {}:\n  {}\nstart nodes with --tls-cert {d}/<role>.pem --tls-key {d}/<role>.key --tls-ca {d}/ca.pem\n",
                        files.len(),
                        dir.display(),
                        files.join("\n  "),
                        d = dir.display()
                    )
                }
            })
        }
        Op::GenSecret { file } => crate::security::secret::write_new_secret(file).map(|()| {
            format!(
                "wrote a new cluster secret to {} (mode 0600); give it to the master and every worker with --cluster-secret-file\n",
                file.display()
            )
        }),
        Op::Token {
            read_only,
            subject,
            ttl,
        } => match access.secret() {
            Ok(Some(secret)) => {
                access::mint_token(&secret, *read_only, subject, ttl.map(|t| t.0))
                    .map(|t| format!("{t}\n"))
            }
            Ok(None) => Err(crate::security::SecurityError::Invalid(
                "--cmd token needs --cluster-secret-file".into(),
            )),
            Err(e) => Err(e),
        },
        _ => Err(crate::security::SecurityError::Invalid(
            "not an offline operation".into(),
        )),
    };
    match r {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Runs one operation against the master at `master`; returns the process exit code.
pub async fn run(master: &str, transport: crate::rpc::Transport, op: Op, json: bool) -> i32 {
    // `download NAME -o /dev/stdout`: the file's bytes are the output, so the report (and
    // a JSON error) go to stderr instead of being appended to them.
    let data_on_stdout = matches!(&op, Op::Download { output: Some(p), .. }
        if crate::client::is_stdout(p));
    match execute(master, transport, op, json).await {
        Ok(text) if data_on_stdout => {
            eprint!("{text}");
            0
        }
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            if json {
                let doc = serde_json::json!({"error": msg, "code": format!("{:?}", e.code())});
                if data_on_stdout {
                    eprintln!("{doc}");
                } else {
                    println!("{doc}");
                }
            }
            eprintln!("error: {msg}");
            // As a shell reports a process stopped by SIGINT.
            if matches!(
                e,
                ClientError::Interrupted { .. } | ClientError::TransferInterrupted(_)
            ) {
                130
            } else {
                1
            }
        }
    }
}

/// How long a transfer asked to stop by a signal may take to stop (an upload finishes the
/// chunk it is writing, then aborts itself on the master).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Runs `transfer`; on SIGINT or SIGTERM asks it to stop (as the console's `c` does) and
/// waits for that, at most [`STOP_WAIT`], so that an upload is aborted on the master and a
/// download's partial file removed. Killed on the spot, they used to leave an open upload
/// holding its chunks until its lease ran out (10 minutes). A second signal stops waiting.
/// A transfer that ended anyway (its commit already sent) reports its own outcome.
async fn interruptible<T>(
    progress: &Progress,
    transfer: impl Future<Output = Result<T, ClientError>>,
    stopped: &str,
    late: &str,
) -> Result<T, ClientError> {
    let mut transfer = std::pin::pin!(transfer);
    tokio::select! {
        r = &mut transfer => return r,
        () = crate::cluster::shutdown_signal() => {}
    }
    progress.cancel();
    tokio::select! {
        r = &mut transfer => match r {
            Err(ClientError::Cancelled) => Err(ClientError::TransferInterrupted(stopped.into())),
            other => other,
        },
        () = crate::cluster::shutdown_signal() => Err(ClientError::TransferInterrupted(late.into())),
        () = tokio::time::sleep(STOP_WAIT) => Err(ClientError::TransferInterrupted(late.into())),
    }
}

async fn execute(
    master: &str,
    transport: crate::rpc::Transport,
    op: Op,
    json: bool,
) -> Result<String, ClientError> {
    let client = Client::connect_with(master, transport).await?;
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
            // Standard input left on the terminal: what is typed is the file, as with `cat`,
            // and a user who forgot the pipe would otherwise see nothing happen. The meter
            // stays off, as it would redraw over the typing.
            let stdin = [crate::client::STDIN, "/dev/stdin"].map(std::path::Path::new);
            let typed = stdin.contains(&file.as_path()) && std::io::stdin().is_terminal();
            if typed {
                eprintln!(
                    "reading the file from the terminal: end it with Ctrl-D, or Ctrl-C to cancel"
                );
            }
            let progress = Arc::new(Progress::default());
            let label = name.clone().unwrap_or_else(|| file.display().to_string());
            let meter = Meter::start("uploading", label, progress.clone(), !json && !typed);
            let transfer = client.upload(
                &file,
                UploadOptions {
                    name,
                    replicas,
                    progress: Some(progress.clone()),
                },
            );
            let r = interruptible(
                &progress,
                transfer,
                "the upload was aborted and nothing was stored",
                "the upload did not stop in time; the master drops it when its lease runs out",
            )
            .await;
            drop(meter);
            let r = r?;
            Ok(output::upload(&r, json))
        }
        Op::Download {
            name,
            output: out,
            force,
            fsync,
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
            let progress = Arc::new(Progress::default());
            let meter = Meter::start("downloading", name.clone(), progress.clone(), !json);
            // Written in place (a pipe, a device, standard output): what went out stays out.
            let stopped = if crate::client::writes_in_place(&dest) {
                "the download stopped part-way; what was written so far is incomplete"
            } else {
                "the download stopped; a partial file is not left behind"
            };
            let transfer = client.download(
                &name,
                &dest,
                DownloadOptions {
                    force,
                    fsync,
                    progress: Some(progress.clone()),
                },
            );
            let r = interruptible(
                &progress,
                transfer,
                stopped,
                "the download did not stop in time",
            )
            .await;
            drop(meter);
            let r = r?;
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
        Op::Drain { worker, dry_run } => {
            if dry_run {
                let p = client.drain_plan(&worker).await?;
                Ok(output::drain_plan(&p, json))
            } else {
                let w = client.set_draining(&worker, true).await?;
                Ok(output::drain(&w, json))
            }
        }
        Op::Undrain { worker } => {
            let w = client.set_draining(&worker, false).await?;
            Ok(output::drain(&w, json))
        }
        Op::Fsck => {
            let r = client.fsck().await?;
            let missing = r.files.iter().any(|f| f.chunks_missing > 0);
            let text = output::fsck(&r, json);
            if missing {
                print!("{text}");
                return Err(ClientError::Integrity(format!(
                    "{} file(s) have chunks with no live replica",
                    r.files.iter().filter(|f| f.chunks_missing > 0).count()
                )));
            }
            Ok(text)
        }
        Op::Bench {
            size,
            files,
            concurrency,
            limits,
            warm,
            scratch_dir,
            meta_files,
            no_large,
            no_small,
            clean,
        } => {
            if clean {
                let c = bench::clean_leftovers(&client, &scratch_dir).await?;
                let _ = std::fs::remove_dir(&scratch_dir);
                return Ok(if json {
                    format!(
                        "{}\n",
                        serde_json::json!({"names_deleted": c.names, "scratch_files_deleted": c.scratch_files})
                    )
                } else {
                    format!(
                        "deleted {} name(s) dfs-bench-* and {} scratch file(s)\n",
                        c.names, c.scratch_files
                    )
                });
            }
            let cfg = bench::BenchConfig {
                size: if no_large { 0 } else { size.0 },
                files: if no_small { 0 } else { files },
                concurrency,
                limits,
                warm,
                scratch: scratch_dir.clone(),
                meta_files,
            };
            let r = bench::run(&client, &cfg).await;
            let _ = std::fs::remove_dir(&scratch_dir);
            let r = r?;
            let text = if json {
                format!("{}\n", serde_json::to_string(&r).unwrap_or_default())
            } else {
                bench::render(&r)
            };
            match r.failures() {
                Some(e) => {
                    print!("{text}");
                    Err(e)
                }
                None => Ok(text),
            }
        }
        Op::GenCerts { .. } | Op::GenSecret { .. } | Op::Token { .. } => Err(
            ClientError::InvalidInput("this operation runs offline".into()),
        ),
        Op::Gc { dry_run } => {
            if !dry_run {
                return Err(ClientError::InvalidInput(
                    "garbage collection runs by itself after the grace period; use --dry-run to see what it will purge".into(),
                ));
            }
            let r = client.gc_status().await?;
            Ok(output::gc(&r, json))
        }
    }
}
