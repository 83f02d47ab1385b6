//! Process logging: `tracing` to the terminal and to one file per process under the log dir.

use std::io::IsTerminal;
use std::path::Path;

use crate::logwriter::{FlushGuard, TeeWriter, batched};
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn,tonic=warn";

fn filter(directives: &str) -> EnvFilter {
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Keeps the log writers flushing until dropped (at exit).
pub struct LogGuards {
    _stderr: FlushGuard,
    _file: Option<FlushGuard>,
}

/// Installs the global subscriber: stderr at `stderr_filter` (or `RUST_LOG`), and
/// `<log_dir>/<file_name>` at info (or `DFS_LOG`, e.g. `warn` to keep per-operation lines
/// out of the file on a busy small-file cluster). Keep the guard alive until exit so the logs are flushed.
///
/// Both writers are non-blocking and batched ([`crate::logwriter`]): a daemon must never
/// stall because whatever reads its stderr (a full pipe, a stopped terminal) is slow; lines
/// are dropped instead.
/// If the log directory cannot be created the process still runs, logging to stderr only,
/// and says so: losing the log file must not take a storage daemon down.
pub fn init(log_dir: &Path, file_name: &str, stderr_filter: Option<&str>) -> Option<LogGuards> {
    let stderr_env = std::env::var("RUST_LOG").ok();
    let stderr_directives = stderr_env
        .as_deref()
        .or(stderr_filter)
        .unwrap_or(DEFAULT_FILTER)
        .to_string();
    let file_directives = std::env::var("DFS_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string());
    // Colours only for a terminal: a daemon's stderr is usually a journal or a file, where
    // escape codes are noise.
    let stderr_tty = std::io::stderr().is_terminal();
    let (stderr_writer, stderr_guard) = batched("log-stderr", std::io::stderr());
    let (file_writer, file_guard, file_err) = match open_log(log_dir, file_name) {
        Ok(file) => {
            let (writer, guard) = batched("log-file", file);
            (Some(writer), Some(guard), None)
        }
        Err(e) => (None, None, Some(e)),
    };
    // Option layers rather than a boxed list: each stays statically dispatched, so the
    // callsites every filter disables (h2's and hyper's debug lines) cost nothing.
    let (tee_layer, stderr_layer, file_layer) = match file_writer {
        // The same lines, uncoloured, for both: formatted once.
        Some(file_writer) if !stderr_tty && stderr_directives == file_directives => {
            let tee = TeeWriter::new(stderr_writer, file_writer);
            let layer = fmt::layer()
                .with_ansi(false)
                .with_writer(tee)
                .with_filter(filter(&file_directives));
            (Some(layer), None, None)
        }
        file_writer => {
            let stderr_layer = fmt::layer()
                .with_ansi(stderr_tty)
                .with_writer(stderr_writer)
                .with_filter(filter(&stderr_directives));
            let file_layer = file_writer.map(|w| {
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(w)
                    .with_filter(filter(&file_directives))
            });
            (None, Some(stderr_layer), file_layer)
        }
    };
    let _ = tracing_subscriber::registry()
        .with(tee_layer)
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if let Some(e) = file_err {
        tracing::warn!(dir = %log_dir.display(), error = %e, "cannot open the log file; logging to stderr only");
    }
    Some(LogGuards {
        _stderr: stderr_guard,
        _file: file_guard,
    })
}

/// Opens `<dir>/<name>` for appending, creating the directory: a restarted daemon adds to
/// its log rather than replacing it.
pub fn open_log(dir: &Path, name: &str) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
}
