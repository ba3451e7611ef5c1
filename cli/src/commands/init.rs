//! `orchctl init`: writes the configuration files the binaries read: orchctl's own
//! (`$ORCH_HOME/config.toml`: `server`, `token`) and, with `--services DIR`, a
//! `coordinator.toml` and a `worker.toml` for `orch-coordinator --config` and
//! `orch-worker --config` (their keys are the flag names).

use crate::ask;
use crate::commands::Ctx;
use crate::config::{self, normalize_server};
use crate::output;
use anyhow::Context as _;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl init                                   # asks, on a terminal
  orchctl init --server http://orch.internal:7070 --token \"$ORCH_TOKEN\"
  orchctl init --services /etc/orch --nats-url nats://nats:4222 --redis-url redis://redis:6379
  orch-coordinator --config /etc/orch/coordinator.toml
  orch-worker --config /etc/orch/worker.toml";

/// Write orchctl's config file (server, token) and optionally the services' config files
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Write orchctl's config file ($ORCH_HOME/config.toml, or --config) with the \
coordinator's URL and the API token, keeping any other key in it. With --services DIR, also \
write DIR/coordinator.toml and DIR/worker.toml, read by `orch-coordinator --config FILE` and \
`orch-worker --config FILE` (flags and ORCH_* variables still override them); the same token \
goes into both orchctl's file and the coordinator's, and one is generated when none is given.\n\n\
On a terminal, asks for each value (Enter keeps the default shown). Refuses to overwrite an \
existing file unless --force (or, on a terminal, you agree).",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The coordinator's URL
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,

    /// The API token (at least 16 characters when service files are written)
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,

    /// Also write coordinator.toml and worker.toml into this directory
    #[arg(long, value_name = "DIR")]
    pub services: Option<PathBuf>,

    /// Coordinator: address of the HTTP API
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: String,

    /// Coordinator and worker: NATS URL
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Coordinator and worker: Redis URL
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Worker: agents run at once
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slots: u32,

    /// Worker: serve /metrics and /healthz on this address
    #[arg(long, value_name = "ADDR")]
    pub worker_listen: Option<String>,

    /// Coordinator and worker: log format (pretty or json)
    #[arg(long, value_name = "FORMAT", default_value = "json")]
    pub log_format: String,

    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,

    /// Never ask; use the flags and defaults
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `orch-coordinator --config` keys.
#[derive(Serialize)]
struct CoordinatorFile<'a> {
    listen: &'a str,
    nats_url: &'a str,
    redis_url: &'a str,
    tokens: Vec<&'a str>,
    log_format: &'a str,
}

/// `orch-worker --config` keys.
#[derive(Serialize)]
struct WorkerFile<'a> {
    nats_url: &'a str,
    redis_url: &'a str,
    slots: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<&'a str>,
    log_format: &'a str,
}

#[derive(Serialize)]
struct Written {
    config: PathBuf,
    server: String,
    token: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator_config: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_config: Option<PathBuf>,
}

/// Checks that `path` may be written: new, or `--force`, or the user agrees.
fn may_write(path: &Path, force: bool, interactive: bool) -> anyhow::Result<bool> {
    if force || !path.exists() {
        return Ok(true);
    }
    if interactive {
        return Ok(ask::confirm(&format!(
            "{} exists; overwrite it?",
            path.display()
        ))?);
    }
    anyhow::bail!(
        "{} already exists (pass --force to overwrite it)",
        path.display()
    )
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))
}

pub fn coordinator_toml(args: &Args, token: &str) -> anyhow::Result<String> {
    let body = toml::to_string(&CoordinatorFile {
        listen: &args.listen,
        nats_url: &args.nats_url,
        redis_url: &args.redis_url,
        tokens: vec![token],
        log_format: &args.log_format,
    })?;
    Ok(format!(
        "# orch-coordinator --config {{this file}}; flags and ORCH_* variables override these keys.\n{body}"
    ))
}

pub fn worker_toml(args: &Args) -> anyhow::Result<String> {
    let body = toml::to_string(&WorkerFile {
        nats_url: &args.nats_url,
        redis_url: &args.redis_url,
        slots: args.slots,
        listen: args.worker_listen.as_deref(),
        log_format: &args.log_format,
    })?;
    Ok(format!(
        "# orch-worker --config {{this file}}; flags and ORCH_* variables override these keys.\n{body}"
    ))
}

