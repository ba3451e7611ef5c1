//! The task state machine, free of IO: how a task is laid out from its plan, and what happens
//! when a job starts or a result arrives. The lanes in [`crate::driver`] persist the changed task
//! and carry out the returned [`Action`]s.
//!
//! Rules: in sequential mode a job is queued only after the one before it succeeded, with that
//! job's forward context; a failed job skips every job after it. In parallel mode every job is
//! queued at once. A task is `completed` when every job succeeded, `failed` otherwise.

use crate::context::forward_context;
use crate::planner::Plan;
use orch_shared::api::{Job, JobError, JobStatus, Mode, Task, TaskStatus};
use orch_shared::event::{EventKind, StepInfo};
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::job::{Backend, JobResult, JobSpec, Limits, Outcome, SimParams, Workspace};

/// What the caller must do after a state change, in order, after saving the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish this job to the work queue.
    Publish(JobSpec),
    /// Append this event to the task's log (for `job`, or the task when `None`).
    Emit(Option<JobId>, EventKind),
}

/// The validated parts of a submit request that shape the task.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    pub prompt: String,
    pub task_type: String,
    pub mode: Mode,
    pub backend: Backend,
    pub model: Option<String>,
    pub workspace: Workspace,
    pub sim: SimParams,
    pub idempotency_key: Option<String>,
}

/// Lays out a new task and returns what to do once it is stored.
pub fn new_task(id: TaskId, opts: TaskOptions, plan: Plan, now_ms: u64) -> (Task, Vec<Action>) {
    let jobs = plan
        .steps
        .into_iter()
        .enumerate()
        .map(|(i, step)| Job {
            id: JobId::new(),
            step: i as u32,
            role: step.role,
            status: JobStatus::Pending,
            attempt: 1,
            prompt: step.description,
            context: None,
            worker_id: None,
            queued_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            usage: Default::default(),
            cost_usd: 0.0,
            output: None,
            error: None,
            files_read: vec![],
            files_written: vec![],
        })
        .collect();
    let mut task = Task {
        id,
        prompt: opts.prompt,
        task_type: opts.task_type,
        plan_source: plan.source,
        mode: opts.mode,
        status: TaskStatus::Running,
        backend: opts.backend,
        model: opts.model,
        workspace: opts.workspace,
        sim: opts.sim,
        idempotency_key: opts.idempotency_key,
        created_at_ms: now_ms,
        finished_at_ms: None,
        jobs,
        usage: Default::default(),
        cost_usd: 0.0,
        output: None,
        error: None,
    };
    let mut actions = vec![Action::Emit(
        None,
        EventKind::TaskCreated {
            mode: task.mode.as_str().into(),
            steps: task
                .jobs
                .iter()
                .map(|j| StepInfo {
                    job_id: j.id,
                    role: j.role,
                })
                .collect(),
        },
    )];
    let first: Vec<usize> = match task.mode {
        Mode::Sequential => vec![0],
        Mode::Parallel => (0..task.jobs.len()).collect(),
    };
    for i in first {
        actions.extend(queue(&mut task, i, None, now_ms));
    }
    (task, actions)
}

/// The message a worker gets for `job` of `task`.
pub fn job_spec(task: &Task, job: &Job) -> JobSpec {
    JobSpec {
        task_id: task.id,
        job_id: job.id,
        attempt: job.attempt,
        step: job.step,
        role: job.role,
        prompt: job.prompt.clone(),
        context: job.context.clone(),
        backend: task.backend,
        model: task.model.clone(),
        workspace: task.workspace.clone(),
        limits: Limits::default(),
        sim: task.sim.clone(),
    }
}

fn queue(task: &mut Task, index: usize, context: Option<String>, now_ms: u64) -> Vec<Action> {
    let job = &mut task.jobs[index];
    job.status = JobStatus::Queued;
    job.queued_at_ms = Some(now_ms);
    job.context = context;
    let job = &task.jobs[index];
    vec![
        Action::Emit(
            Some(job.id),
            EventKind::JobQueued {
                role: job.role,
                step: job.step,
            },
        ),
        Action::Publish(job_spec(task, job)),
    ]
}

