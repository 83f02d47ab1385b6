//! Rendering snapshots of the console at 80×24 and 160×48 (insta on ratatui's TestBackend).
//! The state is built directly, so nothing volatile (ports, clocks) reaches the screen except
//! the picker's temp-dir path, which is replaced before comparing.

use std::time::Instant;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use dfs::rpc::pb::{
    ChunkInfo, ClusterStatusResponse, FileInfo, ReplicaInfo, WorkerStatus, WorkerUsage,
};
use dfs::ui::app::{App, Conn, Msg};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

const GIB: u64 = 1 << 30;

fn worker(i: usize, state: &str, used_gib: u64, chunks: u64, hb_ms: i64) -> WorkerStatus {
    WorkerStatus {
        address: format!("10.0.0.{}:50051", i + 1),
        state: state.into(),
        usage: Some(WorkerUsage {
            capacity_bytes: 100 * GIB,
            used_bytes: used_gib * GIB,
            free_bytes: (100 - used_gib) * GIB,
            chunk_count: chunks,
            ..Default::default()
        }),
        last_heartbeat_ms_ago: hb_ms,
        chunks_mapped: chunks,
        ..Default::default()
    }
}

fn status(
    workers: Vec<WorkerStatus>,
    files: u64,
    under: u64,
    missing: u64,
) -> ClusterStatusResponse {
    let alive = workers.iter().filter(|w| w.state == "alive").count() as u32;
    let dead = workers.iter().filter(|w| w.state == "dead").count() as u32;
    let used: u64 = workers
        .iter()
        .map(|w| w.usage.unwrap_or_default().used_bytes)
        .sum();
    ClusterStatusResponse {
        workers_alive: alive,
        workers_dead: dead,
        capacity_bytes: 100 * GIB * alive as u64,
        used_bytes: used,
        files,
        logical_bytes: (files * 3) << 20,
        chunks: files,
        stable_chunks: files - under - missing,
        endangered_chunks: under.min(1),
        under_replicated_chunks: under,
        missing_chunks: missing,
        master_address: "127.0.0.1:50050".into(),
        workers,
        ..Default::default()
    }
}

fn file(name: &str, size: u64, live: u32) -> FileInfo {
    FileInfo {
        name: name.into(),
        size,
        chunk_count: size.div_ceil(8 << 20),
        chunk_size: 8 << 20,
        replicas_target: 3,
        replicas_min_live: live,
        modified_unix_ms: 1_795_000_000_000,
        blake3: "ab".repeat(32),
        version: 7,
        file_id: 3,
        ..Default::default()
    }
}

fn app() -> App {
    let mut a = App::new("127.0.0.1:50050", false);
    a.no_color = true;
    a.now = Instant::now();
    a
}

fn healthy() -> App {
    let mut a = app();
    let ws = vec![
        worker(0, "alive", 12, 40, 300),
        worker(1, "alive", 30, 41, 800),
        worker(2, "alive", 55, 39, 100),
    ];
    a.update(Msg::Status(Ok(Box::new(status(ws, 4, 0, 0)))));
    a.update(Msg::Files(Ok(vec![
        file("photo.jpg", 2_400_000, 3),
        file("backup-2026-11.tar", 3 * GIB, 3),
        file("notes.txt", 1200, 3),
        file("empty", 0, 3),
    ])));
    a.read_history = [0, 5, 20, 80, 40, 10]
        .map(|m| m << 20)
        .into_iter()
        .collect();
    a.write_history = [50, 60, 0, 0, 30, 90]
        .map(|m| m << 20)
        .into_iter()
        .collect();
    a
}

fn key(a: &mut App, code: KeyCode) {
    a.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
}

fn screen(a: &mut App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| dfs::ui::view::render(f, a)).unwrap();
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..h {
        let mut line = String::new();
        for x in 0..w {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Snapshots `a` at both sizes.
fn both(name: &str, mut make: impl FnMut() -> App) {
    for (w, h) in [(80, 24), (160, 48)] {
        let mut a = make();
        let s = screen(&mut a, w, h);
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), s);
    }
}

#[test]
fn empty_cluster() {
    both("empty_cluster", || {
        let mut a = app();
        a.update(Msg::Status(Ok(Box::new(status(vec![], 0, 0, 0)))));
        a.update(Msg::Files(Ok(vec![])));
        a
    });
}

#[test]
fn unreachable_master() {
    both("unreachable", || {
        let mut a = app();
        a.update(Msg::Status(Err(
            "cannot reach the master at 127.0.0.1:50050: Connection refused".into(),
        )));
        assert!(matches!(a.conn, Conn::Unreachable(_)));
        a
    });
}

#[test]
fn healthy_cluster() {
    both("healthy", healthy);
}

