//! Calls coalesced into batches: lookups, upload starts and commits (to the master), and
//! small chunk writes (to each worker).
//!
//! With many files handled at once (a data loader's readers, the benchmark's 16 writers),
//! each small call was its own round trip, and the per-call cost (an HTTP/2 stream, headers,
//! a task and a wake-up on each side, and for commits a transaction and an fsync) was most of
//! the work of a small file. Here each kind of call goes to one task that sends whatever is
//! waiting as one batched call (one request alone still goes as the plain call), as
//! FoundationDB's client batches the read-version requests of concurrent transactions. Only
//! one call is in flight at a time (by default), so a request never waits for a timer: the
//! batch is simply what queued while the previous call was out. One more call may go early,
//! beside the one out, once as many requests wait as the last full batch held (many
//! clients moving in step; see `pump`). A request that finds nothing
//! queued and no call out is sent at once from its caller's task, so one client doing one
//! thing at a time pays nothing for the batching.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;

/// One kind of master call that can travel alone or in a batch.
pub(crate) trait Batched: Send + Sync + 'static {
    type Req: Clone + Send + 'static;
    type Resp: Send + 'static;
    /// Most requests one batched call may carry.
    const MAX: usize;
    /// Calls in flight at once; requests that arrive while all are out wait for the next.
    const IN_FLIGHT: usize = 1;
    /// Most total [`Batched::cost`] one batched call may carry (a request costing more
    /// still goes, alone).
    const BUDGET: usize = usize::MAX;
    /// What a request weighs against [`Batched::BUDGET`] (its bytes, for data).
    fn cost(_req: &Self::Req) -> usize {
        1
    }
    /// The plain call, for a request alone.
    fn one(&self, req: Self::Req) -> impl Future<Output = Result<Self::Resp, Status>> + Send;
    /// The batched call: one answer per request, in order.
    fn many(
        &self,
        reqs: Vec<Self::Req>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Resp, Status>>, Status>> + Send;
}

type Reply<T> = oneshot::Sender<Result<T, Status>>;

/// The handle callers use; the batching task ends when the last handle is dropped.
pub(crate) struct Batcher<B: Batched> {
    tx: mpsc::UnboundedSender<(B::Req, Reply<B::Resp>)>,
    shared: Arc<Shared<B>>,
}

/// What callers and the batching task share.
struct Shared<B: Batched> {
    calls: B,
    /// One permit per call that may be in flight ([`Batched::IN_FLIGHT`]).
    slots: Arc<Semaphore>,
    /// Requests handed to the task and not yet taken into a call (an upper bound).
    queued: AtomicUsize,
}

impl<B: Batched> Clone for Batcher<B> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

fn stopped() -> Status {
    Status::unavailable("the client's batching task has stopped")
}

