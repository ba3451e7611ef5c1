//! Native agents (the `anthropic` backend's tool loop, real tools in scratch workspaces) on
//! one worker against a fake Messages API that answers every request after a delay, each
//! agent doing a fixed number of tool rounds before its answer. Reports, from the same run,
//! the worker's RSS per agent while they all run, its CPU per tool round (the loop's own
//! cost: the fake's delay is not the worker's CPU), and its heartbeats (in-progress acks)
//! sent and sent late, and the loop's own time per tool round (p50, p99), from its
//! `/metrics`. With the `claude-code` backend the same agents are the real Claude Code CLI
//! against the same fake, and the memory of the processes below the worker (RSS and PSS,
//! summed at their peak) is what one agent costs.

use crate::cluster::{Cluster, Spec, children_cpu_s, cpu_s, descendants_kb, rss_kb};
use crate::scenarios::submit_many;
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use orch_shared::event::{Event, EventKind};
use orch_tests::fake_anthropic::FakeAnthropic;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Which agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The worker's own tool loop (`anthropic` backend).
    Native,
    /// The real Claude Code CLI (`claude-code` backend; `ORCH_CLAUDE_BIN`).
    ClaudeCode,
}

pub struct Params {
    pub agents: usize,
    pub rounds: usize,
    pub delay: Duration,
    pub backend: Backend,
}

pub async fn run(spec: &Spec, p: &Params) -> anyhow::Result<Value> {
    let (fake, backend) = match p.backend {
        Backend::Native => (
            FakeAnthropic::start_rounds(p.rounds, p.delay).await,
            "anthropic",
        ),
        Backend::ClaudeCode => (
            FakeAnthropic::start_rounds_calling(p.rounds, p.delay, "Glob", json!({"pattern": "*"}))
                .await,
            "claude-code",
        ),
    };
    let mut worker_args = fake.worker_args(backend);
    if p.backend == Backend::ClaudeCode {
        let bin = std::env::var("ORCH_CLAUDE_BIN")
            .context("the claude-code backend runs the real CLI: set ORCH_CLAUDE_BIN")?;
        worker_args.extend(["--claude-bin".to_string(), bin]);
    }
    let cluster = Cluster::start(Spec {
        workers: 1,
        slots: p.agents as u32,
        worker_metrics: true,
        worker_args,
        ..spec.clone()
    })
    .await?;
    let worker = cluster.workers[0].pid();
    let watch = Watch::start(&cluster.nats_url, &["task_finished"], Keep::Payloads).await?;
    let idle_rss = rss_kb(worker) as f64;
    let cpu0 = cpu_s(worker);
    let children0 = children_cpu_s(worker);
    let t0 = Instant::now();
    submit_many(&cluster, p.agents, &["builder"], 32, 0).await?;
    // Each agent needs rounds + 1 requests of `delay`; the rest is the loop and the cluster.
    let deadline = p.delay * (p.rounds as u32 + 1) * 4
        + Duration::from_millis(100) * p.agents as u32
        + Duration::from_secs(120);
    let (mut max_rss, mut samples) = (0.0f64, Vec::new());
    // The processes below the worker at their peak: (count, RSS, PSS) of the agents' own
    // (not the supervisors, which are the worker binary), and of all of them.
    let (mut agents_peak, mut tree_peak) = ((0, 0, 0), (0, 0, 0));
    while watch.count("task_finished") < p.agents as u64 {
        if t0.elapsed() > deadline {
            bail!(
                "only {} of {} tasks finished; running: {}\n{}",
                watch.count("task_finished"),
                p.agents,
                cluster.get("/v1/tasks?status=running&limit=1").await?,
                cluster.logs()
            );
        }
        let rss = rss_kb(worker) as f64;
        max_rss = max_rss.max(rss);
        samples.push(rss);
        if p.backend == Backend::ClaudeCode {
            let own = descendants_kb(worker, |name| name != "orch-worker");
            if own.1 > agents_peak.1 {
                agents_peak = own;
            }
            let all = descendants_kb(worker, |_| true);
            if all.1 > tree_peak.1 {
                tree_peak = all;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total_s = t0.elapsed().as_secs_f64();
    let cpu = cpu_s(worker) - cpu0;
    let children = children_cpu_s(worker) - children0;
    let mut failed = 0;
    for (_, _, payload) in watch.take_payloads() {
        let event: Event = orch_shared::codec::decode(&payload).context("an event")?;
        if let EventKind::TaskFinished { status, .. } = &event.kind
            && status != "completed"
        {
            failed += 1;
        }
    }
    // Why agents failed, if some did: the first failed task's error.
    let failure = if failed > 0 {
        let page = cluster.get("/v1/tasks?status=failed&limit=1").await?;
        let id = page["tasks"][0]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        cluster.get(&format!("/v1/tasks/{id}")).await?["error"].clone()
    } else {
        Value::Null
    };
    // Heartbeats (in-progress acks) sent, and those sent late, from the worker's /metrics.
    let metrics = match cluster.worker_metrics.first() {
        Some(url) => reqwest::get(url).await?.text().await?,
        None => String::new(),
    };
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    let quantile = |q: &str| {
        let line = format!("orch_worker_tool_round_overhead_seconds{{quantile=\"{q}\"}} ");
        counter(&line).map(|s| s * 1000.0)
    };
    let per_agent = |(n, rss, pss): (usize, u64, u64)| {
        json!({
            "processes": n,
            "rss_mb": rss as f64 / 1024.0,
            "pss_mb": pss as f64 / 1024.0,
            "rss_mb_per_agent": rss as f64 / 1024.0 / p.agents as f64,
            "pss_mb_per_agent": pss as f64 / 1024.0 / p.agents as f64,
        })
    };
    let requests = fake.message_requests().len();
    let rounds = (p.agents * p.rounds) as f64;
    Ok(json!({
        "backend": backend,
        "agents": p.agents,
        "rounds_per_agent": p.rounds,
        "api_delay_s": p.delay.as_secs_f64(),
        "api_requests": requests,
        "tasks_failed": failed,
        "first_failure": failure,
        "all_finished_after_s": total_s,
        "worker_idle_rss_mb": idle_rss / 1024.0,
        "worker_rss_mb_max": max_rss / 1024.0,
        "worker_rss_kb_per_agent": (max_rss - idle_rss) / p.agents as f64,
        "worker_cpu_s": cpu,
        "worker_cpu_ms_per_round": cpu * 1000.0 / rounds,
        "worker_cpu_ms_per_request": cpu * 1000.0 / requests.max(1) as f64,
        "heartbeats": counter("orch_worker_in_progress_acks_total "),
        "heartbeats_late": counter("orch_worker_in_progress_acks_late_total "),
        "loop_ms_per_round_p50": quantile("0.5"),
        "loop_ms_per_round_p99": quantile("0.99"),
        "agent_processes_peak": (p.backend == Backend::ClaudeCode).then(|| per_agent(agents_peak)),
        "worker_tree_peak": (p.backend == Backend::ClaudeCode).then(|| per_agent(tree_peak)),
        "worker_children_cpu_s": children,
        "worker_children_cpu_ms_per_agent": children * 1000.0 / p.agents as f64,
    }))
}
