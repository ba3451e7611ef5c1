//! Worker configuration: one serde struct of settings with their defaults (`Settings`),
//! layered by [`orch_config::Loader`] (defaults < TOML file `--config` < environment < flags)
//! and checked once into [`Config`]. [`Args`] declares only the command line: each flag's id is
//! its setting's key (`--claude-bin` sets `backends.claude-code.bin`) and its `env` the variable.
//!
//! Besides the cluster settings, the file configures the agent backends (`[backends.*]`: the
//! providers' URLs and keys, models, the Claude Code CLI), the roles (`[roles.*]`, see
//! [`crate::roles`]), the price table (`[prices."model"]`, see
//! [`crate::agent::pricing`]) and the native tool loop's limits (`[agent]`, [`LoopSettings`]). Provider settings also come from the providers' usual
//! environment variables (`ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY`, `OPENAI_BASE_URL`,
//! `OPENAI_API_KEY`) and the CLI's path from `ORCH_CLAUDE_BIN`. Keys are [`Secret`]s: their
//! `Debug` never shows them.

use crate::agent::pricing::{Price, PriceTable};
use crate::roles::{self, Key, Roles};
use clap::{ArgMatches, CommandFactory, Parser};
pub use orch_config::Error;
use orch_shared::job::Backend;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The bounds of `pull_expires`: a pull shorter than this is a busy loop, and JetStream
/// forgets a request whose client vanished only when it expires.
const MIN_PULL_EXPIRES: Duration = Duration::from_millis(100);
const MAX_PULL_EXPIRES: Duration = Duration::from_secs(3600);

/// Command-line flags; every one can also come from the environment or the config file. Each
/// flag's id is its setting's key in [`Settings`] (`--claude-bin` is `backends.claude-code.bin`);
/// values are parsed with the file's, by [`load`].
#[derive(Parser, Debug, Default)]
#[command(
    name = "orch-worker",
    version,
    about = "The orchestrator worker: pulls agent jobs and runs them"
)]
pub struct Args {
    /// TOML file with any of the settings below (flag and environment values win).
    #[arg(long, env = "ORCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server, or a comma-separated list of a cluster's servers
    /// (`nats://a:4222,nats://b:4222`) [default: nats://127.0.0.1:4222]
    #[arg(long, env = "ORCH_NATS_URL")]
    pub nats_url: Option<String>,
    /// TLS and credentials for NATS (`[nats]` in the file).
    #[command(flatten)]
    pub nats: orch_config::nats::NatsArgs,
    /// Redis URL; `rediss://` for TLS, verified against the system roots or the CA bundle in
    /// SSL_CERT_FILE [default: redis://127.0.0.1:6379]
    #[arg(long, env = "ORCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// ACL credentials and Sentinel for Redis (`[redis]` in the file).
    #[command(flatten)]
    pub redis: orch_config::redis::RedisArgs,
    /// Agents this worker runs at once [default: 4].
    #[arg(long, env = "ORCH_SLOTS")]
    pub slots: Option<String>,
    /// This worker's name in the cluster (default: host-pid-random).
    #[arg(long, env = "ORCH_WORKER_ID")]
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight jobs may run on before they are handed back [default: 30s].
    #[arg(long, env = "ORCH_DRAIN_GRACE")]
    pub drain_grace: Option<String>,
    /// How long an open pull request for jobs waits on an empty queue before it is renewed
    /// [default: 5s]. It holds no slot and a shutdown does not wait for it: a longer one only
    /// means fewer requests from an idle worker.
    #[arg(long, env = "ORCH_PULL_EXPIRES")]
    pub pull_expires: Option<String>,
    /// A git job whose plan step declared its file scope (`paths`) checks out only the
    /// directories of that scope and the top-level files, unless its task says otherwise
    /// (`submit --sparse-checkout`, `.orch.toml` `sparse_checkout`) [default: false].
    #[arg(
        id = "workspace.sparse",
        long = "workspace-sparse",
        value_name = "BOOL",
        env = "ORCH_WORKSPACE_SPARSE"
    )]
    pub workspace_sparse: Option<String>,
    /// Checkpoint running agents (conversation and workspace) so another worker resumes them
    /// instead of starting over [default: true].
    #[arg(
        id = "checkpoints.enabled",
        long = "checkpoints",
        value_name = "BOOL",
        env = "ORCH_CHECKPOINTS"
    )]
    pub checkpoints: Option<String>,
    /// At most one checkpoint per this interval, besides one after every step that may have
    /// changed files [default: 5s].
    #[arg(
        id = "checkpoints.interval",
        long = "checkpoint-interval",
        value_name = "DURATION",
        env = "ORCH_CHECKPOINT_INTERVAL"
    )]
    pub checkpoint_interval: Option<String>,
    /// Checkpoints kept per agent, for rewinds; older ones are deleted [default: 20].
    #[arg(
        id = "checkpoints.keep",
        long = "checkpoint-keep",
        value_name = "N",
        env = "ORCH_CHECKPOINT_KEEP"
    )]
    pub checkpoint_keep: Option<String>,
    /// On SIGTERM, checkpoint agents that can be resumed and hand them back at once instead
    /// of letting them run on through the drain grace [default: true].
    #[arg(
        id = "checkpoints.migrate_on_drain",
        long = "migrate-on-drain",
        value_name = "BOOL",
        env = "ORCH_MIGRATE_ON_DRAIN"
    )]
    pub migrate_on_drain: Option<String>,
    /// Write the checkpoints of a repository on a local path (a bare repository on this
    /// machine or a shared volume) straight into its object store instead of pushing them
    /// [default: true].
    #[arg(
        id = "checkpoints.direct",
        long = "checkpoint-direct",
        value_name = "BOOL",
        env = "ORCH_CHECKPOINT_DIRECT"
    )]
    pub checkpoint_direct: Option<String>,
    /// The largest scratch workspace tree a checkpoint stores (as a git bundle in the sessions
    /// store, at most 67108864); a larger one is not checkpointed and a `checkpoint_skipped`
    /// event says so [default: 67108864].
    #[arg(
        id = "checkpoints.max_tree_bytes",
        long = "checkpoint-max-tree-bytes",
        value_name = "BYTES",
        env = "ORCH_CHECKPOINT_MAX_TREE_BYTES"
    )]
    pub checkpoint_max_tree_bytes: Option<String>,
    /// Every Nth checkpoint of an agent adds its whole tree; the others bring in only the
    /// files the steps' file tools named, when no shell or other tool ran (1: every
    /// checkpoint adds the whole tree) [default: 10].
    #[arg(
        id = "checkpoints.full_every",
        long = "checkpoint-full-every",
        value_name = "N",
        env = "ORCH_CHECKPOINT_FULL_EVERY"
    )]
    pub checkpoint_full_every: Option<String>,
    /// How long an agent's request for a person's approval waits before it is denied
    /// (`orchctl approvals`) [default: 10m].
    #[arg(
        id = "approvals.timeout",
        long = "approval-timeout",
        value_name = "DURATION",
        env = "ORCH_APPROVAL_TIMEOUT"
    )]
    pub approval_timeout: Option<String>,
    /// Park an agent whose approval request is unanswered for this long: checkpointed, its
    /// slot released, resumed on any worker once answered (`0s`: never) [default: 2m].
    #[arg(
        id = "approvals.park_after",
        long = "approval-park-after",
        value_name = "DURATION",
        env = "ORCH_APPROVAL_PARK_AFTER"
    )]
    pub approval_park_after: Option<String>,
    /// POST every new approval request to this URL (JSON, signed with HMAC-SHA256 in
    /// `X-Orch-Signature: sha256=<hex>`), for chat tools.
    #[arg(
        id = "approvals.webhook_url",
        long = "approval-webhook-url",
        value_name = "URL",
        env = "ORCH_APPROVAL_WEBHOOK_URL"
    )]
    pub approval_webhook_url: Option<String>,
    /// The webhook's signing secret (required with the URL).
    #[arg(
        id = "approvals.webhook_secret",
        long = "approval-webhook-secret",
        value_name = "SECRET",
        env = "ORCH_APPROVAL_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub approval_webhook_secret: Option<String>,
    /// Serve /healthz and /metrics on this address (off when unset).
    #[arg(long, env = "ORCH_WORKER_LISTEN")]
    pub listen: Option<String>,
    /// Log format: pretty or json.
    #[arg(long, env = "ORCH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Where traces go (`[telemetry]` in the file).
    #[command(flatten)]
    pub telemetry: orch_config::telemetry::TelemetryArgs,
    /// Where scratch workspaces and the Claude Code CLI's home live (default: a directory
    /// named after the worker under the system's temporary directory).
    #[arg(long, env = "ORCH_WORKER_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Run jobs that name the `sim` backend (the coordinator's default when a task names none)
    /// on this backend instead: claude-code, anthropic, openai or command.
    #[arg(long, env = "ORCH_DEFAULT_BACKEND")]
    pub default_backend: Option<String>,
    /// The backends whose jobs this worker pulls, comma separated (sim, claude-code,
    /// anthropic, openai, command). Default: every backend this worker can run — `sim`
    /// always, `claude-code` when its CLI is found, `anthropic` with an API key, `openai` with
    /// a base URL, `command` with a program. Jobs of other backends never reach it.
    #[arg(
        long = "serve-backends",
        value_name = "BACKENDS",
        env = "ORCH_SERVE_BACKENDS",
        value_delimiter = ','
    )]
    pub serve_backends: Vec<String>,
    /// The Claude Code CLI (default: `claude` on PATH).
    #[arg(
        id = "backends.claude-code.bin",
        long = "claude-bin",
        value_name = "CLAUDE_BIN",
        env = "ORCH_CLAUDE_BIN"
    )]
    pub claude_bin: Option<String>,
    /// HOME of the Claude Code CLI, where it keeps settings and transcripts (default:
    /// `<data-dir>/claude-home`).
    #[arg(
        id = "backends.claude-code.home",
        long = "claude-home",
        value_name = "CLAUDE_HOME",
        env = "ORCH_CLAUDE_HOME"
    )]
    pub claude_home: Option<String>,
    /// Anthropic API base URL (without `/v1`), for the `anthropic` and `claude-code` backends.
    #[arg(
        id = "backends.anthropic.base_url",
        long = "anthropic-base-url",
        value_name = "ANTHROPIC_BASE_URL",
        env = "ANTHROPIC_BASE_URL"
    )]
    pub anthropic_base_url: Option<String>,
    /// Anthropic API key (prefer the environment variable: flags show in `ps`).
    #[arg(
        id = "backends.anthropic.api_key",
        long = "anthropic-api-key",
        value_name = "ANTHROPIC_API_KEY",
        env = "ANTHROPIC_API_KEY",
        hide_env_values = true
    )]
    pub anthropic_api_key: Option<String>,
    /// OpenAI-compatible server base URL, with its `/v1` (vLLM, llama.cpp server, Ollama).
    #[arg(
        id = "backends.openai.base_url",
        long = "openai-base-url",
        value_name = "OPENAI_BASE_URL",
        env = "OPENAI_BASE_URL"
    )]
    pub openai_base_url: Option<String>,
    /// Key for the OpenAI-compatible server (prefer the environment variable).
    #[arg(
        id = "backends.openai.api_key",
        long = "openai-api-key",
        value_name = "OPENAI_API_KEY",
        env = "OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub openai_api_key: Option<String>,
    /// The agent sandbox: `on` (the default: every agent process runs in a bubblewrap sandbox
    /// without secrets, see `[sandbox]`) or `off` (agents run with the worker's rights; logged
    /// as a warning at start).
    #[arg(
        id = "sandbox.mode",
        long = "sandbox",
        value_name = "SANDBOX",
        env = "ORCH_SANDBOX"
    )]
    pub sandbox: Option<String>,
    /// Native tool loop: requests per agent turn when neither the job nor the role sets a
    /// limit [default: 100].
    #[arg(
        id = "agent.max_turns",
        long = "max-turns",
        value_name = "N",
        env = "ORCH_MAX_TURNS"
    )]
    pub max_turns: Option<String>,
    /// Native tool loop: how long a `bash` call runs when the model gives no timeout
    /// [default: 2m].
    #[arg(
        id = "agent.bash_timeout",
        long = "bash-timeout",
        value_name = "DURATION",
        env = "ORCH_BASH_TIMEOUT"
    )]
    pub bash_timeout: Option<String>,
    /// Native tool loop: the longest a `bash` call may run, whatever the model asks
    /// [default: 10m].
    #[arg(
        id = "agent.bash_max_timeout",
        long = "bash-max-timeout",
        value_name = "DURATION",
        env = "ORCH_BASH_MAX_TIMEOUT"
    )]
    pub bash_max_timeout: Option<String>,
    /// Native tool loop: the most bytes of one tool result the model gets (the rest is cut
    /// with a note) [default: 30000].
    #[arg(
        id = "agent.max_result_bytes",
        long = "tool-result-max-bytes",
        value_name = "BYTES",
        env = "ORCH_TOOL_RESULT_MAX_BYTES"
    )]
    pub max_result_bytes: Option<String>,
    /// Native tool loop: above this fraction of the model's context window, tool results the
    /// model has already seen are shortened to a note [default: 0.8].
    #[arg(
        id = "agent.elide_above",
        long = "elide-above",
        value_name = "FRACTION",
        env = "ORCH_ELIDE_ABOVE"
    )]
    pub elide_above: Option<String>,
    /// Native tool loop: above this fraction of the model's context window (after shortening
    /// tool results), the earlier conversation is summarized by one model request
    /// [default: 0.9].
    #[arg(
        id = "agent.compact_above",
        long = "compact-above",
        value_name = "FRACTION",
        env = "ORCH_COMPACT_ABOVE"
    )]
    pub compact_above: Option<String>,
    /// Native tool loop: the latest tool rounds a compaction keeps word for word [default: 2].
    #[arg(
        id = "agent.keep_rounds",
        long = "compact-keep-rounds",
        value_name = "N",
        env = "ORCH_COMPACT_KEEP_ROUNDS"
    )]
    pub keep_rounds: Option<String>,
    /// Native tool loop: how long an MCP server may take to start and list its tools before
    /// the job fails [default: 30s].
    #[arg(
        id = "agent.mcp_start_timeout",
        long = "mcp-start-timeout",
        value_name = "DURATION",
        env = "ORCH_MCP_START_TIMEOUT"
    )]
    pub mcp_start_timeout: Option<String>,
}

