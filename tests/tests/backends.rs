//! The agent backends against real remote sides: the `anthropic` and `openai` backends against
//! fake providers speaking the real streaming formats, the `claude-code` backend running the
//! real Claude Code CLI against the fake Messages API, and the `command` backend running real
//! programs. Nothing of ours is mocked: each test builds the worker's `Backends` from a loaded
//! config, exactly as the worker does.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::event::EventKind;
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::{Backend, FailureReason, JobKind, JobSpec, Outcome, Usage, Workspace};
use orch_shared::role::Role;
use orch_tests::agents::{run, run_with, worker_config};
use orch_tests::claude_cli::claude_bin;
use orch_tests::eventually;
use orch_tests::fake_anthropic::{self, Block, FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_worker::agent::backends::Backends;
use orch_worker::agent::pricing::{Price, PriceTable};
use orch_worker::agent::{Agent, Report};
use orch_worker::config::{CommandSettings, Config, PromptVia};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn job(role: Role, backend: Backend, prompt: &str) -> JobSpec {
    JobSpec {
        backend,
        ..JobSpec::new(TaskId::new(), JobId::new(), role, prompt)
    }
}

/// A worker config with its data under `dir`, talking to the fakes given.
fn config(dir: &Path, anthropic: Option<&str>, openai: Option<&str>) -> Config {
    let claude: Vec<OsString> = vec!["--claude-bin".into(), claude_bin().into()];
    let mut cfg = worker_config("backend-test", dir, anthropic, openai, &claude);
    // The CLI retries by itself: once is enough to see it, and keeps failures fast.
    cfg.backends.claude_code.max_retries = Some(1);
    cfg
}

fn failure(r: &Report) -> (FailureReason, String) {
    match &r.output.outcome {
        Outcome::Failure { reason, message } => (*reason, message.clone()),
        Outcome::Success => panic!("expected a failure, got success: {r:#?}"),
    }
}

fn assert_success(r: &Report, events: &[EventKind]) {
    assert!(
        r.output.outcome.is_success(),
        "expected success: {r:#?}\nevents: {events:#?}"
    );
}

fn price(model: &str, usage: &Usage) -> f64 {
    PriceTable::default().cost(Some(model), usage).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-9)
}

fn git_init(dir: &Path) {
    let ok = std::process::Command::new("sh")
        .args([
            "-c",
            "git init -q . && git config user.email t@t && git config user.name t \
             && echo seed > README.md && git add . && git commit -qm init",
        ])
        .current_dir(dir)
        .status()
        .expect("git runs")
        .success();
    assert!(ok, "git init failed in {}", dir.display());
}

// ---------------------------------------------------------------------------------------------
// anthropic

