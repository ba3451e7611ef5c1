//! Draws a [`Model`] with ratatui: a header with the cluster's numbers, the workers and their
//! slots, the agents that have not finished (selectable), recent failures and the keys; or, once
//! an agent is opened, its live transcript.

use super::model::{Link, Model};
use crate::output;
use orch_shared::api::JobStatus;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState, Wrap};

/// `■■■□ 3/4`.
pub fn slot_bar(busy: u32, slots: u32) -> String {
    let shown = slots.min(16);
    let filled = if slots == 0 {
        0
    } else {
        (busy.min(slots) * shown).div_ceil(slots)
    };
    let mut bar: String = "■".repeat(filled as usize);
    bar.push_str(&"□".repeat((shown - filled) as usize));
    format!("{bar} {busy}/{slots}")
}

/// A worker's busy slots: what its last heartbeat said, or more if more of the agents the
/// events show running are on it (heartbeats lag by a few seconds, events do not).
fn busy(model: &Model, worker: &orch_shared::api::Worker) -> u32 {
    let running = model
        .agents
        .iter()
        .filter(|a| {
            a.status == JobStatus::Running && a.worker.as_deref() == Some(worker.id.0.as_str())
        })
        .count() as u32;
    worker.busy.max(running).min(worker.slots.max(running))
}

fn header(model: &Model, now_ms: u64) -> Vec<Line<'static>> {
    let mut first = Vec::new();
    match &model.snapshot {
        Some(s) => {
            let queue = match &s.queue {
                Some(q) => format!("{} waiting · {} in flight", q.pending, q.in_flight),
                None => "unavailable".into(),
            };
            first.push(Span::raw(format!(
                "coordinators {} · workers {} · slots {}/{} busy · queue {queue} · dead letters {} · cost today {}",
                s.coordinators.len(),
                s.workers.len(),
                s.workers.iter().map(|w| busy(model, w)).sum::<u32>(),
                s.slots_total,
                s.dead_letters,
                output::cost(s.cost_today.cost_usd)
            )));
        }
        None => first.push(Span::raw("waiting for the first snapshot…")),
    }
    let link = match &model.link {
        Link::Live => Span::styled("● live", Style::default().fg(Color::Green)),
        Link::Connecting => Span::styled("○ connecting", Style::default().fg(Color::Yellow)),
        Link::Lost(why) => Span::styled(
            format!("○ reconnecting ({why})"),
            Style::default().fg(Color::Red),
        ),
    };
    let running = model
        .agents
        .iter()
        .filter(|a| a.status == JobStatus::Running)
        .count();
    let second = vec![
        link,
        Span::raw(format!(
            " · {running} running · {} waiting · {} UTC",
            model.agents.len() - running,
            crate::when::clock(now_ms).get(..8).unwrap_or_default()
        )),
    ];
    vec![Line::from(first), Line::from(second)]
}

