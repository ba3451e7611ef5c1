//! Planning and execution rules on a real cluster: DAG order and parallelism, failure policy,
//! retries and dead letters, timeouts, cancel and kill, caps, budgets, dry runs, and a
//! coordinator killed mid-DAG.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{DeadLetterList, DryRun, EstimateSource, Job, JobStatus, Task, TaskStatus};
use orch_shared::event::EventKind;
use orch_shared::job::FailureReason;
use orch_shared::role::Role;
use orch_tests::{Cluster, Options, assert_completed};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);

fn span(j: &Job) -> (u64, u64) {
    (j.started_at_ms.unwrap(), j.finished_at_ms.unwrap())
}

async fn run(cluster: &Cluster, body: serde_json::Value) -> Task {
    let task = cluster.submit(body).await;
    cluster.wait_task(&task.id.to_string(), WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_runs_parents_first_and_independent_steps_together() {
    let cluster = Cluster::start(Options::default()).await;
    let task = run(
        &cluster,
        json!({
            "prompt": "add a cache",
            "sim": {"latency_ms": 800},
            "plan": {"complexity": "medium", "steps": [
                {"role": "analyst", "scope": "map the code"},
                {"role": "builder", "scope": "build it", "depends_on": [0]},
                {"role": "documenter", "scope": "document it", "depends_on": [0]},
                {"role": "reviewer", "scope": "review both", "depends_on": [1, 2]}
            ]}
        }),
    )
    .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.task_type, "plan");
    assert_eq!(task.plan.complexity.as_deref(), Some("medium"));
    let (a, b, d, r) = (
        span(&task.jobs[0]),
        span(&task.jobs[1]),
        span(&task.jobs[2]),
        span(&task.jobs[3]),
    );
    assert!(
        b.0 >= a.1 && d.0 >= a.1,
        "children started before the parent finished"
    );
    assert!(
        b.0 < d.1 && d.0 < b.1,
        "independent siblings did not overlap: {b:?} {d:?}"
    );
    assert!(
        r.0 >= b.1 && r.0 >= d.1,
        "the join started before both parents finished"
    );
    let ctx = task.jobs[3].context.as_deref().unwrap();
    assert!(
        ctx.contains("Builder Agent") && ctx.contains("Documenter Agent"),
        "{ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_skips_dependents_and_continue_runs_them() {
    let cluster = Cluster::start(Options::default()).await;
    let body = |policy: &str| {
        json!({"prompt": "x", "roles": ["builder", "tester"], "max_attempts": 1,
               "on_failure": policy, "sim": {"fail_first_attempts": 1}})
    };
    let stop = run(&cluster, body("stop")).await;
    assert_eq!(stop.status, TaskStatus::Failed);
    assert_eq!(stop.jobs[1].status, JobStatus::Skipped);
    let cont = run(&cluster, body("continue")).await;
    assert_eq!(
        cont.status,
        TaskStatus::Failed,
        "a failed step fails the task"
    );
    // The tester ran (and failed its own first attempt): it was not skipped.
    assert_eq!(cont.jobs[1].status, JobStatus::Failed);
    assert!(cont.jobs[1].started_at_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_retried_then_succeeds() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(json!({"prompt": "x", "roles": ["builder"],
                       "sim": {"fail_first_attempts": 1, "fail_reason": "rate_limited"}}))
        .await;
    let id = task.id.to_string();
    let events = cluster.events(&id, None).await;
    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 2);
    let retry = events
        .iter()
        .find_map(|(_, e)| match &e.kind {
            EventKind::JobRetrying {
                reason,
                retry_at_ms,
                next_attempt,
                ..
            } => Some((*reason, *retry_at_ms, *next_attempt, e.at_ms)),
            _ => None,
        })
        .expect("a job_retrying event");
    assert_eq!(retry.0, FailureReason::RateLimited);
    assert_eq!(retry.2, 2);
    let wait = retry.1 - retry.3;
    assert!(
        (1_000..2_100).contains(&wait),
        "backoff before attempt 2 was {wait} ms"
    );
    // The second attempt started no earlier than the backoff allowed.
    let second_start = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::JobStarted { .. }) && e.attempt == 2)
        .map(|(_, e)| e.at_ms)
        .next()
        .unwrap();
    assert!(second_start >= retry.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_go_to_the_dead_letter_set_and_dlq_retry_revives_them() {
    let cluster = Cluster::start(Options::default()).await;
    let task = run(
        &cluster,
        // Every job of the task fails its first two attempts; with two allowed, the builder
        // exhausts them.
        json!({"prompt": "x", "roles": ["builder"], "max_attempts": 2,
               "sim": {"fail_first_attempts": 2, "fail_reason": "overloaded"}}),
    )
    .await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.jobs[0].attempt, 2);
    assert_eq!(task.jobs[0].status, JobStatus::Failed);
    let (_, v) = cluster.get("/v1/dlq").await;
    let dlq: DeadLetterList = serde_json::from_value(v).unwrap();
    assert_eq!(dlq.jobs.len(), 1);
    assert_eq!(dlq.jobs[0].job_id, task.jobs[0].id);
    assert_eq!(
        dlq.jobs[0].error.as_ref().unwrap().reason,
        FailureReason::Overloaded
    );

    let (status, v) = cluster
        .post(&format!("/v1/dlq/{}/retry", task.jobs[0].id), &json!(null))
        .await;
    assert_eq!(status, 200, "{v}");
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 3, "the retry is a fresh attempt");
    let (_, v) = cluster.get("/v1/dlq").await;
    assert_eq!(v["jobs"], json!([]));
    let (status, v) = cluster
        .post(&format!("/v1/dlq/{}/retry", task.jobs[0].id), &json!(null))
        .await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_task_timeouts_end_the_work() {
    let cluster = Cluster::start(Options::default()).await;
    let task = run(
        &cluster,
        json!({"prompt": "x", "roles": ["builder", "tester"], "job_timeout_ms": 300, "sim": {"latency_ms": 5000}}),
    )
    .await;
    assert_eq!(task.status, TaskStatus::Failed);
    let job = &task.jobs[0];
    assert_eq!(job.error.as_ref().unwrap().reason, FailureReason::Timeout);
    assert_eq!(job.attempt, 1, "a timeout is not retried");
    let (s, f) = span(job);
    assert!(
        f - s < 3000,
        "the job ran {} ms despite its 300 ms limit",
        f - s
    );

    let started = Instant::now();
    let task = run(
        &cluster,
        json!({"prompt": "x", "roles": ["builder", "tester"], "task_timeout_ms": 1000, "sim": {"latency_ms": 20000}}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .starts_with("task timed out after 1s"),
        "{:?}",
        task.error
    );
    assert_eq!(task.jobs[0].status, JobStatus::Cancelled);
    assert_eq!(task.jobs[1].status, JobStatus::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_agent_within_a_second_and_it_never_comes_back() {
    let cluster = Cluster::start(Options {
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(
            json!({"prompt": "x", "roles": ["builder", "tester"], "sim": {"latency_ms": 30000}}),
        )
        .await;
    let id = task.id.to_string();
    cluster.wait_running(&id, 0).await;
    let cancelled_at = orch_shared::now_ms();
    let (status, v) = cluster
        .post(&format!("/v1/tasks/{id}/cancel"), &json!(null))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    // The worker's report of the stopped agent arrives after the task ended: poll the record.
    let stopped = cluster
        .eventually(Duration::from_secs(10), || async {
            let t = cluster.task(&id).await;
            t.jobs[0]
                .finished_at_ms
                .ok_or("the worker never reported the agent stopped")
        })
        .await;
    assert!(
        stopped - cancelled_at < 1000,
        "the agent stopped {} ms after the cancel",
        stopped - cancelled_at
    );
    // Past the ack wait, the job has not been run again anywhere.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = cluster.events(&id, None).await;
    let starts = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::JobStarted { .. }))
        .count();
    assert_eq!(starts, 1, "the cancelled job was redelivered");
    let task = cluster.task(&id).await;
    assert_eq!(task.status, TaskStatus::Cancelled);
    assert_eq!(task.jobs[0].status, JobStatus::Cancelled);
    assert_eq!(task.jobs[1].status, JobStatus::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stops_one_agent_and_its_dependents() {
    let cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(
            json!({"prompt": "x", "mode": "parallel", "roles": ["builder", "documenter"],
                       "sim": {"latency_ms": 3000}}),
        )
        .await;
    let id = task.id.to_string();
    cluster.wait_running(&id, 0).await;
    let victim = task.jobs[0].id;
    let (status, v) = cluster
        .post(&format!("/v1/agents/{victim}/kill"), &json!(null))
        .await;
    assert_eq!(status, 200, "{v}");
    let task = cluster.wait_task(&id, WAIT).await;
    assert_eq!(task.jobs[0].status, JobStatus::Cancelled);
    assert_eq!(
        task.jobs[1].status,
        JobStatus::Succeeded,
        "the other agent was left alone"
    );
    assert_eq!(task.status, TaskStatus::Cancelled);
    let (status, _) = cluster
        .post(
            "/v1/agents/0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b/kill",
            &json!(null),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_caps_the_jobs_running_at_once() {
    let cluster = Cluster::start(Options::default()).await;
    let task = run(
        &cluster,
        json!({"prompt": "x", "mode": "parallel", "max_parallel": 2,
               "roles": ["analyst", "builder", "tester", "reviewer", "documenter"],
               "sim": {"latency_ms": 600}}),
    )
    .await;
    assert_completed(&cluster, &task);
    let spans: Vec<(u64, u64)> = task.jobs.iter().map(span).collect();
    let most = spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(s2, f2)| s2 <= s && s < f2).count())
        .max()
        .unwrap();
    assert!(most <= 2, "{most} jobs ran at once: {spans:?}");
    assert_eq!(most, 2, "the cap was not used: {spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stops_the_task_and_spend_stays_within_one_running_job() {
    let cluster = Cluster::start(Options::default()).await;
    let budget = 0.005;
    let task = run(
        &cluster,
        json!({"prompt": "x", "roles": ["analyst", "planner", "builder", "tester", "reviewer"], "budget_usd": budget}),
    )
    .await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error.as_deref().unwrap().contains("budget exhausted"),
        "{:?}",
        task.error
    );
    let ran: Vec<&Job> = task
        .jobs
        .iter()
        .filter(|j| j.status == JobStatus::Succeeded)
        .collect();
    assert!(!ran.is_empty() && ran.len() < 5, "{} jobs ran", ran.len());
    let most_expensive = task.jobs.iter().map(|j| j.cost_usd).fold(0.0, f64::max);
    assert!(
        task.cost_usd <= budget + most_expensive,
        "spent {} of {budget}",
        task.cost_usd
    );
    assert!(task.jobs.iter().any(|j| j.status == JobStatus::Skipped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_estimates_from_history_and_runs_nothing() {
    let cluster = Cluster::start(Options::default()).await;
    let body = json!({"prompt": "build and test it", "sim": {"latency_ms": 100}});
    let (status, v) = cluster.post("/v1/tasks/dry-run", &body).await;
    assert_eq!(status, 200, "{v}");
    let dry: DryRun = serde_json::from_value(v).unwrap();
    assert_eq!(
        dry.steps.iter().map(|s| s.role).collect::<Vec<_>>(),
        vec![Role::Builder, Role::Tester]
    );
    assert_eq!(dry.total.source, EstimateSource::None);
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]), "a dry run created a task");
    for _ in 0..3 {
        assert_completed(&cluster, &run(&cluster, body.clone()).await);
    }
    let (_, v) = cluster.post("/v1/tasks/dry-run", &body).await;
    let dry: DryRun = serde_json::from_value(v).unwrap();
    assert_eq!(dry.total.source, EstimateSource::History);
    assert_eq!(dry.steps[0].estimate.samples, 3);
    assert!(dry.total.cost_usd_p50 > 0.0);
    let d = dry.total.duration_ms_p50.unwrap();
    assert!(
        (200..5_000).contains(&d),
        "two sequential 100 ms steps estimated at {d} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_dag_resumes_without_rerunning_finished_steps() {
    let mut cluster = Cluster::start(Options::default()).await;
    let task = cluster
        .submit(
            json!({"prompt": "x", "roles": ["analyst", "planner", "builder", "tester"],
                       "sim": {"latency_ms": 700}}),
        )
        .await;
    let id = task.id.to_string();
    cluster.wait_running(&id, 1).await;
    cluster.restart_coordinator().await;
    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    let events = cluster.events(&id, None).await;
    for job in &task.jobs {
        let starts = events
            .iter()
            .filter(|(_, e)| {
                e.job_id == Some(job.id) && matches!(e.kind, EventKind::JobStarted { .. })
            })
            .count();
        assert_eq!(starts, 1, "{} started {starts} times", job.role);
        assert_eq!(job.attempt, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_and_limits_are_refused_with_the_reason() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let cases = [
        (
            json!({"prompt": "x", "plan": {"steps": []}}),
            "plan.steps: the plan has no steps",
        ),
        (
            json!({"prompt": "x", "plan": {"steps": [{"role": "builder", "depends_on": [4]}]}}),
            "plan.steps[0].depends_on: step 4 does not exist",
        ),
        (
            json!({"prompt": "x", "plan": {"steps": [{"role": "builder", "depends_on": [1]}, {"role": "tester", "depends_on": [0]}]}}),
            "plan.steps: dependency cycle",
        ),
        (
            json!({"prompt": "x", "plan": {"steps": [{"role": "wizard"}]}}),
            "plan.steps[0].role",
        ),
        (
            json!({"prompt": "x", "max_attempts": 0}),
            "max_attempts: must be between 1 and 20",
        ),
        (json!({"prompt": "x", "budget_usd": -1}), "budget_usd:"),
        (json!({"prompt": "x", "on_failure": "panic"}), "on_failure:"),
        (
            json!({"prompt": "x", "job_timeout_ms": 5}),
            "job_timeout_ms:",
        ),
    ];
    for (body, expected) in cases {
        let (status, v) = cluster.post("/v1/tasks", &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.starts_with(expected),
            "{body}: `{message}` does not start with `{expected}`"
        );
    }
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_planner_plans_and_a_bad_plan_falls_back_to_the_rules() {
    let cluster = Cluster::start(Options::default()).await;
    let task = run(
        &cluster,
        json!({"prompt": "redesign the session system", "task_type": "feature_implementation", "planner": "llm"}),
    )
    .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.plan_source, "llm");
    assert_eq!(task.plan.complexity.as_deref(), Some("complex"));
    let roles: Vec<Role> = task.jobs.iter().map(|j| j.role).collect();
    assert_eq!(
        roles,
        vec![
            Role::Planner,
            Role::Analyst,
            Role::Planner,
            Role::Builder,
            Role::Tester,
            Role::Reviewer
        ]
    );
    assert!(
        task.jobs[0]
            .output
            .as_deref()
            .unwrap()
            .contains("\"workflow\"")
    );
    let summed: f64 = task.jobs.iter().map(|j| j.cost_usd).sum();
    assert!(
        task.jobs[0].cost_usd > 0.0 && (task.cost_usd - summed).abs() < 1e-12,
        "the planner's cost counts"
    );
    assert_eq!(task.jobs[4].kind, orch_shared::job::JobKind::Agent);
    assert_eq!(
        task.jobs[4].constraints,
        vec!["test only what changed".to_string()]
    );

    let task = run(
        &cluster,
        json!({"prompt": "quick fix [sim:bad-plan]", "task_type": "bug_fix", "planner": "llm"}),
    )
    .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.plan_source, "simple_fix (planner fallback)");
    let events = cluster.events(&task.id.to_string(), None).await;
    let rejected = events.iter().find_map(|(_, e)| match &e.kind {
        EventKind::TaskPlanned { rejected, .. } => rejected.clone(),
        _ => None,
    });
    assert!(rejected.unwrap().contains("cycle"));

    let (status, v) = cluster
        .post(
            "/v1/tasks",
            &json!({"prompt": "x", "planner": "llm", "roles": ["builder"]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().starts_with("planner:"));
}

fn with_coordinator_args(args: &[&str]) -> Options {
    Options {
        coordinator_args: args.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_cap_holds_jobs_back_and_priorities_pick_who_goes_first() {
    let cluster = Cluster::start(with_coordinator_args(&["--max-running-agents", "1"])).await;
    // A long low-priority task takes the only slot; then low and high tasks queue up.
    let first = cluster
        .submit(json!({"prompt": "first", "roles": ["builder"], "sim": {"latency_ms": 1200}}))
        .await;
    cluster.wait_running(&first.id.to_string(), 0).await;
    let low = cluster
        .submit(json!({"prompt": "low", "roles": ["builder"], "priority": "low", "sim": {"latency_ms": 300}}))
        .await;
    let high = cluster
        .submit(json!({"prompt": "high", "roles": ["builder"], "priority": "high", "sim": {"latency_ms": 300}}))
        .await;
    let ids = [first.id, low.id, high.id].map(|id| id.to_string());
    let tasks = cluster.wait_all(&ids, WAIT).await;
    for t in &tasks {
        assert_completed(&cluster, t);
    }
    let spans: Vec<(u64, u64)> = tasks.iter().map(|t| span(&t.jobs[0])).collect();
    assert!(
        spans[2].0 >= spans[0].1,
        "the high job started before the slot was free"
    );
    assert!(
        spans[1].0 >= spans[2].1,
        "the low job went before the high one: {spans:?}"
    );
    let events = cluster.events(&ids[1], None).await;
    assert!(
        events.iter().any(|(_, e)| matches!(&e.kind, EventKind::JobWaiting { reason } if reason.contains("cap of 1"))),
        "the waiting job said why"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_spaces_out_dispatches() {
    // 60 requests a minute: a burst of 10 (ten seconds' worth), then one a second.
    let cluster = Cluster::start(with_coordinator_args(&["--rate-limit", "sim=60rpm"])).await;
    let steps: Vec<serde_json::Value> = (0..13).map(|_| json!({"role": "builder"})).collect();
    let t = run(
        &cluster,
        json!({"prompt": "limited", "mode": "parallel", "plan": {"steps": steps}}),
    )
    .await;
    assert_completed(&cluster, &t);
    let mut starts: Vec<u64> = t.jobs.iter().map(|j| j.started_at_ms.unwrap()).collect();
    starts.sort_unstable();
    let burst = starts.iter().filter(|&&s| s < starts[0] + 500).count();
    assert!(
        burst <= 10,
        "{burst} jobs started in the first half second: {starts:?}"
    );
    let spread = starts[12] - starts[0];
    assert!(
        spread >= 2_000,
        "13 jobs at 10 + 1/s started within {spread} ms: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_budget_holds_jobs_once_reservations_reach_it() {
    // Each job reserves $0.0049 (no history yet); $0.01 fits two reservations, not three. A sim
    // job here costs at least $0.0027, so once two settled (≥ $0.0054) the third's reservation
    // still passes $0.01.
    let cluster = Cluster::start(with_coordinator_args(&[
        "--daily-budget-usd",
        "0.01",
        "--default-job-estimate-usd",
        "0.0049",
    ]))
    .await;
    let task = cluster
        .submit(json!({"prompt": "x", "mode": "parallel", "roles": ["analyst", "builder", "tester"], "sim": {"latency_ms": 200}}))
        .await;
    let id = task.id.to_string();
    cluster
        .eventually(Duration::from_secs(20), || async {
            let t = cluster.task(&id).await;
            let done = t
                .jobs
                .iter()
                .filter(|j| j.status == JobStatus::Succeeded)
                .count();
            match done >= 2 {
                true => Ok(()),
                false => Err(format!("two jobs never ran: {t:#?}")),
            }
        })
        .await;
    // The third job would be dispatched at once if the budget allowed it: give it time to.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let t = cluster.task(&id).await;
    let ran = t.jobs.iter().filter(|j| j.started_at_ms.is_some()).count();
    // Two settled at ≥ $0.0027 each: the third's $0.0049 would pass $0.01.
    assert_eq!(ran, 2, "the budget let a third job run: {t:#?}");
    assert!(t.cost_usd <= 0.01);
    let events = cluster_events_so_far(&cluster, &id).await;
    assert!(
        events.iter().any(|r| r.contains("daily budget of $0.01")),
        "{events:?}"
    );
}

/// The reasons of the `job_waiting` events of a task that has not finished yet.
async fn cluster_events_so_far(cluster: &Cluster, id: &str) -> Vec<String> {
    // The stream only ends with the task: cancel it so the log closes, then read it.
    let (status, _) = cluster
        .post(&format!("/v1/tasks/{id}/cancel"), &json!(null))
        .await;
    assert_eq!(status, 200);
    cluster
        .events(id, None)
        .await
        .into_iter()
        .filter_map(|(_, e)| match e.kind {
            EventKind::JobWaiting { reason } => Some(reason),
            _ => None,
        })
        .collect()
}
