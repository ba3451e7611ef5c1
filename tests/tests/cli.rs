//! `orchctl` against real clusters: verbs, JSON output, exit codes (0 ok, 1 not found or task
//! failed, 2 bad input) and `local up` / `local down`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Task, TaskList, TaskStatus, WorkerList};
use orch_tests::{Cluster, Options, orchctl, orchctl_against as against, run};
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_prints_the_result_and_exit_codes_follow_the_task() {
    let cluster = Cluster::start(Options::default()).await;
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(against(&cluster, home.path()).args([
        "submit",
        "add a cache to the parser",
        "--roles",
        "analyst,builder",
        "--sim-latency",
        "100ms",
        "--follow",
    ]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("[Analyst Agent]"), "{stdout}");
    assert!(stdout.contains("completed"), "{stdout}");
    assert!(
        stdout.contains("analyst") && stdout.contains("builder"),
        "{stdout}"
    );

    let (code, stdout, stderr) = run(against(&cluster, home.path()).args([
        "execute",
        "build it",
        "--roles",
        "builder,tester",
        "--sim-fail-rate",
        "1",
        "--follow",
        "--output",
        "json",
    ]));
    assert_eq!(code, 1, "a failed task exits 1\n{stderr}");
    let task: Task = serde_json::from_str(&stdout).expect("--output json prints the task");
    assert_eq!(task.status, TaskStatus::Failed);

    let (code, stdout, _) =
        run(against(&cluster, home.path()).args(["tasks", "list", "--output", "json"]));
    assert_eq!(code, 0);
    let list: TaskList = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list.tasks.len(), 2);
    assert_eq!(list.tasks[0].id, task.id, "newest first");

    let (code, stdout, _) = run(against(&cluster, home.path()).args([
        "tasks",
        "show",
        &task.id.to_string(),
        "-o",
        "json",
    ]));
    assert_eq!(code, 0);
    let shown: Task = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown.jobs.len(), 2);

    let (code, stdout, _) =
        run(against(&cluster, home.path()).args(["workers", "list", "-o", "json"]));
    assert_eq!(code, 0);
    let workers: WorkerList = serde_json::from_str(&stdout).unwrap();
    assert_eq!(workers.workers.len(), 2);

    let (code, stdout, _) = run(against(&cluster, home.path()).args(["status"]));
    assert_eq!(code, 0);
    assert!(
        stdout.contains("2 (0 of 8 slots busy)") || stdout.contains("workers"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_two_with_one_line_and_not_found_exits_one() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["submit", "x", "--roles", "builder,scout"], "scout"),
        (vec!["submit", "x", "--sim-fail-rate", "3"], "fail-rate"),
        (vec!["submit", "x", "--task-type", "astrology"], "task_type"),
        (vec!["submit", "   "], "prompt"),
        (vec!["tasks", "show", "not-an-id"], "not-an-id"),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = run(against(&cluster, home.path()).args(&args));
        assert_eq!(code, 2, "{args:?}: stdout {stdout} stderr {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len() <= 2,
            "{args:?}: expected a short error, got:\n{stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
    }
    let (code, _, stderr) = run(against(&cluster, home.path()).args([
        "tasks",
        "show",
        "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b",
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    // Nothing was created by the refused submits.
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_or_an_unreachable_server_exits_two() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(orchctl(home.path()).args([
        "--server",
        &cluster.url,
        "--token",
        "wrong-token-0123456789",
        "tasks",
        "list",
    ]));
    assert_eq!(code, 2);
    assert!(stderr.to_lowercase().contains("token"), "{stderr}");
    assert!(
        !stderr.contains("wrong-token-0123456789"),
        "the token is never echoed"
    );
    let port = orch_tests::free_port();
    let (code, _, stderr) =
        run(orchctl(home.path()).args(["--server", &format!("http://127.0.0.1:{port}"), "status"]));
    assert_ne!(code, 0);
    assert!(stderr.contains(&port.to_string()), "{stderr}");
}

#[test]
fn local_up_starts_a_cluster_later_commands_find_and_local_down_stops_it() {
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(orchctl(home.path()).args(["local", "up", "--workers", "2"]));
    assert_eq!(code, 0, "local up failed\n{stdout}\n{stderr}");
    // No --server or --token: both come from the config file `local up` wrote.
    let (code, stdout, stderr) = run(orchctl(home.path()).args([
        "submit",
        "review and test the parser",
        "--follow",
        "-o",
        "json",
    ]));
    let (_, status_out, _) = run(orchctl(home.path()).args(["local", "status"]));
    let (_, status_json, _) = run(orchctl(home.path()).args(["local", "status", "-o", "json"]));
    let scraped = worker_metrics(&status_json);
    let (down_code, down_out, down_err) = run(orchctl(home.path()).args(["local", "down"]));
    assert_eq!(code, 0, "submit failed\n{stdout}\n{stderr}\n{status_out}");
    let task: Task = serde_json::from_str(&stdout).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
    assert!(
        status_out.contains("coordinator") && status_out.contains("running"),
        "{status_out}"
    );
    // Every worker serves /metrics on the port `local status` lists, and the Prometheus
    // targets file names the coordinator and both workers.
    let (ports, targets, bodies) = scraped;
    assert_eq!(ports.len(), 2, "{status_json}");
    for body in &bodies {
        assert!(body.contains("orch_worker_slots_total"), "{body}");
    }
    for port in &ports {
        assert!(targets.contains(&format!("127.0.0.1:{port}")), "{targets}");
    }
    assert!(targets.contains("coordinator"), "{targets}");
    assert_eq!(down_code, 0, "{down_out}\n{down_err}");
    let (code, stdout, _) = run(orchctl(home.path()).args(["local", "status"]));
    assert_ne!(code, 0, "the cluster is gone: {stdout}");
}

/// The workers' metrics ports from `local status -o json`, the Prometheus targets file
/// `local up` wrote, and each worker's /metrics page.
fn worker_metrics(status_json: &str) -> (Vec<u16>, String, Vec<String>) {
    use std::io::{Read, Write};
    let status: serde_json::Value = serde_json::from_str(status_json)
        .unwrap_or_else(|e| panic!("local status -o json: {e}\n{status_json}"));
    let ports: Vec<u16> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"].as_str().unwrap().starts_with("worker-"))
        .map(|p| {
            let port = p["port"].as_u64().unwrap_or_else(|| panic!("no port: {p}"));
            u16::try_from(port).unwrap()
        })
        .collect();
    let data_dir = status["data_dir"].as_str().unwrap();
    let targets =
        std::fs::read_to_string(Path::new(data_dir).join("prometheus-targets.json")).unwrap();
    let bodies = ports
        .iter()
        .map(|port| {
            let mut conn = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
            conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            conn.read_to_string(&mut body).unwrap();
            body
        })
        .collect();
    (ports, targets, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_cancel_kill_and_dlq_verbs() {
    let cluster = Cluster::start(Options::default()).await;
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(against(&cluster, home.path()).args([
        "submit",
        "fix the login bug",
        "--task-type",
        "bug_fix",
        "--dry-run",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("nothing was run") && stdout.contains("builder"),
        "{stdout}"
    );

    let plan = home.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"steps":[{"role":"analyst","scope":"look"},{"role":"builder","scope":"build","depends_on":[0]}]}"#,
    )
    .unwrap();
    let (code, stdout, stderr) = run(against(&cluster, home.path()).args([
        "submit",
        "x",
        "--plan",
        plan.to_str().unwrap(),
        "--sim-latency",
        "20s",
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let task: Task = serde_json::from_str(&stdout).unwrap();
    assert_eq!(task.task_type, "plan");
    let (code, stdout, _) =
        run(against(&cluster, home.path()).args(["cancel", &task.id.to_string(), "-o", "json"]));
    assert_eq!(code, 0);
    let cancelled: Task = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);

    let (code, _, stderr) =
        run(against(&cluster, home.path()).args(["kill", "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b"]));
    assert_eq!(code, 1, "{stderr}");
    let (code, _, stderr) = run(against(&cluster, home.path()).args([
        "dlq",
        "retry",
        "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b",
    ]));
    assert_eq!(code, 1, "{stderr}");
    let (code, stdout, _) = run(against(&cluster, home.path()).args(["dlq", "list"]));
    assert_eq!(code, 0);
    assert!(stdout.contains("no dead letters"), "{stdout}");
    let (code, _, stderr) =
        run(against(&cluster, home.path()).args(["submit", "x", "--on-failure", "panic"]));
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run(against(&cluster, home.path()).args([
        "submit",
        "x",
        "--plan",
        "/nonexistent/plan.json",
    ]));
    assert_eq!(code, 2);
    assert!(stderr.contains("--plan"), "{stderr}");
}
