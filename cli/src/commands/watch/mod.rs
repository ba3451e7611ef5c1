//! `orchctl watch`: a live full-screen view of the cluster (ratatui + crossterm), and the
//! interactive mode: open an agent's live transcript, kill it, message it (not yet).
//!
//! - [`model`]: the state, moved by snapshots, events and keys (pure, tested headless).
//! - [`view`]: ratatui drawing, also into a `TestBackend` buffer (`--once`, tests).
//!
//! The screen is fed by the cluster-wide event stream (`GET /v1/events`, resumed with
//! `Last-Event-ID` after a drop) and re-synchronised from `GET /v1/status` every few seconds
//! (workers, queue, costs); no agent is polled.

pub mod model;
pub mod view;

use crate::client::Client;
use crate::commands::Ctx;
use crate::follow::{self, Message};
use crate::output;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use model::{Command, Key, Link, Model};
use orch_shared::event::{Event, EventId, EventKind};
use orch_shared::ids::JobId;
use orch_shared::report::EventRow;
use ratatui::crossterm::event::{self as term, KeyCode, KeyEventKind, KeyModifiers};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use strum::VariantNames;
use tokio::sync::mpsc;

const EXAMPLES: &str = "\
Examples:
  orchctl watch                          # live; ↑↓ select, enter transcript, k kill, q quit
  orchctl watch --once --width 160       # one frame on stdout (scripts, CI)
  orchctl watch -o json | jq -c .event   # the cluster's events as JSON lines";

/// How often the snapshot (workers, queue, costs) is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// How often the screen is redrawn without news (elapsed times move).
const REDRAW_EVERY: Duration = Duration::from_millis(500);
/// The event kinds the screen leaves out (heartbeats, plans, waits); it follows every other.
const LEFT_OUT: [&str; 4] = ["task_created", "task_planned", "job_waiting", "heartbeat"];

/// The event kinds the screen follows, as the `kinds` filter of `GET /v1/events`.
fn kinds() -> String {
    EventKind::VARIANTS
        .iter()
        .filter(|k| !LEFT_OUT.contains(k))
        .copied()
        .collect::<Vec<_>>()
        .join(",")
}

/// Watch the cluster live: workers, slots, running agents, queue, failures
#[derive(Debug, clap::Args)]
#[command(
    long_about = "A live full-screen view of the cluster: the workers and their slots, every \
agent that has not finished with its role, activity (thinking, the tool it uses), elapsed time, \
tokens and cost, the queue, the dead letters, today's cost and the latest failures. It follows \
the cluster's event stream and refreshes the totals every 5 seconds.\n\nKeys: ↑/↓ select an \
agent, Enter open its live transcript (Esc back, ↑/↓ PgUp/PgDn scroll), k kill it (asks y), \
m send it a message (not available yet: it comes with multi-turn sessions), q quit.\n\n--once \
draws one frame on stdout without a terminal; --output json prints the cluster's events as JSON \
lines instead of the screen.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// Draw one frame on stdout and exit
    #[arg(long)]
    pub once: bool,

    /// Frame width for --once [default: the terminal's, else 160]
    #[arg(long, value_name = "COLUMNS", requires = "once")]
    pub width: Option<u16>,

    /// Frame height for --once [default: the terminal's, else 40]
    #[arg(long, value_name = "LINES", requires = "once")]
    pub height: Option<u16>,
}

