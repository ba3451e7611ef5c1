//! Real agent backends on a real cluster: tasks submitted with `backend: anthropic` run on
//! workers that talk to a fake Anthropic Messages API (the only fake: the provider), with an
//! LLM planner, retries inside a job, and the task's token and cost sums checked against what
//! the provider reported.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::JobStatus;
use orch_shared::event::EventKind;
use orch_shared::job::{JobKind, Usage};
use orch_shared::role::Role;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::{Cluster, Options, assert_completed};
use orch_worker::agent::pricing::PriceTable;
use serde_json::json;
use std::time::Duration;

const MODEL: &str = "claude-sonnet-4-5";

fn worker_env(fake: &FakeAnthropic) -> Vec<(String, String)> {
    vec![
        ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
        ("ANTHROPIC_API_KEY".into(), "test-key-cluster".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_task_counts_exactly_the_tokens_and_cost_the_provider_reported() {
    let plan = r#"{"complexity": "medium", "rationale": "three steps",
        "workflow": [
            {"agent_role": "ANALYST", "scope": "map the parser", "depends_on": []},
            {"agent_role": "BUILDER", "scope": "add the cache", "depends_on": [0]},
            {"agent_role": "REVIEWER", "scope": "review the cache", "depends_on": [1]}],
        "skip_reasoning": "no tester for this"}"#;
    let fake = FakeAnthropic::start([
        // The planner.
        Reply::text(plan).with_usage(3100, 220, 0, 0),
        // The analyst: rate limited once (retry-after: 1 s), then its answer.
        Reply::rate_limited(1),
        Reply::text(
            "## Summary\nThe parser re-reads tokens.\n\n## Key Findings\n- no cache yet\n\n## For Next Agent\nCache tokens in parser.rs",
        )
        .with_usage(1800, 400, 600, 0),
        // The builder: a stream cut by an overloaded error (billed), then its answer.
        Reply::StreamError {
            error_type: "overloaded_error".into(),
            message: "Overloaded".into(),
            usage: Usage {
                input_tokens: 2500,
                output_tokens: 0,
                cache_creation_tokens: 0,
                cache_read_tokens: 600,
            },
        },
        Reply::text("## Summary\nAdded the cache.\n\n## Files\n- parser.rs")
            .with_usage(2500, 900, 0, 600),
        // The reviewer.
        Reply::text("## Summary\nThe cache is correct.").with_usage(2900, 300, 100, 600),
    ])
    .await;
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_env: worker_env(&fake),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "add a cache to the parser",
            "backend": "anthropic",
            "model": MODEL,
            "planner": "llm",
        }))
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(60)).await;
    assert_completed(&cluster, &task);
    assert_eq!(fake.remaining(), 0, "every scripted reply was used");

    // The plan came from the planner agent.
    assert_eq!(task.plan_source, "llm", "{task:#?}");
    let roles: Vec<(Role, JobKind)> = task.jobs.iter().map(|j| (j.role, j.kind)).collect();
    assert_eq!(
        roles,
        [
            (Role::Planner, JobKind::Plan),
            (Role::Analyst, JobKind::Agent),
            (Role::Builder, JobKind::Agent),
            (Role::Reviewer, JobKind::Agent),
        ]
    );
    assert!(task.jobs.iter().all(|j| j.status == JobStatus::Succeeded));
    assert_eq!(
        task.jobs[3].output.as_deref(),
        Some("## Summary\nThe cache is correct.")
    );

    // Tokens: the task's sum is exactly the provider's, kind by kind (the retried requests'
    // billed tokens included); each job's is its own requests'.
    let served = fake.served_usage();
    assert_eq!(task.usage, served);
    let jobs_sum = task.jobs.iter().fold(Usage::default(), |mut acc, j| {
        acc.add(&j.usage);
        acc
    });
    assert_eq!(jobs_sum, served);
    assert_eq!(
        task.jobs[2].usage,
        Usage {
            input_tokens: 5000,
            output_tokens: 901,
            cache_creation_tokens: 0,
            cache_read_tokens: 1200,
        },
        "the builder's cut stream and its answer"
    );
    // Cost: the list price of exactly those tokens, unrounded.
    let want = PriceTable::default().cost(Some(MODEL), &served).unwrap();
    assert!(
        (task.cost_usd - want).abs() < 1e-9,
        "task cost {} != {want}",
        task.cost_usd
    );

    // Forward context: the builder's prompt carried the analyst's hand-over.
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 6);
    let builder_prompt = reqs[4].body["messages"][0]["content"].as_str().unwrap();
    assert!(
        builder_prompt.contains("Cache tokens in parser.rs"),
        "{builder_prompt}"
    );
    assert!(
        reqs[2].at - reqs[1].at >= Duration::from_millis(990),
        "retry-after ignored"
    );
    assert!(
        reqs.iter()
            .all(|r| r.headers.get("x-api-key").map(String::as_str) == Some("test-key-cluster"))
    );

    // The event log carries the agents' text and each attempt's final figures.
    let events = cluster.events(&id, None).await;
    let finished: Vec<(Usage, f64)> = events
        .iter()
        .filter_map(|(_, e)| match &e.kind {
            EventKind::JobFinished {
                usage, cost_usd, ..
            } => Some((*usage, *cost_usd)),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 4);
    let logged = finished.iter().fold(Usage::default(), |mut acc, (u, _)| {
        acc.add(u);
        acc
    });
    assert_eq!(logged, served);
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::Text { text } if text.contains("Added the cache"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_keeps_failing_ends_the_task_with_a_retryable_reason_after_the_attempts() {
    // Every request fails with 529: each job attempt gives up after its own retries, and the
    // coordinator retries the job (max_attempts 2) before failing it.
    let fake = FakeAnthropic::start_with_fallback([], Reply::status(529)).await;
    let mut cfg_env = worker_env(&fake);
    cfg_env.push(("ORCH_LOG".into(), "info".into()));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "[backends.anthropic]\nmax_attempts = 2\nretry_min_delay = \"20ms\"\nretry_max_delay = \"50ms\"\n",
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_env: cfg_env,
        worker_args: vec!["--config".into(), config.display().to_string()],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(
            json!({"prompt": "x", "roles": ["builder"], "backend": "anthropic", "max_attempts": 2}),
        )
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(60)).await;
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed, "{task:#?}");
    assert_eq!(job.attempt, 2);
    // Two job attempts × two requests each.
    assert_eq!(fake.message_requests().len(), 4);
    let events = cluster.events(&id, None).await;
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::JobRetrying { reason, .. } if reason.as_str() == "overloaded")));
}

