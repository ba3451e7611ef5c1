//! Coordinator configuration: defaults, then an optional TOML file (`--config`), then `ORCH_*`
//! environment variables and flags (clap reads both), checked once into [`Config`].

use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line flags; every one can also come from the environment or the config file.
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
    /// written to --addr-file).
    #[arg(long, env = "ORCH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Write the bound HTTP address to this file once listening.
    #[arg(long, env = "ORCH_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    #[arg(long, env = "ORCH_NATS_URL")]
    pub nats_url: Option<String>,
    #[arg(long, env = "ORCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// API bearer tokens, comma separated. Required unless --no-auth.
    #[arg(
        long,
        env = "ORCH_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub token: Vec<String>,
    /// A tenant and its token, repeatable: `NAME=TOKEN`. A tenant's token sees only the tasks
    /// it submitted; tokens given with --token are admin tokens that see everything.
    #[arg(
        long = "tenant",
        env = "ORCH_TENANTS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub tenants: Vec<String>,
    /// Serve the API without authentication (never in production).
    #[arg(long, env = "ORCH_NO_AUTH")]
    pub no_auth: bool,
    /// How long a job may go without an in-progress ack before JetStream redelivers it.
    #[arg(long, env = "ORCH_JOB_ACK_WAIT", value_parser = humantime::parse_duration)]
    pub job_ack_wait: Option<Duration>,
    /// Deliveries of one job attempt before JetStream gives up on it.
    #[arg(long, env = "ORCH_JOB_MAX_DELIVER")]
    pub job_max_deliver: Option<i64>,
    /// JetStream duplicate window for job and result messages.
    #[arg(long, env = "ORCH_DEDUP_WINDOW", value_parser = humantime::parse_duration)]
    pub dedup_window: Option<Duration>,
    /// How long task event logs (and job results) are kept. A task older than half of it
    /// gets a snapshot with each change, since its creation message leaves the log with it.
    #[arg(long, env = "ORCH_EVENTS_MAX_AGE", value_parser = humantime::parse_duration)]
    pub events_max_age: Option<Duration>,
    /// Parallel lanes applying results (tasks are spread over lanes by id).
    #[arg(long, env = "ORCH_LANES")]
    pub lanes: Option<usize>,
    /// JetStream replicas of every stream (1 for a single server, 3 for a 3-node cluster).
    #[arg(long, env = "ORCH_STREAM_REPLICAS")]
    pub stream_replicas: Option<usize>,
    /// Most agents running at once, cluster-wide: `off` (default), a number, or `auto` (the
    /// registered workers' slots). With a cap, ready jobs wait by priority.
    #[arg(long, env = "ORCH_MAX_RUNNING_AGENTS")]
    pub max_running_agents: Option<String>,
    /// Rate limit per backend or model, repeatable: `backend[/model]=60rpm[,100000tpm]`.
    #[arg(long = "rate-limit", env = "ORCH_RATE_LIMITS", value_delimiter = ';')]
    pub rate_limits: Vec<String>,
    /// Most US dollars all tasks together may spend per UTC day.
    #[arg(long, env = "ORCH_DAILY_BUDGET_USD")]
    pub daily_budget_usd: Option<f64>,
    /// Cost reserved per job against the daily budget while its role has no history.
    #[arg(long, env = "ORCH_DEFAULT_JOB_ESTIMATE_USD")]
    pub default_job_estimate_usd: Option<f64>,
    /// Log format: pretty or json.
    #[arg(long, env = "ORCH_LOG_FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    addr_file: Option<PathBuf>,
    nats_url: Option<String>,
    redis_url: Option<String>,
    tokens: Option<Vec<String>>,
    tenants: Option<Vec<String>>,
    no_auth: Option<bool>,
    #[serde(default, with = "humantime_serde_opt")]
    job_ack_wait: Option<Duration>,
    job_max_deliver: Option<i64>,
    #[serde(default, with = "humantime_serde_opt")]
    dedup_window: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    events_max_age: Option<Duration>,
    lanes: Option<usize>,
    log_format: Option<String>,
    max_running_agents: Option<String>,
    stream_replicas: Option<usize>,
    rate_limits: Option<Vec<String>>,
    daily_budget_usd: Option<f64>,
    default_job_estimate_usd: Option<f64>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub addr_file: Option<PathBuf>,
    pub nats_url: String,
    pub redis_url: String,
    /// Admin tokens. Empty (with no tenants) means authentication is off (only with --no-auth).
    pub tokens: Vec<String>,
    /// `(tenant, token)` pairs.
    pub tenants: Vec<(String, String)>,
    pub job_ack_wait: Duration,
    pub job_max_deliver: i64,
    pub dedup_window: Duration,
    pub events_max_age: Duration,
    pub lanes: usize,
    pub log_format: LogFormat,
    pub admission: crate::admission::Config,
    pub stream_replicas: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".parse().expect("valid literal"),
            addr_file: None,
            nats_url: "nats://127.0.0.1:4222".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            tokens: vec![],
            tenants: vec![],
            job_ack_wait: Duration::from_secs(60),
            job_max_deliver: 5,
            dedup_window: Duration::from_secs(30 * 60),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            lanes: 16,
            log_format: LogFormat::Pretty,
            admission: crate::admission::Config {
                default_job_estimate_usd: 0.10,
                ..Default::default()
            },
            stream_replicas: 1,
        }
    }
}

