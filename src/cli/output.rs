//! Rendering of `--cmd` results: aligned plain text for people, JSON for scripts.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use crate::client::{DownloadReport, UploadReport};
use crate::config::human_bytes;
use crate::digest::Recorded;
use crate::rpc::pb::{
    ClusterStatusResponse, DrainPlanResponse, FileInfo, FsckResponse, GcStatusResponse,
    WorkerStatus,
};

fn json(v: serde_json::Value) -> String {
    format!("{v}\n")
}

fn time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn plural(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// Lays out rows in columns; the first row is the header.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn upload(r: &UploadReport, as_json: bool) -> String {
    let f = &r.file;
    if as_json {
        return json(serde_json::json!({
            "file": f,
            "replaced": r.replaced,
            "replicas_achieved": r.replicas_achieved,
            "retried_chunks": r.attempts_retried,
            "elapsed_ms": r.elapsed.as_millis() as u64,
        }));
    }
    let mut s = format!(
        "{} {}: {}, {}, {}/{} replicas\n",
        if r.replaced { "replaced" } else { "uploaded" },
        f.name,
        human_bytes(f.size),
        plural(f.chunk_count, "chunk"),
        r.replicas_achieved,
        f.replicas_target,
    );
    if r.replicas_achieved < f.replicas_target && f.chunk_count > 0 {
        let _ = writeln!(
            s,
            "warning: only {} live worker(s) could take a replica; the file is under-replicated",
            r.replicas_achieved
        );
    }
    s
}

pub fn download(r: &DownloadReport, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!({
            "name": r.file.name,
            "path": r.path.display().to_string(),
            "size": r.file.size,
            "blake3": r.file.blake3,
            "sha256": r.file.sha256,
            "failovers": r.failovers,
            "elapsed_ms": r.elapsed.as_millis() as u64,
        }));
    }
    let checked = match Recorded::of(&r.file).algorithm() {
        Some(alg) => format!("{alg} verified"),
        None => "chunk CRCs verified".to_string(),
    };
    let mut s = format!(
        "downloaded {} to {} ({}, {checked})\n",
        r.file.name,
        r.path.display(),
        human_bytes(r.file.size)
    );
    if r.failovers > 0 {
        let _ = writeln!(
            s,
            "note: {} replica read(s) failed and were served by another replica",
            r.failovers
        );
    }
    s
}

pub fn delete(f: &FileInfo, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!({ "deleted": f }));
    }
    format!("deleted {} ({})\n", f.name, human_bytes(f.size))
}

fn replicas(f: &FileInfo) -> String {
    format!("{}/{}", f.replicas_min_live, f.replicas_target)
}

pub fn ls(files: &[FileInfo], as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!({ "files": files }));
    }
    let mut rows = vec![vec![
        "NAME".to_string(),
        "SIZE".into(),
        "CHUNKS".into(),
        "REPLICAS".into(),
        "MODIFIED".into(),
    ]];
    for f in files {
        rows.push(vec![
            f.name.clone(),
            human_bytes(f.size),
            f.chunk_count.to_string(),
            replicas(f),
            time(f.modified_unix_ms),
        ]);
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    format!(
        "{}{}, {}\n",
        table(&rows),
        plural(files.len() as u64, "file"),
        human_bytes(total)
    )
}

