//! The live progress panel of `submit --follow`.
//!
//! [`Panel`] is a pure state machine: it is seeded with the submitted [`Task`], folds in each
//! [`Event`] of the task's log and renders to a `String`, so it is tested without a terminal.
//! [`View`] draws it on stderr with indicatif when stderr is a terminal, and otherwise prints one
//! plain line per notable event.

use crate::output;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orch_shared::api::{JobStatus, Task};
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::role::Role;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StepState {
    Pending,
    Queued,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Retrying,
    Cancelled,
    Parked,
}

impl StepState {
    fn from_job(status: JobStatus) -> Self {
        match status {
            JobStatus::Pending => StepState::Pending,
            JobStatus::Queued => StepState::Queued,
            JobStatus::Running => StepState::Running,
            JobStatus::Succeeded => StepState::Succeeded,
            JobStatus::Failed => StepState::Failed,
            JobStatus::Skipped => StepState::Skipped,
            JobStatus::Retrying => StepState::Retrying,
            JobStatus::Cancelled => StepState::Cancelled,
            JobStatus::Parked => StepState::Parked,
        }
    }

    fn marker(&self) -> char {
        match self {
            StepState::Succeeded => '✓',
            StepState::Running => '→',
            StepState::Pending | StepState::Queued => '○',
            StepState::Failed => '✗',
            StepState::Skipped => '-',
            StepState::Retrying => '↻',
            StepState::Cancelled => '⊘',
            StepState::Parked => '‖',
        }
    }
}

#[derive(Clone, Debug)]
struct Step {
    job_id: JobId,
    role: Role,
    state: StepState,
    attempt: u32,
    worker: Option<String>,
    /// What the agent is doing right now ("thinking", "using Read", "writing").
    activity: Option<String>,
    duration_ms: Option<u64>,
    /// Cost of the attempts that ended.
    cost_done: f64,
    /// Cost so far of the attempt that runs.
    cost_running: f64,
    error: Option<String>,
    skip_reason: Option<String>,
}

impl Step {
    fn new(job_id: JobId, role: Role) -> Self {
        Self {
            job_id,
            role,
            state: StepState::Pending,
            attempt: 0,
            worker: None,
            activity: None,
            duration_ms: None,
            cost_done: 0.0,
            cost_running: 0.0,
            error: None,
            skip_reason: None,
        }
    }

    fn cost(&self) -> f64 {
        self.cost_done + self.cost_running
    }

    /// Moves to `attempt` if it is newer; returns false for an event of an older attempt, which
    /// must not overwrite what the current one shows.
    fn observe_attempt(&mut self, attempt: u32) -> bool {
        if attempt == 0 || attempt == self.attempt {
            return true;
        }
        if attempt < self.attempt {
            return false;
        }
        self.attempt = attempt;
        self.cost_running = 0.0;
        self.error = None;
        self.duration_ms = None;
        true
    }
}

/// How the task ended, from its `task_finished` event.
#[derive(Clone, Debug)]
struct Finished {
    status: String,
    cost_usd: f64,
    duration_ms: u64,
}

/// The state behind the progress display.
#[derive(Clone, Debug)]
pub struct Panel {
    task_id: TaskId,
    mode: String,
    status: String,
    created_at_ms: u64,
    steps: Vec<Step>,
    finished: Option<Finished>,
    /// A transient message (a dropped connection), cleared by the next event.
    notice: Option<String>,
}

impl Panel {
    /// Seeds the panel with the task as the submit returned it. Only the plan and the statuses
    /// are taken: the event stream replays the task's log from its start, so attempts and costs
    /// taken from the record would be counted twice.
    pub fn new(task: &Task) -> Self {
        let steps = task
            .jobs
            .iter()
            .map(|job| Step {
                state: StepState::from_job(job.status),
                worker: job.worker_id.as_ref().map(ToString::to_string),
                ..Step::new(job.id, job.role)
            })
            .collect();
        Self {
            task_id: task.id,
            mode: task.mode.as_str().to_string(),
            status: task.status.as_str().to_string(),
            created_at_ms: task.created_at_ms,
            steps,
            finished: None,
            notice: None,
        }
    }

