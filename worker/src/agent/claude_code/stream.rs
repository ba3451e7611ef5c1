//! The Claude Code CLI's stream-json output, line by line ([`Stream`]).
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

use crate::agent::http::{self, Learned};
use crate::agent::workspace::FileTracker;
use crate::agent::{Events, Prepared};
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Usage};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// How much of a tool's input or output goes into an event.
const MAX_EVENT_TEXT: usize = 8 * 1024;

/// `s`, cut to at most `max` bytes on a char boundary, with a note of what was cut.
pub(super) fn cut(s: &str, max: usize) -> String {
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

/// A `usage` object of the stream (the Messages API's token kinds).
pub(super) fn usage_of(v: &Value) -> Usage {
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
    pub(super) files: FileTracker,
    seen_messages: HashSet<String>,
    /// Running usage from the `assistant` lines (incomplete output counts).
    pub(super) running: Usage,
    /// Input-side usage of the last top-level request.
    pub(super) last_request: Option<Usage>,
    pub(super) model: Option<String>,
    pub(super) session_id: Option<String>,
    /// The working directory the CLI reported (its transcripts are filed under it).
    pub(super) cwd: Option<String>,
    /// Text the agent wrote, in order (the answer when the result line has none).
    pub(super) texts: Vec<String>,
    /// An error the CLI reported as an assistant message (model `<synthetic>`).
    pub(super) synthetic: Option<String>,
    /// `(status, kind)` of the last `api_retry`.
    pub(super) last_retry: Option<(Option<u64>, String)>,
    pub(super) denied: Vec<String>,
    pub(super) result: Option<Value>,
    /// Top-level tool calls of the latest message still waiting for their result.
    pending_tools: HashSet<String>,
    /// Steps done: top-level messages whose tool calls have all returned.
    pub(super) steps: u32,
    /// A step finished since [`Stream::take_step`] was last asked, and whether it may have
    /// changed files.
    step_ready: Option<(bool, Option<Vec<String>>)>,
    step_writes: bool,
    /// The files the step's tools wrote, while only file tools ran
    /// ([`crate::custody::files_written`]).
    step_paths: Option<Vec<String>>,
    /// The id of the last tool call that returned (its step's transcript names it).
    pub(super) last_tool: Option<String>,
}

/// Tools that may change the workspace: the step after them is checkpointed at once.
const WRITING_TOOLS: &[&str] = &["Write", "Edit", "MultiEdit", "NotebookEdit", "Bash"];

/// Tools that change no file of the workspace (any other but the file tools may change
/// anything: its step's checkpoint looks at the whole tree).
const READ_ONLY_TOOLS: &[&str] = &[
    "Read",
    "Glob",
    "Grep",
    "LS",
    "NotebookRead",
    "WebFetch",
    "WebSearch",
    "TodoWrite",
    "TodoRead",
];

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
            pending_tools: HashSet::new(),
            steps: 0,
            step_ready: None,
            step_writes: false,
            step_paths: Some(Vec::new()),
            last_tool: None,
        }
    }

    /// Whether a step finished since the last call (and whether it may have changed files,
    /// and which, when only file tools ran).
    pub fn take_step(&mut self) -> Option<(bool, Option<Vec<String>>)> {
        self.step_ready.take()
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
            (Some("rate_limit_event"), _) => {
                // Printed on subscription (OAuth) logins: `rate_limit_info.status` is
                // `allowed`, `allowed_warning` or `rejected`, `resetsAt` in epoch seconds.
                if let Some(l) = rate_limit(&v) {
                    tracing::info!(
                        until_ms = l.exhausted_until_ms,
                        "claude-code: the subscription's usage limit is reached"
                    );
                    p.note_limit(l);
                }
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
                    if self.pending_tools.remove(&call_id) && self.pending_tools.is_empty() {
                        self.steps += 1;
                        let paths = self.step_paths.replace(Vec::new());
                        self.step_ready = Some((std::mem::take(&mut self.step_writes), paths));
                        self.last_tool = Some(call_id.clone());
                    }
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
                    // A subagent's calls count too: they change the same tree.
                    self.step_paths = crate::custody::merge_paths(
                        self.step_paths.take(),
                        crate::custody::files_written([(name.as_str(), &input)], READ_ONLY_TOOLS),
                    );
                    if top_level && !synthetic && !call_id.is_empty() {
                        self.pending_tools.insert(call_id.clone());
                        self.step_writes |= WRITING_TOOLS.contains(&name.as_str());
                    }
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
pub(super) fn failure(
    result: &Value,
    last_retry: Option<&(Option<u64>, String)>,
) -> (FailureReason, String) {
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

/// What a `rate_limit_event` line says when it rejects: exhausted until `resetsAt`.
pub(super) fn rate_limit(v: &Value) -> Option<Learned> {
    let info = v.get("rate_limit_info")?;
    if info.get("status").and_then(Value::as_str) != Some("rejected") {
        return None;
    }
    let reset_ms = info
        .get("resetsAt")
        .and_then(Value::as_u64)
        .map(|s| s * 1000);
    let window = info
        .get("rateLimitType")
        .and_then(Value::as_str)
        .unwrap_or("usage");
    Some(Learned {
        exhausted_until_ms: Some(reset_ms.unwrap_or_else(|| {
            orch_shared::now_ms() + crate::agent::http::DEFAULT_LIMIT_WAIT.as_millis() as u64
        })),
        reason: format!("the subscription's {window} limit is reached"),
        reset_ms,
        ..Learned::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rejecting_rate_limit_event_holds_the_credential_until_its_reset() {
        let v = json!({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1796522781, "rateLimitType": "five_hour", "isUsingOverage": false}});
        let l = rate_limit(&v).unwrap();
        assert_eq!(l.exhausted_until_ms, Some(1_796_522_781_000));
        assert!(l.reason.contains("five_hour"), "{}", l.reason);
        let allowed = json!({"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning", "resetsAt": 1796526345}});
        assert_eq!(rate_limit(&allowed), None);
    }

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
