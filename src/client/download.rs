//! Verified reads. Several chunks are fetched at once (each from the first replica that
//! delivers it intact, starting at a different replica per chunk to spread load), each is
//! CRC32C-checked whole before it is used, and the bytes are handed on in file order so the
//! file's whole digest (BLAKE3, or SHA-256 for older files) can be checked. A download
//! appears at its destination only after that check.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tonic::Code;

use super::locations::Location;
use super::read_stream::Piece;
use super::{AbortOnDrop, Client, ClientError, Progress};
use crate::chunk;
use crate::digest::FileHasher;
use crate::rpc::pb::{self, ChunkInfo, FileInfo};
use crate::worker::volume::SMALL_CHUNK_MAX;

/// How long a download waits for a chunk with no known replica (e.g. just after a master
/// restart, before workers have re-registered).
const NO_REPLICA_WAIT: Duration = Duration::from_secs(10);

/// The pauses before a chunk that no replica delivered is tried again (see
/// `Client::fetch_chunk`): about 7 s in all, for a worker that restarts.
const READ_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// Bytes of chunks a read may hold at once (fetched, verified, not yet written). With 8 MiB
/// chunks this is three chunks in flight, which keeps every worker busy on one disk while
/// keeping the client well under the 64 MiB memory target.
const IN_FLIGHT_BYTES: u64 = 24 << 20;
/// At most this many chunks in flight, whatever their size.
const MAX_IN_FLIGHT: usize = 8;

/// Chunks fetched at once for a file of `chunk_size` chunks.
fn in_flight(chunk_size: u64) -> usize {
    ((IN_FLIGHT_BYTES / chunk_size.max(1)) as usize).clamp(1, MAX_IN_FLIGHT)
}

/// Options of one download.
#[derive(Debug, Default, Clone)]
pub struct DownloadOptions {
    /// Replace an existing destination file.
    pub force: bool,
    /// fsync the file and its directory before returning (off by default, like `cp`: the
    /// cluster still holds the durable copy).
    pub fsync: bool,
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
    /// Whether trying it again later may work: a worker down, restarting or slow, not one
    /// that refused the read or holds a bad copy.
    again: bool,
    message: String,
}

impl ReplicaError {
    fn new(bad: bool, message: String) -> ReplicaError {
        ReplicaError {
            bad,
            again: !bad,
            message,
        }
    }

    /// A worker this client cannot even address: no later try would do better.
    fn unusable(message: String) -> ReplicaError {
        ReplicaError {
            again: false,
            ..ReplicaError::new(false, message)
        }
    }

    /// From the worker's (or the transport's) status.
    fn from_status(s: &tonic::Status) -> ReplicaError {
        let bad = s.code() == Code::DataLoss;
        let refused = matches!(
            s.code(),
            Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument
        );
        ReplicaError {
            bad,
            again: !bad && !refused,
            message: s.message().into(),
        }
    }
}

