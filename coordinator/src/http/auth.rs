//! Who may call: bearer tokens (admin or tenant), the dashboard's session cookie and its CSRF
//! header, and what a tenant's token may reach. The dashboard (`web`) signs in and out
//! through the session helpers here.

use super::answer::Failure;
use crate::state::State;
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::{JobId, TaskId};
use std::sync::Arc;
use subtle::ConstantTimeEq;

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

    /// Whether `presented` is one of the configured tokens (any, when none is configured), in
    /// constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        self.is_open() || self.check(presented).is_some()
    }

    /// Whether the request carries a valid session cookie (always, when no token is configured).
    pub fn signed_in(&self, headers: &HeaderMap) -> bool {
        self.is_open() || session_token(headers).is_some_and(|t| self.accepts(&t))
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
    /// Its own tasks only (submit, list — filtered —, dry runs, task types, MCP).
    Open,
    Task(String),
    Agent(String),
    AdminOnly,
}

fn tenant_scope(path: &str) -> Scope {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "tasks"] | ["v1", "tasks", "dry-run"] | ["v1", "task-types"] => Scope::Open,
        // The handlers keep a tenant to its own tasks' requests.
        ["v1", "approvals"] | ["v1", "approvals", _] => Scope::Open,
        // Every MCP tool is an in-process call of `/v1` with the caller's own token, which
        // passes through this gate again: a tenant's tools reach only its own tasks.
        ["v1", "mcp"] => Scope::Open,
        ["v1", "tasks", id, ..] => Scope::Task(id.to_string()),
        ["v1", "agents", id, ..] => Scope::Agent(id.to_string()),
        _ => Scope::AdminOnly,
    }
}

/// Keeps a tenant to its own tasks: another tenant's task is "not found", never "forbidden",
/// so ids of other tenants' tasks are not confirmed.
async fn tenant_allows(state: &State, tenant: &str, path: &str) -> Result<(), Failure> {
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
            Ok(job) => match state.task_of_job(job).await? {
                Some(task) => task,
                None => return Ok(()), // the handler says it is not found
            },
            Err(_) => return Ok(()),
        },
    };
    match state.load_task(task_id).await? {
        Some(task) if task.tenant.as_deref() != Some(tenant) => Err(Failure(ApiError::new(
            ErrorCode::NotFound,
            format!("task {task_id} not found"),
        ))),
        _ => Ok(()),
    }
}

/// Requires `Authorization: Bearer <token>` matching a configured token (constant-time), or the
/// web dashboard's session cookie holding one (an `EventSource` cannot send headers). A request
/// authenticated by the cookie that changes something must also carry the header
/// [`CSRF_HEADER`]: another site can make a browser send the cookie (were it not
/// `SameSite=Strict`), never a custom header.
pub async fn authenticate(
    AxumState(gate): AxumState<Gate>,
    mut req: Request,
    next: Next,
) -> Response {
    if gate.tokens.is_open() {
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
        Some(presented) => match gate.tokens.check(&presented) {
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
        // [`CSRF_HEADER`], which another site cannot make a browser send.
        None => match session_token(req.headers()) {
            Some(cookie) => {
                let safe = req.method() == axum::http::Method::GET
                    || req.headers().contains_key(CSRF_HEADER);
                match gate.tokens.check(&cookie) {
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
        && let Err(refused) = tenant_allows(&gate.state, tenant, req.uri().path()).await
    {
        return refused.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// What [`authenticate`] needs: the tokens, and the task store to keep a tenant to its tasks.
#[derive(Clone)]
pub struct Gate {
    pub tokens: Arc<Tokens>,
    pub state: State,
}

/// The session cookie's name.
pub const COOKIE: &str = "orch_session";
/// The header the dashboard sends with every `/v1` request that changes something.
pub const CSRF_HEADER: &str = "x-orch-dashboard";
/// How long a session cookie lives (seconds).
const SESSION_MAX_AGE_S: u64 = 12 * 3600;
/// The `Set-Cookie` value that ends a session.
pub const END_SESSION: &str = "orch_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0";

/// The `Set-Cookie` value of a session holding `token` (hex-encoded, so any token fits).
pub fn session_cookie(token: &str) -> String {
    format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_MAX_AGE_S}",
        hex_encode(token)
    )
}

/// The token in the request's session cookie, if it has one.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| hex_decode(value))
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn session_cookie_round_trips_any_token() {
        let token = "tök;en =,x";
        let mut headers = HeaderMap::new();
        let set = session_cookie(token);
        let value = set.split(';').next().unwrap();
        let cookie = format!("a=b; {value}; c=d");
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some(token));
    }

    #[test]
    fn malformed_session_cookie_is_no_session() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("orch_session=zz1"));
        assert_eq!(session_token(&headers), None);
    }
}
