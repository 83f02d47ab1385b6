//! The calls a client batches (see [`super::batch`]): to the master, lookups (`stat`, and the
//! first step of every read), upload starts, upload commits and deletes; to each worker, the
//! writes and reads of small chunks.

use std::future::Future;

use tonic::Status;

use super::batch::{Batched, Batcher, item};
use crate::master::service::MAX_BATCH;
use crate::rpc::pb::{self, FileInfo, write_chunk_request};
use crate::rpc::{MasterRpc, WorkerRpc};
use crate::worker::service::MAX_SMALL_BATCH;

/// `GetFile`, batched as `GetFiles`.
pub(crate) struct Lookups(pub(crate) MasterRpc);
/// `StartUpload`, batched as `StartUploads`.
pub(crate) struct Starts(pub(crate) MasterRpc);
/// `CommitUpload`, batched as `CommitUploads`.
pub(crate) struct Commits(pub(crate) MasterRpc);
/// A reserved upload's commit sent beside its writes: `PrepareUploads` (which has no
/// single-call form; one request goes as a batch of one). Each call carries the
/// confirmations waiting (see `super::confirm`).
pub(crate) struct Prepares(
    pub(crate) MasterRpc,
    pub(crate) std::sync::Arc<super::confirm::Confirmations>,
);
/// `DeleteFile`, batched as `DeleteFiles`.
pub(crate) struct Deletes(pub(crate) MasterRpc);

/// The client's batching tasks to the master.
#[derive(Clone)]
pub(crate) struct MasterBatches {
    pub(crate) lookups: Batcher<Lookups>,
    pub(crate) starts: Batcher<Starts>,
    pub(crate) commits: Batcher<Commits>,
    pub(crate) prepares: Batcher<Prepares>,
    pub(crate) deletes: Batcher<Deletes>,
}

impl MasterBatches {
    /// Starts the batching tasks on the current runtime.
    pub(crate) fn start(
        master: &MasterRpc,
        confirmations: &std::sync::Arc<super::confirm::Confirmations>,
    ) -> MasterBatches {
        MasterBatches {
            lookups: Batcher::start(Lookups(master.clone())),
            starts: Batcher::start(Starts(master.clone())),
            commits: Batcher::start(Commits(master.clone())),
            prepares: Batcher::start(Prepares(master.clone(), confirmations.clone())),
            deletes: Batcher::start(Deletes(master.clone())),
        }
    }
}

/// The file of a single call's answer.
fn the_file(file: Option<FileInfo>) -> Result<FileInfo, Status> {
    file.ok_or_else(|| Status::internal("master answered without a file"))
}

/// The items of a batched answer that holds files.
fn file_results(results: Vec<pb::GetFileResult>) -> Vec<Result<FileInfo, Status>> {
    results
        .into_iter()
        .map(|r| item(r.file, r.code, r.message))
        .collect()
}

impl Batched for Lookups {
    type Req = String;
    type Resp = FileInfo;
    const MAX: usize = MAX_BATCH;

    fn one(&self, name: String) -> impl Future<Output = Result<FileInfo, Status>> + Send {
        let mut m = self.0.clone();
        async move {
            the_file(
                m.get_file(pb::GetFileRequest { name })
                    .await?
                    .into_inner()
                    .file,
            )
        }
    }

    fn many(
        &self,
        names: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Result<FileInfo, Status>>, Status>> + Send {
        let mut m = self.0.clone();
        async move {
            Ok(file_results(
                m.get_files(pb::GetFilesRequest { names })
                    .await?
                    .into_inner()
                    .results,
            ))
        }
    }
}

impl Batched for Deletes {
    /// A name and the call's id, which its repeat carries too (see `Client::delete`).
    type Req = (String, String);
    type Resp = FileInfo;
    const MAX: usize = MAX_BATCH;

    fn one(
        &self,
        (name, call_id): (String, String),
    ) -> impl Future<Output = Result<FileInfo, Status>> + Send {
        let mut m = self.0.clone();
        async move {
            the_file(
                m.delete_file(pb::DeleteFileRequest { name, call_id })
                    .await?
                    .into_inner()
                    .file,
            )
        }
    }