/// One chunk, fetched whole and CRC-checked.
struct Fetched {
    pieces: Vec<Bytes>,
    failovers: u32,
    /// The worker that delivered it.
    from: String,
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
        // This process's own standard output (`-o /dev/stdout`, `/dev/fd/1`), whatever it is
        // (a pipe, a terminal, a file the shell redirected it to): written through the
        // descriptor itself, so a `>>` keeps appending, and never renamed over.
        if let Some(out) = stdout_if_same(dest) {
            return self.download_in_place(name, dest, out, started, opts).await;
        }
        // A device or pipe (`-o /dev/null`, a FIFO) is written in place, as `cp` or `curl -o`
        // would: renaming a finished file over it would replace the device.
        if let Ok(meta) = std::fs::metadata(dest) {
            use std::os::unix::fs::FileTypeExt;
            let t = meta.file_type();
            if is_device_or_pipe(&meta) {
                let out = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dest)
                    .map_err(|source| ClientError::LocalIo {
                        op: "write",
                        path: dest.to_path_buf(),
                        source,
                    })?;
                return self.download_in_place(name, dest, out, started, opts).await;
            }
            if t.is_block_device() || t.is_socket() {
                return Err(ClientError::InvalidInput(format!(
                    "{} is a block device or socket; refusing to write a download to it",
                    dest.display()
                )));
            }
        }
        if !opts.force && dest.symlink_metadata().is_ok() {
            return Err(ClientError::DestinationExists(dest.to_path_buf()));
        }
        if dest.is_dir() {
            return Err(ClientError::InvalidInput(format!(
                "{} is a directory",
                dest.display()
            )));
        }
        let file = self.stat_with_replicas(name).await?;
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
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part_path)
            .map_err(|e| local_err("create", &part_path, e))?;
        let mut guard = PartGuard {
            path: part_path.clone(),
            keep: false,
        };
        let progress = opts.progress.clone().unwrap_or_default();
        let (out, failovers) =
            self.read_file_to(&file, out, &progress)
                .await
                .map_err(|e| match e {
                    ClientError::LocalIo { op, source, .. } => local_err(op, &part_path, source),
                    e => e,
                })?;
        if opts.fsync {
            out.sync_all()
                .map_err(|e| local_err("write", &part_path, e))?;
        }
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
        if opts.fsync
            && let Ok(d) = std::fs::File::open(&dir)
        {
            let _ = d.sync_all();
        }
        Ok(downloaded(name, dest, file, failovers, started))
    }

    /// Streams `name` into `out`, the opened `dest` (a device, a pipe, or standard output).
    /// Each chunk is checked before it is written; the whole file's digest can only be
    /// checked at the end, so a mismatch there is reported after the bytes went out (a reader
    /// of the pipe sees the error as the command's exit status).
    async fn download_in_place(
        &self,
        name: &str,
        dest: &Path,
        out: std::fs::File,
        started: std::time::Instant,
        opts: DownloadOptions,
    ) -> Result<DownloadReport, ClientError> {
        let local_err = |source: std::io::Error| ClientError::LocalIo {
            op: "write",
            path: dest.to_path_buf(),
            source,
        };
        let file = self.stat_with_replicas(name).await?;
        let progress = opts.progress.clone().unwrap_or_default();
        let (_, failovers) =
            self.read_file_to(&file, out, &progress)
                .await
                .map_err(|e| match e {
                    ClientError::LocalIo { source, .. } => local_err(source),
                    e => e,
                })?;
        Ok(downloaded(name, dest, file, failovers, started))
    }

    /// Reads `name` whole into memory, verified. For small files (benchmarks, tools); large
    /// files should stream with [`Client::download`] or [`Client::read_file_to`].
    ///
    /// A small file this client recently wrote or read is asked of its worker at the same
    /// time as of the master while few of its reads are under way (see `locations`): one
    /// round trip instead of two in a row.
    pub async fn read(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        let (_reading, early_ok) = self.locations.start_read();
        let guess = early_ok.then(|| self.locations.get(name)).flatten();
        let (file, early) = match guess {
            Some(guess) => {
                let worker = guess.worker().to_string();
                let (file, pieces) = self.stat_beside_read(name, guess).await?;
                (file, pieces.map(|p| (p, Some(worker))))
            }
            None => (self.stat_with_replicas(name).await?, None),
        };
        if let [c] = file.chunks.as_slice()
            && c.length <= SMALL_CHUNK_MAX
        {
            // One small chunk: fetched and checked right here, with no task or thread hop.
            let (pieces, worker) = match early {
                Some(v) => v,
                None => {
                    let fetched = self.fetch_chunk(name, c.clone(), Arc::default()).await?;
                    (fetched.pieces, Some(fetched.from))
                }
            };
            let mut hash = FileHasher::verifying(&file);
            let mut buf = Vec::with_capacity(c.length as usize);
            for p in &pieces {
                hash.update(p);
                buf.extend_from_slice(p);
            }
            check_whole(&file, buf.len() as u64, hash)?;
            match worker.and_then(|w| Location::new(&c.chunk_id, c.length, c.crc32c, &c.token, &w))
            {
                Some(l) => self.locations.put(name, l),
                None => self.locations.forget(name),
            }
            return Ok(buf);
        }
        self.locations.forget(name);
        let buf = Vec::with_capacity(file.size.min(64 << 20) as usize);
        let (buf, _) = self.read_file_to(&file, buf, &Arc::default()).await?;
        Ok(buf)
    }

    /// The master's answer for `name` and, when it confirms `guess`, the chunk read from the
    /// guessed worker at the same time (checked against the guess's CRC, which the answer
    /// matched). A read from the guess that fails is not reported as a bad replica: the
    /// caller reads again as usual, and that read reports what it finds.
    async fn stat_beside_read(
        &self,
        name: &str,
        guess: Location,
    ) -> Result<(FileInfo, Option<Vec<Bytes>>), ClientError> {
        let chunk = guess.chunk();
        let early = async {
            let mut got = 0;
            let r = self
                .read_small_replica(&chunk, guess.worker(), &Progress::default(), &mut got)
                .await;
            if let Err(Ok(e)) = &r {
                tracing::debug!(name, worker = guess.worker(), error = %e.message, "early read failed; reading as usual");
            }
            r.ok()
        };
        let stat = self.stat_with_replicas(name);
        let (mut early, mut stat) = (std::pin::pin!(early), std::pin::pin!(stat));
        let mut done_early = None;
        let file = loop {
            tokio::select! {
                biased;
                r = &mut stat => break r,
                r = &mut early, if done_early.is_none() => done_early = Some(r),
            }
        };
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                self.locations.forget(name);
                return Err(e);
            }
        };
        if !matches!(file.chunks.as_slice(), [c] if guess.matches(c)) {
            // Replaced, or the replica is no longer live: whatever the worker sends is dropped.
            self.locations.count_stale();
            self.locations.forget(name);
            return Ok((file, None));
        }
        let pieces = match done_early {
            Some(r) => r,
            None => early.await,
        };
        match pieces {
            Some(p) => {
                self.locations.count_used();
                Ok((file, Some(p)))
            }
            None => {
                self.locations.count_failed();
                self.locations.forget(name);
                Ok((file, None))
            }
        }
    }

    /// Streams `file`'s bytes in order into `out` (written off the async threads), fetching
    /// several chunks at once; checks every chunk's CRC32C and the whole file's digest.
    /// Returns the writer and how many replicas failed over. On error `out` holds a prefix
    /// of the file (or nothing) and must be discarded.
    pub async fn read_file_to<W: Write + Send + 'static>(
        &self,
        file: &FileInfo,
        out: W,
        progress: &Arc<Progress>,
    ) -> Result<(W, u32), ClientError> {
        progress.total.store(file.size, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let name: Arc<str> = file.name.as_str().into();
        let mut fetches = futures::stream::iter(file.chunks.iter().cloned().map(|c| {
            let client = self.clone();
            let progress = progress.clone();
            let name = name.clone();
            // Spawned so that fetches run in parallel with each other and with the writing.
            let task = tokio::spawn(async move { client.fetch_chunk(&name, c, progress).await });
            async move {
                let _abort = AbortOnDrop(task.abort_handle());
                task.await
                    .map_err(|e| ClientError::Integrity(format!("chunk fetch failed: {e}")))?
            }
        }))
        .buffered(in_flight(file.chunk_size));
        let mut state = Some((out, FileHasher::verifying(file)));
        let mut failovers = 0;
        let mut written = 0u64;
        while let Some(fetched) = fetches.next().await {
            let fetched = fetched?;
            failovers += fetched.failovers;
            let (mut out, mut hash) = state.take().ok_or_else(|| {
                ClientError::Integrity("download writer lost after an error".into())
            })?;
            let pieces = fetched.pieces;
            let (out, hash, n) = tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                for p in &pieces {
                    hash.update(p);
                    out.write_all(p)?;
                    n += p.len() as u64;
                }
                Ok::<_, std::io::Error>((out, hash, n))
            })
            .await
            .map_err(|e| ClientError::Integrity(format!("download writer failed: {e}")))?
            .map_err(|source| ClientError::LocalIo {
                op: "write",
                path: PathBuf::new(),
                source,
            })?;
            written += n;
            state = Some((out, hash));
        }
        let (mut out, hash) =
            state.ok_or_else(|| ClientError::Integrity("download writer lost".into()))?;
        check_whole(file, written, hash)?;
        out.flush().map_err(|source| ClientError::LocalIo {
            op: "write",
            path: PathBuf::new(),
            source,
        })?;
        Ok((out, failovers))
    }

    /// `stat`, waiting a bounded time while some chunk has no known replica.
    pub(crate) async fn stat_with_replicas(&self, name: &str) -> Result<FileInfo, ClientError> {
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

    /// The workers this client tries for chunk `c`, in order (each client starts at its own
    /// place among the alive replicas). For tools and tests that need to know which copy a
    /// read meets first.
    pub fn read_order<'a>(&self, c: &'a ChunkInfo) -> Vec<&'a str> {
        replica_order(c, self.read_seed)
            .into_iter()
            .map(|i| c.replicas[i].worker.as_str())
            .collect()
    }

    /// Of a new chunk's `workers`, the one this client would read it from first: what the
    /// master's answer would list first in [`replica_order`] while they are all alive.
    pub(super) fn first_reader<'a>(&self, workers: &'a [String]) -> Option<&'a str> {
        let mut sorted: Vec<&str> = workers.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        let i = first_alive(self.read_seed, 0, sorted.len());
        sorted.get(i).copied()
    }

    /// Fetches chunk `c` of file `name` whole from the first replica that delivers it
    /// intact, in the order of [`replica_order`]. If none does, it tries again after a pause
    /// (1 s, then 2 s, then 4 s), with the chunk's replicas as the master lists them then: a
    /// worker that restarts (its only replica, or every one of them) is back within a few
    /// seconds, and a chunk re-replicated meanwhile is found where it went. A replica found
    /// corrupt is not tried again. As HDFS's client refetches block locations after a
    /// round of failures.
    async fn fetch_chunk(
        &self,
        name: &str,
        mut c: ChunkInfo,
        progress: Arc<Progress>,
    ) -> Result<Fetched, ClientError> {
        let mut last = String::from("no replica is known");
        let mut failovers = 0;
        let mut corrupt: Vec<String> = Vec::new();
        // Whether some failure of the last round may pass later (or no replica is known
        // yet); if not, the error stands at once.
        let mut worth_again = true;
        for round in 0..=READ_RETRY_PAUSES.len() {
            if !worth_again {
                break;
            }
            if round > 0 {
                let pause = READ_RETRY_PAUSES[round - 1];
                tracing::warn!(name, chunk = %c.chunk_id, error = %last, "no replica delivered the chunk; trying again in {} s", pause.as_secs());
                let until = std::time::Instant::now() + pause;
                while std::time::Instant::now() < until {
                    if progress.is_cancelled() {
                        return Err(ClientError::Cancelled);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Ok(f) = self.stat(name).await
                    && let Some(fresh) = f.chunks.into_iter().find(|x| x.chunk_id == c.chunk_id)
                {
                    c = fresh;
                }
            }
            worth_again = c.replicas.is_empty();
            for i in replica_order(&c, self.read_seed) {
                if progress.is_cancelled() {
                    return Err(ClientError::Cancelled);
                }
                let r = &c.replicas[i];
                if corrupt.contains(&r.worker) {
                    continue;
                }
                let mut got = 0u64;
                match self.read_replica(&c, &r.worker, &progress, &mut got).await {
                    Ok(pieces) => {
                        return Ok(Fetched {
                            pieces,
                            failovers,
                            from: r.worker.clone(),
                        });
                    }
                    Err(Err(local)) => return Err(local),
                    Err(Ok(e)) => {
                        progress.done.fetch_sub(got, Ordering::Relaxed);
                        failovers += 1;
                        tracing::warn!(chunk = %c.chunk_id, worker = %r.worker, error = %e.message, "replica failed; trying the next");
                        if e.bad {
                            self.report_bad_replica(&c.chunk_id, &r.worker, &e.message)
                                .await;
                            corrupt.push(r.worker.clone());
                        }
                        worth_again |= e.again;
                        last = format!("{}: {}", r.worker, e.message);
                    }
                }
            }
        }
        Err(ClientError::ReadFailed {
            index: c.index,
            last,
        })
    }

    /// Reads chunk `c` whole from `worker`, counting received bytes in `got`. The outer error
    /// is fatal (cancelled); the inner one is about this replica (try the next).
    async fn read_replica(
        &self,
        c: &ChunkInfo,
        worker: &str,
        progress: &Progress,
        got: &mut u64,
    ) -> Result<Vec<Bytes>, Result<ReplicaError, ClientError>> {
        let replica_err = |bad: bool, message: String| Err(Ok(ReplicaError::new(bad, message)));
        if c.length <= SMALL_CHUNK_MAX {
            return self.read_small_replica(c, worker, progress, got).await;
        }
        let channel = match self.worker_channel(worker) {
            Ok(c) => c,
            Err(e) => return Err(Ok(ReplicaError::unusable(e.to_string()))),
        };
        let limit = crate::rpc::transfer_limit(c.length);
        let req = pb::ReadChunkRequest {
            chunk_id: c.chunk_id.clone(),
            token: c.token.clone(),
        };
        // Every wait is under one deadline, so a stalled worker is cut off; dropping the
        // stream cancels the call. (HTTP/2 keeps receiving into the stream's window while
        // this task checks CRCs, so no separate reader task is needed.)
        let deadline = tokio::time::Instant::now() + limit;
        let timed_out = || replica_err(false, format!("no answer within {}s", limit.as_secs()));
        let failed = |s: tonic::Status| Err(Ok(ReplicaError::from_status(&s)));
        let call = super::read_stream::read_chunk(&channel, &req);
        let mut stream = match tokio::time::timeout_at(deadline, call).await {
            Err(_) => return timed_out(),
            Ok(Err(s)) => return failed(s),
            Ok(Ok(s)) => s,
        };
        let mut crc = 0u32;
        let mut saw_header = false;
        let mut pieces = Vec::new();
        loop {
            let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return timed_out(),
                Ok(Ok(None)) => break,
                Ok(Err(s)) => return failed(s),
                Ok(Ok(Some(m))) => m,
            };
            match msg {
                Piece::Header(h) => {
                    if let Some(why) = header_mismatch(&h, c) {
                        return replica_err(true, why);
                    }
                    saw_header = true;
                }
                Piece::Data(parts) => {
                    if progress.is_cancelled() {
                        return Err(Err(ClientError::Cancelled));
                    }
                    if !saw_header {
                        return replica_err(false, "data before header".into());
                    }
                    for b in parts {
                        *got += b.len() as u64;
                        if *got > c.length {
                            return replica_err(
                                true,
                                "replica sent more bytes than the chunk holds".into(),
                            );
                        }
                        crc = chunk::crc32c_append(crc, &b);
                        progress.done.fetch_add(b.len() as u64, Ordering::Relaxed);
                        pieces.push(b);
                    }
                }
            }
        }
        if *got != c.length {
            return replica_err(
                false,
                format!("stream ended after {} of {} bytes", *got, c.length),
            );
        }
        if let Some(why) = crc_mismatch(crc, c) {
            return replica_err(true, why);
        }
        Ok(pieces)
    }

    /// [`Client::read_replica`] for a small chunk: one whole answer, batched with the other
    /// small reads waiting for the same worker, held to the same checks.
    async fn read_small_replica(
        &self,
        c: &ChunkInfo,
        worker: &str,
        progress: &Progress,
        got: &mut u64,
    ) -> Result<Vec<Bytes>, Result<ReplicaError, ClientError>> {
        let replica_err = |bad: bool, message: String| Err(Ok(ReplicaError::new(bad, message)));
        let reads = match self.small_reads(worker) {
            Ok(r) => r,
            Err(e) => return Err(Ok(ReplicaError::unusable(e.to_string()))),
        };
        let read = super::calls::SmallRead {
            req: pb::ReadChunkRequest {
                chunk_id: c.chunk_id.clone(),
                token: c.token.clone(),
            },
            length: c.length,
        };
        let (h, data) = match reads.call(read).await {
            Ok(v) => v,
            Err(s) => return Err(Ok(ReplicaError::from_status(&s))),
        };
        if progress.is_cancelled() {
            return Err(Err(ClientError::Cancelled));
        }
        if let Some(why) = header_mismatch(&h, c) {
            return replica_err(true, why);
        }
        *got = data.len() as u64;
        if *got != c.length {
            return replica_err(true, format!("replica sent {} of {} bytes", *got, c.length));
        }
        if let Some(why) = crc_mismatch(chunk::crc32c_append(0, &data), c) {
            return replica_err(true, why);
        }
        progress.done.fetch_add(*got, Ordering::Relaxed);
        Ok(vec![data])
    }
}

