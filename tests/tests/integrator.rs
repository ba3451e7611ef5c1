//! Parallel branches that conflict, end to end: an integrator agent resolves the merge on the
//! task branch, the task's check command runs on the result, and a failing check goes back to
//! the agent whose change broke it. The agents are the `command`
//! backend running a small shell script against a real bare repository; the integrator's
//! script resolves a conflict the way a careful person would for two additions to one line:
//! it keeps both sides (and drops the common ancestor the `diff3` markers show).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, JobKind};
use orch_shared::role::Role;
use orch_tests::{Cluster, Options, assert_completed, git};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent. Builders edit the one line of `greet()` in `greet.sh`, each differently (their
/// step's scope says how); the integrator keeps both sides of every conflict.
const AGENT: &str = r#"prompt=$(cat)
case "$ORCH_ROLE" in
  integrator)
    for f in $(grep -rl '^<<<<<<< ' --exclude-dir=.git .); do
      awk '/^<<<<<<< /{next} /^\|\|\|\|\|\|\| /{skip=1; next} /^=======$/{skip=0; next} /^>>>>>>> /{next} !skip' "$f" > "$f.resolved"
      mv "$f.resolved" "$f"
      echo "resolved $f"
    done ;;
  *)
    case "$prompt" in
      *"files you changed: b.txt"*) echo fixed > b.txt ;;
      *"write a.txt"*) echo a > a.txt ;;
      *"write b.txt"*) echo broken > b.txt ;;
      *"greet by name"*) sed -i 's/^  echo hello$/  echo "hello $1"/' greet.sh ;;
      *"greet with the hour"*) sed -i 's/^  echo hello$/  echo "hello at $(date +%H)"/' greet.sh ;;
    esac
    echo "edited greet.sh" ;;
esac
"#;

const GREET: &str = "greet() {\n  echo hello\n}\n";

/// A bare repository whose `main` holds `greet.sh`; its path.
fn origin(dir: &Path) -> PathBuf {
    orch_tests::origin_with(dir, &[("greet.sh", GREET)], "greet")
}

async fn cluster(dir: &Path) -> Cluster {
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!("[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {AGENT:?}, \"agent\"]\n"),
    )
    .unwrap();
    Cluster::start(Options {
        workers: 2,
        slots: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        ..Options::default()
    })
    .await
}

/// Two builders in parallel, each changing the same line of `greet()`; the check passes when
/// both changes are in.
fn two_builders(bare: &Path) -> serde_json::Value {
    json!({
        "check": "grep -q 'hello $1' greet.sh && grep -q 'hello at' greet.sh && echo both greetings",
        "prompt": "improve the greeting",
        "mode": "parallel",
        "backend": "command",
        "repo": bare.display().to_string(),
        "ref": "main",
        "plan": {"steps": [
            {"role": "builder", "scope": "greet by name"},
            {"role": "builder", "scope": "greet with the hour"},
        ]},
    })
}

