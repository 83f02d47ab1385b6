//! The answers of recent deletes, by the id their client gave each call, as HDFS's NameNode
//! keeps its RetryCache: a delete is not safe to repeat by name (the repeat of one that
//! landed would delete a file another client created meanwhile, or say "not found"), so a
//! client whose connection broke before the answer came repeats the call with its id, and
//! the master answers from here. Kept in memory only: after a master restart a repeat finds
//! nothing and is carried out by name.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::rpc::pb::FileInfo;

/// How long an answer is kept: far longer than a client waits before its repeat.
pub const KEEP: Duration = Duration::from_secs(600);
/// Most answers kept (the oldest go first): a few MiB at most.
pub const MAX_ANSWERS: usize = 65_536;
/// Longest call id accepted (a client sends 32 hex digits).
pub const MAX_CALL_ID: usize = 64;

#[derive(Default)]
pub struct RetryCache {
    inner: Mutex<Answers>,
}

enum Entry {
    /// Being carried out; the sender says when it is done.
    Pending(watch::Receiver<bool>),
    Done(FileInfo),
}

#[derive(Default)]
struct Answers {
    by_id: HashMap<String, Entry>,
    /// The ids of answers, in the order they came, with when, for expiry.
    order: VecDeque<(Instant, String)>,
}

/// What a call with an id is to do.
pub enum Claim {
    /// Answer this: the call was carried out before.
    Answered(FileInfo),
    /// The first of these calls is still being carried out (its repeat came while it ran):
    /// wait for it, then claim again.
    Busy(watch::Receiver<bool>),
    /// Carry the call out, then [`RetryCache::finish`] it with this.
    Mine(watch::Sender<bool>),
}

impl RetryCache {
    /// Claims the call `id` (not empty).
    pub fn claim(&self, id: &str) -> Claim {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        a.expire(Instant::now());
        match a.by_id.get(id) {
            Some(Entry::Done(f)) => return Claim::Answered(f.clone()),
            // A carrier that vanished without finishing (it cannot, short of a panic)
            // leaves the call to its repeat.
            Some(Entry::Pending(rx)) if rx.has_changed().is_ok() => {
                return Claim::Busy(rx.clone());
            }
            _ => {}
        }
        let (tx, rx) = watch::channel(false);
        a.by_id.insert(id.to_string(), Entry::Pending(rx));
        Claim::Mine(tx)
    }

    /// Ends a call claimed by [`Claim::Mine`]: its answer is kept if it deleted a file;
    /// a call that failed is forgotten, so that its repeat is carried out by name.
    pub fn finish(&self, id: &str, mine: watch::Sender<bool>, answer: Option<&FileInfo>) {
        let now = Instant::now();
        {
            let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match answer {
                Some(f) => {
                    a.by_id.insert(id.to_string(), Entry::Done(f.clone()));
                    a.order.push_back((now, id.to_string()));
                }
                None => {
                    a.by_id.remove(id);
                }
            }
            a.expire(now);
            while a.order.len() > MAX_ANSWERS {
                if let Some((_, old)) = a.order.pop_front() {
                    a.by_id.remove(&old);
                }
            }
        }
        let _ = mine.send(true);
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        let a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        a.by_id
            .values()
            .filter(|e| matches!(e, Entry::Done(_)))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Answers {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < KEEP {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// A call id the cache can keep.
pub fn check_call_id(id: &str) -> Result<(), crate::master::MasterError> {
    if id.len() > MAX_CALL_ID {
        return Err(crate::master::MasterError::InvalidArgument(format!(
            "a call id has at most {MAX_CALL_ID} characters, not {}",
            id.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> FileInfo {
        FileInfo {
            name: name.into(),
            ..Default::default()
        }
    }

    fn put(c: &RetryCache, id: &str, f: Option<&FileInfo>) {
        match c.claim(id) {
            Claim::Mine(tx) => c.finish(id, tx, f),
            _ => panic!("{id} was claimed before"),
        }
    }

    #[test]
    fn a_finished_call_is_answered_and_a_failed_one_is_carried_out_again() {
        let c = RetryCache::default();
        put(&c, "a1", Some(&file("x")));
        put(&c, "b2", None);
        assert!(matches!(c.claim("a1"), Claim::Answered(f) if f.name == "x"));
        assert!(matches!(c.claim("b2"), Claim::Mine(_)));
        assert_eq!(c.len(), 1);
    }

    #[tokio::test]
    async fn a_repeat_that_comes_while_the_first_runs_waits_for_its_answer() {
        let c = std::sync::Arc::new(RetryCache::default());
        let Claim::Mine(tx) = c.claim("id") else {
            panic!("the first claim carries the call out")
        };
        let Claim::Busy(mut rx) = c.claim("id") else {
            panic!("a repeat meanwhile waits")
        };
        let c2 = c.clone();
        let first = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c2.finish("id", tx, Some(&file("x")));
        });
        rx.wait_for(|done| *done).await.expect("finished");
        assert!(matches!(c.claim("id"), Claim::Answered(f) if f.name == "x"));
        first.await.expect("first call");
    }

    #[test]
    fn a_carrier_that_vanished_leaves_the_call_to_its_repeat() {
        let c = RetryCache::default();
        match c.claim("id") {
            Claim::Mine(tx) => drop(tx),
            _ => panic!("first claim"),
        }
        assert!(matches!(c.claim("id"), Claim::Mine(_)));
    }

    #[test]
    fn the_oldest_answers_go_first_beyond_the_cap() {
        let c = RetryCache::default();
        for i in 0..MAX_ANSWERS + 10 {
            put(&c, &format!("id{i}"), Some(&file("f")));
        }
        assert_eq!(c.len(), MAX_ANSWERS);
        assert!(matches!(c.claim("id0"), Claim::Mine(_)));
        assert!(matches!(c.claim("id10"), Claim::Answered(_)));
    }

    #[test]
    fn answers_older_than_the_keep_expire() {
        let c = RetryCache::default();
        put(&c, "old", Some(&file("f")));
        {
            let mut a = c.inner.lock().unwrap();
            a.order[0].0 = Instant::now()
                .checked_sub(KEEP + Duration::from_secs(1))
                .expect("a monotonic clock past the keep");
        }
        put(&c, "new", Some(&file("g")));
        assert!(matches!(c.claim("old"), Claim::Mine(_)));
        assert!(matches!(c.claim("new"), Claim::Answered(_)));
    }
}