#[tokio::test]
async fn anthropic_streams_the_answer_and_reports_the_provider_usage_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let usage = Usage {
        input_tokens: 1500,
        output_tokens: 321,
        cache_creation_tokens: 200,
        cache_read_tokens: 4000,
    };
    // A tool this job does not have (an analyst on a scratch workspace gets none) is answered
    // with an error result, and the model answers on.
    let fake = FakeAnthropic::start([
        Reply::Message {
            blocks: vec![
                Block::Thinking("let me think".into()),
                Block::Text("Let me look.".into()),
                Block::ToolUse {
                    name: "Read".into(),
                    input: json!({"file_path": "src/parser.rs"}),
                },
            ],
            usage,
            stop_reason: Some("end_turn".into()),
        },
        Reply::Message {
            blocks: vec![Block::Text(
                "## Summary\nThe cache belongs in parser.rs.".into(),
            )],
            usage,
            stop_reason: None,
        },
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Analyst, Backend::Anthropic, "Analyze: add a cache");
    j.constraints = vec!["read only src/".into()];
    j.context =
        Some("## Context from the Planner Agent (previous step)\n### Summary\nplanned\n".into());
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(
        r.output.output,
        "## Summary\nThe cache belongs in parser.rs."
    );
    assert_eq!(r.backend, "anthropic");
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5"));
    // Usage is what the provider reported (input side from message_start, output from
    // message_delta); cost is the price table's for it, unrounded.
    assert_eq!(r.output.usage, fake.served_usage());
    assert!(close(
        r.output.cost_usd,
        price("claude-sonnet-4-5", &r.output.usage)
    ));
    let ctx = r.context.expect("context occupancy");
    assert_eq!((ctx.tokens, ctx.window), (1500 + 200 + 4000, 200_000));
    assert!(events.contains(&EventKind::Thinking));
    assert!(events.contains(&EventKind::Text {
        text: "## Summary\nThe cache belongs in parser.rs.".into()
    }));
    let call = events.iter().find_map(|e| match e {
        EventKind::ToolCall { name, input, .. } => Some((name.clone(), input.clone())),
        _ => None,
    });
    let (name, input) = call.expect("the tool_use block is reported");
    assert_eq!(name, "Read");
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        json!({"file_path": "src/parser.rs"})
    );
    assert!(events.iter().any(|e| matches!(e, EventKind::ToolResult { is_error: true, output, .. } if output.contains("no tools are available"))));
    assert!(
        matches!(events.last(), Some(EventKind::Usage { usage, .. }) if *usage == r.output.usage)
    );

    let req = &fake.message_requests()[0];
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(req.headers["x-api-key"], "test-key-anthropic");
    assert_eq!(req.headers["anthropic-version"], "2023-06-01");
    assert_eq!(req.body["stream"], json!(true));
    assert_eq!(req.body["model"], json!("claude-sonnet-4-5"));
    let system = req.body["system"][0]["text"].as_str().unwrap();
    assert_eq!(req.body["system"][0]["cache_control"]["type"], "ephemeral");
    assert!(system.starts_with("You are the ANALYST") && system.contains("## For Next Agent"));
    let prompt = req.body["messages"][0]["content"].as_str().unwrap();
    assert!(
        prompt.starts_with("Analyze: add a cache")
            && prompt.contains("- read only src/")
            && prompt.contains("### Summary\nplanned"),
        "{prompt}"
    );
}

#[tokio::test]
async fn anthropic_retries_honouring_retry_after_and_sums_the_usage_of_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        // A stream cut by an overloaded error after message_start: its input was billed.
        Reply::StreamError {
            error_type: "overloaded_error".into(),
            message: "Overloaded".into(),
            usage: Usage {
                input_tokens: 700,
                output_tokens: 0,
                cache_creation_tokens: 0,
                cache_read_tokens: 300,
            },
        },
        Reply::rate_limited(1),
        Reply::text("done").with_usage(800, 50, 10, 300),
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Reviewer, Backend::Anthropic, "Review it");
    j.model = Some("claude-haiku-4-5-20251001".into());
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "done");
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 3);
    let waited = reqs[2].at - reqs[1].at;
    assert!(
        waited >= Duration::from_millis(990),
        "retry-after: 1 was not honoured (waited {waited:?})"
    );
    assert_eq!(r.output.usage, fake.served_usage());
    assert_eq!(r.output.usage.input_tokens, 1500);
    assert!(close(
        r.output.cost_usd,
        price("claude-haiku-4-5", &r.output.usage)
    ));
    // Occupancy is the last request's, not the sum.
    assert_eq!(r.context.unwrap().tokens, 800 + 10 + 300);
}

#[tokio::test]
async fn anthropic_persistent_500_ends_as_a_retryable_failure_and_400_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let started = Instant::now();
    let (r, _) = run(&backends, &job(Role::Planner, Backend::Anthropic, "plan")).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::Network);
    assert!(reason.is_retryable());
    assert!(
        message.contains("500") && message.contains("after 3 attempts"),
        "{message}"
    );
    assert_eq!(fake.message_requests().len(), 3);
    assert!(started.elapsed() < Duration::from_secs(5));

    let fake = FakeAnthropic::start([Reply::status(400)]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let (r, _) = run(&backends, &job(Role::Planner, Backend::Anthropic, "plan")).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::BadRequest);
    assert!(message.contains("the request is not valid"), "{message}");
    assert_eq!(fake.message_requests().len(), 1);
}

