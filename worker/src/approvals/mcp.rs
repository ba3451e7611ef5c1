//! The `claude-code` backend's permission-prompt tool: an MCP server (streamable HTTP,
//! stateless, plain JSON) with one tool, `permission`, that the CLI calls
//! (`--permission-prompt-tool mcp__orch__permission`) before it uses a tool its role neither
//! allows nor denies outright.
//!
//! Each job's CLI gets a token of its own (in its `--mcp-config`, as a bearer header); the
//! token stands for the job's [`Seat`] (its spec, its event stream, its role's `ask` rules)
//! while the job runs. Without the sandbox the CLI reaches the server on a loopback port of
//! the worker; in the sandbox, through its bridge to the worker's proxy, which hands paths
//! under `/orch/` to the same router.
//!
//! The answer is the CLI's permission-prompt format, as text: `{"behavior":"allow",
//! "updatedInput":{..}}` or `{"behavior":"deny","message":".."}`.

use super::{Broker, Rule, Verdict, subject};
use crate::agent::Events;
use axum::Router;
use orch_shared::job::JobSpec;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::schemars::{self, JsonSchema};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where the server is served (on the loopback port, and through the sandbox's proxy).
pub const PATH: &str = "/orch/mcp";
/// The server's name in the CLI's MCP config.
pub const SERVER: &str = "orch";
/// `--permission-prompt-tool`: the tool as the CLI names it.
pub const PROMPT_TOOL: &str = "mcp__orch__permission";

/// What a job's token stands for.
#[derive(Clone)]
struct Seat {
    job: JobSpec,
    events: Events,
    cancel: CancellationToken,
    /// The role's `ask` rules: uses a person approves; any other use the CLI asks about is
    /// denied.
    ask: Vec<Rule>,
}

struct Inner {
    broker: Broker,
    seats: Mutex<HashMap<String, Seat>>,
    loopback: OnceLock<SocketAddr>,
}

/// The permission-prompt server of one worker (cheap to clone).
#[derive(Clone)]
pub struct Desk {
    inner: Arc<Inner>,
}

impl Desk {
    pub fn new(broker: Broker) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker,
                seats: Mutex::new(HashMap::new()),
                loopback: OnceLock::new(),
            }),
        }
    }

    /// The router serving [`PATH`].
    pub fn router(&self, cancel: CancellationToken) -> Router {
        let mut config = StreamableHttpServerConfig::default()
            // Reached as 127.0.0.1 on a port of the worker's or the sandbox's loopback; only
            // a job's token is served.
            .disable_allowed_hosts()
            .with_cancellation_token(cancel);
        config.legacy_session_mode = false;
        config.json_response = true;
        let desk = self.clone();
        let service = StreamableHttpService::new(
            move || Ok(Tools { desk: desk.clone() }),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        Router::new().nest_service(PATH, service)
    }

    /// Serves the router on a loopback port until `cancel` (for CLIs run without the
    /// sandbox).
    pub async fn serve_loopback(
        &self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let _ = self.inner.loopback.set(addr);
        let router = self.router(cancel.clone());
        tracker.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the permission-prompt server stopped");
            }
        });
        Ok(addr)
    }

    /// Gives `job` a token for as long as the returned seat lives.
    pub fn seat(
        &self,
        job: &JobSpec,
        events: &Events,
        cancel: &CancellationToken,
        ask: Vec<Rule>,
    ) -> Seated {
        let token = format!("orch-ask-{:032x}", rand::random::<u128>());
        if let Ok(mut seats) = self.inner.seats.lock() {
            seats.insert(
                token.clone(),
                Seat {
                    job: job.clone(),
                    events: events.clone(),
                    cancel: cancel.clone(),
                    ask,
                },
            );
        }
        Seated {
            desk: self.clone(),
            token,
        }
    }

    /// The broker the desk asks (the native tool loop asks it directly).
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    fn seat_of(&self, token: &str) -> Option<Seat> {
        self.inner.seats.lock().ok()?.get(token).cloned()
    }
}

/// A job's place at the desk; its token is revoked when it drops.
pub struct Seated {
    desk: Desk,
    token: String,
}

impl Seated {
    /// The CLI's `--mcp-config` for this job: the server at `base` (the sandbox's proxy
    /// address inside the sandbox, else the worker's loopback port).
    pub fn mcp_config(&self, base: Option<&str>) -> Option<String> {
        let base = match base {
            Some(b) => b.to_string(),
            None => format!("http://{}", self.desk.inner.loopback.get()?),
        };
        Some(
            json!({"mcpServers": {SERVER: {
                "type": "http",
                "url": format!("{base}{PATH}"),
                "headers": {"Authorization": format!("Bearer {}", self.token)},
            }}})
            .to_string(),
        )
    }
}

impl Drop for Seated {
    fn drop(&mut self) {
        if let Ok(mut seats) = self.desk.inner.seats.lock() {
            seats.remove(&self.token);
        }
    }
}

/// What the CLI sends: the tool it wants to use and its input.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct PermissionArgs {
    /// The tool the agent wants to use (`Bash`, `Write`, …).
    pub tool_name: String,
    /// The tool's input.
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub tool_use_id: Option<String>,
}

/// The tools; one per MCP request (the service is stateless).
#[derive(Clone)]
pub struct Tools {
    desk: Desk,
}

#[tool_router]
impl Tools {
    #[tool(
        description = "Asks whether the agent may use a tool: a person approves or denies it (or a rule granted earlier does). Returns the permission decision as JSON."
    )]
    async fn permission(
        &self,
        Parameters(args): Parameters<PermissionArgs>,
        Extension(parts): Extension<axum::http::request::Parts>,
    ) -> Result<String, ErrorData> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let Some(seat) = self.desk.seat_of(token.trim()) else {
            return Err(ErrorData::invalid_request(
                "unknown token: the job has ended, or this is not a job's",
                None,
            ));
        };
        let subject = subject(&args.input);
        let verdict = if seat
            .ask
            .iter()
            .any(|r| r.matches(&args.tool_name, &subject))
        {
            self.desk
                .inner
                .broker
                .ask(
                    &seat.job,
                    &args.tool_name,
                    &args.input,
                    &seat.events,
                    &seat.cancel,
                )
                .await
        } else {
            Verdict::Deny(format!(
                "{} is not allowed for the {} role (neither allowed nor marked for approval)",
                args.tool_name,
                seat.job.role.as_str()
            ))
        };
        Ok(match verdict {
            Verdict::Allow => json!({"behavior": "allow", "updatedInput": args.input}),
            Verdict::Deny(message) => json!({"behavior": "deny", "message": message}),
        }
        .to_string())
    }
}

#[tool_handler]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::default();
        info.capabilities = ServerCapabilities::builder().enable_tools().build();
        info
    }
}
