//! Metrics on a real cluster: the coordinator's and a worker's `/metrics` after a workload
//! (queue, slots, tasks, jobs by outcome and reason, retries, dead letters, tokens and cost by
//! role, model and backend, budgets), labels that are never ids, and every metric the Grafana
//! dashboards and the alert rules query.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::TaskStatus;
use orch_tests::{Cluster, Options};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// The repository's root (this crate is `tests/`).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// `name{labels} value` lines of a scrape, without comments.
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_string(), labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn names(text: &str) -> BTreeSet<String> {
    samples(text).into_iter().map(|(n, _, _)| n).collect()
}

/// The value of `name` whose labels contain every `k="v"` of `with`, summed.
fn value(text: &str, name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for (n, labels, v) in samples(text) {
        if n == name
            && with
                .iter()
                .all(|(k, val)| labels.contains(&format!("{k}=\"{val}\"")))
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Whether a label value looks like a UUID (an id: unbounded cardinality).
fn has_id_label(text: &str) -> Option<String> {
    samples(text).into_iter().find_map(|(n, labels, _)| {
        labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(_, v)| v.trim_matches('"'))
            .find(|v| {
                v.len() == 36
                    && v.chars().filter(|c| *c == '-').count() == 4
                    && v.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
            })
            .map(|v| format!("{n}{{..{v}..}}"))
    })
}

/// Polls the coordinator's metrics until `ok` holds (the sampler runs every 5 s).
async fn scrape_until(cluster: &Cluster, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let url = format!("{}/metrics", cluster.url);
    cluster
        .eventually(Duration::from_secs(15), || async {
            let text = cluster.scrape(&url).await;
            match ok(&text) {
                true => Ok(text),
                false => Err(format!(
                    "{what} never showed in the coordinator's metrics:\n{text}"
                )),
            }
        })
        .await
}

/// A small workload touching every path the metrics count: success, retry, dead letter,
/// a refused request, and a budgeted task left running. Returns the running task's id.
async fn workload(cluster: &Cluster) -> String {
    let ok = cluster
        .submit(json!({"prompt": "build it", "roles": ["analyst", "builder"]}))
        .await;
    let retried = cluster
        .submit(json!({"prompt": "flaky", "roles": ["tester"],
                        "sim": {"fail_first_attempts": 1}, "max_attempts": 3}))
        .await;
    let dead = cluster
        .submit(json!({"prompt": "doomed", "roles": ["builder"],
                        "sim": {"fail_rate": 1.0}, "max_attempts": 1}))
        .await;
    let ids = [
        ok.id.to_string(),
        retried.id.to_string(),
        dead.id.to_string(),
    ];
    let done = cluster.wait_all(&ids, Duration::from_secs(30)).await;
    assert_eq!(
        done.iter().map(|t| t.status).collect::<Vec<_>>(),
        vec![
            TaskStatus::Completed,
            TaskStatus::Completed,
            TaskStatus::Failed
        ],
        "{}",
        cluster.logs()
    );
    let (status, _) = cluster.post("/v1/tasks", &json!({"prompt": ""})).await;
    assert_eq!(status.as_u16(), 400);
    let running = cluster
        .submit(
            json!({"prompt": "long", "roles": ["reviewer"], "budget_usd": 5.0,
                        "sim": {"latency_ms": 30000}}),
        )
        .await;
    running.id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_queue_slots_jobs_tokens_cost_and_budgets_without_ids() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let (_, worker_metrics) = cluster.add_worker_with_metrics().await;
    cluster.wait_workers(1).await;
    let running = workload(&cluster).await;

    // Sampled gauges: wait for a sample taken while the budgeted task runs.
    let text = scrape_until(&cluster, "a sample with the budgeted task running", |t| {
        value(t, "orch_budgeted_tasks", &[]) == Some(1.0)
            && value(t, "orch_jobs_active", &[("status", "running")]) == Some(1.0)
    })
    .await;
    let v = |name: &str, with: &[(&str, &str)]| {
        value(&text, name, with).unwrap_or_else(|| panic!("{name} {with:?} missing:\n{text}"))
    };
    assert_eq!(v("orch_workers", &[]), 1.0);
    assert_eq!(v("orch_cluster_slots_total", &[]), 4.0);
    assert_eq!(v("orch_queue_depth", &[]), 0.0);
    assert_eq!(
        v("orch_jobs_in_flight", &[]),
        1.0,
        "the budgeted job is held"
    );
    assert_eq!(v("orch_tasks_active", &[("status", "running")]), 1.0);
    assert_eq!(v("orch_dead_letters", &[]), 1.0);
    let left = v("orch_budget_remaining_usd", &[]);
    assert!(left > 4.9 && left <= 5.0, "{left}");
    // Counted from events and results.
    assert_eq!(v("orch_tasks_submitted_total", &[]), 4.0);
    assert_eq!(
        v("orch_tasks_finished_total", &[("status", "completed")]),
        2.0
    );
    assert_eq!(v("orch_tasks_finished_total", &[("status", "failed")]), 1.0);
    assert_eq!(
        v(
            "orch_jobs_finished_total",
            &[("outcome", "failure"), ("reason", "agent_error")]
        ),
        2.0,
        "one retried attempt and one dead letter"
    );
    assert_eq!(
        v("orch_job_retries_total", &[("reason", "agent_error")]),
        1.0
    );
    assert_eq!(
        v(
            "orch_jobs_dead_lettered_total",
            &[("reason", "agent_error")]
        ),
        1.0
    );
    assert!(
        v(
            "orch_jobs_started_total",
            &[("role", "builder"), ("backend", "sim")]
        ) >= 2.0
    );
    let input = v(
        "orch_agent_tokens_total",
        &[
            ("role", "analyst"),
            ("model", "default"),
            ("backend", "sim"),
            ("kind", "input"),
        ],
    );
    assert!(input > 0.0);
    let cost: f64 = v("orch_agent_cost_usd_total", &[]);
    let (_, tasks) = cluster.get("/v1/tasks?status=completed,failed").await;
    let spent: f64 = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(
        (cost - spent).abs() < 1e-6,
        "metrics {cost} vs records {spent}"
    );
    assert!(v("orch_http_errors_total", &[("code", "400")]) >= 1.0);
    assert!(v("orch_job_duration_seconds_count", &[("role", "builder")]) >= 1.0);
    assert!(v("orch_dispatch_latency_seconds_count", &[]) >= 4.0);
    assert!(v("orch_job_attempts_count", &[("role", "tester")]) >= 1.0);
    // Latencies are histograms with their own bounds (aggregatable across replicas), not
    // summaries: the smallest and largest bounds are there, and no quantile series.
    assert!(v("orch_dispatch_latency_seconds_bucket", &[("le", "0.0001")]) >= 0.0);
    assert!(v("orch_dispatch_latency_seconds_bucket", &[("le", "+Inf")]) >= 4.0);
    assert!(
        v(
            "orch_job_duration_seconds_bucket",
            &[("role", "builder"), ("le", "7200")]
        ) >= 1.0
    );
    assert!(
        v(
            "orch_job_attempts_bucket",
            &[("role", "tester"), ("le", "10")]
        ) >= 1.0
    );
    assert!(
        !text.contains("orch_dispatch_latency_seconds{") && !text.contains("quantile=\""),
        "summaries exported:\n{text}"
    );

    let worker = cluster.scrape(&worker_metrics).await;
    let w = |name: &str| value(&worker, name, &[]).unwrap_or_else(|| panic!("{name}:\n{worker}"));
    assert_eq!(w("orch_worker_slots_total"), 4.0);
    assert_eq!(w("orch_worker_slots_busy"), 1.0, "the budgeted job runs");
    assert!(w("orch_worker_jobs_started_total") >= 5.0);
    assert_eq!(w("orch_worker_jobs_redelivered_total"), 0.0);
    assert_eq!(w("orch_worker_jobs_handed_back_total"), 0.0);

    for (who, text) in [("coordinator", &text), ("worker", &worker)] {
        assert_eq!(has_id_label(text), None, "{who} labels a metric with an id");
    }
    let (status, _) = cluster
        .post(&format!("/v1/tasks/{running}/cancel"), &json!({}))
        .await;
    assert!(status.is_success());
}

/// Metric names in PromQL: `orch_...` tokens.
fn metric_tokens(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("orch_") {
        let start = i + pos;
        let boundary = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Whether `name` is exported as a series of that exact name. A query of a histogram's base
/// name (what a summary's quantiles are exported under) is not: histograms export only
/// `_bucket`, `_sum` and `_count`.
fn exported(name: &str, names: &BTreeSet<String>) -> bool {
    names.contains(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    // What the dashboards and alerts ask for.
    let mut wanted: Vec<(String, String)> = Vec::new();
    let dashboards = [
        repo().join("deploy/grafana/orchestrator.json"),
        repo().join("helm/orchestrator/dashboards/orchestrator.json"),
    ];
    assert!(
        dashboards[0].is_file(),
        "{} is missing: the dashboard is part of the deployment",
        dashboards[0].display()
    );
    for path in dashboards.iter().filter(|p| p.is_file()) {
        let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let mut found = Vec::new();
        exprs(&json, &mut found);
        assert!(!found.is_empty(), "{} has no queries", path.display());
        for expr in found {
            for name in metric_tokens(&expr) {
                wanted.push((path.display().to_string(), name));
            }
        }
    }
    let rules = repo().join("helm/orchestrator/templates/prometheusrule.yaml");
    if rules.is_file() {
        for line in std::fs::read_to_string(&rules).unwrap().lines() {
            for name in metric_tokens(line) {
                wanted.push((rules.display().to_string(), name));
            }
        }
    }
    assert!(!wanted.is_empty());

    // What a cluster exports after a small run.
    let mut cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let (_, worker_metrics) = cluster.add_worker_with_metrics().await;
    cluster.wait_workers(1).await;
    workload(&cluster).await;
    let coordinator = scrape_until(&cluster, "the first sample", |t| {
        t.contains("orch_queue_depth")
    })
    .await;
    let worker = cluster.scrape(&worker_metrics).await;
    let mut have = names(&coordinator);
    have.extend(names(&worker));

    let missing: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, name)| !exported(name, &have))
        .map(|(file, name)| format!("{name} (in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported:\n  {}\nexported: {have:?}",
        missing.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_tokens(
            r#"sum(rate(orch_jobs_finished_total{ns=~"$ns"}[5m])) / ignoring(x) orch_worker_slots_total"#
        ),
        vec!["orch_jobs_finished_total", "orch_worker_slots_total"]
    );
    assert!(metric_tokens("job:orch_busy:ratio and xorch_y").is_empty());
    let have: BTreeSet<String> = ["orch_a_bucket".to_string(), "orch_b".to_string()].into();
    assert!(exported("orch_a_bucket", &have));
    assert!(exported("orch_b", &have));
    assert!(
        !exported("orch_a", &have),
        "a histogram has no series of its base name"
    );
}

/// Job counters are taken once per cluster, by the leader: a standby replica hears the same
/// events but counts none of them, so summing the counters over replicas (what a Prometheus
/// `sum()` does) gives the true figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_counters_summed_over_replicas_count_each_job_once() {
    let cluster = Cluster::start(Options::default()).await;
    let (_standby, standby_url) = cluster.start_standby();
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            let t = cluster
                .submit(json!({"prompt": format!("build {i}"), "roles": ["analyst", "builder"]}))
                .await;
            ids.push(t.id.to_string());
        }
        ids
    };
    cluster.wait_all(&ids, Duration::from_secs(30)).await;
    let leader = scrape_until(&cluster, "6 job starts", |t| {
        value(t, "orch_jobs_started_total", &[]) == Some(6.0)
    })
    .await;
    let standby = cluster.scrape(&format!("{standby_url}/metrics")).await;
    for name in ["orch_jobs_started_total", "orch_agent_tokens_total"] {
        let on_standby = value(&standby, name, &[]).unwrap_or(0.0);
        assert_eq!(on_standby, 0.0, "the standby counted {name}:\n{standby}");
    }
    assert_eq!(
        value(&leader, "orch_job_attempts_count", &[]),
        Some(6.0),
        "one successful attempt per job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_agent_times_each_of_its_tool_rounds_in_the_worker_metrics() {
    // Three rounds of `list_files`, then the answer: three rounds timed, none of them the
    // model's time or the tool's.
    let fake = orch_tests::fake_anthropic::FakeAnthropic::start_rounds(3, Duration::ZERO).await;
    let mut cluster = Cluster::start(Options {
        workers: 0,
        worker_args: fake.worker_args("anthropic"),
        ..Options::default()
    })
    .await;
    let (_, worker_metrics) = cluster.add_worker_with_metrics().await;
    cluster.wait_workers(1).await;
    let task = cluster
        .submit(json!({"prompt": "look around", "roles": ["builder"]}))
        .await;
    let done = cluster
        .wait_all(&[task.id.to_string()], Duration::from_secs(60))
        .await;
    assert_eq!(done[0].status, TaskStatus::Completed, "{}", cluster.logs());
    assert_eq!(fake.message_requests().len(), 4);

    let worker = cluster.scrape(&worker_metrics).await;
    let name = "orch_worker_tool_round_overhead_seconds";
    assert_eq!(
        value(&worker, &format!("{name}_count"), &[]),
        Some(3.0),
        "{worker}"
    );
    let p50 = value(&worker, name, &[("quantile", "0.5")]).unwrap_or(-1.0);
    assert!(p50 >= 0.0, "no p50 of the loop's time per round:\n{worker}");
}