pub fn stat(f: &FileInfo, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!(f));
    }
    let mut s = String::new();
    let _ = writeln!(s, "name:       {}", f.name);
    let _ = writeln!(s, "size:       {} ({} bytes)", human_bytes(f.size), f.size);
    let _ = writeln!(
        s,
        "chunks:     {} of up to {}",
        f.chunk_count,
        human_bytes(f.chunk_size)
    );
    let _ = writeln!(
        s,
        "replicas:   {} live (minimum over chunks) / {} target",
        f.replicas_min_live, f.replicas_target
    );
    match Recorded::of(f) {
        Recorded::None => {
            let _ = writeln!(
                s,
                "digest:     unknown (rebuilt from worker chunk headers; chunk CRCs still verified)"
            );
        }
        // Aligned with the other labels; `b3sum FILE` / `sha256sum FILE` print the same hex.
        Recorded::Blake3(h) => {
            let _ = writeln!(s, "blake3:     {h}");
        }
        Recorded::Sha256(h) => {
            let _ = writeln!(s, "sha256:     {h}");
        }
    }
    let _ = writeln!(s, "version:    {} (file id {})", f.version, f.file_id);
    let _ = writeln!(s, "modified:   {}", time(f.modified_unix_ms));
    if !f.chunks.is_empty() {
        s.push('\n');
        let mut rows = vec![vec![
            "CHUNK".to_string(),
            "ID".into(),
            "SIZE".into(),
            "CRC32C".into(),
            "REPLICAS".into(),
        ]];
        for c in &f.chunks {
            let reps = if c.replicas.is_empty() {
                "(none known)".to_string()
            } else {
                c.replicas
                    .iter()
                    .map(|r| format!("{} ({})", r.worker, r.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            rows.push(vec![
                c.index.to_string(),
                c.chunk_id.clone(),
                human_bytes(c.length),
                format!("{:08x}", c.crc32c),
                reps,
            ]);
        }
        s.push_str(&table(&rows));
    }
    s
}

pub fn status(st: &ClusterStatusResponse, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!(st));
    }
    let mut s = format!(
        "master {}: {} alive, {} suspect, {} dead\n\n",
        st.master_address, st.workers_alive, st.workers_suspect, st.workers_dead
    );
    let mut rows = vec![vec![
        "WORKER".to_string(),
        "STATE".into(),
        "CAPACITY".into(),
        "USED".into(),
        "USE%".into(),
        "FREE".into(),
        "CHUNKS".into(),
        "LAST HEARTBEAT".into(),
    ]];
    for w in &st.workers {
        let u = w.usage.unwrap_or_default();
        let pct = if u.capacity_bytes > 0 {
            format!(
                "{:.1}%",
                u.used_bytes as f64 * 100.0 / u.capacity_bytes as f64
            )
        } else {
            "-".into()
        };
        let hb = if w.last_heartbeat_ms_ago < 0 {
            "never (since master start)".to_string()
        } else {
            format!("{:.1}s ago", w.last_heartbeat_ms_ago as f64 / 1000.0)
        };
        rows.push(vec![
            w.address.clone(),
            w.state.clone(),
            human_bytes(u.capacity_bytes),
            human_bytes(u.used_bytes),
            pct,
            human_bytes(u.free_bytes),
            w.chunks_mapped.to_string(),
            hb,
        ]);
    }
    if st.workers.is_empty() {
        s.push_str("no workers have registered\n");
    } else {
        s.push_str(&table(&rows));
    }
    let _ = writeln!(
        s,
        "\ncapacity:   {} used of {} ({} free, live workers)",
        human_bytes(st.used_bytes),
        human_bytes(st.capacity_bytes),
        human_bytes(st.free_bytes)
    );
    let _ = writeln!(
        s,
        "files:      {} ({} stored)",
        st.files,
        human_bytes(st.logical_bytes)
    );
    let _ = writeln!(s, "chunks:     {}", st.chunks);
    let health = if st.missing_chunks > 0 {
        "MISSING DATA"
    } else if st.under_replicated_chunks > 0 || st.corrupt_replicas > 0 {
        "DEGRADED"
    } else {
        "healthy"
    };
    let _ = writeln!(
        s,
        "health:     {health}: {} under-replicated, {} missing, {} corrupt replica(s)",
        st.under_replicated_chunks, st.missing_chunks, st.corrupt_replicas
    );
    let _ = writeln!(
        s,
        "replicas:   {} missing, {} endangered (one copy left), {} under target, {} stable, {} over target",
        st.missing_chunks,
        st.endangered_chunks,
        st.under_replicated_chunks - st.endangered_chunks.min(st.under_replicated_chunks),
        st.stable_chunks,
        st.over_target_chunks
    );
    let _ = writeln!(
        s,
        "repair:     {} queued, {} copying, {} chunk(s) / {} repaired so far, {}/s now",
        st.repair_queue,
        st.repairs_in_flight,
        st.repaired_chunks_total,
        human_bytes(st.repaired_bytes_total),
        human_bytes(st.repair_bytes_per_sec)
    );
    let _ = writeln!(
        s,
        "pending:    {} chunk deletion(s), {} orphan chunk(s), {} open upload(s), {} reserved, {} in doubt",
        st.pending_deletions,
        st.orphan_chunks,
        st.open_uploads,
        st.reserved_uploads,
        st.in_doubt_uploads
    );
    if !st.matrix.is_empty() {
        let max_live = st.matrix.iter().map(|c| c.live).max().unwrap_or(0);
        let mut rows = vec![
            std::iter::once("TARGET \\ LIVE".to_string())
                .chain((0..=max_live).map(|l| l.to_string()))
                .collect::<Vec<_>>(),
        ];
        let mut targets: Vec<u32> = st.matrix.iter().map(|c| c.target).collect();
        targets.dedup();
        for t in targets {
            let mut row = vec![t.to_string()];
            for l in 0..=max_live {
                let n = st
                    .matrix
                    .iter()
                    .find(|c| c.target == t && c.live == l)
                    .map(|c| c.chunks)
                    .unwrap_or(0);
                row.push(if n == 0 { "-".into() } else { n.to_string() });
            }
            rows.push(row);
        }
        s.push_str("\nchunks by target and live copies:\n");
        s.push_str(&table(&rows));
    }
    s
}

