//! The run's summary: medians over passes, same-run ratios against the anchors, the issue's
//! targets met or missed, and the markdown table written next to the JSON.

use serde_json::{Value, json};

/// A figure of a core pass, by path.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

/// The figures summarised, with their path in a core pass.
const FIGURES: &[(&str, &[&str])] = &[
    (
        "one-agent tasks/s",
        &["throughput_one_agent", "tasks_per_s"],
    ),
    (
        "5-step tasks: jobs/s",
        &["throughput_five_steps", "jobs_per_s"],
    ),
    (
        "submit → agent start p50 ms (light)",
        &["latency_light", "submit_to_start", "p50_ms"],
    ),
    (
        "submit → agent start p99 ms (light)",
        &["latency_light", "submit_to_start", "p99_ms"],
    ),
    (
        "submit → agent start max ms (light)",
        &["latency_light", "submit_to_start", "max_ms"],
    ),
    (
        "… job_started seen by the client p50 ms (light)",
        &["latency_light", "submit_to_start_seen", "p50_ms"],
    ),
    (
        "… job_started seen by the client p99 ms (light)",
        &["latency_light", "submit_to_start_seen", "p99_ms"],
    ),
    (
        "submit → job message on NATS p50 ms (light)",
        &["latency_light", "submit_to_job_published", "p50_ms"],
    ),
    (
        "submit → HTTP response p50 ms (light)",
        &["latency_light", "submit_response", "p50_ms"],
    ),
    (
        "agent finish → visible in the API p50 ms",
        &["latency_light", "finish_to_visible", "p50_ms"],
    ),
    (
        "agent finish → visible in the API p99 ms",
        &["latency_light", "finish_to_visible", "p99_ms"],
    ),
    (
        "offered load tasks/s (80 % of the pass's baseline, or own, max)",
        &["latency_loaded", "offered_per_s"],
    ),
    (
        "submit → agent start p50 ms (80 % load)",
        &["latency_loaded", "p50_ms"],
    ),
    (
        "submit → agent start p99 ms (80 % load)",
        &["latency_loaded", "p99_ms"],
    ),
    (
        "JetStream messages stored per one-agent task",
        &["throughput_one_agent", "stored_messages_per_task"],
    ),
    ("idle worker RSS MB", &["idle_worker_rss_mb"]),
    (
        "worker RSS MB after the run",
        &["footprint", "worker_rss_mb"],
    ),
    (
        "coordinator RSS MB after the run",
        &["footprint", "coordinator_rss_mb"],
    ),
    (
        "coordinator CPU ms / task",
        &["throughput_one_agent", "cpu_ms_per_task", "coordinator"],
    ),
    (
        "workers CPU ms / task",
        &["throughput_one_agent", "cpu_ms_per_task", "workers"],
    ),
    (
        "nats-server CPU ms / task",
        &["throughput_one_agent", "cpu_ms_per_task", "nats"],
    ),
    (
        "redis-server CPU ms / task",
        &["throughput_one_agent", "cpu_ms_per_task", "redis"],
    ),
    (
        "bench client CPU ms / task",
        &["throughput_one_agent", "cpu_ms_per_task", "bench_client"],
    ),
    (
        "`orchctl status` ms (p50)",
        &["footprint", "orchctl_status", "p50_ms"],
    ),
    (
        "`GET /v1/status` alone ms (p50)",
        &["footprint", "api_status", "p50_ms"],
    ),
];

/// Median, min and max of a figure over passes.
pub fn spread(passes: &[Value], path: &[&str]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = passes.iter().filter_map(|p| at(p, path).as_f64()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_spread(s: Option<(f64, f64, f64)>) -> String {
    match s {
        None => "-".into(),
        Some((m, lo, hi)) if lo == hi => fmt(m),
        Some((m, lo, hi)) => format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi)),
    }
}

fn passes<'a>(r: &'a Value, which: &str) -> &'a [Value] {
    r["core"][which].as_array().map_or(&[], Vec::as_slice)
}

