//! `ReadChunk`: authorised, opened, verified, and sent without a copy in user space.
//!
//! tonic encodes every response message into a buffer of its own, so each byte read from a
//! chunk file used to be copied once more on its way to the socket: a memmove the size of
//! the download, on the async thread that also carries the streams. [`ZeroCopyReads`] answers
//! `/dfs.v1.Worker/ReadChunk` itself instead. The blocking reader reads each 1 MiB piece into
//! a buffer that already has room in front for the gRPC and protobuf framing, writes the
//! framing there, and the piece goes to HTTP/2 as it was read (h2 writes large DATA payloads
//! with vectored I/O, uncopied). The bytes on the wire are exactly what tonic would send, so
//! every gRPC client reads them: the generated client, `grpcurl`, older dfs clients. Every
//! other call goes on to the tonic service, and tonic's own `read_chunk` handler serves the
//! same `Source` as messages when the service is used without this wrapper.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::Stream;
use http_body::Frame;
use prost::Message;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc;
use tonic::Status;

use super::Worker;
use super::error::WorkerError;
use super::volume::SMALL_CHUNK_MAX;
use crate::chunk::{self, ChunkId};
use crate::rpc::pb::{ChunkHeader, ReadChunkRequest, ReadChunkResponse, read_chunk_response};
use crate::server::HttpResult;

/// The HTTP/2 path of the call this module serves.
pub const READ_CHUNK_PATH: &str = "/dfs.v1.Worker/ReadChunk";
/// Largest request body accepted: a chunk id and a capability are a few hundred bytes.
const MAX_REQUEST: usize = 64 << 10;
/// Room left in front of each piece for its framing: the 5-byte gRPC message prefix, the
/// protobuf key of `ReadChunkResponse.data` and the piece's length as a varint.
const HEADROOM: usize = 16;
/// Pieces queued between the blocking reader and the socket (each 1 MiB).
const QUEUE: usize = 4;

/// What one `ReadChunk` serves once it is authorised and opened.
pub(crate) enum Source {
    /// A small chunk, read and verified whole: its header, its data, and the error that
    /// ended the read, if one did (the data then must not be trusted; it is not sent).
    Whole(ChunkHeader, Vec<Bytes>, Option<Status>),
    /// A large chunk, streamed from its file by a blocking reader holding the slot.
    File {
        file: std::fs::File,
        header: ChunkHeader,
        slot: OwnedSemaphorePermit,
    },
}

/// Checks the call's chunk id and capability, takes a transfer slot, and opens the chunk
/// (reading a small one whole, from the page cache when it is there).
pub(crate) async fn open(
    worker: &Arc<Worker>,
    req: &ReadChunkRequest,
    peer: &str,
) -> Result<(ChunkId, Source), Status> {
    let id: ChunkId = req
        .chunk_id
        .parse()
        .map_err(|e: chunk::BadChunkId| Status::invalid_argument(e.to_string()))?;
    worker
        .authorize(&req.token, &id, crate::security::ChunkOps::READ)
        .map_err(|e| {
            tracing::warn!(op = "read_chunk", chunk = %id, %peer, outcome = "refused", error = %e);
            Status::from(e)
        })?;
    let slot = worker.transfer_slot()?;
    if let Some((header, data)) = worker.store.read_small_cached(&id) {
        worker
            .bytes_read
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(op = "read_chunk", chunk = %id, %peer, outcome = "sent");
        return Ok((id, Source::Whole(header, vec![data], None)));
    }
    let w = worker.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let (mut file, header) = w.store.open_read(&id)?;
        if header.length > SMALL_CHUNK_MAX {
            return Ok(Source::File { file, header, slot });
        }
        let mut pieces = Vec::with_capacity(1);
        let (length, expected) = (header.length, header.crc32c);
        let failed = w
            .read_verified(&id, &mut file, length, expected, |b| {
                pieces.push(b);
                true
            })
            .err()
            .map(Status::from);
        drop(slot);
        Ok::<_, WorkerError>(Source::Whole(header, pieces, failed))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| {
        tracing::warn!(op = "read_chunk", chunk = %id, %peer, outcome = "error", error = %e);
        Status::from(e)
    })?;
    match &opened {
        Source::Whole(..) => {
            tracing::info!(op = "read_chunk", chunk = %id, %peer, outcome = "sent")
        }
        Source::File { header, .. } => {
            tracing::info!(op = "read_chunk", chunk = %id, bytes = header.length, %peer, outcome = "started")
        }
    }
    Ok((id, opened))
}

