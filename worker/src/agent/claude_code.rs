//! The `claude-code` backend: the Claude Code CLI, headless
//! (`claude -p --output-format stream-json --verbose`, the prompt on stdin), in the job's
//! workspace, with the role's system prompt (`--append-system-prompt`), tools
//! (`--allowedTools`, `--disallowedTools`), permission mode, model, turn limit and MCP config.
//!
//! Every stream-json line becomes job events: `system/init` (logged; a thinking event),
//! `assistant` (text and tool calls), `user` (tool results), `system/api_retry` and
//! `system/permission_denied` (logged, and they decide the failure reason), `result` (the
//! answer, usage and cost). Usage and cost come from the `result` line only: the `assistant`
//! lines carry the incomplete usage of `message_start` (used for running totals, for the
//! context occupancy of the last request, and when the run is cut before its result).
//!
//! Failure reasons: an API failure still says `subtype: success`, so `is_error` and
//! `api_error_status` decide: 429 → rate_limited, 529 or overloaded → overloaded, other 5xx
//! and connection errors → network (all retryable), 400 and other 4xx → bad_request. The turn
//! limit (`error_max_turns`) and `--max-budget-usd` → budget_exhausted: the agent used up the
//! budget it was given, and running it again with the same budget would end the same way, so
//! it is not retried. Any other error → agent_error.
//!
//! The CLI runs with a per-worker HOME (`claude_home`), an environment cleared down to what it
//! needs (the locale, PATH, proxies, `ANTHROPIC_*`, `CLAUDE_CODE_*`; never the worker's other
//! secrets), and `IS_SANDBOX=1` when `bypassPermissions` is asked for as root (the CLI refuses
//! that mode as root otherwise). On cancellation the whole process tree is stopped.
//!
//! Sessions: after a turn, the CLI's transcript of it is the agent's session (read, and
//! removed from the worker, by [`super::transcript`]). A further turn writes the stored
//! transcript into the project of its own working directory and runs the CLI with
//! `--resume <id> --fork-session`, so every turn has its own session id.

use super::backends::Prepared;
use super::http;
use super::process;
use super::transcript;
use super::workspace::{FileTracker, WorkDir};
use super::{AgentOutput, ContextUse, Events, Report};
use crate::config::{ApiSettings, ClaudeCodeSettings};
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, JobKind, Outcome, Usage};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "claude-code";
/// How much of a tool's input or output goes into an event.
const MAX_EVENT_TEXT: usize = 8 * 1024;
/// How long the CLI may take to exit after its result line.
const EXIT_GRACE: Duration = Duration::from_secs(5);
const STDERR_TAIL: usize = 4096;

/// Variables of the worker's environment the CLI gets; everything else is cleared.
const ENV_PASS: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];
/// Prefixes of variables the CLI gets (its own settings and the provider's).
const ENV_PASS_PREFIXES: &[&str] = &["ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_", "DISABLE_"];

pub struct ClaudeCode {
    settings: ClaudeCodeSettings,
    /// The Messages API settings (`ANTHROPIC_BASE_URL`, the key), shared with `anthropic`.
    provider: ApiSettings,
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes]", &s[..end], s.len() - end)
}

/// A tool result's content: a string, or text blocks.
fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn usage_of(v: &Value) -> Usage {
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cache_creation_tokens: n("cache_creation_input_tokens"),
        cache_read_tokens: n("cache_read_input_tokens"),
    }
}

/// What the stream said so far.
pub struct Stream {
    files: FileTracker,
    seen_messages: HashSet<String>,
    /// Running usage from the `assistant` lines (incomplete output counts).
    running: Usage,
    /// Input-side usage of the last top-level request.
    last_request: Option<Usage>,
    model: Option<String>,
    session_id: Option<String>,
    /// The working directory the CLI reported (its transcripts are filed under it).
    cwd: Option<String>,
    /// Text the agent wrote, in order (the answer when the result line has none).
    texts: Vec<String>,
    /// An error the CLI reported as an assistant message (model `<synthetic>`).
    synthetic: Option<String>,
    /// `(status, kind)` of the last `api_retry`.
    last_retry: Option<(Option<u64>, String)>,
    denied: Vec<String>,
    result: Option<Value>,
}

impl Stream {
    pub fn new(workspace: &Path) -> Self {
        Self {
            files: FileTracker::new(workspace),
            seen_messages: HashSet::new(),
            running: Usage::default(),
            last_request: None,
            model: None,
            session_id: None,
            cwd: None,
            texts: vec![],
            synthetic: None,
            last_retry: None,
            denied: vec![],
            result: None,
        }
    }

