//! The console's state machine: key sequences → state (selection, sort, filter, dialogs, picker).

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use dfs::rpc::pb::{ClusterStatusResponse, FileInfo, WorkerStatus};
use dfs::ui::app::{App, Conn, Dialog, Effect, FileSort, Level, LogLine, Msg, Pane, TransferState};

fn file(name: &str, size: u64, modified: i64) -> FileInfo {
    FileInfo {
        name: name.into(),
        size,
        chunk_count: size.div_ceil(8 << 20),
        replicas_target: 3,
        replicas_min_live: 3,
        modified_unix_ms: modified,
        ..Default::default()
    }
}

fn app_with_files() -> App {
    let mut a = App::new("127.0.0.1:1", false);
    a.update(Msg::Status(Ok(Box::new(ClusterStatusResponse {
        workers: vec![
            WorkerStatus {
                address: "b:1".into(),
                state: "alive".into(),
                chunks_mapped: 5,
                ..Default::default()
            },
            WorkerStatus {
                address: "a:1".into(),
                state: "dead".into(),
                chunks_mapped: 9,
                ..Default::default()
            },
        ],
        ..Default::default()
    }))));
    a.update(Msg::Files(Ok(vec![
        file("zeta", 10, 3),
        file("alpha", 300, 1),
        file("mid", 20, 2),
    ])));
    a
}

fn press(a: &mut App, code: KeyCode) -> Vec<Effect> {
    a.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

fn typed(a: &mut App, s: &str) {
    for c in s.chars() {
        press(a, KeyCode::Char(c));
    }
}

fn names(a: &App) -> Vec<String> {
    a.view.iter().map(|&i| a.files[i].name.clone()).collect()
}

#[test]
fn selection_moves_and_clamps() {
    let mut a = app_with_files();
    assert_eq!(a.focus, Pane::Files);
    assert_eq!(a.selected_file().unwrap().name, "alpha");
    press(&mut a, KeyCode::Down);
    press(&mut a, KeyCode::Char('j'));
    press(&mut a, KeyCode::Down);
    assert_eq!(a.selected_file().unwrap().name, "zeta");
    press(&mut a, KeyCode::Char('k'));
    assert_eq!(a.selected_file().unwrap().name, "mid");
    press(&mut a, KeyCode::Char('g'));
    assert_eq!(a.files_nav.selected, 0);
    press(&mut a, KeyCode::Char('G'));
    assert_eq!(a.files_nav.selected, 2);
    // The list shrinking keeps the selection in range.
    a.update(Msg::Files(Ok(vec![file("only", 1, 1)])));
    assert_eq!(a.selected_file().unwrap().name, "only");
}

#[test]
fn sorting_cycles_columns_and_reverses() {
    let mut a = app_with_files();
    assert_eq!(names(&a), ["alpha", "mid", "zeta"]);
    press(&mut a, KeyCode::Char('s'));
    assert_eq!(a.files_sort.0, FileSort::Size);
    assert_eq!(names(&a), ["zeta", "mid", "alpha"]);
    press(&mut a, KeyCode::Char('S'));
    assert_eq!(names(&a), ["alpha", "mid", "zeta"]);
    press(&mut a, KeyCode::Char('s'));
    press(&mut a, KeyCode::Char('s'));
    press(&mut a, KeyCode::Char('s'));
    assert_eq!(a.files_sort.0, FileSort::Modified);
    assert_eq!(
        names(&a),
        ["zeta", "mid", "alpha"],
        "descending by modified"
    );
    // Workers sort independently.
    press(&mut a, KeyCode::Char('1'));
    let order: Vec<String> = a.sorted_workers().into_iter().map(|w| w.address).collect();
    assert_eq!(order, ["a:1", "b:1"]);
    press(&mut a, KeyCode::Char('s'));
    let order: Vec<String> = a.sorted_workers().into_iter().map(|w| w.address).collect();
    assert_eq!(order, ["b:1", "a:1"], "alive before dead");
}

#[test]
fn sorting_keeps_the_selected_file() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Down);
    assert_eq!(a.selected_file().unwrap().name, "mid");
    press(&mut a, KeyCode::Char('s'));
    press(&mut a, KeyCode::Char('S'));
    assert_eq!(a.selected_file().unwrap().name, "mid");
}

