//! The task state machine, free of IO: how a task is laid out from its plan, and what happens
//! when a job starts, a result arrives, a retry or deadline falls due, or a user cancels. The
//! lanes in [`crate::driver`] persist the changed task and carry out the returned [`Action`]s.
//!
//! Rules:
//! - A job is queued when every job it depends on has succeeded (with `on_failure: continue`,
//!   has ended), with their forward contexts; at most `max_parallel` jobs of a task are queued
//!   or running at once.
//! - A retryable failure is retried after an exponential backoff with jitter until
//!   `max_attempts`; a job that fails for good goes to the dead-letter set. With `on_failure:
//!   stop` every job that depends on it, directly or not, is skipped.
//! - No job is queued once the task's spend has reached its budget; when nothing is running
//!   any more, the rest is skipped and the task fails with `budget_exhausted`. Spend can only
//!   pass the budget by what the jobs already running cost.
//! - With `serialize_conflicts`, a ready job whose declared file scope overlaps a queued or
//!   running job's waits (`held_by`, a `job_waiting` event) until that job ends
//!   ([`crate::conflicts::holder`]).
//! - A task is `completed` when every job succeeded, `failed` when any failed or was skipped
//!   for a budget or a deadline, `cancelled` when a user cancelled it.

use crate::context::forward_context;
use crate::planner::{self, Plan};
use orch_shared::api::{
    CheckReport, ExecutionOptions, Job, JobError, JobStatus, Mode, OnFailure, Parked, PlanInfo,
    Task, TaskStatus,
};
use orch_shared::event::{EventKind, StepInfo};
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::job::{
    Backend, FailureReason, GitJob, JobKind, JobResult, JobSpec, Limits, McpServer, Outcome,
    SessionRef, SimParams, Workspace,
};
use orch_shared::plan::{PlanError, PlanSpec, parse_answer};
use orch_shared::role::Role;
use std::collections::BTreeMap;

/// What the caller must do after a state change, in order, after saving the task.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish this job to the work queue.
    Publish(Box<JobSpec>),
    /// Append this event to the task's log (for `job`, or the task when `None`).
    Emit(Option<JobId>, EventKind),
    /// Call [`on_wake`] for this task at this time (a retry or the task deadline falls due).
    WakeAt(u64),
    /// Tell the workers to stop this job attempt, and mark it so a worker that pulls it later
    /// drops it.
    Cancel { job: JobId, attempt: u32 },
    /// Add the job to the dead-letter set.
    DeadLetter(JobId),
    /// Record that these jobs (added after the task was created) belong to the task.
    Index(Vec<JobId>),
    /// Store the task's record in the durable log (JetStream): done when the task is created,
    /// planned, changed by a user, or finished — every other change can be replayed from the
    /// results stream.
    Snapshot,
}

/// The validated parts of a submit request that shape the task.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    pub prompt: String,
    pub task_type: String,
    pub mode: Mode,
    pub backend: Backend,
    pub model: Option<String>,
    /// Backends per role, over `backend`.
    pub backends: BTreeMap<Role, Backend>,
    /// Models per role, over `model`.
    pub models: BTreeMap<Role, String>,
    pub workspace: Workspace,
    pub sim: SimParams,
    pub idempotency_key: Option<String>,
    pub execution: ExecutionOptions,
    /// A planner agent writes the plan; `plan` is the fallback if its plan is not valid.
    pub llm_planner: bool,
    pub mcp_servers: BTreeMap<String, McpServer>,
    /// The check command and its most rounds (git tasks only).
    pub check: Option<(String, u32)>,
}

