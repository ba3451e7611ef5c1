//! Submitting tasks (validation, creation, first publish), showing one and the task types.

use super::answer::{Answer, Failure, in_range, parse_body, parse_id};
use super::app::App;
use super::auth::Caller;
use crate::driver;
use crate::metrics as m;
use crate::pipeline::{self, TaskOptions};
use crate::planner;
use crate::state::{Created, State};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use backon::Retryable;
use orch_shared::api::{ExecutionOptions, PullRequest, SubmitTask, Task, TaskType};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::TaskId;
use orch_shared::job::{Backend, GitJob, SimParams, Workspace};
use std::time::Duration;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(show))
        .routes(routes!(task_types))
}

/// The most MCP servers a task may declare.
const MAX_MCP_SERVERS: usize = 16;

/// Longest accepted prompt, in characters.
const MAX_PROMPT_CHARS: usize = 200_000;

/// Checks a submit request and turns it into task options and a plan.
/// Longest check command.
const MAX_CHECK_BYTES: usize = 4096;

pub(super) fn validate(req: SubmitTask) -> Answer<(TaskOptions, planner::Plan)> {
    let prompt = req.prompt.trim().to_string();
    if prompt.is_empty() {
        return Err(ApiError::field("prompt", "must not be empty").into());
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::field(
            "prompt",
            format!("longer than {MAX_PROMPT_CHARS} characters"),
        )
        .into());
    }
    let task_type = req.task_type.unwrap_or_else(|| "auto".into());
    let user_plan = req.plan.is_some();
    let llm_planner = req.planner == Some(orch_shared::api::Planner::Llm);
    if llm_planner && (user_plan || req.roles.is_some()) {
        return Err(ApiError::field(
            "planner",
            "`llm` plans the task itself; it cannot be combined with `roles` or `plan`",
        )
        .into());
    }
    let plan = planner::plan(&task_type, &prompt, req.roles.as_deref(), req.plan)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let execution = ExecutionOptions {
        on_failure: req.on_failure.unwrap_or_default(),
        max_attempts: in_range("max_attempts", req.max_attempts, 1, 20)?.unwrap_or(3),
        max_parallel: in_range("max_parallel", req.max_parallel, 1, 10_000)?,
        budget_usd: match req.budget_usd {
            Some(b) if !(b.is_finite() && b > 0.0) => {
                return Err(
                    ApiError::field("budget_usd", "must be a positive number of dollars").into(),
                );
            }
            b => b,
        },
        budget_tokens: in_range("budget_tokens", req.budget_tokens, 1, u64::MAX)?,
        job_timeout_ms: in_range(
            "job_timeout_ms",
            req.job_timeout_ms,
            100,
            7 * 24 * 3_600_000,
        )?,
        task_timeout_ms: in_range(
            "task_timeout_ms",
            req.task_timeout_ms,
            100,
            30 * 24 * 3_600_000,
        )?,
        max_turns: in_range("max_turns", req.max_turns, 1, 10_000)?,
        priority: req.priority.unwrap_or_default(),
        serialize_conflicts: req.serialize_conflicts.unwrap_or(false),
        sparse_checkout: req.sparse_checkout,
    };
    // Every backend is accepted: the worker that runs the job checks its own settings (a
    // missing key or CLI fails that job with the reason).
    let backend: Backend = req.backend.unwrap_or_default();
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(ApiError::field("idempotency_key", "must be 1 to 256 characters").into());
    }
    let models = req.models.unwrap_or_default();
    if let Some((role, _)) = models.iter().find(|(_, m)| m.trim().is_empty()) {
        return Err(
            ApiError::field(&format!("models.{}", role.as_str()), "must not be empty").into(),
        );
    }
    let sim = req.sim.unwrap_or_default();
    validate_sim(&sim)?;
    let workspace = match (req.workspace, req.repo) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "repo",
                "give either workspace (a directory) or repo (a git repository), not both",
            )
            .into());
        }
        (None, Some(url)) => Workspace::Git {
            url: validate_repo(&url)?,
            base_ref: validate_ref(req.git_ref.as_deref().unwrap_or("HEAD"))?,
            job: None,
        },
        (_, None) if req.git_ref.is_some() => {
            return Err(
                ApiError::field("ref", "needs repo: the repository it names a ref of").into(),
            );
        }
        (None, None) => Workspace::Scratch,
        (Some(path), None) if path.starts_with('/') => Workspace::Local { path },
        (Some(_), None) => {
            return Err(ApiError::field("workspace", "must be an absolute path").into());
        }
    };
    if req.sparse_checkout == Some(true) && !matches!(workspace, Workspace::Git { .. }) {
        return Err(ApiError::field(
            "sparse_checkout",
            "needs repo: only a clone of a repository can be checked out in part",
        )
        .into());
    }
    let mcp_servers = req.mcp_servers.unwrap_or_default();
    if mcp_servers.len() > MAX_MCP_SERVERS {
        return Err(
            ApiError::field("mcp_servers", format!("at most {MAX_MCP_SERVERS} servers")).into(),
        );
    }
    for (name, server) in &mcp_servers {
        if let Err(why) = server.check(name) {
            return Err(
                ApiError::new(ErrorCode::InvalidField, format!("mcp_servers.{why}")).into(),
            );
        }
        // The variable is read from the worker's environment: a task naming one could send
        // any of the worker's secrets to a server of its choosing.
        if server.bearer_token_env.is_some() {
            return Err(ApiError::field(
                &format!("mcp_servers.{name}.bearer_token_env"),
                "only a role's MCP server in the worker's configuration may name one",
            )
            .into());
        }
    }
    let check = match req.check {
        Some(c) if c.trim().is_empty() => {
            return Err(ApiError::field("check", "must not be empty").into());
        }
        Some(c) if c.len() > MAX_CHECK_BYTES => {
            return Err(
                ApiError::field("check", format!("longer than {MAX_CHECK_BYTES} bytes")).into(),
            );
        }
        Some(_) if !matches!(workspace, Workspace::Git { .. }) => {
            return Err(ApiError::field(
                "check",
                "needs repo: the check runs on the task branch of a repository",
            )
            .into());
        }
        Some(c) => Some((
            c.trim().to_string(),
            in_range("check_rounds", req.check_rounds, 1, 10)?.unwrap_or(3),
        )),
        None if req.check_rounds.is_some() => {
            return Err(ApiError::field("check_rounds", "needs check: the command to run").into());
        }
        None => None,
    };
    let task_type = if user_plan {
        "plan".into()
    } else if req.roles.is_some() {
        "custom".into()
    } else {
        task_type
    };
    Ok((
        TaskOptions {
            prompt,
            task_type,
            mode: req.mode.unwrap_or_default(),
            backend,
            model: req.model,
            backends: req.backends.unwrap_or_default(),
            models,
            workspace,
            sim,
            idempotency_key: req.idempotency_key,
            execution,
            llm_planner,
            mcp_servers,
            check,
        },
        plan,
    ))
}