#[test]
fn filter_as_you_type_and_clear() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char('/'));
    assert!(a.editing_filter);
    typed(&mut a, "ZE");
    assert_eq!(names(&a), ["zeta"]);
    // While editing, keys are text: 'q' does not quit.
    typed(&mut a, "q");
    assert!(!a.should_quit);
    assert!(names(&a).is_empty());
    press(&mut a, KeyCode::Backspace);
    press(&mut a, KeyCode::Enter);
    assert!(!a.editing_filter);
    assert_eq!(a.filter, "ZE");
    assert_eq!(names(&a), ["zeta"]);
    press(&mut a, KeyCode::Esc);
    assert_eq!(names(&a).len(), 3);
}

#[test]
fn panes_switch_with_tab_and_numbers() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Tab);
    assert_eq!(a.focus, Pane::Transfers);
    press(&mut a, KeyCode::Tab);
    assert_eq!(a.focus, Pane::Logs);
    press(&mut a, KeyCode::Tab);
    assert_eq!(a.focus, Pane::Workers);
    press(&mut a, KeyCode::BackTab);
    assert_eq!(a.focus, Pane::Logs);
    press(&mut a, KeyCode::Char('2'));
    assert_eq!(a.focus, Pane::Files);
}

#[test]
fn delete_needs_confirmation_and_cancel_is_the_default() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char('x'));
    assert!(
        matches!(&a.dialog, Some(Dialog::ConfirmDelete { names, yes: false }) if names == &["alpha"])
    );
    // Enter on the default button cancels.
    let fx = press(&mut a, KeyCode::Enter);
    assert!(fx.is_empty() && a.dialog.is_none());
    // Moving to Delete and pressing Enter deletes.
    press(&mut a, KeyCode::Delete);
    press(&mut a, KeyCode::Right);
    let fx = press(&mut a, KeyCode::Enter);
    assert!(matches!(fx.as_slice(), [Effect::Delete { name }] if name == "alpha"));
    // Esc and 'n' cancel; 'y' confirms.
    press(&mut a, KeyCode::Char('x'));
    assert!(press(&mut a, KeyCode::Esc).is_empty());
    press(&mut a, KeyCode::Char('x'));
    assert!(press(&mut a, KeyCode::Char('n')).is_empty());
    press(&mut a, KeyCode::Char('x'));
    assert_eq!(press(&mut a, KeyCode::Char('y')).len(), 1);
}

#[test]
fn marked_files_are_the_targets() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char(' '));
    press(&mut a, KeyCode::Char(' '));
    assert_eq!(a.marked.len(), 2);
    press(&mut a, KeyCode::Char('x'));
    let fx = press(&mut a, KeyCode::Char('y'));
    let mut deleted: Vec<String> = fx
        .into_iter()
        .filter_map(|e| match e {
            Effect::Delete { name } => Some(name),
            _ => None,
        })
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["alpha", "mid"]);
    assert!(a.marked.is_empty());
}

#[test]
fn download_asks_for_a_directory_and_confirms_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().to_str().unwrap().to_string();
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char('d'));
    let Some(Dialog::Download { dest: d, .. }) = &a.dialog else {
        panic!("no download dialog");
    };
    assert_eq!(d, "./downloads/");
    for _ in 0..12 {
        press(&mut a, KeyCode::Backspace);
    }
    typed(&mut a, &dest);
    let fx = press(&mut a, KeyCode::Enter);
    match fx.as_slice() {
        [
            Effect::Download {
                name,
                dest: p,
                force: false,
                ..
            },
        ] => {
            assert_eq!(name, "alpha");
            assert_eq!(p, &dir.path().join("alpha"));
        }
        other => panic!("unexpected effects {other:?}"),
    }
    assert_eq!(a.focus, Pane::Transfers);
    assert_eq!(a.transfers.len(), 1);
    assert_eq!(a.download_dir, dest, "the destination is remembered");

    // The file now exists there: the next download asks first, No is the default.
    std::fs::write(dir.path().join("alpha"), b"x").unwrap();
    press(&mut a, KeyCode::Char('2'));
    press(&mut a, KeyCode::Char('d'));
    let fx = press(&mut a, KeyCode::Enter);
    assert!(fx.is_empty());
    assert!(matches!(
        &a.dialog,
        Some(Dialog::ConfirmOverwrite { yes: false, .. })
    ));
    assert!(press(&mut a, KeyCode::Enter).is_empty(), "No by default");
    press(&mut a, KeyCode::Char('d'));
    press(&mut a, KeyCode::Enter);
    let fx = press(&mut a, KeyCode::Char('y'));
    assert!(matches!(
        fx.as_slice(),
        [Effect::Download { force: true, .. }]
    ));
}

