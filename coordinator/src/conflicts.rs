//! Conflict warnings while agents work, free of IO: a running job's path lease is its step's
//! declared scope (`Job::paths`, globs) and the paths its worker last reported changed
//! (`Job::changed_paths`); both live in the task record, so whichever coordinator leads next
//! has them, and both stop counting when the job ends (only queued and running jobs are
//! compared).
//!
//! - [`on_paths`]: a worker's report of what its agent changed so far. A path the job changed
//!   that another running job of the task changed too (`same_file`), or that is inside another
//!   running job's declared scope (`scope`), raises a `conflict_warning` event and is recorded
//!   in `Task::conflicts`, once per pair of jobs and path.
//! - [`holder`]: with `serialize_conflicts`, the running job whose scope overlaps a ready
//!   step's (the pipeline holds the step until that job ends). Only jobs already dispatched
//!   hold others back, so two ready steps never wait on each other: the first dispatched wins.

use crate::pipeline::Action;
use orch_shared::api::{ConflictWarning, Job, JobStatus, Task};
use orch_shared::event::EventKind;
use orch_shared::job::{MAX_REPORTED_PATHS, PathsReport};
use orch_shared::plan::Scope;
use std::collections::BTreeSet;

/// Most warnings one task records; past it, overlaps are no longer reported (logged).
pub const MAX_WARNINGS: usize = 256;

/// `same_file`: both jobs changed the path.
pub const SAME_FILE: &str = "same_file";
/// `scope`: one job changed a path inside the other's declared scope.
pub const IN_SCOPE: &str = "scope";

/// Whether `job` holds a path lease: it was dispatched and has not ended.
fn leasing(job: &Job) -> bool {
    matches!(job.status, JobStatus::Queued | JobStatus::Running)
}

/// A worker reported the paths its job changed so far. `None` when nothing changed (a stale
/// attempt, a job that ended, the same set again).
pub fn on_paths(task: &mut Task, report: &PathsReport, now_ms: u64) -> Option<Vec<Action>> {
    if task.status.is_terminal() {
        return None;
    }
    let index = task.jobs.iter().position(|j| j.id == report.job_id)?;
    let job = &mut task.jobs[index];
    if job.attempt != report.attempt || !leasing(job) {
        return None;
    }
    let mut paths: Vec<String> = report.paths.clone();
    paths.sort();
    paths.dedup();
    paths.truncate(MAX_REPORTED_PATHS);
    if job.changed_paths == paths {
        return None;
    }
    job.changed_paths = paths;
    let mut actions = Vec::new();
    let job = &task.jobs[index];
    let mine = Scope::of(&job.paths);
    let mut found = Vec::new();
    for (o, other) in task.jobs.iter().enumerate() {
        if o == index || !leasing(other) {
            continue;
        }
        let theirs = Scope::of(&other.paths);
        let same: BTreeSet<&String> = job
            .changed_paths
            .iter()
            .filter(|p| other.changed_paths.contains(p))
            .collect();
        let in_their_scope: Vec<String> = job
            .changed_paths
            .iter()
            .filter(|p| !same.contains(p) && theirs.covers(p))
            .cloned()
            .collect();
        // Their changes inside this job's scope: seen now if they came before this job ran.
        let in_my_scope: Vec<String> = other
            .changed_paths
            .iter()
            .filter(|p| !same.contains(p) && mine.covers(p))
            .cloned()
            .collect();
        let same: Vec<String> = same.into_iter().cloned().collect();
        found.push((index, o, SAME_FILE, same));
        found.push((index, o, IN_SCOPE, in_their_scope));
        found.push((o, index, IN_SCOPE, in_my_scope));
    }
    for (a, b, kind, paths) in found {
        let paths: Vec<String> = paths
            .into_iter()
            .filter(|p| !warned(task, task.jobs[a].id, task.jobs[b].id, p))
            .collect();
        if paths.is_empty() {
            continue;
        }
        if task.conflicts.len() >= MAX_WARNINGS {
            tracing::warn!(task_id = %task.id, "too many conflict warnings; no more are recorded");
            break;
        }
        let (job, other) = (&task.jobs[a], &task.jobs[b]);
        task.conflicts.push(ConflictWarning {
            job: job.id,
            role: job.role,
            other: other.id,
            other_role: other.role,
            kind: kind.to_string(),
            paths: paths.clone(),
            at_ms: now_ms,
        });
        actions.push(Action::Emit(
            Some(job.id),
            EventKind::ConflictWarning {
                other: other.id,
                role: job.role,
                other_role: other.role,
                kind: kind.to_string(),
                paths,
            },
        ));
    }
    Some(actions)
}

/// Whether the pair `a`, `b` (either way round) was warned about `path` already.
fn warned(task: &Task, a: orch_shared::ids::JobId, b: orch_shared::ids::JobId, path: &str) -> bool {
    task.conflicts.iter().any(|w| {
        ((w.job == a && w.other == b) || (w.job == b && w.other == a))
            && w.paths.iter().any(|p| p == path)
    })
}

