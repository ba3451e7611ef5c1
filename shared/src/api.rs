//! JSON bodies of the coordinator's HTTP API (`/v1/...`), used by the coordinator and `orchctl`.
//!
//! [`Task`] and [`Job`] are also the records the coordinator keeps: what a client reads is what
//! is stored, so the two can never drift apart.

use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{Backend, FailureReason, JobKind, SimParams, Usage, Workspace};
use crate::plan::PlanSpec;
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How the jobs of a task run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Backends per role, over `backend` for the roles named (e.g. the planner on
    /// `claude-code`, builders on `openai`): one plan mixing backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<BTreeMap<Role, Backend>>,
    /// Models per role, over `model` for the roles named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<BTreeMap<Role, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Shapes the `sim` backend for this task (latency, failure rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sim: Option<SimParams>,
    /// `llm`: a planner agent writes the plan (falling back to the rules when its plan is not
    /// valid); `rules` (default): templates and keywords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planner: Option<Planner>,
    /// A plan written by the user (overrides `task_type` and `roles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanSpec>,
    /// What a failed step does to the rest: `stop` (default) or `continue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// Attempts per job for retryable failures (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Most jobs of this task running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<u64>,
    /// Wall-clock limit of one job attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_timeout_ms: Option<u64>,
    /// Wall-clock limit of the whole task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_timeout_ms: Option<u64>,
    /// Most turns an agent may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    /// Which waiting jobs go first when the cluster is at its cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// A git repository the agents work in (a clone per job; see [`crate::job::GitJob`]).
    /// Excludes `workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The branch, tag or commit of `repo` to start from (default `HEAD`).
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// MCP servers by name, whose tools the agents of the `anthropic` and `openai` backends
    /// may call (as `mcp__<name>__<tool>`, under their role's tool rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<BTreeMap<String, crate::job::McpServer>>,
    /// A shell command (e.g. `cargo test`) run in the sandbox on the task branch once every
    /// agent is done; a failure goes back to the agent whose change broke it. Needs `repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// How many times the check may run (1 to 10, default 3): after the last failure the
    /// task fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_rounds: Option<u32>,
    /// Open a pull request from the task branch to `ref` when the task completes (needs `repo`
    /// and a forge configured on the coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr: Option<PrRequest>,
    /// Hold a step whose file scope (`paths` in its plan step) overlaps a running step's
    /// until that one ends, instead of only warning (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialize_conflicts: Option<bool>,
    /// Check out only the directories of each step's file scope (`paths` in its plan step)
    /// and the top-level files instead of the whole tree (a git sparse checkout; steps without
    /// `paths` get the whole tree). Default: the worker's `workspace.sparse`. Needs `repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_checkout: Option<bool>,
}

/// `pr` in a submit request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrRequest {
    /// The repository on the forge, `owner/name` (default: the last two parts of `repo`'s URL
    /// or path, without `.git`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Labels for the pull request (added to the forge's configured labels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// With a check command: open the pull request as a draft as soon as the check starts
    /// and mark it ready for review when the check passes (default: the forge's `draft`
    /// setting). Without a check it changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<bool>,
}

/// The answer of `POST /v1/tasks/{id}/pr/sync` and of the forge webhook: what the sync did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrSync {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// What happened, in one sentence (`opened pull request #3: …`, `review round 1: …`,
    /// `escalated: …`, or why nothing was done).
    pub outcome: String,
    /// The task's pull request afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr: Option<PullRequest>,
}

/// A task's pull request: what was asked for, what the forge answered, and the state of its
/// review loop. Written only by the coordinator, like the rest of the task record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PullRequest {
    /// `owner/name` on the forge.
    pub repo: String,
    /// The branch the pull request merges into.
    pub base: String,
    /// The task branch, `orch/<task-id>`.
    pub head: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Set once the pull request exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Review rounds sent back to the agents so far.
    #[serde(default)]
    pub rounds: u32,
    /// Every head commit a review round was started for (a head is never reviewed twice).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reviewed_heads: Vec<String>,
    /// The highest review comment id already handed to an agent.
    #[serde(default)]
    pub last_comment_id: u64,
    /// Fingerprints of the findings handed to agents (path and normalized text), to see one
    /// come back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// Set when the review loop stopped and asks a person (why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalated: Option<String>,
    /// The last error of the forge while opening the pull request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Opened as a draft while the task's check runs, marked ready when it passes (decided
    /// at submit: a check command and `pr.draft`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draft_while_checking: bool,
    /// The pull request is a draft on the forge now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draft: bool,
}

