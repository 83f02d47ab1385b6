//! The cluster secret and the keys derived from it.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SecurityError;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Fewest bytes a secret file must hold: 128 bits of key.
pub const MIN_SECRET_BYTES: usize = 16;

/// Keys derived from the secret file. Never printed: `Debug` shows only that it is set.
#[derive(Clone)]
pub struct ClusterSecret {
    keys: Arc<Keys>,
}

struct Keys {
    access: [u8; 32],
    chunk: [u8; 32],
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// Derives the keys from the secret bytes (surrounding whitespace is ignored so a file
    /// written by `echo` works).
    pub fn from_bytes(raw: &[u8]) -> Result<Self, SecurityError> {
        let trimmed = raw.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(SecurityError::Invalid(format!(
                "cluster secret is {} bytes; it needs at least {MIN_SECRET_BYTES} (make one with `dfs-tui --cmd gen-secret FILE`)",
                trimmed.len()
            )));
        }
        Ok(ClusterSecret {
            keys: Arc::new(Keys {
                access: derive(trimmed, b"dfs access tokens v1"),
                chunk: derive(trimmed, b"dfs chunk capabilities v1"),
            }),
        })
    }

    /// Reads and checks a secret file.
    pub fn from_file(path: &Path) -> Result<Self, SecurityError> {
        let raw = std::fs::read(path).map_err(|source| SecurityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&raw)
            .map_err(|e| SecurityError::Invalid(format!("{}: {e}", path.display())))
    }

    /// A fresh random secret (hex text, 256 bits), as `gen-secret` writes it.
    pub fn generate_text() -> Result<String, SecurityError> {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf)
            .map_err(|e| SecurityError::Invalid(format!("no randomness available: {e}")))?;
        Ok(hex::encode(buf))
    }

    pub(crate) fn access_mac(&self) -> HmacSha256 {
        mac_with(&self.keys.access)
    }

    pub(crate) fn chunk_mac(&self) -> HmacSha256 {
        mac_with(&self.keys.chunk)
    }
}

fn mac_with(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

fn derive(secret: &[u8], label: &[u8]) -> [u8; 32] {
    let mut m = mac_with(secret);
    m.update(label);
    m.finalize().into_bytes().into()
}

/// Writes a new random secret to `path`, readable by its owner only; refuses to overwrite.
pub fn write_new_secret(path: &Path) -> Result<(), SecurityError> {
    let text = ClusterSecret::generate_text()?;
    super::write_new_file(path, &format!("{text}\n"), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secrets_are_refused_and_whitespace_ignored() {
        assert!(ClusterSecret::from_bytes(b"too short").is_err());
        assert!(ClusterSecret::from_bytes(b"   0123456789abcdef  \n").is_ok());
        let a = ClusterSecret::from_bytes(b"0123456789abcdef").unwrap();
        let b = ClusterSecret::from_bytes(b"0123456789abcdef\n").unwrap();
        assert_eq!(a.keys.access, b.keys.access);
        assert_ne!(a.keys.access, a.keys.chunk);
        assert!(!format!("{a:?}").contains("0123"));
    }
}
