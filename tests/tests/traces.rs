//! Traces on a real cluster: a coordinator and a worker exporting over OTLP/HTTP to the test
//! receiver ([`orch_tests::otlp`]); one submitted task is one connected trace, from the submit's
//! HTTP span through each job's dispatch (its context in the job's NATS headers) to the
//! worker's job and agent spans, and its trace id is on the task and in the services' logs.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::TaskStatus;
use orch_tests::otlp::{Receiver, Span};
use orch_tests::{Cluster, Options};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The batch processors send every 100 ms instead of every 5 s.
fn fast_export() -> (String, String) {
    ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())
}

/// The spans named `name` from `service`, by their `job_id` attribute.
fn by_job<'a>(spans: &'a [Span], service: &str, name: &str) -> BTreeMap<String, &'a Span> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .filter_map(|s| Some((s.attributes.get("job_id")?.clone(), s)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_connected_trace_across_coordinator_and_worker() {
    let receiver = Receiver::start().await;
    let cluster = Cluster::start(Options {
        workers: 1,
        // The coordinator through its flag, the worker through the standard variable.
        coordinator_args: vec!["--otlp-endpoint".into(), receiver.endpoint()],
        coordinator_env: vec![fast_export()],
        worker_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
            fast_export(),
        ],
        ..Options::default()
    })
    .await;
    let submitted = cluster
        .submit(json!({"prompt": "build it", "roles": ["analyst", "builder"]}))
        .await;
    let trace_id = submitted.trace_id.clone().expect("the task's trace id");
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{trace_id}"
    );
    let id = submitted.id.to_string();
    let done = cluster.wait_task(&id, Duration::from_secs(30)).await;
    assert_eq!(done.status, TaskStatus::Completed, "{}", cluster.logs());
    assert_eq!(done.trace_id.as_deref(), Some(trace_id.as_str()));
    let (_, shown) = cluster.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(shown["trace_id"], json!(trace_id));
    let jobs: Vec<String> = done.jobs.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(jobs.len(), 2);

    // Every span of the task arrives: the submit, and per job its dispatch, the worker's job
    // and its agent.
    let spans = cluster
        .eventually(Duration::from_secs(20), || async {
            let spans = receiver.trace(&trace_id);
            let dispatched = by_job(&spans, "orch-coordinator", "dispatch");
            let ran = by_job(&spans, "orch-worker", "job");
            let agents = spans.iter().filter(|s| s.name == "agent").count();
            let all = jobs
                .iter()
                .all(|j| dispatched.contains_key(j) && ran.contains_key(j));
            match all && agents == jobs.len() {
                true => Ok(spans),
                false => Err(format!(
                    "the trace is incomplete so far: {spans:#?}\nall spans: {:#?}",
                    receiver.spans()
                )),
            }
        })
        .await;
    assert_eq!(receiver.rejected(), 0);

    // One root: the coordinator's span of the submit request.
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    let root = roots[0];
    assert_eq!(
        (root.service.as_str(), root.name.as_str()),
        ("orch-coordinator", "POST /v1/tasks")
    );
    assert_eq!(root.attributes["http.response.status_code"], "201");
    // Connected: every other span's parent is in the trace.
    for s in &spans {
        assert!(
            s.parent_span_id.is_empty() || spans.iter().any(|p| p.span_id == s.parent_span_id),
            "span {} ({}) has a parent outside the trace: {spans:#?}",
            s.name,
            s.service
        );
    }
    // The links: submit → dispatch (coordinator) → job (worker) → agent (worker).
    let dispatched = by_job(&spans, "orch-coordinator", "dispatch");
    let ran = by_job(&spans, "orch-worker", "job");
    for job in &jobs {
        let dispatch = dispatched[job];
        let run = ran[job];
        assert_eq!(dispatch.parent_span_id, root.span_id, "{spans:#?}");
        assert_eq!(run.parent_span_id, dispatch.span_id, "{spans:#?}");
        assert_eq!(run.attributes["task_id"], id);
        let agent = spans
            .iter()
            .find(|s| s.name == "agent" && s.parent_span_id == run.span_id)
            .unwrap_or_else(|| panic!("no agent span under job {job}: {spans:#?}"));
        assert_eq!(agent.service, "orch-worker");
    }
    // The task's jobs are in no other trace.
    let elsewhere: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id != trace_id && s.attributes.get("task_id") == Some(&id))
        .collect();
    assert!(elsewhere.is_empty(), "{elsewhere:#?}");

    // The trace id is in the coordinator's and the worker's log lines about the task.
    let logs = cluster.logs();
    let with_id: Vec<&str> = logs.lines().filter(|l| l.contains(&trace_id)).collect();
    assert!(
        with_id.iter().any(|l| l.contains("task accepted")),
        "no coordinator log line with the trace id:\n{logs}"
    );
    assert!(
        with_id.iter().any(|l| l.contains("job finished")),
        "no worker log line with the trace id:\n{logs}"
    );
}

