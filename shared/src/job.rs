//! A job is one agent run: the coordinator publishes a [`JobSpec`], a worker runs it and
//! publishes a [`JobResult`].

use crate::ids::{JobId, TaskId, WorkerId};
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything a worker needs to run one agent. A worker keeps nothing else: a redelivered
/// `JobSpec` can be run by any worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub task_id: TaskId,
    pub job_id: JobId,
    /// The coordinator's attempt number, starting at 1 (JetStream redeliveries of one attempt
    /// are counted separately, in [`JobResult::delivery`]).
    pub attempt: u32,
    /// Position of this job in the task's plan.
    pub step: u32,
    pub role: Role,
    /// The instruction for this agent (its subtask description).
    pub prompt: String,
    /// Forward context from the jobs this one depends on, if any.
    #[serde(default)]
    pub context: Option<String>,
    pub backend: Backend,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub workspace: Workspace,
    #[serde(default)]
    pub limits: Limits,
    /// What the job produces: an agent's work, or a plan for the rest of the task.
    #[serde(default)]
    pub kind: JobKind,
    /// Instructions from the plan that the agent must follow.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Parameters of the `sim` backend; ignored by the others.
    #[serde(default)]
    pub sim: SimParams,
    /// This job is a further turn of an earlier agent's conversation (`orchctl agents send`
    /// or `fork`): the worker restores that agent's stored session before running `prompt`.
    #[serde(default)]
    pub session: Option<SessionRef>,
    /// The coordinator records the session pointer a result reports
    /// ([`JobResult::session`]); a worker given a spec without this flag (from a coordinator
    /// older than the field) writes the pointer itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub records_session: bool,
    /// The task's dispatch priority: jobs parked on a provider's usage limit go back to the
    /// queue in this order when the limit resets.
    #[serde(default, skip_serializing_if = "crate::api::Priority::is_normal")]
    pub priority: crate::api::Priority,
    /// MCP servers the task declared, by name: their tools are offered to a native tool loop
    /// agent (`anthropic`, `openai`) next to the role's own servers, under the role's rules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mcp_servers: BTreeMap<String, McpServer>,
}

impl JobSpec {
    /// A first attempt of step 0 by `role`, everything else at its default (the `sim` backend,
    /// a scratch workspace, no limits): change what matters with struct update syntax.
    pub fn new(task_id: TaskId, job_id: JobId, role: Role, prompt: impl Into<String>) -> Self {
        Self {
            task_id,
            job_id,
            attempt: 1,
            step: 0,
            role,
            prompt: prompt.into(),
            context: None,
            backend: Backend::default(),
            model: None,
            workspace: Workspace::default(),
            limits: Limits::default(),
            kind: JobKind::default(),
            constraints: vec![],
            sim: SimParams::default(),
            session: None,
            records_session: false,
            priority: crate::api::Priority::Normal,
            mcp_servers: BTreeMap::new(),
        }
    }
}

/// An MCP server whose tools an agent of the native tool loop may call: a program spoken to
/// over its stdin and stdout (`command`, run in the job's workspace and sandbox), or a
/// streamable HTTP endpoint (`url`, called by the worker). Exactly one of the two.
///
/// Its `Debug` shows the names of `headers`, never their values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServer {
    /// The program of a stdio server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Variables added to its environment (which holds no secret of the worker).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The endpoint of a streamable HTTP server (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HTTP headers sent with every request to `url` (stored with the task like any field:
    /// a secret belongs in `bearer_token_env`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The worker's environment variable whose value is sent to `url` as
    /// `Authorization: Bearer <value>`; only a server of the worker's own configuration may
    /// name one (a task could otherwise send any of the worker's secrets anywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_env: Option<String>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("bearer_token_env", &self.bearer_token_env)
            .finish()
    }
}

/// Headers an MCP server declaration may not set: the transport's own.
pub const RESERVED_MCP_HEADERS: &[&str] = &[
    "accept",
    "content-type",
    "content-length",
    "host",
    "mcp-session-id",
    "mcp-protocol-version",
    "last-event-id",
];

/// The longest MCP server name: with the tool's name after it, a tool's full name
/// (`mcp__<server>__<tool>`) must fit the APIs' 64 characters.
pub const MAX_MCP_SERVER_NAME: usize = 24;
/// The longest `url` of an MCP server.
pub const MAX_MCP_URL: usize = 2_048;

