//! `orch-bench`: end-to-end throughput of a real local cluster (NATS, Redis, one coordinator,
//! workers with `sim` agents at zero latency): N one-agent tasks submitted over HTTP, every one
//! awaited to completion. Prints tasks/s; run the anchors (`../shared/bench/anchors`) in the same
//! session and compare ratios, never absolute numbers across machines.
//!
//! `cargo run --release -p orch-bench -- --tasks 1000 --workers 2`

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use orch_tests::{Cluster, Options};
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// One-agent tasks to run.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Concurrent submit requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = Cluster::start(Options {
        workers: args.workers,
        slots: args.slots,
        ..Options::default()
    })
    .await;
    let cluster = &cluster;
    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..args.tasks)
        .map(|i| async move {
            let (status, v) = cluster
                .post(
                    "/v1/tasks",
                    &json!({"prompt": format!("bench task {i}"), "roles": ["builder"]}),
                )
                .await;
            if !status.is_success() {
                bail!("submit {i} refused: {status} {v}");
            }
            v["id"].as_str().map(str::to_string).context("task id")
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let submitted = started.elapsed();
    let tasks = cluster.wait_all(&ids, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    let failed = tasks
        .iter()
        .filter(|t| !t.status.is_terminal() || t.error.is_some())
        .count();
    let rate = args.tasks as f64 / elapsed.as_secs_f64();
    println!(
        "orchestrator: {} one-agent sim tasks (zero latency), {} workers x {} slots: submitted in {:.2}s, all done in {:.2}s = {:.0} tasks/s ({} failed), cores: {}",
        args.tasks,
        args.workers,
        args.slots,
        submitted.as_secs_f64(),
        elapsed.as_secs_f64(),
        rate,
        failed,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
