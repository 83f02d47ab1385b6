//! A whole cluster in one process: a master and N workers on 127.0.0.1 port 0, with their data
//! under one directory. Integration tests use it, and so will `dfs-tui --local N`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::master::{Master, MasterConfig, MasterError};
use crate::worker::{Worker, WorkerConfig, WorkerError};

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("no worker {0} in this cluster")]
    NoSuchWorker(usize),
}

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    pub workers: usize,
    pub chunk_size: u64,
    pub replicas: u32,
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub worker_capacity: Option<u64>,
    pub upload_lease: Duration,
    /// Reuse the ports of the previous run in the same directory (kept in `<dir>/ports`), so
    /// a restarted cluster's workers keep their identities. Tests leave this off.
    pub sticky_ports: bool,
    /// Scrubber read rate per worker (bytes/s; 0 = off) and pause between passes.
    pub scrub_rate: u64,
    pub scrub_interval: Duration,
    /// Garbage (and orphan chunks) are deleted only after this grace period.
    pub gc_grace: Duration,
    /// See `MasterConfig::in_doubt_grace`.
    pub in_doubt_grace: Duration,
    pub max_repairs_per_worker: usize,
    /// Run the master's repair loop (see `MasterConfig::repair`).
    pub repair: bool,
    /// Shared by the master and every worker: turns on tokens and chunk capabilities.
    pub cluster_secret: Option<crate::security::ClusterSecret>,
    /// TLS material every node uses (one certificate for all, as `gen-certs` makes for tests).
    pub tls: Option<crate::security::tls::TlsMaterial>,
    pub worker_limits: crate::worker::WorkerLimits,
    pub master_limits: crate::master::MasterLimits,
}

impl Default for LocalClusterConfig {
    fn default() -> Self {
        LocalClusterConfig {
            workers: 3,
            chunk_size: 8 << 20,
            replicas: 3,
            heartbeat_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            worker_capacity: None,
            upload_lease: Duration::from_secs(600),
            sticky_ports: false,
            scrub_rate: 32 << 20,
            scrub_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(60),
            in_doubt_grace: Duration::from_secs(4),
            max_repairs_per_worker: 2,
            repair: true,
            cluster_secret: None,
            tls: None,
            worker_limits: Default::default(),
            master_limits: Default::default(),
        }
    }
}

