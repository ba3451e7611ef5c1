//! The chaos suite: workers killed, paused and drained under load, NATS and Redis restarted
//! (Redis once with its data and once wiped), duplicate submits; a ledger check after each
//! says what was lost, duplicated or charged twice, and a stuck-run detector fails fast with
//! the state of the tasks that stopped moving.
//!
//! The default test command runs a short version. `ORCH_CHAOS_FULL=1 cargo nextest run -p
//! orch-tests --test chaos --no-capture` runs the full one (500 tasks per load scenario) and
//! prints the figures recorded in docs/reliability.md.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Task, TaskStatus};
use orch_shared::ids::JobId;
use orch_tests::ledger::{assert_clean, check, submit_many};
use orch_tests::{Cluster, Options, procs};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(600);

/// Tasks per load scenario: a short run by default, 500 with `ORCH_CHAOS_FULL=1`.
fn load(short: usize) -> usize {
    if std::env::var_os("ORCH_CHAOS_FULL").is_some() {
        500
    } else {
        short
    }
}

/// A cluster whose jobs are redelivered 2 s after their worker stops acking them.
async fn short_ack_wait_cluster() -> Cluster {
    Cluster::start(Options {
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_every_second_lose_no_task_and_charge_nothing_twice() {
    let mut cluster = Cluster::start(Options {
        workers: 3,
        slots: 4,
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let n = load(60);
    let ids = submit_many(&cluster, n, 400).await;
    let mut kills = 0;
    // What a killed worker had started and still ran a second after its death.
    let mut orphans = vec![];
    let deadline = Instant::now() + Duration::from_millis(100 * n as u64);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let victim = kills % cluster.workers.len();
        let family = procs::descendants(cluster.workers[victim].pid() as u32);
        cluster.workers[victim].signal(libc::SIGKILL);
        let _ = cluster.workers[victim].wait_exit(Duration::from_secs(5));
        orphans.extend(procs::wait_gone(&family, Duration::from_secs(1)));
        kills += 1;
        let fresh = cluster.add_worker();
        cluster.workers.swap(victim, fresh);
        cluster.workers.pop();
    }
    let ledger = check(&cluster, &ids).await;
    assert_clean(&ledger, &cluster);
    assert!(
        orphans.is_empty(),
        "killed workers left processes: {orphans:?}"
    );
    eprintln!(
        "{kills} workers killed; {} jobs ran twice",
        ledger.duplicate_starts
    );
    // Only a job held by a killed worker can run twice: at most one per slot per kill.
    assert!(
        ledger.duplicate_starts <= kills * 4,
        "{} duplicates for {kills} kills",
        ledger.duplicate_starts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_that_wakes_after_its_job_moved_on_is_fenced_out() {
    let cluster = Cluster::start(Options {
        workers: 2,
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "slow", "roles": ["builder"], "sim": {"latency_ms": 3000}}))
        .await;
    let id = task.id.to_string();
    let victim = cluster.running_on(&id, 0).await;
    cluster.workers[victim].signal(libc::SIGSTOP);
    // Past the ack wait JetStream gives the job to the other worker, which finishes it.
    let task = cluster.wait_task(&id, WAIT).await;
    cluster.workers[victim].signal(libc::SIGCONT);
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(
        task.jobs[0].worker_id.as_ref().unwrap().0,
        format!("worker-{}", 1 - victim)
    );
    // The woken worker notices it lost the lease and drops its copy: nothing more is applied.
    let log = &cluster.workers[victim].log;
    cluster
        .eventually(Duration::from_secs(10), || async {
            match orch_tests::log_contains(log, "lease lost") {
                true => Ok(()),
                false => Err("the paused worker never noticed"),
            }
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.task(&id).await;
    assert_eq!(after.cost_usd, task.cost_usd, "the late worker was charged");
    assert_eq!(after.jobs[0].worker_id, task.jobs[0].worker_id);
    let ledger = check(&cluster, &[id]).await;
    assert_clean(&ledger, &cluster);
    assert_eq!(
        ledger.duplicate_starts, 1,
        "the paused attempt started twice (once per worker)"
    );
}

/// A `command` agent held at a gate: the first run of the attempt waits for `go-1`, the next
/// for `go-2` (`mkdir` is atomic); each says it started (`run-<n>`) and leaves `exited-<n>`.
const GATED: &str = r#"cat > /dev/null
if mkdir "$GATE_DIR/run-1" 2>/dev/null; then n=1; else n=2; mkdir -p "$GATE_DIR/run-2"; fi
while [ ! -e "$GATE_DIR/go-$n" ]; do sleep 0.05; done
touch "$GATE_DIR/exited-$n"
printf '## Summary\ndone by run %s\n' "$n"
"#;

/// Waits until `path` exists.
async fn appears(cluster: &Cluster, path: &std::path::Path) {
    cluster
        .eventually(Duration::from_secs(30), || async {
            match path.exists() {
                true => Ok(()),
                false => Err(format!("{} never appeared", path.display())),
            }
        })
        .await;
}

/// The interleaving NATS node losses produce (found by `hosts.rs`): a worker's result is
/// stored late, after its job was redelivered to another worker, which took a new lease. The
/// late result is fenced out; the new holder's result, published afterwards, must be stored and
/// applied (with one message id per attempt, JetStream dropped it as a duplicate of the late
/// one, and the task stayed running forever). The worker is held in its result's publish by
/// pausing the NATS server, then the worker itself, while the agent ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stored_after_its_job_moved_on_leaves_the_new_holders_result_to_apply() {
    let gates = tempfile::tempdir().unwrap();
    let config = gates.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {GATED:?}]\n\
             prompt = \"stdin\"\npass_env = [\"GATE_DIR\"]\n"
        ),
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 2,
        // One slot: a worker busy with the job has no pull open that could take it again.
        slots: 1,
        ack_wait: Duration::from_secs(2),
        // Sandbox off: the agent's gates are outside its workspace.
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--sandbox".into(),
            "off".into(),
        ],
        worker_env: vec![("GATE_DIR".into(), gates.path().display().to_string())],
        ..Options::default()
    })
    .await;
    let gate = |name: &str| gates.path().join(name);
    let task = cluster
        .submit(json!({"prompt": "gated", "roles": ["builder"], "backend": "command"}))
        .await;
    let id = task.id.to_string();
    let first = cluster.running_on(&id, 0).await;
    appears(&cluster, &gate("run-1")).await;

    // The agent ends while NATS is paused: the worker checks its lease (held) and waits for
    // its events to be stored; then it is paused itself, before it publishes its result.
    cluster.nats.signal(libc::SIGSTOP);
    std::fs::write(gate("go-1"), "").unwrap();
    appears(&cluster, &gate("exited-1")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.workers[first].signal(libc::SIGSTOP);
    cluster.nats.signal(libc::SIGCONT);
    // Past the ack wait the job goes to the other worker, which takes a new lease.
    appears(&cluster, &gate("run-2")).await;
    // The first worker wakes and publishes its result, now stale: fenced out, and the worker
    // leaves the attempt to the holder.
    cluster.workers[first].signal(libc::SIGCONT);
    let log = cluster.workers[first].log.clone();
    cluster
        .eventually(Duration::from_secs(30), || async {
            match orch_tests::log_contains(&log, "lease taken over after the result was published")
            {
                true => Ok(()),
                false => Err("the first worker never published its late result"),
            }
        })
        .await;
    // The holder finishes: its result is the one applied.
    std::fs::write(gate("go-2"), "").unwrap();
    let ledger = check(&cluster, std::slice::from_ref(&id)).await;
    assert_clean(&ledger, &cluster);
    let task = cluster.task(&id).await;
    assert_eq!(task.status, TaskStatus::Completed, "{task:#?}");
    assert!(
        task.jobs[0]
            .output
            .as_deref()
            .unwrap_or_default()
            .contains("done by run 2"),
        "{task:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_every_worker_drains_or_hands_back_without_loss() {
    let mut cluster = Cluster::start(Options {
        workers: 2,
        slots: 3,
        drain_grace: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let ids = submit_many(&cluster, load(20), 700).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    for w in &cluster.workers {
        w.signal(libc::SIGTERM);
    }
    for w in cluster.workers.iter_mut() {
        assert_eq!(
            w.wait_exit(Duration::from_secs(20)),
            Some(Some(0)),
            "a worker did not drain cleanly"
        );
    }
    let drain = started.elapsed();
    eprintln!("drain time of 2 workers with 6 busy slots: {drain:?}");
    assert!(
        drain < Duration::from_secs(5),
        "drain took {drain:?} with a 1 s grace"
    );
    cluster.add_worker();
    cluster.add_worker();
    let ledger = check(&cluster, &ids).await;
    assert_clean(&ledger, &cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_submits_create_one_task() {
    let cluster = Cluster::start(Options::default()).await;
    let body = json!({"prompt": "once", "idempotency_key": "race-1", "roles": ["builder"]});
    let posts = (0..12).map(|_| cluster.post("/v1/tasks", &body));
    let answers = futures::future::join_all(posts).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, v)| {
            assert!(status.is_success(), "{status} {v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one key, several tasks: {ids:?}");
    let created = answers.iter().filter(|(s, _)| s.as_u16() == 201).count();
    assert_eq!(created, 1);
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    let ledger = check(&cluster, &ids.into_iter().collect::<Vec<_>>()).await;
    assert_clean(&ledger, &cluster);
    assert_eq!(ledger.duplicate_starts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_loses_no_job_or_result() {
    let mut cluster = short_ack_wait_cluster().await;
    let ids = submit_many(&cluster, load(30), 300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let down = Instant::now();
    cluster.restart_nats();
    eprintln!("nats-server back after {:?}", down.elapsed());
    let ledger = check(&cluster, &ids).await;
    assert_clean(&ledger, &cluster);
    // Submitting works again too.
    let more = submit_many(&cluster, 3, 0).await;
    assert_clean(&check(&cluster, &more).await, &cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_its_data_loses_nothing() {
    let mut cluster = short_ack_wait_cluster().await;
    let ids = submit_many(&cluster, load(30), 300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart_redis(false);
    let ledger = check(&cluster, &ids).await;
    assert_clean(&ledger, &cluster);
}

/// A task submitted while Redis is down: its job is published at once and its record is
/// written as soon as Redis is back, so the submit answers 201 and the task runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_while_redis_restarts_is_accepted_and_runs_once() {
    let mut cluster = short_ack_wait_cluster().await;
    cluster.kill_redis();
    let submit = {
        let (http, url) = (cluster.http().clone(), cluster.url.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/tasks"))
                .bearer_auth(orch_tests::TOKEN)
                .json(&json!({"prompt": "submitted during a restart", "roles": ["builder"]}))
                .send()
                .await
                .expect("POST reaches the coordinator");
            (
                r.status(),
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.start_redis();
    let (status, body) = submit.await.unwrap();
    assert_eq!(status, 201, "{body}\n{}", cluster.logs());
    let id = body["id"].as_str().unwrap().to_string();
    let ledger = check(&cluster, std::slice::from_ref(&id)).await;
    assert_clean(&ledger, &cluster);
    let (_, list) = cluster.get("/v1/tasks").await;
    assert!(
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "the task is in the history: {list}"
    );
}

/// The cluster's JetStream stream `name`, to look at what it stores.
async fn stream(cluster: &Cluster, name: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(&cluster.nats_url).await.unwrap();
    async_nats::jetstream::new(client)
        .get_stream(name)
        .await
        .unwrap()
}

/// A task that has not changed since its creation has no snapshot of its own: its record
/// lives in its creation message, and a rebuild of a wiped Redis finds it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_known_only_by_its_creation_message_is_rebuilt() {
    let mut cluster = short_ack_wait_cluster().await;
    let task = cluster
        .submit(json!({"prompt": "a long one", "roles": ["builder"], "sim": {"latency_ms": 3000}}))
        .await;
    let id = task.id.to_string();
    let snapshots = stream(&cluster, orch_shared::subject::TASKS_STREAM).await;
    let snapshot = orch_shared::subject::task_snapshot(task.id);
    cluster.running_on(&id, 0).await;
    assert!(
        snapshots
            .get_last_raw_message_by_subject(&snapshot)
            .await
            .is_err(),
        "a running task that never changed has no snapshot"
    );
    cluster.rebuild_redis_from_the_log().await;
    let done = cluster.wait_task(&id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Completed, "{}", cluster.logs());
    assert_eq!(done.prompt, task.prompt);
    assert!(
        snapshots
            .get_last_raw_message_by_subject(&snapshot)
            .await
            .is_ok(),
        "its end is snapshotted"
    );
}

/// A task that outlives half of the event log's max age is snapshotted as it changes, so it
/// is rebuilt after Redis is wiped even though its creation message has left the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_older_than_its_creation_message_is_rebuilt_from_its_snapshots() {
    let mut cluster = Cluster::start(Options {
        ack_wait: Duration::from_secs(2),
        coordinator_args: ["--events-max-age", "3s", "--dedup-window", "2s"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    let steps = ["analyst", "planner", "builder", "tester", "reviewer"];
    let task = cluster
        .submit(json!({"prompt": "five slow steps", "roles": steps, "sim": {"latency_ms": 1500}}))
        .await;
    let id = task.id.to_string();
    let events = stream(&cluster, orch_shared::subject::EVENTS_STREAM).await;
    let created = orch_shared::subject::event_created(task.id);
    cluster
        .eventually(Duration::from_secs(20), || async {
            match events.get_last_raw_message_by_subject(&created).await {
                Err(_) => Ok(()),
                Ok(_) => Err("the creation message never expired"),
            }
        })
        .await;
    assert!(
        !cluster.task(&id).await.status.is_terminal(),
        "the task must still run when Redis goes (slow steps)"
    );
    cluster.rebuild_redis_from_the_log().await;
    let done = cluster.wait_task(&id, WAIT).await;
    assert_eq!(done.status, TaskStatus::Completed, "{}", cluster.logs());
    assert_eq!(done.jobs.len(), steps.len());
}

/// A submit while Redis stays down fails with 503 and leaves no task behind: none in the
/// history once Redis is back, none brought back by a rebuild from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_that_cannot_be_recorded_fails_and_leaves_nothing() {
    let mut cluster = short_ack_wait_cluster().await;
    cluster.kill_redis();
    let (status, body) = cluster
        .post(
            "/v1/tasks",
            &json!({"prompt": "never recorded", "roles": ["builder"]}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");
    // Back empty: the rebuild finds nothing of the task in the log either.
    let _ = std::fs::remove_dir_all(cluster.dir.path().join("redis"));
    cluster.start_redis();
    cluster.restart_coordinator().await;
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]), "{list}\n{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_redis_is_rebuilt_from_the_log_with_history_and_costs() {
    let mut cluster = short_ack_wait_cluster().await;
    // Some tasks finish before the loss, some run through it.
    let before = submit_many(&cluster, 5, 0).await;
    let done_before: Vec<Task> = cluster.wait_all(&before, WAIT).await;
    let during = submit_many(&cluster, load(20), 400).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.rebuild_redis_from_the_log().await;
    // History from before the loss is back, exactly.
    for old in &done_before {
        let now = cluster.task(&old.id.to_string()).await;
        assert_eq!(now.status, TaskStatus::Completed);
        assert_eq!(now.cost_usd, old.cost_usd);
        assert_eq!(now.usage, old.usage);
    }
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    let ledger = check(&cluster, &all).await;
    assert_clean(&ledger, &cluster);
    // Every task is back in the history index: page through it.
    let mut listed = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/tasks?limit=100&cursor={c}"),
            None => "/v1/tasks?limit=100".to_string(),
        };
        let (_, page) = cluster.get(&path).await;
        listed += page["tasks"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(listed, all.len(), "the history index was rebuilt");
    assert!(orch_tests::log_contains(
        &cluster.coordinator.log,
        "Redis rebuilt from the durable log"
    ));
    // The day's figures on the status page are kept as results arrive and rebuilt from the
    // log too: they equal the sums over the tasks (unless the test ran across midnight UTC).
    let tasks = cluster.wait_all(&all, WAIT).await;
    let (_, status) = cluster.get("/v1/status").await;
    let today = &status["cost_today"];
    let since = today["since_ms"].as_u64().unwrap();
    if tasks.iter().all(|t| t.created_at_ms >= since) {
        assert_eq!(today["tasks"], all.len(), "{today}");
        let mut usage = orch_shared::job::Usage::default();
        let mut cost = 0.0;
        for t in &tasks {
            usage.add(&t.usage);
            cost += t.cost_usd;
        }
        let got: orch_shared::job::Usage = serde_json::from_value(today["usage"].clone()).unwrap();
        assert_eq!(got, usage, "{today}");
        let day_cost = today["cost_usd"].as_f64().unwrap();
        assert!((day_cost - cost).abs() < 1e-9, "{day_cost} vs {cost}");
        assert_eq!(today["truncated"], false);
    }
}

/// Two deliveries of one attempt at once (JetStream can redeliver right after a restart): the
/// later claim takes the lease, and the earlier holder, whose result the coordinator fences
/// out, must neither mark the attempt done nor ack it — either would end the holder's run
/// (a hand-back of its delivery would then find nothing to redeliver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_its_lease_leaves_the_attempt_to_the_new_holder() {
    use orch_shared::ids::WorkerId;
    use orch_worker::state::{Claim, State};
    let dir = tempfile::tempdir().unwrap();
    let (_redis, url) = orch_tests::redis(dir.path());
    let state = State::connect(&orch_config::redis::Redis::from_url(&url).unwrap())
        .await
        .unwrap();
    let job = JobId::new();
    let ttl = Duration::from_secs(30);
    let claim = |w: &str| {
        let state = state.clone();
        let w = WorkerId(w.into());
        async move {
            match state.claim(&w, job, 1, ttl).await.unwrap() {
                Claim::Leased(l) => l,
                Claim::Skip(why) => panic!("skipped: {why}"),
            }
        }
    };
    let first = claim("w1").await;
    let second = claim("w2").await;
    assert!(second.fence > first.fence);
    assert!(
        !state.finish(job, 1, Some(&first)).await.unwrap(),
        "the stale holder must not finish the attempt"
    );
    // Nor once no lease is held (the holder let it go, or it expired): the attempt's fence
    // moved past the stale holder's, so the coordinator fences its result out.
    state.release(&second).await.unwrap();
    assert!(
        !state.finish(job, 1, Some(&first)).await.unwrap(),
        "the stale holder must not finish the attempt once the lease is gone"
    );
    // Nothing was marked: the attempt can still be claimed (it is not "done").
    assert!(matches!(
        state
            .claim(&WorkerId("w3".into()), job, 1, ttl)
            .await
            .unwrap(),
        Claim::Leased(_)
    ));
    // The holder of the latest lease finishes it; later deliveries are skipped.
    let last = claim("w4").await;
    assert!(state.finish(job, 1, Some(&last)).await.unwrap());
    assert!(matches!(
        state
            .claim(&WorkerId("w5".into()), job, 1, ttl)
            .await
            .unwrap(),
        Claim::Skip(_)
    ));
    // A run without a lease (Redis was unreachable when it started) always marks.
    let other = JobId::new();
    assert!(state.finish(other, 1, None).await.unwrap());
}
