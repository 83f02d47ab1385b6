//! The master's front door: every Master RPC passes here before its handler runs.
//!
//! A table maps each method to what it needs (read, write, or worker); a method missing from
//! the table is refused, so a new RPC cannot ship unguarded by accident. Health checks and
//! reflection are separate services and stay open (they reveal no data).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::token::{self, TokenKind};
use super::{AUTHORIZATION, ClusterSecret};

/// What a Master method requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Reads: list, stat, download locations, status, logs, reports.
    Read,
    /// Any change to files or to the cluster.
    Write,
    /// Worker-only calls (register, heartbeat).
    Worker,
}

/// The access table for `dfs.v1.Master`; `None` = unknown method (refused).
pub fn master_need(method: &str) -> Option<Need> {
    Some(match method {
        "Register" | "Heartbeat" => Need::Worker,
        "StartUpload" | "StartUploads" | "ReserveUploads" | "AllocateChunk" | "CommitUpload"
        | "CommitUploads" | "PrepareUploads" | "RenewUpload" | "AbortUpload" | "DeleteFile"
        | "CreateEmpty" | "DeleteMany" | "DeleteFiles" | "SetDraining" => Need::Write,
        "GetFile" | "GetFiles" | "ListFiles" | "ReportBadReplica" | "ClusterStatus"
        | "StreamLogs" | "DrainPlan" | "Fsck" | "GcStatus" | "ProcessStats" => Need::Read,
        _ => return None,
    })
}

/// Who is calling, attached to every request that passed the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's kind; `None` when the cluster runs without authentication.
    pub kind: Option<TokenKind>,
    /// The token's subject, or the peer's IP address without authentication: the key for
    /// per-client limits.
    pub subject: String,
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// The caller of `req` (an unauthenticated one if the request bypassed the guard).
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller::anonymous(req.remote_addr()))
    }

    /// A caller on a cluster without tokens: known by its IP address.
    fn anonymous(peer: Option<SocketAddr>) -> Caller {
        Caller {
            kind: None,
            subject: peer
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "unknown".into()),
            peer,
        }
    }
}

/// The peer address tonic recorded for the connection, with or without TLS.
pub fn peer_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// Checks the request's credentials against `secret` for `method`.
pub fn authorize(
    secret: &ClusterSecret,
    method: &str,
    header: Option<&http::HeaderValue>,
    now_unix_s: u64,
) -> Result<(TokenKind, String), tonic::Status> {
    let Some(need) = master_need(method) else {
        return Err(tonic::Status::unimplemented(format!(
            "unknown method {method}"
        )));
    };
    let Some(value) = header else {
        return Err(tonic::Status::unauthenticated(
            "this cluster requires a token: set DFS_TOKEN or pass --token-file",
        ));
    };
    let text = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            tonic::Status::unauthenticated("authorization must be \"Bearer <token>\"")
        })?;
    let t = token::check(secret, text, now_unix_s)
        .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
    let ok = match (need, t.kind) {
        (Need::Worker, TokenKind::Worker) => true,
        (Need::Worker, _) => false,
        (_, TokenKind::Worker) => false,
        (Need::Write, TokenKind::ReadOnly) => false,
        (Need::Read | Need::Write, TokenKind::ReadWrite) | (Need::Read, TokenKind::ReadOnly) => {
            true
        }
    };
    if !ok {
        return Err(tonic::Status::permission_denied(format!(
            "a {} token may not call {method}",
            t.kind
        )));
    }
    Ok((t.kind, t.subject))
}

/// Wraps the Master service with the access check.
#[derive(Clone)]
pub struct AuthGuard<S> {
    inner: S,
    secret: Option<ClusterSecret>,
}

impl<S> AuthGuard<S> {
    pub fn new(inner: S, secret: Option<ClusterSecret>) -> Self {
        AuthGuard { inner, secret }
    }
}

impl<S: NamedService> NamedService for AuthGuard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for AuthGuard<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let peer = peer_addr(req.extensions());
        let caller = match &self.secret {
            None => Caller::anonymous(peer),
            Some(secret) => {
                let method = req.uri().path().rsplit('/').next().unwrap_or("");
                match authorize(
                    secret,
                    method,
                    req.headers().get(AUTHORIZATION),
                    token::now_unix_s(),
                ) {
                    Ok((kind, subject)) => Caller {
                        kind: Some(kind),
                        subject,
                        peer,
                    },
                    Err(status) => {
                        tracing::warn!(
                            peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
                            method,
                            code = ?status.code(),
                            reason = status.message(),
                            "request refused"
                        );
                        return futures::future::Either::Right(std::future::ready(Ok(
                            status.into_http()
                        )));
                    }
                }
            }
        };
        req.extensions_mut().insert(caller);
        futures::future::Either::Left(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::AccessToken;

    #[test]
    fn kinds_reach_only_their_methods() {
        let k = ClusterSecret::from_bytes(b"guard test secret").unwrap();
        let tok = |kind| {
            let t = AccessToken::mint(&k, kind, "t", 0).unwrap().to_string();
            http::HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
        };
        let (rw, ro, wk) = (
            tok(TokenKind::ReadWrite),
            tok(TokenKind::ReadOnly),
            tok(TokenKind::Worker),
        );
        let code =
            |m: &str, h: Option<&http::HeaderValue>| authorize(&k, m, h, 0).err().map(|s| s.code());
        use tonic::Code::*;
        assert_eq!(code("StartUpload", Some(&rw)), None);
        assert_eq!(code("StartUpload", Some(&ro)), Some(PermissionDenied));
        assert_eq!(code("StartUpload", Some(&wk)), Some(PermissionDenied));
        assert_eq!(code("GetFile", Some(&ro)), None);
        assert_eq!(code("Register", Some(&rw)), Some(PermissionDenied));
        assert_eq!(code("Register", Some(&wk)), None);
        assert_eq!(code("GetFile", None), Some(Unauthenticated));
        assert_eq!(code("NoSuchMethod", Some(&rw)), Some(Unimplemented));
    }
}
