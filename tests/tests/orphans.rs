//! A worker's processes die with it (issue 23): after a worker is SIGKILLed, nothing it started
//! for a job (the Claude Code CLI and its tools, a `command` program and its children, git)
//! keeps running, spending tokens or writing into its workspace, while the job is redelivered
//! and completes on another worker. A worker restarted on the same data directory clears what
//! a previous one left there, and never touches a live worker's directory.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, TaskStatus};
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::procs::{self, Proc};
use orch_tests::{Cluster, Options, assert_completed, workspace_bin};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MODEL: &str = "claude-sonnet-4-5";
/// How fast a dead worker's processes must be gone.
const GONE_WITHIN: Duration = Duration::from_secs(1);

/// A `command` agent: with `ORPHAN_SLOW` set it starts a child and a grandchild that would run
/// for ten minutes (and never answers); otherwise it answers at once.
const AGENT: &str = r#"cat > /dev/null
if [ -n "$ORPHAN_SLOW" ]; then
  sh -c 'sleep 600 & wait' &
  sleep 601
fi
printf '## Summary\ndone\n'
"#;

/// A cluster without workers whose workers run [`AGENT`] as the `command` backend.
async fn command_cluster(dir: &Path) -> Cluster {
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {AGENT:?}]\nprompt = \"stdin\"\n\
             pass_env = [\"ORPHAN_SLOW\", \"ORPHAN_MARK\"]\n"
        ),
    )
    .unwrap();
    Cluster::start(Options {
        workers: 0,
        slots: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        ..Options::default()
    })
    .await
}

/// Starts a worker with its data in `data` and `env` added to the cluster's; its index.
async fn add_worker(cluster: &mut Cluster, data: &Path, env: &[(&str, &str)]) -> usize {
    let (args, vars) = (
        cluster.opts.worker_args.clone(),
        cluster.opts.worker_env.clone(),
    );
    cluster
        .opts
        .worker_args
        .extend(["--data-dir".into(), data.display().to_string()]);
    cluster
        .opts
        .worker_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let i = cluster.add_worker();
    cluster.opts.worker_args = args;
    cluster.opts.worker_env = vars;
    let live = cluster
        .workers
        .iter_mut()
        .filter_map(|w| w.is_running().then_some(()))
        .count();
    cluster.wait_workers(live).await;
    i
}

