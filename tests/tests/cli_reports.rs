//! `orchctl` history, report and cluster-view verbs against real clusters: `tasks list` filters
//! and pages, `list-agents` / `agent-details`, `task-details`, `status`, `logs`, `watch --once`,
//! `cost-report` and `export` in every format (CSV and JSON parsed back), `clean`, `init` (its
//! files start real services), `completions`, help and exit codes (0, 1 not found, 2 bad input).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Task, TaskList, TaskStatus};
use orch_shared::report::{
    AgentDetail, AgentList, AgentSummary, CleanReport, ClusterStatus, CostReport, EventRow,
};
use orch_tests::{
    Cluster, Options, TOKEN, orchctl, orchctl_against as against, run, workspace_bin,
};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs `orchctl ARGS` against the cluster: (exit code, stdout, stderr).
fn ctl(cluster: &Cluster, home: &Path, args: &[&str]) -> (i32, String, String) {
    run(against(cluster, home).args(args))
}

/// Runs `orchctl ARGS`, asserts it exited 0 and parses its stdout as JSON.
fn ctl_json<T: serde::de::DeserializeOwned>(cluster: &Cluster, home: &Path, args: &[&str]) -> T {
    let (code, stdout, stderr) = ctl(cluster, home, args);
    assert_eq!(
        code, 0,
        "orchctl {args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("orchctl {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// Three finished tasks: a cheap analyst, a builder → tester pair, a builder that fails for good.
async fn three_tasks(cluster: &Cluster) -> (Task, Task, Task) {
    let a = cluster
        .submit(json!({"prompt": "alpha: map the PARSER", "roles": ["analyst"]}))
        .await;
    let b = cluster
        .submit(json!({"prompt": "beta: add a cache", "roles": ["builder", "tester"]}))
        .await;
    let c = cluster
        .submit(json!({"prompt": "gamma: break it", "roles": ["builder"],
                        "sim": {"fail_rate": 1.0}, "max_attempts": 1}))
        .await;
    let ids = [a.id.to_string(), b.id.to_string(), c.id.to_string()];
    let done = cluster.wait_all(&ids, Duration::from_secs(30)).await;
    assert_eq!(done[0].status, TaskStatus::Completed, "{:#?}", done[0]);
    assert_eq!(done[1].status, TaskStatus::Completed, "{:#?}", done[1]);
    assert_eq!(done[2].status, TaskStatus::Failed, "{:#?}", done[2]);
    let mut it = done.into_iter();
    (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
}

fn ids(list: &TaskList) -> Vec<String> {
    list.tasks.iter().map(|t| t.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_history_filters_sorts_and_pages_and_agents_are_listed_and_shown() {
    let cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (a, b, c) = three_tasks(&cluster).await;

    let failed: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--status", "failed", "-o", "json"],
    );
    assert_eq!(ids(&failed), vec![c.id.to_string()]);
    let found: TaskList = ctl_json(
        &cluster,
        h,
        &["list-tasks", "--search", "parser", "-o", "json"],
    );
    assert_eq!(
        ids(&found),
        vec![a.id.to_string()],
        "search is case-insensitive"
    );
    let min = format!("{}", b.cost_usd - 1e-9);
    let costly: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--min-cost", &min, "-o", "json"],
    );
    assert!(costly.tasks.iter().all(|t| t.cost_usd >= b.cost_usd - 1e-9));
    assert!(ids(&costly).contains(&b.id.to_string()));
    let cheap = format!("{}", a.cost_usd + 1e-9);
    let cheap: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--max-cost", &cheap, "-o", "json"],
    );
    assert!(
        cheap.tasks.iter().all(|t| t.cost_usd <= a.cost_usd + 1e-9),
        "{cheap:?}"
    );
    let recent: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--since", "1h", "-o", "json"],
    );
    assert_eq!(recent.tasks.len(), 3);
    let before = a.created_at_ms.to_string();
    let older: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--until", &before, "-o", "json"],
    );
    assert!(
        older.tasks.is_empty(),
        "nothing was created before the first task"
    );

    // Sorted by cost, one per page: the cursor walks the whole window in order.
    let mut cursor: Option<String> = None;
    let mut costs = Vec::new();
    for _ in 0..4 {
        let mut args = vec![
            "tasks", "list", "--sort", "cost", "--limit", "1", "-o", "json",
        ];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page: TaskList = ctl_json(&cluster, h, &args);
        costs.extend(page.tasks.iter().map(|t| t.cost_usd));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(costs.len(), 3, "three pages of one");
    assert!(
        costs.windows(2).all(|w| w[0] >= w[1]),
        "most expensive first: {costs:?}"
    );
    let asc: TaskList = ctl_json(&cluster, h, &["tasks", "list", "--asc", "-o", "json"]);
    assert_eq!(asc.tasks.first().map(|t| t.id), Some(a.id), "oldest first");

    // Pages in creation order, by hand and with --all.
    let (code, stdout, stderr) = ctl(&cluster, h, &["tasks", "list", "--limit", "2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&c.id.to_string()) && !stdout.contains(&a.id.to_string()),
        "{stdout}"
    );
    assert!(
        stderr.contains("more:") && stderr.contains("--cursor"),
        "{stderr}"
    );
    let all: TaskList = ctl_json(
        &cluster,
        h,
        &["tasks", "list", "--limit", "1", "--all", "-o", "json"],
    );
    assert_eq!(
        ids(&all),
        vec![c.id.to_string(), b.id.to_string(), a.id.to_string()]
    );

    // Bad input exits 2 and names the flag or field.
    for (args, needle) in [
        (vec!["tasks", "list", "--since", "yesterday-ish"], "--since"),
        (vec!["tasks", "list", "--status", "sideways"], "status"),
        (vec!["tasks", "list", "--min-cost=-1"], "--min-cost"),
        (vec!["agents", "list", "--role", "wizard"], "role"),
        (vec!["agents", "show", "not-an-id"], "not-an-id"),
    ] {
        let (code, stdout, stderr) = ctl(&cluster, h, &args);
        assert_eq!(code, 2, "{args:?}: {stdout} {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
    }

    // task-details is `tasks show`.
    let (code, stdout, _) = ctl(&cluster, h, &["task-details", &c.id.to_string()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("failed") && stdout.contains("gamma"),
        "{stdout}"
    );
    let shown: Task = ctl_json(
        &cluster,
        h,
        &["task-details", &b.id.to_string(), "-o", "json"],
    );
    assert_eq!(shown.jobs.len(), 2);

    // Agents.
    let builders: AgentList = ctl_json(
        &cluster,
        h,
        &["list-agents", "--role", "builder", "-o", "json"],
    );
    let mut got: Vec<_> = builders.agents.iter().map(|a| a.id).collect();
    got.sort();
    let mut want = vec![b.jobs[0].id, c.jobs[0].id];
    want.sort();
    assert_eq!(got, want);
    let failed: AgentList = ctl_json(
        &cluster,
        h,
        &["agents", "list", "--status", "failed", "-o", "json"],
    );
    assert_eq!(failed.agents.len(), 1);
    assert_eq!(failed.agents[0].id, c.jobs[0].id);
    assert_eq!(
        failed.agents[0].error.as_ref().map(|e| e.reason.as_str()),
        Some("agent_error")
    );
    let of_b: AgentList = ctl_json(
        &cluster,
        h,
        &["agents", "list", "--task", &b.id.to_string(), "-o", "json"],
    );
    assert_eq!(
        of_b.agents.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![b.jobs[0].id, b.jobs[1].id]
    );
    let active: AgentList = ctl_json(&cluster, h, &["agents", "list", "--active", "-o", "json"]);
    assert!(active.agents.is_empty(), "{active:?}");
    let paged: AgentList = ctl_json(
        &cluster,
        h,
        &["agents", "list", "--limit", "1", "--all", "-o", "json"],
    );
    assert_eq!(
        paged.agents.len(),
        4,
        "every agent once, page by page: {paged:?}"
    );
    let (code, stdout, _) = ctl(&cluster, h, &["agents", "list"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("tester") && stdout.contains("failed (agent_error)"),
        "{stdout}"
    );

    let builder = &b.jobs[0];
    let detail: AgentDetail = ctl_json(
        &cluster,
        h,
        &["agent-details", &builder.id.to_string(), "-o", "json"],
    );
    assert_eq!(detail.task_id, b.id);
    assert_eq!(detail.job.usage, builder.usage);
    assert_eq!(detail.backend.as_str(), "sim");
    assert!(
        detail.tool_calls >= 1 && detail.tools.contains_key("Read"),
        "{detail:?}"
    );
    assert!(detail.log_events >= 4, "{detail:?}");
    let (code, stdout, _) = ctl(&cluster, h, &["agents", "show", &builder.id.to_string()]);
    assert_eq!(code, 0);
    for needle in [
        "Builder Agent",
        "worker-0",
        "cache read tokens",
        "Read ×",
        "files read",
        "session",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing:\n{stdout}");
    }
    let (code, _, stderr) = ctl(
        &cluster,
        h,
        &["agents", "show", "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    let (code, _, _) = ctl(
        &cluster,
        h,
        &[
            "agents",
            "list",
            "--task",
            "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b",
        ],
    );
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_report_sums_and_exports_parse_back_in_every_format() {
    let cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (a, b, c) = three_tasks(&cluster).await;
    let tasks = [&a, &b, &c];
    let cost: f64 = tasks.iter().map(|t| t.cost_usd).sum();
    let input: u64 = tasks.iter().map(|t| t.usage.input_tokens).sum();
    let cache_read: u64 = tasks.iter().map(|t| t.usage.cache_read_tokens).sum();

    let report: CostReport = ctl_json(
        &cluster,
        h,
        &[
            "cost-report",
            "--by-role",
            "--by-model",
            "--by-agent",
            "--by-task",
            "-o",
            "json",
        ],
    );
    assert_eq!(report.tasks, 3);
    assert_eq!(report.total.agents, 4);
    assert!(
        (report.total.cost_usd - cost).abs() < 1e-9,
        "{} vs {cost}",
        report.total.cost_usd
    );
    assert_eq!(report.total.usage.input_tokens, input);
    assert_eq!(report.total.usage.cache_read_tokens, cache_read);
    let by = |dim: &str| report.breakdowns.iter().find(|b| b.by == dim).expect(dim);
    let roles = by("role");
    let builder = roles.groups.iter().find(|g| g.key == "builder").unwrap();
    assert_eq!(builder.totals.agents, 2);
    assert!(
        (builder.totals.cost_usd - (b.jobs[0].cost_usd + c.jobs[0].cost_usd)).abs() < 1e-9,
        "the builder row sums the two builders"
    );
    for dim in ["role", "model", "agent", "task"] {
        let sum: f64 = by(dim).groups.iter().map(|g| g.totals.cost_usd).sum();
        assert!((sum - cost).abs() < 1e-9, "{dim} rows add up to the total");
    }
    assert_eq!(by("model").groups.len(), 1);
    assert_eq!(by("model").groups[0].key, "default");
    assert_eq!(by("agent").groups.len(), 4);
    let per_task = by("task");
    let row_b = per_task
        .groups
        .iter()
        .find(|g| g.key == b.id.to_string())
        .unwrap();
    assert!((row_b.totals.cost_usd - b.cost_usd).abs() < 1e-9);
    // A window without tasks.
    let empty: CostReport = ctl_json(
        &cluster,
        h,
        &[
            "cost-report",
            "--since",
            "2000-01-01",
            "--until",
            "2000-01-02",
            "-o",
            "json",
        ],
    );
    assert_eq!((empty.tasks, empty.total.agents), (0, 0));

    let (code, stdout, stderr) = ctl(
        &cluster,
        h,
        &["cost-report", "--by-role", "--format", "csv"],
    );
    assert_eq!(code, 0, "{stderr}");
    let mut rows = csv::Reader::from_reader(stdout.as_bytes());
    let headers = rows.headers().unwrap().clone();
    assert_eq!(&headers[0], "dimension");
    let records: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(&records[0][0], "total");
    assert_eq!(records[0][4].parse::<u64>().unwrap(), 4, "agents");
    assert_eq!(records[0][5].parse::<u64>().unwrap(), input);
    let csv_cost: f64 = records[0][10].parse().unwrap();
    assert!((csv_cost - cost).abs() < 1e-5);
    assert!(records.iter().any(|r| &r[0] == "role" && &r[1] == "tester"));
    let (code, stdout, _) = ctl(&cluster, h, &["cost-report", "--by-role"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("By role") && stdout.contains("cache read tokens"),
        "{stdout}"
    );
    let (code, _, stderr) = ctl(&cluster, h, &["cost-report", "--format", "pdf"]);
    assert_eq!(code, 2, "{stderr}");

    // Tasks as CSV.
    let (code, stdout, stderr) = ctl(
        &cluster,
        h,
        &["export", "--what", "tasks", "--format", "csv"],
    );
    assert_eq!(code, 0, "{stderr}");
    let mut r = csv::Reader::from_reader(stdout.as_bytes());
    let id_col = r.headers().unwrap().iter().position(|c| c == "id").unwrap();
    let exported: Vec<String> = r
        .records()
        .map(|x| x.unwrap()[id_col].to_string())
        .collect();
    assert_eq!(
        exported,
        vec![a.id.to_string(), b.id.to_string(), c.id.to_string()],
        "oldest first"
    );
    // Agents as one JSON array, into a file.
    let file = h.join("agents.json");
    let (code, _, stderr) = ctl(
        &cluster,
        h,
        &[
            "export",
            "--what",
            "agents",
            "--format",
            "json",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let agents: Vec<AgentSummary> = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(agents.len(), 4);
    assert_eq!(agents[0].id, a.jobs[0].id);
    // Events as NDJSON: every event of the three logs, in stream order.
    let (code, stdout, stderr) = ctl(
        &cluster,
        h,
        &["export", "--what", "events", "--format", "ndjson"],
    );
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<EventRow> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut logged = 0;
    for t in tasks {
        logged += cluster.events(&t.id.to_string(), None).await.len();
    }
    assert_eq!(rows.len(), logged);
    assert!(rows.windows(2).all(|w| w[0].id() < w[1].id()));
    assert!(rows.iter().any(|r| r.event.kind.name() == "tool_call"));
    let (code, stdout, _) = ctl(
        &cluster,
        h,
        &["export", "--what", "events", "--format", "csv"],
    );
    assert_eq!(code, 0);
    let mut r = csv::Reader::from_reader(stdout.as_bytes());
    assert_eq!(r.records().count(), logged);
    // A window in the future is empty but well formed.
    let (code, stdout, _) = ctl(
        &cluster,
        h,
        &[
            "export",
            "--what",
            "agents",
            "--format",
            "json",
            "--since",
            "2999-01-01",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap(),
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_status_and_watch_show_live_agents_from_any_machine() {
    let cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let task = cluster
        .submit(
            json!({"prompt": "delta: watch me work", "roles": ["builder", "tester"],
                        "sim": {"latency_ms": 2500}}),
        )
        .await;
    let builder = task.jobs[0].id.to_string();
    cluster.wait_running(&task.id.to_string(), 0).await;

    // `logs --follow` of a running agent ends with the agent, not with the task.
    let follow = {
        let mut cmd = against(&cluster, h);
        cmd.args(["logs", &builder, "--follow"]);
        std::thread::spawn(move || run(&mut cmd))
    };

    // While it runs: the screen and the status show it.
    let (code, screen, stderr) = ctl(
        &cluster,
        h,
        &["watch", "--once", "--width", "160", "--height", "40"],
    );
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "Workers (1)",
        "worker-0",
        "■□□□ 1/4",
        "builder",
        "running",
        "tester",
        "pending",
        "delta: watch me work",
        "Recent failures",
        "k kill",
    ] {
        assert!(
            screen.contains(needle),
            "`{needle}` missing from the frame:\n{screen}"
        );
    }
    let snapshot: ClusterStatus = ctl_json(&cluster, h, &["watch", "--once", "-o", "json"]);
    assert!(
        snapshot
            .active_agents
            .iter()
            .any(|a| a.id.to_string() == builder)
    );
    let status: serde_json::Value = ctl_json(&cluster, h, &["status", "-o", "json"]);
    let c: ClusterStatus = serde_json::from_value(status["cluster"].clone()).unwrap();
    assert_eq!(c.coordinators.len(), 1, "{c:?}");
    assert_eq!((c.workers.len(), c.slots_total), (1, 4));
    assert!(c.queue.is_some());
    assert_eq!(c.active_tasks, 1);
    let (code, stdout, _) = ctl(&cluster, h, &["status"]);
    assert_eq!(code, 0);
    for needle in [
        "coordinators",
        "queue",
        "in flight",
        "dead letters",
        "cost today",
        "worker-0",
    ] {
        assert!(stdout.contains(needle), "`{needle}` missing:\n{stdout}");
    }

    let (code, live, stderr) = follow.join().unwrap();
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "Builder Agent started on worker-0",
        "thinking…",
        "tool call Read",
        "tool result",
        "usage: in",
        "finished: succeeded",
    ] {
        assert!(
            live.contains(needle),
            "`{needle}` missing from the live log:\n{live}"
        );
    }
    assert!(
        !live.contains("Tester Agent"),
        "one agent's log only:\n{live}"
    );
    let done = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(30))
        .await;
    assert_eq!(done.status, TaskStatus::Completed);

    // After the fact, from the event log: the same transcript, and every agent of the task.
    let (code, after, _) = ctl(&cluster, h, &["logs", &builder]);
    assert_eq!(code, 0);
    assert_eq!(
        after.lines().count(),
        live.lines().count(),
        "live:\n{live}\nafter:\n{after}"
    );
    let (code, all, _) = ctl(&cluster, h, &["logs", "--task", &task.id.to_string()]);
    assert_eq!(code, 0);
    assert!(
        all.contains("Tester Agent started") && all.contains("task completed"),
        "{all}"
    );
    let (code, json_lines, _) = ctl(
        &cluster,
        h,
        &["logs", &builder, "-o", "json", "--max-chars", "10"],
    );
    assert_eq!(code, 0);
    let rows: Vec<EventRow> = json_lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.iter().all(|r| r.event.job_id == Some(task.jobs[0].id)));
    assert!(rows.iter().any(|r| matches!(&r.event.kind, orch_shared::event::EventKind::ToolCall { input, .. } if input.contains("README.md"))), "JSON keeps whole inputs");
    let (code, short, _) = ctl(&cluster, h, &["logs", &builder, "--max-chars", "10"]);
    assert_eq!(code, 0);
    assert!(short.contains("more characters]"), "{short}");

    let (code, _, stderr) = ctl(
        &cluster,
        h,
        &["logs", "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c"],
    );
    assert_eq!(code, 1, "{stderr}");
    let (code, _, stderr) = ctl(
        &cluster,
        h,
        &["logs", "--task", "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b"],
    );
    assert_eq!(code, 1, "{stderr}");
    let (code, _, _) = ctl(&cluster, h, &["logs"]);
    assert_eq!(code, 2, "an agent or a task is required");
    let (code, _, stderr) = ctl(&cluster, h, &["watch"]);
    assert_eq!(code, 2, "no terminal: {stderr}");
    assert!(stderr.contains("--once"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_deletes_old_finished_tasks_with_their_agents_and_logs() {
    let cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (a, _b, c) = three_tasks(&cluster).await;
    let running = cluster
        .submit(
            json!({"prompt": "still going", "roles": ["builder"], "sim": {"latency_ms": 20000}}),
        )
        .await;

    let dry: CleanReport = ctl_json(
        &cluster,
        h,
        &["clean", "--older-than", "0s", "--dry-run", "-o", "json"],
    );
    assert_eq!(
        (dry.tasks, dry.agents, dry.skipped_unfinished),
        (3, 4, 1),
        "{dry:?}"
    );
    assert_eq!(dry.events_purged, 0);
    let still: TaskList = ctl_json(&cluster, h, &["tasks", "list", "-o", "json"]);
    assert_eq!(still.tasks.len(), 4, "a dry run deletes nothing");
    let none: CleanReport = ctl_json(
        &cluster,
        h,
        &["clean", "--older-than", "1h", "--yes", "-o", "json"],
    );
    assert_eq!(none.tasks, 0, "nothing is an hour old");

    let done: CleanReport = ctl_json(
        &cluster,
        h,
        &["clean", "--older-than", "0s", "--yes", "-o", "json"],
    );
    assert_eq!(
        (done.tasks, done.agents, done.skipped_unfinished),
        (3, 4, 1),
        "{done:?}"
    );
    assert!(
        done.events_purged >= 12 && done.results_purged >= 4,
        "{done:?}"
    );
    let left: TaskList = ctl_json(&cluster, h, &["tasks", "list", "-o", "json"]);
    assert_eq!(
        ids(&left),
        vec![running.id.to_string()],
        "the unfinished task stays"
    );
    let (code, _, _) = ctl(&cluster, h, &["tasks", "show", &a.id.to_string()]);
    assert_eq!(code, 1, "the record is gone");
    let (code, _, _) = ctl(&cluster, h, &["agents", "show", &c.jobs[0].id.to_string()]);
    assert_eq!(code, 1, "the agent index entry is gone");
    let (code, _, _) = ctl(&cluster, h, &["logs", "--task", &a.id.to_string()]);
    assert_eq!(code, 1);
    let (_, dlq) = cluster.get("/v1/dlq").await;
    assert_eq!(dlq["jobs"], json!([]), "its dead letter went with it");
    let (code, stdout, _) = ctl(
        &cluster,
        h,
        &["export", "--what", "events", "--format", "ndjson"],
    );
    assert_eq!(code, 0);
    let rows: Vec<EventRow> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r.event.task_id == running.id),
        "only the running task's events are left"
    );
    let (code, stdout, _) = ctl(&cluster, h, &["clean", "--older-than", "0s", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("would delete") && stdout.contains("unfinished (kept)"),
        "{stdout}"
    );
    let (code, _, stderr) = ctl(&cluster, h, &["clean", "--older-than", "soon"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--older-than"), "{stderr}");
}

/// `--history-retention`: the leader deletes finished tasks older than it on its own, with
/// their agents and logs, and keeps unfinished ones whatever their age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_past_the_history_retention_are_deleted_and_running_ones_kept() {
    let cluster = Cluster::start(Options {
        workers: 1,
        coordinator_args: vec!["--history-retention".into(), "5s".into()],
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let old = cluster
        .submit(json!({"prompt": "old: map the parser", "roles": ["analyst"]}))
        .await;
    let done = cluster
        .wait_all(&[old.id.to_string()], Duration::from_secs(30))
        .await;
    assert_eq!(done[0].status, TaskStatus::Completed, "{:#?}", done[0]);
    let running = cluster
        .submit(
            json!({"prompt": "still going", "roles": ["builder"], "sim": {"latency_ms": 60000}}),
        )
        .await;

    let id = old.id.to_string();
    let left = cluster
        .eventually(Duration::from_secs(30), || async {
            let (_, body) = cluster.get("/v1/tasks").await;
            let list: TaskList = serde_json::from_value(body).map_err(|e| e.to_string())?;
            if ids(&list).contains(&id) {
                return Err(format!("{id} is still listed"));
            }
            Ok::<_, String>(list)
        })
        .await;
    assert_eq!(
        ids(&left),
        vec![running.id.to_string()],
        "the unfinished task stays, however old"
    );
    let (code, _, _) = ctl(&cluster, h, &["tasks", "show", &id]);
    assert_eq!(code, 1, "the record is gone");
    let (code, _, _) = ctl(
        &cluster,
        h,
        &["agents", "show", &done[0].jobs[0].id.to_string()],
    );
    assert_eq!(code, 1, "the agent index entry is gone");
    let (code, _, _) = ctl(&cluster, h, &["logs", "--task", &id]);
    assert_eq!(code, 1, "its event log is gone");
    let (_, status) = cluster.get(&format!("/v1/tasks/{}", running.id)).await;
    assert_eq!(status["status"], json!("running"), "{status}");
}

/// Kills a child process on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_files_the_binaries_read_and_completions_help_and_version_work() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let services = h.join("services");
    let (code, stdout, stderr) = run(orchctl(h).args([
        "init",
        "--yes",
        "--server",
        &cluster.url,
        "--token",
        TOKEN,
        "--services",
        services.to_str().unwrap(),
        "--nats-url",
        &cluster.nats_url,
        "--redis-url",
        &cluster.redis_url,
        "--listen",
        "127.0.0.1:0",
        "--slots",
        "3",
        "--log-format",
        "pretty",
    ]));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("orch-coordinator --config"), "{stdout}");
    // orchctl reads its file: no --server, no --token.
    let (code, _, stderr) = run(orchctl(h).args(["tasks", "list"]));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) =
        run(orchctl(h).args(["init", "--yes", "--server", "http://elsewhere:1"]));
    assert_eq!(code, 2, "an existing file is kept without --force");
    assert!(stderr.contains("--force"), "{stderr}");

    // The services start from their files.
    let addr_file = h.join("coordinator.addr");
    let coordinator = Child(
        Command::new(workspace_bin("orch-coordinator"))
            .arg("--config")
            .arg(services.join("coordinator.toml"))
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let worker = Child(
        Command::new(workspace_bin("orch-worker"))
            .arg("--config")
            .arg(services.join("worker.toml"))
            .args(["--id", "from-init"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let second = orch_tests::eventually(Duration::from_secs(30), || async {
        match std::fs::read_to_string(&addr_file) {
            Ok(addr) if !addr.is_empty() => Ok(format!("http://{addr}")),
            _ => Err("the coordinator from coordinator.toml did not listen"),
        }
    })
    .await;
    // The second coordinator takes the token from its file, the worker its slots.
    let worker_json = orch_tests::eventually(Duration::from_secs(30), || async {
        let (code, stdout, _) =
            run(orchctl(h).args(["--server", &second, "workers", "list", "-o", "json"]));
        match code == 0 && stdout.contains("from-init") {
            true => Ok(stdout),
            false => Err(format!(
                "the worker from worker.toml did not register: {stdout}"
            )),
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&worker_json).unwrap();
    let w = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "from-init")
        .unwrap();
    assert_eq!(w["slots"], 3);
    drop((coordinator, worker));

    for shell in ["bash", "zsh", "fish"] {
        let (code, stdout, _) = run(orchctl(h).args(["completions", shell]));
        assert_eq!(code, 0);
        assert!(
            stdout.contains("cost-report") && stdout.contains("list-agents"),
            "{shell}"
        );
    }
    let (code, _, _) = run(orchctl(h).args(["completions", "powershell-ish"]));
    assert_eq!(code, 2);
    let (code, stdout, _) = run(orchctl(h).arg("--version"));
    assert_eq!(code, 0);
    assert!(stdout.starts_with("orchctl "), "{stdout}");
    for verb in [
        vec!["execute"],
        vec!["status"],
        vec!["list-agents"],
        vec!["agents", "list"],
        vec!["agent-details"],
        vec!["agents", "show"],
        vec!["list-tasks"],
        vec!["tasks", "list"],
        vec!["task-details"],
        vec!["tasks", "show"],
        vec!["init"],
        vec!["clean"],
        vec!["cost-report"],
        vec!["export"],
        vec!["watch"],
        vec!["logs"],
        vec!["kill"],
        vec!["cancel"],
        vec!["completions"],
        vec!["workers", "list"],
        vec!["dlq", "list"],
    ] {
        let mut args = verb.clone();
        args.push("--help");
        let (code, stdout, _) = run(orchctl(h).args(&args));
        assert_eq!(code, 0, "{verb:?}");
        assert!(
            stdout.contains("Examples:"),
            "{verb:?} --help has no examples:\n{stdout}"
        );
    }
}
