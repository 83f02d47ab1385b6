//! Worker errors, and their one mapping to gRPC status codes.

use thiserror::Error;
use tonic::{Code, Status};

use crate::rpc::FAILED_WORKER_KEY;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("chunk {0} not found on this worker")]
    NotFound(String),
    #[error("chunk {0} already exists on this worker")]
    AlreadyExists(String),
    #[error("not enough space: {needed} bytes needed, {free} free")]
    NoSpace { needed: u64, free: u64 },
    #[error("checksum mismatch for chunk {chunk}: expected {expected:08x}, computed {actual:08x}")]
    ChecksumMismatch {
        chunk: String,
        expected: u32,
        actual: u32,
    },
    #[error("chunk {chunk} is corrupt on this worker: {reason}")]
    Corrupt { chunk: String, reason: String },
    #[error("pipeline worker {worker} failed: {message}")]
    Downstream {
        worker: String,
        code: Code,
        message: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Startup(String),
    #[error(transparent)]
    Denied(#[from] crate::security::ChunkTokenError),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Idle(String),
}

impl WorkerError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        WorkerError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        let code = match &e {
            WorkerError::InvalidArgument(_) => Code::InvalidArgument,
            WorkerError::NotFound(_) => Code::NotFound,
            WorkerError::AlreadyExists(_) => Code::AlreadyExists,
            WorkerError::NoSpace { .. } => Code::ResourceExhausted,
            WorkerError::ChecksumMismatch { .. } | WorkerError::Corrupt { .. } => Code::DataLoss,
            WorkerError::Downstream { .. } => Code::Unavailable,
            WorkerError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                Code::ResourceExhausted
            }
            WorkerError::Io { .. } | WorkerError::Startup(_) => Code::Internal,
            WorkerError::Denied(d) if d.is_unauthenticated() => Code::Unauthenticated,
            WorkerError::Denied(_) => Code::PermissionDenied,
            WorkerError::Busy(_) => Code::ResourceExhausted,
            WorkerError::Idle(_) => Code::DeadlineExceeded,
        };
        let mut status = Status::new(code, e.to_string());
        if let WorkerError::Downstream { worker, .. } = &e
            && let Ok(v) = worker.parse()
        {
            status.metadata_mut().insert(FAILED_WORKER_KEY, v);
        }
        status
    }
}
