//! Tests that try to get in: every Master RPC with missing, wrong, expired and under-privileged
//! credentials; chunk access straight to workers with no, forged, expired and misdirected
//! capabilities; workers with the wrong secret; TLS with the wrong peers; hostile input; and
//! the limits that keep one client from pinning a daemon. Real daemons on loopback throughout.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use dfs::chunk::ChunkId;
use dfs::cluster::LocalClusterConfig;
use dfs::rpc::pb::{self, write_chunk_request::Msg};
use dfs::rpc::{MasterRpc, Transport};
use dfs::security::capability::{self, ChunkGrant};
use dfs::security::tls::TlsMaterial;
use dfs::security::{AccessToken, ChunkOps, ClusterSecret, TlsFiles, TokenKind};
use tonic::Code;

const SECRET: &[u8] = b"security tests: the cluster secret";
const OTHER_SECRET: &[u8] = b"security tests: somebody else's secret";

fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes(SECRET).unwrap()
}

fn token_with(s: &[u8], kind: TokenKind, subject: &str, expires: u64) -> String {
    AccessToken::mint(
        &ClusterSecret::from_bytes(s).unwrap(),
        kind,
        subject,
        expires,
    )
    .unwrap()
    .to_string()
}

fn token(kind: TokenKind, subject: &str) -> String {
    token_with(SECRET, kind, subject, 0)
}

fn secured(mut cfg: LocalClusterConfig) -> LocalClusterConfig {
    cfg.cluster_secret = Some(secret());
    cfg
}

async fn start_secured(cfg: LocalClusterConfig) -> TestCluster {
    let t = Transport::new(None, Some(&token(TokenKind::ReadWrite, "owner"))).unwrap();
    TestCluster::start_with(secured(cfg), t).await
}

/// A master client presenting `token` (or nothing).
fn master_as(addr: &str, token: Option<&str>) -> MasterRpc {
    let t = Transport::new(None, token).unwrap();
    t.master(t.control_channel(addr).unwrap())
}

fn worker_rpc(addr: &str) -> pb::worker_client::WorkerClient<tonic::transport::Channel> {
    dfs::rpc::worker_client(dfs::rpc::data_channel(addr).unwrap())
}

type Outcome = Result<(), Code>;

fn code<T>(r: Result<T, tonic::Status>) -> Outcome {
    r.map(|_| ()).map_err(|s| s.code())
}

