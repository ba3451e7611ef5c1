//! A typed client for the coordinator's HTTP API.
//!
//! Every method returns [`Error`] (`client::Error`, the CLI's "ClientError"), which keeps apart what callers
//! treat differently: an [`ApiError`] the server chose to send, a refused token, a server that is
//! not there, and everything else.

use orch_shared::api::{
    AgentMessage, AgentRewind, AgentTurn, DeadLetterList, DryRun, Readiness, SubmitTask, Task,
    TaskList, TaskType, WorkerList,
};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::event::EventId;
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::{
    AgentDetail, AgentList, CleanReport, CleanRequest, ClusterStatus, CostReport, ExportWhat,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// How long one ordinary request may take (the event stream has no overall limit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body (`{code, message}`).
    #[error("{error}")]
    Api { status: u16, error: ApiError },
    /// The server refused the token (HTTP 401); `hint` says where the token came from.
    #[error("{hint}")]
    Unauthorized { hint: String },
    /// Nothing answered at `url`.
    #[error(
        "could not connect to the coordinator at {url} (is it running? start a local cluster with `orchctl local up`)"
    )]
    Connect { url: String },
    #[error("request to {url} timed out")]
    Timeout { url: String },
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// An error status without an [`ApiError`] body (a proxy, a crash page).
    #[error("unexpected response from {url}: HTTP {status}{}", body_suffix(body))]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("unexpected response body from {url}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

fn body_suffix(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        String::new()
    } else {
        let mut short: String = body.chars().take(200).collect();
        if short.len() < body.len() {
            short.push('…');
        }
        format!(": {}", short.replace('\n', " "))
    }
}

impl Error {
    /// Whether the server said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { status, error } if *status == 404 || error.code == ErrorCode::NotFound)
    }

    /// Whether the server refused because of the resource's state (HTTP 409).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Api { status, error } if *status == 409 || error.code == ErrorCode::Conflict)
    }

    /// Whether trying again later can help (the connection dropped, the server is restarting or
    /// briefly unavailable).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Http { .. } => true,
            Error::Api { status, .. } | Error::Status { status, .. } => *status >= 500,
            Error::Unauthorized { .. } | Error::Decode { .. } => false,
        }
    }
}

/// Turns an error status and its body into an [`Error`].
pub fn error_from_response(url: &str, status: u16, body: &str, auth_hint: &str) -> Error {
    if status == 401 {
        return Error::Unauthorized {
            hint: auth_hint.to_string(),
        };
    }
    match serde_json::from_str::<ApiError>(body) {
        Ok(error) => Error::Api { status, error },
        Err(_) => Error::Status {
            url: url.to_string(),
            status,
            body: body.to_string(),
        },
    }
}

/// The reply to a submit: the task, and whether this call created it (201) or an earlier submit
/// with the same idempotency key did (200).
#[derive(Debug)]
pub struct Submitted {
    pub task: Task,
    pub created: bool,
}

/// A cheap, cloneable handle on one coordinator.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Base URL without a trailing slash.
    server: String,
    token: Option<String>,
    auth_hint: String,
}

