//! The `dfs.v1.Master` gRPC service: a thin layer that logs each request and maps errors.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Master, MasterError};
use crate::rpc::pb::{self, master_server::MasterServer};
use crate::rpc::{MAX_GRPC_MESSAGE, now_unix_ms};

/// The service object handed to tonic.
pub struct MasterService {
    master: Arc<Master>,
    stop: watch::Receiver<bool>,
}

impl MasterService {
    pub fn new(master: Arc<Master>, stop: watch::Receiver<bool>) -> Self {
        MasterService { master, stop }
    }

    /// The tonic server, accepting requests of at most `max_message` bytes.
    pub fn into_server(self, max_message: usize) -> MasterServer<MasterService> {
        MasterServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(MAX_GRPC_MESSAGE)
    }

    /// `CommitUploads`, or with `prepare` `PrepareUploads`.
    async fn commit_many(
        &self,
        op: &'static str,
        req: Request<pb::CommitUploadsRequest>,
        prepare: bool,
    ) -> Result<Response<pb::CommitUploadsResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let n = r.commits.len();
        if n > MAX_BATCH {
            return finish(op, &p, "", t, Err(too_many("commits", n)));
        }
        let confirms = r.confirm_upload_ids.len();
        if !prepare && confirms > 0 {
            let e =
                MasterError::InvalidArgument("confirm_upload_ids belong in PrepareUploads".into());
            return finish(op, &p, "", t, Err(e));
        }
        if confirms > MAX_BATCH {
            return finish(op, &p, "", t, Err(too_many("confirmations", confirms)));
        }
        let ids: Vec<String> = r.commits.iter().map(|c| c.upload_id.clone()).collect();
        let answers = match prepare {
            true => {
                self.master
                    .prepare_uploads(r.commits, r.confirm_upload_ids)
                    .await
            }
            false => self.master.commit_many(r.commits, false).await,
        };
        let results = answers
            .into_iter()
            .zip(&ids)
            .map(|(a, id)| match a {
                Ok(commit) => pb::CommitUploadResult {
                    commit: Some(commit),
                    ..Default::default()
                },
                Err(e) => {
                    let (code, message) = item_error("commit_upload", &p, id, e);
                    pb::CommitUploadResult {
                        commit: None,
                        code,
                        message,
                    }
                }
            })
            .collect();
        let res = Ok(pb::CommitUploadsResponse { results });
        finish(
            op,
            &p,
            &format!("{n} commits, {confirms} confirmations"),
            t,
            res,
        )
    }
}

fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into())
}

/// A worker token names its worker: it may register and heartbeat for that address only, so
/// a token taken from one worker cannot impersonate another.
fn own_address<T>(req: &Request<T>, address: &str) -> Result<(), Status> {
    let caller = crate::security::guard::Caller::of(req);
    if caller.kind == Some(crate::security::TokenKind::Worker) && caller.subject != address {
        tracing::warn!(peer = %peer(req), token_for = %caller.subject, claimed = %address, "worker token used for another address");
        return Err(Status::permission_denied(format!(
            "this worker token is for {}, not {address}",
            caller.subject
        )));
    }
    Ok(())
}

/// Most items one batched call (GetFiles, StartUploads, CommitUploads) may carry.
pub const MAX_BATCH: usize = 1024;

/// The error of a batched call that carries more than [`MAX_BATCH`] items.
fn too_many(what: &str, n: usize) -> MasterError {
    MasterError::InvalidArgument(format!("at most {MAX_BATCH} {what} per call, not {n}"))
}

/// One refused item of a batched call: logged as its own call would be, and turned into the
/// code and message of its answer.
fn item_error(op: &'static str, peer: &str, what: &str, e: MasterError) -> (i32, String) {
    tracing::warn!(op, %peer, what, outcome = "error", error = %e);
    let s = Status::from(e);
    (s.code() as i32, s.message().to_string())
}

/// One item of a batched answer: the file, or the status its own call would have had
/// (logged as that call's would be, see [`item_error`]).
fn file_result(
    op: &'static str,
    peer: &str,
    name: &str,
    r: Result<pb::FileInfo, MasterError>,
) -> pb::GetFileResult {
    match r {
        Ok(f) => pb::GetFileResult {
            file: Some(f),
            ..Default::default()
        },
        Err(e) => {
            let (code, message) = item_error(op, peer, name, e);
            pb::GetFileResult {
                file: None,
                code,
                message,
            }
        }
    }
}

