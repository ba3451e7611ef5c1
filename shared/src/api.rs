//! JSON bodies of the coordinator's HTTP API (`/v1/...`), used by the coordinator and `orchctl`.
//!
//! [`Task`] and [`Job`] are also the records the coordinator keeps: what a client reads is what
//! is stored, so the two can never drift apart.

use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{Backend, FailureReason, SimParams, Usage, Workspace};
use crate::role::Role;
use serde::{Deserialize, Serialize};

/// How the jobs of a task run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One after another, each with its predecessor's forward context.
    #[default]
    Sequential,
    /// All at once, sharing nothing.
    Parallel,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Parallel => "parallel",
        }
    }
}

/// `POST /v1/tasks`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// What the user wants done.
    pub prompt: String,
    /// `auto` (keyword roles) or a template family; see `GET /v1/task-types`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// A custom workflow: these roles in this order (overrides `task_type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<Role>>,
    /// A second submit with the same key returns the first task instead of creating another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Shapes the `sim` backend for this task (latency, failure rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim: Option<SimParams>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Running,
    Completed,
    Failed,
}

impl TaskStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for the jobs before it.
    Pending,
    /// Published to the work queue.
    Queued,
    /// A worker runs it.
    Running,
    Succeeded,
    Failed,
    /// Will not run because a job before it failed.
    Skipped,
}

impl JobStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Skipped
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Skipped => "skipped",
        }
    }
}

/// Why a job failed, as shown to users.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub reason: FailureReason,
    pub message: String,
}

/// One agent job of a task (`GET /v1/tasks/{id}` lists them in plan order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub step: u32,
    pub role: Role,
    pub status: JobStatus,
    pub attempt: u32,
    pub prompt: String,
    /// The forward context this agent received from the one before it.
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub worker_id: Option<WorkerId>,
    #[serde(default)]
    pub queued_at_ms: Option<u64>,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<JobError>,
    #[serde(default)]
    pub files_read: Vec<String>,
    #[serde(default)]
    pub files_written: Vec<String>,
}

/// A task and its jobs (`GET /v1/tasks/{id}`, and the reply to `POST /v1/tasks`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub prompt: String,
    /// What the user asked for (`auto`, a template family, or `custom` for explicit roles).
    pub task_type: String,
    /// The template or rule that produced the plan, e.g. `feature_implementation` or `auto`.
    pub plan_source: String,
    pub mode: Mode,
    pub status: TaskStatus,
    pub backend: Backend,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub workspace: Workspace,
    #[serde(default)]
    pub sim: SimParams,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    pub jobs: Vec<Job>,
    /// Summed over all jobs.
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub cost_usd: f64,
    /// The jobs' outputs, in plan order, each headed by its agent.
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Task {
    /// Wall-clock time from creation to the end (or to `now_ms` while running).
    pub fn elapsed_ms(&self, now_ms: u64) -> u64 {
        self.finished_at_ms
            .unwrap_or(now_ms)
            .saturating_sub(self.created_at_ms)
    }

    /// The summary row used by `GET /v1/tasks`.
    pub fn summary(&self) -> TaskSummary {
        TaskSummary {
            id: self.id,
            prompt: self.prompt.clone(),
            task_type: self.task_type.clone(),
            mode: self.mode,
            status: self.status,
            roles: self.jobs.iter().map(|j| j.role).collect(),
            jobs_done: self.jobs.iter().filter(|j| j.status.is_terminal()).count() as u32,
            usage: self.usage,
            cost_usd: self.cost_usd,
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
        }
    }
}

/// One row of `GET /v1/tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub id: TaskId,
    pub prompt: String,
    pub task_type: String,
    pub mode: Mode,
    pub status: TaskStatus,
    pub roles: Vec<Role>,
    pub jobs_done: u32,
    pub usage: Usage,
    pub cost_usd: f64,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
}

/// `GET /v1/tasks?limit=N&before=CURSOR`: newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One registered worker (`GET /v1/workers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub host: String,
    pub slots: u32,
    pub busy: u32,
    pub version: String,
    pub started_at_ms: u64,
    pub last_seen_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// `GET /readyz`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub nats: bool,
    pub redis: bool,
    pub version: String,
}

/// One entry of `GET /v1/task-types`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskType {
    pub name: String,
    pub description: String,
}
