//! MCP tools for the native tool loop: the servers a job may use (its role's, from
//! `[roles.<name>.mcp_servers]`, and its task's, from the submit request) are started when the
//! job starts, through `rmcp`'s client, and their tools are offered to the model next to the
//! built-in ones as `mcp__<server>__<tool>` (Claude Code's names: a built-in tool has no `__`,
//! so no name can collide), each granted or denied by the role's tool rules
//! ([`crate::roles::Profile::grants_mcp`]).
//!
//! A stdio server runs in the job's workspace, in its sandbox when the worker has one, under
//! the supervisor and in a process group of its own (killed with the job), with an environment
//! holding no secret of the worker ([`super::shell::ENV_ALLOWLIST`] and what the declaration
//! adds). A streamable HTTP server (`url`) is called by the worker through
//! [`super::mcp_http`], with the headers it declares and, for a server of the worker's own
//! configuration, `Authorization: Bearer` from the worker's variable `bearer_token_env`; a
//! server a task declares must be on a host the role's `allowed_hosts` allow.
//!
//! A server that does not start, or does not list its tools within
//! `agent.mcp_start_timeout`, fails the job with a message naming it (and the end of what it
//! wrote on stderr); a `mcp_server` event says what each server offered or why it failed.
//! A call's result is its text content, capped like every tool result.

use super::super::process;
use super::mcp_http::Http;
use super::{Spec, ToolOutput, cap, shell::ENV_ALLOWLIST};
use crate::roles::Profile;
use crate::sandbox::Jail;
use futures::future::BoxFuture;
use orch_shared::job::McpServer;
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// The most of a stdio server's stderr kept for an error message.
const STDERR_TAIL: usize = 2_048;
/// How long a server that failed to start gets to finish writing its stderr.
const STDERR_WAIT: Duration = Duration::from_millis(500);
/// The longest name the model APIs accept for a tool.
const MAX_TOOL_NAME: usize = 64;

/// One MCP tool as offered to the model.
struct Offered {
    /// `mcp__<server>__<tool>`.
    name: String,
    /// Its name at the server.
    tool: String,
    server: usize,
    description: String,
    schema: Value,
}

/// A started server.
struct Connected {
    name: String,
    client: RunningService<RoleClient, ()>,
    /// Kills the server's process group when the job ends.
    _guard: Option<process::TreeGuard>,
}

/// What a server offered, for the `mcp_server` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub server: String,
    /// The tools offered (granted by the role).
    pub tools: u32,
    /// The tools the role's rules withheld.
    pub withheld: u32,
}

/// The MCP servers of one job and the tools they offer.
#[derive(Default)]
pub struct McpTools {
    servers: Vec<Connected>,
    offered: Vec<Offered>,
}

/// Why a server could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct StartError {
    pub server: String,
    pub message: String,
}