    /// Takes one stream-json line; true once the `result` line has come.
    pub fn line(&mut self, line: &str, events: &Events, p: &Prepared<'_>) -> bool {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            if !line.trim().is_empty() {
                tracing::debug!(line = %cut(line, 200), "claude-code: not a JSON line");
            }
            return false;
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        match (s("type"), s("subtype")) {
            (Some("system"), Some("init")) => {
                self.session_id = s("session_id").map(str::to_string);
                self.cwd = s("cwd").map(str::to_string);
                self.model = s("model").map(str::to_string);
                tracing::info!(
                    session_id = s("session_id").unwrap_or(""),
                    model = s("model").unwrap_or(""),
                    permission_mode = s("permissionMode").unwrap_or(""),
                    version = s("claude_code_version").unwrap_or(""),
                    "claude-code session started"
                );
                events.send(EventKind::Thinking);
            }
            (Some("system"), Some("api_retry")) => {
                let status = v.get("error_status").and_then(Value::as_u64);
                let kind = s("error").unwrap_or("unknown").to_string();
                let attempt = v.get("attempt").and_then(|a| a.as_u64());
                let max_retries = v.get("max_retries").and_then(|a| a.as_u64());
                tracing::info!(
                    attempt,
                    max_retries,
                    status,
                    error = %kind,
                    "claude-code is retrying an API call"
                );
                self.last_retry = Some((status, kind));
            }
            (Some("system"), Some("permission_denied")) => {
                let tool = s("tool_name").unwrap_or("?").to_string();
                tracing::info!(tool = %tool, "claude-code refused a tool the role may not use");
                self.denied.push(tool);
            }
            (Some("assistant"), _) => self.assistant(&v, events, p),
            (Some("user"), _) => {
                let blocks = v
                    .pointer("/message/content")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for b in blocks {
                    if b.get("type").and_then(Value::as_str) != Some("tool_result") {
                        continue;
                    }
                    let call_id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let is_error = b.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                    self.files.on_result(&call_id, is_error);
                    let output = cut(
                        &content_text(b.get("content").unwrap_or(&Value::Null)),
                        MAX_EVENT_TEXT,
                    );
                    events.send(EventKind::ToolResult {
                        call_id,
                        output,
                        is_error,
                    });
                }
            }
            (Some("result"), _) => {
                self.result = Some(v);
                return true;
            }
            _ => {}
        }
        false
    }

    fn assistant(&mut self, v: &Value, events: &Events, p: &Prepared<'_>) {
        let Some(msg) = v.get("message") else { return };
        let synthetic = msg.get("model").and_then(Value::as_str) == Some("<synthetic>");
        let top_level = v.get("parent_tool_use_id").is_none_or(Value::is_null);
        let id = msg
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // One line per content block: a message's usage counts once.
        if !synthetic && !id.is_empty() && self.seen_messages.insert(id) {
            let u = msg.get("usage").map(usage_of).unwrap_or_default();
            self.running.add(&u);
            if top_level {
                self.last_request = Some(u);
            }
            let model = msg.get("model").and_then(Value::as_str).map(str::to_string);
            let cost_usd = p.cost(model.as_deref().or(p.model.as_deref()), &self.running);
            events.send(EventKind::Usage {
                usage: self.running,
                cost_usd,
            });
        }
        let blocks = msg
            .get("content")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for b in blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    let text = b
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    if text.is_empty() {
                        continue;
                    }
                    if synthetic {
                        self.synthetic = Some(text);
                        continue;
                    }
                    events.send(EventKind::Text { text: text.clone() });
                    if top_level {
                        self.texts.push(text);
                    }
                }
                Some("tool_use") => {
                    let call_id = b
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let name = b
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    let input = b.get("input").cloned().unwrap_or(Value::Null);
                    self.files.on_call(&call_id, &name, &input);
                    events.send(EventKind::ToolCall {
                        call_id,
                        name,
                        input: cut(&input.to_string(), MAX_EVENT_TEXT),
                    });
                }
                Some("thinking") | Some("redacted_thinking") => events.send(EventKind::Thinking),
                _ => {}
            }
        }
    }
}

