//! The cluster a scenario measures: `nats-server` (file storage, from the test-support crate),
//! a `redis-server` started here with the settings of the anchor it is compared to, one
//! coordinator and N workers taken from a binary folder (this build's, or a baseline build's
//! for before/after figures in the same run).

use anyhow::{Context, bail};
use orch_tests::{Server, TOKEN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How the benchmark's Redis persists, named after the anchor that runs Redis that way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// No RDB snapshots, no append-only file: `celery/run.sh`'s own Redis (`--save ""
    /// --appendonly no`). jsbench runs on the same Redis, so every ratio compares like with like.
    Anchor,
    /// The test-support settings: append-only file with `appendfsync always`.
    Durable,
}

impl RedisMode {
    pub fn describe(self) -> &'static str {
        match self {
            RedisMode::Anchor => "no persistence (--save \"\" --appendonly no, as celery/run.sh)",
            RedisMode::Durable => {
                "append-only file, appendfsync always (as the test-support crate)"
            }
        }
    }
}

/// The shape of a benchmark cluster.
#[derive(Clone, Debug)]
pub struct Spec {
    pub workers: usize,
    pub slots: u32,
    pub ack_wait: Duration,
    pub redis: RedisMode,
    /// Where `orch-coordinator`, `orch-worker` and `orchctl` are.
    pub bin_dir: PathBuf,
    /// Workers serve `/metrics` on a free port.
    pub worker_metrics: bool,
    /// More flags for every worker.
    pub worker_args: Vec<String>,
    /// More flags for the coordinator.
    pub coordinator_args: Vec<String>,
    /// NATS servers: 1 (every stream R1), or that many on loopback forming one NATS cluster,
    /// every stream and bucket with as many replicas (`--stream-replicas`); the services are
    /// given every server's URL.
    pub nats_nodes: usize,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The first (or only) NATS server; the bench's own clients use it.
    pub nats: Server,
    pub nats_url: String,
    /// The other servers of a NATS cluster ([`Spec::nats_nodes`]).
    pub nats_others: Vec<Server>,
    /// What the services are given: every server's URL, comma separated.
    pub services_nats_url: String,
    pub redis: Server,
    pub redis_url: String,
    pub coordinator: Server,
    pub url: String,
    pub workers: Vec<Server>,
    /// `/metrics` of each worker, when [`Spec::worker_metrics`].
    pub worker_metrics: Vec<String>,
    pub spec: Spec,
    http: reqwest::Client,
}

fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Server> {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("start {name} ({:?})", cmd.get_program()))?;
    Ok(Server {
        name: name.to_string(),
        child,
        log,
    })
}