fn workers_table(model: &Model, now_ms: u64) -> Table<'static> {
    let rows: Vec<Row<'static>> = model
        .snapshot
        .iter()
        .flat_map(|s| s.workers.iter())
        .map(|w| {
            Row::new(vec![
                w.id.to_string(),
                w.host.clone(),
                slot_bar(busy(model, w), w.slots),
                w.version.clone(),
                output::age(now_ms, w.last_seen_ms),
            ])
        })
        .collect();
    let count = rows.len();
    Table::new(
        rows,
        [
            Constraint::Fill(1),
            Constraint::Length(20),
            Constraint::Length(24),
            Constraint::Length(9),
            Constraint::Length(10),
        ],
    )
    .header(Row::new(["WORKER", "HOST", "SLOTS", "VERSION", "SEEN"]).style(bold()))
    .block(Block::bordered().title(format!(" Workers ({count}) ")))
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn agents_table(model: &Model, now_ms: u64) -> Table<'static> {
    let rows: Vec<Row<'static>> = model
        .agents
        .iter()
        .map(|a| {
            let mut status = a.status.as_str().to_string();
            if a.attempt > 1 {
                status.push_str(&format!(" #{}", a.attempt));
            }
            if a.waiting_for_input {
                status = "⏸ needs input".into();
            }
            let elapsed = a.started_at_ms.or(a.queued_at_ms).map_or_else(
                || "-".into(),
                |t| output::duration_ms(now_ms.saturating_sub(t)),
            );
            let style = match a.status {
                JobStatus::Running => Style::default().fg(Color::Green),
                JobStatus::Retrying => Style::default().fg(Color::Yellow),
                _ => Style::default(),
            };
            Row::new(vec![
                output::short_id(a.id),
                a.role.to_string(),
                status,
                a.activity.clone().unwrap_or_else(|| {
                    // Started before this view opened: busy, doing what the next event says.
                    if a.status == JobStatus::Running {
                        "working"
                    } else {
                        "-"
                    }
                    .into()
                }),
                a.worker.clone().unwrap_or_else(|| "-".into()),
                elapsed,
                output::count(a.tokens),
                output::cost(a.cost_usd),
                output::truncate(&a.prompt, 60),
            ])
            .style(style)
        })
        .collect();
    let count = rows.len();
    Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(13),
            Constraint::Length(16),
            Constraint::Length(20),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Fill(1),
        ],
    )
    .header(
        Row::new([
            "AGENT", "ROLE", "STATUS", "ACTIVITY", "WORKER", "ELAPSED", "TOKENS", "COST", "TASK",
        ])
        .style(bold()),
    )
    .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
    .highlight_symbol("▶ ")
    .block(Block::bordered().title(format!(" Agents ({count}) ")))
}

fn failures(model: &Model) -> Paragraph<'static> {
    let lines: Vec<Line<'static>> = if model.failures.is_empty() {
        vec![Line::raw("none")]
    } else {
        model
            .failures
            .iter()
            .map(|f| {
                Line::from(vec![
                    Span::raw(format!(
                        "{} ",
                        crate::when::clock(f.at_ms).get(..8).unwrap_or_default()
                    )),
                    Span::styled(
                        format!(
                            "{} {} ",
                            f.role.map_or("agent".into(), |r| r.to_string()),
                            output::short_id(f.id)
                        ),
                        bold(),
                    ),
                    Span::styled(
                        format!("failed ({})", f.reason),
                        Style::default().fg(Color::Red),
                    ),
                    Span::raw(if f.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", output::truncate(&f.message, 100))
                    }),
                ])
            })
            .collect()
    };
    Paragraph::new(lines).block(Block::bordered().title(" Recent failures "))
}

fn footer(model: &Model) -> Paragraph<'static> {
    let keys = if model.transcript.is_some() {
        "esc back · ↑↓ pgup pgdn scroll · k kill · m message · q quit"
    } else {
        "↑↓ select · enter transcript · k kill · m message · q quit"
    };
    let line = match &model.notice {
        Some(n) => Line::from(vec![
            Span::styled(n.clone(), Style::default().fg(Color::Yellow)),
            Span::raw(format!("  ·  {keys}")),
        ]),
        None => Line::raw(keys),
    };
    Paragraph::new(line)
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, model: &Model, now_ms: u64) {
    let area = frame.area();
    let title = format!(" orchestrator · {} ", model.server);
    if let Some(t) = &model.transcript {
        let [head, body, foot] = Layout::vertical([
            Constraint::Length(4),
            Constraint::Fill(1),
            Constraint::Length(1),
        ])
        .areas(area);
        frame.render_widget(
            Paragraph::new(header(model, now_ms)).block(Block::bordered().title(title)),
            head,
        );
        let status =
            model
                .agents
                .iter()
                .find(|a| a.id == t.agent)
                .map_or("ended".to_string(), |a| {
                    format!(
                        "{} · {}",
                        a.status.as_str(),
                        a.activity.clone().unwrap_or_else(|| "-".into())
                    )
                });
        let height = body.height.saturating_sub(2) as usize;
        let end = t.lines.len().saturating_sub(t.scroll_back);
        let start = end.saturating_sub(height);
        let lines: Vec<Line<'_>> = if t.lines.is_empty() {
            vec![Line::raw("(no events yet)")]
        } else {
            t.lines[start..end]
                .iter()
                .map(|l| Line::raw(l.as_str()))
                .collect()
        };
        frame.render_widget(
            Paragraph::new(lines)
                .wrap(Wrap { trim: false })
                .block(Block::bordered().title(format!(" {} · {status} ", t.title))),
            body,
        );
        frame.render_widget(footer(model), foot);
        return;
    }
    let workers = model.snapshot.as_ref().map_or(0, |s| s.workers.len()) as u16;
    let failures_h = (model.failures.len().max(1) as u16 + 2).min(8);
    let [head, wk, ag, fl, foot] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length((workers + 3).min(10)),
        Constraint::Fill(1),
        Constraint::Length(failures_h),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(
        Paragraph::new(header(model, now_ms)).block(Block::bordered().title(title)),
        head,
    );
    frame.render_widget(workers_table(model, now_ms), wk);
    let mut state = TableState::default();
    if !model.agents.is_empty() {
        state.select(Some(model.selected));
    }
    frame.render_stateful_widget(agents_table(model, now_ms), ag, &mut state);
    frame.render_widget(failures(model), fl);
    frame.render_widget(footer(model), foot);
}

