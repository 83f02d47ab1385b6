//! Verified downloads: each chunk is read from the first replica that delivers it intact
//! (CRC32C checked here, whatever the worker said), the whole file is checked against its
//! SHA-256, and only then does it appear at the destination.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Code;

use super::{Client, ClientError, Progress};
use crate::chunk;
use crate::rpc::pb::{self, ChunkInfo, FileInfo, read_chunk_response};

/// How long a download waits for a chunk with no known replica (e.g. just after a master
/// restart, before workers have re-registered).
const NO_REPLICA_WAIT: Duration = Duration::from_secs(10);

/// Options of one download.
#[derive(Debug, Default, Clone)]
pub struct DownloadOptions {
    /// Replace an existing destination file.
    pub force: bool,
    pub progress: Option<Arc<Progress>>,
}

/// What a download did.
#[derive(Debug, Clone)]
pub struct DownloadReport {
    pub file: FileInfo,
    pub path: PathBuf,
    /// Replicas that failed and were skipped (each also reported to the master).
    pub failovers: u32,
    pub elapsed: Duration,
}

/// Removes the partial file unless the download completed.
struct PartGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why one replica could not deliver a chunk.
struct ReplicaError {
    /// True if the replica itself is bad (checksum, length): report it to the master.
    bad: bool,
    message: String,
}

