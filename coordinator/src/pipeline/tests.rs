use super::*;
use crate::planner::plan;
use orch_shared::job::{FailureReason, Usage};
use orch_shared::plan::PlanSpec;
use orch_shared::role::Role;

fn opts(mode: Mode) -> TaskOptions {
    TaskOptions {
        prompt: "build and test a parser".into(),
        task_type: "auto".into(),
        mode,
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
    }
}

fn published(actions: &[Action]) -> Vec<JobSpec> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(s) => Some((**s).clone()),
            _ => None,
        })
        .collect()
}

fn roles(specs: &[JobSpec]) -> Vec<Role> {
    specs.iter().map(|s| s.role).collect()
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
        fence: 1,
        model: None,
        context_tokens: None,
        context_window: None,
        diff: None,
        git: None,
        session_id: None,
        session: None,
    }
}

fn ok(spec: &JobSpec) -> JobResult {
    result(
        spec,
        Outcome::Success,
        &format!("## Summary\n{} done\n", spec.role),
    )
}

fn fail(spec: &JobSpec, reason: FailureReason) -> JobResult {
    result(
        spec,
        Outcome::Failure {
            reason,
            message: "boom".into(),
        },
        "",
    )
}

fn user_plan(json: &str) -> Plan {
    let spec: PlanSpec = serde_json::from_str(json).unwrap();
    plan("auto", "p", None, Some(spec)).unwrap()
}

fn task_with(mode: Mode, p: Plan, f: impl FnOnce(&mut ExecutionOptions)) -> (Task, Vec<Action>) {
    let mut o = opts(mode);
    f(&mut o.execution);
    new_task(TaskId::new(), o, p, 0).unwrap()
}

#[test]
fn sequential_runs_one_at_a_time_with_forward_context() {
    let p = plan("auto", "build and test a parser", None, None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let first = published(&actions);
    assert_eq!(roles(&first), vec![Role::Builder]);
    let next = published(&on_result(&mut task, &ok(&first[0]), 5).unwrap());
    assert_eq!(roles(&next), vec![Role::Tester]);
    assert!(next[0].context.as_deref().unwrap().contains("builder done"));
    // A duplicate result changes nothing.
    assert!(on_result(&mut task, &ok(&first[0]), 6).is_none());
    let last = on_result(&mut task, &ok(&next[0]), 9).unwrap();
    assert!(
        last.iter()
            .any(|a| matches!(a, Action::Emit(None, EventKind::TaskFinished { .. })))
    );
    assert_eq!(
        last.last(),
        Some(&Action::Snapshot),
        "the finished task is snapshotted"
    );
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.usage.total(), 36);
    assert_eq!(task.cost_usd, 0.5);
    assert_eq!(task.finished_at_ms, Some(9));
}

