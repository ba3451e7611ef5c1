//! [`Backends`]: the worker's agent. It runs each job on the backend the job names (a worker
//! configured with a default backend runs `sim` jobs there instead), after working out what
//! every backend needs: the role's profile, the model, the user prompt and the price table.
//!
//! Model routing, first match wins: the job's model; the backend's per-role table
//! (`[backends.<b>.models]`); for the Claude backends (`claude-code`, `anthropic`) the role's
//! model (`[roles.<role>] model`, Claude model names); the backend's model
//! (`[backends.<b>] model`); the backend's own default.
//!
//! A further turn of a conversation (`job.session` set) first loads the stored session of the
//! agent it continues (see [`crate::session`]) and hands it to the backend in
//! [`Prepared::session`]; a missing session, a session of another backend, or the `command`
//! backend (which keeps none) fail the job as a bad request.

use super::anthropic::{self, Anthropic};
use super::claude_code::{self, ClaudeCode};
use super::command::{self, CommandAgent};
use super::http::Learned;
use super::openai::{self, OpenAi};
use super::pricing::PriceTable;
use super::sim::Sim;
use super::{Agent, AgentOutput, Events, Prepared, Report};
use crate::config::{Config, Credential, LoopSettings, Models};
use crate::limits::{Limits, Pick};
use crate::roles::{self, Key, Roles};
use crate::sandbox::Sandbox;
use crate::session::{SessionStore, Snapshot};
use futures::FutureExt;
use futures::future::BoxFuture;
use orch_shared::job::Outcome;
use orch_shared::job::{Backend, FailureReason, JobSpec};
use reqwest::header::HeaderMap;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Every backend this worker can run.
pub struct Backends {
    default_backend: Option<Backend>,
    data_dir: PathBuf,
    roles: Roles,
    prices: PriceTable,
    tool_loop: LoopSettings,
    sparse_checkout: bool,
    claude_code: ClaudeCode,
    anthropic: Anthropic,
    openai: OpenAi,
    command: Option<CommandAgent>,
    claude_models: Models,
    anthropic_models: Models,
    openai_models: Models,
    command_models: Models,
    unpriced: Mutex<BTreeSet<String>>,
    /// Where further turns find their conversation; `None` runs first turns only.
    sessions: Option<SessionStore>,
    /// The agent sandbox; `None` when it is off.
    sandbox: Option<Arc<Sandbox>>,
    /// The credential pools of the HTTP backends, in the order jobs fill them.
    anthropic_pool: Vec<Credential>,
    openai_pool: Vec<Credential>,
    /// The limit broker; `None`: the first credential, and 429s retried in place.
    limits: Option<Limits>,
    /// The approval broker's permission-prompt server.
    approvals: Option<crate::approvals::mcp::Desk>,
}

impl Backends {
    /// Every setting was checked when the config was loaded, so this cannot fail.
    pub fn from_config(config: &Config) -> Self {
        let b = &config.backends;
        let client = reqwest::Client::builder()
            .user_agent(concat!("orch-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "HTTP client with defaults only");
                reqwest::Client::new()
            });
        Self {
            default_backend: config.default_backend,
            data_dir: config.data_dir.clone(),
            roles: config.roles.clone(),
            prices: config.prices.clone(),
            tool_loop: config.tool_loop.clone(),
            sparse_checkout: config.workspace.sparse,
            claude_code: ClaudeCode::new(b.claude_code.clone(), b.anthropic.clone()),
            anthropic: Anthropic::new(b.anthropic.clone(), client.clone()),
            openai: OpenAi::new(b.openai.clone(), client),
            command: b.command.clone().map(CommandAgent::new),
            claude_models: b.claude_code.models.clone(),
            anthropic_models: b.anthropic.models.clone(),
            openai_models: b.openai.models.clone(),
            command_models: b
                .command
                .as_ref()
                .map(|c| c.models.clone())
                .unwrap_or_default(),
            unpriced: Mutex::new(BTreeSet::new()),
            sessions: None,
            anthropic_pool: b.anthropic.credentials.clone(),
            openai_pool: b.openai.credentials.clone(),
            limits: None,
            sandbox: None,
            approvals: None,
        }
    }

