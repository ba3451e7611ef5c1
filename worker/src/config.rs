//! Worker configuration: defaults, then an optional TOML file (`--config`), then `ORCH_*`
//! environment variables and flags, checked once into [`Config`].

use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    #[arg(long, env = "ORCH_NATS_URL")]
    pub nats_url: Option<String>,
    #[arg(long, env = "ORCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Agents this worker runs at once.
    #[arg(long, env = "ORCH_SLOTS")]
    pub slots: Option<u32>,
    /// This worker's name in the cluster (default: host-pid-random).
    #[arg(long, env = "ORCH_WORKER_ID")]
    pub id: Option<String>,
    /// On SIGTERM, how long in-flight jobs may run on before they are handed back.
    #[arg(long, env = "ORCH_DRAIN_GRACE", value_parser = humantime::parse_duration)]
    pub drain_grace: Option<Duration>,
    /// Serve /healthz and /metrics on this address (off when unset).
    #[arg(long, env = "ORCH_WORKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Log format: pretty or json.
    #[arg(long, env = "ORCH_LOG_FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    nats_url: Option<String>,
    redis_url: Option<String>,
    slots: Option<u32>,
    id: Option<String>,
    drain_grace: Option<String>,
    listen: Option<SocketAddr>,
    log_format: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub redis_url: String,
    pub slots: u32,
    pub id: String,
    pub drain_grace: Duration,
    pub listen: Option<SocketAddr>,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

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
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Args {
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
        let slots = self.slots.or(file.slots).unwrap_or(4);
        if slots == 0 || slots > 10_000 {
            return Err(Error::Invalid("slots: must be between 1 and 10000".into()));
        }
        let drain_grace = match self.drain_grace {
            Some(d) => d,
            None => match file.drain_grace {
                Some(s) => humantime::parse_duration(&s)
                    .map_err(|e| Error::Invalid(format!("drain_grace: {e}")))?,
                None => Duration::from_secs(30),
            },
        };
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
        let id = self.id.or(file.id).unwrap_or_else(default_id);
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(Error::Invalid(
                "id: must be non-empty without spaces".into(),
            ));
        }
        Ok(Config {
            nats_url: self
                .nats_url
                .or(file.nats_url)
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            redis_url: self
                .redis_url
                .or(file.redis_url)
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            slots,
            id,
            drain_grace,
            listen: self.listen.or(file.listen),
            log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks() {
        let cfg = Args::default().load().unwrap();
        assert_eq!(cfg.slots, 4);
        assert_eq!(cfg.drain_grace, Duration::from_secs(30));
        assert!(cfg.id.contains('-'));
        let err = Args {
            slots: Some(0),
            ..Default::default()
        }
        .load()
        .unwrap_err();
        assert!(err.to_string().starts_with("slots:"));
    }
}
