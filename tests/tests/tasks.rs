//! Tasks run end to end on a real cluster: templates, parallel fan-out, forward context,
//! failures, idempotent submits and the resumable event stream.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, TaskStatus};
use orch_shared::event::{EventId, EventKind};
use orch_shared::job::Usage;
use orch_shared::role::Role;
use orch_tests::{Cluster, Options, assert_completed};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_template_runs_roles_in_pipeline_order_and_sums_usage() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({
            "prompt": "redesign the authentication system",
            "task_type": "feature_implementation",
            "sim": {"latency_ms": 50}
        }))
        .await;
    assert_eq!(task.plan_source, "feature_implementation");
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    let roles: Vec<Role> = task.jobs.iter().map(|j| j.role).collect();
    assert_eq!(
        roles,
        vec![
            Role::Analyst,
            Role::Planner,
            Role::Builder,
            Role::Tester,
            Role::Reviewer
        ]
    );
    for pair in task.jobs.windows(2) {
        assert!(
            pair[1].started_at_ms.unwrap() >= pair[0].finished_at_ms.unwrap(),
            "{:?} started before {:?} finished",
            pair[1].role,
            pair[0].role
        );
    }
    let mut sum = Usage::default();
    let mut cost = 0.0;
    for job in &task.jobs {
        assert_eq!(job.status, JobStatus::Succeeded);
        assert!(job.usage.total() > 0);
        assert!(job.output.as_deref().unwrap().contains("[simulated]"));
        sum.add(&job.usage);
        cost += job.cost_usd;
    }
    assert_eq!(task.usage, sum);
    assert!((task.cost_usd - cost).abs() < 1e-12);
    assert!(task.cost_usd > 0.0);
    let output = task.output.unwrap();
    assert!(output.find("[Analyst Agent]").unwrap() < output.find("[Reviewer Agent]").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_task_runs_its_jobs_at_the_same_time() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({
            "prompt": "survey the modules",
            "roles": ["analyst", "builder", "tester", "reviewer"],
            "mode": "parallel",
            "sim": {"latency_ms": 1500}
        }))
        .await;
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    let last_start = task
        .jobs
        .iter()
        .map(|j| j.started_at_ms.unwrap())
        .max()
        .unwrap();
    let first_end = task
        .jobs
        .iter()
        .map(|j| j.finished_at_ms.unwrap())
        .min()
        .unwrap();
    assert!(
        last_start < first_end,
        "jobs did not overlap: {:#?}",
        task.jobs
    );
    assert!(
        task.jobs.iter().all(|j| j.context.is_none()),
        "parallel jobs share nothing"
    );
    let roles: Vec<Role> = task.jobs.iter().map(|j| j.role).collect();
    assert_eq!(
        roles,
        vec![Role::Analyst, Role::Builder, Role::Tester, Role::Reviewer]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_context_reaches_the_next_agent() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({"prompt": "add a cache to the parser", "roles": ["analyst", "builder"]}))
        .await;
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    let (analyst, builder) = (&task.jobs[0], &task.jobs[1]);
    assert!(analyst.context.is_none());
    let context = builder
        .context
        .as_deref()
        .expect("the builder got forward context");
    assert!(
        context.contains("Context from the Analyst Agent"),
        "{context}"
    );
    assert!(
        context.contains("[simulated] The Analyst Agent"),
        "{context}"
    );
    // The builder's agent saw it: its answer quotes the analyst's summary.
    let out = builder.output.as_deref().unwrap();
    assert!(out.contains("Received forward context"), "{out}");
    assert!(out.contains("The Analyst Agent"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_fails_the_task_and_skips_the_rest() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({
            "prompt": "build it",
            "roles": ["builder", "tester", "reviewer"],
            "sim": {"fail_rate": 1.0}
        }))
        .await;
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_eq!(task.status, TaskStatus::Failed);
    let statuses: Vec<JobStatus> = task.jobs.iter().map(|j| j.status).collect();
    assert_eq!(
        statuses,
        vec![JobStatus::Failed, JobStatus::Skipped, JobStatus::Skipped]
    );
    let error = task.error.unwrap();
    assert!(
        error.contains("step 1 (builder) failed: agent_error"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_submit_with_the_same_idempotency_key_creates_one_task() {
    let cluster = Cluster::start(Options::default()).await;
    let body = json!({"prompt": "write a parser", "idempotency_key": "deploy-42"});
    let (first_status, first) = cluster.post("/v1/tasks", &body).await;
    let (second_status, second) = cluster.post("/v1/tasks", &body).await;
    assert_eq!(first_status, 201);
    assert_eq!(second_status, 200);
    assert_eq!(first["id"], second["id"]);
    let other = cluster
        .submit(json!({"prompt": "write a parser", "idempotency_key": "deploy-43"}))
        .await;
    assert_ne!(json!(other.id.to_string()), first["id"]);
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2, "{list}");
    cluster.wait_task(first["id"].as_str().unwrap(), WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_replays_the_task_and_resumes_after_the_last_event_id() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({"prompt": "build and test it", "sim": {"latency_ms": 200}}))
        .await;
    let id = task.id.to_string();
    // Read live while the task runs; the stream closes by itself at the end.
    let events = cluster.events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, e)| e.kind.name()).collect();
    assert_eq!(kinds.first(), Some(&"task_created"));
    assert_eq!(kinds.last(), Some(&"task_finished"));
    let started: Vec<Role> = events
        .iter()
        .filter_map(|(_, e)| match &e.kind {
            EventKind::JobStarted { role, .. } => Some(*role),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![Role::Builder, Role::Tester]);
    for kind in [
        "job_queued",
        "thinking",
        "tool_call",
        "tool_result",
        "text",
        "usage",
        "job_finished",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    // The agent's output that was ready at once travelled as one message (ids `N`, `N.1`...).
    let in_batch = events
        .windows(2)
        .position(|w| w[1].0.seq == w[0].0.seq)
        .expect("a burst of agent output stored as one batch");
    // Resume from the middle, and from inside a batch: exactly the later events come back.
    for after in [events[events.len() / 2].0, events[in_batch].0] {
        let rest = cluster.events(&id, Some(after)).await;
        let expected: Vec<EventId> = events
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| *i > after)
            .collect();
        assert_eq!(
            rest.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            expected,
            "after {after}"
        );
    }
}

/// Opens `GET /v1/events?{query}` (resuming after `after`); once this returns, the stream sees
/// every later event.
async fn open_cluster_events(
    cluster: &Cluster,
    query: &str,
    after: Option<EventId>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .get(format!("{}/v1/events?{query}", cluster.url))
        .bearer_auth(orch_tests::TOKEN);
    if let Some(id) = after {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.expect("events request");
    assert_eq!(resp.status(), 200);
    resp
}

/// Reads an open `GET /v1/events` until `task`'s `task_finished`: `(id, kind)` of each event
/// of `task`.
async fn read_until_end(resp: reqwest::Response, task: &str) -> Vec<(EventId, String)> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let (mut buf, mut out, mut id) = (String::new(), Vec::new(), None);
    let read = async {
        while let Some(chunk) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk")));
            while let Some(end) = buf.find('\n') {
                let line: String = buf.drain(..=end).collect();
                let line = line.trim_end();
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse::<EventId>().expect("an event id"));
                } else if let Some(data) = line.strip_prefix("data: ") {
                    let e: orch_shared::event::Event =
                        serde_json::from_str(data).expect("an event");
                    let event_id = id.take().expect("every event has an id");
                    if e.task_id.to_string() == task {
                        let kind = e.kind.name().to_string();
                        out.push((event_id, kind.clone()));
                        if kind == "task_finished" {
                            return;
                        }
                    }
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .is_err()
    {
        panic!("no task_finished of {task} on /v1/events: {out:?}");
    }
    out
}

/// Every event kind can be asked for on the cluster-wide stream (`job_waiting` was missing from
/// the filter's hand-written list and answered 400); an unknown kind is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_filter_accepts_every_event_kind() {
    use strum::VariantNames;
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let all = orch_shared::event::EventKind::VARIANTS.join(",");
    for query in ["job_waiting", all.as_str()] {
        // A 200 opens the stream; dropping it closes it.
        drop(open_cluster_events(&cluster, &format!("kinds={query}"), None).await);
    }
    let (status, body) = cluster
        .get("/v1/events?kinds=job_waiting,no_such_kind")
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("kinds:") && message.contains("no_such_kind"),
        "{message}"
    );
}

