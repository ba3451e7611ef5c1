//! The worker's side of a sandbox's network: one HTTP/1 server on a unix socket
//! (`<data_dir>/sandbox/proxy.sock`) that every sandbox reaches through its bridge.
//!
//! - A model-API request (origin-form, `POST /v1/messages`) carries the job's token as its API
//!   key (`x-api-key` or `Authorization: Bearer`). An unknown token is refused (401); a known
//!   one is replaced by the real credential ([`Upstream::credential`]) and the request is
//!   forwarded to the provider, its answer streamed back as it comes (SSE unbuffered).
//! - `CONNECT host:port` (the agent's `HTTPS_PROXY`) carries the token as the proxy password;
//!   the tunnel opens only to a host the job's role allows, else 403, a `sandbox_refused`
//!   event of the job and a warning naming the job and the host.
//! - Paths under `/orch/` go to the worker's own endpoints (the approval broker's
//!   permission-prompt server, [`crate::approvals::mcp`]), which check their own tokens.
//! - Anything else (plain-HTTP proxying) is refused.

use super::Allowance;
use crate::agent::Events;
use crate::config::Secret;
use axum::body::Body;
use base64::Engine;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use orch_shared::event::EventKind;
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The largest request body forwarded (a model request with a long conversation).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// What a token lets its holder do.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The job attempt, for logs.
    pub job: String,
    pub allowance: Allowance,
    /// The pool credential of the job's run; `None`: the worker's default key.
    pub credential: Option<Secret>,
    /// The job's event sink: refusals are told there too.
    pub events: Option<Events>,
}

/// The live tokens, and the worker's own endpoints under `/orch/` (the approval broker's
/// permission-prompt server), which check their own tokens.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    tokens: Arc<Mutex<HashMap<String, Grant>>>,
    local: Arc<OnceLock<axum::Router>>,
}

impl Grants {
    pub fn insert(&self, token: String, grant: Grant) {
        if let Ok(mut m) = self.tokens.lock() {
            m.insert(token, grant);
        }
    }

    pub fn remove(&self, token: &str) {
        if let Ok(mut m) = self.tokens.lock() {
            m.remove(token);
        }
    }

    fn get(&self, token: &str) -> Option<Grant> {
        self.tokens.lock().ok()?.get(token).cloned()
    }

    /// Serves `router` for requests under `/orch/` (set once; later calls are ignored).
    pub fn serve_local(&self, router: axum::Router) {
        let _ = self.local.set(router);
    }
}

/// A fresh token: 128 random bits in hex.
pub fn new_token() -> String {
    format!("orch-sbx-{:032x}", rand::random::<u128>())
}

/// Where model requests go and with what credential.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The provider's base URL (without `/v1`).
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub client: reqwest::Client,
}

impl Upstream {
    /// The credential header for a request of `grant`'s job: the credential the limit broker
    /// gave the job's run, else the worker's default key. A subscription's OAuth token
    /// (`sk-ant-oat…`) goes as a bearer token, an API key as `x-api-key`.
    pub fn credential(&self, grant: &Grant) -> Option<(HeaderName, String)> {
        let key = grant
            .credential
            .as_ref()
            .or(self.api_key.as_ref())?
            .expose();
        Some(if key.starts_with("sk-ant-oat") {
            (header::AUTHORIZATION, format!("Bearer {key}"))
        } else {
            (HeaderName::from_static("x-api-key"), key.to_string())
        })
    }
}

