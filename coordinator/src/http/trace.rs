//! The server span of an API request, when traces are exported: named after the route, a
//! child of the caller's `traceparent` header when it sends one (a standby forwarding a write
//! sends its own span's), so a submit is the root (or a link) of its task's trace.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use orch_config::telemetry;
use tracing::Instrument;

pub(super) async fn span(req: Request, next: Next) -> Response {
    if !telemetry::enabled() {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let incoming = req
        .headers()
        .get(telemetry::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok());
    telemetry::set_parent(&span, incoming);
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