/// The cluster-wide stream filtered by kind finds events that travelled in a batch (an
/// agent's tool call and result are published together), and resumes inside a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_events_filter_kinds_inside_batches_and_resume_there() {
    let cluster = Cluster::start(Options::default()).await;
    let query = "kinds=task_created,tool_call,tool_result,task_finished";
    let live = open_cluster_events(&cluster, query, None).await;
    let task = cluster
        .submit(json!({"prompt": "build and test it", "sim": {"latency_ms": 200}}))
        .await;
    let id = task.id.to_string();
    let seen = read_until_end(live, &id).await;
    let kinds: Vec<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "task_created",
            "tool_call",
            "tool_result",
            "tool_call",
            "tool_result",
            "task_finished"
        ],
        "the creation (from its creation message), two agents' tool calls and results, then the end: {seen:?}"
    );
    let (call, result) = (seen[1].0, seen[2].0);
    assert_eq!(
        call.seq, result.seq,
        "call and result travelled in one message"
    );
    assert!(result.index > call.index);
    // Resuming after the call (inside its batch) starts with its result.
    let resumed = open_cluster_events(&cluster, query, Some(call)).await;
    assert_eq!(read_until_end(resumed, &id).await, seen[2..].to_vec());
}

/// `--nats-url` takes a server list (`nats://a:4222,nats://b:4222`), the usual way to give a
/// client a NATS cluster's seeds: coordinator and workers connect through the first seed that
/// answers, here past one that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_connect_through_a_nats_server_list_whose_first_seed_is_down() {
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let seed = format!("nats://127.0.0.1:{}", down.local_addr().unwrap().port());
    drop(down);
    let cluster = Cluster::start(Options {
        nats_seeds: vec![seed],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "x", "roles": ["builder", "tester"]}))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(30))
        .await;
    assert_completed(&cluster, &task);
}

/// A Redis reached over TLS (`rediss://`, as managed Redis services with in-transit
/// encryption require): coordinator and workers verify its certificate against the CA in
/// `SSL_CERT_FILE` and the cluster runs tasks as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_a_redis_reached_over_tls() {
    let cluster = Cluster::start(Options {
        redis_tls: true,
        ..Options::default()
    })
    .await;
    assert!(
        cluster.redis_url.starts_with("rediss://"),
        "{}",
        cluster.redis_url
    );
    let task = cluster
        .submit(json!({"prompt": "x", "roles": ["builder", "tester"]}))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(30))
        .await;
    assert_completed(&cluster, &task);
    let (_, workers) = cluster.get("/v1/workers").await;
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(2),
        "{workers}"
    );
}