/// Binds the socket (replacing a stale one left by a previous worker).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serves connections until `cancel`.
pub async fn serve(
    listener: UnixListener,
    grants: Grants,
    upstream: Upstream,
    cancel: CancellationToken,
) {
    let upstream = Arc::new(upstream);
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "sandbox proxy: accept failed");
                    continue;
                }
            },
        };
        let (grants, upstream, cancel) = (grants.clone(), upstream.clone(), cancel.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (grants, upstream) = (grants.clone(), upstream.clone());
                async move { Ok::<_, Infallible>(handle(req, &grants, &upstream).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

fn refuse(status: StatusCode, kind: &str, message: String) -> Response<Body> {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

async fn handle(req: Request<Incoming>, grants: &Grants, upstream: &Upstream) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return connect(req, grants);
    }
    if req.uri().scheme().is_some() {
        return refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            "the sandbox proxy forwards plain HTTP only to the model API; use HTTPS (CONNECT) to an allowed host".into(),
        );
    }
    if req.uri().path().starts_with("/orch/") {
        let Some(router) = grants.local.get() else {
            return refuse(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "this worker serves nothing here".into(),
            );
        };
        return match router.clone().oneshot(req.map(Body::new)).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    let token = header_str(&req, "x-api-key")
        .map(str::to_string)
        .or_else(|| {
            header_str(&req, "authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .map(str::to_string)
        });
    let Some(grant) = token.as_deref().and_then(|t| grants.get(t)) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "the sandbox proxy does not know this token (the job has ended, or it is not a job's)"
                .into(),
        );
    };
    forward(req, &grant, upstream).await
}

fn header_str<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Hop-by-hop and credential headers, never forwarded.
fn dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "connection"
            | "keep-alive"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "x-api-key"
            | "authorization"
    )
}

async fn forward(req: Request<Incoming>, grant: &Grant, upstream: &Upstream) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(Body::new(body), MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("failed to read the request: {e}"),
            );
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", upstream.base_url.trim_end_matches('/'));
    let mut out = upstream.client.request(parts.method, &url).body(body);
    for (name, value) in &parts.headers {
        if !dropped(name) {
            out = out.header(name, value);
        }
    }
    if let Some((name, value)) = upstream.credential(grant) {
        out = out.header(name, value);
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(job = %grant.job, error = %e, "sandbox proxy: the model API is unreachable");
            return refuse(
                StatusCode::BAD_GATEWAY,
                "api_error",
                format!("the model API is unreachable: {e}"),
            );
        }
    };
    let mut back = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !dropped(name) {
            back = back.header(name, value);
        }
    }
    back.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_default()
}

/// The token in a `Proxy-Authorization: Basic` header (the password).
fn proxy_token(req: &Request<Incoming>) -> Option<String> {
    let b64 = header_str(req, "proxy-authorization")?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let pair = String::from_utf8(raw).ok()?;
    pair.split_once(':').map(|(_, t)| t.to_string())
}

fn connect(req: Request<Incoming>, grants: &Grants) -> Response<Body> {
    let Some(grant) = proxy_token(&req).and_then(|t| grants.get(&t)) else {
        let mut r = refuse(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "authentication_error",
            "the sandbox proxy needs the job's token".into(),
        );
        r.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"orch\""),
        );
        return r;
    };
    let Some(authority) = req.uri().authority().cloned() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "CONNECT needs host:port".into(),
        );
    };
    let (host, port) = (
        authority.host().to_string(),
        authority.port_u16().unwrap_or(443),
    );
    if !grant.allowance.allows(&host, port) {
        tracing::warn!(job = %grant.job, target = %format!("{host}:{port}"), "sandbox: refused a connection (not in the role's allowed hosts)");
        if let Some(events) = &grant.events {
            events.send(EventKind::SandboxRefused {
                target: format!("{host}:{port}"),
            });
        }
        return refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            format!("the sandbox refused {host}:{port}: not in the role's allowed hosts"),
        );
    }
    tracing::info!(job = %grant.job, target = %format!("{host}:{port}"), "sandbox: tunnel opened");
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "sandbox proxy: upgrade failed");
                return;
            }
        };
        match tokio::net::TcpStream::connect((host.as_str(), port)).await {
            Ok(mut remote) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut remote).await;
            }
            Err(e) => {
                tracing::info!(target = %format!("{host}:{port}"), error = %e, "sandbox proxy: tunnel target unreachable")
            }
        }
    });
    Response::new(Body::empty())
}
