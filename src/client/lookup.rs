//! File lookups (`stat`, and the first step of every read) coalesced into batches.
//!
//! With many files read at once (a training job's data loader, the benchmark's 16 readers),
//! each lookup was its own round trip to the master, and the round trips' per-call cost (an
//! HTTP/2 stream, headers, a task and a wake-up on each side) was a third of the CPU of a
//! small-file read. Here every lookup goes to one task that sends whatever is waiting as one
//! `GetFiles` call (one lookup alone still goes as a plain `GetFile`), as FoundationDB's
//! client batches the read-version requests of concurrent transactions. Only one call is in
//! flight at a time, so a lookup never waits for a timer: the batch is simply what queued
//! while the previous call was out, and a single lookup costs one channel hop more.

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::master::service::MAX_GET_FILES;
use crate::rpc::MasterRpc;
use crate::rpc::pb::{self, FileInfo};

type Reply = oneshot::Sender<Result<FileInfo, Status>>;

/// The handle callers use; the batching task ends when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Lookups {
    tx: mpsc::UnboundedSender<(String, Reply)>,
}

fn stopped() -> Status {
    Status::unavailable("the client's lookup task has stopped")
}

impl Lookups {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(master: MasterRpc) -> Lookups {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(master, rx));
        Lookups { tx }
    }

    /// Looks `name` up, batched with whatever other lookups wait at the same time.
    pub(crate) async fn get(&self, name: &str) -> Result<FileInfo, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((name.to_string(), reply))
            .map_err(|_| stopped())?;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn pump(mut master: MasterRpc, mut rx: mpsc::UnboundedReceiver<(String, Reply)>) {
    let mut batch = Vec::new();
    // An older master without GetFiles: look up one by one.
    let mut batches_work = true;
    while rx.recv_many(&mut batch, MAX_GET_FILES).await > 0 {
        if batch.len() > 1 && batches_work {
            let names = batch.iter().map(|(n, _)| n.clone()).collect();
            match master.get_files(pb::GetFilesRequest { names }).await {
                Ok(resp) => {
                    let mut results = resp.into_inner().results.into_iter();
                    for (_, reply) in batch.drain(..) {
                        let r = match results.next() {
                            Some(pb::GetFileResult { file: Some(f), .. }) => Ok(f),
                            Some(r) => Err(Status::new(r.code.into(), r.message)),
                            None => Err(Status::internal("the master answered fewer lookups")),
                        };
                        let _ = reply.send(r);
                    }
                    continue;
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => batches_work = false,
                Err(s) => {
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(s.clone()));
                    }
                    continue;
                }
            }
        }
        let calls = batch.drain(..).map(|(name, reply)| {
            let mut m = master.clone();
            async move {
                let r = m.get_file(pb::GetFileRequest { name }).await.and_then(|r| {
                    r.into_inner()
                        .file
                        .ok_or_else(|| Status::internal("master answered without a file"))
                });
                let _ = reply.send(r);
            }
        });
        futures::future::join_all(calls).await;
    }
}