impl McpServer {
    /// Why the server `name` as declared cannot be used, if it cannot: a message that starts
    /// with the name and the field (`fs.url: …`). The rules: a name of letters, digits, `-` and single `_` up to [`MAX_MCP_SERVER_NAME`]
    /// characters, and either a command (with args and env) or an http(s) URL (with headers
    /// and bearer_token_env); a header value is never quoted in a message.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if name.is_empty()
            || name.len() > MAX_MCP_SERVER_NAME
            || name.contains("__")
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "{name}: a server name is 1 to {MAX_MCP_SERVER_NAME} letters, digits, `-` or `_` (not `__`)"
            ));
        }
        match (&self.command, &self.url) {
            (Some(_), None) if !self.headers.is_empty() || self.bearer_token_env.is_some() => Err(
                format!("{name}: headers and bearer_token_env are for a url, not a command"),
            ),
            (Some(c), None) if !c.trim().is_empty() => Ok(()),
            (None, Some(u)) if u.starts_with("http://") || u.starts_with("https://") => {
                if !self.args.is_empty() || !self.env.is_empty() {
                    return Err(format!("{name}: args and env are for a command, not a url"));
                }
                if u.len() > MAX_MCP_URL || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(format!(
                        "{name}.url: must be a URL of at most {MAX_MCP_URL} characters, without spaces"
                    ));
                }
                for (header, value) in &self.headers {
                    let lower = header.to_ascii_lowercase();
                    if header.is_empty()
                        || !header
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                    {
                        return Err(format!(
                            "{name}.headers: `{header}` is not an HTTP header name"
                        ));
                    }
                    if RESERVED_MCP_HEADERS.contains(&lower.as_str()) {
                        return Err(format!(
                            "{name}.headers.{header}: set by the MCP transport itself"
                        ));
                    }
                    if lower == "authorization" && self.bearer_token_env.is_some() {
                        return Err(format!(
                            "{name}.headers.{header}: bearer_token_env sets it already"
                        ));
                    }
                    // The value is never quoted back: it may be a credential.
                    if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                        return Err(format!(
                            "{name}.headers.{header}: the value holds a control character"
                        ));
                    }
                }
                if let Some(var) = &self.bearer_token_env
                    && (var.is_empty()
                        || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                {
                    return Err(format!(
                        "{name}.bearer_token_env: `{var}` is not an environment variable name"
                    ));
                }
                Ok(())
            }
            (None, Some(_)) => Err(format!("{name}.url: must start with http:// or https://")),
            (Some(_), None) => Err(format!("{name}.command: must not be empty")),
            _ => Err(format!(
                "{name}: give either command (stdio) or url (streamable HTTP)"
            )),
        }
    }
}

/// Which stored session a job continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// The agent (job) whose session, as stored after its last turn, this job starts from.
    pub from: JobId,
    /// A fork: a new conversation with the same history (the original can still continue).
    #[serde(default)]
    pub fork: bool,
    /// A rewind (`orchctl agents rewind`): the job starts from `from`'s checkpoint after this
    /// step (its conversation and its tree), not from its stored session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u32>,
}

/// What a job is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// An agent working on a step of the plan.
    #[default]
    Agent,
    /// The planner agent: its answer is a JSON plan (see [`crate::plan`]) for the rest of the task.
    Plan,
    /// The task's check command (its `prompt`), run in the sandbox on the task branch once
    /// every agent is done; no agent, nothing pushed. Exit 0 is success; any other exit fails
    /// with [`FailureReason::CheckFailed`] and the end of the output.
    Check,
}

/// Which agent backend runs a job.
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
    strum::EnumIter,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Backend {
    /// The deterministic simulated agent.
    #[default]
    Sim,
    ClaudeCode,
    Anthropic,
    Openai,
    Command,
}

impl Backend {
    pub fn as_str(&self) -> &'static str {
        self.into()
    }
}

/// Where the agent works.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workspace {
    /// A fresh scratch directory chosen by the worker.
    #[default]
    Scratch,
    /// A directory the worker can see (single-machine use).
    Local { path: String },
    /// A fresh clone of a git repository (cached per worker) in a scratch directory.
    Git {
        /// What `git clone` accepts: a URL or a path the workers can reach.
        url: String,
        /// Where the task starts: a branch, tag or commit of `url` (`HEAD`: the default branch).
        base_ref: String,
        /// Set by the coordinator on each job; `None` on the task's record.
        #[serde(default)]
        job: Option<GitJob>,
    },
}