#[tokio::test]
async fn anthropic_stops_promptly_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([Reply::text("late").after(Duration::from_secs(60))]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
    });
    let started = Instant::now();
    let (r, _) = run_with(
        &backends,
        &job(Role::Builder, Backend::Anthropic, "x"),
        cancel,
    )
    .await;
    assert_eq!(failure(&r).0, FailureReason::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// openai

#[tokio::test]
async fn openai_streams_chat_completions_with_usage_and_prices_it_from_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start([fake_openai::Reply::Answer {
        text: "## Summary\nLocal model answer.".into(),
        reasoning: Some("thinking...".into()),
        usage: fake_openai::ChatUsage {
            prompt_tokens: 900,
            completion_tokens: 77,
            cached_tokens: 500,
        },
        finish_reason: "stop".into(),
    }])
    .await;
    let mut cfg = config(dir.path(), None, Some(&fake.url));
    cfg.backends.openai.models.default = Some("qwen2.5-coder-7b-instruct".into());
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
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(
        &backends,
        &job(Role::Documenter, Backend::Openai, "Document it"),
    )
    .await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "## Summary\nLocal model answer.");
    assert_eq!(r.model.as_deref(), Some("qwen2.5-coder-7b-instruct"));
    let expected = Usage {
        input_tokens: 400,
        output_tokens: 77,
        cache_creation_tokens: 0,
        cache_read_tokens: 500,
    };
    assert_eq!(r.output.usage, expected);
    let served = fake.served_usage();
    assert_eq!(
        served.prompt_tokens,
        r.output.usage.input_tokens + r.output.usage.cache_read_tokens
    );
    let want_cost = (400.0 * 0.2 + 77.0 * 0.6 + 500.0 * 0.05) / 1e6;
    assert!(close(r.output.cost_usd, want_cost), "{}", r.output.cost_usd);
    let ctx = r.context.unwrap();
    assert_eq!((ctx.tokens, ctx.window), (900, 32_768));
    assert!(events.contains(&EventKind::Thinking));

    let req = &fake.requests()[0];
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(req.headers["authorization"], "Bearer test-key-openai");
    assert_eq!(req.body["stream"], json!(true));
    assert_eq!(req.body["stream_options"]["include_usage"], json!(true));
    assert_eq!(req.body["messages"][0]["role"], json!("system"));
    assert!(
        req.body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("You are the DOCUMENTER")
    );
    assert_eq!(req.body["messages"][1]["content"], json!("Document it"));
}

#[tokio::test]
async fn openai_retries_a_429_honouring_retry_after_and_needs_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start([
        fake_openai::Reply::rate_limited(1),
        fake_openai::Reply::status(503),
        fake_openai::Reply::text("ok").with_usage(100, 10, 0),
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), None, Some(&fake.url)));
    let mut j = job(Role::Builder, Backend::Openai, "x");
    j.model = Some("llama3.1:8b".into());
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(990));
    assert_eq!(r.output.usage.input_tokens, 100);
    // A local model with no price costs nothing.
    assert_eq!(r.output.cost_usd, 0.0);

    let (r, _) = run(&backends, &job(Role::Builder, Backend::Openai, "x")).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::BadRequest);
    assert!(message.contains("no model"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// claude-code, the real CLI against the fake Messages API

fn tool_results(events: &[EventKind]) -> Vec<(String, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            EventKind::ToolResult {
                output, is_error, ..
            } => Some((output.clone(), *is_error)),
            _ => None,
        })
        .collect()
}