/// A credential. Its `Debug` and `Display` never show it; [`Secret::expose`] does.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Every setting with its default, as the TOML file spells it. Unknown keys are refused.
#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    nats_url: String,
    nats: orch_config::nats::NatsSettings,
    redis_url: String,
    redis: orch_config::redis::RedisSettings,
    slots: u32,
    /// `None`: [`default_id`].
    id: Option<String>,
    #[serde(with = "humantime_serde")]
    drain_grace: Duration,
    #[serde(with = "humantime_serde")]
    pull_expires: Duration,
    listen: Option<SocketAddr>,
    log_format: LogFormat,
    telemetry: orch_config::telemetry::TelemetrySettings,
    /// `None`: `orch-worker-<id>` under the system's temporary directory.
    data_dir: Option<PathBuf>,
    default_backend: Option<String>,
    /// Empty: every backend this worker can run ([`BackendSettings::runnable`]).
    serve_backends: Vec<String>,
    backends: BackendsFile,
    roles: BTreeMap<String, roles::Override>,
    prices: BTreeMap<String, Price>,
    agent: LoopSettings,
    sandbox: SandboxFile,
    checkpoints: CheckpointSettings,
    approvals: ApprovalSettings,
    workspace: WorkspaceSettings,
}

/// `[workspace]`: how git workspaces are made (see [`crate::agent::git`]).
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkspaceSettings {
    /// A job with a declared file scope gets a sparse checkout of it when its task does not
    /// say (`GitJob::sparse`).
    pub sparse: bool,
}

/// `[approvals]`: the approval broker (see [`crate::approvals`]).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalSettings {
    /// How long a request waits for a person before it is denied (the agent is told why).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long an agent waits for an answer holding its slot; then it is checkpointed and
    /// parked until the answer (or the deadline). Zero: it never is.
    #[serde(with = "humantime_serde")]
    pub park_after: Duration,
    /// Where every new request is POSTed (signed), if anywhere.
    pub webhook_url: Option<String>,
    /// The webhook's HMAC-SHA256 key.
    pub webhook_secret: Option<Secret>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            park_after: Duration::from_secs(120),
            webhook_url: None,
            webhook_secret: None,
        }
    }
}