/// Runs the blocking reader of a large chunk: the header, then each piece framed by
/// `frame`, then `Ok(())` or the error that ended it, each through `send` (which returns
/// false once the reader of the stream went away or stopped taking data).
fn stream_file<T>(
    worker: &Worker,
    id: ChunkId,
    mut file: std::fs::File,
    header: ChunkHeader,
    headroom: usize,
    frame: impl Fn(Vec<u8>) -> T,
    send: impl Fn(Result<T, Status>) -> bool,
) {
    let _g = super::service::Gauge::enter(&worker.active_reads);
    let (length, expected) = (header.length, header.crc32c);
    let pieces = super::Pieces {
        size: crate::rpc::MAX_DATA_MESSAGE,
        headroom,
    };
    let sent = worker.read_verified_framed(&id, &mut file, length, expected, pieces, |b| {
        send(Ok(frame(b)))
    });
    if let Err(e) = sent {
        let _ = send(Err(e.into()));
    }
}

/// Spawns the blocking reader of a large chunk, feeding a bounded queue. A reader of the
/// stream that stops taking data is cut off after the worker's idle timeout.
fn spawn_reader<T: Send + 'static>(
    worker: &Arc<Worker>,
    id: ChunkId,
    file: std::fs::File,
    header: ChunkHeader,
    slot: OwnedSemaphorePermit,
    headroom: usize,
    frame: impl Fn(Vec<u8>) -> T + Send + 'static,
) -> mpsc::Receiver<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let handle = tokio::runtime::Handle::current();
    let worker = worker.clone();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let idle = worker.limits.idle_timeout;
        let send = |m: Result<T, Status>| match handle
            .block_on(tokio::time::timeout(idle, tx.send(m)))
        {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(op = "read_chunk", chunk = %id, "reader stopped taking data; stream dropped");
                false
            }
        };
        stream_file(&worker, id, file, header, headroom, frame, send);
    });
    rx
}

/// A response stream of messages, for tonic's `read_chunk` handler.
pub(crate) type Messages = Pin<Box<dyn Stream<Item = Result<ReadChunkResponse, Status>> + Send>>;

fn header_message(h: ChunkHeader) -> ReadChunkResponse {
    ReadChunkResponse {
        msg: Some(read_chunk_response::Msg::Header(h)),
    }
}

fn data_message(b: Bytes) -> ReadChunkResponse {
    ReadChunkResponse {
        msg: Some(read_chunk_response::Msg::Data(b)),
    }
}

/// `source` as tonic response messages.
pub(crate) fn messages(worker: &Arc<Worker>, id: ChunkId, source: Source) -> Messages {
    match source {
        Source::Whole(header, pieces, failed) => {
            let mut out = vec![Ok(header_message(header))];
            out.extend(pieces.into_iter().map(|b| Ok(data_message(b))));
            out.extend(failed.map(Err));
            Box::pin(tokio_stream::iter(out))
        }
        Source::File { file, header, slot } => {
            let first =
                futures::stream::once(std::future::ready(Ok(header_message(header.clone()))));
            let owed = pieces_of(&header);
            let rx = spawn_reader(worker, id, file, header, slot, 0, |v| {
                data_message(Bytes::from(v))
            });
            // As `ChunkBody` does: a reader that stopped short ends the stream with an error.
            let pieces = futures::stream::unfold((rx, owed), |(mut rx, owed)| async move {
                match rx.recv().await {
                    Some(Ok(m)) => Some((Ok(m), (rx, owed.saturating_sub(1)))),
                    Some(Err(s)) => Some((Err(s), (rx, 0))),
                    None if owed > 0 => Some((Err(stopped_short()), (rx, 0))),
                    None => None,
                }
            });
            Box::pin(futures::StreamExt::chain(first, pieces))
        }
    }
}

