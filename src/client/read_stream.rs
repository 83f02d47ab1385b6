//! `ReadChunk` responses taken straight from their HTTP/2 frames.
//!
//! tonic's response stream copies every DATA frame into a decode buffer before it decodes a
//! message, which on a download is a memmove of every byte on the async thread. This reader
//! calls the method over the same channel, parses the gRPC framing itself and hands a data
//! message on as slices of the frames it arrived in: the bytes are never copied in user
//! space between the socket and the checksum. Any well-formed encoding is accepted (a
//! message that is not one plain `data` field is decoded by prost as usual), and every limit
//! tonic would apply holds: message size, compression, a status in the trailers.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tonic::transport::Channel;

use crate::rpc::pb::{ChunkHeader, ReadChunkRequest, ReadChunkResponse, read_chunk_response};

/// Largest message accepted, as the generated clients' decoding limit.
const MAX_MESSAGE: usize = crate::rpc::MAX_GRPC_MESSAGE;

/// One message of a `ReadChunk` response.
pub(crate) enum Piece {
    Header(ChunkHeader),
    /// Data, as the frames it came in (usually a few slices).
    Data(Vec<Bytes>),
}

/// An open `ReadChunk` response.
pub(crate) struct ReadStream {
    body: tonic::body::Body,
    /// Received bytes not yet taken, frame by frame.
    frames: VecDeque<Bytes>,
    buffered: usize,
    /// The trailers said OK: nothing more will come.
    finished: bool,
}

/// Calls `ReadChunk` on `channel` and returns its response once the headers are in (or the
/// status the call ended with at once, such as NotFound or PermissionDenied).
pub(crate) async fn read_chunk(
    channel: &Channel,
    req: &ReadChunkRequest,
) -> Result<ReadStream, Status> {
    use tower_service::Service;
    let mut body = Vec::with_capacity(5 + req.encoded_len());
    body.push(0);
    body.extend_from_slice(&(req.encoded_len() as u32).to_be_bytes());
    // Encoding into a Vec with room reserved cannot fail.
    let _ = req.encode(&mut body);
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri("/dfs.v1.Worker/ReadChunk")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(body),
        )))
        .map_err(|e| Status::internal(format!("cannot build the request: {e}")))?;
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(transport_status)?;
    let resp = channel.call(request).await.map_err(transport_status)?;
    if resp.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "worker answered HTTP {}",
            resp.status()
        )));
    }
    // A call that fails at once answers with its status in the headers and no body.
    if let Some(s) = status_of(resp.headers()) {
        return Err(if s.code() == tonic::Code::Ok {
            Status::internal("ReadChunk ended before its header")
        } else {
            s
        });
    }
    Ok(ReadStream {
        body: resp.into_body(),
        frames: VecDeque::new(),
        buffered: 0,
        finished: false,
    })
}

/// The status in `headers`, if they hold one. The binary details header is dropped first:
/// tonic's parser panics on a malformed one, and these headers come from the network.
fn status_of(headers: &http::HeaderMap) -> Option<Status> {
    headers.get(Status::GRPC_STATUS)?;
    let mut h = headers.clone();
    h.remove(Status::GRPC_STATUS_DETAILS);
    Status::from_header_map(&h)
}

/// A transport failure as the status tonic's own client would report, its message naming
/// the cause (tonic's own says only "transport error").
fn transport_status(e: tonic::transport::Error) -> Status {
    let mut s = Status::unavailable(format!("worker unreachable: {}", super::error_chain(&e)));
    s.set_source(std::sync::Arc::new(e));
    s
}