pub async fn run(ctx: &Ctx, mut args: Args) -> anyhow::Result<ExitCode> {
    let interactive = !args.yes && ask::interactive();
    let path = ctx.paths.require_config()?.to_path_buf();
    anyhow::ensure!(
        matches!(args.log_format.as_str(), "pretty" | "json"),
        "--log-format: expected pretty or json, got `{}`",
        args.log_format
    );

    let existing = config::FileConfig::load(&ctx.paths).unwrap_or_default();
    let default_server = args
        .server
        .clone()
        .or(existing.server.clone())
        .unwrap_or_else(|| config::DEFAULT_SERVER.to_string());
    let server = if interactive {
        ask::ask("coordinator URL", &default_server)?
    } else {
        default_server
    };
    let server = normalize_server(&server)?;
    if interactive && args.services.is_none() {
        let dir = ask::ask(
            "directory for coordinator.toml and worker.toml (empty: none)",
            "",
        )?;
        if !dir.is_empty() {
            args.services = Some(PathBuf::from(dir));
        }
    }
    if interactive && args.services.is_some() {
        args.nats_url = ask::ask("NATS URL", &args.nats_url)?;
        args.redis_url = ask::ask("Redis URL", &args.redis_url)?;
    }
    let mut token = args
        .token
        .clone()
        .or(existing.token.clone())
        .filter(|t| !t.trim().is_empty());
    if interactive {
        let shown = if token.is_some() {
            "keep the current one"
        } else {
            ""
        };
        let answer = ask::ask("API token (empty: generate one)", shown)?;
        if answer != shown {
            token = Some(answer).filter(|t| !t.is_empty());
        }
    }
    let generated = token.is_none();
    let token = token.unwrap_or_else(super::local::up::random_token);
    if args.services.is_some() {
        anyhow::ensure!(
            token.len() >= 16,
            "--token: the coordinator needs at least 16 characters (this one has {})",
            token.len()
        );
    }

    anyhow::ensure!(
        may_write(&path, args.force, interactive)?,
        "nothing written"
    );
    config::write_settings(&path, &server, &token)?;
    let mut written = Written {
        config: path.clone(),
        server: server.clone(),
        token: if generated { "generated" } else { "set" },
        coordinator_config: None,
        worker_config: None,
    };
    if let Some(dir) = &args.services {
        let coordinator = dir.join("coordinator.toml");
        let worker = dir.join("worker.toml");
        for p in [&coordinator, &worker] {
            anyhow::ensure!(
                may_write(p, args.force, interactive)?,
                "nothing more written"
            );
        }
        write_private(&coordinator, &coordinator_toml(&args, &token)?)?;
        write_private(&worker, &worker_toml(&args)?)?;
        written.coordinator_config = Some(coordinator);
        written.worker_config = Some(worker);
    }

    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &written)?;
    } else {
        let mut rows = vec![
            ("config", written.config.display().to_string()),
            ("server", server),
            (
                "token",
                if generated {
                    "generated (it is in the config file)".to_string()
                } else {
                    "set".to_string()
                },
            ),
        ];
        if let (Some(c), Some(w)) = (&written.coordinator_config, &written.worker_config) {
            rows.push(("coordinator config", c.display().to_string()));
            rows.push(("worker config", w.display().to_string()));
        }
        output::print_table(&mut out, &output::details(&rows))?;
        writeln!(out, "Next:")?;
        if let (Some(c), Some(w)) = (&written.coordinator_config, &written.worker_config) {
            writeln!(out, "  orch-coordinator --config {}", c.display())?;
            writeln!(out, "  orch-worker --config {}", w.display())?;
        } else {
            writeln!(
                out,
                "  orchctl local up        # or start a cluster yourself"
            )?;
        }
        writeln!(out, "  orchctl status")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn service_files_use_the_services_key_names() {
        let w = Wrap::try_parse_from([
            "x",
            "--services",
            "/tmp/x",
            "--nats-url",
            "nats://n:1",
            "--worker-listen",
            "0.0.0.0:9090",
        ])
        .unwrap();
        let c: toml::Table = coordinator_toml(&w.args, "tok-0123456789abcdef")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(c["nats_url"].as_str(), Some("nats://n:1"));
        assert_eq!(c["tokens"][0].as_str(), Some("tok-0123456789abcdef"));
        assert_eq!(c["listen"].as_str(), Some("127.0.0.1:7070"));
        let wk: toml::Table = worker_toml(&w.args).unwrap().parse().unwrap();
        assert_eq!(wk["slots"].as_integer(), Some(4));
        assert_eq!(wk["listen"].as_str(), Some("0.0.0.0:9090"));
        assert!(wk.get("tokens").is_none());
    }
}