/// Polls until `found` holds, at most 60 s.
async fn wait_for(cluster: &Cluster, what: &str, mut found: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !found() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs worker `i` and checks that every process it had started, and every process still
/// working under `data` or carrying `mark`, is gone within [`GONE_WITHIN`].
/// Returns the command lines of the processes it had started.
fn kill_and_check(cluster: &mut Cluster, i: usize, data: &Path, mark: &str) -> Vec<String> {
    let pid = cluster.workers[i].pid() as u32;
    let family = procs::descendants(pid);
    let commands = family.iter().map(|p| procs::cmdline(p.0)).collect();
    assert!(!family.is_empty(), "worker {i} runs nothing");
    cluster.workers[i].signal(libc::SIGKILL);
    let killed = Instant::now();
    assert!(
        cluster.workers[i]
            .wait_exit(Duration::from_secs(5))
            .is_some()
    );
    let left = procs::wait_gone(&family, GONE_WITHIN);
    assert!(
        left.is_empty(),
        "processes of the killed worker still run {:?} after the kill: {left:?}",
        killed.elapsed()
    );
    let left = procs::marked(data, mark);
    assert!(
        left.is_empty(),
        "processes still work for the dead worker: {left:?}"
    );
    commands
}

/// The job of a one-job task, once the task ended.
async fn finished(cluster: &Cluster, id: &str) -> orch_shared::api::Task {
    let task = cluster.wait_task(id, Duration::from_secs(90)).await;
    assert_completed(cluster, &task);
    assert_eq!(task.jobs.len(), 1);
    assert_eq!(task.jobs[0].status, JobStatus::Succeeded, "{task:#?}");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_agent_and_its_children_die_with_a_killed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = command_cluster(dir.path()).await;
    let data = dir.path().join("data-slow");
    let mark = "ORPHAN_MARK=command-slow";
    let first = add_worker(
        &mut cluster,
        &data,
        &[("ORPHAN_SLOW", "1"), ("ORPHAN_MARK", "command-slow")],
    )
    .await;
    let task = cluster
        .submit(json!({"prompt": "sleep", "roles": ["builder"], "backend": "command"}))
        .await;
    let id = task.id.to_string();
    // The program, its child shell and both sleeps.
    wait_for(&cluster, "the agent's grandchild starting", || {
        procs::marked(&data, mark)
            .iter()
            .filter(|(_, cmd)| cmd.starts_with("sleep "))
            .count()
            == 2
    })
    .await;
    kill_and_check(&mut cluster, first, &data, mark);

    add_worker(&mut cluster, &dir.path().join("data-fast"), &[]).await;
    let task = finished(&cluster, &id).await;
    let job = &task.jobs[0];
    assert_eq!(job.output.as_deref(), Some("## Summary\ndone"));
    assert_eq!(
        job.worker_id.as_ref().map(|w| w.0.as_str()),
        Some("worker-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claude_code_cli_dies_with_a_killed_worker_and_calls_the_model_no_more() {
    let dir = tempfile::tempdir().unwrap();
    // A slow run: several Bash steps of a second and a half, then the answer.
    let step = |n: usize| {
        Reply::tool_use(
            "Bash",
            json!({"command": format!("sleep 1.5; echo step {n}"), "description": "step"}),
        )
    };
    let mut script: Vec<Reply> = (0..8).map(step).collect();
    script.push(Reply::text("## Summary\ndone"));
    let fake = FakeAnthropic::start(script).await;
    let mut cluster = Cluster::start(Options {
        workers: 0,
        slots: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-orphans".into()),
            (
                "ORCH_CLAUDE_BIN".into(),
                orch_tests::claude_cli::claude_bin().display().to_string(),
            ),
        ],
        ..Options::default()
    })
    .await;
    let data = dir.path().join("data-first");
    let first = add_worker(&mut cluster, &data, &[]).await;
    let task = cluster
        .submit(json!({
            "prompt": "work slowly", "roles": ["builder"], "backend": "claude-code", "model": MODEL,
        }))
        .await;
    let id = task.id.to_string();
    // The CLI runs its second step: a model request made, a tool command running.
    wait_for(&cluster, "the CLI's second Bash step", || {
        fake.message_requests().len() >= 2
            && procs::marked(&data, "-")
                .iter()
                .any(|(_, cmd)| cmd.contains("sleep"))
    })
    .await;
    kill_and_check(&mut cluster, first, &data, "-");
    let requests = fake.message_requests().len();
    // Longer than a step: an orphaned CLI would have asked for its next one by then. (Only
    // the absence of a request is checked here: no event to wait for.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.message_requests().len(),
        requests,
        "the model was called after the worker died"
    );

    add_worker(&mut cluster, &dir.path().join("data-second"), &[]).await;
    let task = finished(&cluster, &id).await;
    assert_eq!(task.jobs[0].output.as_deref(), Some("## Summary\ndone"));
    assert_eq!(fake.remaining(), 0, "every scripted reply was used");
}

/// Runs git in `dir`, which must work.
fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_git_process_outlives_a_worker_killed_during_a_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("origin.git");
    let seed = dir.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    git(
        dir.path(),
        &["init", "-q", "--bare", "-b", "main", "origin.git"],
    );
    git(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README.md"), "# Project\n").unwrap();
    git(&seed, &["add", "."]);
    git(
        &seed,
        &[
            "-c",
            "user.name=s",
            "-c",
            "user.email=s@localhost",
            "commit",
            "-qm",
            "init",
        ],
    );
    git(&seed, &["push", "-q", bare.to_str().unwrap(), "main"]);
    // A git that hangs in every fetch, first on the first worker's PATH: the fetch into its
    // clone cache never ends.
    let wrappers = dir.path().join("slow-git");
    std::fs::create_dir_all(&wrappers).unwrap();
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let wrapper = wrappers.join("git");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" fetch \"*) sleep 600 ;; esac\nexec {} \"$@\"\n",
            real.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        wrappers.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut cluster = command_cluster(dir.path()).await;
    let data = dir.path().join("data-slow");
    let mark = "ORPHAN_MARK=git-slow";
    let first = add_worker(
        &mut cluster,
        &data,
        &[("PATH", &path), ("ORPHAN_MARK", "git-slow")],
    )
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "fetch", "roles": ["builder"], "backend": "command",
            "repo": bare.display().to_string(), "ref": "main",
        }))
        .await;
    let id = task.id.to_string();
    wait_for(&cluster, "the hanging fetch", || {
        procs::marked(&data, mark)
            .iter()
            .any(|(_, cmd)| cmd == "sleep 600")
    })
    .await;
    let commands = kill_and_check(&mut cluster, first, &data, mark);
    assert!(
        commands.iter().any(|c| c.contains(" fetch ")),
        "the fetch was among the worker's processes: {commands:?}"
    );

    add_worker(&mut cluster, &dir.path().join("data-fast"), &[]).await;
    let task = finished(&cluster, &id).await;
    assert!(task.jobs[0].git.is_some(), "{task:#?}");
}

