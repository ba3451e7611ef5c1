//! Agent backends. One trait; the job's `backend` picks the implementation.
//!
//! An agent reports progress through an [`Events`] sink (text, tool calls, usage) and returns
//! an [`AgentOutput`]. It must stop promptly when its cancellation token fires.
//!
//! Every backend receives a [`Prepared`]: the job with what was worked out for it once (the
//! role's profile, the model, the user prompt, the price table, the stored session).
//!
//! Imports run one way: [`backends`] uses the backends; a backend uses this module and the
//! helpers (`chat`, `tool_loop`, `tools`, `http`, `process`, `workspace`, `git`, `pricing`), never the dispatcher or
//! another backend.
//!
//! Layout:
//! - [`backends`]: [`backends::Backends`], the worker's agent: picks the backend a job names and gives it
//!   the role's profile, the model, the workspace and the price table.
//! - [`sim`]: the deterministic simulated agent.
//! - [`claude_code`]: the Claude Code CLI, headless; [`claude_code::stream`] parses its
//!   stream-json into events, [`claude_code::transcript`] collects its session transcripts
//!   after a turn and restores them before the next one (on any worker).
//! - [`anthropic`]: the Messages API with streaming.
//! - [`openai`]: any OpenAI-compatible chat-completions server, streaming.
//! - [`tool_loop`]: the agent loop of those two: requests, tool calls run, results sent back,
//!   usage summed, turn limit, cancel.
//! - [`tools`]: the native tools of that loop, confined to the job's workspace.
//! - [`chat`]: what those two share besides the loop: the conversation as a message list
//!   (the session), and how an answer is judged.
//! - [`command`]: any program that reads a prompt and writes its answer.
//! - [`http`]: what the two HTTP backends share: retries honouring `retry-after`, failure
//!   reasons by status.
//! - [`process`]: child processes in their own process group, killed as a whole.
//! - [`supervisor`]: the hidden mode of the worker binary that makes every process started
//!   for a job die with the worker (Linux).
//! - [`workspace`]: where an agent works, and the files it read and changed.
//! - [`git`]: git workspaces: the clone cache, job branches and the task branch.
//! - [`pricing`]: the price table and context windows.

pub mod anthropic;
pub mod backends;
pub mod chat;
pub mod check;
pub mod claude_code;
pub mod command;
pub mod git;
pub mod http;
pub mod openai;
pub mod pricing;
pub mod process;
pub mod sim;
pub mod supervisor;
pub mod tool_loop;
pub mod tools;
pub mod workspace;

use crate::config::LoopSettings;
use crate::custody::Recorder;
use crate::roles::Profile;
use crate::sandbox::{Jail, Sandbox};
use crate::session::Snapshot;
use futures::FutureExt;
use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, GitOutcome, JobSpec, Outcome, Usage};
use pricing::{CLAUDE_CONTEXT_WINDOW, PriceTable};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What an agent run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentOutput {
    pub outcome: Outcome,
    pub output: String,
    pub usage: Usage,
    pub cost_usd: f64,
    pub files_read: Vec<String>,
    pub files_written: Vec<String>,
    /// What the agent changed in its workspace, as a unified diff (at most
    /// [`orch_shared::job::MAX_DIFF_BYTES`]).
    pub diff: Option<String>,
    /// For a git workspace: the branch and commit the job pushed.
    pub git: Option<GitOutcome>,
}

impl AgentOutput {
    /// A failed run that produced nothing.
    pub fn failure(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failure {
                reason,
                message: message.into(),
            },
            output: String::new(),
            usage: Usage::default(),
            cost_usd: 0.0,
            files_read: vec![],
            files_written: vec![],
            diff: None,
            git: None,
        }
    }
}

/// How full the model's context window was on the agent's last request: the input tokens of
/// that request (fresh, cache writes and cache reads) over the model's window. Not cumulative
/// tokens, which pass the window as soon as a conversation has a few turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextUse {
    pub tokens: u64,
    pub window: u64,
}

impl ContextUse {
    /// The used fraction of the window (above 1 only if the provider's window is larger than
    /// the one configured).
    pub fn fraction(&self) -> f64 {
        self.tokens as f64 / self.window.max(1) as f64
    }
}