#[test]
fn a_finished_tasks_end_event_is_made_again_identically_from_its_record() {
    let p = plan("auto", "build a parser", None, None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let mut specs = published(&actions);
    let mut now = 5;
    let mut emitted = None;
    while let Some(spec) = specs.pop() {
        let actions = on_result(&mut task, &ok(&spec), now).unwrap();
        now += 7;
        emitted = actions.iter().find_map(|a| match a {
            Action::Emit(None, kind @ EventKind::TaskFinished { .. }) => Some(kind.clone()),
            _ => None,
        });
        specs.extend(published(&actions));
    }
    // The next leader makes it later, from the saved record: the same event, so the same
    // message and message id (the log drops it when the first one was stored).
    let emitted = emitted.expect("the last result finishes the task");
    assert_eq!(finished_event(&task), emitted);
    assert!(on_result(&mut task, &ok(&published(&actions)[0]), now + 1000).is_none());
    assert_eq!(finished_event(&task), emitted);
}

#[test]
fn a_dag_runs_independent_steps_together_and_joins_contexts() {
    let p = user_plan(
        r#"{"steps":[{"role":"analyst"},{"role":"builder","depends_on":[0]},{"role":"documenter","depends_on":[0]},{"role":"reviewer","depends_on":[1,2]}]}"#,
    );
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let a = published(&actions);
    assert_eq!(roles(&a), vec![Role::Analyst]);
    let bd = published(&on_result(&mut task, &ok(&a[0]), 1).unwrap());
    assert_eq!(roles(&bd), vec![Role::Builder, Role::Documenter]);
    assert!(published(&on_result(&mut task, &ok(&bd[1]), 2).unwrap()).is_empty());
    let r = published(&on_result(&mut task, &ok(&bd[0]), 3).unwrap());
    assert_eq!(roles(&r), vec![Role::Reviewer]);
    let ctx = r[0].context.as_deref().unwrap();
    assert!(
        ctx.contains("builder done") && ctx.contains("documenter done"),
        "{ctx}"
    );
}

#[test]
fn stop_skips_dependents_transitively_but_not_independent_steps() {
    let p = user_plan(
        r#"{"steps":[{"role":"analyst"},{"role":"builder","depends_on":[0]},{"role":"tester","depends_on":[1]},{"role":"documenter","depends_on":[]}]}"#,
    );
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let first = published(&actions);
    assert_eq!(roles(&first), vec![Role::Analyst, Role::Documenter]);
    let a = on_result(&mut task, &fail(&first[0], FailureReason::BadRequest), 1).unwrap();
    assert!(a.contains(&Action::DeadLetter(first[0].job_id)));
    let statuses: Vec<JobStatus> = task.jobs.iter().map(|j| j.status).collect();
    assert_eq!(
        statuses,
        vec![
            JobStatus::Failed,
            JobStatus::Skipped,
            JobStatus::Skipped,
            JobStatus::Queued
        ]
    );
    on_result(&mut task, &ok(&first[1]), 2).unwrap();
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .contains("step 1 (analyst) failed: bad_request")
    );
}

#[test]
fn continue_runs_dependents_of_a_failed_step() {
    let p = plan("auto", "x", Some(&[Role::Builder, Role::Tester]), None).unwrap();
    let (mut task, actions) =
        task_with(Mode::Sequential, p, |o| o.on_failure = OnFailure::Continue);
    let b = published(&actions);
    let t = published(&on_result(&mut task, &fail(&b[0], FailureReason::BadRequest), 1).unwrap());
    assert_eq!(roles(&t), vec![Role::Tester]);
    assert!(t[0].context.is_none());
    on_result(&mut task, &ok(&t[0]), 2).unwrap();
    assert_eq!(
        task.status,
        TaskStatus::Failed,
        "a task with a failed step is failed"
    );
}

