//! The console's state and its state machine: `update(msg)` changes state and returns the
//! effects (network work) for the runtime to start. Only the UI loop owns an `App`; background
//! tasks talk to it through messages, so drawing never waits on the network.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseButton, MouseEvent, MouseEventKind};

use super::picker::{Picker, PickerOutcome};
use crate::client::Progress;
use crate::rpc::pb::{ClusterStatusResponse, FileInfo};

/// Samples of throughput history kept for the sparklines.
pub const HISTORY: usize = 120;
/// Log lines kept for search.
pub const LOG_KEEP: usize = 5000;
/// Status older than this is shown as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Workers,
    Files,
    Transfers,
    Logs,
}

impl Pane {
    pub const ALL: [Pane; 4] = [Pane::Workers, Pane::Files, Pane::Transfers, Pane::Logs];

    pub fn scope(self) -> super::keys::Scope {
        use super::keys::Scope;
        match self {
            Pane::Workers => Scope::Workers,
            Pane::Files => Scope::Files,
            Pane::Transfers => Scope::Transfers,
            Pane::Logs => Scope::Logs,
        }
    }
}

/// The connection to the master, as the console sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    Connecting,
    Connected,
    /// Was connected; the last attempts failed.
    Reconnecting(String),
    /// Never connected, or failing for a long time.
    Unreachable(String),
}

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    pub fn parse(s: &str) -> Level {
        match s {
            "ERROR" => Level::Error,
            "WARN" => Level::Warn,
            "DEBUG" | "TRACE" => Level::Debug,
            _ => Level::Info,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// One line of the logs pane: from the master's stream or the console itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub unix_ms: i64,
    pub level: Level,
    pub source: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    Upload,
    Download,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferState {
    Running,
    Done(String),
    Failed(String),
    Cancelled,
}

/// An upload or download started from the console.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub id: u64,
    pub kind: TransferKind,
    pub name: String,
    pub progress: Arc<Progress>,
    pub started: Instant,
    pub finished: Option<Instant>,
    pub state: TransferState,
}

impl Transfer {
    /// Average rate in bytes/s so far (or over the whole transfer once finished).
    pub fn rate(&self, now: Instant) -> f64 {
        let end = self.finished.unwrap_or(now);
        let secs = end.saturating_duration_since(self.started).as_secs_f64();
        let (done, _) = self.progress.snapshot();
        if secs > 0.0 { done as f64 / secs } else { 0.0 }
    }
}

/// Columns the workers table sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSort {
    Address,
    State,
    Used,
    Chunks,
    Heartbeat,
}

/// Columns the files table sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSort {
    Name,
    Size,
    Chunks,
    Replicas,
    Modified,
}

/// Modal dialogs; at most one is open.
#[derive(Debug, Clone)]
pub enum Dialog {
    /// The key list; `scroll` for small terminals.
    Help {
        scroll: usize,
    },
    Picker(Picker),
    /// Destination directory for downloading `names`; `dest` is editable.
    Download {
        names: Vec<String>,
        dest: String,
    },
    /// Some destinations exist; `yes` is the focused button (No is the default).
    ConfirmOverwrite {
        names: Vec<String>,
        dest: String,
        existing: Vec<String>,
        yes: bool,
    },
    /// Delete `names`? Cancel is the default button.
    ConfirmDelete {
        names: Vec<String>,
        yes: bool,
    },
    /// Drain (or undrain) `worker`? Cancel is the default button.
    ConfirmDrain {
        worker: String,
        drain: bool,
        yes: bool,
    },
    /// File detail: checksum and chunk map (`info` arrives from a stat).
    Detail {
        name: String,
        info: Option<Box<FileInfo>>,
        error: Option<String>,
        scroll: usize,
    },
}

/// Work for the runtime, started in the background.
#[derive(Debug, Clone)]
pub enum Effect {
    Upload {
        id: u64,
        path: PathBuf,
        name: String,
        progress: Arc<Progress>,
    },
    Download {
        id: u64,
        name: String,
        dest: PathBuf,
        force: bool,
        progress: Arc<Progress>,
    },
    Delete {
        name: String,
    },
    Stat {
        name: String,
    },
    SetDraining {
        worker: String,
        draining: bool,
    },
    Refresh,
}

/// Input to the state machine.
#[derive(Debug, Clone)]
pub enum Msg {
    Key(KeyEvent),
    Mouse(MouseEvent),
    Resize(u16, u16),
    Tick,
    Status(Result<Box<ClusterStatusResponse>, String>),
    Files(Result<Vec<FileInfo>, String>),
    Detail(String, Result<Box<FileInfo>, String>),
    Log(LogLine),
    TransferDone {
        id: u64,
        result: Result<String, String>,
    },
    Deleted {
        name: String,
        result: Result<(), String>,
    },
    /// The outcome of a drain or undrain.
    Drained {
        worker: String,
        draining: bool,
        result: Result<u64, String>,
    },
    Quit,
}

