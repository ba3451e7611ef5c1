//! Provider usage limits: credential pools, the limit broker in Redis and parked jobs.
//!
//! Whole clusters (real nats-server, redis-server, coordinator and workers) whose `anthropic`
//! backend has a pool of named keys, against the fake Messages API, which enforces usage
//! limits per key (`x-api-key`) as the provider does: 429 with `retry-after` and the
//! `anthropic-ratelimit-*` headers.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{DeadLetterList, JobStatus, QuotaList, Task};
use orch_shared::event::EventKind;
use orch_shared::job::FailureReason;
use orch_shared::keys;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_tests::{Cluster, Options, assert_completed, orchctl_against, run};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MODEL: &str = "claude-sonnet-4-5";

/// A worker config file giving the `anthropic` backend the pool `keys` (name, key), in order.
fn pool_config(dir: &std::path::Path, fake: &FakeAnthropic, pool: &[(&str, &str)]) -> PathBuf {
    let entries: Vec<String> = pool
        .iter()
        .map(|(name, key)| format!("{{ name = \"{name}\", api_key = \"{key}\" }}"))
        .collect();
    let path = dir.join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "[backends.anthropic]\nbase_url = \"{}\"\ncredentials = [{}]\n",
            fake.url,
            entries.join(", ")
        ),
    )
    .unwrap();
    path
}

async fn pooled_cluster(
    fake: &FakeAnthropic,
    pool: &[(&str, &str)],
    workers: usize,
    slots: u32,
) -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = pool_config(dir.path(), fake, pool);
    let cluster = Cluster::start(Options {
        workers,
        slots,
        // The tests' jobs are all `anthropic`: a worker pulling only that queue gives each
        // job its slot at once (with one slot, a `sim` queue would hold it in turn).
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--serve-backends".into(),
            "anthropic".into(),
        ],
        ..Options::default()
    })
    .await;
    (cluster, dir)
}

fn analyst_task(prompt: &str) -> serde_json::Value {
    json!({"prompt": prompt, "roles": ["analyst"], "backend": "anthropic", "model": MODEL})
}

