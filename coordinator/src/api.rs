//! The HTTP API (`/v1/...`, health, metrics). Handlers validate input into typed values, call
//! the planner, [`State`] and [`Transport`], and answer JSON; every error is `{code, message}`
//! with the field at fault named in the message.

use crate::driver::{self, Control, ControlError};
use crate::metrics as m;
use crate::pipeline::{self, TaskOptions, TurnError};
use crate::planner;
use crate::state::{Created, State};
use crate::transport::{self, Transport};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use backon::Retryable;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use orch_shared::api::{
    AgentMessage, AgentTurn, DeadLetterEntry, DeadLetterList, DryRun, Estimate, EstimateSource,
    ExecutionOptions, Readiness, StepEstimate, SubmitTask, Task, TaskType, WorkerList,
};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::{JobId, TaskId};
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
    /// Set once this replica leads (only the leader dispatches and takes writes).
    pub effects: Arc<std::sync::OnceLock<driver::Effects>>,
    pub leader: tokio::sync::watch::Receiver<bool>,
    pub state: State,
    pub transport: Transport,
    pub tokens: Arc<Tokens>,
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
}

impl App {
    /// What writes need. A standby forwards writes to the leader before they get here, so
    /// this fails only while no replica leads (an election in progress).
    fn effects(&self) -> Answer<&driver::Effects> {
        self.effects.get().filter(|_| self.leads()).ok_or_else(|| {
            Failure(ApiError::new(
                ErrorCode::Unavailable,
                "no coordinator leads right now (an election is in progress); retry in a few seconds",
            ))
        })
    }

    fn leads(&self) -> bool {
        *self.leader.borrow() && self.effects.get().is_some()
    }
}

/// Writes that reach a standby are answered by the leader: the request goes over NATS, the
/// leader runs it through its own router and the answer comes back unchanged. Reads are
/// served locally (every replica reads the same Redis and JetStream).
async fn forward_writes(AxumState(app): AxumState<App>, req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::GET || app.leads() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return Failure(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("body: larger than the limit of {MAX_BODY_BYTES} bytes"),
            ))
            .into_response();
        }
    };
    let forwarded = crate::transport::Forwarded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| {
                matches!(name.as_str(), "authorization" | "content-type" | "cookie")
                    || name.as_str() == crate::web::CSRF_HEADER
            })
            .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
    };
    // During an election (or the first second of a cluster) nobody answers yet: keep asking
    // for a few seconds rather than failing the write.
    let ask = || app.transport.ask_leader(&forwarded);
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(35),
        ask.retry(
            backon::ConstantBuilder::default()
                .with_delay(std::time::Duration::from_millis(200))
                .with_max_times(40),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(crate::transport::Error::Read {
            what: "the leader's answer".into(),
            source: "timed out".into(),
        })
    });
    match answer {
        Ok(reply) => {
            let mut response = Response::new(axum::body::Body::from(reply.body));
            *response.status_mut() =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(ct) = reply
                .content_type
                .and_then(|c| header::HeaderValue::from_str(&c).ok())
            {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not forward a write to the leader");
            Failure(ApiError::new(
                ErrorCode::Unavailable,
                "no coordinator leads right now (an election is in progress); retry in a few seconds",
            ))
            .into_response()
        }
    }
}

