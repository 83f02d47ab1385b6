//! Drawing: a pure function of the `App` (plus the scroll offsets it keeps in view).
//! Only the rows that fit on screen are built, so 100,000 files cost what 40 do.

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Gauge, Paragraph, Row, Sparkline, Table, Wrap};

use super::app::{
    App, Conn, Dialog, FileSort, Level, Pane, TransferKind, TransferState, WorkerSort,
};
use super::keys::{self, BINDINGS, Scope};
use crate::config::human_bytes;
use crate::rpc::pb::{FileInfo, WorkerStatus};

/// Below this size the console asks for a bigger terminal.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 15;

/// Styles that collapse to plain text under `NO_COLOR`.
struct Theme {
    plain: bool,
}

impl Theme {
    fn fg(&self, c: Color) -> Style {
        if self.plain {
            Style::default()
        } else {
            Style::default().fg(c)
        }
    }
    fn bold(&self) -> Style {
        Style::default().add_modifier(Modifier::BOLD)
    }
    fn selected(&self) -> Style {
        if self.plain {
            Style::default().add_modifier(Modifier::REVERSED)
        } else {
            Style::default()
                .bg(Color::DarkGray)
                .add_modifier(Modifier::BOLD)
        }
    }
    fn dim(&self) -> Style {
        if self.plain {
            Style::default()
        } else {
            Style::default().fg(Color::DarkGray)
        }
    }
    fn key(&self) -> Style {
        if self.plain {
            Style::default().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
                .fg(Color::Cyan)
                .add_modifier(Modifier::BOLD)
        }
    }
}

/// Draws the whole screen.
pub fn render(f: &mut Frame, app: &mut App) {
    let area = f.area();
    app.size = (area.width, area.height);
    let t = Theme {
        plain: app.no_color,
    };
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let msg = format!(
            "terminal too small: {}×{} (need at least {MIN_WIDTH}×{MIN_HEIGHT})",
            area.width, area.height
        );
        f.render_widget(
            Paragraph::new(msg)
                .wrap(Wrap { trim: true })
                .alignment(Alignment::Center),
            area,
        );
        return;
    }
    let wide = area.width >= 110;
    let log_h = if area.height >= 40 {
        area.height / 4
    } else {
        6
    };
    let [header, middle, logs, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(6),
        Constraint::Length(log_h),
        Constraint::Length(1),
    ])
    .areas(area);
    render_header(f, app, &t, header);

    let n_workers = app.status.as_ref().map(|s| s.workers.len()).unwrap_or(0) as u16;
    let (workers, files, transfers) = if wide {
        let [left, right] =
            Layout::horizontal([Constraint::Percentage(58), Constraint::Percentage(42)])
                .areas(middle);
        let [w, tr] = Layout::vertical([
            Constraint::Length((n_workers + 3).clamp(4, right.height.saturating_sub(5).max(4))),
            Constraint::Min(4),
        ])
        .areas(right);
        (w, left, tr)
    } else {
        // The transfers pane takes room only when it has something to show (or has focus).
        let tr_h = if !app.transfers.is_empty() {
            (app.transfers.len() as u16 + 2).min(5)
        } else if app.focus == Pane::Transfers {
            3
        } else {
            0
        };
        let [w, fl, tr] = Layout::vertical([
            Constraint::Length((n_workers + 3).clamp(4, 6)),
            Constraint::Min(4),
            Constraint::Length(tr_h),
        ])
        .areas(middle);
        (w, fl, tr)
    };
    app.hit.workers = workers;
    app.hit.files = files;
    app.hit.transfers = transfers;
    app.hit.logs = logs;
    render_workers(f, app, &t, workers);
    render_files(f, app, &t, files);
    render_transfers(f, app, &t, transfers);
    render_logs(f, app, &t, logs);
    render_footer(f, app, &t, footer);
    if app.dialog.is_some() {
        render_dialog(f, app, &t, area);
    }
}

fn pane_block<'a>(app: &App, t: &Theme, pane: Pane, n: u8, title: String) -> Block<'a> {
    let focused = app.focus == pane;
    let style = if focused {
        t.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    } else {
        t.dim()
    };
    Block::bordered().border_style(style).title(Span::styled(
        format!(" {n} {title} "),
        if focused { t.bold() } else { Style::default() },
    ))
}

