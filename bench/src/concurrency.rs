//! One worker holding many long-running `sim` agents at once: every agent must keep its job
//! alive (an in-progress ack and a `heartbeat` event every third of the ack wait) and none may
//! be redelivered. Reports the worker's RSS and CPU while it holds them.

use crate::cluster::{Cluster, Spec, cpu_s, rss_kb};
use crate::scenarios::submit_many;
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
}

/// A Prometheus counter's value from a scrape (0 when absent).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

pub async fn run(spec: &Spec, p: &Params) -> anyhow::Result<Value> {
    let cluster = Cluster::start(Spec {
        workers: 1,
        slots: p.agents as u32,
        ack_wait: p.ack_wait,
        worker_metrics: true,
        ..spec.clone()
    })
    .await?;
    let worker = cluster.workers[0].pid();
    let watch = Watch::start(
        &cluster.nats_url,
        &["job_started", "heartbeat", "job_finished", "task_finished"],
        Keep::Payloads,
    )
    .await?;
    let idle_rss = rss_kb(worker) as f64 / 1024.0;
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
    // Sample the worker while every agent runs (until the first one finishes).
    let cpu0 = cpu_s(worker);
    let w0 = Instant::now();
    let mut max_rss = 0.0f64;
    let mut rss_samples = Vec::new();
    // `num_redelivered` counts redelivered jobs not yet acked: sampled while they are held.
    let mut queue = JobQueue::bind(&cluster.nats_url).await?;
    let mut max_redelivered = 0;
    while watch.count("job_finished") == 0 && t0.elapsed() < p.hold + Duration::from_secs(30) {
        let rss = rss_kb(worker) as f64 / 1024.0;
        max_rss = max_rss.max(rss);
        rss_samples.push(rss);
        if rss_samples.len() % 4 == 1 {
            max_redelivered = max_redelivered.max(queue.num_redelivered().await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let held_s = w0.elapsed().as_secs_f64();
    let cpu_pct = (cpu_s(worker) - cpu0) / held_s.max(0.001) * 100.0;
    if !watch
        .wait_count("task_finished", p.agents as u64, p.ack_wait * 2)
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
    let metrics = cluster
        .client()
        .get(&cluster.worker_metrics[0])
        .send()
        .await?
        .text()
        .await?;
    Ok(json!({
        "agents": p.agents,
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
        "worker_rss_mb_max": max_rss,
        "worker_rss_mb_mean": rss_samples.iter().sum::<f64>() / rss_samples.len().max(1) as f64,
        "worker_cpu_pct_while_holding": cpu_pct,
        "held_s": held_s,
    }))
}

/// The job queue's consumer, for its info.
struct JobQueue {
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

impl JobQueue {
    async fn bind(nats_url: &str) -> anyhow::Result<JobQueue> {
        let client = async_nats::connect(nats_url).await?;
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream(orch_shared::subject::JOBS_STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = stream
            .get_consumer(orch_shared::subject::JOBS_CONSUMER)
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
