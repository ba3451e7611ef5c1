//! Growth: the per-task cost as the history grows (1k, 10k, 100k finished tasks) and as the
//! number of worker processes grows (2, 10, 50 with a few slots each). Every point measures
//! the same small batch, so a cost that grows with history or with workers shows as a slope.

use crate::cluster::{Cluster, Spec};
use crate::scenarios::{latency_light, throughput};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// One measured point.
async fn point(cluster: &Cluster, batch: usize, samples: usize) -> anyhow::Result<Value> {
    let t = throughput(cluster, batch, &["builder"], 32).await?;
    let l = latency_light(cluster, samples).await?;
    let mut status = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let out = cluster.orchctl().arg("status").output()?;
        anyhow::ensure!(out.status.success(), "orchctl status failed");
        status.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    status.sort_by(f64::total_cmp);
    Ok(json!({
        "tasks_per_s": t["tasks_per_s"],
        "coordinator_cpu_ms_per_task": t["cpu_ms_per_task"]["coordinator"],
        "cpu_ms_per_task": t["cpu_ms_per_task"],
        "p50_ms": l["submit_to_start"]["p50_ms"],
        "p99_ms": l["submit_to_start"]["p99_ms"],
        "orchctl_status_ms": crate::scenarios::pct(&status, 0.5),
    }))
}

/// Throughput, latency, coordinator CPU and `orchctl status` with `levels` tasks already in
/// the history. The history is seeded through the API at full speed.
pub async fn history(
    spec: &Spec,
    levels: &[usize],
    batch: usize,
    samples: usize,
) -> anyhow::Result<Value> {
    let cluster = Cluster::start(spec.clone()).await?;
    let mut in_history = 0usize;
    let mut points = Vec::new();
    let mut seeding = Vec::new();
    for &level in levels {
        if level > in_history {
            let n = level - in_history;
            let t0 = Instant::now();
            let seeded = throughput(&cluster, n, &["builder"], 64).await?;
            eprintln!(
                "  seeded {n} tasks in {:.1} s ({:.0}/s)",
                t0.elapsed().as_secs_f64(),
                seeded["tasks_per_s"].as_f64().unwrap_or(0.0)
            );
            seeding.push(json!({"tasks": n, "tasks_per_s": seeded["tasks_per_s"]}));
            in_history = level;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut p = point(&cluster, batch, samples).await?;
        p["history"] = json!(in_history);
        p["coordinator_rss_mb"] =
            json!(crate::cluster::rss_kb(cluster.coordinator.pid()) as f64 / 1024.0);
        eprintln!("  history {in_history}: {p}");
        in_history += batch + samples;
        points.push(p);
    }
    let redis_mb = crate::cluster::rss_kb(cluster.redis.pid()) as f64 / 1024.0;
    let coordinator_mb = crate::cluster::rss_kb(cluster.coordinator.pid()) as f64 / 1024.0;
    Ok(json!({
        "points": points, "seeding": seeding, "batch": batch, "samples": samples,
        "redis_rss_mb_at_end": redis_mb, "coordinator_rss_mb_at_end": coordinator_mb,
        "tasks_in_history_at_end": in_history,
    }))
}

/// The same figures with `counts` worker processes of `slots` slots each.
pub async fn workers(
    spec: &Spec,
    counts: &[usize],
    slots: u32,
    batch: usize,
    samples: usize,
) -> anyhow::Result<Value> {
    let first = counts.first().copied().unwrap_or(2);
    let mut cluster = Cluster::start(Spec {
        workers: first,
        slots,
        ..spec.clone()
    })
    .await?;
    let mut points = Vec::new();
    for &n in counts {
        if n > cluster.workers.len() {
            let more = n - cluster.workers.len();
            cluster.add_workers(more).await?;
        }
        // Let the new workers settle (registration, first pulls).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut p = point(&cluster, batch, samples).await?;
        p["workers"] = json!(n);
        p["slots_per_worker"] = json!(slots);
        eprintln!("  {n} workers: {p}");
        points.push(p);
    }
    Ok(json!({"points": points, "batch": batch, "samples": samples}))
}