fn redis(dir: &Path, mode: RedisMode) -> anyhow::Result<(Server, String)> {
    let data = dir.join("redis");
    std::fs::create_dir_all(&data)?;
    for _ in 0..5 {
        let port = orch_tests::free_port();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        match mode {
            RedisMode::Anchor => cmd.args(["--appendonly", "no"]),
            RedisMode::Durable => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        cmd.arg("--dir").arg(&data);
        let mut server = spawn("redis", &mut cmd, dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && server.is_running() {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok((server, format!("redis://127.0.0.1:{port}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bail!("redis-server did not start on any of 5 free ports")
}

/// Starts a coordinator on a free port; returns it and its address once it listens.
async fn start_coordinator(
    spec: &Spec,
    dir: &Path,
    nats_url: &str,
    redis_url: &str,
) -> anyhow::Result<(Server, String)> {
    let addr_file = dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(spec.bin_dir.join("orch-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--nats-url", nats_url])
        .args(["--redis-url", redis_url, "--token", TOKEN, "--job-ack-wait"])
        .arg(format!("{}ms", spec.ack_wait.as_millis()))
        .arg("--addr-file")
        .arg(&addr_file)
        .args(&spec.coordinator_args)
        .env("ORCH_LOG", "info");
    let coordinator = spawn("coordinator", &mut cmd, dir)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(a) = std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|s| !s.is_empty())
        {
            return Ok((coordinator, a));
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not listen\n{}", coordinator.tail(40));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Cluster {
    /// Stops the coordinator (SIGTERM) and starts it again on the same NATS and Redis; returns
    /// the time from its start to its first ready answer.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<Duration> {
        self.coordinator.signal(libc::SIGTERM);
        if self
            .coordinator
            .wait_exit(Duration::from_secs(60))
            .is_none()
        {
            self.coordinator.signal(libc::SIGKILL);
            self.coordinator.wait_exit(Duration::from_secs(10));
        }
        let t0 = Instant::now();
        let (coordinator, addr) = start_coordinator(
            &self.spec,
            self.dir.path(),
            &self.services_nats_url,
            &self.redis_url,
        )
        .await?;
        self.coordinator = coordinator;
        self.url = format!("http://{addr}");
        self.wait_ready().await?;
        Ok(t0.elapsed())
    }

    pub async fn start(spec: Spec) -> anyhow::Result<Cluster> {
        for bin in ["orch-coordinator", "orch-worker", "orchctl"] {
            let path = spec.bin_dir.join(bin);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the binaries first (`cargo build --release --workspace --bins`)",
                    path.display()
                );
            }
        }
        let dir = tempfile::Builder::new().prefix("orch-bench-").tempdir()?;
        let mut spec = spec;
        let (nats, nats_url, nats_others, services_nats_url) = if spec.nats_nodes > 1 {
            let (mut servers, nodes) = orch_tests::nats_cluster(dir.path(), spec.nats_nodes).await;
            spec.coordinator_args
                .extend(["--stream-replicas".to_string(), spec.nats_nodes.to_string()]);
            let urls: Vec<String> = nodes.iter().map(orch_tests::NatsNode::url).collect();
            let first = servers.remove(0);
            (first, urls[0].clone(), servers, urls.join(","))
        } else {
            let (nats, url) = orch_tests::nats(dir.path());
            (nats, url.clone(), vec![], url)
        };
        let (redis, redis_url) = redis(dir.path(), spec.redis)?;
        let (coordinator, addr) =
            start_coordinator(&spec, dir.path(), &services_nats_url, &redis_url).await?;
        let mut cluster = Cluster {
            dir,
            nats,
            nats_url,
            nats_others,
            services_nats_url,
            redis,
            redis_url,
            coordinator,
            url: format!("http://{addr}"),
            workers: vec![],
            worker_metrics: vec![],
            spec: spec.clone(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
        };
        cluster.wait_ready().await?;
        cluster.add_workers(spec.workers).await?;
        Ok(cluster)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator is not ready\n{}",
                    self.coordinator.tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts `n` more workers and waits until all have registered.
    pub async fn add_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let id = format!("worker-{}", self.workers.len());
            let mut cmd = Command::new(self.spec.bin_dir.join("orch-worker"));
            cmd.args(["--nats-url", &self.services_nats_url])
                .args(["--redis-url", &self.redis_url])
                .args(["--id", &id, "--slots", &self.spec.slots.to_string()])
                .args(["--drain-grace", "5s"])
                .args(&self.spec.worker_args)
                .env("ORCH_LOG", "info");
            // Its own data directory (the default, named after the id, may be another run's).
            if !self.spec.worker_args.iter().any(|a| a == "--data-dir") {
                cmd.arg("--data-dir").arg(self.dir.path().join(&id));
            }
            if self.spec.worker_metrics {
                let port = orch_tests::free_port();
                cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
                self.worker_metrics
                    .push(format!("http://127.0.0.1:{port}/metrics"));
            }
            self.workers.push(spawn(&id, &mut cmd, self.dir.path())?);
        }
        let want = self.workers.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.get("/v1/workers").await?;
            if v["workers"].as_array().map_or(0, Vec::len) >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{want} workers did not register\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn client(&self) -> reqwest::Client {
        self.http.clone()
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        Ok(r.json().await?)
    }

    pub fn orchctl(&self) -> Command {
        let mut cmd = Command::new(self.spec.bin_dir.join("orchctl"));
        cmd.args(["--server", &self.url, "--token", TOKEN])
            .env("ORCH_HOME", self.dir.path())
            .env_remove("ORCH_SERVER")
            .env_remove("ORCH_TOKEN")
            .env_remove("ORCH_CONFIG");
        cmd
    }

    /// The last lines of every process's log, for error messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for server in [&self.coordinator, &self.nats, &self.redis]
            .into_iter()
            .chain(&self.nats_others)
            .chain(self.workers.iter().take(4))
        {
            s.push_str(&server.tail(20));
        }
        s
    }

    /// Pids of the server processes, for CPU accounting.
    pub fn pids(&self) -> Pids {
        Pids {
            coordinator: self.coordinator.pid(),
            workers: self.workers.iter().map(Server::pid).collect(),
            nats: std::iter::once(&self.nats)
                .chain(&self.nats_others)
                .map(Server::pid)
                .collect(),
            redis: self.redis.pid(),
        }
    }

    /// Bytes in the NATS servers' stores (every server's, summed).
    pub fn nats_store_bytes(&self) -> u64 {
        let stores: Vec<PathBuf> = if self.nats_others.is_empty() {
            vec![self.dir.path().join("nats")]
        } else {
            (0..=self.nats_others.len())
                .map(|i| self.dir.path().join(format!("nats-n{i}")))
                .collect()
        };
        stores.iter().map(|d| dir_bytes(d)).sum()
    }
}

/// Bytes of the files under `dir` (0 for what cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The processes of a cluster.
pub struct Pids {
    pub coordinator: i32,
    pub workers: Vec<i32>,
    /// Every NATS server.
    pub nats: Vec<i32>,
    pub redis: i32,
}

/// CPU seconds used so far by each part of a cluster (and by this process).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub coordinator: f64,
    pub workers: f64,
    pub nats: f64,
    pub redis: f64,
    pub bench: f64,
}

impl Pids {
    /// Resident memory of the NATS servers (all of them) in MB.
    pub fn nats_rss_mb(&self) -> f64 {
        self.nats.iter().map(|p| rss_kb(*p)).sum::<u64>() as f64 / 1024.0
    }

    pub fn cpu(&self) -> Cpu {
        Cpu {
            coordinator: cpu_s(self.coordinator),
            workers: self.workers.iter().map(|p| cpu_s(*p)).sum(),
            nats: self.nats.iter().map(|p| cpu_s(*p)).sum(),
            redis: cpu_s(self.redis),
            bench: cpu_s(std::process::id() as i32),
        }
    }
}

impl Cpu {
    /// CPU milliseconds per item of each part between `self` (before) and `after`.
    pub fn per_item_ms(&self, after: &Cpu, items: usize) -> Value {
        let per = |a: f64, b: f64| (b - a) * 1000.0 / items.max(1) as f64;
        serde_json::json!({
            "coordinator": per(self.coordinator, after.coordinator),
            "workers": per(self.workers, after.workers),
            "nats": per(self.nats, after.nats),
            "redis": per(self.redis, after.redis),
            "bench_client": per(self.bench, after.bench),
        })
    }
}

/// Resident memory of a process in kB.
pub fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The memory of every process below `pid` (not `pid` itself): how many, the sum of their
/// RSS and the sum of their PSS (shared pages split between the processes sharing them), in
/// KiB, for those whose command name `keep` accepts.
pub fn descendants_kb(pid: i32, keep: impl Fn(&str) -> bool) -> (usize, u64, u64) {
    let mut parent = std::collections::HashMap::new();
    let mut names = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or(0);
        parent.insert(p, ppid);
        names.insert(p, stat[open + 1..close].to_string());
    }
    let below = |mut p: i32| {
        for _ in 0..64 {
            match parent.get(&p) {
                Some(&pp) if pp == pid => return true,
                Some(&pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    };
    let (mut n, mut rss, mut pss) = (0, 0, 0);
    for (&p, name) in &names {
        if p == pid || !below(p) || !keep(name) {
            continue;
        }
        n += 1;
        rss += rss_kb(p);
        pss += std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Pss:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0);
    }
    (n, rss, pss)
}

/// CPU seconds (user + system) of the children a process started and waited for so far
/// (for a worker: git and every command its jobs ran, supervisors included).
pub fn children_cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(13).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(14).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_s(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // /proc reports clock ticks in USER_HZ, which is 100 on Linux.
    ticks / 100.0
}

/// Bytes Redis uses for data (`used_memory` minus its startup overhead).
pub async fn redis_used(url: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("used_memory").saturating_sub(field("used_memory_startup")))
}
