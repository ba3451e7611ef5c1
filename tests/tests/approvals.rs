//! The approval broker ("needs you"): agents asking a person before they use a tool.
//!
//! Whole clusters (real nats-server, redis-server, coordinator and workers) running the real
//! Claude Code CLI against the fake Messages API (the only fake: the provider), which scripts
//! a `Bash` tool call; the builder role marks `Bash` for approval, and the CLI asks the
//! worker's permission-prompt server. Answers go through `orchctl` and the API.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Approval, ApprovalList, JobStatus, Task};
use orch_shared::event::EventKind;
use orch_shared::ids::JobId;
use orch_shared::job::{FailureReason, JobSpec};
use orch_shared::role::Role;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::{Cluster, Options, assert_completed, orchctl_against, run};
use orch_worker::agent::Events;
use orch_worker::approvals::Verdict;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// One agent's script and its places: a `tool` call (`Bash` for the CLI, `bash` for the native
/// loop) of `command` writing `word` into `proof.txt` in the workspace, `calls` times, then the
/// text `answer`.
struct Scene {
    dir: tempfile::TempDir,
    ws: tempfile::TempDir,
    proof: PathBuf,
    command: String,
    fake: FakeAnthropic,
}

async fn scene(tool: &str, command: &str, calls: usize, answer: &str) -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let proof = ws.path().join("proof.txt");
    let command = format!("{command} {}", proof.display());
    let mut script: Vec<Reply> = (0..calls)
        .map(|_| {
            Reply::tool_use(
                tool,
                json!({"command": command, "description": "write the proof"}),
            )
        })
        .collect();
    script.push(Reply::text(answer));
    let fake = FakeAnthropic::start(script).await;
    Scene {
        dir,
        ws,
        proof,
        command,
        fake,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bash_command_waits_for_a_person_and_runs_once_approved_through_orchctl() {
    let Scene {
        dir,
        ws,
        proof,
        command,
        fake,
    } = scene("Bash", "echo approved >", 1, "Wrote the proof file.").await;
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
    let Scene {
        dir,
        ws,
        proof,
        fake,
        ..
    } = scene("Bash", "echo denied >", 1, "I was not allowed to run it.").await;
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
    let Scene {
        dir,
        ws,
        proof,
        fake,
        ..
    } = scene("Bash", "echo late >", 1, "Nobody answered.").await;
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

/// The native tool loop asks the same broker for the tools its role marks `ask`; an answer
/// `--for task` allows the same command for the rest of the task without asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_tool_loop_asks_too_and_an_answer_for_the_task_is_not_asked_again() {
    let Scene {
        dir,
        ws,
        proof,
        command,
        fake,
    } = scene("bash", "echo native >>", 2, "Ran it twice.").await;
    let cluster = Cluster::start(claude_cluster_options(&fake, dir.path(), &[])).await;
    let task = cluster
        .submit(json!({
            "prompt": "append twice",
            "roles": ["builder"],
            "backend": "anthropic",
            "model": MODEL,
            "workspace": ws.path().display().to_string(),
        }))
        .await;
    let id = task.id.to_string();
    let request = pending(&cluster).await;
    assert_eq!(
        (request.tool.as_str(), request.summary.as_str()),
        ("Bash", command.as_str())
    );
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "approvals",
        "approve",
        &request.id,
        "--for",
        "task",
    ]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    assert_eq!(std::fs::read_to_string(&proof).unwrap(), "native\nnative\n");
    let events = cluster.events(&id, None).await;
    let asked = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::ApprovalRequested { .. }))
        .count();
    assert_eq!(asked, 1, "the second, granted call asked again");
}

/// A request written by a broker as a worker would for `job` (its task is `task`).
async fn broker(cluster: &Cluster, timeout: Duration) -> orch_worker::approvals::Broker {
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
    let state = orch_worker::state::State::connect(&redis).await.unwrap();
    orch_worker::approvals::Broker::new(state, timeout)
}

fn job_of(task: &Task) -> JobSpec {
    JobSpec::new(task.id, JobId::new(), Role::Builder, "build")
}