/// Calls every Master RPC once with harmless-looking requests that would each change
/// something if accepted. `skip_effects` leaves out the calls that a *valid* credential of
/// that kind would really carry out (so a test can assert the others were refused).
async fn call_every_rpc(
    m: &mut MasterRpc,
    victim_chunk: &str,
    worker: &str,
) -> Vec<(&'static str, Outcome)> {
    vec![
        (
            "Register",
            code(
                m.register(pb::RegisterRequest {
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "Heartbeat",
            code(
                m.heartbeat(pb::HeartbeatRequest {
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "StartUpload",
            code(
                m.start_upload(pb::StartUploadRequest {
                    name: "intruder".into(),
                    size: 10,
                    replicas: 1,
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "StartUploads",
            code(
                m.start_uploads(pb::StartUploadsRequest {
                    uploads: vec![pb::StartUploadRequest {
                        name: "intruder".into(),
                        size: 10,
                        replicas: 1,
                        ..Default::default()
                    }],
                })
                .await,
            ),
        ),
        (
            "ReserveUploads",
            code(
                m.reserve_uploads(pb::ReserveUploadsRequest {
                    count: 2,
                    replicas: 1,
                })
                .await,
            ),
        ),
        (
            "AllocateChunk",
            code(
                m.allocate_chunk(pb::AllocateChunkRequest {
                    upload_id: "0".repeat(32),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "CommitUpload",
            code(
                m.commit_upload(pb::CommitUploadRequest {
                    upload_id: "0".repeat(32),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "CommitUploads",
            code(
                m.commit_uploads(pb::CommitUploadsRequest {
                    commits: vec![pb::CommitUploadRequest {
                        upload_id: "0".repeat(32),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "PrepareUploads",
            code(
                m.prepare_uploads(pb::CommitUploadsRequest {
                    commits: vec![pb::CommitUploadRequest {
                        upload_id: "0".repeat(32),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "RenewUpload",
            code(
                m.renew_upload(pb::RenewUploadRequest {
                    upload_id: "0".repeat(32),
                })
                .await,
            ),
        ),
        (
            "AbortUpload",
            code(
                m.abort_upload(pb::AbortUploadRequest {
                    upload_id: "0".repeat(32),
                })
                .await,
            ),
        ),
        (
            "GetFile",
            code(
                m.get_file(pb::GetFileRequest {
                    name: "victim".into(),
                })
                .await,
            ),
        ),
        (
            "GetFiles",
            code(
                m.get_files(pb::GetFilesRequest {
                    names: vec!["victim".into()],
                })
                .await,
            ),
        ),
        (
            "ListFiles",
            code(m.list_files(pb::ListFilesRequest::default()).await),
        ),
        (
            "DeleteFile",
            code(
                m.delete_file(pb::DeleteFileRequest {
                    name: "victim".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "CreateEmpty",
            code(
                m.create_empty(pb::CreateEmptyRequest {
                    names: vec!["intruder".into()],
                })
                .await,
            ),
        ),
        (
            "DeleteMany",
            code(
                m.delete_many(pb::DeleteManyRequest {
                    names: vec!["victim".into()],
                })
                .await,
            ),
        ),
        (
            "DeleteFiles",
            code(
                m.delete_files(pb::DeleteFilesRequest {
                    names: vec!["victim".into()],
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ReportBadReplica",
            code(
                m.report_bad_replica(pb::ReportBadReplicaRequest {
                    chunk_id: victim_chunk.into(),
                    worker: worker.into(),
                    reason: "intruder".into(),
                })
                .await,
            ),
        ),
        (
            "ClusterStatus",
            code(m.cluster_status(pb::ClusterStatusRequest {}).await),
        ),
        (
            "StreamLogs",
            code(m.stream_logs(pb::StreamLogsRequest { backlog: 1 }).await),
        ),
        (
            "SetDraining",
            code(
                m.set_draining(pb::SetDrainingRequest {
                    worker: worker.into(),
                    draining: true,
                })
                .await,
            ),
        ),
        (
            "DrainPlan",
            code(
                m.drain_plan(pb::DrainPlanRequest {
                    worker: worker.into(),
                })
                .await,
            ),
        ),
        ("Fsck", code(m.fsck(pb::FsckRequest {}).await)),
        ("GcStatus", code(m.gc_status(pb::GcStatusRequest {}).await)),
        (
            "ProcessStats",
            code(
                m.process_stats(pb::ProcessStatsRequest { reset_peak: true })
                    .await,
            ),
        ),
    ]
}

/// The Master methods named in the proto file.
fn proto_master_methods() -> Vec<String> {
    let proto =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/dfs.proto")).unwrap();
    let start = proto.find("service Master {").unwrap();
    let body = &proto[start..start + proto[start..].find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn every_master_method_has_an_access_rule() {
    let methods = proto_master_methods();
    assert!(methods.len() >= 19, "{methods:?}");
    for m in &methods {
        assert!(
            dfs::security::guard::master_need(m).is_some(),
            "{m} has no entry in the access table"
        );
    }
}

/// Snapshot of what an intruder must not be able to change.
async fn state(tc: &TestCluster) -> (Vec<String>, Vec<(String, bool)>, Vec<usize>) {
    let files = tc.client.list().await.unwrap();
    let status = tc.client.status().await.unwrap();
    let mut workers: Vec<(String, bool)> = status
        .workers
        .iter()
        .map(|w| (w.address.clone(), w.draining))
        .collect();
    workers.sort();
    let chunks = (0..3)
        .map(|i| chunk_files(tc.cluster.worker_dir(i).unwrap()).len())
        .collect();
    (files.into_iter().map(|f| f.name).collect(), workers, chunks)
}

#[tokio::test]
async fn master_rpcs_refuse_missing_wrong_and_underprivileged_credentials() {
    let tc = start_secured(small_chunks(3)).await;
    let src = make_file(&tc.scratch().join("victim"), 100_000, 1);
    tc.must_upload(&src, "victim").await;
    let f = tc.client.stat("victim").await.unwrap();
    let chunk = f.chunks[0].chunk_id.clone();
    let worker = tc.cluster.worker_addrs()[0].clone();
    let before = state(&tc).await;
    let addr = tc.cluster.master_addr().to_string();

    let methods = proto_master_methods();
    let mut tried = 0;
    // No credentials, garbage, another cluster's token, an expired token.
    for (what, tok) in [
        ("no token", None),
        ("garbage", Some("not-a-token".to_string())),
        (
            "another cluster's token",
            Some(token_with(OTHER_SECRET, TokenKind::ReadWrite, "owner", 0)),
        ),
        (
            "an expired token",
            Some(token_with(SECRET, TokenKind::ReadWrite, "owner", 1)),
        ),
        (
            "a forged kind",
            Some(token(TokenKind::ReadOnly, "mallory").replacen(".ro.", ".rw.", 1)),
        ),
    ] {
        let mut m = master_as(&addr, tok.as_deref());
        let results = call_every_rpc(&mut m, &chunk, &worker).await;
        let names: Vec<&str> = results.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, methods, "the test must call every RPC");
        for (rpc, r) in results {
            tried += 1;
            assert_eq!(r, Err(Code::Unauthenticated), "{rpc} with {what}");
        }
    }
    // A read-only token: reads pass, every change is refused.
    let mut ro = master_as(&addr, Some(&token(TokenKind::ReadOnly, "reader")));
    for (rpc, r) in call_every_rpc(&mut ro, &"0".repeat(32), &worker).await {
        tried += 1;
        match dfs::security::guard::master_need(rpc) {
            Some(dfs::security::guard::Need::Read) => assert_eq!(r, Ok(()), "{rpc} read-only"),
            _ => assert_eq!(
                r,
                Err(Code::PermissionDenied),
                "{rpc} with a read-only token"
            ),
        }
    }
    // A worker's token is good for its own worker calls only (it names the worker's
    // address); a client's never for worker calls.
    let mut wk = master_as(&addr, Some(&token(TokenKind::Worker, "127.0.0.1:2")));
    for (rpc, r) in call_every_rpc(&mut wk, &chunk, &worker).await {
        tried += 1;
        assert_eq!(r, Err(Code::PermissionDenied), "{rpc} with a worker token");
    }
    let mut rw = master_as(&addr, Some(&token(TokenKind::ReadWrite, "client")));
    for rpc in ["Register", "Heartbeat"] {
        tried += 1;
        let r = if rpc == "Register" {
            code(
                rw.register(pb::RegisterRequest {
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                })
                .await,
            )
        } else {
            code(
                rw.heartbeat(pb::HeartbeatRequest {
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                })
                .await,
            )
        };
        assert_eq!(r, Err(Code::PermissionDenied), "{rpc} with a client token");
    }
    eprintln!("credential cases tried: {tried}");

    // Nothing changed: same files, same workers (none added, none draining), same chunks.
    let after = state(&tc).await;
    assert_eq!(before, after);
    tc.must_download_equal("victim", &src).await;
}

fn forge(s: &[u8], chunk: &str, ops: ChunkOps, expires_unix_ms: u64) -> Bytes {
    let grant = ChunkGrant {
        chunk: chunk.parse::<ChunkId>().unwrap(),
        ops,
        expires_unix_ms,
    };
    capability::mint(&ClusterSecret::from_bytes(s).unwrap(), &grant).into()
}

fn far_future() -> u64 {
    dfs::rpc::now_unix_ms() as u64 + 3_600_000
}

#[tokio::test]
async fn workers_serve_chunks_only_with_a_valid_capability() {
    let tc = start_secured(small_chunks(3)).await;
    let src = make_file(&tc.scratch().join("victim"), 100_000, 2);
    tc.must_upload(&src, "victim").await;
    tc.must_upload(&make_file(&tc.scratch().join("other"), 1000, 3), "other")
        .await;
    let f = tc.client.stat("victim").await.unwrap();
    let c = &f.chunks[0];
    let other = tc.client.stat("other").await.unwrap().chunks[0]
        .chunk_id
        .clone();
    let holder = c.replicas[0].worker.clone();
    let mut w = worker_rpc(&holder);
    let chunks_before: Vec<usize> = (0..3)
        .map(|i| chunk_files(tc.cluster.worker_dir(i).unwrap()).len())
        .collect();

    let read = |token: Bytes| pb::ReadChunkRequest {
        chunk_id: c.chunk_id.clone(),
        token,
    };
    let cases: Vec<(&str, Bytes, Code)> = vec![
        ("no token", Bytes::new(), Code::Unauthenticated),
        (
            "random bytes",
            Bytes::from(vec![7u8; capability::TOKEN_LEN]),
            Code::Unauthenticated,
        ),
        ("truncated", c.token.slice(..10), Code::Unauthenticated),
        (
            "signed with another secret",
            forge(OTHER_SECRET, &c.chunk_id, ChunkOps::READ, far_future()),
            Code::Unauthenticated,
        ),
        (
            "expired",
            forge(SECRET, &c.chunk_id, ChunkOps::READ, 1),
            Code::Unauthenticated,
        ),
        (
            "valid, for another chunk",
            forge(SECRET, &other, ChunkOps::READ, far_future()),
            Code::PermissionDenied,
        ),
        (
            "write-only",
            forge(SECRET, &c.chunk_id, ChunkOps::WRITE, far_future()),
            Code::PermissionDenied,
        ),
    ];
    let mut tried = 0;
    for (what, tok, want) in &cases {
        tried += 1;
        let r = w.read_chunk(read(tok.clone())).await;
        assert_eq!(r.err().map(|s| s.code()), Some(*want), "read with {what}");
        // The same through the batched small-chunk read: refused item by item, no bytes.
        tried += 1;
        let r = w
            .read_small_chunks(pb::ReadSmallChunksRequest {
                chunks: vec![read(tok.clone()), read(tok.clone())],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        for item in r {
            assert_eq!(item.code, *want as i32, "small read with {what}");
            assert!(item.data.is_empty() && item.header.is_none());
        }
    }
    // The master's own capability works.
    let mut s = w
        .read_chunk(read(c.token.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::read_chunk_response::Msg::Data(d)) = m.msg {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, std::fs::read(&src).unwrap());

    // Overwrite attempts: the victim's chunk id with every bad token, and a fresh id with a
    // read capability (a reader may not write) or another chunk's write capability.
    let evil = vec![0xEEu8; 1000];
    let fresh = ChunkId::generate().to_string();
    let writes: Vec<(&str, String, Bytes, Code)> = vec![
        (
            "no token",
            c.chunk_id.clone(),
            Bytes::new(),
            Code::Unauthenticated,
        ),
        (
            "forged",
            c.chunk_id.clone(),
            forge(OTHER_SECRET, &c.chunk_id, ChunkOps::WRITE, far_future()),
            Code::Unauthenticated,
        ),
        (
            "expired",
            fresh.clone(),
            forge(SECRET, &fresh, ChunkOps::WRITE, 1),
            Code::Unauthenticated,
        ),
        (
            "a read capability",
            c.chunk_id.clone(),
            c.token.clone(),
            Code::PermissionDenied,
        ),
        (
            "another chunk's write capability",
            fresh.clone(),
            forge(SECRET, &other, ChunkOps::WRITE, far_future()),
            Code::PermissionDenied,
        ),
    ];
    for (what, id, tok, want) in writes {
        tried += 1;
        let placement = pb::ChunkPlacement {
            index: 0,
            chunk_id: id,
            workers: tc.cluster.worker_addrs(),
            token: tok,
            ..Default::default()
        };
        let r = write_chunk_direct(&placement, "victim", &evil, None).await;
        assert_eq!(r.err().map(|s| s.code()), Some(want), "write with {what}");
        // The same through the batched small-chunk write: refused, item by item.
        tried += 1;
        let small = pb::SmallChunk {
            header: Some(pb::ChunkHeader {
                format_version: 1,
                chunk_id: placement.chunk_id.clone(),
                file_id: 1,
                file_name: "victim".into(),
                file_version: 1,
                length: evil.len() as u64,
                ..Default::default()
            }),
            token: placement.token.clone(),
            data: Bytes::from(evil.clone()),
            crc32c: crc32c::crc32c(&evil),
        };
        let r = w
            .write_small_chunks(pb::WriteSmallChunksRequest {
                chunks: vec![small.clone(), small],
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        for item in r {
            assert!(!item.stored, "small write with {what}");
            assert_eq!(item.code, want as i32, "small write with {what}");
        }
    }
    // Replication orders: without a token, and with a reader's token (which cannot make the
    // target write).
    let target = tc
        .cluster
        .worker_addrs()
        .into_iter()
        .find(|a| *a != holder)
        .unwrap();
    for (what, tok) in [
        ("no token", Bytes::new()),
        ("a read capability", c.token.clone()),
    ] {
        tried += 1;
        let r = w
            .replicate_chunk(pb::ReplicateChunkRequest {
                chunk_id: c.chunk_id.clone(),
                target: target.clone(),
                token: tok,
            })
            .await;
        assert!(r.is_err(), "replicate with {what} succeeded");
    }
    eprintln!("chunk capability cases tried: {tried}");

    let chunks_after: Vec<usize> = (0..3)
        .map(|i| chunk_files(tc.cluster.worker_dir(i).unwrap()).len())
        .collect();
    assert_eq!(chunks_before, chunks_after, "no chunk was written");
    tc.must_download_equal("victim", &src).await;
}

#[tokio::test]
async fn a_worker_with_the_wrong_secret_cannot_join() {
    let tc = start_secured(small_chunks(3)).await;
    let known: Vec<String> = tc.cluster.worker_addrs();
    for (what, s) in [
        (
            "another secret",
            Some(ClusterSecret::from_bytes(OTHER_SECRET).unwrap()),
        ),
        ("no secret", None),
    ] {
        let dir = tc.dir.path().join(format!("intruder-{}", s.is_some()));
        let mut cfg = dfs::worker::WorkerConfig::new(&dir, tc.cluster.master_addr());
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.cluster_secret = s;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker = dfs::worker::Worker::open(&cfg, &listener).unwrap();
        let addr = worker.address().to_string();
        let task = tokio::spawn(worker.serve(listener, std::future::pending()));
        // Several registration attempts happen in this time.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let status = tc.client.status().await.unwrap();
        let mut listed: Vec<String> = status.workers.iter().map(|w| w.address.clone()).collect();
        listed.sort();
        let mut want = known.clone();
        want.sort();
        assert_eq!(listed, want, "a worker with {what} ({addr}) was admitted");
        task.abort();
    }
}

fn gen_certs(dir: &std::path::Path) -> std::path::PathBuf {
    dfs::security::certs::generate(dir, &[], 1).unwrap();
    dir.to_path_buf()
}

fn files(dir: &std::path::Path, role: &str, with_identity: bool) -> TlsFiles {
    TlsFiles {
        cert: with_identity.then(|| dir.join(format!("{role}.pem"))),
        key: with_identity.then(|| dir.join(format!("{role}.key"))),
        ca: Some(dir.join("ca.pem")),
    }
}

#[tokio::test]
async fn tls_refuses_plaintext_and_foreign_certificates_and_keeps_serving() {
    let certs = tempfile::tempdir().unwrap();
    let good = gen_certs(&certs.path().join("good"));
    let foreign = gen_certs(&certs.path().join("foreign"));
    let mut cfg = secured(small_chunks(3));
    cfg.tls = TlsMaterial::for_daemon(&files(&good, "worker", true)).unwrap();
    let client_tls = TlsMaterial::for_client(&files(&good, "client", true)).unwrap();
    let tok = token(TokenKind::ReadWrite, "owner");
    let transport = Transport::new(client_tls.as_ref(), Some(&tok)).unwrap();
    let tc = TestCluster::start_with(cfg, transport).await;
    let addr = tc.cluster.master_addr().to_string();
    let src = make_file(&tc.scratch().join("a"), 300_000, 4);
    tc.must_upload(&src, "a").await;

    let attempts: Vec<(&str, Transport, &str)> = vec![
        (
            "plaintext",
            Transport::new(None, Some(&tok)).unwrap(),
            "pass --tls-ca",
        ),
        (
            "a certificate from another CA",
            Transport::new(
                TlsMaterial::for_client(&files(&foreign, "client", true))
                    .unwrap()
                    .as_ref(),
                Some(&tok),
            )
            .unwrap(),
            "certificate",
        ),
        (
            "no client certificate",
            Transport::new(
                TlsMaterial::for_client(&files(&good, "client", false))
                    .unwrap()
                    .as_ref(),
                Some(&tok),
            )
            .unwrap(),
            "client certificate",
        ),
    ];
    for (what, t, hint) in attempts {
        let started = std::time::Instant::now();
        let r = match dfs::client::Client::connect_with(&addr, t).await {
            Err(e) => Err(e),
            Ok(c) => c.list().await.map(|_| ()),
        };
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::Unavailable, "{what}: {e}");
        assert!(e.to_string().contains(hint), "{what}: {e}");
        assert!(started.elapsed() < Duration::from_secs(20), "{what} hung");
        // A worker refuses the same peers.
        let w = &tc.cluster.worker_addrs()[0];
        let plain = worker_rpc(w)
            .read_chunk(pb::ReadChunkRequest::default())
            .await;
        assert!(plain.is_err());
    }
    // The daemons still serve the right clients.
    tc.must_upload(&make_file(&tc.scratch().join("b"), 200_000, 5), "b")
        .await;
    tc.must_download_equal("a", &src).await;
}

/// A codec that sends bytes as they are, to put malformed protobuf on the wire.
#[derive(Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        use bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

async fn raw_call(addr: &str, path: &'static str, body: Bytes) -> Result<Bytes, tonic::Status> {
    let ch = dfs::rpc::data_channel(addr).unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    let tok = token(TokenKind::ReadWrite, "fuzzer");
    req.metadata_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    g.unary(req, http::uri::PathAndQuery::from_static(path), Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn hostile_input_gets_clear_errors_and_the_daemons_keep_serving() {
    let mut cfg = small_chunks(3);
    cfg.worker_limits.idle_timeout = Duration::from_millis(700);
    let tc = start_secured(cfg).await;
    let addr = tc.cluster.master_addr().to_string();
    let src = make_file(&tc.scratch().join("keep"), 50_000, 6);
    tc.must_upload(&src, "keep").await;
    let mut m = master_as(&addr, Some(&token(TokenKind::ReadWrite, "hostile")));
    let mut tried = 0;

    // Every string field that names a file.
    let names = [
        "".to_string(),
        ".".into(),
        "..".into(),
        "../etc/passwd".into(),
        "/etc/passwd".into(),
        "a/b".into(),
        "a\\b".into(),
        "nul\0byte".into(),
        "line\nbreak".into(),
        "\x1b[31mred".into(),
        "tab\there".into(),
        "x".repeat(256),
        "é".repeat(200),
    ];
    for n in &names {
        tried += 6;
        let r = m
            .start_upload(pb::StartUploadRequest {
                name: n.clone(),
                size: 1,
                replicas: 1,
                ..Default::default()
            })
            .await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "start {n:?}"
        );
        let r = m
            .create_empty(pb::CreateEmptyRequest {
                names: vec![n.clone()],
            })
            .await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "create {n:?}"
        );
        for (op, r) in [
            (
                "get",
                code(m.get_file(pb::GetFileRequest { name: n.clone() }).await),
            ),
            (
                "delete",
                code(
                    m.delete_file(pb::DeleteFileRequest {
                        name: n.clone(),
                        ..Default::default()
                    })
                    .await,
                ),
            ),
            (
                "delete_many",
                code(
                    m.delete_many(pb::DeleteManyRequest {
                        names: vec![n.clone()],
                    })
                    .await,
                ),
            ),
            (
                "delete_files",
                code(
                    m.delete_files(pb::DeleteFilesRequest {
                        names: vec![n.clone()],
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner())
                    .and_then(|r| match r.results.first() {
                        Some(item) if item.code != 0 => {
                            Err(tonic::Status::new(item.code.into(), item.message.clone()))
                        }
                        _ => Ok(r),
                    }),
                ),
            ),
        ] {
            assert!(
                matches!(r, Err(Code::InvalidArgument) | Err(Code::NotFound)),
                "{op} {n:?}: {r:?}"
            );
        }
    }
    // Numbers at their extremes.
    tried += 4;
    let r = m
        .start_upload(pb::StartUploadRequest {
            name: "huge".into(),
            size: u64::MAX,
            replicas: 1,
            ..Default::default()
        })
        .await;
    assert!(matches!(
        r.err().map(|s| s.code()),
        Some(Code::InvalidArgument | Code::ResourceExhausted)
    ));
    let r = m
        .start_upload(pb::StartUploadRequest {
            name: "many".into(),
            size: 1,
            replicas: u32::MAX,
            ..Default::default()
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let page = m
        .list_files(pb::ListFilesRequest {
            start_after: String::new(),
            limit: u32::MAX,
        })
        .await
        .unwrap();
    assert_eq!(page.into_inner().files.len(), 1);
    let up = m
        .start_upload(pb::StartUploadRequest {
            name: "n".into(),
            size: 10,
            replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = m
        .allocate_chunk(pb::AllocateChunkRequest {
            upload_id: up.upload_id.clone(),
            index: u32::MAX,
            exclude: vec![],
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
    // Chunk ids and worker names that try to walk the file system.
    for bad in ["../../etc/passwd", "", "0123", &"g".repeat(32), "/dev/zero"] {
        tried += 3;
        let r = m
            .report_bad_replica(pb::ReportBadReplicaRequest {
                chunk_id: bad.into(),
                worker: "../".into(),
                reason: "x".repeat(100_000),
            })
            .await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "report {bad:?}"
        );
        let w0 = tc.cluster.worker_addrs()[0].clone();
        let r = worker_rpc(&w0)
            .read_chunk(pb::ReadChunkRequest {
                chunk_id: bad.into(),
                token: Bytes::new(),
            })
            .await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(Code::InvalidArgument),
            "read {bad:?}"
        );
        let r = m
            .set_draining(pb::SetDrainingRequest {
                worker: bad.into(),
                draining: true,
            })
            .await;
        assert!(r.is_err(), "drain {bad:?}");
    }

    // Chunk streams that lie: more bytes than declared, ending half-way, going quiet, and a
    // second write of the same chunk id.
    let placement = up.chunks[0].clone();
    let header = |len: u64| pb::ChunkHeader {
        format_version: 1,
        chunk_id: placement.chunk_id.clone(),
        file_id: up.file_id,
        file_name: "n".into(),
        chunk_index: 0,
        file_version: up.version,
        length: len,
        ..Default::default()
    };
    let start = |len: u64| pb::WriteChunkRequest {
        msg: Some(Msg::Start(pb::WriteStart {
            header: Some(header(len)),
            downstream: vec![],
            token: placement.token.clone(),
        })),
    };
    let data = |n: usize| pb::WriteChunkRequest {
        msg: Some(Msg::Data(Bytes::from(vec![1u8; n]))),
    };
    let finish = |crc: u32| pb::WriteChunkRequest {
        msg: Some(Msg::Finish(pb::WriteFinish { crc32c: crc })),
    };
    let target = placement.workers[0].clone();
    let mut w = worker_rpc(&target);
    tried += 4;
    let r = w
        .write_chunk(tokio_stream::iter(vec![start(10), data(11), finish(0)]))
        .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::InvalidArgument),
        "more than declared"
    );
    let r = w
        .write_chunk(tokio_stream::iter(vec![start(10), data(5)]))
        .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::InvalidArgument),
        "ended half-way"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(start(10)).await.unwrap();
    tx.send(data(5)).await.unwrap();
    let started = std::time::Instant::now();
    let r = w
        .write_chunk(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::DeadlineExceeded),
        "went quiet"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);
    // In a chunk stream, a data message over the limit ends the write the same way.
    tried += 1;
    let r = w
        .write_chunk(tokio_stream::iter(vec![start(5 << 20), data(5 << 20)]))
        .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::ResourceExhausted),
        "oversized data message"
    );
    let ten = vec![1u8; 10];
    let ok = w
        .write_chunk(tokio_stream::iter(vec![
            start(10),
            data(10),
            finish(crc32c::crc32c(&ten)),
        ]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let again = w
        .write_chunk(tokio_stream::iter(vec![
            start(10),
            data(10),
            finish(crc32c::crc32c(&ten)),
        ]))
        .await;
    let again = again.unwrap_err();
    assert_eq!(
        again.code(),
        Code::AlreadyExists,
        "duplicate chunk id: {}",
        again.message()
    );

    // Malformed protobuf, raw over HTTP/2, to both daemons; and an oversized message.
    for body in [
        Bytes::from_static(&[0xff; 16]),
        Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        Bytes::from_static(&[0x12, 0x05, b'a']),
        Bytes::from(vec![0x08; 1000]),
    ] {
        tried += 2;
        let r = raw_call(&addr, "/dfs.v1.Master/StartUpload", body.clone()).await;
        assert!(r.is_err(), "master accepted {body:?}");
        let r = raw_call(&target, "/dfs.v1.Worker/ReadChunk", body.clone()).await;
        assert!(r.is_err(), "worker accepted {body:?}");
    }
    tried += 1;
    let r = raw_call(
        &target,
        "/dfs.v1.Worker/ReplicateChunk",
        Bytes::from(vec![0u8; 5 << 20]),
    )
    .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::ResourceExhausted),
        "oversized to a worker"
    );
    tried += 2;
    let r = raw_call(
        &addr,
        "/dfs.v1.Master/GetFile",
        Bytes::from(vec![0u8; 65 << 20]),
    )
    .await;
    assert_eq!(
        r.err().map(|s| s.code()),
        Some(Code::ResourceExhausted),
        "oversized to the master"
    );
    eprintln!("hostile input cases tried: {tried}");

    // Still serving, and nothing was written outside the data directories.
    tc.must_download_equal("keep", &src).await;
    let mut top: Vec<String> = std::fs::read_dir(tc.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        ["master", "scratch", "worker-0", "worker-1", "worker-2"]
    );
}

#[tokio::test]
async fn open_uploads_are_capped_per_client() {
    let mut cfg = small_chunks(1);
    cfg.replicas = 1;
    cfg.master_limits.max_open_uploads_per_client = 2;
    let tc = start_secured(cfg).await;
    let addr = tc.cluster.master_addr().to_string();
    let mut alice = master_as(&addr, Some(&token(TokenKind::ReadWrite, "alice")));
    let mut bob = master_as(&addr, Some(&token(TokenKind::ReadWrite, "bob")));
    let start = |n: &str| pb::StartUploadRequest {
        name: n.into(),
        size: 10,
        replicas: 1,
        ..Default::default()
    };
    let a1 = alice.start_upload(start("a1")).await.unwrap().into_inner();
    alice.start_upload(start("a2")).await.unwrap();
    let e = alice.start_upload(start("a3")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    bob.start_upload(start("b1"))
        .await
        .expect("other clients are not affected");
    alice
        .abort_upload(pb::AbortUploadRequest {
            upload_id: a1.upload_id,
        })
        .await
        .unwrap();
    alice
        .start_upload(start("a3"))
        .await
        .expect("a slot was freed");
}

#[tokio::test]
async fn a_worker_caps_concurrent_transfers_and_frees_stalled_ones() {
    let mut cfg = small_chunks(1);
    cfg.replicas = 1;
    cfg.worker_limits.max_transfers = 1;
    cfg.worker_limits.idle_timeout = Duration::from_millis(800);
    let tc = start_secured(cfg).await;
    let src = make_file(&tc.scratch().join("f"), 10_000, 7);
    tc.must_upload(&src, "f").await;
    let f = tc.client.stat("f").await.unwrap();
    let c = f.chunks[0].clone();
    let w_addr = c.replicas[0].worker.clone();

    // A client opens a write and stops sending.
    let mut m = master_as(
        tc.cluster.master_addr(),
        Some(&token(TokenKind::ReadWrite, "staller")),
    );
    let up = m
        .start_upload(pb::StartUploadRequest {
            name: "stall".into(),
            size: 10,
            replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let p = up.chunks[0].clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WriteChunkRequest {
        msg: Some(Msg::Start(pb::WriteStart {
            header: Some(pb::ChunkHeader {
                format_version: 1,
                chunk_id: p.chunk_id.clone(),
                file_name: "stall".into(),
                length: 10,
                ..Default::default()
            }),
            downstream: vec![],
            token: p.token.clone(),
        })),
    })
    .await
    .unwrap();
    let mut w = worker_rpc(&w_addr);
    let stalled = tokio::spawn(async move {
        w.write_chunk(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy = worker_rpc(&w_addr)
        .read_chunk(pb::ReadChunkRequest {
            chunk_id: c.chunk_id.clone(),
            token: c.token.clone(),
        })
        .await;
    assert_eq!(busy.err().map(|s| s.code()), Some(Code::ResourceExhausted));
    let r = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.err().map(|s| s.code()), Some(Code::DeadlineExceeded));
    drop(tx);
    // The slot is free again and the stalled write left no file behind.
    tc.must_download_equal("f", &src).await;
    assert!(chunk_path(tc.cluster.worker_dir(0).unwrap(), &p.chunk_id).is_none());
}

#[tokio::test]
async fn a_reader_cannot_take_a_chunk_out_of_service_with_bad_replica_reports() {
    let mut cfg = small_chunks(3);
    cfg.repair = false;
    let tc = start_secured(cfg).await;
    let src = make_file(&tc.scratch().join("f"), 20_000, 8);
    tc.must_upload(&src, "f").await;
    let c = tc.client.stat("f").await.unwrap().chunks[0].clone();
    let mut ro = master_as(
        tc.cluster.master_addr(),
        Some(&token(TokenKind::ReadOnly, "mallory")),
    );
    for r in &c.replicas {
        ro.report_bad_replica(pb::ReportBadReplicaRequest {
            chunk_id: c.chunk_id.clone(),
            worker: r.worker.clone(),
            reason: "trust me".into(),
        })
        .await
        .unwrap();
    }
    let status = tc.client.status().await.unwrap();
    assert_eq!(status.missing_chunks, 0);
    assert_eq!(status.corrupt_replicas, 2, "the last copy stays in service");
    tc.must_download_equal("f", &src).await;
}

#[tokio::test]
async fn a_slow_request_gets_deadline_exceeded() {
    let mut cfg = small_chunks(1);
    cfg.master_limits.request_timeout = Duration::from_millis(1);
    let tc = start_secured(cfg).await;
    let mut m = master_as(
        tc.cluster.master_addr(),
        Some(&token(TokenKind::ReadWrite, "slow")),
    );
    // Ten thousand names in one durable transaction take far longer than 1 ms.
    let names: Vec<String> = (0..10_000).map(|i| format!("slow-{i:05}")).collect();
    let e = m
        .create_empty(pb::CreateEmptyRequest { names })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    // Requests that finish in time still work.
    m.cluster_status(pb::ClusterStatusRequest {}).await.unwrap();
}

#[tokio::test]
async fn streams_per_connection_are_capped() {
    let mut cfg = small_chunks(1);
    cfg.master_limits.max_streams_per_conn = 1;
    let tc = start_secured(cfg).await;
    let t = Transport::new(None, Some(&token(TokenKind::ReadOnly, "watcher"))).unwrap();
    // One connection (a tonic channel is one HTTP/2 connection).
    let mut m = t.master(t.data_channel(tc.cluster.master_addr()).unwrap());
    let logs = m
        .stream_logs(pb::StreamLogsRequest { backlog: 1 })
        .await
        .unwrap()
        .into_inner();
    // The only stream is taken: a second call on the same connection waits.
    let blocked = tokio::time::timeout(
        Duration::from_millis(500),
        m.cluster_status(pb::ClusterStatusRequest {}),
    )
    .await;
    assert!(blocked.is_err(), "a second stream was admitted");
    drop(logs);
    let freed = tokio::time::timeout(
        Duration::from_secs(10),
        m.cluster_status(pb::ClusterStatusRequest {}),
    )
    .await;
    assert!(matches!(freed, Ok(Ok(_))), "{freed:?}");
}

/// With a cluster secret, reserved uploads carry write capabilities that the workers accept:
/// a stream of small uploads by one client goes through them, and every file reads back.
/// The master's probe of an unconfirmed prepare carries a capability the workers accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_uploads_carry_capabilities_the_workers_accept() {
    let tc = start_secured(LocalClusterConfig {
        in_doubt_grace: Duration::from_secs(60),
        ..small_chunks(3)
    })
    .await;
    let dir = tc.scratch();
    let mut files = Vec::new();
    for i in 0..40u64 {
        let name = format!("res-{i}");
        let path = make_file(&dir.join(&name), 500 + i * 101, 900 + i);
        tc.must_upload(&path, &name).await;
        files.push((name, path));
    }
    let stats = tc.client.reservations();
    assert!(stats.committed >= 20, "{stats:?}");
    assert_eq!(stats.fell_back, 0, "{stats:?}");
    for (name, path) in &files {
        assert_eq!(
            tc.client.read(name).await.unwrap(),
            std::fs::read(path).unwrap(),
            "{name}"
        );
    }
    // Each read went to a worker beside its lookup, with its placement's read capability
    // (reserved or started the usual way), which the workers accepted.
    let beside = tc.client.read_locations();
    assert_eq!(beside.used, files.len() as u64, "{beside:?}");
    assert_eq!((beside.failed, beside.stale), (0, 0), "{beside:?}");
    // Every reserved placement carries a capability for its own chunk.
    let mut m = master_as(
        tc.cluster.master_addr(),
        Some(&token(TokenKind::ReadWrite, "owner")),
    );
    let r = m
        .reserve_uploads(pb::ReserveUploadsRequest {
            count: 3,
            replicas: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.uploads.len(), 3);
    assert!(r.uploads.iter().all(|u| !u.chunks[0].token.is_empty()));
    assert!(r.uploads.iter().all(|u| !u.chunks[0].read_token.is_empty()));
    // Each of its two capabilities does its one job: the read one cannot write the chunk,
    // and the write one cannot read it back.
    let p = &r.uploads[2].chunks[0];
    let as_reader = pb::ChunkPlacement {
        token: p.read_token.clone(),
        ..p.clone()
    };
    let refused = write_chunk_direct(&as_reader, "x", b"not allowed", None).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    write_chunk_direct(p, "x", b"allowed", None).await.unwrap();
    let mut w = worker_rpc(&p.workers[0]);
    let read_with = |token: &Bytes| pb::ReadChunkRequest {
        chunk_id: p.chunk_id.clone(),
        token: token.clone(),
    };
    let refused = w.read_chunk(read_with(&p.token)).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    assert!(w.read_chunk(read_with(&p.read_token)).await.is_ok());
    // A large file's placements carry none.
    let large = m
        .start_upload(pb::StartUploadRequest {
            name: "large".into(),
            size: 64 << 20,
            replicas: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        large
            .chunks
            .iter()
            .all(|c| c.read_token.is_empty() && !c.token.is_empty())
    );

    // A prepare its client never confirms: the master reads the chunk back from the
    // workers with a capability of its own, which they accept, so the read that asks gets
    // the file. (The grace is a minute: only that read's probe can settle it in time.)
    let data = b"prepared under a cluster secret".as_slice();
    let plan = &r.uploads[0];
    write_chunk_direct(&plan.chunks[0], "x", data, None)
        .await
        .unwrap();
    let prepared = m
        .prepare_uploads(pb::CommitUploadsRequest {
            commits: vec![reserved_commit(plan, "prepared", data)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(prepared[0].commit.is_some(), "{prepared:?}");
    let read = tokio::time::timeout(Duration::from_secs(30), tc.client.read("prepared")).await;
    assert_eq!(read.expect("settled by the read's probe").unwrap(), data);
}