/// A setting that cannot be used; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Args {
    /// Layers file, environment and flags over the defaults and checks the result.
    pub fn load(self) -> Result<Config, Error> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| Error::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        let tokens: Vec<String> = if self.token.is_empty() {
            file.tokens.unwrap_or_default()
        } else {
            self.token
        }
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
        let no_auth = self.no_auth || file.no_auth.unwrap_or(false);
        let tenants: Vec<(String, String)> = if self.tenants.is_empty() {
            file.tenants.unwrap_or_default()
        } else {
            self.tenants
        }
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.split_once('=') {
            Some((name, token)) if !name.trim().is_empty() && token.trim().len() >= 16 => {
                Ok((name.trim().to_string(), token.trim().to_string()))
            }
            _ => Err(Error::Invalid(
                "tenant: expected NAME=TOKEN with a token of at least 16 characters".into(),
            )),
        })
        .collect::<Result<_, _>>()?;
        if tokens.is_empty() && tenants.is_empty() && !no_auth {
            return Err(Error::Invalid(
                "token: no API token configured (set --token or ORCH_TOKEN, or pass --no-auth for an open API)".into(),
            ));
        }
        if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
            return Err(Error::Invalid(format!(
                "token: tokens must be at least 16 characters (one has {})",
                short.len()
            )));
        }
        let log_format = match self
            .log_format
            .or(file.log_format)
            .as_deref()
            .unwrap_or("pretty")
        {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(Error::Invalid(format!(
                    "log-format: expected pretty or json, got `{other}`"
                )));
            }
        };
        let job_ack_wait = self
            .job_ack_wait
            .or(file.job_ack_wait)
            .unwrap_or(d.job_ack_wait);
        if job_ack_wait < Duration::from_secs(1) {
            return Err(Error::Invalid("job-ack-wait: must be at least 1s".into()));
        }
        let job_max_deliver = self
            .job_max_deliver
            .or(file.job_max_deliver)
            .unwrap_or(d.job_max_deliver);
        if job_max_deliver < 1 {
            return Err(Error::Invalid("job-max-deliver: must be at least 1".into()));
        }
        let lanes = self.lanes.or(file.lanes).unwrap_or(d.lanes);
        if lanes == 0 {
            return Err(Error::Invalid("lanes: must be at least 1".into()));
        }
        use crate::admission::{Cap, RateLimit};
        let cap = match self
            .max_running_agents
            .or(file.max_running_agents)
            .as_deref()
            .map(str::trim)
        {
            None | Some("off") => Cap::Off,
            Some("auto") => Cap::Auto,
            Some(n) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Cap::Fixed(n),
                _ => {
                    return Err(Error::Invalid(format!(
                        "max-running-agents: expected off, auto or a positive number, got `{n}`"
                    )));
                }
            },
        };
        let rate_limits = if self.rate_limits.is_empty() {
            file.rate_limits.unwrap_or_default()
        } else {
            self.rate_limits
        }
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| RateLimit::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Invalid)?;
        let daily_budget_usd = self.daily_budget_usd.or(file.daily_budget_usd);
        if let Some(b) = daily_budget_usd
            && !(b.is_finite() && b > 0.0)
        {
            return Err(Error::Invalid(
                "daily-budget-usd: must be a positive number".into(),
            ));
        }
        let default_job_estimate_usd = self
            .default_job_estimate_usd
            .or(file.default_job_estimate_usd)
            .unwrap_or(d.admission.default_job_estimate_usd);
        if !(default_job_estimate_usd.is_finite() && default_job_estimate_usd >= 0.0) {
            return Err(Error::Invalid(
                "default-job-estimate-usd: must be zero or more".into(),
            ));
        }
        let stream_replicas = self
            .stream_replicas
            .or(file.stream_replicas)
            .unwrap_or(d.stream_replicas);
        if !(1..=5).contains(&stream_replicas) {
            return Err(Error::Invalid(
                "stream-replicas: must be between 1 and 5".into(),
            ));
        }
        let dedup_window = self
            .dedup_window
            .or(file.dedup_window)
            .unwrap_or(d.dedup_window);
        let events_max_age = self
            .events_max_age
            .or(file.events_max_age)
            .unwrap_or(d.events_max_age);
        if events_max_age < dedup_window {
            // JetStream refuses a results stream whose duplicate window outlives its messages.
            return Err(Error::Invalid(format!(
                "events-max-age: must be at least the dedup-window ({})",
                humantime::format_duration(dedup_window)
            )));
        }
        Ok(Config {
            stream_replicas,
            admission: crate::admission::Config {
                cap: Some(cap),
                rate_limits,
                daily_budget_usd,
                default_job_estimate_usd,
            },
            listen: self.listen.or(file.listen).unwrap_or(d.listen),
            addr_file: self.addr_file.or(file.addr_file),
            nats_url: self.nats_url.or(file.nats_url).unwrap_or(d.nats_url),
            redis_url: self.redis_url.or(file.redis_url).unwrap_or(d.redis_url),
            tokens: if no_auth { vec![] } else { tokens },
            tenants: if no_auth { vec![] } else { tenants },
            job_ack_wait,
            job_max_deliver,
            dedup_window,
            events_max_age,
            lanes,
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("orch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "redis_url = \"redis://file\"\nnats_url = \"nats://file\"\ntokens = [\"file-token-0123456789\"]\njob_ack_wait = \"5s\"\n",
        )
        .unwrap();
        let cfg = Args {
            config: Some(path),
            nats_url: Some("nats://flag".into()),
            ..Default::default()
        }
        .load()
        .unwrap();
        assert_eq!(cfg.nats_url, "nats://flag");
        assert_eq!(cfg.redis_url, "redis://file");
        assert_eq!(cfg.tokens, vec!["file-token-0123456789".to_string()]);
        assert_eq!(cfg.job_ack_wait, Duration::from_secs(5));
        assert_eq!(cfg.lanes, 16);
    }

    #[test]
    fn a_token_is_required_unless_auth_is_off() {
        let err = Args::default().load().unwrap_err().to_string();
        assert!(err.starts_with("token:"), "{err}");
        let cfg = Args {
            no_auth: true,
            ..Default::default()
        }
        .load()
        .unwrap();
        assert!(cfg.tokens.is_empty());
        let err = Args {
            token: vec!["short".into()],
            ..Default::default()
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(err.contains("at least 16"), "{err}");
    }

    #[test]
    fn the_event_log_outlives_the_dedup_window() {
        let args = |max_age: u64, window: u64| Args {
            no_auth: true,
            events_max_age: Some(Duration::from_secs(max_age)),
            dedup_window: Some(Duration::from_secs(window)),
            ..Default::default()
        };
        let err = args(3, 1800).load().unwrap_err().to_string();
        assert_eq!(
            err,
            "events-max-age: must be at least the dedup-window (30m)"
        );
        let cfg = args(3, 2).load().unwrap();
        assert_eq!(cfg.events_max_age, Duration::from_secs(3));
    }
}
