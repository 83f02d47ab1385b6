//! Confirmations of small files committed beside their writes (`PrepareUploads`; the
//! master's `in_doubt` module says why and how), sent after the write was acknowledged.
//!
//! A confirmation is the upload id alone, carried by the client's next `PrepareUploads`
//! call: with many small files on the way, as when a program writes a directory of them,
//! one call both confirms the files just written and prepares the next ones. A
//! confirmation that finds no prepare to ride on goes alone after [`ALONE_AFTER`].
//!
//! Nothing waits for a confirmation. Until it lands, reads of the name wait on the master,
//! and if it never does (this process exits first, the master restarts) the first read
//! has the master ask the workers, which all hold the chunk. Waiting for them is only for
//! tidiness (a process about to exit, or a benchmark phase that should own its traffic):
//! [`super::Client::settle`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::rpc::MasterRpc;
use crate::rpc::pb;

/// How long a confirmation waits for a prepare to ride on before it goes alone: about a
/// create's time, so that a client writing one file after another never sends one alone,
/// while a read of the name by anyone waits at most this much more.
const ALONE_AFTER: Duration = Duration::from_millis(1);

/// Most confirmations one call carries (the master's batch limit).
const MAX_PER_CALL: usize = crate::master::service::MAX_BATCH;

/// What a client knows about its confirmations.
#[derive(Default)]
pub(crate) struct Confirmations {
    /// Acknowledged uploads whose confirmation has not gone yet.
    waiting: Mutex<Vec<String>>,
    /// Confirmations on their way (taken from `waiting`, not yet answered).
    in_flight: AtomicUsize,
    /// Woken when nothing waits and nothing is on its way.
    idle: Notify,
    /// Wakes the task that sends confirmations alone (`Arc`: the task outlives no client).
    wake: Arc<Notify>,
    /// Set once the master said it has no `PrepareUploads` (an older master): commits then
    /// go after the writes, as before.
    unsupported: AtomicBool,
}

impl Drop for Confirmations {
    fn drop(&mut self) {
        // The sending task sees the client gone and ends.
        self.wake.notify_one();
    }
}

/// Confirmations taken for one call, counted in flight until dropped.
pub(crate) struct Taken {
    pub(crate) ids: Vec<String>,
    from: Arc<Confirmations>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let n = self.ids.len();
        if n > 0 && self.from.in_flight.fetch_sub(n, Ordering::AcqRel) == n {
            self.from.idle.notify_waiters();
        }
    }
}

impl Confirmations {
    /// Starts the task that sends confirmations that found no prepare to ride on.
    pub(crate) fn start(master: MasterRpc) -> Arc<Confirmations> {
        let c = Arc::new(Confirmations::default());
        tokio::spawn(send_alone(Arc::downgrade(&c), c.wake.clone(), master));
        c
    }

    /// Queues the confirmation of `upload_id` (its write was acknowledged).
    pub(crate) fn push(&self, upload_id: String) {
        self.lock().push(upload_id);
        self.wake.notify_one();
    }

    /// Takes up to a call's worth of waiting confirmations.
    pub(crate) fn take(self: &Arc<Self>) -> Taken {
        let ids: Vec<String> = {
            let mut w = self.lock();
            let n = w.len().min(MAX_PER_CALL);
            w.drain(..n).collect()
        };
        self.in_flight.fetch_add(ids.len(), Ordering::AcqRel);
        Taken {
            ids,
            from: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every queued confirmation has been answered (or failed).
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            let waiting = !self.lock().is_empty();
            if !waiting && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            if waiting {
                self.wake.notify_one();
            }
            notified.await;
        }
    }

    pub(crate) fn supported(&self) -> bool {
        !self.unsupported.load(Ordering::Relaxed)
    }

    pub(crate) fn set_unsupported(&self) {
        if !self.unsupported.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "the master has no PrepareUploads (an older version): small files commit after their writes"
            );
        }
    }
}

/// Sends, [`ALONE_AFTER`] after they were queued, the confirmations no prepare took.
async fn send_alone(c: Weak<Confirmations>, wake: Arc<Notify>, mut master: MasterRpc) {
    loop {
        wake.notified().await;
        tokio::time::sleep(ALONE_AFTER).await;
        loop {
            let Some(c) = c.upgrade() else { return };
            let taken = c.take();
            if taken.ids.is_empty() {
                // Woken by `idle` with nothing left: let it see so.
                if c.in_flight.load(Ordering::Acquire) == 0 {
                    c.idle.notify_waiters();
                }
                break;
            }
            let req = pb::CommitUploadsRequest {
                commits: Vec::new(),
                confirm_upload_ids: taken.ids.clone(),
            };
            if let Err(s) = master.prepare_uploads(req).await {
                tracing::debug!(error = %s.message(), "confirmations failed; the master will ask the workers");
            }
            drop(taken);
        }
    }
}