/// Selection and scroll of a list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nav {
    pub selected: usize,
    pub offset: usize,
}

impl Nav {
    pub fn move_by(&mut self, delta: isize, len: usize) {
        if len == 0 {
            self.selected = 0;
            return;
        }
        let s = (self.selected as isize + delta).clamp(0, len as isize - 1);
        self.selected = s as usize;
    }

    pub fn clamp(&mut self, len: usize) {
        if len == 0 {
            self.selected = 0;
        } else if self.selected >= len {
            self.selected = len - 1;
        }
    }

    /// Adjusts the scroll offset so the selection is within `height` visible rows.
    pub fn scroll_into_view(&mut self, height: usize) {
        if height == 0 {
            return;
        }
        if self.selected < self.offset {
            self.offset = self.selected;
        } else if self.selected >= self.offset + height {
            self.offset = self.selected + 1 - height;
        }
    }
}

/// Screen areas of the panes from the last frame, for mouse hit-testing.
#[derive(Debug, Clone, Copy, Default)]
pub struct HitAreas {
    pub workers: ratatui::layout::Rect,
    pub files: ratatui::layout::Rect,
    pub transfers: ratatui::layout::Rect,
    pub logs: ratatui::layout::Rect,
}

/// Everything the console shows.
pub struct App {
    pub master_addr: String,
    pub local: bool,
    pub conn: Conn,
    pub last_status_at: Option<Instant>,
    pub status: Option<Box<ClusterStatusResponse>>,
    pub files: Vec<FileInfo>,
    /// Indices into `files` after filtering and sorting.
    pub view: Vec<usize>,
    pub focus: Pane,
    pub workers_nav: Nav,
    pub workers_sort: (WorkerSort, bool),
    pub files_nav: Nav,
    pub files_sort: (FileSort, bool),
    pub filter: String,
    pub editing_filter: bool,
    pub marked: BTreeSet<String>,
    pub dialog: Option<Dialog>,
    pub transfers: Vec<Transfer>,
    pub transfers_nav: Nav,
    pub next_id: u64,
    /// Cluster read/write bytes per second, oldest first.
    pub read_history: VecDeque<u64>,
    pub write_history: VecDeque<u64>,
    last_totals: Option<(Instant, u64, u64)>,
    pub logs: VecDeque<LogLine>,
    /// The tui-logger widget's state (None in tests: the pane then draws from `logs`).
    pub logger_state: Option<tui_logger::TuiWidgetState>,
    worker_totals: std::collections::HashMap<String, (Instant, u64, u64)>,
    worker_rates: std::collections::HashMap<String, (u64, u64)>,
    pub log_level: Level,
    pub log_search: String,
    pub editing_search: bool,
    /// Lines scrolled up from the bottom; 0 = following the tail.
    pub log_scroll: usize,
    pub size: (u16, u16),
    pub no_color: bool,
    pub download_dir: String,
    pub start_dir: PathBuf,
    pub hit: HitAreas,
    pub should_quit: bool,
    pub now: Instant,
}

impl App {
    pub fn new(master_addr: &str, local: bool) -> App {
        App {
            master_addr: master_addr.to_string(),
            local,
            conn: Conn::Connecting,
            last_status_at: None,
            status: None,
            files: Vec::new(),
            view: Vec::new(),
            focus: Pane::Files,
            workers_nav: Nav::default(),
            workers_sort: (WorkerSort::Address, true),
            files_nav: Nav::default(),
            files_sort: (FileSort::Name, true),
            filter: String::new(),
            editing_filter: false,
            marked: BTreeSet::new(),
            dialog: None,
            transfers: Vec::new(),
            transfers_nav: Nav::default(),
            next_id: 1,
            read_history: VecDeque::with_capacity(HISTORY),
            write_history: VecDeque::with_capacity(HISTORY),
            last_totals: None,
            logs: VecDeque::with_capacity(LOG_KEEP),
            logger_state: None,
            worker_totals: std::collections::HashMap::new(),
            worker_rates: std::collections::HashMap::new(),
            log_level: Level::Info,
            log_search: String::new(),
            editing_search: false,
            log_scroll: 0,
            size: (80, 24),
            no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
            download_dir: "./downloads/".into(),
            start_dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            hit: HitAreas::default(),
            should_quit: false,
            now: Instant::now(),
        }
    }