    /// Lets the roles' `ask` tools wait for a person (see [`crate::approvals`]).
    pub fn with_approvals(mut self, desk: crate::approvals::mcp::Desk) -> Self {
        self.approvals = Some(desk);
        self
    }

    /// Runs the HTTP backends' jobs on credentials the limit broker picks (see
    /// [`crate::limits`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Lists this worker's credential pools with the broker.
    pub async fn register_pools(&self) {
        if let Some(l) = &self.limits {
            l.register(anthropic::NAME, &self.anthropic_pool).await;
            l.register(openai::NAME, &self.openai_pool).await;
        }
    }

    /// Runs `p` on `backend` with its credential pool (`claude-code` shares the `anthropic`
    /// pool: the same keys, the same provider limits): on the credential the broker picks;
    /// after a usage limit, once more on another credential with room; else parked until
    /// the pool's first reset (the report's `parked`).
    async fn run_pooled(
        &self,
        backend: Backend,
        p: &mut Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let (name, pool) = match backend {
            Backend::Openai => (openai::NAME, &self.openai_pool),
            _ => (anthropic::NAME, &self.anthropic_pool),
        };
        let Some(limits) = self.limits.as_ref().filter(|_| !pool.is_empty()) else {
            return match backend {
                Backend::Anthropic => self.anthropic.run(p, events, cancel).await,
                Backend::Openai => self.openai.run(p, events, cancel).await,
                _ => self.claude_code.run(p, events, cancel).await,
            };
        };
        let mut tried: Vec<String> = vec![];
        loop {
            let credential = match limits.pick_credential(name, pool, &tried).await {
                Pick::Use(c) => c,
                Pick::Exhausted(park) => {
                    let mut r = Report::failure(
                        self.backend_for(p.job),
                        FailureReason::RateLimited,
                        format!("{} (parked)", park.reason),
                    );
                    r.model = p.model.clone();
                    r.parked = Some(park);
                    return r;
                }
            };
            p.credential = Some(credential.name.clone());
            let report = match backend {
                Backend::Anthropic => {
                    let api = self.anthropic.on_credential(&credential.key);
                    api.run(p, events, cancel).await
                }
                Backend::Openai => {
                    let api = self.openai.on_credential(&credential.key);
                    api.run(p, events, cancel).await
                }
                _ => {
                    let cli = self.claude_code.on_credential(&credential.key);
                    cli.run(p, events, cancel).await
                }
            };
            // The CLI on an API key says only that it got a 429 (no reset): the default wait.
            let limited = p.take_limit().or_else(|| match &report.output.outcome {
                Outcome::Failure {
                    reason: FailureReason::RateLimited,
                    message,
                } => Some(Learned::from_429(&HeaderMap::new(), message)),
                _ => None,
            });
            let Some(learned) = limited else {
                return report;
            };
            limits.learn(name, &credential.name, &learned).await;
            if learned.exhausted_until_ms.is_none() {
                return report;
            }
            tracing::info!(backend = name, credential = %credential.name, "credential at its usage limit; trying another");
            tried.push(credential.name);
            // Moves once: a second limit parks the job until the pool's first reset.
            if tried.len() > 1 {
                let everyone: Vec<String> = pool.iter().map(|c| c.name.clone()).collect();
                let mut r = report;
                if let Pick::Exhausted(park) = limits.pick_credential(name, pool, &everyone).await {
                    r.parked = Some(park);
                }
                return r;
            }
        }
    }