/// The reason and message of a result line that reports an error.
fn failure(result: &Value, last_retry: Option<&(Option<u64>, String)>) -> (FailureReason, String) {
    let s = |k: &str| result.get(k).and_then(Value::as_str).unwrap_or("");
    let text = {
        let errors: Vec<&str> = result
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let t = match (s("result"), errors.is_empty()) {
            ("", false) => errors.join("; "),
            ("", true) => format!("the CLI ended with {}", s("subtype")),
            (r, _) => r.to_string(),
        };
        cut(&t, 1000)
    };
    let subtype = s("subtype");
    if subtype == "error_max_turns" || s("terminal_reason") == "max_turns" {
        return (
            FailureReason::BudgetExhausted,
            format!("turn limit reached (not retried: the same limit would stop it again): {text}"),
        );
    }
    if subtype.starts_with("error_max_budget") {
        return (
            FailureReason::BudgetExhausted,
            format!("cost limit reached: {text}"),
        );
    }
    if let Some(status) = result.get("api_error_status").and_then(Value::as_u64) {
        let (reason, _) = http::status_reason(status as u16);
        return (reason, format!("API error {status}: {text}"));
    }
    let lower = text.to_lowercase();
    let retry_kind = last_retry.map(|(status, kind)| (*status, kind.as_str()));
    let reason = match retry_kind {
        Some((Some(status), _)) => http::status_reason(status as u16).0,
        Some((None, "rate_limit")) => FailureReason::RateLimited,
        Some((None, "overloaded")) => FailureReason::Overloaded,
        Some((None, "server_error" | "unknown")) => FailureReason::Network,
        Some((None, "authentication_failed")) => FailureReason::BadRequest,
        _ if lower.contains("overloaded") => FailureReason::Overloaded,
        _ if lower.contains("rate limit") || lower.contains("rate_limit") => {
            FailureReason::RateLimited
        }
        _ if [
            "connection error",
            "econnrefused",
            "fetch failed",
            "timed out",
            "socket",
        ]
        .iter()
        .any(|k| lower.contains(k)) =>
        {
            FailureReason::Network
        }
        _ => FailureReason::AgentError,
    };
    (reason, text)
}

impl ClaudeCode {
    pub fn new(settings: ClaudeCodeSettings, provider: ApiSettings) -> Self {
        Self { settings, provider }
    }

