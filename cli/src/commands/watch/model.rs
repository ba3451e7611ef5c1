//! What `watch` shows, as a pure state machine: seeded and re-synchronised by snapshots
//! (`GET /v1/status`), moved by the cluster's events (`GET /v1/events`) and by keys. No IO, so
//! it is tested without a terminal or a cluster.

use orch_shared::api::JobStatus;
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::{AgentSummary, ClusterStatus};
use orch_shared::role::Role;
use std::collections::VecDeque;

/// Failures kept on screen.
const MAX_FAILURES: usize = 10;
/// Transcript lines kept per open transcript.
const MAX_TRANSCRIPT_LINES: usize = 5_000;

/// One agent that has not finished.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRow {
    pub id: JobId,
    pub task_id: TaskId,
    pub role: Role,
    pub status: JobStatus,
    pub attempt: u32,
    pub worker: Option<String>,
    /// What it is doing now: `thinking`, `tool: Read`, `writing`.
    pub activity: Option<String>,
    pub queued_at_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub tokens: u64,
    pub cost_usd: f64,
    pub prompt: String,
    /// The agent asked a question and waits for an answer. No backend can do that yet (it
    /// comes with multi-turn sessions); the view already flags it.
    pub waiting_for_input: bool,
}

impl AgentRow {
    fn from_summary(a: &AgentSummary) -> Self {
        Self {
            id: a.id,
            task_id: a.task_id,
            role: a.role,
            status: a.status,
            attempt: a.attempt,
            worker: a.worker_id.as_ref().map(ToString::to_string),
            activity: None,
            queued_at_ms: a.queued_at_ms,
            started_at_ms: a.started_at_ms,
            tokens: a.usage.total(),
            cost_usd: a.cost_usd,
            prompt: a.task_prompt.clone(),
            waiting_for_input: false,
        }
    }

    fn new(id: JobId, task_id: TaskId, role: Role) -> Self {
        Self {
            id,
            task_id,
            role,
            status: JobStatus::Queued,
            attempt: 0,
            worker: None,
            activity: None,
            queued_at_ms: None,
            started_at_ms: None,
            tokens: 0,
            cost_usd: 0.0,
            prompt: String::new(),
            waiting_for_input: false,
        }
    }

    /// Display order: running, then waiting for a retry, queued, pending.
    fn rank(&self) -> u8 {
        match self.status {
            JobStatus::Running => 0,
            JobStatus::Retrying => 1,
            JobStatus::Queued => 2,
            _ => 3,
        }
    }
}

/// A failed agent.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureRow {
    pub at_ms: u64,
    pub id: JobId,
    pub role: Option<Role>,
    pub reason: String,
    pub message: String,
}

/// The open transcript of one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Transcript {
    pub agent: JobId,
    pub title: String,
    pub lines: Vec<String>,
    /// Lines scrolled up from the bottom (0: follow the end).
    pub scroll_back: usize,
}

/// Whether the event stream is connected.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    Connecting,
    Live,
    Lost(String),
}

/// What a key asks the loop to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    None,
    Quit,
    OpenTranscript(JobId),
    CloseTranscript,
    Kill(JobId),
}

/// The keys `watch` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    PageUp,
    PageDown,
    Enter,
    Back,
    Quit,
    Char(char),
}

#[derive(Clone, Debug)]
pub struct Model {
    pub server: String,
    pub snapshot: Option<ClusterStatus>,
    pub agents: Vec<AgentRow>,
    pub failures: VecDeque<FailureRow>,
    pub selected: usize,
    pub transcript: Option<Transcript>,
    /// The agent a kill waits to be confirmed for.
    pub confirm_kill: Option<JobId>,
    /// A one-line message at the bottom (cleared by the next key).
    pub notice: Option<String>,
    pub link: Link,
}

impl Model {
    pub fn new(server: &str) -> Self {
        Self {
            server: server.to_string(),
            snapshot: None,
            agents: vec![],
            failures: VecDeque::new(),
            selected: 0,
            transcript: None,
            confirm_kill: None,
            notice: None,
            link: Link::Connecting,
        }
    }

    pub fn selected_agent(&self) -> Option<&AgentRow> {
        self.agents.get(self.selected)
    }

