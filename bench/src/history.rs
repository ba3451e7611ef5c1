//! `history1m`: the cluster with a long history of finished tasks (1,000,000 by hand, smaller
//! sizes in a shared session), every figure measured at each size in the same run so the ratio
//! between sizes shows what grows.
//!
//! Seeding: a few hundred real tasks run through the cluster first; their finished records, as
//! the coordinator saved them, are the templates. Each seeded task is a template given fresh
//! task and job ids dated back over `span_days` (UUIDv7 ids carry their creation time), its
//! times shifted by the same amount and one word of its prompt varied, written with the
//! coordinator's own [`State::restore_task`] (the write a rebuild from the log makes: record,
//! history index, job index, dead letters). The JetStream log does not get the seeded tasks:
//! the coordinator reads the log only past the position Redis records, so what it serves is
//! what it would serve after months of the same tasks (what it purged from the log by then is
//! not there either).

use crate::cluster::{Cluster, Spec};
use crate::scenarios::{latency_light, pct, throughput};
use anyhow::{Context, bail};
use futures::StreamExt;
use orch_coordinator::state::State;
use orch_coordinator::state::history::Range;
use orch_shared::api::Task;
use orch_shared::ids::{JobId, TaskId};
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What one run measures.
pub struct Params {
    /// Finished tasks in the history at each measured point, ascending.
    pub levels: Vec<usize>,
    /// The seeded history spans this many days back from now.
    pub span_days: u64,
    /// One-agent tasks of the throughput measure at each point.
    pub batch: usize,
    /// Latency samples at each point.
    pub samples: usize,
    /// Words of documentation prose before each seeded prompt (0: the short prompts only).
    pub prompt_words: usize,
}

/// The word every thousandth seeded prompt carries: what `tasks list --search` looks for.
const RARE: &str = "zanzibar";
const WORDS: [&str; 8] = [
    "parser", "cache", "login", "billing", "search", "export", "retry", "upload",
];
const DAY_MS: u64 = 24 * 3600 * 1000;

/// A UUIDv7 id with its time field set to `at_ms` (the random bits stay fresh).
fn dated(fresh: u128, at_ms: u64) -> u128 {
    (fresh & ((1u128 << 80) - 1)) | (u128::from(at_ms & 0xffff_ffff_ffff) << 80)
}

fn shift(t: u64, delta: i64) -> u64 {
    (t as i64 + delta).max(0) as u64
}

/// Template `t` as seeded task number `n`, created at `at_ms`.
fn seeded(t: &Task, n: usize, at_ms: u64, prose: &[String], words: usize) -> Task {
    let mut task = t.clone();
    let delta = at_ms as i64 - t.created_at_ms as i64;
    task.id = TaskId::from_u128(dated(TaskId::new().as_u128(), at_ms));
    task.created_at_ms = at_ms;
    task.finished_at_ms = t.finished_at_ms.map(|f| shift(f, delta));
    task.idempotency_key = None;
    let word = if n.is_multiple_of(1000) {
        RARE
    } else {
        WORDS[n % WORDS.len()]
    };
    task.prompt = format!("fix the {word} module (seeded task {n})");
    if words > 0 {
        task.prompt = format!(
            "{}: {}",
            task.prompt,
            crate::prompts::prompt(prose, n, words)
        );
    }
    for job in &mut task.jobs {
        job.id = JobId::from_u128(dated(JobId::new().as_u128(), at_ms));
        job.queued_at_ms = job.queued_at_ms.map(|q| shift(q, delta));
        job.started_at_ms = job.started_at_ms.map(|s| shift(s, delta));
        job.finished_at_ms = job.finished_at_ms.map(|f| shift(f, delta));
    }
    task
}

async fn state_of(cluster: &Cluster) -> anyhow::Result<State> {
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url)?;
    Ok(State::connect(&redis).await?)
}

/// Runs the templates through the cluster: one-agent and three-agent tasks, as finished
/// records.
async fn templates(cluster: &Cluster, state: &State) -> anyhow::Result<Vec<Task>> {
    throughput(cluster, 150, &["builder"], 16).await?;
    throughput(cluster, 50, &["planner", "builder", "reviewer"], 16).await?;
    let ids = state.task_ids_desc(Range::default(), None, 1000).await?;
    let tasks: Vec<Task> = state
        .load_tasks(&ids)
        .await?
        .into_iter()
        .filter(|t| t.status.is_terminal())
        .collect();
    if tasks.is_empty() {
        bail!("no finished task to seed from\n{}", cluster.logs());
    }
    Ok(tasks)
}