/// What the background tasks tell the loop.
enum Update {
    Key(Key),
    Event(Box<Event>),
    Link(Link),
    Snapshot(Box<orch_shared::report::ClusterStatus>),
    SnapshotFailed(String),
    Transcript(JobId, Box<Event>),
    Killed(JobId, Result<(), String>),
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    if ctx.json() {
        return if args.once {
            let status = client.cluster_status().await?;
            let mut out = std::io::stdout().lock();
            output::json(&mut out, &status)?;
            Ok(ExitCode::SUCCESS)
        } else {
            stream_json(&client).await
        };
    }
    if args.once {
        let status = client.cluster_status().await?;
        let mut model = Model::new(client.server());
        model.link = Link::Live;
        model.apply_snapshot(status);
        let (cols, rows) = if std::io::stdout().is_terminal() {
            ratatui::crossterm::terminal::size().unwrap_or((160, 40))
        } else {
            (160, 40)
        };
        let text = view::render_text(
            &model,
            orch_shared::now_ms(),
            args.width.unwrap_or(cols).max(40),
            args.height.unwrap_or(rows).max(12),
        );
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(
        std::io::stdout().is_terminal() && std::io::stdin().is_terminal(),
        "watch needs a terminal (use --once for one frame, or --output json for the events)"
    );
    // Fail before taking over the screen if the coordinator is not there.
    let first = client.cluster_status().await?;
    interactive(client, first).await
}

/// `watch -o json`: every event of the cluster as one JSON line, until interrupted.
async fn stream_json(client: &Client) -> anyhow::Result<ExitCode> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let events = tokio::spawn(follow_events(client.clone(), None, tx));
    let mut out = std::io::stdout().lock();
    while let Some(update) = rx.recv().await {
        match update {
            Update::Event(event) => {
                let row = EventRow {
                    seq: 0,
                    index: 0,
                    event: *event,
                };
                serde_json::to_writer(&mut out, &row).map_err(std::io::Error::from)?;
                writeln!(out)?;
                out.flush()?;
            }
            Update::Link(Link::Lost(why)) => {
                let _ = writeln!(std::io::stderr(), "reconnecting ({why})");
            }
            _ => {}
        }
    }
    events.abort();
    Ok(ExitCode::SUCCESS)
}

/// Follows `GET /v1/events` (only `kinds` when given), reconnecting after drops with
/// `Last-Event-ID` so nothing is missed or shown twice.
async fn follow_events(client: Client, kinds: Option<String>, tx: mpsc::UnboundedSender<Update>) {
    let mut last: Option<EventId> = None;
    let mut attempt: u32 = 0;
    loop {
        let mut query = vec![("max_chars", "200".to_string())];
        if let Some(k) = &kinds {
            query.push(("kinds", k.clone()));
        }
        let why = match client.sse("/v1/events", &query, last).await {
            Ok(resp) => {
                attempt = 0;
                if tx.send(Update::Link(Link::Live)).is_err() {
                    return;
                }
                let mut stream = resp.bytes_stream().eventsource();
                let mut why = "the server closed the stream".to_string();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(sse) => {
                            if let Message::Event { seq, event } =
                                follow::decode(&sse.id, &sse.data)
                            {
                                if let Some(seq) = seq {
                                    if last.is_some_and(|l| seq <= l) {
                                        continue;
                                    }
                                    last = Some(seq);
                                }
                                if tx.send(Update::Event(event)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            why = e.to_string();
                            break;
                        }
                    }
                }
                why
            }
            Err(e) => e.to_string(),
        };
        if tx.send(Update::Link(Link::Lost(why))).is_err() {
            return;
        }
        attempt = (attempt + 1).min(5);
        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
    }
}