/// How one job of a git task uses the repository.
///
/// The job starts from `start` (its parents' branches, merged in plan order; `base_ref` when
/// empty), commits everything its agent changed with a generated message and pushes it to
/// `branch`. Then it moves `task_branch` to the merge, in plan order, of every job branch of the
/// task that is not already contained in a later one (a fast-forward for sequential steps),
/// with `--force-with-lease` so concurrent finishers never lose each other's work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GitJob {
    /// This job's branch, `orch/jobs/<task-id>/<NN>-<role>` (`NN`: the step, from 01, so that
    /// branch names sort in plan order). Not under `orch/<task-id>/`: git cannot hold a branch
    /// and branches below it with the same name.
    pub branch: String,
    /// The branches of the job's parents in plan order (the ones that exist are merged).
    #[serde(default)]
    pub start: Vec<String>,
    /// The task's branch, `orch/<task-id>`: the task's result.
    pub task_branch: String,
    /// An integrator's job: when merging `start` conflicts, the conflicted merge is left in
    /// the working tree for the agent to resolve (instead of failing the job), and the job's
    /// commit is that merge.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub integrate: bool,
    /// The file scope the job's plan step declared (`paths`: globs of the paths it intends to
    /// edit); empty when it declared none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Whether the job checks out only its `paths` (a sparse checkout of their directories
    /// and the top-level files): the task's choice, `None` leaving it to the worker's
    /// `workspace.sparse`. A job without `paths` always gets the whole tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<bool>,
}

impl GitJob {
    /// The task branch of `task`.
    pub fn task_branch(task: TaskId) -> String {
        format!("orch/{task}")
    }

    /// The branch of step `step` (from 0) of `task`, run by `role`.
    pub fn job_branch(task: TaskId, step: u32, role: Role) -> String {
        format!("orch/jobs/{task}/{:02}-{role}", step + 1)
    }
}

/// Per-job limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct Limits {
    /// Wall-clock limit for one attempt, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Maximum agent turns.
    #[serde(default)]
    pub max_turns: Option<u32>,
}

/// How the `sim` backend behaves: deterministic for a given job id and attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct SimParams {
    /// How long the simulated agent works, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// Probability in [0, 1] that an attempt fails (decided by hashing job id and attempt).
    #[serde(default)]
    pub fail_rate: f64,
    /// The first N attempts of every job fail, whatever the rate (for retry tests and demos).
    #[serde(default)]
    pub fail_first_attempts: u32,
    /// How simulated failures fail (default `agent_error`).
    #[serde(default)]
    pub fail_reason: Option<FailureReason>,
}

/// Tokens by kind, as the providers report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_tokens: u64,
    pub cache_read_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_creation_tokens + self.cache_read_tokens
    }

    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_tokens += other.cache_creation_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
    }
}

/// Why a job failed. Stable on the wire; decides whether a retry makes sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The agent itself reported an error (`is_error`) or produced no usable answer.
    AgentError,
    RateLimited,
    Overloaded,
    Network,
    Timeout,
    Cancelled,
    BadRequest,
    BudgetExhausted,
    /// The worker that held the job went away.
    WorkerLost,
    /// The job message could not be understood or the worker failed internally.
    Internal,
    /// The agent ended its turn, but was denied tools it asked for (Claude Code's
    /// `permission_denials`): its answer is not a plain success and needs a person.
    NeedsAttention,
    /// The task's check command ran and failed (a [`JobKind::Check`] job).
    CheckFailed,
}

impl FailureReason {
    /// Whether running the same job again can reasonably succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FailureReason::RateLimited
                | FailureReason::Overloaded
                | FailureReason::Network
                | FailureReason::WorkerLost
                | FailureReason::AgentError
        )
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            FailureReason::AgentError => "agent_error",
            FailureReason::RateLimited => "rate_limited",
            FailureReason::Overloaded => "overloaded",
            FailureReason::Network => "network",
            FailureReason::Timeout => "timeout",
            FailureReason::Cancelled => "cancelled",
            FailureReason::BadRequest => "bad_request",
            FailureReason::BudgetExhausted => "budget_exhausted",
            FailureReason::WorkerLost => "worker_lost",
            FailureReason::Internal => "internal",
            FailureReason::NeedsAttention => "needs_attention",
            FailureReason::CheckFailed => "check_failed",
        }
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure {
        reason: FailureReason,
        message: String,
    },
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }
}