fn render_header(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let [l0, l1, l2] = Layout::vertical([Constraint::Length(1); 3]).areas(area);
    let (badge, color) = match &app.conn {
        Conn::Connecting => ("◌ connecting".to_string(), Color::Yellow),
        Conn::Connected => ("● connected".to_string(), Color::Green),
        Conn::Reconnecting(_) => ("◐ reconnecting".to_string(), Color::Yellow),
        Conn::Unreachable(_) => ("✖ unreachable".to_string(), Color::Red),
    };
    let mut spans = vec![
        Span::styled(" dfs ", t.bold()),
        Span::styled(badge, t.fg(color).add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " {}{} ",
            app.master_addr,
            if app.local { " (local)" } else { "" }
        )),
    ];
    if app.stale() {
        spans.push(Span::styled(" [stale data] ", t.fg(Color::Yellow)));
    }
    let narrow = area.width < 110;
    if let Some(s) = &app.status {
        spans.push(Span::raw("│ workers "));
        let (alive, suspect, dead) = if narrow {
            (
                format!("✔{} ", s.workers_alive),
                format!("▲{} ", s.workers_suspect),
                format!("✖{} ", s.workers_dead),
            )
        } else {
            (
                format!("✔ {} alive ", s.workers_alive),
                format!("▲ {} suspect ", s.workers_suspect),
                format!("✖ {} dead ", s.workers_dead),
            )
        };
        let st = |n: u32, c: Color| if n > 0 { t.fg(c) } else { Style::default() };
        spans.push(Span::styled(alive, t.fg(Color::Green)));
        spans.push(Span::styled(suspect, st(s.workers_suspect, Color::Yellow)));
        spans.push(Span::styled(dead, st(s.workers_dead, Color::Red)));
        spans.push(Span::raw(format!(
            "│ {} files, {}",
            s.files,
            human_bytes(s.logical_bytes)
        )));
    } else if let Conn::Unreachable(e) = &app.conn {
        spans.push(Span::styled(format!("│ {e}"), t.fg(Color::Red)));
    }
    f.render_widget(Line::from(spans), l0);

    let [gauge_area, health_area] =
        Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(l1);
    let (used, cap) = app
        .status
        .as_ref()
        .map(|s| (s.used_bytes, s.capacity_bytes))
        .unwrap_or((0, 0));
    let ratio = if cap > 0 {
        (used as f64 / cap as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let gauge = Gauge::default()
        .gauge_style(t.fg(if ratio > 0.9 { Color::Red } else { Color::Blue }))
        .ratio(ratio)
        .use_unicode(true)
        .label(format!(
            "capacity {} / {} ({:.1}%)",
            human_bytes(used),
            human_bytes(cap),
            ratio * 100.0
        ));
    f.render_widget(gauge, gauge_area);
    let health = match &app.status {
        None => Line::from(" health: unknown"),
        Some(s) => health_line(s, t, narrow),
    };
    f.render_widget(health, health_area);

    let [r_label, r_spark, w_label, w_spark] = Layout::horizontal([
        Constraint::Length(18),
        Constraint::Percentage(50),
        Constraint::Length(18),
        Constraint::Percentage(50),
    ])
    .areas(l2);
    let last = |h: &std::collections::VecDeque<u64>| h.back().copied().unwrap_or(0);
    f.render_widget(
        Line::from(format!(
            " read  {:>9}/s ",
            human_bytes(last(&app.read_history))
        )),
        r_label,
    );
    let tail = |h: &std::collections::VecDeque<u64>, w: u16| -> Vec<u64> {
        let skip = h.len().saturating_sub(w as usize);
        h.iter().skip(skip).copied().collect()
    };
    f.render_widget(
        Sparkline::default()
            .data(tail(&app.read_history, r_spark.width))
            .style(t.fg(Color::Green)),
        r_spark,
    );
    f.render_widget(
        Line::from(format!(
            " write {:>9}/s ",
            human_bytes(last(&app.write_history))
        )),
        w_label,
    );
    f.render_widget(
        Sparkline::default()
            .data(tail(&app.write_history, w_spark.width))
            .style(t.fg(Color::Magenta)),
        w_spark,
    );
}

/// Replication health: the MooseFS-style groups (missing / endangered / under / stable / over),
/// corrupt copies and repair activity, each with a symbol as well as a colour.
fn health_line(
    s: &crate::rpc::pb::ClusterStatusResponse,
    t: &Theme,
    narrow: bool,
) -> Line<'static> {
    let under_only = s
        .under_replicated_chunks
        .saturating_sub(s.endangered_chunks);
    let repairing = s.repair_queue + s.repairs_in_flight as u64;
    let mut v = vec![Span::raw(" health: ")];
    if s.missing_chunks == 0 && s.under_replicated_chunks == 0 && s.corrupt_replicas == 0 {
        v.push(Span::styled(
            format!(
                "✔ healthy ({} chunks at target)",
                s.stable_chunks + s.over_target_chunks
            ),
            t.fg(Color::Green),
        ));
    } else {
        let st = |n: u64, c: Color| if n > 0 { t.fg(c) } else { Style::default() };
        let parts: [(u64, &str, &str, Color); 4] = [
            (s.missing_chunks, "✖", "missing", Color::Red),
            (s.endangered_chunks, "‼", "endangered", Color::Red),
            (under_only, "▲", "under", Color::Yellow),
            (s.corrupt_replicas, "!", "corrupt", Color::Red),
        ];
        for (n, sym, word, c) in parts {
            let text = if narrow {
                format!("{sym}{n} ")
            } else {
                format!("{sym} {n} {word} ")
            };
            v.push(Span::styled(text, st(n, c)));
        }
        if !narrow {
            v.push(Span::raw(format!("✔ {} stable ", s.stable_chunks)));
        }
    }
    if repairing > 0 {
        v.push(Span::styled(
            format!(
                " ⟳ {repairing} repairing {}/s",
                human_bytes(s.repair_bytes_per_sec)
            ),
            t.fg(Color::Cyan),
        ));
    }
    Line::from(v)
}

