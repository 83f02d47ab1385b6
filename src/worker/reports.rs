//! Chunk ids a worker owes the master, sent with its next heartbeat.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A bounded list of ids waiting for a heartbeat. Past its cap (a master unreachable for a
/// long time while chunks kept arriving) the list is dropped rather than grown without
/// end, and the worker makes a full report instead, which covers everything it holds.
pub struct PendingReports {
    ids: Mutex<Vec<String>>,
    overflowed: AtomicBool,
    cap: usize,
}

impl PendingReports {
    pub fn new(cap: usize) -> Self {
        PendingReports {
            ids: Mutex::new(Vec::new()),
            overflowed: AtomicBool::new(false),
            cap,
        }
    }

    pub fn push(&self, id: String) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.len() >= self.cap {
            ids.clear();
            ids.shrink_to_fit();
            self.overflowed.store(true, Ordering::Relaxed);
            return;
        }
        ids.push(id);
    }

    /// Takes up to `max` ids; the rest wait for the next call.
    pub fn take(&self, max: usize) -> Vec<String> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.len() <= max {
            return std::mem::take(&mut *ids);
        }
        ids.drain(..max).collect()
    }

    /// Puts back ids whose heartbeat failed.
    pub fn requeue(&self, back: Vec<String>) {
        for id in back {
            self.push(id);
        }
    }

    /// True once ids were dropped: only a full report makes up for them.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Forgets every id (a full report is about to be taken, and covers them).
    pub fn clear(&self) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.clear();
        self.overflowed.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_out_in_batches_and_an_overflow_asks_for_a_full_report() {
        let p = PendingReports::new(4);
        for i in 0..3 {
            p.push(format!("c{i}"));
        }
        assert_eq!(p.take(2), ["c0", "c1"]);
        p.requeue(vec!["c0".into()]);
        assert_eq!(p.take(10), ["c2", "c0"]);
        assert!(p.take(10).is_empty());
        assert!(!p.overflowed());
        for i in 0..5 {
            p.push(format!("c{i}"));
        }
        assert!(p.overflowed(), "the fifth id overflowed a cap of four");
        assert!(p.take(10).is_empty(), "the dropped ids are not half sent");
        p.push("c9".into());
        p.clear();
        assert!(!p.overflowed());
        assert!(p.take(10).is_empty());
    }
}
