//! `master --rebuild-from-workers`: reconstructs the namespace from the self-describing chunk
//! headers that live workers report, when the master's own metadata is lost.
//!
//! For every name, the newest version whose chunks are all present (every index, each of the
//! right length) comes back; newer versions with chunks missing are listed as incomplete, and
//! their chunks (like those of older versions) are left to garbage collection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::store::{ChunkRef, FileRecord, MetaStoreExt};
use super::{Master, MasterError};
use crate::chunk::ChunkId;
use crate::config::human_bytes;
use crate::events::Level;
use crate::rpc::pb::ChunkReport;

/// One version of a file as its chunks describe it.
#[derive(Default)]
struct Candidate {
    file_id: u64,
    size: u64,
    chunk_size: u64,
    created_unix_ms: i64,
    /// index → (chunk id, length, crc, workers holding it)
    chunks: BTreeMap<u32, (String, u64, u32, Vec<String>)>,
}

/// What a rebuild found.
#[derive(Debug, Default)]
pub struct RebuildOutcome {
    pub files: Vec<FileRecord>,
    /// Names whose newest version is missing chunks: (name, version, chunks present, needed).
    pub incomplete: Vec<(String, u64, usize, u64)>,
    pub chunks_seen: usize,
    /// Chunks without a usable header (written before headers carried the file size).
    pub undescribed: usize,
}

/// Decides the namespace from worker reports (pure, so it can be tested on its own).
pub fn decide(
    reports: &HashMap<String, Vec<ChunkReport>>,
    default_replicas: u32,
) -> RebuildOutcome {
    let mut out = RebuildOutcome::default();
    let mut by_name: HashMap<String, BTreeMap<u64, Candidate>> = HashMap::new();
    for (worker, chunks) in reports {
        for c in chunks {
            out.chunks_seen += 1;
            let Some(h) = &c.header else {
                out.undescribed += 1;
                continue;
            };
            if h.chunk_size == 0 || crate::names::validate(&h.file_name).is_err() {
                out.undescribed += 1;
                continue;
            }
            let cand = by_name
                .entry(h.file_name.clone())
                .or_default()
                .entry(h.file_version)
                .or_default();
            // 0: written through a reserved upload, whose id the commit fixed; a new name's
            // id is its first version, the best guess left.
            cand.file_id = if h.file_id != 0 {
                h.file_id
            } else {
                h.file_version
            };
            // A streamed upload knew its size only at its last chunk: the others say 0.
            cand.size = cand.size.max(h.file_size);
            cand.chunk_size = h.chunk_size;
            cand.created_unix_ms = cand.created_unix_ms.max(h.created_unix_ms);
            let e = cand
                .chunks
                .entry(h.chunk_index)
                .or_insert_with(|| (h.chunk_id.clone(), h.length, h.crc32c, Vec::new()));
            // Two different chunk ids for one index and version cannot both be right (a
            // retried pipeline): keep the first, the other is garbage.
            if e.0 == h.chunk_id && !e.3.contains(worker) {
                e.3.push(worker.clone());
            }
        }
    }
    let mut names: Vec<_> = by_name.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, versions) in names {
        let newest = versions.keys().next_back().copied().unwrap_or(0);
        for (&version, c) in versions.iter().rev() {
            let n = c.size.div_ceil(c.chunk_size);
            let complete = (0..n).all(|i| {
                let want = c.size.saturating_sub(i * c.chunk_size).min(c.chunk_size);
                c.chunks.get(&(i as u32)).is_some_and(|x| x.1 == want)
            }) && c.chunks.len() as u64 == n;
            if !complete {
                if version == newest {
                    // No size at all: a streamed file whose last chunk is missing, so it had
                    // at least one more than the highest seen.
                    let need = match c.chunks.keys().next_back() {
                        Some(&top) if c.size == 0 => n.max(top as u64 + 2),
                        _ => n,
                    };
                    out.incomplete
                        .push((name.clone(), version, c.chunks.len(), need));
                }
                continue;
            }
            out.files.push(FileRecord {
                name: name.clone(),
                file_id: c.file_id,
                version,
                size: c.size,
                chunk_size: c.chunk_size,
                replicas: default_replicas,
                modified_unix_ms: c.created_unix_ms,
                // The whole-file digest is not in the chunk headers; per-chunk CRCs still
                // protect every read.
                sha256: String::new(),
                blake3: String::new(),
                pending_upload: String::new(),
                pending_workers: Vec::new(),
                chunks: c
                    .chunks
                    .values()
                    .map(|(id, len, crc, _)| ChunkRef {
                        chunk_id: id.clone(),
                        length: *len,
                        crc32c: *crc,
                    })
                    .collect(),
            });
            break;
        }
    }
    out
}

/// Waits for the workers' reports for `window`, then rebuilds and opens for business.
pub(crate) async fn rebuild_after(
    master: Arc<Master>,
    window: Duration,
    mut stop: watch::Receiver<bool>,
) {
    master.events.record(
        Level::Warn,
        format!(
            "rebuilding metadata from worker chunk headers; collecting reports for {}",
            humantime::format_duration(window)
        ),
    );
    tokio::select! {
        _ = stop.changed() => return,
        _ = tokio::time::sleep(window) => {}
    }
    if let Err(e) = master.rebuild().await {
        master
            .events
            .record(Level::Error, format!("metadata rebuild failed: {e}"));
    }
}

