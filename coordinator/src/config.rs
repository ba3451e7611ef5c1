//! Coordinator configuration: one serde struct of settings with their defaults (`Settings`),
//! layered by [`orch_config::Loader`] (defaults < TOML file `--config` < `ORCH_*` environment <
//! flags) and checked once into [`Config`]. [`Args`] declares only the command line: each flag's
//! id is its setting's key and its `env` is the variable that sets it.

use clap::{ArgMatches, CommandFactory, Parser};
pub use orch_config::Error;
use serde::Deserialize;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags; every one can also come from the environment or the config file (as the
/// key named like the flag, with `_` for `-`). Values are parsed with the file's, by [`load`].
#[derive(Parser, Debug, Default)]
#[command(
    name = "orch-coordinator",
    version,
    about = "The orchestrator coordinator: HTTP API, planning and dispatch of agent jobs"
)]
pub struct Args {
    /// TOML file with any of the settings below (flag and environment values win).
    #[arg(long, env = "ORCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API (port 0 picks a free port; the bound address is logged and
    /// written to --addr-file) [default: 127.0.0.1:7070].
    #[arg(long, env = "ORCH_LISTEN")]
    pub listen: Option<String>,
    /// Write the bound HTTP address to this file once listening.
    #[arg(long, env = "ORCH_ADDR_FILE")]
    pub addr_file: Option<String>,
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
    /// API bearer tokens, comma separated (file key `tokens`). Required unless --no-auth.
    #[arg(
        long = "token",
        value_name = "TOKEN",
        env = "ORCH_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<String>,
    /// A tenant and its token, repeatable: `NAME=TOKEN`. A tenant's token sees only the tasks
    /// it submitted; tokens given with --token are admin tokens that see everything.
    #[arg(
        long = "tenant",
        value_name = "TENANT",
        env = "ORCH_TENANTS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub tenants: Vec<String>,
    /// Serve the API without authentication (never in production).
    #[arg(long, env = "ORCH_NO_AUTH")]
    pub no_auth: bool,
    /// How long a job may go without an in-progress ack before JetStream redelivers it
    /// [default: 1m].
    #[arg(long, env = "ORCH_JOB_ACK_WAIT")]
    pub job_ack_wait: Option<String>,
    /// Deliveries of one job attempt before JetStream gives up on it [default: 5].
    #[arg(long, env = "ORCH_JOB_MAX_DELIVER")]
    pub job_max_deliver: Option<String>,
    /// JetStream duplicate window for job and result messages [default: 30m].
    #[arg(long, env = "ORCH_DEDUP_WINDOW")]
    pub dedup_window: Option<String>,
    /// How long task event logs (and job results) are kept. A task older than half of it
    /// gets a snapshot with each change, since its creation message leaves the log with it
    /// [default: 7days].
    #[arg(long, env = "ORCH_EVENTS_MAX_AGE")]
    pub events_max_age: Option<String>,
    /// How long finished tasks stay in the history: the leader deletes older ones with
    /// everything kept about them, as `orchctl clean` does; `0s` keeps them forever
    /// [default: 90days].
    #[arg(long, env = "ORCH_HISTORY_RETENTION")]
    pub history_retention: Option<String>,
    /// How long the leader's lease lasts without renewal (renewed every second): a standby
    /// takes over this long after the leader died. Longer than a Redis Sentinel failover, so
    /// the leader keeps the lease through one [default: 5s].
    #[arg(long, env = "ORCH_LEADER_LEASE")]
    pub leader_lease: Option<String>,
    /// Parallel lanes applying results (tasks are spread over lanes by id) [default: 16].
    #[arg(long, env = "ORCH_LANES")]
    pub lanes: Option<String>,
    /// JetStream replicas of every stream (1 for a single server, 3 for a 3-node cluster).
    #[arg(long, env = "ORCH_STREAM_REPLICAS")]
    pub stream_replicas: Option<String>,
    /// Most agents running at once, cluster-wide: `off` (default), a number, or `auto` (the
    /// registered workers' slots). With a cap, ready jobs wait by priority.
    #[arg(long, env = "ORCH_MAX_RUNNING_AGENTS")]
    pub max_running_agents: Option<String>,
    /// Rate limit per backend or model, repeatable: `backend[/model]=60rpm[,100000tpm]`.
    #[arg(
        long = "rate-limit",
        value_name = "RATE_LIMIT",
        env = "ORCH_RATE_LIMITS",
        value_delimiter = ';'
    )]
    pub rate_limits: Vec<String>,
    /// Most US dollars all tasks together may spend per UTC day.
    #[arg(long, env = "ORCH_DAILY_BUDGET_USD")]
    pub daily_budget_usd: Option<String>,
    /// Cost reserved per job against the daily budget while its role has no history
    /// [default: 0.10].
    #[arg(long, env = "ORCH_DEFAULT_JOB_ESTIMATE_USD")]
    pub default_job_estimate_usd: Option<String>,
    /// Log format: pretty or json.
    #[arg(long, env = "ORCH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Where traces go (`[telemetry]` in the file).
    #[command(flatten)]
    pub telemetry: orch_config::telemetry::TelemetryArgs,
    /// The forge pull requests are opened on (`[forge]` in the file).
    #[command(flatten)]
    pub forge: ForgeArgs,
}

