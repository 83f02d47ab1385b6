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
