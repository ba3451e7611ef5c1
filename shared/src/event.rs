//! The per-task event log. The coordinator and the workers append [`Event`]s to one JetStream
//! stream (subject `orch.events.<task>.<kind>`); clients replay it as server-sent events, and a
//! reconnecting client resumes from the stream sequence it saw last.

use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{FailureReason, Usage};
use crate::role::Role;
use serde::{Deserialize, Serialize};

/// One entry of a task's event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub task_id: TaskId,
    /// Set for job events; `None` for task-level events.
    #[serde(default)]
    pub job_id: Option<JobId>,
    #[serde(default)]
    pub attempt: u32,
    pub at_ms: u64,
    pub kind: EventKind,
}

/// A planned step as announced in [`EventKind::TaskCreated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepInfo {
    pub job_id: JobId,
    pub role: Role,
}

/// What happened. Task-level kinds come from the coordinator, job-level kinds from the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The task was accepted with this plan.
    TaskCreated { mode: String, steps: Vec<StepInfo> },
    /// The planner agent's plan was accepted (or, with `rejected`, the rules' plan replaced it):
    /// these steps were added to the task.
    TaskPlanned {
        source: String,
        steps: Vec<StepInfo>,
        rejected: Option<String>,
    },
    /// A job is ready but waits: the cluster is at its cap, a rate limit or the daily budget
    /// holds it back. It is dispatched as soon as that clears (sent once per wait).
    JobWaiting { reason: String },
    /// A job was published to the work queue.
    JobQueued { role: Role, step: u32 },
    /// A job will not run (a step it depends on failed, or the budget ran out).
    JobSkipped { reason: String },
    /// A job attempt failed with a retryable error; the next attempt is due at `retry_at_ms`.
    JobRetrying {
        reason: FailureReason,
        message: String,
        next_attempt: u32,
        retry_at_ms: u64,
    },
    /// A job was stopped by a user or a task deadline; it is never redelivered.
    JobCancelled { reason: String },
    /// A job failed for good and went to the dead-letter set.
    JobDeadLettered { reason: FailureReason },
    /// A worker started the agent.
    JobStarted {
        worker_id: WorkerId,
        role: Role,
        backend: String,
        model: Option<String>,
        delivery: u64,
    },
    /// The agent is thinking (no output yet).
    Thinking,
    /// Text the agent produced.
    Text { text: String },
    /// The agent called a tool.
    ToolCall {
        call_id: String,
        name: String,
        input: String,
    },
    /// A tool answered.
    ToolResult {
        call_id: String,
        output: String,
        is_error: bool,
    },
    /// Token usage so far for this job (cumulative).
    Usage { usage: Usage, cost_usd: f64 },
    /// The job is still running (sent with every in-progress ack).
    Heartbeat,
    /// The job attempt ended.
    JobFinished {
        success: bool,
        reason: Option<FailureReason>,
        message: Option<String>,
        usage: Usage,
        cost_usd: f64,
        duration_ms: u64,
    },
    /// The task ended.
    TaskFinished {
        status: String,
        usage: Usage,
        cost_usd: f64,
        duration_ms: u64,
    },
}

impl EventKind {
    /// The last token of the event's subject.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::TaskCreated { .. } => "task_created",
            EventKind::TaskPlanned { .. } => "task_planned",
            EventKind::JobWaiting { .. } => "job_waiting",
            EventKind::JobQueued { .. } => "job_queued",
            EventKind::JobSkipped { .. } => "job_skipped",
            EventKind::JobRetrying { .. } => "job_retrying",
            EventKind::JobCancelled { .. } => "job_cancelled",
            EventKind::JobDeadLettered { .. } => "job_dead_lettered",
            EventKind::JobStarted { .. } => "job_started",
            EventKind::Thinking => "thinking",
            EventKind::Text { .. } => "text",
            EventKind::ToolCall { .. } => "tool_call",
            EventKind::ToolResult { .. } => "tool_result",
            EventKind::Usage { .. } => "usage",
            EventKind::Heartbeat => "heartbeat",
            EventKind::JobFinished { .. } => "job_finished",
            EventKind::TaskFinished { .. } => "task_finished",
        }
    }

    /// Whether this event ends the task's log.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::TaskFinished { .. })
    }
}