/// Renders `model` into a `width`×`height` screen buffer and returns its lines (trailing
/// spaces removed): `watch --once`, and the tests.
pub fn render_text(model: &Model, now_ms: u64, width: u16, height: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let Ok(mut terminal) = ratatui::Terminal::new(backend);
    let _ = terminal.draw(|f| draw(f, model, now_ms));
    buffer_text(terminal.backend().buffer(), Rect::new(0, 0, width, height))
}

fn buffer_text(buffer: &ratatui::buffer::Buffer, area: Rect) -> String {
    let mut out = String::new();
    for y in area.top()..area.bottom() {
        let mut line = String::new();
        for x in area.left()..area.right() {
            if let Some(cell) = buffer.cell((x, y)) {
                line.push_str(cell.symbol());
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::{Command, Key};
    use super::*;
    use orch_shared::api::Worker;
    use orch_shared::event::{Event, EventKind};
    use orch_shared::ids::{JobId, TaskId, WorkerId};
    use orch_shared::job::{FailureReason, Usage};
    use orch_shared::report::{AgentSummary, ClusterStatus, CostToday, QueueInfo};
    use orch_shared::role::Role;

    const NOW: u64 = 1_767_225_600_000;

    fn agent(n: u128, role: Role, status: JobStatus) -> AgentSummary {
        AgentSummary {
            id: JobId::from_u128(n),
            task_id: TaskId::from_u128(1),
            step: 0,
            role,
            status,
            attempt: 1,
            worker_id: (status == JobStatus::Running).then(|| WorkerId("worker-7".into())),
            backend: Default::default(),
            model: None,
            queued_at_ms: Some(NOW - 5_000),
            started_at_ms: (status == JobStatus::Running).then_some(NOW - 3_000),
            finished_at_ms: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            error: None,
            task_prompt: "add a cache to the parser".into(),
            parked: None,
        }
    }

    fn snapshot() -> ClusterStatus {
        ClusterStatus {
            version: "0.1.0".into(),
            now_ms: NOW,
            coordinators: vec![],
            workers: vec![Worker {
                id: WorkerId("worker-7".into()),
                host: "box".into(),
                slots: 4,
                busy: 1,
                version: "0.1.0".into(),
                started_at_ms: NOW - 60_000,
                last_seen_ms: NOW - 1_000,
                backends: vec!["sim".into()],
            }],
            slots_total: 4,
            slots_busy: 1,
            queue: Some(QueueInfo {
                pending: 1,
                in_flight: 1,
                redelivered: 0,
            }),
            backends: vec![],
            dead_letters: 2,
            active_tasks: 1,
            active_agents: vec![
                agent(1, Role::Builder, JobStatus::Running),
                agent(2, Role::Tester, JobStatus::Queued),
            ],
            recent_failures: vec![],
            cost_today: CostToday {
                cost_usd: 0.25,
                ..Default::default()
            },
        }
    }

    fn ev(job: u128, kind: EventKind) -> Event {
        Event {
            task_id: TaskId::from_u128(1),
            job_id: Some(JobId::from_u128(job)),
            attempt: 1,
            at_ms: NOW,
            kind,
        }
    }

    #[test]
    fn the_screen_shows_workers_slots_agents_activity_and_cost() {
        let mut m = Model::new("http://127.0.0.1:7070");
        m.apply_snapshot(snapshot());
        m.link = Link::Live;
        m.apply_event(&ev(
            1,
            EventKind::ToolCall {
                call_id: "c".into(),
                name: "Read".into(),
                input: "{}".into(),
            },
        ));
        m.apply_event(&ev(
            1,
            EventKind::Usage {
                usage: Usage {
                    input_tokens: 1000,
                    output_tokens: 234,
                    ..Default::default()
                },
                cost_usd: 0.0123,
            },
        ));
        let screen = render_text(&m, NOW, 140, 30);
        for needle in [
            "orchestrator · http://127.0.0.1:7070",
            "workers 1 · slots 1/4 busy · queue 1 waiting · 1 in flight · dead letters 2",
            "cost today $0.2500",
            "● live",
            "worker-7",
            "■□□□ 1/4",
            "builder",
            "tool: Read",
            "1,234",
            "$0.0123",
            "tester",
            "queued",
            "add a cache to the parser",
            "Recent failures",
            "enter transcript",
        ] {
            assert!(screen.contains(needle), "missing `{needle}` in\n{screen}");
        }
        // The running agent is listed first, and selected.
        assert!(screen.contains("▶ 00000001 builder"), "{screen}");
        let (builder, tester) = (
            screen.find("builder").unwrap(),
            screen.find("tester").unwrap(),
        );
        assert!(builder < tester, "{screen}");
    }

    #[test]
    fn failures_show_up_and_finished_agents_leave() {
        let mut m = Model::new("s");
        m.apply_snapshot(snapshot());
        m.apply_event(&ev(
            1,
            EventKind::JobFinished {
                success: false,
                reason: Some(FailureReason::Timeout),
                message: Some("job timed out after 1s".into()),
                usage: Usage::default(),
                cost_usd: 0.0,
                duration_ms: 1000,
            },
        ));
        m.apply_event(&ev(
            1,
            EventKind::JobDeadLettered {
                reason: FailureReason::Timeout,
            },
        ));
        m.apply_event(&ev(
            2,
            EventKind::JobFinished {
                success: true,
                reason: None,
                message: None,
                usage: Usage::default(),
                cost_usd: 0.0,
                duration_ms: 1000,
            },
        ));
        assert!(m.agents.is_empty());
        let screen = render_text(&m, NOW, 120, 24);
        assert!(screen.contains("builder"), "{screen}");
        assert!(
            screen.contains("failed (timeout): job timed out after 1s"),
            "{screen}"
        );
        assert!(screen.contains("Agents (0)"), "{screen}");
    }

    #[test]
    fn keys_open_a_transcript_ask_before_killing_and_explain_messages() {
        let mut m = Model::new("s");
        m.apply_snapshot(snapshot());
        let first = m.agents[0].id;
        assert_eq!(m.key(Key::Down), Command::None);
        assert_eq!(m.selected, 1);
        assert_eq!(m.key(Key::Up), Command::None);
        assert_eq!(m.key(Key::Enter), Command::OpenTranscript(first));
        m.transcript_event(first, &ev(1, EventKind::Thinking));
        let screen = render_text(&m, NOW, 100, 20);
        assert!(screen.contains("Builder Agent"), "{screen}");
        assert!(screen.contains("thinking…"), "{screen}");
        assert_eq!(m.key(Key::Char('k')), Command::None);
        assert!(m.notice.as_deref().unwrap().contains("press y"));
        assert_eq!(m.key(Key::Char('y')), Command::Kill(first));
        assert_eq!(m.key(Key::Char('m')), Command::None);
        assert!(m.notice.as_deref().unwrap().contains("not available yet"));
        assert_eq!(m.key(Key::Back), Command::CloseTranscript);
        assert!(m.transcript.is_none());
        assert_eq!(m.key(Key::Char('q')), Command::Quit);
    }

    #[test]
    fn slot_bars_fill_with_the_busy_share() {
        assert_eq!(slot_bar(0, 4), "□□□□ 0/4");
        assert_eq!(slot_bar(3, 4), "■■■□ 3/4");
        assert_eq!(slot_bar(1, 0), " 1/0");
    }
}
