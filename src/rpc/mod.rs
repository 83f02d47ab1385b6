//! Generated gRPC code for `proto/dfs.proto` and the transport settings shared by every node.
//!
//! Bulk data goes in messages of at most [`MAX_DATA_MESSAGE`] bytes ([`WRITE_DATA_MESSAGE`]
//! in writes); HTTP/2 frames are raised ([`MAX_FRAME_SIZE`], [`CHANNEL_MAX_FRAME_SIZE`])
//! because with the default 16 KiB frames h2 spends most of its CPU on per-frame syscalls
//! (see `shared/STACK.md`).

use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::security::SecurityError;
use crate::security::tls::TlsMaterial;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("dfs.v1");
}

/// Encoded descriptor set of `dfs.v1`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dfs_descriptor");

/// Largest payload in one streamed data message (reads send messages this big).
pub const MAX_DATA_MESSAGE: usize = 1 << 20;
/// Payload of each data message in a write stream: uploads, pipeline forwards and repair
/// copies. Smaller than a read's because every message a worker receives keeps tonic's
/// decode buffer alive (up to twice the message: the buffer also holds the start of the
/// next one) until the disk writer and the next hop are done with it, and a 3-copy upload
/// with three chunks in flight keeps nine such streams busy. In a 1 GiB 3-copy upload
/// through real workers, 1 MiB messages peaked each worker at 40–51 MiB and 256 KiB ones
/// at 26–32 MiB, at the same speed (README, Performance).
pub const WRITE_DATA_MESSAGE: usize = 256 << 10;
/// Largest gRPC message accepted or sent (chunk reports of big workers, file listings).
pub const MAX_GRPC_MESSAGE: usize = 64 << 20;
/// HTTP/2 frame size a server accepts (uploads and replication arrive in frames this big).
pub const MAX_FRAME_SIZE: u32 = 4 << 20;
/// HTTP/2 frame size a channel accepts, i.e. what servers send it (downloads). Measured on a
/// cold 2 GiB download: 16 KiB frames cost a fifth more time (one syscall per frame on both
/// sides); 64 KiB to 4 MiB all ran at the same speed, but the client's peak memory grew with
/// the frame, from about 50 MiB at 256 KiB to 75 MiB at 4 MiB.
pub const CHANNEL_MAX_FRAME_SIZE: u32 = 256 << 10;
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

/// Adds this node's access token to every master call (`authorization: Bearer ...`).
#[derive(Clone, Default)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut()
                .insert(crate::security::AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// A master client that carries credentials.
pub type MasterRpc = pb::master_client::MasterClient<InterceptedService<Channel, Credentials>>;

/// How this node dials others: plaintext or TLS, and which access token it presents to the
/// master. Cheap to clone.
#[derive(Clone, Default)]
pub struct Transport {
    tls: Option<ClientTlsConfig>,
    identity: bool,
    creds: Credentials,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls", &self.tls.is_some())
            .field("token", &self.creds.0.is_some())
            .finish()
    }
}

impl Transport {
    /// Plaintext, no token: the loopback quick start.
    pub fn plain() -> Transport {
        Transport::default()
    }

