//! How a command reaches a cluster: TLS files and the access token, from flags or the
//! environment; and the offline commands that make that material (`gen-certs`, `gen-secret`,
//! `token`).

use std::path::PathBuf;

use crate::rpc::Transport;
use crate::security::tls::TlsMaterial;
use crate::security::{AccessToken, ClusterSecret, SecurityError, TlsFiles, TokenKind};

/// Security flags shared by the console and every `--cmd` operation.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// This client's TLS certificate (PEM), for clusters that require client certificates.
    #[arg(long, env = "DFS_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "DFS_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the cluster's certificates; turns TLS on.
    #[arg(long, env = "DFS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// File holding an access token (else the DFS_TOKEN environment variable is used).
    #[arg(long, env = "DFS_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The cluster secret: for `--cmd token`, and to secure the `--local` embedded cluster.
    #[arg(long, env = "DFS_CLUSTER_SECRET_FILE", global = true)]
    pub cluster_secret_file: Option<PathBuf>,
}

impl AccessArgs {
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }

    /// The token from `--token-file`, else from `DFS_TOKEN`.
    pub fn token(&self) -> Result<Option<String>, SecurityError> {
        if let Some(p) = &self.token_file {
            let text = std::fs::read_to_string(p).map_err(|source| SecurityError::Read {
                path: p.display().to_string(),
                source,
            })?;
            let t = text.trim().to_string();
            if t.is_empty() {
                return Err(SecurityError::Invalid(format!(
                    "{} holds no token",
                    p.display()
                )));
            }
            return Ok(Some(t));
        }
        Ok(std::env::var("DFS_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }

    pub fn secret(&self) -> Result<Option<ClusterSecret>, SecurityError> {
        self.cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()
    }

    /// The transport for talking to a remote cluster.
    pub fn client_transport(&self) -> Result<Transport, SecurityError> {
        let tls = TlsMaterial::for_client(&self.tls_files())?;
        Transport::new(tls.as_ref(), self.token()?.as_deref())
    }
}

/// Mints an access token (what `--cmd token` prints).
pub fn mint_token(
    secret: &ClusterSecret,
    read_only: bool,
    subject: &str,
    ttl: Option<std::time::Duration>,
) -> Result<String, SecurityError> {
    let kind = if read_only {
        TokenKind::ReadOnly
    } else {
        TokenKind::ReadWrite
    };
    let expires = ttl
        .map(|d| crate::security::token::now_unix_s() + d.as_secs().max(1))
        .unwrap_or(0);
    AccessToken::mint(secret, kind, subject, expires)
        .map(|t| t.to_string())
        .map_err(|e| SecurityError::Invalid(e.to_string()))
}

/// Security flags of the daemons (`master`, `worker`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonAccessArgs {
    /// This node's TLS certificate (PEM); with --tls-key and --tls-ca turns TLS on for every
    /// connection, in and out, with client certificates required (mutual TLS).
    #[arg(long, env = "DFS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "DFS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signs every node's and client's certificate.
    #[arg(long, env = "DFS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The cluster secret shared by the master and the workers: turns on access tokens and
    /// chunk capabilities (make one with `dfs-tui --cmd gen-secret FILE`).
    #[arg(long, env = "DFS_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
}

impl DaemonAccessArgs {
    /// Loads the secret and the TLS material, failing with a message naming the bad file.
    pub fn load(&self) -> Result<(Option<ClusterSecret>, Option<TlsMaterial>), SecurityError> {
        let secret = self
            .cluster_secret_file
            .as_deref()
            .map(ClusterSecret::from_file)
            .transpose()?;
        let tls = TlsMaterial::for_daemon(&TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        })?;
        Ok((secret, tls))
    }
}

/// Logs what a daemon bound to `bound` exposes, and warns when it is open beyond loopback.
/// It takes the address the socket got, not the flag's text: a name such as `localhost`
/// is judged by what it resolved to, and text that is no address at all fails to bind
/// before any warning about it.
pub fn log_exposure(role: &str, bound: std::net::SocketAddr, secret: bool, tls: bool) {
    let loopback = bound.ip().is_loopback();
    let addr = bound.to_string();
    let addr = addr.as_str();
    tracing::info!(
        role,
        addr,
        authentication = secret,
        tls,
        "security settings"
    );
    if !loopback && !secret {
        tracing::warn!(
            role,
            addr,
            "listening beyond loopback with no --cluster-secret-file: anyone who can reach this port can read, write and delete data"
        );
    }
    if !loopback && !tls {
        tracing::warn!(
            role,
            addr,
            "listening beyond loopback without TLS: tokens and file bytes cross the network in clear"
        );
    }
}