    /// The status the `task_finished` event announced (`completed`, `failed`).
    pub fn finished_status(&self) -> Option<&str> {
        self.finished.as_ref().map(|f| f.status.as_str())
    }

    /// Shows `notice` until the next event (e.g. "connection lost, reconnecting").
    pub fn set_notice(&mut self, notice: impl Into<String>) {
        self.notice = Some(notice.into());
    }

    fn step_index(&mut self, job_id: Option<JobId>, role: Option<Role>) -> Option<usize> {
        let job_id = job_id?;
        if let Some(i) = self.steps.iter().position(|s| s.job_id == job_id) {
            return Some(i);
        }
        // A job the submit reply did not list yet: append it if we know its role.
        let role = role?;
        self.steps.push(Step::new(job_id, role));
        Some(self.steps.len() - 1)
    }

    /// `[2/3] Builder Agent`.
    fn label(&self, i: usize) -> String {
        format!(
            "[{}/{}] {}",
            i + 1,
            self.steps.len(),
            self.steps[i].role.agent_name()
        )
    }

    /// Folds one event in. Returns a one-line description when the event is notable (a plan, a
    /// job starting or ending, the task ending), for terminals that cannot show the live panel.
    pub fn apply(&mut self, event: &Event) -> Option<String> {
        self.notice = None;
        let role_hint = match &event.kind {
            EventKind::JobQueued { role, .. } | EventKind::JobStarted { role, .. } => Some(*role),
            _ => None,
        };
        match &event.kind {
            EventKind::TaskCreated { mode, steps } => {
                self.mode = mode.clone();
                for s in steps {
                    self.step_index(Some(s.job_id), Some(s.role));
                }
                let roles: Vec<Role> = self.steps.iter().map(|s| s.role).collect();
                return Some(format!(
                    "task {}: {} step(s), {}: {}",
                    self.task_id,
                    self.steps.len(),
                    self.mode,
                    output::roles(&roles)
                ));
            }
            EventKind::TaskPlanned {
                source,
                steps,
                rejected,
            } => {
                for s in steps {
                    self.step_index(Some(s.job_id), Some(s.role));
                }
                let roles: Vec<Role> = steps.iter().map(|s| s.role).collect();
                return Some(match rejected {
                    Some(why) => format!(
                        "planner's plan rejected ({why}); using {source}: {}",
                        output::roles(&roles)
                    ),
                    None => format!("planned by the planner agent: {}", output::roles(&roles)),
                });
            }
            EventKind::TaskFinished {
                status,
                cost_usd,
                duration_ms,
                ..
            } => {
                self.status = status.clone();
                self.finished = Some(Finished {
                    status: status.clone(),
                    cost_usd: *cost_usd,
                    duration_ms: *duration_ms,
                });
                for step in &mut self.steps {
                    step.activity = None;
                }
                return Some(format!(
                    "task {} {status} in {} ({})",
                    self.task_id,
                    output::duration_ms(*duration_ms),
                    output::cost(*cost_usd)
                ));
            }
            EventKind::PrOpened { .. }
            | EventKind::PrReady { .. }
            | EventKind::PrFailed { .. }
            | EventKind::PrReviewed { .. }
            | EventKind::PrEscalated { .. } => {
                return Some(crate::commands::logs::describe_pr(&event.kind));
            }
            _ => {}
        }

        let i = self.step_index(event.job_id, role_hint)?;
        if !self.steps[i].observe_attempt(event.attempt) {
            return None;
        }
        let label = self.label(i);
        let step = &mut self.steps[i];
        match &event.kind {
            EventKind::JobQueued { .. } => {
                step.state = StepState::Queued;
                step.activity = None;
                None
            }
            EventKind::JobStarted { worker_id, .. } => {
                self.status = "running".into();
                step.state = StepState::Running;
                step.worker = Some(worker_id.to_string());
                step.activity = Some("starting".into());
                let retry = if step.attempt > 1 {
                    format!(" (attempt {})", step.attempt)
                } else {
                    String::new()
                };
                Some(format!("{label} started on {worker_id}{retry}"))
            }
            EventKind::Thinking | EventKind::ToolResult { .. } => {
                step.mark_running("thinking");
                None
            }
            EventKind::Text { .. } => {
                step.mark_running("writing");
                None
            }
            EventKind::ToolCall { name, .. } => {
                step.mark_running(&format!("using {name}"));
                None
            }
            EventKind::Usage { cost_usd, .. } => {
                step.cost_running = *cost_usd;
                None
            }
            EventKind::Compacted { .. } => {
                step.mark_running("compacting its context");
                None
            }
            EventKind::Heartbeat
            | EventKind::Checkpointed { .. }
            | EventKind::McpServer { .. }
            | EventKind::SandboxRefused { .. } => None,
            EventKind::ApprovalRequested {
                id, tool, summary, ..
            } => {
                step.mark_running(&format!("waiting for approval of {tool}"));
                Some(format!(
                    "{label} needs you: {tool} ({}) — `orchctl approvals approve {id}` or `deny {id}`",
                    output::truncate(summary, 80)
                ))
            }
            EventKind::ApprovalAnswered {
                id, decision, by, ..
            } => {
                step.mark_running("thinking");
                Some(format!("{label}: request {id} {decision} ({by})"))
            }
            EventKind::Resumed { from_step, .. } => {
                step.mark_running(&format!("resumed after step {from_step}"));
                None
            }
            EventKind::ResumeFailed { .. } => {
                step.mark_running("starting over");
                None
            }
            EventKind::CheckpointSkipped { tree_bytes, .. } => Some(format!(
                "{label}: not checkpointed (the workspace takes {tree_bytes} bytes, over the bound)"
            )),
            EventKind::JobFinished {
                success,
                reason,
                message,
                cost_usd,
                duration_ms,
                ..
            } => {
                step.activity = None;
                step.duration_ms = Some(*duration_ms);
                step.cost_done += cost_usd;
                step.cost_running = 0.0;
                if *success {
                    step.state = StepState::Succeeded;
                    Some(format!(
                        "{label} done in {} ({})",
                        output::duration_ms(*duration_ms),
                        output::cost(*cost_usd)
                    ))
                } else {
                    step.state = StepState::Failed;
                    let reason = reason.map(|r| r.as_str()).unwrap_or("failed");
                    let error = match message.as_deref().filter(|m| !m.is_empty()) {
                        Some(m) => format!("{reason}: {}", output::truncate(m, 120)),
                        None => reason.to_string(),
                    };
                    step.error = Some(error.clone());
                    Some(format!("{label} failed ({error})"))
                }
            }
            EventKind::JobSkipped { reason } => {
                step.state = StepState::Skipped;
                step.activity = None;
                step.skip_reason = Some(reason.clone()).filter(|r| !r.is_empty());
                Some(format!("{label} skipped: {reason}"))
            }
            EventKind::JobRetrying {
                reason,
                next_attempt,
                retry_at_ms,
                ..
            } => {
                step.state = StepState::Retrying;
                step.activity = None;
                let wait = retry_at_ms.saturating_sub(event.at_ms);
                Some(format!(
                    "{label} will retry (attempt {next_attempt}) in {} after {}",
                    output::duration_ms(wait),
                    reason.as_str()
                ))
            }
            EventKind::JobWaiting { reason } => {
                step.activity = Some(format!("waiting: {reason}"));
                Some(format!("{label} waits: {reason}"))
            }
            EventKind::JobParked { parked } => {
                step.state = StepState::Parked;
                step.activity = Some(format!("parked: {}", parked.summary()));
                Some(format!(
                    "{label} parked ({}): it holds no worker and runs on {}",
                    parked.summary(),
                    if parked.approval.is_some() {
                        "once the request is answered"
                    } else {
                        "at the reset"
                    }
                ))
            }
            EventKind::JobCancelled { reason } => {
                step.state = StepState::Cancelled;
                step.activity = None;
                Some(format!("{label} cancelled: {reason}"))
            }
            EventKind::JobDeadLettered { reason } => Some(format!(
                "{label} failed for good ({}); see `orchctl dlq list`",
                reason.as_str()
            )),
            EventKind::ConflictWarning { .. } => Some(format!(
                "{label}: {}",
                crate::commands::logs::describe_conflict(&event.kind)
            )),
            EventKind::TaskCreated { .. }
            | EventKind::TaskPlanned { .. }
            | EventKind::TaskFinished { .. }
            | EventKind::PrOpened { .. }
            | EventKind::PrReady { .. }
            | EventKind::PrFailed { .. }
            | EventKind::PrReviewed { .. }
            | EventKind::PrEscalated { .. } => None,
        }
    }