async fn redis(cluster: &Cluster) -> redis::aio::MultiplexedConnection {
    redis::Client::open(cluster.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// How many jobs wait in the parked set.
async fn parked(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64, String> {
    redis::cmd("ZCARD")
        .arg(keys::PARKED)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())
}

/// Waits until exactly `n` jobs are parked.
async fn until_parked(cluster: &Cluster, n: u64, within: Duration) {
    let conn = redis(cluster).await;
    cluster
        .eventually(within, || {
            let mut conn = conn.clone();
            async move {
                match parked(&mut conn).await? {
                    k if k == n => Ok(()),
                    k => Err(format!("{k} parked, waiting for {n}")),
                }
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_an_exhausted_credential_moves_once_to_one_with_room() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("done on some key")).await;
    fake.exhaust_key("key-a", Duration::from_secs(3));
    let (cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a"), ("b", "key-b")], 1, 2).await;

    let task = cluster.submit(analyst_task("summarise")).await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(30))
        .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 1, "the move burnt no attempt");
    // One 429 on A, then B.
    assert_eq!(fake.requests_with_key("key-a").len(), 1);
    assert_eq!(fake.requests_with_key("key-b").len(), 1);
    // The broker now holds A exhausted for every worker: the next job goes to B at once.
    let mut conn = redis(&cluster).await;
    let until: u64 = redis::cmd("HGET")
        .arg(keys::limit("anthropic", "a"))
        .arg(keys::limit_field::UNTIL_MS)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(until > orch_shared::now_ms(), "A is held exhausted");
    let next = cluster.submit(analyst_task("again")).await;
    let next = cluster
        .wait_task(&next.id.to_string(), Duration::from_secs(30))
        .await;
    assert_completed(&cluster, &next);
    assert_eq!(
        fake.requests_with_key("key-a").len(),
        1,
        "A was not asked again"
    );
    assert_eq!(fake.requests_with_key("key-b").len(), 2);
    // No key appears in what the cluster says about itself.
    let logs = cluster.logs();
    assert!(
        !logs.contains("key-a") && !logs.contains("key-b"),
        "a key was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_only_credential_is_exhausted_parks_and_resumes_at_the_reset() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("done after the reset")).await;
    let period = Duration::from_secs(3);
    fake.exhaust_key("key-a", period);
    let reset = Instant::now() + period;
    let (cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a")], 2, 2).await;

    let task = cluster.submit(analyst_task("summarise")).await;
    let id = task.id.to_string();
    // Parked: in the parked set, and no worker holds it.
    let mut conn = redis(&cluster).await;
    until_parked(&cluster, 1, Duration::from_secs(10)).await;
    // `orchctl quotas` says so while it waits (judged at the coordinator's clock).
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) =
        run(orchctl_against(&cluster, home.path()).args(["quotas", "-o", "json"]));
    assert_eq!(code, 0, "{err}");
    let quotas: QuotaList = serde_json::from_str(&out).unwrap();
    let a = quotas
        .credentials
        .iter()
        .find(|q| q.backend == "anthropic" && q.name == "a")
        .unwrap_or_else(|| panic!("no credential anthropic/a: {quotas:?}"));
    if a.until_ms.is_some_and(|u| u > quotas.now_ms + 300) {
        assert_eq!(a.state, "exhausted", "{quotas:?}");
        assert_eq!((a.parked, quotas.parked), (1, 1), "{quotas:?}");
    }
    let (code, table, _) = run(orchctl_against(&cluster, home.path()).arg("quotas"));
    assert_eq!(code, 0);
    assert!(
        table.contains("CREDENTIAL") && table.contains("anthropic"),
        "{table}"
    );
    assert!(
        !out.contains("key-a") && !table.contains("key-a"),
        "a key was shown"
    );
    assert!(a.exhausted_total >= 1);
    let task = cluster.wait_task(&id, Duration::from_secs(30)).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 1, "parking burnt no attempt");
    assert_eq!(task.jobs[0].status, JobStatus::Succeeded);
    // The 429, then nothing until the reset, then the run.
    let reqs = fake.requests_with_key("key-a");
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert!(
        reqs[1].at >= reset,
        "the fake was asked while the job was parked"
    );
    assert_eq!(
        parked(&mut conn).await.unwrap(),
        0,
        "the resumed job left the parked set"
    );
    // The user saw why it waited.
    let events = cluster.events(&id, None).await;
    assert!(
        events.iter().any(|(_, e)| matches!(&e.kind,
            EventKind::JobWaiting { reason } if reason.contains("parked") && reason.contains("anthropic/a"))),
        "no job_waiting event naming the credential"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_small_pool_parks_and_finishes_every_job_once() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("ok")).await;
    let window = Duration::from_secs(2);
    fake.window_key("key-a", 5, window);
    fake.window_key("key-b", 5, window);
    let (cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a"), ("b", "key-b")], 2, 8).await;

    let mut ids = vec![];
    for i in 0..50 {
        let priority = if i % 2 == 0 { "low" } else { "high" };
        let mut body = analyst_task(&format!("job {i}"));
        body["priority"] = json!(priority);
        ids.push(cluster.submit(body).await.id.to_string());
    }
    let tasks: Vec<Task> = cluster.wait_all(&ids, Duration::from_secs(120)).await;
    for t in &tasks {
        assert_completed(&cluster, t);
        assert_eq!(t.jobs[0].attempt, 1, "a job burnt an attempt");
    }
    let (_, dead) = cluster.get("/v1/dlq").await;
    let dead: DeadLetterList = serde_json::from_value(dead).unwrap();
    assert!(dead.jobs.is_empty(), "dead letters: {:?}", dead.jobs);
    // Each job was answered exactly once (a 200 per job, none lost, none run twice).
    assert_eq!(fake.messages_served(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_jobs_go_back_to_the_queue_by_task_priority() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("ok")).await;
    fake.exhaust_key("key-a", Duration::from_secs(4));
    let (cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a")], 1, 1).await;
    let mut ids = vec![];
    for (i, priority) in ["low", "low", "low", "high", "high", "high"]
        .iter()
        .enumerate()
    {
        let mut body = analyst_task(&format!("zq-{priority}-{i}"));
        body["priority"] = json!(priority);
        ids.push(cluster.submit(body).await.id.to_string());
    }
    for t in cluster.wait_all(&ids, Duration::from_secs(60)).await {
        assert_completed(&cluster, &t);
    }
    // One 429 taught the broker; every job parked until the same reset and came back highest
    // priority first.
    let answered: Vec<String> = fake
        .requests_with_key("key-a")
        .iter()
        .skip(1)
        .map(|r| r.body.to_string())
        .collect();
    assert_eq!(answered.len(), 6, "{answered:#?}");
    let high_first = answered.iter().take(3).all(|b| b.contains("zq-high-"));
    assert!(high_first, "{answered:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_outlives_every_worker_and_resumes_on_a_new_one() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("done elsewhere")).await;
    fake.exhaust_key("key-a", Duration::from_secs(3));
    let (mut cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a")], 1, 1).await;
    let task = cluster.submit(analyst_task("summarise")).await;
    let id = task.id.to_string();
    let mut conn = redis(&cluster).await;
    until_parked(&cluster, 1, Duration::from_secs(10)).await;
    // The only worker dies: the job is in Redis, not in any worker.
    cluster.workers[0].signal(libc::SIGKILL);
    assert!(
        cluster.workers[0]
            .wait_exit(Duration::from_secs(10))
            .is_some()
    );
    tokio::time::sleep(Duration::from_secs(4)).await; // past the reset, with no worker at all
    assert_eq!(
        parked(&mut conn).await.unwrap(),
        1,
        "the parked job was lost with its worker"
    );
    cluster.add_worker();
    let task = cluster.wait_task(&id, Duration::from_secs(30)).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 1);
    assert_eq!(fake.requests_with_key("key-a").len(), 2);
}

/// Never lie: an agent refused a tool it asked for does not end as a plain success; the task
/// fails with `needs_attention` naming the denial and `submit --follow` exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_tool_call_ends_needs_attention_and_follow_exits_non_zero() {
    let fake = FakeAnthropic::start([
        Reply::tool_use("write_file", json!({"path": "fix.rs", "content": "x"})),
        Reply::text("I could not write the fix."),
    ])
    .await;
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-limits".into()),
        ],
        ..Options::default()
    })
    .await;
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "submit",
        "review the fix",
        "--roles",
        "reviewer",
        "--backend",
        "anthropic",
        "--model",
        MODEL,
        "--workspace",
        &work.path().display().to_string(),
        "--follow",
        "--output",
        "json",
    ]));
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let task: Task = serde_json::from_str(&stdout).expect("--output json prints the task");
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed);
    let error = job.error.as_ref().expect("the job says why");
    assert_eq!(error.reason, FailureReason::NeedsAttention);
    assert!(error.message.contains("write_file"), "{}", error.message);
    assert!(!work.path().join("fix.rs").exists());
}