    /// The CLI's arguments for `p` (the prompt goes on stdin).
    pub fn args(&self, p: &Prepared<'_>) -> Vec<String> {
        let profile = p.profile;
        let mut args: Vec<String> = [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            &profile.permission_mode,
            "--append-system-prompt",
            &profile.system_prompt,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !profile.allowed_tools.is_empty() {
            args.push("--allowedTools".into());
            args.push(profile.allowed_tools.join(","));
        }
        if !profile.disallowed_tools.is_empty() {
            args.push("--disallowedTools".into());
            args.push(profile.disallowed_tools.join(","));
        }
        if let Some(m) = &p.model {
            args.push("--model".into());
            args.push(m.clone());
        }
        if let Some(n) = p.job.limits.max_turns.or(profile.max_turns) {
            args.push("--max-turns".into());
            args.push(n.to_string());
        }
        if let Some(mcp) = &self.settings.mcp_config {
            args.push("--mcp-config".into());
            args.push(mcp.clone());
            args.push("--strict-mcp-config".into());
        }
        args.extend(self.settings.args.iter().cloned());
        args
    }

    /// The CLI's environment: the allow-listed part of the worker's, then the provider
    /// settings, the home and the config's own variables.
    pub fn env(&self, p: &Prepared<'_>) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| {
                ENV_PASS.contains(&k.as_str()) || ENV_PASS_PREFIXES.iter().any(|p| k.starts_with(p))
            })
            .collect();
        env.insert("HOME".into(), self.settings.home.display().to_string());
        for (k, v) in [
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
        ] {
            env.entry(k.into()).or_insert_with(|| v.into());
        }
        if let Some(url) = &self.provider.base_url {
            env.insert("ANTHROPIC_BASE_URL".into(), url.clone());
        }
        if let Some(key) = &self.provider.api_key {
            env.insert("ANTHROPIC_API_KEY".into(), key.expose().to_string());
        }
        if let Some(n) = self.settings.max_retries {
            env.insert("CLAUDE_CODE_MAX_RETRIES".into(), n.to_string());
        }
        if p.profile.permission_mode == "bypassPermissions" && running_as_root() {
            env.insert("IS_SANDBOX".into(), "1".into());
        }
        env.extend(self.settings.env.clone());
        env
    }

    pub async fn run(
        &self,
        p: &Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let report = |output, context| Report {
            output,
            backend: NAME,
            model: p.model.clone(),
            context,
            session: None,
        };
        let dir = match WorkDir::prepare(p.job, p.data_dir, cancel).await {
            Ok(d) => d,
            Err((reason, message)) => return report(AgentOutput::failure(reason, message), None),
        };
        if let Err(e) = tokio::fs::create_dir_all(&self.settings.home).await {
            return report(
                AgentOutput::failure(
                    FailureReason::Internal,
                    format!(
                        "failed to create the Claude Code home {}: {e}",
                        self.settings.home.display()
                    ),
                ),
                None,
            );
        }
        let config_dir = transcript::config_dir(&self.env(p));
        let restored = match &p.session {
            Some(s) => match transcript::restore(&config_dir, s, &dir.path).await {
                Ok(r) => Some(r),
                Err(e) => {
                    return report(
                        AgentOutput::failure(
                            FailureReason::Internal,
                            format!("failed to restore the stored session: {e}"),
                        ),
                        None,
                    );
                }
            },
            None => None,
        };
        let mut cmd = process::command(&self.settings.bin);
        cmd.args(self.args(p))
            .current_dir(&dir.path)
            .env_clear()
            .envs(self.env(p))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = &restored {
            cmd.args(["--resume", &r.id, "--fork-session"]);
        }
        process::isolate(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return report(
                    AgentOutput::failure(
                        FailureReason::Internal,
                        format!(
                            "failed to start the Claude Code CLI `{}` (set ORCH_CLAUDE_BIN or [backends.claude-code] bin): {e}",
                            self.settings.bin.display()
                        ),
                    ),
                    None,
                );
            }
        };
        let pgid = child.id();
        let mut guard = process::TreeGuard::new(pgid);
        if let Some(mut stdin) = child.stdin.take() {
            let prompt = p.prompt.clone();
            tokio::spawn(async move {
                let _ = stdin.write_all(prompt.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stderr = child.stderr.take().map(|e| process::tail(e, STDERR_TAIL));
        let mut stream = Stream::new(&dir.path);
        let mut cancelled = false;
        if let Some(stdout) = child.stdout.take() {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => { cancelled = true; break; }
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => if stream.line(&l, events, p) { break },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "claude-code: reading its output failed");
                            break;
                        }
                    }
                }
            }
        }
        let status = if cancelled {
            process::terminate(&mut child, process::KILL_GRACE).await;
            None
        } else {
            tokio::select! {
                s = tokio::time::timeout(EXIT_GRACE, child.wait()) => match s {
                    Ok(Ok(s)) => Some(s),
                    _ => {
                        process::terminate(&mut child, process::KILL_GRACE).await;
                        None
                    }
                },
                _ = cancel.cancelled() => {
                    cancelled = stream.result.is_none();
                    process::terminate(&mut child, process::KILL_GRACE).await;
                    None
                }
            }
        };
        if let Some(pgid) = pgid {
            process::kill_leftovers(pgid);
        }
        guard.disarm();
        let err_tail = match stderr {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        let Stream {
            files,
            running,
            last_request,
            model: init_model,
            session_id,
            cwd,
            texts,
            synthetic,
            last_retry,
            denied,
            result,
            ..
        } = stream;
        drop(restored);
        let session = match &session_id {
            Some(sid) => {
                let cwd = cwd.unwrap_or_else(|| dir.path.display().to_string());
                let turn = crate::session::Snapshot::next_turn(p.session.as_ref());
                transcript::collect(
                    &config_dir,
                    &cwd,
                    sid,
                    turn,
                    result.is_some(),
                    dir.is_scratch(),
                )
                .await
            }
            None => None,
        };
        let model = p.model.clone().or(init_model);
        if !denied.is_empty() {
            tracing::info!(denied = ?denied, "tools refused during the run");
        }

        let Some(result) = result else {
            // Cut short: cancelled, or the CLI died without a result. What it spent so far is
            // the running estimate.
            let cost_usd = p.cost(model.as_deref(), &running);
            let (reason, message) = if cancelled {
                (FailureReason::Cancelled, "agent stopped".to_string())
            } else {
                let why = synthetic
                    .or_else(|| (!err_tail.is_empty()).then(|| cut(&err_tail, 1000)))
                    .unwrap_or_else(|| "no output".into());
                let status =
                    status.map_or("was killed".to_string(), |s| format!("exited with {s}"));
                let reason = match &last_retry {
                    Some((Some(s), _)) => http::status_reason(*s as u16).0,
                    _ => FailureReason::AgentError,
                };
                (
                    reason,
                    format!("the Claude Code CLI {status} before its result: {why}"),
                )
            };
            let changes = dir.finish(p.job, false, files).await;
            let output = AgentOutput {
                outcome: Outcome::Failure { reason, message },
                output: String::new(),
                usage: running,
                cost_usd,
                files_read: changes.files_read,
                files_written: changes.files_written,
                diff: changes.diff,
                git: changes.git,
            };
            return Report {
                output,
                backend: NAME,
                model,
                context: None,
                session: None,
            };
        };

        let usage = result.get("usage").map(usage_of).unwrap_or(running);
        let reported = result.get("total_cost_usd").and_then(Value::as_f64);
        // The CLI's own figure wins; a model it has no price for shows as 0 there.
        let cost_usd = match reported {
            Some(c) if c > 0.0 || usage.total() == 0 => c,
            _ => p.cost(model.as_deref(), &usage),
        };
        events.send(EventKind::Usage { usage, cost_usd });
        let window = result
            .get("modelUsage")
            .and_then(Value::as_object)
            .and_then(|m| {
                model
                    .as_deref()
                    .and_then(|name| m.get(name))
                    .or_else(|| m.values().next())
                    .and_then(|u| u.get("contextWindow"))
                    .and_then(Value::as_u64)
            })
            .or_else(|| model.as_deref().and_then(|m| p.context_window(m)));
        let context = match (last_request, window) {
            (Some(u), Some(window)) if window > 0 => Some(ContextUse {
                tokens: u.input_tokens + u.cache_creation_tokens + u.cache_read_tokens,
                window,
            }),
            _ => None,
        };
        let is_error = result
            .get("is_error")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let subtype = result.get("subtype").and_then(Value::as_str).unwrap_or("");
        let answer = result
            .get("result")
            .and_then(Value::as_str)
            .map(str::to_string)
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| texts.join("\n\n"));
        let (outcome, output) = if is_error || subtype != "success" {
            let (reason, message) = failure(&result, last_retry.as_ref());
            (Outcome::Failure { reason, message }, String::new())
        } else if answer.trim().is_empty() && p.job.kind == JobKind::Plan {
            (
                Outcome::Failure {
                    reason: FailureReason::AgentError,
                    message: "the planner answered with no text".into(),
                },
                String::new(),
            )
        } else {
            (Outcome::Success, answer)
        };
        // A git workspace commits and pushes here; a push that fails fails the job.
        let changes = dir.finish(p.job, outcome.is_success(), files).await;
        let outcome = changes.outcome(outcome);
        tracing::debug!(session_id = session_id.as_deref().unwrap_or(""), exit = ?status, "claude-code finished");
        let session = session.filter(|_| outcome.is_success());
        Report {
            session,
            output: AgentOutput {
                outcome,
                output,
                usage,
                cost_usd,
                files_read: changes.files_read,
                files_written: changes.files_written,
                diff: changes.diff,
                git: changes.git,
            },
            backend: NAME,
            model,
            context,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn failures_are_judged_by_is_error_and_the_api_status() {
        let r = |v: Value| failure(&v, None).0;
        assert_eq!(
            r(
                json!({"subtype": "success", "is_error": true, "api_error_status": 429, "result": "API Error: 429"})
            ),
            FailureReason::RateLimited
        );
        assert_eq!(
            r(json!({"subtype": "success", "is_error": true, "api_error_status": 529})),
            FailureReason::Overloaded
        );
        assert_eq!(
            r(json!({"subtype": "success", "is_error": true, "api_error_status": 500})),
            FailureReason::Network
        );
        assert_eq!(
            r(json!({"subtype": "success", "is_error": true, "api_error_status": 400})),
            FailureReason::BadRequest
        );
        let (reason, message) = failure(
            &json!({"subtype": "error_max_turns", "is_error": true, "errors": ["Reached maximum number of turns (1)"]}),
            None,
        );
        assert_eq!(reason, FailureReason::BudgetExhausted);
        assert!(
            message.contains("Reached maximum number of turns (1)"),
            "{message}"
        );
        assert_eq!(
            r(
                json!({"subtype": "success", "is_error": true, "result": "API Error: Connection error."})
            ),
            FailureReason::Network
        );
        assert_eq!(
            failure(
                &json!({"subtype": "success", "is_error": true, "result": "x"}),
                Some(&(None, "overloaded".to_string()))
            )
            .0,
            FailureReason::Overloaded
        );
        assert_eq!(
            r(json!({"subtype": "error_during_execution", "is_error": true})),
            FailureReason::AgentError
        );
    }

    #[test]
    fn long_event_text_is_cut_on_a_char_boundary() {
        let s = "é".repeat(10);
        let c = cut(&s, 5);
        assert!(c.starts_with("éé…"), "{c}");
        assert_eq!(cut("short", 10), "short");
    }
}
