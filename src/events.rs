//! The master's cluster event feed: a bounded buffer of recent events plus a broadcast of live
//! ones, served by the `StreamLogs` RPC to the console and scripts.
//!
//! Events are recorded explicitly (registrations, deaths, uploads, deletes, errors) rather than
//! captured from the global tracing subscriber, so several masters in one process (tests, the
//! embedded cluster) each keep their own feed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

use crate::rpc::{now_unix_ms, pb::LogEvent};

/// How many past events are kept for new subscribers.
pub const BACKLOG: usize = 1000;

/// Severity of a cluster event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
        }
    }
}

/// Recent and live cluster events.
pub struct EventLog {
    recent: Mutex<VecDeque<LogEvent>>,
    live: broadcast::Sender<LogEvent>,
    seq: AtomicU64,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(1024);
        EventLog {
            recent: Mutex::new(VecDeque::with_capacity(BACKLOG)),
            live,
            seq: AtomicU64::new(1),
        }
    }

    /// Records an event (and traces it, so it also lands in the process log).
    pub fn record(&self, level: Level, message: impl Into<String>) {
        let message = message.into();
        match level {
            Level::Error => tracing::error!(target: "dfs::events", "{message}"),
            Level::Warn => tracing::warn!(target: "dfs::events", "{message}"),
            Level::Info => tracing::info!(target: "dfs::events", "{message}"),
        }
        let event = LogEvent {
            unix_ms: now_unix_ms(),
            level: level.as_str().to_string(),
            message,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        };
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == BACKLOG {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        let _ = self.live.send(event);
    }

    /// Subscribes to live events and returns the last `backlog` past ones; events recorded
    /// between the two may appear in both, so readers skip sequence numbers already seen.
    pub fn subscribe(&self, backlog: usize) -> (Vec<LogEvent>, broadcast::Receiver<LogEvent>) {
        let rx = self.live.subscribe();
        let past = match self.recent.lock() {
            Ok(recent) => {
                let skip = recent.len().saturating_sub(backlog);
                recent.iter().skip(skip).cloned().collect()
            }
            Err(_) => Vec::new(),
        };
        (past, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backlog_then_live() {
        let log = EventLog::new();
        for i in 0..1005 {
            log.record(Level::Info, format!("e{i}"));
        }
        let (past, mut rx) = log.subscribe(10);
        assert_eq!(past.len(), 10);
        assert_eq!(past[9].message, "e1004");
        let (all, _) = log.subscribe(usize::MAX);
        assert_eq!(all.len(), BACKLOG);
        log.record(Level::Warn, "live");
        let ev = rx.recv().await.unwrap();
        assert_eq!((ev.level.as_str(), ev.message.as_str()), ("WARN", "live"));
        assert!(ev.seq > past[9].seq);
    }
}