/// Answers forwarded writes with `router` (the leader's own), until `cancel`.
pub async fn serve_forwarded(
    app: App,
    cancel: CancellationToken,
) -> Result<(), crate::transport::Error> {
    use tower::ServiceExt;
    let mut sub = app.transport.forwarded().await?;
    let router = router(app.clone());
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (router, transport) = (router.clone(), app.transport.clone());
        tokio::spawn(async move {
            let answer = match serde_json::from_slice::<crate::transport::Forwarded>(&msg.payload) {
                Ok(f) => {
                    let mut builder = axum::http::Request::builder()
                        .method(f.method.as_str())
                        .uri(f.path.as_str());
                    for (n, v) in &f.headers {
                        builder = builder.header(n.as_str(), v.as_str());
                    }
                    match builder.body(axum::body::Body::from(f.body)) {
                        Ok(req) => match router.oneshot(req).await {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let content_type = resp
                                    .headers()
                                    .get(header::CONTENT_TYPE)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string);
                                let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
                                    .await
                                    .map(|b| b.to_vec())
                                    .unwrap_or_default();
                                crate::transport::ForwardedReply {
                                    status,
                                    content_type,
                                    body,
                                }
                            }
                            Err(never) => match never {},
                        },
                        Err(_) => bad_forward(),
                    }
                }
                Err(_) => bad_forward(),
            };
            transport.answer(reply_to, &answer).await;
        });
    }
}

fn bad_forward() -> crate::transport::ForwardedReply {
    crate::transport::ForwardedReply {
        status: 400,
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&ApiError::new(
            ErrorCode::MalformedBody,
            "body: unreadable forwarded request",
        ))
        .unwrap_or_default(),
    }
}

/// The accepted bearer tokens: admin tokens see everything; a tenant's token sees only the
/// tasks it submitted and no cluster-wide view.
#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<(String, Option<String>)>,
}

/// Who is calling, as the auth middleware found out (a request extension).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// `None`: an admin (or authentication is off).
    pub tenant: Option<String>,
}

impl Tokens {
    pub fn new(admin: &[String], tenants: &[(String, String)]) -> Self {
        let mut entries: Vec<(String, Option<String>)> =
            admin.iter().map(|t| (t.clone(), None)).collect();
        entries.extend(
            tenants
                .iter()
                .map(|(name, t)| (t.clone(), Some(name.clone()))),
        );
        Self { entries }
    }

    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a presented token stands for. Every token is compared, in constant time,
    /// without stopping early, so timing tells nothing about which one matched.
    pub fn check(&self, presented: &str) -> Option<Caller> {
        let mut found = None;
        for (token, tenant) in &self.entries {
            if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(Caller {
                    tenant: tenant.clone(),
                });
            }
        }
        found
    }
}

/// What a tenant's token may reach under `/v1`.
enum Scope {
    /// Its own tasks only (submit, list — filtered —, dry runs, task types).
    Open,
    Task(String),
    Agent(String),
    AdminOnly,
}

fn tenant_scope(path: &str) -> Scope {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "tasks"] | ["v1", "tasks", "dry-run"] | ["v1", "task-types"] => Scope::Open,
        ["v1", "tasks", id, ..] => Scope::Task(id.to_string()),
        ["v1", "agents", id, ..] => Scope::Agent(id.to_string()),
        _ => Scope::AdminOnly,
    }
}