    fn many(
        &self,
        deletes: Vec<(String, String)>,
    ) -> impl Future<Output = Result<Vec<Result<FileInfo, Status>>, Status>> + Send {
        let mut m = self.0.clone();
        let (names, call_ids) = deletes.into_iter().unzip();
        async move {
            Ok(file_results(
                m.delete_files(pb::DeleteFilesRequest { names, call_ids })
                    .await?
                    .into_inner()
                    .results,
            ))
        }
    }
}

impl Batched for Starts {
    type Req = pb::StartUploadRequest;
    type Resp = pb::StartUploadResponse;
    const MAX: usize = MAX_BATCH;

    fn one(
        &self,
        req: pb::StartUploadRequest,
    ) -> impl Future<Output = Result<pb::StartUploadResponse, Status>> + Send {
        let mut m = self.0.clone();
        async move { Ok(m.start_upload(req).await?.into_inner()) }
    }

    fn many(
        &self,
        uploads: Vec<pb::StartUploadRequest>,
    ) -> impl Future<Output = Result<Vec<Result<pb::StartUploadResponse, Status>>, Status>> + Send
    {
        let mut m = self.0.clone();
        async move {
            let resp = m.start_uploads(pb::StartUploadsRequest { uploads }).await?;
            Ok(resp
                .into_inner()
                .results
                .into_iter()
                .map(|r| item(r.upload, r.code, r.message))
                .collect())
        }
    }
}

impl Batched for Commits {
    type Req = pb::CommitUploadRequest;
    type Resp = pb::CommitUploadResponse;
    const MAX: usize = MAX_BATCH;

    fn one(
        &self,
        req: pb::CommitUploadRequest,
    ) -> impl Future<Output = Result<pb::CommitUploadResponse, Status>> + Send {
        let mut m = self.0.clone();
        async move { Ok(m.commit_upload(req).await?.into_inner()) }
    }

    fn many(
        &self,
        commits: Vec<pb::CommitUploadRequest>,
    ) -> impl Future<Output = Result<Vec<Result<pb::CommitUploadResponse, Status>>, Status>> + Send
    {
        let mut m = self.0.clone();
        async move {
            let resp = m
                .commit_uploads(pb::CommitUploadsRequest {
                    commits,
                    confirm_upload_ids: Vec::new(),
                })
                .await?;
            Ok(commit_results(resp.into_inner().results))
        }
    }
}

/// The answers of a batch of commits (or prepares).
fn commit_results(
    results: Vec<pb::CommitUploadResult>,
) -> Vec<Result<pb::CommitUploadResponse, Status>> {
    results
        .into_iter()
        .map(|r| item(r.commit, r.code, r.message))
        .collect()
}

impl Batched for Prepares {
    type Req = pb::CommitUploadRequest;
    type Resp = pb::CommitUploadResponse;
    const MAX: usize = MAX_BATCH;

    fn one(
        &self,
        req: pb::CommitUploadRequest,
    ) -> impl Future<Output = Result<pb::CommitUploadResponse, Status>> + Send {
        let many = self.many(vec![req]);
        async move {
            many.await?
                .pop()
                .unwrap_or_else(|| Err(Status::internal("master answered no prepare")))
        }
    }

    fn many(
        &self,
        commits: Vec<pb::CommitUploadRequest>,
    ) -> impl Future<Output = Result<Vec<Result<pb::CommitUploadResponse, Status>>, Status>> + Send
    {
        let mut m = self.0.clone();
        let confirms = self.1.take();
        async move {
            let resp = m
                .prepare_uploads(pb::CommitUploadsRequest {
                    commits,
                    confirm_upload_ids: confirms.ids.clone(),
                })
                .await;
            drop(confirms);
            Ok(commit_results(resp?.into_inner().results))
        }
    }
}

/// A small chunk's write to one worker (no forwarding), batched as `WriteSmallChunks`.
pub(crate) struct SmallWrites(pub(crate) WorkerRpc);

/// The bytes one `WriteSmallChunks` call may carry: half of a worker's default message limit.
const SMALL_WRITE_BUDGET: usize = 2 << 20;

/// A call to a worker that does not answer in time fails rather than holding its batch.
async fn within<T>(
    limit: std::time::Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "no answer within {}s",
            limit.as_secs()
        )))
    })
}

impl Batched for SmallWrites {
    type Req = pb::SmallChunk;
    type Resp = ();
    const MAX: usize = MAX_SMALL_BATCH;
    const BUDGET: usize = SMALL_WRITE_BUDGET;