/// Lays out a new task and returns what to do once it is stored.
pub fn new_task(
    id: TaskId,
    opts: TaskOptions,
    plan: Plan,
    now_ms: u64,
) -> Result<(Task, Vec<Action>), PlanError> {
    let deps = plan.spec.dependencies(opts.mode == Mode::Sequential)?;
    let (jobs, source) = if opts.llm_planner {
        let planner = Job {
            kind: JobKind::Plan,
            ..Job::pending(
                0,
                Role::Planner,
                planner::planner_prompt(&opts.prompt, &opts.task_type),
                vec![],
            )
        };
        (vec![planner], "llm".to_string())
    } else {
        (
            steps_to_jobs(&plan.spec, deps, &opts.prompt, 0, &[]),
            plan.source.clone(),
        )
    };
    let mut task = Task {
        id,
        prompt: opts.prompt,
        task_type: opts.task_type,
        plan_source: source,
        mode: opts.mode,
        status: TaskStatus::Running,
        backend: opts.backend,
        model: opts.model,
        backends: opts.backends,
        models: opts.models,
        workspace: opts.workspace,
        sim: opts.sim,
        idempotency_key: opts.idempotency_key,
        tenant: None,
        options: opts.execution,
        plan: PlanInfo {
            complexity: plan.spec.complexity,
            rationale: plan.spec.rationale,
            skip_reasoning: plan.spec.skip_reasoning,
        },
        created_at_ms: now_ms,
        finished_at_ms: None,
        jobs,
        usage: Default::default(),
        cost_usd: 0.0,
        output: None,
        error: None,
        branch: None,
        mcp_servers: opts.mcp_servers,
        check: opts.check.map(|(command, max_rounds)| CheckReport {
            command,
            max_rounds,
            ..CheckReport::default()
        }),
        pr: None,
        conflicts: vec![],
        trace_id: None,
        traceparent: None,
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
    if let Some(limit) = task.options.task_timeout_ms {
        actions.push(Action::WakeAt(now_ms + limit));
    }
    actions.push(Action::Snapshot);
    advance(&mut task, now_ms, &mut actions);
    Ok((task, actions))
}

/// The jobs of a plan's steps, numbered from `offset`; steps without parents depend on `roots`.
fn steps_to_jobs(
    spec: &PlanSpec,
    deps: Vec<Vec<u32>>,
    prompt: &str,
    offset: u32,
    roots: &[u32],
) -> Vec<Job> {
    spec.steps
        .iter()
        .zip(deps)
        .enumerate()
        .map(|(i, (step, depends_on))| {
            let depends_on = if depends_on.is_empty() {
                roots.to_vec()
            } else {
                depends_on.iter().map(|d| d + offset).collect()
            };
            Job {
                constraints: step.constraints.clone(),
                estimated_tokens: step.estimated_tokens,
                paths: step.paths.clone(),
                ..Job::pending(
                    offset + i as u32,
                    step.role,
                    planner::instruction(step, prompt),
                    depends_on,
                )
            }
        })
        .collect()
}

/// The planner agent answered (or gave up): adds the steps of its plan, or of the rules' plan
/// when its answer is not a valid plan.
fn add_planned_steps(
    task: &mut Task,
    index: usize,
    answer: Option<&str>,
    actions: &mut Vec<Action>,
) {
    let sequential = task.mode == Mode::Sequential;
    let parsed = match answer {
        Some(answer) => parse_answer(answer, sequential),
        None => Err("the planner agent failed".to_string()),
    };
    let offset = task.jobs.len() as u32;
    let (spec, source, rejected, roots) = match parsed {
        Ok(spec) => (spec, "llm".to_string(), None, vec![index as u32]),
        Err(why) => {
            // The rules always give a plan for a known task type; `auto` covers the rest.
            let fallback = planner::plan(&task.task_type, &task.prompt, None, None)
                .or_else(|_| planner::plan("auto", &task.prompt, None, None))
                .expect("auto always plans");
            let source = format!("{} (planner fallback)", fallback.source);
            (fallback.spec, source, Some(why), vec![])
        }
    };
    let deps = spec
        .dependencies(sequential)
        .expect("checked by parse_answer or produced by the rules");
    let jobs = steps_to_jobs(&spec, deps, &task.prompt, offset, &roots);
    actions.push(Action::Emit(
        None,
        EventKind::TaskPlanned {
            source: source.clone(),
            steps: jobs
                .iter()
                .map(|j| StepInfo {
                    job_id: j.id,
                    role: j.role,
                })
                .collect(),
            rejected,
        },
    ));
    actions.push(Action::Index(jobs.iter().map(|j| j.id).collect()));
    actions.push(Action::Snapshot);
    task.jobs.extend(jobs);
    task.plan_source = source;
    task.plan = PlanInfo {
        complexity: spec.complexity,
        rationale: spec.rationale,
        skip_reasoning: spec.skip_reasoning,
    };
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
        backend: task.backend_of(job.role),
        model: task.model_of(job.role).map(str::to_string),
        workspace: job_workspace(task, job),
        limits: Limits {
            timeout_ms: task.options.job_timeout_ms,
            max_turns: task.options.max_turns,
        },
        kind: job.kind,
        constraints: job.constraints.clone(),
        sim: task.sim.clone(),
        session: job.continues.map(|from| SessionRef {
            from,
            fork: job.forked,
            checkpoint: job.rewound_to,
        }),
        // The lanes write the session pointer a result reports (`State::save_result`).
        records_session: true,
        priority: task.options.priority,
        mcp_servers: task.mcp_servers.clone(),
    }
}

/// The task's workspace as `job` uses it: for a git task, the job's own branch, the branches
/// it starts from (its parents' in plan order, or the agent it continues) and the task branch.
fn job_workspace(task: &Task, job: &Job) -> Workspace {
    let Workspace::Git { url, base_ref, .. } = &task.workspace else {
        return task.workspace.clone();
    };
    let branch_of = |j: &Job| GitJob::job_branch(task.id, j.step, j.role);
    // An integrator merges its parents onto the task branch (see [`add_integrator`]).
    let integrate = job.role == Role::Integrator && job.continues.is_none();
    let start = match job.continues {
        // The check runs on what the task produced.
        _ if job.kind == JobKind::Check => vec![GitJob::task_branch(task.id)],
        Some(from) => task
            .jobs
            .iter()
            .filter(|j| j.id == from)
            .map(branch_of)
            .collect(),
        None => {
            let mut parents = job.depends_on.clone();
            parents.sort_unstable();
            let parents = parents
                .iter()
                .filter_map(|&p| task.jobs.get(p as usize))
                .map(branch_of);
            if integrate {
                std::iter::once(GitJob::task_branch(task.id))
                    .chain(parents)
                    .collect()
            } else {
                parents.collect()
            }
        }
    };
    Workspace::Git {
        url: url.clone(),
        base_ref: base_ref.clone(),
        job: Some(GitJob {
            branch: branch_of(job),
            start,
            task_branch: GitJob::task_branch(task.id),
            integrate,
            paths: job.paths.clone(),
            sparse: task.options.sparse_checkout,
        }),
    }
}

/// How much of a check's output the task record and a follow-up turn carry.
const CHECK_TAIL: usize = 4096;

/// Whether `job` is a check that ran and failed (the task's [`CheckReport`] tells what that
/// means for the task; the job itself does not fail it).
fn check_verdict(job: &Job) -> bool {
    job.kind == JobKind::Check
        && job
            .error
            .as_ref()
            .is_some_and(|e| e.reason == FailureReason::CheckFailed)
}