/// Medians of the core figures and ratios against the anchors, and the targets, added to `r`.
pub fn targets(r: &mut Value) {
    let current = passes(r, "current").to_vec();
    let median = |path: &[&str]| spread(&current, path).map(|s| s.0);
    let ours = median(&["throughput_one_agent", "tasks_per_s"]);
    let js: Vec<Value> = r["jsbench"].as_array().cloned().unwrap_or_default();
    let js_redis = spread(&js, &["jetstream_redis_jobs_per_s"]).map(|s| s.0);
    // Per pass: ours over the jsbench run right after it, then the median of those ratios.
    let mut ratios: Vec<f64> = current
        .iter()
        .zip(&js)
        .filter_map(|(c, j)| {
            Some(
                at(c, &["throughput_one_agent", "tasks_per_s"]).as_f64()?
                    / j["jetstream_redis_jobs_per_s"].as_f64()?,
            )
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let ratio_js = ratios.get(ratios.len() / 2).copied();
    let celery = r["celery"]["jobs_per_s"].as_f64();
    let ratio_celery = ours.zip(celery).map(|(a, b)| a / b);
    let p50 = median(&["latency_light", "submit_to_start", "p50_ms"]);
    let p99 = median(&["latency_light", "submit_to_start", "p99_ms"]);
    let idle = median(&["idle_worker_rss_mb"]);
    let status = median(&["footprint", "orchctl_status", "p50_ms"]);
    let conc = r["concurrency"].clone();
    let redeliveries = conc["redelivered_starts"].as_u64().map(|n| {
        n + conc["jobs_started_twice"].as_u64().unwrap_or(0)
            + conc["consumer_num_redelivered_max"].as_u64().unwrap_or(0)
    });
    let recovery = r["recovery"]["recovery_s"].as_f64();
    let recovery_target = r["recovery"]["target_s"].as_f64();
    let t = |name: &str, figure: String, target: &str, met: Option<bool>| {
        json!({"target": name, "figure": figure, "wanted": target,
               "met": met.map_or(Value::Null, Value::Bool)})
    };
    let opt = |x: Option<f64>, unit: &str| {
        x.map_or("not measured".into(), |x| format!("{}{unit}", fmt(x)))
    };
    r["summary"] = json!({
        "one_agent_tasks_per_s": ours,
        "jsbench_jetstream_redis_jobs_per_s": js_redis,
        "ratio_vs_jetstream_redis": ratio_js,
        "celery_jobs_per_s": celery,
        "ratio_vs_celery": ratio_celery,
    });
    r["targets"] = json!([
        t(
            "throughput ≥ 50 % of jsbench JetStream + Redis",
            opt(ratio_js.map(|x| x * 100.0), " %"),
            "≥ 50 %",
            ratio_js.map(|x| x >= 0.5)
        ),
        t(
            "throughput ≥ 10× Celery + Redis",
            match (ratio_celery, r["celery"]["error"].as_str()) {
                (Some(x), _) => format!("{}×", fmt(x)),
                (None, Some(e)) => format!("Celery did not run: {e}"),
                (None, None) => "not measured".into(),
            },
            "≥ 10×",
            ratio_celery.map(|x| x >= 10.0)
        ),
        t(
            "dispatch p50 at light load",
            opt(p50, " ms"),
            "≤ 0.5 ms",
            p50.map(|x| x <= 0.5)
        ),
        t(
            "dispatch p99 at light load",
            opt(p99, " ms"),
            "≤ 1.5 ms",
            p99.map(|x| x <= 1.5)
        ),
        t(
            "1,000 long agents on one worker, zero spurious redeliveries",
            match (conc["agents"].as_u64(), redeliveries) {
                (Some(a), Some(n)) => format!(
                    "{a} agents, {n} redeliveries, {} missed heartbeats",
                    conc["missed_heartbeats"]
                ),
                _ => "not measured".into(),
            },
            "0",
            redeliveries.map(|n| {
                n == 0
                    && conc["missed_heartbeats"].as_u64() == Some(0)
                    && conc["agents"].as_u64() >= Some(1000)
            })
        ),
        t(
            "recovery ≤ ack wait + 1 s",
            opt(recovery, " s"),
            &recovery_target.map_or("ack wait + 1 s".into(), |x| format!("≤ {x} s")),
            recovery.zip(recovery_target).map(|(a, b)| a <= b)
        ),
        t(
            "idle worker RSS",
            opt(idle, " MB"),
            "≤ 20 MB",
            idle.map(|x| x <= 20.0)
        ),
        t(
            "`orchctl status`",
            opt(status, " ms"),
            "≤ 50 ms",
            status.map(|x| x <= 50.0)
        ),
    ]);
}

pub fn markdown(r: &Value) -> String {
    let mut s = format!(
        "# Benchmark run ({} cores)\n\nRedis: {}. {}. Load average at start {}, at end {}. \
         Took {:.0} s.\n\n",
        r["cores"],
        r["redis_mode"].as_str().unwrap_or("?"),
        r["nats_version"].as_str().unwrap_or("?"),
        r["load_average_at_start"].as_str().unwrap_or("?"),
        r["load_average_at_end"].as_str().unwrap_or("?"),
        r["duration_s"].as_f64().unwrap_or(0.0),
    );
    s.push_str("## Targets\n\n| Target | Figure | Wanted | Met |\n|---|---|---|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        s.push_str(&format!(
            "| {} | {} | {} | {met} |\n",
            t["target"].as_str().unwrap_or(""),
            t["figure"].as_str().unwrap_or(""),
            t["wanted"].as_str().unwrap_or("")
        ));
    }

    let current = passes(r, "current");
    let baseline = passes(r, "baseline");
    if !current.is_empty() {
        let n = current.len();
        s.push_str(&format!(
            "\n## Core figures (median of {n} pass{}, range in brackets)\n\n",
            if n == 1 { "" } else { "es" }
        ));
        if baseline.is_empty() {
            s.push_str("| Figure | This build |\n|---|---|\n");
        } else {
            s.push_str("| Figure | Before (baseline build) | After (this build) | After / before |\n|---|---|---|---|\n");
        }
        for (name, path) in FIGURES {
            let after = spread(current, path);
            if baseline.is_empty() {
                s.push_str(&format!("| {name} | {} |\n", fmt_spread(after)));
            } else {
                let before = spread(baseline, path);
                let change = before
                    .zip(after)
                    .map_or("-".into(), |(b, a)| format!("{:.2}", a.0 / b.0));
                s.push_str(&format!(
                    "| {name} | {} | {} | {change} |\n",
                    fmt_spread(before),
                    fmt_spread(after)
                ));
            }
        }
    }

    s.push_str(
        "\n## Anchors (same run)\n\n| Anchor | Figure | Orchestrator / anchor |\n|---|---|---|\n",
    );
    let js: Vec<Value> = r["jsbench"].as_array().cloned().unwrap_or_default();
    let sum = &r["summary"];
    let ratio = |k: &str| {
        sum[k]
            .as_f64()
            .map_or("-".into(), |x| format!("{:.1} %", x * 100.0))
    };
    s.push_str(&format!(
        "| jsbench JetStream only, jobs/s | {} | - |\n",
        fmt_spread(spread(&js, &["jetstream_jobs_per_s"]))
    ));
    s.push_str(&format!(
        "| jsbench JetStream + one Redis HSET per job, jobs/s | {} | {} |\n",
        fmt_spread(spread(&js, &["jetstream_redis_jobs_per_s"])),
        ratio("ratio_vs_jetstream_redis")
    ));
    s.push_str(&format!(
        "| jsbench publish-ack → delivery p50 / p99 ms | {} / {} | - |\n",
        fmt_spread(spread(&js, &["latency_p50_ms"])),
        fmt_spread(spread(&js, &["latency_p99_ms"]))
    ));
    match (
        r["celery"]["jobs_per_s"].as_f64(),
        r["celery"]["error"].as_str(),
    ) {
        (Some(c), _) => {
            s.push_str(&format!(
                "| Celery {} + Redis, jobs/s ({} jobs, 2-process prefork) | {} | {} |\n",
                r["celery"]["celery_version"].as_str().unwrap_or("5"),
                r["celery"]["jobs"],
                fmt(c),
                sum["ratio_vs_celery"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{}×", fmt(x)))
            ));
            s.push_str(&format!(
                "| Celery submit → task start p50 / p99 ms | {} / {} | - |\n",
                r["celery"]["latency_p50_ms"]
                    .as_f64()
                    .map_or("-".into(), fmt),
                r["celery"]["latency_p99_ms"]
                    .as_f64()
                    .map_or("-".into(), fmt)
            ));
        }
        (None, Some(e)) => s.push_str(&format!("| Celery + Redis | did not run: {e} | - |\n")),
        (None, None) => s.push_str("| Celery + Redis | not run | - |\n"),
    }

    let c = &r["concurrency"];
    if c.is_object() {
        s.push_str(&format!(
            "\n## Concurrency: {} agents of {} s on one worker (`--slots {}`, ack wait {} s, \
             heartbeat every {:.1} s)\n\n| Figure | Value |\n|---|---|\n",
            c["agents"],
            c["hold_s"],
            c["agents"],
            c["ack_wait_s"],
            c["heartbeat_period_s"].as_f64().unwrap_or(0.0)
        ));
        for (name, key) in [
            ("all agents started after (s)", "all_started_after_s"),
            ("all tasks finished after (s)", "all_finished_after_s"),
            ("heartbeat events", "heartbeat_events"),
            ("in-progress acks sent (worker metric)", "in_progress_acks"),
            ("late heartbeats (gap > 1.5 periods)", "late_heartbeats"),
            ("missed heartbeats (gap ≥ ack wait)", "missed_heartbeats"),
            ("longest gap between heartbeats (s)", "max_gap_s"),
            ("jobs started with delivery > 1", "redelivered_starts"),
            ("jobs started twice", "jobs_started_twice"),
            (
                "consumer num_redelivered (max while held)",
                "consumer_num_redelivered_max",
            ),
            (
                "worker: redelivered jobs (metric)",
                "worker_jobs_redelivered",
            ),
            ("worker: leases lost (metric)", "worker_leases_lost"),
            ("worker RSS idle (MB)", "worker_idle_rss_mb"),
            ("worker RSS holding them, max (MB)", "worker_rss_mb_max"),
            (
                "worker CPU while holding them (% of one core)",
                "worker_cpu_pct_while_holding",
            ),
        ] {
            let v = &c[key];
            let text = v.as_f64().map_or("-".into(), fmt);
            s.push_str(&format!("| {name} | {text} |\n"));
        }
    }

    let g = &r["growth"];
    if g.is_object() {
        s.push_str(&format!(
            "\n## Growth ({} one-agent tasks and {} light-load latency samples per point)\n\n",
            g["history"]["batch"], g["history"]["samples"]
        ));
        s.push_str("| Tasks in history | Tasks/s | p50 ms | p99 ms | Coordinator CPU ms/task | `orchctl status` ms |\n|---|---|---|---|---|---|\n");
        for p in g["history"]["points"].as_array().into_iter().flatten() {
            s.push_str(&row(p, "history"));
        }
        s.push_str("\n| Worker processes | Tasks/s | p50 ms | p99 ms | Coordinator CPU ms/task | `orchctl status` ms |\n|---|---|---|---|---|---|\n");
        for p in g["workers"]["points"].as_array().into_iter().flatten() {
            s.push_str(&row(p, "workers"));
        }
        match &r["growth_plot"] {
            Value::String(f) => s.push_str(&format!("\n![growth]({f})\n")),
            v => s.push_str(&format!("\nNo plot: {}\n", v["error"])),
        }
    }
    if let Some(rec) = r["recovery"].as_object() {
        s.push_str(&format!(
            "\n## Recovery\n\nSIGKILL of the worker running a job → the job running on the other \
             worker: {} s (ack wait {} s).\n",
            rec.get("recovery_s")
                .and_then(Value::as_f64)
                .map_or("-".into(), fmt),
            rec.get("ack_wait_s").cloned().unwrap_or_default()
        ));
    }
    if r["replicas"].is_object() {
        s.push_str(&replicas(&r["replicas"]));
    }
    for build in ["baseline", "current"] {
        if let Some(a) = r["agents10k"].get(build) {
            s.push_str(&agents10k(build, a));
        }
    }
    if r.get("history1m").is_some() {
        s.push_str(&history1m(r));
    }
    if r.get("bigrepo").is_some() {
        s.push_str(&bigrepo(&r["bigrepo"]));
    }
    if r.get("prompts").is_some() {
        s.push_str(&prompts(&r["prompts"]));
    }
    s
}

/// The `prompts` figures: per build, Redis bytes per finished task with a long prompt and the
/// word index's share.
fn prompts(p: &Value) -> String {
    let n = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    let mut s = String::from(
        "\n## prompts (same run)\n\n| Build | tasks | words per prompt (distinct) | Redis \
         bytes per task | record bytes | word index bytes per task | index entries per task \
         | index keys |\n|---|---|---|---|---|---|---|---|\n",
    );
    for build in ["baseline", "current"] {
        let Some(r) = p.get(build) else { continue };
        s.push_str(&format!(
            "| {build} | {} | {} ({}) | {} | {} | {} | {} | {} |\n",
            r["tasks"],
            r["prompt_words"],
            n(&r["distinct_words_per_prompt"]),
            n(&r["redis_bytes_per_task"]),
            n(&r["record_bytes_per_task"]),
            n(&r["word_index_bytes_per_task"]),
            n(&r["word_index_entries_per_task"]),
            r["word_index_keys"],
        ));
    }
    s
}

/// The `bigrepo` figures: the floor, then each build's waits and disk against it.
fn bigrepo(b: &Value) -> String {
    let ms = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    let mb = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:.1}", x / 1_000_000.0))
    };
    let x = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}×"));
    let f = &b["floor"];
    let mut s = format!(
        "\n## bigrepo (same run)\n\n{} files, {} commits, {} MB packed. Floor: `git clone \
         --mirror` {} ms; `git worktree add` from the mirror {} ms (first {} ms), {} MB per \
         worktree.\n\n| Build | scratch job ms | cold ms | warm ms | {} at once: median / max \
         ms | disk per job MB | clone cache MB | warm / floor | concurrent median / warm | disk \
         / floor worktree |\n|---|---|---|---|---|---|---|---|---|---|\n",
        b["files"],
        b["commits"],
        mb(&b["packed_bytes"]),
        ms(&f["mirror_clone_ms"]),
        ms(&f["worktree_add_ms"]),
        ms(&f["worktree_add_first_ms"]),
        mb(&f["worktree_disk_bytes"]),
        b["concurrent"],
    );
    for build in ["baseline", "current"] {
        let Some(r) = b.get(build) else { continue };
        let j = &r["jobs"];
        s.push_str(&format!(
            "| {build} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} |\n",
            ms(&j["scratch_ms"]),
            ms(&j["cold_ms"]),
            ms(&j["warm_ms"]),
            ms(&j["concurrent_median_ms"]),
            ms(&j["concurrent_max_ms"]),
            mb(&j["disk_per_job_bytes"]),
            mb(&j["clone_cache_bytes"]),
            x(&r["warm_over_floor"]),
            x(&r["concurrent_median_over_warm"]),
            x(&r["disk_per_job_over_floor_worktree"]),
        ));
    }
    // Below the floor: the job's own git commands without the cluster, a sparse worktree of
    // one directory, and jobs declaring that directory with a sparse checkout.
    s.push_str(&format!(
        "\nWithout the cluster: `clone --shared` of the mirror + checkout {} ms; a sparse \
         worktree of one directory {} ms, {} MB.\n\n| Build | sparse warm ms | {} sparse at \
         once: median / max ms | disk per sparse job MB | sparse warm / floor | sparse \
         concurrent median / warm |\n|---|---|---|---|---|---|\n",
        ms(&f["shared_clone_checkout_ms"]),
        ms(&f["sparse_worktree_add_ms"]),
        mb(&f["sparse_worktree_disk_bytes"]),
        b["concurrent"],
    ));
    for build in ["baseline", "current"] {
        let Some(r) = b.get(build) else { continue };
        let j = &r["jobs"]["sparse"];
        s.push_str(&format!(
            "| {build} | {} | {} / {} | {} | {} | {} |\n",
            ms(&j["warm_ms"]),
            ms(&j["concurrent_median_ms"]),
            ms(&j["concurrent_max_ms"]),
            mb(&j["disk_per_job_bytes"]),
            x(&r["sparse_warm_over_floor"]),
            x(&r["sparse_concurrent_median_over_warm"]),
        ));
    }
    s
}

