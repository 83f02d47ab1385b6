//! End to end: the real `dfs-tui --local 3` driven in tmux (send-keys / capture-pane). Upload a
//! file through the picker, see it in the files pane with its replica count, download it and
//! compare bytes, delete it through the confirmation dialog, see it gone, quit cleanly.
//! Every wait is a bounded poll on the screen's content.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{MIB, assert_files_equal, make_file};

/// A private tmux server (own socket) that is killed on drop, with one session.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cwd: &Path, command: &str, w: u16, h: u16) -> Tmux {
        let socket = format!(
            "dfs-test-{}-{}",
            std::process::id(),
            dfs::chunk::random_u128() as u32
        );
        let t = Tmux { socket };
        let ok = t
            .tmux(&[
                "new-session",
                "-d",
                "-s",
                "main",
                "-x",
                &w.to_string(),
                "-y",
                &h.to_string(),
                "-c",
                cwd.to_str().unwrap(),
                command,
            ])
            .status
            .success();
        assert!(ok, "tmux could not start a session (is tmux installed?)");
        t
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux runs (install it with apt-get install tmux)")
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "main"];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success());
    }

    fn text(&self, s: &str) {
        assert!(
            self.tmux(&["send-keys", "-t", "main", "-l", s])
                .status
                .success()
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "main"]).stdout)
            .into_owned()
    }

    /// Polls the screen until `pred` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

/// The files-pane row of `name`, if any: the name, then its size and replica cells. (The
/// transfers pane also names the file, so the match must be on the row's own cells.)
fn file_row<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.contains(&format!("│{name} ")) && l.contains(" MiB ") && l.contains("✔ 3/3"))
}

