//! Bad input gets a clear error with the right status code, and changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dfs::client::{Client, ClientError, DownloadOptions, UploadOptions};
use dfs::rpc::pb;
use tonic::Code;

fn upload_as(name: &str) -> UploadOptions {
    UploadOptions {
        name: Some(name.to_string()),
        ..Default::default()
    }
}

/// No file is listed and no chunk is on any worker.
async fn assert_nothing_stored(t: &TestCluster, workers: usize) {
    assert!(t.client.list().await.unwrap().is_empty());
    for i in 0..workers {
        let d = t.cluster.worker_dir(i).unwrap();
        assert!(chunk_files(d).is_empty(), "worker {i} holds chunks");
        let tmp = std::fs::read_dir(d.join("tmp")).unwrap().count();
        assert_eq!(tmp, 0, "worker {i} kept a temporary file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_refused_everywhere() {
    let t = TestCluster::start(small_chunks(3)).await;
    let path = make_file(&t.scratch().join("f"), 100, 1);
    let long = "x".repeat(256);
    let bad = [
        "",
        "a/b",
        "/etc",
        "a\\b",
        ".",
        "..",
        "a\0b",
        "tab\there",
        "new\nline",
        &long,
    ];
    for name in bad {
        let e = t.client.upload(&path, upload_as(name)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "upload {name:?}: {e}");
        assert!(e.to_string().contains("file name"), "{e}");
        let e = t.client.stat(name).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "stat {name:?}");
        let e = t.client.delete(name).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "delete {name:?}");
    }
    assert_nothing_stored(&t, 3).await;
    assert_eq!(t.client.status().await.unwrap().open_uploads, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_files_are_not_found_and_downloads_write_nothing() {
    let t = TestCluster::start(small_chunks(1)).await;
    for e in [
        t.client.stat("nope").await.unwrap_err(),
        t.client.delete("nope").await.unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.to_string().contains("not found"), "{e}");
    }
    let dest = t.scratch().join("nope");
    let e = t
        .client
        .download("nope", &dest, DownloadOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(std::fs::read_dir(t.scratch()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_with_no_live_workers_is_unavailable() {
    let t = TestCluster::start(small_chunks(0)).await;
    let path = make_file(&t.scratch().join("f"), 100, 1);
    let e = t.client.upload(&path, upload_as("f")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.to_string().contains("no live workers"), "{e}");
    assert!(t.client.list().await.unwrap().is_empty());
    assert_eq!(t.client.status().await.unwrap().open_uploads, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_are_invalid() {
    let t = TestCluster::start(small_chunks(1)).await;
    let path = make_file(&t.scratch().join("f"), 100, 1);
    let e = t
        .client
        .upload(
            &path,
            UploadOptions {
                name: Some("f".into()),
                replicas: Some(17),
                progress: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let addr = t.cluster.master_addr().to_string();
    let mut m = dfs::rpc::master_client(dfs::rpc::control_channel(&addr).unwrap());
    let e = m
        .start_upload(pb::StartUploadRequest {
            name: "huge".into(),
            size: u64::MAX,
            replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A commit that does not match its upload is refused and nothing appears.
    let plan = m
        .start_upload(pb::StartUploadRequest {
            name: "f".into(),
            size: 100,
            replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for chunks in [
        vec![],
        vec![pb::CommittedChunk {
            index: 0,
            chunk_id: "0".repeat(32),
            length: 100,
            crc32c: 0,
            workers: plan.chunks[0].workers.clone(),
        }],
        vec![pb::CommittedChunk {
            index: 0,
            chunk_id: plan.chunks[0].chunk_id.clone(),
            length: 99,
            crc32c: 0,
            workers: plan.chunks[0].workers.clone(),
        }],
        vec![pb::CommittedChunk {
            index: 0,
            chunk_id: plan.chunks[0].chunk_id.clone(),
            length: 100,
            crc32c: 0,
            workers: vec!["10.9.9.9:1".into()],
        }],
    ] {
        let e = m
            .commit_upload(pb::CommitUploadRequest {
                upload_id: plan.upload_id.clone(),
                chunks,
                sha256: "a".repeat(64),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
    assert!(t.client.list().await.unwrap().is_empty());

    // An upload of unknown size: a size beside the flag is refused; its chunks are placed
    // one by one, at any index; its commit must give a size its chunks add up to.
    let e = m
        .start_upload(pb::StartUploadRequest {
            name: "s".into(),
            size: 5,
            replicas: 1,
            size_unknown: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("unknown size"), "{}", e.message());
    let open = m
        .start_upload(pb::StartUploadRequest {
            name: "s".into(),
            size: 0,
            replicas: 1,
            size_unknown: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(open.chunks.is_empty());
    let far = m
        .allocate_chunk(pb::AllocateChunkRequest {
            upload_id: open.upload_id.clone(),
            index: 70,
            exclude: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .chunk
        .unwrap();
    assert_eq!(far.index, 70);
    let only_far = vec![pb::CommittedChunk {
        index: 70,
        chunk_id: far.chunk_id.clone(),
        length: 1,
        crc32c: 0,
        workers: far.workers.clone(),
    }];
    for (size, chunks) in [(1, vec![]), (70 * MIB + 1, only_far)] {
        let e = m
            .commit_upload(pb::CommitUploadRequest {
                upload_id: open.upload_id.clone(),
                chunks,
                sha256: "a".repeat(64),
                size,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
    assert!(t.client.list().await.unwrap().is_empty());
    // Size 0 with no chunks is an empty input: an empty file (the unused chunk is garbage).
    let empty = m
        .commit_upload(pb::CommitUploadRequest {
            upload_id: open.upload_id.clone(),
            sha256: "a".repeat(64),
            size: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty.file.map(|f| (f.size, f.chunk_count)), Some((0, 0)));
    // Heartbeats and registrations from nonsense addresses are refused.
    let e = m
        .register(pb::RegisterRequest {
            address: "../../etc".into(),
            usage: None,
            chunks: vec![],
            with_headers: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

fn start_msg(chunk_id: &str, len: u64, downstream: Vec<String>) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        msg: Some(pb::write_chunk_request::Msg::Start(pb::WriteStart {
            header: Some(pb::ChunkHeader {
                format_version: 1,
                chunk_id: chunk_id.into(),
                file_id: 1,
                file_name: "f".into(),
                chunk_index: 0,
                file_version: 1,
                length: len,
                crc32c: 0,
                created_unix_ms: 0,
                ..Default::default()
            }),
            downstream,
            token: Default::default(),
        })),
    }
}

fn data_msg(b: &[u8]) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        msg: Some(pb::write_chunk_request::Msg::Data(
            bytes::Bytes::copy_from_slice(b),
        )),
    }
}

fn finish_msg(crc: u32) -> pb::WriteChunkRequest {
    pb::WriteChunkRequest {
        msg: Some(pb::write_chunk_request::Msg::Finish(pb::WriteFinish {
            crc32c: crc,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_nothing_from_a_bad_chunk_stream() {
    let t = TestCluster::start(small_chunks(3)).await;
    let addrs = t.cluster.worker_addrs();
    let mut w = dfs::rpc::worker_client(dfs::rpc::data_channel(&addrs[0]).unwrap());
    let data = vec![7u8; 300_000];
    let good_crc = crc32c::crc32c(&data);
    let id = || dfs::chunk::ChunkId::generate().to_string();
    let pipeline = addrs[1..].to_vec();

    // Wrong checksum, through a 3-worker pipeline: DataLoss, nothing kept anywhere.
    let msgs = vec![
        start_msg(&id(), data.len() as u64, pipeline.clone()),
        data_msg(&data),
        finish_msg(good_crc ^ 1),
    ];
    let e = w.write_chunk(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(e.message().contains("checksum"), "{}", e.message());

    // More bytes than declared.
    let msgs = vec![
        start_msg(&id(), 10, pipeline.clone()),
        data_msg(&data),
        finish_msg(good_crc),
    ];
    let e = w.write_chunk(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    // Stops half-way (no finish).
    let msgs = vec![
        start_msg(&id(), data.len() as u64, pipeline.clone()),
        data_msg(&data[..1000]),
    ];
    let e = w.write_chunk(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    // Data without a start, a traversal attempt as chunk id, and an empty stream.
    for msgs in [
        vec![data_msg(&data)],
        vec![
            start_msg("../../../etc/passwd", 1, vec![]),
            data_msg(b"x"),
            finish_msg(crc32c::crc32c(b"x")),
        ],
        vec![],
    ] {
        let e = w.write_chunk(tokio_stream::iter(msgs)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }

    // Reads of junk and unknown ids.
    let e = w
        .read_chunk(pb::ReadChunkRequest {
            chunk_id: "../x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = w
        .read_chunk(pb::ReadChunkRequest {
            chunk_id: id(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let dirs: Vec<_> = (0..3)
        .map(|i| t.cluster.worker_dir(i).unwrap().to_path_buf())
        .collect();
    // Pipeline members finish asynchronously; give them a bounded moment to clean up.
    let clean = wait_until(Duration::from_secs(5), || {
        dirs.iter().all(|d| {
            chunk_files(d).is_empty()
                && std::fs::read_dir(d.join("tmp"))
                    .map(|r| r.count())
                    .unwrap_or(1)
                    == 0
        })
    })
    .await;
    assert!(clean, "a worker kept bytes of a rejected chunk");

    // And a good write still works afterwards: the worker kept serving.
    let msgs = vec![
        start_msg(&id(), data.len() as u64, pipeline),
        data_msg(&data),
        finish_msg(good_crc),
    ];
    let r = w.write_chunk(tokio_stream::iter(msgs)).await.unwrap();
    assert_eq!(r.into_inner().stored_on.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_errors_are_clear_and_write_nothing() {
    let t = TestCluster::start(small_chunks(1)).await;
    let missing = t.scratch().join("does-not-exist");
    let e = t.client.upload(&missing, upload_as("x")).await.unwrap_err();
    assert!(matches!(e, ClientError::LocalIo { .. }), "{e}");
    assert!(e.to_string().contains("does-not-exist"), "{e}");
    let e = t
        .client
        .upload(&t.scratch(), upload_as("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert_eq!(t.client.status().await.unwrap().open_uploads, 0);

    // Destination exists: refused without --force, contents untouched; replaced with it.
    let src = make_file(&t.scratch().join("src"), 5000, 1);
    t.must_upload(&src, "f").await;
    let dest = t.scratch().join("existing");
    std::fs::write(&dest, b"keep me").unwrap();
    let e = t
        .client
        .download("f", &dest, DownloadOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::DestinationExists(_)), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"keep me");
    let names: Vec<_> = std::fs::read_dir(t.scratch())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("dfs-part")), "{names:?}");
    t.client
        .download(
            "f",
            &dest,
            DownloadOptions {
                force: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_files_equal(&dest, &src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_master_fails_fast_with_a_clear_message() {
    let port = free_port();
    let started = Instant::now();
    let e = match Client::connect(&format!("127.0.0.1:{port}")).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.to_string().contains("cannot reach the master"), "{e}");
}

/// `ReadChunk` is answered outside tonic (see `worker::read`), so it gets the checks tonic
/// would make itself: a body that is not one gRPC message, a compressed or oversized one, or
/// one that is not a `ReadChunkRequest` gets a clear status, the worker keeps serving, and
/// the generated client still reads a large chunk byte-exact from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_read_chunk_requests_get_grpc_errors_and_the_generated_client_reads_exactly() {
    use tower_service::Service;
    let t = TestCluster::start(small_chunks(1)).await;
    let path = make_file(&t.scratch().join("big"), 3 << 20, 7);
    t.must_upload(&path, "big").await;
    let addr = t.cluster.worker_addrs()[0].clone();
    let channel = dfs::rpc::data_channel(&addr).unwrap();
    let call = |body: Vec<u8>, compressed_header: bool| {
        let mut ch = channel.clone();
        async move {
            let mut req = http::Request::builder()
                .method("POST")
                .uri("/dfs.v1.Worker/ReadChunk")
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if compressed_header {
                req = req.header("grpc-encoding", "gzip");
            }
            let req = req
                .body(tonic::body::Body::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
                .unwrap();
            std::future::poll_fn(|cx| ch.poll_ready(cx)).await.unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), ch.call(req))
                .await
                .expect("answered in time")
                .unwrap();
            assert_eq!(resp.status(), 200);
            tonic::Status::from_header_map(resp.headers()).expect("a trailers-only status")
        }
    };
    let framed = |flag: u8, msg: &[u8]| {
        let mut b = vec![flag];
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(msg);
        b
    };
    let s = call(vec![], false).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = call(vec![0, 0, 0, 0, 9, 1], false).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = call(framed(1, b"\x0a\x01x"), true).await;
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    let s = call(framed(0, &[0xff; 10]), false).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = call(framed(0, &vec![0u8; 100 << 10]), false).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    // The worker kept serving; the generated client reads its chunks byte-exact.
    let info = t.client.stat("big").await.unwrap();
    let mut w = dfs::rpc::worker_client(channel.clone());
    let expected = std::fs::read(&path).unwrap();
    let mut got = Vec::new();
    for c in &info.chunks {
        let mut stream = w
            .read_chunk(pb::ReadChunkRequest {
                chunk_id: c.chunk_id.clone(),
                token: c.token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut saw_header = false;
        while let Some(m) = stream.message().await.unwrap() {
            match m.msg {
                Some(pb::read_chunk_response::Msg::Header(h)) => {
                    assert_eq!(h.length, c.length);
                    saw_header = true;
                }
                Some(pb::read_chunk_response::Msg::Data(d)) => got.extend_from_slice(&d),
                None => panic!("an empty message"),
            }
        }
        assert!(saw_header);
    }
    assert!(got == expected, "the generated client read other bytes");
    t.must_download_equal("big", &path).await;
}

/// A reader that stops taking a large chunk is cut off after the worker's idle timeout, and
/// when it reads on it gets an error after the bytes that were queued, never an OK status
/// after a short chunk; the transfer slot is free again for the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chunk_reader_is_cut_off_with_an_error_not_a_short_ok() {
    let mut cfg = small_chunks(1);
    cfg.chunk_size = 32 << 20;
    cfg.worker_limits.idle_timeout = Duration::from_millis(400);
    let t = TestCluster::start(cfg).await;
    let path = make_file(&t.scratch().join("big"), 32 << 20, 3);
    t.must_upload(&path, "big").await;
    let c = t.client.stat("big").await.unwrap().chunks[0].clone();
    let addr = t.cluster.worker_addrs()[0].clone();
    let mut w = dfs::rpc::worker_client(dfs::rpc::data_channel(&addr).unwrap());
    let mut stream = w
        .read_chunk(pb::ReadChunkRequest {
            chunk_id: c.chunk_id.clone(),
            token: c.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Take nothing for well past the idle timeout: the windows and the queue fill, and the
    // worker's reader gives up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = 0u64;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends in time")
        {
            Ok(Some(m)) => {
                if let Some(pb::read_chunk_response::Msg::Data(d)) = m.msg {
                    got += d.len() as u64;
                }
            }
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    assert!(got < c.length, "the whole chunk came through ({got} bytes)");
    let s = end.expect("a short chunk must end with an error, not OK");
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    // The slot was freed: the file reads back whole.
    t.must_download_equal("big", &path).await;
}
