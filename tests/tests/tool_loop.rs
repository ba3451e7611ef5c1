//! The native tool loop of the `anthropic` and `openai` backends against fake providers that
//! script one reply per request (tool calls, then a final answer): the tools really run in a
//! real workspace, real shell commands start and are killed, and the worker's `Backends` is
//! built from a loaded config exactly as the worker builds it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::event::EventKind;
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::{Backend, FailureReason, JobSpec, Outcome, Usage, Workspace};
use orch_shared::role::Role;
use orch_tests::agents::{run, run_with, worker_config};
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_tests::{Cluster, Options, assert_completed, eventually};
use orch_worker::agent::Report;
use orch_worker::agent::backends::Backends;
use orch_worker::agent::pricing::{Price, PriceTable};
use orch_worker::config::Config;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const OPENAI_MODEL: &str = "qwen2.5-coder-7b-instruct";

/// A job of `role` on `backend` working in the local directory `dir`.
fn job(role: Role, backend: Backend, dir: &Path) -> JobSpec {
    JobSpec {
        backend,
        workspace: Workspace::Local {
            path: dir.display().to_string(),
        },
        ..JobSpec::new(TaskId::new(), JobId::new(), role, "Do the task")
    }
}

/// A worker config with its data under `data`, talking to the fakes given; the openai model
/// priced.
fn config(data: &Path, anthropic: Option<&str>, openai: Option<&str>) -> Config {
    let mut cfg = worker_config("tool-loop-test", data, anthropic, openai, &[]);
    cfg.backends.openai.models.default = Some(OPENAI_MODEL.into());
    let mut prices = BTreeMap::new();
    prices.insert(
        "qwen2.5-coder".to_string(),
        Price {
            input: 0.2,
            output: 0.6,
            cache_write: None,
            cache_read: Some(0.05),
            context_window: Some(32_768),
        },
    );
    cfg.prices = PriceTable::with_overrides(&prices).unwrap();
    cfg
}

fn assert_success(r: &Report, events: &[EventKind]) {
    assert!(
        r.output.outcome.is_success(),
        "expected success: {r:#?}\nevents: {events:#?}"
    );
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-9)
}

/// `(name, is_error, output)` of every tool call, in order.
fn tool_rounds(events: &[EventKind]) -> Vec<(String, bool, String)> {
    let mut names = BTreeMap::new();
    let mut out = vec![];
    for e in events {
        match e {
            EventKind::ToolCall { call_id, name, .. } => {
                names.insert(call_id.clone(), name.clone());
            }
            EventKind::ToolResult {
                call_id,
                output,
                is_error,
            } => out.push((
                names.get(call_id).cloned().unwrap_or_default(),
                *is_error,
                output.clone(),
            )),
            _ => {}
        }
    }
    out
}