/// A further turn of a conversation whose credential is exhausted parks, and resumes at the
/// reset from the same stored session, with its attempt count unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_turn_resumes_from_its_session_at_the_reset() {
    let fake = FakeAnthropic::start_with_fallback(
        [Reply::text("A1: noted 42.")],
        Reply::text("A2: it was 42."),
    )
    .await;
    let (cluster, _dir) = pooled_cluster(&fake, &[("a", "key-a")], 2, 2).await;
    let task = cluster
        .submit(json!({"prompt": "U1: remember 42", "roles": ["analyst"],
                       "backend": "anthropic", "model": MODEL}))
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(30)).await;
    assert_completed(&cluster, &task);
    let first = task.jobs[0].id;

    let period = Duration::from_secs(3);
    fake.exhaust_key("key-a", period);
    let reset = Instant::now() + period;
    let (status, v) = cluster
        .post(
            &format!("/v1/agents/{first}/send"),
            &json!({"message": "U2: what was it?"}),
        )
        .await;
    assert!(status.is_success(), "{status} {v}");
    let second: orch_shared::ids::JobId = v["agent_id"].as_str().unwrap().parse().unwrap();
    let job = cluster
        .eventually(Duration::from_secs(30), || async {
            let t = cluster.task(&id).await;
            match t.jobs.iter().find(|j| j.id == second) {
                Some(j) if j.status.is_terminal() => Ok(j.clone()),
                _ => Err(format!("turn {second} did not finish: {t:#?}")),
            }
        })
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:#?}");
    assert_eq!(job.attempt, 1, "parking burnt no attempt");
    assert_eq!(job.output.as_deref(), Some("A2: it was 42."));
    // The 429, nothing while parked, then the turn with the first turn's conversation.
    let reqs = fake.requests_with_key("key-a");
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    assert!(reqs[2].at >= reset, "asked while parked");
    let sent = reqs[2].body["messages"].to_string();
    assert!(
        sent.contains("U1: remember 42")
            && sent.contains("A1: noted 42.")
            && sent.contains("U2: what was it?"),
        "{sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_pool_moves_a_job_off_a_limited_key() {
    let fake = FakeOpenAi::start([fake_openai::Reply::text("done on the second key")]).await;
    fake.exhaust_key("oa-key-a", Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[backends.openai]\nbase_url = \"{}\"\ncredentials = [{{ name = \"a\", api_key = \"oa-key-a\" }}, {{ name = \"b\", api_key_env = \"ORCH_TEST_OPENAI_KEY_B\" }}]\n",
            fake.url
        ),
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        worker_env: vec![("ORCH_TEST_OPENAI_KEY_B".into(), "oa-key-b".into())],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(
            json!({"prompt": "summarise", "roles": ["analyst"], "backend": "openai",
                       "model": "qwen2.5-coder"}),
        )
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(30))
        .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].attempt, 1);
    let keys: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.headers.get("authorization").cloned())
        .collect();
    assert_eq!(keys, ["Bearer oa-key-a", "Bearer oa-key-b"]);
    let (_, quotas) = cluster.get("/v1/quotas").await;
    let quotas: QuotaList = serde_json::from_value(quotas).unwrap();
    let a = quotas
        .credentials
        .iter()
        .find(|q| q.backend == "openai" && q.name == "a")
        .unwrap_or_else(|| panic!("{quotas:?}"));
    assert_eq!(a.state, "exhausted");
    assert_eq!(
        (a.requests_limit, a.requests_remaining),
        (Some(10), Some(0))
    );
}