/// A repository URL git can clone: a URL (`scheme://…`), an scp-like `user@host:path`, or an
/// absolute path; never something git would read as an option.
fn validate_repo(url: &str) -> Answer<String> {
    let url = url.trim();
    let bad = |why: &str| -> Failure { ApiError::field("repo", why).into() };
    if url.is_empty() {
        return Err(bad("must not be empty"));
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(
            "must be a URL or path without spaces, at most 2048 characters",
        ));
    }
    if url.starts_with('-') {
        return Err(bad("must not start with '-'"));
    }
    let scp_like = url.contains('@') && url.contains(':');
    if !(url.contains("://") || scp_like || url.starts_with('/')) {
        return Err(bad(
            "expected a URL (https://…, ssh://…, file://…), user@host:path, or an absolute path",
        ));
    }
    Ok(url.to_string())
}

/// A branch, tag or commit name as `git check-ref-format` would accept it (plus `HEAD`).
fn validate_ref(r: &str) -> Answer<String> {
    let r = r.trim();
    let ok = !r.is_empty()
        && r.len() <= 255
        && !r.starts_with('-')
        && !r.starts_with('/')
        && !r.ends_with('/')
        && !r.ends_with('.')
        && !r.ends_with(".lock")
        && !r.contains("..")
        && !r.contains("@{")
        && !r.contains("//")
        && !r.chars().any(|c| {
            c.is_control()
                || c.is_whitespace()
                || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
        });
    if ok {
        Ok(r.to_string())
    } else {
        Err(ApiError::field(
            "ref",
            "expected a branch, tag or commit name (e.g. main, v1.2, 4f2c9e1)",
        )
        .into())
    }
}