/// The `agents10k` figures: one column per size, then the per-agent ratio of the largest size
/// to the smallest (goal: flat, ≤ 1.2×).
fn agents10k(build: &str, a: &Value) -> String {
    let sizes: Vec<&Value> = a["sizes"].as_array().into_iter().flatten().collect();
    let mut s = format!("\n## agents10k, {build} build (same run)\n\n| Figure |");
    for z in &sizes {
        s.push_str(&format!(
            " {} agents on {} workers |",
            z["agents"], z["workers"]
        ));
    }
    s.push_str(" ratio |\n");
    s.push_str(&format!("{}|\n", "|---".repeat(sizes.len() + 2)));
    let rows: [(&str, &[&str], Option<&str>); 15] = [
        ("all started after s", &["all_started_after_s"], None),
        ("late heartbeats", &["late_heartbeats"], None),
        ("missed heartbeats", &["missed_heartbeats"], None),
        ("redelivered starts", &["redelivered_starts"], None),
        ("jobs started twice", &["jobs_started_twice"], None),
        ("workers' leases lost", &["worker_leases_lost"], None),
        (
            "new job submit → start p50 ms, while holding",
            &["while_holding", "dispatch_p50_ms"],
            None,
        ),
        (
            "new job submit → start p99 ms, while holding",
            &["while_holding", "dispatch_p99_ms"],
            Some("dispatch_p99_ms"),
        ),
        (
            "`orchctl status` ms, while holding",
            &["while_holding", "orchctl_status_ms"],
            Some("orchctl_status_ms"),
        ),
        (
            "`GET /v1/status` ms, while holding",
            &["while_holding", "status_api_ms"],
            Some("status_api_ms"),
        ),
        (
            "coordinator CPU % per 1,000 agents",
            &["coordinator_cpu_pct_per_1000_agents"],
            Some("coordinator_cpu_per_agent"),
        ),
        (
            "coordinator RSS MB",
            &["memory_while_holding", "coordinator_rss_mb"],
            None,
        ),
        (
            "Redis bytes per agent",
            &["memory_while_holding", "redis_bytes_per_agent"],
            Some("redis_bytes_per_agent"),
        ),
        (
            "NATS kB per agent",
            &["memory_while_holding", "nats_kb_per_agent"],
            Some("nats_kb_per_agent"),
        ),
        (
            "workers' kB per agent",
            &["worker_kb_per_agent"],
            Some("worker_kb_per_agent"),
        ),
    ];
    for (label, path, ratio) in rows {
        s.push_str(&format!("| {label} |"));
        for z in &sizes {
            let v = path.iter().fold(*z, |v, k| &v[*k]).as_f64();
            s.push_str(&format!(" {} |", v.map_or("-".into(), fmt)));
        }
        let ratio = ratio.and_then(|k| a["per_agent_ratio_largest_to_smallest"][k].as_f64());
        s.push_str(&format!(
            " {} |\n",
            ratio.map_or("-".into(), |x| format!("{x:.2}×"))
        ));
    }
    s
}