/// A cluster whose coordinator runs one agent at a time (`--max-running-agents 1`), with one
/// worker serving the `anthropic` pool `a` (`key-a`, exhausted for an hour) and `sim`; and the
/// id of a task whose job is parked on `a`.
async fn capped_cluster_with_a_parked_job(
    fake: &FakeAnthropic,
) -> (Cluster, tempfile::TempDir, String) {
    fake.exhaust_key("key-a", Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let config = pool_config(dir.path(), fake, &[("a", "key-a")]);
    let cluster = Cluster::start(Options {
        workers: 1,
        slots: 2,
        coordinator_args: vec!["--max-running-agents".into(), "1".into()],
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--serve-backends".into(),
            "anthropic,sim".into(),
        ],
        ..Options::default()
    })
    .await;
    let parked = cluster
        .submit(analyst_task("summarise"))
        .await
        .id
        .to_string();
    cluster
        .eventually(Duration::from_secs(20), || {
            let (cluster, id) = (&cluster, parked.clone());
            async move {
                let task = cluster.task(&id).await;
                match task.jobs[0].status {
                    JobStatus::Parked => Ok(()),
                    s => Err(format!("the first job is {s:?}")),
                }
            }
        })
        .await;
    (cluster, dir, parked)
}

/// The reset of credential `a`, as the clock would bring it: the fake has room again, the
/// broker's record says so, and the parked job is due.
async fn reset_now(cluster: &Cluster, fake: &FakeAnthropic) {
    let mut conn = redis(cluster).await;
    fake.exhaust_key("key-a", Duration::ZERO);
    let now = orch_shared::now_ms();
    let _: () = redis::cmd("HSET")
        .arg(keys::limit("anthropic", "a"))
        .arg(keys::limit_field::UNTIL_MS)
        .arg(now)
        .query_async(&mut conn)
        .await
        .unwrap();
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys::PARKED)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    let _: () = redis::cmd("ZADD")
        .arg(keys::PARKED)
        .arg(now)
        .arg(&members[0])
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// With a cluster cap of one running agent, a parked job frees its place: another task's job
/// runs and completes while the first is parked. The reset comes while that job still runs:
/// the first job waits for the place (the coordinator's admission wakes it, not a worker),
/// then takes it and completes with the same attempt.
///
/// The credential's window is an hour long and the test ends it itself once the second job
/// runs, so nothing depends on timing: however late the reset is seen, the resumed run must
/// start after the other job ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_frees_its_place_under_the_cap_and_takes_one_again_to_resume() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("done after the reset")).await;
    let (cluster, _dir, parked) = capped_cluster_with_a_parked_job(&fake).await;

    // The only place is free: another task's job runs meanwhile.
    let other = cluster
        .submit(json!({"prompt": "meanwhile", "roles": ["analyst"], "backend": "sim", "sim": {"latency_ms": 3000}}))
        .await
        .id
        .to_string();
    cluster.wait_running(&other, 0).await;
    assert_eq!(
        fake.requests_with_key("key-a").len(),
        1,
        "asked while parked"
    );

    reset_now(&cluster, &fake).await;
    let other = cluster.wait_task(&other, Duration::from_secs(60)).await;
    assert_completed(&cluster, &other);
    let first = cluster.wait_task(&parked, Duration::from_secs(60)).await;
    assert_completed(&cluster, &first);
    assert_eq!(first.jobs[0].attempt, 1, "parking burnt no attempt");
    assert_eq!(fake.requests_with_key("key-a").len(), 2);
    // The cap held: the resumed run started after the other task's job ended.
    let other_end = other.jobs[0].finished_at_ms.unwrap();
    let resumed_start = cluster
        .events(&parked, None)
        .await
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::JobStarted { .. }))
        .map(|(_, e)| e.at_ms)
        .max()
        .unwrap();
    assert!(
        resumed_start >= other_end,
        "the resumed run started at {resumed_start}, before the running job ended at {other_end}: the cap was not held"
    );
    assert!(
        cluster
            .logs()
            .contains("parked job admitted back to its queue"),
        "the coordinator's admission did not wake the parked job"
    );
}