/// The forge flags. Each id is the setting's key under `forge`. A forge is configured when it
/// has a token.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ForgeArgs {
    /// Base URL of the forge's REST API: `https://api.github.com` (the default), or
    /// `https://HOST/api/v3` for GitHub Enterprise.
    #[arg(
        long = "forge-api-url",
        id = "forge.api_url",
        value_name = "URL",
        env = "ORCH_FORGE_API_URL"
    )]
    pub api_url: Option<String>,
    /// The forge token (a GitHub token that can read the repository and open pull requests).
    #[arg(
        long = "forge-token",
        id = "forge.token",
        value_name = "TOKEN",
        env = "ORCH_FORGE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A file holding the forge token (a mounted Secret), instead of --forge-token.
    #[arg(
        long = "forge-token-file",
        id = "forge.token_file",
        value_name = "FILE",
        env = "ORCH_FORGE_TOKEN_FILE"
    )]
    pub token_file: Option<String>,
    /// The webhook's shared secret (`X-Hub-Signature-256`); without one the webhook refuses
    /// every delivery.
    #[arg(
        long = "forge-webhook-secret",
        id = "forge.webhook_secret",
        value_name = "SECRET",
        env = "ORCH_FORGE_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
    /// A file holding the webhook secret, instead of --forge-webhook-secret.
    #[arg(
        long = "forge-webhook-secret-file",
        id = "forge.webhook_secret_file",
        value_name = "FILE",
        env = "ORCH_FORGE_WEBHOOK_SECRET_FILE"
    )]
    pub webhook_secret_file: Option<String>,
    /// Labels every pull request gets, comma separated.
    #[arg(
        long = "forge-label",
        id = "forge.labels",
        value_name = "LABEL",
        env = "ORCH_FORGE_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Review rounds sent back to the agents before the loop asks a person [default: 3].
    #[arg(
        long = "forge-max-review-rounds",
        id = "forge.max_review_rounds",
        value_name = "N",
        env = "ORCH_FORGE_MAX_REVIEW_ROUNDS"
    )]
    pub max_review_rounds: Option<String>,
    /// Changed lines (additions plus deletions) of a pull request past which the review loop
    /// asks a person [default: 5000].
    #[arg(
        long = "forge-max-diff-lines",
        id = "forge.max_diff_lines",
        value_name = "N",
        env = "ORCH_FORGE_MAX_DIFF_LINES"
    )]
    pub max_diff_lines: Option<String>,
    /// With a check command, open the pull request as a draft when the check starts and mark
    /// it ready when it passes (`true` or `false`; a submit's `pr.draft` decides for its
    /// task) [default: true].
    #[arg(
        long = "forge-draft",
        id = "forge.draft",
        value_name = "BOOL",
        env = "ORCH_FORGE_DRAFT"
    )]
    pub draft: Option<String>,
}