/// What a worker reports when a job attempt ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub task_id: TaskId,
    pub job_id: JobId,
    pub attempt: u32,
    /// JetStream's delivery count for this attempt (1 unless the job was redelivered).
    pub delivery: u64,
    pub worker_id: WorkerId,
    pub outcome: Outcome,
    /// The agent's final answer.
    pub output: String,
    pub usage: Usage,
    pub cost_usd: f64,
    #[serde(default)]
    pub files_read: Vec<String>,
    #[serde(default)]
    pub files_written: Vec<String>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// The fencing token of the worker's lease on this attempt (0: no lease was taken).
    #[serde(default)]
    pub fence: u64,
    /// The model the agent ran on, when the backend knows it.
    #[serde(default)]
    pub model: Option<String>,
    /// Context occupancy of the agent's last request: its input and cache tokens...
    #[serde(default)]
    pub context_tokens: Option<u64>,
    /// ...out of the model's context window.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// What the job changed in its workspace, as a unified diff (cut at
    /// [`MAX_DIFF_BYTES`], with a note saying so); `None` when nothing is known.
    #[serde(default)]
    pub diff: Option<String>,
    /// For a git workspace: the branch and commit the job pushed.
    #[serde(default)]
    pub git: Option<GitOutcome>,
    /// The conversation's id at the backend (the Claude Code CLI's `session_id`), when the job
    /// stored a session another turn can continue.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Where the job's session is stored, for the coordinator to record as the agent's
    /// session pointer when it applies the result (only when the spec asked for it with
    /// [`JobSpec::records_session`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionPointer>,
}

/// A checkpoint of a running agent, as stored (JSON) in [`crate::keys::checkpoint`] and
/// [`crate::keys::checkpoints`]: enough for any worker to restore its conversation and
/// workspace after `step`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkpoint {
    /// The attempt and the fencing token of the lease it was written under.
    pub attempt: u32,
    pub fence: u64,
    /// Steps done (model requests whose tool calls all came back).
    pub step: u32,
    pub worker: String,
    /// The backend that ran (`claude-code`, `anthropic`, `openai`): only it can resume.
    pub backend: String,
    /// The conversation: the object of the sessions store holding it.
    pub transcript: String,
    pub transcript_bytes: u64,
    /// The backend's conversation id (the CLI's session id), when it has one.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The directory the agent ran in (the CLI's transcript names it).
    #[serde(default)]
    pub workspace: String,
    /// The turn of the conversation this job is.
    pub turn: u32,
    /// For a git workspace: the commit of the whole working tree (tracked and untracked
    /// files) on the checkpoint ref [`checkpoint_ref`] of the task's repository.
    #[serde(default)]
    pub commit: Option<String>,
    /// For a scratch workspace (no repository to push to): the sessions-store object holding
    /// `commit` as a git bundle (the tree alone, at most [`MAX_TREE_BUNDLE_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_object: Option<String>,
    /// Files that differ from where the agent started.
    pub files_changed: u32,
    /// What the agent had spent by then (the runs before this one included).
    pub usage: Usage,
    pub cost_usd: f64,
    pub at_ms: u64,
}

/// The largest git bundle a scratch workspace's checkpoint stores; a larger tree is not
/// checkpointed (the step is logged and the agent goes on).
pub const MAX_TREE_BUNDLE_BYTES: usize = 64 * 1024 * 1024;

/// The ref of a git repository that holds an agent's checkpoint commits (each one's parent is
/// the one before it, so every step stays reachable).
pub fn checkpoint_ref(job: JobId) -> String {
    format!("refs/orch/checkpoints/{job}")
}

/// Checkpoint refs a worker deletes from a cleaned task's repository (the coordinator runs no
/// git): queued in [`crate::keys::REF_CLEANUPS`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefCleanup {
    /// The task's repository, as `git clone` took it.
    pub url: String,
    /// The refs to delete ([`checkpoint_ref`] of each agent of the task).
    pub refs: Vec<String>,
}

/// A stored agent session, as the pointer hash [`crate::keys::session`] describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPointer {
    /// The backend that ran the turn: a turn continues only on the same backend.
    pub backend: String,
    /// The backend's own conversation id (the CLI's `session_id`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The directory the agent ran in (empty for backends without a workspace).
    #[serde(default)]
    pub workspace: String,
    /// How many turns the conversation has had, this one included.
    pub turn: u32,
    /// The session's size in bytes.
    pub bytes: u64,
    pub saved_at_ms: u64,
    /// The session itself when it is small enough to live in the pointer; otherwise it is
    /// the object named by the job id in [`crate::subject::SESSIONS_BUCKET`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub inline: Option<Vec<u8>>,
}

