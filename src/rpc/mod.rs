//! Generated gRPC code for `proto/dfs.proto` and the transport settings shared by every node.
//!
//! Bulk data goes in messages of at most [`MAX_DATA_MESSAGE`] bytes; HTTP/2 frames are raised to
//! 4 MiB because with the default 16 KiB frames h2 spends most of its CPU on per-frame syscalls
//! (see `shared/STACK.md`).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("dfs.v1");
}

/// Encoded descriptor set of `dfs.v1`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dfs_descriptor");

/// Largest payload in one streamed data message.
pub const MAX_DATA_MESSAGE: usize = 1 << 20;
/// Largest gRPC message accepted or sent (chunk reports of big workers, file listings).
pub const MAX_GRPC_MESSAGE: usize = 64 << 20;
/// HTTP/2 frame size for servers and channels.
pub const MAX_FRAME_SIZE: u32 = 4 << 20;
/// How long establishing a connection may take before the caller gets an error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound for a control (unary) RPC.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one chunk transfer may take: a base for stalls (a hung peer must not hold a
/// transfer for long) plus one second per MiB, i.e. slower than 1 MiB/s counts as stalled.
pub fn transfer_limit(bytes: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_secs(bytes >> 20)
}

/// Status metadata key naming the pipeline member that failed a chunk write.
pub const FAILED_WORKER_KEY: &str = "x-dfs-failed-worker";

/// An endpoint for `addr` ("host:port" or a full URL) with the shared transport settings.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20)))
}

/// A lazily connected channel for control RPCs (each call bounded by [`CONTROL_TIMEOUT`]).
pub fn control_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr)?.timeout(CONTROL_TIMEOUT).connect_lazy())
}

/// A lazily connected channel for bulk streams (no overall deadline: a stream may be long).
pub fn data_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr)?.connect_lazy())
}

/// A master client with message limits raised for large reports and listings.
pub fn master_client(channel: Channel) -> pb::master_client::MasterClient<Channel> {
    pb::master_client::MasterClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE)
}

/// A worker client with message limits for 1 MiB data messages plus framing.
pub fn worker_client(channel: Channel) -> pb::worker_client::WorkerClient<Channel> {
    pb::worker_client::WorkerClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