/// The tool results an Anthropic request carries in its last message: `(content, is_error)`.
fn anthropic_results(body: &Value) -> Vec<(String, bool)> {
    let last = body["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(last["role"], "user");
    last["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert_eq!(b["type"], "tool_result");
            (
                b["content"].as_str().unwrap().to_string(),
                b["is_error"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The `tool` messages at the end of an OpenAI request.
fn openai_results(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .take_while(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

fn write_edit_test() -> [(&'static str, Value); 3] {
    [
        (
            "write_file",
            json!({"path": "src/answer.sh", "content": "echo 41\n"}),
        ),
        (
            "edit_file",
            json!({"path": "src/answer.sh", "old_string": "41", "new_string": "42"}),
        ),
        (
            "bash",
            json!({"command": "test \"$(sh src/answer.sh)\" = 42 && echo TESTS PASS"}),
        ),
    ]
}

fn assert_wrote_edited_and_tested(dir: &Path, r: &Report, events: &[EventKind]) {
    assert_success(r, events);
    assert_eq!(
        std::fs::read_to_string(dir.join("src/answer.sh")).unwrap(),
        "echo 42\n"
    );
    let rounds = tool_rounds(events);
    let names: Vec<&str> = rounds.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["write_file", "edit_file", "bash"], "{rounds:?}");
    assert!(rounds.iter().all(|(_, err, _)| !err), "{rounds:?}");
    assert_eq!(rounds[2].2, "TESTS PASS\n");
    assert!(
        r.output
            .files_written
            .contains(&"src/answer.sh".to_string()),
        "{:?}",
        r.output.files_written
    );
    assert_eq!(r.output.output, "Done: the tests pass.");
}

#[tokio::test]
async fn anthropic_writes_edits_and_runs_the_tests_through_its_tools() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut script: Vec<Reply> = write_edit_test()
        .into_iter()
        .map(|(n, v)| Reply::tool_use(n, v))
        .collect();
    script.push(Reply::text("Done: the tests pass.").with_usage(300, 20, 0, 1_000));
    let fake = FakeAnthropic::start(script).await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let (r, events) = run(
        &backends,
        &job(Role::Builder, Backend::Anthropic, work.path()),
    )
    .await;
    assert_wrote_edited_and_tested(work.path(), &r, &events);

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 4);
    let tools: Vec<&str> = reqs[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        tools.contains(&"bash") && tools.contains(&"edit_file"),
        "{tools:?}"
    );
    assert_eq!(
        anthropic_results(&reqs[3].body),
        [("TESTS PASS\n".to_string(), false)]
    );
    assert!(
        anthropic_results(&reqs[1].body)[0]
            .0
            .starts_with("wrote 8 bytes")
    );
    // Prompt caching: breakpoints on the system prompt, the last tool and the last block.
    assert_eq!(
        reqs[1].body["system"][0]["cache_control"]["type"],
        "ephemeral"
    );
    let last_tool = reqs[1].body["tools"].as_array().unwrap().last().unwrap();
    assert_eq!(last_tool["cache_control"]["type"], "ephemeral");
    let last = &reqs[1].body["messages"][2]["content"][0];
    assert_eq!(last["cache_control"]["type"], "ephemeral");
    assert!(
        reqs[2].body["messages"][2]["content"][0]
            .get("cache_control")
            .is_none()
    );
    // Each request carries the whole conversation: prompt, then a call and its result per round.
    assert_eq!(reqs[3].body["messages"].as_array().unwrap().len(), 7);

    // Cost: the usage the fake reported, summed over the four requests, priced.
    assert_eq!(r.output.usage, fake.served_usage());
    let want = PriceTable::default()
        .cost(Some("claude-sonnet-4-5"), &fake.served_usage())
        .unwrap();
    assert!(
        close(r.output.cost_usd, want),
        "{} vs {want}",
        r.output.cost_usd
    );
    assert!(
        matches!(events.last(), Some(EventKind::Usage { usage, .. }) if *usage == r.output.usage)
    );
    let ctx = r.context.unwrap();
    assert_eq!(ctx.tokens, 1_300);
    // The session is the whole conversation with its tool rounds.
    let session: Vec<Value> = serde_json::from_slice(&r.session.unwrap().bytes).unwrap();
    assert_eq!(session.len(), 8);
    assert_eq!(session[7]["content"], "Done: the tests pass.");
}

#[tokio::test]
async fn openai_writes_edits_and_runs_the_tests_through_its_tools() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut script: Vec<fake_openai::Reply> = write_edit_test()
        .into_iter()
        .map(|(n, v)| fake_openai::Reply::tool_calls([(n, v)]))
        .collect();
    script.push(fake_openai::Reply::text("Done: the tests pass.").with_usage(900, 77, 500));
    let fake = FakeOpenAi::start(script).await;
    let backends = Backends::from_config(&config(data.path(), None, Some(&fake.url)));
    let (r, events) = run(&backends, &job(Role::Builder, Backend::Openai, work.path())).await;
    assert_wrote_edited_and_tested(work.path(), &r, &events);

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0].body["tools"][0]["type"], "function");
    assert_eq!(openai_results(&reqs[3].body), ["TESTS PASS\n"]);
    let call = &reqs[3].body["messages"][6];
    assert_eq!(call["role"], "assistant");
    assert_eq!(call["tool_calls"][0]["function"]["name"], "bash");

    // Cost: the fake's usage summed over the requests, with cached prompt tokens as cache reads.
    let served = fake.served_usage();
    let usage = Usage {
        input_tokens: served.prompt_tokens - served.cached_tokens,
        output_tokens: served.completion_tokens,
        cache_creation_tokens: 0,
        cache_read_tokens: served.cached_tokens,
    };
    assert_eq!(r.output.usage, usage);
    let want = (usage.input_tokens as f64 * 0.2
        + usage.output_tokens as f64 * 0.6
        + usage.cache_read_tokens as f64 * 0.05)
        / 1e6;
    assert!(
        close(r.output.cost_usd, want),
        "{} vs {want}",
        r.output.cost_usd
    );
}

#[tokio::test]
async fn parallel_tool_calls_of_one_response_all_get_their_results_in_order() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "alpha\n").unwrap();
    std::fs::write(work.path().join("b.txt"), "beta\n").unwrap();
    let calls = || {
        [
            ("read_file", json!({"path": "a.txt"})),
            ("read_file", json!({"path": "b.txt"})),
            ("search", json!({"pattern": "bet"})),
            ("list_files", json!({"pattern": "*.txt"})),
        ]
    };
    let fake = FakeAnthropic::start([Reply::tool_uses(calls()), Reply::text("Read both.")]).await;
    let ofake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls(calls()),
        fake_openai::Reply::text("Read both."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), Some(&ofake.url)));
    let want = [
        "     1\talpha\n",
        "     1\tbeta\n",
        "b.txt:1:beta",
        "a.txt\nb.txt",
    ];
    let (r, events) = run(
        &backends,
        &job(Role::Reviewer, Backend::Anthropic, work.path()),
    )
    .await;
    assert_success(&r, &events);
    let got: Vec<String> = anthropic_results(&fake.message_requests()[1].body)
        .into_iter()
        .map(|(text, err)| {
            assert!(!err);
            text
        })
        .collect();
    assert_eq!(got, want);
    let (r, events) = run(
        &backends,
        &job(Role::Reviewer, Backend::Openai, work.path()),
    )
    .await;
    assert_success(&r, &events);
    assert_eq!(openai_results(&ofake.requests()[1].body), want);
}