    /// Renders the panel: a header, one line per step, the current agents and the totals.
    pub fn render(&self, now_ms: u64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "task {} · {} · {}",
            self.task_id, self.mode, self.status
        );
        let name_width = self
            .steps
            .iter()
            .map(|s| s.role.agent_name().chars().count())
            .max()
            .unwrap_or(0);
        for (i, step) in self.steps.iter().enumerate() {
            let detail = match step.state {
                StepState::Pending => "pending".to_string(),
                StepState::Queued => "queued".to_string(),
                StepState::Running => {
                    let mut d = step.activity.clone().unwrap_or_else(|| "running".into());
                    if let Some(w) = &step.worker {
                        let _ = write!(d, " · {w}");
                    }
                    if step.attempt > 1 {
                        let _ = write!(d, " · attempt {}", step.attempt);
                    }
                    d
                }
                StepState::Succeeded => format!(
                    "done in {} · {}",
                    step.duration_ms
                        .map(output::duration_ms)
                        .unwrap_or_else(|| "-".into()),
                    output::cost(step.cost())
                ),
                StepState::Failed => match &step.error {
                    Some(e) => format!("failed: {e}"),
                    None => "failed".to_string(),
                },
                StepState::Skipped => match &step.skip_reason {
                    Some(r) => format!("skipped: {r}"),
                    None => "skipped".to_string(),
                },
                StepState::Retrying => match &step.error {
                    Some(e) => format!("retrying after: {e}"),
                    None => "retrying".to_string(),
                },
                StepState::Cancelled => "cancelled".to_string(),
                StepState::Parked => match &step.activity {
                    Some(a) => a.clone(),
                    None => "parked".to_string(),
                },
            };
            let _ = writeln!(
                out,
                "  {} {}. {:<name_width$}  {}",
                step.state.marker(),
                i + 1,
                step.role.agent_name(),
                detail
            );
        }

