//! Standby to leader: a standby forwards the writes it receives to the leader over NATS and
//! answers with the leader's answer; the leader runs them through its own router.
//!
//! A forward is sent again only when no coordinator listened ([`transport::Error::NoLeader`]:
//! an election in progress), never after the leader took it (it may have applied it). Each
//! forward carries an id, and the leader remembers its answer in Redis for a few minutes
//! ([`State::claim_forward`]), so a repeat of it gets the first answer and never runs twice.

use super::answer::{Failure, MAX_BODY_BYTES};
use super::app::App;
use super::auth::CSRF_HEADER;
use crate::state::{ForwardClaim, State};
use crate::transport::{self, Forwarded, ForwardedReply, ForwardedWrite, Transport};
use axum::Router;
use axum::extract::{Request, State as AxumState};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backon::Retryable;
use futures::StreamExt;
use orch_shared::error::{ApiError, ErrorCode};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a standby keeps asking while no coordinator leads (an election takes ~6 s).
const NO_LEADER_PATIENCE: Duration = Duration::from_secs(8);
/// How long the leader waits for another delivery of the same forward to finish.
const REPEAT_PATIENCE: Duration = Duration::from_secs(30);
/// Largest answer the leader sends back.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// The request headers the leader needs (auth, body type, the dashboard's CSRF header).
const FORWARDED_HEADERS: [&str; 6] = [
    "authorization",
    "content-type",
    "cookie",
    CSRF_HEADER,
    "x-hub-signature-256",
    "x-github-event",
];

/// Writes that reach a standby are answered by the leader: the request goes over NATS, the
/// leader runs it through its own router and the answer comes back unchanged. Reads are
/// served locally (every replica reads the same Redis and JetStream). Runs after
/// authentication, so a request without a valid token never reaches the leader.
pub(super) async fn forward_writes(
    AxumState(app): AxumState<App>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() == axum::http::Method::GET || app.leads() {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return Failure(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("body: larger than the limit of {MAX_BODY_BYTES} bytes"),
        ))
        .into_response();
    };
    let forwarded = Forwarded {
        id: uuid::Uuid::new_v4().to_string(),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
        headers: parts
            .headers
            .iter()
            .filter(|(name, _)| FORWARDED_HEADERS.contains(&name.as_str()))
            .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
            // This request's span, so the leader's joins the caller's trace.
            .chain(
                orch_config::telemetry::traceparent(&tracing::Span::current())
                    .map(|tp| (orch_config::telemetry::TRACEPARENT_HEADER.to_string(), tp)),
            )
            .collect(),
        body: body.to_vec(),
    };
    match ask_leader(&app.transport, &forwarded).await {
        Ok(reply) => into_response(reply),
        Err(transport::Error::LeaderTimeout(waited)) => {
            tracing::warn!(?waited, forward = %forwarded.id, "the leader did not answer a forwarded write in time");
            Failure(ApiError::new(
                ErrorCode::Unavailable,
                format!("the leading coordinator did not answer within {}s; the write may have been applied: look before you retry it", waited.as_secs()),
            ))
            .into_response()
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

/// Asks the leader, again while no coordinator listens (the request reached nobody, so it
/// cannot have been applied), for up to [`NO_LEADER_PATIENCE`]; any other error ends it.
async fn ask_leader(
    transport: &Transport,
    forwarded: &Forwarded,
) -> Result<ForwardedReply, transport::Error> {
    let every = Duration::from_millis(200);
    let times = (NO_LEADER_PATIENCE.as_millis() / every.as_millis()) as usize;
    (|| transport.ask_leader(forwarded))
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(every)
                .with_max_times(times),
        )
        .when(|e| matches!(e, transport::Error::NoLeader))
        .await
}

fn into_response(reply: ForwardedReply) -> Response {
    let mut response = Response::new(axum::body::Body::from(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Some(ct) = reply
        .content_type
        .and_then(|c| header::HeaderValue::from_str(&c).ok())
    {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

/// Answers forwarded writes with `router` (the leader's own, which authenticates them again),
/// until `cancel`. Each runs on `tracker`, so shutdown waits for the ones in hand.
pub async fn serve_forwarded(
    app: App,
    router: Router,
    tracker: TaskTracker,
    cancel: CancellationToken,
) -> Result<(), transport::Error> {
    let mut writes = Box::pin(app.transport.forwarded().await?);
    loop {
        let write = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            w = writes.next() => match w { Some(w) => w, None => return Ok(()) },
        };
        let (router, state, transport) = (router.clone(), app.state.clone(), app.transport.clone());
        tracker.spawn(async move {
            let ForwardedWrite { request, reply_to } = write;
            let reply = match request {
                Some(f) => answer_once(&router, &state, f).await,
                None => failure_reply(Failure(ApiError::new(
                    ErrorCode::MalformedBody,
                    "body: unreadable forwarded request",
                ))),
            };
            transport.answer(reply_to, &reply).await;
        });
    }
}

/// Runs a forwarded write unless it ran before (then answers as the first time).
async fn answer_once(router: &Router, state: &State, f: Forwarded) -> ForwardedReply {
    let deadline = tokio::time::Instant::now() + REPEAT_PATIENCE;
    loop {
        match state.claim_forward::<ForwardedReply>(&f.id).await {
            Ok(ForwardClaim::First) => break,
            Ok(ForwardClaim::Answered(reply)) => return reply,
            Ok(ForwardClaim::Running) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(ForwardClaim::Running) => {
                return failure_reply(Failure(ApiError::new(
                    ErrorCode::Unavailable,
                    "this write is still running on the leader; look before you retry it",
                )));
            }
            Err(e) => return failure_reply(e.into()),
        }
    }
    let id = f.id.clone();
    let reply = run(router, f).await;
    if let Err(e) = state.remember_forward(&id, &reply).await {
        tracing::warn!(error = %e, forward = %id, "could not remember a forwarded write's answer");
    }
    reply
}

async fn run(router: &Router, f: Forwarded) -> ForwardedReply {
    use tower::ServiceExt;
    let mut builder = axum::http::Request::builder()
        .method(f.method.as_str())
        .uri(f.path.as_str());
    for (n, v) in &f.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    let req = match builder.body(axum::body::Body::from(f.body)) {
        Ok(req) => req,
        Err(_) => {
            return failure_reply(Failure(ApiError::new(
                ErrorCode::MalformedBody,
                "body: unreadable forwarded request",
            )));
        }
    };
    let response = match router.clone().oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    reply_of(response).await
}

async fn reply_of(response: Response) -> ForwardedReply {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    ForwardedReply {
        status,
        content_type,
        body,
    }
}

/// An error answer made here (not by the router): a status and the `{code, message}` body.
fn failure_reply(Failure(error): Failure) -> ForwardedReply {
    ForwardedReply {
        status: error.code.http_status(),
        content_type: Some("application/json".into()),
        body: serde_json::to_vec(&error).unwrap_or_default(),
    }
}
