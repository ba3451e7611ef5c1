//! Conflict warnings while agents work, end to end: parallel builders (the `command` backend
//! running a small shell script) edit files of a real bare repository and wait; their worker
//! reports what they changed, the coordinator compares the running jobs and warns of
//! overlapping edits before either finishes. With `serialize_conflicts` a step whose declared
//! scope overlaps a running one's waits for it. The builders wait for the test's go (a file it
//! writes into their clone's `.git`, outside the work tree), so nothing depends on timing.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, Task};
use orch_shared::event::EventKind;
use orch_tests::{Cluster, Options, assert_completed};
use reqwest::StatusCode;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent: a builder makes the edit its step's scope names, then waits for the go.
const AGENT: &str = r#"prompt=$(cat)
case "$prompt" in
  *"edit the top of greet.sh"*) sed -i '1s/.*/# greeting, edited at the top/' greet.sh ;;
  *"edit the bottom of greet.sh"*) sed -i '$s/.*/# end, edited at the bottom/' greet.sh ;;
  *"write a.txt"*) echo a > a.txt ;;
  *"write b.txt"*) echo b > b.txt ;;
esac
if [ "$ORCH_ROLE" = builder ]; then
  while [ ! -e .git/orch-go ]; do sleep 0.05; done
fi
echo "edited"
"#;

/// Ten lines: edits of its first and last lines merge without a conflict.
const GREET: &str = "# greeting\ngreet() {\n  echo hello\n}\n\n\n\n\n\n# end\n";

/// A bare repository whose `main` holds `greet.sh`; its path.
fn origin(dir: &Path) -> PathBuf {
    orch_tests::origin_with(dir, &[("greet.sh", GREET)], "greet")
}

/// One worker with two slots and a data directory the test knows (to find the clones).
async fn cluster(dir: &Path) -> (Cluster, PathBuf) {
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!("[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {AGENT:?}, \"agent\"]\n"),
    )
    .unwrap();
    let data = dir.join("data");
    let cluster = Cluster::start(Options {
        workers: 1,
        slots: 2,
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        ..Options::default()
    })
    .await;
    (cluster, data)
}

fn submit_body(bare: &Path, steps: serde_json::Value, serialize: bool) -> serde_json::Value {
    json!({
        "prompt": "improve the greeting",
        "mode": "parallel",
        "backend": "command",
        "repo": bare.display().to_string(),
        "ref": "main",
        "serialize_conflicts": serialize,
        "plan": {"steps": steps},
    })
}

/// Lets job `step` of `task` finish: writes the go file into its clone once the clone exists.
async fn go(cluster: &Cluster, data: &Path, task: &Task, step: usize) {
    let job = &task.jobs[step];
    let git_dir = data
        .join("scratch")
        .join(format!("{}-{}", job.id, job.attempt))
        .join(".git");
    cluster
        .eventually(Duration::from_secs(60), || async {
            match git_dir.is_dir() {
                true => Ok(()),
                false => Err(format!(
                    "no clone for step {step} yet ({})",
                    git_dir.display()
                )),
            }
        })
        .await;
    std::fs::write(git_dir.join("orch-go"), "").unwrap();
}