        if self.finished.is_none() {
            let current: Vec<String> = self
                .steps
                .iter()
                .filter(|s| s.state == StepState::Running)
                .map(|s| {
                    format!(
                        "{} ({})",
                        s.role.agent_name(),
                        s.activity.as_deref().unwrap_or("running")
                    )
                })
                .collect();
            let current = if !current.is_empty() {
                current.join(", ")
            } else if self.steps.iter().any(|s| s.state == StepState::Queued) {
                "waiting for a worker".to_string()
            } else if self.steps.is_empty() {
                "planning".to_string()
            } else {
                "-".to_string()
            };
            let _ = writeln!(out, "  current: {current}");
        }

        let count = |state: StepState| self.steps.iter().filter(|s| s.state == state).count();
        let (cost, elapsed) = match &self.finished {
            Some(f) => (f.cost_usd, f.duration_ms),
            None => (
                self.steps.iter().map(Step::cost).sum(),
                now_ms.saturating_sub(self.created_at_ms),
            ),
        };
        let mut totals = format!(
            "  agents: {} active · {} completed",
            count(StepState::Running),
            count(StepState::Succeeded)
        );
        let failed = count(StepState::Failed);
        if failed > 0 {
            let _ = write!(totals, " · {failed} failed");
        }
        let _ = write!(
            totals,
            " · {} total · cost {} · elapsed {}",
            self.steps.len(),
            output::cost(cost),
            output::duration_ms(elapsed)
        );
        out.push_str(&totals);
        if let Some(notice) = &self.notice {
            let _ = write!(out, "\n  {notice}");
        }
        out
    }
}

