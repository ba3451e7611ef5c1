//! Workers holding many long-running `sim` agents at once (`concurrency`: one worker;
//! `agents10k`: many workers, at two sizes): every agent must keep its job alive (an
//! in-progress ack and a `heartbeat` event every third of the ack wait) and none may be
//! redelivered. Reports the workers' RSS and CPU while they hold them and, while they do, the
//! dispatch latency of new jobs, `orchctl status`, the coordinator's CPU and RSS, and the
//! memory Redis and NATS take per running agent.

use crate::cluster::{Cluster, Spec, cpu_s, rss_kb};
use crate::scenarios::{latency_light, pct, submit_many};
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use orch_shared::event::{Event, EventKind};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub struct Params {
    pub agents: usize,
    pub hold: Duration,
    pub ack_wait: Duration,
    /// Worker processes sharing the agents.
    pub workers: usize,
    /// New one-agent tasks timed (submit → agent start) while the agents are held (0: none).
    pub samples: usize,
}

/// Slots each worker has free beside its share of the held agents, for the timed new jobs.
const SPARE_SLOTS: usize = 4;

/// A Prometheus counter's value from a scrape (0 when absent).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

pub async fn run(spec: &Spec, p: &Params) -> anyhow::Result<Value> {
    let workers = p.workers.max(1);
    let spare = if p.samples > 0 { SPARE_SLOTS } else { 0 };
    let cluster = Cluster::start(Spec {
        workers,
        slots: (p.agents.div_ceil(workers) + spare) as u32,
        ack_wait: p.ack_wait,
        worker_metrics: true,
        ..spec.clone()
    })
    .await?;
    let pids = cluster.pids();
    let workers_rss = || pids.workers.iter().map(|w| rss_kb(*w)).sum::<u64>() as f64 / 1024.0;
    let workers_cpu = || pids.workers.iter().map(|w| cpu_s(*w)).sum::<f64>();
    let redis_idle = crate::cluster::redis_used(&cluster.redis_url).await?;
    let nats_idle = pids.nats_rss_mb();
    let coordinator_idle = rss_kb(pids.coordinator) as f64 / 1024.0;
    let watch = Watch::start(
        &cluster.nats_url,
        &["job_started", "heartbeat", "job_finished", "task_finished"],
        Keep::Payloads,
    )
    .await?;
    let idle_rss = workers_rss();
    let t0 = Instant::now();
    submit_many(
        &cluster,
        p.agents,
        &["builder"],
        32,
        p.hold.as_millis() as u64,
    )
    .await?;
    if !watch
        .wait_count("job_started", p.agents as u64, Duration::from_secs(60))
        .await
    {
        bail!(
            "only {} of {} agents started\n{}",
            watch.count("job_started"),
            p.agents,
            cluster.logs()
        );
    }
    let all_started_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "  {} agents running after {all_started_s:.1} s; holding",
        p.agents
    );
    // Sample the workers while every agent runs (the first one finishes `hold` after the
    // first submission).
    let cpu0 = workers_cpu();
    let coordinator_cpu0 = cpu_s(pids.coordinator);
    let w0 = Instant::now();
    let mut max_rss = 0.0f64;
    let mut rss_samples = Vec::new();
    // `num_redelivered` counts redelivered jobs not yet acked: sampled while they are held.
    let mut queue = JobQueue::bind(&cluster.nats_url).await?;
    let mut max_redelivered = 0;
    let mut during = json!(null);
    let mut holding = json!(null);
    let margin = Duration::from_secs(2);
    while t0.elapsed() + margin < p.hold {
        let rss = workers_rss();
        max_rss = max_rss.max(rss);
        rss_samples.push(rss);
        if rss_samples.len() % 4 == 1 {
            max_redelivered = max_redelivered.max(queue.num_redelivered().await?);
        }
        // Halfway: what a user sees of the cluster while it holds the agents.
        if during.is_null() && t0.elapsed() * 2 >= p.hold {
            let redis = crate::cluster::redis_used(&cluster.redis_url).await?;
            let nats = pids.nats_rss_mb();
            let per = |x: f64| x / p.agents.max(1) as f64;
            holding = json!({
                "redis_bytes_per_agent": per(redis.saturating_sub(redis_idle) as f64),
                "nats_kb_per_agent": per((nats - nats_idle) * 1024.0),
                "coordinator_kb_per_agent":
                    per((rss_kb(pids.coordinator) as f64 / 1024.0 - coordinator_idle) * 1024.0),
                "coordinator_rss_mb": rss_kb(pids.coordinator) as f64 / 1024.0,
                "nats_rss_mb": nats,
                "redis_used_mb": redis as f64 / 1048576.0,
            });
            let mut status = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let out = cluster.orchctl().arg("status").output()?;
                anyhow::ensure!(out.status.success(), "orchctl status failed");
                status.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            status.sort_by(f64::total_cmp);
            // The same answer without the CLI's start: what the coordinator takes.
            let mut api = Vec::new();
            let http = cluster.client();
            for _ in 0..9 {
                let t = Instant::now();
                let r = http
                    .get(format!("{}/v1/status", cluster.url))
                    .bearer_auth(orch_tests::TOKEN)
                    .send()
                    .await?;
                let code = r.status();
                r.bytes().await?;
                anyhow::ensure!(code.is_success(), "GET /v1/status: {code}");
                api.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            api.sort_by(f64::total_cmp);
            let l = if p.samples > 0 {
                latency_light(&cluster, p.samples).await?
            } else {
                json!(null)
            };
            during = json!({
                "orchctl_status_ms": pct(&status, 0.5),
                "status_api_ms": pct(&api, 0.5),
                "dispatch_p50_ms": l["submit_to_start"]["p50_ms"],
                "dispatch_p99_ms": l["submit_to_start"]["p99_ms"],
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let held_s = w0.elapsed().as_secs_f64();
    let cpu_pct = (workers_cpu() - cpu0) / held_s.max(0.001) * 100.0;
    let coordinator_cpu_pct =
        (cpu_s(pids.coordinator) - coordinator_cpu0) / held_s.max(0.001) * 100.0;
    if !watch
        .wait_count(
            "task_finished",
            (p.agents + p.samples) as u64,
            p.ack_wait * 2 + Duration::from_secs(30),
        )
        .await
    {
        bail!(
            "only {} of {} tasks finished\n{}",
            watch.count("task_finished"),
            p.agents,
            cluster.logs()
        );
    }
    let total_s = t0.elapsed().as_secs_f64();

    // Per job: the gaps between its start, heartbeats and finish, and its deliveries.
    let period = p.ack_wait / 3;
    let mut timeline: HashMap<String, Vec<Instant>> = HashMap::new();
    let mut starts: HashMap<String, u64> = HashMap::new();
    let mut redelivered_starts = 0u64;
    for (_, at, payload) in watch.take_payloads() {
        let event: Event = orch_shared::codec::decode(&payload).context("an event")?;
        let Some(job) = event.job_id else { continue };
        let job = job.to_string();
        match &event.kind {
            EventKind::JobStarted { delivery, .. } => {
                *starts.entry(job.clone()).or_default() += 1;
                if *delivery > 1 {
                    redelivered_starts += 1;
                }
                timeline.entry(job).or_default().push(at);
            }
            EventKind::Heartbeat | EventKind::JobFinished { .. } => {
                timeline.entry(job).or_default().push(at)
            }
            _ => {}
        }
    }
    let mut max_gap = Duration::ZERO;
    let mut late = 0u64;
    let mut missed = 0u64;
    for times in timeline.values_mut() {
        times.sort();
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            max_gap = max_gap.max(gap);
            // A heartbeat is due every `period`; half a period late is late, a gap of the
            // whole ack wait would have let JetStream redeliver the job.
            if gap > period + period / 2 {
                late += 1;
            }
            if gap >= p.ack_wait {
                missed += 1;
            }
        }
    }
    let started_twice = starts.values().filter(|n| **n > 1).count();
    let mut metrics = String::new();
    for url in &cluster.worker_metrics {
        metrics.push_str(&cluster.client().get(url).send().await?.text().await?);
        metrics.push('\n');
    }
    Ok(json!({
        "agents": p.agents,
        "workers": workers,
        "while_holding": during,
        "memory_while_holding": holding,
        "coordinator_cpu_pct_while_holding": coordinator_cpu_pct,
        "coordinator_cpu_pct_per_1000_agents": coordinator_cpu_pct * 1000.0 / p.agents.max(1) as f64,
        "hold_s": p.hold.as_secs_f64(),
        "ack_wait_s": p.ack_wait.as_secs_f64(),
        "heartbeat_period_s": period.as_secs_f64(),
        "all_started_after_s": all_started_s,
        "all_finished_after_s": total_s,
        "heartbeat_events": watch.count("heartbeat"),
        "in_progress_acks": counter(&metrics, "orch_worker_in_progress_acks_total"),
        "late_heartbeats": late,
        "missed_heartbeats": missed,
        "max_gap_s": max_gap.as_secs_f64(),
        "consumer_num_redelivered_max": max_redelivered,
        "redelivered_starts": redelivered_starts,
        "jobs_started_twice": started_twice,
        "worker_jobs_redelivered": counter(&metrics, "orch_worker_jobs_redelivered_total"),
        "worker_leases_lost": counter(&metrics, "orch_worker_leases_lost_total"),
        "worker_idle_rss_mb": idle_rss,
        "worker_kb_per_agent": (max_rss - idle_rss) * 1024.0 / p.agents.max(1) as f64,
        "worker_rss_mb_max": max_rss,
        "worker_rss_mb_mean": rss_samples.iter().sum::<f64>() / rss_samples.len().max(1) as f64,
        "worker_cpu_pct_while_holding": cpu_pct,
        "held_s": held_s,
    }))
}

/// Per running agent, each cost at the largest size over the same cost at the smallest (goal:
/// flat, ≤ 1.2×): workers' RSS, memory Redis, NATS and the coordinator take, coordinator CPU.
pub fn per_agent_ratios(sizes: &[Value]) -> Value {
    let (Some(a), Some(b)) = (sizes.first(), sizes.last()) else {
        return Value::Null;
    };
    let ratio = |path: &[&str]| -> Value {
        let get = |r: &Value| path.iter().fold(r, |v, k| &v[*k]).as_f64();
        match (get(a), get(b)) {
            (Some(x), Some(y)) if x > 0.0 => json!(y / x),
            _ => Value::Null,
        }
    };
    json!({
        "worker_kb_per_agent": ratio(&["worker_kb_per_agent"]),
        "redis_bytes_per_agent": ratio(&["memory_while_holding", "redis_bytes_per_agent"]),
        "nats_kb_per_agent": ratio(&["memory_while_holding", "nats_kb_per_agent"]),
        "coordinator_cpu_per_agent": ratio(&["coordinator_cpu_pct_per_1000_agents"]),
        "orchctl_status_ms": ratio(&["while_holding", "orchctl_status_ms"]),
        "status_api_ms": ratio(&["while_holding", "status_api_ms"]),
        "dispatch_p99_ms": ratio(&["while_holding", "dispatch_p99_ms"]),
    })
}

/// The job queue's consumer, for its info.
struct JobQueue {
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

impl JobQueue {
    /// The consumer of the `sim` backend's jobs, where this scenario's tasks (no backend
    /// named) go.
    async fn bind(nats_url: &str) -> anyhow::Result<JobQueue> {
        let client = async_nats::connect(nats_url).await?;
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(orch_shared::subject::JOBS_STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = stream
            .get_consumer(&orch_shared::subject::job_consumer(
                orch_shared::job::Backend::Sim.as_str(),
            ))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(JobQueue { consumer })
    }

    /// Jobs delivered more than once and not yet acked.
    async fn num_redelivered(&mut self) -> anyhow::Result<u64> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(info.num_redelivered as u64)
    }
}