impl Client {
    /// `server` must already be normalized (see `config::normalize_server`).
    pub fn new(server: &str, token: Option<String>) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("orchctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Http {
                url: server.to_string(),
                source,
            })?;
        Ok(Self {
            http,
            server: server.trim_end_matches('/').to_string(),
            token,
            auth_hint: format!("the coordinator at {server} refused the token"),
        })
    }

    /// Sets what a 401 tells the user (where the token came from, how to fix it).
    pub fn with_auth_hint(mut self, hint: impl Into<String>) -> Self {
        self.auth_hint = hint.into();
        self
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    fn transport_error(&self, url: &str, source: reqwest::Error) -> Error {
        if source.is_connect() {
            Error::Connect {
                url: self.server.clone(),
            }
        } else if source.is_timeout() {
            Error::Timeout {
                url: url.to_string(),
            }
        } else {
            Error::Http {
                url: url.to_string(),
                source,
            }
        }
    }

    /// Sends a request and returns the response if its status is a success.
    async fn send(
        &self,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let resp = req.send().await.map_err(|e| self.transport_error(url, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(error_from_response(
            url,
            status.as_u16(),
            &body,
            &self.auth_hint,
        ))
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<T, Error> {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(url, e))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
            url: url.to_string(),
            source,
        })
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, Error> {
        let url = self.url(path);
        let req = self
            .authorized(self.http.get(&url))
            .query(query)
            .timeout(REQUEST_TIMEOUT);
        let resp = self.send(&url, req).await?;
        self.decode(&url, resp).await
    }

    /// `POST /v1/mcp`: one JSON-RPC message; its answers (none for a notification; the data
    /// of each event when the coordinator answers with a stream).
    pub async fn mcp(&self, message: String) -> Result<Vec<String>, Error> {
        let url = self.url("/v1/mcp");
        let req = self
            .authorized(self.http.post(&url))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(message);
        let resp = self.send(&url, req).await?;
        let sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport_error(&url, e))?;
        Ok(if sse {
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
                .collect()
        } else if text.trim().is_empty() {
            vec![]
        } else {
            vec![text.trim().to_string()]
        })
    }

    /// `POST /v1/tasks`.
    pub async fn submit(&self, task: &SubmitTask) -> Result<Submitted, Error> {
        let url = self.url("/v1/tasks");
        let req = self
            .authorized(self.http.post(&url))
            .json(task)
            .timeout(REQUEST_TIMEOUT);
        let resp = self.send(&url, req).await?;
        let created = resp.status() == StatusCode::CREATED;
        let task = self.decode(&url, resp).await?;
        Ok(Submitted { task, created })
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let url = self.url(path);
        let mut req = self
            .authorized(self.http.post(&url))
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = self.send(&url, req).await?;
        self.decode(&url, resp).await
    }

    /// `POST /v1/tasks/dry-run`.
    pub async fn dry_run(&self, task: &SubmitTask) -> Result<DryRun, Error> {
        self.post("/v1/tasks/dry-run", Some(task)).await
    }

    /// `POST /v1/tasks/{id}/cancel`.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, Error> {
        self.post::<(), _>(&format!("/v1/tasks/{id}/cancel"), None)
            .await
    }

    /// `POST /v1/agents/{id}/kill`.
    pub async fn kill(&self, id: JobId) -> Result<Task, Error> {
        self.post::<(), _>(&format!("/v1/agents/{id}/kill"), None)
            .await
    }

    /// `POST /v1/agents/{id}/send` or `/fork`.
    pub async fn agent_turn(
        &self,
        id: JobId,
        message: &AgentMessage,
        fork: bool,
    ) -> Result<AgentTurn, Error> {
        let verb = if fork { "fork" } else { "send" };
        self.post(&format!("/v1/agents/{id}/{verb}"), Some(message))
            .await
    }

    /// `POST /v1/agents/{id}/rewind`.
    pub async fn agent_rewind(&self, id: JobId, rewind: &AgentRewind) -> Result<AgentTurn, Error> {
        self.post(&format!("/v1/agents/{id}/rewind"), Some(rewind))
            .await
    }

    /// `GET /v1/dlq`.
    pub async fn dead_letters(&self, limit: Option<u32>) -> Result<DeadLetterList, Error> {
        let query: Vec<(&str, String)> = limit
            .map(|l| ("limit", l.to_string()))
            .into_iter()
            .collect();
        self.get("/v1/dlq", &query).await
    }

    /// `POST /v1/tasks/{id}/pr/sync`.
    pub async fn pr_sync(&self, id: TaskId) -> Result<orch_shared::api::PrSync, Error> {
        self.post::<(), _>(&format!("/v1/tasks/{id}/pr/sync"), None)
            .await
    }

    /// `POST /v1/dlq/{id}/retry`.
    pub async fn retry_dead(&self, id: JobId) -> Result<Task, Error> {
        self.post::<(), _>(&format!("/v1/dlq/{id}/retry"), None)
            .await
    }

    /// `GET /v1/tasks?limit=N&before=CURSOR`.
    pub async fn list_tasks(
        &self,
        limit: Option<u32>,
        before: Option<&str>,
    ) -> Result<TaskList, Error> {
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(before) = before {
            query.push(("before", before.to_string()));
        }
        self.get("/v1/tasks", &query).await
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn task(&self, id: TaskId) -> Result<Task, Error> {
        self.get(&format!("/v1/tasks/{id}"), &[]).await
    }

    /// `GET /v1/workers`.
    pub async fn workers(&self) -> Result<WorkerList, Error> {
        self.get("/v1/workers", &[]).await
    }

    /// `GET /v1/quotas`.
    pub async fn quotas(&self) -> Result<orch_shared::api::QuotaList, Error> {
        self.get("/v1/quotas", &[]).await
    }

    /// `GET /v1/approvals`.
    pub async fn approvals(&self) -> Result<orch_shared::api::ApprovalList, Error> {
        self.get("/v1/approvals", &[]).await
    }

    /// `POST /v1/approvals/{id}`.
    pub async fn answer_approval(
        &self,
        id: &str,
        body: &orch_shared::api::AnswerApproval,
    ) -> Result<orch_shared::api::Approval, Error> {
        self.post(&format!("/v1/approvals/{id}"), Some(body)).await
    }

    /// `GET /v1/task-types`.
    pub async fn task_types(&self) -> Result<Vec<TaskType>, Error> {
        self.get("/v1/task-types", &[]).await
    }

    /// `GET /v1/tasks` with filters. Returns the page and, when the server could only sort
    /// part of the window, its note saying so.
    pub async fn search_tasks(
        &self,
        query: &[(&str, String)],
    ) -> Result<(TaskList, Option<String>), Error> {
        let url = self.url("/v1/tasks");
        let req = self
            .authorized(self.http.get(&url))
            .query(query)
            .timeout(REQUEST_TIMEOUT);
        let resp = self.send(&url, req).await?;
        let note = resp
            .headers()
            .get("x-orch-truncated")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((self.decode(&url, resp).await?, note))
    }

    /// `GET /v1/status`.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        self.get("/v1/status", &[]).await
    }

    /// `GET /v1/agents` with filters.
    pub async fn agents(&self, query: &[(&str, String)]) -> Result<AgentList, Error> {
        self.get("/v1/agents", query).await
    }

    /// `GET /v1/agents/{id}`.
    pub async fn agent(&self, id: JobId) -> Result<AgentDetail, Error> {
        self.get(&format!("/v1/agents/{id}"), &[]).await
    }

    /// `GET /v1/agents/{id}/checkpoints`.
    pub async fn agent_checkpoints(
        &self,
        id: JobId,
    ) -> Result<orch_shared::report::CheckpointList, Error> {
        self.get(&format!("/v1/agents/{id}/checkpoints"), &[]).await
    }

    /// An open server-sent-events response of `path` (no overall timeout), resuming after
    /// `last_event_id` when given.
    pub async fn sse(
        &self,
        path: &str,
        query: &[(&str, String)],
        last_event_id: Option<EventId>,
    ) -> Result<reqwest::Response, Error> {
        let url = self.url(path);
        let mut req = self
            .authorized(self.http.get(&url))
            .query(query)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(last) = last_event_id {
            req = req.header("Last-Event-ID", last.to_string());
        }
        self.send(&url, req).await
    }

    /// `GET /v1/reports/cost`.
    pub async fn cost_report(&self, query: &[(&str, String)]) -> Result<CostReport, Error> {
        self.get("/v1/reports/cost", query).await
    }

    /// `GET /v1/export`: the open response, whose body is newline-delimited JSON.
    pub async fn export(
        &self,
        what: ExportWhat,
        since: Option<u64>,
        until: Option<u64>,
    ) -> Result<reqwest::Response, Error> {
        let url = self.url("/v1/export");
        let mut query = vec![("what", what.as_str().to_string())];
        if let Some(s) = since {
            query.push(("since", s.to_string()));
        }
        if let Some(u) = until {
            query.push(("until", u.to_string()));
        }
        let req = self.authorized(self.http.get(&url)).query(&query);
        self.send(&url, req).await
    }

    /// Reads the next chunk of a streaming body (`None` at its end).
    pub async fn chunk(&self, resp: &mut reqwest::Response) -> Result<Option<bytes::Bytes>, Error> {
        let url = resp.url().to_string();
        resp.chunk()
            .await
            .map_err(|e| self.transport_error(&url, e))
    }

    /// `POST /v1/clean`.
    pub async fn clean(&self, req: &CleanRequest) -> Result<CleanReport, Error> {
        self.post("/v1/clean", Some(req)).await
    }

    /// `GET /readyz`. A not-ready coordinator answers 503 with the same body, which is returned
    /// as `Ok` with `ready: false`.
    pub async fn readiness(&self) -> Result<Readiness, Error> {
        let url = self.url("/readyz");
        let resp = self
            .http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport_error(&url, e))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&url, e))?;
        if (status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE)
            && let Ok(readiness) = serde_json::from_slice::<Readiness>(&body)
        {
            return Ok(Readiness {
                ready: readiness.ready && status.is_success(),
                ..readiness
            });
        }
        let body = String::from_utf8_lossy(&body);
        if status.is_success() {
            // A 200 whose body we do not understand still means ready.
            return Ok(Readiness {
                ready: true,
                nats: true,
                redis: true,
                leader: true,
                state: true,
                version: String::new(),
            });
        }
        Err(error_from_response(
            &url,
            status.as_u16(),
            &body,
            &self.auth_hint,
        ))
    }

    /// `GET /v1/tasks/{id}/events`, resuming after `last_event_id` when given. Returns the open
    /// response; `follow` parses its body as server-sent events.
    pub async fn events(
        &self,
        id: TaskId,
        last_event_id: Option<EventId>,
    ) -> Result<reqwest::Response, Error> {
        let url = self.url(&format!("/v1/tasks/{id}/events"));
        let mut req = self
            .authorized(self.http.get(&url))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(last) = last_event_id {
            req = req.header("Last-Event-ID", last.to_string());
        }
        self.send(&url, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_bodies_are_kept() {
        let e = error_from_response(
            "u",
            400,
            r#"{"code":"invalid_field","message":"roles: unknown role"}"#,
            "hint",
        );
        assert!(
            matches!(&e, Error::Api { status: 400, error } if error.code == ErrorCode::InvalidField)
        );
        assert_eq!(e.to_string(), "roles: unknown role");
        assert!(!e.is_not_found());
        assert!(!e.is_transient());
    }

    #[test]
    fn not_found_is_recognized() {
        let e = error_from_response(
            "u",
            404,
            r#"{"code":"not_found","message":"task x not found"}"#,
            "hint",
        );
        assert!(e.is_not_found());
    }

    #[test]
    fn unauthorized_uses_the_hint_whatever_the_body() {
        let e = error_from_response("u", 401, "nope", "set ORCH_TOKEN");
        assert!(matches!(e, Error::Unauthorized { .. }));
        assert_eq!(e.to_string(), "set ORCH_TOKEN");
    }

    #[test]
    fn other_error_bodies_are_summarized_on_one_line() {
        let e = error_from_response("http://x/v1/tasks", 502, "bad\ngateway", "h");
        assert_eq!(
            e.to_string(),
            "unexpected response from http://x/v1/tasks: HTTP 502: bad gateway"
        );
        assert!(e.is_transient());
    }
}