/// Re-publishes every queued job of a task (after a coordinator restart; duplicates are dropped
/// by JetStream's dedup window and by the workers' done markers).
pub fn requeue(task: &Task) -> Vec<Action> {
    task.jobs
        .iter()
        .filter(|j| j.status == JobStatus::Queued)
        .map(|j| Action::Publish(job_spec(task, j)))
        .collect()
}

/// A worker started a job. Returns whether the task changed.
pub fn on_started(task: &mut Task, job: JobId, attempt: u32, worker: WorkerId, at_ms: u64) -> bool {
    let Some(job) = task.jobs.iter_mut().find(|j| j.id == job) else {
        return false;
    };
    if job.attempt != attempt || job.status != JobStatus::Queued {
        return false;
    }
    job.status = JobStatus::Running;
    job.worker_id = Some(worker);
    job.started_at_ms = Some(at_ms);
    true
}

/// A job attempt ended. Returns `None` when the result is stale or a duplicate (nothing changed).
pub fn on_result(task: &mut Task, result: &JobResult, now_ms: u64) -> Option<Vec<Action>> {
    if task.status.is_terminal() {
        return None;
    }
    let index = task.jobs.iter().position(|j| j.id == result.job_id)?;
    let job = &mut task.jobs[index];
    if job.attempt != result.attempt || job.status.is_terminal() {
        return None;
    }
    job.worker_id = Some(result.worker_id.clone());
    job.started_at_ms = Some(result.started_at_ms);
    job.finished_at_ms = Some(result.finished_at_ms);
    job.usage = result.usage;
    job.cost_usd = result.cost_usd;
    job.output = Some(result.output.clone());
    job.files_read = result.files_read.clone();
    job.files_written = result.files_written.clone();
    task.usage.add(&result.usage);
    task.cost_usd += result.cost_usd;

    let mut actions = Vec::new();
    match &result.outcome {
        Outcome::Success => {
            job.status = JobStatus::Succeeded;
            if task.mode == Mode::Sequential && index + 1 < task.jobs.len() {
                let role = task.jobs[index].role;
                let context = forward_context(role, &result.output);
                actions.extend(queue(task, index + 1, context, now_ms));
            }
        }
        Outcome::Failure { reason, message } => {
            job.status = JobStatus::Failed;
            job.error = Some(JobError {
                reason: *reason,
                message: message.clone(),
            });
            if task.mode == Mode::Sequential {
                let why = format!(
                    "step {} ({}) failed: {}",
                    index + 1,
                    task.jobs[index].role,
                    reason.as_str()
                );
                for later in task.jobs.iter_mut().skip(index + 1) {
                    if later.status == JobStatus::Pending {
                        later.status = JobStatus::Skipped;
                        actions.push(Action::Emit(
                            Some(later.id),
                            EventKind::JobSkipped {
                                reason: why.clone(),
                            },
                        ));
                    }
                }
            }
        }
    }
    if task.jobs.iter().all(|j| j.status.is_terminal()) {
        actions.push(finish(task, now_ms));
    }
    Some(actions)
}

