//! Parallel branches that conflict, end to end: an integrator agent resolves the merge on the
//! task branch, and the task branch ends up with every job's work. The agents are the `command`
//! backend running a small shell script against a real bare repository; the integrator's
//! script resolves a conflict the way a careful person would for two additions to one line:
//! it keeps both sides (and drops the common ancestor the `diff3` markers show).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, Task};
use orch_shared::event::EventKind;
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
      *"greet by name"*) sed -i 's/^  echo hello$/  echo "hello $1"/' greet.sh ;;
      *"greet with the hour"*) sed -i 's/^  echo hello$/  echo "hello at $(date +%H)"/' greet.sh ;;
    esac
    echo "edited greet.sh" ;;
esac
"#;

const GREET: &str = "greet() {\n  echo hello\n}\n";

/// A bare repository whose `main` holds `greet.sh`; its path.
fn origin(dir: &Path) -> PathBuf {
    let bare = orch_tests::origin(dir);
    let seed = dir.join("seed");
    std::fs::write(seed.join("greet.sh"), GREET).unwrap();
    git(&seed, &["add", "."]);
    git(
        &seed,
        &[
            "-c",
            "user.name=seed",
            "-c",
            "user.email=seed@localhost",
            "commit",
            "-qm",
            "greet",
        ],
    );
    git(&seed, &["push", "-q", &bare.display().to_string(), "main"]);
    bare
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

/// Two builders in parallel, each changing the same line of `greet()`.
fn two_builders(bare: &Path) -> serde_json::Value {
    json!({
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
        [Role::Builder, Role::Builder, Role::Integrator],
        "{task:#?}"
    );
    assert!(task.jobs.iter().all(|j| j.status == JobStatus::Succeeded));
    let [a, b, integrator] = &task.jobs[..] else {
        unreachable!()
    };
    let (ga, gb) = (a.git.as_ref().unwrap(), b.git.as_ref().unwrap());
    let (merged, skipped) = if ga.merged { (a, b) } else { (b, a) };
    let skipped_git = skipped.git.as_ref().unwrap();
    assert!(!skipped_git.merged, "{ga:?} {gb:?}");
    assert_eq!(skipped_git.conflicts, ["greet.sh"]);
    assert_eq!(integrator.depends_on, [skipped.step]);
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
