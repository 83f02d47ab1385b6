//! Group commit on a dedicated thread, awaitable from async code.
//!
//! Both the master's metadata store and a worker's volumes acknowledge a write only after
//! an fsync, and share one fsync among every writer waiting at the same time. Done with a
//! blocking thread per waiter, sixteen concurrent writers meant sixteen parked threads, each
//! woken (and all contending for one mutex) after every fsync: a third of the context
//! switches of a small-file workload. Here one thread syncs, writers number their writes
//! and wait for the durable position, either blocking ([`GroupSync::wait`]) or as a future
//! ([`GroupSync::wait_async`]) that costs no thread at all.

use std::ops::RangeInclusive;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::watch;

/// Failed ranges remembered for waiters that have not looked yet; failures are rare (a
/// failing disk), so this bound is never reached in practice.
const MAX_FAILED_RANGES: usize = 1024;

/// What the sync thread drives: writes are numbered by their owner, and one call makes
/// every write numbered so far durable.
pub trait SyncTarget: Send + Sync + 'static {
    /// Makes durable every write numbered up to the position it returns (read before the
    /// sync starts). On error the writes it covered are not durable, ever: the owner must
    /// not sync the same file again and hope (Linux reports a failed writeback once).
    fn sync_once(&self) -> (u64, Result<(), String>);
}

#[derive(Default)]
struct State {
    /// Highest write number someone waits for.
    requested: u64,
    /// Every write up to this is durable (unless in `failed`).
    durable: u64,
    /// Ranges of writes whose fsync failed, with the error.
    failed: Vec<(RangeInclusive<u64>, String)>,
    /// Highest write number settled either way.
    settled: u64,
    /// A sync is running (on the thread, or on a caller that leads it).
    busy: bool,
    stop: bool,
}

struct Core {
    target: Arc<dyn SyncTarget>,
    state: Mutex<State>,
    /// Wakes the sync thread.
    work: Condvar,
    /// Wakes blocking waiters after each round.
    done: Condvar,
    /// Bumped after each round, for async waiters.
    rounds: watch::Sender<u64>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One sync thread and its waiters.
pub struct GroupSync {
    core: Arc<Core>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where write `n` stands.
fn outcome(st: &State, n: u64) -> Option<Result<(), String>> {
    if let Some((_, e)) = st.failed.iter().find(|(r, _)| r.contains(&n)) {
        return Some(Err(e.clone()));
    }
    (st.durable >= n).then_some(Ok(()))
}

impl GroupSync {
    /// Starts the sync thread for `target`.
    pub fn new(name: &str, target: Arc<dyn SyncTarget>) -> std::io::Result<GroupSync> {
        let core = Arc::new(Core {
            target,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            rounds: watch::Sender::new(0),
        });
        let c = core.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(&c))?;
        Ok(GroupSync {
            core,
            thread: Some(thread),
        })
    }

    /// Asks for write `n` to be made durable; returns its outcome if already known.
    fn request(&self, n: u64) -> Option<Result<(), String>> {
        let mut st = self.core.lock();
        if let Some(r) = outcome(&st, n) {
            return Some(r);
        }
        if st.stop {
            return Some(Err("the store is closing".into()));
        }
        if n > st.requested {
            st.requested = n;
            drop(st);
            self.core.work.notify_one();
        }
        None
    }

    /// Runs the sync for write `n` on the calling (blocking) thread if no sync is running,
    /// and returns its outcome; `None` if one is running elsewhere (then wait for it). With
    /// one writer at a time this saves the two thread wake-ups of handing the sync over.
    pub fn try_lead(&self, n: u64) -> Option<Result<(), String>> {
        {
            let mut st = self.core.lock();
            if let Some(r) = outcome(&st, n) {
                return Some(r);
            }
            if st.busy || st.stop {
                drop(st);
                return self.request(n);
            }
            st.busy = true;
            st.requested = st.requested.max(n);
        }
        round(&self.core);
        let st = self.core.lock();
        if st.requested > st.settled {
            // Asked for during this round: the thread's to serve (it waited while busy).
            self.core.work.notify_one();
        }
        // The round covered everything written before it began, `n` included.
        Some(outcome(&st, n).unwrap_or_else(|| Err("write was not covered by its sync".into())))
    }