fn bar(ratio: f64, width: usize) -> String {
    let filled = ((ratio.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn age(ms: i64) -> String {
    if ms < 0 {
        "never".into()
    } else if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}h", ms / 3_600_000)
    }
}

fn state_cell(t: &Theme, state: &str) -> Cell<'static> {
    let (sym, color) = match state {
        "alive" => ("✔", Color::Green),
        "suspect" => ("▲", Color::Yellow),
        "draining" => ("↓", Color::Blue),
        _ => ("✖", Color::Red),
    };
    Cell::from(Span::styled(format!("{sym} {state}"), t.fg(color)))
}

fn sort_mark(active: bool, asc: bool) -> &'static str {
    match (active, asc) {
        (false, _) => "",
        (true, true) => "▲",
        (true, false) => "▼",
    }
}

fn render_workers(f: &mut Frame, app: &mut App, t: &Theme, area: Rect) {
    let workers = app.sorted_workers();
    let (col, asc) = app.workers_sort;
    let h = |name: &str, c: WorkerSort| format!("{name}{}", sort_mark(col == c, asc));
    let header = Row::new(vec![
        h("WORKER", WorkerSort::Address),
        h("STATE", WorkerSort::State),
        h("USED", WorkerSort::Used),
        h("CHUNKS", WorkerSort::Chunks),
        h("HEARTBEAT", WorkerSort::Heartbeat),
        "READ/WRITE".to_string(),
    ])
    .style(t.bold());
    let rows_h = area.height.saturating_sub(3) as usize;
    // Columns shrink to fit: a longer usage bar and the rates only where there is room.
    let inner = area.width.saturating_sub(2);
    let roomy = inner >= 80;
    app.workers_nav.clamp(workers.len());
    app.workers_nav.scroll_into_view(rows_h);
    let focused = app.focus == Pane::Workers;
    let rows: Vec<Row> = workers
        .iter()
        .enumerate()
        .skip(app.workers_nav.offset)
        .take(rows_h)
        .map(|(i, w)| worker_row(app, t, w, focused && i == app.workers_nav.selected, roomy))
        .collect();
    let title = format!("Workers ({})", workers.len());
    let table = Table::new(
        rows,
        [
            Constraint::Min(15),
            Constraint::Length(9),
            Constraint::Length(if roomy { 11 } else { 8 }),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(if inner >= 62 { 13 } else { 0 }),
        ],
    )
    .header(header)
    .block(pane_block(app, t, Pane::Workers, 1, title));
    if workers.is_empty() {
        let msg = match &app.conn {
            Conn::Connected => "no workers have registered",
            _ => "waiting for the master…",
        };
        f.render_widget(
            Paragraph::new(msg).block(pane_block(app, t, Pane::Workers, 1, "Workers".into())),
            area,
        );
    } else {
        f.render_widget(table, area);
    }
}