/// Whether `commit` is in `branch` of `bare`.
fn contains(bare: &Path, branch: &str, commit: &str) -> bool {
    std::process::Command::new("git")
        .arg("-C")
        .arg(bare)
        .args(["merge-base", "--is-ancestor", commit, branch])
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_parallel_builders_are_merged_by_an_integrator() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let cluster = cluster(dir.path()).await;
    let task = cluster.submit(two_builders(&bare)).await;
    let id = task.id.to_string();
    let task: Task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &task);

    // The plan grew an integrator after the builder whose branch did not merge.
    let roles: Vec<Role> = task.jobs.iter().map(|j| j.role).collect();
    assert_eq!(
        roles,
        [Role::Builder, Role::Builder, Role::Integrator, Role::Tester],
        "{task:#?}"
    );
    assert!(task.jobs.iter().all(|j| j.status == JobStatus::Succeeded));
    let [a, b, integrator, check] = &task.jobs[..] else {
        unreachable!()
    };
    // The check ran once, on the integrated task branch, and passed.
    assert_eq!(check.kind, JobKind::Check);
    let report = task.check.as_ref().expect("the task records its check");
    assert_eq!(
        (report.passed, report.rounds, report.max_rounds),
        (Some(true), 1, 3)
    );
    assert_eq!(report.output_tail, "both greetings");
    assert!(report.blamed.is_empty());
    let (ga, gb) = (a.git.as_ref().unwrap(), b.git.as_ref().unwrap());
    let (merged, skipped) = if ga.merged { (a, b) } else { (b, a) };
    let skipped_git = skipped.git.as_ref().unwrap();
    assert!(!skipped_git.merged, "{ga:?} {gb:?}");
    assert_eq!(skipped_git.conflicts, ["greet.sh"]);
    assert_eq!(integrator.depends_on, [skipped.step]);
    assert_eq!(
        check.depends_on,
        [merged.step, integrator.step],
        "the check follows the leaves"
    );
    assert!(
        integrator.prompt.contains(&skipped_git.branch) && integrator.prompt.contains("greet.sh"),
        "{}",
        integrator.prompt
    );
    let gi = integrator.git.as_ref().unwrap();
    assert!(gi.merged && gi.conflicts.is_empty(), "{gi:?}");
    assert_eq!(integrator.files_written, ["greet.sh"]);

    // The task branch has both builders' work, resolved, and every job's commit.
    let branch = format!("orch/{id}");
    let greet = git(&bare, &["show", &format!("{branch}:greet.sh")]);
    // Ours (the task branch: the builder merged first), then theirs.
    let line = |job: &orch_shared::api::Job| {
        if job.prompt.contains("greet by name") {
            "  echo \"hello $1\""
        } else {
            "  echo \"hello at $(date +%H)\""
        }
    };
    assert_eq!(
        greet,
        format!("greet() {{\n{}\n{}\n}}", line(merged), line(skipped)),
        "the merge keeps both edits"
    );
    for job in [merged, skipped, integrator] {
        let commit = &job.git.as_ref().unwrap().commit;
        assert!(
            contains(&bare, &branch, commit),
            "step {} ({commit}) is not in {branch}",
            job.step
        );
    }

    // The integrator was announced as a planned step.
    let events = cluster.events(&id, None).await;
    assert!(
        events.iter().any(|(_, e)| matches!(
            &e.kind,
            EventKind::TaskPlanned { source, steps, .. }
                if source == "integrator" && steps.len() == 1 && steps[0].job_id == integrator.id
        )),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_goes_back_to_the_agent_whose_files_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let cluster = cluster(dir.path()).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "mode": "parallel",
            "backend": "command",
            "repo": bare.display().to_string(),
            "ref": "main",
            "check": "test \"$(cat b.txt)\" = fixed || { echo 'b.txt: expected fixed'; exit 1; }",
            "check_rounds": 2,
            "plan": {"steps": [
                {"role": "builder", "scope": "write a.txt"},
                {"role": "builder", "scope": "write b.txt"},
            ]},
        }))
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &task);
    let [a, b, first_check, fix, second_check] = &task.jobs[..] else {
        panic!("two builders, a check, a fix and a check: {task:#?}")
    };
    assert_eq!(
        (first_check.kind, first_check.status),
        (JobKind::Check, JobStatus::Failed)
    );
    let error = first_check.error.as_ref().unwrap();
    assert_eq!(error.reason, FailureReason::CheckFailed);
    assert!(
        first_check
            .output
            .as_deref()
            .unwrap()
            .contains("b.txt: expected fixed")
    );
    // The output names b.txt: the builder that wrote it gets the failure, not the other one.
    assert_eq!(a.files_written, ["a.txt"]);
    assert_eq!(b.files_written, ["b.txt"]);
    assert_eq!(fix.role, Role::Builder);
    assert_eq!(
        fix.depends_on,
        [b.step],
        "the command backend keeps no session: a new step from its branch"
    );
    assert!(
        fix.prompt.contains("b.txt: expected fixed")
            && fix.prompt.contains("files you changed: b.txt"),
        "{}",
        fix.prompt
    );
    assert_eq!(fix.status, JobStatus::Succeeded);
    assert_eq!(
        (second_check.kind, second_check.status),
        (JobKind::Check, JobStatus::Succeeded)
    );
    assert_eq!(second_check.depends_on, [a.step, fix.step]);
    let report = task.check.as_ref().unwrap();
    assert_eq!(
        (report.passed, report.rounds, report.max_rounds),
        (Some(true), 2, 2)
    );
    assert_eq!(report.blamed, [b.id]);
    let branch = format!("orch/{id}");
    assert_eq!(git(&bare, &["show", &format!("{branch}:b.txt")]), "fixed");
    assert_eq!(git(&bare, &["show", &format!("{branch}:a.txt")]), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_keeps_failing_fails_the_task_after_its_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let cluster = cluster(dir.path()).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the files",
            "backend": "command",
            "repo": bare.display().to_string(),
            "check": "echo 'a.txt is never right'; exit 3",
            "check_rounds": 2,
            "plan": {"steps": [{"role": "builder", "scope": "write a.txt"}]},
        }))
        .await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_eq!(task.status, TaskStatus::Failed, "{task:#?}");
    let kinds: Vec<JobKind> = task.jobs.iter().map(|j| j.kind).collect();
    assert_eq!(
        kinds,
        [
            JobKind::Agent,
            JobKind::Check,
            JobKind::Agent,
            JobKind::Check
        ]
    );
    let report = task.check.as_ref().unwrap();
    assert_eq!((report.passed, report.rounds), (Some(false), 2));
    assert_eq!(report.output_tail, "a.txt is never right");
    assert_eq!(
        report.blamed,
        [task.jobs[0].id],
        "one follow-up: the last round sends none"
    );
    let error = task.error.as_deref().unwrap();
    assert!(
        error.contains("the check `echo 'a.txt is never right'; exit 3` failed (2 of 2 rounds)"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_check_is_refused_with_its_field_before_any_agent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let repo = bare.display().to_string();
    for (body, field) in [
        (
            json!({"prompt": "p", "repo": repo, "check": "  "}),
            "check: must not be empty",
        ),
        (
            json!({"prompt": "p", "check": "cargo test"}),
            "check: needs repo",
        ),
        (
            json!({"prompt": "p", "repo": repo, "check": "make", "check_rounds": 0}),
            "check_rounds:",
        ),
        (
            json!({"prompt": "p", "repo": repo, "check_rounds": 2}),
            "check_rounds: needs check",
        ),
    ] {
        let (status, answer) = cluster.post("/v1/tasks", &body).await;
        assert_eq!(status.as_u16(), 400, "{body}: {answer}");
        assert_eq!(answer["code"], "invalid_field", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let (_, tasks) = cluster.get("/v1/tasks").await;
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(0), "{tasks}");

    // The CLI says the same in one line, with exit status 2.
    let home = tempfile::tempdir().unwrap();
    let (code, _, stderr) = orch_tests::run(
        orch_tests::orchctl_against(&cluster, home.path())
            .args(["submit", "p", "--repo", &repo, "--check", ""]),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("check: must not be empty"), "{stderr}");
}