#[test]
fn detail_opens_with_a_stat_and_fills_in() {
    let mut a = app_with_files();
    let fx = press(&mut a, KeyCode::Enter);
    assert!(matches!(fx.as_slice(), [Effect::Stat { name }] if name == "alpha"));
    a.update(Msg::Detail(
        "alpha".into(),
        Ok(Box::new(file("alpha", 300, 1))),
    ));
    assert!(matches!(
        &a.dialog,
        Some(Dialog::Detail { info: Some(_), .. })
    ));
    press(&mut a, KeyCode::Esc);
    assert!(a.dialog.is_none());
}

#[test]
fn help_opens_and_closes_and_quit_cancels_transfers() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char('?'));
    assert!(matches!(a.dialog, Some(Dialog::Help { .. })));
    press(&mut a, KeyCode::Char('j'));
    press(&mut a, KeyCode::Char('q'));
    assert!(
        a.dialog.is_none() && !a.should_quit,
        "q closes the overlay first"
    );
    // A running transfer is cancelled on quit.
    press(&mut a, KeyCode::Char('d'));
    press(&mut a, KeyCode::Esc);
    let dir = tempfile::tempdir().unwrap();
    press(&mut a, KeyCode::Char('2'));
    press(&mut a, KeyCode::Char('d'));
    for _ in 0..12 {
        press(&mut a, KeyCode::Backspace);
    }
    typed(&mut a, dir.path().to_str().unwrap());
    press(&mut a, KeyCode::Enter);
    let t = a.transfers[0].progress.clone();
    a.update(Msg::Key(KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::CONTROL,
    )));
    assert!(a.should_quit);
    assert!(t.is_cancelled());
}

#[test]
fn transfers_finish_fail_cancel_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = app_with_files();
    for _ in 0..3 {
        press(&mut a, KeyCode::Char('2'));
        press(&mut a, KeyCode::Char(' '));
    }
    press(&mut a, KeyCode::Char('d'));
    for _ in 0..12 {
        press(&mut a, KeyCode::Backspace);
    }
    typed(&mut a, dir.path().to_str().unwrap());
    let fx = press(&mut a, KeyCode::Enter);
    assert_eq!(fx.len(), 3);
    let ids: Vec<u64> = a.transfers.iter().map(|t| t.id).collect();
    a.update(Msg::TransferDone {
        id: ids[0],
        result: Ok("to x".into()),
    });
    a.update(Msg::TransferDone {
        id: ids[1],
        result: Err("boom".into()),
    });
    // Cancel the third from the transfers pane.
    assert_eq!(a.focus, Pane::Transfers);
    press(&mut a, KeyCode::Char('G'));
    press(&mut a, KeyCode::Char('c'));
    assert!(a.transfers[2].progress.is_cancelled());
    a.update(Msg::TransferDone {
        id: ids[2],
        result: Err("cancelled".into()),
    });
    assert_eq!(a.transfers[0].state, TransferState::Done("to x".into()));
    assert_eq!(a.transfers[1].state, TransferState::Failed("boom".into()));
    assert_eq!(a.transfers[2].state, TransferState::Cancelled);
    assert!(
        a.logs
            .iter()
            .any(|l| l.level == Level::Error && l.message.contains("boom"))
    );
    press(&mut a, KeyCode::Char('C'));
    assert!(a.transfers.is_empty());
}

