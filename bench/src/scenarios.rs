//! The scenarios measured on a running cluster: throughput, dispatch latency (light, and
//! under a paced load), footprint and recovery. Each returns a JSON object of figures.

use crate::cluster::{Cluster, Spec, rss_kb};
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use futures::StreamExt;
use orch_tests::TOKEN;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The value at quantile `p` of sorted samples.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 / p99 / max of samples in ms.
pub fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "samples": ms.len(),
        "p50_ms": pct(&ms, 0.5),
        "p99_ms": pct(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    })
}

/// Submits one task; returns its id.
pub async fn submit(
    http: &reqwest::Client,
    url: &str,
    prompt: String,
    roles: &[&str],
    sim_latency_ms: u64,
) -> anyhow::Result<String> {
    let mut body = json!({"prompt": prompt, "roles": roles});
    if sim_latency_ms > 0 {
        body["sim"] = json!({"latency_ms": sim_latency_ms});
    }
    let r = http
        .post(format!("{url}/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("submit refused: {status} {v}");
    }
    v["id"].as_str().map(str::to_string).context("task id")
}

/// Submits `n` tasks with `concurrency` requests in flight.
pub async fn submit_many(
    cluster: &Cluster,
    n: usize,
    roles: &[&str],
    concurrency: usize,
    sim_latency_ms: u64,
) -> anyhow::Result<()> {
    let http = cluster.client();
    let failures: Vec<anyhow::Error> = futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let url = cluster.url.clone();
            async move {
                submit(
                    &http,
                    &url,
                    format!("bench task {i}"),
                    roles,
                    sim_latency_ms,
                )
                .await
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    if let Some(e) = failures.into_iter().next() {
        return Err(e);
    }
    Ok(())
}

/// Submits `n` tasks of `roles` and waits until every one finished: tasks/s, jobs/s and the
/// CPU each process spent per task.
pub async fn throughput(
    cluster: &Cluster,
    n: usize,
    roles: &[&str],
    concurrency: usize,
) -> anyhow::Result<Value> {
    let watch = Watch::start(&cluster.nats_url, &["task_finished"], Keep::Times).await?;
    let stored0 = stored_messages(&cluster.nats_url).await?;
    let pids = cluster.pids();
    let cpu0 = pids.cpu();
    let started = Instant::now();
    submit_many(cluster, n, roles, concurrency, 0).await?;
    let submitted = started.elapsed().as_secs_f64();
    if !watch
        .wait_count("task_finished", n as u64, Duration::from_secs(60))
        .await
    {
        bail!(
            "tasks stopped finishing ({} of {n})\n{}",
            watch.count("task_finished"),
            cluster.logs()
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu0.per_item_ms(&pids.cpu(), n);
    let jobs = n * roles.len();
    let stored = stored_messages(&cluster.nats_url).await? - stored0;
    Ok(json!({
        "tasks": n, "steps": roles.len(), "submit_s": submitted, "elapsed_s": elapsed,
        "tasks_per_s": n as f64 / elapsed, "jobs_per_s": jobs as f64 / elapsed,
        "cpu_ms_per_task": cpu,
        "stored_messages_per_task": stored as f64 / n as f64,
    }))
}

/// Messages JetStream has stored so far in the cluster's streams (jobs, results, events,
/// snapshots; the last sequence of each, so acked work-queue messages count too).
async fn stored_messages(nats_url: &str) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let mut total = 0;
    for name in [
        orch_shared::subject::JOBS_STREAM,
        orch_shared::subject::RESULTS_STREAM,
        orch_shared::subject::EVENTS_STREAM,
        orch_shared::subject::TASKS_STREAM,
    ] {
        let mut stream = js.get_stream(name).await?;
        total += stream.info().await?.state.last_sequence;
    }
    Ok(total)
}

/// The replicas the work stream was created with and the servers holding it (its leader and
/// the peers JetStream lists), as JetStream reports them.
async fn stream_replicas(nats_url: &str) -> anyhow::Result<(usize, usize)> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let info = js
        .get_stream(orch_shared::subject::JOBS_STREAM)
        .await?
        .info()
        .await?
        .clone();
    let peers = info.cluster.map_or(0, |c| c.replicas.len());
    Ok((info.config.num_replicas, 1 + peers))
}

/// Submit → the agent started, and agent finished (`job_finished`) → the task shows as
/// completed through the API, one task at a time.
///
/// The start is measured as Celery's anchor measures it: the worker's clock when it started
/// the agent (`started_at_us` of `job_started`) minus the client's clock at submit (one
/// machine, one clock). When that `job_started` reaches this client is reported too.
pub async fn latency_light(cluster: &Cluster, samples: usize) -> anyhow::Result<Value> {
    let watch = Watch::start(
        &cluster.nats_url,
        &["job_started", "job_finished"],
        Keep::First,
    )
    .await?;
    // When each job message passes through NATS (a core subscription on the work queue's
    // subjects sees it as JetStream takes it in): splits submit → start in two.
    let queued = job_watch(&cluster.nats_url).await?;
    let http = cluster.client();
    let mut start = Vec::with_capacity(samples);
    let mut seen = Vec::with_capacity(samples);
    let mut to_queue = Vec::with_capacity(samples);
    let mut visible = Vec::with_capacity(samples);
    let mut accepted = Vec::with_capacity(samples);
    for i in 0..samples {
        let (t0, t0_us) = (Instant::now(), orch_shared::now_us());
        let id = submit(&http, &cluster.url, format!("latency {i}"), &["builder"], 0).await?;
        accepted.push(t0.elapsed().as_secs_f64() * 1000.0);
        let at = watch
            .wait(&id, "job_started", Duration::from_secs(30))
            .await
            .context("no job_started")?;
        let seen_ms = at.duration_since(t0).as_secs_f64() * 1000.0;
        seen.push(seen_ms);
        start.push(agent_start_ms(&watch, &id, t0_us).unwrap_or(seen_ms));
        if let Some(q) = queued.wait(&id, "job", Duration::from_secs(1)).await {
            to_queue.push(q.duration_since(t0).as_secs_f64() * 1000.0);
        }
        let finished = watch
            .wait(&id, "job_finished", Duration::from_secs(30))
            .await
            .context("no job_finished")?;
        loop {
            let r = http
                .get(format!("{}/v1/tasks/{id}", cluster.url))
                .bearer_auth(TOKEN)
                .send()
                .await?;
            let v: Value = r.json().await?;
            if v["status"] == "completed" {
                visible.push(Instant::now().duration_since(finished).as_secs_f64() * 1000.0);
                break;
            }
            if finished.elapsed() > Duration::from_secs(30) {
                bail!("task {id} never showed as completed: {v}");
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(json!({
        "submit_to_start": summary(start),
        "submit_to_start_seen": summary(seen),
        "finish_to_visible": summary(visible),
        "submit_response": summary(accepted),
        "submit_to_job_published": summary(to_queue),
    }))
}

/// Submit → agent start by the worker's clock, from the `job_started` kept by `watch`; `None`
/// from binaries that predate `started_at_us` (the arrival time stands in for it then).
fn agent_start_ms(watch: &Watch, task: &str, submitted_us: u64) -> Option<f64> {
    let payload = watch.first_payload(task, "job_started")?;
    let event: orch_shared::event::Event = orch_shared::codec::decode(&payload).ok()?;
    match event.kind {
        orch_shared::event::EventKind::JobStarted { started_at_us, .. } if started_at_us > 0 => {
            Some(started_at_us.saturating_sub(submitted_us) as f64 / 1000.0)
        }
        _ => None,
    }
}

/// Arrival times of job messages on the work queue's subjects, keyed `<task>.job`.
async fn job_watch(nats_url: &str) -> anyhow::Result<Watch> {
    Watch::start_with(nats_url, orch_shared::subject::JOBS_SUBJECTS, |payload| {
        let spec: orch_shared::job::JobSpec = orch_shared::codec::decode(payload).ok()?;
        Some(format!("{}.job", spec.task_id))
    })
    .await
}

/// Submit → agent start while a background load submits one-agent tasks at `rate` per second
/// (80 % of the measured throughput, say); every 10th submission is a probe.
pub async fn latency_loaded(
    cluster: &Cluster,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Value> {
    let watch = Watch::start(&cluster.nats_url, &["job_started"], Keep::First).await?;
    let http = cluster.client();
    let n = (rate * duration.as_secs_f64()) as usize;
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let t0 = Instant::now();
    let mut probes = tokio::task::JoinSet::new();
    let mut lagging = 0;
    for k in 0..n {
        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        if Instant::now().duration_since(due) > Duration::from_millis(50) {
            lagging += 1;
        }
        let permit = limit.clone().acquire_owned().await?;
        let (http, url, watch) = (http.clone(), cluster.url.clone(), watch.clone());
        let probe = k % 10 == 0;
        probes.spawn(async move {
            let _permit = permit;
            let (sent, sent_us) = (Instant::now(), orch_shared::now_us());
            let id = submit(&http, &url, format!("load {k}"), &["builder"], 0).await?;
            if !probe {
                return Ok(None);
            }
            let at = watch
                .wait(&id, "job_started", Duration::from_secs(60))
                .await
                .context("no job_started under load")?;
            let seen_ms = at.duration_since(sent).as_secs_f64() * 1000.0;
            anyhow::Ok(Some(
                agent_start_ms(&watch, &id, sent_us).unwrap_or(seen_ms),
            ))
        });
    }
    let offered = n as f64 / t0.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    while let Some(r) = probes.join_next().await {
        if let Some(ms) = r?? {
            lat.push(ms);
        }
    }
    let mut out = summary(lat);
    out["offered_per_s"] = json!(offered);
    out["target_per_s"] = json!(rate);
    out["submissions_late_50ms"] = json!(lagging);
    Ok(out)
}

/// RSS of the workers (idle) and the coordinator, and the time of `orchctl status` and of
/// `GET /v1/status` alone.
pub async fn footprint(cluster: &Cluster) -> anyhow::Result<Value> {
    let mut orchctl = Vec::new();
    let mut api = Vec::new();
    let http = cluster.client();
    for _ in 0..10 {
        let t0 = Instant::now();
        let out = cluster.orchctl().arg("status").output()?;
        if !out.status.success() {
            bail!(
                "orchctl status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        orchctl.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        http.get(format!("{}/v1/status", cluster.url))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .bytes()
            .await?;
        api.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let worker_rss: Vec<f64> = cluster
        .workers
        .iter()
        .map(|w| rss_kb(w.pid()) as f64 / 1024.0)
        .collect();
    Ok(json!({
        "worker_rss_mb": worker_rss.iter().copied().fold(0.0, f64::max),
        "coordinator_rss_mb": rss_kb(cluster.coordinator.pid()) as f64 / 1024.0,
        "nats_rss_mb": cluster.pids().nats_rss_mb(),
        "orchctl_status": summary(orchctl),
        "api_status": summary(api),
    }))
}

/// SIGKILL of the worker running a long job → the job running on another worker.
pub async fn recovery(spec: &Spec) -> anyhow::Result<Value> {
    let ack_wait = Duration::from_secs(5);
    let cluster = Cluster::start(Spec {
        workers: 2,
        slots: 1,
        ack_wait,
        worker_metrics: false,
        ..spec.clone()
    })
    .await?;
    let watch = Watch::start(&cluster.nats_url, &["job_started"], Keep::Payloads).await?;
    let id = submit(
        &cluster.client(),
        &cluster.url,
        "recover".into(),
        &["builder"],
        60_000,
    )
    .await?;
    watch
        .wait(&id, "job_started", Duration::from_secs(30))
        .await
        .context("the job did not start")?;
    let (_, _, payload) = watch
        .take_payloads()
        .into_iter()
        .next()
        .context("no job_started payload")?;
    let event: orch_shared::event::Event = orch_shared::codec::decode(&payload)?;
    let orch_shared::event::EventKind::JobStarted { worker_id, .. } = &event.kind else {
        bail!("unexpected event {event:?}");
    };
    let victim: usize = worker_id.0.trim_start_matches("worker-").parse()?;
    let killed = Instant::now();
    cluster.workers[victim].signal(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if watch.count("job_started") >= 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the job was not redelivered\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = killed.elapsed().as_secs_f64();
    Ok(json!({
        "ack_wait_s": ack_wait.as_secs_f64(),
        "recovery_s": recovered,
        "target_s": ack_wait.as_secs_f64() + 1.0,
    }))
}

/// The core figures of one build on a fresh cluster: idle worker RSS, one-agent and 5-step
/// throughput, light and loaded latency, footprint after the run.
///
/// The loaded phase offers 80 % of `load_of` (tasks/s), or of this pass's own one-agent
/// throughput without it: a before/after pass pair shares the baseline's figure, so both
/// builds are loaded alike (the throughput of one short burst varies by ±15 % between passes,
/// and 80 % of a lucky burst can be past what the machine sustains a moment later).
pub async fn core(
    spec: &Spec,
    tasks: usize,
    concurrency: usize,
    load_of: Option<f64>,
) -> anyhow::Result<Value> {
    let cluster = Cluster::start(spec.clone()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_worker_rss_mb = cluster
        .workers
        .iter()
        .map(|w| rss_kb(w.pid()) as f64 / 1024.0)
        .fold(0.0, f64::max);
    let mut r = json!({"idle_worker_rss_mb": idle_worker_rss_mb});
    r["throughput_one_agent"] = throughput(&cluster, tasks, &["builder"], concurrency).await?;
    eprintln!("  one-agent: {}", r["throughput_one_agent"]);
    let steps = ["analyst", "planner", "builder", "tester", "reviewer"];
    r["throughput_five_steps"] = throughput(&cluster, tasks / 5, &steps, concurrency).await?;
    eprintln!("  five steps: {}", r["throughput_five_steps"]);
    r["latency_light"] = latency_light(&cluster, 300).await?;
    eprintln!("  light latency: {}", r["latency_light"]);
    // Footprint before the loaded phase, so every build is measured with the same history.
    tokio::time::sleep(Duration::from_secs(1)).await;
    r["footprint"] = footprint(&cluster).await?;
    r["footprint"]["tasks_in_history"] = json!(tasks + tasks / 5 + 300);
    eprintln!("  footprint: {}", r["footprint"]);
    let max = load_of.unwrap_or_else(|| {
        r["throughput_one_agent"]["tasks_per_s"]
            .as_f64()
            .unwrap_or(100.0)
    });
    r["latency_loaded"] = latency_loaded(&cluster, max * 0.8, Duration::from_secs(4)).await?;
    eprintln!("  loaded latency (80%): {}", r["latency_loaded"]);
    Ok(r)
}

/// The figures of the `replicas` scenario and where each is in one pass's result.
pub const REPLICAS_FIGURES: [(&str, &[&str]); 8] = [
    ("tasks_per_s", &["throughput_one_agent", "tasks_per_s"]),
    (
        "nats_cpu_ms_per_task",
        &["throughput_one_agent", "cpu_ms_per_task", "nats"],
    ),
    (
        "coordinator_cpu_ms_per_task",
        &["throughput_one_agent", "cpu_ms_per_task", "coordinator"],
    ),
    (
        "submit_response_p50_ms",
        &["latency_light", "submit_response", "p50_ms"],
    ),
    (
        "submit_to_start_p50_ms",
        &["latency_light", "submit_to_start", "p50_ms"],
    ),
    (
        "submit_to_start_p99_ms",
        &["latency_light", "submit_to_start", "p99_ms"],
    ),
    ("nats_store_bytes_per_task", &["nats_store_bytes_per_task"]),
    ("nats_rss_mb", &["nats_rss_mb"]),
];

/// The cost of replicated streams: one-agent throughput, light-load latency and the NATS
/// servers' CPU, disk and memory on a cluster with one NATS server (every stream R1) and on
/// one with three servers on loopback in one NATS cluster (every stream and bucket R3: each
/// write is stored by all three and acknowledged once two have it), one after the other in
/// the same run, `passes` times each (alternating, a fresh cluster each time). Per build: each
/// pass's figures and their medians; `ratio_r3_to_r1`: the R3 median over the R1 median.
pub async fn replicas(
    spec: &Spec,
    tasks: usize,
    samples: usize,
    concurrency: usize,
    passes: usize,
) -> anyhow::Result<Value> {
    let mut runs: [(&str, usize, Vec<Value>); 2] = [("r1", 1, vec![]), ("r3", 3, vec![])];
    for pass in 0..passes.max(1) {
        for (name, nodes, results) in &mut runs {
            eprintln!(
                "  pass {}: {name} ({nodes} NATS server{})",
                pass + 1,
                if *nodes > 1 { "s" } else { "" }
            );
            let cluster = Cluster::start(Spec {
                nats_nodes: *nodes,
                ..spec.clone()
            })
            .await?;
            let (replicas, holders) = stream_replicas(&cluster.nats_url).await?;
            if replicas != *nodes {
                bail!("the {name} cluster's streams have {replicas} replicas, not {nodes}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let store0 = cluster.nats_store_bytes();
            let throughput = throughput(&cluster, tasks, &["builder"], concurrency).await?;
            let store = cluster.nats_store_bytes().saturating_sub(store0);
            let rss = cluster.pids().nats_rss_mb();
            eprintln!("    one-agent: {throughput}");
            let latency = latency_light(&cluster, samples).await?;
            eprintln!("    light latency: {latency}");
            results.push(json!({
                "nats_servers": nodes,
                "stream_replicas": replicas,
                "servers_holding_the_work_stream": holders,
                "throughput_one_agent": throughput,
                "nats_store_bytes_per_task": store as f64 / tasks.max(1) as f64,
                "nats_rss_mb": rss,
                "latency_light": latency,
            }));
        }
    }
    let mut r = json!({"tasks": tasks, "latency_samples": samples, "passes": passes.max(1)});
    for (name, _, results) in &runs {
        let mut median = json!({});
        for (figure, path) in REPLICAS_FIGURES {
            median[figure] = json!(crate::report::spread(results, path).map(|(m, _, _)| m));
        }
        r[*name] = json!({"passes": results, "median": median});
    }
    let mut ratio = json!({});
    for (figure, _) in REPLICAS_FIGURES {
        ratio[figure] = match (
            r["r3"]["median"][figure].as_f64(),
            r["r1"]["median"][figure].as_f64(),
        ) {
            (Some(a), Some(b)) if b > 0.0 => json!(a / b),
            _ => Value::Null,
        };
    }
    r["ratio_r3_to_r1"] = ratio;
    Ok(r)
}