    /// Whether the status shown is old (the master stopped answering a while ago).
    pub fn stale(&self) -> bool {
        self.last_status_at
            .is_some_and(|t| self.now.saturating_duration_since(t) > STALE_AFTER)
    }

    /// A worker's read and write rate (bytes/s) between the last two status reports.
    pub fn worker_rates(&self, addr: &str) -> (u64, u64) {
        self.worker_rates.get(addr).copied().unwrap_or((0, 0))
    }

    /// The tui-logger state for the current level filter.
    pub fn logger_state_for(level: Level) -> tui_logger::TuiWidgetState {
        let filter = match level {
            Level::Error => tui_logger::LevelFilter::Error,
            Level::Warn => tui_logger::LevelFilter::Warn,
            Level::Info => tui_logger::LevelFilter::Info,
            Level::Debug => tui_logger::LevelFilter::Debug,
        };
        tui_logger::TuiWidgetState::new().set_default_display_level(filter)
    }

    /// The highlighted file, if any.
    pub fn selected_file(&self) -> Option<&FileInfo> {
        self.view
            .get(self.files_nav.selected)
            .and_then(|&i| self.files.get(i))
    }

    /// Workers in display order.
    pub fn sorted_workers(&self) -> Vec<crate::rpc::pb::WorkerStatus> {
        let mut w = self
            .status
            .as_ref()
            .map(|s| s.workers.clone())
            .unwrap_or_default();
        let used = |x: &crate::rpc::pb::WorkerStatus| {
            let u = x.usage.unwrap_or_default();
            if u.capacity_bytes == 0 {
                0.0
            } else {
                u.used_bytes as f64 / u.capacity_bytes as f64
            }
        };
        let (col, asc) = self.workers_sort;
        w.sort_by(|a, b| {
            let o = match col {
                WorkerSort::Address => a.address.cmp(&b.address),
                WorkerSort::State => state_rank(&a.state).cmp(&state_rank(&b.state)),
                WorkerSort::Used => used(a).total_cmp(&used(b)),
                WorkerSort::Chunks => a.chunks_mapped.cmp(&b.chunks_mapped),
                WorkerSort::Heartbeat => a.last_heartbeat_ms_ago.cmp(&b.last_heartbeat_ms_ago),
            };
            let o = o.then_with(|| a.address.cmp(&b.address));
            if asc { o } else { o.reverse() }
        });
        w
    }

    /// Rebuilds `view` from `files`, the filter and the sort, keeping the selected name.
    pub fn rebuild_view(&mut self) {
        let keep = self.selected_file().map(|f| f.name.clone());
        let f = self.filter.to_lowercase();
        let mut view: Vec<usize> = (0..self.files.len())
            .filter(|&i| f.is_empty() || self.files[i].name.to_lowercase().contains(&f))
            .collect();
        let (col, asc) = self.files_sort;
        let files = &self.files;
        view.sort_by(|&a, &b| {
            let (a, b) = (&files[a], &files[b]);
            let o = match col {
                FileSort::Name => a.name.cmp(&b.name),
                FileSort::Size => a.size.cmp(&b.size),
                FileSort::Chunks => a.chunk_count.cmp(&b.chunk_count),
                FileSort::Replicas => (a.replicas_min_live, a.replicas_target)
                    .cmp(&(b.replicas_min_live, b.replicas_target)),
                FileSort::Modified => a.modified_unix_ms.cmp(&b.modified_unix_ms),
            };
            let o = o.then_with(|| a.name.cmp(&b.name));
            if asc { o } else { o.reverse() }
        });
        self.view = view;
        if let Some(name) = keep
            && let Some(pos) = self.view.iter().position(|&i| self.files[i].name == name)
        {
            self.files_nav.selected = pos;
        }
        self.files_nav.clamp(self.view.len());
    }

    /// Log lines that pass the level filter and the search, oldest first.
    pub fn visible_logs(&self) -> Vec<&LogLine> {
        let q = self.log_search.to_lowercase();
        self.logs
            .iter()
            .filter(|l| l.level <= self.log_level)
            .filter(|l| q.is_empty() || l.message.to_lowercase().contains(&q))
            .collect()
    }

    fn push_log(&mut self, line: LogLine) {
        if self.logs.len() == LOG_KEEP {
            self.logs.pop_front();
        }
        self.logs.push_back(line);
        if self.log_scroll > 0 {
            // Keep the view still while the user reads older lines.
            self.log_scroll += 1;
        }
    }

    /// A console event in the logs pane.
    pub fn note(&mut self, level: Level, message: impl Into<String>) {
        let message = message.into();
        match level {
            Level::Error => tracing::error!(target: "console", "{message}"),
            Level::Warn => tracing::warn!(target: "console", "{message}"),
            _ => tracing::info!(target: "console", "{message}"),
        }
        self.push_log(LogLine {
            unix_ms: crate::rpc::now_unix_ms(),
            level,
            source: "console",
            message,
        });
    }