/// The servers a job of `profile` uses: the role's and the job's (the job's win on a name),
/// those of which the role may use no tool left out.
pub fn declared(
    profile: &Profile,
    job: &BTreeMap<String, McpServer>,
) -> BTreeMap<String, McpServer> {
    let mut all = profile.mcp_servers.clone();
    all.extend(job.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.retain(|name, _| profile.may_use_mcp_server(name));
    all
}

/// A tool name the APIs accept (`[A-Za-z0-9_-]`, other characters as `_`).
fn tool_name(server: &str, tool: &str) -> Option<String> {
    let clean: String = tool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("mcp__{server}__{clean}");
    (name.len() <= MAX_TOOL_NAME && !clean.is_empty()).then_some(name)
}

impl McpTools {
    /// Starts `servers` for a job of `profile` working in `workspace` (stdio servers in
    /// `jail`), each within `timeout`; what each offered, or the first that failed.
    pub async fn start(
        servers: &BTreeMap<String, McpServer>,
        profile: &Profile,
        workspace: &Path,
        jail: Option<&Jail>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<(McpTools, Vec<Started>), StartError> {
        let mut tools = McpTools::default();
        let mut started = vec![];
        for (name, server) in servers {
            let fail = |message: String| StartError {
                server: name.clone(),
                message,
            };
            let (serve, guard, (stderr, mut stderr_read)): (BoxFuture<'_, _>, _, _) =
                match (&server.command, &server.url) {
                    (Some(command), _) => {
                        let (pipes, guard, stderr) = spawn(command, server, workspace, jail)
                            .map_err(|e| fail(e.to_string()))?;
                        (Box::pin(().serve(pipes)), guard, stderr)
                    }
                    (None, Some(url)) => {
                        let own = profile.mcp_servers.get(name) == Some(server);
                        let env = |var: &str| std::env::var(var).ok();
                        let transport =
                            http_transport(url, server, own, profile, &env).map_err(fail)?;
                        let no_stderr = (Arc::new(Mutex::new(vec![])), None);
                        (Box::pin(().serve(transport)), None, no_stderr)
                    }
                    (None, None) => return Err(fail("declares neither command nor url".into())),
                };
            let connect = async {
                let client = serve.await.map_err(|e| e.to_string())?;
                let listed = client.list_all_tools().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((client, listed))
            };
            let connected = tokio::select! {
                r = tokio::time::timeout(timeout, connect) => match r {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(format!("did not start: {e}")),
                    Err(_) => Err(format!(
                        "did not start and list its tools within {}",
                        humantime::format_duration(timeout)
                    )),
                },
                _ = cancel.cancelled() => return Err(fail("cancelled while starting".into())),
            };
            // A server that failed has usually exited: what it wrote on stderr says why.
            if connected.is_err()
                && let Some(reading) = stderr_read.as_mut()
            {
                let _ = tokio::time::timeout(STDERR_WAIT, reading).await;
            }
            let with_stderr = |what: String| {
                let tail = stderr.lock().map(|t| t.clone()).unwrap_or_default();
                let tail = String::from_utf8_lossy(&tail);
                let tail = tail.trim();
                if tail.is_empty() {
                    what
                } else {
                    format!("{what}; its stderr ends: {tail}")
                }
            };
            let (client, listed) = connected.map_err(|e| fail(with_stderr(e)))?;
            let index = tools.servers.len();
            let mut granted = 0;
            let mut withheld = 0;
            for t in listed {
                let Some(offered) = tool_name(name, &t.name) else {
                    tracing::warn!(server = %name, tool = %t.name, "MCP tool skipped: its full name is longer than 64 characters");
                    withheld += 1;
                    continue;
                };
                if !profile.grants_mcp(name, &t.name)
                    || tools.offered.iter().any(|o| o.name == offered)
                {
                    withheld += 1;
                    continue;
                }
                granted += 1;
                tools.offered.push(Offered {
                    name: offered,
                    tool: t.name.to_string(),
                    server: index,
                    description: t.description.as_deref().unwrap_or_default().to_string(),
                    schema: Value::Object((*t.input_schema).clone()),
                });
            }
            tracing::info!(server = %name, tools = granted, withheld, "MCP server started");
            started.push(Started {
                server: name.clone(),
                tools: granted,
                withheld,
            });
            tools.servers.push(Connected {
                name: name.clone(),
                client,
                _guard: guard,
            });
        }
        Ok((tools, started))
    }

    /// The specs of the tools offered.
    pub fn specs(&self) -> Vec<Spec> {
        self.offered
            .iter()
            .map(|o| Spec {
                name: o.name.clone(),
                description: o.description.clone(),
                schema: o.schema.clone(),
            })
            .collect()
    }

    /// Whether `name` is a tool offered here.
    pub fn offers(&self, name: &str) -> bool {
        self.offered.iter().any(|o| o.name == name)
    }

    /// Calls the offered tool `name` with `input`; its text content, capped at `max` bytes.
    pub async fn call(
        &self,
        name: &str,
        input: &Value,
        max: usize,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> ToolOutput {
        let Some(o) = self.offered.iter().find(|o| o.name == name) else {
            return ToolOutput::error(format!("no MCP tool `{name}` is offered"));
        };
        let server = &self.servers[o.server];
        let arguments = match input {
            Value::Object(m) => Some(m.clone()),
            Value::Null => None,
            _ => return ToolOutput::error(format!("{name}: the input must be a JSON object")),
        };
        let mut params = CallToolRequestParams::new(o.tool.clone());
        params.arguments = arguments;
        let call = server.client.call_tool(params);
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, call) => r,
            _ = cancel.cancelled() => return ToolOutput::error(format!("{name}: cancelled")),
        };
        match result {
            Err(_) => ToolOutput::error(format!(
                "{name}: the MCP server {} did not answer within {}",
                server.name,
                humantime::format_duration(timeout)
            )),
            Ok(Err(e)) => ToolOutput::error(format!(
                "{name}: the MCP server {} failed: {e}",
                server.name
            )),
            Ok(Ok(r)) => {
                let mut parts = vec![];
                for block in &r.content {
                    let v = serde_json::to_value(block).unwrap_or_default();
                    match v.get("type").and_then(Value::as_str) {
                        Some("text") => parts.push(
                            v.get("text")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                        ),
                        Some("resource") => match v.pointer("/resource/text") {
                            Some(Value::String(t)) => parts.push(t.clone()),
                            _ => parts.push("[binary resource content not shown]".into()),
                        },
                        Some(other) => parts.push(format!("[{other} content not shown]")),
                        None => {}
                    }
                }
                if parts.is_empty()
                    && let Some(s) = &r.structured_content
                {
                    parts.push(s.to_string());
                }
                let text = cap(&parts.join("\n"), max);
                if r.is_error == Some(true) {
                    ToolOutput::error(text)
                } else {
                    ToolOutput::ok(text)
                }
            }
        }
    }
}

/// The transport to the streamable HTTP server at `url`, with its declared headers and, for a
/// server of the worker's own configuration (`own`), the bearer token its variable holds in
/// `env` (the worker's environment). A
/// server a task declared must be on a host the role's `allowed_hosts` allow: the worker
/// calls it from outside the sandbox, so it gets no host the sandbox would refuse.
fn http_transport(
    url: &str,
    server: &McpServer,
    own: bool,
    profile: &Profile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StreamableHttpClientTransport<Http>, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url: {e}"))?;
    if !own {
        let host = parsed.host_str().unwrap_or_default();
        let port = parsed.port_or_known_default().unwrap_or_default();
        if !profile.sandbox.allows(host, port) {
            return Err(format!(
                "url: {host}:{port} is not in the role's allowed_hosts (a task's MCP server \
                 must be on a host its agents may reach)"
            ));
        }
    }
    let mut config = StreamableHttpClientTransportConfig::with_uri(url);
    if let Some(var) = &server.bearer_token_env {
        if !own {
            return Err(
                "bearer_token_env: only a server of the worker's configuration may name one".into(),
            );
        }
        match env(var) {
            Some(token) if !token.is_empty() => config.auth_header = Some(token),
            _ => return Err(format!("bearer_token_env: {var} is not set on this worker")),
        }
    }
    for (name, value) in &server.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("headers: `{name}` is not an HTTP header name"))?;
        // The value is never quoted: it may be a credential.
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| format!("headers.{name}: the value is not a valid header value"))?;
        value.set_sensitive(true);
        config.custom_headers.insert(name, value);
    }
    Ok(StreamableHttpClientTransport::with_client(
        Http::shared(),
        config,
    ))
}

