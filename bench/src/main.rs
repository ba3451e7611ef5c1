//! `orch-bench`: measures a real local cluster (nats-server, redis-server, one coordinator,
//! workers running `sim` agents with zero latency unless a scenario says otherwise) beside the
//! anchors in `../shared/bench/anchors` in the same run, and writes absolute figures and ratios
//! to `bench/results/<time>.json` and `.md`. Only same-run ratios mean anything: the machines
//! are shared and noisy.
//!
//! Scenarios: `throughput` (one-agent tasks/s and jobs/s of 5-step sequential tasks),
//! `latency` (submit → agent start, p50/p99/max, at light load and under load), `recovery`
//! (SIGKILL of a worker → its job running elsewhere), `footprint` (RSS of an idle worker and of
//! the coordinator after N tasks, CPU per 1,000 jobs, `orchctl status` time), `jsbench` (the
//! JetStream + Redis floor). `--check` runs a small throughput scenario and jsbench and exits 1
//! only on a gross slowdown (orchestrator below 1% of jsbench's JetStream + Redis figure).
//!
//! `cargo run --release -p orch-bench -- [--tasks 10000] [--scenario all|...] [--check]`

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use orch_tests::{Cluster, Options};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// One-agent tasks for the throughput scenario.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Which scenario: all, throughput, latency, recovery, footprint, jsbench.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Concurrent submit requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The anchors' folder.
    #[arg(long, default_value = "../shared/bench/anchors")]
    anchors: PathBuf,
    /// CI regression check: small scenario, fail only on a gross slowdown.
    #[arg(long)]
    check: bool,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn submit_all(
    cluster: &Cluster,
    n: usize,
    roles: &[&str],
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let roles: Vec<String> = roles.iter().map(|s| s.to_string()).collect();
    futures::stream::iter(0..n)
        .map(|i| {
            let roles = roles.clone();
            async move {
                let (status, v) = cluster
                    .post(
                        "/v1/tasks",
                        &json!({"prompt": format!("bench task {i}"), "roles": roles}),
                    )
                    .await;
                if !status.is_success() {
                    bail!("submit {i} refused: {status} {v}");
                }
                v["id"].as_str().map(str::to_string).context("task id")
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Waits until `n` tasks finished, counting `task_finished` events on NATS (cheap for the
/// cluster: no polling of its API).
async fn finished_counter(nats_url: &str) -> anyhow::Result<async_nats::Subscriber> {
    let client = async_nats::connect(nats_url).await?;
    Ok(client.subscribe("orch.events.*.task_finished").await?)
}

async fn throughput(
    cluster: &Cluster,
    args: &Args,
    n: usize,
    roles: &[&str],
) -> anyhow::Result<Value> {
    let mut finished = finished_counter(&cluster.nats_url).await?;
    let started = Instant::now();
    let ids = submit_all(cluster, n, roles, args.concurrency).await?;
    let submitted = started.elapsed();
    let mut done = 0;
    while done < ids.len() {
        tokio::time::timeout(Duration::from_secs(120), finished.next())
            .await
            .context("tasks stopped finishing")?;
        done += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let jobs = n * roles.len();
    Ok(json!({
        "tasks": n, "steps": roles.len(), "submit_s": submitted.as_secs_f64(), "elapsed_s": elapsed,
        "tasks_per_s": n as f64 / elapsed, "jobs_per_s": jobs as f64 / elapsed,
    }))
}

/// Submit → `job_started` seen on NATS, one task at a time (light load) or while a
/// background load runs.
async fn latency(
    cluster: &Cluster,
    samples: usize,
    background: Option<usize>,
    args: &Args,
) -> anyhow::Result<Value> {
    let client = async_nats::connect(&cluster.nats_url).await?;
    let mut started = client.subscribe("orch.events.*.job_started").await?;
    let load = match background {
        Some(n) => {
            let url = cluster.url.clone();
            let concurrency = args.concurrency;
            Some(tokio::spawn(async move {
                let http = reqwest::Client::new();
                futures::stream::iter(0..n)
                    .map(|i| {
                        let http = http.clone();
                        let url = url.clone();
                        async move {
                            let _ = http
                                .post(format!("{url}/v1/tasks"))
                                .bearer_auth(orch_tests::TOKEN)
                                .json(&json!({"prompt": format!("load {i}"), "roles": ["builder"]}))
                                .send()
                                .await;
                        }
                    })
                    .buffer_unordered(concurrency / 2)
                    .collect::<Vec<_>>()
                    .await;
            }))
        }
        None => None,
    };
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let t0 = Instant::now();
        let (status, v) = cluster
            .post(
                "/v1/tasks",
                &json!({"prompt": format!("latency {i}"), "roles": ["builder"]}),
            )
            .await;
        if !status.is_success() {
            bail!("submit refused: {v}");
        }
        let id = v["id"].as_str().context("id")?.to_string();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), started.next())
                .await
                .context("no job started")?
                .context("subscription ended")?;
            if msg.subject.as_str().contains(&id) {
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        if background.is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if let Some(l) = load {
        let _ = l.await;
    }
    lat.sort_by(f64::total_cmp);
    Ok(
        json!({"samples": samples, "p50_ms": pct(&lat, 0.5), "p99_ms": pct(&lat, 0.99), "max_ms": lat.last()}),
    )
}

/// SIGKILL the worker running a job; time until another worker starts it.
async fn recovery(args: &Args) -> anyhow::Result<Value> {
    let ack_wait = Duration::from_secs(5);
    let cluster = Cluster::start(Options {
        workers: 2,
        slots: 1,
        ack_wait,
        ..Options::default()
    })
    .await;
    let client = async_nats::connect(&cluster.nats_url).await?;
    let mut started = client.subscribe("orch.events.*.job_started").await?;
    let t = cluster
        .submit(json!({"prompt": "recover", "roles": ["builder"], "sim": {"latency_ms": 60_000}}))
        .await;
    let first = tokio::time::timeout(Duration::from_secs(30), started.next())
        .await?
        .context("start")?;
    let event: orch_shared::event::Event = orch_shared::codec::decode(&first.payload)?;
    let worker = match &event.kind {
        orch_shared::event::EventKind::JobStarted { worker_id, .. } => worker_id.0.clone(),
        _ => bail!("unexpected event"),
    };
    let victim: usize = worker.trim_start_matches("worker-").parse()?;
    let killed = Instant::now();
    cluster.workers[victim].signal(libc::SIGKILL);
    tokio::time::timeout(Duration::from_secs(60), started.next())
        .await?
        .context("restart")?;
    let recovered = killed.elapsed().as_secs_f64();
    let _ = (t, args);
    Ok(
        json!({"ack_wait_s": ack_wait.as_secs_f64(), "recovery_s": recovered, "target_s": ack_wait.as_secs_f64() + 1.0}),
    )
}

fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process used so far.
fn cpu_s(pid: i32) -> f64 {
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

async fn footprint(cluster: &Cluster, args: &Args, n: usize) -> anyhow::Result<Value> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_worker = rss_kb(cluster.workers[0].pid());
    let coord_cpu0 = cpu_s(cluster.coordinator.pid());
    let workers_cpu0: f64 = cluster.workers.iter().map(|w| cpu_s(w.pid())).sum();
    throughput(cluster, args, n, &["builder"]).await?;
    let coord_cpu = cpu_s(cluster.coordinator.pid()) - coord_cpu0;
    let workers_cpu = cluster.workers.iter().map(|w| cpu_s(w.pid())).sum::<f64>() - workers_cpu0;
    let coordinator_rss = rss_kb(cluster.coordinator.pid());
    let orchctl = orch_tests::workspace_bin("orchctl");
    let mut times = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let out = std::process::Command::new(&orchctl)
            .args([
                "--server",
                &cluster.url,
                "--token",
                orch_tests::TOKEN,
                "status",
            ])
            .env("ORCH_HOME", cluster.dir.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "orchctl status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(json!({
        "idle_worker_rss_mb": idle_worker as f64 / 1024.0,
        "coordinator_rss_mb_after_tasks": coordinator_rss as f64 / 1024.0,
        "tasks_in_history": n,
        "coordinator_cpu_s_per_1000_jobs": coord_cpu / n as f64 * 1000.0,
        "workers_cpu_s_per_1000_jobs": workers_cpu / n as f64 * 1000.0,
        "orchctl_status_ms_p50": pct(&times, 0.5),
    }))
}

/// Builds and runs the JetStream + Redis anchor on this cluster's servers.
fn jsbench(cluster: &Cluster, anchors: &std::path::Path, n: usize) -> anyhow::Result<Value> {
    let src = anchors.join("jsbench");
    let work = PathBuf::from("target/bench-anchors/jsbench");
    std::fs::create_dir_all(work.join("src"))?;
    for f in ["Cargo.toml", "src/main.rs"] {
        std::fs::copy(src.join(f), work.join(f))
            .with_context(|| format!("copy {f} from {}", src.display()))?;
    }
    // Inside our target directory it would count as a member of our workspace: it is not.
    let manifest = work.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    if !text.contains("[workspace]") {
        std::fs::write(&manifest, format!("{text}\n[workspace]\n"))?;
    }
    let build = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(work.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", "target/bench-anchors/target")
        .status()?;
    if !build.success() {
        bail!("jsbench did not build");
    }
    let out = std::process::Command::new("target/bench-anchors/target/release/jsbench")
        .args([&cluster.nats_url, &cluster.redis_url, &n.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let grab = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split(" = ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let lat = text
        .lines()
        .find(|l| l.contains("latency"))
        .map(str::to_string);
    Ok(json!({
        "jobs": n,
        "jetstream_jobs_per_s": grab("jetstream:"),
        "jetstream_redis_jobs_per_s": grab("jetstream+redis:"),
        "latency": lat,
        "raw": text,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut results = json!({"cores": cores, "at_ms": orch_shared::now_ms()});
    let want = |s: &str| args.check || args.scenario == "all" || args.scenario == s;
    let cluster = Cluster::start(Options {
        workers: args.workers,
        slots: args.slots,
        ..Options::default()
    })
    .await;
    let n = if args.check { 1000 } else { args.tasks };
    if want("throughput") {
        results["throughput_one_agent"] = throughput(&cluster, &args, n, &["builder"]).await?;
        eprintln!("throughput: {}", results["throughput_one_agent"]);
        if !args.check {
            let steps = ["analyst", "planner", "builder", "tester", "reviewer"];
            results["throughput_five_steps"] = throughput(&cluster, &args, n / 5, &steps).await?;
            eprintln!("five steps: {}", results["throughput_five_steps"]);
        }
    }
    if want("jsbench") {
        results["jsbench"] = jsbench(
            &cluster,
            &args.anchors,
            if args.check { 20_000 } else { 50_000 },
        )?;
        eprintln!(
            "jsbench: {} / {}",
            results["jsbench"]["jetstream_jobs_per_s"],
            results["jsbench"]["jetstream_redis_jobs_per_s"]
        );
    }
    if !args.check {
        if want("latency") {
            results["latency_light"] = latency(&cluster, 300, None, &args).await?;
            eprintln!("latency (light): {}", results["latency_light"]);
            results["latency_loaded"] = latency(&cluster, 200, Some(4000), &args).await?;
            eprintln!("latency (loaded): {}", results["latency_loaded"]);
        }
        if want("footprint") {
            results["footprint"] = footprint(&cluster, &args, n.min(10_000)).await?;
            eprintln!("footprint: {}", results["footprint"]);
        }
        if want("recovery") {
            results["recovery"] = recovery(&args).await?;
            eprintln!("recovery: {}", results["recovery"]);
        }
    }
    let ours = results["throughput_one_agent"]["tasks_per_s"].as_f64();
    let floor = results["jsbench"]["jetstream_redis_jobs_per_s"].as_f64();
    if let (Some(ours), Some(floor)) = (ours, floor) {
        results["ratio_vs_jetstream_redis"] = json!(ours / floor);
        results["ratio_vs_celery_anchor_readme"] = json!(ours / 565.0);
    }
    let dir = PathBuf::from("bench/results");
    std::fs::create_dir_all(&dir)?;
    let stamp = results["at_ms"].as_u64().unwrap_or(0);
    let name = if args.check {
        "check".to_string()
    } else {
        stamp.to_string()
    };
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = markdown(&results);
    std::fs::write(dir.join(format!("{name}.md")), &md)?;
    println!("{md}");
    if args.check {
        let ratio = results["ratio_vs_jetstream_redis"].as_f64().unwrap_or(0.0);
        if ratio < 0.01 {
            bail!("gross slowdown: {ratio:.4} of jsbench's JetStream + Redis throughput");
        }
    }
    Ok(())
}

fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut s = format!(
        "# Benchmark run ({} cores)\n\n| What | Figure |\n|---|---|\n",
        r["cores"]
    );
    let rows = [
        (
            "one-agent tasks/s",
            &r["throughput_one_agent"]["tasks_per_s"],
        ),
        (
            "5-step tasks: jobs/s",
            &r["throughput_five_steps"]["jobs_per_s"],
        ),
        (
            "jsbench JetStream jobs/s",
            &r["jsbench"]["jetstream_jobs_per_s"],
        ),
        (
            "jsbench JetStream + Redis jobs/s",
            &r["jsbench"]["jetstream_redis_jobs_per_s"],
        ),
        ("ratio vs JetStream + Redis", &r["ratio_vs_jetstream_redis"]),
        (
            "ratio vs Celery (anchor README, 565/s)",
            &r["ratio_vs_celery_anchor_readme"],
        ),
        (
            "submit → start p50 ms (light)",
            &r["latency_light"]["p50_ms"],
        ),
        (
            "submit → start p99 ms (light)",
            &r["latency_light"]["p99_ms"],
        ),
        (
            "submit → start p50 ms (loaded)",
            &r["latency_loaded"]["p50_ms"],
        ),
        (
            "submit → start p99 ms (loaded)",
            &r["latency_loaded"]["p99_ms"],
        ),
        ("idle worker RSS MB", &r["footprint"]["idle_worker_rss_mb"]),
        (
            "coordinator RSS MB after the run",
            &r["footprint"]["coordinator_rss_mb_after_tasks"],
        ),
        (
            "coordinator CPU s / 1,000 jobs",
            &r["footprint"]["coordinator_cpu_s_per_1000_jobs"],
        ),
        (
            "workers CPU s / 1,000 jobs",
            &r["footprint"]["workers_cpu_s_per_1000_jobs"],
        ),
        (
            "orchctl status ms (p50)",
            &r["footprint"]["orchctl_status_ms_p50"],
        ),
        (
            "recovery s after SIGKILL (ack wait 5 s)",
            &r["recovery"]["recovery_s"],
        ),
    ];
    for (name, v) in rows {
        s.push_str(&format!("| {name} | {} |\n", f(v)));
    }
    if let Some(l) = r["jsbench"]["latency"].as_str() {
        s.push_str(&format!("\njsbench: {l}\n"));
    }
    s
}
