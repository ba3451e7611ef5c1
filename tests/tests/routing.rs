//! Routing by backend, whole-system: real NATS, Redis, coordinator and workers; only the model
//! API is a fake. A job reaches only a worker that runs its backend, every time, and a job for
//! a backend no live worker runs is told to wait (an event naming the backend, the queue by
//! backend in `GET /v1/status`) and runs as soon as a worker with that backend joins.

#![allow(clippy::unwrap_used)]

use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::event::{Event, EventKind};
use orch_shared::role::Role;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_tests::{Cluster, Options, TOKEN};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// A worker that runs `sim` and a `command` program (no model key, no CLI, no OpenAI server).
fn command_worker(cluster: &mut Cluster) -> String {
    let config = cluster.dir.path().join("command-worker.toml");
    std::fs::write(
        &config,
        "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", \"cat > /dev/null; echo built by a command\", \"agent\"]\n",
    )
    .unwrap();
    let n = cluster.workers.len();
    cluster.add_worker_with(&["--config".into(), config.display().to_string()], &[]);
    Cluster::worker_id(n)
}

/// A worker with an Anthropic key (the fake's): it runs `sim` and `anthropic`.
fn anthropic_worker(cluster: &mut Cluster, fake: &FakeAnthropic) -> String {
    let n = cluster.workers.len();
    cluster.add_worker_with(
        &[],
        &[
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-routing".into()),
        ],
    );
    Cluster::worker_id(n)
}

/// The backends each live worker advertises, by id.
async fn advertised(cluster: &Cluster) -> Vec<(String, Vec<String>)> {
    let (status, body) = cluster.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let backends = w["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_string())
                .collect();
            (w["id"].as_str().unwrap().to_string(), backends)
        })
        .collect()
}

/// The task's events stored so far (`GET /v1/tasks/{id}/logs` without following).
async fn stored_events(cluster: &Cluster, task: &str) -> Vec<Event> {
    let body = cluster
        .http()
        .get(format!("{}/v1/tasks/{task}/logs", cluster.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn worker_of(task: &Task, role: Role) -> String {
    let job = task.jobs.iter().find(|j| j.role == role).unwrap();
    job.worker_id
        .as_ref()
        .unwrap_or_else(|| panic!("{role} of {} has no worker: {task:#?}", task.id))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_mixing_backends_lands_each_job_on_a_worker_that_runs_its_backend() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("## Summary\nAll clear.")).await;
    let mut cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let commands = command_worker(&mut cluster);
    let anthropic = anthropic_worker(&mut cluster, &fake);

    // Each worker advertises what it can run, found from its configuration.
    let workers = cluster
        .eventually(Duration::from_secs(30), || async {
            let w = advertised(&cluster).await;
            if w.len() == 2 {
                Ok(w)
            } else {
                Err(format!("workers so far: {w:?}"))
            }
        })
        .await;
    for (id, backends) in &workers {
        let want = if *id == commands {
            vec!["sim", "command"]
        } else {
            vec!["sim", "anthropic"]
        };
        assert_eq!(backends, &want, "backends of {id}");
    }

    // Several tasks, each with a job per kind of worker and one either can run.
    let mut ids = vec![];
    for i in 0..6 {
        let task = cluster
            .submit(json!({
                "prompt": format!("mixed plan {i}"),
                "roles": ["analyst", "builder", "tester"],
                "backends": {"analyst": "anthropic", "builder": "command"},
            }))
            .await;
        ids.push(task.id.to_string());
    }
    let tasks = cluster.wait_all(&ids, WAIT).await;
    for task in &tasks {
        assert_eq!(
            task.status,
            TaskStatus::Completed,
            "{task:#?}\n{}",
            cluster.logs()
        );
        assert_eq!(worker_of(task, Role::Analyst), anthropic, "{task:#?}");
        assert_eq!(worker_of(task, Role::Builder), commands, "{task:#?}");
        // No job failed on a worker without its backend and came back.
        assert!(task.jobs.iter().all(|j| j.attempt == 1), "{task:#?}");
    }
    assert_eq!(fake.messages_served(), 6, "one model request per analyst");
    // The `sim` testers ran on both workers over the tasks (either may take them): nothing
    // reserves the default backend to one kind of worker.
    let testers: std::collections::BTreeSet<String> =
        tasks.iter().map(|t| worker_of(t, Role::Tester)).collect();
    assert!(
        testers.iter().all(|w| *w == commands || *w == anthropic),
        "{testers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_backend_no_worker_runs_waits_saying_so_and_runs_when_one_joins() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let commands = command_worker(&mut cluster);
    cluster.wait_workers(1).await;

    let task = cluster
        .submit(json!({"prompt": "summarise", "roles": ["analyst"], "backend": "openai", "model": "gpt-4.1-mini"}))
        .await;
    let id = task.id.to_string();
    let job = task.jobs[0].id;

    // The task's log says at once why the job does not start, naming the backend.
    let reason = cluster
        .eventually(Duration::from_secs(30), || async {
            let events = stored_events(&cluster, &id).await;
            events
                .iter()
                .find_map(|e| match &e.kind {
                    EventKind::JobWaiting { reason } if e.job_id == Some(job) => {
                        Some(reason.clone())
                    }
                    _ => None,
                })
                .ok_or_else(|| format!("no job_waiting yet: {events:#?}"))
        })
        .await;
    assert!(
        reason.contains("waiting for a worker with backend openai"),
        "{reason}"
    );
    // The cluster status shows the job in the openai queue, with no worker for it.
    let (status, body) = cluster
        .eventually(Duration::from_secs(30), || async {
            let (status, body) = cluster.get("/v1/status").await;
            let openai = body["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|q| q["backend"] == "openai").cloned());
            match openai {
                Some(q) if q["pending"] == 1 => Ok((status, q)),
                other => Err(format!("openai queue: {other:?} in {body}")),
            }
        })
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["workers"], 0, "{body}");
    // It stays queued (not failed, not taken by the worker without the backend).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = cluster.task(&id).await;
    assert_eq!(waiting.jobs[0].status, JobStatus::Queued, "{waiting:#?}");
    assert_eq!(waiting.jobs[0].worker_id, None, "{waiting:#?}");

    // A worker with an OpenAI-compatible server joins: the job runs there.
    let fake = FakeOpenAi::start([fake_openai::Reply::text("## Summary\nDone.")]).await;
    let n = cluster.workers.len();
    cluster.add_worker_with(
        &[],
        &[
            ("OPENAI_BASE_URL".into(), fake.url.clone()),
            ("OPENAI_API_KEY".into(), "test-key-routing".into()),
        ],
    );
    let done = cluster.wait_task(&id, WAIT).await;
    assert_eq!(
        done.status,
        TaskStatus::Completed,
        "{done:#?}\n{}",
        cluster.logs()
    );
    assert_eq!(worker_of(&done, Role::Analyst), Cluster::worker_id(n));
    assert_ne!(worker_of(&done, Role::Analyst), commands);
    assert_eq!(done.jobs[0].attempt, 1, "{done:#?}");
}