type Spawned = (
    (tokio::process::ChildStdout, tokio::process::ChildStdin),
    Option<process::TreeGuard>,
    (Arc<Mutex<Vec<u8>>>, Option<tokio::task::JoinHandle<()>>),
);

/// Starts the stdio server `command` in `workspace` (in `jail`): its stdout and stdin, the
/// guard of its process group, and the tail of its stderr as it comes.
fn spawn(
    command: &str,
    server: &McpServer,
    workspace: &Path,
    jail: Option<&Jail>,
) -> std::io::Result<Spawned> {
    let mut cmd = match jail {
        Some(j) => j.command(command),
        None => process::command(command),
    };
    cmd.args(&server.args)
        .current_dir(workspace)
        .env_clear()
        .envs(
            ENV_ALLOWLIST
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .envs(&server.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::isolate(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("`{command}` failed to start: {e}")))?;
    let guard = process::TreeGuard::new(child.id());
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err(std::io::Error::other("no pipes to the server"));
    };
    let tail = Arc::new(Mutex::new(Vec::new()));
    let reading = child.stderr.take().map(|mut err| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = tail.lock() {
                    t.extend_from_slice(&buf[..n]);
                    let over = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..over);
                }
            }
        })
    });
    // The child is reaped when it exits; its group dies with the guard.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(((stdout, stdin), Some(guard), (tail, reading)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::{Key, Roles};
    use orch_shared::role::Role;
    use rmcp::handler::server::tool::Extension;
    use rmcp::model::{ServerCapabilities, ServerConfig};
    use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    use rmcp::{ErrorData, ServerHandler, tool, tool_handler, tool_router};

    /// An MCP server (rmcp's, stateless, answering with plain JSON rather than SSE) whose one
    /// tool says which credentials its request carried.
    #[derive(Clone)]
    struct Whoami;

    #[tool_router]
    impl Whoami {
        #[tool(description = "The request's Authorization and X-Team headers.")]
        async fn whoami(
            &self,
            Extension(parts): Extension<axum::http::request::Parts>,
        ) -> Result<String, ErrorData> {
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string()
            };
            Ok(format!(
                "{} / {}",
                header("authorization"),
                header("x-team")
            ))
        }
    }

    #[tool_handler]
    impl ServerHandler for Whoami {
        fn get_info(&self) -> ServerConfig {
            let mut info = ServerConfig::default();
            info.capabilities = ServerCapabilities::builder().enable_tools().build();
            info
        }
    }

    /// Serves [`Whoami`] on a loopback port until `cancel`; its URL.
    async fn whoami_server(cancel: CancellationToken) -> String {
        let mut config = StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .with_cancellation_token(cancel.clone());
        config.legacy_session_mode = false;
        config.json_response = true;
        let service = StreamableHttpService::new(
            || Ok(Whoami),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
        });
        format!("http://{addr}/mcp")
    }

    #[tokio::test]
    async fn an_http_server_gets_its_headers_and_the_role_s_bearer_token() {
        let cancel = CancellationToken::new();
        let url = whoami_server(cancel.clone()).await;
        let roles = Roles::default();
        let builder = roles.profile(Key::Role(Role::Builder));
        let server = McpServer {
            url: Some(url.clone()),
            headers: [("X-Team".to_string(), "core".to_string())].into(),
            bearer_token_env: Some("DOCS_TOKEN".into()),
            ..McpServer::default()
        };
        let env = |var: &str| (var == "DOCS_TOKEN").then(|| "s3cret".to_string());
        let transport = http_transport(&url, &server, true, builder, &env).unwrap();
        let client = ().serve(transport).await.unwrap();
        let tools = client.list_all_tools().await.unwrap();
        assert_eq!(tools.len(), 1);
        let r = client
            .call_tool(CallToolRequestParams::new("whoami"))
            .await
            .unwrap();
        let text = serde_json::to_value(&r.content[0]).unwrap()["text"].clone();
        assert_eq!(text, "Bearer s3cret / core");
        cancel.cancel();

        // The variable unset on this worker: the server is not called.
        let e = http_transport(&url, &server, true, builder, &|_: &str| None)
            .err()
            .unwrap();
        assert_eq!(e, "bearer_token_env: DOCS_TOKEN is not set on this worker");
        // A task's server may not name one, nor reach a host the role may not.
        let e = http_transport(&url, &server, false, builder, &env)
            .err()
            .unwrap();
        assert!(
            e.starts_with("url: 127.0.0.1:") && e.contains("allowed_hosts"),
            "{e}"
        );
        let port = url.split(':').nth(2).unwrap().trim_end_matches("/mcp");
        let mut allowed = builder.clone();
        allowed.sandbox.allowed_hosts = vec![format!("127.0.0.1:{port}")];
        let e = http_transport(&url, &server, false, &allowed, &env)
            .err()
            .unwrap();
        assert!(e.starts_with("bearer_token_env:"), "{e}");
    }

    #[test]
    fn tool_names_are_what_the_apis_accept() {
        assert_eq!(
            tool_name("fs", "read_text_file").as_deref(),
            Some("mcp__fs__read_text_file")
        );
        assert_eq!(tool_name("fs", "a.b c").as_deref(), Some("mcp__fs__a_b_c"));
        assert_eq!(tool_name("fs", &"x".repeat(60)), None);
        assert_eq!(tool_name("fs", ""), None);
    }
}
