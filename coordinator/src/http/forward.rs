//! Standby to leader: a standby forwards the writes it receives to the leader over NATS and
//! answers with the leader's answer.

use super::answer::{Failure, MAX_BODY_BYTES};
use super::app::App;
use super::auth::CSRF_HEADER;
use axum::Router;
use axum::extract::{Request, State as AxumState};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use backon::Retryable;
use futures::StreamExt;
use orch_shared::error::{ApiError, ErrorCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Writes that reach a standby are answered by the leader: the request goes over NATS, the
/// leader runs it through its own router and the answer comes back unchanged. Reads are
/// served locally (every replica reads the same Redis and JetStream).
pub(super) async fn forward_writes(
    AxumState(app): AxumState<App>,
    req: Request,
    next: Next,
) -> Response {
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
                    || name.as_str() == CSRF_HEADER
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
    router: Router,
    tracker: TaskTracker,
    cancel: CancellationToken,
) -> Result<(), crate::transport::Error> {
    use tower::ServiceExt;
    let mut sub = app.transport.forwarded().await?;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (router, transport) = (router.clone(), app.transport.clone());
        tracker.spawn(async move {
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