    fn sort(&mut self) {
        let selected = self.selected_agent().map(|a| a.id);
        self.agents.sort_by(|a, b| {
            a.rank()
                .cmp(&b.rank())
                .then(
                    a.started_at_ms
                        .or(a.queued_at_ms)
                        .cmp(&b.started_at_ms.or(b.queued_at_ms)),
                )
                .then(a.id.cmp(&b.id))
        });
        // The selection follows its agent when rows move.
        if let Some(id) = selected
            && let Some(i) = self.agents.iter().position(|a| a.id == id)
        {
            self.selected = i;
        }
        self.selected = self.selected.min(self.agents.len().saturating_sub(1));
    }

    /// Replaces the cluster picture with a snapshot; what events said about an agent's current
    /// activity is kept.
    pub fn apply_snapshot(&mut self, status: ClusterStatus) {
        let mut rows: Vec<AgentRow> = status
            .active_agents
            .iter()
            .map(AgentRow::from_summary)
            .collect();
        for row in &mut rows {
            if let Some(old) = self.agents.iter().find(|a| a.id == row.id) {
                if row.status == JobStatus::Running && old.status == JobStatus::Running {
                    row.activity = old.activity.clone();
                }
                // Usage events are newer than the record, which only counts finished attempts.
                if old.tokens > row.tokens {
                    row.tokens = old.tokens;
                    row.cost_usd = old.cost_usd;
                }
            }
        }
        self.agents = rows;
        self.failures = status
            .recent_failures
            .iter()
            .map(|a| FailureRow {
                at_ms: a.finished_at_ms.unwrap_or(0),
                id: a.id,
                role: Some(a.role),
                reason: a
                    .error
                    .as_ref()
                    .map_or("failed".into(), |e| e.reason.as_str().to_string()),
                message: a
                    .error
                    .as_ref()
                    .map_or(String::new(), |e| e.message.clone()),
            })
            .collect();
        self.snapshot = Some(status);
        self.sort();
    }

    fn row(&mut self, event: &Event, role: Option<Role>) -> Option<&mut AgentRow> {
        let id = event.job_id?;
        if let Some(i) = self.agents.iter().position(|a| a.id == id) {
            return self.agents.get_mut(i);
        }
        let role = role?;
        self.agents.push(AgentRow::new(id, event.task_id, role));
        self.agents.last_mut()
    }

    fn remove(&mut self, id: JobId) {
        self.agents.retain(|a| a.id != id);
    }

    /// Folds one cluster event in.
    pub fn apply_event(&mut self, event: &Event) {
        match &event.kind {
            EventKind::JobQueued { role, .. } => {
                if let Some(r) = self.row(event, Some(*role)) {
                    r.status = JobStatus::Queued;
                    r.activity = None;
                    r.queued_at_ms = Some(event.at_ms);
                }
            }
            EventKind::JobStarted {
                worker_id, role, ..
            } => {
                if let Some(r) = self.row(event, Some(*role)) {
                    r.status = JobStatus::Running;
                    r.worker = Some(worker_id.to_string());
                    r.activity = Some("starting".into());
                    r.started_at_ms = Some(event.at_ms);
                    r.attempt = event.attempt;
                    r.tokens = 0;
                    r.cost_usd = 0.0;
                }
            }
            EventKind::Thinking | EventKind::ToolResult { .. } => {
                self.activity(event, "thinking".into())
            }
            EventKind::Text { .. } => self.activity(event, "writing".into()),
            EventKind::ToolCall { name, .. } => self.activity(event, format!("tool: {name}")),
            EventKind::Usage { usage, cost_usd } => {
                if let Some(r) = self.row(event, None) {
                    r.tokens = usage.total();
                    r.cost_usd = *cost_usd;
                }
            }
            EventKind::JobFinished {
                success,
                reason,
                message,
                ..
            } => {
                let Some(id) = event.job_id else { return };
                if *success {
                    self.remove(id);
                } else {
                    let role = self.agents.iter().find(|a| a.id == id).map(|a| a.role);
                    self.failures.push_front(FailureRow {
                        at_ms: event.at_ms,
                        id,
                        role,
                        reason: reason.map_or("failed".into(), |r| r.as_str().to_string()),
                        message: message.clone().unwrap_or_default(),
                    });
                    self.failures.truncate(MAX_FAILURES);
                    if let Some(r) = self.row(event, None) {
                        r.activity = Some("failed".into());
                    }
                }
            }
            EventKind::JobRetrying { next_attempt, .. } => {
                if let Some(r) = self.row(event, None) {
                    r.status = JobStatus::Retrying;
                    r.activity = Some(format!("attempt {next_attempt} soon"));
                }
            }
            EventKind::JobCancelled { .. }
            | EventKind::JobSkipped { .. }
            | EventKind::JobDeadLettered { .. } => {
                if let Some(id) = event.job_id {
                    self.remove(id);
                }
            }
            EventKind::TaskFinished { .. } => {
                self.agents.retain(|a| a.task_id != event.task_id);
            }
            _ => {}
        }
        self.sort();
    }