/// The task once `check` accepts it.
async fn task_when(cluster: &Cluster, id: &str, what: &str, check: impl Fn(&Task) -> bool) -> Task {
    cluster
        .eventually(Duration::from_secs(60), || async {
            let task = cluster.task(id).await;
            match check(&task) {
                true => Ok(task),
                false => Err(format!("not yet {what}: {task:#?}")),
            }
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_running_builders_editing_one_file_are_warned_before_either_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (cluster, data) = cluster(dir.path()).await;
    let steps = json!([
        {"role": "builder", "scope": "edit the top of greet.sh"},
        {"role": "builder", "scope": "edit the bottom of greet.sh"},
    ]);
    let task = cluster.submit(submit_body(&bare, steps, false)).await;
    let id = task.id.to_string();

    // Both agents edited greet.sh and wait: the warning is there while both still run.
    let seen = task_when(&cluster, &id, "warned", |t| !t.conflicts.is_empty()).await;
    assert!(
        seen.jobs.iter().all(|j| j.status == JobStatus::Running),
        "{seen:#?}"
    );
    let (a, b) = (seen.jobs[0].id, seen.jobs[1].id);
    assert_eq!(seen.conflicts.len(), 1, "{:#?}", seen.conflicts);
    let w = &seen.conflicts[0];
    assert_eq!(w.kind, "same_file");
    assert_eq!(w.paths, ["greet.sh"]);
    let mut pair = [w.job, w.other];
    pair.sort();
    let mut both = [a, b];
    both.sort();
    assert_eq!(pair, both, "the warning names both agents");
    for j in &seen.jobs {
        assert_eq!(
            j.changed_paths,
            ["greet.sh"],
            "the path lease of step {}",
            j.step
        );
    }

    go(&cluster, &data, &seen, 0).await;
    go(&cluster, &data, &seen, 1).await;
    let done = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &done);
    assert_eq!(done.conflicts, seen.conflicts, "warned once");

    // In the log: one conflict_warning, before any job_finished, naming both and the path.
    let events = cluster.events(&id, None).await;
    let warnings: Vec<_> = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, EventKind::ConflictWarning { .. }))
        .collect();
    assert_eq!(warnings.len(), 1, "{events:#?}");
    let (warned_at, warning) = warnings[0];
    let EventKind::ConflictWarning {
        other, kind, paths, ..
    } = &warning.kind
    else {
        unreachable!()
    };
    let mut pair = [warning.job_id.unwrap(), *other];
    pair.sort();
    assert_eq!(pair, both);
    assert_eq!(
        (kind.as_str(), paths.as_slice()),
        ("same_file", &["greet.sh".to_string()][..])
    );
    let first_finish = events
        .iter()
        .find(|(_, e)| matches!(e.kind, EventKind::JobFinished { .. }))
        .map(|(id, _)| *id)
        .unwrap();
    assert!(
        *warned_at < first_finish,
        "warned at {warned_at}, a job finished at {first_finish}"
    );

    // A metric, and `orchctl logs` shows it.
    let metrics = cluster.scrape(&format!("{}/metrics", cluster.url)).await;
    assert!(
        metrics.contains("orch_conflict_warnings_total{kind=\"same_file\"} 1"),
        "{metrics}"
    );
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) = orch_tests::run(
        orch_tests::orchctl_against(&cluster, home.path()).args(["logs", "--task", &id]),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("conflict warning: greet.sh also changed by builder"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_edits_raise_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (cluster, data) = cluster(dir.path()).await;
    let steps = json!([
        {"role": "builder", "scope": "write a.txt", "paths": ["a.txt"]},
        {"role": "builder", "scope": "write b.txt", "paths": ["b.txt"]},
    ]);
    let task = cluster.submit(submit_body(&bare, steps, false)).await;
    let id = task.id.to_string();
    // Both reports were applied (the leases hold each one's file) while both run.
    let seen = task_when(&cluster, &id, "both leases known", |t| {
        t.jobs.iter().all(|j| !j.changed_paths.is_empty())
    })
    .await;
    assert_eq!(seen.jobs[0].changed_paths, ["a.txt"]);
    assert_eq!(seen.jobs[1].changed_paths, ["b.txt"]);
    assert_eq!(seen.jobs[0].paths, ["a.txt"], "the declared scope is kept");
    assert!(seen.conflicts.is_empty(), "{:#?}", seen.conflicts);
    go(&cluster, &data, &seen, 0).await;
    go(&cluster, &data, &seen, 1).await;
    let done = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &done);
    assert!(done.conflicts.is_empty());
    let events = cluster.events(&id, None).await;
    assert!(
        !events
            .iter()
            .any(|(_, e)| matches!(e.kind, EventKind::ConflictWarning { .. })),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialize_conflicts_holds_an_overlapping_step_until_the_first_ends() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (cluster, data) = cluster(dir.path()).await;
    let steps = json!([
        {"role": "builder", "scope": "edit the top of greet.sh", "paths": ["greet.sh"]},
        {"role": "builder", "scope": "edit the bottom of greet.sh", "paths": ["*.sh"]},
        {"role": "builder", "scope": "write a.txt", "paths": ["a.txt"]},
    ]);
    let task = cluster.submit(submit_body(&bare, steps, true)).await;
    let id = task.id.to_string();
    assert!(task.options.serialize_conflicts);

    // The first runs, the third (disjoint) runs beside it, the second waits with its reason.
    let held = task_when(&cluster, &id, "the first running", |t| {
        t.jobs[0].status == JobStatus::Running && t.jobs[2].status == JobStatus::Running
    })
    .await;
    let first = held.jobs[0].id;
    assert_eq!(held.jobs[1].status, JobStatus::Pending, "{held:#?}");
    assert_eq!(held.jobs[1].held_by, Some(first));
    go(&cluster, &data, &held, 2).await;
    go(&cluster, &data, &held, 0).await;

    let second = task_when(&cluster, &id, "the second running", |t| {
        t.jobs[1].status == JobStatus::Running
    })
    .await;
    assert_eq!(second.jobs[1].held_by, None);
    go(&cluster, &data, &second, 1).await;
    let done = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &done);
    let (j0, j1) = (&done.jobs[0], &done.jobs[1]);
    assert!(
        j1.started_at_ms.unwrap() >= j0.finished_at_ms.unwrap(),
        "the second started before the first ended: {done:#?}"
    );
    // Sequential edits of one file: nothing ran at the same time, nothing to warn about.
    assert!(done.conflicts.is_empty(), "{:#?}", done.conflicts);
    let events = cluster.events(&id, None).await;
    let waiting: Vec<&String> = events
        .iter()
        .filter(|(_, e)| e.job_id == Some(j1.id))
        .filter_map(|(_, e)| match &e.kind {
            EventKind::JobWaiting { reason } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        waiting,
        [&format!("waiting for job {first} (scope overlap: *.sh)")],
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_scope_glob_is_refused_and_the_dry_run_shows_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let (cluster, _data) = cluster(dir.path()).await;
    let steps = json!([
        {"role": "builder", "scope": "x", "paths": ["src/**"]},
        {"role": "builder", "scope": "y", "paths": ["docs/*.md", "src/[oops"]},
    ]);
    for path in ["/v1/tasks", "/v1/tasks/dry-run"] {
        let (status, body) = cluster
            .post(path, &submit_body(&bare, steps.clone(), false))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "invalid_field", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("plan.steps[1].paths[1]: `src/[oops` is not a valid glob"),
            "{message}"
        );
    }
    let (status, body) = cluster
        .post(
            "/v1/tasks",
            &submit_body(
                &bare,
                json!([{"role": "builder", "paths": ["../outside"]}]),
                false,
            ),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("plan.steps[0].paths[0]:"),
        "{body}"
    );
    let (status, list) = cluster.get("/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["tasks"].as_array().map(Vec::len),
        Some(0),
        "nothing was created"
    );

    let good = json!([
        {"role": "builder", "scope": "x", "paths": ["src/**"]},
        {"role": "builder", "scope": "y"},
    ]);
    let (status, dry) = cluster
        .post("/v1/tasks/dry-run", &submit_body(&bare, good, true))
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["steps"][0]["paths"], json!(["src/**"]));
    assert!(dry["steps"][1].get("paths").is_none(), "{dry}");
}
