//! Registration with the master, heartbeats, and carrying out deletion orders.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Worker;
use crate::chunk::ChunkId;
use crate::rpc::pb::{HeartbeatRequest, RegisterRequest};

/// Stored chunks reported in one heartbeat (~1.7 MiB); more wait for the next.
const RECEIVED_PER_HEARTBEAT: usize = 50_000;

/// Registers (with a full chunk report) and then heartbeats until `stop`; re-registers when
/// the master asks (it restarted) and keeps retrying, quietly, while it is unreachable.
pub async fn run(worker: Arc<Worker>, mut stop: watch::Receiver<bool>) {
    let mut client = match worker.transport.control_channel(&worker.master) {
        Ok(ch) => worker.transport.master(ch),
        Err(e) => {
            tracing::error!(master = %worker.master, error = %e, "invalid master address; not registering");
            return;
        }
    };
    let mut registered = false;
    let mut acks: Vec<String> = Vec::new();
    // Deletions run beside the heartbeats: a batch of unlinks and its fsync took seconds on
    // a disk busy with uploads, and done inline it held back the next heartbeat so long
    // that the master found every worker suspect at once (they get their orders together)
    // and failed the uploads it could no longer place.
    let mut deleting: Option<tokio::task::JoinHandle<Vec<String>>> = None;
    let mut interval = worker.heartbeat_interval;
    let mut last_error_log: Option<Instant> = None;
    loop {
        let outcome: Result<(), tonic::Status> = async {
            if !registered {
                // Taken before the report, which covers them (one stored in between is in
                // both: the master files it twice, harmlessly).
                worker.store.received.clear();
                let req = RegisterRequest {
                    address: worker.address.clone(),
                    usage: Some(worker.usage()),
                    chunks: worker.store.report(),
                    with_headers: false,
                };
                let n = req.chunks.len();
                let mut resp = client.register(req).await?.into_inner();
                if resp.want_headers {
                    tracing::info!("master is rebuilding its metadata; sending chunk headers");
                    let store = worker.store.clone();
                    let chunks = tokio::task::spawn_blocking(move || store.report_with_headers())
                        .await
                        .unwrap_or_default();
                    resp = client
                        .register(RegisterRequest {
                            address: worker.address.clone(),
                            usage: Some(worker.usage()),
                            chunks,
                            with_headers: true,
                        })
                        .await?
                        .into_inner();
                }
                if resp.heartbeat_interval_ms > 0 {
                    interval = Duration::from_millis(resp.heartbeat_interval_ms)
                        .min(worker.heartbeat_interval.max(Duration::from_millis(50)));
                }
                registered = true;
                tracing::info!(master = %worker.master, chunks = n, "registered with master");
                return Ok(());
            }
            if let Some(task) = deleting.take_if(|t| t.is_finished()) {
                let done = task.await.unwrap_or_default();
                tracing::info!(chunks = done.len(), "deleted chunks on the master's order");
                worker.compact_in_background();
                acks.extend(done);
            }
            if worker.store.received.overflowed() {
                tracing::info!(
                    "too many stored chunks went unreported; re-registering with a full report"
                );
                registered = false;
                return Ok(());
            }
            let corrupt = worker.store.take_quarantined();
            let received = worker.store.received.take(RECEIVED_PER_HEARTBEAT);
            let resp = match client
                .heartbeat(HeartbeatRequest {
                    address: worker.address.clone(),
                    usage: Some(worker.usage()),
                    deleted_chunks: acks.clone(),
                    corrupt_chunks: corrupt.clone(),
                    process: Some(crate::procstat::current()),
                    received_chunks: received.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    worker.store.requeue_quarantined(corrupt);
                    worker.store.received.requeue(received);
                    return Err(e);
                }
            };
            acks.clear();
            if resp.reregister {
                tracing::info!("master asked for a full report; re-registering");
                registered = false;
                return Ok(());
            }
            // Orders are sent again with every heartbeat until acknowledged: those that come
            // while a batch is being deleted wait for the heartbeat after it.
            if !resp.delete_chunks.is_empty() && deleting.is_none() {
                let store = worker.store.clone();
                let orders = resp.delete_chunks;
                deleting = Some(tokio::task::spawn_blocking(move || {
                    let mut done = Vec::new();
                    for id in orders {
                        match id.parse::<ChunkId>() {
                            Ok(cid) => match store.delete(&cid) {
                                Ok(_) => done.push(id),
                                Err(e) => tracing::warn!(chunk = %id, error = %e, "delete failed"),
                            },
                            // Not a chunk id: nothing to delete, acknowledge so it is dropped.
                            Err(_) => done.push(id),
                        }
                    }
                    // Acknowledge only deletes whose tombstones are durable.
                    if let Err(e) = store.sync_deletes() {
                        tracing::warn!(error = %e, "could not sync deletes; will be retried");
                        return Vec::new();
                    }
                    done
                }));
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => last_error_log = None,
            Err(s) => {
                registered = registered && s.code() != tonic::Code::NotFound;
                let quiet = last_error_log.is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                if !quiet {
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ) {
                        // Not an outage: retrying will not help until the settings change.
                        tracing::error!(master = %worker.master, error = %s.message(), "master refused this worker; check that it has the master's --cluster-secret-file");
                    } else {
                        tracing::warn!(master = %worker.master, error = %s.message(), "master unreachable; retrying");
                    }
                    last_error_log = Some(Instant::now());
                }
            }
        }
        if !registered {
            // Re-register promptly, but do not spin against a master that is down.
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(interval.min(Duration::from_millis(500))) => {}
            }
            continue;
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