/// With `serialize_conflicts`: the dispatched, unfinished job that job `i` must wait for (its
/// declared scope overlaps the other's scope, or covers a path the other changed), and the
/// overlapping globs.
pub fn holder(task: &Task, i: usize) -> Option<(usize, Vec<String>)> {
    if !task.options.serialize_conflicts || task.jobs[i].paths.is_empty() {
        return None;
    }
    let mine = Scope::of(&task.jobs[i].paths);
    task.jobs.iter().enumerate().find_map(|(o, other)| {
        if o == i
            || !matches!(
                other.status,
                JobStatus::Queued | JobStatus::Running | JobStatus::Retrying
            )
        {
            return None;
        }
        let mut overlap = mine.overlap(&Scope::of(&other.paths));
        overlap.extend(
            other
                .changed_paths
                .iter()
                .filter(|p| mine.covers(p))
                .cloned(),
        );
        overlap.sort();
        overlap.dedup();
        (!overlap.is_empty()).then_some((o, overlap))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{TaskOptions, new_task};
    use orch_shared::api::{ExecutionOptions, JobStatus, Mode};
    use orch_shared::ids::TaskId;
    use orch_shared::job::{Backend, SimParams, Workspace};

    /// A parallel task of `n` builders (all queued).
    fn task(n: usize) -> Task {
        let steps = vec![serde_json::json!({"role": "builder"}); n];
        let spec = serde_json::from_value(serde_json::json!({ "steps": steps })).unwrap();
        let plan = crate::planner::plan("auto", "p", None, Some(spec)).unwrap();
        let opts = TaskOptions {
            prompt: "p".into(),
            task_type: "auto".into(),
            mode: Mode::Parallel,
            backend: Backend::Sim,
            model: None,
            backends: Default::default(),
            models: Default::default(),
            workspace: Workspace::Scratch,
            sim: SimParams::default(),
            idempotency_key: None,
            execution: ExecutionOptions::default(),
            llm_planner: false,
            mcp_servers: Default::default(),
            check: None,
        };
        new_task(TaskId::new(), opts, plan, 0).unwrap().0
    }

    fn report(task: &Task, i: usize, paths: &[&str]) -> PathsReport {
        PathsReport {
            task_id: task.id,
            job_id: task.jobs[i].id,
            attempt: task.jobs[i].attempt,
            paths: paths.iter().map(|p| p.to_string()).collect(),
            truncated: false,
        }
    }

    fn send(t: &mut Task, i: usize, paths: &[&str], now: u64) -> Option<Vec<Action>> {
        let r = report(t, i, paths);
        on_paths(t, &r, now)
    }

    fn warnings(actions: &[Action]) -> Vec<(String, Vec<String>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(_, EventKind::ConflictWarning { kind, paths, .. }) => {
                    Some((kind.clone(), paths.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_same_file_changed_by_two_running_jobs_is_warned_once() {
        let mut t = task(2);
        for j in &mut t.jobs {
            j.status = JobStatus::Running;
        }
        let a = send(&mut t, 0, &["src/a.rs", "x"], 1).unwrap();
        assert!(warnings(&a).is_empty());
        let b = send(&mut t, 1, &["src/a.rs"], 2).unwrap();
        assert_eq!(
            warnings(&b),
            [(SAME_FILE.to_string(), vec!["src/a.rs".to_string()])]
        );
        assert_eq!(t.conflicts.len(), 1);
        assert_eq!(
            (t.conflicts[0].job, t.conflicts[0].other),
            (t.jobs[1].id, t.jobs[0].id)
        );
        // The same set again changes nothing; a new path of the pair is a new warning.
        assert!(send(&mut t, 1, &["src/a.rs"], 3).is_none());
        let again = send(&mut t, 0, &["src/a.rs", "x", "y"], 4).unwrap();
        assert!(warnings(&again).is_empty(), "{again:?}");
        let c = send(&mut t, 1, &["src/a.rs", "y"], 5).unwrap();
        assert_eq!(
            warnings(&c),
            [(SAME_FILE.to_string(), vec!["y".to_string()])]
        );
    }

    #[test]
    fn changes_inside_a_running_jobs_scope_are_warned_and_ended_jobs_hold_no_lease() {
        let mut t = task(3);
        t.jobs[0].paths = vec!["src/cache/**".into()];
        t.jobs[0].status = JobStatus::Running;
        t.jobs[1].status = JobStatus::Running;
        t.jobs[2].status = JobStatus::Succeeded;
        t.jobs[2].changed_paths = vec!["src/main.rs".into()];
        let a = send(&mut t, 1, &["src/main.rs", "src/cache/lru.rs"], 1).unwrap();
        assert_eq!(
            warnings(&a),
            [(IN_SCOPE.to_string(), vec!["src/cache/lru.rs".to_string()])]
        );
        // Disjoint: nothing.
        t.jobs[0].paths = vec![];
        let mut d = task(2);
        d.jobs
            .iter_mut()
            .for_each(|j| j.status = JobStatus::Running);
        send(&mut d, 0, &["a"], 1).unwrap();
        assert!(warnings(&send(&mut d, 1, &["b"], 2).unwrap()).is_empty());
        // A stale attempt's report is dropped.
        let mut stale = report(&d, 1, &["a"]);
        stale.attempt = 7;
        assert!(on_paths(&mut d, &stale, 3).is_none());
    }

    #[test]
    fn a_step_is_held_only_by_a_dispatched_job_with_an_overlapping_scope() {
        let mut t = task(3);
        t.options.serialize_conflicts = true;
        t.jobs[0].paths = vec!["greet.sh".into()];
        t.jobs[1].paths = vec!["*.sh".into()];
        t.jobs[2].paths = vec!["docs/**".into()];
        t.jobs
            .iter_mut()
            .for_each(|j| j.status = JobStatus::Pending);
        assert_eq!(holder(&t, 1), None, "nothing runs yet");
        t.jobs[0].status = JobStatus::Running;
        assert_eq!(holder(&t, 1), Some((0, vec!["*.sh".to_string()])));
        assert_eq!(holder(&t, 2), None);
        t.jobs[0].status = JobStatus::Succeeded;
        assert_eq!(holder(&t, 1), None);
        t.options.serialize_conflicts = false;
        t.jobs[0].status = JobStatus::Running;
        assert_eq!(holder(&t, 1), None);
    }
}