pub fn drain(w: &WorkerStatus, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!({ "worker": w }));
    }
    if w.draining {
        format!(
            "{} is draining: no new chunks; {} chunk(s) still need a copy elsewhere (watch `status`; safe to stop at 0)\n",
            w.address, w.drain_remaining
        )
    } else {
        format!("{} is no longer draining\n", w.address)
    }
}

pub fn drain_plan(p: &DrainPlanResponse, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!(p));
    }
    let mut s = format!("dry run: {}\n", crate::master::operator::summarize(p));
    let _ = writeln!(
        s,
        "moving its data: about {} at {}/s{}",
        humantime::format_duration(Duration::from_secs(p.estimated_seconds)),
        human_bytes(if p.rate_assumed {
            50 << 20
        } else {
            p.repair_bytes_per_sec
        }),
        if p.rate_assumed {
            " (assumed: nothing was repaired lately)"
        } else {
            " (current repair rate)"
        }
    );
    if !p.at_risk.is_empty() {
        let mut rows = vec![vec![
            "AT RISK".to_string(),
            "LIVE REPLICAS IF IT VANISHED".into(),
            "TARGET".into(),
        ]];
        for f in &p.at_risk {
            rows.push(vec![
                f.name.clone(),
                f.live_after.to_string(),
                f.target.to_string(),
            ]);
        }
        s.push_str(&table(&rows));
    }
    s
}

pub fn fsck(r: &FsckResponse, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!(r));
    }
    let mut s = String::new();
    if r.files.is_empty() {
        let _ = writeln!(
            s,
            "fsck: {} file(s), {} chunk(s): every chunk is at its replica target",
            r.files_checked, r.chunks_checked
        );
        return s;
    }
    let mut rows = vec![vec![
        "FILE".to_string(),
        "LIVE (MIN)".into(),
        "TARGET".into(),
        "CHUNKS SHORT".into(),
        "CHUNKS MISSING".into(),
    ]];
    for f in &r.files {
        rows.push(vec![
            f.name.clone(),
            f.min_live.to_string(),
            f.target.to_string(),
            f.chunks_short.to_string(),
            f.chunks_missing.to_string(),
        ]);
    }
    s.push_str(&table(&rows));
    let _ = writeln!(
        s,
        "fsck: {} of {} file(s) have chunks below target",
        r.files.len(),
        r.files_checked
    );
    s
}

pub fn gc(r: &GcStatusResponse, as_json: bool) -> String {
    if as_json {
        return json(serde_json::json!(r));
    }
    let mut s = format!(
        "dry run: {} chunk(s) to purge (grace period {})\n",
        r.entries.len(),
        humantime::format_duration(Duration::from_millis(r.grace_ms.max(0) as u64))
    );
    if !r.entries.is_empty() {
        let mut rows = vec![vec![
            "CHUNK".to_string(),
            "PURGE IN".into(),
            "WORKERS".into(),
            "WHY".into(),
        ]];
        for e in &r.entries {
            rows.push(vec![
                e.chunk_id.clone(),
                if e.purge_in_ms == 0 {
                    "now".into()
                } else {
                    format!("{:.0}s", e.purge_in_ms as f64 / 1000.0)
                },
                e.workers.join(","),
                e.reason.clone(),
            ]);
        }
        s.push_str(&table(&rows));
    }
    s
}