/// Follows one agent's log for its open transcript.
async fn follow_transcript(client: Client, agent: JobId, tx: mpsc::UnboundedSender<Update>) {
    let mut last: Option<EventId> = None;
    for attempt in 0..5u32 {
        let query = [("follow", "true".to_string())];
        if let Ok(resp) = client
            .sse(&format!("/v1/agents/{agent}/logs"), &query, last)
            .await
        {
            let mut stream = resp.bytes_stream().eventsource();
            loop {
                match stream.next().await {
                    // The server ends the stream after the agent's last event.
                    None => return,
                    Some(Err(_)) => break,
                    Some(Ok(sse)) => {
                        if let Message::Event { seq, event } = follow::decode(&sse.id, &sse.data) {
                            if seq.is_some() {
                                last = seq;
                            }
                            if tx.send(Update::Transcript(agent, event)).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
}

async fn snapshots(client: Client, tx: mpsc::UnboundedSender<Update>) {
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let update = match client.cluster_status().await {
            Ok(s) => Update::Snapshot(Box::new(s)),
            Err(e) => Update::SnapshotFailed(e.to_string()),
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

/// Reads keys on a thread (crossterm's reads block) until `stop` is set.
fn read_keys(tx: mpsc::UnboundedSender<Update>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if !term::poll(Duration::from_millis(100)).unwrap_or(false) {
            continue;
        }
        let Ok(term::Event::Key(k)) = term::read() else {
            continue;
        };
        if k.kind == KeyEventKind::Release {
            continue;
        }
        let key = match k.code {
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
            KeyCode::Up => Key::Up,
            KeyCode::Down => Key::Down,
            KeyCode::PageUp => Key::PageUp,
            KeyCode::PageDown => Key::PageDown,
            KeyCode::Enter => Key::Enter,
            KeyCode::Esc | KeyCode::Left | KeyCode::Backspace => Key::Back,
            KeyCode::Char(c) => Key::Char(c),
            _ => continue,
        };
        if tx.send(Update::Key(key)).is_err() {
            return;
        }
    }
}

async fn interactive(
    client: Client,
    first: orch_shared::report::ClusterStatus,
) -> anyhow::Result<ExitCode> {
    let mut model = Model::new(client.server());
    model.apply_snapshot(first);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let keys = {
        let (tx, stop) = (tx.clone(), stop.clone());
        std::thread::spawn(move || read_keys(tx, stop))
    };
    let events = tokio::spawn(follow_events(client.clone(), Some(kinds()), tx.clone()));
    let refresh = tokio::spawn(snapshots(client.clone(), tx.clone()));
    let mut transcript: Option<tokio::task::JoinHandle<()>> = None;

    let mut terminal = ratatui::try_init()?;
    let mut redraw = tokio::time::interval(REDRAW_EVERY);
    let result: anyhow::Result<()> = async {
        loop {
            terminal.draw(|f| view::draw(f, &model, orch_shared::now_ms()))?;
            let update = tokio::select! {
                u = rx.recv() => match u { Some(u) => u, None => return Ok(()) },
                _ = redraw.tick() => continue,
            };
            match update {
                Update::Key(key) => match model.key(key) {
                    Command::Quit => return Ok(()),
                    Command::None => {}
                    Command::OpenTranscript(id) => {
                        if let Some(t) = transcript.take() {
                            t.abort();
                        }
                        transcript = Some(tokio::spawn(follow_transcript(
                            client.clone(),
                            id,
                            tx.clone(),
                        )));
                    }
                    Command::CloseTranscript => {
                        if let Some(t) = transcript.take() {
                            t.abort();
                        }
                    }
                    Command::Kill(id) => {
                        let (client, tx) = (client.clone(), tx.clone());
                        model.notice = Some(format!("killing agent {id}…"));
                        tokio::spawn(async move {
                            let r = client.kill(id).await.map(|_| ()).map_err(|e| e.to_string());
                            let _ = tx.send(Update::Killed(id, r));
                        });
                    }
                },
                Update::Event(event) => model.apply_event(&event),
                Update::Link(link) => model.link = link,
                Update::Snapshot(s) => model.apply_snapshot(*s),
                Update::SnapshotFailed(why) => {
                    model.notice = Some(format!("refresh failed: {why}"));
                }
                Update::Transcript(agent, event) => model.transcript_event(agent, &event),
                Update::Killed(id, r) => {
                    model.notice = Some(match r {
                        Ok(()) => format!("agent {id} killed"),
                        Err(e) => format!("could not kill agent {id}: {e}"),
                    });
                }
            }
        }
    }
    .await;
    ratatui::restore();
    stop.store(true, Ordering::Relaxed);
    events.abort();
    refresh.abort();
    if let Some(t) = transcript {
        t.abort();
    }
    let _ = keys.join();
    result?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_follows_every_kind_but_the_left_out_ones() {
        for k in LEFT_OUT {
            assert!(EventKind::VARIANTS.contains(&k), "{k} is no event kind");
        }
        let kinds = kinds();
        assert!(kinds.split(',').any(|k| k == "job_started"));
        assert!(!kinds.split(',').any(|k| LEFT_OUT.contains(&k)));
        assert_eq!(
            kinds.split(',').count(),
            EventKind::VARIANTS.len() - LEFT_OUT.len()
        );
    }
}
