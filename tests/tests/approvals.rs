//! The approval broker ("needs you"): agents asking a person before they use a tool.
//!
//! Whole clusters (real nats-server, redis-server, coordinator and workers) running the real
//! Claude Code CLI against the fake Messages API (the only fake: the provider), which scripts
//! a `Bash` tool call; the builder role marks `Bash` for approval, and the CLI asks the
//! worker's permission-prompt server. Answers go through `orchctl` and the API.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Approval, ApprovalList, JobStatus, Task};
use orch_shared::event::EventKind;
use orch_shared::job::FailureReason;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::{Cluster, Options, assert_completed, orchctl_against, run};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MODEL: &str = "claude-sonnet-4-5";
const WAIT: Duration = Duration::from_secs(90);

/// A worker config whose builder may read, must ask before `Bash`, and has no other tool.
fn ask_config(dir: &Path) -> PathBuf {
    let path = dir.join("worker.toml");
    std::fs::write(
        &path,
        "[roles.builder]\nallowed_tools = [\"Read\", \"Glob\", \"Grep\", \"LS\"]\nask_tools = [\"Bash\"]\n",
    )
    .unwrap();
    path
}

fn claude_cluster_options(fake: &FakeAnthropic, dir: &Path, extra: &[&str]) -> Options {
    let mut worker_args = vec![
        "--config".into(),
        ask_config(dir).display().to_string(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
    ];
    worker_args.extend(extra.iter().map(|s| s.to_string()));
    Options {
        workers: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-approvals".into()),
            (
                "ORCH_CLAUDE_BIN".into(),
                orch_tests::claude_cli::claude_bin().display().to_string(),
            ),
        ],
        worker_args,
        ..Options::default()
    }
}

fn builder_task(ws: &Path) -> Value {
    json!({
        "prompt": "create the proof file",
        "roles": ["builder"],
        "backend": "claude-code",
        "model": MODEL,
        "workspace": ws.display().to_string(),
    })
}

/// The one pending request, once there is one.
async fn pending(cluster: &Cluster) -> Approval {
    cluster
        .eventually(WAIT, || async {
            let (status, v) = cluster.get("/v1/approvals").await;
            if status != StatusCode::OK {
                return Err(format!("{status} {v}"));
            }
            let list: ApprovalList = serde_json::from_value(v).unwrap();
            list.approvals
                .into_iter()
                .find(|a| a.state == "pending")
                .ok_or_else(|| "no pending approval request".to_string())
        })
        .await
}

/// The text of every tool result the agent sent the provider.
fn tool_results(fake: &FakeAnthropic) -> String {
    fake.message_requests()
        .iter()
        .map(|r| r.body.to_string())
        .filter(|b| b.contains("tool_result"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bash_command_waits_for_a_person_and_runs_once_approved_through_orchctl() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let proof = ws.path().join("proof.txt");
    let command = format!("echo approved > {}", proof.display());
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": command, "description": "write the proof"}),
        ),
        Reply::text("Wrote the proof file."),
    ])
    .await;
    let cluster = Cluster::start(claude_cluster_options(&fake, dir.path(), &[])).await;
    let task = cluster.submit(builder_task(ws.path())).await;
    let id = task.id.to_string();

    let request = pending(&cluster).await;
    assert_eq!(request.tool, "Bash");
    assert_eq!(request.summary, command);
    assert_eq!(request.task_id, id);
    assert_eq!(request.role, "builder");
    assert!(!proof.exists(), "the command ran before anyone approved it");

    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["approvals", "list"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&request.id) && stdout.contains("Bash"),
        "{stdout}"
    );

    let (code, stdout, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["approvals", "approve", &request.id]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("approved"), "{stdout}");

    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    assert_eq!(std::fs::read_to_string(&proof).unwrap(), "approved\n");

    // Answered once: a second answer is refused.
    let (code, _, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["approvals", "deny", &request.id]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("answered already"), "{stderr}");

    let events = cluster.events(&id, None).await;
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::ApprovalRequested { id, tool, .. } if *id == request.id && tool == "Bash")));
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::ApprovalAnswered { id, decision, by, .. }
            if *id == request.id && decision == "approved" && by == "admin")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_command_tells_the_agent_why_and_the_job_needs_attention() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let proof = ws.path().join("proof.txt");
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": format!("echo denied > {}", proof.display())}),
        ),
        Reply::text("I was not allowed to run it."),
    ])
    .await;
    let cluster = Cluster::start(claude_cluster_options(&fake, dir.path(), &[])).await;
    let home = tempfile::tempdir().unwrap();
    let mut follow = orchctl_against(&cluster, home.path());
    follow.args([
        "submit",
        "create the proof file",
        "--roles",
        "builder",
        "--backend",
        "claude-code",
        "--model",
        MODEL,
        "--workspace",
        &ws.path().display().to_string(),
        "--follow",
        "--output",
        "json",
    ]);
    let follower = std::thread::spawn(move || run(&mut follow));

    let request = pending(&cluster).await;
    let (code, _, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "approvals",
        "deny",
        &request.id,
        "--message",
        "use the fixture instead",
    ]));
    assert_eq!(code, 0, "{stderr}");

    let (code, stdout, stderr) = follower.join().unwrap();
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let task: Task = serde_json::from_str(&stdout).expect("--output json prints the task");
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed);
    let error = job.error.as_ref().expect("the job says why");
    assert_eq!(
        error.reason,
        FailureReason::NeedsAttention,
        "{}",
        error.message
    );
    assert!(error.message.contains("Bash"), "{}", error.message);
    assert!(!proof.exists(), "a denied command ran");
    let told = tool_results(&fake);
    assert!(told.contains("use the fixture instead"), "{told}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_answers_is_denied_at_its_deadline_and_the_agent_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let proof = ws.path().join("proof.txt");
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": format!("echo late > {}", proof.display())}),
        ),
        Reply::text("Nobody answered."),
    ])
    .await;
    // Without the sandbox: the CLI reaches the permission server on the worker's loopback.
    let cluster = Cluster::start(claude_cluster_options(
        &fake,
        dir.path(),
        &["--approval-timeout", "2s", "--sandbox", "off"],
    ))
    .await;
    let task = cluster.submit(builder_task(ws.path())).await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, WAIT).await;
    assert_eq!(task.jobs[0].status, JobStatus::Failed, "{task:#?}");
    assert!(!proof.exists());
    let told = tool_results(&fake);
    assert!(told.contains("nobody answered"), "{told}");

    let (_, v) = cluster.get("/v1/approvals").await;
    let list: ApprovalList = serde_json::from_value(v).unwrap();
    let answered = &list.approvals[0];
    assert_eq!(answered.state, "denied");
    assert_eq!(answered.by.as_deref(), Some("deadline"));
    // Past its deadline, a person's answer comes too late.
    let (status, v) = cluster
        .post(
            &format!("/v1/approvals/{}", answered.id),
            &json!({"decision": "approve"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
}