/// Logs the outcome of a request with its duration and converts the error.
fn finish<T>(
    op: &'static str,
    peer: &str,
    what: &str,
    started: Instant,
    r: Result<T, MasterError>,
) -> Result<Response<T>, Status> {
    let ms = crate::rpc::elapsed_ms(started);
    // Periodic worker traffic is debug; everything a user does is logged at info.
    let routine = matches!(op, "heartbeat" | "renew_upload");
    match r {
        Ok(v) if routine => {
            tracing::debug!(op, %peer, what, ms, outcome = "ok");
            Ok(Response::new(v))
        }
        Ok(v) => {
            tracing::info!(op, %peer, what, ms, outcome = "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            tracing::warn!(op, %peer, what, ms, outcome = "error", error = %e);
            Err(e.into())
        }
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::master_server::Master for MasterService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        own_address(&req, &req.get_ref().address)?;
        let r = req.into_inner();
        let addr = r.address.clone();
        finish("register", &p, &addr, t, self.master.register(r).await)
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        own_address(&req, &req.get_ref().address)?;
        let r = req.into_inner();
        let addr = r.address.clone();
        finish("heartbeat", &p, &addr, t, self.master.heartbeat(r).await)
    }

    async fn start_upload(
        &self,
        req: Request<pb::StartUploadRequest>,
    ) -> Result<Response<pb::StartUploadResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let caller = crate::security::guard::Caller::of(&req);
        let r = req.into_inner();
        let name = r.name.clone();
        let res = self.master.start_upload(r, &caller.subject).await;
        finish("start_upload", &p, &name, t, res)
    }

    async fn start_uploads(
        &self,
        req: Request<pb::StartUploadsRequest>,
    ) -> Result<Response<pb::StartUploadsResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let caller = crate::security::guard::Caller::of(&req);
        let r = req.into_inner();
        let n = r.uploads.len();
        if n > MAX_BATCH {
            return finish("start_uploads", &p, "", t, Err(too_many("uploads", n)));
        }
        let mut results = Vec::with_capacity(n);
        for u in r.uploads {
            let name = u.name.clone();
            results.push(match self.master.start_upload(u, &caller.subject).await {
                Ok(upload) => pb::StartUploadResult {
                    upload: Some(upload),
                    ..Default::default()
                },
                Err(e) => {
                    let (code, message) = item_error("start_upload", &p, &name, e);
                    pb::StartUploadResult {
                        upload: None,
                        code,
                        message,
                    }
                }
            });
        }
        let what = format!("{n} uploads");
        let res = Ok(pb::StartUploadsResponse { results });
        finish("start_uploads", &p, &what, t, res)
    }

    async fn reserve_uploads(
        &self,
        req: Request<pb::ReserveUploadsRequest>,
    ) -> Result<Response<pb::ReserveUploadsResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let caller = crate::security::guard::Caller::of(&req);
        let r = req.into_inner();
        let n = r.count as usize;
        if n > MAX_BATCH {
            return finish("reserve_uploads", &p, "", t, Err(too_many("uploads", n)));
        }
        let res = self.master.reserve_uploads(r, &caller.subject);
        finish("reserve_uploads", &p, &format!("{n} uploads"), t, res)
    }

    async fn allocate_chunk(
        &self,
        req: Request<pb::AllocateChunkRequest>,
    ) -> Result<Response<pb::AllocateChunkResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let id = r.upload_id.clone();
        finish(
            "allocate_chunk",
            &p,
            &id,
            t,
            self.master.allocate_chunk(r).await,
        )
    }

    async fn commit_upload(
        &self,
        req: Request<pb::CommitUploadRequest>,
    ) -> Result<Response<pb::CommitUploadResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let id = r.upload_id.clone();
        finish(
            "commit_upload",
            &p,
            &id,
            t,
            self.master.commit_upload(r).await,
        )
    }

    async fn commit_uploads(
        &self,
        req: Request<pb::CommitUploadsRequest>,
    ) -> Result<Response<pb::CommitUploadsResponse>, Status> {
        self.commit_many("commit_uploads", req, false).await
    }

    async fn prepare_uploads(
        &self,
        req: Request<pb::CommitUploadsRequest>,
    ) -> Result<Response<pb::CommitUploadsResponse>, Status> {
        self.commit_many("prepare_uploads", req, true).await
    }

    async fn renew_upload(
        &self,
        req: Request<pb::RenewUploadRequest>,
    ) -> Result<Response<pb::RenewUploadResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .renew_upload(&r.upload_id)
            .map(|()| pb::RenewUploadResponse {});
        finish("renew_upload", &p, &r.upload_id, t, res)
    }

    async fn abort_upload(
        &self,
        req: Request<pb::AbortUploadRequest>,
    ) -> Result<Response<pb::AbortUploadResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .abort_upload(&r.upload_id)
            .await
            .map(|()| pb::AbortUploadResponse {});
        finish("abort_upload", &p, &r.upload_id, t, res)
    }

    async fn get_file(
        &self,
        req: Request<pb::GetFileRequest>,
    ) -> Result<Response<pb::GetFileResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .get_file(&r.name)
            .await
            .map(|f| pb::GetFileResponse { file: Some(f) });
        finish("get_file", &p, &r.name, t, res)
    }

    async fn get_files(
        &self,
        req: Request<pb::GetFilesRequest>,
    ) -> Result<Response<pb::GetFilesResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        if r.names.len() > MAX_BATCH {
            return finish(
                "get_files",
                &p,
                "",
                t,
                Err(too_many("names", r.names.len())),
            );
        }
        let mut results = Vec::with_capacity(r.names.len());
        for name in &r.names {
            let r = self.master.get_file(name).await;
            results.push(file_result("get_file", &p, name, r));
        }
        let what = format!("{} names", r.names.len());
        finish(
            "get_files",
            &p,
            &what,
            t,
            Ok(pb::GetFilesResponse { results }),
        )
    }

    async fn list_files(
        &self,
        req: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self.master.list_files(r.start_after, r.limit).await;
        finish("list_files", &p, "", t, res)
    }

    async fn delete_file(
        &self,
        req: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .delete_file(&r.name, &r.call_id)
            .await
            .map(|f| pb::DeleteFileResponse { file: Some(f) });
        finish("delete_file", &p, &r.name, t, res)
    }

    async fn create_empty(
        &self,
        req: Request<pb::CreateEmptyRequest>,
    ) -> Result<Response<pb::CreateEmptyResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let what = format!("{} name(s)", r.names.len());
        let res = self
            .master
            .create_empty(r.names)
            .await
            .map(|created| pb::CreateEmptyResponse { created });
        finish("create_empty", &p, &what, t, res)
    }

    async fn delete_many(
        &self,
        req: Request<pb::DeleteManyRequest>,
    ) -> Result<Response<pb::DeleteManyResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let what = format!("{} name(s)", r.names.len());
        let res = self
            .master
            .delete_many(r.names)
            .await
            .map(|deleted| pb::DeleteManyResponse { deleted });
        finish("delete_many", &p, &what, t, res)
    }

    async fn delete_files(
        &self,
        req: Request<pb::DeleteFilesRequest>,
    ) -> Result<Response<pb::DeleteFilesResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        if r.names.len() > MAX_BATCH {
            let e = Err(too_many("names", r.names.len()));
            return finish("delete_files", &p, "", t, e);
        }
        if !r.call_ids.is_empty() && r.call_ids.len() != r.names.len() {
            let e = Err(MasterError::InvalidArgument(format!(
                "{} call ids for {} names: give one per name, or none",
                r.call_ids.len(),
                r.names.len()
            )));
            return finish("delete_files", &p, "", t, e);
        }
        let what = format!("{} names", r.names.len());
        let answers = self.master.delete_files(r.names.clone(), r.call_ids).await;
        let results = r
            .names
            .iter()
            .zip(answers)
            .map(|(name, a)| file_result("delete_file", &p, name, a))
            .collect();
        finish(
            "delete_files",
            &p,
            &what,
            t,
            Ok(pb::DeleteFilesResponse { results }),
        )
    }

    async fn report_bad_replica(
        &self,
        req: Request<pb::ReportBadReplicaRequest>,
    ) -> Result<Response<pb::ReportBadReplicaResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .report_bad_replica(&r)
            .map(|()| pb::ReportBadReplicaResponse {});
        finish("report_bad_replica", &p, &r.chunk_id, t, res)
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.master.cluster_status()))
    }

    async fn set_draining(
        &self,
        req: Request<pb::SetDrainingRequest>,
    ) -> Result<Response<pb::SetDrainingResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self
            .master
            .set_draining(&r.worker, r.draining)
            .await
            .map(|w| pb::SetDrainingResponse { worker: Some(w) });
        finish("set_draining", &p, &r.worker, t, res)
    }

    async fn drain_plan(
        &self,
        req: Request<pb::DrainPlanRequest>,
    ) -> Result<Response<pb::DrainPlanResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let r = req.into_inner();
        let res = self.master.drain_plan(&r.worker).await;
        finish("drain_plan", &p, &r.worker, t, res)
    }

    async fn fsck(
        &self,
        req: Request<pb::FsckRequest>,
    ) -> Result<Response<pb::FsckResponse>, Status> {
        let (t, p) = (Instant::now(), peer(&req));
        let res = self.master.fsck().await;
        finish("fsck", &p, "", t, res)
    }

    async fn gc_status(
        &self,
        _req: Request<pb::GcStatusRequest>,
    ) -> Result<Response<pb::GcStatusResponse>, Status> {
        Ok(Response::new(self.master.gc_status()))
    }

    async fn process_stats(
        &self,
        req: Request<pb::ProcessStatsRequest>,
    ) -> Result<Response<pb::ProcessStats>, Status> {
        Ok(crate::procstat::answer(req))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let backlog = match req.get_ref().backlog {
            0 => 200,
            n => n as usize,
        };
        let (past, mut live) = self.master.events.subscribe(backlog);
        let (tx, rx) = mpsc::channel(256);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut last_seq = 0;
            for ev in past {
                last_seq = ev.seq;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let ev = tokio::select! {
                    _ = stop.changed() => return,
                    _ = tx.closed() => return,
                    ev = live.recv() => ev,
                };
                let ev = match ev {
                    Ok(ev) if ev.seq <= last_seq => continue,
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => pb::LogEvent {
                        unix_ms: now_unix_ms(),
                        level: "WARN".into(),
                        message: format!("{n} event(s) dropped: this reader fell behind"),
                        seq: last_seq,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                last_seq = last_seq.max(ev.seq);
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
