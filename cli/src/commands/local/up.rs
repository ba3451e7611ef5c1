//! `orchctl local up`: start nats-server, redis-server, a coordinator and N workers on loopback
//! ports, wait until each is ready, and point orchctl's config file at the new cluster.

use super::cluster::{Cluster, Kind, Proc};
use super::process::{self, COORDINATOR, NATS, REDIS, SearchPath, WORKER};
use super::{DataDirArg, Steps, down_command};
use crate::client::Client;
use crate::commands::Ctx;
use crate::config;
use crate::output;
use anyhow::{Context as _, anyhow, bail};
use rand::Rng;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

/// How long each stage (nats, redis, coordinator, workers) may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(150);

const LONG_ABOUT: &str = "\
Start a whole cluster on this machine: nats-server (JetStream), redis-server, one coordinator and
N workers, as background processes that keep running after orchctl exits. Each listens on a free
loopback port; data, logs and the cluster record (cluster.json) go to the data directory.

When the cluster is ready, its URL and a fresh random token are written to orchctl's config file,
so later commands need no flags. Running `local up` again while the cluster runs does nothing.

Needs nats-server and redis-server (on PATH, or ORCH_NATS_SERVER_BIN / ORCH_REDIS_SERVER_BIN),
and orch-coordinator and orch-worker (next to orchctl, on PATH, or ORCH_COORDINATOR_BIN /
ORCH_WORKER_BIN).

With --backend, tasks submitted without --backend run on that agent backend instead of the
simulated one. The workers take the provider settings from this environment: ANTHROPIC_API_KEY
and ANTHROPIC_BASE_URL (claude-code, anthropic), OPENAI_BASE_URL and OPENAI_API_KEY (openai),
ORCH_CLAUDE_BIN (the Claude Code CLI, default `claude` on PATH). Each worker keeps its scratch
workspaces and the CLI's home under the data directory.";

const EXAMPLES: &str = "\
Examples:
  orchctl local up
  orchctl local up --workers 4 --slots 2
  ANTHROPIC_API_KEY=sk-... orchctl local up --backend claude-code
  OPENAI_BASE_URL=http://127.0.0.1:11434/v1 orchctl local up --backend openai
  orchctl local up --data-dir /tmp/orch-test && orchctl submit \"hello\" --follow";

/// Start a cluster on this machine (background processes that outlive orchctl)
#[derive(Debug, clap::Args)]
#[command(long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Args {
    /// How many workers to start
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,

    /// Concurrent agent jobs per worker
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub slots: u32,

    /// Agent backend for tasks that name none (the workers run `sim` jobs on it)
    #[arg(long, default_value = "sim", value_name = "BACKEND",
          value_parser = clap::builder::PossibleValuesParser::new(
              <orch_shared::job::Backend as strum::VariantNames>::VARIANTS))]
    pub backend: String,

    #[command(flatten)]
    pub data_dir: DataDirArg,
}

/// The provider variables a backend cannot work without (one of them), which the workers
/// inherit from orchctl's environment. (`ORCH_CLAUDE_HOME`: a home the CLI is logged in from.)
fn required_env(backend: &str) -> &'static [&'static str] {
    match backend {
        "claude-code" => &[
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_AUTH_TOKEN",
            "ORCH_CLAUDE_HOME",
        ],
        "anthropic" => &["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"],
        "openai" => &["OPENAI_BASE_URL"],
        _ => &[],
    }
}

/// The worker flags that pick the backend and its data directory.
pub fn worker_backend_args(backend: &str, data_dir: &Path) -> Vec<String> {
    let mut args = vec!["--data-dir".into(), data_dir.display().to_string()];
    if backend != "sim" {
        args.push("--default-backend".into());
        args.push(backend.into());
    }
    args
}

/// The programs the cluster runs.
struct Binaries {
    nats: PathBuf,
    redis: PathBuf,
    coordinator: PathBuf,
    worker: PathBuf,
}

impl Binaries {
    /// Finds every program, or lists all the missing ones with how to get them.
    fn find(search: &SearchPath) -> anyhow::Result<Self> {
        let found: Vec<Result<PathBuf, String>> = [NATS, REDIS, COORDINATOR, WORKER]
            .iter()
            .map(|p| search.find(p))
            .collect();
        let missing: Vec<&str> = found
            .iter()
            .filter_map(|r| r.as_ref().err().map(String::as_str))
            .collect();
        match missing.as_slice() {
            [] => {}
            [one] => bail!("{one}"),
            many => bail!(
                "some programs `local up` needs are missing:\n  {}",
                many.join("\n  ")
            ),
        }
        let mut found = found.into_iter().flatten();
        let mut next = || found.next().ok_or_else(|| anyhow!("program lookup failed"));
        Ok(Self {
            nats: next()?,
            redis: next()?,
            coordinator: next()?,
            worker: next()?,
        })
    }
}

