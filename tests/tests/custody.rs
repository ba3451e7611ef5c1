//! Custody of running agents: a worker checkpoints its agent after every step (the whole
//! working tree as a commit on `refs/orch/checkpoints/<job>`, the conversation in the sessions
//! store, a fenced pointer in Redis), and when the worker dies (SIGKILL) or drains (SIGTERM),
//! another worker, with its own data directory and Claude Code HOME, resumes the attempt from
//! the last checkpoint instead of starting over.
//!
//! Real processes throughout: nats-server, redis-server, the coordinator, the workers, git, and
//! the real Claude Code CLI; only the Messages API is fake. Each test runs the same scripted
//! agent twice, once uninterrupted and once cut after step 3, and compares what the fake was
//! asked and the trees the two runs pushed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, Task};
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, WorkerId};
use orch_shared::job::{Checkpoint, Usage};
use orch_shared::keys;
use orch_tests::fake_anthropic::{CWD, FakeAnthropic, Recorded, Reply};
use orch_tests::{Cluster, Options, assert_completed, git, origin};
use orch_worker::state::{Claim, Saved, State};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const MODEL: &str = "claude-sonnet-4-5";
/// The step after which the interrupted Claude Code runs are cut.
const CUT_AFTER: u32 = 3;
/// What the Claude Code agent's branch holds (never the ignored `build.log`).
const CLAUDE_FILES: &[&str] = &[".gitignore", "README.md", "a.txt", "b.txt", "c.txt"];
/// What the native agent's branch holds.
const NATIVE_FILES: &[&str] = &[
    ".gitignore",
    "README.md",
    "a.txt",
    "b.txt",
    "c.txt",
    "d1.txt",
    "d2.txt",
    "d3.txt",
    "d4.txt",
    "d5.txt",
];

fn env(fake: &FakeAnthropic) -> Vec<(String, String)> {
    vec![
        ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
        ("ANTHROPIC_API_KEY".into(), "test-key-custody".into()),
        (
            "ORCH_CLAUDE_BIN".into(),
            orch_tests::claude_cli::claude_bin().display().to_string(),
        ),
    ]
}

/// A six-request agent for the Claude Code CLI: three steps before the cut (two Writes, the
/// second an ignore file, and a Bash that writes an ignored and an untracked file), three after
/// (a Write, a Bash that edits a file in place and reads the ignored file back, the answer).
fn claude_script() -> (Vec<Reply>, Vec<Reply>) {
    let path = |name: &str| format!("{CWD}/{name}");
    let before = vec![
        Reply::tool_use(
            "Write",
            json!({"file_path": path("a.txt"), "content": "alpha\n"}),
        ),
        Reply::tool_use(
            "Write",
            json!({"file_path": path(".gitignore"), "content": "*.log\n"}),
        ),
        Reply::tool_use(
            "Bash",
            json!({"command": "echo scratch > build.log && echo one > b.txt", "description": "scratch files"}),
        ),
    ];
    let after = vec![
        Reply::tool_use(
            "Write",
            json!({"file_path": path("c.txt"), "content": "gamma\n"}),
        ),
        Reply::tool_use(
            "Bash",
            json!({"command": "sed -i 's/alpha/ALPHA/' a.txt && cat build.log >> c.txt", "description": "edit in place"}),
        ),
        Reply::text("## Summary\nWrote the files.\n\n## Files\n- a.txt\n- b.txt\n- c.txt"),
    ];
    (before, after)
}

/// A ten-request agent with the native tools of the `anthropic` backend: eight steps before
/// the cut ([`NATIVE_CUT_AFTER`]: an ignore file, a shell command writing an ignored and an
/// untracked file, six more files), one after (a shell command that writes a file, edits
/// another in place and reads the ignored file back), then the answer.
fn native_script() -> (Vec<Reply>, Vec<Reply>) {
    let mut before = vec![
        Reply::tool_use("write_file", json!({"path": "a.txt", "content": "alpha\n"})),
        Reply::tool_use(
            "write_file",
            json!({"path": ".gitignore", "content": "*.log\n"}),
        ),
        Reply::tool_use(
            "bash",
            json!({"command": "echo scratch > build.log && echo one > b.txt"}),
        ),
    ];
    for n in 1..=5 {
        before.push(Reply::tool_use(
            "write_file",
            json!({"path": format!("d{n}.txt"), "content": format!("{n}\n")}),
        ));
    }
    let after = vec![
        Reply::tool_use(
            "bash",
            json!({"command": "printf 'gamma\\n' > c.txt && sed -i 's/alpha/ALPHA/' a.txt && cat build.log >> c.txt"}),
        ),
        Reply::text("## Summary\nWrote the files.\n\n## Files\n- a.txt\n- b.txt\n- c.txt"),
    ];
    (before, after)
}

/// The step after which the native runs are cut: a ten-step agent killed after step eight.
const NATIVE_CUT_AFTER: u32 = 8;

/// The fake's script: the agent uninterrupted, then the agent whose step after the cut is
/// answered so late that its worker is stopped first (that request is lost with the worker;
/// the resumed run asks it again and gets the same answer).
fn script(before: &[Reply], after: &[Reply], resumed: &[Reply]) -> Vec<Reply> {
    let mut all: Vec<Reply> = before.iter().chain(after).cloned().collect();
    all.extend(before.iter().cloned());
    all.push(after[0].clone().after(Duration::from_secs(600)));
    all.extend(resumed.iter().cloned());
    all
}