/// The `history1m` figures: one column per build and history size, then the ratio of the
/// largest size to the smallest (goal ≤ 1.2×; reads also below 100 ms).
const HISTORY_FIGURES: [(&str, &str); 14] = [
    ("tasks_per_s", "one-agent tasks/s"),
    ("dispatch_p50_ms", "submit → agent start p50 ms"),
    ("dispatch_p99_ms", "submit → agent start p99 ms"),
    ("orchctl_status_ms", "`orchctl status` ms"),
    ("tasks_list_ms", "`tasks list` first page ms"),
    ("tasks_list_search_ms", "`tasks list --search` ms"),
    ("cost_report_30d_ms", "`cost-report --since 30d` ms"),
    (
        "cost_report_30d_api_ms",
        "`GET /v1/reports/cost` (30 days) ms",
    ),
    ("dashboard_overview_ms", "dashboard overview ms"),
    ("dashboard_history_ms", "dashboard history ms"),
    ("coordinator_restart_ms", "coordinator restart → ready ms"),
    (
        "tasks_list_after_restart_ms",
        "first `tasks list` after restart ms",
    ),
    ("coordinator_rss_mb", "coordinator RSS MB"),
    (
        "redis_bytes_per_finished_task",
        "Redis bytes per finished task",
    ),
];