/// The end of `text`, at most `max` bytes, from a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Adds a check job when the task has a check command and every job has ended well since the
/// last check (or there was none): the first run, or the run after a fix.
fn add_check(task: &mut Task, actions: &mut Vec<Action>) {
    let Some(check) = &task.check else {
        return;
    };
    if check.rounds >= check.max_rounds
        || !matches!(task.workspace, Workspace::Git { .. })
        || !task.jobs.iter().all(|j| j.status.is_terminal())
        || task.jobs.iter().any(|j| {
            j.kind == JobKind::Agent
                && matches!(
                    j.status,
                    JobStatus::Failed | JobStatus::Skipped | JobStatus::Cancelled
                )
        })
    {
        return;
    }
    let last_check = task.jobs.iter().rposition(|j| j.kind == JobKind::Check);
    let last_agent = task.jobs.iter().rposition(|j| j.kind == JobKind::Agent);
    if last_agent.is_none() || last_check > last_agent {
        return;
    }
    // The check follows every agent that no other agent follows (the graph's leaves).
    let followed: Vec<u32> = task
        .jobs
        .iter()
        .filter(|j| j.kind == JobKind::Agent)
        .flat_map(|j| j.depends_on.iter().copied())
        .collect();
    let leaves: Vec<u32> = task
        .jobs
        .iter()
        .filter(|j| j.kind == JobKind::Agent && !followed.contains(&j.step))
        .map(|j| j.step)
        .collect();
    let step = task.jobs.len() as u32;
    let job = Job {
        kind: JobKind::Check,
        ..Job::pending(step, Role::Tester, check.command.clone(), leaves)
    };
    let id = job.id;
    task.jobs.push(job);
    actions.push(Action::Emit(
        None,
        EventKind::TaskPlanned {
            source: "check".into(),
            steps: vec![StepInfo {
                job_id: id,
                role: Role::Tester,
            }],
            rejected: None,
        },
    ));
    actions.push(Action::Index(vec![id]));
    actions.push(Action::Snapshot);
}