#[test]
fn dead_worker() {
    both("dead_worker", || {
        let mut a = app();
        let ws = vec![
            worker(0, "alive", 12, 40, 300),
            worker(1, "dead", 30, 41, 17_000),
            worker(2, "suspect", 55, 39, 3_100),
        ];
        a.update(Msg::Status(Ok(Box::new(status(ws, 3, 2, 1)))));
        a.update(Msg::Files(Ok(vec![
            file("a.bin", 100 << 20, 1),
            file("b.bin", 9 << 20, 0),
            file("c.bin", 1 << 20, 2),
        ])));
        a
    });
}

#[test]
fn long_file_names() {
    both("long_names", || {
        let mut a = healthy();
        a.update(Msg::Files(Ok(vec![
            file(
                &format!("{}.mkv", "a-very-long-name-".repeat(14)),
                7 * GIB,
                3,
            ),
            file(&"€".repeat(120), 10, 3),
            file("short", 1, 3),
        ])));
        a
    });
}

#[test]
fn hundred_thousand_files() {
    both("100k_files", || {
        let mut a = healthy();
        let files: Vec<FileInfo> = (0..100_000)
            .map(|i| {
                file(
                    &format!("file-{i:06}.dat"),
                    (i as u64 * 7919) % (64 << 20),
                    3,
                )
            })
            .collect();
        a.update(Msg::Files(Ok(files)));
        // Jump to the end and back up a little: only visible rows are drawn.
        key(&mut a, KeyCode::End);
        key(&mut a, KeyCode::Up);
        a
    });
}

#[test]
fn help_overlay() {
    both("help", || {
        let mut a = healthy();
        key(&mut a, KeyCode::Char('?'));
        a
    });
}

#[test]
fn drain_dialog() {
    both("drain_dialog", || {
        let mut a = healthy();
        key(&mut a, KeyCode::Char('1'));
        key(&mut a, KeyCode::Down);
        key(&mut a, KeyCode::Char('D'));
        a
    });
}

#[test]
fn delete_dialog() {
    both("delete_dialog", || {
        let mut a = healthy();
        key(&mut a, KeyCode::Char('x'));
        a
    });
}

#[test]
fn download_dialogs() {
    both("download_dialog", || {
        let mut a = healthy();
        key(&mut a, KeyCode::Char('d'));
        a
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("backup-2026-11.tar"), b"old").unwrap();
    let tmp = dir.path().to_str().unwrap().to_string();
    for (w, h) in [(80, 24), (160, 48)] {
        let mut a = healthy();
        key(&mut a, KeyCode::Char('d'));
        // Replace the default destination with the temp dir, then confirm.
        for _ in 0..20 {
            key(&mut a, KeyCode::Backspace);
        }
        for c in tmp.chars() {
            key(&mut a, KeyCode::Char(c));
        }
        key(&mut a, KeyCode::Enter);
        let s = screen(&mut a, w, h).replace(&tmp, "/TMP");
        insta::assert_snapshot!(format!("overwrite_dialog_{w}x{h}"), s);
    }
}

#[test]
fn file_detail() {
    both("detail", || {
        let mut a = healthy();
        key(&mut a, KeyCode::Enter);
        let mut f = file("backup-2026-11.tar", 20 << 20, 2);
        f.chunks = (0..3)
            .map(|i| ChunkInfo {
                index: i,
                chunk_id: format!("9f86d081884c7d659a2feaa0c55ad0{i:02x}"),
                length: if i < 2 { 8 << 20 } else { 4 << 20 },
                crc32c: 0x1234_5678 + i,
                token: Default::default(),
                replicas: vec![
                    ReplicaInfo {
                        worker: "10.0.0.1:50051".into(),
                        state: "alive".into(),
                    },
                    ReplicaInfo {
                        worker: "10.0.0.2:50051".into(),
                        state: if i == 1 {
                            "dead".into()
                        } else {
                            "alive".into()
                        },
                    },
                ],
            })
            .collect();
        let name = a.selected_file().unwrap().name.clone();
        a.update(Msg::Detail(name, Ok(Box::new(f))));
        a
    });
}

#[test]
fn file_picker() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("photos")).unwrap();
    std::fs::write(dir.path().join("report.pdf"), vec![0u8; 123_456]).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
    for (w, h) in [(80, 24), (160, 48)] {
        let mut a = healthy();
        a.start_dir = dir.path().to_path_buf();
        key(&mut a, KeyCode::Char('u'));
        key(&mut a, KeyCode::Down);
        key(&mut a, KeyCode::Char(' '));
        let s = screen(&mut a, w, h).replace(dir.path().to_str().unwrap(), "/TMP");
        insta::assert_snapshot!(format!("picker_{w}x{h}"), s);
    }
}

#[test]
fn terminal_too_small() {
    let mut a = healthy();
    let s = screen(&mut a, 40, 10);
    assert!(s.contains("terminal too small"), "{s}");
}
