//! Answers lost on the way back from the master: the call landed, its connection broke
//! before the answer got out. The master runs in process behind a second front door whose
//! connections the test can cut at the exact moment a call has been carried out, which no
//! proxy of bytes can do without parsing HTTP/2.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::*;
use dfs::client::{Client, UploadOptions};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Connections accepted before the latest cut fail every read and write from then on.
#[derive(Default)]
struct Cuts {
    generation: AtomicU64,
    parked: Mutex<Vec<Waker>>,
}

impl Cuts {
    fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        parked.into_iter().for_each(Waker::wake);
    }
}

struct Severable {
    io: TcpStream,
    born: u64,
    cuts: Arc<Cuts>,
}

impl Severable {
    fn severed(&self, cx: &Context<'_>) -> Option<io::Error> {
        if self.cuts.generation.load(Ordering::SeqCst) > self.born {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection cut by the test",
            ));
        }
        self.cuts
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cx.waker().clone());
        None
    }
}

impl AsyncRead for Severable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.severed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Severable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.severed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.severed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Severable {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The master's service, which cuts every connection once the first call to `path` has been
/// carried out, just before its answer would be sent.
#[derive(Clone)]
struct LoseAnswer<S> {
    inner: S,
    path: &'static str,
    armed: Arc<AtomicBool>,
    lost: Arc<AtomicU32>,
    cuts: Arc<Cuts>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for LoseAnswer<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for LoseAnswer<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let lose = req.uri().path() == self.path && self.armed.swap(false, Ordering::SeqCst);
        let fut = self.inner.call(req);
        let (lost, cuts) = (self.lost.clone(), self.cuts.clone());
        Box::pin(async move {
            // A unary call's future ends once its handler has run: the commit has landed.
            let answer = fut.await;
            if lose {
                lost.fetch_add(1, Ordering::SeqCst);
                cuts.cut();
            }
            answer
        })
    }
}

/// A second front door to `t`'s master that loses the first answer to `path`.
struct FrontDoor {
    addr: String,
    lost: Arc<AtomicU32>,
    _stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn front_door(t: &TestCluster, path: &'static str) -> FrontDoor {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the front door");
    let addr = listener
        .local_addr()
        .expect("front door address")
        .to_string();
    let cuts = Arc::new(Cuts::default());
    let lost = Arc::new(AtomicU32::new(0));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let service = LoseAnswer {
        inner: dfs::master::service::MasterService::new(t.cluster.master().clone(), stop_rx)
            .into_server(dfs::master::MasterLimits::default().max_message),
        path,
        armed: Arc::new(AtomicBool::new(true)),
        lost: lost.clone(),
        cuts: cuts.clone(),
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        s.map(|io| {
            io.set_nodelay(true).ok();
            Severable {
                io,
                born: cuts.generation.load(Ordering::SeqCst),
                cuts: cuts.clone(),
            }
        })
    });
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    FrontDoor {
        addr,
        lost,
        _stop: stop,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_whose_commit_answer_is_lost_still_succeeds_once() {
    let t = TestCluster::start(small_chunks(3)).await;
    let door = front_door(&t, "/dfs.v1.Master/CommitUpload").await;
    let client = Client::connect(&door.addr)
        .await
        .expect("client connects to the front door");
    // Over 128 KiB: a durable upload, whose master calls ride out a lost connection.
    let path = make_file(&t.scratch().join("big"), 3 * MIB + 17, 41);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        client.upload(
            &path,
            UploadOptions {
                name: Some("big".into()),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("the upload ends")
    .unwrap_or_else(|e| panic!("an upload whose commit landed must succeed: {e}"));
    assert_eq!(
        door.lost.load(Ordering::SeqCst),
        1,
        "the commit's answer was lost"
    );
    assert_eq!(report.file.size, 3 * MIB + 17);
    assert_eq!(report.file.blake3, blake3_file(&path));

    // One version landed, the one the upload was given: no second commit, no second copy.
    let stat = t.client.stat("big").await.expect("stat");
    assert_eq!(stat.version, report.file.version);
    let files = t.client.list().await.expect("list");
    assert_eq!(files.iter().filter(|f| f.name == "big").count(), 1);
    t.must_download_equal("big", &path).await;
}

/// The master calls of uploads, reads and deletes, batched and alone, whose answers a
/// broken connection can lose.
const CUT_AFTER: [&str; 10] = [
    "/dfs.v1.Master/StartUpload",
    "/dfs.v1.Master/StartUploads",
    "/dfs.v1.Master/ReserveUploads",
    "/dfs.v1.Master/PrepareUploads",
    "/dfs.v1.Master/CommitUpload",
    "/dfs.v1.Master/CommitUploads",
    "/dfs.v1.Master/GetFile",
    "/dfs.v1.Master/GetFiles",
    "/dfs.v1.Master/DeleteFile",
    "/dfs.v1.Master/DeleteFiles",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_under_concurrent_uploads_reads_and_deletes_fails_none_of_them() {
    // Before, each cut failed 1 to 12 of the 48 uploads and reads in flight on that
    // connection with "cannot reach the master", some of them files that had landed.
    let t = TestCluster::start(small_chunks(3)).await;
    for path in CUT_AFTER {
        let mut cut = 0;
        // A small file (batched calls, reservations) and one over 128 KiB (a durable upload).
        for size in [4096u64, 200_000] {
            let door = front_door(&t, path).await;
            let client = Arc::new(
                Client::connect(&door.addr)
                    .await
                    .expect("client connects to the front door"),
            );
            let mut failures = Vec::new();
            for round in 0..3u64 {
                let mut set = tokio::task::JoinSet::new();
                for k in 0..16u64 {
                    let name = format!("{}-{size}-{round}-{k}", &path[15..]);
                    let local = make_file(&t.scratch().join(&name), size, round * 16 + k);
                    let back = t.scratch().join(format!("{name}.back"));
                    let c = client.clone();
                    set.spawn(async move {
                        let up = c
                            .upload(
                                &local,
                                UploadOptions {
                                    name: Some(name.clone()),
                                    ..Default::default()
                                },
                            )
                            .await;
                        if let Err(e) = up {
                            return Err(format!("upload of {name}: {e}"));
                        }
                        c.download(&name, &back, Default::default())
                            .await
                            .map_err(|e| format!("download of {name}: {e}"))?;
                        // Every other file is deleted (a file left is read by the next
                        // round's lookups), and must be gone.
                        if k % 2 == 0 {
                            let gone = c
                                .delete(&name)
                                .await
                                .map_err(|e| format!("delete of {name}: {e}"))?;
                            if gone.size != size {
                                return Err(format!("delete of {name} answered {gone:?}"));
                            }
                            match c.stat(&name).await {
                                Err(e) if e.code() == tonic::Code::NotFound => {}
                                other => return Err(format!("{name} after its delete: {other:?}")),
                            }
                        }
                        Ok((local, back))
                    });
                }
                let done = tokio::time::timeout(Duration::from_secs(120), set.join_all())
                    .await
                    .expect("the uploads and reads end");
                for r in done {
                    match r {
                        Ok((local, back)) => assert_files_equal(&local, &back),
                        Err(e) => failures.push(e),
                    }
                }
            }
            assert!(
                failures.is_empty(),
                "cut after {path}, {size} bytes: {} of 48 failed, first: {}",
                failures.len(),
                failures[0]
            );
            cut += door.lost.load(Ordering::SeqCst);
        }
        assert!(cut > 0, "no answer to {path} was cut");
    }
}