/// `POST /v1/agents/{id}/send` and `POST /v1/agents/{id}/fork`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentMessage {
    /// The user's next message to the agent.
    pub message: String,
}

/// The reply to `send` and `fork`: the new turn runs as a new agent of the same task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentTurn {
    pub task_id: TaskId,
    /// The agent that runs the new turn.
    pub agent_id: JobId,
    /// The agent whose session it continues.
    pub from: JobId,
    pub fork: bool,
    /// A rewind: the new agent starts from `from`'s checkpoint after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewound_to: Option<u32>,
}

/// `POST /v1/agents/{id}/rewind`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRewind {
    /// The step whose checkpoint the new agent starts from (see
    /// `GET /v1/agents/{id}/checkpoints`).
    pub to: u32,
    /// The new agent's next message (default: a note that it was rewound to that step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Dispatch priority of a task's jobs (used when the cluster-wide cap is reached).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    Default,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// The default, which the wire leaves out.
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// Who plans a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Planner {
    #[default]
    Rules,
    Llm,
}

/// What a failed step does to the steps that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Skip every step that depends on the failed one (directly or not).
    #[default]
    Stop,
    /// Run the dependents anyway (without the failed step's context).
    Continue,
}

/// How a task runs, with defaults applied (stored with the task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecutionOptions {
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub max_parallel: Option<u32>,
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub budget_tokens: Option<u64>,
    #[serde(default)]
    pub job_timeout_ms: Option<u64>,
    #[serde(default)]
    pub task_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_turns: Option<u32>,
    #[serde(default)]
    pub priority: Priority,
    /// A step whose file scope overlaps a running step's waits for it to end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serialize_conflicts: bool,
    /// A step with a file scope checks out only its directories and the top-level files
    /// (`None`: as the worker's `workspace.sparse` says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse_checkout: Option<bool>,
}

fn default_attempts() -> u32 {
    3
}

impl Default for ExecutionOptions {
    fn default() -> Self {
        Self {
            on_failure: OnFailure::Stop,
            max_attempts: default_attempts(),
            max_parallel: None,
            budget_usd: None,
            budget_tokens: None,
            job_timeout_ms: None,
            task_timeout_ms: None,
            max_turns: None,
            priority: Priority::Normal,
            serialize_conflicts: false,
            sparse_checkout: None,
        }
    }
}

/// What the planner said about its plan.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanInfo {
    #[serde(default)]
    pub complexity: Option<String>,
    #[serde(default)]
    pub rationale: Option<String>,
    #[serde(default)]
    pub skip_reasoning: Option<String>,
}

/// A task's status. The strum derives give its names (`as_str`, `FromStr`, `VARIANTS`) from
/// the same spelling as serde's.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    pub fn as_str(&self) -> &'static str {
        self.into()
    }
}

/// A job's (agent's) status; names derived as for [`TaskStatus`].
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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
    /// Failed with a retryable error; waits for its next attempt (`retry_at_ms`).
    Retrying,
    /// Stopped by a user (cancel or kill); never redelivered.
    Cancelled,
    /// Holds no worker: it waits for a provider's usage limit to reset or for a person's
    /// answer to an approval request (`parked` says which), then runs on from its checkpoint.
    Parked,
}

/// Why a job is parked (`status: parked`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Parked {
    /// `limit` (every credential of its pool is at its usage limit) or `approval` (its agent
    /// waits for a person's answer).
    pub reason: String,
    /// `limit`: the credential it waits for, `<backend>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// When it runs again at the latest (ms since the epoch): the credential's reset, or the
    /// approval request's deadline.
    pub until_ms: u64,
    /// `approval`: the request it waits for (`orchctl approvals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
}

