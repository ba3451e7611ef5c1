//! The cluster as an MCP server (`/v1/mcp`, streamable HTTP, stateless): tools to submit a
//! task, dry-run it, follow it, read an agent's result and diff, and send a follow-up.
//!
//! Every tool is a call of the HTTP API itself, made in-process on the authenticated `/v1`
//! router with the caller's own `Authorization` header: one set of validation rules, one set
//! of tenant rules, and a standby forwards writes to the leader as it does for any client. An
//! API error becomes the protocol's `invalid_params` (bad input, with the field first in the
//! message, as the API words it) or `internal_error` error.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::schemars::{self, JsonSchema};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Where the MCP endpoint is served.
pub const PATH: &str = "/v1/mcp";

/// Longest a `status` call waits for a task to end.
const MAX_WAIT_SECS: u64 = 600;

/// The streamable HTTP service; `api` is the authenticated `/v1` router the tools call.
pub fn service(
    api: Router,
    shutdown: CancellationToken,
) -> StreamableHttpService<Tools, NeverSessionManager> {
    let mut config = StreamableHttpServerConfig::default()
        // Any Host: the endpoint sits behind the API's bearer tokens, which a page rebinding
        // a DNS name to the coordinator cannot present.
        .disable_allowed_hosts()
        .with_cancellation_token(shutdown);
    // Stateless and plain JSON: any replica can answer any call, and a standby can forward it.
    config.legacy_session_mode = false;
    config.json_response = true;
    let api = Arc::new(api);
    StreamableHttpService::new(
        move || Ok(Tools::new(api.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// What a new task or a dry run takes (the API's `SubmitTask`, its most used fields).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitArgs {
    /// What the agents should do.
    pub prompt: String,
    /// The agents' roles, in order (analyst, planner, builder, tester, reviewer, documenter).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// `auto` (default) or a template family (see the API's `GET /v1/task-types`).
    #[serde(default)]
    pub task_type: Option<String>,
    /// `sequential` (default) or `parallel`.
    #[serde(default)]
    pub mode: Option<String>,
    /// `claude-code`, `anthropic`, `openai`, `command` or `sim`.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// A git repository the agents work in (a clone each).
    #[serde(default)]
    pub repo: Option<String>,
    /// The branch, tag or commit of `repo` to start from.
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    /// Most dollars the task may spend.
    #[serde(default)]
    pub budget_usd: Option<f64>,
}

impl SubmitArgs {
    fn body(&self) -> Value {
        let mut body = json!({
            "prompt": self.prompt,
            "roles": self.roles,
            "task_type": self.task_type,
            "mode": self.mode,
            "backend": self.backend,
            "model": self.model,
            "repo": self.repo,
            "ref": self.git_ref,
            "budget_usd": self.budget_usd,
        });
        if let Some(map) = body.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        body
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusArgs {
    /// The task's id.
    pub task_id: String,
    /// Wait up to this many seconds (at most 600) for the task to end before answering.
    #[serde(default)]
    pub wait_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelArgs {
    /// The task's id.
    pub task_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentArgs {
    /// The agent's (job's) id, as listed in the task's `agents`.
    pub agent_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendArgs {
    /// The agent's (job's) id.
    pub agent_id: String,
    /// The follow-up message.
    pub message: String,
    /// Fork the conversation at this agent instead of continuing its latest turn.
    #[serde(default)]
    pub fork: bool,
}

/// The tools; one per MCP request (the service is stateless).
#[derive(Clone)]
pub struct Tools {
    api: Arc<Router>,
}

#[tool_router]
impl Tools {
    fn new(api: Arc<Router>) -> Self {
        Self { api }
    }

    #[tool(
        description = "Submit a task to the orchestrator cluster: it is planned into agents (analyst, builder, reviewer, ...) that run on the cluster's workers. Returns the task's id, status and agents."
    )]
    async fn submit(
        &self,
        Parameters(args): Parameters<SubmitArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let task = self
            .call(&ctx, Method::POST, "/v1/tasks", Some(args.body()))
            .await?;
        Ok(task_view(&task).to_string())
    }

    #[tool(
        description = "Plan a task without running it: the agents it would run and its estimated cost and duration."
    )]
    async fn dry_run(
        &self,
        Parameters(args): Parameters<SubmitArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let plan = self
            .call(&ctx, Method::POST, "/v1/tasks/dry-run", Some(args.body()))
            .await?;
        Ok(plan.to_string())
    }

    #[tool(
        description = "A task's status and its agents' statuses; with wait_seconds, waits for the task to end first (follow it). When it ended, includes the task's output."
    )]
    async fn status(
        &self,
        Parameters(args): Parameters<StatusArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let wait = args.wait_seconds.unwrap_or(0);
        if wait > MAX_WAIT_SECS {
            return Err(ErrorData::invalid_params(
                format!("wait_seconds: must be at most {MAX_WAIT_SECS}"),
                None,
            ));
        }
        let path = format!("/v1/tasks/{}", segment("task_id", &args.task_id)?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        loop {
            let task = self.call(&ctx, Method::GET, &path, None).await?;
            let ended = matches!(
                task["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            );
            if ended || tokio::time::Instant::now() >= deadline {
                return Ok(task_view(&task).to_string());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    #[tool(
        description = "The latest tasks the caller may see (a tenant sees its own), newest first: id, status, prompt."
    )]
    async fn list_tasks(
        &self,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let list = self
            .call(&ctx, Method::GET, "/v1/tasks?limit=50", None)
            .await?;
        Ok(json!({"tasks": list["tasks"]}).to_string())
    }

    #[tool(
        description = "Cancel a task: its running agents are stopped and the rest never start. Returns the task's status."
    )]
    async fn cancel(
        &self,
        Parameters(args): Parameters<CancelArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let path = format!("/v1/tasks/{}/cancel", segment("task_id", &args.task_id)?);
        let task = self.call(&ctx, Method::POST, &path, None).await?;
        Ok(task_view(&task).to_string())
    }

    #[tool(
        description = "An agent's result: its status, output, error, and the unified diff of what it changed."
    )]
    async fn agent_result(
        &self,
        Parameters(args): Parameters<AgentArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let path = format!("/v1/agents/{}", segment("agent_id", &args.agent_id)?);
        let agent = self.call(&ctx, Method::GET, &path, None).await?;
        let job = &agent["job"];
        Ok(json!({
            "agent_id": job["id"],
            "task_id": agent["task_id"],
            "role": job["role"],
            "status": job["status"],
            "output": job["output"],
            "error": job["error"],
            "diff": job["diff"],
            "git": job["git"],
            "cost_usd": job["cost_usd"],
        })
        .to_string())
    }

    #[tool(
        description = "Send a follow-up message to an agent: a new agent of the same task continues its conversation (or, with fork, a copy of it). Returns the new agent's id."
    )]
    async fn send(
        &self,
        Parameters(args): Parameters<SendArgs>,
        ctx: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<String, ErrorData> {
        let verb = if args.fork { "fork" } else { "send" };
        let path = format!("/v1/agents/{}/{verb}", segment("agent_id", &args.agent_id)?);
        let turn = self
            .call(
                &ctx,
                Method::POST,
                &path,
                Some(json!({"message": args.message})),
            )
            .await?;
        Ok(turn.to_string())
    }
}

#[tool_handler]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::default();
        info.capabilities = ServerCapabilities::builder().enable_tools().build();
        info.instructions = Some(
            "Hand coding work to an orchestrator cluster: submit a task, follow it with status \
             (wait_seconds), read each agent's result and diff, send follow-ups, list and \
             cancel tasks."
                .into(),
        );
        info
    }
}