fn tool_names(req: &Value) -> Vec<String> {
    req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn claude_code_answers_with_text_and_reports_the_result_usage_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([Reply::text(
        "## Summary\nAll mapped.\n\n## For Next Agent\nBuild it.",
    )
    .with_usage(2000, 150, 300, 5000)])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Analyst, Backend::ClaudeCode, "Analyze: the parser");
    j.model = Some("claude-sonnet-4-5".into());
    j.constraints = vec!["be brief".into()];
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(
        r.output.output,
        "## Summary\nAll mapped.\n\n## For Next Agent\nBuild it."
    );
    assert_eq!(r.backend, "claude-code");
    // Usage from the result line equals what the provider reported; cost is the CLI's own
    // total_cost_usd, which is the list price of that usage.
    assert_eq!(r.output.usage, fake.served_usage());
    assert!(r.output.cost_usd > 0.0);
    assert!(
        close(
            r.output.cost_usd,
            price("claude-sonnet-4-5", &r.output.usage)
        ),
        "{} vs {}",
        r.output.cost_usd,
        price("claude-sonnet-4-5", &r.output.usage)
    );
    let ctx = r.context.expect("context occupancy");
    assert_eq!((ctx.tokens, ctx.window), (2000 + 300 + 5000, 200_000));
    assert!(events.contains(&EventKind::Thinking));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EventKind::Text { text } if text.contains("All mapped")))
    );

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 1);
    let body = reqs[0].body.to_string();
    assert_eq!(reqs[0].body["model"], json!("claude-sonnet-4-5"));
    assert_eq!(reqs[0].headers["x-api-key"], "test-key-anthropic");
    assert!(
        body.contains("You are the ANALYST"),
        "the role prompt reaches the model"
    );
    assert!(body.contains("Analyze: the parser") && body.contains("- be brief"));
    let tools = tool_names(&reqs[0].body);
    for denied in ["Bash", "Write", "Edit"] {
        assert!(
            !tools.contains(&denied.to_string()),
            "an analyst was offered {denied}: {tools:?}"
        );
    }
}

#[tokio::test]
async fn claude_code_write_tool_creates_the_file_in_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    git_init(ws.path());
    let target = ws.path().join("src").join("cache.rs");
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Write",
            json!({"file_path": target.display().to_string(), "content": "pub struct Cache;\n"}),
        ),
        Reply::text("## Summary\nWrote the cache.\n\n## Files\n- src/cache.rs"),
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "Implement the cache");
    j.model = Some("claude-sonnet-4-5".into());
    j.workspace = Workspace::Local {
        path: ws.path().display().to_string(),
    };
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(
        std::fs::read_to_string(&target).expect("the CLI wrote the file"),
        "pub struct Cache;\n"
    );
    assert_eq!(r.output.files_written, ["src/cache.rs"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EventKind::ToolCall { name, input, .. }
        if name == "Write" && input.contains("cache.rs")))
    );
    assert!(
        tool_results(&events)
            .iter()
            .any(|(out, err)| !err && out.contains("cache.rs"))
    );
    assert_eq!(r.output.usage, fake.served_usage());
    // The builder may run shell commands.
    assert!(tool_names(&fake.message_requests()[0].body).contains(&"Bash".to_string()));
}

#[tokio::test]
async fn claude_code_refuses_bash_for_a_reviewer_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let marker = ws.path().join("ran.txt");
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": format!("touch {}", marker.display()), "description": "try"}),
        ),
        Reply::tool_use(
            "Write",
            json!({"file_path": ws.path().join("w.txt").display().to_string(), "content": "x"}),
        ),
        Reply::text("## Summary\nReviewed without running anything."),
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Reviewer, Backend::ClaudeCode, "Review the change");
    j.model = Some("claude-sonnet-4-5".into());
    j.workspace = Workspace::Local {
        path: ws.path().display().to_string(),
    };
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert!(!marker.exists(), "the reviewer's Bash call ran");
    assert!(
        !ws.path().join("w.txt").exists(),
        "the reviewer's Write call ran"
    );
    let results = tool_results(&events);
    assert_eq!(results.len(), 2, "{events:#?}");
    assert!(results.iter().all(|(_, is_error)| *is_error), "{results:?}");
    assert!(results[0].0.contains("Bash"), "{results:?}");
    assert!(r.output.files_written.is_empty());
    // The tools were never offered to the model either.
    let tools = tool_names(&fake.message_requests()[0].body);
    assert!(!tools.contains(&"Bash".to_string()) && !tools.contains(&"Write".to_string()));
}

