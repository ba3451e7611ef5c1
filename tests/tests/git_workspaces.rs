//! Git workspaces end to end: a task submitted with `repo` and `ref` runs each job in a fresh
//! clone on whichever worker pulls it; jobs hand their work on through branches of a real bare
//! repository, and the task branch ends up holding it all. The agent is the `command` backend
//! running a small shell script: it writes files and prints the files it sees.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{Job, JobStatus, Task, TaskStatus};
use orch_tests::{Cluster, Options, assert_completed, git, origin};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The agent. Its prompt says what to write: `SAMEFILE` → `shared.txt` (every job writes it
/// differently), `PARALLEL` → `<role>.txt`, anything else → `<role>.txt` and a line appended
/// to `log.txt`. With `GATE` set, the analyst waits for that file before it works.
const AGENT: &str = r#"prompt=$(cat)
if [ -n "$GATE" ] && [ "$ORCH_ROLE" = analyst ]; then
  while [ ! -f "$GATE" ]; do sleep 0.05; done
fi
case "$prompt" in
  *SAMEFILE*) echo "$ORCH_ROLE" > shared.txt ;;
  *PARALLEL*) echo "$ORCH_ROLE" > "$ORCH_ROLE.txt" ;;
  *) echo "$ORCH_ROLE" >> log.txt; echo "$ORCH_ROLE was here" > "$ORCH_ROLE.txt" ;;
esac
echo "files: $(ls | tr '\n' ' ')"
"#;

/// A cluster with no workers yet, and a worker config running [`AGENT`] (with `gate` as its
/// `GATE`, if any).
async fn cluster(dir: &Path, gate: Option<&Path>) -> Cluster {
    let config = dir.join("worker.toml");
    // The gate's directory is the one thing outside its workspace the agent's sandbox shows.
    let env = gate.map_or(String::new(), |g| {
        let gates = g.parent().unwrap();
        std::fs::create_dir_all(gates).unwrap();
        format!(
            "env = {{ GATE = {:?} }}\n[roles.analyst]\nwritable_paths = [{:?}]\n",
            g.display().to_string(),
            gates.display().to_string()
        )
    });
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {:?}, \"agent\"]\n{env}",
            AGENT
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

/// Starts `n` workers, each with its own data directory (and so its own clone cache).
async fn add_workers(cluster: &mut Cluster, n: usize) {
    let base = cluster.opts.worker_args.clone();
    for _ in 0..n {
        let data = cluster
            .dir
            .path()
            .join(format!("data-{}", cluster.workers.len()));
        cluster.opts.worker_args = base.clone();
        cluster
            .opts
            .worker_args
            .extend(["--data-dir".into(), data.display().to_string()]);
        cluster.add_worker();
    }
    cluster.opts.worker_args = base;
    cluster.wait_workers(cluster.workers.len()).await;
}

/// The first line of a commit the worker makes for `job`.
fn subject(job: &Job) -> String {
    let first = job
        .prompt
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no prompt)");
    let cut = if first.chars().count() > 72 {
        first.chars().take(71).collect::<String>() + "…"
    } else {
        first.to_string()
    };
    format!("{}: {cut}", job.role)
}

/// Checks what every job of `task` says about its git work against the bare repository.
fn check_jobs(cluster: &Cluster, bare: &Path, task: &Task) {
    for job in &task.jobs {
        let g = job
            .git
            .as_ref()
            .unwrap_or_else(|| panic!("job {} reports no git outcome: {task:#?}", job.step));
        assert_eq!(
            git(bare, &["rev-parse", &g.branch]),
            g.commit,
            "the job's branch is its commit\n{}",
            cluster.logs()
        );
        let range = format!("{}..{}", g.base, g.commit);
        let names = git(bare, &["diff", "--name-only", "--no-renames", &range]);
        assert_eq!(
            job.files_written,
            names.lines().collect::<Vec<_>>(),
            "files written are the commit's diff"
        );
        let diff = job.diff.as_deref().expect("a git job reports its diff");
        for f in &job.files_written {
            assert!(diff.contains(&format!("+++ b/{f}")), "{f} not in {diff}");
        }
        if !names.is_empty() {
            let message = git(bare, &["log", "-1", "--format=%B", &g.commit]);
            assert_eq!(
                message.lines().collect::<Vec<_>>(),
                [
                    subject(job).as_str(),
                    "",
                    &format!("Task: {}", task.id),
                    &format!("Job: {} (attempt {})", job.id, job.attempt),
                ]
            );
        }
    }
}

/// Every job's commit is in the task branch (else: why not, as the worker reported it).
fn assert_all_merged(task: &Task) {
    for job in &task.jobs {
        let g = job.git.as_ref().expect("a git outcome");
        assert!(
            g.merged && g.conflicts.is_empty(),
            "job {} ({}) is not in the task branch: {:?}",
            job.step,
            g.branch,
            g.conflicts
        );
    }
}