/// How many data messages the blocking reader sends for a chunk (see
/// `Worker::read_verified_framed`).
fn pieces_of(header: &ChunkHeader) -> u64 {
    header.length.div_ceil(crate::rpc::MAX_DATA_MESSAGE as u64)
}

/// How a stream ends whose reader stopped before the last piece (its reader took no data
/// for the idle timeout): never with an OK status after a short chunk.
fn stopped_short() -> Status {
    Status::aborted("the worker stopped sending this chunk (the reader took no data for too long)")
}

/// `msg` as one gRPC message: the 5-byte prefix (uncompressed, big-endian length), then the
/// protobuf encoding.
fn grpc_message(msg: &ReadChunkResponse) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Encoding into a Vec with room reserved cannot fail.
    let _ = msg.encode(&mut buf);
    Bytes::from(buf)
}

/// Writes, right before `HEADROOM`, the framing of a `ReadChunkResponse` whose `data` is the
/// rest of `buf`, and returns the whole message: protobuf key 2 with wire type 2 (0x12), the
/// data's length as a varint, after the gRPC prefix.
fn frame_piece(mut buf: Vec<u8>) -> Bytes {
    let n = buf.len() - HEADROOM;
    let mut varint = [0u8; 10];
    let mut k = 0;
    let mut v = n as u64;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            varint[k] = byte;
            k += 1;
            break;
        }
        varint[k] = byte | 0x80;
        k += 1;
    }
    let message_len = 1 + k + n;
    let start = HEADROOM - (5 + 1 + k);
    let mut at = start;
    buf[at] = 0;
    buf[at + 1..at + 5].copy_from_slice(&(message_len as u32).to_be_bytes());
    at += 5;
    buf[at] = 0x12;
    buf[at + 1..at + 1 + k].copy_from_slice(&varint[..k]);
    Bytes::from(buf).slice(start..)
}

/// The trailers that end a response: `grpc-status` 0, or the error's status and message.
fn trailers(result: Result<(), Status>) -> http::HeaderMap {
    let status = match result {
        Ok(()) => Status::ok(""),
        Err(s) => s,
    };
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value gets here: send the code alone.
        map.insert(
            Status::GRPC_STATUS,
            http::HeaderValue::from(status.code() as i32),
        );
    }
    map
}

/// A response body: ready messages, then what the blocking reader sends, then trailers.
struct ChunkBody {
    ready: std::collections::VecDeque<Bytes>,
    pieces: Option<mpsc::Receiver<Result<Bytes, Status>>>,
    /// Pieces the reader still owes; if its queue closes before, the stream ends with an
    /// error rather than an OK status after a short chunk.
    owed: u64,
    /// The error of a small chunk's read, sent as its trailers.
    failed: Option<Status>,
    done: bool,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(b) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let end = match self.pieces.as_mut() {
            None => match self.failed.take() {
                Some(s) => Err(s),
                None => Ok(()),
            },
            Some(rx) => match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) => {
                    self.owed = self.owed.saturating_sub(1);
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Poll::Ready(Some(Err(s))) => Err(s),
                Poll::Ready(None) if self.owed > 0 => Err(stopped_short()),
                Poll::Ready(None) => Ok(()),
            },
        };
        self.done = true;
        self.pieces = None;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(end)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// `source` as a gRPC response whose data pieces are sent as they were read.