fn worker_row(app: &App, t: &Theme, w: &WorkerStatus, selected: bool, roomy: bool) -> Row<'static> {
    let u = w.usage.unwrap_or_default();
    let ratio = if u.capacity_bytes > 0 {
        u.used_bytes as f64 / u.capacity_bytes as f64
    } else {
        0.0
    };
    let (r, wr) = app.worker_rates(&w.address);
    let row = Row::new(vec![
        Cell::from(w.address.clone()),
        state_cell(t, &w.state),
        Cell::from(format!(
            "{} {:>3.0}%",
            bar(ratio, if roomy { 6 } else { 3 }),
            ratio * 100.0
        )),
        Cell::from(w.chunks_mapped.to_string()),
        Cell::from(age(w.last_heartbeat_ms_ago)),
        Cell::from(format!("{}/{}", short_rate(r), short_rate(wr))),
    ]);
    if selected {
        row.style(t.selected())
    } else {
        row
    }
}

fn short_rate(bps: u64) -> String {
    if bps == 0 {
        "-".into()
    } else {
        human_bytes(bps).replace(' ', "")
    }
}

fn replicas_cell(t: &Theme, f: &FileInfo) -> Cell<'static> {
    let text = format!("{}/{}", f.replicas_min_live, f.replicas_target);
    if f.chunk_count > 0 && f.replicas_min_live == 0 {
        Cell::from(Span::styled(format!("✖ {text}"), t.fg(Color::Red)))
    } else if f.replicas_min_live < f.replicas_target {
        Cell::from(Span::styled(format!("▲ {text}"), t.fg(Color::Yellow)))
    } else {
        Cell::from(Span::styled(format!("✔ {text}"), t.fg(Color::Green)))
    }
}

fn modified(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.replace('T', " ").trim_end_matches('Z').to_string()
}

fn render_files(f: &mut Frame, app: &mut App, t: &Theme, area: Rect) {
    let (col, asc) = app.files_sort;
    let h = |name: &str, c: FileSort| format!("{name}{}", sort_mark(col == c, asc));
    let header = Row::new(vec![
        h("NAME", FileSort::Name),
        h("SIZE", FileSort::Size),
        h("CHUNKS", FileSort::Chunks),
        h("REPLICAS", FileSort::Replicas),
        h("MODIFIED", FileSort::Modified),
    ])
    .style(t.bold());
    let rows_h = area.height.saturating_sub(3) as usize;
    app.files_nav.clamp(app.view.len());
    app.files_nav.scroll_into_view(rows_h);
    let focused = app.focus == Pane::Files;
    let rows: Vec<Row> = app
        .view
        .iter()
        .enumerate()
        .skip(app.files_nav.offset)
        .take(rows_h)
        .filter_map(|(i, &fi)| app.files.get(fi).map(|file| (i, file)))
        .map(|(i, file)| {
            let mark = if app.marked.contains(&file.name) {
                "● "
            } else {
                ""
            };
            let row = Row::new(vec![
                Cell::from(format!("{mark}{}", file.name)),
                Cell::from(human_bytes(file.size)),
                Cell::from(file.chunk_count.to_string()),
                replicas_cell(t, file),
                Cell::from(
                    modified(file.modified_unix_ms)
                        .chars()
                        .take(16)
                        .collect::<String>(),
                ),
            ]);
            if focused && i == app.files_nav.selected {
                row.style(t.selected())
            } else {
                row
            }
        })
        .collect();
    let mut title = if app.filter.is_empty() {
        format!("Files ({})", app.files.len())
    } else {
        format!(
            "Files ({} of {}) filter: {}",
            app.view.len(),
            app.files.len(),
            app.filter
        )
    };
    if app.editing_filter {
        title.push('▏');
    }
    if !app.marked.is_empty() {
        title.push_str(&format!(" · {} marked", app.marked.len()));
    }
    let block = pane_block(app, t, Pane::Files, 2, title);
    if app.files.is_empty() {
        f.render_widget(
            Paragraph::new("no files yet: press u to upload")
                .style(t.dim())
                .block(block),
            area,
        );
        return;
    }
    let table = Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Length(10),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(16),
        ],
    )
    .header(header)
    .block(block);
    f.render_widget(table, area);
}

