//! Process logging: `tracing` to the terminal and to one file per process under the log dir.

use std::path::Path;

use crate::logwriter::{FlushGuard, batched};
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
        .unwrap_or(DEFAULT_FILTER);
    let (stderr_writer, stderr_guard) = batched("log-stderr", std::io::stderr());
    let stderr_layer = fmt::layer()
        .with_writer(stderr_writer)
        .with_filter(filter(stderr_directives));

    let (file_layer, guard, file_err) = match open_log(log_dir, file_name) {
        Ok(file) => {
            let (writer, guard) = batched("log-file", file);
            let layer = fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .with_filter(filter(
                    std::env::var("DFS_LOG")
                        .as_deref()
                        .unwrap_or(DEFAULT_FILTER),
                ));
            (Some(layer), Some(guard), None)
        }
        Err(e) => (None, None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if let Some(e) = file_err {
        tracing::warn!(dir = %log_dir.display(), error = %e, "cannot open the log file; logging to stderr only");
    }
    Some(LogGuards {
        _stderr: stderr_guard,
        _file: guard,
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
