//! The HTTP API (`/v1/...`, health, metrics). Handlers validate input into typed values, call
//! the planner, [`State`] and [`Transport`], and answer JSON; every error is `{code, message}`
//! with the field at fault named in the message.

use crate::driver;
use crate::metrics as m;
use crate::pipeline::{self, TaskOptions};
use crate::planner;
use crate::state::{Created, State};
use crate::transport::{self, Transport};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use orch_shared::api::{Readiness, SubmitTask, Task, TaskList, TaskSummary, TaskType, WorkerList};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::TaskId;
use orch_shared::job::{Backend, SimParams, Workspace};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest accepted prompt, in characters.
const MAX_PROMPT_CHARS: usize = 200_000;
/// A worker missing heartbeats for this long is no longer listed.
const WORKER_MAX_AGE: Duration = Duration::from_secs(15);

/// What every handler can reach.
#[derive(Clone)]
pub struct App {
    pub state: State,
    pub transport: Transport,
    pub tokens: Arc<Vec<String>>,
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
}

/// An error answer: status from the code, body `{code, message}`.
pub struct Failure(ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl From<crate::state::Error> for Failure {
    fn from(e: crate::state::Error) -> Self {
        tracing::error!(error = %e, "storage error");
        Failure(ApiError::new(
            ErrorCode::Unavailable,
            "task storage (Redis) is unavailable; try again",
        ))
    }
}

impl From<transport::Error> for Failure {
    fn from(e: transport::Error) -> Self {
        tracing::error!(error = %e, "messaging error");
        Failure(ApiError::new(
            ErrorCode::Unavailable,
            "job queue (NATS) is unavailable; try again",
        ))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = self.0.code;
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        metrics::counter!(m::HTTP_ERRORS, "code" => status.as_str().to_string()).increment(1);
        (status, axum::Json(self.0)).into_response()
    }
}

type Answer<T> = Result<T, Failure>;

pub fn router(app: App) -> Router {
    let v1 = Router::new()
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/{id}", get(show))
        .route("/v1/tasks/{id}/events", get(events))
        .route("/v1/workers", get(workers))
        .route("/v1/task-types", get(task_types))
        .layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { Failure(ApiError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Requires `Authorization: Bearer <token>` matching a configured token (constant-time).
async fn authenticate(AxumState(app): AxumState<App>, req: Request, next: Next) -> Response {
    if app.tokens.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Failure(ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token: send `Authorization: Bearer <token>`",
        ))
        .into_response();
    };
    // Compare against every token without stopping early, so timing tells nothing.
    let mut ok = subtle::Choice::from(0);
    for token in app.tokens.iter() {
        ok |= presented.as_bytes().ct_eq(token.as_bytes());
    }
    if bool::from(ok) {
        next.run(req).await
    } else {
        Failure(ApiError::new(
            ErrorCode::Unauthorized,
            "invalid bearer token",
        ))
        .into_response()
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Answer<T> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("body: larger than the limit of {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                ErrorCode::MalformedBody,
                format!("body: {}", rejection.body_text()),
            )
        }
    })?;
    // serde would also read a struct from a JSON array (by position); only objects are bodies.
    if let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace())
        && *first != b'{'
    {
        return Err(ApiError::new(ErrorCode::InvalidField, "body: expected a JSON object").into());
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let f = |msg: String| {
            if path == "." || path.is_empty() {
                format!("body: {msg}")
            } else {
                format!("{path}: {msg}")
            }
        };
        if inner.is_data() {
            // serde_json appends " at line L column C"; the field path already says where.
            let text = inner.to_string();
            let text = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(m, _)| m);
            Failure(ApiError::new(ErrorCode::InvalidField, f(text.to_string())))
        } else {
            Failure(ApiError::new(
                ErrorCode::MalformedBody,
                format!("body: not valid JSON: {inner}"),
            ))
        }
    })
}

fn parse_id(id: &str) -> Answer<TaskId> {
    id.parse()
        .map_err(|e: orch_shared::ids::IdError| ApiError::field("id", e).into())
}

