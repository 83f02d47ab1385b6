//! Worker → worker copies ordered by the master's repair loop: the source streams a chunk it
//! holds to the target through the ordinary write path, so the target verifies the checksum
//! before it acknowledges, exactly as for a client's write.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Worker;
use super::error::WorkerError;
use crate::chunk::ChunkId;
use crate::rpc::pb::{WriteChunkRequest, WriteFinish, WriteStart, write_chunk_request};

impl Worker {
    /// Copies chunk `id` to the worker at `target`; returns the bytes copied.
    pub async fn replicate_to(
        self: &std::sync::Arc<Self>,
        id: ChunkId,
        target: &str,
        token: &[u8],
    ) -> Result<u64, WorkerError> {
        if target == self.address {
            return Err(WorkerError::InvalidArgument(
                "cannot replicate a chunk to its own worker".into(),
            ));
        }
        let store = self.store.clone();
        let (mut file, header) = tokio::task::spawn_blocking(move || store.open_read(&id))
            .await
            .map_err(|e| WorkerError::Startup(format!("reader task failed: {e}")))??;
        let length = header.length;
        let expected = header.crc32c;
        let (tx, rx) = mpsc::channel::<WriteChunkRequest>(4);
        let start = WriteChunkRequest {
            msg: Some(write_chunk_request::Msg::Start(WriteStart {
                header: Some(header),
                downstream: Vec::new(),
                token: bytes::Bytes::copy_from_slice(token),
            })),
        };
        let me = self.clone();
        // Reader: verify while sending; a bad copy is quarantined and never finished, so the
        // target discards what it got.
        let reader = tokio::task::spawn_blocking(move || -> Result<(), WorkerError> {
            if tx.blocking_send(start).is_err() {
                return Ok(());
            }
            let pieces = super::Pieces {
                size: crate::rpc::WRITE_DATA_MESSAGE,
                headroom: 0,
            };
            let sent = me.read_verified_framed(&id, &mut file, length, expected, pieces, |b| {
                tx.blocking_send(WriteChunkRequest {
                    msg: Some(write_chunk_request::Msg::Data(b.into())),
                })
                .is_ok()
            })?;
            if let Some(crc) = sent {
                let _ = tx.blocking_send(WriteChunkRequest {
                    msg: Some(write_chunk_request::Msg::Finish(WriteFinish {
                        crc32c: crc,
                    })),
                });
            }
            Ok(())
        });
        let mut client = self
            .worker_client(target)
            .map_err(|e| WorkerError::Downstream {
                worker: target.to_string(),
                code: tonic::Code::Unavailable,
                message: e.to_string(),
            })?;
        let limit = crate::rpc::transfer_limit(length);
        let call = tokio::time::timeout(limit, client.write_chunk(ReceiverStream::new(rx))).await;
        reader
            .await
            .map_err(|e| WorkerError::Startup(format!("reader task failed: {e}")))??;
        match call {
            Err(_) => Err(WorkerError::Downstream {
                worker: target.to_string(),
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {}s", limit.as_secs()),
            }),
            Ok(Err(s)) => Err(WorkerError::Downstream {
                worker: target.to_string(),
                code: s.code(),
                message: s.message().to_string(),
            }),
            Ok(Ok(_)) => {
                tracing::info!(op = "replicate", chunk = %id, %target, bytes = length, outcome = "ok");
                Ok(length)
            }
        }
    }
}
