//! Chunk capability tokens: the master's signed permission to read or write one chunk.
//!
//! Like HDFS block access tokens, a capability names the chunk and the operations allowed and
//! expires soon; the master signs it with the chunk key derived from the cluster secret and
//! workers check it with the same key, so a worker needs no call to the master per request.
//!
//! Binary form (58 bytes, fixed):
//!
//! ```text
//! 0   version (1)
//! 1   operations bitmask (READ = 1, WRITE = 2)
//! 2   expiry, Unix milliseconds (u64 big-endian)
//! 10  chunk id (u128 big-endian)
//! 26  HMAC-SHA256 of bytes 0..26 under the chunk key
//! ```

use hmac::Mac;

use super::secret::ClusterSecret;
use crate::chunk::ChunkId;

const VERSION: u8 = 1;
const SIGNED: usize = 26;
/// Length of every capability token.
pub const TOKEN_LEN: usize = SIGNED + 32;

/// A set of chunk operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOps(u8);

impl ChunkOps {
    pub const READ: ChunkOps = ChunkOps(1);
    pub const WRITE: ChunkOps = ChunkOps(2);
    /// Replication: the source reads, the target writes, with one token.
    pub const READ_WRITE: ChunkOps = ChunkOps(3);

    fn allows(self, op: ChunkOps) -> bool {
        self.0 & op.0 == op.0
    }

    fn name(self) -> &'static str {
        match self.0 {
            1 => "read",
            2 => "write",
            3 => "read+write",
            _ => "unknown",
        }
    }
}

/// Why a worker refused a chunk request. The messages go back to the caller as
/// `Unauthenticated` (no or bad token) or `PermissionDenied` (valid token, wrong use).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkTokenError {
    #[error("no chunk access token: this worker only serves requests the master authorised")]
    Missing,
    #[error("chunk access token is malformed")]
    Malformed,
    #[error("chunk access token signature is invalid")]
    BadSignature,
    #[error("chunk access token expired; ask the master for a fresh one")]
    Expired,
    #[error("chunk access token is for chunk {granted}, not {requested}")]
    WrongChunk { granted: String, requested: String },
    #[error("chunk access token allows {granted} only, not {wanted}")]
    NotAllowed {
        granted: &'static str,
        wanted: &'static str,
    },
}

impl ChunkTokenError {
    /// True for errors that say "who are you" rather than "you may not".
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            ChunkTokenError::Missing
                | ChunkTokenError::Malformed
                | ChunkTokenError::BadSignature
                | ChunkTokenError::Expired
        )
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkGrant {
    pub chunk: ChunkId,
    pub ops: ChunkOps,
    pub expires_unix_ms: u64,
}

fn signed_bytes(g: &ChunkGrant) -> [u8; SIGNED] {
    let mut b = [0u8; SIGNED];
    b[0] = VERSION;
    b[1] = g.ops.0;
    b[2..10].copy_from_slice(&g.expires_unix_ms.to_be_bytes());
    b[10..26].copy_from_slice(&g.chunk.0.to_be_bytes());
    b
}

/// Signs a grant.
pub fn mint(secret: &ClusterSecret, grant: &ChunkGrant) -> Vec<u8> {
    let body = signed_bytes(grant);
    let mut m = secret.chunk_mac();
    m.update(&body);
    let mut out = Vec::with_capacity(TOKEN_LEN);
    out.extend_from_slice(&body);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Parses a token and checks its signature (constant time); says nothing about its use yet.
pub fn decode(secret: &ClusterSecret, token: &[u8]) -> Result<ChunkGrant, ChunkTokenError> {
    if token.is_empty() {
        return Err(ChunkTokenError::Missing);
    }
    if token.len() != TOKEN_LEN || token[0] != VERSION {
        return Err(ChunkTokenError::Malformed);
    }
    let ops = ChunkOps(token[1]);
    if ops.0 == 0 || ops.0 & !ChunkOps::READ_WRITE.0 != 0 {
        return Err(ChunkTokenError::Malformed);
    }
    let mut m = secret.chunk_mac();
    m.update(&token[..SIGNED]);
    m.verify_slice(&token[SIGNED..])
        .map_err(|_| ChunkTokenError::BadSignature)?;
    let mut exp = [0u8; 8];
    exp.copy_from_slice(&token[2..10]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&token[10..26]);
    Ok(ChunkGrant {
        chunk: ChunkId(u128::from_be_bytes(id)),
        ops,
        expires_unix_ms: u64::from_be_bytes(exp),
    })
}

/// Checks that `token` lets its holder do `op` on `chunk` at `now_unix_ms`.
pub fn verify(
    secret: &ClusterSecret,
    token: &[u8],
    chunk: &ChunkId,
    op: ChunkOps,
    now_unix_ms: u64,
) -> Result<ChunkGrant, ChunkTokenError> {
    let g = decode(secret, token)?;
    if now_unix_ms >= g.expires_unix_ms {
        return Err(ChunkTokenError::Expired);
    }
    if g.chunk != *chunk {
        return Err(ChunkTokenError::WrongChunk {
            granted: g.chunk.to_string(),
            requested: chunk.to_string(),
        });
    }
    if !g.ops.allows(op) {
        return Err(ChunkTokenError::NotAllowed {
            granted: g.ops.name(),
            wanted: op.name(),
        });
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_only_what_was_signed() {
        let k = ClusterSecret::from_bytes(b"a cluster secret").unwrap();
        let c = ChunkId(42);
        let t = mint(
            &k,
            &ChunkGrant {
                chunk: c,
                ops: ChunkOps::WRITE,
                expires_unix_ms: 1_000,
            },
        );
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(verify(&k, &t, &c, ChunkOps::WRITE, 999).is_ok());
        assert_eq!(
            verify(&k, &t, &c, ChunkOps::WRITE, 1_000),
            Err(ChunkTokenError::Expired)
        );
        assert!(matches!(
            verify(&k, &t, &c, ChunkOps::READ, 0),
            Err(ChunkTokenError::NotAllowed { .. })
        ));
        assert!(matches!(
            verify(&k, &t, &ChunkId(43), ChunkOps::WRITE, 0),
            Err(ChunkTokenError::WrongChunk { .. })
        ));
        let other = ClusterSecret::from_bytes(b"another cluster secret").unwrap();
        assert_eq!(
            verify(&other, &t, &c, ChunkOps::WRITE, 0),
            Err(ChunkTokenError::BadSignature)
        );
        let mut widened = t.clone();
        widened[1] = ChunkOps::READ_WRITE.0;
        assert_eq!(
            verify(&k, &widened, &c, ChunkOps::READ, 0),
            Err(ChunkTokenError::BadSignature)
        );
        assert_eq!(
            verify(&k, &[], &c, ChunkOps::READ, 0),
            Err(ChunkTokenError::Missing)
        );
        assert_eq!(
            verify(&k, &t[..10], &c, ChunkOps::READ, 0),
            Err(ChunkTokenError::Malformed)
        );
    }
}
