//! Uploads reserved ahead for small files (`ReserveUploads`).
//!
//! A small file otherwise costs two calls to the master: one to start it (a placement and a
//! write capability), one to commit it. A client that writes many of them takes the first
//! call out of each file's path: it keeps a few uploads opened ahead, placed and authorised
//! but with no name, and names each one in its commit. The pool follows demand, so a client
//! that writes one file now and then reserves nothing:
//! - it reserves only after [`MIN_DEMAND`] small uploads within one window of [`WINDOW`];
//! - it keeps about twice the uploads of the last window, at most [`MAX_POOL`], refilled by
//!   one call in the background when half are used;
//! - a reservation is used within half its lease or dropped (the master forgets it);
//! - any refusal turns reservations off for a second, and a master without the call turns
//!   them off for good, so uploads simply start as before.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rpc::MasterRpc;
use crate::rpc::pb;

/// The span over which demand is counted.
const WINDOW: Duration = Duration::from_millis(100);
/// Small uploads within one window before the client reserves any.
const MIN_DEMAND: u32 = 4;
/// Most reservations one pool holds.
const MAX_POOL: usize = 64;
/// How long reservations stay off after a refusal or a failed call.
const BACK_OFF: Duration = Duration::from_secs(1);

/// One reserved upload, ready for a file of at most `max_size` bytes.
pub(crate) struct Slot {
    pub plan: pb::StartUploadResponse,
    pub max_size: u64,
    /// The replication factor asked for (its pool).
    pub replicas: u32,
    use_by: Instant,
}

/// The pool of one replication factor.
struct Pool {
    slots: VecDeque<Slot>,
    refilling: bool,
    window_start: Instant,
    this_window: u32,
    last_window: u32,
    off_until: Option<Instant>,
}

impl Pool {
    fn new(now: Instant) -> Pool {
        Pool {
            slots: VecDeque::new(),
            refilling: false,
            window_start: now,
            this_window: 0,
            last_window: 0,
            off_until: None,
        }
    }

    /// Counts one small upload and says how many reservations the demand calls for.
    fn count_demand(&mut self, now: Instant) -> usize {
        let since = now.duration_since(self.window_start);
        if since >= WINDOW {
            self.last_window = if since >= 2 * WINDOW {
                0
            } else {
                self.this_window
            };
            self.this_window = 0;
            self.window_start = now;
        }
        self.this_window += 1;
        let demand = self.last_window.max(self.this_window);
        if demand < MIN_DEMAND {
            0
        } else {
            (2 * demand as usize).min(MAX_POOL)
        }
    }
}

/// Every pool of one client (by replication factor asked for; 0 = the master's default).
pub(crate) struct Reservations {
    master: MasterRpc,
    pools: Mutex<HashMap<u32, Pool>>,
    /// The master does not have `ReserveUploads`.
    unsupported: AtomicBool,
    committed: AtomicU64,
    fell_back: AtomicU64,
    prepared: AtomicU64,
}

/// What a client's reservations did, for diagnostics, the benchmark and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReservationStats {
    /// Reserved uploads waiting in the pools now.
    pub ready: usize,
    /// Small files committed through a reserved upload.
    pub committed: u64,
    /// Small files whose reserved upload failed and that were uploaded again as usual.
    pub fell_back: u64,
    /// Of the committed ones, those whose commit went beside their writes (a prepare).
    pub prepared: u64,
}

impl Reservations {
    pub fn new(master: MasterRpc) -> Arc<Reservations> {
        Arc::new(Reservations {
            master,
            pools: Mutex::new(HashMap::new()),
            unsupported: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            fell_back: AtomicU64::new(0),
            prepared: AtomicU64::new(0),
        })
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reserved upload for the next small file, if one is ready; `None` sends the file the
    /// usual way. Counts the demand and starts a refill when the pool runs low.
    pub fn take(self: &Arc<Self>, replicas: u32) -> Option<Slot> {
        if self.unsupported.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let mut pools = self.pools();
        let pool = pools.entry(replicas).or_insert_with(|| Pool::new(now));
        let want = pool.count_demand(now);
        while pool.slots.front().is_some_and(|s| s.use_by <= now) {
            pool.slots.pop_front();
        }
        let slot = pool.slots.pop_front();
        let off = pool.off_until.is_some_and(|t| now < t);
        if want > 0 && !off && !pool.refilling && pool.slots.len() < want / 2 {
            pool.refilling = true;
            let count = (want - pool.slots.len()) as u32;
            let me = self.clone();
            tokio::spawn(async move { me.refill(replicas, count).await });
        }
        slot
    }

    async fn refill(&self, replicas: u32, count: u32) {
        let answer = self
            .master
            .clone()
            .reserve_uploads(pb::ReserveUploadsRequest { count, replicas })
            .await;
        let now = Instant::now();
        let mut pools = self.pools();
        let pool = pools.entry(replicas).or_insert_with(|| Pool::new(now));
        pool.refilling = false;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                if r.uploads.is_empty() {
                    pool.off_until = Some(now + BACK_OFF);
                }
                // Half the lease: a file taken at the end still has time to be written and
                // committed before the master forgets its reservation.
                let use_by = now + Duration::from_millis(r.lease_ms / 2);
                pool.slots.extend(r.uploads.into_iter().map(|plan| Slot {
                    plan,
                    max_size: r.max_size,
                    replicas,
                    use_by,
                }));
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::debug!("the master cannot reserve uploads; small files start one by one");
                self.unsupported.store(true, Ordering::Relaxed);
            }
            Err(s) => {
                tracing::debug!(error = %s.message(), "could not reserve uploads");
                pool.off_until = Some(now + BACK_OFF);
            }
        }
    }

    /// Drops every reservation of one pool (the master forgot them: it restarted).
    pub fn forget(&self, replicas: u32) {
        if let Some(pool) = self.pools().get_mut(&replicas) {
            pool.slots.clear();
        }
    }

    /// Counts how a reserved upload ended: committed, or sent again the usual way.
    pub fn record(&self, committed: bool) {
        let counter = if committed {
            &self.committed
        } else {
            &self.fell_back
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a commit made beside its writes.
    pub fn record_prepared(&self) {
        self.prepared.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ReservationStats {
        ReservationStats {
            ready: self.pools().values().map(|p| p.slots.len()).sum(),
            committed: self.committed.load(Ordering::Relaxed),
            fell_back: self.fell_back.load(Ordering::Relaxed),
            prepared: self.prepared.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_must_build_up_before_anything_is_reserved_and_fades_when_it_stops() {
        let t0 = Instant::now();
        let mut p = Pool::new(t0);
        // One file now and then reserves nothing.
        assert_eq!(p.count_demand(t0), 0);
        assert_eq!(p.count_demand(t0 + WINDOW * 3), 0);
        // A burst does, about twice the window's count, capped.
        let t1 = t0 + WINDOW * 10;
        let wants: Vec<usize> = (0..5).map(|_| p.count_demand(t1)).collect();
        assert_eq!(wants, vec![0, 0, 0, 8, 10]);
        for _ in 0..100 {
            p.count_demand(t1);
        }
        assert_eq!(p.count_demand(t1), MAX_POOL);
        // The next window remembers the last one; a quiet window forgets it.
        assert_eq!(p.count_demand(t1 + WINDOW), MAX_POOL);
        assert_eq!(p.count_demand(t1 + WINDOW * 4), 0);
    }
}