/// The Claude Code CLI's own spans join the task's trace: the worker hands it the agent span as
/// `TRACEPARENT` with the OTLP endpoint (sandbox off: inside the sandbox the agent reaches no
/// host address but through the proxy's allowlist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claude_code_cli_s_spans_join_the_task_s_trace_under_its_agent_span() {
    use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
    let receiver = Receiver::start().await;
    let fake = FakeAnthropic::start([Reply::text("## Summary\nNothing to change.")]).await;
    let cluster = Cluster::start(Options {
        workers: 1,
        coordinator_args: vec!["--otlp-endpoint".into(), receiver.endpoint()],
        coordinator_env: vec![fast_export()],
        worker_args: vec!["--sandbox".into(), "off".into()],
        worker_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
            fast_export(),
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-cluster".into()),
            (
                "ORCH_CLAUDE_BIN".into(),
                orch_tests::claude_cli::claude_bin().display().to_string(),
            ),
        ],
        ..Options::default()
    })
    .await;
    let submitted = cluster
        .submit(json!({"prompt": "look around", "roles": ["analyst"], "backend": "claude-code"}))
        .await;
    let trace_id = submitted.trace_id.clone().expect("the task's trace id");
    let id = submitted.id.to_string();
    let done = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_eq!(done.status, TaskStatus::Completed, "{}", cluster.logs());
    let spans = cluster
        .eventually(Duration::from_secs(30), || async {
            let spans = receiver.trace(&trace_id);
            let cli = spans.iter().any(|s| !s.service.starts_with("orch-"));
            let agent = spans.iter().any(|s| s.name == "agent");
            match cli && agent {
                true => Ok(spans),
                false => Err(format!(
                    "no span of the CLI in the task's trace yet: {spans:#?}\nall spans: {:#?}",
                    receiver.spans()
                )),
            }
        })
        .await;
    let agent = spans.iter().find(|s| s.name == "agent").unwrap();
    let cli: Vec<&Span> = spans
        .iter()
        .filter(|s| !s.service.starts_with("orch-"))
        .collect();
    // The CLI's outermost spans hang under the worker's agent span; the rest under them.
    assert!(
        cli.iter().any(|s| s.parent_span_id == agent.span_id),
        "no CLI span under the agent span {}: {cli:#?}",
        agent.span_id
    );
    for s in &cli {
        assert!(
            spans.iter().any(|p| p.span_id == s.parent_span_id),
            "the CLI's span {} has a parent outside the trace: {spans:#?}",
            s.name
        );
    }
}

/// A job parked on a provider's limit keeps its trace: the run after the reset is in the
/// task's trace too, under the same dispatch (the parked record keeps the `traceparent`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_parked_on_a_limit_runs_again_in_the_same_trace() {
    use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
    let receiver = Receiver::start().await;
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("done after the reset")).await;
    // Long enough that the first run meets the exhausted key even on a loaded machine (the
    // window starts now, before the cluster does).
    fake.exhaust_key("test-key-cluster", Duration::from_secs(6));
    let cluster = Cluster::start(Options {
        workers: 1,
        coordinator_args: vec!["--otlp-endpoint".into(), receiver.endpoint()],
        coordinator_env: vec![fast_export()],
        worker_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
            fast_export(),
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-cluster".into()),
        ],
        ..Options::default()
    })
    .await;
    let submitted = cluster
        .submit(json!({"prompt": "summarise", "roles": ["analyst"], "backend": "anthropic"}))
        .await;
    let trace_id = submitted.trace_id.clone().expect("the task's trace id");
    let id = submitted.id.to_string();
    let done = cluster.wait_task(&id, Duration::from_secs(60)).await;
    assert_eq!(done.status, TaskStatus::Completed, "{}", cluster.logs());
    assert_eq!(done.jobs[0].attempt, 1, "parking burnt no attempt");
    let job = done.jobs[0].id.to_string();
    // The run that was parked and the run after the reset, both in the task's trace.
    let runs = cluster
        .eventually(Duration::from_secs(20), || async {
            let spans = receiver.trace(&trace_id);
            let runs: Vec<Span> = spans
                .iter()
                .filter(|s| s.name == "job" && s.attributes.get("job_id") == Some(&job))
                .cloned()
                .collect();
            match runs.len() {
                2.. => Ok((spans, runs)),
                _ => Err(format!(
                    "not both runs of {job} in the trace yet: {spans:#?}\nall spans: {:#?}",
                    receiver.spans()
                )),
            }
        })
        .await;
    let (spans, runs) = runs;
    let dispatch = by_job(&spans, "orch-coordinator", "dispatch")[&job];
    for run in &runs {
        assert_eq!(run.parent_span_id, dispatch.span_id, "{spans:#?}");
    }
}
