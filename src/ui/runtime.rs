//! The console's runtime: terminal set-up and restore on every exit path (quit, error, panic,
//! SIGTERM), the input thread, the background tasks that poll the master and follow its log
//! stream, and the execution of effects. Results come back to the UI loop as messages.

use std::io::stdout;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use crossterm::event::{self, DisableMouseCapture, EnableMouseCapture, Event};
use crossterm::execute;
use tokio::sync::{Notify, mpsc};

use super::app::{App, Effect, Level, LogLine, Msg};
use super::view;
use crate::client::{Client, DownloadOptions, UploadOptions};

type Shared = Arc<Mutex<Option<Client>>>;

/// How often the console asks the master for status and for the file list.
const STATUS_EVERY: Duration = Duration::from_secs(1);
const FILES_EVERY: Duration = Duration::from_secs(3);

/// Runs the console against the master at `master` until the user quits.
pub async fn run(
    master: String,
    transport: crate::rpc::Transport,
    local: bool,
) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init().context("cannot initialise the terminal")?;
    // ratatui's hook restores the screen on panic; also release the mouse.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = execute!(stdout(), DisableMouseCapture);
        hook(info);
    }));
    let _ = execute!(stdout(), EnableMouseCapture);
    let result = event_loop(&mut terminal, master, transport, local).await;
    let _ = execute!(stdout(), DisableMouseCapture);
    ratatui::restore();
    result
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    master: String,
    transport: crate::rpc::Transport,
    local: bool,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let mut app = App::new(&master, local);
    app.logger_state = Some(App::logger_state_for(app.log_level));
    let size = terminal.size().context("cannot read the terminal size")?;
    app.size = (size.width, size.height);
    app.note(
        Level::Info,
        format!(
            "console started; master {master}{}",
            if local { " (embedded cluster)" } else { "" }
        ),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let input = spawn_input(tx.clone(), stop.clone());
    let client: Shared = Arc::new(Mutex::new(None));
    let refresh = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(poll_status(
        master.clone(),
        transport,
        client.clone(),
        tx.clone(),
        refresh.clone(),
    ));
    tasks.spawn(poll_files(client.clone(), tx.clone(), refresh.clone()));
    tasks.spawn(follow_logs(client.clone(), tx.clone()));
    {
        let tx = tx.clone();
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if tx.send(Msg::Tick).is_err() {
                    return;
                }
            }
        });
    }
    {
        let tx = tx.clone();
        tasks.spawn(async move {
            crate::cluster::shutdown_signal().await;
            let _ = tx.send(Msg::Quit);
        });
    }

    let result: anyhow::Result<()> = async {
        loop {
            terminal
                .draw(|f| view::render(f, &mut app))
                .context("cannot draw")?;
            let Some(msg) = rx.recv().await else { break };
            let mut effects = app.update(msg);
            while let Ok(m) = rx.try_recv() {
                effects.extend(app.update(m));
            }
            for e in effects {
                execute_effect(e, &client, &tx, &refresh);
            }
            if app.should_quit {
                break;
            }
        }
        stop_transfers(terminal, &mut app, &mut rx).await;
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    let _ = input.join();
    result
}

/// Longest the console waits on quitting for its running transfers to stop.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// On quit, the running transfers were asked to stop (`App::quit`). Waits for them, at most
/// [`STOP_WAIT`], so that an upload is aborted on the master and a download's partial file
/// removed, as `--cmd` does on Ctrl-C. Before, the process exited at once: an upload stayed
/// open on the master, holding its chunks until its lease ran out.
async fn stop_transfers(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
) {
    let running = |app: &App| {
        app.transfers
            .iter()
            .filter(|t| t.state == super::app::TransferState::Running)
            .count()
    };
    if running(app) == 0 {
        return;
    }
    app.note(
        Level::Info,
        format!("quitting: stopping {} transfer(s)…", running(app)),
    );
    let _ = terminal.draw(|f| view::render(f, app));
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    while running(app) > 0 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m @ Msg::TransferDone { .. })) => {
                app.update(m);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
}

/// Reads terminal events on a thread (crossterm's read blocks) until `stop`.
fn spawn_input(
    tx: mpsc::UnboundedSender<Msg>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => {
                    let msg = match event::read() {
                        Ok(Event::Key(k)) => Msg::Key(k),
                        Ok(Event::Mouse(m)) => Msg::Mouse(m),
                        Ok(Event::Resize(w, h)) => Msg::Resize(w, h),
                        Ok(_) => continue,
                        Err(_) => Msg::Quit,
                    };
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(false) => {}
                Err(_) => {
                    let _ = tx.send(Msg::Quit);
                    return;
                }
            }
        }
    })
}

fn current(client: &Shared) -> Option<Client> {
    client.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Connects (and reconnects) to the master and reports its status every second.
async fn poll_status(
    master: String,
    transport: crate::rpc::Transport,
    client: Shared,
    tx: mpsc::UnboundedSender<Msg>,
    refresh: Arc<Notify>,
) {
    loop {
        let c = match current(&client) {
            Some(c) => Some(c),
            None => match Client::connect_with(&master, transport.clone()).await {
                Ok(c) => {
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                    refresh.notify_waiters();
                    Some(c)
                }
                Err(e) => {
                    if tx.send(Msg::Status(Err(e.to_string()))).is_err() {
                        return;
                    }
                    None
                }
            },
        };
        if let Some(c) = c {
            let r = c.status().await.map(Box::new).map_err(|e| e.to_string());
            if tx.send(Msg::Status(r)).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_EVERY) => {}
            _ = refresh.notified() => {}
        }
    }
}

