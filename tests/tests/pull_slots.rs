//! How a worker pulls jobs for several backends through few slots, whole-system: real NATS,
//! Redis, coordinator and worker processes. A worker with one slot serving `sim` and `command`
//! runs each job as soon as the slot is free, whichever backend it is on, even though its pull
//! requests stay open for an hour; a backlog on both backends is shared turn by turn without a
//! job being handed back; and SIGTERM stops an idle worker at once, withdrawing its requests.
//!
//! The pull expiry is set to an hour so that no test can pass by luck: a slot held by an empty
//! request, or a shutdown waiting for one, would outlast every timeout here.

#![allow(clippy::unwrap_used)]

use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::event::EventKind;
use orch_shared::subject;
use orch_tests::{Cluster, Options};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// Adds a worker serving `sim` and a `command` program (no key, no CLI), whose
/// pull requests wait an hour on an empty queue; returns its index in `cluster.workers`.
fn long_pull_worker(cluster: &mut Cluster) -> usize {
    let config = cluster.dir.path().join("command-worker.toml");
    std::fs::write(
        &config,
        "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", \"cat > /dev/null; echo built by a command\", \"agent\"]\n",
    )
    .unwrap();
    cluster.add_worker_with(
        &[
            "--config".into(),
            config.display().to_string(),
            "--pull-expires".into(),
            "1h".into(),
        ],
        &[],
    )
}

/// A one-job task on `backend` (`sim` jobs take `latency_ms`).
fn one_job(n: usize, backend: &str, latency_ms: u64) -> serde_json::Value {
    json!({
        "prompt": format!("job {n} on {backend}"),
        "roles": ["builder"],
        "backends": {"builder": backend},
        "sim": {"latency_ms": latency_ms},
    })
}

/// The backend and the delivery count of the task's one job, from its `job_started` event.
async fn started(cluster: &Cluster, task: &str) -> (String, u64) {
    cluster
        .events(task, None)
        .await
        .into_iter()
        .find_map(|(_, e)| match e.kind {
            EventKind::JobStarted {
                backend, delivery, ..
            } => Some((backend, delivery)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{task} has no job_started event"))
}

fn assert_ran_once(cluster: &Cluster, task: &Task) {
    assert_eq!(
        task.status,
        TaskStatus::Completed,
        "{task:#?}\n{}",
        cluster.logs()
    );
    assert_eq!(task.jobs[0].attempt, 1, "{task:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_serving_two_backends_runs_each_job_when_the_slot_is_free() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        slots: 1,
        ..Options::default()
    })
    .await;
    long_pull_worker(&mut cluster);
    cluster.wait_workers(1).await;

    // One job at a time, each submitted to an idle worker, the backends in pairs (sim, sim,
    // command, command, ...): after a job, the next may be on the same backend or the other,
    // and a request on the other backend's queue holding the slot would keep it waiting for
    // an hour.
    let mut previous_end = None;
    for n in 0..8 {
        let backend = ["sim", "command"][(n / 2) % 2];
        let task = cluster.submit(one_job(n, backend, 50)).await;
        let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
        assert_ran_once(&cluster, &task);
        let job = &task.jobs[0];
        let (ran_on, delivery) = started(&cluster, &task.id.to_string()).await;
        assert_eq!(ran_on, backend, "{task:#?}");
        assert_eq!(delivery, 1, "the job was handed back once: {task:#?}");
        // Measured, not asserted: the job's wait in the queue of an idle worker.
        eprintln!(
            "job {n} on {backend}: queued→started {} ms (previous job ended {} ms before it was queued)",
            job.started_at_ms.unwrap() - job.queued_at_ms.unwrap(),
            previous_end.map_or(0, |end| job.queued_at_ms.unwrap().saturating_sub(end)),
        );
        previous_end = job.finished_at_ms;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_on_two_backends_shares_one_slot_in_turn_without_handing_jobs_back() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        slots: 1,
        ..Options::default()
    })
    .await;
    long_pull_worker(&mut cluster);
    cluster.wait_workers(1).await;

    // A job that holds the only slot until it is cancelled, and behind it a backlog on both
    // backends.
    let gate = cluster
        .submit(one_job(0, "sim", 600_000))
        .await
        .id
        .to_string();
    cluster.wait_running(&gate, 0).await;
    // With its slot taken the worker asks for nothing: the request it had open on the other
    // queue was withdrawn, and JetStream forgot it while the worker lives on.
    let js = async_nats::jetstream::new(async_nats::connect(&cluster.nats_url).await.unwrap());
    for backend in ["sim", "command"] {
        cluster
            .eventually(Duration::from_secs(30), || async {
                match open_requests(&js, backend).await {
                    0 => Ok(()),
                    n => Err(format!(
                        "{n} pull requests open on {backend} with no slot free"
                    )),
                }
            })
            .await;
    }
    let mut ids = vec![];
    for n in 1..=6 {
        let backend = ["sim", "command"][n % 2];
        ids.push(cluster.submit(one_job(n, backend, 50)).await.id.to_string());
    }
    for id in &ids {
        cluster
            .eventually(Duration::from_secs(30), || async {
                let task = cluster.task(id).await;
                match task.jobs[0].status {
                    JobStatus::Queued => Ok(()),
                    s => Err(format!("job of {id} is {s:?}, not queued behind the gate")),
                }
            })
            .await;
    }
    let (status, body) = cluster
        .post(&format!("/v1/tasks/{gate}/cancel"), &json!({}))
        .await;
    assert!(status.is_success(), "{status} {body}");

    let tasks = cluster.wait_all(&ids, WAIT).await;
    let mut starts = vec![];
    for task in &tasks {
        assert_ran_once(&cluster, task);
        let (backend, delivery) = started(&cluster, &task.id.to_string()).await;
        // The waiting jobs are taken a slot at a time: none reached the worker without one.
        assert_eq!(delivery, 1, "the job was handed back: {task:#?}");
        starts.push((task.jobs[0].started_at_ms.unwrap(), backend));
    }
    starts.sort();
    let order: Vec<&str> = starts.iter().map(|(_, b)| b.as_str()).collect();
    // Neither backend's backlog waits for the other's: the slot goes to each in turn.
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "the backends did not take the slot in turn: {order:?}"
    );
}