#[test]
fn picker_navigates_filters_marks_and_uploads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/inner.bin"), b"1234").unwrap();
    std::fs::write(dir.path().join("a.txt"), b"a").unwrap();
    std::fs::write(dir.path().join("b.txt"), b"bb").unwrap();
    std::fs::write(dir.path().join(".secret"), b"s").unwrap();
    // Not listed: a FIFO (its upload would wait for a writer) and a broken link.
    let fifo = std::ffi::CString::new(dir.path().join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("dangling")).unwrap();
    let mut a = app_with_files();
    a.start_dir = dir.path().to_path_buf();
    press(&mut a, KeyCode::Char('u'));
    let visible = |a: &App| -> Vec<String> {
        match &a.dialog {
            Some(Dialog::Picker(p)) => p.visible().iter().map(|e| e.name.clone()).collect(),
            _ => panic!("picker closed"),
        }
    };
    assert_eq!(
        visible(&a),
        ["sub", "a.txt", "b.txt"],
        "dirs first, hidden off"
    );
    press(&mut a, KeyCode::Char('.'));
    assert_eq!(visible(&a), ["sub", ".secret", "a.txt", "b.txt"]);
    press(&mut a, KeyCode::Char('.'));
    // Into the directory and back out with Backspace on an empty filter.
    press(&mut a, KeyCode::Enter);
    assert_eq!(visible(&a), ["inner.bin"]);
    press(&mut a, KeyCode::Backspace);
    assert_eq!(visible(&a), ["sub", "a.txt", "b.txt"]);
    // Filter as you type.
    typed(&mut a, "b.");
    assert_eq!(visible(&a), ["b.txt"]);
    press(&mut a, KeyCode::Backspace);
    press(&mut a, KeyCode::Backspace);
    // Mark two files, upload both with Tab.
    press(&mut a, KeyCode::Down);
    press(&mut a, KeyCode::Char(' '));
    press(&mut a, KeyCode::Char(' '));
    let fx = press(&mut a, KeyCode::Tab);
    let uploads: Vec<(String, std::path::PathBuf)> = fx
        .into_iter()
        .map(|e| match e {
            Effect::Upload { name, path, .. } => (name, path),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        uploads,
        [
            ("a.txt".to_string(), dir.path().join("a.txt")),
            ("b.txt".to_string(), dir.path().join("b.txt"))
        ]
    );
    assert!(a.dialog.is_none());
    assert_eq!(a.transfers.len(), 2);
    // Esc closes without uploading.
    press(&mut a, KeyCode::Char('u'));
    assert!(press(&mut a, KeyCode::Esc).is_empty());
    assert!(a.dialog.is_none());
}

#[test]
fn logs_filter_by_level_and_search_and_pause() {
    let mut a = app_with_files();
    for (i, (level, msg)) in [
        (Level::Info, "worker a registered"),
        (Level::Warn, "worker a is now suspect"),
        (Level::Error, "worker a is now dead"),
        (Level::Info, "uploaded photo.jpg"),
    ]
    .into_iter()
    .enumerate()
    {
        a.update(Msg::Log(LogLine {
            unix_ms: i as i64,
            level,
            source: "master",
            message: msg.into(),
        }));
    }
    press(&mut a, KeyCode::Char('4'));
    assert_eq!(a.visible_logs().len(), 4);
    press(&mut a, KeyCode::Char('v'));
    assert_eq!(a.visible_logs().len(), 2, "warn and above");
    press(&mut a, KeyCode::Char('v'));
    assert_eq!(a.visible_logs().len(), 1, "errors only");
    press(&mut a, KeyCode::Char('v'));
    press(&mut a, KeyCode::Char('v'));
    assert_eq!(a.log_level, Level::Info);
    press(&mut a, KeyCode::Char('/'));
    typed(&mut a, "WORKER A");
    press(&mut a, KeyCode::Enter);
    assert_eq!(a.visible_logs().len(), 3);
    // Scrolling up pauses; new lines keep the view still; End follows again.
    press(&mut a, KeyCode::Up);
    assert_eq!(a.log_scroll, 1);
    a.update(Msg::Log(LogLine {
        unix_ms: 9,
        level: Level::Info,
        source: "console",
        message: "worker a back".into(),
    }));
    assert_eq!(a.log_scroll, 2);
    press(&mut a, KeyCode::End);
    assert_eq!(a.log_scroll, 0);
    press(&mut a, KeyCode::Esc);
    assert!(a.log_search.is_empty());
}