/// Thirty requests asked at once by three brokers (each on its own Redis connection, as three
/// workers are), each answered by two people racing (one approves, one denies): every request
/// is answered exactly once (one 200, one 409), and every agent gets the answer that won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_requests_from_three_workers_are_each_answered_once() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "p", "roles": ["builder"]}))
        .await;
    let mut asks = tokio::task::JoinSet::new();
    for w in 0..3 {
        let b = broker(&cluster, WAIT).await;
        for n in 0..10 {
            let (b, job) = (b.clone(), job_of(&task));
            asks.spawn(async move {
                let (events, _rx) = Events::new();
                let input = json!({"command": format!("make w{w}-n{n}")});
                let verdict = b
                    .ask(&job, "Bash", &input, &events, &CancellationToken::new())
                    .await;
                (format!("make w{w}-n{n}"), verdict)
            });
        }
    }
    // Answer every request as it shows up, two answers racing for each.
    let mut decided: HashMap<String, &'static str> = HashMap::new();
    let http = cluster.http().clone();
    let until = std::time::Instant::now() + WAIT;
    while decided.len() < 30 {
        assert!(
            std::time::Instant::now() < until,
            "{} of 30 requests answered\n{}",
            decided.len(),
            cluster.logs()
        );
        let (_, v) = cluster.get("/v1/approvals").await;
        let list: ApprovalList = serde_json::from_value(v).unwrap();
        for a in list.approvals.iter().filter(|a| a.state == "pending") {
            let post = |decision: &'static str| {
                let req = http
                    .post(format!("{}/v1/approvals/{}", cluster.url, a.id))
                    .bearer_auth(orch_tests::TOKEN)
                    .json(&json!({"decision": decision, "message": decision}));
                async move { (decision, req.send().await.unwrap().status()) }
            };
            let (x, y) = tokio::join!(post("approve"), post("deny"));
            let won: Vec<_> = [x, y]
                .into_iter()
                .filter(|(_, s)| *s == StatusCode::OK)
                .collect();
            assert_eq!(won.len(), 1, "{}: {x:?} {y:?}", a.id);
            assert!(
                [x.1, y.1].contains(&StatusCode::CONFLICT),
                "{}: {x:?} {y:?}",
                a.id
            );
            assert!(decided.insert(a.summary.clone(), won[0].0).is_none());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let verdicts = asks.join_all().await;
    assert_eq!(verdicts.len(), 30);
    for (command, verdict) in verdicts {
        match (decided[&command], verdict) {
            ("approve", Verdict::Allow) => {}
            ("deny", Verdict::Deny(m)) => assert!(m.contains("deny"), "{m}"),
            (d, v) => panic!("{command}: answered {d}, the agent got {v:?}"),
        }
    }
}