impl Master {
    async fn rebuild(self: &Arc<Self>) -> Result<(), MasterError> {
        let reports = std::mem::take(&mut self.lock().rebuild_reports);
        let workers = reports.len();
        let outcome = decide(&reports, self.cfg.default_replicas);
        let files = outcome.files.clone();
        let max_id = files
            .iter()
            .map(|f| f.version.max(f.file_id))
            .max()
            .unwrap_or(0);
        let _g = self.ns_lock.lock().await;
        self.blocking(move |m| {
            m.store.write_with(|t| -> Result<(), MasterError> {
                for f in &files {
                    t.put_file(f)?;
                }
                t.ensure_file_id_above(max_id)?;
                Ok(())
            })?;
            let mut inner = m.lock();
            inner.next_version = inner.next_version.max(max_id + 1);
            Ok(())
        })
        .await?;
        // Rebuild the replica map from the same reports.
        let holders: HashMap<&str, Vec<&str>> = {
            let mut h: HashMap<&str, Vec<&str>> = HashMap::new();
            for (w, chunks) in &reports {
                for c in chunks {
                    h.entry(c.chunk_id.as_str()).or_default().push(w.as_str());
                }
            }
            h
        };
        let mut bytes = 0;
        {
            let mut inner = self.lock();
            for f in &outcome.files {
                inner.files += 1;
                inner.logical_bytes += f.size;
                bytes += f.size;
                for c in &f.chunks {
                    let Ok(id) = c.chunk_id.parse::<ChunkId>() else {
                        continue;
                    };
                    let reps = holders
                        .get(c.chunk_id.as_str())
                        .map(|ws| ws.iter().map(|w| inner.registry.intern(w)).collect())
                        .unwrap_or_default();
                    inner.chunks.insert(id, f.replicas, c.length, reps);
                    inner.orphans.remove(&c.chunk_id);
                }
            }
        }
        self.rebuilding.store(false, Ordering::Relaxed);
        self.events.record(
            Level::Warn,
            format!(
                "metadata rebuilt from {workers} worker(s): {} file(s), {}, from {} chunk report(s); {} incomplete{}",
                outcome.files.len(),
                human_bytes(bytes),
                outcome.chunks_seen,
                outcome.incomplete.len(),
                if outcome.undescribed > 0 {
                    format!("; {} chunk(s) without a usable header", outcome.undescribed)
                } else {
                    String::new()
                }
            ),
        );
        for (name, version, have, need) in &outcome.incomplete {
            self.events.record(
                Level::Error,
                format!(
                    "not rebuilt: {name:?} version {version} has {have} of its {need} chunk(s) on live workers"
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::pb::ChunkHeader;

    fn rep(name: &str, version: u64, index: u32, size: u64, id: &str) -> ChunkReport {
        let cs = 10;
        let len = size.saturating_sub(index as u64 * cs).min(cs);
        ChunkReport {
            chunk_id: id.into(),
            length: len,
            crc32c: 0,
            header: Some(ChunkHeader {
                format_version: 1,
                chunk_id: id.into(),
                file_id: 1,
                file_name: name.into(),
                chunk_index: index,
                file_version: version,
                length: len,
                file_size: size,
                chunk_size: cs,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn newest_complete_version_wins_and_incomplete_are_listed() {
        let mut r: HashMap<String, Vec<ChunkReport>> = HashMap::new();
        r.insert(
            "w1".into(),
            vec![
                rep("a", 1, 0, 15, "a1-0"),
                rep("a", 1, 1, 15, "a1-1"),
                rep("a", 2, 0, 25, "a2-0"), // version 2 lacks chunks 1 and 2
                rep("b", 5, 0, 7, "b5-0"),
            ],
        );
        r.insert(
            "w2".into(),
            vec![rep("a", 1, 1, 15, "a1-1"), rep("b", 5, 0, 7, "b5-0")],
        );
        let o = decide(&r, 3);
        let names: Vec<(&str, u64)> = o
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.version))
            .collect();
        assert_eq!(names, [("a", 1), ("b", 5)]);
        assert_eq!(o.files[0].chunks.len(), 2);
        assert_eq!(o.incomplete, vec![("a".to_string(), 2, 1, 3)]);
        assert_eq!(o.chunks_seen, 6);
    }

    #[test]
    fn a_streamed_file_takes_its_size_from_its_last_chunk() {
        // Uploaded from a pipe: only the last chunk's header knows the size.
        let streamed = |index: u32, id: &str| {
            let mut c = rep("p", 3, index, 25, id);
            if let Some(h) = c.header.as_mut()
                && index < 2
            {
                h.file_size = 0;
            }
            c
        };
        let mut r: HashMap<String, Vec<ChunkReport>> = HashMap::new();
        r.insert(
            "w1".into(),
            vec![streamed(0, "p0"), streamed(1, "p1"), streamed(2, "p2")],
        );
        let o = decide(&r, 1);
        assert_eq!(o.files.len(), 1);
        assert_eq!((o.files[0].size, o.files[0].chunks.len()), (25, 3));

        // Its last chunk lost: incomplete, and it needed more chunks than it has.
        r.insert("w1".into(), vec![streamed(0, "p0"), streamed(1, "p1")]);
        let o = decide(&r, 1);
        assert!(o.files.is_empty());
        assert_eq!(o.incomplete, vec![("p".to_string(), 3, 2, 3)]);
    }

    #[test]
    fn a_chunk_written_through_a_reserved_upload_takes_its_version_as_file_id() {
        let mut r: HashMap<String, Vec<ChunkReport>> = HashMap::new();
        let mut reserved = rep("s", 9, 0, 4, "s9-0");
        if let Some(h) = reserved.header.as_mut() {
            h.file_id = 0;
        }
        r.insert("w1".into(), vec![reserved, rep("t", 3, 0, 4, "t3-0")]);
        let o = decide(&r, 3);
        let ids: Vec<(&str, u64, u64)> = o
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.version, f.file_id))
            .collect();
        assert_eq!(ids, [("s", 9, 9), ("t", 3, 1)]);
    }
}