/// Ports remembered from the previous run in `dir` (master first), if any.
fn load_ports(dir: &Path) -> Vec<u16> {
    std::fs::read_to_string(dir.join("ports"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Binds 127.0.0.1 on `port` if it is free, else on any free port.
async fn bind_preferring(port: Option<u16>) -> Result<TcpListener, ClusterError> {
    if let Some(p) = port
        && let Ok(l) = TcpListener::bind(("127.0.0.1", p)).await
    {
        return Ok(l);
    }
    bind("127.0.0.1:0").await
}

/// A node's server task and the switch that stops it gracefully.
struct Node {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Node {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.task.abort();
    }

    fn kill(self) {
        self.task.abort();
    }
}

struct LocalWorker {
    addr: String,
    dir: PathBuf,
    node: Option<Node>,
}

/// A running in-process cluster. Dropping it stops every node abruptly.
pub struct LocalCluster {
    cfg: LocalClusterConfig,
    master: Arc<Master>,
    master_addr: String,
    master_node: Option<Node>,
    workers: Vec<LocalWorker>,
}

async fn bind(addr: &str) -> Result<TcpListener, ClusterError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ClusterError::Bind {
            addr: addr.to_string(),
            source,
        })
}

impl LocalCluster {
    /// Starts a master in `<dir>/master` and workers in `<dir>/worker-<i>`, and waits (bounded)
    /// until every worker has registered.
    pub async fn start(dir: &Path, cfg: LocalClusterConfig) -> Result<LocalCluster, ClusterError> {
        let mut mcfg = MasterConfig::new(dir.join("master"));
        mcfg.chunk_size = cfg.chunk_size;
        mcfg.default_replicas = cfg.replicas;
        mcfg.heartbeat_timeout = cfg.heartbeat_timeout;
        mcfg.heartbeat_interval = cfg.heartbeat_interval;
        mcfg.upload_lease = cfg.upload_lease;
        mcfg.gc_grace = cfg.gc_grace;
        mcfg.in_doubt_grace = cfg.in_doubt_grace;
        mcfg.max_repairs_per_worker = cfg.max_repairs_per_worker;
        mcfg.repair = cfg.repair;
        mcfg.cluster_secret = cfg.cluster_secret.clone();
        mcfg.tls = cfg.tls.clone();
        mcfg.limits = cfg.master_limits;
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::Bind {
            addr: dir.display().to_string(),
            source,
        })?;
        let ports = if cfg.sticky_ports {
            load_ports(dir)
        } else {
            Vec::new()
        };
        let master = Master::open(mcfg)?;
        let listener = bind_preferring(ports.first().copied()).await?;
        let master_addr = listener
            .local_addr()
            .map_err(|source| ClusterError::Bind {
                addr: "127.0.0.1:0".into(),
                source,
            })?
            .to_string();
        let (tx, rx) = oneshot::channel();
        let m = master.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = m
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "master failed");
            }
        });
        let mut cluster = LocalCluster {
            cfg: cfg.clone(),
            master,
            master_addr,
            master_node: Some(Node {
                stop: Some(tx),
                task,
            }),
            workers: Vec::new(),
        };
        for i in 0..cfg.workers {
            let wdir = dir.join(format!("worker-{i}"));
            let listener = bind_preferring(ports.get(i + 1).copied()).await?;
            let (addr, node) = cluster.spawn_worker_on(listener, &wdir)?;
            cluster.workers.push(LocalWorker {
                addr,
                dir: wdir,
                node: Some(node),
            });
        }
        if cfg.sticky_ports {
            let mut all = vec![cluster.master_addr.clone()];
            all.extend(cluster.worker_addrs());
            let list: Vec<&str> = all
                .iter()
                .filter_map(|a| a.rsplit_once(':').map(|(_, p)| p))
                .collect();
            let _ = std::fs::write(dir.join("ports"), list.join(" "));
        }
        cluster
            .wait_for_alive(cfg.workers, Duration::from_secs(10))
            .await;
        Ok(cluster)
    }

    async fn spawn_worker(
        &self,
        bind_addr: &str,
        dir: &Path,
    ) -> Result<(String, Node), ClusterError> {
        let listener = bind(bind_addr).await?;
        self.spawn_worker_on(listener, dir)
    }

    fn spawn_worker_on(
        &self,
        listener: TcpListener,
        dir: &Path,
    ) -> Result<(String, Node), ClusterError> {
        let wcfg = WorkerConfig {
            data_dir: dir.to_path_buf(),
            master: self.master_addr.clone(),
            host: "127.0.0.1".into(),
            capacity: self.cfg.worker_capacity,
            heartbeat_interval: self.cfg.heartbeat_interval,
            scrub: crate::worker::scrub::ScrubConfig {
                rate: self.cfg.scrub_rate,
                interval: self.cfg.scrub_interval,
            },
            cluster_secret: self.cfg.cluster_secret.clone(),
            tls: self.cfg.tls.clone(),
            limits: self.cfg.worker_limits,
        };
        let worker = Worker::open(&wcfg, &listener)?;
        let addr = worker.address().to_string();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            if let Err(e) = worker
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "worker failed");
            }
        });
        Ok((
            addr,
            Node {
                stop: Some(tx),
                task,
            },
        ))
    }

    /// The master's "host:port".
    pub fn master_addr(&self) -> &str {
        &self.master_addr
    }

    /// The master itself, for inspecting state in tests.
    pub fn master(&self) -> &Arc<Master> {
        &self.master
    }

    pub fn worker_addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.clone()).collect()
    }

    pub fn worker_dir(&self, i: usize) -> Option<&Path> {
        self.workers.get(i).map(|w| w.dir.as_path())
    }

    /// Stops worker `i` abruptly (its server task is dropped mid-flight).
    pub fn kill_worker(&mut self, i: usize) -> Result<(), ClusterError> {
        let w = self
            .workers
            .get_mut(i)
            .ok_or(ClusterError::NoSuchWorker(i))?;
        if let Some(n) = w.node.take() {
            n.kill();
        }
        Ok(())
    }

    /// Restarts worker `i` on its old address and data directory.
    pub async fn restart_worker(&mut self, i: usize) -> Result<(), ClusterError> {
        let (addr, dir) = {
            let w = self
                .workers
                .get_mut(i)
                .ok_or(ClusterError::NoSuchWorker(i))?;
            if let Some(n) = w.node.take() {
                n.stop().await;
            }
            (w.addr.clone(), w.dir.clone())
        };
        let mut last = None;
        // The old listener's port may take a moment to be released.
        for _ in 0..50 {
            match self.spawn_worker(&addr, &dir).await {
                Ok((_, node)) => {
                    if let Some(w) = self.workers.get_mut(i) {
                        w.node = Some(node);
                    }
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or(ClusterError::NoSuchWorker(i)))
    }

    /// Waits until at least `n` workers are alive, or `timeout`; returns whether they are.
    pub async fn wait_for_alive(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let alive = self.master.cluster_status().workers_alive as usize;
            if alive >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Purges what is garbage now without waiting out the grace (see
    /// [`Master::expedite_garbage`]), waiting up to `limit` for the workers to confirm it at
    /// their heartbeats. Returns the chunks still waiting (on a worker that is down, or
    /// because the limit came first).
    pub async fn collect_garbage_now(&self, limit: Duration) -> usize {
        self.master.expedite_garbage();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = self.master.pending_garbage();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every node gracefully.
    pub async fn shutdown(mut self) {
        for w in &mut self.workers {
            if let Some(n) = w.node.take() {
                n.stop().await;
            }
        }
        if let Some(n) = self.master_node.take() {
            n.stop().await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(n) = w.node.take() {
                n.kill();
            }
        }
        if let Some(n) = self.master_node.take() {
            n.kill();
        }
    }
}

/// Resolves on SIGINT or SIGTERM: the daemons' graceful-shutdown trigger.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