/// An agent run with what [`AgentOutput`] does not carry yet (the wire protocol has no field
/// for it): the backend and model that really ran, the context occupancy, and the session to
/// store.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub output: AgentOutput,
    pub backend: &'static str,
    /// The model the job ran on (the job's, else the role's or backend's default), when known.
    pub model: Option<String>,
    pub context: Option<ContextUse>,
    /// The conversation after this turn, for the runner to store (see [`crate::session`])
    /// when the turn succeeded; `None` when the backend keeps none or could not read it.
    pub session: Option<Snapshot>,
    /// Set when the job could not run for a provider's usage limit: the runner parks it
    /// instead of publishing a result (see [`crate::limits`]).
    pub parked: Option<crate::limits::Park>,
}

impl Report {
    pub fn failure(
        backend: &'static str,
        reason: FailureReason,
        message: impl Into<String>,
    ) -> Self {
        Self {
            output: AgentOutput::failure(reason, message),
            backend,
            model: None,
            context: None,
            session: None,
            parked: None,
        }
    }
}

/// The agent's line to its runner: where it sends its progress (published to the task's event
/// log) and, when the runner keeps custody of the run, its checkpoint [`Recorder`].
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<EventKind>,
    recorder: Option<Recorder>,
    parking: Option<crate::approvals::Parking>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("recorder", &self.recorder.is_some())
            .finish_non_exhaustive()
    }
}

impl Events {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<EventKind>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx,
                recorder: None,
                parking: None,
            },
            rx,
        )
    }

    /// These events with the run's checkpoint recorder.
    pub fn with_recorder(mut self, recorder: Option<Recorder>) -> Self {
        self.recorder = recorder;
        self
    }

    /// These events with the runner's parking line (it parks the job when an agent waiting
    /// for a person asks it to).
    pub fn with_parking(mut self, parking: Option<crate::approvals::Parking>) -> Self {
        self.parking = parking;
        self
    }

    /// Where an agent waiting for a person asks to be parked: only when its runner can park
    /// it and its run can be checkpointed (else it waits holding its slot).
    pub fn parking(&self) -> Option<&crate::approvals::Parking> {
        self.parking
            .as_ref()
            .filter(|_| self.recorder.as_ref().is_some_and(Recorder::can_migrate))
    }

    /// The run's checkpoint recorder (none: checkpoints are off, or the runner keeps none).
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    pub fn send(&self, kind: EventKind) {
        // The runner outlives the agent; a closed channel only means the job is being torn down.
        let _ = self.tx.send(kind);
    }
}

/// Everything a backend needs for one job, worked out once.
pub struct Prepared<'a> {
    pub job: &'a JobSpec,
    pub profile: &'a Profile,
    /// The model to ask for, when one is known (the CLI picks its own otherwise).
    pub model: Option<String>,
    /// The user prompt: the job's prompt, constraints and forward context.
    pub prompt: String,
    pub prices: &'a PriceTable,
    /// Where scratch workspaces go.
    pub data_dir: &'a Path,
    /// The worker's `workspace.sparse`: a git job with a file scope checks out only that
    /// scope unless its task says otherwise.
    pub sparse_checkout: bool,
    /// The native tool loop's settings (`[agent]`).
    pub tool_loop: &'a LoopSettings,
    /// Models already warned about (no price), so the log says it once.
    unpriced: &'a Mutex<BTreeSet<String>>,
    /// For a further turn: the conversation so far, as stored after the turn it continues.
    pub session: Option<Snapshot>,
    /// The agent sandbox every process of the job runs in; `None` when it is off.
    pub sandbox: Option<&'a Arc<Sandbox>>,
    /// The pool credential the limit broker chose for this run (its name), if any.
    pub credential: Option<String>,
    /// What the provider said about the credential's limits during the run (a 429, the CLI's
    /// `rate_limit_event`): the dispatcher hands it to the limit broker.
    pub limited: Mutex<Option<http::Learned>>,
    /// The approval broker's permission-prompt server (`None`: no broker, and tools a role
    /// marks `ask` are refused).
    pub approvals: Option<&'a crate::approvals::mcp::Desk>,
}