#[tokio::test]
async fn paths_outside_the_workspace_are_refused_and_reported_to_the_model() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "top secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), work.path().join("link")).unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_uses([
            ("read_file", json!({"path": "../secret"})),
            ("read_file", json!({"path": "/etc/passwd"})),
            ("read_file", json!({"path": "link/secret"})),
            (
                "write_file",
                json!({"path": "link/planted", "content": "x"}),
            ),
        ]),
        Reply::text("Could not read them."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let (r, events) = run(
        &backends,
        &job(Role::Builder, Backend::Anthropic, work.path()),
    )
    .await;
    assert_success(&r, &events);
    let results = anthropic_results(&fake.message_requests()[1].body);
    assert_eq!(results.len(), 4);
    for (text, is_error) in &results {
        assert!(*is_error, "{text}");
        assert!(text.contains("outside the workspace"), "{text}");
        assert!(
            !text.contains("top secret") && !text.contains("root:"),
            "{text}"
        );
    }
    assert!(!outside.path().join("planted").exists());
    assert!(tool_rounds(&events).iter().all(|(_, err, _)| *err));
}

#[tokio::test]
async fn a_reviewer_is_denied_write_file_and_sees_why() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use("write_file", json!({"path": "fix.rs", "content": "x"})),
        Reply::tool_use("bash", json!({"command": "touch ran"})),
        Reply::text("I may only read; the change looks right."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let (r, events) = run(
        &backends,
        &job(Role::Reviewer, Backend::Anthropic, work.path()),
    )
    .await;
    // Never lie: an agent refused what it asked for ends needing attention, naming it.
    match &r.output.outcome {
        Outcome::Failure { reason, message } => {
            assert_eq!(*reason, FailureReason::NeedsAttention, "{events:#?}");
            assert!(message.contains("write_file, bash"), "{message}");
        }
        Outcome::Success => panic!("a denied tool call ended as success: {r:#?}"),
    }
    assert_eq!(r.output.output, "I may only read; the change looks right.");
    let reqs = fake.message_requests();
    let offered: Vec<&str> = reqs[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, ["read_file", "list_files", "search"]);
    for (req, tool) in [(&reqs[1], "write_file"), (&reqs[2], "bash")] {
        let (text, is_error) = &anthropic_results(&req.body)[0];
        assert!(*is_error);
        assert!(
            text.contains(&format!(
                "tool `{tool}` is not allowed for the reviewer role"
            )),
            "{text}"
        );
    }
    assert!(!work.path().join("fix.rs").exists() && !work.path().join("ran").exists());
    let rounds = tool_rounds(&events);
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|(_, err, _)| *err), "{rounds:?}");
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