fn eta(done: u64, total: u64, rate: f64) -> String {
    if rate <= 1.0 || done >= total {
        return "-".into();
    }
    let secs = (total - done) as f64 / rate;
    if secs < 60.0 {
        format!("{secs:.0}s")
    } else {
        format!("{}m{:02}s", secs as u64 / 60, secs as u64 % 60)
    }
}

fn render_transfers(f: &mut Frame, app: &mut App, t: &Theme, area: Rect) {
    let running = app
        .transfers
        .iter()
        .filter(|t| t.state == TransferState::Running)
        .count();
    let title = format!(
        "Transfers ({running} running, {} total)",
        app.transfers.len()
    );
    let block = pane_block(app, t, Pane::Transfers, 3, title);
    if app.transfers.is_empty() {
        f.render_widget(
            Paragraph::new("uploads and downloads appear here")
                .style(t.dim())
                .block(block),
            area,
        );
        return;
    }
    let rows_h = area.height.saturating_sub(2) as usize;
    app.transfers_nav.clamp(app.transfers.len());
    app.transfers_nav.scroll_into_view(rows_h);
    let focused = app.focus == Pane::Transfers;
    let now = app.now;
    let name_w = (area.width as usize / 4).clamp(8, 30);
    let lines: Vec<Line> = app
        .transfers
        .iter()
        .enumerate()
        .skip(app.transfers_nav.offset)
        .take(rows_h)
        .map(|(i, tr)| {
            let arrow = match tr.kind {
                TransferKind::Upload => "↑",
                TransferKind::Download => "↓",
            };
            let (done, total) = tr.progress.snapshot();
            let ratio = if total > 0 {
                done as f64 / total as f64
            } else {
                1.0
            };
            let rate = tr.rate(now);
            let name: String = tr.name.chars().take(name_w).collect();
            let mut spans = vec![Span::raw(format!("{arrow} {name:<name_w$} "))];
            match &tr.state {
                TransferState::Running => spans.push(Span::raw(format!(
                    "{} {:>3.0}% {}/{} {}/s ETA {}",
                    bar(ratio, 10),
                    ratio * 100.0,
                    human_bytes(done),
                    human_bytes(total),
                    human_bytes(rate as u64),
                    eta(done, total, rate)
                ))),
                TransferState::Done(s) => spans.push(Span::styled(
                    format!(
                        "✔ done {} ({}/s) {s}",
                        human_bytes(total),
                        human_bytes(rate as u64)
                    ),
                    t.fg(Color::Green),
                )),
                TransferState::Failed(e) => {
                    spans.push(Span::styled(format!("✖ failed: {e}"), t.fg(Color::Red)))
                }
                TransferState::Cancelled => {
                    spans.push(Span::styled("⊘ cancelled".to_string(), t.fg(Color::Yellow)))
                }
            }
            let line = Line::from(spans);
            if focused && i == app.transfers_nav.selected {
                line.style(t.selected())
            } else {
                line
            }
        })
        .collect();
    f.render_widget(Paragraph::new(lines).block(block), area);
}

fn level_style(t: &Theme, l: Level) -> Style {
    match l {
        Level::Error => t.fg(Color::Red),
        Level::Warn => t.fg(Color::Yellow),
        Level::Info => Style::default(),
        Level::Debug => t.dim(),
    }
}

