//! Sessions owned by the cluster: the worker stores an agent's session after each turn (the
//! JetStream object store `ORCH_SESSIONS` and the Redis pointer `orch:session:<job>`), and a
//! further turn (`send`) or a fork restores it on whichever worker pulls it.
//!
//! The store against real `nats-server` and `redis-server`; the backends' turns with the real
//! Claude Code CLI and the `anthropic` backend against the fake Messages API (the only fake);
//! and whole clusters driven over HTTP and with `orchctl`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use async_nats::jetstream;
use orch_shared::api::{Job, JobStatus, Task};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::{Backend, FailureReason, JobKind, JobSpec, Outcome, SessionRef};
use orch_shared::keys;
use orch_shared::role::Role;
use orch_shared::subject::{MAX_SESSION_BYTES, SESSIONS_BUCKET};
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_tests::{Cluster, Options, Server, assert_completed, orchctl_against, run};
use orch_worker::agent::backends::Backends;
use orch_worker::agent::{Agent, Events, Report};
use orch_worker::config;
use orch_worker::session::{SessionStore, Snapshot};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "claude-sonnet-4-5";

/// `nats-server` and `redis-server` for the store's own tests.
struct Infra {
    _dir: tempfile::TempDir,
    _nats: Server,
    _redis: Server,
    client: async_nats::Client,
    redis_url: String,
}

async fn infra() -> Infra {
    let dir = tempfile::tempdir().unwrap();
    let (nats, nats_url) = orch_tests::nats(dir.path());
    let (redis, redis_url) = orch_tests::redis(dir.path());
    let client = async_nats::connect(&nats_url).await.unwrap();
    Infra {
        _dir: dir,
        _nats: nats,
        _redis: redis,
        client,
        redis_url,
    }
}