#[test]
fn retryable_failures_are_retried_with_backoff_then_dead_lettered() {
    let p = plan("auto", "x", Some(&[Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |o| o.max_attempts = 2);
    let b1 = published(&actions).remove(0);
    let a = on_result(&mut task, &fail(&b1, FailureReason::RateLimited), 1_000).unwrap();
    let at = a
        .iter()
        .find_map(|a| match a {
            Action::WakeAt(t) => Some(*t),
            _ => None,
        })
        .unwrap();
    assert!(
        (2_000..3_000).contains(&at),
        "first retry after 1-2 s: {at}"
    );
    assert_eq!(task.jobs[0].status, JobStatus::Retrying);
    assert!(
        on_wake(&mut task, at - 1).is_empty(),
        "not before it is due"
    );
    let b2 = published(&on_wake(&mut task, at)).remove(0);
    assert_eq!(b2.attempt, 2);
    // A late result of attempt 1 is stale.
    assert!(on_result(&mut task, &ok(&b1), at + 1).is_none());
    let a = on_result(&mut task, &fail(&b2, FailureReason::Overloaded), at + 2).unwrap();
    assert!(a.contains(&Action::DeadLetter(b2.job_id)));
    assert_eq!(task.status, TaskStatus::Failed);
    // The usage of both attempts is counted.
    assert_eq!(task.usage.total(), 36);
    // dlq retry reopens it.
    let again = published(&retry_dead(&mut task, b2.job_id, at + 3).unwrap());
    assert_eq!(again[0].attempt, 3);
    assert_eq!(task.status, TaskStatus::Running);
    on_result(&mut task, &ok(&again[0]), at + 4).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
    assert!(task.error.is_none());
}

#[test]
fn non_retryable_failures_are_not_retried() {
    let p = plan("auto", "x", Some(&[Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let b = published(&actions).remove(0);
    on_result(&mut task, &fail(&b, FailureReason::Timeout), 1).unwrap();
    assert_eq!(task.jobs[0].status, JobStatus::Failed);
}

#[test]
fn backoff_grows_and_is_capped() {
    assert!((1_000..2_000).contains(&backoff_ms(2, 7)));
    assert!((2_000..4_000).contains(&backoff_ms(3, 7)));
    assert!(backoff_ms(40, 999) < 300_000);
}

#[test]
fn max_parallel_caps_jobs_in_flight() {
    let p = plan(
        "auto",
        "x",
        Some(&[Role::Analyst, Role::Builder, Role::Tester, Role::Reviewer]),
        None,
    )
    .unwrap();
    let (mut task, actions) = task_with(Mode::Parallel, p, |o| o.max_parallel = Some(2));
    let first = published(&actions);
    assert_eq!(first.len(), 2);
    let more = published(&on_result(&mut task, &ok(&first[0]), 1).unwrap());
    assert_eq!(roles(&more), vec![Role::Tester]);
}

#[test]
fn budget_stops_dispatch_and_fails_the_task_when_nothing_runs() {
    let p = plan(
        "auto",
        "x",
        Some(&[Role::Analyst, Role::Builder, Role::Tester]),
        None,
    )
    .unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |o| o.budget_usd = Some(0.2));
    let a = published(&actions).remove(0);
    let after = on_result(&mut task, &ok(&a), 1).unwrap();
    assert!(
        published(&after).is_empty(),
        "$0.25 spent of $0.20: nothing more is dispatched"
    );
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(task.error.as_deref().unwrap().contains("budget exhausted"));
    assert_eq!(task.jobs[1].status, JobStatus::Skipped);
}

#[test]
fn cancel_stops_running_jobs_and_skips_the_rest() {
    let p = plan("auto", "x", Some(&[Role::Analyst, Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let a = published(&actions).remove(0);
    let actions = cancel(&mut task, "cancelled by a user", 5);
    assert!(actions.contains(&Action::Cancel {
        job: a.job_id,
        attempt: 1
    }));
    assert_eq!(task.status, TaskStatus::Cancelled);
    assert_eq!(task.jobs[1].status, JobStatus::Skipped);
    // The stopped worker's report is counted once, and changes nothing else.
    let mut r = fail(&a, FailureReason::Cancelled);
    r.cost_usd = 0.1;
    assert!(on_result(&mut task, &r, 6).unwrap().is_empty());
    assert!(on_result(&mut task, &r, 7).is_none());
    assert_eq!(task.cost_usd, 0.1);
    assert!(cancel(&mut task, "again", 8).is_empty());
}

#[test]
fn kill_cancels_one_agent_and_stops_its_dependents() {
    let p = plan("auto", "x", Some(&[Role::Analyst, Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let a = published(&actions).remove(0);
    let actions = kill(&mut task, a.job_id, 5).unwrap();
    assert!(actions.contains(&Action::Cancel {
        job: a.job_id,
        attempt: 1
    }));
    assert_eq!(task.jobs[1].status, JobStatus::Skipped);
    assert_eq!(task.status, TaskStatus::Cancelled);
}

#[test]
fn task_deadline_fails_the_task() {
    let p = plan("auto", "x", Some(&[Role::Analyst]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |o| o.task_timeout_ms = Some(1_000));
    assert!(actions.contains(&Action::WakeAt(1_000)));
    assert!(on_wake(&mut task, 999).is_empty());
    let actions = on_wake(&mut task, 1_000);
    assert!(actions.iter().any(|a| matches!(a, Action::Cancel { .. })));
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .starts_with("task timed out after 1s")
    );
}

#[test]
fn resume_republishes_queued_jobs_and_rearms_timers() {
    let p = plan("auto", "x", Some(&[Role::Analyst, Role::Builder]), None).unwrap();
    let (task, actions) = task_with(Mode::Parallel, p, |o| o.task_timeout_ms = Some(60_000));
    let again = resume(&task);
    assert_eq!(published(&again), published(&actions));
    assert!(again.contains(&Action::WakeAt(60_000)));
}

fn planned_task(prompt: &str) -> (Task, JobSpec) {
    let mut o = opts(Mode::Sequential);
    o.llm_planner = true;
    o.prompt = prompt.into();
    o.task_type = "bug_fix".into();
    let p = plan("bug_fix", prompt, None, None).unwrap();
    let (task, actions) = new_task(TaskId::new(), o, p, 0).unwrap();
    let spec = published(&actions).remove(0);
    (task, spec)
}

#[test]
fn the_planner_agent_plans_the_rest_of_the_task() {
    let (mut task, planner) = planned_task("fix the crash");
    assert_eq!(planner.kind, JobKind::Plan);
    assert_eq!(planner.role, Role::Planner);
    assert!(
        planner.prompt.contains("Complexity rubric") && planner.prompt.ends_with("fix the crash")
    );
    let answer = r#"```json
{"complexity":"medium","rationale":"r","workflow":[{"agent_role":"ANALYST","scope":"look"},{"agent_role":"BUILDER","scope":"fix","depends_on":[0]}],"skip_reasoning":"s"}
```"#;
    let actions = on_result(&mut task, &result(&planner, Outcome::Success, answer), 1).unwrap();
    let next = published(&actions);
    assert_eq!(roles(&next), vec![Role::Analyst]);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Index(ids) if ids.len() == 2))
    );
    assert_eq!(task.plan_source, "llm");
    assert_eq!(task.plan.complexity.as_deref(), Some("medium"));
    assert_eq!(
        task.jobs[1].depends_on,
        vec![0],
        "roots wait for the planner"
    );
    assert_eq!(task.jobs[2].depends_on, vec![1]);
    assert_eq!(task.jobs[1].prompt, "look: fix the crash");
    let b = published(&on_result(&mut task, &ok(&next[0]), 2).unwrap());
    on_result(&mut task, &ok(&b[0]), 3).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.cost_usd, 0.75, "the planner's cost is counted");
}

#[test]
fn an_invalid_plan_falls_back_to_the_rules() {
    let (mut task, planner) = planned_task("fix a simple typo");
    let answer = r#"{"workflow":[{"agent_role":"BUILDER","depends_on":[1]},{"agent_role":"TESTER","depends_on":[0]}]}"#;
    let actions = on_result(&mut task, &result(&planner, Outcome::Success, answer), 1).unwrap();
    let rejected = actions.iter().find_map(|a| match a {
        Action::Emit(None, EventKind::TaskPlanned { rejected, .. }) => rejected.clone(),
        _ => None,
    });
    assert!(rejected.unwrap().contains("cycle"));
    assert_eq!(task.plan_source, "simple_fix (planner fallback)");
    assert_eq!(roles(&published(&actions)), vec![Role::Builder]);
}

#[test]
fn a_failed_planner_falls_back_without_failing_the_task() {
    let (mut task, planner) = planned_task("fix a simple typo");
    task.options.max_attempts = 1;
    let actions = on_result(&mut task, &fail(&planner, FailureReason::Overloaded), 1).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::DeadLetter(_))));
    let b = published(&actions);
    assert_eq!(roles(&b), vec![Role::Builder]);
    assert!(b[0].context.is_none());
    let t = published(&on_result(&mut task, &ok(&b[0]), 2).unwrap());
    on_result(&mut task, &ok(&t[0]), 3).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
}

#[test]
fn a_git_task_gives_each_job_its_branch_and_its_parents_branches_in_plan_order() {
    let p = user_plan(
        r#"{"steps":[{"role":"analyst"},{"role":"builder","depends_on":[0]},{"role":"documenter","depends_on":[0]},{"role":"reviewer","depends_on":[2,1]}]}"#,
    );
    let mut o = opts(Mode::Sequential);
    o.workspace = Workspace::Git {
        url: "/srv/repo.git".into(),
        base_ref: "main".into(),
        job: None,
    };
    let (mut task, actions) = new_task(TaskId::from_u128(7), o, p, 0).unwrap();
    let t = task.id;
    let git = |s: &JobSpec| match &s.workspace {
        Workspace::Git { url, base_ref, job } => {
            assert_eq!((url.as_str(), base_ref.as_str()), ("/srv/repo.git", "main"));
            job.clone().expect("each job gets its git part")
        }
        w => panic!("not a git workspace: {w:?}"),
    };
    let a = published(&actions);
    let ga = git(&a[0]);
    assert_eq!(ga.branch, format!("orch/jobs/{t}/01-analyst"));
    assert!(ga.start.is_empty(), "the first step starts from the ref");
    assert_eq!(ga.task_branch, format!("orch/{t}"));
    let bc = published(&on_result(&mut task, &ok(&a[0]), 1).unwrap());
    for s in &bc {
        assert_eq!(git(s).start, [format!("orch/jobs/{t}/01-analyst")]);
    }
    on_result(&mut task, &ok(&bc[0]), 2).unwrap();
    let d = published(&on_result(&mut task, &ok(&bc[1]), 3).unwrap());
    assert_eq!(
        git(&d[0]).start,
        [
            format!("orch/jobs/{t}/02-builder"),
            format!("orch/jobs/{t}/03-documenter")
        ],
        "parents in plan order, whatever order depends_on lists them in"
    );
    assert_eq!(task.branch, None, "no branch before the end");
    on_result(&mut task, &ok(&d[0]), 4).unwrap();
    assert_eq!(task.branch, Some(format!("orch/{t}")));
}

fn git_task(plan_json: &str) -> (Task, Vec<Action>) {
    let mut o = opts(Mode::Parallel);
    o.workspace = Workspace::Git {
        url: "/srv/repo.git".into(),
        base_ref: "main".into(),
        job: None,
    };
    new_task(TaskId::from_u128(9), o, user_plan(plan_json), 0).unwrap()
}

fn git_of(s: &JobSpec) -> GitJob {
    match &s.workspace {
        Workspace::Git { job: Some(j), .. } => j.clone(),
        w => panic!("not a git job: {w:?}"),
    }
}

/// A successful result whose branch did (or did not) merge into the task branch.
fn pushed(spec: &JobSpec, merged: bool, conflicts: &[&str]) -> JobResult {
    JobResult {
        git: Some(orch_shared::job::GitOutcome {
            branch: git_of(spec).branch,
            commit: "c0ffee".into(),
            base: "base".into(),
            merged,
            conflicts: conflicts.iter().map(|c| c.to_string()).collect(),
        }),
        ..ok(spec)
    }
}

#[test]
fn a_branch_that_does_not_merge_gets_an_integrator_that_its_dependents_wait_for() {
    let (mut task, actions) = git_task(
        r#"{"steps":[{"role":"builder"},{"role":"builder"},{"role":"tester","depends_on":[1]}]}"#,
    );
    let t = task.id;
    let started = published(&actions);
    assert_eq!(roles(&started), [Role::Builder, Role::Builder]);
    // The first merges; the second conflicts with it.
    assert!(
        published(&on_result(&mut task, &pushed(&started[0], true, &[]), 1).unwrap()).is_empty()
    );
    let actions = on_result(&mut task, &pushed(&started[1], false, &["src/lib.rs"]), 2).unwrap();
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Emit(None, EventKind::TaskPlanned { source, steps, .. })
            if source == "integrator" && steps.len() == 1 && steps[0].role == Role::Integrator
    )));
    let next = published(&actions);
    assert_eq!(roles(&next), [Role::Integrator], "the tester waits for it");
    let integrator = &task.jobs[3];
    assert_eq!(integrator.depends_on, [1]);
    assert_eq!(task.jobs[2].depends_on, [1, 3]);
    assert!(next[0].prompt.contains("src/lib.rs"), "{}", next[0].prompt);
    let gi = git_of(&next[0]);
    assert!(gi.integrate);
    assert_eq!(
        gi.start,
        [format!("orch/{t}"), format!("orch/jobs/{t}/02-builder")],
        "the task branch, with the branch that did not merge merged into it"
    );
    assert_eq!(gi.branch, format!("orch/jobs/{t}/04-integrator"));
    // Once it merged, the tester starts from both.
    let tester = published(&on_result(&mut task, &pushed(&next[0], true, &[]), 3).unwrap());
    assert_eq!(roles(&tester), [Role::Tester]);
    assert!(!git_of(&tester[0]).integrate);
    assert_eq!(
        git_of(&tester[0]).start,
        [
            format!("orch/jobs/{t}/02-builder"),
            format!("orch/jobs/{t}/04-integrator")
        ]
    );
    on_result(&mut task, &pushed(&tester[0], true, &[]), 4).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
}

#[test]
fn integrators_are_capped_per_task() {
    let (mut task, actions) = git_task(r#"{"steps":[{"role":"builder"}]}"#);
    let mut spec = published(&actions).remove(0);
    for n in 0..MAX_INTEGRATORS {
        let next =
            published(&on_result(&mut task, &pushed(&spec, false, &["a"]), n as u64).unwrap());
        assert_eq!(roles(&next), [Role::Integrator]);
        spec = next[0].clone();
    }
    let last = on_result(&mut task, &pushed(&spec, false, &["a"]), 99).unwrap();
    assert!(published(&last).is_empty());
    assert_eq!(
        task.status,
        TaskStatus::Completed,
        "the conflict stays reported"
    );
}

#[test]
fn a_dry_run_shows_an_integrator_only_for_parallel_writers_in_a_repository() {
    let (task, _) = git_task(
        r#"{"steps":[{"role":"analyst"},{"role":"builder","depends_on":[0]},{"role":"documenter","depends_on":[0]},{"role":"reviewer","depends_on":[1,2]}]}"#,
    );
    let i = possible_integrator(&task).expect("builder and documenter run side by side");
    assert_eq!(
        (i.role, i.step, i.depends_on.clone()),
        (Role::Integrator, 4, vec![1, 2])
    );
    let (chain, _) = git_task(
        r#"{"steps":[{"role":"builder"},{"role":"tester","depends_on":[0]},{"role":"reviewer"}]}"#,
    );
    assert_eq!(
        possible_integrator(&chain),
        None,
        "one writer after the other"
    );
    let p = user_plan(r#"{"steps":[{"role":"builder"},{"role":"tester"}]}"#);
    let (scratch, _) = new_task(TaskId::new(), opts(Mode::Parallel), p, 0).unwrap();
    assert_eq!(possible_integrator(&scratch), None, "no branches, no merge");
}

#[test]
fn send_continues_the_latest_turn_and_reopens_the_task() {
    let p = plan("auto", "build a parser", Some(&[Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let first = published(&actions);
    let builder = first[0].job_id;
    // Still running: nothing to continue yet.
    assert!(matches!(
        latest_turn(&task, builder),
        Err(TurnError::Busy { .. })
    ));
    on_result(&mut task, &ok(&first[0]), 5).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);

    let second = JobId::new();
    let actions = add_turn(&mut task, builder, second, "now add tests", false, 10).unwrap();
    assert_eq!(task.status, TaskStatus::Running, "the task reopens");
    assert_eq!(task.finished_at_ms, None);
    let spec = &published(&actions)[0];
    assert_eq!(spec.job_id, second);
    assert_eq!(spec.role, Role::Builder);
    assert_eq!(spec.prompt, "now add tests");
    assert_eq!(
        spec.session,
        Some(SessionRef {
            from: builder,
            fork: false,
            checkpoint: None,
        })
    );
    assert!(actions.contains(&Action::Index(vec![second])));
    // While the second turn runs, a send to the first is refused and names the busy turn.
    match latest_turn(&task, builder) {
        Err(TurnError::Busy { latest, .. }) => assert_eq!(latest, second),
        other => panic!("expected busy, got {other:?}"),
    }
    assert!(add_turn(&mut task, builder, JobId::new(), "again", false, 11).is_err());
    on_result(&mut task, &ok(spec), 20).unwrap();
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.jobs.len(), 2);
    // A send to the first agent now continues the second turn.
    assert_eq!(latest_turn(&task, builder).unwrap(), second);
    let err = add_turn(&mut task, builder, JobId::new(), "x", false, 21).unwrap_err();
    assert!(matches!(err, TurnError::Busy { latest, .. } if latest == second));
}

#[test]
fn fork_starts_a_new_conversation_from_any_finished_turn() {
    let p = plan("auto", "build a parser", Some(&[Role::Builder]), None).unwrap();
    let (mut task, actions) = task_with(Mode::Sequential, p, |_| {});
    let first = published(&actions);
    let original = first[0].job_id;
    on_result(&mut task, &ok(&first[0]), 5).unwrap();
    let (a, b) = (JobId::new(), JobId::new());
    let fa = published(&add_turn(&mut task, original, a, "approach A", true, 6).unwrap());
    let fb = published(&add_turn(&mut task, original, b, "approach B", true, 6).unwrap());
    assert_eq!(fa.len() + fb.len(), 2, "both forks run at once");
    for (spec, id) in [(&fa[0], a), (&fb[0], b)] {
        assert_eq!(spec.job_id, id);
        assert_eq!(
            spec.session,
            Some(SessionRef {
                from: original,
                fork: true,
                checkpoint: None,
            })
        );
    }
    // Forks do not continue the original: a send still goes to it.
    assert_eq!(latest_turn(&task, original).unwrap(), original);
    // A fork of a failed agent is refused.
    on_result(&mut task, &fail(&fa[0], FailureReason::BadRequest), 7).unwrap();
    assert!(matches!(
        add_turn(&mut task, a, JobId::new(), "again", true, 8),
        Err(TurnError::NotContinuable(..))
    ));
    assert!(matches!(
        add_turn(&mut task, JobId::new(), JobId::new(), "x", true, 8),
        Err(TurnError::NoJob(_))
    ));
}

#[test]
fn a_failed_check_is_blamed_on_the_agent_whose_files_its_output_names() {
    let (mut task, _) = git_task(r#"{"steps":[{"role":"builder"},{"role":"tester"}]}"#);
    let files = [
        vec!["src/parse.rs".to_string()],
        vec!["tests/cli.rs".to_string()],
    ];
    for (i, f) in files.into_iter().enumerate() {
        let j = &mut task.jobs[i];
        j.status = JobStatus::Succeeded;
        j.files_written = f;
        j.finished_at_ms = Some(10 + i as u64);
    }
    assert_eq!(blame(&task, "error[E0308]: src/parse.rs:10:5"), Some(0));
    assert_eq!(
        blame(&task, "panicked at cli.rs:3"),
        Some(1),
        "a bare file name counts"
    );
    assert_eq!(
        blame(&task, "2 tests failed"),
        Some(1),
        "named by none: the last to finish"
    );
    task.jobs[1].files_written.clear();
    assert_eq!(
        blame(&task, "tests/cli.rs failed"),
        Some(0),
        "only agents that changed files"
    );
}