    fn cost(c: &pb::SmallChunk) -> usize {
        // The data, and a generous allowance for the header and token around it.
        c.data.len() + 1024
    }

    fn one(&self, c: pb::SmallChunk) -> impl Future<Output = Result<(), Status>> + Send {
        let mut w = self.0.clone();
        let limit = crate::rpc::transfer_limit(c.data.len() as u64);
        let messages = [
            write_chunk_request::Msg::Start(pb::WriteStart {
                header: c.header,
                downstream: Vec::new(),
                token: c.token,
            }),
            write_chunk_request::Msg::Data(c.data),
            write_chunk_request::Msg::Finish(pb::WriteFinish { crc32c: c.crc32c }),
        ]
        .map(|m| pb::WriteChunkRequest { msg: Some(m) });
        async move {
            within(limit, w.write_chunk(tokio_stream::iter(messages)))
                .await
                .map(|_| ())
        }
    }

    fn many(
        &self,
        chunks: Vec<pb::SmallChunk>,
    ) -> impl Future<Output = Result<Vec<Result<(), Status>>, Status>> + Send {
        let mut w = self.0.clone();
        let bytes = chunks.iter().map(|c| c.data.len() as u64).sum();
        let limit = crate::rpc::transfer_limit(bytes);
        async move {
            let resp = within(
                limit,
                w.write_small_chunks(pb::WriteSmallChunksRequest { chunks }),
            )
            .await?;
            Ok(resp
                .into_inner()
                .results
                .into_iter()
                .map(|r| item(r.stored.then_some(()), r.code, r.message))
                .collect())
        }
    }
}

/// A small chunk's read from one worker, batched as `ReadSmallChunks`.
pub(crate) struct SmallReads(pub(crate) WorkerRpc);

/// One small chunk to read, and its expected length (what its answer weighs).
#[derive(Clone)]
pub(crate) struct SmallRead {
    pub(crate) req: pb::ReadChunkRequest,
    pub(crate) length: u64,
}

impl Batched for SmallReads {
    type Req = SmallRead;
    /// The chunk's header as the worker stores it, and its bytes (checked by the caller).
    type Resp = (pb::ChunkHeader, bytes::Bytes);
    const MAX: usize = MAX_SMALL_BATCH;
    const BUDGET: usize = SMALL_WRITE_BUDGET;

    fn cost(r: &SmallRead) -> usize {
        r.length as usize + 1024
    }

    fn one(
        &self,
        r: SmallRead,
    ) -> impl Future<Output = Result<(pb::ChunkHeader, bytes::Bytes), Status>> + Send {
        let mut w = self.0.clone();
        let limit = crate::rpc::transfer_limit(r.length);
        let read = async move {
            let mut stream = w.read_chunk(r.req).await?.into_inner();
            let mut header = None;
            let mut data = bytes::BytesMut::new();
            while let Some(m) = stream.message().await? {
                match m.msg {
                    Some(pb::read_chunk_response::Msg::Header(h)) => header = Some(h),
                    Some(pb::read_chunk_response::Msg::Data(b)) => {
                        // A replica sending more than it should is cut off here; the
                        // caller checks the length exactly.
                        if data.len() as u64 + b.len() as u64 > r.length {
                            return Err(Status::data_loss(
                                "replica sent more bytes than the chunk holds",
                            ));
                        }
                        data.extend_from_slice(&b);
                    }
                    None => {}
                }
            }
            let header = header.ok_or_else(|| Status::unknown("the replica sent no header"))?;
            Ok((header, data.freeze()))
        };
        within(limit, read)
    }

    fn many(
        &self,
        reads: Vec<SmallRead>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Resp, Status>>, Status>> + Send {
        let mut w = self.0.clone();
        let limit = crate::rpc::transfer_limit(reads.iter().map(|r| r.length).sum());
        let chunks = reads.into_iter().map(|r| r.req).collect();
        async move {
            let resp = within(
                limit,
                w.read_small_chunks(pb::ReadSmallChunksRequest { chunks }),
            )
            .await?;
            Ok(resp
                .into_inner()
                .results
                .into_iter()
                .map(|r| {
                    let data = r.data;
                    item(r.header, r.code, r.message).map(|h| (h, data))
                })
                .collect())
        }
    }
}