/// The `forge` settings as the file spells them (`[forge]`).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ForgeSettings {
    api_url: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    webhook_secret: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    labels: Vec<String>,
    max_review_rounds: u32,
    max_diff_lines: u64,
    draft: bool,
}

impl Default for ForgeSettings {
    fn default() -> Self {
        Self {
            api_url: "https://api.github.com".into(),
            token: None,
            token_file: None,
            webhook_secret: None,
            webhook_secret_file: None,
            labels: vec![],
            max_review_rounds: 3,
            max_diff_lines: 5000,
            draft: true,
        }
    }
}

// Written by hand so that no secret reaches a log through `{:?}`.
impl std::fmt::Debug for ForgeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgeSettings")
            .field("api_url", &self.api_url)
            .field("token_file", &self.token_file)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl ForgeSettings {
    /// The checked forge settings; `None` without a token.
    fn check(self) -> Result<Option<crate::forge::Config>, Error> {
        use crate::forge::Secret;
        let secret = |key: &str,
                      file_key: &str,
                      value: Option<String>,
                      file: Option<PathBuf>|
         -> Result<Option<Secret>, Error> {
            match (value.filter(|v| !v.trim().is_empty()), file) {
                (Some(_), Some(_)) => Err(Error::invalid(
                    &format!("{key}, {file_key}"),
                    "give the secret or the file holding it, not both",
                )),
                (Some(v), None) => Ok(Some(Secret::new(v.trim().to_string()))),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        Error::invalid(file_key, format!("cannot read {}: {e}", path.display()))
                    })?;
                    let text = text.trim();
                    if text.is_empty() {
                        return Err(Error::invalid(
                            file_key,
                            format!("{} is empty", path.display()),
                        ));
                    }
                    Ok(Some(Secret::new(text.to_string())))
                }
                (None, None) => Ok(None),
            }
        };
        let token = secret(
            "forge-token",
            "forge-token-file",
            self.token,
            self.token_file,
        )?;
        let webhook_secret = secret(
            "forge-webhook-secret",
            "forge-webhook-secret-file",
            self.webhook_secret,
            self.webhook_secret_file,
        )?;
        let Some(token) = token else {
            if webhook_secret.is_some() {
                return Err(Error::invalid(
                    "forge-webhook-secret",
                    "needs a forge token (forge-token or forge-token-file)",
                ));
            }
            return Ok(None);
        };
        let api_url = self.api_url.trim().trim_end_matches('/').to_string();
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            return Err(Error::invalid(
                "forge-api-url",
                format!("expected an http(s) URL, got `{api_url}`"),
            ));
        }
        if self.max_review_rounds == 0 {
            return Err(Error::invalid(
                "forge-max-review-rounds",
                "must be at least 1",
            ));
        }
        if self.max_diff_lines == 0 {
            return Err(Error::invalid("forge-max-diff-lines", "must be at least 1"));
        }
        Ok(Some(crate::forge::Config {
            api_url,
            token,
            webhook_secret,
            labels: self
                .labels
                .into_iter()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
            max_review_rounds: self.max_review_rounds,
            max_diff_lines: self.max_diff_lines,
            draft: self.draft,
        }))
    }
}

