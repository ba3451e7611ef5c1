//! Changing running work: cancel a task, kill an agent, send it a message, fork it or rewind
//! it to a checkpoint, and the dead-letter queue (list, retry).

use super::answer::{Answer, in_range, parse_body, parse_id};
use super::app::App;
use crate::driver::{Control, ControlError};
use crate::pipeline;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State as AxumState};
use axum::http::StatusCode;
use orch_shared::api::{
    AgentMessage, AgentRewind, AgentTurn, DeadLetterEntry, DeadLetterList, Task,
};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::{JobId, TaskId};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(cancel))
        .routes(routes!(kill))
        .routes(routes!(send))
        .routes(routes!(fork))
        .routes(routes!(rewind))
        .routes(routes!(dead_letters))
        .routes(routes!(retry_dead))
}

/// Cancel a task: its running agents are stopped and nothing more is dispatched.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/cancel",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id (a UUID).")),
    responses((status = 200, description = "The task, cancelled (or already finished).", body = Task))
)]
async fn cancel(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> Answer<axum::Json<Task>> {
    let id = parse_id(&id)?;
    Ok(axum::Json(
        app.effects()?.driver.control(id, Control::Cancel).await?,
    ))
}

/// The task of an agent (job), or 404.
async fn task_of(app: &App, id: &str) -> Answer<(JobId, TaskId)> {
    let job: JobId = id
        .parse()
        .map_err(|e: orch_shared::ids::IdError| ApiError::field("id", e))?;
    let task = app
        .state
        .task_of_job(job)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("agent {job} not found")))?;
    Ok((job, task))
}

/// Stop one agent; the task goes on as its failure policy says.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/kill",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    responses((status = 200, description = "The agent's task.", body = Task))
)]
async fn kill(AxumState(app): AxumState<App>, Path(id): Path<String>) -> Answer<axum::Json<Task>> {
    let (job, task) = task_of(&app, &id).await?;
    Ok(axum::Json(
        app.effects()?
            .driver
            .control(task, Control::Kill(job))
            .await?,
    ))
}

/// `POST /v1/agents/{id}/send`: the next turn of the agent's conversation (its latest turn,
/// if it was continued already), on whichever worker pulls it.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/send",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    request_body = AgentMessage,
    responses(
        (status = 202, description = "The new turn was queued.", body = AgentTurn),
        (status = 409, description = "The agent has no stored session to continue, or its turn cannot be continued now (`conflict`).", body = ApiError),
    )
)]
async fn send(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<AgentTurn>)> {
    turn(app, id, body, false).await
}

/// `POST /v1/agents/{id}/fork`: a new agent with the same history, taking the message as its
/// next turn; the original can still be continued.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/fork",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    request_body = AgentMessage,
    responses(
        (status = 202, description = "The forked turn was queued.", body = AgentTurn),
        (status = 409, description = "The agent has no stored session to continue (`conflict`).", body = ApiError),
    )
)]
async fn fork(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<AgentTurn>)> {
    turn(app, id, body, true).await
}

/// Longest message `send` and `fork` take.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

async fn turn(
    app: App,
    id: String,
    body: Result<Bytes, BytesRejection>,
    fork: bool,
) -> Answer<(StatusCode, axum::Json<AgentTurn>)> {
    let (agent, task_id) = task_of(&app, &id).await?;
    let req: AgentMessage = parse_body(body)?;
    let message = req.message.trim();
    if message.is_empty() {
        return Err(ApiError::field("message", "must not be empty").into());
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::field("message", "must be at most 256 KiB").into());
    }
    let task =
        app.state.load_task(task_id).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("task {task_id} not found"))
        })?;
    let from = if fork {
        agent
    } else {
        pipeline::latest_turn(&task, agent).map_err(ControlError::from)?
    };
    // The worker stores a session after each successful turn of a backend that keeps one.
    if !app.state.has_session(from).await? {
        let role = task.jobs.iter().find(|j| j.id == from).map(|j| j.role);
        let backend = role.map_or(task.backend, |r| task.backend_of(r)).as_str();
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "agent {from} has no stored session to continue (backend {backend}: the command backend keeps none; a session too large to store is not kept)"
            ),
        )
        .into());
    }
    let new = JobId::new();
    app.effects()?
        .driver
        .control(
            task_id,
            Control::Turn {
                from,
                new,
                message: message.to_string(),
                fork,
            },
        )
        .await?;
    tracing::info!(%task_id, %from, agent_id = %new, fork, "agent turn added");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(AgentTurn {
            task_id,
            agent_id: new,
            from,
            fork,
            rewound_to: None,
        }),
    ))
}