impl Infra {
    /// Creates the sessions bucket, as the coordinator does when it sets up the topology (an
    /// identical create of an existing bucket is accepted).
    async fn create_bucket(&self) {
        jetstream::new(self.client.clone())
            .create_object_store(jetstream::object_store::Config {
                bucket: SESSIONS_BUCKET.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// A worker's session store, once the bucket exists.
    async fn store(&self) -> SessionStore {
        self.create_bucket().await;
        let state = orch_worker::state::State::connect(
            &orch_config::redis::Redis::from_url(&self.redis_url).unwrap(),
        )
        .await
        .expect("redis connects");
        SessionStore::connect(self.client.clone(), state)
            .await
            .expect("the session store opens")
    }

    async fn pointer(&self, job: JobId) -> HashMap<String, Vec<u8>> {
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("HGETALL")
            .arg(keys::session(job))
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The size of object `job` in the bucket, if it is there.
    async fn object(&self, job: JobId) -> Option<usize> {
        let js = jetstream::new(self.client.clone());
        let bucket = js.get_object_store(SESSIONS_BUCKET).await.unwrap();
        bucket.info(job.to_string()).await.ok().map(|i| i.size)
    }
}

/// Only the coordinator creates the sessions bucket (with the cluster's replica count): a
/// worker that starts first waits for it instead of creating a one-replica bucket for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_creates_the_sessions_bucket() {
    let infra = infra().await;
    let state = orch_worker::state::State::connect(
        &orch_config::redis::Redis::from_url(&infra.redis_url).unwrap(),
    )
    .await
    .unwrap();
    let err = SessionStore::connect(infra.client.clone(), state)
        .await
        .err()
        .expect("no bucket yet: the worker must wait for the coordinator");
    assert!(err.to_string().contains(SESSIONS_BUCKET), "{err}");
    let js = jetstream::new(infra.client.clone());
    assert!(
        js.get_object_store(SESSIONS_BUCKET).await.is_err(),
        "the worker created the bucket"
    );
    let _ = infra.store().await;
}

fn field(hash: &HashMap<String, Vec<u8>>, name: &str) -> Option<String> {
    hash.get(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn snapshot(backend: &str, session_id: Option<&str>, turn: u32, bytes: Vec<u8>) -> Snapshot {
    Snapshot {
        backend: backend.into(),
        session_id: session_id.map(str::to_string),
        workspace: "/data/scratch/x-1".into(),
        turn,
        bytes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_small_sessions_in_the_pointer_and_large_ones_as_objects() {
    let infra = infra().await;
    let store = infra.store().await;
    // A second worker finds the same bucket.
    let again = infra.store().await;
    let (small, large) = (JobId::new(), JobId::new());
    assert_eq!(store.load(small).await.unwrap(), None);

    let history = snapshot("sim", None, 1, br#"[{"prompt":"p","answer":"a"}]"#.to_vec());
    store.save(small, &history).await.unwrap();
    assert_eq!(again.load(small).await.unwrap().as_ref(), Some(&history));
    let hash = infra.pointer(small).await;
    assert_eq!(field(&hash, "backend").as_deref(), Some("sim"));
    assert_eq!(field(&hash, "turn").as_deref(), Some("1"));
    assert_eq!(field(&hash, "bytes").as_deref(), Some("29"));
    assert_eq!(field(&hash, "session_id"), None);
    assert!(field(&hash, "saved_at_ms").is_some());
    assert_eq!(
        hash.get(keys::session_field::HISTORY).map(Vec::as_slice),
        Some(history.bytes.as_slice())
    );
    assert_eq!(
        infra.object(small).await,
        None,
        "no object for an inline session"
    );

    // A transcript: an object of several chunks, then the pointer.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let transcript = snapshot("claude-code", Some("sid-1"), 3, bytes);
    store.save(large, &transcript).await.unwrap();
    assert_eq!(again.load(large).await.unwrap().as_ref(), Some(&transcript));
    let hash = infra.pointer(large).await;
    assert_eq!(field(&hash, "session_id").as_deref(), Some("sid-1"));
    assert_eq!(
        field(&hash, "workspace").as_deref(),
        Some("/data/scratch/x-1")
    );
    assert_eq!(field(&hash, "bytes").as_deref(), Some("300000"));
    assert!(!hash.contains_key(keys::session_field::HISTORY));
    assert_eq!(infra.object(large).await, Some(300_000));

    // Saved again (a redelivered turn): the new version whole, nothing of the old one.
    let shorter = snapshot("claude-code", None, 3, b"{}\n".to_vec());
    store.save(large, &shorter).await.unwrap();
    assert_eq!(store.load(large).await.unwrap().as_ref(), Some(&shorter));
    assert_eq!(field(&infra.pointer(large).await, "session_id"), None);

    // Over the limit: refused before anything is written; the job's result says nothing is
    // continuable.
    let huge = JobId::new();
    let too_big = snapshot("anthropic", None, 1, vec![b'x'; MAX_SESSION_BYTES + 1]);
    let err = store.save(huge, &too_big).await.unwrap_err();
    assert!(err.to_string().contains("over the"), "{err}");
    assert!(infra.pointer(huge).await.is_empty());
    let mut spec = job(Role::Builder, Backend::Anthropic, "x");
    spec.job_id = huge;
    assert!(
        store
            .keep(&spec, too_big, Duration::from_secs(10))
            .await
            .is_none()
    );
    // Kept: the backend's id, or the agent's own id for backends without one. For a spec
    // from an older coordinator the worker writes the pointer itself.
    spec.job_id = JobId::new();
    let kept = store
        .keep(&spec, history.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(kept.session_id, spec.job_id.to_string());
    assert!(kept.pointer.is_none());
    assert_eq!(
        store.load(spec.job_id).await.unwrap().as_ref(),
        Some(&history)
    );
    let kept = store
        .keep(&spec, transcript.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(kept.session_id, "sid-1");
    // When the coordinator records sessions, the pointer travels in the result and nothing
    // is written to Redis by the worker; the object is stored all the same.
    spec.records_session = true;
    for (s, inline) in [(&history, true), (&transcript, false)] {
        spec.job_id = JobId::new();
        let kept = store
            .keep(&spec, s.clone(), Duration::from_secs(10))
            .await
            .unwrap();
        let pointer = kept.pointer.expect("the pointer for the result");
        assert!(infra.pointer(spec.job_id).await.is_empty());
        assert_eq!(pointer.inline.is_some(), inline);
        assert_eq!(pointer.bytes, s.bytes.len() as u64);
        assert_eq!(infra.object(spec.job_id).await.is_some(), !inline);
        // Written as the coordinator writes it, it loads as the session.
        store.write_pointer(spec.job_id, &pointer).await.unwrap();
        assert_eq!(store.load(spec.job_id).await.unwrap().as_ref(), Some(s));
    }
    // A planner is never continued: its session is not kept.
    spec.kind = JobKind::Plan;
    spec.job_id = JobId::new();
    assert!(
        store
            .keep(&spec, history, Duration::from_secs(10))
            .await
            .is_none()
    );
    assert!(infra.pointer(spec.job_id).await.is_empty());
}

fn job(role: Role, backend: Backend, prompt: &str) -> JobSpec {
    JobSpec {
        backend,
        ..JobSpec::new(TaskId::new(), JobId::new(), role, prompt)
    }
}

fn continuing(mut j: JobSpec, from: JobId, fork: bool) -> JobSpec {
    j.session = Some(SessionRef {
        from,
        fork,
        checkpoint: None,
    });
    j
}

async fn run_job(backends: &Backends, job: &JobSpec) -> Report {
    let (events, _rx) = Events::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        backends.run_report(job, events, CancellationToken::new()),
    )
    .await
    .expect("the agent finishes")
}

fn failure(report: &Report) -> (FailureReason, String) {
    match &report.output.outcome {
        Outcome::Failure { reason, message } => (*reason, message.clone()),
        o => panic!("expected a failure, got {o:?}: {report:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_without_a_session_of_its_backend_fails_as_a_bad_request() {
    let infra = infra().await;
    let store = infra.store().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config::from_flags([
        "--id".as_ref(),
        "session-test".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
        "--anthropic-base-url".as_ref(),
        "http://127.0.0.1:9".as_ref(),
        "--anthropic-api-key".as_ref(),
        std::ffi::OsStr::new("k"),
    ])
    .unwrap();
    let backends = Backends::from_config(&config).with_sessions(store.clone());

    let nobody = JobId::new();
    let r = run_job(
        &backends,
        &continuing(job(Role::Builder, Backend::Sim, "go on"), nobody, false),
    )
    .await;
    assert_eq!(
        failure(&r),
        (
            FailureReason::BadRequest,
            format!("agent {nobody} has no stored session")
        )
    );

    // A sim agent's first turn, stored as the runner stores it.
    let first = job(Role::Builder, Backend::Sim, "design the cache");
    let r = run_job(&backends, &first).await;
    assert!(r.output.outcome.is_success(), "{r:?}");
    let session = r.session.expect("the sim keeps a session");
    assert_eq!(session.turn, 1);
    store
        .keep(&first, session, Duration::from_secs(10))
        .await
        .unwrap();

    let (reason, message) = failure(
        &run_job(
            &backends,
            &continuing(
                job(Role::Builder, Backend::Anthropic, "go on"),
                first.job_id,
                false,
            ),
        )
        .await,
    );
    assert_eq!(reason, FailureReason::BadRequest);
    assert!(
        message.contains("sim") && message.contains("anthropic"),
        "{message}"
    );
    let (reason, message) = failure(
        &run_job(
            &backends,
            &continuing(
                job(Role::Builder, Backend::Command, "go on"),
                first.job_id,
                false,
            ),
        )
        .await,
    );
    assert_eq!(
        (reason, message.as_str()),
        (
            FailureReason::BadRequest,
            "the command backend keeps no session"
        )
    );

    // The same backend continues: turn 2, with the history.
    let second = continuing(
        job(Role::Builder, Backend::Sim, "add eviction"),
        first.job_id,
        false,
    );
    let r = run_job(&backends, &second).await;
    assert!(r.output.outcome.is_success(), "{r:?}");
    assert!(
        r.output
            .output
            .contains(&format!("Turn 2 (continuing from {})", first.job_id)),
        "{}",
        r.output.output
    );
    assert!(
        r.output
            .output
            .contains("Previous message: design the cache"),
        "{}",
        r.output.output
    );
    let s = r.session.unwrap();
    assert_eq!(s.turn, 2);
    let turns: Vec<Value> = serde_json::from_slice(&s.bytes).unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["prompt"], "design the cache");
    assert_eq!(turns[1]["prompt"], "add eviction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_turn_sends_the_system_prompt_then_the_stored_history() {
    let infra = infra().await;
    let store = infra.store().await;
    let fake = FakeOpenAi::start([
        fake_openai::Reply::text("O1: hello"),
        fake_openai::Reply::text("O2: hello again"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config::from_flags([
        "--id".as_ref(),
        "session-test".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
        "--openai-base-url".as_ref(),
        fake.url.as_ref(),
        "--openai-api-key".as_ref(),
        std::ffi::OsStr::new("k"),
    ])
    .unwrap();
    let backends = Backends::from_config(&config).with_sessions(store.clone());
    let mut first = job(Role::Analyst, Backend::Openai, "U1: greet me");
    first.model = Some("llama3.1:8b".into());
    let r = run_job(&backends, &first).await;
    assert!(r.output.outcome.is_success(), "{r:?}");
    let kept = store
        .keep(&first, r.session.unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(kept.map(|k| k.session_id), Some(first.job_id.to_string()));

    let mut second = continuing(
        job(Role::Analyst, Backend::Openai, "U2: again"),
        first.job_id,
        false,
    );
    second.model = first.model.clone();
    let r = run_job(&backends, &second).await;
    assert!(r.output.outcome.is_success(), "{r:?}");
    let reqs = fake.requests();
    let talk = conversation(&reqs[1].body);
    let roles: Vec<&str> = talk.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"], "{talk:#?}");
    assert!(talk[1].1.contains("U1: greet me"));
    assert_eq!(talk[2].1, "O1: hello");
    assert!(talk[3].1.contains("U2: again"));
    // The stored conversation has no system message.
    let s = r.session.unwrap();
    assert_eq!(s.turn, 2);
    let stored: Vec<Value> = serde_json::from_slice(&s.bytes).unwrap();
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
}

/// What a sim turn's answer quotes as the previous user message.
fn previous(out: &str) -> &str {
    out.split("Previous message: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
}

/// Asserts that a sim agent's answer `out` is the second turn continuing agent `from`, whose
/// first message contained `first`.
fn assert_continues(out: &str, from: JobId, first: &str) {
    assert!(
        out.contains(&format!("Turn 2 (continuing from {from})")),
        "{out}"
    );
    assert!(previous(out).contains(first), "{out}");
}

/// Polls until agent `id` of `task` has ended; returns it.
async fn wait_job(cluster: &Cluster, task: &str, id: JobId) -> Job {
    cluster
        .eventually(Duration::from_secs(90), || async {
            let t = cluster.task(task).await;
            match t.jobs.iter().find(|j| j.id == id) {
                Some(j) if j.status.is_terminal() => Ok(j.clone()),
                _ => Err(format!("agent {id} did not finish: {t:#?}")),
            }
        })
        .await
}

/// `POST /v1/agents/{id}/send` (or `/fork`): the new agent's id.
async fn turn(cluster: &Cluster, agent: JobId, message: &str, fork: bool) -> JobId {
    let verb = if fork { "fork" } else { "send" };
    let (status, v) = cluster
        .post(
            &format!("/v1/agents/{agent}/{verb}"),
            &json!({ "message": message }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{verb} refused: {v}\n{}",
        cluster.logs()
    );
    assert_eq!(v["fork"], fork, "{v}");
    v["agent_id"].as_str().unwrap().parse().unwrap()
}

fn succeeded(cluster: &Cluster, job: &Job) {
    assert_eq!(
        job.status,
        JobStatus::Succeeded,
        "{job:#?}\n{}",
        cluster.logs()
    );
}

async fn first_turn(cluster: &Cluster, body: Value) -> Task {
    let task = cluster.submit(body).await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await;
    assert_completed(cluster, &task);
    task
}

/// Two workers whose `anthropic` backend talks to `fake`.
async fn anthropic_cluster(fake: &FakeAnthropic) -> Cluster {
    Cluster::start(Options {
        workers: 2,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-sessions".into()),
        ],
        ..Options::default()
    })
    .await
}

/// A worker running the real Claude Code CLI with its data (scratch workspaces and the CLI's
/// home) in `data`.
fn claude_options(fake: &FakeAnthropic, data: &Path) -> Options {
    Options {
        workers: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-sessions".into()),
            (
                "ORCH_CLAUDE_BIN".into(),
                orch_tests::claude_cli::claude_bin().display().to_string(),
            ),
        ],
        worker_args: vec!["--data-dir".into(), data.display().to_string()],
        ..Options::default()
    }
}

/// Transcripts left in a worker's CLI home.
fn transcripts_under(data: &Path) -> Vec<String> {
    let projects = data.join("claude-home/.claude/projects");
    let mut out = vec![];
    for dir in std::fs::read_dir(projects).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "jsonl") {
                out.push(f.path().display().to_string());
            }
        }
    }
    out
}

/// The text of every message of a recorded Messages API request, in order, by role.
fn conversation(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text = match &m["content"] {
                Value::String(s) => s.clone(),
                blocks => blocks
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            (m["role"].as_str().unwrap().to_string(), text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_conversation_continues_on_another_worker() {
    let fake = FakeAnthropic::start([
        Reply::text("ANSWER-ONE: the codename is HERON."),
        Reply::text("ANSWER-TWO: HERON, as you said."),
    ])
    .await;
    let (data0, data1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cluster = Cluster::start(claude_options(&fake, data0.path())).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "PROMPT-ONE: pick a codename", "roles": ["analyst"],
               "backend": "claude-code", "model": MODEL}),
    )
    .await;
    let first = &task.jobs[0];
    let first_sid = first
        .session_id
        .clone()
        .expect("the turn stored its session");
    assert!(
        transcripts_under(data0.path()).is_empty(),
        "a worker keeps no transcript: {:?}",
        transcripts_under(data0.path())
    );

    // The first worker goes away; a second one, with nothing of the first's files, takes over.
    cluster.workers[0].signal(libc::SIGTERM);
    assert!(
        cluster.workers[0]
            .wait_exit(Duration::from_secs(20))
            .is_some()
    );
    cluster.opts.worker_args = vec!["--data-dir".into(), data1.path().display().to_string()];
    cluster.add_worker();

    let second = turn(
        &cluster,
        first.id,
        "PROMPT-TWO: what was the codename?",
        false,
    )
    .await;
    let job = wait_job(&cluster, &task.id.to_string(), second).await;
    succeeded(&cluster, &job);
    assert_eq!(
        job.worker_id.as_ref().map(|w| w.0.as_str()),
        Some("worker-1")
    );
    assert_eq!(
        job.output.as_deref(),
        Some("ANSWER-TWO: HERON, as you said.")
    );
    assert_eq!(job.continues, Some(first.id));
    let second_sid = job
        .session_id
        .clone()
        .expect("the second turn is stored too");
    assert_ne!(second_sid, first_sid, "every turn is a session of its own");

    // What the model saw on the second turn: the first turn's prompt and answer, then the
    // new message.
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 2, "one request per turn");
    let talk = conversation(&reqs[1].body);
    let roles: Vec<&str> = talk.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{talk:#?}");
    assert!(
        talk[0].1.contains("PROMPT-ONE: pick a codename"),
        "{talk:#?}"
    );
    assert_eq!(talk[1].1, "ANSWER-ONE: the codename is HERON.");
    assert!(
        talk[2].1.contains("PROMPT-TWO: what was the codename?"),
        "{talk:#?}"
    );
    // The history names the new worker's workspace, not the old one's.
    let env = &talk[0].1;
    assert!(
        env.contains(&data1.path().display().to_string())
            && !env.contains(&data0.path().display().to_string()),
        "{env}"
    );
    assert!(transcripts_under(data1.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_forks_of_a_claude_code_agent_share_its_history_in_sessions_of_their_own() {
    let fake = FakeAnthropic::start_with_fallback(
        [Reply::text("ANSWER-ONE: two options, A and B.")],
        Reply::text("FORK-ANSWER"),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(claude_options(&fake, data.path())).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "PROMPT-ONE: list the options", "roles": ["analyst"],
               "backend": "claude-code", "model": MODEL}),
    )
    .await;
    let first = &task.jobs[0];
    let a = turn(&cluster, first.id, "FORK-A: go with A", true).await;
    let b = turn(&cluster, first.id, "FORK-B: go with B", true).await;
    let id = task.id.to_string();
    let (a, b) = (
        wait_job(&cluster, &id, a).await,
        wait_job(&cluster, &id, b).await,
    );
    succeeded(&cluster, &a);
    succeeded(&cluster, &b);
    assert!(a.forked && b.forked);
    assert_eq!((a.continues, b.continues), (Some(first.id), Some(first.id)));
    let sids = [&first.session_id, &a.session_id, &b.session_id];
    assert!(sids.iter().all(|s| s.is_some()), "{sids:?}");
    assert_ne!(a.session_id, b.session_id);
    assert_ne!(a.session_id, first.session_id);
    assert_ne!(b.session_id, first.session_id);

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 3);
    for fork in ["FORK-A: go with A", "FORK-B: go with B"] {
        let req = reqs
            .iter()
            .find(|r| {
                conversation(&r.body)
                    .last()
                    .is_some_and(|(_, t)| t.contains(fork))
            })
            .unwrap_or_else(|| panic!("no request for {fork}"));
        let talk = conversation(&req.body);
        assert_eq!(talk.len(), 3, "{talk:#?}");
        assert!(talk[0].1.contains("PROMPT-ONE: list the options"));
        assert_eq!(talk[1].1, "ANSWER-ONE: two options, A and B.");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_builder_turn_keeps_its_tool_rounds_in_the_session_for_send_and_fork() {
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "write_file",
            json!({"path": "notes.txt", "content": "forty-two"}),
        ),
        Reply::text("A1: wrote notes.txt."),
        Reply::text("A2: it holds forty-two."),
        Reply::text("A3: forked."),
    ])
    .await;
    let cluster = anthropic_cluster(&fake).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "U1: note 42", "roles": ["builder"], "backend": "anthropic",
               "model": MODEL}),
    )
    .await;
    let first = task.jobs[0].id;
    let id = task.id.to_string();
    let second = turn(&cluster, first, "U2: what is in it?", false).await;
    succeeded(&cluster, &wait_job(&cluster, &id, second).await);
    let forked = turn(&cluster, first, "U3: fork", true).await;
    succeeded(&cluster, &wait_job(&cluster, &id, forked).await);

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 4);
    // The send and the fork both start from the first turn's messages, tool round included:
    // prompt, tool_use, tool_result, answer, then their own prompt.
    for req in [&reqs[2], &reqs[3]] {
        let messages = req.body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 5, "{messages:#?}");
        assert_eq!(messages[1]["content"][0]["type"], "tool_use");
        assert_eq!(messages[2]["content"][0]["type"], "tool_result");
        assert_eq!(messages[2]["content"][0]["is_error"], false);
        assert_eq!(messages[3]["content"], "A1: wrote notes.txt.");
    }
    assert_eq!(conversation(&reqs[2].body)[4].1, "U2: what is in it?");
    assert_eq!(conversation(&reqs[3].body)[4].1, "U3: fork");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_conversation_sends_its_history_with_each_turn() {
    let fake = FakeAnthropic::start([
        Reply::text("A1: noted."),
        Reply::text("A2: still noted."),
        Reply::text(format!("A3: done. {}", "long answer ".repeat(1000))),
    ])
    .await;
    let cluster = anthropic_cluster(&fake).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "U1: remember 42", "roles": ["analyst"], "backend": "anthropic",
               "model": MODEL}),
    )
    .await;
    let first = task.jobs[0].id;
    assert_eq!(task.jobs[0].session_id, Some(first.to_string()));
    let id = task.id.to_string();
    let second = turn(&cluster, first, "U2: and now?", false).await;
    succeeded(&cluster, &wait_job(&cluster, &id, second).await);
    // Sending to the first agent again continues its latest turn.
    let third = turn(&cluster, first, "U3: last one", false).await;
    let job = wait_job(&cluster, &id, third).await;
    succeeded(&cluster, &job);
    assert!(job.output.as_deref().unwrap().starts_with("A3: done."));
    assert_eq!(job.continues, Some(second));

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 3);
    let talk = conversation(&reqs[2].body);
    let roles: Vec<&str> = talk.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant", "user"],
        "{talk:#?}"
    );
    assert!(talk[0].1.contains("U1: remember 42"));
    assert_eq!(talk[1].1, "A1: noted.");
    assert!(talk[2].1.contains("U2: and now?"));
    assert_eq!(talk[3].1, "A2: still noted.");
    assert!(talk[4].1.contains("U3: last one"));
    // The system prompt goes in `system` on every turn, never into the stored history.
    assert!(
        reqs[2].body["system"][0]["text"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );

    // The third turn's history is too long to keep inline: it is an object. Cleaning the task
    // removes every pointer and object.
    let nats = async_nats::connect(&cluster.nats_url).await.unwrap();
    let bucket = jetstream::new(nats)
        .get_object_store(SESSIONS_BUCKET)
        .await
        .unwrap();
    assert!(
        bucket.info(third.to_string()).await.is_ok(),
        "stored as an object"
    );
    let redis = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let pointers = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let mut n = 0;
            for j in [first, second, third] {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(keys::session(j))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                n += exists as usize;
            }
            n
        }
    };
    assert_eq!(pointers(&mut conn).await, 3);
    let (status, report) = cluster
        .post("/v1/clean", &json!({"older_than_ms": 0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["tasks"], 1, "{report}");
    assert_eq!(pointers(&mut conn).await, 0, "the pointers are gone");
    assert!(
        bucket
            .info(third.to_string())
            .await
            .is_ok_and(|i| i.deleted),
        "the object is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_agents_continue_and_fork_over_http_and_with_orchctl() {
    let cluster = Cluster::start(Options::default()).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "SIM-FIRST design the cache", "roles": ["builder"]}),
    )
    .await;
    let id = task.id.to_string();
    let a = task.jobs[0].id;
    assert_eq!(task.jobs[0].session_id, Some(a.to_string()));

    // Over HTTP: the reply names the new agent and what it continues.
    let (status, v) = cluster
        .post(
            &format!("/v1/agents/{a}/send"),
            &json!({"message": "SIM-SECOND add eviction"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["task_id"], id.as_str());
    assert_eq!(v["from"], a.to_string().as_str());
    let b: JobId = v["agent_id"].as_str().unwrap().parse().unwrap();
    let job_b = wait_job(&cluster, &id, b).await;
    succeeded(&cluster, &job_b);
    let out = job_b.output.unwrap();
    assert_continues(&out, a, "SIM-FIRST design the cache");

    let c = turn(&cluster, a, "SIM-FORK try a trie", true).await;
    let out = wait_job(&cluster, &id, c).await.output.unwrap_or_default();
    assert!(out.contains(&format!("Turn 2 (a fork of {a})")), "{out}");
    assert!(
        previous(&out).contains("SIM-FIRST design the cache"),
        "{out}"
    );

    // With orchctl: a send to the first agent continues its latest turn (b), a fork forks it.
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "agents",
        "send",
        &a.to_string(),
        "SIM-THIRD measure it",
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("(next turn of {b})")), "{stdout}");
    let d: JobId = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no agent id in {stdout}"));
    let out = wait_job(&cluster, &id, d).await.output.unwrap_or_default();
    assert!(
        out.contains(&format!("Turn 3 (continuing from {b})")),
        "{out}"
    );
    assert!(previous(&out).contains("SIM-SECOND add eviction"), "{out}");

    // --follow shows the new turn's transcript to its end (not the task's earlier end) and
    // exits 0 when it succeeded.
    let (code, stdout, stderr) = run(orchctl_against(&cluster, home.path()).args([
        "agents",
        "fork",
        &a.to_string(),
        "SIM-FORK2 try a heap",
        "--follow",
    ]));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("(fork of {a})")), "{stdout}");
    assert!(
        stdout.contains(&format!("Turn 2 (a fork of {a})")),
        "the fork's answer is in the followed transcript: {stdout}"
    );
    let e: JobId = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no agent id in {stdout}"));
    let out = wait_job(&cluster, &id, e).await.output.unwrap_or_default();
    assert!(out.contains(&format!("Turn 2 (a fork of {a})")), "{out}");

    // Refused: an unknown agent, and an agent whose turn is still running.
    let (status, v) = cluster
        .post(
            &format!("/v1/agents/{}/send", JobId::new()),
            &json!({"message": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let slow = cluster
        .submit(json!({"prompt": "slow", "roles": ["builder"], "sim": {"latency_ms": 30000}}))
        .await;
    let (status, v) = cluster
        .post(
            &format!("/v1/agents/{}/fork", slow.jobs[0].id),
            &json!({"message": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_whose_worker_dies_is_restored_again_by_another_worker() {
    let cluster = Cluster::start(Options {
        workers: 2,
        slots: 1,
        ..Options::default()
    })
    .await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "SIM-FIRST plan the migration", "roles": ["builder"],
               "sim": {"latency_ms": 3000}}),
    )
    .await;
    let id = task.id.to_string();
    let a = task.jobs[0].id;
    let b = turn(&cluster, a, "SIM-SECOND run it", false).await;
    // Kill the worker running the turn: JetStream redelivers it to the other one, which
    // restores the same stored session.
    let step = cluster
        .task(&id)
        .await
        .jobs
        .iter()
        .position(|j| j.id == b)
        .unwrap();
    let victim = cluster.running_on(&id, step).await;
    cluster.workers[victim].signal(libc::SIGKILL);
    let job = wait_job(&cluster, &id, b).await;
    succeeded(&cluster, &job);
    assert_ne!(
        job.worker_id.as_ref().map(|w| w.0.clone()),
        Some(format!("worker-{victim}"))
    );
    let out = job.output.unwrap_or_default();
    assert_continues(&out, a, "SIM-FIRST plan the migration");
}

/// The coordinator writes an agent's session pointer from the turn's result, so a Redis that
/// lost everything gets the pointers back from the log: the conversation still continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_continues_after_redis_is_wiped_and_rebuilt() {
    let mut cluster = Cluster::start(Options::default()).await;
    let task = first_turn(
        &cluster,
        json!({"prompt": "SIM-FIRST sketch the schema", "roles": ["builder"]}),
    )
    .await;
    let (id, a) = (task.id.to_string(), task.jobs[0].id);
    cluster.rebuild_redis_from_the_log().await;
    let b = turn(&cluster, a, "SIM-SECOND add indexes", false).await;
    let job_b = wait_job(&cluster, &id, b).await;
    succeeded(&cluster, &job_b);
    let out = job_b.output.unwrap();
    assert_continues(&out, a, "SIM-FIRST sketch the schema");
}