/// A fresh API token: 128 random bits as 32 hex characters.
pub fn random_token() -> String {
    let bits: u128 = rand::rng().random();
    format!("{bits:032x}")
}

pub fn nats_args(port: u16, store: &Path) -> Vec<String> {
    vec![
        "-js".into(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-sd".into(),
        store.display().to_string(),
    ]
}

pub fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--dir".into(),
        dir.display().to_string(),
        // No RDB snapshots; the append-only file alone keeps the data across restarts.
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "yes".into(),
    ]
}

/// The coordinator reads its token from `config` (a 0600 file), so it never shows in `ps`.
pub fn coordinator_args(port: u16, nats_url: &str, redis_url: &str, config: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--nats-url".into(),
        nats_url.into(),
        "--redis-url".into(),
        redis_url.into(),
        "--config".into(),
        config.display().to_string(),
    ]
}

/// Writes the coordinator's config file holding the API token, readable only by this user.
fn write_coordinator_config(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(
        file,
        "tokens = [{}]",
        toml::Value::String(token.to_string())
    )
}

pub fn worker_args(nats_url: &str, redis_url: &str, slots: u32, id: &str) -> Vec<String> {
    vec![
        "--nats-url".into(),
        nats_url.into(),
        "--redis-url".into(),
        redis_url.into(),
        "--slots".into(),
        slots.to_string(),
        "--id".into(),
        id.into(),
    ]
}

/// A start in progress: the record so far and the children to stop if it fails.
struct Launch {
    cluster: Cluster,
    children: Vec<Child>,
    steps: Steps,
}

impl Launch {
    fn spawn(
        &mut self,
        name: &str,
        kind: Kind,
        binary: &Path,
        args: &[String],
        port: Option<u16>,
    ) -> anyhow::Result<usize> {
        let log = self.cluster.logs_dir.join(format!("{name}.log"));
        let child = process::spawn_detached(binary, args, &log)
            .with_context(|| format!("failed to start {}", binary.display()))?;
        self.cluster.processes.push(Proc {
            name: name.to_string(),
            kind,
            pid: child.id(),
            port,
            binary: binary.to_path_buf(),
            log,
        });
        self.children.push(child);
        self.cluster.save()?;
        Ok(self.children.len() - 1)
    }

    /// Fails if the child at `index` has exited, naming its log.
    fn check_alive(&mut self, index: usize) -> anyhow::Result<()> {
        let proc = &self.cluster.processes[index];
        if let Ok(Some(status)) = self.children[index].try_wait() {
            return Err(self.failure(
                index,
                format!(
                    "{} exited during start ({status}); see {}",
                    proc.name,
                    proc.log.display()
                ),
            ));
        }
        Ok(())
    }

    /// An error about the process at `index`, after showing the end of its log.
    fn failure(&self, index: usize, message: String) -> anyhow::Error {
        let proc = &self.cluster.processes[index];
        let tail = process::tail(&proc.log, 10);
        if !tail.is_empty() {
            self.steps
                .println(format!("last lines of {}:", proc.log.display()));
            for line in tail {
                self.steps.println(format!("  | {line}"));
            }
        }
        anyhow!(message)
    }