/// Fetches the whole file list periodically and after every change made from the console.
async fn poll_files(client: Shared, tx: mpsc::UnboundedSender<Msg>, refresh: Arc<Notify>) {
    loop {
        if let Some(c) = current(&client) {
            let r = c.list().await.map_err(|e| e.to_string());
            if tx.send(Msg::Files(r)).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FILES_EVERY) => {}
            _ = refresh.notified() => {}
        }
    }
}

/// Follows the master's event stream, reconnecting when it breaks; each event goes to the
/// logs pane (and through tracing to tui-logger and the console's log file).
async fn follow_logs(client: Shared, tx: mpsc::UnboundedSender<Msg>) {
    let mut backlog = 200;
    loop {
        if let Some(c) = current(&client)
            && let Ok(mut stream) = c.stream_logs(backlog).await
        {
            // After a reconnect, only new events: the earlier ones are already shown.
            backlog = 1;
            while let Ok(Some(ev)) = stream.message().await {
                let level = Level::parse(&ev.level);
                // `at_ms` is `log_format::AT_FIELD`: the pane shows the event's own time.
                let at_ms = ev.unix_ms;
                match level {
                    Level::Error => tracing::error!(target: "master", at_ms, "{}", ev.message),
                    Level::Warn => tracing::warn!(target: "master", at_ms, "{}", ev.message),
                    _ => tracing::info!(target: "master", at_ms, "{}", ev.message),
                }
                let line = LogLine {
                    unix_ms: ev.unix_ms,
                    level,
                    source: "master",
                    message: ev.message,
                };
                if tx.send(Msg::Log(line)).is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn execute_effect(
    e: Effect,
    client: &Shared,
    tx: &mpsc::UnboundedSender<Msg>,
    refresh: &Arc<Notify>,
) {
    let Some(c) = current(client) else {
        let err = "not connected to the master".to_string();
        let _ = match e {
            Effect::Upload { id, .. } | Effect::Download { id, .. } => tx.send(Msg::TransferDone {
                id,
                result: Err(err),
            }),
            Effect::Delete { name } => tx.send(Msg::Deleted {
                name,
                result: Err(err),
            }),
            Effect::Stat { name } => tx.send(Msg::Detail(name, Err(err))),
            Effect::SetDraining { worker, draining } => tx.send(Msg::Drained {
                worker,
                draining,
                result: Err(err),
            }),
            Effect::Refresh => Ok(()),
        };
        return;
    };
    let tx = tx.clone();
    match e {
        Effect::Refresh => refresh.notify_waiters(),
        Effect::Upload {
            id,
            path,
            name,
            progress,
        } => {
            tokio::spawn(async move {
                let r = c
                    .upload(
                        &path,
                        UploadOptions {
                            name: Some(name),
                            replicas: None,
                            progress: Some(progress),
                        },
                    )
                    .await
                    .map(|r| {
                        format!(
                            "{} chunk(s), {}/{} replicas",
                            r.file.chunk_count, r.replicas_achieved, r.file.replicas_target
                        )
                    })
                    .map_err(|e| e.to_string());
                let _ = tx.send(Msg::TransferDone { id, result: r });
            });
        }
        Effect::Download {
            id,
            name,
            dest,
            force,
            progress,
        } => {
            tokio::spawn(async move {
                let r = async {
                    if let Some(dir) = dest.parent() {
                        std::fs::create_dir_all(dir)
                            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                    }
                    c.download(
                        &name,
                        &dest,
                        DownloadOptions {
                            force,
                            progress: Some(progress),
                            ..Default::default()
                        },
                    )
                    .await
                    .map(|r| format!("to {}", r.path.display()))
                    .map_err(|e| e.to_string())
                }
                .await;
                let _ = tx.send(Msg::TransferDone { id, result: r });
            });
        }
        Effect::Delete { name } => {
            tokio::spawn(async move {
                let r = c.delete(&name).await.map(|_| ()).map_err(|e| e.to_string());
                let _ = tx.send(Msg::Deleted { name, result: r });
            });
        }
        Effect::SetDraining { worker, draining } => {
            tokio::spawn(async move {
                let r = c
                    .set_draining(&worker, draining)
                    .await
                    .map(|w| w.drain_remaining)
                    .map_err(|e| e.to_string());
                let _ = tx.send(Msg::Drained {
                    worker,
                    draining,
                    result: r,
                });
            });
        }
        Effect::Stat { name } => {
            tokio::spawn(async move {
                let r = c.stat(&name).await.map(Box::new).map_err(|e| e.to_string());
                let _ = tx.send(Msg::Detail(name, r));
            });
        }
    }
}

/// Installs logging for the console: the log file, and tui-logger for the logs pane (the
/// console's own events and the master's stream at info, everything else at warn). Nothing
/// goes to stderr, which would tear the screen.
pub fn init_logging(log_dir: &std::path::Path) -> Option<crate::logwriter::FlushGuard> {
    use tracing_subscriber::{
        EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt,
    };
    let _ = tui_logger::init_logger(tui_logger::LevelFilter::Debug);
    let tui = tui_logger::TuiTracingSubscriberLayer
        .with_filter(EnvFilter::new("warn,console=info,master=info"));
    let (file, guard) = match crate::logging::open_log(log_dir, "dfs-tui.log") {
        Ok(f) => {
            let (w, g) = crate::logwriter::batched("log-file", f);
            (
                Some(
                    fmt::layer()
                        .with_ansi(false)
                        .with_writer(w)
                        .with_filter(EnvFilter::new(
                            "info,h2=warn,hyper=warn,tower=warn,tonic=warn",
                        )),
                ),
                Some(g),
            )
        }
        Err(_) => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(tui)
        .with(file)
        .try_init();
    guard
}

/// Where `--local` keeps its data unless told otherwise.
pub fn default_local_dir() -> PathBuf {
    PathBuf::from("dfs-local")
}