/// Starts `sleep 600` in a process group of its own; it and its start time.
fn sleeper() -> (std::process::Child, u64) {
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    (child, start)
}

/// Whether `child` has exited, waiting at most 5 s.
fn exits(child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_clears_its_data_dir_and_leaves_a_live_workers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = command_cluster(dir.path()).await;

    // A live worker, busy with a job whose processes run.
    let live = dir.path().join("data-live");
    let mark = "ORPHAN_MARK=live";
    add_worker(
        &mut cluster,
        &live,
        &[("ORPHAN_SLOW", "1"), ("ORPHAN_MARK", "live")],
    )
    .await;
    let task = cluster
        .submit(json!({"prompt": "sleep", "roles": ["builder"], "backend": "command"}))
        .await;
    wait_for(&cluster, "the live worker's job starting", || {
        procs::marked(&live, mark)
            .iter()
            .filter(|(_, cmd)| cmd.starts_with("sleep "))
            .count()
            == 2
    })
    .await;
    let live_procs: Vec<Proc> = procs::marked(&live, mark)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let live_files = |dir: &Path| -> Vec<PathBuf> {
        ["scratch", "procs"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(dir.join(d))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.path())
            .collect()
    };
    let live_before = live_files(&live);
    assert_eq!(
        live_before.len(),
        2,
        "a workspace and a record: {live_before:?}"
    );

    // What a previous worker on another data directory left: a workspace, a process recorded
    // with its start time, and a record whose pid now belongs to another process.
    let stale = dir.path().join("data-stale");
    std::fs::create_dir_all(stale.join("scratch/job-1/src")).unwrap();
    std::fs::create_dir_all(stale.join("procs")).unwrap();
    let (mut left, start) = sleeper();
    std::fs::write(
        stale.join(format!("procs/{}", left.id())),
        format!("{start}\n"),
    )
    .unwrap();
    let (mut reused, start) = sleeper();
    std::fs::write(
        stale.join(format!("procs/{}", reused.id())),
        format!("{}\n", start + 1),
    )
    .unwrap();

    // A second worker on the live worker's directory is refused, and changes nothing there.
    let mut cmd = std::process::Command::new(workspace_bin("orch-worker"));
    let out = cmd
        .args([
            "--nats-url",
            "nats://127.0.0.1:1",
            "--redis-url",
            "redis://127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(&live)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another live worker"), "{err}");
    assert_eq!(live_files(&live), live_before);

    add_worker(&mut cluster, &stale, &[]).await;
    assert!(exits(&mut left), "the recorded process was not killed");
    assert!(!stale.join("scratch/job-1").exists());
    assert_eq!(
        std::fs::read_dir(stale.join("procs")).unwrap().count(),
        0,
        "every record is cleared"
    );
    assert!(!exits_now(&mut reused), "a reused pid was killed");
    let _ = reused.kill();
    let _ = reused.wait();

    assert_eq!(live_files(&live), live_before);
    for p in &live_procs {
        assert!(
            procs::runs(*p),
            "the live worker's process {p:?} was killed"
        );
    }
    let task = cluster.task(&task.id.to_string()).await;
    assert_eq!(task.status, TaskStatus::Running, "{task:#?}");
}

/// Whether `child` has exited already.
fn exits_now(child: &mut std::process::Child) -> bool {
    matches!(child.try_wait(), Ok(Some(_)))
}