    /// Runs every agent process in `sandbox` (`None`: the sandbox is off).
    pub fn with_sandbox(mut self, sandbox: Option<Arc<Sandbox>>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Lets jobs continue stored sessions (`job.session`).
    pub fn with_sessions(mut self, sessions: SessionStore) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// The stored session `job` continues, if it continues one; why the job cannot run
    /// otherwise (see the module docs).
    async fn previous_session(
        &self,
        job: &JobSpec,
        backend: Backend,
        name: &'static str,
    ) -> Result<Option<Snapshot>, (FailureReason, String)> {
        let Some(from) = job.session.as_ref().map(|s| s.from) else {
            return Ok(None);
        };
        if job.session.as_ref().is_some_and(|s| s.checkpoint.is_some()) {
            // A rewind starts from a checkpoint's conversation, not from the stored session
            // (the runner loads it; see `dispatch`).
            return Ok(None);
        }
        let fail = |reason, message: String| Err((reason, message));
        if backend == Backend::Command {
            return fail(
                FailureReason::BadRequest,
                "the command backend keeps no session".into(),
            );
        }
        let Some(store) = &self.sessions else {
            return fail(
                FailureReason::Internal,
                "this worker has no session store".into(),
            );
        };
        match store.load(from).await {
            Ok(Some(s)) if s.backend == name => {
                tracing::info!(%from, turn = s.turn + 1, bytes = s.bytes.len(), "continuing a stored session");
                Ok(Some(s))
            }
            Ok(Some(s)) => fail(
                FailureReason::BadRequest,
                format!(
                    "agent {from} ran on the {} backend; this turn would run on {name}",
                    s.backend
                ),
            ),
            Ok(None) => fail(
                FailureReason::BadRequest,
                format!("agent {from} has no stored session"),
            ),
            // The store is unreachable for now: another attempt can succeed.
            Err(e) => fail(
                FailureReason::Network,
                format!("failed to load the session of agent {from}: {e}"),
            ),
        }
    }

    /// The backend `job` runs on.
    pub fn pick(&self, job: &JobSpec) -> Backend {
        match (job.backend, self.default_backend) {
            (Backend::Sim, Some(b)) => b,
            (b, _) => b,
        }
    }

    /// The model `job` runs on with `backend` (see the module docs for the order).
    pub fn model(&self, job: &JobSpec, backend: Backend) -> Option<String> {
        let key = Key::of(job);
        let (models, claude, builtin) = match backend {
            Backend::Sim => return job.model.clone(),
            Backend::ClaudeCode => (&self.claude_models, true, None),
            Backend::Anthropic => (&self.anthropic_models, true, Some(anthropic::DEFAULT_MODEL)),
            Backend::Openai => (&self.openai_models, false, None),
            Backend::Command => (&self.command_models, false, None),
        };
        job.model
            .clone()
            .or_else(|| models.by_role.get(&key).cloned())
            .or_else(|| {
                claude
                    .then(|| self.roles.profile(key).model.clone())
                    .flatten()
            })
            .or_else(|| models.default.clone())
            .or_else(|| builtin.map(str::to_string))
    }

    /// The user prompt of `job`; a git job with a sparse checkout is told what its workspace
    /// holds (the files outside it are absent, not deleted).
    fn prompt(&self, job: &JobSpec) -> String {
        let mut prompt = roles::user_prompt(job);
        let git_job = match &job.workspace {
            orch_shared::job::Workspace::Git { job, .. } => job.as_ref(),
            _ => None,
        };
        if let Some(dirs) = super::git::sparse_scope(git_job, self.sparse_checkout) {
            prompt.push_str("\n\n");
            prompt.push_str(&super::git::sparse_note(&dirs));
        }
        prompt
    }

    fn prepare<'a>(&'a self, job: &'a JobSpec, backend: Backend) -> Prepared<'a> {
        Prepared {
            job,
            profile: self.roles.for_job(job),
            model: self.model(job, backend),
            prompt: self.prompt(job),
            prices: &self.prices,
            data_dir: &self.data_dir,
            sparse_checkout: self.sparse_checkout,
            tool_loop: &self.tool_loop,
            unpriced: &self.unpriced,
            session: None,
            sandbox: self.sandbox.as_ref(),
            credential: None,
            limited: Mutex::new(None),
            approvals: self.approvals.as_ref(),
        }
    }

    async fn dispatch(&self, job: &JobSpec, events: Events, cancel: CancellationToken) -> Report {
        if job.kind == orch_shared::job::JobKind::Check {
            // No agent: the task's check command, whatever the backend.
            return super::check::run(&self.prepare(job, Backend::Command), &events, &cancel).await;
        }
        let backend = self.pick(job);
        let previous = match self
            .previous_session(job, backend, self.backend_for(job))
            .await
        {
            Ok(p) => p,
            Err((reason, message)) => {
                return Report::failure(self.backend_for(job), reason, message);
            }
        };
        let rewind = job.session.as_ref().and_then(|s| s.checkpoint);
        match events.recorder() {
            Some(rec) if rewind.is_none() => rec.set_turn(Snapshot::next_turn(previous.as_ref())),
            Some(rec) if rec.resume().is_some() => {}
            _ => {
                if let Some(step) = rewind {
                    return Report::failure(
                        self.backend_for(job),
                        FailureReason::BadRequest,
                        format!(
                            "the rewind cannot start: no checkpoint after step {step} of the agent it rewinds could be loaded here (see the resume_failed event)"
                        ),
                    );
                }
            }
        }
        if backend == Backend::Sim {
            let (output, session) = Sim.turn(job, previous.as_ref(), events, cancel).await;
            return Report {
                output,
                backend: "sim",
                model: job.model.clone(),
                context: None,
                session,
                parked: None,
            };
        }
        let mut p = self.prepare(job, backend);
        p.session = previous;
        let report = match backend {
            Backend::Sim => unreachable!("handled above"),
            Backend::ClaudeCode | Backend::Anthropic | Backend::Openai => {
                self.run_pooled(backend, &mut p, &events, &cancel).await
            }
            Backend::Command => match &self.command {
                Some(c) => c.run(&p, &events, &cancel).await,
                None => Report::failure(
                    command::NAME,
                    FailureReason::BadRequest,
                    "the command backend is not configured on this worker ([backends.command] program)",
                ),
            },
        };
        let (outcome, reason) = match &report.output.outcome {
            orch_shared::job::Outcome::Success => ("success", "none"),
            orch_shared::job::Outcome::Failure { reason, .. } => ("failure", reason.as_str()),
        };
        tracing::info!(
            backend = report.backend,
            model = report.model.as_deref().unwrap_or("default"),
            outcome,
            reason,
            tokens = report.output.usage.total(),
            cost_usd = report.output.cost_usd,
            context_tokens = report.context.map(|c| c.tokens),
            context_window = report.context.map(|c| c.window),
            "agent finished"
        );
        report
    }
}

impl Agent for Backends {
    fn name(&self) -> &'static str {
        // Only `backend_for` knows a job's backend. Without a job, the backend most jobs run
        // on: the default (which `sim` jobs are sent to), else `sim`, the coordinator's default.
        match self.default_backend {
            Some(b) => b.as_str(),
            None => "sim",
        }
    }