impl SessionPointer {
    /// The fields of the pointer hash, in [`crate::keys::session_field`] names.
    pub fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        use crate::keys::session_field as f;
        let mut fields = vec![
            (f::BACKEND, self.backend.clone().into_bytes()),
            (f::WORKSPACE, self.workspace.clone().into_bytes()),
            (f::TURN, self.turn.to_string().into_bytes()),
            (f::BYTES, self.bytes.to_string().into_bytes()),
            (f::SAVED_AT_MS, self.saved_at_ms.to_string().into_bytes()),
        ];
        if let Some(id) = &self.session_id {
            fields.push((f::SESSION_ID, id.clone().into_bytes()));
        }
        if let Some(inline) = &self.inline {
            fields.push((f::HISTORY, inline.clone()));
        }
        fields
    }
}

/// Diffs longer than this are cut.
pub const MAX_DIFF_BYTES: usize = 256 * 1024;

/// What a job did to its git workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct GitOutcome {
    /// The job's branch and the commit it points to.
    pub branch: String,
    pub commit: String,
    /// The commit the job started from (the diff is `base..commit`).
    pub base: String,
    /// Whether the task branch now contains this job's commit.
    #[serde(default)]
    pub merged: bool,
    /// Why it does not: the merge conflicted (with the files), or the push kept failing.
    #[serde(default)]
    pub conflicts: Vec<String>,
}

impl JobResult {
    pub fn duration_ms(&self) -> u64 {
        self.finished_at_ms.saturating_sub(self.started_at_ms)
    }
}

/// Stop a running job attempt (published on [`crate::subject::CONTROL_CANCEL`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelJob {
    pub job_id: JobId,
    pub attempt: u32,
    pub reason: String,
}

/// The paths a running job attempt has changed so far, relative to its repository's root
/// (published by its worker on [`crate::subject::paths`] after an agent step, at most once a
/// second and only when the set changed; the coordinator holds them as the job's path lease
/// and compares them with the task's other running jobs). The whole set every time, so a lost
/// report is made good by the next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathsReport {
    pub task_id: TaskId,
    pub job_id: JobId,
    pub attempt: u32,
    /// At most [`MAX_REPORTED_PATHS`], sorted.
    pub paths: Vec<String>,
    /// More paths changed than were reported.
    #[serde(default)]
    pub truncated: bool,
}

/// Most paths one [`PathsReport`] carries.
pub const MAX_REPORTED_PATHS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn http(headers: &[(&str, &str)], bearer: Option<&str>) -> McpServer {
        McpServer {
            url: Some("https://docs.example.com/mcp".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bearer_token_env: bearer.map(str::to_string),
            ..McpServer::default()
        }
    }

    #[test]
    fn http_server_declarations_name_the_bad_field() {
        assert_eq!(
            http(&[("X-Team", "core")], Some("DOCS_TOKEN")).check("docs"),
            Ok(())
        );
        let bad = |s: McpServer| s.check("docs").unwrap_err();
        assert!(bad(http(&[("X Team", "a")], None)).starts_with("docs.headers:"));
        assert!(
            bad(http(&[("Mcp-Session-Id", "a")], None)).starts_with("docs.headers.Mcp-Session-Id:")
        );
        assert!(
            bad(http(&[("Authorization", "a")], Some("T")))
                .starts_with("docs.headers.Authorization:")
        );
        let e = bad(http(&[("X-Key", "top\nsecret")], None));
        assert!(
            e.starts_with("docs.headers.X-Key:") && !e.contains("secret"),
            "{e}"
        );
        assert!(bad(http(&[], Some("A-B"))).starts_with("docs.bearer_token_env:"));
        let command = McpServer {
            command: Some("srv".into()),
            headers: [("X-Team".to_string(), "core".to_string())].into(),
            ..McpServer::default()
        };
        assert!(bad(command).starts_with("docs: headers and bearer_token_env are for a url"));
        let spaced = McpServer {
            url: Some("https://h/a b".into()),
            ..McpServer::default()
        };
        assert!(bad(spaced).starts_with("docs.url:"));
    }

    #[test]
    fn a_server_s_debug_shows_no_header_value() {
        let shown = format!("{:?}", http(&[("X-Key", "top-secret")], None));
        assert!(
            shown.contains("X-Key") && !shown.contains("top-secret"),
            "{shown}"
        );
    }
}
