//! The web dashboard in a real browser: each test starts a real cluster with `sim` agents and
//! runs one scenario of `tests/browser/dashboard.test.mjs` (Debian's `chromium` driven by
//! `playwright-core`) against it. Screenshots of every page go to
//! `target/test-artifacts/dashboard/`.
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci` in `tests/browser` (`scripts/deps.sh` installs
//! them); a missing one fails the test with what to run, never skips it.

use orch_shared::api::TaskStatus;
use orch_tests::{Cluster, Options, TOKEN};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// Runs one browser scenario against `cluster`; panics with the script's output and the
/// cluster's logs when it fails.
async fn run_scenario(cluster: &Cluster, scenario: &str) {
    let root = workspace_root();
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (scripts/deps.sh does)"
    );
    let chromium =
        std::env::var("ORCH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's `chromium` (scripts/deps.sh does)"
    );
    let artifacts = root.join("target/test-artifacts/dashboard");
    let started = Instant::now();
    let mut cmd = Command::new("node");
    cmd.arg("dashboard.test.mjs")
        .arg(scenario)
        .current_dir(&browser_dir)
        .env("ORCH_URL", &cluster.url)
        .env("ORCH_TOKEN", TOKEN)
        .env("ORCH_ARTIFACTS", &artifacts)
        .env("ORCH_CHROMIUM", &chromium);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join the browser run")
        .expect("run node (is it installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "{stdout}{stderr}browser scenario `{scenario}` took {:?}",
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "browser scenario `{scenario}` failed ({}); screenshots in {}\n{stdout}\n{stderr}\n{}",
        output.status,
        artifacts.display(),
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_refuses_without_a_token() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_submits_a_task_and_watches_its_steps_finish_live() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_cancels_a_running_task() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "cancel").await;
    let (_, v) = cluster.get("/v1/tasks?status=cancelled").await;
    assert_eq!(
        v["tasks"].as_array().map(Vec::len),
        Some(1),
        "the task the page cancelled is cancelled in the API: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_filters_history_and_charts_costs() {
    let cluster = Cluster::start(Options::default()).await;
    let prompts = [
        "analyze the parser and build a cache for it",
        "write docs for the CLI",
        "fix the login crash",
    ];
    let mut ids = vec![];
    for prompt in prompts {
        ids.push(cluster.submit(json!({ "prompt": prompt })).await.id);
    }
    for id in ids {
        let task = cluster
            .wait_task(&id.to_string(), Duration::from_secs(60))
            .await;
        assert_eq!(task.status, TaskStatus::Completed, "{}", cluster.logs());
    }
    run_scenario(&cluster, "history").await;
}