impl Client {
    /// Downloads `name` to `dest`. Without `force`, an existing `dest` is an error and nothing
    /// is written. The destination appears only after every byte was verified.
    pub async fn download(
        &self,
        name: &str,
        dest: &Path,
        opts: DownloadOptions,
    ) -> Result<DownloadReport, ClientError> {
        let started = std::time::Instant::now();
        if !opts.force && dest.symlink_metadata().is_ok() {
            return Err(ClientError::DestinationExists(dest.to_path_buf()));
        }
        if dest.is_dir() {
            return Err(ClientError::InvalidInput(format!(
                "{} is a directory",
                dest.display()
            )));
        }
        let mut file = self.stat_with_replicas(name).await?;
        let progress = opts.progress.clone().unwrap_or_default();
        progress.total.store(file.size, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);

        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dest_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_string());
        let part_path = dir.join(format!(
            ".{dest_name}.dfs-part-{:08x}",
            chunk::random_u128() as u32
        ));
        let local_err =
            |op: &'static str, path: &Path, source: std::io::Error| ClientError::LocalIo {
                op,
                path: path.to_path_buf(),
                source,
            };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part_path)
            .map_err(|e| local_err("create", &part_path, e))?;
        let mut guard = PartGuard {
            path: part_path.clone(),
            keep: false,
        };

        let mut sha = Sha256::new();
        let mut failovers = 0;
        let chunks = std::mem::take(&mut file.chunks);
        let mut offset = 0u64;
        for c in &chunks {
            if progress.is_cancelled() {
                return Err(ClientError::Cancelled);
            }
            let before = progress.done.load(Ordering::Relaxed);
            let mut last = String::from("no replica is known");
            let mut done = false;
            for r in &c.replicas {
                out.seek(SeekFrom::Start(offset))
                    .map_err(|e| local_err("write", &part_path, e))?;
                let attempt_sha = sha.clone();
                match self
                    .read_replica(c, &r.worker, &mut out, &part_path, attempt_sha, &progress)
                    .await
                {
                    Ok(s) => {
                        sha = s;
                        done = true;
                        break;
                    }
                    Err(Err(local)) => return Err(local),
                    Err(Ok(e)) => {
                        progress.done.store(before, Ordering::Relaxed);
                        failovers += 1;
                        tracing::warn!(chunk = %c.chunk_id, worker = %r.worker, error = %e.message, "replica failed; trying the next");
                        if e.bad {
                            self.report_bad_replica(&c.chunk_id, &r.worker, &e.message)
                                .await;
                        }
                        last = format!("{}: {}", r.worker, e.message);
                    }
                }
            }
            if !done {
                return Err(ClientError::ReadFailed {
                    index: c.index,
                    last,
                });
            }
            offset += c.length;
        }
        let digest = hex::encode(sha.finalize());
        // A file rebuilt from worker headers has no recorded digest; its chunks' CRCs were
        // still checked one by one above.
        if !file.sha256.is_empty() && digest != file.sha256 {
            return Err(ClientError::Integrity(format!(
                "file SHA-256 is {digest}, expected {}",
                file.sha256
            )));
        }
        out.set_len(offset)
            .and_then(|()| out.sync_all())
            .map_err(|e| local_err("write", &part_path, e))?;
        drop(out);
        if opts.force {
            std::fs::rename(&part_path, dest).map_err(|e| local_err("write", dest, e))?;
        } else {
            // Link, not rename: fails instead of replacing a file that appeared meanwhile.
            std::fs::hard_link(&part_path, dest).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ClientError::DestinationExists(dest.to_path_buf())
                } else {
                    local_err("write", dest, e)
                }
            })?;
            let _ = std::fs::remove_file(&part_path);
        }
        guard.keep = true;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        file.chunks = chunks;
        tracing::info!(
            name,
            bytes = file.size,
            failovers,
            ms = started.elapsed().as_millis() as u64,
            "download complete"
        );
        Ok(DownloadReport {
            file,
            path: dest.to_path_buf(),
            failovers,
            elapsed: started.elapsed(),
        })
    }

    /// `stat`, waiting a bounded time while some chunk has no known replica.
    async fn stat_with_replicas(&self, name: &str) -> Result<FileInfo, ClientError> {
        let deadline = std::time::Instant::now() + NO_REPLICA_WAIT;
        loop {
            let file = self.stat(name).await?;
            let complete = file.chunks.iter().all(|c| !c.replicas.is_empty());
            if complete || std::time::Instant::now() >= deadline {
                return Ok(file);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Reads chunk `c` from `worker` into `out` at its current position. The outer error is
    /// local (fatal); the inner one is about this replica (try the next).
    async fn read_replica(
        &self,
        c: &ChunkInfo,
        worker: &str,
        out: &mut std::fs::File,
        out_path: &Path,
        mut sha: Sha256,
        progress: &Progress,
    ) -> Result<Sha256, Result<ReplicaError, ClientError>> {
        let replica_err = |bad: bool, message: String| Err(Ok(ReplicaError { bad, message }));
        let mut client = match self.worker(worker) {
            Ok(c) => c,
            Err(e) => return replica_err(false, e.to_string()),
        };
        let limit = crate::rpc::transfer_limit(c.length);
        let (tx, mut rx) = mpsc::channel(1);
        let req = pb::ReadChunkRequest {
            chunk_id: c.chunk_id.clone(),
        };
        // The stream is read in a task so that a stalled worker is cut off by the deadline.
        let reader = tokio::spawn(async move {
            let mut stream = match client.read_chunk(req).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        let _abort = AbortTask(reader);
        let deadline = tokio::time::Instant::now() + limit;
        let mut crc = 0u32;
        let mut got = 0u64;
        let mut saw_header = false;
        loop {
            let msg = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => {
                    return replica_err(false, format!("no answer within {}s", limit.as_secs()));
                }
                Ok(None) => break,
                Ok(Some(Err(s))) => {
                    let bad = s.code() == Code::DataLoss;
                    return replica_err(bad, s.message().to_string());
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg.msg {
                Some(read_chunk_response::Msg::Header(h)) => {
                    if h.length != c.length || h.crc32c != c.crc32c {
                        return replica_err(
                            true,
                            format!(
                                "replica describes {} bytes with CRC {:08x}; expected {} bytes with {:08x}",
                                h.length, h.crc32c, c.length, c.crc32c
                            ),
                        );
                    }
                    saw_header = true;
                }
                Some(read_chunk_response::Msg::Data(b)) => {
                    if progress.is_cancelled() {
                        return Err(Err(ClientError::Cancelled));
                    }
                    if !saw_header {
                        return replica_err(false, "data before header".into());
                    }
                    got += b.len() as u64;
                    if got > c.length {
                        return replica_err(
                            true,
                            "replica sent more bytes than the chunk holds".into(),
                        );
                    }
                    crc = chunk::crc32c_append(crc, &b);
                    sha.update(&b);
                    if let Err(e) = out.write_all(&b) {
                        return Err(Err(ClientError::LocalIo {
                            op: "write",
                            path: out_path.to_path_buf(),
                            source: e,
                        }));
                    }
                    progress.done.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                None => {}
            }
        }
        if got != c.length {
            return replica_err(
                false,
                format!("stream ended after {got} of {} bytes", c.length),
            );
        }
        if crc != c.crc32c {
            return replica_err(
                true,
                format!(
                    "checksum mismatch: got {crc:08x}, expected {:08x}",
                    c.crc32c
                ),
            );
        }
        Ok(sha)
    }
}

struct AbortTask(tokio::task::JoinHandle<()>);

impl Drop for AbortTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