/// `[sandbox]`: see [`crate::sandbox`].
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct SandboxFile {
    /// `on` or `off`.
    mode: Option<String>,
    bwrap: Option<PathBuf>,
    /// Replaces the default toolchain paths (`~/.cargo/bin`, `~/.rustup`).
    read_only: Option<Vec<PathBuf>>,
    /// 0: no limit.
    memory_max_mb: Option<u64>,
    /// 0: no limit.
    pids_max: Option<u64>,
    /// Cores; 0: no limit.
    #[serde(default, deserialize_with = "orch_config::exact_f64_opt")]
    cpus: Option<f64>,
}

impl SandboxFile {
    fn check(self) -> Result<crate::sandbox::Settings, Error> {
        let mut s = crate::sandbox::Settings::default();
        match self.mode.as_deref().map(|m| m.trim().to_ascii_lowercase()) {
            None => {}
            Some(m) if m == "on" => s.enabled = true,
            Some(m) if m == "off" => s.enabled = false,
            Some(m) => {
                return Err(Error::invalid(
                    "sandbox.mode",
                    format!("expected on or off, got `{m}`"),
                ));
            }
        }
        if let Some(b) = self.bwrap {
            s.bwrap = b;
        }
        if let Some(r) = self.read_only {
            if let Some(p) = r.iter().find(|p| !p.is_absolute()) {
                return Err(Error::invalid(
                    "sandbox.read_only",
                    format!("`{}` is not an absolute path", p.display()),
                ));
            }
            s.read_only = r;
        }
        if let Some(mb) = self.memory_max_mb {
            s.memory_max = (mb > 0).then_some(mb << 20);
        }
        if let Some(n) = self.pids_max {
            s.pids_max = (n > 0).then_some(n);
        }
        if let Some(c) = self.cpus {
            s.cpus = crate::roles::check_cpus(c).map_err(|e| Error::invalid("sandbox.cpus", e))?;
        }
        Ok(s)
    }
}

/// `[checkpoints]`: how running agents are checkpointed (see [`crate::custody`]).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSettings {
    pub enabled: bool,
    /// At most one checkpoint per interval, besides one after each step that may have
    /// changed files.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Checkpoints kept per agent (older ones are deleted).
    pub keep: u32,
    /// How long an agent's checkpoints are kept in Redis (the task's clean-up removes them
    /// sooner).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// On SIGTERM, checkpoint resumable agents and hand them back at once.
    pub migrate_on_drain: bool,
    /// A repository on a local path gets its checkpoints written straight into its object
    /// store (a pack and a compare-and-swap of the ref) instead of a push.
    pub direct: bool,
    /// The largest scratch workspace tree (its git bundle) a checkpoint stores.
    pub max_tree_bytes: u64,
    /// Every Nth checkpoint adds the whole tree; the others only the files the steps' file
    /// tools named (when only file tools ran).
    pub full_every: u32,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(5),
            keep: 20,
            retention: Duration::from_secs(7 * 24 * 3600),
            migrate_on_drain: true,
            direct: true,
            max_tree_bytes: orch_shared::job::MAX_TREE_BUNDLE_BYTES as u64,
            full_every: 10,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: Default::default(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis: Default::default(),
            slots: 4,
            id: None,
            drain_grace: Duration::from_secs(30),
            pull_expires: Duration::from_secs(5),
            listen: None,
            log_format: LogFormat::Pretty,
            telemetry: Default::default(),
            data_dir: None,
            default_backend: None,
            serve_backends: vec![],
            backends: BackendsFile::default(),
            roles: BTreeMap::new(),
            prices: BTreeMap::new(),
            sandbox: SandboxFile::default(),
            agent: LoopSettings::default(),
            checkpoints: CheckpointSettings::default(),
            workspace: WorkspaceSettings::default(),
            approvals: ApprovalSettings::default(),
        }
    }
}

/// The native tool loop of the `anthropic` and `openai` backends (`[agent]`); see
/// [`crate::agent::tool_loop`]. The turn limit and the `bash` timeout can also be set per
/// role (`[roles.<name>] max_turns`, `bash_timeout`).
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoopSettings {
    /// Requests per turn when neither the job nor the role sets a limit.
    pub max_turns: u32,
    /// A `bash` call's timeout when the model gives none.
    #[serde(with = "humantime_serde")]
    pub bash_timeout: Duration,
    /// The longest timeout a `bash` call may ask for.
    #[serde(with = "humantime_serde")]
    pub bash_max_timeout: Duration,
    /// The most bytes of one tool result (file, listing, search or command output).
    pub max_result_bytes: usize,
    /// The window fraction above which tool results already seen are shortened.
    pub elide_above: f64,
    /// The window fraction above which the earlier conversation is compacted into a summary.
    pub compact_above: f64,
    /// The latest tool rounds a compaction keeps as they are.
    pub keep_rounds: usize,
    /// How long an MCP server may take to start and list its tools.
    #[serde(with = "humantime_serde")]
    pub mcp_start_timeout: Duration,
}

impl Default for LoopSettings {
    fn default() -> Self {
        Self {
            max_turns: 100,
            bash_timeout: Duration::from_secs(120),
            bash_max_timeout: Duration::from_secs(600),
            max_result_bytes: 30_000,
            elide_above: 0.8,
            compact_above: 0.9,
            keep_rounds: 2,
            mcp_start_timeout: Duration::from_secs(30),
        }
    }
}

impl LoopSettings {
    fn check(self) -> Result<Self, Error> {
        let fraction = |key: &str, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    key,
                    format!("must be a fraction above 0 and at most 1, got {v}"),
                ))
            }
        };
        if !(1..=100_000).contains(&self.max_turns) {
            return Err(Error::invalid(
                "agent.max_turns",
                "must be between 1 and 100000",
            ));
        }
        if self.bash_timeout.is_zero() {
            return Err(Error::invalid(
                "agent.bash_timeout",
                "must be longer than 0s",
            ));
        }
        if self.bash_max_timeout < self.bash_timeout {
            return Err(Error::invalid(
                "agent.bash_max_timeout",
                "must not be shorter than agent.bash_timeout",
            ));
        }
        if !(1_024..=10_000_000).contains(&self.max_result_bytes) {
            return Err(Error::invalid(
                "agent.max_result_bytes",
                "must be between 1024 and 10000000",
            ));
        }
        fraction("agent.elide_above", self.elide_above)?;
        fraction("agent.compact_above", self.compact_above)?;
        if self.keep_rounds > 1_000 {
            return Err(Error::invalid("agent.keep_rounds", "must be at most 1000"));
        }
        if self.mcp_start_timeout.is_zero() {
            return Err(Error::invalid(
                "agent.mcp_start_timeout",
                "must be longer than 0s",
            ));
        }
        Ok(self)
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct BackendsFile {
    /// Also `[backends.claude_code]` (renamed by [`load`]).
    #[serde(rename = "claude-code")]
    claude_code: Option<ClaudeCodeFile>,
    anthropic: Option<ApiFile>,
    openai: Option<ApiFile>,
    command: Option<CommandFile>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct ClaudeCodeFile {
    bin: Option<PathBuf>,
    home: Option<PathBuf>,
    model: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, String>,
    mcp_config: Option<String>,
    max_retries: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct ApiFile {
    base_url: Option<String>,
    api_key: Option<Secret>,
    /// A pool of named credentials (see [`Credential`]); `api_key` alone is the pool `default`.
    #[serde(default)]
    credentials: Vec<CredentialFile>,
    model: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, String>,
    max_tokens: Option<u32>,
    max_attempts: Option<u32>,
    #[serde(with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    retry_min_delay: Option<Duration>,
    #[serde(with = "humantime_serde")]
    retry_max_delay: Option<Duration>,
    #[serde(with = "humantime_serde")]
    max_retry_after: Option<Duration>,
}

/// One named credential as the file spells it: the key itself, a file holding it (a mounted
/// Kubernetes Secret) or the environment variable holding it, exactly one of the three.
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct CredentialFile {
    name: String,
    api_key: Option<Secret>,
    api_key_file: Option<PathBuf>,
    api_key_env: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CommandFile {
    program: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    prompt: Option<String>,
    model: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    pass_env: Vec<String>,
}

/// Models per role for one backend (`[backends.<name>.models]`), and its default model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Models {
    pub default: Option<String>,
    pub by_role: BTreeMap<Key, String>,
}

impl Models {
    fn load(
        section: &str,
        default: Option<String>,
        by_role: BTreeMap<String, String>,
    ) -> Result<Self, Error> {
        let mut out = Models {
            default: non_empty(&format!("{section}.model"), default)?,
            by_role: BTreeMap::new(),
        };
        for (name, model) in by_role {
            let key = Key::parse(&name)
                .map_err(|e| Error::Invalid(format!("{section}.models.{name}: {e}")))?;
            let model = non_empty(&format!("{section}.models.{name}"), Some(model))?;
            out.by_role.insert(key, model.unwrap_or_default());
        }
        Ok(out)
    }
}

/// The `claude-code` backend: the CLI, its home and what it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaudeCodeSettings {
    /// The CLI; a bare name is looked up on PATH.
    pub bin: PathBuf,
    pub home: PathBuf,
    pub models: Models,
    /// `--mcp-config`: a JSON string or a file (with `--strict-mcp-config`).
    pub mcp_config: Option<String>,
    /// `CLAUDE_CODE_MAX_RETRIES`: how often the CLI retries a failed API call itself.
    pub max_retries: Option<u32>,
    /// More environment variables for the CLI.
    pub env: BTreeMap<String, String>,
    /// More arguments for the CLI.
    pub args: Vec<String>,
}

/// One named credential of a backend's pool. Only its name is ever shown (logs, events, the
/// API, `orchctl quotas`); `Debug` redacts the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub key: Secret,
}

