//! TLS settings shared by every node: one certificate and key for this node, and the CA that
//! signs its peers' certificates.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::SecurityError;

/// Paths given by `--tls-cert`, `--tls-key` and `--tls-ca`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// True when any TLS flag was given.
    pub fn any(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }
}

/// Loaded PEM material: the node's identity (if any) and the CA it trusts.
#[derive(Clone)]
pub struct TlsMaterial {
    identity: Option<(Vec<u8>, Vec<u8>)>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, SecurityError> {
    let bytes = std::fs::read(path).map_err(|source| SecurityError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(SecurityError::Invalid(format!(
            "{} does not look like a PEM {what}",
            path.display()
        )));
    }
    Ok(bytes)
}

impl TlsMaterial {
    /// Loads the files for a **daemon** (master or worker): it serves with its certificate and
    /// also dials peers, so it needs all three. `None` when no flag was given (plaintext).
    pub fn for_daemon(files: &TlsFiles) -> Result<Option<TlsMaterial>, SecurityError> {
        if !files.any() {
            return Ok(None);
        }
        let (Some(cert), Some(key), Some(ca)) = (&files.cert, &files.key, &files.ca) else {
            return Err(SecurityError::Invalid(
                "TLS on a daemon needs --tls-cert, --tls-key and --tls-ca together (make a set with `dfs-tui --cmd gen-certs DIR`)".into(),
            ));
        };
        Ok(Some(TlsMaterial {
            identity: Some((read_pem(cert, "certificate")?, read_pem(key, "key")?)),
            ca: read_pem(ca, "CA certificate")?,
        }))
    }

    /// Loads the files for a **client**: `--tls-ca` turns TLS on and verifies the servers;
    /// `--tls-cert` and `--tls-key` add a client certificate for clusters that require one.
    pub fn for_client(files: &TlsFiles) -> Result<Option<TlsMaterial>, SecurityError> {
        if !files.any() {
            return Ok(None);
        }
        let Some(ca) = &files.ca else {
            return Err(SecurityError::Invalid(
                "TLS needs --tls-ca: the CA that signed the cluster's certificates".into(),
            ));
        };
        let identity = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => Some((read_pem(c, "certificate")?, read_pem(k, "key")?)),
            (None, None) => None,
            _ => {
                return Err(SecurityError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
        };
        Ok(Some(TlsMaterial {
            identity,
            ca: read_pem(ca, "CA certificate")?,
        }))
    }

    /// True when this node presents a certificate of its own.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// Server side: present our certificate and require a client certificate signed by the CA
    /// (mutual TLS).
    pub fn server_config(&self) -> Result<ServerTlsConfig, SecurityError> {
        let Some((cert, key)) = &self.identity else {
            return Err(SecurityError::Invalid(
                "a TLS server needs --tls-cert and --tls-key".into(),
            ));
        };
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(&self.ca)))
    }

    /// Client side: verify the server against the CA and present our certificate if we have
    /// one.
    pub fn client_config(&self) -> ClientTlsConfig {
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        cfg
    }
}