impl<B: Batched> Batcher<B> {
    /// Starts the batching task on the current runtime.
    pub(crate) fn start(calls: B) -> Batcher<B> {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            calls,
            slots: Arc::new(Semaphore::new(B::IN_FLIGHT)),
            queued: AtomicUsize::new(0),
        });
        tokio::spawn(pump(shared.clone(), rx));
        Batcher { tx, shared }
    }

    /// Sends `req`, batched with whatever other requests wait at the same time. When nothing
    /// waits and a call slot is free (one client doing one thing at a time), the request goes
    /// out at once from the caller's own task: the hand-offs to the batching task and back
    /// would be two thread wake-ups added to every call.
    pub(crate) async fn call(&self, req: B::Req) -> Result<B::Resp, Status> {
        if self.shared.queued.load(Ordering::Acquire) == 0
            && let Ok(_slot) = self.shared.slots.try_acquire()
        {
            return self.shared.calls.one(req).await;
        }
        let (reply, rx) = oneshot::channel();
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send((req, reply)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The answer to a batched item, from its wire form: a value, or a status code and message.
pub(crate) fn item<T>(value: Option<T>, code: i32, message: String) -> Result<T, Status> {
    match value {
        Some(v) => Ok(v),
        None if code == 0 => Err(Status::internal(
            "the server answered an item with neither a value nor an error",
        )),
        None => Err(Status::new(code.into(), message)),
    }
}

/// Whether the batched call exists on the other side, as far as the pump has seen.
#[derive(Default)]
struct Support {
    /// False once the server said it does not know the call (an older server).
    absent: AtomicBool,
    /// True once a batched call has worked; until then a batch is kept to resend one by one.
    confirmed: AtomicBool,
}

async fn pump<B: Batched>(
    shared: Arc<Shared<B>>,
    mut rx: mpsc::UnboundedReceiver<(B::Req, Reply<B::Resp>)>,
) {
    let support = Support::default();
    let mut waiting = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    // How many requests arrive together (the largest recent call, decaying): with many
    // clients in step, say 16 writers that all finished their chunk writes, the first one
    // goes alone at once and the other 15 queue behind it. Waiting for that call to finish
    // before sending theirs put two calls, and two fsyncs on the other side, one after the
    // other in every round. A second call in flight was tried and measured no better: it
    // went as soon as one more request arrived, and the rest still queued. So the second
    // call (the early slot) goes only with a full herd.
    let mut herd = 0usize;
    let early = Arc::new(Semaphore::new(1));
    let mut closed = false;
    loop {
        // Requests to send (finishing calls meanwhile).
        if waiting.is_empty() {
            tokio::select! {
                n = rx.recv_many(&mut waiting, B::MAX) => {
                    if n == 0 {
                        break;
                    }
                    shared.queued.fetch_sub(n, Ordering::AcqRel);
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            }
        }
        // A free slot for them (finishing calls meanwhile). While every slot is out, the
        // requests keep queueing; once as many wait as the last full batch held, they go at
        // once on the early slot instead of waiting for a call to finish (see `herd`).
        let slot = loop {
            if let Ok(s) = shared.slots.clone().try_acquire_owned() {
                break s;
            }
            if herd >= 2
                && waiting.len() >= herd
                && let Ok(s) = early.clone().try_acquire_owned()
            {
                break s;
            }
            let room = B::MAX.saturating_sub(waiting.len());
            tokio::select! {
                slot = shared.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => break slot,
                    Err(_) => return drain(in_flight).await,
                },
                n = rx.recv_many(&mut waiting, room), if room > 0 && !closed => {
                    // Closed: the requests already waiting still go once a slot frees.
                    closed = n == 0;
                    shared.queued.fetch_sub(n, Ordering::AcqRel);
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
        };
        // Whatever else queued while waiting for the slot goes in the same call.
        while waiting.len() < B::MAX {
            match rx.try_recv() {
                Ok(r) => {
                    shared.queued.fetch_sub(1, Ordering::AcqRel);
                    waiting.push(r);
                }
                Err(_) => break,
            }
        }
        let take = within_budget::<B>(&waiting);
        let group: Vec<_> = waiting.drain(..take).collect();
        herd = group.len().max(herd * 3 / 4);
        let shared = &shared;
        let support = &support;
        in_flight.push(async move {
            send(&shared.calls, support, group).await;
            drop(slot);
        });
    }
    drain(in_flight).await
}

/// Waits for the calls still in flight (their callers get their answers).
async fn drain<F: Future<Output = ()>>(mut in_flight: FuturesUnordered<F>) {
    while in_flight.next().await.is_some() {}
}

/// Sends one group of waiting requests (batched if more than one) and answers each caller.
async fn send<B: Batched>(calls: &B, support: &Support, group: Vec<(B::Req, Reply<B::Resp>)>) {
    let (reqs, replies): (Vec<B::Req>, Vec<Reply<B::Resp>>) = group.into_iter().unzip();
    let reqs = if reqs.len() > 1 && !support.absent.load(Ordering::Relaxed) {
        let kept = (!support.confirmed.load(Ordering::Relaxed)).then(|| reqs.clone());
        match calls.many(reqs).await {
            Ok(results) => {
                support.confirmed.store(true, Ordering::Relaxed);
                let mut results = results.into_iter();
                for reply in replies {
                    let r = results.next().unwrap_or_else(|| {
                        Err(Status::internal(
                            "the server answered fewer items than it was sent",
                        ))
                    });
                    let _ = reply.send(r);
                }
                return;
            }
            Err(s) => match kept {
                Some(reqs) if s.code() == tonic::Code::Unimplemented => {
                    support.absent.store(true, Ordering::Relaxed);
                    reqs
                }
                _ => {
                    for reply in replies {
                        let _ = reply.send(Err(s.clone()));
                    }
                    return;
                }
            },
        }
    } else {
        reqs
    };
    let singles = reqs.into_iter().zip(replies).map(|(req, reply)| {
        let call = calls.one(req);
        async move {
            let _ = reply.send(call.await);
        }
    });
    futures::future::join_all(singles).await;
}

/// How many of the first waiting requests fit one call's budget (always at least one).
fn within_budget<B: Batched>(waiting: &[(B::Req, Reply<B::Resp>)]) -> usize {
    let mut total = 0usize;
    let fit = waiting
        .iter()
        .take_while(|(req, _)| {
            total = total.saturating_add(B::cost(req));
            total <= B::BUDGET
        })
        .count();
    fit.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Doubles numbers; records the size of every call; refuses 13; optionally has no
    /// batched call at all (an older master).
    struct Doubler {
        calls: Arc<Mutex<Vec<usize>>>,
        unimplemented: bool,
        gate: Arc<tokio::sync::Semaphore>,
    }

    fn double(n: u32) -> Result<u32, Status> {
        if n == 13 {
            Err(Status::invalid_argument("13 is refused"))
        } else {
            Ok(n * 2)
        }
    }

    impl Batched for Doubler {
        type Req = u32;
        type Resp = u32;
        const MAX: usize = 8;
        fn one(&self, req: u32) -> impl Future<Output = Result<u32, Status>> + Send {
            self.calls.lock().unwrap().push(1);
            let gate = self.gate.clone();
            async move {
                // Each call uses up a permit, so a test lets calls through one by one.
                if let Ok(p) = gate.acquire().await {
                    p.forget();
                }
                double(req)
            }
        }
        fn many(
            &self,
            reqs: Vec<u32>,
        ) -> impl Future<Output = Result<Vec<Result<u32, Status>>, Status>> + Send {
            let unimplemented = self.unimplemented;
            if !unimplemented {
                self.calls.lock().unwrap().push(reqs.len());
            }
            let gate = self.gate.clone();
            async move {
                // Each call uses up a permit, so a test lets calls through one by one.
                if let Ok(p) = gate.acquire().await {
                    p.forget();
                }
                if unimplemented {
                    return Err(Status::unimplemented("no such method"));
                }
                Ok(reqs.into_iter().map(double).collect())
            }
        }
    }

    type Answer = tokio::task::JoinHandle<(u32, Result<u32, Status>)>;

    /// Every caller got its own answer (13 is refused), each within a bound.
    async fn expect_answers(tasks: Vec<Answer>) {
        for t in tasks {
            let (n, r) = tokio::time::timeout(std::time::Duration::from_secs(10), t)
                .await
                .expect("answered in time")
                .expect("task ran");
            match n {
                13 => assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument),
                n => assert_eq!(r.unwrap(), n * 2),
            }
        }
    }

    /// Sends 0..20 (13 among them) while the first call is held at a gate, then opens it;
    /// every caller must get its own answer.
    async fn run(unimplemented: bool) -> Vec<usize> {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let b = Batcher::start(Doubler {
            calls: calls.clone(),
            unimplemented,
            gate: gate.clone(),
        });
        let tasks: Vec<_> = (0..20u32)
            .map(|n| {
                let b = b.clone();
                tokio::spawn(async move { (n, b.call(n).await) })
            })
            .collect();
        // Let every request queue behind the first call before it is answered.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gate.add_permits(1000);
        expect_answers(tasks).await;
        calls.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn waiting_requests_share_calls_of_at_most_max_and_each_gets_its_answer() {
        let sizes = run(false).await;
        assert_eq!(sizes.iter().sum::<usize>(), 20, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= Doubler::MAX), "{sizes:?}");
        assert!(
            sizes.len() < 20,
            "requests that waited together must share a call: {sizes:?}"
        );
    }

    /// Once a herd of requests has queued behind a call, the next herd of that size goes at
    /// once beside the call still out, not after it; a smaller group waits as before, and
    /// never more than two calls are out.
    #[tokio::test]
    async fn a_full_herd_goes_beside_the_call_in_flight() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let b = Batcher::start(Doubler {
            calls: calls.clone(),
            unimplemented: false,
            gate: gate.clone(),
        });
        let spawn = |range: std::ops::RangeInclusive<u32>| -> Vec<_> {
            range
                .map(|n| {
                    let b = b.clone();
                    tokio::spawn(async move { (n, b.call(n).await) })
                })
                .collect()
        };
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(50));
        let sizes = || calls.lock().unwrap().clone();
        let mut tasks = spawn(0..=0);
        settle().await;
        tasks.extend(spawn(1..=7));
        settle().await;
        assert_eq!(sizes(), [1], "the first herd waits for the call out");
        gate.add_permits(1);
        settle().await;
        assert_eq!(sizes(), [1, 7]);
        // The batch of 7 is held at the gate; the next 7 go beside it.
        tasks.extend(spawn(8..=14));
        settle().await;
        assert_eq!(sizes(), [1, 7, 7], "a full herd goes early");
        tasks.extend(spawn(15..=17));
        settle().await;
        assert_eq!(sizes(), [1, 7, 7], "two calls are out: the rest wait");
        gate.add_permits(1000);
        expect_answers(tasks).await;
        assert_eq!(sizes(), [1, 7, 7, 3]);
    }

    #[tokio::test]
    async fn without_the_batched_call_requests_go_one_by_one() {
        let sizes = run(true).await;
        assert_eq!(sizes, vec![1; 20]);
    }

    #[test]
    fn an_item_with_neither_value_nor_code_is_an_internal_error() {
        assert_eq!(item(Some(5), 0, String::new()).unwrap(), 5);
        let e = item::<u32>(None, tonic::Code::NotFound as i32, "gone".into()).unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::NotFound, "gone"));
        assert_eq!(
            item::<u32>(None, 0, String::new()).unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