fn history1m(r: &Value) -> String {
    let h = &r["history1m"];
    let builds: Vec<(&str, &Value)> = ["baseline", "current"]
        .into_iter()
        .filter_map(|b| h.get(b).map(|v| (b, v)))
        .collect();
    let mut s = String::from("\n## history1m (same run)\n\n| Figure |");
    let mut cols = 1;
    for (b, v) in &builds {
        for p in v["points"].as_array().into_iter().flatten() {
            s.push_str(&format!(" {b} at {} |", p["history"]));
            cols += 1;
        }
        s.push_str(&format!(" {b} ratio |"));
        cols += 1;
    }
    s.push_str(&format!("\n{}\n", "|---".repeat(cols) + "|"));
    for (key, label) in HISTORY_FIGURES {
        s.push_str(&format!("| {label} |"));
        for (_, v) in &builds {
            for p in v["points"].as_array().into_iter().flatten() {
                s.push_str(&format!(" {} |", p[key].as_f64().map_or("-".into(), fmt)));
            }
            let ratio = v["ratio_largest_to_smallest"][key].as_f64();
            s.push_str(&format!(
                " {} |",
                ratio.map_or("-".into(), |x| format!("{x:.2}×"))
            ));
        }
        s.push('\n');
    }
    match &r["history1m_plot"] {
        Value::String(f) => s.push_str(&format!("\n![history1m]({f})\n")),
        Value::Null => {}
        other => s.push_str(&format!("\n(no plot: {other})\n")),
    }
    s
}