/// Every setting with its default, as the TOML file spells it. Unknown keys are refused.
#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    listen: SocketAddr,
    addr_file: Option<PathBuf>,
    nats_url: String,
    nats: orch_config::nats::NatsSettings,
    redis_url: String,
    redis: orch_config::redis::RedisSettings,
    tokens: Vec<String>,
    tenants: Vec<String>,
    no_auth: bool,
    #[serde(with = "humantime_serde")]
    job_ack_wait: Duration,
    job_max_deliver: i64,
    #[serde(with = "humantime_serde")]
    dedup_window: Duration,
    #[serde(with = "humantime_serde")]
    events_max_age: Duration,
    #[serde(with = "humantime_serde")]
    history_retention: Duration,
    #[serde(with = "humantime_serde")]
    leader_lease: Duration,
    lanes: usize,
    log_format: LogFormat,
    telemetry: orch_config::telemetry::TelemetrySettings,
    max_running_agents: Option<String>,
    stream_replicas: usize,
    rate_limits: Vec<String>,
    #[serde(deserialize_with = "orch_config::exact_f64_opt")]
    daily_budget_usd: Option<f64>,
    #[serde(deserialize_with = "orch_config::exact_f64")]
    default_job_estimate_usd: f64,
    forge: ForgeSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            addr_file: None,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: Default::default(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis: Default::default(),
            tokens: vec![],
            tenants: vec![],
            no_auth: false,
            job_ack_wait: Duration::from_secs(60),
            job_max_deliver: 5,
            dedup_window: Duration::from_secs(30 * 60),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            history_retention: Duration::from_secs(90 * 24 * 3600),
            leader_lease: crate::leader::LEASE_TTL,
            lanes: 16,
            log_format: LogFormat::Pretty,
            telemetry: Default::default(),
            max_running_agents: None,
            stream_replicas: 1,
            rate_limits: vec![],
            daily_budget_usd: None,
            default_job_estimate_usd: 0.10,
            forge: ForgeSettings::default(),
        }
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub addr_file: Option<PathBuf>,
    pub nats_url: String,
    /// TLS and credentials for NATS.
    pub nats: orch_config::nats::Nats,
    /// Where Redis is (a URL or Sentinel) and its credentials.
    pub redis: orch_config::redis::Redis,
    /// Admin tokens. Empty (with no tenants) means authentication is off (only with --no-auth).
    pub tokens: Vec<String>,
    /// `(tenant, token)` pairs.
    pub tenants: Vec<(String, String)>,
    pub job_ack_wait: Duration,
    pub job_max_deliver: i64,
    pub dedup_window: Duration,
    pub events_max_age: Duration,
    /// Finished tasks older than this are deleted by the leader (`None`: kept forever).
    pub history_retention: Option<Duration>,
    /// The leader lease's time to live.
    pub leader_lease: Duration,
    pub lanes: usize,
    pub log_format: LogFormat,
    /// Where spans are exported (none by default).
    pub telemetry: orch_config::telemetry::Telemetry,
    pub admission: crate::admission::Config,
    pub stream_replicas: usize,
    /// The forge pull requests are opened on (`None`: no token configured).
    pub forge: Option<crate::forge::Config>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Loads the configuration from parsed command-line arguments, the environment (read with `env`,
/// `std::env::var` outside tests) and the file `--config` / `ORCH_CONFIG` names.
pub fn load(matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
    let mut loader = orch_config::Loader::new();
    // clap reads ORCH_CONFIG too, so this is the flag, else the environment variable.
    if let Some(path) = matches.get_one::<PathBuf>("config") {
        loader = loader.file(path)?;
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

impl Config {
    /// The JetStream settings of the streams and consumers.
    pub fn topology(&self) -> crate::transport::Topology {
        crate::transport::Topology {
            job_ack_wait: self.job_ack_wait,
            job_max_deliver: self.job_max_deliver,
            dedup_window: self.dedup_window,
            events_max_age: self.events_max_age,
            stream_replicas: self.stream_replicas,
        }
    }
}

impl Settings {
    /// The checks no type expresses; each error names its key.
    fn check(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
        use crate::admission::{Cap, RateLimit};
        let nats = self.nats.check()?;
        let telemetry = self.telemetry.check(env)?;
        let redis = self.redis.check(&self.redis_url)?;
        let tokens: Vec<String> = self
            .tokens
            .into_iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let tenants: Vec<(String, String)> = self
            .tenants
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| match s.split_once('=') {
                Some((name, token)) if !name.trim().is_empty() && token.trim().len() >= 16 => {
                    Ok((name.trim().to_string(), token.trim().to_string()))
                }
                _ => Err(Error::invalid(
                    "tenant",
                    "expected NAME=TOKEN with a token of at least 16 characters",
                )),
            })
            .collect::<Result<_, _>>()?;
        if tokens.is_empty() && tenants.is_empty() && !self.no_auth {
            return Err(Error::invalid(
                "token",
                "no API token configured (set --token or ORCH_TOKEN, or pass --no-auth for an open API)",
            ));
        }
        if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
            return Err(Error::invalid(
                "token",
                format!(
                    "tokens must be at least 16 characters (one has {})",
                    short.len()
                ),
            ));
        }
        if self.job_ack_wait < Duration::from_secs(1) {
            return Err(Error::invalid("job-ack-wait", "must be at least 1s"));
        }
        if self.leader_lease < crate::leader::MIN_LEASE {
            return Err(Error::invalid(
                "leader-lease",
                format!(
                    "must be at least {} (the leader renews it every {} and steps down {} before it runs out)",
                    humantime::format_duration(crate::leader::MIN_LEASE),
                    humantime::format_duration(crate::leader::RENEW_EVERY),
                    humantime::format_duration(crate::leader::RENEW_EVERY),
                ),
            ));
        }
        if self.job_max_deliver < 1 {
            return Err(Error::invalid("job-max-deliver", "must be at least 1"));
        }
        if self.lanes == 0 {
            return Err(Error::invalid("lanes", "must be at least 1"));
        }
        let cap = match self.max_running_agents.as_deref().map(str::trim) {
            None | Some("off") => Cap::Off,
            Some("auto") => Cap::Auto,
            Some(n) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Cap::Fixed(n),
                _ => {
                    return Err(Error::invalid(
                        "max-running-agents",
                        format!("expected off, auto or a positive number, got `{n}`"),
                    ));
                }
            },
        };
        let rate_limits = self
            .rate_limits
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| RateLimit::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Invalid)?;
        if let Some(b) = self.daily_budget_usd
            && !(b.is_finite() && b > 0.0)
        {
            return Err(Error::invalid(
                "daily-budget-usd",
                "must be a positive number",
            ));
        }
        let estimate = self.default_job_estimate_usd;
        if !(estimate.is_finite() && estimate >= 0.0) {
            return Err(Error::invalid(
                "default-job-estimate-usd",
                "must be zero or more",
            ));
        }
        if !(1..=5).contains(&self.stream_replicas) {
            return Err(Error::invalid("stream-replicas", "must be between 1 and 5"));
        }
        if self.events_max_age < self.dedup_window {
            // JetStream refuses a results stream whose duplicate window outlives its messages.
            return Err(Error::invalid(
                "events-max-age",
                format!(
                    "must be at least the dedup-window ({})",
                    humantime::format_duration(self.dedup_window)
                ),
            ));
        }
        let no_auth = self.no_auth;
        let forge = self.forge.check()?;
        Ok(Config {
            listen: self.listen,
            addr_file: self.addr_file,
            nats_url: self.nats_url,
            nats,
            redis,
            tokens: if no_auth { vec![] } else { tokens },
            tenants: if no_auth { vec![] } else { tenants },
            job_ack_wait: self.job_ack_wait,
            job_max_deliver: self.job_max_deliver,
            dedup_window: self.dedup_window,
            events_max_age: self.events_max_age,
            history_retention: (!self.history_retention.is_zero())
                .then_some(self.history_retention),
            leader_lease: self.leader_lease,
            lanes: self.lanes,
            log_format: self.log_format,
            telemetry,
            admission: crate::admission::Config {
                cap: Some(cap),
                rate_limits,
                daily_budget_usd: self.daily_budget_usd,
                default_job_estimate_usd: estimate,
            },
            stream_replicas: self.stream_replicas,
            forge,
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

    const TOKEN: &str = "token-0123456789abcdef";

    #[test]
    fn the_forge_comes_from_a_token_or_its_file_and_bad_values_name_their_key() {
        let cfg = load_with(None, &[], &["--no-auth"]).unwrap();
        assert!(cfg.forge.is_none(), "no token, no forge");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "ghp_fromfile\n").unwrap();
        let cfg = load_with(
            Some(&format!(
                "[forge]\ntoken_file = {:?}\nlabels = [\"agents\"]\nmax_review_rounds = 5\n",
                file.display().to_string()
            )),
            &[("ORCH_FORGE_WEBHOOK_SECRET", "hook")],
            &[
                "--no-auth",
                "--forge-api-url",
                "https://ghe.example/api/v3/",
            ],
        )
        .unwrap();
        let forge = cfg.forge.unwrap();
        assert_eq!(forge.token.expose(), "ghp_fromfile");
        assert_eq!(forge.webhook_secret.unwrap().expose(), "hook");
        assert_eq!(forge.api_url, "https://ghe.example/api/v3");
        assert_eq!(forge.labels, ["agents"]);
        assert_eq!((forge.max_review_rounds, forge.max_diff_lines), (5, 5000));
        assert!(forge.draft, "drafts while checks run by default");
        let cfg = load_with(
            None,
            &[("ORCH_FORGE_TOKEN", "t"), ("ORCH_FORGE_DRAFT", "false")],
            &["--no-auth"],
        )
        .unwrap();
        assert!(!cfg.forge.unwrap().draft);
        let err = |env: &[(&str, &str)], flags: &[&str]| {
            let mut all = vec!["--no-auth"];
            all.extend_from_slice(flags);
            load_with(None, env, &all).unwrap_err().to_string()
        };
        assert_eq!(
            err(
                &[("ORCH_FORGE_TOKEN", "t")],
                &["--forge-max-review-rounds", "0"]
            ),
            "invalid configuration: forge-max-review-rounds: must be at least 1"
        );
        assert_eq!(
            err(
                &[("ORCH_FORGE_TOKEN", "t")],
                &["--forge-api-url", "ftp://x"]
            ),
            "invalid configuration: forge-api-url: expected an http(s) URL, got `ftp://x`"
        );
        assert_eq!(
            err(&[], &["--forge-webhook-secret", "s"]),
            "invalid configuration: forge-webhook-secret: needs a forge token (forge-token or forge-token-file)"
        );
        assert!(
            err(&[], &["--forge-token-file", "/no/such/token"])
                .starts_with("invalid configuration: forge-token-file: cannot read /no/such/token")
        );
    }

    #[test]
    fn nats_credentials_come_from_every_layer_one_method_at_a_time() {
        use orch_config::nats::NatsAuth;
        let cfg = load_with(
            Some("[nats]\nuser = \"orch\"\n"),
            &[
                ("ORCH_NATS_PASSWORD", "pw"),
                ("ORCH_NATS_TLS_REQUIRED", "true"),
            ],
            &["--no-auth"],
        )
        .unwrap();
        assert!(cfg.nats.tls_required);
        assert!(matches!(
            cfg.nats.auth,
            Some(NatsAuth::UserPassword { ref user, ref password }) if user == "orch" && password.expose() == "pw"
        ));
        let err = load_with(
            None,
            &[("ORCH_NATS_TOKEN", "t")],
            &["--no-auth", "--nats-user", "u", "--nats-password", "p"],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid configuration: nats-user, nats-token: at most one NATS auth method may be set"
        );
        let err = load_with(None, &[], &["--no-auth", "--nats-ca-file", "/no/ca.pem"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: nats-ca-file: no such file /no/ca.pem"
        );
    }

    #[test]
    fn redis_credentials_and_sentinels_come_from_every_layer() {
        use orch_config::redis::Target;
        let cfg = load_with(
            Some("[redis]\nusername = \"orch\"\nsentinel_master = \"mymaster\"\n"),
            &[("ORCH_REDIS_PASSWORD", "pw")],
            &["--no-auth", "--redis-sentinels", "s1:26379,s2:26379"],
        )
        .unwrap();
        assert_eq!(
            cfg.redis.target,
            Target::Sentinel {
                master: "mymaster".into(),
                sentinels: vec![("s1".into(), 26379), ("s2".into(), 26379)],
                tls: false,
                db: 0,
            }
        );
        assert_eq!(cfg.redis.username.as_deref(), Some("orch"));
        assert_eq!(
            cfg.redis.password.map(|p| p.expose().to_string()),
            Some("pw".into())
        );
        let err = load_with(None, &[], &["--no-auth", "--redis-sentinel-master", "m"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: redis-sentinel-master: needs redis-sentinels too"
        );
    }

    #[test]
    fn dollar_amounts_are_read_exactly_from_every_layer() {
        let base = ["--no-auth"];
        for (file, env, flags) in [
            (
                Some("daily_budget_usd = 0.01\ndefault_job_estimate_usd = 0.0049\n"),
                vec![],
                vec![],
            ),
            (
                None,
                vec![
                    ("ORCH_DAILY_BUDGET_USD", "0.01"),
                    ("ORCH_DEFAULT_JOB_ESTIMATE_USD", "0.0049"),
                ],
                vec![],
            ),
            (
                None,
                vec![],
                vec![
                    "--daily-budget-usd",
                    "0.01",
                    "--default-job-estimate-usd",
                    "0.0049",
                ],
            ),
        ] {
            let flags: Vec<&str> = base.iter().copied().chain(flags).collect();
            let cfg = load_with(file, &env, &flags).unwrap();
            assert_eq!(
                cfg.admission.daily_budget_usd,
                Some(0.01),
                "{file:?} {env:?}"
            );
            assert_eq!(cfg.admission.default_job_estimate_usd, 0.0049);
        }
        let err = load_with(None, &[("ORCH_DAILY_BUDGET_USD", "lots")], &base).unwrap_err();
        assert!(err.to_string().contains("daily-budget-usd"), "{err}");
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults() {
        let file = "job_ack_wait = \"5s\"\nlanes = 4\nnats_url = \"nats://file\"\nredis_url = \"redis://file\"\ntokens = [\"file-token-0123456789\"]\n";
        let cfg = load_with(Some(file), &[], &[]).unwrap();
        assert_eq!(cfg.job_ack_wait, Duration::from_secs(5));
        assert_eq!(cfg.tokens, ["file-token-0123456789"]);
        assert_eq!(cfg.dedup_window, Duration::from_secs(1800));
        let env = [
            ("ORCH_JOB_ACK_WAIT", "7s"),
            ("ORCH_LANES", "8"),
            ("ORCH_NATS_URL", "nats://env"),
            ("ORCH_TOKEN", "env-token-0123456789,second-token-0123456"),
        ];
        let cfg = load_with(Some(file), &env, &[]).unwrap();
        assert_eq!(cfg.job_ack_wait, Duration::from_secs(7));
        assert_eq!(cfg.lanes, 8);
        assert_eq!(cfg.nats_url, "nats://env");
        assert_eq!(
            cfg.redis.target,
            orch_config::redis::Target::Url("redis://file".into())
        );
        assert_eq!(cfg.tokens, ["env-token-0123456789", "second-token-0123456"]);
        let cfg = load_with(
            Some(file),
            &env,
            &[
                "--job-ack-wait",
                "9s",
                "--token",
                TOKEN,
                "--rate-limit",
                "sim=60rpm",
            ],
        )
        .unwrap();
        assert_eq!(cfg.job_ack_wait, Duration::from_secs(9));
        assert_eq!(cfg.lanes, 8);
        assert_eq!(cfg.tokens, [TOKEN]);
        assert_eq!(cfg.admission.rate_limits.len(), 1);
        let cfg = load_with(None, &[], &["--no-auth"]).unwrap();
        assert_eq!(cfg.listen, Settings::default().listen);
        assert_eq!(cfg.lanes, 16);
        let cfg = load_with(None, &[("ORCH_NO_AUTH", "true")], &[]).unwrap();
        assert!(cfg.tokens.is_empty());
    }

    #[test]
    fn a_bad_value_names_its_key_with_the_same_text_from_every_layer() {
        let want =
            "invalid configuration: job-ack-wait: expected a duration like 30s or 5m, got \"x\"";
        let err = |file: Option<&str>, env: &[(&str, &str)], flags: &[&str]| {
            load_with(file, env, flags).unwrap_err().to_string()
        };
        assert_eq!(err(Some("job_ack_wait = \"x\""), &[], &["--no-auth"]), want);
        assert_eq!(
            err(None, &[("ORCH_JOB_ACK_WAIT", "x")], &["--no-auth"]),
            want
        );
        assert_eq!(err(None, &[], &["--no-auth", "--job-ack-wait", "x"]), want);
        assert_eq!(
            err(None, &[("ORCH_LANES", "many")], &["--no-auth"]),
            "invalid configuration: lanes: expected a whole number, zero or more, got \"many\""
        );
        assert_eq!(
            err(None, &[], &["--no-auth", "--log-format", "xml"]),
            "invalid configuration: log-format: expected pretty or json, got \"xml\""
        );
        assert_eq!(
            err(Some("lanse = 3"), &[], &["--no-auth"]),
            "invalid configuration: lanse: unknown key"
        );
    }

    #[test]
    fn a_token_is_required_unless_auth_is_off() {
        let err = load_with(None, &[], &[]).unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: token:"), "{err}");
        let cfg = load_with(None, &[], &["--no-auth", "--token", TOKEN]).unwrap();
        assert!(cfg.tokens.is_empty());
        let err = load_with(None, &[], &["--token", "short"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16"), "{err}");
        let cfg = load_with(None, &[], &["--tenant", &format!("acme={TOKEN}")]).unwrap();
        assert_eq!(cfg.tenants, [("acme".to_string(), TOKEN.to_string())]);
    }

    #[test]
    fn the_event_log_outlives_the_dedup_window() {
        let err = from_flags(["--no-auth", "--events-max-age", "3s"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid configuration: events-max-age: must be at least the dedup-window (30m)"
        );
        let cfg = from_flags([
            "--no-auth",
            "--events-max-age",
            "3s",
            "--dedup-window",
            "2s",
        ])
        .unwrap();
        assert_eq!(cfg.events_max_age, Duration::from_secs(3));
    }

    #[test]
    fn history_is_kept_90_days_unless_told_otherwise_and_0s_keeps_it_forever() {
        let day = 24 * 3600;
        let cfg = from_flags(["--no-auth"]).unwrap();
        assert_eq!(cfg.history_retention, Some(Duration::from_secs(90 * day)));
        let cfg = load_with(Some("history_retention = \"30days\""), &[], &["--no-auth"]).unwrap();
        assert_eq!(cfg.history_retention, Some(Duration::from_secs(30 * day)));
        let cfg = load_with(None, &[("ORCH_HISTORY_RETENTION", "0s")], &["--no-auth"]).unwrap();
        assert_eq!(cfg.history_retention, None);
    }

    #[test]
    fn the_leader_lease_is_set_from_any_layer_and_a_too_short_one_is_refused() {
        let cfg = load_with(None, &[], &["--no-auth"]).unwrap();
        assert_eq!(cfg.leader_lease, crate::leader::LEASE_TTL);
        let cfg = load_with(Some("leader_lease = \"15s\""), &[], &["--no-auth"]).unwrap();
        assert_eq!(cfg.leader_lease, Duration::from_secs(15));
        let cfg = load_with(None, &[("ORCH_LEADER_LEASE", "20s")], &["--no-auth"]).unwrap();
        assert_eq!(cfg.leader_lease, Duration::from_secs(20));
        let err = load_with(None, &[], &["--no-auth", "--leader-lease", "2s"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration: leader-lease: must be at least 3s"),
            "{err}"
        );
        let err = from_flags(["--no-auth", "--history-retention", "forever"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("history-retention"), "{err}");
    }
}