impl Parked {
    /// One line: `approval <id>` or `limit <backend>/<name>`.
    pub fn summary(&self) -> String {
        match (&self.approval, &self.credential) {
            (Some(id), _) => format!("{} {id}", self.reason),
            (None, Some(c)) => format!("{} {c}", self.reason),
            (None, None) => self.reason.clone(),
        }
    }
}

impl JobStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Skipped | JobStatus::Cancelled
        )
    }

    pub fn as_str(&self) -> &'static str {
        self.into()
    }
}

/// Why a job failed, as shown to users.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    pub reason: FailureReason,
    pub message: String,
}

/// One agent job of a task (`GET /v1/tasks/{id}` lists them in plan order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: JobId,
    pub step: u32,
    pub role: Role,
    /// `plan` for the planner agent's job, whose answer becomes the rest of the plan.
    #[serde(default)]
    pub kind: JobKind,
    pub status: JobStatus,
    pub attempt: u32,
    pub prompt: String,
    /// Steps (by index) that must succeed before this one starts.
    #[serde(default)]
    pub depends_on: Vec<u32>,
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub estimated_tokens: Option<u64>,
    /// When the next attempt is due (status `retrying`).
    #[serde(default)]
    pub retry_at_ms: Option<u64>,
    /// The forward context this agent received from the ones before it.
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub worker_id: Option<WorkerId>,
    /// What the agent's sandbox allowed (from the job's start); `None` without a sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
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
    /// The model the agent ran on, when the backend reported it.
    #[serde(default)]
    pub model: Option<String>,
    /// Window use of the agent's last request (tokens of `context_window`): how full its
    /// context really was, not cumulative tokens.
    #[serde(default)]
    pub context_tokens: Option<u64>,
    #[serde(default)]
    pub context_window: Option<u64>,
    /// This agent continues another one's conversation (a `send`, or a `fork` when `forked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues: Option<JobId>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forked: bool,
    /// A rewind: this agent started from `continues`' checkpoint after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewound_to: Option<u32>,
    /// The backend's conversation id, when the agent's session is stored in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// What the agent changed, as a unified diff (see [`crate::job::MAX_DIFF_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// For a git workspace: the branch and commit the agent pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<crate::job::GitOutcome>,
    /// Why the job is parked (status `parked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<Parked>,
    /// The file scope its plan step declared: globs of the paths it intends to edit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// While it runs: the paths it changed so far, as its worker last reported them
    /// (relative to the repository's root). With `paths`, its path lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_paths: Vec<String>,
    /// A step held back by `serialize_conflicts`: the running job its scope overlaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<JobId>,
}

impl Job {
    /// A new agent job, pending, first attempt, with everything a run fills in empty.
    pub fn pending(step: u32, role: Role, prompt: String, depends_on: Vec<u32>) -> Job {
        Job {
            id: JobId::new(),
            step,
            role,
            kind: JobKind::Agent,
            status: JobStatus::Pending,
            attempt: 1,
            prompt,
            depends_on,
            constraints: vec![],
            estimated_tokens: None,
            retry_at_ms: None,
            context: None,
            worker_id: None,
            sandbox: None,
            queued_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            usage: Default::default(),
            cost_usd: 0.0,
            output: None,
            error: None,
            files_read: vec![],
            files_written: vec![],
            model: None,
            context_tokens: None,
            context_window: None,
            continues: None,
            forked: false,
            rewound_to: None,
            paths: vec![],
            changed_paths: vec![],
            held_by: None,
            session_id: None,
            diff: None,
            git: None,
            parked: None,
        }
    }
}

/// A task and its jobs (`GET /v1/tasks/{id}`, and the reply to `POST /v1/tasks`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Backends per role, over `backend` (see [`Task::backend_of`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<Role, Backend>,
    /// Models per role, over `model` (see [`Task::model_of`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<Role, String>,
    #[serde(default)]
    pub workspace: Workspace,
    #[serde(default)]
    pub sim: SimParams,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The tenant whose token submitted the task (`None`: an admin token, or no tenants).
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub options: ExecutionOptions,
    #[serde(default)]
    pub plan: PlanInfo,
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
    /// For a git workspace: the task branch holding the agents' merged work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The OpenTelemetry trace the task's spans belong to (32 hex digits), when the coordinator
    /// exports traces (`[telemetry] otlp_endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The W3C `traceparent` of the submit's span: every job's dispatch span is its child, on
    /// whichever coordinator dispatches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The pull request asked for with `pr`, and what became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr: Option<PullRequest>,
    /// The MCP servers the task declared (see [`SubmitTask::mcp_servers`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mcp_servers: BTreeMap<String, crate::job::McpServer>,
    /// The task's check command and how it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckReport>,
    /// Overlapping edits of agents that ran at the same time, as they were seen (each pair of
    /// agents and path once; see [`ConflictWarning`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictWarning>,
}

