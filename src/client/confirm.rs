//! Confirmations of small files committed beside their writes (`PrepareUploads`; the
//! master's `in_doubt` module says why and how), sent after the write was acknowledged.
//!
//! A confirmation need not be waited for: until it lands, reads of the name wait on the
//! master, and if it never does (this process exits first, the master restarts) the master
//! asks the workers. Waiting for them is only for tidiness (a process about to exit, or a
//! benchmark phase that should own its traffic): [`super::Client::settle`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// What a client knows about its confirmations in flight.
#[derive(Default)]
pub(crate) struct Confirmations {
    in_flight: AtomicUsize,
    idle: Notify,
    /// Set once the master said it has no `PrepareUploads` (an older master): commits then
    /// go after the writes, as before.
    unsupported: AtomicBool,
}

/// Counts a confirmation in flight until dropped.
pub(crate) struct InFlight(Arc<Confirmations>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Confirmations {
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Waits until no confirmation is in flight (those started meanwhile included).
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
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
