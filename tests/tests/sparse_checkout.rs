//! Sparse checkouts end to end: a git task whose plan steps declare their file scope
//! (`paths`) runs each such step in a clone holding only the directories of that scope and
//! the top-level files (the task's `sparse_checkout`, else the worker's `workspace.sparse`).
//! The agent is the `command` backend running a shell script that lists the files it sees and
//! writes one inside its scope; what it pushes changes only that, and the files it never saw
//! stay in the branch.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::Task;
use orch_tests::{Cluster, Options, assert_completed, commit_and_push, git, origin};
use reqwest::StatusCode;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Says whether its prompt told it of a sparse checkout (`told: sparse`), lists the files it
/// sees (`seen: ...`), then a builder appends to `src/a/a.txt` and writes `src/a/new.txt`; a
/// tester writes nothing.
const AGENT: &str = r#"prompt=$(cat)
case "$prompt" in *"sparse checkout of the repository: only \`src/a/\`"*) echo "told: sparse" ;; esac
echo "seen: $(find . -path ./.git -prune -o -type f -print | sort | tr '\n' ' ')"
if [ "$ORCH_ROLE" = builder ]; then
  echo more >> src/a/a.txt
  echo new > src/a/new.txt
fi
"#;

/// A bare repository holding `README.md`, `Cargo.toml`, `src/a/a.txt`, `src/b/b.txt`.
fn repository(dir: &Path) -> PathBuf {
    let bare = origin(dir);
    let seed = dir.join("seed");
    for d in ["src/a", "src/b"] {
        std::fs::create_dir_all(seed.join(d)).unwrap();
    }
    commit_and_push(
        &seed,
        &bare,
        &[
            ("Cargo.toml", "[package]\n"),
            ("src/a/a.txt", "a\n"),
            ("src/b/b.txt", "b\n"),
        ],
        "two directories",
        "main",
    );
    bare
}

/// One worker running [`AGENT`], with `extra` flags.
async fn cluster(dir: &Path, extra: &[&str]) -> Cluster {
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        format!("[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {AGENT:?}, \"agent\"]\n"),
    )
    .unwrap();
    let mut worker_args = vec!["--config".to_string(), config.display().to_string()];
    worker_args.extend(extra.iter().map(|s| s.to_string()));
    Cluster::start(Options {
        workers: 1,
        slots: 1,
        worker_args,
        ..Options::default()
    })
    .await
}

/// A sequential task: a builder scoped to `src/a/**`, then a tester with no scope.
fn submit_body(bare: &Path, sparse: Option<bool>) -> serde_json::Value {
    let mut body = json!({
        "prompt": "improve a",
        "backend": "command",
        "repo": bare.display().to_string(),
        "ref": "main",
        "plan": {"steps": [
            {"role": "builder", "scope": "edit a", "paths": ["src/a/**"]},
            {"role": "tester", "scope": "check everything"},
        ]},
    });
    if let Some(s) = sparse {
        body["sparse_checkout"] = json!(s);
    }
    body
}

/// The files the job's agent listed.
fn seen(task: &Task, step: usize) -> Vec<String> {
    let out = task.jobs[step].output.as_deref().unwrap_or("");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("seen: "))
        .unwrap_or_else(|| panic!("no listing in {out:?}"));
    line.split_whitespace()
        .map(|f| f.trim_start_matches("./").to_string())
        .collect()
}

async fn run(cluster: &Cluster, body: serde_json::Value) -> Task {
    let task = cluster.submit(body).await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(90))
        .await;
    assert_completed(cluster, &task);
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_step_sees_only_its_scope_and_pushes_only_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let bare = repository(dir.path());
    let cluster = cluster(dir.path(), &[]).await;
    let task = run(&cluster, submit_body(&bare, Some(true))).await;
    assert_eq!(task.options.sparse_checkout, Some(true));

    // The builder saw its scope and the top-level files, not src/b, and its prompt said so.
    assert_eq!(
        seen(&task, 0),
        ["Cargo.toml", "README.md", "src/a/a.txt"],
        "{}",
        cluster.logs()
    );
    let told = |step: usize| {
        let out = task.jobs[step].output.as_deref().unwrap_or("");
        out.lines().any(|l| l == "told: sparse")
    };
    assert!(told(0), "{:?}", task.jobs[0].output);
    // Its commit changes only what it wrote; src/b is still in its branch and the task's.
    let g = task.jobs[0].git.as_ref().unwrap();
    let range = format!("{}..{}", g.base, g.commit);
    assert_eq!(
        git(&bare, &["diff", "--name-status", "--no-renames", &range]),
        "M\tsrc/a/a.txt\nA\tsrc/a/new.txt"
    );
    assert_eq!(task.jobs[0].files_written, ["src/a/a.txt", "src/a/new.txt"]);
    let branch = format!("orch/{}", task.id);
    assert_eq!(
        git(&bare, &["ls-tree", "-r", "--name-only", &branch]),
        "Cargo.toml\nREADME.md\nsrc/a/a.txt\nsrc/a/new.txt\nsrc/b/b.txt"
    );
    assert_eq!(git(&bare, &["show", &format!("{branch}:src/b/b.txt")]), "b");

    // The tester declared no scope: it saw the whole tree, the builder's work included.
    assert!(!told(1), "{:?}", task.jobs[1].output);
    assert_eq!(
        seen(&task, 1),
        [
            "Cargo.toml",
            "README.md",
            "src/a/a.txt",
            "src/a/new.txt",
            "src/b/b.txt"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_default_applies_unless_the_task_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let bare = repository(dir.path());
    let cluster = cluster(dir.path(), &["--workspace-sparse", "true"]).await;
    // The task says nothing: the worker's default, sparse.
    let task = run(&cluster, submit_body(&bare, None)).await;
    assert_eq!(task.options.sparse_checkout, None);
    assert_eq!(
        seen(&task, 0),
        ["Cargo.toml", "README.md", "src/a/a.txt"],
        "{}",
        cluster.logs()
    );
    // The task says no: the whole tree.
    let task = run(&cluster, submit_body(&bare, Some(false))).await;
    assert_eq!(
        seen(&task, 0),
        ["Cargo.toml", "README.md", "src/a/a.txt", "src/b/b.txt"]
    );

    // Without a repository there is nothing to check out in part.
    let (status, body) = cluster
        .post(
            "/v1/tasks",
            &json!({"prompt": "x", "sparse_checkout": true}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_field", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("sparse_checkout: needs repo"),
        "{body}"
    );
}