#[test]
fn connection_badge_follows_status_results() {
    let mut a = App::new("127.0.0.1:1", false);
    assert_eq!(a.conn, Conn::Connecting);
    a.update(Msg::Status(Err("refused".into())));
    assert!(matches!(a.conn, Conn::Unreachable(_)));
    a.update(Msg::Status(Ok(Box::default())));
    assert_eq!(a.conn, Conn::Connected);
    a.update(Msg::Status(Err("reset".into())));
    assert!(matches!(a.conn, Conn::Reconnecting(_)));
    assert!(a.logs.iter().any(|l| l.message.contains("lost the master")));
    a.update(Msg::Status(Ok(Box::default())));
    assert_eq!(a.conn, Conn::Connected);
}

fn draw(a: &mut App, w: u16, h: u16) -> ratatui::buffer::Buffer {
    let mut t = ratatui::Terminal::new(ratatui::backend::TestBackend::new(w, h)).unwrap();
    t.draw(|f| dfs::ui::view::render(f, a)).unwrap();
    t.backend().buffer().clone()
}

#[test]
fn mouse_click_selects_and_wheel_scrolls() {
    use crossterm::event::{MouseButton, MouseEvent, MouseEventKind};
    let mut a = app_with_files();
    a.focus = Pane::Logs;
    draw(&mut a, 160, 48);
    let files = a.hit.files;
    // Third data row: below the border and the header row.
    let click = MouseEvent {
        kind: MouseEventKind::Down(MouseButton::Left),
        column: files.x + 3,
        row: files.y + 2 + 2,
        modifiers: KeyModifiers::NONE,
    };
    a.update(Msg::Mouse(click));
    assert_eq!(a.focus, Pane::Files);
    assert_eq!(a.selected_file().unwrap().name, "zeta");
    let wheel = MouseEvent {
        kind: MouseEventKind::ScrollUp,
        ..click
    };
    a.update(Msg::Mouse(wheel));
    assert_eq!(a.files_nav.selected, 0);
}

#[test]
fn no_color_draws_without_colours() {
    use ratatui::style::Color;
    let mut a = app_with_files();
    a.no_color = true;
    let buf = draw(&mut a, 120, 40);
    let coloured = buf
        .content()
        .iter()
        .filter(|c| c.fg != Color::Reset || c.bg != Color::Reset)
        .count();
    assert_eq!(coloured, 0, "NO_COLOR output has coloured cells");
    a.no_color = false;
    let buf = draw(&mut a, 120, 40);
    assert!(buf.content().iter().any(|c| c.fg != Color::Reset));
}

#[test]
fn drain_needs_confirmation_and_toggles() {
    let mut a = app_with_files();
    press(&mut a, KeyCode::Char('1'));
    // Sorted by address: a:1 (dead) first, then b:1.
    press(&mut a, KeyCode::Down);
    press(&mut a, KeyCode::Char('D'));
    assert!(
        matches!(&a.dialog, Some(Dialog::ConfirmDrain { worker, drain: true, yes: false }) if worker == "b:1")
    );
    assert!(
        press(&mut a, KeyCode::Enter).is_empty(),
        "Cancel is the default"
    );
    press(&mut a, KeyCode::Char('D'));
    let fx = press(&mut a, KeyCode::Char('y'));
    assert!(
        matches!(fx.as_slice(), [Effect::SetDraining { worker, draining: true }] if worker == "b:1")
    );
    a.update(Msg::Drained {
        worker: "b:1".into(),
        draining: true,
        result: Ok(5),
    });
    assert!(
        a.logs
            .iter()
            .any(|l| l.message.contains("draining b:1: 5 chunk(s)"))
    );
}