#[tokio::test]
async fn claude_code_turn_limit_is_budget_exhausted_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use("Glob", json!({"pattern": "**/*.rs"})),
        Reply::text("never reached"),
    ])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "loop");
    j.model = Some("claude-sonnet-4-5".into());
    j.limits.max_turns = Some(1);
    let (r, _) = run(&backends, &j).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::BudgetExhausted);
    assert!(!reason.is_retryable());
    assert!(message.contains("turn"), "{message}");
    // What the turn cost is still reported.
    assert_eq!(r.output.usage, fake.served_usage());
    assert_eq!(fake.message_requests().len(), 1);
}

#[tokio::test]
async fn claude_code_retries_a_429_then_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([Reply::rate_limited(1), Reply::text("ok after a 429")]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Tester, Backend::ClaudeCode, "test it");
    j.model = Some("claude-sonnet-4-5".into());
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "ok after a 429");
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(990));
    assert_eq!(r.output.usage, fake.served_usage());
}

#[tokio::test]
async fn claude_code_persistent_500_is_a_retryable_network_failure() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "x");
    j.model = Some("claude-sonnet-4-5".into());
    let (r, _) = run(&backends, &j).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::Network, "{message}");
    assert!(reason.is_retryable());
    assert!(message.contains("500"), "{message}");
    // CLAUDE_CODE_MAX_RETRIES=1: the first request and one retry.
    assert_eq!(fake.message_requests().len(), 2);
    assert_eq!(r.output.cost_usd, 0.0);
}

#[tokio::test]
async fn claude_code_overloaded_and_bad_requests_get_their_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start_with_fallback([], Reply::status(529)).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "x");
    j.model = Some("claude-sonnet-4-5".into());
    let (r, _) = run(&backends, &j).await;
    assert_eq!(failure(&r).0, FailureReason::Overloaded, "{r:#?}");

    let fake = FakeAnthropic::start_with_fallback([], Reply::status(400)).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let (r, _) = run(&backends, &j).await;
    assert_eq!(failure(&r).0, FailureReason::BadRequest, "{r:#?}");
    // The CLI does not retry a 400 with backoff; it only tries a few variants of the request
    // (without some beta features) at once.
    assert!(fake.message_requests().len() <= 8);
}

#[tokio::test]
async fn claude_code_planner_gets_read_only_tools_and_answers_json() {
    let dir = tempfile::tempdir().unwrap();
    let plan = r#"{"complexity":"simple","rationale":"one file","workflow":[{"agent_role":"BUILDER","scope":"do it","depends_on":[]}]}"#;
    let fake = FakeAnthropic::start([Reply::text(plan)]).await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Planner, Backend::ClaudeCode, "plan: add a flag");
    j.kind = JobKind::Plan;
    j.model = Some("claude-sonnet-4-5".into());
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert!(orch_shared::plan::parse_answer(&r.output.output, true).is_ok());
    let req = &fake.message_requests()[0];
    assert!(
        req.body
            .to_string()
            .contains("You are the workflow planner")
    );
    let tools = tool_names(&req.body);
    assert!(tools.contains(&"Read".to_string()), "{tools:?}");
    for denied in ["Bash", "Write", "Edit", "WebFetch"] {
        assert!(
            !tools.contains(&denied.to_string()),
            "the planner was offered {denied}"
        );
    }
}