fn validate_sim(sim: &SimParams) -> Answer<()> {
    if !(0.0..=1.0).contains(&sim.fail_rate) {
        return Err(ApiError::field("sim.fail_rate", "must be between 0 and 1").into());
    }
    if sim.latency_ms > 24 * 3600 * 1000 {
        return Err(ApiError::field("sim.latency_ms", "must be at most one day").into());
    }
    Ok(())
}

/// Submit a task: it is planned into agent jobs and the first ones are dispatched.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    request_body = SubmitTask,
    responses(
        (status = 201, description = "The task was created.", body = Task),
        (status = 200, description = "A task with the same `idempotency_key` exists; it is returned.", body = Task),
    )
)]
async fn submit(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<Task>)> {
    let req: SubmitTask = parse_body(body)?;
    let req = super::forge::with_repo_config(&app, req).await?;
    let pr_request = req.pr.clone();
    let (mut opts, plan) = validate(req)?;
    // The forge is asked before anything is created, so a pull request that could never be
    // opened fails the submit rather than the finished task.
    let pr = match &pr_request {
        Some(r) => Some(super::forge::check_pr(&app, r, &opts.workspace).await?),
        None => None,
    };
    let tenant = caller.and_then(|c| c.0.tenant);
    // Idempotency keys are per tenant: one tenant's key never returns another's task.
    if let (Some(t), Some(key)) = (&tenant, &opts.idempotency_key) {
        opts.idempotency_key = Some(format!("{t}/{key}"));
    }
    let (mut task, actions) = tracing::info_span!("plan")
        .in_scope(|| pipeline::new_task(TaskId::new(), opts, plan, orch_shared::now_ms()))
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    task.tenant = tenant;
    let has_check = task.check.is_some();
    task.pr = pr.map(|pr| PullRequest {
        head: GitJob::task_branch(task.id),
        draft_while_checking: pr.draft_while_checking && has_check,
        ..pr
    });
    // The request's span (when traces are exported) is the task's: its jobs' dispatches hang
    // under it, whichever coordinator makes them.
    task.traceparent = orch_config::telemetry::traceparent(&tracing::Span::current());
    task.trace_id = task
        .traceparent
        .as_deref()
        .and_then(orch_config::telemetry::trace_id)
        .map(String::from);
    let fx = app.effects()?;
    if task.idempotency_key.is_none() && !fx.admission.enabled() {
        create_and_publish(&app.state, fx, &task, actions).await?;
        return Ok((StatusCode::CREATED, axum::Json(task)));
    }
    // Carried out in a task of its own: a client that hangs up (its timeout during an
    // election, say) cancels this handler, which must not stop between the creation and its
    // publish or its taking back (a retry would get a task that nothing runs).
    let (state, fx) = (app.state.clone(), fx.clone());
    tokio::spawn(async move { create_with_key(&state, &fx, task, actions).await })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the submit failed: {e}")))?
}

/// Creates a task with an idempotency key (or with admission on), or returns the task that
/// holds the key.
async fn create_with_key(
    state: &State,
    fx: &driver::Effects,
    task: Task,
    actions: Vec<pipeline::Action>,
) -> Answer<(StatusCode, axum::Json<Task>)> {
    if task.pr.is_some() {
        state.add_pr_pending(task.id).await?;
    }
    match state.create_task(&task).await? {
        Created::Existing(id) => {
            // A submit with the same key still publishing: its outcome is waited for (a
            // concurrent duplicate gets the task once it runs, or is told to retry when its
            // creation was taken back).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while state.pending(id).await? {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("task {id} with this idempotency_key is still being created; retry in a few seconds"),
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let Some(existing) = state.load_task(id).await? else {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "a task with this idempotency_key could not be created (its jobs were not published); retry in a few seconds",
                )
                .into());
            };
            Ok((StatusCode::OK, axum::Json(existing)))
        }
        Created::New => {
            // If the first publish fails, the creation is taken back and the submit fails
            // (503): the client's retry with the same key creates the task anew. Kept, the
            // record would be returned to that retry (200) while nothing published its jobs
            // until a coordinator restarted. A job that did go out finds no task when its
            // result comes, and the result is dropped, as for a task without a key.
            if let Err(e) = fx.perform(&task, actions).await {
                tracing::warn!(task_id = %task.id, error = %e, "first publish failed; taking the task back");
                if let Err(e) = state.uncreate_task(&task).await {
                    tracing::error!(task_id = %task.id, error = %e, "could not take the task back");
                }
                fx.driver.forget(task.id).await;
                if let Err(e) = fx.transport.purge_task(task.id).await {
                    tracing::warn!(task_id = %task.id, error = %e, "could not purge the task's log");
                }
                return Err(e.into());
            }
            if let Err(e) = state.created(task.id).await {
                // The mark expires by itself; until then a retry is told to wait.
                tracing::warn!(task_id = %task.id, error = %e, "could not mark the task created");
            }
            accepted(&task);
            Ok((StatusCode::CREATED, axum::Json(task)))
        }
    }
}