/// An HTTP provider (`anthropic` or `openai`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSettings {
    /// `None`: the provider's default (the `openai` backend has none and needs one).
    pub base_url: Option<String>,
    /// The first credential's key (what a backend without a pool uses).
    pub api_key: Option<Secret>,
    /// The credential pool, in the order jobs fill it: a job takes the first credential the
    /// limit broker says has room. Empty when no key is configured.
    pub credentials: Vec<Credential>,
    pub models: Models,
    /// The answer's token limit (`anthropic` needs one; `openai` sends it only when set).
    pub max_tokens: Option<u32>,
    /// Requests per job before the job fails with a retryable reason (the coordinator then
    /// retries the job with its own backoff).
    pub max_attempts: u32,
    pub request_timeout: Duration,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    /// A `retry-after` longer than this fails the attempt at once (the coordinator retries).
    pub max_retry_after: Duration,
    /// Set per job when the limit broker chose the credential: a 429 is not retried in place
    /// (the job moves to another credential or parks until the reset).
    pub park_on_limit: bool,
}

impl ApiSettings {
    fn defaults(max_tokens: Option<u32>) -> Self {
        Self {
            base_url: None,
            api_key: None,
            credentials: vec![],
            models: Models::default(),
            max_tokens,
            max_attempts: 4,
            request_timeout: Duration::from_secs(600),
            retry_min_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            park_on_limit: false,
        }
    }
}

/// How the `command` backend hands the prompt to its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptVia {
    /// On standard input, which is then closed.
    Stdin,
    /// As the last argument.
    Arg,
}

/// The `command` backend: any program that reads a prompt and writes its answer on stdout.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSettings {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub prompt: PromptVia,
    pub models: Models,
    pub env: BTreeMap<String, String>,
    /// Variables of the worker's environment the program gets in the sandbox (where it gets
    /// none of the worker's otherwise; without the sandbox it gets them all).
    pub pass_env: Vec<String>,
}

/// Every backend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSettings {
    pub claude_code: ClaudeCodeSettings,
    pub anthropic: ApiSettings,
    pub openai: ApiSettings,
    /// `None` until `[backends.command]` names a program.
    pub command: Option<CommandSettings>,
}

impl BackendSettings {
    /// The backends this worker can run: `sim` always, `claude-code` when its CLI is an
    /// executable file (a path, or a name on PATH), `anthropic` with a key, `openai` with a
    /// base URL (a local server may need no key), `command` with a program.
    pub fn runnable(&self) -> Vec<Backend> {
        let mut out = vec![Backend::Sim];
        if crate::agent::process::resolve(self.claude_code.bin.as_os_str()).is_some() {
            out.push(Backend::ClaudeCode);
        }
        if self.anthropic.api_key.is_some() || !self.anthropic.credentials.is_empty() {
            out.push(Backend::Anthropic);
        }
        if self.openai.base_url.is_some() {
            out.push(Backend::Openai);
        }
        if self.command.is_some() {
            out.push(Backend::Command);
        }
        out
    }