/// Waits until the shell the `sleeper` command started and its background child (their pids in
/// `shell.pid` and `bg.pid` under `work`) are gone.
async fn commands_are_gone(work: &Path) {
    for f in ["shell.pid", "bg.pid"] {
        let pid = std::fs::read_to_string(work.join(f)).unwrap();
        eventually(Duration::from_secs(5), || {
            let pid = pid.clone();
            async move {
                if gone(&pid) {
                    Ok(())
                } else {
                    Err(format!("{f} {pid} still runs"))
                }
            }
        })
        .await;
    }
}

/// A shell command that records its pid and a background child's pid, then waits forever.
fn sleeper() -> String {
    "echo $$ > shell.pid; sleep 300 & echo $! > bg.pid; wait".into()
}

#[tokio::test]
async fn a_shell_command_past_its_timeout_is_killed_with_what_it_started() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use("bash", json!({"command": sleeper(), "timeout_secs": 1})),
        Reply::text("It hung."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let started = Instant::now();
    let (r, events) = run(
        &backends,
        &job(Role::Tester, Backend::Anthropic, work.path()),
    )
    .await;
    assert_success(&r, &events);
    assert!(started.elapsed() < Duration::from_secs(20));
    let (text, is_error) = &anthropic_results(&fake.message_requests()[1].body)[0];
    assert!(*is_error);
    assert!(text.contains("timed out after 1s"), "{text}");
    commands_are_gone(work.path()).await;
}

#[tokio::test]
async fn cancel_during_a_tool_kills_the_command_and_ends_cancelled() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start([fake_openai::Reply::tool_calls([(
        "bash",
        json!({"command": sleeper()}),
    )])])
    .await;
    let backends = Backends::from_config(&config(data.path(), None, Some(&fake.url)));
    let cancel = CancellationToken::new();
    let bg = work.path().join("bg.pid");
    let c = cancel.clone();
    let watcher = tokio::spawn(async move {
        eventually(Duration::from_secs(30), || {
            let bg = bg.clone();
            async move {
                match std::fs::read_to_string(&bg) {
                    Ok(s) if !s.trim().is_empty() => Ok(()),
                    _ => Err("the command has not started its child yet"),
                }
            }
        })
        .await;
        c.cancel();
    });
    let started = Instant::now();
    let (r, _events) = run_with(
        &backends,
        &job(Role::Builder, Backend::Openai, work.path()),
        cancel,
    )
    .await;
    watcher.await.unwrap();
    match &r.output.outcome {
        Outcome::Failure { reason, .. } => assert_eq!(*reason, FailureReason::Cancelled),
        o => panic!("expected cancelled, got {o:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(fake.requests().len(), 1);
    commands_are_gone(work.path()).await;
}

#[tokio::test]
async fn a_model_still_calling_tools_at_the_turn_limit_exhausts_its_budget() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake =
        FakeAnthropic::start_with_fallback([], Reply::tool_use("list_files", json!({}))).await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let mut j = job(Role::Analyst, Backend::Anthropic, work.path());
    j.limits.max_turns = Some(3);
    let (r, _events) = run(&backends, &j).await;
    match &r.output.outcome {
        Outcome::Failure { reason, message } => {
            assert_eq!(*reason, FailureReason::BudgetExhausted);
            assert!(message.contains("turn limit (3)"), "{message}");
        }
        o => panic!("expected budget_exhausted, got {o:?}"),
    }
    assert_eq!(fake.message_requests().len(), 3);
    assert_eq!(r.output.usage, fake.served_usage());
}