    /// A transport with optional TLS material and an optional access token.
    pub fn new(tls: Option<&TlsMaterial>, token: Option<&str>) -> Result<Transport, SecurityError> {
        let creds = match token {
            None => Credentials(None),
            Some(t) => {
                let v: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| {
                        SecurityError::Invalid("token has characters a header cannot carry".into())
                    })?;
                Credentials(Some(v))
            }
        };
        Ok(Transport {
            tls: tls.map(TlsMaterial::client_config),
            identity: tls.is_some_and(TlsMaterial::has_identity),
            creds,
        })
    }

    /// True when connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True when this side presents a client certificate.
    pub fn has_identity(&self) -> bool {
        self.identity
    }

    /// An endpoint for `addr` ("host:port" or a full URL) with the shared settings.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else if self.tls.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let ep = tuned(Endpoint::from_shared(url)?);
        match &self.tls {
            Some(cfg) => ep.tls_config(cfg.clone()),
            None => Ok(ep),
        }
    }

    /// A lazily connected channel for control RPCs (each call bounded by [`CONTROL_TIMEOUT`]).
    pub fn control_channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(self.endpoint(addr)?.timeout(CONTROL_TIMEOUT).connect_lazy())
    }

    /// A lazily connected channel for bulk streams (no overall deadline).
    pub fn data_channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        Ok(self.endpoint(addr)?.connect_lazy())
    }

    /// A master client on `channel` that presents this transport's token.
    pub fn master(&self, channel: Channel) -> MasterRpc {
        pb::master_client::MasterClient::with_interceptor(channel, self.creds.clone())
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE)
    }
}

/// A plaintext endpoint for `addr` (see [`Transport::endpoint`]).
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Transport::plain().endpoint(addr)
}

fn tuned(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        // The frame size a channel advertises bounds what servers send it: without this,
        // downloads arrive in 16 KiB frames, one syscall each on both sides.
        .max_frame_size(Some(CHANNEL_MAX_FRAME_SIZE))
}

/// A plaintext control channel (see [`Transport::control_channel`]).
pub fn control_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Transport::plain().control_channel(addr)
}

/// A plaintext data channel (see [`Transport::data_channel`]).
pub fn data_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Transport::plain().data_channel(addr)
}

/// A master client with message limits raised for large reports and listings.
pub fn master_client(channel: Channel) -> pb::master_client::MasterClient<Channel> {
    pb::master_client::MasterClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE)
}

/// A worker client (worker calls carry per-chunk capabilities, not credentials).
pub type WorkerRpc = pb::worker_client::WorkerClient<Channel>;

/// A worker client with message limits for 1 MiB data messages plus framing.
pub fn worker_client(channel: Channel) -> WorkerRpc {
    pb::worker_client::WorkerClient::new(channel)
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE)
}

/// Milliseconds since `started` for a log line, rounded to the microsecond: `ms=0.012`, not
/// `ms=0` (or `ms=0.0119999…`).
pub fn elapsed_ms(started: std::time::Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    /// Reads the client's HTTP/2 preface and first SETTINGS frame off a raw socket and
    /// returns its (id, value) pairs.
    async fn client_settings(
        channel: fn(&str) -> Result<super::Channel, tonic::transport::Error>,
    ) -> Vec<(u16, u32)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ch = channel(&addr).unwrap();
        let call = tokio::spawn(async move {
            let mut c = super::worker_client(ch);
            let _ = c
                .read_small_chunks(super::pb::ReadSmallChunksRequest::default())
                .await;
        });
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; 24];
        sock.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut head = [0u8; 9];
        sock.read_exact(&mut head).await.unwrap();
        assert_eq!(head[3], 0x4, "the first frame is SETTINGS");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).await.unwrap();
        call.abort();
        body.chunks_exact(6)
            .map(|e| {
                (
                    u16::from_be_bytes([e[0], e[1]]),
                    u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                )
            })
            .collect()
    }

    /// A channel must advertise large frames, or every server streams to it in 16 KiB frames
    /// (one syscall each): downloads ran about a fifth slower that way.
    #[tokio::test]
    async fn channels_advertise_large_frames_and_windows() {
        for channel in [super::data_channel, super::control_channel] {
            let settings =
                tokio::time::timeout(std::time::Duration::from_secs(10), client_settings(channel))
                    .await
                    .expect("the channel connected and sent its settings");
            // SETTINGS_MAX_FRAME_SIZE (5) and SETTINGS_INITIAL_WINDOW_SIZE (4).
            assert!(
                settings.contains(&(5, super::CHANNEL_MAX_FRAME_SIZE)),
                "{settings:?}"
            );
            assert!(settings.contains(&(4, 8 << 20)), "{settings:?}");
        }
    }
}