fn accepted(task: &Task) {
    metrics::counter!(m::TASKS_SUBMITTED).increment(1);
    tracing::info!(task_id = %task.id, jobs = task.jobs.len(), plan = %task.plan_source, trace_id = task.trace_id.as_deref(), "task accepted");
}

/// Writes a new task's record and publishes its first jobs at the same time: the job
/// reaches a worker without waiting for Redis (two fewer hops between processes on the
/// dispatch path). Only for a task without an idempotency key (the key decides whether the
/// task is created at all) and without admission (which publishes later anyway).
///
/// The record is queued on the state's connection before anything is published, so every
/// later save of the task (its lane's, after a job event) is executed after it (see
/// [`State::create_task`]). If the write fails, the jobs may already be on their way: the
/// record is written again, never over a newer one ([`State::ensure_task`]), for long enough
/// to ride out a Redis restart. If Redis stays unreachable longer the submit fails (503), the
/// task's lane forgets it and its log is purged: a job that ran meanwhile finds no task when
/// its result comes, and the result is dropped.
async fn create_and_publish(
    state: &State,
    fx: &driver::Effects,
    task: &Task,
    actions: Vec<pipeline::Action>,
) -> Answer<()> {
    if task.pr.is_some() {
        // Before the task exists: whichever coordinator leads when it completes opens its
        // pull request (an id without a task is dropped by the pending sweep).
        state.add_pr_pending(task.id).await?;
    }
    let (created, performed) = tokio::join!(state.create_task(task), fx.perform(task, actions));
    if let Err(e) = created {
        tracing::warn!(task_id = %task.id, error = %e, "task record not written; writing it again");
        let written = (|| state.ensure_task(task))
            .retry(
                // Long enough to ride out a Redis restart (about 5 s in all).
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(8),
            )
            .await;
        if let Err(e) = written {
            tracing::error!(task_id = %task.id, error = %e, "task record not written; the submit fails");
            // Nothing of it stays: not in its lane, not in the log (a rebuild would bring it
            // back from its creation message).
            fx.driver.forget(task.id).await;
            if let Err(e) = fx.transport.purge_task(task.id).await {
                tracing::warn!(task_id = %task.id, error = %e, "could not purge the task's log");
            }
            return Err(e.into());
        }
    }
    performed?;
    accepted(task);
    Ok(())
}

pub(super) async fn load(app: &App, id: &str) -> Answer<Task> {
    let id = parse_id(id)?;
    if let Some(task) = app.state.load_task(id).await? {
        return Ok(task);
    }
    // A Redis without the epoch marker is new or wiped: until the leader rebuilt it from the
    // log, a task missing from it may still come back, so the answer is "later", not "no".
    if app.state.epoch().await?.is_none() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "task {id} is not known yet: the state is being rebuilt from the log; try again"
            ),
        )
        .into());
    }
    Err(ApiError::new(ErrorCode::NotFound, format!("task {id} not found")).into())
}

/// A task and its jobs.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id (a UUID).")),
    responses((status = 200, description = "The task.", body = Task))
)]
async fn show(AxumState(app): AxumState<App>, Path(id): Path<String>) -> Answer<axum::Json<Task>> {
    Ok(axum::Json(load(&app, &id).await?))
}