    /// Why `backend` cannot run here, naming what sets it up.
    fn missing(backend: Backend) -> String {
        match backend {
            Backend::Sim => "sim always runs".into(),
            Backend::ClaudeCode => {
                "claude-code needs the Claude Code CLI: set backends.claude-code.bin (--claude-bin) to an executable".into()
            }
            Backend::Anthropic => {
                "anthropic needs a key: set backends.anthropic.api_key (ANTHROPIC_API_KEY) or credentials".into()
            }
            Backend::Openai => {
                "openai needs a server: set backends.openai.base_url (OPENAI_BASE_URL)".into()
            }
            Backend::Command => "command needs [backends.command] with a program".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// TLS and credentials for NATS.
    pub nats: orch_config::nats::Nats,
    /// Where Redis is (a URL or Sentinel) and its credentials.
    pub redis: orch_config::redis::Redis,
    pub slots: u32,
    pub id: String,
    pub drain_grace: Duration,
    /// How long an open pull request waits on an empty queue (see `lib.rs`, `Pulling`).
    pub pull_expires: Duration,
    pub listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Where spans are exported (none by default).
    pub telemetry: orch_config::telemetry::Telemetry,
    /// Scratch workspaces (`<data_dir>/scratch/<job>-<attempt>`) and the CLI's home.
    pub data_dir: PathBuf,
    /// Jobs naming `sim` run on this backend instead (`orchctl local up --backend`).
    pub default_backend: Option<Backend>,
    /// The backends whose jobs this worker pulls (`--serve-backends`, else every one it can
    /// run), in [`Backend`] order, without repeats.
    pub serves: Vec<Backend>,
    pub backends: BackendSettings,
    pub roles: Roles,
    pub prices: PriceTable,
    /// The agent sandbox (`[sandbox]`, `--sandbox`).
    pub sandbox: crate::sandbox::Settings,
    pub tool_loop: LoopSettings,
    pub checkpoints: CheckpointSettings,
    pub approvals: ApprovalSettings,
    /// `[workspace]`.
    pub workspace: WorkspaceSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A default worker id: host, pid and a random suffix, unique across restarts.
pub fn default_id() -> String {
    let host = hostname();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

pub fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Loads the configuration from parsed command-line arguments, the environment (read with `env`,
/// `std::env::var` outside tests) and the file `--config` / `ORCH_CONFIG` names.
pub fn load(matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
    let mut loader = orch_config::Loader::new();
    // clap reads ORCH_CONFIG too, so this is the flag, else the environment variable.
    if let Some(path) = matches.get_one::<PathBuf>("config") {
        let mut file = orch_config::read_toml(path)?;
        // `[backends.claude_code]` is also accepted; under its canonical name it merges with
        // `--claude-bin` and `--claude-home` instead of standing beside them.
        if let Some(toml::Value::Table(backends)) = file.get_mut("backends")
            && !backends.contains_key("claude-code")
            && let Some(section) = backends.remove("claude_code")
        {
            backends.insert("claude-code".into(), section);
        }
        loader = loader.serialized(orch_config::FILE, &file)?;
    }
    loader
        .args(&Args::command(), matches, env, &["config"])
        .extract::<Settings>()?
        .check(env)
}

/// Loads the configuration from these flags (without the program name) alone, with no
/// environment: for tests, which pass config values directly.
pub fn from_flags<I, T>(flags: I) -> Result<Config, Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = orch_config::parse_flags(Args::command(), flags)?;
    load(&matches, &|_| None)
}

impl Settings {
    /// The checks no type expresses; each error names its key.
    fn check(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
        let nats = self.nats.check()?;
        let telemetry = self.telemetry.check(env)?;
        let redis = self.redis.check(&self.redis_url)?;
        if self.slots == 0 || self.slots > 10_000 {
            return Err(Error::invalid("slots", "must be between 1 and 10000"));
        }
        if self.pull_expires < MIN_PULL_EXPIRES || self.pull_expires > MAX_PULL_EXPIRES {
            return Err(Error::invalid(
                "pull_expires",
                "must be between 100ms and 1h",
            ));
        }
        let id = self.id.unwrap_or_else(default_id);
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(Error::invalid("id", "must be non-empty without spaces"));
        }
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("orch-worker-{id}")));
        let default_backend = match self.default_backend {
            None => None,
            Some(name) => match parse_backend(&name) {
                Some(Backend::Sim) => None,
                Some(b) => Some(b),
                None => {
                    return Err(Error::invalid(
                        "default-backend",
                        format!(
                            "expected sim, claude-code, anthropic, openai or command, got `{name}`"
                        ),
                    ));
                }
            },
        };
        let backends = BackendSettings::load(self.backends, &data_dir)?;
        if default_backend == Some(Backend::Command) && backends.command.is_none() {
            return Err(Error::invalid(
                "default-backend",
                "`command` needs [backends.command] with a program",
            ));
        }
        let serves = serves(&self.serve_backends, &backends)?;
        let roles = Roles::with_overrides(&self.roles).map_err(Error::Invalid)?;
        let prices = PriceTable::with_overrides(&self.prices).map_err(Error::Invalid)?;
        let sandbox = self.sandbox.check()?;
        let tool_loop = self.agent.check()?;
        if self.checkpoints.keep == 0 || self.checkpoints.keep > 10_000 {
            return Err(Error::invalid(
                "checkpoints.keep",
                "must be between 1 and 10000",
            ));
        }
        let bound = orch_shared::job::MAX_TREE_BUNDLE_BYTES as u64;
        if self.checkpoints.max_tree_bytes == 0 || self.checkpoints.max_tree_bytes > bound {
            return Err(Error::invalid(
                "checkpoints.max_tree_bytes",
                format!("must be between 1 and {bound}"),
            ));
        }
        if self.checkpoints.full_every == 0 || self.checkpoints.full_every > 10_000 {
            return Err(Error::invalid(
                "checkpoints.full_every",
                "must be between 1 and 10000",
            ));
        }
        if self.checkpoints.retention < Duration::from_secs(60) {
            return Err(Error::invalid(
                "checkpoints.retention",
                "must be at least 1m",
            ));
        }
        if self.approvals.timeout < Duration::from_secs(1)
            || self.approvals.timeout > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(Error::invalid(
                "approvals.timeout",
                "must be between 1s and 7d",
            ));
        }
        if let Some(url) = &self.approvals.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::invalid(
                    "approvals.webhook_url",
                    format!("expected an http:// or https:// URL, got `{url}`"),
                ));
            }
            if self
                .approvals
                .webhook_secret
                .as_ref()
                .is_none_or(|s| s.expose().is_empty())
            {
                return Err(Error::invalid(
                    "approvals.webhook_secret",
                    "required with approvals.webhook_url (the requests are signed with it)",
                ));
            }
        }
        Ok(Config {
            nats_url: self.nats_url,
            nats,
            redis,
            slots: self.slots,
            id,
            drain_grace: self.drain_grace,
            pull_expires: self.pull_expires,
            listen: self.listen,
            log_format: self.log_format,
            telemetry,
            data_dir,
            default_backend,
            serves,
            backends,
            roles,
            prices,
            sandbox,
            tool_loop,
            checkpoints: self.checkpoints,
            workspace: self.workspace,
            approvals: self.approvals,
        })
    }
}

/// The backends a worker pulls jobs for: those named (each must be runnable here), else every
/// runnable one. `sim` is always runnable (with `--default-backend`, its jobs run on that
/// backend, which fails them with the reason when it is not set up).
fn serves(named: &[String], backends: &BackendSettings) -> Result<Vec<Backend>, Error> {
    const KEY: &str = "serve-backends";
    let runnable = backends.runnable();
    let mut out: Vec<Backend> = if named.iter().all(|n| n.trim().is_empty()) {
        runnable.clone()
    } else {
        let mut out = Vec::new();
        for name in named.iter().filter(|n| !n.trim().is_empty()) {
            let Some(b) = parse_backend(name) else {
                return Err(Error::invalid(
                    KEY,
                    format!(
                        "expected sim, claude-code, anthropic, openai or command, got `{name}`"
                    ),
                ));
            };
            if !runnable.contains(&b) {
                return Err(Error::invalid(KEY, BackendSettings::missing(b)));
            }
            out.push(b);
        }
        out
    };
    out.sort();
    out.dedup();
    Ok(out)
}

/// A backend by its protocol name (`claude-code`, also `claude_code`), case-insensitively.
pub fn parse_backend(name: &str) -> Option<Backend> {
    let lower = name.trim().to_ascii_lowercase().replace('_', "-");
    [
        Backend::Sim,
        Backend::ClaudeCode,
        Backend::Anthropic,
        Backend::Openai,
        Backend::Command,
    ]
    .into_iter()
    .find(|b| b.as_str() == lower)
}

fn non_empty(field: &str, value: Option<String>) -> Result<Option<String>, Error> {
    match value {
        Some(v) if v.trim().is_empty() => {
            Err(Error::Invalid(format!("{field}: must not be empty")))
        }
        v => Ok(v),
    }
}

fn base_url(field: &str, value: Option<String>) -> Result<Option<String>, Error> {
    match non_empty(field, value)? {
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
            Err(Error::Invalid(format!(
                "{field}: expected an http:// or https:// URL, got `{url}`"
            )))
        }
        url => Ok(url.map(|u| u.trim_end_matches('/').to_string())),
    }
}

impl ApiSettings {
    fn load(section: &str, file: ApiFile, max_tokens: Option<u32>) -> Result<Self, Error> {
        let d = Self::defaults(max_tokens);
        let max_attempts = file.max_attempts.unwrap_or(d.max_attempts);
        if !(1..=20).contains(&max_attempts) {
            return Err(Error::Invalid(format!(
                "{section}.max_attempts: must be between 1 and 20"
            )));
        }
        if file.max_tokens == Some(0) {
            return Err(Error::Invalid(format!(
                "{section}.max_tokens: must be positive"
            )));
        }
        let api_key = file.api_key.filter(|k| !k.expose().is_empty());
        let credentials = credentials(section, api_key, file.credentials)?;
        Ok(Self {
            base_url: base_url(&format!("{section}.base_url"), file.base_url)?,
            api_key: credentials.first().map(|c| c.key.clone()),
            credentials,
            models: Models::load(section, file.model, file.models)?,
            max_tokens: file.max_tokens.or(d.max_tokens),
            max_attempts,
            request_timeout: file.request_timeout.unwrap_or(d.request_timeout),
            retry_min_delay: file.retry_min_delay.unwrap_or(d.retry_min_delay),
            retry_max_delay: file.retry_max_delay.unwrap_or(d.retry_max_delay),
            max_retry_after: file.max_retry_after.unwrap_or(d.max_retry_after),
            park_on_limit: false,
        })
    }
}