/// Checks a submit request and turns it into task options and a plan.
fn validate(req: SubmitTask) -> Answer<(TaskOptions, planner::Plan)> {
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
    let plan = planner::plan(&task_type, &prompt, req.roles.as_deref())
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let backend = req.backend.unwrap_or_default();
    if backend != Backend::Sim {
        return Err(ApiError::field(
            "backend",
            format!(
                "`{}` is not available in this version (available: sim)",
                backend.as_str()
            ),
        )
        .into());
    }
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(ApiError::field("idempotency_key", "must be 1 to 256 characters").into());
    }
    let sim = req.sim.unwrap_or_default();
    validate_sim(&sim)?;
    let workspace = match req.workspace {
        None => Workspace::Scratch,
        Some(path) if path.starts_with('/') => Workspace::Local { path },
        Some(_) => return Err(ApiError::field("workspace", "must be an absolute path").into()),
    };
    let task_type = if req.roles.is_some() {
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
            workspace,
            sim,
            idempotency_key: req.idempotency_key,
        },
        plan,
    ))
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

async fn submit(
    AxumState(app): AxumState<App>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<Task>)> {
    let req: SubmitTask = parse_body(body)?;
    let (opts, plan) = validate(req)?;
    let (task, actions) = pipeline::new_task(TaskId::new(), opts, plan, orch_shared::now_ms());
    match app.state.create_task(&task).await? {
        Created::Existing(id) => {
            let existing = app.state.load_task(id).await?.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("task {id} is missing its record"),
                )
            })?;
            Ok((StatusCode::OK, axum::Json(existing)))
        }
        Created::New => {
            metrics::counter!(m::TASKS_SUBMITTED).increment(1);
            // The record is stored with its first jobs marked queued; if this publish fails the
            // coordinator publishes them again when it restarts (same message ids).
            driver::perform(&app.transport, task.id, actions).await?;
            tracing::info!(task_id = %task.id, jobs = task.jobs.len(), plan = %task.plan_source, "task accepted");
            Ok((StatusCode::CREATED, axum::Json(task)))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    before: Option<String>,
}

async fn list(
    AxumState(app): AxumState<App>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Answer<axum::Json<TaskList>> {
    let Query(params) = params
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("query: {}", e.body_text())))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 1000").into());
    }
    let before = params
        .before
        .map(|b| {
            b.parse::<TaskId>()
                .map_err(|e| ApiError::field("before", e))
        })
        .transpose()?;
    let (tasks, next) = app.state.list_tasks(limit, before).await?;
    Ok(axum::Json(TaskList {
        tasks: tasks
            .iter()
            .map(Task::summary)
            .collect::<Vec<TaskSummary>>(),
        next_cursor: next.map(|id| id.to_string()),
    }))
}

async fn load(app: &App, id: &str) -> Answer<Task> {
    let id = parse_id(id)?;
    app.state
        .load_task(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("task {id} not found")).into())
}

async fn show(AxumState(app): AxumState<App>, Path(id): Path<String>) -> Answer<axum::Json<Task>> {
    Ok(axum::Json(load(&app, &id).await?))
}

/// The task's event log as server-sent events, from the start or after `Last-Event-ID`; the
/// stream ends after `task_finished`.
async fn events(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Answer<Response> {
    let task = load(&app, &id).await?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::field("Last-Event-ID", "expected an event id (a number)"))?,
    };
    let stored = app.transport.task_events(task.id, after).await?;
    // Ends right after the terminal event, without waiting for another one.
    let stream =
        futures::stream::unfold((Box::pin(stored), false), |(mut stored, done)| async move {
            if done {
                return None;
            }
            let e = stored.next().await?;
            let last = transport::is_last(&e.event);
            Some((e, (stored, last)))
        })
        .map(|e| {
            let data = serde_json::to_string(&e.event).unwrap_or_default();
            Ok::<_, Infallible>(
                SseEvent::default()
                    .id(e.seq.to_string())
                    .event(e.event.kind.name())
                    .data(data),
            )
        })
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

async fn workers(AxumState(app): AxumState<App>) -> Answer<axum::Json<WorkerList>> {
    let workers = app.state.workers(WORKER_MAX_AGE).await?;
    Ok(axum::Json(WorkerList { workers }))
}

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

async fn ready(AxumState(app): AxumState<App>) -> (StatusCode, axum::Json<Readiness>) {
    let nats = app.transport.is_connected();
    let redis = app.state.ping().await;
    let ready = nats && redis;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(Readiness {
            ready,
            nats,
            redis,
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
}

async fn metrics_text(AxumState(app): AxumState<App>) -> Response {
    match &app.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
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
        assert_eq!(plan.steps.len(), 2);
    }
}