    fn backend_for(&self, job: &JobSpec) -> &'static str {
        match self.pick(job) {
            Backend::Sim => "sim",
            Backend::ClaudeCode => claude_code::NAME,
            Backend::Anthropic => anthropic::NAME,
            Backend::Openai => openai::NAME,
            Backend::Command => command::NAME,
        }
    }

    fn model_for(&self, job: &JobSpec) -> Option<String> {
        self.model(job, self.pick(job))
    }

    fn sandbox_for(&self, job: &JobSpec) -> Option<String> {
        let sandbox = self.sandbox.as_ref()?;
        let profile = self.roles.for_job(job);
        match self.pick(job) {
            // No process started: nothing runs in a sandbox.
            Backend::Sim => None,
            Backend::Anthropic | Backend::Openai if !profile.native_tools().contains(&"bash") => {
                None
            }
            _ => Some(sandbox.describe(&profile.sandbox)),
        }
    }

    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, AgentOutput> {
        self.dispatch(job, events, cancel).map(|r| r.output).boxed()
    }

    fn run_report<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Report> {
        self.dispatch(job, events, cancel).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use orch_shared::ids::{JobId, TaskId};
    use orch_shared::role::Role;

    fn job(role: Role, backend: Backend, model: Option<&str>) -> JobSpec {
        JobSpec {
            backend,
            model: model.map(str::to_string),
            ..JobSpec::new(TaskId::from_u128(1), JobId::from_u128(2), role, "x")
        }
    }

    fn backends(file: &str) -> Backends {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, file).unwrap();
        let cfg = config::from_flags([std::ffi::OsStr::new("--config"), path.as_os_str()]).unwrap();
        Backends::from_config(&cfg)
    }

    #[test]
    fn models_route_by_job_then_backend_role_then_role_then_backend() {
        let b = backends(
            r#"
[backends.anthropic]
model = "claude-sonnet-4-5"
models = { tester = "claude-haiku-4-5" }
[backends.openai]
model = "qwen2.5-coder"
[roles.builder]
model = "claude-haiku-4-5"
[roles.reviewer]
model = "claude-opus-4-5"
"#,
        );
        let m = |role, backend, model| b.model(&job(role, backend, model), backend);
        assert_eq!(
            m(Role::Reviewer, Backend::Anthropic, Some("claude-3-haiku")).as_deref(),
            Some("claude-3-haiku")
        );
        assert_eq!(
            m(Role::Tester, Backend::Anthropic, None).as_deref(),
            Some("claude-haiku-4-5")
        );
        assert_eq!(
            m(Role::Reviewer, Backend::Anthropic, None).as_deref(),
            Some("claude-opus-4-5")
        );
        assert_eq!(
            m(Role::Builder, Backend::ClaudeCode, None).as_deref(),
            Some("claude-haiku-4-5")
        );
        assert_eq!(
            m(Role::Analyst, Backend::Anthropic, None).as_deref(),
            Some("claude-sonnet-4-5")
        );
        // Role models are Claude names: an OpenAI-compatible server keeps its own.
        assert_eq!(
            m(Role::Reviewer, Backend::Openai, None).as_deref(),
            Some("qwen2.5-coder")
        );
        assert_eq!(m(Role::Analyst, Backend::ClaudeCode, None), None);
        let d = backends("");
        assert_eq!(
            d.model(
                &job(Role::Analyst, Backend::Anthropic, None),
                Backend::Anthropic
            )
            .as_deref(),
            Some(anthropic::DEFAULT_MODEL)
        );
    }

    #[test]
    fn the_job_names_the_backend_and_a_default_backend_only_replaces_sim() {
        let b = backends("");
        assert_eq!(
            b.pick(&job(Role::Builder, Backend::Sim, None)),
            Backend::Sim
        );
        assert_eq!(
            b.backend_for(&job(Role::Builder, Backend::Openai, None)),
            "openai"
        );
        let b = backends("default_backend = \"anthropic\"");
        assert_eq!(
            b.pick(&job(Role::Builder, Backend::Sim, None)),
            Backend::Anthropic
        );
        assert_eq!(
            b.pick(&job(Role::Builder, Backend::ClaudeCode, None)),
            Backend::ClaudeCode
        );
    }

    #[tokio::test]
    async fn an_unconfigured_command_backend_fails_clearly() {
        let b = backends("");
        let (events, _rx) = Events::new();
        let r = b
            .run_report(
                &job(Role::Builder, Backend::Command, None),
                events,
                CancellationToken::new(),
            )
            .await;
        match r.output.outcome {
            orch_shared::job::Outcome::Failure { reason, message } => {
                assert_eq!(reason, FailureReason::BadRequest);
                assert!(message.contains("[backends.command]"), "{message}");
            }
            o => panic!("{o:?}"),
        }
    }
}