/// The number of pull requests JetStream holds open on `backend`'s job consumer.
async fn open_requests(js: &async_nats::jetstream::Context, backend: &str) -> usize {
    let stream = js.get_stream(subject::JOBS_STREAM).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&subject::job_consumer(backend))
        .await
        .unwrap();
    consumer.info().await.unwrap().num_waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_idle_worker_without_waiting_for_its_open_pulls() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        slots: 2,
        drain_grace: Duration::from_secs(5),
        ..Options::default()
    })
    .await;
    let n = long_pull_worker(&mut cluster);
    let id = Cluster::worker_id(n);
    cluster.wait_workers(1).await;
    let js = async_nats::jetstream::new(async_nats::connect(&cluster.nats_url).await.unwrap());
    // The idle worker waits on its queues, an hour per request.
    cluster
        .eventually(Duration::from_secs(30), || async {
            let open = open_requests(&js, "sim").await + open_requests(&js, "command").await;
            match open {
                0 => Err("no pull request open".to_string()),
                _ => Ok(()),
            }
        })
        .await;

    cluster.workers[n].signal(libc::SIGTERM);
    assert_eq!(
        cluster.workers[n].wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "the worker did not stop cleanly well before its pulls' expiry\n{}",
        cluster.logs()
    );
    let (status, body) = cluster.get("/v1/workers").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<&str> = body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert!(!listed.contains(&id.as_str()), "{id} still listed: {body}");
    // JetStream forgot the withdrawn requests: no job is sent to a worker that is gone.
    for backend in ["sim", "command"] {
        cluster
            .eventually(Duration::from_secs(30), || async {
                match open_requests(&js, backend).await {
                    0 => Ok(()),
                    n => Err(format!("{n} pull requests still open on {backend}")),
                }
            })
            .await;
    }
}

/// A worker full of native agents whose runs each keep many event messages unconfirmed:
/// together more than async-nats's default of 5,000 publish acks in flight. Each ack holds a
/// permit until its run awaits it, so the worker used to stall for good (every run waiting
/// for a permit only another run's publish would give back); every agent now finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_full_of_talkative_native_agents_does_not_stall_on_its_event_acks() {
    let agents = 100;
    // 40 tool rounds at once: each run has more events than it keeps unconfirmed.
    let fake = orch_tests::fake_anthropic::FakeAnthropic::start_rounds(40, Duration::ZERO).await;
    let cluster = Cluster::start(Options {
        workers: 1,
        slots: agents,
        worker_args: fake.worker_args("anthropic"),
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..agents {
        let task = cluster
            .submit(json!({"prompt": format!("look around {i}"), "roles": ["builder"]}))
            .await;
        ids.push(task.id.to_string());
    }
    let done = cluster.wait_all(&ids, Duration::from_secs(180)).await;
    let completed = done
        .iter()
        .filter(|t| t.status == TaskStatus::Completed)
        .count();
    assert_eq!(completed, agents as usize, "{}", cluster.logs());
    assert_eq!(fake.message_requests().len(), 41 * agents as usize);
}