    fn activity(&mut self, event: &Event, what: String) {
        if let Some(r) = self.row(event, None) {
            r.status = JobStatus::Running;
            r.activity = Some(what);
        }
    }

    /// Handles a key; returns what the loop must do.
    pub fn key(&mut self, key: Key) -> Command {
        self.notice = None;
        if let Some(id) = self.confirm_kill.take() {
            return match key {
                Key::Char('y') | Key::Char('Y') => Command::Kill(id),
                _ => {
                    self.notice = Some("kill cancelled".into());
                    Command::None
                }
            };
        }
        let in_transcript = self.transcript.is_some();
        match key {
            Key::Quit | Key::Char('q') => Command::Quit,
            Key::Back if in_transcript => {
                self.transcript = None;
                Command::CloseTranscript
            }
            Key::Back => Command::None,
            Key::Up | Key::PageUp if in_transcript => {
                let step = if key == Key::PageUp { 20 } else { 1 };
                if let Some(t) = &mut self.transcript {
                    t.scroll_back = (t.scroll_back + step).min(t.lines.len());
                }
                Command::None
            }
            Key::Down | Key::PageDown if in_transcript => {
                let step = if key == Key::PageDown { 20 } else { 1 };
                if let Some(t) = &mut self.transcript {
                    t.scroll_back = t.scroll_back.saturating_sub(step);
                }
                Command::None
            }
            Key::Up | Key::PageUp => {
                self.selected = self.selected.saturating_sub(1);
                Command::None
            }
            Key::Down | Key::PageDown => {
                if self.selected + 1 < self.agents.len() {
                    self.selected += 1;
                }
                Command::None
            }
            Key::Enter if !in_transcript => match self.selected_agent() {
                Some(a) => {
                    let id = a.id;
                    self.transcript = Some(Transcript {
                        agent: id,
                        title: format!("{} {}", a.role.agent_name(), id),
                        lines: vec![],
                        scroll_back: 0,
                    });
                    Command::OpenTranscript(id)
                }
                None => {
                    self.notice = Some("no agent selected".into());
                    Command::None
                }
            },
            Key::Char('k') => {
                let target = match &self.transcript {
                    Some(t) => Some(t.agent),
                    None => self.selected_agent().map(|a| a.id),
                };
                match target {
                    Some(id) => {
                        self.confirm_kill = Some(id);
                        self.notice = Some(format!("kill agent {id}? press y to confirm"));
                    }
                    None => self.notice = Some("no agent selected".into()),
                }
                Command::None
            }
            Key::Char('m') => {
                self.notice = Some(
                    "sending a message to an agent is not available yet (it comes with multi-turn sessions)"
                        .into(),
                );
                Command::None
            }
            _ => Command::None,
        }
    }

    /// Adds an event of `agent`'s own log (`GET /v1/agents/{id}/logs`, complete, where the
    /// cluster stream shortens text) to its open transcript.
    pub fn transcript_event(&mut self, agent: JobId, event: &Event) {
        let Some(line) = crate::commands::logs::line(event, 0, false) else {
            return;
        };
        let lines: Vec<String> = line.lines().map(str::to_string).collect();
        if let Some(t) = &mut self.transcript
            && t.agent == agent
        {
            t.lines.extend(lines);
            let excess = t.lines.len().saturating_sub(MAX_TRANSCRIPT_LINES);
            t.lines.drain(..excess);
        }
    }
}