/// A parked job whose task is cancelled does not come back at the reset: it leaves the parked
/// set without running, and the place it would have taken stays free for the next task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_parked_job_does_not_take_a_place_at_the_reset() {
    let fake = FakeAnthropic::start_with_fallback([], Reply::text("never")).await;
    let (cluster, _dir, parked) = capped_cluster_with_a_parked_job(&fake).await;
    let (status, v) = cluster
        .post(&format!("/v1/tasks/{parked}/cancel"), &json!(null))
        .await;
    assert!(status.is_success(), "{status}: {v}");
    cluster
        .eventually(Duration::from_secs(20), || {
            let (cluster, id) = (&cluster, parked.clone());
            async move {
                let task = cluster.task(&id).await;
                match task.jobs[0].status {
                    JobStatus::Cancelled => Ok(()),
                    s => Err(format!("the parked job is {s:?}")),
                }
            }
        })
        .await;

    reset_now(&cluster, &fake).await;
    until_parked(&cluster, 0, Duration::from_secs(20)).await;
    let next = cluster
        .submit(json!({"prompt": "next", "roles": ["analyst"], "backend": "sim"}))
        .await;
    let next = cluster
        .wait_task(&next.id.to_string(), Duration::from_secs(60))
        .await;
    assert_completed(&cluster, &next);
    assert_eq!(
        fake.requests_with_key("key-a").len(),
        1,
        "the cancelled job ran again"
    );
}