impl Step {
    fn mark_running(&mut self, activity: &str) {
        if !matches!(
            self.state,
            StepState::Succeeded | StepState::Failed | StepState::Skipped
        ) {
            self.state = StepState::Running;
        }
        self.activity = Some(activity.to_string());
    }
}

/// Draws a [`Panel`] on stderr.
pub enum View {
    /// A live panel (stderr is a terminal).
    Live(ProgressBar),
    /// One line per notable event (stderr is a file or a pipe).
    Plain,
}

impl View {
    /// A live view when stderr is a terminal, plain lines otherwise.
    pub fn stderr() -> Self {
        if !std::io::stderr().is_terminal() {
            return View::Plain;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner:.cyan} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(100));
        View::Live(bar)
    }

    /// Redraws the live panel (a no-op for plain output).
    pub fn draw(&self, panel: &Panel, now_ms: u64) {
        if let View::Live(bar) = self {
            bar.set_message(fit_to_terminal(&panel.render(now_ms)));
        }
    }

    /// Reports a notable event: plain output prints it, the live panel already shows it.
    pub fn note(&self, line: &str) {
        if let View::Plain = self {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }

    /// Removes the live panel and leaves its final state on stderr.
    pub fn finish(&self, panel: &Panel, now_ms: u64) {
        if let View::Live(bar) = self {
            bar.finish_and_clear();
            let _ = writeln!(std::io::stderr(), "{}\n", panel.render(now_ms));
        }
    }

    /// Removes the live panel without leaving anything behind.
    pub fn clear(&self) {
        if let View::Live(bar) = self {
            bar.finish_and_clear();
        }
    }

    /// Stops the live panel as it is on screen, without drawing again. Used on Ctrl-C: the
    /// terminal's `^C` echo moved the cursor, so a redraw or a clear would land a line off.
    pub fn abandon(&self) {
        if let View::Live(bar) = self {
            bar.set_draw_target(ProgressDrawTarget::hidden());
            bar.abandon();
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Cuts every line to the terminal's width: a wrapped line would break the panel's redraw.
fn fit_to_terminal(text: &str) -> String {
    let (_, cols) = console::Term::stderr().size();
    // The spinner and its space take two columns on the first line.
    let width = usize::from(cols).saturating_sub(2).max(20);
    text.lines()
        .map(|line| console::truncate_str(line, width, "…").into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::api::{Job, Mode};
    use orch_shared::event::StepInfo;
    use orch_shared::ids::WorkerId;
    use orch_shared::job::{Backend, FailureReason, SimParams, Usage, Workspace};

    const T0: u64 = 1_700_000_000_000;

    fn job(n: u128, role: Role) -> Job {
        Job {
            id: JobId::from_u128(n),
            attempt: 0,
            ..Job::pending(n as u32, role, String::new(), vec![])
        }
    }

    fn task(jobs: Vec<Job>) -> Task {
        Task {
            id: TaskId::from_u128(0xabc),
            prompt: "build it".into(),
            task_type: "auto".into(),
            plan_source: "auto".into(),
            mode: Mode::Sequential,
            status: orch_shared::api::TaskStatus::Pending,
            backend: Backend::Sim,
            model: None,
            backends: Default::default(),
            models: Default::default(),
            workspace: Workspace::Scratch,
            sim: SimParams::default(),
            idempotency_key: None,
            tenant: None,
            options: Default::default(),
            plan: Default::default(),
            created_at_ms: T0,
            finished_at_ms: None,
            jobs,
            usage: Usage::default(),
            cost_usd: 0.0,
            output: None,
            error: None,
            branch: None,
            mcp_servers: Default::default(),
            check: None,
            pr: None,
            conflicts: vec![],
            trace_id: None,
            traceparent: None,
        }
    }

    fn ev(job: Option<u128>, attempt: u32, at: u64, kind: EventKind) -> Event {
        Event {
            task_id: TaskId::from_u128(0xabc),
            job_id: job.map(JobId::from_u128),
            attempt,
            at_ms: T0 + at,
            kind,
        }
    }

    fn started(role: Role, worker: &str) -> EventKind {
        EventKind::JobStarted {
            worker_id: WorkerId(worker.into()),
            role,
            backend: "sim".into(),
            model: None,
            delivery: 1,
            started_at_us: 0,
            sandbox: None,
        }
    }

    fn finished(success: bool, cost: f64, ms: u64) -> EventKind {
        EventKind::JobFinished {
            success,
            reason: (!success).then_some(FailureReason::Timeout),
            message: (!success).then(|| "took too long".to_string()),
            usage: Usage::default(),
            cost_usd: cost,
            duration_ms: ms,
        }
    }

    #[test]
    fn panel_shows_steps_activity_counts_cost_and_elapsed() {
        let mut p = Panel::new(&task(vec![]));
        let plan = p.apply(&ev(
            None,
            0,
            0,
            EventKind::TaskCreated {
                mode: "sequential".into(),
                steps: vec![
                    StepInfo {
                        job_id: JobId::from_u128(1),
                        role: Role::Analyst,
                    },
                    StepInfo {
                        job_id: JobId::from_u128(2),
                        role: Role::Builder,
                    },
                    StepInfo {
                        job_id: JobId::from_u128(3),
                        role: Role::Tester,
                    },
                ],
            },
        ));
        assert_eq!(
            plan.as_deref(),
            Some(
                "task 00000000-0000-0000-0000-000000000abc: 3 step(s), sequential: analyst,builder,tester"
            )
        );
        p.apply(&ev(
            Some(1),
            1,
            10,
            EventKind::JobQueued {
                role: Role::Analyst,
                step: 0,
            },
        ));
        p.apply(&ev(Some(1), 1, 20, started(Role::Analyst, "local-0")));
        p.apply(&ev(Some(1), 1, 30, EventKind::Thinking));
        p.apply(&ev(
            Some(1),
            1,
            40,
            EventKind::Usage {
                usage: Usage::default(),
                cost_usd: 0.001,
            },
        ));
        let done = p.apply(&ev(Some(1), 1, 2_100, finished(true, 0.0012, 2_080)));
        assert_eq!(
            done.as_deref(),
            Some("[1/3] Analyst Agent done in 2.1s ($0.0012)")
        );
        p.apply(&ev(Some(2), 1, 2_200, started(Role::Builder, "local-1")));
        p.apply(&ev(
            Some(2),
            1,
            2_300,
            EventKind::ToolCall {
                call_id: "c1".into(),
                name: "Read".into(),
                input: "{}".into(),
            },
        ));
        p.apply(&ev(
            Some(2),
            1,
            2_400,
            EventKind::Usage {
                usage: Usage::default(),
                cost_usd: 0.0008,
            },
        ));

        assert_eq!(
            p.render(T0 + 12_300),
            "task 00000000-0000-0000-0000-000000000abc · sequential · running\n\
             \x20 ✓ 1. Analyst Agent  done in 2.1s · $0.0012\n\
             \x20 → 2. Builder Agent  using Read · local-1\n\
             \x20 ○ 3. Tester Agent   pending\n\
             \x20 current: Builder Agent (using Read)\n\
             \x20 agents: 1 active · 1 completed · 3 total · cost $0.0020 · elapsed 12.3s"
        );
    }

    #[test]
    fn failures_skips_and_the_end_of_the_task_are_shown() {
        let mut p = Panel::new(&task(vec![job(1, Role::Builder), job(2, Role::Reviewer)]));
        p.apply(&ev(Some(1), 1, 0, started(Role::Builder, "w")));
        let failed = p.apply(&ev(Some(1), 1, 500, finished(false, 0.5, 500)));
        assert_eq!(
            failed.as_deref(),
            Some("[1/2] Builder Agent failed (timeout: took too long)")
        );
        let skipped = p.apply(&ev(
            Some(2),
            0,
            600,
            EventKind::JobSkipped {
                reason: "step 1 failed".into(),
            },
        ));
        assert_eq!(
            skipped.as_deref(),
            Some("[2/2] Reviewer Agent skipped: step 1 failed")
        );
        let end = p.apply(&ev(
            None,
            0,
            700,
            EventKind::TaskFinished {
                status: "failed".into(),
                usage: Usage::default(),
                cost_usd: 0.5,
                duration_ms: 700,
                pr_pending: false,
            },
        ));
        assert_eq!(
            end.as_deref(),
            Some("task 00000000-0000-0000-0000-000000000abc failed in 700ms ($0.5000)")
        );
        assert_eq!(p.finished_status(), Some("failed"));
        assert_eq!(
            p.render(T0 + 99_000),
            "task 00000000-0000-0000-0000-000000000abc · sequential · failed\n\
             \x20 ✗ 1. Builder Agent   failed: timeout: took too long\n\
             \x20 - 2. Reviewer Agent  skipped: step 1 failed\n\
             \x20 agents: 0 active · 0 completed · 1 failed · 2 total · cost $0.5000 · elapsed 700ms"
        );
    }

    #[test]
    fn a_retry_replaces_the_failed_attempt_and_keeps_its_cost() {
        let mut p = Panel::new(&task(vec![job(1, Role::Builder)]));
        p.apply(&ev(Some(1), 1, 0, started(Role::Builder, "w1")));
        p.apply(&ev(Some(1), 1, 10, finished(false, 0.25, 10)));
        let line = p.apply(&ev(Some(1), 2, 20, started(Role::Builder, "w2")));
        assert_eq!(
            line.as_deref(),
            Some("[1/1] Builder Agent started on w2 (attempt 2)")
        );
        // A late event of the first attempt does not disturb the second.
        p.apply(&ev(Some(1), 1, 30, EventKind::Text { text: "x".into() }));
        p.apply(&ev(Some(1), 2, 40, EventKind::Text { text: "y".into() }));
        let text = p.render(T0 + 1_000);
        assert!(
            text.contains("→ 1. Builder Agent  writing · w2 · attempt 2"),
            "{text}"
        );
        assert!(text.contains("cost $0.2500"), "{text}");
    }

    #[test]
    fn queued_steps_wait_for_a_worker_and_notices_clear_on_the_next_event() {
        let mut p = Panel::new(&task(vec![job(1, Role::Analyst)]));
        p.apply(&ev(
            Some(1),
            1,
            0,
            EventKind::JobQueued {
                role: Role::Analyst,
                step: 0,
            },
        ));
        p.set_notice("connection lost, reconnecting");
        let text = p.render(T0 + 500);
        assert!(text.contains("current: waiting for a worker"), "{text}");
        assert!(text.ends_with("connection lost, reconnecting"), "{text}");
        p.apply(&ev(Some(1), 1, 600, EventKind::Heartbeat));
        assert!(!p.render(T0 + 700).contains("reconnecting"));
    }

    #[test]
    fn events_for_jobs_the_submit_did_not_list_add_steps() {
        let mut p = Panel::new(&task(vec![]));
        assert!(p.render(T0).contains("current: planning"));
        p.apply(&ev(
            Some(9),
            1,
            0,
            EventKind::JobQueued {
                role: Role::Documenter,
                step: 0,
            },
        ));
        // Without a role there is nothing to show.
        assert_eq!(p.apply(&ev(Some(8), 1, 0, EventKind::Thinking)), None);
        assert!(p.render(T0).contains("○ 1. Documenter Agent  queued"));
    }
}
