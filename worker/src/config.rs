//! Worker configuration: one serde struct of settings with their defaults (`Settings`),
//! layered by [`orch_config::Loader`] (defaults < TOML file `--config` < environment < flags)
//! and checked once into [`Config`]. [`Args`] declares only the command line: each flag's id is
//! its setting's key (`--claude-bin` sets `backends.claude-code.bin`) and its `env` the variable.
//!
//! Besides the cluster settings, the file configures the agent backends (`[backends.*]`: the
//! providers' URLs and keys, models, the Claude Code CLI), the roles (`[roles.*]`, see
//! [`crate::roles`]) and the price table (`[prices."model"]`, see
//! [`crate::agent::pricing`]). Provider settings also come from the providers' usual
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
    /// Agents this worker runs at once [default: 4].
    #[arg(long, env = "ORCH_SLOTS")]
    pub slots: Option<String>,
    /// This worker's name in the cluster (default: host-pid-random).
    #[arg(long, env = "ORCH_WORKER_ID")]
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight jobs may run on before they are handed back [default: 30s].
    #[arg(long, env = "ORCH_DRAIN_GRACE")]
    pub drain_grace: Option<String>,
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
    /// Serve /healthz and /metrics on this address (off when unset).
    #[arg(long, env = "ORCH_WORKER_LISTEN")]
    pub listen: Option<String>,
    /// Log format: pretty or json.
    #[arg(long, env = "ORCH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Where scratch workspaces and the Claude Code CLI's home live (default: a directory
    /// named after the worker under the system's temporary directory).
    #[arg(long, env = "ORCH_WORKER_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Run jobs that name the `sim` backend (the coordinator's default when a task names none)
    /// on this backend instead: claude-code, anthropic, openai or command.
    #[arg(long, env = "ORCH_DEFAULT_BACKEND")]
    pub default_backend: Option<String>,
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
    slots: u32,
    /// `None`: [`default_id`].
    id: Option<String>,
    #[serde(with = "humantime_serde")]
    drain_grace: Duration,
    listen: Option<SocketAddr>,
    log_format: LogFormat,
    /// `None`: `orch-worker-<id>` under the system's temporary directory.
    data_dir: Option<PathBuf>,
    default_backend: Option<String>,
    backends: BackendsFile,
    roles: BTreeMap<String, roles::Override>,
    prices: BTreeMap<String, Price>,
    checkpoints: CheckpointSettings,
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
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(5),
            keep: 20,
            retention: Duration::from_secs(7 * 24 * 3600),
            migrate_on_drain: true,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: Default::default(),
            redis_url: "redis://127.0.0.1:6379".into(),
            slots: 4,
            id: None,
            drain_grace: Duration::from_secs(30),
            listen: None,
            log_format: LogFormat::Pretty,
            data_dir: None,
            default_backend: None,
            backends: BackendsFile::default(),
            roles: BTreeMap::new(),
            prices: BTreeMap::new(),
            checkpoints: CheckpointSettings::default(),
        }
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

/// An HTTP provider (`anthropic` or `openai`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSettings {
    /// `None`: the provider's default (the `openai` backend has none and needs one).
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
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
}

impl ApiSettings {
    fn defaults(max_tokens: Option<u32>) -> Self {
        Self {
            base_url: None,
            api_key: None,
            models: Models::default(),
            max_tokens,
            max_attempts: 4,
            request_timeout: Duration::from_secs(600),
            retry_min_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
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

#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// TLS and credentials for NATS.
    pub nats: orch_config::nats::Nats,
    pub redis_url: String,
    pub slots: u32,
    pub id: String,
    pub drain_grace: Duration,
    pub listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Scratch workspaces (`<data_dir>/scratch/<job>-<attempt>`) and the CLI's home.
    pub data_dir: PathBuf,
    /// Jobs naming `sim` run on this backend instead (`orchctl local up --backend`).
    pub default_backend: Option<Backend>,
    pub backends: BackendSettings,
    pub roles: Roles,
    pub prices: PriceTable,
    pub checkpoints: CheckpointSettings,
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
        .check()
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
    fn check(self) -> Result<Config, Error> {
        let nats = self.nats.check()?;
        if self.slots == 0 || self.slots > 10_000 {
            return Err(Error::invalid("slots", "must be between 1 and 10000"));
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
        let roles = Roles::with_overrides(&self.roles).map_err(Error::Invalid)?;
        let prices = PriceTable::with_overrides(&self.prices).map_err(Error::Invalid)?;
        if self.checkpoints.keep == 0 || self.checkpoints.keep > 10_000 {
            return Err(Error::invalid(
                "checkpoints.keep",
                "must be between 1 and 10000",
            ));
        }
        if self.checkpoints.retention < Duration::from_secs(60) {
            return Err(Error::invalid(
                "checkpoints.retention",
                "must be at least 1m",
            ));
        }
        Ok(Config {
            nats_url: self.nats_url,
            nats,
            redis_url: self.redis_url,
            slots: self.slots,
            id,
            drain_grace: self.drain_grace,
            listen: self.listen,
            log_format: self.log_format,
            data_dir,
            default_backend,
            backends,
            roles,
            prices,
            checkpoints: self.checkpoints,
        })
    }
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
        Ok(Self {
            base_url: base_url(&format!("{section}.base_url"), file.base_url)?,
            api_key: file.api_key.filter(|k| !k.expose().is_empty()),
            models: Models::load(section, file.model, file.models)?,
            max_tokens: file.max_tokens.or(d.max_tokens),
            max_attempts,
            request_timeout: file.request_timeout.unwrap_or(d.request_timeout),
            retry_min_delay: file.retry_min_delay.unwrap_or(d.retry_min_delay),
            retry_max_delay: file.retry_max_delay.unwrap_or(d.retry_max_delay),
            max_retry_after: file.max_retry_after.unwrap_or(d.max_retry_after),
        })
    }
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
        assert!(cfg.id.contains('-'));
        let err = from_flags(["--slots", "0"]).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: slots: must be between 1 and 10000"
        );
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
    fn checkpoint_settings_come_from_every_layer_and_bad_ones_name_their_key() {
        let cfg = from_flags::<_, &str>([]).unwrap();
        assert_eq!(cfg.checkpoints, CheckpointSettings::default());
        let file = "[checkpoints]\ninterval = \"2s\"\nkeep = 3\nretention = \"1h\"\n";
        let env = [("ORCH_MIGRATE_ON_DRAIN", "false")];
        let cfg = load_with(Some(file), &env, &["--checkpoints", "false"]).unwrap();
        let c = &cfg.checkpoints;
        assert_eq!(
            (c.enabled, c.interval, c.keep, c.migrate_on_drain),
            (false, Duration::from_secs(2), 3, false)
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
[prices."qwen2.5-coder"]
input = 0.1
output = 0.2
"#,
        )
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/orch"));
        assert_eq!(cfg.default_backend, Some(Backend::ClaudeCode));
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
}