/// The task types a submit's `task_type` accepts.
#[utoipa::path(
    get,
    path = "/v1/task-types",
    tag = "tasks",
    responses((status = 200, description = "The task types.", body = Vec<TaskType>))
)]
async fn task_types() -> axum::Json<Vec<TaskType>> {
    axum::Json(
        planner::TASK_TYPES
            .iter()
            .map(|(name, description)| TaskType {
                name: (*name).into(),
                description: (*description).into(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(json.to_string()))
    }

    fn err(json: &str) -> ApiError {
        let req = match parse_body::<SubmitTask>(body(json)) {
            Ok(req) => req,
            Err(Failure(e)) => return e,
        };
        match validate(req) {
            Ok(_) => panic!("{json} was accepted"),
            Err(Failure(e)) => e,
        }
    }

    #[test]
    fn bad_submits_name_the_field() {
        let e = err("{\"prompt\": \"\"}");
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.starts_with("prompt:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"task_type\": \"nope\"}");
        assert!(e.message.starts_with("task_type:"), "{}", e.message);

        let e = err("{\"prompt\": 5}");
        assert_eq!(e.code, ErrorCode::InvalidField);
        assert!(e.message.starts_with("prompt:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"mode\": \"sideways\"}");
        assert!(e.message.starts_with("mode:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"roles\": [\"builder\", \"scout\"]}");
        assert!(e.message.starts_with("roles[1]:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"sim\": {\"fail_rate\": 2}}");
        assert!(e.message.starts_with("sim.fail_rate:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"workspace\": \"relative/dir\"}");
        assert!(e.message.starts_with("workspace:"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"colour\": \"red\"}");
        assert!(e.message.contains("colour"), "{}", e.message);

        let e = err("{\"prompt\": \"x\", \"mcp_servers\": {\"fs\": {\"url\": \"ftp://h\"}}}");
        assert!(
            e.message.starts_with("mcp_servers.fs.url:"),
            "{}",
            e.message
        );
        let e = err("{\"prompt\": \"x\", \"mcp_servers\": {\"a__b\": {\"command\": \"x\"}}}");
        assert!(e.message.starts_with("mcp_servers.a__b:"), "{}", e.message);
        let e = err("{\"prompt\": \"x\", \"mcp_servers\": {\"fs\": {}}}");
        assert!(e.message.starts_with("mcp_servers.fs:"), "{}", e.message);
        let e = err(
            "{\"prompt\": \"x\", \"mcp_servers\": {\"docs\": {\"url\": \"https://h/mcp\", \"bearer_token_env\": \"ANTHROPIC_API_KEY\"}}}",
        );
        assert!(
            e.message.starts_with("mcp_servers.docs.bearer_token_env:"),
            "{}",
            e.message
        );
        let e = err(
            "{\"prompt\": \"x\", \"mcp_servers\": {\"docs\": {\"url\": \"https://h/mcp\", \"headers\": {\"Mcp-Session-Id\": \"s\"}}}}",
        );
        assert!(
            e.message
                .starts_with("mcp_servers.docs.headers.Mcp-Session-Id:"),
            "{}",
            e.message
        );
        let e = err("{\"prompt\": \"x\", \"mcp_servers\": {\"fs\": {\"cmd\": \"x\"}}}");
        assert!(e.message.contains("cmd"), "{}", e.message);

        let e = err("{not json");
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.starts_with("body:"), "{}", e.message);
    }

    #[test]
    fn a_good_submit_is_planned() {
        let req = parse_body::<SubmitTask>(body(
            "{\"prompt\": \" build it \", \"roles\": [\"analyst\", \"builder\"], \"mode\": \"parallel\"}",
        ))
        .ok()
        .unwrap();
        let (opts, plan) = validate(req).ok().unwrap();
        assert_eq!(opts.prompt, "build it");
        assert_eq!(opts.task_type, "custom");
        assert_eq!(plan.spec.steps.len(), 2);

        let req = parse_body::<SubmitTask>(body(
            "{\"prompt\": \"x\", \"mcp_servers\": {\"fs\": {\"command\": \"mcp-server-filesystem\", \"args\": [\".\"]}}}",
        ))
        .ok()
        .unwrap();
        let (opts, _) = validate(req).ok().unwrap();
        assert_eq!(opts.mcp_servers["fs"].args, ["."]);
    }
}