/// The pool of `section`: `api_key` as `default` when no list is given, else the list (which
/// wins over `api_key`, so an `ANTHROPIC_API_KEY` left in the environment does not join a
/// configured pool), each entry read from its one source. Errors name the entry's key.
fn credentials(
    section: &str,
    api_key: Option<Secret>,
    list: Vec<CredentialFile>,
) -> Result<Vec<Credential>, Error> {
    if list.is_empty() {
        return Ok(api_key
            .map(|key| Credential {
                name: "default".into(),
                key,
            })
            .into_iter()
            .collect());
    }
    let mut out: Vec<Credential> = Vec::with_capacity(list.len());
    for (i, c) in list.into_iter().enumerate() {
        let at = format!("{section}.credentials[{i}]");
        let name = c.name.trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(Error::Invalid(format!(
                "{at}.name: expected letters, digits, '-', '_' or '.', got `{name}`"
            )));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(Error::Invalid(format!(
                "{at}.name: `{name}` is already in the pool"
            )));
        }
        let key = match (c.api_key, c.api_key_file, c.api_key_env) {
            (Some(k), None, None) => k.expose().trim().to_string(),
            (None, Some(path), None) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "{at}.api_key_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?
                .trim()
                .to_string(),
            (None, None, Some(var)) => std::env::var(&var)
                .map_err(|_| Error::Invalid(format!("{at}.api_key_env: `{var}` is not set")))?
                .trim()
                .to_string(),
            _ => {
                return Err(Error::Invalid(format!(
                    "{at}: give exactly one of api_key, api_key_file or api_key_env"
                )));
            }
        };
        if key.is_empty() {
            return Err(Error::Invalid(format!("{at}: the key is empty")));
        }
        out.push(Credential {
            name,
            key: Secret::new(key),
        });
    }
    Ok(out)
}