fn output(job: &Job) -> &str {
    job.output.as_deref().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_steps_on_different_workers_see_each_others_work_through_branches() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let gate = dir.path().join("gates/gate");
    let mut cluster = cluster(dir.path(), Some(&gate)).await;
    add_workers(&mut cluster, 2).await;
    let task = cluster
        .submit(json!({
            "prompt": "add a greeting to the project",
            "roles": ["analyst", "builder", "tester"],
            "backend": "command",
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .await;
    let id = task.id.to_string();
    // The analyst waits on the gate; its worker drains meanwhile, so it finishes the analyst
    // but pulls nothing else: the builder has to run on the other worker.
    let first = cluster.running_on(&id, 0).await;
    cluster.workers[first].signal(libc::SIGTERM);
    // Its pull loop has ended once it logs that it drains.
    let log = cluster.workers[first].log.clone();
    cluster
        .eventually(Duration::from_secs(10), || async {
            match orch_tests::log_contains(&log, "draining") {
                true => Ok(()),
                false => Err("the worker has not stopped pulling".to_string()),
            }
        })
        .await;
    std::fs::write(&gate, "").unwrap();
    let task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &task);
    let [analyst, builder, tester] = &task.jobs[..] else {
        panic!("three jobs: {task:#?}")
    };
    assert_ne!(
        analyst.worker_id, builder.worker_id,
        "the builder ran on another worker"
    );

    // Each step saw the files of the steps before it (and, listed after writing, its own).
    assert!(output(analyst).contains("README.md") && !output(analyst).contains("builder.txt"));
    assert!(
        output(builder).contains("analyst.txt") && output(builder).contains("log.txt"),
        "{}",
        output(builder)
    );
    assert!(
        output(tester).contains("analyst.txt") && output(tester).contains("builder.txt"),
        "{}",
        output(tester)
    );

    // The task branch holds the three commits in plan order on top of main.
    assert_all_merged(&task);
    let branch = format!("orch/{id}");
    assert_eq!(task.branch.as_deref(), Some(branch.as_str()));
    let log = git(&bare, &["log", "--format=%s", &branch]);
    let expected: Vec<String> = [tester, builder, analyst]
        .iter()
        .map(|j| subject(j))
        .chain(["init".to_string()])
        .collect();
    assert_eq!(log.lines().collect::<Vec<_>>(), expected);
    assert_eq!(
        git(&bare, &["show", &format!("{branch}:log.txt")]),
        "analyst\nbuilder\ntester"
    );
    check_jobs(&cluster, &bare, &task);
    assert_eq!(
        analyst.git.as_ref().unwrap().base,
        git(&bare, &["rev-parse", "main"])
    );
    assert_eq!(builder.files_written, ["builder.txt", "log.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_jobs_merge_into_the_task_branch_and_a_conflict_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let mut cluster = cluster(dir.path(), None).await;
    add_workers(&mut cluster, 2).await;
    let submit = |prompt: &str| {
        json!({
            "prompt": prompt,
            "roles": ["builder", "tester"],
            "mode": "parallel",
            "backend": "command",
            "repo": bare.display().to_string(),
            "ref": "main",
        })
    };

    // Different files: the task branch has both.
    let task = cluster.submit(submit("PARALLEL work")).await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_completed(&cluster, &task);
    assert_all_merged(&task);
    let branch = format!("orch/{id}");
    assert_eq!(task.branch.as_deref(), Some(branch.as_str()));
    let files = git(&bare, &["ls-tree", "--name-only", &branch]);
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        ["README.md", "builder.txt", "tester.txt"]
    );
    check_jobs(&cluster, &bare, &task);

    // The same file written differently: one is merged, the other reports the conflict, and
    // an integrator (whose prompt carries the task's, so the script writes the file as its
    // resolution) merges it into the task branch.
    let task = cluster.submit(submit("SAMEFILE work")).await;
    let id = task.id.to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(90)).await;
    assert_eq!(task.status, TaskStatus::Completed, "{task:#?}");
    assert!(task.jobs.iter().all(|j| j.status == JobStatus::Succeeded));
    check_jobs(&cluster, &bare, &task);
    let [first, second, integrator] = &task.jobs[..] else {
        panic!("two jobs and an integrator: {task:#?}")
    };
    assert_eq!(integrator.role, orch_shared::role::Role::Integrator);
    let outcomes: Vec<_> = [first, second]
        .iter()
        .map(|j| j.git.clone().unwrap())
        .collect();
    let merged: Vec<_> = outcomes.iter().filter(|g| g.merged).collect();
    let skipped: Vec<_> = outcomes.iter().filter(|g| !g.merged).collect();
    assert_eq!((merged.len(), skipped.len()), (1, 1), "{outcomes:#?}");
    assert_eq!(skipped[0].conflicts, ["shared.txt"]);
    assert!(merged[0].conflicts.is_empty());
    let resolved = integrator.git.clone().unwrap();
    assert!(resolved.merged, "{resolved:?}");
    let branch = format!("orch/{id}");
    assert_eq!(git(&bare, &["rev-parse", &branch]), resolved.commit);
    assert_eq!(
        git(&bare, &["show", &format!("{branch}:shared.txt")]),
        "integrator"
    );
    for g in &outcomes {
        git(&bare, &["merge-base", "--is-ancestor", &g.commit, &branch]);
    }
}
