//! Client errors: each message is one sentence a user can act on.

use std::path::PathBuf;

use thiserror::Error;
use tonic::Code;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the master at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The master refused or failed a request.
    #[error("{message}")]
    Master { code: Code, message: String },
    /// A worker refused or failed a call that is not a chunk transfer (those retry and end
    /// in `WriteFailed` or `ReadFailed`).
    #[error("worker {addr}: {message}")]
    Worker {
        addr: String,
        code: Code,
        message: String,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    LocalIo {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; use --force to overwrite it", .0.display())]
    DestinationExists(PathBuf),
    #[error("{0}")]
    InvalidInput(String),
    #[error("chunk {index} could not be written after {attempts} attempts: {last}")]
    WriteFailed {
        index: u32,
        attempts: u32,
        last: String,
    },
    #[error("chunk {index} could not be read from any replica: {last}")]
    ReadFailed { index: u32, last: String },
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("cancelled")]
    Cancelled,
    /// The benchmark stopped on SIGINT or SIGTERM (after cleaning up, unless `cleaned` is
    /// false: a second signal skipped that).
    #[error("{}", if *cleaned { "interrupted; the benchmark's files were deleted" } else { "interrupted twice; the benchmark's files may be left behind (names dfs-bench-*)" })]
    Interrupted { cleaned: bool },
    /// A `--cmd` upload or download stopped on SIGINT or SIGTERM; says what was left.
    #[error("interrupted; {0}")]
    TransferInterrupted(String),
    /// Some benchmark operations failed (the report is printed before this error).
    #[error("{failed} of {total} small-file operations failed; the first was {first}")]
    BenchFailed {
        failed: usize,
        total: usize,
        first: String,
        code: Code,
    },
}

impl ClientError {
    /// The gRPC code this error corresponds to, for scripts and tests.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::Master { code, .. } | ClientError::Worker { code, .. } => *code,
            ClientError::LocalIo { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Code::NotFound
            }
            ClientError::LocalIo { .. } => Code::Internal,
            ClientError::DestinationExists(_) => Code::AlreadyExists,
            ClientError::InvalidInput(_) => Code::InvalidArgument,
            ClientError::WriteFailed { .. } | ClientError::ReadFailed { .. } => Code::Unavailable,
            ClientError::Integrity(_) => Code::DataLoss,
            ClientError::Cancelled
            | ClientError::Interrupted { .. }
            | ClientError::TransferInterrupted(_) => Code::Cancelled,
            ClientError::BenchFailed { code, .. } => *code,
        }
    }

    pub(crate) fn worker(addr: &str, s: tonic::Status) -> ClientError {
        ClientError::Worker {
            addr: addr.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    pub(crate) fn master(addr: &str, s: tonic::Status) -> ClientError {
        match s.code() {
            // The transport's own errors say little; name the master.
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown
                if s.message().contains("transport")
                    || s.message().contains("connect")
                    || s.message().contains("timed out")
                    || s.message().contains("Timeout") =>
            {
                ClientError::Connect {
                    addr: addr.to_string(),
                    reason: s.message().to_string(),
                }
            }
            code => ClientError::Master {
                code,
                message: s.message().to_string(),
            },
        }
    }
}