/// Two running agents of a task touch the same paths: `job` changed `paths` that `other`
/// changed too (`same_file`) or that are inside `other`'s declared scope (`scope`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConflictWarning {
    /// The agent whose change was seen last.
    pub job: JobId,
    pub role: Role,
    /// The agent it overlaps with.
    pub other: JobId,
    pub other_role: Role,
    /// `same_file` or `scope`.
    pub kind: String,
    pub paths: Vec<String>,
    pub at_ms: u64,
}

/// A task's check command (`check` on submit) and its outcome so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckReport {
    pub command: String,
    /// Most runs of the check.
    pub max_rounds: u32,
    /// Runs so far.
    #[serde(default)]
    pub rounds: u32,
    /// The last run's verdict (`None`: it has not run yet).
    #[serde(default)]
    pub passed: Option<bool>,
    /// The end of the last run's output (stdout and stderr together).
    #[serde(default)]
    pub output_tail: String,
    /// The agents a failure was sent back to, one per failed round.
    #[serde(default)]
    pub blamed: Vec<JobId>,
}

impl Task {
    /// Whether the task completed and its pull request still has a step to take (open it, or
    /// mark its draft ready), which an earlier failure does not hold back (`pr.error`: only
    /// `orchctl pr sync` tries again). Its outcome is the end of a followed event stream.
    pub fn pr_pending(&self) -> bool {
        self.status == TaskStatus::Completed
            && self
                .pr
                .as_ref()
                .is_some_and(|p| p.error.is_none() && (p.number.is_none() || p.draft))
    }

    /// The backend the jobs of `role` run on: the role's, else the task's.
    pub fn backend_of(&self, role: Role) -> Backend {
        self.backends.get(&role).copied().unwrap_or(self.backend)
    }

    /// The model the jobs of `role` ask for: the role's, else the task's (else the worker
    /// picks one).
    pub fn model_of(&self, role: Role) -> Option<&str> {
        self.models
            .get(&role)
            .or(self.model.as_ref())
            .map(String::as_str)
    }

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
            pr_url: self.pr.as_ref().and_then(|p| p.url.clone()),
        }
    }
}

/// One row of `GET /v1/tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The task's pull request, once it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,
}

/// `GET /v1/tasks?limit=N&before=CURSOR`: newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One registered worker (`GET /v1/workers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Worker {
    pub id: WorkerId,
    pub host: String,
    pub slots: u32,
    pub busy: u32,
    pub version: String,
    pub started_at_ms: u64,
    pub last_seen_ms: u64,
    /// The backends whose jobs this worker pulls (wire names); empty for a worker older
    /// than routing by backend, which pulls only the pre-routing queue.
    #[serde(default)]
    pub backends: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// `GET /readyz`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub nats: bool,
    pub redis: bool,
    /// This coordinator holds the leader lease (dispatches and takes writes).
    #[serde(default)]
    pub leader: bool,
    /// Redis holds the cluster's state: a leader set it up, or rebuilt it from the log after
    /// Redis was wiped. Until then the replica is not ready (a task read then could miss).
    #[serde(default)]
    pub state: bool,
    pub version: String,
}

/// One entry of `GET /v1/task-types`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskType {
    pub name: String,
    pub description: String,
}

/// `GET /v1/quotas`: every credential the workers registered with the limit broker, and the
/// jobs parked waiting for one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaList {
    pub now_ms: u64,
    pub credentials: Vec<Quota>,
    /// Parked job attempts in all.
    pub parked: u64,
}