    /// Blocks until write `n` is durable, or its fsync failed.
    pub fn wait(&self, n: u64) -> Result<(), String> {
        if let Some(r) = self.request(n) {
            return r;
        }
        let mut st = self.core.lock();
        loop {
            if let Some(r) = outcome(&st, n) {
                return r;
            }
            if st.stop {
                return Err("the store is closing".into());
            }
            st = self.core.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, without holding a thread, until write `n` is durable or its fsync failed.
    pub async fn wait_async(&self, n: u64) -> Result<(), String> {
        // Subscribed before asking, so that the round that settles `n` is never missed.
        let mut rounds = self.core.rounds.subscribe();
        if let Some(r) = self.request(n) {
            return r;
        }
        loop {
            {
                let st = self.core.lock();
                if let Some(r) = outcome(&st, n) {
                    return r;
                }
                if st.stop {
                    return Err("the store is closing".into());
                }
            }
            if rounds.changed().await.is_err() {
                return Err("the store is closing".into());
            }
        }
    }
}

fn run(core: &Core) {
    loop {
        {
            let mut st = core.lock();
            while (st.requested <= st.settled || st.busy) && !st.stop {
                st = core.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                drop(st);
                core.done.notify_all();
                core.rounds.send_modify(|r| *r += 1);
                return;
            }
            st.busy = true;
        }
        round(core);
    }
}

/// One sync, by whoever set `busy`; settles what it covered and wakes every waiter.
fn round(core: &Core) {
    let (upto, result) = core.target.sync_once();
    {
        let mut st = core.lock();
        match result {
            Ok(()) => st.durable = st.durable.max(upto),
            Err(e) => {
                let from = st.settled + 1;
                if from <= upto {
                    if st.failed.len() == MAX_FAILED_RANGES {
                        st.failed.remove(0);
                    }
                    st.failed.push((from..=upto, e));
                }
            }
        }
        st.settled = st.settled.max(upto);
        st.busy = false;
    }
    core.done.notify_all();
    core.rounds.send_modify(|r| *r += 1);
}

impl Drop for GroupSync {
    fn drop(&mut self) {
        self.core.lock().stop = true;
        self.core.work.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts writes and syncs; fails the syncs it is told to.
    #[derive(Default)]
    struct Fake {
        written: AtomicU64,
        syncs: AtomicU64,
        fail_next: std::sync::atomic::AtomicBool,
    }

    impl SyncTarget for Fake {
        fn sync_once(&self) -> (u64, Result<(), String>) {
            let upto = self.written.load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.syncs.fetch_add(1, Ordering::SeqCst);
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return (upto, Err("disk on fire".into()));
            }
            (upto, Ok(()))
        }
    }

    #[test]
    fn concurrent_waiters_share_syncs_and_a_failure_fails_exactly_its_writes() {
        let fake = Arc::new(Fake::default());
        let g = Arc::new(GroupSync::new("test-sync", fake.clone()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, fake) = (g.clone(), fake.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let n = fake.written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.wait(n).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let syncs = fake.syncs.load(Ordering::SeqCst);
        assert!(syncs < 400, "no sharing: {syncs} syncs for 400 writes");

        // A caller may lead a sync itself when none is running.
        let before = fake.syncs.load(Ordering::SeqCst);
        let n = fake.written.fetch_add(1, Ordering::SeqCst) + 1;
        assert_eq!(g.try_lead(n), Some(Ok(())));
        assert_eq!(fake.syncs.load(Ordering::SeqCst), before + 1);
        assert_eq!(g.try_lead(n), Some(Ok(())), "settled: no second sync");
        assert_eq!(fake.syncs.load(Ordering::SeqCst), before + 1);

        let n = fake.written.fetch_add(1, Ordering::SeqCst) + 1;
        fake.fail_next.store(true, Ordering::SeqCst);
        assert_eq!(g.wait(n), Err("disk on fire".to_string()));
        // Still failed when asked again, and later writes are not tainted.
        assert!(g.wait(n).is_err());
        let m = fake.written.fetch_add(1, Ordering::SeqCst) + 1;
        assert_eq!(g.wait(m), Ok(()));
        assert!(g.wait(n).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_waiters_are_woken_without_threads_of_their_own() {
        let fake = Arc::new(Fake::default());
        let g = Arc::new(GroupSync::new("test-sync", fake.clone()).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (g, fake) = (g.clone(), fake.clone());
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let n = fake.written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.wait_async(n).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(fake.syncs.load(Ordering::SeqCst) < 640);
        drop(Arc::try_unwrap(g).ok());
    }
}