impl ReadStream {
    /// The next message, `None` once the response ended with an OK status.
    pub(crate) async fn message(&mut self) -> Result<Option<Piece>, Status> {
        loop {
            if let Some(len) = self.take_prefix()? {
                let mut parts = self.take(len);
                return decode_piece(&mut parts, len).map(Some);
            }
            if self.finished {
                return Ok(None);
            }
            match self.body.frame().await {
                None => {
                    return Err(Status::internal(if self.buffered > 0 {
                        "ReadChunk response ended inside a message"
                    } else {
                        "ReadChunk response ended without a status"
                    }));
                }
                Some(Err(s)) => return Err(s),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            self.buffered += data.len();
                            self.frames.push_back(data);
                        }
                    }
                    Err(frame) => {
                        let Some(trailers) = frame.trailers_ref() else {
                            continue;
                        };
                        match status_of(trailers) {
                            // Whole messages were taken before the body was polled again,
                            // so anything still buffered is a message cut short.
                            Some(s) if s.code() == tonic::Code::Ok && self.buffered > 0 => {
                                return Err(Status::internal(
                                    "ReadChunk response ended inside a message",
                                ));
                            }
                            Some(s) if s.code() == tonic::Code::Ok => self.finished = true,
                            Some(s) => return Err(s),
                            None => {
                                return Err(Status::internal("ReadChunk trailers carry no status"));
                            }
                        }
                    }
                },
            }
        }
    }

    /// Once the next message has arrived whole: takes its 5-byte prefix and returns its
    /// length (checked against the limits). Before that, takes nothing.
    fn take_prefix(&mut self) -> Result<Option<usize>, Status> {
        if self.buffered < 5 {
            return Ok(None);
        }
        let mut prefix = [0u8; 5];
        self.peek(&mut prefix);
        if prefix[0] != 0 {
            return Err(Status::internal(
                "worker sent a compressed message; none was asked for",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(Status::resource_exhausted(format!(
                "worker sent a message of {len} bytes; the limit is {MAX_MESSAGE}"
            )));
        }
        if self.buffered < 5 + len {
            return Ok(None);
        }
        drop(self.take(5));
        Ok(Some(len))
    }

    /// Copies the first `out.len()` buffered bytes into `out` (at most a few, across frames).
    fn peek(&self, out: &mut [u8]) {
        let mut at = 0;
        for f in &self.frames {
            let n = (out.len() - at).min(f.len());
            out[at..at + n].copy_from_slice(&f[..n]);
            at += n;
            if at == out.len() {
                break;
            }
        }
    }

    /// Takes the first `n` buffered bytes as slices of their frames (no copy).
    fn take(&mut self, mut n: usize) -> VecDeque<Bytes> {
        self.buffered -= n;
        let mut out = VecDeque::new();
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                if let Some(f) = self.frames.pop_front() {
                    out.push_back(f);
                }
            } else {
                out.push_back(front.split_to(n));
                n = 0;
            }
        }
        out
    }
}

/// Decodes one message of `len` bytes held in `parts`. The common case, one `data` field
/// (key 0x12, a varint length, the bytes), keeps the frames' slices; anything else is
/// gathered and decoded by prost.
fn decode_piece(parts: &mut VecDeque<Bytes>, len: usize) -> Result<Piece, Status> {
    let mut head = [0u8; 11];
    let k = head.len().min(len);
    {
        let mut at = 0;
        for p in parts.iter() {
            let n = (k - at).min(p.len());
            head[at..at + n].copy_from_slice(&p[..n]);
            at += n;
            if at == k {
                break;
            }
        }
    }
    if k > 1
        && head[0] == 0x12
        && let Some((data_len, used)) = varint(&head[1..k])
        && 1 + used + data_len as usize == len
    {
        skip(parts, 1 + used);
        return Ok(Piece::Data(parts.drain(..).collect()));
    }
    let mut whole = Vec::with_capacity(len);
    for p in parts.drain(..) {
        whole.extend_from_slice(&p);
    }
    match ReadChunkResponse::decode(&whole[..]) {
        Err(e) => Err(Status::internal(format!("bad ReadChunk message: {e}"))),
        Ok(m) => match m.msg {
            Some(read_chunk_response::Msg::Header(h)) => Ok(Piece::Header(h)),
            Some(read_chunk_response::Msg::Data(d)) => Ok(Piece::Data(vec![d])),
            None => Ok(Piece::Data(Vec::new())),
        },
    }
}

/// A protobuf varint at the start of `b`: its value and how many bytes it took.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Drops the first `n` bytes of `parts`.
fn skip(parts: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = parts.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            parts.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &ReadChunkResponse) -> Vec<u8> {
        m.encode_to_vec()
    }

    /// A message cut at every point decodes to the same piece.
    #[test]
    fn pieces_decode_whatever_the_frame_boundaries() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let m = ReadChunkResponse {
            msg: Some(read_chunk_response::Msg::Data(Bytes::from(data.clone()))),
        };
        let bytes = encoded(&m);
        for cut in 0..=bytes.len() {
            let mut parts: VecDeque<Bytes> = [&bytes[..cut], &bytes[cut..]]
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(Bytes::copy_from_slice)
                .collect();
            match decode_piece(&mut parts, bytes.len()).unwrap() {
                Piece::Data(d) => assert_eq!(d.concat(), data, "cut at {cut}"),
                Piece::Header(_) => panic!("a header at cut {cut}"),
            }
        }
        let h = ReadChunkResponse {
            msg: Some(read_chunk_response::Msg::Header(ChunkHeader {
                length: 42,
                ..Default::default()
            })),
        };
        let bytes = encoded(&h);
        let mut parts = VecDeque::from([Bytes::from(bytes.clone())]);
        match decode_piece(&mut parts, bytes.len()).unwrap() {
            Piece::Header(h) => assert_eq!(h.length, 42),
            Piece::Data(_) => panic!("data instead of the header"),
        }
        // Garbage is an error, never a panic.
        let mut parts = VecDeque::from([Bytes::from_static(&[0x12, 0xff, 0xff])]);
        assert!(decode_piece(&mut parts, 3).is_err());
    }

    #[test]
    fn varints() {
        assert_eq!(varint(&[0]), Some((0, 1)));
        assert_eq!(varint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(varint(&[0x80]), None);
    }
}