fn response(
    worker: &Arc<Worker>,
    id: ChunkId,
    source: Source,
) -> http::Response<tonic::body::Body> {
    let (ready, pieces, owed, failed) = match source {
        Source::Whole(header, pieces, failed) => {
            let mut ready = std::collections::VecDeque::new();
            ready.push_back(grpc_message(&header_message(header)));
            if failed.is_none() {
                ready.extend(pieces.into_iter().map(|b| grpc_message(&data_message(b))));
            }
            (ready, None, 0, failed)
        }
        Source::File { file, header, slot } => {
            let ready =
                std::collections::VecDeque::from([grpc_message(&header_message(header.clone()))]);
            let owed = pieces_of(&header);
            let rx = spawn_reader(worker, id, file, header, slot, HEADROOM, frame_piece);
            (ready, Some(rx), owed, None)
        }
    };
    let body = ChunkBody {
        ready,
        pieces,
        owed,
        failed,
        done: false,
    };
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Serves one `ReadChunk` call from its HTTP request.
async fn serve(
    worker: Arc<Worker>,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    // Where tonic's `Request::remote_addr` looks, plaintext or TLS.
    let ext = req.extensions();
    let peer = ext
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.to_string())
        .unwrap_or_default();
    let request = match decode_request(req.into_body()).await {
        Ok(r) => r,
        Err(s) => return s.into_http(),
    };
    match open(&worker, &request, &peer).await {
        Ok((id, source)) => response(&worker, id, source),
        Err(s) => s.into_http(),
    }
}

/// The one message of a `ReadChunk` request body, held to [`MAX_REQUEST`].
async fn decode_request(body: tonic::body::Body) -> Result<ReadChunkRequest, Status> {
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(body, MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Status::resource_exhausted(format!(
                    "a ReadChunk request is at most {MAX_REQUEST} bytes"
                ))
            } else {
                Status::cancelled(format!("request body failed: {e}"))
            }
        })?
        .to_bytes();
    let bad = |why: &str| {
        Err(Status::invalid_argument(format!(
            "bad ReadChunk request: {why}"
        )))
    };
    if bytes.len() < 5 {
        return bad("shorter than a gRPC message prefix");
    }
    if bytes[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not supported",
        ));
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if bytes.len() != 5 + len {
        return bad("the body is not exactly one message");
    }
    ReadChunkRequest::decode(bytes.slice(5..))
        .map_err(|e| Status::invalid_argument(format!("bad ReadChunk request: {e}")))
}

/// Serves `ReadChunk` zero-copy in front of the tonic worker service `S`, which answers
/// every other call (see the module comment).
#[derive(Clone)]
pub struct ZeroCopyReads<S> {
    worker: Arc<Worker>,
    inner: S,
}

impl<S> ZeroCopyReads<S> {
    pub fn new(worker: Arc<Worker>, inner: S) -> Self {
        ZeroCopyReads { worker, inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ZeroCopyReads<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for ZeroCopyReads<S>
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
    type Future = Pin<Box<dyn std::future::Future<Output = HttpResult> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == READ_CHUNK_PATH && req.method() == http::Method::POST {
            let worker = self.worker.clone();
            return Box::pin(async move { Ok(serve(worker, req).await) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A framed piece decodes as tonic's encoding of the same message would, at every size
    /// that changes the varint's length.
    #[test]
    fn framed_pieces_are_the_messages_prost_encodes() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut buf = vec![0u8; HEADROOM];
            buf.extend_from_slice(&data);
            let framed = frame_piece(buf);
            let expected = grpc_message(&data_message(Bytes::from(data.clone())));
            assert_eq!(framed, expected, "piece of {n} bytes");
        }
    }

    #[test]
    fn trailers_carry_the_status() {
        let ok = trailers(Ok(()));
        assert_eq!(ok.get("grpc-status").unwrap(), "0");
        let bad = trailers(Err(Status::data_loss("checksum mismatch")));
        assert_eq!(bad.get("grpc-status").unwrap(), "15");
        let back = Status::from_header_map(&bad).unwrap();
        assert_eq!(back.code(), tonic::Code::DataLoss);
        assert_eq!(back.message(), "checksum mismatch");
    }
}