    /// Waits until the process at `index` accepts TCP connections on `port`.
    async fn wait_tcp(&mut self, index: usize, port: u16) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            self.check_alive(index)?;
            if process::accepts(addr).await {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                let proc = &self.cluster.processes[index];
                let msg = format!(
                    "{} did not accept connections on {addr} within {}s; see {}",
                    proc.name,
                    READY_TIMEOUT.as_secs(),
                    proc.log.display()
                );
                return Err(self.failure(index, msg));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the coordinator at `index` reports ready on `/readyz`.
    async fn wait_ready(&mut self, index: usize, client: &Client) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last: String;
        loop {
            self.check_alive(index)?;
            match client.readiness().await {
                Ok(r) if r.ready => return Ok(()),
                Ok(r) => {
                    last = format!(
                        "not ready: nats {}, redis {}, state {}",
                        r.nats, r.redis, r.state
                    )
                }
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > READY_TIMEOUT {
                let proc = &self.cluster.processes[index];
                let msg = format!(
                    "the coordinator was not ready within {}s ({last}); see {}",
                    READY_TIMEOUT.as_secs(),
                    proc.log.display()
                );
                return Err(self.failure(index, msg));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `workers` workers started after `since_ms` are registered.
    async fn wait_workers(
        &mut self,
        indexes: &[usize],
        client: &Client,
        since_ms: u64,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let want = indexes.len();
        loop {
            for &i in indexes {
                self.check_alive(i)?;
            }
            let seen = match client.workers().await {
                // A worker registered by an earlier cluster in the same data directory does not
                // count; allow a little clock slack between the processes.
                Ok(list) => list
                    .workers
                    .iter()
                    .filter(|w| w.started_at_ms == 0 || w.started_at_ms + 5_000 >= since_ms)
                    .count(),
                Err(e) if e.is_transient() => 0,
                Err(e) => return Err(e.into()),
            };
            if seen >= want {
                return Ok(());
            }
            self.steps
                .step(format!("waiting for workers to register ({seen}/{want})"));
            if start.elapsed() > READY_TIMEOUT {
                let logs = self.cluster.logs_dir.join("worker-*.log");
                let msg = format!(
                    "only {seen} of {want} workers registered within {}s; see {}",
                    READY_TIMEOUT.as_secs(),
                    logs.display()
                );
                return Err(match indexes.first() {
                    Some(&i) => self.failure(i, msg),
                    None => anyhow!(msg),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops everything started so far, newest first, and forgets the cluster.
    async fn abort(&mut self) {
        self.steps.step("stopping what was started");
        for child in self.children.iter_mut().rev() {
            process::stop_child(child, Duration::from_secs(5)).await;
        }
        let _ = Cluster::remove(&self.cluster.data_dir);
    }
}

fn reserve() -> anyhow::Result<(TcpListener, u16)> {
    process::free_port().context("failed to find a free loopback port")
}

async fn start(
    launch: &mut Launch,
    bins: &Binaries,
    args: &Args,
    token: &str,
) -> anyhow::Result<()> {
    let data_dir = launch.cluster.data_dir.clone();
    // Hold all three ports until the programs start, so they cannot get the same one.
    let (nats_l, nats_port) = reserve()?;
    let (redis_l, redis_port) = reserve()?;
    let (coord_l, coord_port) = reserve()?;
    launch.cluster.nats_url = format!("nats://127.0.0.1:{nats_port}");
    launch.cluster.redis_url = format!("redis://127.0.0.1:{redis_port}");
    launch.cluster.server = format!("http://127.0.0.1:{coord_port}");
    let nats_url = launch.cluster.nats_url.clone();
    let redis_url = launch.cluster.redis_url.clone();

    launch
        .steps
        .step(format!("starting nats-server on port {nats_port}"));
    drop(nats_l);
    let nats = launch.spawn(
        "nats",
        Kind::Nats,
        &bins.nats,
        &nats_args(nats_port, &data_dir.join("nats")),
        Some(nats_port),
    )?;
    launch.wait_tcp(nats, nats_port).await?;

    launch
        .steps
        .step(format!("starting redis-server on port {redis_port}"));
    drop(redis_l);
    let redis = launch.spawn(
        "redis",
        Kind::Redis,
        &bins.redis,
        &redis_args(redis_port, &data_dir.join("redis")),
        Some(redis_port),
    )?;
    launch.wait_tcp(redis, redis_port).await?;

    launch
        .steps
        .step(format!("starting the coordinator on port {coord_port}"));
    drop(coord_l);
    let coordinator_config = data_dir.join("coordinator.toml");
    write_coordinator_config(&coordinator_config, token)
        .with_context(|| format!("failed to write {}", coordinator_config.display()))?;
    let coordinator = launch.spawn(
        "coordinator",
        Kind::Coordinator,
        &bins.coordinator,
        &coordinator_args(coord_port, &nats_url, &redis_url, &coordinator_config),
        Some(coord_port),
    )?;
    let client = Client::new(&launch.cluster.server, Some(token.to_string()))?;
    launch.wait_ready(coordinator, &client).await?;

    launch
        .steps
        .step(format!("starting {} worker(s)", args.workers));
    let since_ms = orch_shared::now_ms();
    let mut workers = Vec::new();
    for i in 1..=args.workers {
        let id = format!("local-{i}");
        // Each worker serves /metrics (and its health endpoints) on a port of its own, listed
        // by `local status` and in the Prometheus targets file.
        let (metrics_l, metrics_port) = reserve()?;
        let mut worker = worker_args(&nats_url, &redis_url, args.slots, &id);
        worker.extend(["--listen".into(), format!("127.0.0.1:{metrics_port}")]);
        // The provider variables (keys included) reach the workers through their inherited
        // environment, never their command line.
        worker.extend(worker_backend_args(
            &args.backend,
            &data_dir.join(format!("worker-{i}")),
        ));
        drop(metrics_l);
        workers.push(launch.spawn(
            &format!("worker-{i}"),
            Kind::Worker,
            &bins.worker,
            &worker,
            Some(metrics_port),
        )?);
    }
    launch.wait_workers(&workers, &client, since_ms).await?;
    launch.cluster.write_prometheus_targets()
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.resolve(ctx)?;

    if let Some(existing) = Cluster::load(&data_dir)? {
        let down: Vec<&str> = existing
            .processes
            .iter()
            .filter(|p| !p.is_running())
            .map(|p| p.name.as_str())
            .collect();
        if down.is_empty() && !existing.processes.is_empty() {
            let mut out = std::io::stdout().lock();
            if ctx.json() {
                output::json(&mut out, &existing)?;
            } else {
                writeln!(
                    out,
                    "a local cluster is already running from {} (server {})",
                    data_dir.display(),
                    existing.server
                )?;
            }
            out.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        if down.len() < existing.processes.len() {
            bail!(
                "the local cluster in {} is partly running ({} not running); run `{}` first",
                data_dir.display(),
                down.join(", "),
                down_command(ctx, &data_dir)
            );
        }
        // Nothing of it runs any more (a reboot, a kill): the record is stale.
        Cluster::remove(&data_dir)?;
    }

    let bins = Binaries::find(&SearchPath::from_env())?;
    let needed = required_env(&args.backend);
    if !needed.is_empty() && !needed.iter().any(|v| std::env::var_os(v).is_some()) {
        eprintln!(
            "warning: --backend {} without {} set: its jobs will fail until the workers get it",
            args.backend,
            needed.join(" or ")
        );
    }
    let config_path = ctx.paths.require_config()?.to_path_buf();
    let logs_dir = data_dir.join("logs");
    for dir in [
        &data_dir,
        &logs_dir,
        &data_dir.join("nats"),
        &data_dir.join("redis"),
    ] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }

    let token = random_token();
    let mut launch = Launch {
        cluster: Cluster {
            data_dir: data_dir.clone(),
            logs_dir: logs_dir.clone(),
            server: String::new(),
            nats_url: String::new(),
            redis_url: String::new(),
            config: Some(config_path.clone()),
            started_at_ms: orch_shared::now_ms(),
            processes: Vec::new(),
        },
        children: Vec::new(),
        steps: Steps::new(),
    };

    let started = tokio::select! {
        r = start(&mut launch, &bins, &args, &token) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = started {
        launch.abort().await;
        launch.steps.done();
        return Err(e.context("failed to start the local cluster"));
    }
    launch.steps.done();

    config::write_settings(&config_path, &launch.cluster.server, &token)?;

    let cluster = &launch.cluster;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, cluster)?;
    } else {
        let rows = [
            ("server", cluster.server.clone()),
            ("data dir", cluster.data_dir.display().to_string()),
            ("logs", cluster.logs_dir.display().to_string()),
            (
                "workers",
                format!(
                    "{} × {} slots, backend {}",
                    args.workers, args.slots, args.backend
                ),
            ),
            (
                "config",
                format!("{} (server, token)", config_path.display()),
            ),
        ];
        writeln!(out, "local cluster is up")?;
        output::print_table(&mut out, &output::details(&rows))?;
        writeln!(
            out,
            "submit a task:  orchctl submit \"add a README\" --follow"
        )?;
        writeln!(out, "stop it:        {}", down_command(ctx, &data_dir))?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_32_hex_characters_and_fresh() {
        let a = random_token();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
    }

    #[test]
    fn service_command_lines_match_the_contract() {
        assert_eq!(
            nats_args(4222, Path::new("/d/nats")).join(" "),
            "-js -a 127.0.0.1 -p 4222 -sd /d/nats"
        );
        let redis = redis_args(6379, Path::new("/d/redis"));
        assert_eq!(
            redis,
            [
                "--port",
                "6379",
                "--bind",
                "127.0.0.1",
                "--dir",
                "/d/redis",
                "--save",
                "",
                "--appendonly",
                "yes"
            ]
        );
        assert_eq!(
            coordinator_args(7070, "nats://n", "redis://r", Path::new("/d/c.toml")).join(" "),
            "--listen 127.0.0.1:7070 --nats-url nats://n --redis-url redis://r --config /d/c.toml"
        );
        assert_eq!(
            worker_args("nats://n", "redis://r", 4, "local-1").join(" "),
            "--nats-url nats://n --redis-url redis://r --slots 4 --id local-1"
        );
        assert_eq!(
            worker_backend_args("sim", Path::new("/d/worker-1")).join(" "),
            "--data-dir /d/worker-1"
        );
        assert_eq!(
            worker_backend_args("claude-code", Path::new("/d/worker-1")).join(" "),
            "--data-dir /d/worker-1 --default-backend claude-code"
        );
        for backend in ["claude-code", "anthropic", "openai"] {
            assert!(!required_env(backend).is_empty(), "{backend}");
        }
    }
}