impl BackendSettings {
    fn load(file: BackendsFile, data_dir: &std::path::Path) -> Result<Self, Error> {
        let cc = file.claude_code.unwrap_or_default();
        let claude_code = ClaudeCodeSettings {
            bin: cc.bin.unwrap_or_else(|| PathBuf::from("claude")),
            home: cc.home.unwrap_or_else(|| data_dir.join("claude-home")),
            models: Models::load("backends.claude-code", cc.model, cc.models)?,
            mcp_config: non_empty("backends.claude-code.mcp_config", cc.mcp_config)?,
            max_retries: Some(cc.max_retries.unwrap_or(3)),
            env: cc.env,
            args: cc.args,
        };
        let anthropic = ApiSettings::load(
            "backends.anthropic",
            file.anthropic.unwrap_or_default(),
            Some(8192),
        )?;
        let openai = ApiSettings::load("backends.openai", file.openai.unwrap_or_default(), None)?;
        let command = match file.command {
            None => None,
            Some(c) => {
                if c.program.as_os_str().is_empty() {
                    return Err(Error::Invalid(
                        "backends.command.program: must not be empty".into(),
                    ));
                }
                let prompt = match c.prompt.as_deref().unwrap_or("stdin") {
                    "stdin" => PromptVia::Stdin,
                    "arg" => PromptVia::Arg,
                    other => {
                        return Err(Error::Invalid(format!(
                            "backends.command.prompt: expected stdin or arg, got `{other}`"
                        )));
                    }
                };
                Some(CommandSettings {
                    program: c.program,
                    args: c.args,
                    prompt,
                    models: Models::load("backends.command", c.model, c.models)?,
                    env: c.env,
                    pass_env: c.pass_env,
                })
            }
        };
        Ok(Self {
            claude_code,
            anthropic,
            openai,
            command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads with this file text (if any), environment and flags.
    fn load_with(
        file: Option<&str>,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Config, Error> {
        orch_config::test_support::load_with(Args::command(), file, env, flags, load)
    }

    fn from_file(text: &str) -> Result<Config, Error> {
        load_with(Some(text), &[], &[])
    }

    #[test]
    fn defaults_and_checks() {
        let cfg = from_flags::<_, &str>([]).unwrap();
        assert_eq!(cfg.slots, 4);
        assert_eq!(cfg.drain_grace, Duration::from_secs(30));
        assert_eq!(cfg.pull_expires, Duration::from_secs(5));
        assert!(cfg.id.contains('-'));
        let err = from_flags(["--slots", "0"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: slots: must be between 1 and 10000"
        );
    }

    #[test]
    fn the_pull_expiry_is_layered_and_bounded() {
        let file = Some("pull_expires = \"30s\"");
        let expires = |env: &[(&str, &str)], flags: &[&str]| {
            load_with(file, env, flags).unwrap().pull_expires
        };
        assert_eq!(expires(&[], &[]), Duration::from_secs(30));
        let env = [("ORCH_PULL_EXPIRES", "1m")];
        assert_eq!(expires(&env, &[]), Duration::from_secs(60));
        assert_eq!(
            expires(&env, &["--pull-expires", "250ms"]),
            Duration::from_millis(250)
        );
        for bad in ["10ms", "2h"] {
            let err = load_with(None, &[], &["--pull-expires", bad])
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                "invalid configuration: pull_expires: must be between 100ms and 1h"
            );
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
        let file = "slots = 2\ndrain_grace = \"5s\"\nnats_url = \"nats://file\"\n\
                    [backends.anthropic]\nbase_url = \"http://file\"\napi_key = \"file-key\"\nmax_attempts = 2\n";
        let cfg = load_with(Some(file), &[], &[]).unwrap();
        assert_eq!((cfg.slots, cfg.drain_grace), (2, Duration::from_secs(5)));
        assert_eq!(
            cfg.backends.anthropic.base_url.as_deref(),
            Some("http://file")
        );
        let env = [
            ("ORCH_SLOTS", "3"),
            ("ORCH_DRAIN_GRACE", "7s"),
            ("ANTHROPIC_BASE_URL", "http://env"),
            ("ANTHROPIC_API_KEY", "env-key"),
            ("ORCH_CLAUDE_BIN", "/env/claude"),
        ];
        let cfg = load_with(Some(file), &env, &[]).unwrap();
        assert_eq!((cfg.slots, cfg.drain_grace), (3, Duration::from_secs(7)));
        assert_eq!(cfg.nats_url, "nats://file");
        let a = &cfg.backends.anthropic;
        assert_eq!(a.base_url.as_deref(), Some("http://env"));
        assert_eq!(a.api_key.as_ref().map(Secret::expose), Some("env-key"));
        // A flag or variable for one backend key keeps the file's other keys.
        assert_eq!(a.max_attempts, 2);
        assert_eq!(cfg.backends.claude_code.bin, PathBuf::from("/env/claude"));
        let cfg = load_with(
            Some(file),
            &env,
            &[
                "--slots",
                "5",
                "--anthropic-base-url",
                "http://flag",
                "--claude-bin",
                "/flag/claude",
            ],
        )
        .unwrap();
        assert_eq!((cfg.slots, cfg.drain_grace), (5, Duration::from_secs(7)));
        assert_eq!(
            cfg.backends.anthropic.base_url.as_deref(),
            Some("http://flag")
        );
        assert_eq!(cfg.backends.claude_code.bin, PathBuf::from("/flag/claude"));
        let cfg = load_with(
            Some("[backends.claude_code]\nmodel = \"m\"\n"),
            &[],
            &["--claude-bin", "/flag/claude"],
        )
        .unwrap();
        assert_eq!(cfg.backends.claude_code.bin, PathBuf::from("/flag/claude"));
        assert_eq!(
            cfg.backends.claude_code.models.default.as_deref(),
            Some("m")
        );
    }

    #[test]
    fn a_worker_serves_the_backends_it_can_run_and_a_named_one_must_be_set_up() {
        let no_cli = ["--claude-bin", "/nonexistent/claude"];
        let cfg = load_with(
            None,
            &[("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")],
            &no_cli,
        )
        .unwrap();
        assert_eq!(cfg.serves, [Backend::Sim, Backend::Openai]);
        let err = load_with(
            None,
            &[],
            &[
                "--claude-bin",
                "/nonexistent/claude",
                "--serve-backends",
                "sim,anthropic",
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid configuration: serve-backends: anthropic needs a key"),
            "{err}"
        );
        let err = load_with(None, &[("ORCH_SERVE_BACKENDS", "gpt")], &no_cli)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("serve-backends: expected sim, claude-code"),
            "{err}"
        );
        let cfg = load_with(
            None,
            &[
                ("ANTHROPIC_API_KEY", "k"),
                ("ORCH_SERVE_BACKENDS", "anthropic"),
            ],
            &no_cli,
        )
        .unwrap();
        assert_eq!(cfg.serves, [Backend::Anthropic]);
    }

    #[test]
    fn a_bad_value_names_its_key_with_the_same_text_from_every_layer() {
        let want =
            "invalid configuration: drain-grace: expected a duration like 30s or 5m, got \"x\"";
        let err = |file: Option<&str>, env: &[(&str, &str)], flags: &[&str]| {
            load_with(file, env, flags).unwrap_err().to_string()
        };
        assert_eq!(err(Some("drain_grace = \"x\""), &[], &[]), want);
        assert_eq!(err(None, &[("ORCH_DRAIN_GRACE", "x")], &[]), want);
        assert_eq!(err(None, &[], &["--drain-grace", "x"]), want);
        assert_eq!(
            err(
                Some("[backends.openai]\nrequest_timeout = \"soon\""),
                &[],
                &[]
            ),
            "invalid configuration: backends.openai.request_timeout: expected a duration like 30s or 5m, got \"soon\""
        );
        assert_eq!(
            err(None, &[("ORCH_WORKER_LISTEN", "nowhere")], &[]),
            "invalid configuration: listen: invalid socket address syntax"
        );
    }

    #[test]
    fn sparse_checkout_is_off_by_default_and_set_from_every_layer() {
        assert!(!from_flags::<_, &str>([]).unwrap().workspace.sparse);
        assert!(
            from_file("[workspace]\nsparse = true\n")
                .unwrap()
                .workspace
                .sparse
        );
        let env = [("ORCH_WORKSPACE_SPARSE", "true")];
        assert!(load_with(None, &env, &[]).unwrap().workspace.sparse);
        let flag = ["--workspace-sparse", "false"];
        assert!(!load_with(None, &env, &flag).unwrap().workspace.sparse);
        let e = from_file("[workspace]\nsparse = \"often\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("workspace.sparse"), "{e}");
    }

    #[test]
    fn checkpoint_settings_come_from_every_layer_and_bad_ones_name_their_key() {
        let cfg = from_flags::<_, &str>([]).unwrap();
        assert_eq!(cfg.checkpoints, CheckpointSettings::default());
        let file = "[checkpoints]\ninterval = \"2s\"\nkeep = 3\nretention = \"1h\"\n";
        let env = [("ORCH_MIGRATE_ON_DRAIN", "false")];
        let cfg = load_with(
            Some(file),
            &env,
            &["--checkpoints", "false", "--checkpoint-direct", "false"],
        )
        .unwrap();
        let c = &cfg.checkpoints;
        assert_eq!(
            (c.enabled, c.interval, c.keep, c.migrate_on_drain, c.direct),
            (false, Duration::from_secs(2), 3, false, false)
        );
        assert_eq!(c.retention, Duration::from_secs(3600));
        let err = load_with(None, &[("ORCH_CHECKPOINT_KEEP", "0")], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: checkpoints.keep: must be between 1 and 10000"
        );
        let err = from_file("[checkpoints]\nretention = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoints.retention"), "{err}");
        let err = load_with(None, &[], &["--checkpoint-interval", "soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoints.interval"), "{err}");
        let cfg = load_with(None, &[("ORCH_CHECKPOINT_MAX_TREE_BYTES", "1000")], &[]).unwrap();
        assert_eq!(cfg.checkpoints.max_tree_bytes, 1000);
        let cfg = load_with(None, &[("ORCH_CHECKPOINT_FULL_EVERY", "1")], &[]).unwrap();
        assert_eq!(cfg.checkpoints.full_every, 1);
        let cfg = from_file("[checkpoints]\nfull_every = 4\n").unwrap();
        assert_eq!(cfg.checkpoints.full_every, 4);
        let err = load_with(None, &[], &["--checkpoint-full-every", "0"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: checkpoints.full_every: must be between 1 and 10000"
        );
        let err = load_with(None, &[], &["--checkpoint-max-tree-bytes", "100000000"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: checkpoints.max_tree_bytes: must be between 1 and 67108864"
        );
    }

    #[test]
    fn backend_defaults_need_no_file() {
        let cfg = from_flags(["--id", "w1"]).unwrap();
        assert!(cfg.data_dir.ends_with("orch-worker-w1"));
        assert_eq!(cfg.default_backend, None);
        let b = &cfg.backends;
        assert_eq!(b.claude_code.bin, PathBuf::from("claude"));
        assert_eq!(b.claude_code.home, cfg.data_dir.join("claude-home"));
        assert_eq!(b.anthropic.max_tokens, Some(8192));
        assert_eq!(b.anthropic.base_url, None);
        assert_eq!(b.openai.max_tokens, None);
        assert!(b.command.is_none());
        assert_eq!(cfg.roles, Roles::default());
    }

    #[test]
    fn the_file_configures_backends_roles_and_prices() {
        let cfg = from_file(
            r#"
data_dir = "/var/lib/orch"
default_backend = "claude-code"
[backends.claude-code]
bin = "/opt/claude"
model = "claude-sonnet-4-5"
models = { builder = "claude-haiku-4-5", workflow_planner = "claude-opus-4-5" }
env = { CLAUDE_CODE_MAX_OUTPUT_TOKENS = "16000" }
[backends.anthropic]
base_url = "http://127.0.0.1:9/"
api_key = "sk-ant-secret"
max_attempts = 2
retry_min_delay = "10ms"
[backends.openai]
base_url = "http://127.0.0.1:8000/v1"
model = "qwen2.5-coder"
[backends.command]
program = "/usr/bin/my-agent"
args = ["--quiet"]
prompt = "arg"
[roles.reviewer]
model = "claude-opus-4-5"
allowed_tools = ["Read", "mcp__files__read_text_file"]
mcp_servers.files = { command = "mcp-server-filesystem", args = ["."], env = { A = "b" } }
[roles.builder.mcp_servers.docs]
url = "https://mcp.example.com/mcp"
[prices."qwen2.5-coder"]
input = 0.1
output = 0.2
"#,
        )
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/orch"));
        assert_eq!(cfg.default_backend, Some(Backend::ClaudeCode));
        let reviewer = cfg
            .roles
            .profile(Key::Role(orch_shared::role::Role::Reviewer));
        let files = &reviewer.mcp_servers["files"];
        assert_eq!(files.command.as_deref(), Some("mcp-server-filesystem"));
        assert_eq!((files.args.len(), files.env["A"].as_str()), (1, "b"));
        assert!(reviewer.grants_mcp("files", "read_text_file"));
        let builder = cfg
            .roles
            .profile(Key::Role(orch_shared::role::Role::Builder));
        assert_eq!(
            builder.mcp_servers["docs"].url.as_deref(),
            Some("https://mcp.example.com/mcp")
        );
        let b = &cfg.backends;
        assert_eq!(b.claude_code.bin, PathBuf::from("/opt/claude"));
        assert_eq!(
            b.claude_code.home,
            PathBuf::from("/var/lib/orch/claude-home")
        );
        assert_eq!(
            b.claude_code
                .models
                .by_role
                .get(&Key::WorkflowPlanner)
                .map(String::as_str),
            Some("claude-opus-4-5")
        );
        assert_eq!(b.anthropic.base_url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(b.anthropic.retry_min_delay, Duration::from_millis(10));
        assert_eq!(b.anthropic.max_attempts, 2);
        // Keys never show in Debug output (logs, panics).
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("sk-ant-secret"), "{debug}");
        assert_eq!(
            b.anthropic.api_key.as_ref().unwrap().expose(),
            "sk-ant-secret"
        );
        assert_eq!(b.command.as_ref().unwrap().prompt, PromptVia::Arg);
        assert!(cfg.prices.lookup("qwen2.5-coder-7b").is_some());
        assert_eq!(
            cfg.roles
                .profile(Key::Role(orch_shared::role::Role::Reviewer))
                .model
                .as_deref(),
            Some("claude-opus-4-5")
        );
    }

    #[test]
    fn the_sandbox_is_on_unless_explicitly_off_and_roles_set_its_allowance() {
        let on = load_with(None, &[], &[]).unwrap();
        assert!(on.sandbox.enabled);
        assert_eq!(on.sandbox.memory_max, Some(4 << 30));
        let off = load_with(None, &[("ORCH_SANDBOX", "off")], &[]).unwrap();
        assert!(!off.sandbox.enabled);
        let off = load_with(None, &[], &["--sandbox", "OFF"]).unwrap();
        assert!(!off.sandbox.enabled);
        let cfg = load_with(
            Some("[sandbox]\nmemory_max_mb = 0\npids_max = 64\n[roles.builder]\nallowed_hosts = [\"mirror.local:8080\"]\nmemory_max_mb = 128\n"),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            (cfg.sandbox.memory_max, cfg.sandbox.pids_max),
            (None, Some(64))
        );
        let builder = cfg
            .roles
            .profile(crate::roles::Key::Role(orch_shared::role::Role::Builder));
        assert_eq!(builder.sandbox.allowed_hosts, ["mirror.local:8080"]);
        assert_eq!(builder.sandbox.memory_max, Some(128 << 20));
        // A reviewer keeps the default: no host but the model API.
        let reviewer = cfg
            .roles
            .profile(crate::roles::Key::Role(orch_shared::role::Role::Reviewer));
        assert!(reviewer.sandbox.allowed_hosts.is_empty());
        // CPU limits in cores, read exactly; a bad one names its key.
        let cfg = load_with(
            Some("[sandbox]\ncpus = 1.5\n[roles.tester]\ncpus = 0.25\n"),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(cfg.sandbox.cpus, Some(1.5));
        let tester = cfg
            .roles
            .profile(crate::roles::Key::Role(orch_shared::role::Role::Tester));
        assert_eq!(tester.sandbox.cpus, Some(0.25));
        let err = load_with(Some("[sandbox]\ncpus = -1\n"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandbox.cpus:"), "{err}");
        let err = load_with(Some("[roles.tester]\ncpus = 5000\n"), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("roles.tester.cpus:"), "{err}");
    }

    #[test]
    fn the_tool_loop_settings_come_from_every_layer_and_bad_ones_name_their_key() {
        let d = from_flags::<_, &str>([]).unwrap().tool_loop;
        assert_eq!(d, LoopSettings::default());
        let file = "[agent]\nmax_turns = 7\nbash_timeout = \"30s\"\nmax_result_bytes = 4096\n\
                    elide_above = 0.5\ncompact_above = 0.6\nkeep_rounds = 1\n";
        let t = load_with(
            Some(file),
            &[("ORCH_MAX_TURNS", "9")],
            &["--bash-timeout", "45s"],
        )
        .unwrap()
        .tool_loop;
        assert_eq!(
            t,
            LoopSettings {
                max_turns: 9,
                bash_timeout: Duration::from_secs(45),
                bash_max_timeout: Duration::from_secs(600),
                max_result_bytes: 4096,
                elide_above: 0.5,
                compact_above: 0.6,
                keep_rounds: 1,
                mcp_start_timeout: Duration::from_secs(30),
            }
        );
        let err = |file: Option<&str>, env: &[(&str, &str)], flags: &[&str]| {
            load_with(file, env, flags).unwrap_err().to_string()
        };
        assert_eq!(
            err(None, &[], &["--max-turns", "0"]),
            "invalid configuration: agent.max_turns: must be between 1 and 100000"
        );
        assert!(
            err(None, &[("ORCH_BASH_TIMEOUT", "soon")], &[])
                .starts_with("invalid configuration: agent.bash_timeout:")
        );
        assert!(
            err(Some("[agent]\nbash_timeout = \"20m\""), &[], &[])
                .starts_with("invalid configuration: agent.bash_max_timeout:")
        );
        assert!(
            err(None, &[], &["--tool-result-max-bytes", "10"])
                .starts_with("invalid configuration: agent.max_result_bytes:")
        );
        assert!(
            err(None, &[], &["--compact-above", "1.5"])
                .starts_with("invalid configuration: agent.compact_above:")
        );
        assert!(
            err(None, &[("ORCH_ELIDE_ABOVE", "most")], &[])
                .starts_with("invalid configuration: agent.elide_above:")
        );
        assert!(
            err(Some("[agent]\nkeep_round = 1"), &[], &[])
                .starts_with("invalid configuration: agent.keep_round: unknown key")
        );
        let cfg = from_file("[roles.tester]\nbash_timeout = \"15m\"\n").unwrap();
        assert_eq!(
            cfg.roles
                .profile(Key::Role(orch_shared::role::Role::Tester))
                .bash_timeout,
            Some(Duration::from_secs(900))
        );
        assert!(
            err(Some("[roles.tester]\nbash_timeout = \"0s\""), &[], &[])
                .starts_with("invalid configuration: roles.tester.bash_timeout:")
        );
    }

    #[test]
    fn bad_backend_settings_name_the_field() {
        let err = |text: &str| {
            let e = from_file(text).unwrap_err().to_string();
            e.strip_prefix("invalid configuration: ")
                .unwrap_or_else(|| panic!("{e}"))
                .to_string()
        };
        assert!(err("default_backend = \"gpt\"").starts_with("default-backend:"));
        assert!(err("default_backend = \"command\"").starts_with("default-backend:"));
        assert!(
            err("[backends.anthropic]\nbase_url = \"api.anthropic.com\"")
                .starts_with("backends.anthropic.base_url:")
        );
        assert!(
            err("[backends.openai]\nmax_attempts = 0").starts_with("backends.openai.max_attempts:")
        );
        assert!(
            err("[backends.command]\nprogram = \"x\"\nprompt = \"file\"")
                .starts_with("backends.command.prompt:")
        );
        assert!(
            err("[backends.claude-code.models]\nscout = \"m\"")
                .starts_with("backends.claude-code.models.scout:")
        );
        assert!(err("[roles.reviewer]\npermission_mode = \"ask\"").starts_with("roles.reviewer"));
        assert!(err("[prices.m]\ninput = -1\noutput = 1").starts_with("prices.m"));
        assert!(err("[sandbox]\nmode = \"maybe\"").starts_with("sandbox.mode:"));
        assert!(err("[sandbox]\nread_only = [\"rel\"]").starts_with("sandbox.read_only:"));
        assert!(
            err("[roles.builder]\nwritable_paths = [\"rel\"]")
                .starts_with("roles.builder.writable_paths:")
        );
        // Both spellings of one section are one too many.
        assert!(
            err("[backends.claude-code]\nbin = \"a\"\n[backends.claude_code]\nbin = \"b\"")
                .starts_with("backends.claude_code: unknown key")
        );
        // A misspelt key is refused rather than ignored.
        assert_eq!(
            err("[backends.anthropic]\napi_kye = \"x\""),
            "backends.anthropic.api_kye: unknown key"
        );
    }

    #[test]
    fn a_credential_pool_comes_from_keys_and_files_and_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key-b");
        std::fs::write(&file, "sk-ant-from-file\n").unwrap();
        let cfg = from_file(&format!(
            "[backends.anthropic]\ncredentials = [{{ name = \"a\", api_key = \"sk-ant-inline\" }}, \
             {{ name = \"b\", api_key_file = \"{}\" }}]\n",
            file.display()
        ))
        .unwrap();
        let pool = &cfg.backends.anthropic.credentials;
        let names: Vec<&str> = pool.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(pool[1].key.expose(), "sk-ant-from-file");
        // The first credential is the backend's key when it runs without the broker.
        assert_eq!(
            cfg.backends.anthropic.api_key.as_ref().map(Secret::expose),
            Some("sk-ant-inline")
        );
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("sk-ant-inline") && !debug.contains("sk-ant-from-file"),
            "{debug}"
        );
        // A lone api_key is the pool `default`.
        let one =
            from_file("[backends.openai]\nbase_url = \"http://x\"\napi_key = \"k\"\n").unwrap();
        assert_eq!(one.backends.openai.credentials[0].name, "default");
    }

    #[test]
    fn a_bad_credential_names_its_entry() {
        let err = |text: &str| from_file(text).unwrap_err().to_string();
        let e = err("[backends.anthropic]\ncredentials = [{ name = \"a\" }]");
        assert!(
            e.contains("backends.anthropic.credentials[0]: give exactly one of"),
            "{e}"
        );
        let e = err(
            "[backends.anthropic]\ncredentials = [{ name = \"a\", api_key = \"x\" }, { name = \"a\", api_key = \"y\" }]",
        );
        assert!(e.contains("backends.anthropic.credentials[1].name"), "{e}");
        let e = err("[backends.openai]\ncredentials = [{ name = \"a b\", api_key = \"x\" }]");
        assert!(e.contains("backends.openai.credentials[0].name"), "{e}");
        let e = err(
            "[backends.anthropic]\ncredentials = [{ name = \"a\", api_key_file = \"/nonexistent/key\" }]",
        );
        assert!(
            e.contains("backends.anthropic.credentials[0].api_key_file: cannot read"),
            "{e}"
        );
    }
}