#[tokio::test]
async fn a_429_mid_loop_is_retried_after_its_retry_after_and_the_loop_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "alpha\n").unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use("read_file", json!({"path": "a.txt"})),
        Reply::rate_limited(1),
        Reply::text("It says alpha."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), Some(&fake.url), None));
    let (r, events) = run(
        &backends,
        &job(Role::Analyst, Backend::Anthropic, work.path()),
    )
    .await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "It says alpha.");
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 3);
    // The retry waited what the server asked and sent the same conversation again.
    assert!(reqs[2].at - reqs[1].at >= Duration::from_secs(1));
    assert_eq!(reqs[1].body["messages"], reqs[2].body["messages"]);
    assert_eq!(anthropic_results(&reqs[2].body)[0].0, "     1\talpha\n");
    assert_eq!(r.output.usage, fake.served_usage());
}

/// Runs `script` with sh in `dir`, failing the test when it fails.
fn sh(dir: &Path, script: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_task_on_openai_builds_with_real_tools_and_a_reviewer_reads_the_work() {
    let dir = tempfile::tempdir().unwrap();
    sh(
        dir.path(),
        "git init -q --bare -b main origin.git && mkdir seed && cd seed && git init -q -b main \
         && echo '# Project' > README.md && git add . \
         && git -c user.name=seed -c user.email=seed@localhost commit -qm init \
         && git push -q ../origin.git main",
    );
    let bare = dir.path().join("origin.git");
    let fake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([(
            "write_file",
            json!({"path": "src/hello.txt", "content": "hello from the builder\n"}),
        )]),
        fake_openai::Reply::text("## Summary\nBuilt src/hello.txt."),
        fake_openai::Reply::tool_calls([("read_file", json!({"path": "src/hello.txt"}))]),
        fake_openai::Reply::text("## Summary\nReady."),
    ])
    .await;
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "[prices.\"qwen2.5-coder\"]\ninput = 0.2\noutput = 0.6\ncache_read = 0.05\n",
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        worker_env: vec![
            ("OPENAI_BASE_URL".into(), fake.url.clone()),
            ("OPENAI_API_KEY".into(), "test-key-openai".into()),
        ],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "add a greeting",
            "roles": ["builder", "reviewer"],
            "backend": "openai",
            "model": OPENAI_MODEL,
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(90))
        .await;
    assert_completed(&cluster, &task);
    let [builder, reviewer] = &task.jobs[..] else {
        panic!("two jobs: {task:#?}")
    };
    assert_eq!(builder.files_written, ["src/hello.txt"]);
    assert!(reviewer.files_written.is_empty());
    let branch = task.branch.clone().expect("a task branch");
    assert_eq!(
        sh(&bare, &format!("git show {branch}:src/hello.txt")),
        "hello from the builder"
    );
    // The reviewer read the builder's file from its own clone.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(
        openai_results(&reqs[3].body),
        ["     1\thello from the builder\n"]
    );
    // Cost: the fake's reported usage over the four requests, priced.
    let served = fake.served_usage();
    let want = ((served.prompt_tokens - served.cached_tokens) as f64 * 0.2
        + served.completion_tokens as f64 * 0.6
        + served.cached_tokens as f64 * 0.05)
        / 1e6;
    assert_eq!(
        task.usage.total(),
        served.prompt_tokens + served.completion_tokens
    );
    assert!(close(task.cost_usd, want), "{} vs {want}", task.cost_usd);
}

#[tokio::test]
async fn near_a_full_window_the_results_already_seen_are_elided() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "alpha\n").unwrap();
    // The openai model's window is 32,768 tokens: the second request fills 30,000 of it.
    let fake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([("read_file", json!({"path": "a.txt"}))]),
        fake_openai::Reply::tool_calls([("list_files", json!({}))]).with_usage(30_000, 10, 0),
        fake_openai::Reply::text("Done."),
    ])
    .await;
    let backends = Backends::from_config(&config(data.path(), None, Some(&fake.url)));
    let (r, events) = run(&backends, &job(Role::Analyst, Backend::Openai, work.path())).await;
    assert_success(&r, &events);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    // The second request still had the first result whole; the third has it elided and the
    // newest result whole.
    assert_eq!(openai_results(&reqs[1].body), ["     1\talpha\n"]);
    let messages = reqs[2].body["messages"].as_array().unwrap();
    assert_eq!(
        messages[3]["content"],
        "[tool result elided to save context: 13 bytes]"
    );
    assert_eq!(openai_results(&reqs[2].body), ["a.txt"]);
    assert_eq!(r.context.unwrap().window, 32_768);
}

