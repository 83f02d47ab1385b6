//! Who may talk to whom: TLS settings, the cluster secret, client access tokens and chunk
//! capability tokens.
//!
//! The model follows HDFS and SeaweedFS. One cluster secret is shared by the master and the
//! workers. From it the master derives two HMAC keys:
//! - one signs **access tokens**: what clients (read-write or read-only) and workers present to
//!   the master;
//! - one signs **chunk capabilities**: short-lived grants, naming one chunk and the operations
//!   allowed on it, that the master hands out with upload plans and download locations.
//!
//! Workers hold the same secret, so they check capabilities without asking the master. Knowing
//! a worker's address is therefore not enough to read or overwrite a chunk.

pub mod capability;
pub mod certs;
pub mod guard;
pub mod secret;
pub mod tls;
pub mod token;

use thiserror::Error;

pub use capability::{ChunkOps, ChunkTokenError};
pub use secret::ClusterSecret;
pub use tls::TlsFiles;
pub use token::{AccessToken, TokenKind};

/// Why security material could not be loaded or made.
#[derive(Debug, Error)]
pub enum SecurityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Certs(String),
}

/// Metadata key that carries an access token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// Writes `text` to a new file (never an existing one) with `mode`, and fsyncs it: the one way
/// keys, certificates and secrets are written, so none is left half-written or world-readable.
pub(crate) fn write_new_file(
    path: &std::path::Path,
    text: &str,
    mode: u32,
) -> Result<(), SecurityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| SecurityError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}