fn render_logs(f: &mut Frame, app: &mut App, t: &Theme, area: Rect) {
    let mut title = format!("Logs (≥ {})", app.log_level.as_str());
    if !app.log_search.is_empty() || app.editing_search {
        title.push_str(&format!(" search: {}", app.log_search));
        if app.editing_search {
            title.push('▏');
        }
    }
    if app.log_scroll > 0 {
        title.push_str(" · paused (End/Esc to follow)");
    }
    let block = pane_block(app, t, Pane::Logs, 4, title);
    let use_widget = app.log_search.is_empty() && !app.editing_search && app.log_scroll == 0;
    if let (true, Some(state)) = (use_widget, app.logger_state.as_ref()) {
        let w = tui_logger::TuiLoggerWidget::default()
            .block(block)
            .formatter(Box::new(super::log_format::EventTimeFormatter {
                style: Style::default(),
                style_error: t.fg(Color::Red),
                style_warn: t.fg(Color::Yellow),
                style_debug: t.dim(),
            }))
            .state(state);
        f.render_widget(w, area);
        return;
    }
    let rows_h = area.height.saturating_sub(2) as usize;
    let lines = app.visible_logs();
    let end = lines.len().saturating_sub(app.log_scroll);
    let start = end.saturating_sub(rows_h);
    let q = app.log_search.to_lowercase();
    let shown: Vec<Line> = lines[start..end]
        .iter()
        .map(|l| {
            let time = super::log_format::clock(l.unix_ms);
            let mut spans = vec![
                Span::styled(format!("{time} "), t.dim()),
                Span::styled(format!("{:<5} ", l.level.as_str()), level_style(t, l.level)),
                Span::styled(format!("{:<7} ", l.source), t.dim()),
            ];
            spans.extend(highlight(&l.message, &q, level_style(t, l.level), t));
            Line::from(spans)
        })
        .collect();
    let body = if shown.is_empty() {
        vec![Line::styled(
            if q.is_empty() {
                "no events yet"
            } else {
                "no matching events"
            },
            t.dim(),
        )]
    } else {
        shown
    };
    f.render_widget(Paragraph::new(body).block(block), area);
}

/// Splits `text` so that case-insensitive matches of `q` stand out.
fn highlight(text: &str, q: &str, base: Style, t: &Theme) -> Vec<Span<'static>> {
    if q.is_empty() {
        return vec![Span::styled(text.to_string(), base)];
    }
    let lower = text.to_lowercase();
    if lower.len() != text.len() {
        return vec![Span::styled(text.to_string(), base)];
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(i) = lower[pos..].find(q) {
        let s = pos + i;
        out.push(Span::styled(text[pos..s].to_string(), base));
        out.push(Span::styled(
            text[s..s + q.len()].to_string(),
            t.key().add_modifier(Modifier::REVERSED),
        ));
        pos = s + q.len();
    }
    out.push(Span::styled(text[pos..].to_string(), base));
    out
}

fn render_footer(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let scope = match &app.dialog {
        Some(Dialog::Picker(_)) => {
            f.render_widget(
                Line::styled(format!(" {}", keys::PICKER_HINT), t.dim()),
                area,
            );
            return;
        }
        Some(_) => None,
        None => Some(app.focus.scope()),
    };
    let mut spans = Vec::new();
    match scope {
        Some(s) => {
            for (k, hint) in keys::footer(s) {
                spans.push(Span::styled(format!(" {k}"), t.key()));
                spans.push(Span::raw(format!(" {hint} ")));
            }
        }
        None => spans.push(Span::styled(
            " Esc close · Enter confirm · y/n answer",
            t.dim(),
        )),
    }
    f.render_widget(Line::from(spans), area);
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width.saturating_sub(2));
    let h = h.min(area.height.saturating_sub(2));
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn buttons(t: &Theme, no: &str, yes: &str, yes_focused: bool) -> Line<'static> {
    let focused = t.selected();
    Line::from(vec![
        Span::styled(
            format!("[ {no} ]"),
            if yes_focused {
                Style::default()
            } else {
                focused
            },
        ),
        Span::raw("   "),
        Span::styled(
            format!("[ {yes} ]"),
            if yes_focused {
                focused
            } else {
                Style::default()
            },
        ),
    ])
    .alignment(Alignment::Center)
}

fn list_names(names: &[String], max: usize) -> String {
    let mut s: Vec<String> = names.iter().take(max).map(|n| format!("\"{n}\"")).collect();
    if names.len() > max {
        s.push(format!("and {} more", names.len() - max));
    }
    s.join(", ")
}

