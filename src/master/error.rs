//! Master errors, and their one mapping to gRPC status codes.

use thiserror::Error;
use tonic::{Code, Status};

use super::store::StoreError;
use crate::names::NameError;

#[derive(Debug, Clone, Error)]
pub enum MasterError {
    #[error("invalid file name: {0}")]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("file {0:?} not found")]
    FileNotFound(String),
    #[error("upload {0:?} not found (it was committed, aborted, or expired)")]
    UploadNotFound(String),
    #[error("the master is rebuilding its metadata from the workers; try again shortly")]
    Rebuilding,
    /// A commit made beside its writes (`PrepareUploads`) that neither its client nor the
    /// workers have settled yet.
    #[error(
        "the upload of {0:?} is in doubt: its client has not confirmed it and its workers could \
         not all be asked yet; try again shortly"
    )]
    InDoubt(String),
    #[error("no worker {0:?} is known to the master")]
    WorkerNotFound(String),
    #[error("no live workers: start a worker (`worker --port N`) or wait for one to register")]
    NoLiveWorkers,
    #[error("no live worker has {needed} free for a chunk")]
    NoSpace { needed: String },
    #[error("{0}")]
    Conflict(String),
    #[error("file {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    LimitReached(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<MasterError> for Status {
    fn from(e: MasterError) -> Status {
        let code = match &e {
            MasterError::InvalidName(_) | MasterError::InvalidArgument(_) => Code::InvalidArgument,
            MasterError::FileNotFound(_)
            | MasterError::UploadNotFound(_)
            | MasterError::WorkerNotFound(_) => Code::NotFound,
            MasterError::NoLiveWorkers | MasterError::Rebuilding | MasterError::InDoubt(_) => {
                Code::Unavailable
            }
            MasterError::NoSpace { .. } | MasterError::LimitReached(_) => Code::ResourceExhausted,
            MasterError::Conflict(_) => Code::Aborted,
            MasterError::AlreadyExists(_) => Code::AlreadyExists,
            MasterError::Store(_) | MasterError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
