//! Server settings shared by master and workers: HTTP/2 tuning, health and reflection.

use std::time::Duration;

use tonic::transport::Server;

use crate::master::MasterError;
use crate::rpc::{FILE_DESCRIPTOR_SET, MAX_FRAME_SIZE};

/// A server builder with bulk-friendly HTTP/2 settings and keepalive to drop dead peers.
pub fn builder() -> Server {
    Server::builder()
        .max_frame_size(Some(MAX_FRAME_SIZE))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// [`builder`] with a per-connection stream limit and, when `tls` is given, TLS that requires
/// client certificates signed by its CA.
pub fn builder_with(
    tls: Option<&crate::security::tls::TlsMaterial>,
    max_streams_per_conn: u32,
) -> Result<Server, crate::security::SecurityError> {
    let b = builder().max_concurrent_streams(Some(max_streams_per_conn));
    match tls {
        None => Ok(b),
        Some(t) => b.tls_config(t.server_config()?).map_err(|e| {
            crate::security::SecurityError::Invalid(format!("TLS configuration: {e}"))
        }),
    }
}

/// gRPC reflection over dfs.v1 and the health protocol, so `grpcurl` and friends work.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    MasterError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| MasterError::Internal(format!("reflection: {e}")))
}

/// The accept stream for `listener` with TCP_NODELAY on every connection. `Server::tcp_nodelay`
/// only applies to listeners tonic binds itself; without this, the last small frame of each
/// response (gRPC trailers) waited on Nagle and delayed ACKs, ~40 ms per streamed read.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The status codes the limits promise: a request over the size limit gets ResourceExhausted
/// (as the gRPC spec asks, where tonic's decoder says OutOfRange), and one that runs past
/// `timeout` gets DeadlineExceeded (tonic's own server timeout answers Cancelled). Streams
/// are not cut: the timeout covers the time to the response's headers.
#[derive(Clone)]
pub struct LimitStatus<S> {
    inner: S,
    timeout: Option<std::time::Duration>,
}

impl<S> LimitStatus<S> {
    pub fn new(inner: S, timeout: Option<std::time::Duration>) -> Self {
        LimitStatus { inner, timeout }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for LimitStatus<S> {
    const NAME: &'static str = S::NAME;
}

/// What the HTTP-level wrappers around tonic services answer.
pub(crate) type HttpResult = Result<http::Response<tonic::body::Body>, std::convert::Infallible>;

fn remap_too_large(r: HttpResult) -> HttpResult {
    r.map(|mut resp| {
        // tonic percent-encodes the message's spaces.
        let too_large = resp.headers().get("grpc-status").map(|v| v.as_bytes()) == Some(b"11")
            && resp.headers().get("grpc-message").is_some_and(|m| {
                m.as_bytes()
                    .starts_with(b"Error,%20decoded%20message%20length%20too%20large")
            });
        if too_large {
            resp.headers_mut().insert(
                "grpc-status",
                http::HeaderValue::from_static("8"), // RESOURCE_EXHAUSTED
            );
        }
        resp
    })
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for LimitStatus<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = HttpResult> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let fut = self.inner.call(req);
        let timeout = self.timeout;
        Box::pin(async move {
            let r = match timeout {
                None => fut.await,
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Ok(tonic::Status::deadline_exceeded(format!(
                            "request took longer than the server's limit of {}",
                            humantime::format_duration(t)
                        ))
                        .into_http());
                    }
                },
            };
            remap_too_large(r)
        })
    }
}