impl Prepared<'_> {
    /// The job's sandbox for processes working in `workspace` (`None` when the sandbox is
    /// off); what it allows is logged, what it refuses goes to `events`.
    pub fn jail(
        &self,
        workspace: &Path,
        events: &Events,
    ) -> Result<Option<Jail>, (FailureReason, String)> {
        self.jail_on(workspace, events, None)
    }

    /// [`Prepared::jail`] whose model requests go upstream with `credential` (the pool
    /// credential of this run) instead of the worker's default key.
    pub fn jail_on(
        &self,
        workspace: &Path,
        events: &Events,
        credential: Option<&crate::config::Secret>,
    ) -> Result<Option<Jail>, (FailureReason, String)> {
        let Some(sandbox) = self.sandbox else {
            return Ok(None);
        };
        let name = format!("{}-{}", self.job.job_id, self.job.attempt);
        match sandbox.jail(
            &name,
            workspace,
            &self.profile.sandbox,
            Some(events.clone()),
            credential,
        ) {
            Ok(j) => {
                tracing::info!(job_id = %self.job.job_id, allowed = %j.describe(), "agent sandbox ready");
                Ok(Some(j))
            }
            Err(e) => Err((FailureReason::Internal, format!("{e}"))),
        }
    }

    /// `output` as a memory-limit failure when the kernel killed a process of `jail` for its
    /// memory, else unchanged.
    pub fn judge_memory(&self, jail: Option<&Jail>, output: AgentOutput) -> AgentOutput {
        match jail {
            Some(j) if j.memory_exceeded() => {
                let limit = j
                    .memory_max()
                    .map_or(String::new(), |b| format!(" of {} MiB", b >> 20));
                AgentOutput {
                    outcome: Outcome::Failure {
                        reason: FailureReason::AgentError,
                        message: format!(
                            "out of memory: the job went past its memory limit{limit} and the kernel killed it"
                        ),
                    },
                    ..output
                }
            }
            _ => output,
        }
    }

    /// Records what the provider said about the credential's limits (the latest wins).
    pub fn note_limit(&self, learned: http::Learned) {
        if let Ok(mut l) = self.limited.lock() {
            *l = Some(learned);
        }
    }

    /// What [`Prepared::note_limit`] recorded, taken.
    pub fn take_limit(&self) -> Option<http::Learned> {
        self.limited.lock().ok().and_then(|mut l| l.take())
    }

    /// The cost of `usage` on `model` from the price table; 0 (and a warning, once per
    /// model) when the model has no price.
    pub fn cost(&self, model: Option<&str>, usage: &Usage) -> f64 {
        if usage.total() == 0 {
            return 0.0;
        }
        match self.prices.cost(model, usage) {
            Some(c) => c,
            None => {
                let name = model.unwrap_or("(unknown)").to_string();
                if let Ok(mut seen) = self.unpriced.lock()
                    && seen.insert(name.clone())
                {
                    tracing::warn!(model = %name, "no price for this model: its cost counts as 0 (add [prices.\"{name}\"] to the worker config)");
                }
                0.0
            }
        }
    }

    /// The context window of `model`: the price table's, else 200k for a Claude model.
    pub fn context_window(&self, model: &str) -> Option<u64> {
        self.prices.context_window(model).or_else(|| {
            let bare = model.rsplit('/').next().unwrap_or(model);
            (bare.starts_with("claude") || matches!(bare, "opus" | "sonnet" | "haiku"))
                .then_some(CLAUDE_CONTEXT_WINDOW)
        })
    }
}

/// An agent backend.
pub trait Agent: Send + Sync {
    /// The backend name reported in events.
    fn name(&self) -> &'static str;

    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, AgentOutput>;

    /// The backend that runs `job` (for `JobStarted`): [`backends::Backends`] runs several.
    fn backend_for(&self, _job: &JobSpec) -> &'static str {
        self.name()
    }

    /// What `job`'s sandbox allows, in one line (`None`: its processes run unsandboxed, or it
    /// starts none).
    fn sandbox_for(&self, _job: &JobSpec) -> Option<String> {
        None
    }

    /// The model `job` runs on, when the agent picks one the job did not name.
    fn model_for(&self, job: &JobSpec) -> Option<String> {
        job.model.clone()
    }

    /// Like [`Agent::run`], with the [`Report`]'s extras.
    fn run_report<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Report> {
        let (backend, model) = (self.backend_for(job), self.model_for(job));
        self.run(job, events, cancel)
            .map(move |output| Report {
                output,
                backend,
                model,
                context: None,
                session: None,
                parked: None,
            })
            .boxed()
    }
}