/// Processes whose working directory is under `dir`.
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd"))
            && cwd.starts_with(dir)
        {
            out.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                cwd.display()
            ));
        }
    }
    out
}

fn claude_worker(fake: &FakeAnthropic, data_dir: &std::path::Path) -> Options {
    let mut env = worker_env(fake);
    env.push((
        "ORCH_CLAUDE_BIN".into(),
        orch_tests::claude_cli::claude_bin().display().to_string(),
    ));
    Options {
        workers: 1,
        worker_env: env,
        worker_args: vec!["--data-dir".into(), data_dir.display().to_string()],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_task_writes_into_its_workspace_and_reports_the_cli_cost() {
    let data = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let file = ws.path().join("NOTES.md");
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Write",
            json!({"file_path": file.display().to_string(), "content": "# Notes\n"}),
        )
        .with_usage(4000, 120, 2000, 0),
        Reply::text("## Summary\nWrote NOTES.md.\n\n## Files\n- NOTES.md")
            .with_usage(300, 60, 0, 6000),
    ])
    .await;
    let cluster = Cluster::start(claude_worker(&fake, data.path())).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the notes",
            "roles": ["documenter"],
            "backend": "claude-code",
            "model": MODEL,
            "workspace": ws.path().display().to_string(),
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await;
    assert_completed(&cluster, &task);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# Notes\n");
    let job = &task.jobs[0];
    assert_eq!(job.files_written, ["NOTES.md"]);
    assert_eq!(
        job.output.as_deref(),
        Some("## Summary\nWrote NOTES.md.\n\n## Files\n- NOTES.md")
    );
    // The CLI's own figures: tokens as the provider reported them, cost its total_cost_usd
    // (the list price of those tokens).
    assert_eq!(task.usage, fake.served_usage());
    let want = PriceTable::default()
        .cost(Some(MODEL), &task.usage)
        .unwrap();
    assert!(
        (task.cost_usd - want).abs() < 1e-9,
        "{} != {want}",
        task.cost_usd
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_job_that_times_out_leaves_no_process_behind() {
    let data = tempfile::tempdir().unwrap();
    // The builder starts a long shell command through the CLI's Bash tool; the job times out
    // while it runs. The runner drops the agent then: the CLI and the shell it started must go.
    let fake = FakeAnthropic::start([Reply::tool_use(
        "Bash",
        // (The CLI refuses a bare long `sleep`.)
        json!({"command": "tail -f /dev/null", "description": "wait", "timeout": 120000}),
    )])
    .await;
    let cluster = Cluster::start(claude_worker(&fake, data.path())).await;
    let task = cluster
        .submit(json!({
            "prompt": "hang", "roles": ["builder"], "backend": "claude-code", "model": MODEL,
            "job_timeout_ms": 4000, "max_attempts": 1,
        }))
        .await;
    let id = task.id.to_string();
    // The CLI and its shell run in a scratch workspace under the worker's data directory.
    let tail_runs = || {
        processes_under(data.path()).iter().any(|p| {
            std::fs::read_to_string(format!(
                "/proc/{}/cmdline",
                p.split(' ').next().unwrap_or("")
            ))
            .is_ok_and(|c| c.starts_with("tail\0"))
        })
    };
    cluster
        .eventually(Duration::from_secs(30), || async {
            match tail_runs() {
                true => Ok(()),
                false => Err(format!(
                    "the agent's shell command never started: {:?}",
                    processes_under(data.path())
                )),
            }
        })
        .await;
    let task = cluster.wait_task(&id, Duration::from_secs(30)).await;
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed, "{task:#?}");
    assert_eq!(
        job.error.as_ref().map(|e| e.reason.as_str()),
        Some("timeout"),
        "{task:#?}"
    );
    cluster
        .eventually(Duration::from_secs(5), || async {
            match processes_under(data.path()) {
                left if left.is_empty() => Ok(()),
                left => Err(format!("processes survived the timeout: {left:?}")),
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_a_default_backend_run_tasks_that_name_none_on_it() {
    // What `orchctl local up --backend anthropic` starts: workers with --default-backend.
    let fake = FakeAnthropic::start([Reply::text("## Summary\nA real answer.")]).await;
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_env: worker_env(&fake),
        worker_args: vec!["--default-backend".into(), "anthropic".into()],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "say something", "roles": ["analyst"]}))
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(30)).await;
    assert_completed(&cluster, &task);
    assert_eq!(
        task.jobs[0].output.as_deref(),
        Some("## Summary\nA real answer.")
    );
    assert_eq!(task.usage, fake.served_usage());
    let events = cluster.events(&id, None).await;
    assert!(events.iter().any(|(_, e)| matches!(&e.kind,
        EventKind::JobStarted { backend, .. } if backend == "anthropic")));
}