/// Whether `path` names the very file this process's standard output is (followed through
/// symbolic links, as `/dev/stdout` is one): then the download's bytes are the output, and
/// anything else a command prints must go elsewhere.
pub(crate) fn is_stdout(path: &Path) -> bool {
    stdout_if_same(path).is_some()
}

/// Whether a download to `dest` is written in place rather than into a file renamed over
/// it: standard output, a character device or a FIFO. Bytes written there cannot be taken
/// back if the download stops part-way.
pub(crate) fn writes_in_place(dest: &Path) -> bool {
    is_stdout(dest) || std::fs::metadata(dest).is_ok_and(|m| is_device_or_pipe(&m))
}

fn is_device_or_pipe(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    t.is_char_device() || t.is_fifo()
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// A handle on standard output when `dest` is it (see [`is_stdout`]); `-` names it, as
/// `curl -o -` takes it.
fn stdout_if_same(dest: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    let out = std::fs::File::from(fd);
    if dest == Path::new(STDOUT) {
        return Some(out);
    }
    let target = std::fs::metadata(dest).ok()?;
    let own = out.metadata().ok()?;
    same_file(&own, &target).then_some(out)
}

/// The destination that names standard output (`download NAME -o -`).
pub const STDOUT: &str = "-";

/// The report of a finished download, logged.
fn downloaded(
    name: &str,
    dest: &Path,
    file: FileInfo,
    failovers: u32,
    started: std::time::Instant,
) -> DownloadReport {
    tracing::info!(
        name,
        bytes = file.size,
        failovers,
        ms = started.elapsed().as_millis() as u64,
        "download complete"
    );
    DownloadReport {
        file,
        path: dest.to_path_buf(),
        failovers,
        elapsed: started.elapsed(),
    }
}

/// Why a replica's header does not describe chunk `c`, if it does not (a bad replica).
fn header_mismatch(h: &pb::ChunkHeader, c: &ChunkInfo) -> Option<String> {
    (h.length != c.length || h.crc32c != c.crc32c).then(|| {
        format!(
            "replica describes {} bytes with CRC {:08x}; expected {} bytes with {:08x}",
            h.length, h.crc32c, c.length, c.crc32c
        )
    })
}

/// Why the CRC32C computed over a replica's bytes is not chunk `c`'s, if it is not.
fn crc_mismatch(crc: u32, c: &ChunkInfo) -> Option<String> {
    (crc != c.crc32c).then(|| {
        format!(
            "checksum mismatch: got {crc:08x}, expected {:08x}",
            c.crc32c
        )
    })
}

/// Checks a whole file's length and digest once every chunk has been read. A file rebuilt
/// from worker headers has no recorded digest; its chunks' CRCs were still checked one by one.
fn check_whole(file: &FileInfo, written: u64, digest: FileHasher) -> Result<(), ClientError> {
    if written != file.size {
        return Err(ClientError::Integrity(format!(
            "read {written} bytes, the file holds {}",
            file.size
        )));
    }
    digest.check(file).map_err(ClientError::Integrity)
}

/// The order in which a chunk's replicas are tried: the alive ones first (the master lists
/// them first, sorted by address), starting at the client's `seed` plus the chunk's index,
/// then the rest as listed. The index spreads one large file's chunks over the workers; the
/// seed spreads clients. Without the seed every client would read one-chunk files from the
/// worker whose address sorts first. Spreading one client's small files over every replica
/// instead cost 10–13 % of the reads at one client and 35–45 % at sixteen on the two-core
/// bench host (four rounds each): its batches per worker were smaller, and each worker
/// process woke more often with less to do.
fn replica_order(c: &ChunkInfo, seed: u64) -> Vec<usize> {
    let n = c.replicas.len();
    let alive = c.replicas.iter().take_while(|r| r.state == "alive").count();
    if alive == 0 {
        return (0..n).collect();
    }
    let start = first_alive(seed, c.index, alive);
    (0..alive)
        .map(|k| (start + k) % alive)
        .chain(alive..n)
        .collect()
}

/// Where a client with `seed` starts among `alive` live replicas of chunk `index`.
fn first_alive(seed: u64, index: u32, alive: usize) -> usize {
    (seed.wrapping_add(u64::from(index)) % alive.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::pb::ReplicaInfo;

    fn chunk(index: u32, states: &[&str]) -> ChunkInfo {
        ChunkInfo {
            index,
            replicas: states
                .iter()
                .enumerate()
                .map(|(i, s)| ReplicaInfo {
                    worker: format!("w{i}"),
                    state: s.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn clients_spread_over_the_alive_replicas_and_each_tries_every_one() {
        let mut first = [0usize; 3];
        for seed in 0..300u64 {
            let order = replica_order(&chunk(0, &["alive", "alive", "alive"]), seed * 7919);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2], "every replica once: {order:?}");
            first[order[0]] += 1;
        }
        assert_eq!(first, [100, 100, 100]);
        // One client: a large file's chunks start at successive replicas.
        let starts: Vec<usize> = (0..6)
            .map(|i| replica_order(&chunk(i, &["alive", "alive", "alive"]), 41)[0])
            .collect();
        assert_eq!(starts, [2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn replicas_not_alive_are_tried_last_in_the_masters_order() {
        for seed in 0..50u64 {
            let order = replica_order(&chunk(3, &["alive", "alive", "suspect", "dead"]), seed);
            assert!(
                order[..2].contains(&0) && order[..2].contains(&1),
                "{order:?}"
            );
            assert_eq!(&order[2..], [2, 3]);
        }
        assert_eq!(replica_order(&chunk(0, &["suspect", "dead"]), 5), [0, 1]);
        assert!(replica_order(&chunk(0, &[]), 5).is_empty());
    }
}
