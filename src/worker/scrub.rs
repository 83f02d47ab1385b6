//! The scrubber: re-reads every chunk in the background at a bounded rate, verifies its
//! checksum, and quarantines a corrupt one (it is then never served, and the master hears of
//! it with the next heartbeat and re-replicates from a good copy).

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::store::ChunkStore;
use crate::chunk;

/// Scrubber settings.
#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Bytes per second to read at most; 0 turns the scrubber off.
    pub rate: u64,
    /// Pause between the end of one pass and the start of the next.
    pub interval: Duration,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            rate: 32 << 20,
            interval: Duration::from_secs(3600),
        }
    }
}

/// Totals of the scrubber, for logs and status.
#[derive(Debug, Default)]
pub struct ScrubStats {
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub corrupt: AtomicU64,
    pub passes: AtomicU64,
}

/// Runs passes until `stop`; meant for a blocking thread.
pub fn run(
    store: Arc<ChunkStore>,
    cfg: ScrubConfig,
    stats: Arc<ScrubStats>,
    stop: Arc<AtomicBool>,
) {
    if cfg.rate == 0 {
        return;
    }
    let sleep = |d: Duration| -> bool {
        // Sleeps in slices so that a stop is noticed quickly; false if stopped.
        let end = Instant::now() + d;
        while Instant::now() < end {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
        !stop.load(Ordering::Relaxed)
    };
    loop {
        let started = Instant::now();
        let mut pass_bytes = 0u64;
        let mut pass_bad = 0u64;
        for id in store.ids() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let (mut file, header) = match store.open_read(&id) {
                Ok(v) => v,
                // Gone meanwhile (deleted), or a bad header (already quarantined by open_read).
                Err(super::WorkerError::Corrupt { .. }) => {
                    pass_bad += 1;
                    continue;
                }
                Err(_) => continue,
            };
            let mut crc = 0u32;
            let mut left = header.length;
            let mut buf = vec![0u8; 1 << 20];
            let mut failed = None;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if let Err(e) = file.read_exact(&mut buf[..n]) {
                    failed = Some(format!("short read: {e}"));
                    break;
                }
                crc = chunk::crc32c_append(crc, &buf[..n]);
                left -= n as u64;
                pass_bytes += n as u64;
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                // Keep to the rate: the pass may not be ahead of bytes / rate.
                let due = Duration::from_secs_f64(pass_bytes as f64 / cfg.rate as f64);
                let spent = started.elapsed();
                if due > spent && !sleep(due - spent) {
                    return;
                }
            }
            if failed.is_none() && crc != header.crc32c {
                failed = Some(format!(
                    "checksum mismatch: stored {:08x}, computed {crc:08x}",
                    header.crc32c
                ));
            }
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = failed {
                pass_bad += 1;
                stats.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(chunk = %id, %reason, "scrubber found a corrupt chunk");
                store.quarantine(&id, &format!("scrubber: {reason}"));
            }
        }
        stats.passes.fetch_add(1, Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            bytes = pass_bytes,
            corrupt = pass_bad,
            secs,
            rate_mib_s = pass_bytes as f64 / secs.max(0.001) / (1 << 20) as f64,
            "scrub pass finished"
        );
        if !sleep(cfg.interval) {
            return;
        }
    }
}
