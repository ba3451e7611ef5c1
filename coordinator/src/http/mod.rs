//! The HTTP API (`/v1/...`, health, readiness, metrics). Handlers validate input into typed
//! values, call the planner, [`crate::state::State`] and [`crate::transport::Transport`], and
//! answer JSON; every error is `{code, message}` with the field at fault named in the message.
//!
//! Layout (imports run downwards: the router at the top, [`app`] and [`answer`] at the bottom):
//! - `mod.rs`: the router, health, readiness and metrics.
//! - [`forward`]: a standby forwards writes to the leader (over NATS) and the leader answers them.
//! - [`auth`]: bearer tokens, tenants, the dashboard's session cookie and CSRF header.
//! - [`tasks`]: submit (validation, creation, first publish), show, task types.
//! - [`control`]: cancel, kill, send, fork, the dead-letter queue.
//! - [`estimate`]: dry runs priced from past runs.
//! - [`forge`]: pull requests: the submit's `pr` checks, `pr/sync`, and the forge's webhook
//!   (signed deliveries, no bearer token).
//! - [`mcp`]: the MCP server (`/v1/mcp`), whose tools call the API in-process.
//! - [`openapi`]: the OpenAPI document, built from the routes' `#[utoipa::path]` attributes.
//! - [`history`]: task and agent listings, transcripts, cluster status and event stream, cost
//!   reports, exports, clean-up.
//! - [`sse`]: server-sent event streams (framing, resume, where a task's stream ends).
//! - [`app`]: [`App`], what every handler can reach.
//! - [`answer`]: [`answer::Failure`] (error to status and body) and the input parsers.

pub mod answer;
pub mod app;
pub mod approvals;
pub mod auth;
pub mod control;
pub mod estimate;
pub mod forge;
pub mod forward;
pub mod history;
pub mod mcp;
pub mod openapi;
pub mod sse;
pub mod tasks;
mod trace;

pub use answer::MAX_BODY_BYTES;
pub use app::App;
pub use forward::serve_forwarded;

use answer::Failure;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use orch_shared::api::Readiness;
use orch_shared::error::{ApiError, ErrorCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Every route, with its OpenAPI description: `/v1` (authenticated), and the open ones
/// (health, readiness, metrics, the document itself). A route is added with
/// `.routes(routes!(handler))` on a handler with a `#[utoipa::path]` attribute, never with a
/// bare `.route(..)`: that keeps the served document complete (a test checks it).
fn api_routes() -> OpenApiRouter<App> {
    v1_routes().merge(open_routes()).merge(forge::hook_routes())
}

fn v1_routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .merge(tasks::routes())
        .merge(control::routes())
        .merge(estimate::routes())
        .merge(history::routes())
        .merge(approvals::routes())
        .merge(forge::routes())
}

fn open_routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(ready))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi::serve))
}

/// The whole HTTP surface: `/v1` (authenticated; writes on a standby go to the leader),
/// health, readiness, metrics, the OpenAPI document, and `pages` (the dashboard, which checks
/// its own session).
pub fn router(app: App, pages: Router) -> Router {
    // The last layer runs first: a request is authenticated before a standby forwards it, so
    // an unauthenticated one never reaches the leader (which checks it again).
    let gate = middleware::from_fn_with_state(
        auth::Gate {
            tokens: app.tokens.clone(),
            state: app.state.clone(),
        },
        auth::authenticate,
    );
    let (v1, _) = v1_routes()
        .layer(middleware::from_fn_with_state(
            app.clone(),
            forward::forward_writes,
        ))
        .layer(gate.clone())
        .layer(middleware::from_fn(trace::span))
        .split_for_parts();
    let api = v1.with_state(app.clone());
    // The forge's deliveries carry a signature instead of a token; a standby forwards them.
    let (hooks, _) = forge::hook_routes()
        .layer(middleware::from_fn_with_state(
            app.clone(),
            forward::forward_writes,
        ))
        .split_for_parts();
    let hooks = hooks.with_state(app.clone());
    // MCP tools call `api` with the caller's own token; the endpoint itself needs one too.
    let mcp = Router::new()
        .nest_service(mcp::PATH, mcp::service(api.clone(), app.shutdown.clone()))
        .layer(gate)
        .layer(middleware::from_fn(trace::span));
    let (open, _) = open_routes().split_for_parts();
    Router::new()
        .merge(open)
        .fallback(|| async {
            Failure::from(ApiError::new(ErrorCode::NotFound, "no such endpoint"))
        })
        .with_state(app)
        .merge(api)
        .merge(hooks)
        .merge(mcp)
        .merge(pages)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: NATS and Redis are reachable and Redis holds the cluster's state (503
/// otherwise: a Redis just wiped is not ready until the leader rebuilt it from the log);
/// whether this replica leads.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "meta",
    responses(
        (status = 200, description = "Ready to take traffic.", body = Readiness),
        (status = 503, description = "NATS or Redis is unreachable, or Redis is being rebuilt from the log.", body = Readiness),
    )
)]
async fn ready(AxumState(app): AxumState<App>) -> (StatusCode, axum::Json<Readiness>) {
    let nats = app.transport.is_connected();
    let redis = app.state.ping().await;
    let leader = app.leads();
    // The epoch marker is set by the leader once Redis holds the state (new, or rebuilt).
    let state = redis && matches!(app.state.epoch().await, Ok(Some(_)));
    // Every replica takes traffic: a standby serves reads and forwards writes to the leader.
    let ready = nats && redis && state;
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
            state,
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
}

/// `GET /metrics`: Prometheus metrics (404 when the exporter is off).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Metrics in the Prometheus text format.", body = String, content_type = "text/plain"),
        (status = 404, description = "The metrics exporter is off."),
    )
)]
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