/// Bad input: unknown and answered requests, another tenant's request, malformed answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_unknown_answered_or_other_tenants_requests_are_refused() {
    let alpha = "alpha-token-0123456789";
    let beta = "beta-token-0123456789";
    let cluster = Cluster::start(Options {
        workers: 0,
        coordinator_args: vec![
            "--tenant".into(),
            format!("alpha={alpha}"),
            "--tenant".into(),
            format!("beta={beta}"),
        ],
        ..Options::default()
    })
    .await;
    let http = cluster.http().clone();
    let call = |token: &'static str, method: reqwest::Method, path: String, body: Value| {
        let req = http
            .request(method, format!("{}{path}", cluster.url))
            .bearer_auth(token)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let post = reqwest::Method::POST;
    let (status, task) = call(
        alpha,
        post.clone(),
        "/v1/tasks".into(),
        json!({"prompt": "alpha's work", "roles": ["builder"]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    let task: Task = serde_json::from_value(task).unwrap();
    let b = broker(&cluster, WAIT).await;
    let job = job_of(&task);
    let asking = tokio::spawn(async move {
        let (events, _rx) = Events::new();
        b.ask(
            &job,
            "Bash",
            &json!({"command": "npm install"}),
            &events,
            &CancellationToken::new(),
        )
        .await
    });
    let request = pending(&cluster).await;
    let path = format!("/v1/approvals/{}", request.id);

    // Another tenant neither sees nor answers it.
    let (status, v) = call(
        beta,
        reqwest::Method::GET,
        "/v1/approvals".into(),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["approvals"], json!([]), "beta sees alpha's request");
    let (status, v) = call(
        beta,
        post.clone(),
        path.clone(),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    // Its own tenant sees it.
    let (_, v) = call(
        alpha,
        reqwest::Method::GET,
        "/v1/approvals".into(),
        json!({}),
    )
    .await;
    assert_eq!(v["approvals"][0]["id"], request.id.as_str(), "{v}");

    // Malformed answers name the field.
    for (body, field) in [
        (json!({"decision": "maybe"}), "decision"),
        (json!({"decision": "approve", "scope": "forever"}), "scope"),
        (json!({"decision": "approve", "scope": "always"}), "pattern"),
        (json!({"decision": "deny", "scope": "task"}), "scope"),
        (json!({"decision": "approve", "colour": "red"}), "colour"),
    ] {
        let (status, v) = call(alpha, post.clone(), path.clone(), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{body}: {v}"
        );
    }
    let (status, v) = call(
        alpha,
        post.clone(),
        "/v1/approvals/0123456789abcdef".into(),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["code"], "not_found");
    // A malformed id is bad input, named, whatever the body.
    let (status, v) = call(
        alpha,
        post.clone(),
        "/v1/approvals/not-an-id".into(),
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().starts_with("id:"), "{v}");

    // Approved with `always` for alpha's `npm *`: answered once, then the rule answers.
    let (status, v) = call(
        alpha,
        post.clone(),
        path.clone(),
        json!({"decision": "approve", "scope": "always", "pattern": "npm *"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["grant"], "Bash(npm *)");
    assert_eq!(v["by"], "tenant:alpha");
    let (status, v) = call(
        alpha,
        post.clone(),
        path.clone(),
        json!({"decision": "deny"}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(asking.await.unwrap(), Verdict::Allow);

    let b = broker(&cluster, Duration::from_secs(1)).await;
    let (events, _rx) = Events::new();
    let again = b
        .ask(
            &job_of(&task),
            "Bash",
            &json!({"command": "npm test"}),
            &events,
            &CancellationToken::new(),
        )
        .await;
    assert_eq!(again, Verdict::Allow, "the granted rule did not answer");
    let other = b
        .ask(
            &job_of(&task),
            "Bash",
            &json!({"command": "rm -rf /"}),
            &events,
            &CancellationToken::new(),
        )
        .await;
    assert!(matches!(other, Verdict::Deny(_)), "{other:?}");

    // orchctl: an unknown request exits 1, a malformed id exits 2.
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "approvals",
        "approve",
        "0123456789abcdef",
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
    let (code, _, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["approvals", "deny", "../tasks"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid request id"), "{stderr}");
}

/// Every new request is POSTed to the webhook with its body signed (HMAC-SHA256 under the
/// configured secret), for chat tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_request_is_posted_to_the_webhook_signed() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "p", "roles": ["builder"]}))
        .await;
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;
    let seen: Seen = Default::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let sig = headers
                        .get(orch_worker::approvals::SIGNATURE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    seen.lock().unwrap().push((sig, body));
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let b = broker(&cluster, Duration::from_secs(1))
        .await
        .with_webhook(Some(orch_worker::approvals::Webhook {
            url,
            secret: orch_worker::config::Secret::new("hook-secret"),
            client: reqwest::Client::new(),
        }));
    let (events, _rx) = Events::new();
    let verdict = b
        .ask(
            &job_of(&task),
            "Bash",
            &json!({"command": "make deploy"}),
            &events,
            &CancellationToken::new(),
        )
        .await;
    assert!(matches!(verdict, Verdict::Deny(_)), "{verdict:?}");
    let (sig, body) = orch_tests::eventually(WAIT, || async {
        seen.lock()
            .unwrap()
            .first()
            .cloned()
            .ok_or_else(|| "the webhook got nothing".to_string())
    })
    .await;
    assert_eq!(
        sig,
        orch_shared::signature::sign("hook-secret", body.as_bytes())
    );
    assert_ne!(
        sig,
        orch_shared::signature::sign("another-secret", body.as_bytes())
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tool"], "Bash");
    assert_eq!(v["summary"], "make deploy");
    assert_eq!(v["task_id"], task.id.to_string());
    assert_eq!(v["state"], "pending");
    server.abort();
}

/// A malformed `ask_tools` rule stops the worker at start, naming the setting.
#[test]
fn a_malformed_ask_rule_is_refused_at_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, "[roles.builder]\nask_tools = [\"Bash(npm *\"]\n").unwrap();
    let out = std::process::Command::new(orch_tests::workspace_bin("orch-worker"))
        .args(["--config", &config.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("roles.builder.ask_tools") && stderr.contains("closing parenthesis"),
        "{stderr}"
    );
    std::fs::write(&config, "[approvals]\ntimeout = \"0s\"\n").unwrap();
    let out = std::process::Command::new(orch_tests::workspace_bin("orch-worker"))
        .args(["--config", &config.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("approvals.timeout"), "{stderr}");
    std::fs::write(
        &config,
        "[approvals]\nwebhook_url = \"https://chat.example/hook\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(orch_tests::workspace_bin("orch-worker"))
        .args(["--config", &config.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("approvals.webhook_secret"), "{stderr}");
}

/// A builder that may read files and must ask before `Bash`, on workers that park an agent
/// whose request is unanswered for a second.
fn parking_options(fake: &FakeAnthropic, dir: &Path) -> Options {
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        "[roles.builder]\nallowed_tools = [\"Read\", \"Glob\", \"Grep\", \"LS\"]\nask_tools = [\"Bash\"]\n",
    )
    .unwrap();
    Options {
        workers: 1,
        slots: 1,
        worker_env: claude_cluster_options(fake, dir, &[]).worker_env,
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--approval-park-after".into(),
            "1s".into(),
        ],
        ..Options::default()
    }
}

/// The scripted agent: a file read (step 1, checkpointed), then a `Bash` command that
/// needs a person; the agent resumed after parking asks for it again, then answers.
fn parking_script(command: &str) -> Vec<Reply> {
    let bash = Reply::tool_use(
        "Bash",
        json!({"command": command, "description": "write the proof"}),
    );
    vec![
        Reply::tool_use(
            "Read",
            json!({"file_path": format!("{}/README.md", orch_tests::fake_anthropic::CWD)}),
        ),
        bash.clone(),
        bash,
        Reply::text("## Summary\nDone.\n\n## Files\n- proof.txt"),
    ]
}

/// Waits until the job is parked for `request` (status `parked`, the request named, in
/// `GET /v1/tasks/{id}`) and no worker has a busy slot.
async fn wait_parked(cluster: &Cluster, task: &str, request: &str) {
    cluster
        .eventually(WAIT, || async {
            let job = cluster.task(task).await.jobs[0].clone();
            if job.status != JobStatus::Parked {
                return Err(format!("job {}", job.status.as_str()));
            }
            let parked = job.parked.clone().ok_or("parked without a reason")?;
            assert_eq!(parked.reason, "approval");
            assert_eq!(parked.approval.as_deref(), Some(request));
            let (_, v) = cluster.get("/v1/workers").await;
            let busy: u64 = v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["busy"].as_u64().unwrap())
                .sum();
            if busy == 0 {
                Ok(())
            } else {
                Err(format!("busy slots: {busy}"))
            }
        })
        .await;
}

fn started_on(events: &[(orch_shared::event::EventId, orch_shared::event::Event)]) -> Vec<String> {
    events
        .iter()
        .filter_map(|(_, e)| match &e.kind {
            EventKind::JobStarted { worker_id, .. } => Some(worker_id.0.clone()),
            _ => None,
        })
        .collect()
}

/// An agent waiting for a person longer than `park_after` is checkpointed and parked: its
/// slot is free and the provider hears nothing from it; approved through `orchctl`, it
/// resumes on another worker from its checkpoint, asks again, is answered at once from the
/// stored decision, runs the command and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_for_a_person_is_parked_and_resumes_on_another_worker_once_approved() {
    let dir = tempfile::tempdir().unwrap();
    let bare = orch_tests::origin(dir.path());
    let fake = FakeAnthropic::start(parking_script("echo approved > proof.txt")).await;
    let mut cluster = Cluster::start(parking_options(&fake, dir.path())).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "roles": ["builder"],
            "backend": "claude-code",
            "model": MODEL,
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .await;
    let id = task.id.to_string();
    let request = pending(&cluster).await;
    assert_eq!(request.summary, "echo approved > proof.txt");
    wait_parked(&cluster, &id, &request.id).await;
    let asked_before_park = fake.message_requests().len();
    assert_eq!(asked_before_park, 2, "the write, then the command");

    // The worker that ran it stops (at once: it holds nothing) and another starts; the job
    // lives in Redis only. Nobody has answered yet: the request is still pending.
    cluster.workers[0].signal(libc::SIGTERM);
    assert_eq!(
        cluster.workers[0].wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "{}",
        cluster.logs()
    );
    cluster.add_worker();
    cluster
        .eventually(WAIT, || async {
            let (_, v) = cluster.get("/v1/workers").await;
            let ids: Vec<&str> = v["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|w| w["id"].as_str())
                .collect();
            if ids.contains(&"worker-1") {
                Ok(())
            } else {
                Err(format!("workers: {ids:?}"))
            }
        })
        .await;
    let (_, v) = cluster.get("/v1/approvals").await;
    let list: ApprovalList = serde_json::from_value(v).unwrap();
    assert_eq!(list.approvals[0].state, "pending");
    assert_eq!(
        fake.message_requests().len(),
        asked_before_park,
        "a parked agent asked the provider"
    );

    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["tasks", "show", &id]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("parked (approval {}", request.id)),
        "{stdout}"
    );
    let (code, stdout, stderr) =
        run(orchctl_against(&cluster, home.path()).args(["approvals", "approve", &request.id]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");

    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    let job = &task.jobs[0];
    assert_eq!(job.parked, None);
    assert_eq!(job.attempt, 1, "parking burnt an attempt");
    assert_eq!(job.worker_id.as_ref().unwrap().0, "worker-1");
    let events = cluster.events(&id, None).await;
    assert_eq!(started_on(&events), ["worker-0", "worker-1"]);
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::JobParked { parked } if parked.approval.as_deref() == Some(request.id.as_str()))));
    let kinds: Vec<&str> = events.iter().map(|(_, e)| e.kind.name()).collect();
    assert!(
        events.iter().any(|(_, e)| matches!(&e.kind,
            EventKind::Resumed { from_step, from_worker, .. } if *from_step == 1 && from_worker == "worker-0")),
        "not resumed from the checkpoint of step 1: {kinds:?}\n{:#?}",
        events.iter().filter(|(_, e)| matches!(e.kind, EventKind::ResumeFailed { .. } | EventKind::Checkpointed { .. } | EventKind::ToolResult { .. })).collect::<Vec<_>>()
    );
    let commit = &job.git.as_ref().unwrap().commit;
    let files = orch_tests::git(&bare, &["ls-tree", "-r", "--name-only", commit]);
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        ["README.md", "proof.txt"]
    );
    let proof = orch_tests::git(&bare, &["show", &format!("{commit}:proof.txt")]);
    assert_eq!(proof, "approved");
    let requested = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::ApprovalRequested { .. }))
        .count();
    assert_eq!(requested, 1, "the resumed agent made a new request");
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::ApprovalAnswered { id, decision, by, .. }
            if *id == request.id && decision == "approved" && by == "admin")));
    // The read was not asked again: resumed after it, the agent asked for the command and
    // for the answer (the script's last two replies).
    assert_eq!(fake.message_requests().len(), 4);
}