/// Keeps a tenant to its own tasks: another tenant's task is "not found", never "forbidden",
/// so ids of other tenants' tasks are not confirmed.
async fn tenant_allows(app: &App, tenant: &str, path: &str) -> Result<(), Failure> {
    let task_id = match tenant_scope(path) {
        Scope::Open => return Ok(()),
        Scope::AdminOnly => {
            return Err(Failure(ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint for a tenant's token (cluster-wide views need an admin token)",
            )));
        }
        Scope::Task(id) => match id.parse::<TaskId>() {
            Ok(id) => id,
            Err(_) => return Ok(()), // the handler names the malformed id
        },
        Scope::Agent(id) => match id.parse::<JobId>() {
            Ok(job) => match app.state.task_of_job(job).await? {
                Some(task) => task,
                None => return Ok(()), // the handler says it is not found
            },
            Err(_) => return Ok(()),
        },
    };
    match app.state.load_task(task_id).await? {
        Some(task) if task.tenant.as_deref() != Some(tenant) => Err(Failure(ApiError::new(
            ErrorCode::NotFound,
            format!("task {task_id} not found"),
        ))),
        _ => Ok(()),
    }
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

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NoTask(_) | ControlError::NoJob(..) | ControlError::NotDead(_) => {
                Failure(ApiError::new(ErrorCode::NotFound, e.to_string()))
            }
            ControlError::Turn(TurnError::NoJob(_)) => {
                Failure(ApiError::new(ErrorCode::NotFound, e.to_string()))
            }
            ControlError::Turn(_) => Failure(ApiError::new(ErrorCode::Conflict, e.to_string())),
            ControlError::State(e) => e.into(),
            ControlError::Transport(e) => e.into(),
            ControlError::Closed => Failure(ApiError::new(
                ErrorCode::Unavailable,
                "the coordinator is shutting down; try again",
            )),
        }
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
        .route("/v1/tasks/dry-run", post(dry_run))
        .route("/v1/tasks/{id}/events", get(events))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/agents/{id}/kill", post(kill))
        .route("/v1/agents/{id}/send", post(send))
        .route("/v1/agents/{id}/fork", post(fork))
        .route("/v1/dlq", get(dead_letters))
        .route("/v1/dlq/{id}/retry", post(retry_dead))
        .route("/v1/workers", get(workers))
        .route("/v1/task-types", get(task_types))
        .merge(crate::history::routes())
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(middleware::from_fn_with_state(app.clone(), forward_writes));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .merge(crate::web::routes())
        .fallback(|| async { Failure(ApiError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Requires `Authorization: Bearer <token>` matching a configured token (constant-time), or the
/// web dashboard's session cookie holding one (an `EventSource` cannot send headers). A request
/// authenticated by the cookie that changes something must also carry the header
/// [`crate::web::CSRF_HEADER`]: another site can make a browser send the cookie (were it not
/// `SameSite=Strict`), never a custom header.
async fn authenticate(AxumState(app): AxumState<App>, mut req: Request, next: Next) -> Response {
    if app.tokens.is_open() {
        req.extensions_mut().insert(Caller::default());
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let caller = match bearer {
        Some(presented) => match app.tokens.check(&presented) {
            Some(caller) => caller,
            None => {
                return Failure(ApiError::new(
                    ErrorCode::Unauthorized,
                    "invalid bearer token",
                ))
                .into_response();
            }
        },
        // The dashboard's session cookie (an `EventSource` cannot send headers). A request
        // authenticated by the cookie that changes something must also carry the header
        // [`crate::web::CSRF_HEADER`], which another site cannot make a browser send.
        None => match crate::web::session_token(req.headers()) {
            Some(cookie) => {
                let safe = req.method() == axum::http::Method::GET
                    || req.headers().contains_key(crate::web::CSRF_HEADER);
                match app.tokens.check(&cookie) {
                    Some(caller) if safe => caller,
                    _ => {
                        return Failure(ApiError::new(
                            ErrorCode::Unauthorized,
                            "invalid or expired session: log in again",
                        ))
                        .into_response();
                    }
                }
            }
            None => {
                return Failure(ApiError::new(
                    ErrorCode::Unauthorized,
                    "missing bearer token: send `Authorization: Bearer <token>`",
                ))
                .into_response();
            }
        },
    };
    if let Some(tenant) = &caller.tenant
        && let Err(refused) = tenant_allows(&app, tenant, req.uri().path()).await
    {
        return refused.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Whether `presented` is one of the configured tokens (any, when none is configured), in
/// constant time.
pub(crate) fn token_ok(app: &App, presented: &str) -> bool {
    app.tokens.is_open() || app.tokens.check(presented).is_some()
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
        } else if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            // Valid JSON that serde reports as a syntax error: a value of the wrong kind for
            // an enum field (a number for `mode`, say).
            Failure(ApiError::new(
                ErrorCode::InvalidField,
                f("not one of the accepted values".into()),
            ))
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
    };
    // Every backend is accepted: the worker that runs the job checks its own settings (a
    // missing key or CLI fails that job with the reason).
    let backend: Backend = req.backend.unwrap_or_default();
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return Err(ApiError::field("idempotency_key", "must be 1 to 256 characters").into());
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
            workspace,
            sim,
            idempotency_key: req.idempotency_key,
            execution,
            llm_planner,
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

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &str,
    value: Option<T>,
    min: T,
    max: T,
) -> Answer<Option<T>> {
    match value {
        Some(v) if v < min || v > max => {
            Err(ApiError::field(field, format!("must be between {min} and {max}")).into())
        }
        v => Ok(v),
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

async fn submit(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<Task>)> {
    let req: SubmitTask = parse_body(body)?;
    let (mut opts, plan) = validate(req)?;
    let tenant = caller.and_then(|c| c.0.tenant);
    // Idempotency keys are per tenant: one tenant's key never returns another's task.
    if let (Some(t), Some(key)) = (&tenant, &opts.idempotency_key) {
        opts.idempotency_key = Some(format!("{t}/{key}"));
    }
    let (mut task, actions) = pipeline::new_task(TaskId::new(), opts, plan, orch_shared::now_ms())
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    task.tenant = tenant;
    let fx = app.effects()?;
    if task.idempotency_key.is_none() && !fx.admission.enabled() {
        create_and_publish(&app.state, fx, &task, actions).await?;
        return Ok((StatusCode::CREATED, axum::Json(task)));
    }
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
            // The record is stored with its first jobs marked queued; if this publish fails the
            // coordinator publishes them again when it restarts (same message ids).
            fx.perform(&task, actions).await?;
            accepted(&task);
            Ok((StatusCode::CREATED, axum::Json(task)))
        }
    }
}

fn accepted(task: &Task) {
    metrics::counter!(m::TASKS_SUBMITTED).increment(1);
    tracing::info!(task_id = %task.id, jobs = task.jobs.len(), plan = %task.plan_source, "task accepted");
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

/// The filters, sort and cursor of `GET /v1/tasks` (see [`crate::history::list_tasks`]).
type ListParams = crate::history::ListParams;

async fn list(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Answer<Response> {
    let Query(params) = params
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("query: {}", e.body_text())))?;
    let tenant = caller.and_then(|c| c.0.tenant);
    crate::history::list_tasks(&app, params, tenant).await
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
    let after = crate::history::last_event_id(&headers)?;
    let stored = app.transport.task_events(task.id, after).await?;
    // Ends right after the task's latest end, without waiting for another event (a task
    // reopened by a send has earlier ends in its log).
    let ended = std::sync::Arc::new(crate::history::task_end(&task));
    let stream = futures::stream::unfold((Box::pin(stored), false), move |(mut stored, done)| {
        let ended = ended.clone();
        async move {
            if done {
                return None;
            }
            let e = stored.next().await?;
            let last = ended(&e.event);
            Some((e, (stored, last)))
        }
    })
    .map(|e| Ok::<_, Infallible>(crate::history::sse_event(&e)))
    .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

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
async fn send(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<(StatusCode, axum::Json<AgentTurn>)> {
    turn(app, id, body, false).await
}

/// `POST /v1/agents/{id}/fork`: a new agent with the same history, taking the message as its
/// next turn; the original can still be continued.
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
        let backend = task.backend.as_str();
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
        }),
    ))
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqParams {
    limit: Option<usize>,
}

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

/// Blended list price per token for a planner's token estimate (mostly input, some output).
const PLANNER_PRICE_PER_TOKEN: f64 = 5.4 / 1_000_000.0;

async fn dry_run(
    AxumState(app): AxumState<App>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<axum::Json<DryRun>> {
    let req: SubmitTask = parse_body(body)?;
    let (mut opts, plan) = validate(req)?;
    // A dry run never calls a planner agent (that would cost money): it shows the rules' plan.
    opts.llm_planner = false;
    let mode = opts.mode;
    let (task, _) = pipeline::new_task(TaskId::new(), opts, plan, orch_shared::now_ms())
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let model = task.model.clone().unwrap_or_else(|| "default".into());
    let mut steps = Vec::new();
    for job in &task.jobs {
        let estimate = match app.state.job_stats(job.role.as_str(), &model).await? {
            Some(s) => Estimate {
                source: EstimateSource::History,
                samples: s.samples,
                cost_usd_p50: s.cost_usd.0,
                cost_usd_p90: s.cost_usd.1,
                duration_ms_p50: Some(s.duration_ms.0),
                duration_ms_p90: Some(s.duration_ms.1),
            },
            None => match job.estimated_tokens {
                Some(t) => Estimate {
                    source: EstimateSource::Planner,
                    samples: 0,
                    cost_usd_p50: t as f64 * PLANNER_PRICE_PER_TOKEN,
                    cost_usd_p90: t as f64 * PLANNER_PRICE_PER_TOKEN,
                    duration_ms_p50: None,
                    duration_ms_p90: None,
                },
                None => Estimate {
                    source: EstimateSource::None,
                    samples: 0,
                    cost_usd_p50: 0.0,
                    cost_usd_p90: 0.0,
                    duration_ms_p50: None,
                    duration_ms_p90: None,
                },
            },
        };
        steps.push(StepEstimate {
            step: job.step,
            role: job.role,
            depends_on: job.depends_on.clone(),
            instruction: job.prompt.clone(),
            estimate,
        });
    }
    let total = total_estimate(&steps);
    Ok(axum::Json(DryRun {
        plan_source: task.plan_source,
        mode,
        plan: task.plan,
        steps,
        total,
    }))
}

/// Costs add up; durations follow the longest dependency path (steps are in topological
/// order: a step only depends on earlier ones or the plan was rejected).
fn total_estimate(steps: &[StepEstimate]) -> Estimate {
    let mut finish: Vec<(Option<u64>, Option<u64>)> = vec![(Some(0), Some(0)); steps.len()];
    let order = topological(steps);
    for &i in &order {
        let s = &steps[i];
        let start = s.depends_on.iter().fold((Some(0), Some(0)), |acc, &p| {
            let f = finish[p as usize];
            (max_opt(acc.0, f.0), max_opt(acc.1, f.1))
        });
        finish[i] = (
            start.0.zip(s.estimate.duration_ms_p50).map(|(a, b)| a + b),
            start.1.zip(s.estimate.duration_ms_p90).map(|(a, b)| a + b),
        );
    }
    let sources: Vec<EstimateSource> = steps.iter().map(|s| s.estimate.source).collect();
    let source = if sources.iter().all(|s| *s == EstimateSource::History) {
        EstimateSource::History
    } else if sources.contains(&EstimateSource::None) {
        EstimateSource::None
    } else {
        EstimateSource::Planner
    };
    Estimate {
        source,
        samples: steps.iter().map(|s| s.estimate.samples).min().unwrap_or(0),
        cost_usd_p50: steps.iter().map(|s| s.estimate.cost_usd_p50).sum(),
        cost_usd_p90: steps.iter().map(|s| s.estimate.cost_usd_p90).sum(),
        duration_ms_p50: finish
            .iter()
            .map(|f| f.0)
            .try_fold(0, |m, f| f.map(|f| m.max(f))),
        duration_ms_p90: finish
            .iter()
            .map(|f| f.1)
            .try_fold(0, |m, f| f.map(|f| m.max(f))),
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.zip(b).map(|(a, b)| a.max(b))
}

/// Steps ordered so that every step comes after the steps it depends on.
fn topological(steps: &[StepEstimate]) -> Vec<usize> {
    let mut done = vec![false; steps.len()];
    let mut order = Vec::with_capacity(steps.len());
    while order.len() < steps.len() {
        let before = order.len();
        for (i, s) in steps.iter().enumerate() {
            if !done[i] && s.depends_on.iter().all(|&p| done[p as usize]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            break; // a cycle; new_task rejects those, so this cannot happen
        }
    }
    order
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
    let leader = app.leads();
    // Every replica takes traffic: a standby serves reads and forwards writes to the leader.
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
            leader,
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
        assert_eq!(plan.spec.steps.len(), 2);
    }
}