fn render_dialog(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let Some(d) = &app.dialog else { return };
    match d {
        Dialog::Help { scroll } => {
            let r = centered(area, 76, 30);
            let mut lines = Vec::new();
            for scope in [
                Scope::Global,
                Scope::Files,
                Scope::Workers,
                Scope::Transfers,
                Scope::Logs,
            ] {
                lines.push(Line::styled(scope.title(), t.bold()));
                for b in BINDINGS.iter().filter(|b| b.scope == scope) {
                    lines.push(Line::from(vec![
                        Span::styled(format!("  {:<12}", b.keys), t.key()),
                        Span::raw(b.help),
                    ]));
                }
            }
            lines.push(Line::styled(
                "Mouse: click selects, wheel scrolls. NO_COLOR is honoured.  Esc closes.",
                t.dim(),
            ));
            let inner_h = r.height.saturating_sub(2) as usize;
            let max = lines.len().saturating_sub(inner_h);
            let s = (*scroll).min(max);
            let title = if max > 0 {
                format!(" Help ({}/{} · j/k scroll) ", s + inner_h, lines.len())
            } else {
                " Help ".to_string()
            };
            f.render_widget(Clear, r);
            f.render_widget(
                Paragraph::new(lines)
                    .scroll((s as u16, 0))
                    .block(Block::bordered().title(title)),
                r,
            );
        }
        Dialog::Picker(p) => {
            let r = centered(area, 90, area.height.saturating_sub(4));
            f.render_widget(Clear, r);
            let block = Block::bordered().title(format!(
                " Upload: {}{} ",
                p.cwd.display(),
                if p.show_hidden {
                    " (showing hidden)"
                } else {
                    ""
                }
            ));
            let inner = block.inner(r);
            f.render_widget(block, r);
            let [filter_area, list_area, status_area] = Layout::vertical([
                Constraint::Length(1),
                Constraint::Min(1),
                Constraint::Length(1),
            ])
            .areas(inner);
            f.render_widget(
                Line::from(vec![
                    Span::styled("filter: ", t.dim()),
                    Span::raw(format!("{}▏", p.filter)),
                ]),
                filter_area,
            );
            let visible = p.visible();
            let h = list_area.height as usize;
            let offset = p.selected.saturating_sub(h.saturating_sub(1));
            let lines: Vec<Line> = visible
                .iter()
                .enumerate()
                .skip(offset)
                .take(h)
                .map(|(i, e)| {
                    let marked = p.marked.contains(&p.cwd.join(&e.name));
                    let text = if e.is_dir {
                        format!("  {}/", e.name)
                    } else {
                        format!(
                            "{} {:<50} {:>10}",
                            if marked { "●" } else { " " },
                            e.name,
                            human_bytes(e.size)
                        )
                    };
                    let style = if i == p.selected {
                        t.selected()
                    } else if e.is_dir {
                        t.fg(Color::Blue)
                    } else {
                        Style::default()
                    };
                    Line::styled(text, style)
                })
                .collect();
            let body = if let Some(e) = &p.error {
                vec![Line::styled(e.clone(), t.fg(Color::Red))]
            } else if lines.is_empty() {
                vec![Line::styled("(nothing here)", t.dim())]
            } else {
                lines
            };
            f.render_widget(Paragraph::new(body), list_area);
            f.render_widget(
                Line::styled(
                    format!(
                        "{} of {} entries · {} marked",
                        visible.len(),
                        p.entries.len(),
                        p.marked.len()
                    ),
                    t.dim(),
                ),
                status_area,
            );
        }
        Dialog::Download { names, dest } => {
            let r = centered(area, 70, 7);
            f.render_widget(Clear, r);
            let lines = vec![
                Line::from(format!("Download {} to directory:", list_names(names, 3))),
                Line::from(vec![Span::styled(format!("{dest}▏"), t.key())]),
                Line::styled("Enter download · Esc cancel · type to edit", t.dim()),
            ];
            f.render_widget(
                Paragraph::new(lines)
                    .wrap(Wrap { trim: false })
                    .block(Block::bordered().title(" Download ")),
                r,
            );
        }
        Dialog::ConfirmOverwrite {
            dest,
            existing,
            yes,
            ..
        } => {
            let r = centered(area, 70, 8);
            f.render_widget(Clear, r);
            let lines = vec![
                Line::from(format!(
                    "{} already exist in {dest}.",
                    list_names(existing, 3)
                )),
                Line::from("Overwrite them?"),
                Line::from(""),
                buttons(t, "No", "Overwrite", *yes),
            ];
            f.render_widget(
                Paragraph::new(lines).wrap(Wrap { trim: false }).block(
                    Block::bordered()
                        .title(" Overwrite? ")
                        .border_style(t.fg(Color::Yellow)),
                ),
                r,
            );
        }
        Dialog::ConfirmDrain { worker, drain, yes } => {
            let r = centered(area, 70, 8);
            f.render_widget(Clear, r);
            let (title, q, note, verb) = if *drain {
                (
                    " Drain? ",
                    format!("Drain worker {worker}?"),
                    "It takes no new chunks; its chunks are copied to other workers.",
                    "Drain",
                )
            } else {
                (
                    " Undrain? ",
                    format!("Stop draining worker {worker}?"),
                    "It takes new chunks again.",
                    "Undrain",
                )
            };
            let lines = vec![
                Line::from(q),
                Line::styled(note, t.dim()),
                Line::from(""),
                buttons(t, "Cancel", verb, *yes),
            ];
            f.render_widget(
                Paragraph::new(lines).wrap(Wrap { trim: false }).block(
                    Block::bordered()
                        .title(title)
                        .border_style(t.fg(Color::Yellow)),
                ),
                r,
            );
        }
        Dialog::ConfirmDelete { names, yes } => {
            let r = centered(area, 70, 8);
            f.render_widget(Clear, r);
            let what = if names.len() == 1 {
                format!("Delete \"{}\" from the cluster?", names[0])
            } else {
                format!("Delete {} files: {}?", names.len(), list_names(names, 3))
            };
            let lines = vec![
                Line::from(what),
                Line::styled("This cannot be undone.", t.fg(Color::Red)),
                Line::from(""),
                buttons(t, "Cancel", "Delete", *yes),
            ];
            f.render_widget(
                Paragraph::new(lines).wrap(Wrap { trim: false }).block(
                    Block::bordered()
                        .title(" Delete? ")
                        .border_style(t.fg(Color::Red)),
                ),
                r,
            );
        }
        Dialog::Detail {
            name,
            info,
            error,
            scroll,
        } => {
            let r = centered(
                area,
                area.width.saturating_sub(6).max(40),
                area.height.saturating_sub(4),
            );
            f.render_widget(Clear, r);
            let block = Block::bordered().title(format!(" {name} "));
            let mut lines = Vec::new();
            match (info, error) {
                (_, Some(e)) => lines.push(Line::styled(e.clone(), t.fg(Color::Red))),
                (None, None) => lines.push(Line::styled("loading…", t.dim())),
                (Some(fi), None) => {
                    lines.push(Line::from(format!(
                        "size {} ({} bytes) · {} chunk(s) of up to {} · replicas {}/{} · version {}",
                        human_bytes(fi.size),
                        fi.size,
                        fi.chunk_count,
                        human_bytes(fi.chunk_size),
                        fi.replicas_min_live,
                        fi.replicas_target,
                        fi.version
                    )));
                    let digest = crate::digest::Recorded::of(fi);
                    lines.push(Line::from(match digest.algorithm() {
                        Some(alg) => format!("{alg} {}", digest.hex()),
                        None => "digest unknown (rebuilt from chunk headers)".to_string(),
                    }));
                    lines.push(Line::from(format!(
                        "modified {}",
                        modified(fi.modified_unix_ms)
                    )));
                    lines.push(Line::from(""));
                    let full = r.width >= 120;
                    let id_w = if full { 32 } else { 9 };
                    lines.push(Line::styled(
                        format!(
                            "{:<6} {:<id_w$} {:>10}  {:<8}  REPLICAS",
                            "CHUNK", "ID", "SIZE", "CRC32C"
                        ),
                        t.bold(),
                    ));
                    for c in &fi.chunks {
                        let id = if full {
                            c.chunk_id.clone()
                        } else {
                            format!("{}…", &c.chunk_id[..c.chunk_id.len().min(8)])
                        };
                        let mut spans = vec![Span::raw(format!(
                            "{:<6} {id:<id_w$} {:>10}  {:08x}  ",
                            c.index,
                            human_bytes(c.length),
                            c.crc32c
                        ))];
                        if c.replicas.is_empty() {
                            spans.push(Span::styled("✖ no replica known", t.fg(Color::Red)));
                        }
                        for rep in &c.replicas {
                            let (sym, color) = match rep.state.as_str() {
                                "alive" => ("✔", Color::Green),
                                "suspect" => ("▲", Color::Yellow),
                                _ => ("✖", Color::Red),
                            };
                            spans.push(Span::styled(format!("{sym} {} ", rep.worker), t.fg(color)));
                        }
                        lines.push(Line::from(spans));
                    }
                }
            }
            let inner_h = r.height.saturating_sub(2) as usize;
            let max_scroll = lines.len().saturating_sub(inner_h);
            let s = (*scroll).min(max_scroll);
            f.render_widget(Paragraph::new(lines).scroll((s as u16, 0)).block(block), r);
        }
    }
}