/// Denied while parked: the job resumes, its agent gets the denial with the message, and
/// the job ends `needs_attention`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_parked_for_a_person_and_denied_ends_needing_attention() {
    let dir = tempfile::tempdir().unwrap();
    let bare = orch_tests::origin(dir.path());
    let fake = FakeAnthropic::start(parking_script("echo denied > proof.txt")).await;
    let cluster = Cluster::start(parking_options(&fake, dir.path())).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "roles": ["builder"],
            "backend": "claude-code",
            "model": MODEL,
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .await;
    let id = task.id.to_string();
    let request = pending(&cluster).await;
    wait_parked(&cluster, &id, &request.id).await;
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "approvals",
        "deny",
        &request.id,
        "--message",
        "use the fixture instead",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let task = cluster.wait_task(&id, WAIT).await;
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed, "{task:#?}");
    let error = job.error.as_ref().expect("the job says why");
    assert_eq!(
        error.reason,
        FailureReason::NeedsAttention,
        "{}",
        error.message
    );
    assert!(error.message.contains("Bash"), "{}", error.message);
    let told = tool_results(&fake);
    assert!(told.contains("use the fixture instead"), "{told}");
    let events = cluster.events(&id, None).await;
    assert_eq!(started_on(&events).len(), 2, "not parked and resumed");
}