fn finish(task: &mut Task, now_ms: u64) -> Action {
    let failed: Vec<&Job> = task
        .jobs
        .iter()
        .filter(|j| j.status == JobStatus::Failed)
        .collect();
    task.status = if failed.is_empty() {
        TaskStatus::Completed
    } else {
        TaskStatus::Failed
    };
    task.error = (!failed.is_empty()).then(|| {
        failed
            .iter()
            .map(|j| {
                let e = j.error.as_ref();
                format!(
                    "step {} ({}) failed: {}: {}",
                    j.step + 1,
                    j.role,
                    e.map_or("unknown", |e| e.reason.as_str()),
                    e.map_or("", |e| e.message.as_str())
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    });
    task.output = Some(
        task.jobs
            .iter()
            .filter_map(|j| {
                j.output
                    .as_ref()
                    .map(|o| format!("[{}]:\n{}", j.role.agent_name(), o.trim()))
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
    );
    task.finished_at_ms = Some(now_ms);
    Action::Emit(
        None,
        EventKind::TaskFinished {
            status: task.status.as_str().into(),
            usage: task.usage,
            cost_usd: task.cost_usd,
            duration_ms: task.elapsed_ms(now_ms),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::plan;
    use orch_shared::job::{FailureReason, Usage};
    use orch_shared::role::Role;

    fn opts(mode: Mode) -> TaskOptions {
        TaskOptions {
            prompt: "build and test a parser".into(),
            task_type: "auto".into(),
            mode,
            backend: Backend::Sim,
            model: None,
            workspace: Workspace::Scratch,
            sim: SimParams::default(),
            idempotency_key: None,
        }
    }

    fn published(actions: &[Action]) -> Vec<JobSpec> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn result(spec: &JobSpec, outcome: Outcome, output: &str) -> JobResult {
        JobResult {
            task_id: spec.task_id,
            job_id: spec.job_id,
            attempt: spec.attempt,
            delivery: 1,
            worker_id: WorkerId("w".into()),
            outcome,
            output: output.into(),
            usage: Usage {
                input_tokens: 10,
                output_tokens: 5,
                cache_creation_tokens: 1,
                cache_read_tokens: 2,
            },
            cost_usd: 0.25,
            files_read: vec![],
            files_written: vec![],
            started_at_ms: 1,
            finished_at_ms: 2,
        }
    }

    #[test]
    fn sequential_runs_one_at_a_time_with_forward_context() {
        let p = plan("auto", "build and test a parser", None).unwrap();
        let (mut task, actions) = new_task(TaskId::new(), opts(Mode::Sequential), p, 0);
        let first = published(&actions);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].role, Role::Builder);
        let out = "## Summary\nparser built\n";
        let next =
            published(&on_result(&mut task, &result(&first[0], Outcome::Success, out), 5).unwrap());
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].role, Role::Tester);
        assert!(next[0].context.as_deref().unwrap().contains("parser built"));
        // A duplicate result changes nothing.
        assert!(on_result(&mut task, &result(&first[0], Outcome::Success, out), 6).is_none());
        let last = on_result(&mut task, &result(&next[0], Outcome::Success, "done"), 9).unwrap();
        assert!(matches!(
            last.last(),
            Some(Action::Emit(None, EventKind::TaskFinished { .. }))
        ));
        assert_eq!(task.status, TaskStatus::Completed);
        assert_eq!(task.usage.total(), 36);
        assert_eq!(task.cost_usd, 0.5);
        assert_eq!(task.finished_at_ms, Some(9));
    }

    #[test]
    fn a_failed_step_skips_the_rest_and_fails_the_task() {
        let p = plan("feature_implementation", "redesign the system", None).unwrap();
        let (mut task, actions) = new_task(TaskId::new(), opts(Mode::Sequential), p, 0);
        let first = published(&actions);
        let failure = Outcome::Failure {
            reason: FailureReason::AgentError,
            message: "boom".into(),
        };
        let actions = on_result(&mut task, &result(&first[0], failure, ""), 3).unwrap();
        assert!(published(&actions).is_empty());
        assert_eq!(task.status, TaskStatus::Failed);
        assert_eq!(
            task.jobs
                .iter()
                .filter(|j| j.status == JobStatus::Skipped)
                .count(),
            4
        );
        assert!(
            task.error
                .as_deref()
                .unwrap()
                .contains("step 1 (analyst) failed: agent_error: boom")
        );
    }

    #[test]
    fn parallel_queues_everything_at_once() {
        let p = plan("auto", "build and test a parser", None).unwrap();
        let (mut task, actions) = new_task(TaskId::new(), opts(Mode::Parallel), p, 0);
        let specs = published(&actions);
        assert_eq!(specs.len(), 2);
        assert!(on_started(
            &mut task,
            specs[1].job_id,
            1,
            WorkerId("w2".into()),
            1
        ));
        assert!(!on_started(
            &mut task,
            specs[1].job_id,
            1,
            WorkerId("w2".into()),
            1
        ));
        on_result(&mut task, &result(&specs[1], Outcome::Success, "b"), 2).unwrap();
        assert_eq!(task.status, TaskStatus::Running);
        on_result(&mut task, &result(&specs[0], Outcome::Success, "a"), 3).unwrap();
        assert_eq!(task.status, TaskStatus::Completed);
        assert_eq!(
            task.output.as_deref().unwrap(),
            "[Builder Agent]:\na\n\n[Tester Agent]:\nb"
        );
        assert!(requeue(&task).is_empty());
    }
}