async fn submit(cluster: &Cluster, bare: &Path, backend: &str) -> Task {
    cluster
        .submit(json!({
            "prompt": "write the three files",
            "roles": ["builder"],
            "backend": backend,
            "model": MODEL,
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .await
}

/// The checkpoint pointer of `job`, once it names `step`.
async fn checkpoint_at(cluster: &Cluster, job: JobId, step: u32) -> Checkpoint {
    let client = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    cluster
        .eventually(Duration::from_secs(60), || {
            let mut conn = conn.clone();
            async move {
                let json: Option<String> = redis::cmd("GET")
                    .arg(keys::checkpoint(job))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let c: Checkpoint = serde_json::from_str(json.as_deref().ok_or("no checkpoint")?)
                    .map_err(|e| e.to_string())?;
                if c.step == step {
                    Ok(c)
                } else {
                    Err(format!("checkpoint at step {}", c.step))
                }
            }
        })
        .await
}

/// Waits until the fake has received `n` message requests.
async fn requests(cluster: &Cluster, fake: &FakeAnthropic, n: usize) {
    cluster
        .eventually(Duration::from_secs(60), || async {
            let got = fake.message_requests().len();
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} of {n} requests"))
            }
        })
        .await;
}

fn kinds(events: &[(orch_shared::event::EventId, Event)], job: JobId) -> Vec<EventKind> {
    events
        .iter()
        .filter(|(_, e)| e.job_id == Some(job))
        .map(|(_, e)| e.kind.clone())
        .collect()
}

/// `path` at the job's pushed commit.
fn file_at(bare: &Path, task: &Task, path: &str) -> String {
    let commit = &task.jobs[0].git.as_ref().unwrap().commit;
    git(bare, &["show", &format!("{commit}:{path}")])
}

fn tree_of(bare: &Path, task: &Task) -> String {
    let commit = &task.jobs[0].git.as_ref().unwrap().commit;
    git(bare, &["rev-parse", &format!("{commit}^{{tree}}")])
}

/// The user-visible outcome of a cut run against the uninterrupted one: same tree, the fake
/// asked each step once, and the record and events saying where it resumed.
fn check_resumed(
    cluster: &Cluster,
    bare: &Path,
    whole: &Task,
    cut: &Task,
    after_stop: &[Recorded],
    steps_after: usize,
    files: &[&str],
) {
    assert_completed(cluster, whole);
    assert_completed(cluster, cut);
    // The whole tree: every file, the in-place edit, the ignored file read back on the new
    // worker (so it was restored), and nothing ignored committed.
    assert_eq!(tree_of(bare, cut), tree_of(bare, whole), "the trees differ");
    assert_eq!(file_at(bare, cut, "a.txt"), "ALPHA");
    assert_eq!(file_at(bare, cut, "c.txt"), "gamma\nscratch");
    let listed = git(
        bare,
        &[
            "ls-tree",
            "-r",
            "--name-only",
            &cut.jobs[0].git.as_ref().unwrap().commit,
        ],
    );
    assert_eq!(listed.lines().collect::<Vec<_>>(), files);
    // The steps before the cut were never asked again.
    assert_eq!(
        after_stop.len(),
        steps_after,
        "requests after the stop: {after_stop:#?}"
    );
    let job = &cut.jobs[0];
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.attempt, 1, "a redelivery of the same attempt");
    assert_eq!(job.worker_id, Some(WorkerId("worker-1".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_agent_killed_after_a_step_resumes_there_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, after) = claude_script();
    let fake = FakeAnthropic::start(script(&before, &after, &after)).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let whole = submit(&cluster, &bare, "claude-code").await;
    let whole = cluster
        .wait_task(&whole.id.to_string(), Duration::from_secs(120))
        .await;
    let asked_whole = fake.message_requests().len();
    assert_eq!(asked_whole, before.len() + after.len());

    let cut = submit(&cluster, &bare, "claude-code").await;
    let job = cut.jobs[0].id;
    let checkpoint = checkpoint_at(&cluster, job, CUT_AFTER).await;
    // The worker waits for the step after the cut.
    requests(&cluster, &fake, asked_whole + before.len() + 1).await;
    assert_eq!(checkpoint.backend, "claude-code");
    assert_eq!(checkpoint.worker, "worker-0");
    assert!(checkpoint.usage.total() > 0, "{checkpoint:?}");
    let commit = checkpoint.commit.clone().expect("a tree commit");
    assert_eq!(
        git(
            &bare,
            &["rev-parse", &format!("refs/orch/checkpoints/{job}")]
        ),
        commit,
        "the checkpoint ref is the latest checkpoint"
    );
    // The checkpoint holds the whole tree, the ignored file included; the agent's branch
    // was not touched.
    assert_eq!(
        git(&bare, &["show", &format!("{commit}:build.log")]),
        "scratch"
    );

    cluster.workers[0].signal(libc::SIGKILL);
    let stopped = Instant::now();
    cluster.add_worker();
    let cut = cluster
        .wait_task(&cut.id.to_string(), Duration::from_secs(120))
        .await;
    let after_stop: Vec<Recorded> = fake
        .message_requests()
        .into_iter()
        .filter(|r| r.at > stopped)
        .collect();
    check_resumed(
        &cluster,
        &bare,
        &whole,
        &cut,
        &after_stop,
        after.len(),
        CLAUDE_FILES,
    );
    eprintln!(
        "figure: claude-code checkpoint after step {CUT_AFTER}: transcript {} bytes; requests asked again after the kill: {} of {} (the one in flight)",
        checkpoint.transcript_bytes,
        after_stop.len() - (after.len() - 1),
        before.len()
    );

    // The resumed CLI replayed the conversation and was told where it had been cut.
    let first = &after_stop[0].body;
    let text = first["messages"].to_string();
    assert!(
        text.contains(&format!("interrupted after step {CUT_AFTER}")),
        "{text}"
    );
    for call in ["a.txt", ".gitignore", "build.log"] {
        assert!(text.contains(call), "the history lacks {call}: {text}");
    }
    let events = cluster.events(&cut.id.to_string(), None).await;
    let kinds = kinds(&events, job);
    let resumed = kinds
        .iter()
        .find_map(|k| match k {
            EventKind::Resumed {
                from_attempt,
                from_step,
                from_worker,
                usage,
                ..
            } => Some((*from_attempt, *from_step, from_worker.clone(), *usage)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no resumed event: {kinds:#?}"));
    assert_eq!(
        (resumed.0, resumed.1, resumed.2.as_str()),
        (1, CUT_AFTER, "worker-0")
    );
    assert_eq!(resumed.3, checkpoint.usage);
    // The attempt's tokens count what the first worker had spent too.
    assert!(cut.jobs[0].usage.total() > resumed.3.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_a_checkpointed_agent_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, after) = claude_script();
    let fake = FakeAnthropic::start(script(&before, &after, &after)).await;
    // A grace far longer than the test: only a hand-over can make it pass.
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        drain_grace: Duration::from_secs(600),
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let whole = submit(&cluster, &bare, "claude-code").await;
    let whole = cluster
        .wait_task(&whole.id.to_string(), Duration::from_secs(120))
        .await;
    let asked_whole = fake.message_requests().len();

    let cut = submit(&cluster, &bare, "claude-code").await;
    let job = cut.jobs[0].id;
    checkpoint_at(&cluster, job, CUT_AFTER).await;
    requests(&cluster, &fake, asked_whole + before.len() + 1).await;
    cluster.add_worker();
    cluster.wait_workers(2).await;

    cluster.workers[0].signal(libc::SIGTERM);
    let stopped = Instant::now();
    let sigterm_ms = orch_shared::now_ms();
    let exit = cluster.workers[0].wait_exit(Duration::from_secs(30));
    assert_eq!(
        exit,
        Some(Some(0)),
        "the worker exits cleanly long before its grace\n{}",
        cluster.logs()
    );
    let cut = cluster
        .wait_task(&cut.id.to_string(), Duration::from_secs(120))
        .await;
    let after_stop: Vec<Recorded> = fake
        .message_requests()
        .into_iter()
        .filter(|r| r.at > stopped)
        .collect();
    check_resumed(
        &cluster,
        &bare,
        &whole,
        &cut,
        &after_stop,
        after.len(),
        CLAUDE_FILES,
    );
    let events = cluster.events(&cut.id.to_string(), None).await;
    let restarted = events
        .iter()
        .find_map(|(_, e)| match &e.kind {
            EventKind::JobStarted { worker_id, .. } if worker_id.0 == "worker-1" => Some(e.at_ms),
            _ => None,
        })
        .expect("the job started on the second worker");
    let took = restarted.saturating_sub(sigterm_ms);
    eprintln!("figure: SIGTERM to running again on another worker: {took} ms");
    assert!(
        took < 10_000,
        "handed over in {took} ms, not at once (the ack wait is 3 s)"
    );
    assert!(
        kinds(&events, job)
            .iter()
            .any(|k| matches!(k, EventKind::Resumed { from_step, .. } if *from_step == CUT_AFTER))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_tool_loop_killed_after_a_step_replays_its_messages_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, after) = native_script();
    let fake = FakeAnthropic::start(script(&before, &after, &after)).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let whole = submit(&cluster, &bare, "anthropic").await;
    let whole = cluster
        .wait_task(&whole.id.to_string(), Duration::from_secs(120))
        .await;
    let asked_whole = fake.message_requests().len();
    assert_eq!(asked_whole, before.len() + after.len());

    let cut = submit(&cluster, &bare, "anthropic").await;
    let job = cut.jobs[0].id;
    let checkpoint = checkpoint_at(&cluster, job, NATIVE_CUT_AFTER).await;
    requests(&cluster, &fake, asked_whole + before.len() + 1).await;
    let lost = fake.message_requests()[asked_whole + before.len()].clone();

    cluster.workers[0].signal(libc::SIGKILL);
    let stopped = Instant::now();
    cluster.add_worker();
    let cut = cluster
        .wait_task(&cut.id.to_string(), Duration::from_secs(120))
        .await;
    let after_stop: Vec<Recorded> = fake
        .message_requests()
        .into_iter()
        .filter(|r| r.at > stopped)
        .collect();
    check_resumed(
        &cluster,
        &bare,
        &whole,
        &cut,
        &after_stop,
        after.len(),
        NATIVE_FILES,
    );
    // Tokens spent again: the one request in flight at the kill; no finished step.
    let asked_again = after_stop.len() + 1 - after.len();
    let again = orch_tests::fake_anthropic::default_usage().total() * asked_again as u64;
    eprintln!(
        "figure: native tool loop, 10 steps killed after step {NATIVE_CUT_AFTER}: finished steps asked again 0, requests asked again {} ({} tokens as billed for one request); conversation checkpoint {} bytes, {} files changed",
        asked_again, again, checkpoint.transcript_bytes, checkpoint.files_changed
    );
    // The resumed run sent exactly the request the first worker was waiting on.
    assert_eq!(after_stop[0].body["messages"], lost.body["messages"]);
    // The checkpoints are listed in step order, the first worker's up to the cut, then the
    // second's (steps that came faster than a save are folded into the next one).
    let (status, list) = cluster.get(&format!("/v1/agents/{job}/checkpoints")).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{list}");
    let steps: Vec<(u64, String)> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["step"].as_u64().unwrap(),
                c["worker"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0].0 < w[1].0), "{steps:?}");
    let cut_step = u64::from(NATIVE_CUT_AFTER);
    assert!(
        steps.contains(&(cut_step, "worker-0".to_string()))
            && steps.last() == Some(&(cut_step + 1, "worker-1".to_string())),
        "{steps:?}"
    );
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) =
        orch_tests::run(orch_tests::orchctl_against(&cluster, home.path()).args([
            "agents",
            "checkpoints",
            &job.to_string(),
        ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("STEP") && out.contains("TOKENS"), "{out}");
    let rows = out.lines().filter(|l| l.contains(" worker-")).count();
    assert_eq!(rows, steps.len(), "{out}");
    let (code, _, err) =
        orch_tests::run(orch_tests::orchctl_against(&cluster, home.path()).args([
            "agents",
            "checkpoints",
            &JobId::new().to_string(),
        ]));
    assert_eq!(
        (code, err.trim().ends_with("not found")),
        (1, true),
        "{err}"
    );
    let events = cluster.events(&cut.id.to_string(), None).await;
    let kinds = kinds(&events, job);
    assert!(kinds.iter().any(
        |k| matches!(k, EventKind::Resumed { from_step, .. } if *from_step == NATIVE_CUT_AFTER)
    ));
    // The chaos ledger's figure: the killed run had spent eight steps' tokens, all kept by the
    // checkpoint (the request in flight was never answered, so never billed).
    let one = orch_tests::fake_anthropic::default_usage().total();
    let (spent, redone) = orch_tests::ledger::tokens_redone(&kinds);
    eprintln!("figure: tokens spent again after the kill: {redone} of {spent}");
    assert_eq!(redone, 0, "{kinds:#?}");
    assert_eq!(spent, (before.len() + after.len()) as u64 * one);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_restored_starts_the_agent_over_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, after) = native_script();
    // The resumed run starts over: it is asked every step again.
    let again: Vec<Reply> = before.iter().chain(&after).cloned().collect();
    let fake = FakeAnthropic::start(script(&before, &after, &again)).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let whole = submit(&cluster, &bare, "anthropic").await;
    let whole = cluster
        .wait_task(&whole.id.to_string(), Duration::from_secs(120))
        .await;
    let asked_whole = fake.message_requests().len();
    let cut = submit(&cluster, &bare, "anthropic").await;
    let job = cut.jobs[0].id;
    let mut checkpoint = checkpoint_at(&cluster, job, NATIVE_CUT_AFTER).await;
    requests(&cluster, &fake, asked_whole + before.len() + 1).await;
    cluster.workers[0].signal(libc::SIGKILL);
    let _ = cluster.workers[0].wait_exit(Duration::from_secs(10));
    // The checkpoint's commit is not on the ref (a repository rewritten by hand, say).
    checkpoint.commit = Some("0123456789abcdef0123456789abcdef01234567".into());
    let client = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(keys::checkpoint(job))
        .arg(serde_json::to_string(&checkpoint).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    cluster.add_worker();
    let cut = cluster
        .wait_task(&cut.id.to_string(), Duration::from_secs(120))
        .await;
    assert_completed(&cluster, &cut);
    assert_eq!(tree_of(&bare, &cut), tree_of(&bare, &whole));
    let events = cluster.events(&cut.id.to_string(), None).await;
    let kinds = kinds(&events, job);
    let reason = kinds
        .iter()
        .find_map(|k| match k {
            EventKind::ResumeFailed { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no resume_failed event: {kinds:#?}"));
    assert!(reason.contains("0123456789abcdef"), "{reason}");
    assert!(!kinds.iter().any(|k| matches!(k, EventKind::Resumed { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_out_attempt_cannot_overwrite_the_checkpoint_of_the_worker_that_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, url) = orch_tests::redis(dir.path());
    let state = State::connect(&orch_config::redis::Redis::from_url(&url).unwrap())
        .await
        .unwrap();
    let job = JobId::from_u128(7);
    let ttl = Duration::from_secs(30);
    let lease = |c: Claim| match c {
        Claim::Leased(l) => l,
        Claim::Skip(why) => panic!("not leased: {why}"),
    };
    let stale = lease(
        state
            .claim(&WorkerId("a".into()), job, 1, ttl)
            .await
            .unwrap(),
    );
    let at = |step: u32, fence: u64| {
        serde_json::to_string(&Checkpoint {
            attempt: 1,
            fence,
            step,
            worker: "w".into(),
            backend: "anthropic".into(),
            transcript: format!("checkpoint.{job}.{step}"),
            transcript_bytes: 1,
            session_id: None,
            workspace: String::new(),
            turn: 1,
            commit: None,
            tree_object: None,
            files_changed: 0,
            usage: Usage::default(),
            cost_usd: 0.0,
            at_ms: 1,
        })
        .unwrap()
    };
    let save = |l: &orch_worker::state::Lease, step: u32| {
        let json = at(step, l.fence);
        let state = state.clone();
        let l = l.clone();
        async move {
            state
                .save_checkpoint(job, Some(&l), (1, l.fence), &json, 2, ttl)
                .await
                .unwrap()
        }
    };
    assert_eq!(save(&stale, 1).await, Saved::Kept { dropped: vec![] });
    // Another worker takes the attempt over (the first was paused past its lease).
    let owner = lease(
        state
            .claim(&WorkerId("b".into()), job, 1, ttl)
            .await
            .unwrap(),
    );
    assert_eq!(save(&owner, 2).await, Saved::Kept { dropped: vec![] });
    // The stale worker wakes up and tries to record a later step: refused.
    assert_eq!(save(&stale, 5).await, Saved::FencedOut);
    let kept: Checkpoint =
        serde_json::from_str(&state.checkpoint(job).await.unwrap().unwrap()).unwrap();
    assert_eq!((kept.step, kept.fence), (2, owner.fence));
    // The kept list is bounded: the oldest entry comes back to have its object deleted.
    match save(&owner, 3).await {
        Saved::Kept { dropped } => {
            let gone: Checkpoint = serde_json::from_str(&dropped[0]).unwrap();
            assert_eq!(gone.step, 1);
        }
        other => panic!("{other:?}"),
    }
}

/// The step the rewind test goes back to.
const REWIND_TO: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_rewound_to_a_step_is_stopped_and_a_new_agent_goes_on_from_that_step() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, _) = native_script();
    let cut = REWIND_TO as usize;
    // Three steps, then a step answered so late that the rewind stops the agent first; the
    // rewound agent reads the ignored and the untracked file back (so both were restored),
    // then answers.
    let mut replies: Vec<Reply> = before[..cut].to_vec();
    replies.push(before[cut].clone().after(Duration::from_secs(600)));
    replies.push(Reply::tool_use(
        "bash",
        json!({"command": "cat build.log b.txt > rewound.txt"}),
    ));
    replies.push(Reply::text(
        "## Summary\nRewound.\n\n## Files\n- rewound.txt",
    ));
    let fake = FakeAnthropic::start(replies).await;
    let cluster = Cluster::start(Options {
        workers: 1,
        slots: 2,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let task = submit(&cluster, &bare, "anthropic").await;
    let job = task.jobs[0].id;
    let checkpoint = checkpoint_at(&cluster, job, REWIND_TO).await;
    requests(&cluster, &fake, cut + 1).await;

    // Bad input: no such agent, no such step, a step 0, an unknown field, an empty message.
    let rewind = |id: JobId, body: serde_json::Value| {
        let path = format!("/v1/agents/{id}/rewind");
        let cluster = &cluster;
        async move { cluster.post(&path, &body).await }
    };
    let (status, body) = rewind(JobId::new(), json!({"to": REWIND_TO})).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{body}");
    let (status, body) = rewind(job, json!({"to": 99})).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("to: ") && message.contains("step 99"),
        "{body}"
    );
    for bad in [
        json!({"to": 0}),
        json!({"step": 3}),
        json!({"to": 3, "message": " "}),
    ] {
        let (status, body) = rewind(job, bad.clone()).await;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["code"], "invalid_field", "{bad}: {body}");
    }
    let home = tempfile::tempdir().unwrap();
    let (code, _, err) =
        orch_tests::run(orch_tests::orchctl_against(&cluster, home.path()).args([
            "agents",
            "rewind",
            &job.to_string(),
            "--to",
            "0",
        ]));
    assert_eq!(code, 2, "{err}");
    // Nothing was stopped by the refused requests.
    assert_eq!(
        cluster.task(&task.id.to_string()).await.jobs[0].status,
        JobStatus::Running
    );

    let asked_before = fake.message_requests().len();
    let (code, out, err) =
        orch_tests::run(orch_tests::orchctl_against(&cluster, home.path()).args([
            "agents",
            "rewind",
            &job.to_string(),
            "--to",
            &REWIND_TO.to_string(),
            "keep what you have and write rewound.txt",
            "--output",
            "json",
        ]));
    assert_eq!(code, 0, "{err}");
    let turn: serde_json::Value = serde_json::from_str(&out).unwrap();
    let new: JobId = turn["agent_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(turn["rewound_to"], REWIND_TO);
    let done = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(120))
        .await;
    let old = done.jobs.iter().find(|j| j.id == job).unwrap();
    let rewound = done.jobs.iter().find(|j| j.id == new).unwrap();
    assert_eq!(
        old.status,
        JobStatus::Cancelled,
        "the running agent was stopped"
    );
    assert_eq!(rewound.status, JobStatus::Succeeded, "{rewound:#?}");
    assert_eq!(
        (rewound.continues, rewound.rewound_to),
        (Some(job), Some(REWIND_TO))
    );

    // The new agent was never asked steps 1..3 again: its first request is the conversation
    // as it was after step 3, with the user's message after the tool results.
    let asked: Vec<Recorded> = fake.message_requests()[asked_before..].to_vec();
    assert_eq!(asked.len(), 2, "{asked:#?}");
    let messages = asked[0].body["messages"].as_array().unwrap();
    let assistant = messages.iter().filter(|m| m["role"] == "assistant").count();
    assert_eq!(assistant, cut, "{messages:#?}");
    let last = messages.last().unwrap().to_string();
    assert!(
        last.contains("tool_result") && last.contains("keep what you have and write rewound.txt"),
        "{last}"
    );
    // Its branch holds the tree of step 3 (a.txt as written, b.txt and the ignore file; the
    // ignored build.log restored in the workspace though not committed) and its own file.
    let commit = &rewound.git.as_ref().unwrap().commit;
    let listed = git(&bare, &["ls-tree", "-r", "--name-only", commit]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [".gitignore", "README.md", "a.txt", "b.txt", "rewound.txt"]
    );
    assert_eq!(
        git(&bare, &["show", &format!("{commit}:rewound.txt")]),
        "scratch\none"
    );
    assert_eq!(git(&bare, &["show", &format!("{commit}:a.txt")]), "alpha");
    // Its events say where it started; its spending is its own two requests.
    let events = cluster.events(&task.id.to_string(), None).await;
    let kinds = kinds(&events, new);
    assert!(
        kinds.iter().any(|k| matches!(
            k,
            EventKind::Resumed { from_step, from_agent: Some(from), .. }
                if *from_step == REWIND_TO && *from == job
        )),
        "{kinds:#?}"
    );
    let one = orch_tests::fake_anthropic::default_usage().total();
    assert_eq!(rewound.usage.total(), 2 * one);
    assert!(checkpoint.usage.total() >= u64::from(REWIND_TO) * one);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_scratch_workspace_killed_after_a_step_resumes_there_with_its_files() {
    let (before, _) = native_script();
    let cut = REWIND_TO as usize;
    // Three steps (a file, an ignore file, a shell command writing an ignored and an untracked
    // file), then one answered so late that the worker is killed first; the resumed run reads
    // all three back into a new file, then answers.
    let read_back = Reply::tool_use(
        "bash",
        json!({"command": "cat build.log b.txt a.txt > c.txt"}),
    );
    let answer = Reply::text("## Summary\nDone.\n\n## Files\n- c.txt");
    let mut replies: Vec<Reply> = before[..cut].to_vec();
    replies.push(read_back.clone().after(Duration::from_secs(600)));
    replies.extend([read_back, answer]);
    let fake = FakeAnthropic::start(replies).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "roles": ["builder"],
            "backend": "anthropic",
            "model": MODEL,
        }))
        .await;
    let job = task.jobs[0].id;
    let checkpoint = checkpoint_at(&cluster, job, REWIND_TO).await;
    requests(&cluster, &fake, cut + 1).await;
    // No repository to push to: the tree went to the sessions store as a bundle.
    assert_eq!(
        checkpoint.tree_object.as_deref(),
        Some(format!("checkpoint.{job}.{REWIND_TO}.tree").as_str()),
        "{checkpoint:?}"
    );
    assert!(
        checkpoint.commit.is_some() && checkpoint.files_changed >= 3,
        "{checkpoint:?}"
    );

    cluster.workers[0].signal(libc::SIGKILL);
    let stopped = Instant::now();
    cluster.add_worker();
    let done = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(120))
        .await;
    assert_completed(&cluster, &done);
    let after_stop: Vec<Recorded> = fake
        .message_requests()
        .into_iter()
        .filter(|r| r.at > stopped)
        .collect();
    // The request in flight at the kill, then the answer: steps 1..3 were not asked again.
    assert_eq!(after_stop.len(), 2, "{after_stop:#?}");
    let job_record = &done.jobs[0];
    assert_eq!(job_record.worker_id, Some(WorkerId("worker-1".into())));
    // The new worker's scratch directory had the files of step 3, the ignored one included.
    let diff = job_record.diff.clone().unwrap_or_default();
    assert!(
        diff.contains("+scratch\n+one\n+alpha"),
        "c.txt lacks the restored files: {diff}"
    );
    let events = cluster.events(&task.id.to_string(), None).await;
    assert!(
        kinds(&events, job)
            .iter()
            .any(|k| matches!(k, EventKind::Resumed { from_step, .. } if *from_step == REWIND_TO))
    );
}

/// The refs of agent checkpoints in the task's repository (`refs/orch/checkpoints/...`).
fn checkpoint_refs(bare: &Path) -> Vec<String> {
    git(
        bare,
        &[
            "for-each-ref",
            "--format=%(refname)",
            "refs/orch/checkpoints/",
        ],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

#[tokio::test]
async fn cleaning_a_task_deletes_its_checkpoint_refs_from_its_repository_once_a_worker_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (before, after) = native_script();
    let fake = FakeAnthropic::start(before.iter().chain(&after).cloned()).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let task = submit(&cluster, &bare, "anthropic").await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(120))
        .await;
    assert_completed(&cluster, &task);
    let job = task.jobs[0].id;
    assert_eq!(
        checkpoint_refs(&bare),
        vec![orch_shared::job::checkpoint_ref(job)]
    );
    let work = task.jobs[0].git.as_ref().unwrap().commit.clone();

    // No worker is up when the task is cleaned: the refs wait for one.
    cluster.workers[0].signal(libc::SIGTERM);
    assert!(
        cluster.workers[0]
            .wait_exit(Duration::from_secs(30))
            .is_some()
    );
    let (status, report) = cluster
        .post("/v1/clean", &json!({"older_than_ms": 0}))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["tasks"], 1, "{report}");
    assert_eq!(checkpoint_refs(&bare).len(), 1);

    cluster.add_worker();
    cluster
        .eventually(Duration::from_secs(60), || async {
            match checkpoint_refs(&bare) {
                refs if refs.is_empty() => Ok(()),
                refs => Err(format!("still there: {refs:?}")),
            }
        })
        .await;
    // The work itself stays: the task's branch still holds the agent's commit.
    let branch = &task.jobs[0].git.as_ref().unwrap().branch;
    assert_eq!(git(&bare, &["rev-parse", branch]), work);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_over_the_checkpoint_bound_says_so_once_in_the_log() {
    // Three steps on a scratch workspace whose tree (a git bundle of a few hundred bytes) is
    // over a bound of 100 bytes; the answer comes so late that the run is still going while
    // the test looks (a checkpoint is saved while its run lasts).
    let (before, _) = native_script();
    let mut replies: Vec<Reply> = before[..3].to_vec();
    replies.push(Reply::text("## Summary\nDone.").after(Duration::from_secs(600)));
    let fake = FakeAnthropic::start(replies).await;
    let mut worker_env = env(&fake);
    worker_env.push(("ORCH_CHECKPOINT_MAX_TREE_BYTES".into(), "100".into()));
    let mut cluster = Cluster::start(Options {
        workers: 0,
        slots: 1,
        worker_env,
        ..Options::default()
    })
    .await;
    let (_, metrics) = cluster.add_worker_with_metrics().await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "roles": ["builder"],
            "backend": "anthropic",
            "model": MODEL,
        }))
        .await;
    let id = task.id.to_string();
    let job = task.jobs[0].id;
    requests(&cluster, &fake, 4).await;
    // Every step wrote a file, so each was to be saved at once: at least two saves were
    // refused (quick steps may be folded into one), each counted.
    let skips = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("orch_worker_checkpoints_too_large_total"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    cluster
        .eventually(Duration::from_secs(60), || async {
            let n = skips(&cluster.scrape(&metrics).await);
            if n >= 2.0 {
                Ok(())
            } else {
                Err(format!("{n} checkpoints refused"))
            }
        })
        .await;
    // The run is stopped (the event log of a task ends with it), then read.
    let (status, body) = cluster
        .post(&format!("/v1/tasks/{id}/cancel"), &json!(null))
        .await;
    assert!(status.is_success(), "{status} {body}");
    cluster.wait_task(&id, Duration::from_secs(120)).await;
    let events = cluster.events(&id, None).await;
    let kinds = kinds(&events, job);
    let skipped: Vec<(u32, u64, u64)> = kinds
        .iter()
        .filter_map(|k| match k {
            EventKind::CheckpointSkipped {
                step,
                tree_bytes,
                bound_bytes,
            } => Some((*step, *tree_bytes, *bound_bytes)),
            _ => None,
        })
        .collect();
    // Once for the job, not once per step, with the size and the bound.
    assert_eq!(skipped.len(), 1, "{kinds:#?}");
    let (step, tree_bytes, bound_bytes) = skipped[0];
    assert_eq!(step, 1);
    assert_eq!(bound_bytes, 100);
    assert!(tree_bytes > 100, "{tree_bytes}");
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, EventKind::Checkpointed { .. })),
        "{kinds:#?}"
    );
    // No pointer was left to resume from.
    let client = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pointer: Option<String> = redis::cmd("GET")
        .arg(keys::checkpoint(job))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pointer, None);
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) = orch_tests::run(
        orch_tests::orchctl_against(&cluster, home.path()).args(["logs", "--task", &id]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "not checkpointed after step 1: the workspace's tree takes {tree_bytes} bytes, over the bound of 100"
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_in_a_plain_local_directory_resumes_its_conversation_and_says_the_files_stay() {
    // Two files, then a step answered so late that the worker is killed first; the resumed
    // run (another worker on the same machine, which sees the directory) reads both back into
    // a third file, then answers.
    let write = |name: &str| {
        Reply::tool_use(
            "write_file",
            json!({"path": name, "content": format!("{name}\n")}),
        )
    };
    let read_back = Reply::tool_use("bash", json!({"command": "cat a.txt b.txt > c.txt"}));
    let answer = Reply::text("## Summary\nDone.");
    let replies = vec![
        write("a.txt"),
        write("b.txt"),
        read_back.clone().after(Duration::from_secs(600)),
        read_back,
        answer,
    ];
    let fake = FakeAnthropic::start(replies).await;
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        ..Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "roles": ["builder"],
            "backend": "anthropic",
            "model": MODEL,
            "workspace": dir.path().display().to_string(),
        }))
        .await;
    let job = task.jobs[0].id;
    // The conversation alone is checkpointed: no commit, no tree.
    let checkpoint = checkpoint_at(&cluster, job, 2).await;
    assert_eq!(checkpoint.commit, None, "{checkpoint:?}");
    assert_eq!(checkpoint.tree_object, None, "{checkpoint:?}");
    requests(&cluster, &fake, 3).await;

    cluster.workers[0].signal(libc::SIGKILL);
    let stopped = Instant::now();
    cluster.add_worker();
    let done = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(120))
        .await;
    assert_completed(&cluster, &done);
    let after_stop: Vec<Recorded> = fake
        .message_requests()
        .into_iter()
        .filter(|r| r.at > stopped)
        .collect();
    // The request in flight at the kill, then the answer: steps 1 and 2 were not asked again.
    assert_eq!(after_stop.len(), 2, "{after_stop:#?}");
    assert_eq!(done.jobs[0].worker_id, Some(WorkerId("worker-1".into())));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("c.txt")).unwrap(),
        "a.txt\nb.txt\n"
    );
    let events = cluster.events(&task.id.to_string(), None).await;
    let why = kinds(&events, job)
        .into_iter()
        .find_map(|k| match k {
            EventKind::Resumed {
                from_step: 2,
                files_not_restored,
                ..
            } => Some(files_not_restored),
            _ => None,
        })
        .expect("a resumed event after step 2");
    let why = why.expect("the resumed event says the files were not restored");
    assert!(why.contains("plain local directory"), "{why}");
}