impl Tools {
    /// One API call with the MCP request's own credentials.
    async fn call(
        &self,
        ctx: &rmcp::service::RequestContext<rmcp::RoleServer>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ErrorData> {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(auth) = ctx
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.headers.get(header::AUTHORIZATION))
        {
            req = req.header(header::AUTHORIZATION, auth);
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .map_err(|e| ErrorData::internal_error(format!("request: {e}"), None))?;
        let resp = Router::clone(&self.api)
            .oneshot(req)
            .await
            .map_err(|e| ErrorData::internal_error(format!("request: {e}"), None))?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), super::MAX_BODY_BYTES * 16)
            .await
            .map_err(|e| ErrorData::internal_error(format!("answer: {e}"), None))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value["message"]
            .as_str()
            .map_or_else(|| status.to_string(), str::to_string);
        let data = Some(json!({"code": value["code"], "status": status.as_u16()}));
        Err(
            if status.is_client_error() && status != StatusCode::UNAUTHORIZED {
                ErrorData::invalid_params(message, data)
            } else {
                ErrorData::internal_error(message, data)
            },
        )
    }
}

/// What a tool shows of a task: enough to follow it and to pick an agent.
fn task_view(task: &Value) -> Value {
    let agents: Vec<Value> = task["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| {
                    json!({
                        "agent_id": j["id"],
                        "role": j["role"],
                        "status": j["status"],
                        "error": j["error"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "task_id": task["id"],
        "status": task["status"],
        "plan": task["plan_source"],
        "trace_id": task["trace_id"],
        "agents": agents,
        "cost_usd": task["cost_usd"],
        "output": task["output"],
        "error": task["error"],
        "branch": task["branch"],
    })
}

/// An id as one path segment (a stray `/` or `?` cannot reach another route), or the error
/// naming `field`.
fn segment<'a>(field: &str, id: &'a str) -> Result<&'a str, ErrorData> {
    let id = id.trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ErrorData::invalid_params(
            format!("{field}: expected an id such as 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b"),
            None,
        ));
    }
    Ok(id)
}