#[tokio::test]
async fn near_a_full_window_the_earlier_rounds_are_compacted_into_a_summary() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "alpha\n").unwrap();
    // The openai model's window is 32,768 tokens: the third request fills 31,000 of it, past
    // the 0.9 compaction threshold even after eliding the results already seen.
    let fake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([("read_file", json!({"path": "a.txt"}))]),
        fake_openai::Reply::tool_calls([("list_files", json!({}))]),
        fake_openai::Reply::tool_calls([("search", json!({"pattern": "alp"}))])
            .with_usage(31_000, 10, 0),
        fake_openai::Reply::text("SUMMARY: a.txt says alpha; it is the only file.")
            .with_usage(31_100, 300, 30_000),
        fake_openai::Reply::text("Done.").with_usage(1_500, 5, 0),
    ])
    .await;
    let mut cfg = config(data.path(), None, Some(&fake.url));
    cfg.tool_loop.keep_rounds = 1;
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(&backends, &job(Role::Analyst, Backend::Openai, work.path())).await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "Done.");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 5);

    // The fourth request asks for a summary of the conversation so far (the same prefix, so a
    // provider's prompt cache serves it).
    let asked = reqs[3].body["messages"].as_array().unwrap();
    let last = asked.last().unwrap();
    assert_eq!(last["role"], "user");
    assert!(
        last["content"].as_str().unwrap().contains("summary"),
        "{last}"
    );
    assert_eq!(asked[1]["content"], reqs[0].body["messages"][1]["content"]);

    // The next request carries the prompt with the summary, then only the latest round whole.
    let sent = reqs[4].body["messages"].as_array().unwrap();
    let roles: Vec<&str> = sent.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool"]);
    let first = sent[1]["content"].as_str().unwrap();
    assert!(first.starts_with("Do the task"), "{first}");
    assert!(
        first.contains("SUMMARY: a.txt says alpha; it is the only file."),
        "{first}"
    );
    assert_eq!(sent[2]["tool_calls"][0]["function"]["name"], "search");
    assert!(
        sent[3]["content"]
            .as_str()
            .unwrap()
            .starts_with("a.txt:1:alpha"),
        "{}",
        sent[3]
    );
    let text = reqs[4].body["messages"].to_string();
    assert!(
        !text.contains("read_file") && !text.contains("list_files"),
        "{text}"
    );

    // The compaction is an event with the context before and after it, and the summary's
    // request is billed like any other.
    let compacted: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            EventKind::Compacted {
                tokens_before,
                tokens_after,
                rounds,
            } => Some((*tokens_before, *tokens_after, *rounds)),
            _ => None,
        })
        .collect();
    assert_eq!(compacted, [(31_000, Some(1_500), 2)]);
    let served = fake.served_usage();
    let usage = Usage {
        input_tokens: served.prompt_tokens - served.cached_tokens,
        output_tokens: served.completion_tokens,
        cache_creation_tokens: 0,
        cache_read_tokens: served.cached_tokens,
    };
    assert_eq!(usage.output_tokens, 42 * 2 + 10 + 300 + 5);
    assert_eq!(r.output.usage, usage);
    let want = (usage.input_tokens as f64 * 0.2
        + usage.output_tokens as f64 * 0.6
        + usage.cache_read_tokens as f64 * 0.05)
        / 1e6;
    assert!(
        close(r.output.cost_usd, want),
        "{} vs {want}",
        r.output.cost_usd
    );
    assert_eq!(r.context.unwrap().tokens, 1_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_runs_its_builder_on_openai_and_its_reviewer_on_anthropic() {
    let dir = tempfile::tempdir().unwrap();
    sh(
        dir.path(),
        "git init -q --bare -b main origin.git && mkdir seed && cd seed && git init -q -b main \
         && echo '# Project' > README.md && git add . \
         && git -c user.name=seed -c user.email=seed@localhost commit -qm init \
         && git push -q ../origin.git main",
    );
    let bare = dir.path().join("origin.git");
    let openai = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([(
            "write_file",
            json!({"path": "src/hello.txt", "content": "hello from the builder\n"}),
        )]),
        fake_openai::Reply::text("## Summary\nBuilt src/hello.txt."),
    ])
    .await;
    let anthropic = FakeAnthropic::start([
        Reply::tool_use("read_file", json!({"path": "src/hello.txt"})),
        Reply::text("## Summary\nReviewed: ready.").with_usage(700, 55, 0, 1_200),
    ])
    .await;
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "[prices.\"qwen2.5-coder\"]\ninput = 0.2\noutput = 0.6\ncache_read = 0.05\n\
         [prices.\"claude-review\"]\ninput = 3\noutput = 15\ncache_write = 3.75\ncache_read = 0.3\n",
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        worker_env: vec![
            ("OPENAI_BASE_URL".into(), openai.url.clone()),
            ("OPENAI_API_KEY".into(), "test-key-openai".into()),
            ("ANTHROPIC_BASE_URL".into(), anthropic.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-anthropic".into()),
        ],
        ..Options::default()
    })
    .await;
    let body = json!({
        "prompt": "add a greeting",
        "roles": ["builder", "reviewer"],
        "backends": {"builder": "openai", "reviewer": "anthropic"},
        "models": {"builder": OPENAI_MODEL, "reviewer": "claude-review"},
        "repo": bare.display().to_string(),
        "ref": "main",
    });

    // The dry run shows each step's backend and model.
    let (status, dry) = cluster.post("/v1/tasks/dry-run", &body).await;
    assert_eq!(status, 200, "{dry}");
    let steps: Vec<(&str, &str, &str)> = dry["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["role"].as_str().unwrap(),
                s["backend"].as_str().unwrap(),
                s["model"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("builder", "openai", OPENAI_MODEL),
            ("reviewer", "anthropic", "claude-review")
        ]
    );

    let task = cluster.submit(body).await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(90))
        .await;
    assert_completed(&cluster, &task);
    let [builder, reviewer] = &task.jobs[..] else {
        panic!("two jobs: {task:#?}")
    };
    assert_eq!(builder.files_written, ["src/hello.txt"]);
    assert_eq!(builder.model.as_deref(), Some(OPENAI_MODEL));
    assert_eq!(reviewer.model.as_deref(), Some("claude-review"));
    let branch = task.branch.clone().expect("a task branch");
    assert_eq!(
        sh(&bare, &format!("git show {branch}:src/hello.txt")),
        "hello from the builder"
    );

    // Each fake saw only its own step: the builder's two requests, the reviewer's two (which
    // read the builder's file from its own clone).
    let built = openai.requests();
    assert_eq!(built.len(), 2);
    assert!(built.iter().all(|r| r.body["model"] == OPENAI_MODEL));
    let reviewed = anthropic.message_requests();
    assert_eq!(reviewed.len(), 2);
    assert!(reviewed.iter().all(|r| r.body["model"] == "claude-review"));
    assert_eq!(
        anthropic_results(&reviewed[1].body),
        [("     1\thello from the builder\n".to_string(), false)]
    );

    // Each step priced at its own model's prices.
    let o = openai.served_usage();
    let builder_cost = ((o.prompt_tokens - o.cached_tokens) as f64 * 0.2
        + o.completion_tokens as f64 * 0.6
        + o.cached_tokens as f64 * 0.05)
        / 1e6;
    let a = anthropic.served_usage();
    let reviewer_cost = (a.input_tokens as f64 * 3.0
        + a.output_tokens as f64 * 15.0
        + a.cache_creation_tokens as f64 * 3.75
        + a.cache_read_tokens as f64 * 0.3)
        / 1e6;
    assert!(
        close(builder.cost_usd, builder_cost),
        "{} vs {builder_cost}",
        builder.cost_usd
    );
    assert!(
        close(reviewer.cost_usd, reviewer_cost),
        "{} vs {reviewer_cost}",
        reviewer.cost_usd
    );
    assert!(close(task.cost_usd, builder_cost + reviewer_cost));
    assert_eq!(reviewer.usage, a);
}