fn row(p: &Value, x: &str) -> String {
    let f = |k: &str| p[k].as_f64().map_or("-".into(), fmt);
    format!(
        "| {} | {} | {} | {} | {} | {} |\n",
        p[x],
        f("tasks_per_s"),
        f("p50_ms"),
        f("p99_ms"),
        f("coordinator_cpu_ms_per_task"),
        f("orchctl_status_ms")
    )
}

/// The `replicas` figures: R1 on one NATS server against R3 on a cluster of three, the
/// medians (range in brackets) and the ratio of the medians.
fn replicas(r: &Value) -> String {
    let n = r["passes"].as_u64().unwrap_or(1);
    let mut s = format!(
        "\n## Stream replicas: R3 on 3 NATS servers against R1 on 1 (same run)\n\n\
         {} one-agent tasks and {} light-load latency samples on each cluster; median of {n} \
         pass{} (range in brackets), passes alternating R1 and R3.\n\n\
         | Figure | R1 (1 server) | R3 (3 servers) | R3 / R1 |\n|---|---|---|---|\n",
        r["tasks"],
        r["latency_samples"],
        if n == 1 { "" } else { "es" },
    );
    for (figure, path) in crate::scenarios::REPLICAS_FIGURES {
        let name = match figure {
            "tasks_per_s" => "one-agent tasks/s",
            "nats_cpu_ms_per_task" => "nats-server CPU ms / task (all servers)",
            "coordinator_cpu_ms_per_task" => "coordinator CPU ms / task",
            "submit_response_p50_ms" => "submit → 201 p50 ms",
            "submit_to_start_p50_ms" => "submit → agent start p50 ms",
            "submit_to_start_p99_ms" => "submit → agent start p99 ms",
            "nats_store_bytes_per_task" => "NATS store bytes / task (all servers)",
            "nats_rss_mb" => "nats-server RSS MB after the tasks (all servers)",
            other => other,
        };
        let cell = |build: &str| {
            fmt_spread(spread(
                r[build]["passes"].as_array().map_or(&[], Vec::as_slice),
                path,
            ))
        };
        let ratio = r["ratio_r3_to_r1"][figure]
            .as_f64()
            .map_or("-".into(), |x| format!("{x:.2}"));
        s.push_str(&format!(
            "| {name} | {} | {} | {ratio} |\n",
            cell("r1"),
            cell("r3")
        ));
    }
    s
}