    fn new_transfer(&mut self, kind: TransferKind, name: String) -> (u64, Arc<Progress>) {
        let id = self.next_id;
        self.next_id += 1;
        let progress = Arc::new(Progress::default());
        self.transfers.push(Transfer {
            id,
            kind,
            name,
            progress: progress.clone(),
            started: Instant::now(),
            finished: None,
            state: TransferState::Running,
        });
        (id, progress)
    }

    /// Names the download/delete keys act on: the marked files, else the selected one.
    fn targets(&self) -> Vec<String> {
        if !self.marked.is_empty() {
            return self.marked.iter().cloned().collect();
        }
        self.selected_file()
            .map(|f| vec![f.name.clone()])
            .unwrap_or_default()
    }

    /// Applies one message; returns the effects to start.
    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        match msg {
            Msg::Key(k) => self.on_key(k),
            Msg::Mouse(m) => {
                self.on_mouse(m);
                Vec::new()
            }
            Msg::Resize(w, h) => {
                self.size = (w, h);
                Vec::new()
            }
            Msg::Tick => {
                self.now = Instant::now();
                if let Conn::Reconnecting(e) = &self.conn
                    && self.stale()
                {
                    self.conn = Conn::Unreachable(e.clone());
                }
                Vec::new()
            }
            Msg::Status(r) => {
                self.on_status(r);
                Vec::new()
            }
            Msg::Files(Ok(files)) => {
                self.files = files;
                let names: BTreeSet<&str> = self.files.iter().map(|f| f.name.as_str()).collect();
                self.marked.retain(|m| names.contains(m.as_str()));
                self.rebuild_view();
                Vec::new()
            }
            Msg::Files(Err(_)) => Vec::new(),
            Msg::Detail(name, r) => {
                if let Some(Dialog::Detail {
                    name: n,
                    info,
                    error,
                    ..
                }) = &mut self.dialog
                    && *n == name
                {
                    match r {
                        Ok(f) => *info = Some(f),
                        Err(e) => *error = Some(e),
                    }
                }
                Vec::new()
            }
            Msg::Log(line) => {
                self.push_log(line);
                Vec::new()
            }
            Msg::TransferDone { id, result } => {
                let now = Instant::now();
                self.now = now;
                let mut note = None;
                if let Some(t) = self.transfers.iter_mut().find(|t| t.id == id) {
                    t.finished = Some(now);
                    let verb = match t.kind {
                        TransferKind::Upload => "upload",
                        TransferKind::Download => "download",
                    };
                    t.state = match result {
                        Ok(summary) => {
                            note = Some((Level::Info, format!("{verb} of {}: {summary}", t.name)));
                            TransferState::Done(summary)
                        }
                        Err(e) if t.progress.is_cancelled() => {
                            let _ = e;
                            note = Some((Level::Warn, format!("{verb} of {} cancelled", t.name)));
                            TransferState::Cancelled
                        }
                        Err(e) => {
                            note =
                                Some((Level::Error, format!("{verb} of {} failed: {e}", t.name)));
                            TransferState::Failed(e)
                        }
                    };
                }
                if let Some((l, m)) = note {
                    self.note(l, m);
                }
                vec![Effect::Refresh]
            }
            Msg::Deleted { name, result } => {
                match result {
                    Ok(()) => self.note(Level::Info, format!("deleted {name}")),
                    Err(e) => self.note(Level::Error, format!("delete of {name} failed: {e}")),
                }
                vec![Effect::Refresh]
            }
            Msg::Drained {
                worker,
                draining,
                result,
            } => {
                match (draining, result) {
                    (true, Ok(n)) => self.note(
                        Level::Warn,
                        format!("draining {worker}: {n} chunk(s) to copy elsewhere"),
                    ),
                    (false, Ok(_)) => {
                        self.note(Level::Info, format!("{worker} is no longer draining"))
                    }
                    (_, Err(e)) => {
                        self.note(Level::Error, format!("drain of {worker} failed: {e}"))
                    }
                }
                vec![Effect::Refresh]
            }
            Msg::Quit => {
                self.quit();
                Vec::new()
            }
        }
    }

    fn quit(&mut self) {
        for t in &self.transfers {
            if t.state == TransferState::Running {
                t.progress.cancel();
            }
        }
        self.should_quit = true;
    }

    fn on_status(&mut self, r: Result<Box<ClusterStatusResponse>, String>) {
        match r {
            Ok(s) => {
                let now = self.now;
                let (rt, wt) = s.workers.iter().fold((0u64, 0u64), |(r, w), x| {
                    let u = x.usage.unwrap_or_default();
                    (r + u.bytes_read_total, w + u.bytes_written_total)
                });
                if let Some((t, r0, w0)) = self.last_totals {
                    let secs = now.saturating_duration_since(t).as_secs_f64();
                    if secs > 0.05 {
                        let push = |h: &mut VecDeque<u64>, v: u64| {
                            if h.len() == HISTORY {
                                h.pop_front();
                            }
                            h.push_back(v);
                        };
                        push(
                            &mut self.read_history,
                            (rt.saturating_sub(r0) as f64 / secs) as u64,
                        );
                        push(
                            &mut self.write_history,
                            (wt.saturating_sub(w0) as f64 / secs) as u64,
                        );
                    }
                }
                self.last_totals = Some((now, rt, wt));
                for w in &s.workers {
                    let u = w.usage.unwrap_or_default();
                    let (r1, w1) = (u.bytes_read_total, u.bytes_written_total);
                    if let Some((t0, r0, w0)) = self.worker_totals.get(&w.address) {
                        let secs = now.saturating_duration_since(*t0).as_secs_f64();
                        if secs > 0.05 {
                            self.worker_rates.insert(
                                w.address.clone(),
                                (
                                    (r1.saturating_sub(*r0) as f64 / secs) as u64,
                                    (w1.saturating_sub(*w0) as f64 / secs) as u64,
                                ),
                            );
                        }
                    }
                    self.worker_totals.insert(w.address.clone(), (now, r1, w1));
                }
                if self.conn != Conn::Connected {
                    let was = std::mem::replace(&mut self.conn, Conn::Connected);
                    if matches!(was, Conn::Reconnecting(_) | Conn::Unreachable(_)) {
                        self.note(Level::Info, format!("reconnected to {}", self.master_addr));
                    }
                }
                self.status = Some(s);
                self.last_status_at = Some(now);
                let n = self.status.as_ref().map(|s| s.workers.len()).unwrap_or(0);
                self.workers_nav.clamp(n);
            }
            Err(e) => {
                self.conn = match &self.conn {
                    Conn::Connected => {
                        self.note(Level::Warn, format!("lost the master: {e}"));
                        Conn::Reconnecting(e)
                    }
                    Conn::Reconnecting(_) if !self.stale() => Conn::Reconnecting(e),
                    _ => Conn::Unreachable(e),
                };
            }
        }
    }

    fn on_mouse(&mut self, m: MouseEvent) {
        if self.dialog.is_some() {
            return;
        }
        let pos = ratatui::layout::Position::new(m.column, m.row);
        let pane = [
            (self.hit.workers, Pane::Workers),
            (self.hit.files, Pane::Files),
            (self.hit.transfers, Pane::Transfers),
            (self.hit.logs, Pane::Logs),
        ]
        .into_iter()
        .find(|(r, _)| r.contains(pos));
        let Some((area, pane)) = pane else { return };
        match m.kind {
            MouseEventKind::Down(MouseButton::Left) => {
                self.focus = pane;
                // Rows start below the border and the header row.
                let row = m.row.saturating_sub(area.y + 2) as usize;
                match pane {
                    Pane::Files => {
                        let i = self.files_nav.offset + row;
                        if i < self.view.len() {
                            self.files_nav.selected = i;
                        }
                    }
                    Pane::Workers => {
                        let n = self.status.as_ref().map(|s| s.workers.len()).unwrap_or(0);
                        let i = self.workers_nav.offset + row;
                        if i < n {
                            self.workers_nav.selected = i;
                        }
                    }
                    _ => {}
                }
            }
            MouseEventKind::ScrollDown => self.scroll(pane, 3),
            MouseEventKind::ScrollUp => self.scroll(pane, -3),
            _ => {}
        }
    }

    fn scroll(&mut self, pane: Pane, delta: isize) {
        match pane {
            Pane::Files => self.files_nav.move_by(delta, self.view.len()),
            Pane::Workers => {
                let n = self.status.as_ref().map(|s| s.workers.len()).unwrap_or(0);
                self.workers_nav.move_by(delta, n);
            }
            Pane::Transfers => self.transfers_nav.move_by(delta, self.transfers.len()),
            Pane::Logs => {
                let n = self.visible_logs().len();
                let s = self.log_scroll as isize - delta;
                self.log_scroll = s.clamp(0, n.saturating_sub(1) as isize) as usize;
            }
        }
    }

    fn on_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        if k.kind == crossterm::event::KeyEventKind::Release {
            return Vec::new();
        }
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && k.code == KeyCode::Char('c') {
            self.quit();
            return Vec::new();
        }
        if let Some(d) = self.dialog.take() {
            return self.on_dialog_key(d, k);
        }
        if self.editing_filter {
            match k.code {
                KeyCode::Esc => {
                    self.editing_filter = false;
                    self.filter.clear();
                }
                KeyCode::Enter | KeyCode::Down | KeyCode::Up => self.editing_filter = false,
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            self.files_nav.selected = 0;
            self.files_nav.offset = 0;
            self.rebuild_view();
            return Vec::new();
        }
        if self.editing_search {
            match k.code {
                KeyCode::Esc => {
                    self.editing_search = false;
                    self.log_search.clear();
                }
                KeyCode::Enter => self.editing_search = false,
                KeyCode::Backspace => {
                    self.log_search.pop();
                }
                KeyCode::Char(c) => self.log_search.push(c),
                _ => {}
            }
            self.log_scroll = 0;
            return Vec::new();
        }
        match k.code {
            KeyCode::Char('q') => self.quit(),
            KeyCode::Char('?') => self.dialog = Some(Dialog::Help { scroll: 0 }),
            KeyCode::Tab => {
                let i = Pane::ALL.iter().position(|p| *p == self.focus).unwrap_or(0);
                self.focus = Pane::ALL[(i + 1) % Pane::ALL.len()];
            }
            KeyCode::BackTab => {
                let i = Pane::ALL.iter().position(|p| *p == self.focus).unwrap_or(0);
                self.focus = Pane::ALL[(i + Pane::ALL.len() - 1) % Pane::ALL.len()];
            }
            KeyCode::Char(c @ '1'..='4') => {
                self.focus = Pane::ALL[(c as u8 - b'1') as usize];
            }
            KeyCode::Char('r') => return vec![Effect::Refresh],
            KeyCode::Char('u') => {
                self.dialog = Some(Dialog::Picker(Picker::open(&self.start_dir)));
            }
            KeyCode::Down | KeyCode::Char('j') => self.scroll(self.focus, 1),
            KeyCode::Up | KeyCode::Char('k') => self.scroll(self.focus, -1),
            KeyCode::PageDown => self.scroll(self.focus, 10),
            KeyCode::PageUp => self.scroll(self.focus, -10),
            KeyCode::Home | KeyCode::Char('g') => self.scroll(self.focus, isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.scroll(self.focus, isize::MAX / 2),
            _ => return self.on_pane_key(k),
        }
        Vec::new()
    }

    fn on_pane_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        match (self.focus, k.code) {
            (Pane::Files, KeyCode::Enter) => {
                if let Some(f) = self.selected_file() {
                    let name = f.name.clone();
                    self.dialog = Some(Dialog::Detail {
                        name: name.clone(),
                        info: None,
                        error: None,
                        scroll: 0,
                    });
                    return vec![Effect::Stat { name }];
                }
            }
            (Pane::Files, KeyCode::Char('d')) => {
                let names = self.targets();
                if !names.is_empty() {
                    self.dialog = Some(Dialog::Download {
                        names,
                        dest: self.download_dir.clone(),
                    });
                }
            }
            (Pane::Files, KeyCode::Char('x') | KeyCode::Delete) => {
                let names = self.targets();
                if !names.is_empty() {
                    self.dialog = Some(Dialog::ConfirmDelete { names, yes: false });
                }
            }
            (Pane::Files, KeyCode::Char(' ')) => {
                if let Some(f) = self.selected_file() {
                    let n = f.name.clone();
                    if !self.marked.remove(&n) {
                        self.marked.insert(n);
                    }
                    self.files_nav.move_by(1, self.view.len());
                }
            }
            (Pane::Files, KeyCode::Char('/')) => self.editing_filter = true,
            (Pane::Files, KeyCode::Esc) => {
                self.filter.clear();
                self.marked.clear();
                self.rebuild_view();
            }
            (Pane::Files, KeyCode::Char('s')) => {
                use FileSort::*;
                self.files_sort.0 = match self.files_sort.0 {
                    Name => Size,
                    Size => Chunks,
                    Chunks => Replicas,
                    Replicas => Modified,
                    Modified => Name,
                };
                self.rebuild_view();
            }
            (Pane::Files, KeyCode::Char('S')) => {
                self.files_sort.1 = !self.files_sort.1;
                self.rebuild_view();
            }
            (Pane::Workers, KeyCode::Char('s')) => {
                use WorkerSort::*;
                self.workers_sort.0 = match self.workers_sort.0 {
                    Address => State,
                    State => Used,
                    Used => Chunks,
                    Chunks => Heartbeat,
                    Heartbeat => Address,
                };
            }
            (Pane::Workers, KeyCode::Char('S')) => self.workers_sort.1 = !self.workers_sort.1,
            (Pane::Workers, KeyCode::Char('D')) => {
                if let Some(w) = self.sorted_workers().get(self.workers_nav.selected) {
                    self.dialog = Some(Dialog::ConfirmDrain {
                        worker: w.address.clone(),
                        drain: !w.draining,
                        yes: false,
                    });
                }
            }
            (Pane::Transfers, KeyCode::Char('c')) => {
                if let Some(t) = self.transfers.get(self.transfers_nav.selected)
                    && t.state == TransferState::Running
                {
                    t.progress.cancel();
                }
            }
            (Pane::Transfers, KeyCode::Char('C')) => {
                self.transfers.retain(|t| t.state == TransferState::Running);
                self.transfers_nav.clamp(self.transfers.len());
            }
            (Pane::Logs, KeyCode::Char('/')) => self.editing_search = true,
            (Pane::Logs, KeyCode::Esc) => {
                self.log_search.clear();
                self.log_scroll = 0;
            }
            (Pane::Logs, KeyCode::Char('v')) => {
                self.log_level = match self.log_level {
                    Level::Info => Level::Warn,
                    Level::Warn => Level::Error,
                    Level::Error => Level::Debug,
                    Level::Debug => Level::Info,
                };
                if self.logger_state.is_some() {
                    self.logger_state = Some(Self::logger_state_for(self.log_level));
                }
                self.log_scroll = 0;
            }
            _ => {}
        }
        Vec::new()
    }

    fn on_dialog_key(&mut self, d: Dialog, k: KeyEvent) -> Vec<Effect> {
        match d {
            Dialog::Help { scroll } => {
                let scroll = match k.code {
                    KeyCode::Esc | KeyCode::Char('?') | KeyCode::Char('q') | KeyCode::Enter => {
                        return Vec::new();
                    }
                    KeyCode::Down | KeyCode::Char('j') => scroll + 1,
                    KeyCode::Up | KeyCode::Char('k') => scroll.saturating_sub(1),
                    KeyCode::PageDown | KeyCode::Char(' ') => scroll + 10,
                    KeyCode::PageUp => scroll.saturating_sub(10),
                    _ => scroll,
                };
                // The view clamps; keep the stored value bounded too.
                self.dialog = Some(Dialog::Help {
                    scroll: scroll.min(super::keys::BINDINGS.len() + 8),
                });
                Vec::new()
            }
            Dialog::Detail {
                name,
                info,
                error,
                mut scroll,
            } => {
                match k.code {
                    KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') => return Vec::new(),
                    KeyCode::Down | KeyCode::Char('j') => scroll += 1,
                    KeyCode::Up | KeyCode::Char('k') => scroll = scroll.saturating_sub(1),
                    KeyCode::PageDown => scroll += 10,
                    KeyCode::PageUp => scroll = scroll.saturating_sub(10),
                    _ => {}
                }
                self.dialog = Some(Dialog::Detail {
                    name,
                    info,
                    error,
                    scroll,
                });
                Vec::new()
            }
            Dialog::Picker(mut p) => {
                let outcome = match k.code {
                    KeyCode::Esc => PickerOutcome::Cancel,
                    KeyCode::Enter | KeyCode::Right => p.enter(),
                    KeyCode::Tab if !p.marked.is_empty() => {
                        PickerOutcome::Upload(p.marked.iter().cloned().collect())
                    }
                    KeyCode::Down => {
                        p.move_by(1);
                        PickerOutcome::Stay
                    }
                    KeyCode::Up => {
                        p.move_by(-1);
                        PickerOutcome::Stay
                    }
                    KeyCode::PageDown => {
                        p.move_by(10);
                        PickerOutcome::Stay
                    }
                    KeyCode::PageUp => {
                        p.move_by(-10);
                        PickerOutcome::Stay
                    }
                    KeyCode::Left => {
                        p.go_up();
                        PickerOutcome::Stay
                    }
                    KeyCode::Backspace => {
                        p.backspace();
                        PickerOutcome::Stay
                    }
                    KeyCode::Char(' ') => {
                        p.toggle_mark();
                        PickerOutcome::Stay
                    }
                    KeyCode::Char('.') if p.filter.is_empty() => {
                        p.toggle_hidden();
                        PickerOutcome::Stay
                    }
                    KeyCode::Char(c) => {
                        p.type_char(c);
                        PickerOutcome::Stay
                    }
                    _ => PickerOutcome::Stay,
                };
                match outcome {
                    PickerOutcome::Stay => {
                        self.dialog = Some(Dialog::Picker(p));
                        Vec::new()
                    }
                    PickerOutcome::Cancel => Vec::new(),
                    PickerOutcome::Upload(paths) => {
                        self.start_dir = p.cwd.clone();
                        self.focus = Pane::Transfers;
                        paths
                            .into_iter()
                            .map(|path| {
                                let name = path
                                    .file_name()
                                    .map(|n| n.to_string_lossy().into_owned())
                                    .unwrap_or_default();
                                let (id, progress) =
                                    self.new_transfer(TransferKind::Upload, name.clone());
                                Effect::Upload {
                                    id,
                                    path,
                                    name,
                                    progress,
                                }
                            })
                            .collect()
                    }
                }
            }
            Dialog::Download { names, mut dest } => match k.code {
                KeyCode::Esc => Vec::new(),
                KeyCode::Enter => {
                    let dir = PathBuf::from(&dest);
                    let existing: Vec<String> = names
                        .iter()
                        .filter(|n| dir.join(n).exists())
                        .cloned()
                        .collect();
                    self.download_dir = dest.clone();
                    if existing.is_empty() {
                        self.start_downloads(names, &dest, false)
                    } else {
                        self.dialog = Some(Dialog::ConfirmOverwrite {
                            names,
                            dest,
                            existing,
                            yes: false,
                        });
                        Vec::new()
                    }
                }
                KeyCode::Backspace => {
                    dest.pop();
                    self.dialog = Some(Dialog::Download { names, dest });
                    Vec::new()
                }
                KeyCode::Char(c) => {
                    dest.push(c);
                    self.dialog = Some(Dialog::Download { names, dest });
                    Vec::new()
                }
                _ => {
                    self.dialog = Some(Dialog::Download { names, dest });
                    Vec::new()
                }
            },
            Dialog::ConfirmOverwrite {
                names,
                dest,
                existing,
                yes,
            } => match confirm_key(k.code, yes) {
                Confirm::Yes => self.start_downloads(names, &dest, true),
                Confirm::No => Vec::new(),
                Confirm::Toggle(yes) => {
                    self.dialog = Some(Dialog::ConfirmOverwrite {
                        names,
                        dest,
                        existing,
                        yes,
                    });
                    Vec::new()
                }
            },
            Dialog::ConfirmDrain { worker, drain, yes } => match confirm_key(k.code, yes) {
                Confirm::Yes => vec![Effect::SetDraining {
                    worker,
                    draining: drain,
                }],
                Confirm::No => Vec::new(),
                Confirm::Toggle(yes) => {
                    self.dialog = Some(Dialog::ConfirmDrain { worker, drain, yes });
                    Vec::new()
                }
            },
            Dialog::ConfirmDelete { names, yes } => match confirm_key(k.code, yes) {
                Confirm::Yes => {
                    self.marked.clear();
                    names
                        .into_iter()
                        .map(|name| Effect::Delete { name })
                        .collect()
                }
                Confirm::No => Vec::new(),
                Confirm::Toggle(yes) => {
                    self.dialog = Some(Dialog::ConfirmDelete { names, yes });
                    Vec::new()
                }
            },
        }
    }

    fn start_downloads(&mut self, names: Vec<String>, dest: &str, force: bool) -> Vec<Effect> {
        self.marked.clear();
        self.focus = Pane::Transfers;
        let dir = PathBuf::from(dest);
        names
            .into_iter()
            .map(|name| {
                let (id, progress) = self.new_transfer(TransferKind::Download, name.clone());
                Effect::Download {
                    id,
                    dest: dir.join(&name),
                    name,
                    force,
                    progress,
                }
            })
            .collect()
    }
}

enum Confirm {
    Yes,
    No,
    Toggle(bool),
}

/// Keys of a yes/no dialog: Enter takes the focused button (No unless moved), `y` / `n`
/// answer directly, arrows and Tab move the focus, Esc cancels.
fn confirm_key(code: KeyCode, yes: bool) -> Confirm {
    match code {
        KeyCode::Char('y') | KeyCode::Char('Y') => Confirm::Yes,
        KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => Confirm::No,
        KeyCode::Enter => {
            if yes {
                Confirm::Yes
            } else {
                Confirm::No
            }
        }
        KeyCode::Left
        | KeyCode::Right
        | KeyCode::Tab
        | KeyCode::BackTab
        | KeyCode::Char('h')
        | KeyCode::Char('l') => Confirm::Toggle(!yes),
        _ => Confirm::Toggle(yes),
    }
}

fn state_rank(s: &str) -> u8 {
    match s {
        "alive" => 0,
        "draining" => 1,
        "suspect" => 2,
        _ => 3,
    }
}