/// One credential of a backend's pool (its name only: a key never leaves a worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quota {
    pub backend: String,
    pub name: String,
    /// `exhausted` until `until_ms`, else `ok`.
    pub state: String,
    #[serde(default)]
    pub until_ms: Option<u64>,
    /// Why it was last exhausted.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub requests_limit: Option<u64>,
    #[serde(default)]
    pub requests_remaining: Option<u64>,
    #[serde(default)]
    pub tokens_limit: Option<u64>,
    #[serde(default)]
    pub tokens_remaining: Option<u64>,
    /// When the window figures reset.
    #[serde(default)]
    pub reset_ms: Option<u64>,
    /// Times a provider said it is at its limit.
    pub exhausted_total: u64,
    /// Job attempts parked waiting for it.
    pub parked: u64,
}

/// `GET /v1/dlq`: jobs that failed for good, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetterList {
    pub jobs: Vec<DeadLetterEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetterEntry {
    pub job_id: JobId,
    pub task_id: TaskId,
    pub role: Role,
    pub attempt: u32,
    #[serde(default)]
    pub error: Option<JobError>,
    pub dead_at_ms: u64,
}

/// Where an estimate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EstimateSource {
    /// Finished jobs of the same role and model (median and p90).
    History,
    /// The plan's `estimated_tokens`, priced at list prices.
    Planner,
    /// Nothing to go on yet.
    None,
}

/// Expected cost and duration of one step or of the whole task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    pub source: EstimateSource,
    #[serde(default)]
    pub samples: usize,
    pub cost_usd_p50: f64,
    pub cost_usd_p90: f64,
    #[serde(default)]
    pub duration_ms_p50: Option<u64>,
    #[serde(default)]
    pub duration_ms_p90: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepEstimate {
    pub step: u32,
    pub role: Role,
    /// The backend the step runs on.
    #[serde(default)]
    pub backend: Backend,
    /// The model the step asks for (`None`: the worker's choice for the role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub depends_on: Vec<u32>,
    pub instruction: String,
    pub estimate: Estimate,
    /// The step's file scope (globs of the paths it intends to edit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// `POST /v1/tasks/dry-run`: the plan a submit would run and what it should cost; nothing runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DryRun {
    pub plan_source: String,
    pub mode: Mode,
    #[serde(default)]
    pub plan: PlanInfo,
    pub steps: Vec<StepEstimate>,
    /// Costs summed; durations along the longest dependency path. A possible integrator is
    /// in the p90 figures only.
    pub total: Estimate,
    /// For a git task whose plan has steps that change files in parallel: the integrator
    /// that runs if their branches conflict (its `depends_on` names the parallel steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrator: Option<StepEstimate>,
}

/// One approval request of the "needs you" queue (`GET /v1/approvals`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub id: String,
    pub task_id: String,
    pub job_id: String,
    pub attempt: u32,
    pub role: String,
    pub tool: String,
    /// What the tool would do: the command, the path, or the edit (shortened).
    pub summary: String,
    /// The tool's whole input as JSON (shortened).
    pub input: String,
    pub created_ms: u64,
    pub deadline_ms: u64,
    /// `pending`, `approved`, `denied`, or `expired` (pending past its deadline: its worker
    /// denies it, or is gone).
    pub state: String,
    /// Who answered: `admin`, `tenant:<name>` or `deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The rule the answer granted beyond this request (`Tool(pattern)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_ms: Option<u64>,
}

/// `GET /v1/approvals`: pending requests first (oldest first), then recently answered ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalList {
    pub now_ms: u64,
    pub approvals: Vec<Approval>,
}

/// `POST /v1/approvals/{id}`: the answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerApproval {
    /// `approve` or `deny`.
    pub decision: String,
    /// What the agent is told (with a denial: why, or what to do instead).
    #[serde(default)]
    pub message: Option<String>,
    /// `once` (default), `task` (the same tool and input are allowed for the rest of the
    /// task without asking) or `always` (the tool with `pattern` is allowed for every task of
    /// the caller's tenant).
    #[serde(default)]
    pub scope: Option<String>,
    /// With `scope: always`: what the tool's input must match (`*` matches anything), e.g.
    /// `npm install*`.
    #[serde(default)]
    pub pattern: Option<String>,
}