/// `POST /v1/agents/{id}/rewind`: a new agent that starts from the agent's checkpoint after
/// step `to` (its conversation and its working tree, restored on whichever worker pulls it)
/// and takes `message` as its next turn. An agent still running is stopped first.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/rewind",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    request_body = AgentRewind,
    responses(
        (status = 202, description = "The rewound agent was queued.", body = AgentTurn),
        (status = 400, description = "`to` or `message` is invalid (`invalid_field`).", body = ApiError),
        (status = 404, description = "No such agent, or no checkpoint of it after step `to` (`not_found`).", body = ApiError),
        (status = 409, description = "The agent is a planner (`conflict`).", body = ApiError),
    )
)]
async fn rewind(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<AgentTurn>)> {
    let (from, task_id) = task_of(&app, &id).await?;
    let req: AgentRewind = parse_body(body)?;
    if req.to == 0 {
        return Err(ApiError::field("to", "must be a step of the agent (1 or more)").into());
    }
    let message = match req.message.as_deref().map(str::trim) {
        None => rewind_message(req.to),
        Some("") => return Err(ApiError::field("message", "must not be empty").into()),
        Some(m) if m.len() > MAX_MESSAGE_BYTES => {
            return Err(ApiError::field("message", "must be at most 256 KiB").into());
        }
        Some(m) => m.to_string(),
    };
    let kept = app.state.checkpoints(from).await?;
    if !kept.iter().any(|c| c.step == req.to) {
        let steps: Vec<String> = kept.iter().map(|c| c.step.to_string()).collect();
        let kept = match steps.is_empty() {
            true => "none is kept".to_string(),
            false => format!("steps kept: {}", steps.join(", ")),
        };
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "to: agent {from} has no checkpoint after step {}; {kept}",
                req.to
            ),
        )
        .into());
    }
    let new = JobId::new();
    app.effects()?
        .driver
        .control(
            task_id,
            Control::Rewind {
                from,
                new,
                step: req.to,
                message,
            },
        )
        .await?;
    tracing::info!(%task_id, %from, agent_id = %new, step = req.to, "agent rewound");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(AgentTurn {
            task_id,
            agent_id: new,
            from,
            fork: true,
            rewound_to: Some(req.to),
        }),
    ))
}

/// What a rewound agent is told when the user gives no message.
fn rewind_message(step: u32) -> String {
    format!(
        "Your work was rewound to the end of step {step}: the conversation and the files are as \
         they were then, and what you did after it is undone. Continue the task from here."
    )
}

/// Run a dead-lettered agent again.
#[utoipa::path(
    post,
    path = "/v1/dlq/{id}/retry",
    tag = "cluster",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    responses((status = 200, description = "The agent's task.", body = Task))
)]
async fn retry_dead(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> Answer<axum::Json<Task>> {
    let (job, task) = task_of(&app, &id).await?;
    Ok(axum::Json(
        app.effects()?
            .driver
            .control(task, Control::RetryDead(job))
            .await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DlqParams {
    /// Most entries (1 to 1000, default 100).
    limit: Option<usize>,
}

/// Jobs that failed for good, newest first.
#[utoipa::path(
    get,
    path = "/v1/dlq",
    tag = "cluster",
    params(DlqParams),
    responses((status = 200, description = "The dead letters.", body = DeadLetterList))
)]
async fn dead_letters(
    AxumState(app): AxumState<App>,
    params: Result<Query<DlqParams>, QueryRejection>,
) -> Answer<axum::Json<DeadLetterList>> {
    let Query(params) = params
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("query: {}", e.body_text())))?;
    let limit = in_range("limit", params.limit, 1, 1000)?.unwrap_or(100);
    let mut jobs = Vec::new();
    for dead in app.state.dead_letters(limit).await? {
        let Some(task) = app.state.load_task(dead.task_id).await? else {
            continue;
        };
        if let Some(job) = task.jobs.iter().find(|j| j.id == dead.job_id) {
            jobs.push(DeadLetterEntry {
                job_id: job.id,
                task_id: task.id,
                role: job.role,
                attempt: job.attempt,
                error: job.error.clone(),
                dead_at_ms: dead.at_ms,
            });
        }
    }
    Ok(axum::Json(DeadLetterList { jobs }))
}
