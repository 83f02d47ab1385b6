//! Access tokens: the bearer credentials clients and workers present to the master.
//!
//! Text form: `dfs1.<kind>.<subject>.<expires>.<mac>`. `kind` is `rw`, `ro` or `worker`,
//! `subject` names the holder (it appears in logs and keys the per-client upload cap),
//! `expires` is Unix seconds (0 = never), and `mac` is the hex HMAC-SHA256 of everything
//! before it under the cluster's access key. They are stateless, like SeaweedFS's JWTs: the
//! master needs no token table, and changing the cluster secret revokes every token.

use std::fmt;
use std::str::FromStr;

use hmac::Mac;

use super::secret::ClusterSecret;

const PREFIX: &str = "dfs1";
/// Longest subject, in bytes.
pub const MAX_SUBJECT: usize = 128;
/// Longest token text accepted at all (anything longer is refused before any work).
pub const MAX_TOKEN_TEXT: usize = 512;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Everything a client may do: upload, delete, operator commands, and all reads.
    ReadWrite,
    /// List, stat, download and watch; no change of any kind.
    ReadOnly,
    /// A worker's credential: register and heartbeat.
    Worker,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::ReadWrite => "rw",
            TokenKind::ReadOnly => "ro",
            TokenKind::Worker => "worker",
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenKind::ReadWrite => "read-write",
            TokenKind::ReadOnly => "read-only",
            TokenKind::Worker => "worker",
        })
    }
}

/// Why a token was refused. Messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token signature does not match this cluster's secret")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// A parsed (not yet verified) access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub kind: TokenKind,
    pub subject: String,
    /// Unix seconds; 0 = never.
    pub expires: u64,
    mac: Vec<u8>,
}

fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SUBJECT
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b))
}

fn signed_part(kind: TokenKind, subject: &str, expires: u64) -> String {
    format!("{PREFIX}.{}.{subject}.{expires}", kind.as_str())
}

impl AccessToken {
    /// Mints a token. `subject` may hold ASCII letters, digits and `._-@:`.
    pub fn mint(
        secret: &ClusterSecret,
        kind: TokenKind,
        subject: &str,
        expires: u64,
    ) -> Result<AccessToken, TokenError> {
        if !valid_subject(subject) {
            return Err(TokenError::Malformed(
                "subject must be 1-128 ASCII letters, digits or ._-@:",
            ));
        }
        let mut m = secret.access_mac();
        m.update(signed_part(kind, subject, expires).as_bytes());
        Ok(AccessToken {
            kind,
            subject: subject.to_string(),
            expires,
            mac: m.finalize().into_bytes().to_vec(),
        })
    }

    /// Checks the signature (in constant time) and the expiry against `now_unix_s`.
    pub fn verify(&self, secret: &ClusterSecret, now_unix_s: u64) -> Result<(), TokenError> {
        let mut m = secret.access_mac();
        m.update(signed_part(self.kind, &self.subject, self.expires).as_bytes());
        m.verify_slice(&self.mac)
            .map_err(|_| TokenError::BadSignature)?;
        if self.expires != 0 && now_unix_s >= self.expires {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            signed_part(self.kind, &self.subject, self.expires),
            hex::encode(&self.mac)
        )
    }
}

impl FromStr for AccessToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_TEXT {
            return Err(TokenError::Malformed("too long"));
        }
        let rest = s
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(TokenError::Malformed("not a dfs1 token"))?;
        let (rest, mac) = rest
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("missing signature"))?;
        let (rest, expires) = rest
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("missing expiry"))?;
        let (kind, subject) = rest
            .split_once('.')
            .ok_or(TokenError::Malformed("missing subject"))?;
        let kind = match kind {
            "rw" => TokenKind::ReadWrite,
            "ro" => TokenKind::ReadOnly,
            "worker" => TokenKind::Worker,
            _ => return Err(TokenError::Malformed("unknown kind")),
        };
        if !valid_subject(subject) {
            return Err(TokenError::Malformed("bad subject"));
        }
        // Canonical digits only (no sign, no leading zeros): one spelling per token.
        if expires.is_empty()
            || !expires.bytes().all(|b| b.is_ascii_digit())
            || (expires.len() > 1 && expires.starts_with('0'))
        {
            return Err(TokenError::Malformed("bad expiry"));
        }
        let expires: u64 = expires
            .parse()
            .map_err(|_| TokenError::Malformed("bad expiry"))?;
        // One spelling per token: lowercase hex only.
        if mac.len() != 64 || !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(TokenError::Malformed(
                "signature must be 64 lowercase hex digits",
            ));
        }
        let mac = hex::decode(mac).map_err(|_| TokenError::Malformed("signature is not hex"))?;
        Ok(AccessToken {
            kind,
            subject: subject.to_string(),
            expires,
            mac,
        })
    }
}

/// Parses and verifies `text` in one step (what the master does for every request).
pub fn check(
    secret: &ClusterSecret,
    text: &str,
    now_unix_s: u64,
) -> Result<AccessToken, TokenError> {
    let t: AccessToken = text.parse()?;
    t.verify(secret, now_unix_s)?;
    Ok(t)
}

/// Seconds since the Unix epoch.
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn round_trip_and_verify() {
        let k = secret("cluster-secret-one");
        let t = AccessToken::mint(&k, TokenKind::Worker, "127.0.0.1:7001", 0).unwrap();
        let text = t.to_string();
        assert!(text.starts_with("dfs1.worker.127.0.0.1:7001.0."));
        let back = check(&k, &text, now_unix_s()).unwrap();
        assert_eq!(back, t);
        assert_eq!(
            check(&secret("cluster-secret-two"), &text, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampering_and_expiry_are_caught() {
        let k = secret("cluster-secret-one");
        let ro = AccessToken::mint(&k, TokenKind::ReadOnly, "alice", 100).unwrap();
        let text = ro.to_string();
        assert!(check(&k, &text, 99).is_ok());
        assert_eq!(check(&k, &text, 100), Err(TokenError::Expired));
        let promoted = text.replacen(".ro.", ".rw.", 1);
        assert_eq!(check(&k, &promoted, 0), Err(TokenError::BadSignature));
        let extended = text.replacen(".100.", ".999999999999.", 1);
        assert_eq!(check(&k, &extended, 0), Err(TokenError::BadSignature));
        let zero_padded = text.replacen(".100.", ".0100.", 1);
        assert!(matches!(
            check(&k, &zero_padded, 0),
            Err(TokenError::Malformed(_))
        ));
        for bad in [
            "",
            "dfs1",
            "dfs1.rw.a.0",
            "jwt.rw.a.0.00",
            "dfs1.rw..0.ab",
            "dfs1.xx.a.0.ab",
        ] {
            assert!(
                matches!(check(&k, bad, 0), Err(TokenError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(AccessToken::mint(&k, TokenKind::ReadWrite, "bad subject", 0).is_err());
    }
}
