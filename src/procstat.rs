//! This process's memory and CPU use, read from Linux `/proc` (zeros elsewhere). Daemons
//! report it in heartbeats and `status`, and the benchmark reports it per phase, because
//! memory targets ("no process above 64 MiB while a 4 GiB file streams") are only worth
//! what measures them.

use crate::rpc::pb::ProcessStats;

/// Caps glibc's malloc at two arenas, unless `MALLOC_ARENA_MAX` is set. By default glibc
/// gives each busy thread its own arena (up to 8 per core), and freed 1 MiB stream buffers
/// linger in each. While 4 GiB streamed through a worker, its peak was 68–70 MiB with the
/// default and 47–49 MiB with two arenas, at the same throughput (`README`, Performance).
/// Call it first thing in `main`, before any thread starts.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Current, peak and CPU figures of this process.
pub fn current() -> ProcessStats {
    let (rss, peak) = std::fs::read_to_string("/proc/self/status")
        .map(|s| (status_kib(&s, "VmRSS:"), status_kib(&s, "VmHWM:")))
        .unwrap_or((0, 0));
    ProcessStats {
        rss_bytes: rss * 1024,
        peak_rss_bytes: peak * 1024,
        cpu_ms: std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_ms(&s, rustix::param::clock_ticks_per_second()))
            .unwrap_or(0),
        pid: std::process::id(),
    }
}

/// The answer to a `ProcessStats` call: the figures now, then the peak restarted if asked
/// (after reading it, so the caller sees the peak of the phase that just ended).
pub fn answer(
    req: tonic::Request<crate::rpc::pb::ProcessStatsRequest>,
) -> tonic::Response<ProcessStats> {
    let reset = req.into_inner().reset_peak;
    let now = current();
    if reset {
        reset_peak();
    }
    tonic::Response::new(now)
}

/// Restarts the peak-memory count (`VmHWM`) from the current resident size, so that the
/// next [`current`] reports the peak of what happened in between. Best effort.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime (fields 14 and 15) in ms; the command name (field 2) may hold spaces, so
/// fields are counted after its closing parenthesis.
fn cpu_ms(stat: &str, ticks_per_sec: u64) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) * 1000 / ticks_per_sec.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1";
        assert_eq!(cpu_ms(stat, 100), Some(3000));
        assert_eq!(cpu_ms("garbage", 100), None);
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), 1024);
        assert_eq!(status_kib(status, "VmHWM:"), 2048);
        assert_eq!(status_kib(status, "VmSwap:"), 0);
    }

    #[test]
    fn reads_this_process() {
        let s = current();
        if cfg!(target_os = "linux") {
            assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
        }
        assert_eq!(s.pid, std::process::id());
    }
}