/// The agent a failed check goes back to: among the agents that changed files, the one whose
/// files the check's output names most (a full path counts twice a bare file name); on a tie,
/// or when it names none, the one that finished its work last (the most recent change). Its
/// index in the task's jobs.
pub fn blame(task: &Task, output: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, j) in task.jobs.iter().enumerate() {
        if j.kind != JobKind::Agent
            || j.status != JobStatus::Succeeded
            || j.files_written.is_empty()
        {
            continue;
        }
        let score: usize = j
            .files_written
            .iter()
            .map(|f| {
                let name = f.rsplit('/').next().unwrap_or(f);
                if output.contains(f.as_str()) {
                    2
                } else if !name.is_empty() && output.contains(name) {
                    1
                } else {
                    0
                }
            })
            .sum();
        let later = |b: usize| {
            task.jobs[i].finished_at_ms.unwrap_or(0) >= task.jobs[b].finished_at_ms.unwrap_or(0)
        };
        if best.is_none_or(|(s, b)| score > s || (score == s && later(b))) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// A check job ended with a verdict: records it on the task and, when it failed and rounds
/// are left, sends the failure back to the agent [`blame`] picks: a further turn of its
/// conversation, or, on the `command` backend (which keeps no session), a new step of its role
/// that starts from its branch. The next check runs once that is done ([`add_check`]).
fn on_check(task: &mut Task, index: usize, result: &JobResult, actions: &mut Vec<Action>) {
    let passed = result.outcome.is_success();
    let job = &mut task.jobs[index];
    job.status = if passed {
        JobStatus::Succeeded
    } else {
        JobStatus::Failed
    };
    job.error = match &result.outcome {
        Outcome::Success => None,
        Outcome::Failure { reason, message } => Some(JobError {
            reason: *reason,
            message: message.clone(),
        }),
    };
    let output_tail = tail(result.output.trim_end(), CHECK_TAIL).to_string();
    let Some(check) = task.check.as_mut() else {
        return;
    };
    check.rounds += 1;
    check.passed = Some(passed);
    check.output_tail = output_tail.clone();
    let (command, round, max) = (check.command.clone(), check.rounds, check.max_rounds);
    if passed || round >= max {
        return;
    }
    let Some(culprit) = blame(task, &result.output) else {
        return;
    };
    let c = &task.jobs[culprit];
    let message = format!(
        "The task's check `{command}` failed on the task branch after your change (round \
         {round} of {max}). The end of its output:\n\n```\n{output_tail}\n```\n\n\
         Fix what broke it (the files you changed: {files}), run `{command}` yourself until \
         it passes, and change nothing else.",
        files = c.files_written.join(", "),
    );
    let culprit_id = c.id;
    let role = c.role;
    let sessions = task.backend_of(role) != Backend::Command;
    let new = JobId::new();
    let follow_up = if sessions {
        // Continue the latest turn of its conversation (there is one: the culprit succeeded).
        let Ok(from) = latest_turn(task, culprit_id) else {
            return;
        };
        Job {
            id: new,
            continues: Some(from),
            ..Job::pending(task.jobs.len() as u32, role, message, vec![])
        }
    } else {
        Job {
            id: new,
            ..Job::pending(task.jobs.len() as u32, role, message, vec![culprit as u32])
        }
    };
    if let Some(check) = task.check.as_mut() {
        check.blamed.push(culprit_id);
    }
    task.jobs.push(follow_up);
    actions.push(Action::Emit(
        None,
        EventKind::TaskPlanned {
            source: "check".into(),
            steps: vec![StepInfo { job_id: new, role }],
            rejected: None,
        },
    ));
    actions.push(Action::Index(vec![new]));
    actions.push(Action::Snapshot);
}

/// Most integrator jobs one task may add (an integrator whose own work does not merge gets
/// another one, so this bounds the chain).
pub const MAX_INTEGRATORS: usize = 8;

/// Whether `role`'s agents change files (and so push work that may conflict).
fn writes_files(role: Role) -> bool {
    !matches!(role, Role::Analyst | Role::Planner | Role::Reviewer)
}

/// For a dry run: the integrator a git task may need, when its plan has file-changing steps
/// that run in parallel (neither depends on the other, directly or not) and so may conflict.
/// It depends on those steps.
pub fn possible_integrator(task: &Task) -> Option<Job> {
    if !matches!(task.workspace, Workspace::Git { .. }) {
        return None;
    }
    let n = task.jobs.len();
    // above[i][j]: job j is an ancestor of job i (parents come first in plan order, but a
    // user's plan may not: iterate until nothing changes).
    let mut above = vec![vec![false; n]; n];
    loop {
        let mut changed = false;
        for i in 0..n {
            for &p in &task.jobs[i].depends_on {
                let p = p as usize;
                if p >= n {
                    continue;
                }
                let mut row = above[p].clone();
                row[p] = true;
                for (j, a) in row.into_iter().enumerate() {
                    if a && !above[i][j] {
                        above[i][j] = true;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let writers: Vec<usize> = (0..n)
        .filter(|&i| task.jobs[i].kind == JobKind::Agent && writes_files(task.jobs[i].role))
        .collect();
    let mut parallel: Vec<u32> = vec![];
    for &i in &writers {
        if writers
            .iter()
            .any(|&j| j != i && !above[i][j] && !above[j][i])
        {
            parallel.push(i as u32);
        }
    }
    if parallel.len() < 2 {
        return None;
    }
    let prompt = format!(
        "Integrate the work of the parallel steps {} if their branches conflict.",
        parallel
            .iter()
            .map(|s| (s + 1).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Some(Job::pending(n as u32, Role::Integrator, prompt, parallel))
}

/// Job `index` of a git task succeeded but its branch did not merge into the task branch (it
/// conflicts with work merged before it): adds an integrator job that starts from the task
/// branch with that branch merged in, conflicts and all, and resolves them. The jobs waiting
/// for job `index` wait for the integrator too, so they start from the resolved merge.
fn add_integrator(task: &mut Task, index: usize, actions: &mut Vec<Action>) {
    let job = &task.jobs[index];
    let Some(git) = job.git.as_ref().filter(|g| !g.merged) else {
        return;
    };
    if !matches!(task.workspace, Workspace::Git { .. })
        || task
            .jobs
            .iter()
            .filter(|j| j.role == Role::Integrator)
            .count()
            >= MAX_INTEGRATORS
    {
        return;
    }
    let task_branch = GitJob::task_branch(task.id);
    let prompt = format!(
        "Integrate the work of step {step} ({role}) into the task branch {task_branch}.\n\n\
         Its branch {branch} did not merge into {task_branch}: {why}. Your workspace is \
         {task_branch} with {branch} being merged into it; the files that conflict hold \
         conflict markers. Resolve every conflict so that the result keeps what both sides \
         meant to do (read both sides and the surrounding code; never drop one side's \
         change), remove every marker, and check that the result builds. Do not commit: \
         your work is committed as the merge when you finish.\n\n\
         The original task, for reference:\n{prompt}",
        step = job.step + 1,
        role = job.role,
        branch = git.branch,
        why = if git.conflicts.is_empty() {
            "it was not merged".to_string()
        } else {
            format!("it conflicts in {}", git.conflicts.join(", "))
        },
        prompt = task.prompt,
    );
    let step = task.jobs.len() as u32;
    let integrator = Job::pending(step, Role::Integrator, prompt, vec![index as u32]);
    let id = integrator.id;
    for other in task.jobs.iter_mut() {
        if other.status == JobStatus::Pending && other.depends_on.contains(&(index as u32)) {
            other.depends_on.push(step);
        }
    }
    task.jobs.push(integrator);
    actions.push(Action::Emit(
        None,
        EventKind::TaskPlanned {
            source: "integrator".into(),
            steps: vec![StepInfo {
                job_id: id,
                role: Role::Integrator,
            }],
            rejected: None,
        },
    ));
    actions.push(Action::Index(vec![id]));
    actions.push(Action::Snapshot);
}

/// Why a further turn of an agent cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    #[error("agent {0} is not part of this task")]
    NoJob(JobId),
    #[error(
        "agent {agent} is still working (its conversation's latest turn is agent {latest}, {status}); send when it has finished"
    )]
    Busy {
        agent: JobId,
        latest: JobId,
        status: &'static str,
    },
    #[error(
        "agent {0} has no finished turn to continue ({1}); only an agent that succeeded can be continued or forked"
    )]
    NotContinuable(JobId, &'static str),
    #[error(
        "agent {0} is a planner: its answer became the plan, there is no conversation to continue"
    )]
    Planner(JobId),
}

/// The agent a `send` to `agent` continues: the latest turn of its conversation (sends
/// continue the newest turn, forks start new conversations). Fails when that turn has not
/// ended well.
pub fn latest_turn(task: &Task, agent: JobId) -> Result<JobId, TurnError> {
    let mut latest = task
        .jobs
        .iter()
        .find(|j| j.id == agent)
        .ok_or(TurnError::NoJob(agent))?;
    while let Some(next) = task
        .jobs
        .iter()
        .find(|j| j.continues == Some(latest.id) && !j.forked)
    {
        latest = next;
    }
    continuable(latest, agent)?;
    Ok(latest.id)
}

fn continuable(job: &Job, asked: JobId) -> Result<(), TurnError> {
    if job.kind == JobKind::Plan {
        return Err(TurnError::Planner(job.id));
    }
    match job.status {
        JobStatus::Succeeded => Ok(()),
        JobStatus::Pending
        | JobStatus::Queued
        | JobStatus::Running
        | JobStatus::Retrying
        | JobStatus::Parked => Err(TurnError::Busy {
            agent: asked,
            latest: job.id,
            status: job.status.as_str(),
        }),
        s => Err(TurnError::NotContinuable(job.id, s.as_str())),
    }
}

/// `orchctl agents send` / `fork`: adds agent `new`, the next turn of agent `from`'s
/// conversation (or a fork of it) with `message` as the user's next message, and reopens the
/// task if it had ended. A send must continue the latest turn ([`latest_turn`]).
pub fn add_turn(
    task: &mut Task,
    from: JobId,
    new: JobId,
    message: &str,
    fork: bool,
    now_ms: u64,
) -> Result<Vec<Action>, TurnError> {
    let parent = if fork {
        let parent = task
            .jobs
            .iter()
            .find(|j| j.id == from)
            .ok_or(TurnError::NoJob(from))?;
        continuable(parent, from)?;
        parent
    } else {
        let latest = latest_turn(task, from)?;
        if latest != from {
            // Another send got there first.
            return Err(TurnError::Busy {
                agent: from,
                latest,
                status: "continued",
            });
        }
        task.jobs
            .iter()
            .find(|j| j.id == from)
            .ok_or(TurnError::NoJob(from))?
    };
    let job = Job {
        id: new,
        continues: Some(from),
        forked: fork,
        ..Job::pending(
            task.jobs.len() as u32,
            parent.role,
            message.to_string(),
            vec![],
        )
    };
    let role = job.role;
    task.jobs.push(job);
    if task.status.is_terminal() {
        task.status = TaskStatus::Running;
        task.finished_at_ms = None;
        task.error = None;
        task.output = None;
    }
    let mut actions = vec![
        Action::Emit(
            None,
            EventKind::TaskPlanned {
                source: if fork { "fork" } else { "send" }.into(),
                steps: vec![StepInfo { job_id: new, role }],
                rejected: None,
            },
        ),
        Action::Index(vec![new]),
        Action::Snapshot,
    ];
    advance(task, now_ms, &mut actions);
    Ok(actions)
}

/// `orchctl agents rewind`: adds agent `new`, which starts from agent `from`'s checkpoint
/// after `step` (its conversation and its tree) with `message` as its next user message, and
/// reopens the task if it had ended. An agent still queued or running is stopped first, as
/// a kill stops it (what depends on it is skipped, as for a kill). The caller checks that the
/// checkpoint exists.
pub fn add_rewind(
    task: &mut Task,
    from: JobId,
    new: JobId,
    step: u32,
    message: &str,
    now_ms: u64,
) -> Result<Vec<Action>, TurnError> {
    let index = task
        .jobs
        .iter()
        .position(|j| j.id == from)
        .ok_or(TurnError::NoJob(from))?;
    if task.jobs[index].kind == JobKind::Plan {
        return Err(TurnError::Planner(from));
    }
    let mut actions = Vec::new();
    let parent = &mut task.jobs[index];
    let stopped = format!("stopped by a rewind to step {step} (agent {new} continues from there)");
    match parent.status {
        JobStatus::Queued | JobStatus::Running | JobStatus::Parked => {
            actions.push(Action::Cancel {
                job: parent.id,
                attempt: parent.attempt,
            })
        }
        JobStatus::Pending | JobStatus::Retrying => parent.finished_at_ms = Some(now_ms),
        _ => {}
    }
    if !parent.status.is_terminal() {
        parent.status = JobStatus::Cancelled;
        parent.retry_at_ms = None;
        parent.error = Some(JobError {
            reason: FailureReason::Cancelled,
            message: stopped.clone(),
        });
        actions.push(Action::Emit(
            Some(parent.id),
            EventKind::JobCancelled { reason: stopped },
        ));
    }
    let role = parent.role;
    let job = Job {
        id: new,
        continues: Some(from),
        forked: true,
        rewound_to: Some(step),
        ..Job::pending(task.jobs.len() as u32, role, message.to_string(), vec![])
    };
    task.jobs.push(job);
    if task.status.is_terminal() {
        task.status = TaskStatus::Running;
        task.finished_at_ms = None;
        task.error = None;
        task.output = None;
    }
    actions.extend([
        Action::Emit(
            None,
            EventKind::TaskPlanned {
                source: "rewind".into(),
                steps: vec![StepInfo { job_id: new, role }],
                rejected: None,
            },
        ),
        Action::Index(vec![new]),
        Action::Snapshot,
    ]);
    advance(task, now_ms, &mut actions);
    Ok(actions)
}

fn in_flight(task: &Task) -> usize {
    task.jobs
        .iter()
        .filter(|j| {
            matches!(
                j.status,
                JobStatus::Queued | JobStatus::Running | JobStatus::Retrying | JobStatus::Parked
            )
        })
        .count()
}

/// Whether the task's spend has reached a budget.
fn over_budget(task: &Task) -> Option<String> {
    let o = &task.options;
    if let Some(b) = o.budget_usd
        && task.cost_usd >= b
    {
        return Some(format!(
            "budget exhausted: spent ${:.6} of ${b}",
            task.cost_usd
        ));
    }
    if let Some(b) = o.budget_tokens
        && task.usage.total() >= b
    {
        return Some(format!(
            "token budget exhausted: used {} of {b} tokens",
            task.usage.total()
        ));
    }
    None
}

/// Queues every job that can run now, skips what can never run, and finishes the task when
/// nothing is left.
fn advance(task: &mut Task, now_ms: u64, actions: &mut Vec<Action>) {
    if task.status.is_terminal() {
        return;
    }
    skip_unreachable(task, actions);
    add_check(task, actions);
    let budget = over_budget(task);
    let cap = task
        .options
        .max_parallel
        .map_or(usize::MAX, |c| c.max(1) as usize);
    for i in 0..task.jobs.len() {
        if task.jobs[i].status != JobStatus::Pending || !ready(task, i) {
            continue;
        }
        if budget.is_some() || in_flight(task) >= cap {
            break;
        }
        if let Some((o, overlap)) = crate::conflicts::holder(task, i) {
            let other = task.jobs[o].id;
            if task.jobs[i].held_by != Some(other) {
                task.jobs[i].held_by = Some(other);
                actions.push(Action::Emit(
                    Some(task.jobs[i].id),
                    EventKind::JobWaiting {
                        reason: format!(
                            "waiting for job {other} (scope overlap: {})",
                            overlap.join(", ")
                        ),
                    },
                ));
            }
            continue;
        }
        let context = contexts(task, i);
        let job = &mut task.jobs[i];
        job.status = JobStatus::Queued;
        job.queued_at_ms = Some(now_ms);
        job.context = context;
        job.held_by = None;
        let job = &task.jobs[i];
        actions.push(Action::Emit(
            Some(job.id),
            EventKind::JobQueued {
                role: job.role,
                step: job.step,
            },
        ));
        actions.push(Action::Publish(Box::new(job_spec(task, job))));
    }
    if let Some(why) = budget
        && in_flight(task) == 0
    {
        skip_pending(task, &why, actions);
        if task.error.is_none() {
            task.error = Some(why);
        }
    }
    if task.jobs.iter().all(|j| j.status.is_terminal()) {
        actions.push(finish(task, now_ms, None));
        actions.push(Action::Snapshot);
    }
}

/// Whether every parent of job `i` allows it to start.
fn ready(task: &Task, i: usize) -> bool {
    let continue_on_failure = task.options.on_failure == OnFailure::Continue;
    task.jobs[i].depends_on.iter().all(|&p| {
        let parent = task.jobs[p as usize].status;
        parent == JobStatus::Succeeded || (continue_on_failure && parent.is_terminal())
    })
}

/// With `on_failure: stop`, pending jobs downstream of a failed, skipped or cancelled job can
/// never run: skip them (transitively).
fn skip_unreachable(task: &mut Task, actions: &mut Vec<Action>) {
    if task.options.on_failure == OnFailure::Continue {
        return;
    }
    loop {
        let mut changed = false;
        for i in 0..task.jobs.len() {
            if task.jobs[i].status != JobStatus::Pending {
                continue;
            }
            let blocker = task.jobs[i].depends_on.iter().copied().find(|&p| {
                matches!(
                    task.jobs[p as usize].status,
                    JobStatus::Failed | JobStatus::Skipped | JobStatus::Cancelled
                )
            });
            if let Some(p) = blocker {
                let parent = &task.jobs[p as usize];
                let why = format!(
                    "step {} ({}) {}",
                    parent.step + 1,
                    parent.role,
                    parent.status.as_str()
                );
                task.jobs[i].status = JobStatus::Skipped;
                actions.push(Action::Emit(
                    Some(task.jobs[i].id),
                    EventKind::JobSkipped { reason: why },
                ));
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

fn skip_pending(task: &mut Task, why: &str, actions: &mut Vec<Action>) {
    for job in task
        .jobs
        .iter_mut()
        .filter(|j| j.status == JobStatus::Pending)
    {
        job.status = JobStatus::Skipped;
        actions.push(Action::Emit(
            Some(job.id),
            EventKind::JobSkipped {
                reason: why.to_string(),
            },
        ));
    }
}

/// The forward contexts of job `i`'s succeeded parents, joined.
fn contexts(task: &Task, i: usize) -> Option<String> {
    let parts: Vec<String> = task.jobs[i]
        .depends_on
        .iter()
        .map(|&p| &task.jobs[p as usize])
        .filter(|p| p.status == JobStatus::Succeeded)
        .filter_map(|p| forward_context(p.role, p.output.as_deref().unwrap_or("")))
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// Re-publishes every queued job of a task and re-arms its timers (after a coordinator
/// restart; duplicates are dropped by JetStream's dedup window and by the workers' markers).
pub fn resume(task: &Task) -> Vec<Action> {
    let mut actions: Vec<Action> = task
        .jobs
        .iter()
        .filter(|j| j.status == JobStatus::Queued)
        .map(|j| Action::Publish(Box::new(job_spec(task, j))))
        .collect();
    actions.extend(
        task.jobs
            .iter()
            .filter_map(|j| j.retry_at_ms)
            .map(Action::WakeAt),
    );
    if let Some(limit) = task.options.task_timeout_ms {
        actions.push(Action::WakeAt(task.created_at_ms + limit));
    }
    actions
}

/// A worker started a job. Returns whether the task changed.
pub fn on_started(task: &mut Task, job: JobId, attempt: u32, worker: WorkerId, at_ms: u64) -> bool {
    let Some(job) = task.jobs.iter_mut().find(|j| j.id == job) else {
        return false;
    };
    if job.attempt != attempt {
        return false;
    }
    match job.status {
        JobStatus::Queued => job.started_at_ms = Some(at_ms),
        // Resumed after it was parked: it keeps its first start.
        JobStatus::Parked => job.parked = None,
        _ => return false,
    }
    job.status = JobStatus::Running;
    job.worker_id = Some(worker);
    true
}

/// A worker parked a job attempt (a provider's usage limit, or a person's answer awaited).
/// Returns whether the task changed.
pub fn on_parked(task: &mut Task, job: JobId, attempt: u32, parked: Parked) -> bool {
    let Some(job) = task.jobs.iter_mut().find(|j| j.id == job) else {
        return false;
    };
    if job.attempt != attempt
        || !matches!(
            job.status,
            JobStatus::Queued | JobStatus::Running | JobStatus::Parked
        )
    {
        return false;
    }
    job.status = JobStatus::Parked;
    job.parked = Some(parked);
    true
}

/// Exponential backoff with jitter before attempt `next` (2 s, 4 s, 8 s … capped at 5 min,
/// each scaled by a factor in [0.5, 1.0) taken from `jitter`).
pub fn backoff_ms(next: u32, jitter: u64) -> u64 {
    let base = 2_000u64.saturating_mul(1 << next.saturating_sub(2).min(16));
    let base = base.min(300_000);
    base / 2 + (base / 2) * (jitter % 1000) / 1000
}

/// A job attempt ended. Returns `None` when the result is stale or a duplicate (nothing changed).
pub fn on_result(task: &mut Task, result: &JobResult, now_ms: u64) -> Option<Vec<Action>> {
    let index = task.jobs.iter().position(|j| j.id == result.job_id)?;
    let job = &mut task.jobs[index];
    if job.attempt != result.attempt {
        return None;
    }
    // A cancelled job's worker still reports what it spent before it stopped: count it once.
    if job.status == JobStatus::Cancelled {
        if job.finished_at_ms.is_some() {
            return None;
        }
        job.finished_at_ms = Some(result.finished_at_ms);
        job.usage = result.usage;
        job.cost_usd = result.cost_usd;
        task.usage.add(&result.usage);
        task.cost_usd += result.cost_usd;
        return Some(vec![]);
    }
    if job.status.is_terminal() || task.status.is_terminal() {
        return None;
    }
    job.worker_id = Some(result.worker_id.clone());
    job.parked = None;
    job.started_at_ms = Some(result.started_at_ms);
    job.finished_at_ms = Some(result.finished_at_ms);
    job.usage.add(&result.usage);
    job.cost_usd += result.cost_usd;
    job.output = Some(result.output.clone());
    job.files_read = result.files_read.clone();
    job.files_written = result.files_written.clone();
    if result.model.is_some() {
        job.model = result.model.clone();
    }
    job.context_tokens = result.context_tokens;
    job.context_window = result.context_window;
    job.diff = result.diff.clone();
    job.git = result.git.clone();
    job.session_id = result.session_id.clone();
    task.usage.add(&result.usage);
    task.cost_usd += result.cost_usd;

    let mut actions = Vec::new();
    if task.jobs[index].kind == JobKind::Check
        && match &result.outcome {
            Outcome::Success => true,
            Outcome::Failure { reason, .. } => *reason == FailureReason::CheckFailed,
        }
    {
        on_check(task, index, result, &mut actions);
        advance(task, now_ms, &mut actions);
        return Some(actions);
    }
    let max_attempts = task.options.max_attempts.max(1);
    let job = &mut task.jobs[index];
    let planning = job.kind == JobKind::Plan;
    match &result.outcome {
        Outcome::Success => {
            job.status = JobStatus::Succeeded;
            job.error = None;
            if planning {
                add_planned_steps(task, index, Some(&result.output), &mut actions);
            } else {
                add_integrator(task, index, &mut actions);
            }
        }
        Outcome::Failure { reason, message } => {
            job.error = Some(JobError {
                reason: *reason,
                message: message.clone(),
            });
            if reason.is_retryable() && job.attempt < max_attempts {
                let next = job.attempt + 1;
                let at = now_ms + backoff_ms(next, job.id.as_u128() as u64 ^ now_ms);
                job.status = JobStatus::Retrying;
                job.retry_at_ms = Some(at);
                actions.push(Action::Emit(
                    Some(job.id),
                    EventKind::JobRetrying {
                        reason: *reason,
                        message: message.clone(),
                        next_attempt: next,
                        retry_at_ms: at,
                    },
                ));
                actions.push(Action::WakeAt(at));
            } else if planning {
                // A planner that fails for good is replaced by the rules, not dead-lettered.
                job.status = JobStatus::Failed;
                add_planned_steps(task, index, None, &mut actions);
            } else {
                job.status = JobStatus::Failed;
                actions.push(Action::DeadLetter(job.id));
                actions.push(Action::Emit(
                    Some(job.id),
                    EventKind::JobDeadLettered { reason: *reason },
                ));
            }
        }
    }
    advance(task, now_ms, &mut actions);
    Some(actions)
}

/// Timers: starts retries that are due, and ends the task when its deadline passed.
pub fn on_wake(task: &mut Task, now_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    if task.status.is_terminal() {
        return actions;
    }
    if let Some(limit) = task.options.task_timeout_ms
        && now_ms >= task.created_at_ms + limit
    {
        let why = format!(
            "task timed out after {}",
            humantime::format_duration(std::time::Duration::from_millis(limit))
        );
        stop(task, &why, TaskStatus::Failed, now_ms, &mut actions);
        return actions;
    }
    for i in 0..task.jobs.len() {
        let job = &mut task.jobs[i];
        if job.status == JobStatus::Retrying && job.retry_at_ms.is_some_and(|t| t <= now_ms) {
            job.status = JobStatus::Queued;
            job.attempt += 1;
            job.retry_at_ms = None;
            job.queued_at_ms = Some(now_ms);
            let job = &task.jobs[i];
            actions.push(Action::Emit(
                Some(job.id),
                EventKind::JobQueued {
                    role: job.role,
                    step: job.step,
                },
            ));
            actions.push(Action::Publish(Box::new(job_spec(task, job))));
        }
    }
    advance(task, now_ms, &mut actions);
    actions
}

/// A user cancels the task: nothing more runs; running agents are stopped.
pub fn cancel(task: &mut Task, why: &str, now_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    if !task.status.is_terminal() {
        stop(task, why, TaskStatus::Cancelled, now_ms, &mut actions);
    }
    actions
}

fn stop(task: &mut Task, why: &str, status: TaskStatus, now_ms: u64, actions: &mut Vec<Action>) {
    for i in 0..task.jobs.len() {
        let job = &mut task.jobs[i];
        match job.status {
            JobStatus::Queued | JobStatus::Running | JobStatus::Parked => {
                job.status = JobStatus::Cancelled;
                actions.push(Action::Cancel {
                    job: job.id,
                    attempt: job.attempt,
                });
                actions.push(Action::Emit(
                    Some(job.id),
                    EventKind::JobCancelled {
                        reason: why.to_string(),
                    },
                ));
            }
            JobStatus::Pending | JobStatus::Retrying => {
                job.status = JobStatus::Skipped;
                job.retry_at_ms = None;
                // Nothing runs and nothing will report: the job is done.
                job.finished_at_ms.get_or_insert(now_ms);
                actions.push(Action::Emit(
                    Some(job.id),
                    EventKind::JobSkipped {
                        reason: why.to_string(),
                    },
                ));
            }
            _ => {}
        }
    }
    task.error = Some(why.to_string());
    actions.push(finish(task, now_ms, Some(status)));
    actions.push(Action::Snapshot);
}

/// A user kills one agent: its job is cancelled and treated as a failed step.
pub fn kill(task: &mut Task, job: JobId, now_ms: u64) -> Option<Vec<Action>> {
    let index = task.jobs.iter().position(|j| j.id == job)?;
    let mut actions = Vec::new();
    let job = &mut task.jobs[index];
    match job.status {
        JobStatus::Queued | JobStatus::Running | JobStatus::Parked => {
            actions.push(Action::Cancel {
                job: job.id,
                attempt: job.attempt,
            })
        }
        JobStatus::Pending | JobStatus::Retrying => {
            job.finished_at_ms = Some(now_ms);
        }
        _ => return Some(actions),
    }
    job.status = JobStatus::Cancelled;
    job.retry_at_ms = None;
    job.error = Some(JobError {
        reason: FailureReason::Cancelled,
        message: "killed by a user".into(),
    });
    actions.push(Action::Emit(
        Some(job.id),
        EventKind::JobCancelled {
            reason: "killed by a user".into(),
        },
    ));
    actions.push(Action::Snapshot);
    advance(task, now_ms, &mut actions);
    Some(actions)
}

/// `dlq retry`: gives a failed job a fresh attempt and reopens its task.
pub fn retry_dead(task: &mut Task, job: JobId, now_ms: u64) -> Option<Vec<Action>> {
    let index = task.jobs.iter().position(|j| j.id == job)?;
    if task.jobs[index].status != JobStatus::Failed {
        return None;
    }
    let job = &mut task.jobs[index];
    job.attempt += 1;
    job.status = JobStatus::Pending;
    job.error = None;
    job.finished_at_ms = None;
    // Dependents skipped because of this failure get their chance again.
    reopen_dependents(task, index);
    task.status = TaskStatus::Running;
    task.finished_at_ms = None;
    task.error = None;
    task.output = None;
    let mut actions = vec![Action::Snapshot];
    advance(task, now_ms, &mut actions);
    Some(actions)
}

fn reopen_dependents(task: &mut Task, index: usize) {
    let mut frontier = vec![index as u32];
    while let Some(p) = frontier.pop() {
        for j in 0..task.jobs.len() {
            if task.jobs[j].status == JobStatus::Skipped && task.jobs[j].depends_on.contains(&p) {
                task.jobs[j].status = JobStatus::Pending;
                frontier.push(j as u32);
            }
        }
    }
}

fn finish(task: &mut Task, now_ms: u64, forced: Option<TaskStatus>) -> Action {
    // A failed planner was replaced by the rules' plan: it does not fail the task.
    let failed: Vec<&Job> = task
        .jobs
        .iter()
        .filter(|j| j.status == JobStatus::Failed && j.kind != JobKind::Plan && !check_verdict(j))
        .collect();
    // A check that failed for good fails the task (a check that failed and was followed by a
    // fix and a passing check does not).
    let check_failed = task.check.as_ref().is_some_and(|c| c.passed == Some(false));
    let any_cancelled = task.jobs.iter().any(|j| j.status == JobStatus::Cancelled);
    let any_skipped = task.jobs.iter().any(|j| j.status == JobStatus::Skipped);
    // A reason already set here is a budget that ran out: the skipped steps make it a failure.
    task.status = forced.unwrap_or(
        if !failed.is_empty() || check_failed || (any_skipped && task.error.is_some()) {
            TaskStatus::Failed
        } else if any_cancelled {
            TaskStatus::Cancelled
        } else {
            TaskStatus::Completed
        },
    );
    let mut problems: Vec<String> = task.error.take().into_iter().collect();
    if let Some(c) = task.check.as_ref().filter(|_| check_failed) {
        problems.push(format!(
            "the check `{}` failed ({} of {} rounds)",
            c.command, c.rounds, c.max_rounds
        ));
    }
    problems.extend(failed.iter().map(|j| {
        let e = j.error.as_ref();
        format!(
            "step {} ({}) failed: {}: {}",
            j.step + 1,
            j.role,
            e.map_or("unknown", |e| e.reason.as_str()),
            e.map_or("", |e| e.message.as_str())
        )
    }));
    task.error = (!problems.is_empty()).then(|| problems.join("; "));
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
    if matches!(task.workspace, Workspace::Git { .. }) {
        task.branch = Some(GitJob::task_branch(task.id));
    }
    Action::Emit(None, finished_event(task))
}

/// The `task_finished` event of a finished task, from its record alone: the same every time
/// it is made, so the next leader that writes it again (a result applied by a leader that
/// died before its events were stored) writes a message the event log drops if it has it.
pub fn finished_event(task: &Task) -> EventKind {
    EventKind::TaskFinished {
        status: task.status.as_str().into(),
        usage: task.usage,
        cost_usd: task.cost_usd,
        duration_ms: task.elapsed_ms(task.finished_at_ms.unwrap_or_default()),
        pr_pending: task.pr_pending(),
    }
}

#[cfg(test)]
mod tests;