/// Writes `count` seeded tasks numbered from `first`, spread evenly over the span (a task
/// number picks its place, so later levels interleave with the earlier ones).
async fn seed(
    state: &State,
    templates: &[Task],
    (first, count): (usize, usize),
    span_days: u64,
    (prose, words): (&[String], usize),
) -> anyhow::Result<()> {
    let now = orch_shared::now_ms();
    let span = span_days * DAY_MS;
    // Leave the last hour to the measured tasks.
    let newest = now - 3600 * 1000;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(first..first + count)
        .map(|n| {
            let state = state.clone();
            // A multiplicative hash spreads consecutive numbers over the whole span.
            let frac = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_000_000;
            let at = newest - span * frac / 1_000_000;
            let task = seeded(&templates[n % templates.len()], n, at, prose, words);
            async move { Ok(state.restore_task(&task).await?) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

/// A key's family: its first two `:`-separated parts (`orch:task`, `orch:costs`).
fn family(key: &str) -> &str {
    match key.match_indices(':').nth(1) {
        Some((i, _)) => &key[..i],
        None => key,
    }
}

/// The families of the keys in Redis now.
async fn families(url: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut out = BTreeSet::new();
    let mut iter: redis::AsyncIter<'_, String> = conn.scan_match("*").await?;
    while let Some(key) = iter.next_item().await {
        out.insert(family(&key?).to_string());
    }
    Ok(out)
}

/// Deletes the keys whose family the build under test never wrote (`known`, taken after its
/// templates ran): the seeding writes with this build's code, so against an older build it
/// also writes the indexes that build does not have, which would count in its memory. Returns
/// the families deleted.
async fn drop_unknown(url: &str, known: &BTreeSet<String>) -> anyhow::Result<BTreeSet<String>> {
    let client = redis::Client::open(url)?;
    let mut scan = client.get_multiplexed_async_connection().await?;
    let mut conn = scan.clone();
    let mut dropped = BTreeSet::new();
    let mut batch = Vec::new();
    let mut iter: redis::AsyncIter<'_, String> = scan.scan_match("*").await?;
    while let Some(key) = iter.next_item().await {
        let key = key?;
        let f = family(&key);
        if !known.contains(f) {
            dropped.insert(f.to_string());
            batch.push(key);
        }
    }
    drop(iter);
    for keys in batch.chunks(1000) {
        let () = redis::cmd("UNLINK")
            .arg(keys)
            .query_async(&mut conn)
            .await?;
    }
    Ok(dropped)
}

/// Median wall time of `runs` runs of an `orchctl` command, in ms.
fn orchctl_ms(cluster: &Cluster, args: &[&str], runs: usize) -> anyhow::Result<f64> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = cluster.orchctl().args(args).output()?;
        if !out.status.success() {
            bail!(
                "orchctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(pct(&ms, 0.5))
}

/// Median time in ms for the requests a dashboard page makes when it opens (the page, then
/// its API calls at once, as the browser does).
async fn page_ms(cluster: &Cluster, page: &str, api: &[&str], runs: usize) -> anyhow::Result<f64> {
    let http = cluster.client();
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let r = http
            .get(format!("{}{page}", cluster.url))
            .header("authorization", format!("Bearer {}", orch_tests::TOKEN))
            .send()
            .await?;
        r.bytes().await?;
        let calls = api.iter().map(|path| {
            let http = http.clone();
            let url = format!("{}{path}", cluster.url);
            async move {
                let r = http.get(url).bearer_auth(orch_tests::TOKEN).send().await?;
                let status = r.status();
                r.bytes().await?;
                anyhow::ensure!(status.is_success(), "GET {path}: {status}");
                Ok::<(), anyhow::Error>(())
            }
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok(pct(&ms, 0.5))
}

/// Every figure with the history as it is now.
async fn point(cluster: &mut Cluster, p: &Params) -> anyhow::Result<Value> {
    let t = throughput(cluster, p.batch, &["builder"], 32).await?;
    let l = latency_light(cluster, p.samples).await?;
    let runs = 9;
    let status = orchctl_ms(cluster, &["status"], runs)?;
    let list = orchctl_ms(cluster, &["tasks", "list"], runs)?;
    let search = orchctl_ms(cluster, &["tasks", "list", "--search", RARE], runs)?;
    let cost = orchctl_ms(cluster, &["cost-report", "--since", "30d"], 5)?;
    // The same report without the CLI's start: what the coordinator takes.
    let since = orch_shared::now_ms() - 30 * DAY_MS;
    let cost_api = page_ms(
        cluster,
        &format!("/v1/reports/cost?since={since}"),
        &[],
        runs,
    )
    .await?;
    let overview = page_ms(
        cluster,
        "/",
        &["/v1/status", "/v1/tasks?limit=8", "/v1/dlq", "/v1/quotas"],
        runs,
    )
    .await?;
    let history = page_ms(cluster, "/history", &["/v1/tasks?limit=20"], runs).await?;
    let restart = cluster.restart_coordinator().await?;
    // Answers after the restart (the first ones, caches cold).
    let list_after_restart = orchctl_ms(cluster, &["tasks", "list"], 1)?;
    Ok(json!({
        "tasks_per_s": t["tasks_per_s"],
        "coordinator_cpu_ms_per_task": t["cpu_ms_per_task"]["coordinator"],
        "dispatch_p50_ms": l["submit_to_start"]["p50_ms"],
        "dispatch_p99_ms": l["submit_to_start"]["p99_ms"],
        "orchctl_status_ms": status,
        "tasks_list_ms": list,
        "tasks_list_search_ms": search,
        "cost_report_30d_ms": cost,
        "cost_report_30d_api_ms": cost_api,
        "dashboard_overview_ms": overview,
        "dashboard_history_ms": history,
        "coordinator_restart_ms": restart.as_secs_f64() * 1000.0,
        "tasks_list_after_restart_ms": list_after_restart,
    }))
}

/// Runs the scenario on one build (`spec.bin_dir`).
pub async fn run(spec: &Spec, p: &Params) -> anyhow::Result<Value> {
    let mut cluster = Cluster::start(spec.clone()).await?;
    let state = state_of(&cluster).await?;
    let templates = templates(&cluster, &state).await?;
    let base = crate::cluster::redis_used(&cluster.redis_url).await?;
    let known = families(&cluster.redis_url).await?;
    let mut dropped = BTreeSet::new();
    eprintln!("  {} templates", templates.len());
    let prose = if p.prompt_words > 0 {
        crate::prompts::corpus(std::path::Path::new("."))?
    } else {
        vec![]
    };
    let mut seeded_so_far = 0;
    let mut points = Vec::new();
    for &level in &p.levels {
        if level > seeded_so_far {
            let t0 = Instant::now();
            seed(
                &state,
                &templates,
                (seeded_so_far, level - seeded_so_far),
                p.span_days,
                (&prose, p.prompt_words),
            )
            .await?;
            let s = t0.elapsed().as_secs_f64();
            eprintln!("  seeded {} tasks in {s:.1} s", level - seeded_so_far);
            let d = drop_unknown(&cluster.redis_url, &known).await?;
            if !d.is_empty() {
                eprintln!("  deleted the keys this build does not write: {d:?}");
            }
            dropped.extend(d);
            seeded_so_far = level;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = crate::cluster::redis_used(&cluster.redis_url).await?;
        let mut point = point(&mut cluster, p).await?;
        point["history"] = json!(level);
        point["redis_bytes_per_finished_task"] =
            json!((used.saturating_sub(base)) as f64 / level.max(1) as f64);
        point["coordinator_rss_mb"] =
            json!(crate::cluster::rss_kb(cluster.coordinator.pid()) as f64 / 1024.0);
        eprintln!("  history {level}: {point}");
        points.push(point);
    }
    let ratios = ratios(&points).context("two points at least")?;
    Ok(json!({
        "points": points,
        "ratio_largest_to_smallest": ratios,
        "span_days": p.span_days,
        "prompt_words": p.prompt_words,
        "seeded_keys_deleted": dropped,
        "templates": templates.len(),
        "batch": p.batch,
        "samples": p.samples,
    }))
}

/// Each figure at the largest history over the same figure at the smallest.
fn ratios(points: &[Value]) -> Option<Value> {
    let (first, last) = (points.first()?, points.last()?);
    let mut out = serde_json::Map::new();
    for (k, v) in last.as_object()? {
        if k == "history" {
            continue;
        }
        if let (Some(a), Some(b)) = (first[k].as_f64(), v.as_f64())
            && a > 0.0
        {
            out.insert(k.clone(), json!(b / a));
        }
    }
    out.insert(
        "history".into(),
        json!(last["history"].as_f64()? / first["history"].as_f64()?),
    );
    Some(Value::Object(out))
}