/// Builders (the `command` backend) that change the one line of `greet.sh` each their way.
const GREET_BUILDER: &str = r#"prompt=$(cat)
case "$prompt" in
  *"greet by name"*) sed -i 's/^  echo hello$/  echo "hello $1"/' greet.sh ;;
  *"greet with the hour"*) sed -i 's/^  echo hello$/  echo "hello at $(date +%H)"/' greet.sh ;;
esac
echo "edited greet.sh""#;

/// What the integrator's first step runs: keep both sides of every conflict (drop the common
/// ancestor of the `diff3` markers).
const KEEP_BOTH: &str = r#"for f in $(grep -rl '^<<<<<<< ' --exclude-dir=.git .); do awk '/^<<<<<<< /{next} /^\|\|\|\|\|\|\| /{skip=1; next} /^=======$/{skip=0; next} /^>>>>>>> /{next} !skip' "$f" > "$f.resolved" && mv "$f.resolved" "$f"; done; echo resolved"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrator_killed_mid_merge_resumes_in_the_merge_and_commits_it_with_both_parents() {
    let dir = tempfile::tempdir().unwrap();
    let bare = orch_tests::origin_with(
        dir.path(),
        &[("greet.sh", "greet() {\n  echo hello\n}\n")],
        "greet",
    );
    // The integrator (the native tool loop) resolves the conflict in its first step; its
    // second step's answer comes so late that its worker is killed first.
    let fake = FakeAnthropic::start(vec![
        Reply::tool_use("bash", json!({"command": KEEP_BOTH})),
        Reply::text("Both greetings kept.").after(Duration::from_secs(600)),
        Reply::text("## Summary\nBoth greetings kept.\n\n## Files\n- greet.sh"),
    ])
    .await;
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {GREET_BUILDER:?}, \"agent\"]\n"
        ),
    )
    .unwrap();
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_env: env(&fake),
        worker_args: vec!["--config".into(), config.display().to_string()],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "improve the greeting",
            "mode": "parallel",
            "backend": "command",
            "backends": {"integrator": "anthropic"},
            "model": MODEL,
            "repo": bare.display().to_string(),
            "ref": "main",
            "plan": {"steps": [
                {"role": "builder", "scope": "greet by name"},
                {"role": "builder", "scope": "greet with the hour"},
            ]},
        }))
        .await;
    let id = task.id.to_string();
    let integrator = cluster
        .eventually(Duration::from_secs(60), || async {
            let t = cluster.task(&id).await;
            t.jobs
                .iter()
                .find(|j| j.role == orch_shared::role::Role::Integrator)
                .map(|j| j.id)
                .ok_or_else(|| format!("no integrator yet: {t:#?}"))
        })
        .await;
    let checkpoint = checkpoint_at(&cluster, integrator, 1).await;
    requests(&cluster, &fake, 2).await;
    let commit = checkpoint.commit.clone().expect("a tree commit");
    // The checkpoint holds the resolved file and the merge's other side as second parent.
    assert!(
        !git(&bare, &["show", &format!("{commit}:greet.sh")]).contains("<<<<<<<"),
        "the checkpoint has the resolved file"
    );
    assert_eq!(
        git(&bare, &["rev-list", "--parents", "-n", "1", &commit])
            .split(' ')
            .count(),
        3,
        "the checkpoint records the merge"
    );

    cluster.workers[0].signal(libc::SIGKILL);
    cluster.add_worker();
    let task = cluster.wait_task(&id, Duration::from_secs(120)).await;
    assert_completed(&cluster, &task);
    let job = task.jobs.iter().find(|j| j.id == integrator).unwrap();
    assert_eq!(job.worker_id, Some(WorkerId("worker-1".into())));
    assert_eq!(
        fake.message_requests().len(),
        3,
        "the resolving step was not asked again"
    );
    let events = cluster.events(&id, None).await;
    assert!(
        kinds(&events, integrator)
            .iter()
            .any(|k| matches!(k, EventKind::Resumed { from_step: 1, .. })),
        "{:#?}",
        kinds(&events, integrator)
    );
    // The resumed agent's commit is the merge: both sides are its parents, and the task
    // branch holds it with both greetings.
    let git_outcome = job.git.as_ref().unwrap();
    let parents = git(
        &bare,
        &["rev-list", "--parents", "-n", "1", &git_outcome.commit],
    );
    let parents: Vec<&str> = parents.split(' ').skip(1).collect();
    assert_eq!(parents.len(), 2, "{parents:?}");
    let builders: Vec<String> = task
        .jobs
        .iter()
        .filter(|j| j.role == orch_shared::role::Role::Builder)
        .map(|j| j.git.as_ref().unwrap().commit.clone())
        .collect();
    for b in &builders {
        assert!(
            parents
                .iter()
                .any(|p| git(&bare, &["rev-list", p]).lines().any(|c| c == b)),
            "builder commit {b} is not behind the merge {parents:?}"
        );
    }
    let branch = format!("orch/{id}");
    let greet = git(&bare, &["show", &format!("{branch}:greet.sh")]);
    assert!(
        greet.contains("hello $1") && greet.contains("hello at") && !greet.contains("<<<"),
        "{greet}"
    );
    assert!(git_outcome.merged, "{git_outcome:?}");
}