/// Processes whose working directory is under `dir`, as `(pid, argv[0])`.
fn processes_under(dir: &Path) -> Vec<(String, String)> {
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd"))
            && cwd.starts_with(dir)
        {
            let cmd = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
            out.push((
                entry.file_name().to_string_lossy().to_string(),
                cmd.split('\0').next().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn claude_code_cancel_stops_the_cli_and_its_tools_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // The builder runs a command that never ends through the Bash tool (which starts its shell
    // in a process group of its own); then the job is cancelled.
    let fake = FakeAnthropic::start([Reply::tool_use(
        "Bash",
        json!({"command": "tail -f /dev/null", "description": "wait", "timeout": 120000}),
    )])
    .await;
    let backends = Backends::from_config(&config(dir.path(), Some(&fake.url), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "x");
    j.model = Some("claude-sonnet-4-5".into());
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let cancelled_at = std::sync::Mutex::new(None);
    let watcher = async {
        eventually(Duration::from_secs(30), || async {
            match processes_under(dir.path())
                .iter()
                .any(|(_, cmd)| cmd == "tail")
            {
                true => Ok(()),
                false => Err("the tool never ran".to_string()),
            }
        })
        .await;
        *cancelled_at.lock().unwrap() = Some(Instant::now());
        c.cancel();
    };
    let ((r, events), ()) = tokio::join!(run_with(&backends, &j, cancel), watcher);
    assert_eq!(failure(&r).0, FailureReason::Cancelled);
    let took = cancelled_at.lock().unwrap().unwrap().elapsed();
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EventKind::ToolCall { name, .. } if name == "Bash"))
    );
    // What the agent spent before it was stopped is still reported.
    assert!(r.output.usage.input_tokens > 0);
    eventually(Duration::from_secs(3), || async {
        match processes_under(dir.path()) {
            left if left.is_empty() => Ok(()),
            left => Err(format!("processes survived the cancel: {left:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn claude_code_refuses_a_workspace_the_worker_cannot_see() {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::from_config(&config(dir.path(), Some("http://127.0.0.1:9"), None));
    let mut j = job(Role::Builder, Backend::ClaudeCode, "x");
    j.workspace = Workspace::Local {
        path: "/nonexistent/orch-workspace".into(),
    };
    let (r, _) = run(&backends, &j).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::BadRequest);
    assert!(
        message.contains("/nonexistent/orch-workspace") && message.contains("not visible"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// command

fn command_config(dir: &Path, script: &str, prompt: PromptVia) -> Config {
    let mut cfg = config(dir, None, None);
    cfg.backends.command = Some(CommandSettings {
        program: "sh".into(),
        args: vec!["-c".into(), script.into(), "agent".into()],
        prompt,
        models: Default::default(),
        env: BTreeMap::from([("AGENT_FLAVOUR".to_string(), "test".to_string())]),
        pass_env: vec![],
    });
    cfg
}

#[tokio::test]
async fn command_runs_a_program_with_the_prompt_and_reports_changed_files() {
    let dir = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    git_init(ws.path());
    let cfg = command_config(
        dir.path(),
        "cat > prompt.txt; echo \"$ORCH_ROLE $AGENT_FLAVOUR\" > env.txt; printf '## Summary\\ndone by a command\\n'",
        PromptVia::Stdin,
    );
    let backends = Backends::from_config(&cfg);
    let mut j = job(Role::Documenter, Backend::Command, "Write the docs");
    j.workspace = Workspace::Local {
        path: ws.path().display().to_string(),
    };
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "## Summary\ndone by a command");
    let prompt = std::fs::read_to_string(ws.path().join("prompt.txt")).unwrap();
    assert!(prompt.starts_with("You are the DOCUMENTER") && prompt.ends_with("Write the docs"));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("env.txt")).unwrap(),
        "documenter test\n"
    );
    assert_eq!(r.output.files_written, ["env.txt", "prompt.txt"]);
    assert_eq!(r.output.usage.total(), 0);

    // The prompt as the last argument instead.
    let cfg = command_config(dir.path(), "printf '%s' \"$1\" | tail -c 9", PromptVia::Arg);
    let (r, _) = run(
        &Backends::from_config(&cfg),
        &job(Role::Builder, Backend::Command, "the task"),
    )
    .await;
    assert_eq!(r.output.output, "the task");
}

#[tokio::test]
async fn command_failure_is_an_agent_error_with_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = command_config(
        dir.path(),
        "echo partial; echo 'model not found' >&2; exit 3",
        PromptVia::Stdin,
    );
    let (r, _) = run(
        &Backends::from_config(&cfg),
        &job(Role::Builder, Backend::Command, "x"),
    )
    .await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::AgentError);
    assert!(
        message.contains("exit status: 3") && message.contains("model not found"),
        "{message}"
    );
}

#[tokio::test]
async fn command_cancel_kills_the_program_and_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let cfg = command_config(
        dir.path(),
        &format!(
            "sleep 60 & echo $! > {p}; sleep 60 & echo $! >> {p}; wait",
            p = pids.display()
        ),
        PromptVia::Stdin,
    );
    let backends = Backends::from_config(&cfg);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let p = pids.clone();
    tokio::spawn(async move {
        let both = orch_tests::poll_until(Duration::from_secs(4), || async {
            match std::fs::read_to_string(&p).is_ok_and(|s| s.lines().count() == 2) {
                true => Ok(()),
                false => Err(()),
            }
        });
        // Cancelled either way: a program that never started both is a failure below.
        let _ = both.await;
        c.cancel();
    });
    let started = Instant::now();
    let (r, _) = run_with(
        &backends,
        &job(Role::Builder, Backend::Command, "x"),
        cancel,
    )
    .await;
    assert_eq!(failure(&r).0, FailureReason::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(6));
    let pids = std::fs::read_to_string(&pids).unwrap();
    eventually(Duration::from_secs(3), || async {
        for pid in pids.lines() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if !(stat.is_empty() || stat.contains(") Z ")) {
                return Err(format!("background process {pid} survived"));
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_worker_default_backend_runs_the_jobs_that_name_sim() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([Reply::text("real answer")]).await;
    let mut cfg = config(dir.path(), Some(&fake.url), None);
    cfg.default_backend = Some(Backend::Anthropic);
    let backends = Backends::from_config(&cfg);
    let j = job(Role::Builder, Backend::Sim, "x");
    assert_eq!(backends.backend_for(&j), "anthropic");
    let (r, events) = run(&backends, &j).await;
    assert_success(&r, &events);
    assert_eq!(r.output.output, "real answer");
    assert_eq!(r.output.usage, fake_anthropic::default_usage());
}

/// Never lie: the CLI ends a turn whose tool calls were refused with `subtype: success`; the
/// job says the agent needs attention and names what it was denied.
#[tokio::test]
async fn claude_code_denied_a_tool_ends_needs_attention_naming_the_denials() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use("Bash", json!({"command": "npm install left-pad"})),
        Reply::text("## Summary\nI could not install the package."),
    ])
    .await;
    // The documenter is offered Bash (not disallowed) but not allowed it: `dontAsk` refuses.
    let file = dir.path().join("roles.toml");
    std::fs::write(
        &file,
        "[roles.documenter]\ndisallowed_tools = [\"WebFetch\"]\n",
    )
    .unwrap();
    let flags: Vec<OsString> = vec![
        "--claude-bin".into(),
        claude_bin().into(),
        "--config".into(),
        file.into(),
    ];
    let mut cfg = worker_config("denials", dir.path(), Some(&fake.url), None, &flags);
    cfg.backends.claude_code.max_retries = Some(1);
    let backends = Backends::from_config(&cfg);
    let mut j = job(Role::Documenter, Backend::ClaudeCode, "install left-pad");
    j.model = Some("claude-sonnet-4-5".into());
    let (r, events) = run(&backends, &j).await;
    let (reason, message) = failure(&r);
    assert_eq!(reason, FailureReason::NeedsAttention, "{events:#?}");
    assert!(message.contains("Bash (npm install left-pad)"), "{message}");
    // The agent's answer is kept for the person who looks at it.
    assert!(r.output.output.contains("could not install"), "{r:#?}");
}