#[test]
fn upload_download_delete_through_the_console() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let original = make_file(&work.join("e2e-upload.bin"), 5 * MIB + 123, 42);
    let bin = env!("CARGO_BIN_EXE_dfs-tui");
    let cmd = format!(
        "{bin} --local 3 --data-dir {} --log-dir {}; echo \"EXITED $?\"; sleep 60",
        tmp.path().join("cluster").display(),
        tmp.path().join("logs").display()
    );
    let t = Tmux::start(&work, &cmd, 160, 48);
    let long = Duration::from_secs(30);
    t.wait_for("the cluster", long, |s| {
        s.contains("● connected") && s.contains("✔ 3 alive")
    });

    // Upload through the picker: filter as you type, Enter uploads the selected file.
    t.keys(&["u"]);
    t.wait_for("the picker", long, |s| s.contains("Upload:"));
    t.text("e2e-up");
    t.wait_for("the filtered entry", long, |s| {
        s.contains("filter: e2e-up") && s.contains("e2e-upload.bin")
    });
    t.keys(&["Enter"]);
    let s = t.wait_for("the uploaded file with 3/3 replicas", long, |s| {
        file_row(s, "e2e-upload.bin").is_some()
    });
    assert!(s.contains("Transfers"), "{s}");

    // Download it to the default ./downloads/ and compare bytes.
    t.keys(&["2", "d"]);
    t.wait_for("the download dialog", long, |s| s.contains("./downloads/"));
    t.keys(&["Enter"]);
    let dest = work.join("downloads").join("e2e-upload.bin");
    t.wait_for("the finished download", long, |s| {
        s.contains("✔ done") && dest.exists()
    });
    assert_files_equal(&dest, &original);

    // Delete: the dialog names the file; Enter on the default (Cancel) keeps it.
    t.keys(&["2", "x"]);
    t.wait_for("the delete dialog", long, |s| {
        s.contains("Delete \"e2e-upload.bin\" from the cluster?")
    });
    t.keys(&["Enter"]);
    t.wait_for("the dialog to close", long, |s| {
        !s.contains("from the cluster?")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        file_row(&t.screen(), "e2e-upload.bin").is_some(),
        "Cancel deleted the file"
    );
    // Move to Delete and confirm: the file is gone.
    t.keys(&["x"]);
    t.wait_for("the delete dialog", long, |s| {
        s.contains("from the cluster?")
    });
    t.keys(&["Right", "Enter"]);
    t.wait_for("the file to disappear", long, |s| {
        s.contains("no files yet") && s.contains("deleted e2e-upload.bin")
    });

    // Quit: the terminal is restored and the process exits 0.
    t.keys(&["q"]);
    let s = t.wait_for("a clean exit", long, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    assert!(
        !s.contains("Files ("),
        "the console's screen was not cleared:\n{s}"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_dfs-tui");
    let cmd = format!(
        "{bin} --local 1 --data-dir {} --log-dir {}; echo \"EXITED $?\"; sleep 60",
        tmp.path().join("cluster").display(),
        tmp.path().join("logs").display()
    );
    let t = Tmux::start(tmp.path(), &cmd, 100, 30);
    let long = Duration::from_secs(30);
    t.wait_for("the console", long, |s| s.contains("● connected"));
    // The pane runs `sh -c`; the console is its child.
    let shell = String::from_utf8_lossy(
        &t.tmux(&["display-message", "-p", "-t", "main", "#{pane_pid}"])
            .stdout,
    )
    .trim()
    .to_string();
    let children = Command::new("pgrep").args(["-P", &shell]).output().unwrap();
    let pid = String::from_utf8_lossy(&children.stdout)
        .lines()
        .next()
        .expect("console process")
        .trim()
        .to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let s = t.wait_for("the exit", long, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    assert!(!s.contains("Workers ("), "screen not restored:\n{s}");
}

/// Seconds since midnight of the `HH:MM:SS` that opens the logs-pane line holding `what`.
fn logged_at(screen: &str, what: &str) -> Option<i64> {
    let line = screen.lines().find(|l| l.contains(what))?;
    let clock = line.trim_start_matches('│').get(..8)?;
    let mut parts = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    Some(h * 3600 + m * 60 + s)
}

#[test]
fn the_masters_backlog_shows_when_each_event_happened() {
    // A master that has been up a while: its "listening" event is older than the console.
    let b = common::Binaries::start(0);
    std::thread::sleep(Duration::from_millis(3_500));
    let bin = env!("CARGO_BIN_EXE_dfs-tui");
    let cmd = format!(
        "{bin} --master {} --log-dir {}; sleep 60",
        b.master_addr(),
        b.cwd().join("console-logs").display()
    );
    let t = Tmux::start(b.cwd(), &cmd, 140, 36);
    let s = t.wait_for("the master's backlog", Duration::from_secs(30), |s| {
        s.contains("console started") && s.contains("master listening on")
    });
    let console = logged_at(&s, "console started").expect("the console's line has a time");
    let master = logged_at(&s, "master listening on").expect("the master's line has a time");
    // Before, both showed the second the console heard of them.
    let earlier = (console - master).rem_euclid(86_400);
    assert!(
        (3..60).contains(&earlier),
        "the master's start shows {earlier} s before the console's:\n{s}"
    );
}

/// Quitting the console while an upload runs aborts that upload on the master before the
/// console exits. Before, the process ended at once and the open upload held its chunks
/// until its lease ran out (10 minutes). The worker is stopped (SIGSTOP) while the upload
/// starts, so that the quit lands mid-transfer whatever the machine's speed.
#[test]
fn quitting_mid_upload_aborts_it_on_the_master() {
    // The worker is held with SIGSTOP below: a long timeout keeps it alive meanwhile.
    let b = common::Binaries::start_with(1, &["--heartbeat-timeout", "30s"]);
    b.wait_alive(1);
    make_file(&b.cwd().join("quit-upload.bin"), 40 * MIB, 8);
    let bin = env!("CARGO_BIN_EXE_dfs-tui");
    let cmd = format!(
        "{bin} --master {} --log-dir {}; echo \"EXITED $?\"; sleep 60",
        b.master_addr(),
        b.cwd().join("console-logs").display()
    );
    let t = Tmux::start(b.cwd(), &cmd, 140, 36);
    let long = Duration::from_secs(30);
    t.wait_for("the console", long, |s| s.contains("✔ 1 alive"));
    let worker = b.workers[0].1.as_ref().expect("worker runs");
    worker.signal(libc::SIGSTOP);
    t.keys(&["u"]);
    t.wait_for("the picker", long, |s| s.contains("Upload:"));
    t.text("quit-up");
    t.wait_for("the entry", long, |s| s.contains("quit-upload.bin"));
    t.keys(&["Enter"]);
    let open = |v: &serde_json::Value| v["open_uploads"].as_u64().unwrap_or(0);
    let mut started = false;
    for _ in 0..200 {
        let o = b.cli(&["--json", "--cmd", "status"]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
        if open(&v) == 1 {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    t.keys(&["q"]);
    std::thread::sleep(Duration::from_millis(500));
    worker.signal(libc::SIGCONT);
    assert!(started, "the upload never opened:\n{}", t.screen());
    let s = t.wait_for("the exit", long, |s| s.contains("EXITED"));
    assert!(s.contains("EXITED 0"), "{s}");
    b.wait_status("no open upload", Duration::from_secs(10), |v| open(v) == 0);
    let o = b.cli(&["--cmd", "stat", "quit-upload.bin"]);
    assert_eq!(o.code, 1, "the abandoned upload was stored: {}", o.stdout);
}

#[test]
fn upload_from_a_terminal_says_how_to_end_it_and_stores_what_was_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_dfs-tui");
    let local = format!(
        "{bin} --local 1 --data-dir {} --log-dir {}",
        tmp.path().join("cluster").display(),
        tmp.path().join("logs").display()
    );
    let out = tmp.path().join("typed.out");
    let cmd = format!(
        "{local} --cmd upload - --name typed.txt; echo \"EXITED $?\"; \
         {local} --cmd download typed.txt -o {} 2>/dev/null; echo \"DOWNLOADED $?\"; sleep 60",
        out.display()
    );
    let t = Tmux::start(tmp.path(), &cmd, 100, 12);
    let long = Duration::from_secs(30);
    t.wait_for("the hint", long, |s| s.contains("end it with Ctrl-D"));
    t.text("typed by hand");
    t.keys(&["Enter", "C-d"]);
    let s = t.wait_for("the download", long, |s| s.contains("DOWNLOADED"));
    assert!(
        s.contains("EXITED 0") && s.contains("uploaded typed.txt: 14 B"),
        "{s}"
    );
    // No progress line was drawn over the typing.
    assert!(!s.contains("so far"), "{s}");
    assert!(s.contains("DOWNLOADED 0"), "{s}");
    assert_eq!(std::fs::read(&out).unwrap(), b"typed by hand\n");
}
