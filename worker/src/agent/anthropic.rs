//! The `anthropic` backend: one streamed request to the Messages API (`POST /v1/messages`,
//! `stream: true`) with the role's system prompt and the job's prompt, for planner and
//! chat-style roles. It runs no tools: a `tool_use` block is reported as a tool call event, but
//! only the text is the answer.
//!
//! The stream is read event by event (`message_start` with the input-side usage,
//! `content_block_start/delta/stop` with text, thinking and `input_json_delta`, `message_delta`
//! with the stop reason and the final output tokens, `message_stop`, and `error`). Usage is the
//! provider's, summed over every request the job made (a stream cut after `message_start` was
//! billed too); cost comes from the price table.
//!
//! Sessions: the conversation is the JSON list of its messages (`{role, content}`, the
//! user's prompt and the answer of every turn; the system prompt is not stored; see
//! [`super::chat`]). A further turn sends the stored messages, then its own prompt, and stores
//! the list with both added.

use super::chat::{self, Turn};
use super::http::{self, CallError, Spent};
use super::{AgentOutput, ContextUse, Events, Prepared, Report};
use crate::config::ApiSettings;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Outcome, Usage};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "anthropic";
const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
const API_VERSION: &str = "2023-06-01";
/// The model when neither the job, the role nor the config names one.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";

pub struct Anthropic {
    settings: ApiSettings,
    client: reqwest::Client,
}

/// One content block being streamed.
enum Block {
    Text(String),
    Tool {
        id: String,
        name: String,
        json: String,
    },
    Other,
}

/// What one successful request produced.
#[derive(Default)]
struct Message {
    text: Vec<String>,
    usage: Usage,
    stop_reason: Option<String>,
    tools: Vec<String>,
}

fn u(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// Fields present in a `usage` object replace those of `into` (`message_delta` carries the
/// final, cumulative counts).
fn merge_usage(into: &mut Usage, v: &Value) {
    if let Some(n) = u(v, "input_tokens") {
        into.input_tokens = n;
    }
    if let Some(n) = u(v, "output_tokens") {
        into.output_tokens = n;
    }
    if let Some(n) = u(v, "cache_creation_input_tokens") {
        into.cache_creation_tokens = n;
    }
    if let Some(n) = u(v, "cache_read_input_tokens") {
        into.cache_read_tokens = n;
    }
}

impl Anthropic {
    pub fn new(settings: ApiSettings, client: reqwest::Client) -> Self {
        Self { settings, client }
    }

    fn url(&self) -> String {
        format!(
            "{}/v1/messages",
            self.settings
                .base_url
                .as_deref()
                .unwrap_or(DEFAULT_BASE_URL)
        )
    }

    pub async fn run(
        &self,
        p: &Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let model = p.model.clone().unwrap_or_else(|| DEFAULT_MODEL.to_string());
        let done = |output: AgentOutput, context| Report {
            output,
            backend: NAME,
            model: Some(model.clone()),
            context,
            session: None,
        };
        if self.settings.api_key.is_none() && self.settings.base_url.is_none() {
            return done(
                AgentOutput::failure(
                    FailureReason::BadRequest,
                    "the anthropic backend has no API key: set ANTHROPIC_API_KEY or [backends.anthropic] api_key",
                ),
                None,
            );
        }
        let mut messages = match chat::history(NAME, p.session.as_ref()) {
            Ok(m) => m,
            Err(message) => {
                return done(
                    AgentOutput::failure(FailureReason::BadRequest, message),
                    None,
                );
            }
        };
        messages.push(json!({"role": "user", "content": p.prompt}));
        let body = json!({
            "model": model,
            "max_tokens": self.settings.max_tokens.unwrap_or(8192),
            "system": p.profile.system_prompt,
            "messages": messages,
            "stream": true,
        });
        events.send(EventKind::Thinking);
        let mut spent = Spent::default();
        let result = http::with_retries(NAME, &self.settings, cancel, &mut spent, || {
            self.request(&body, events)
        })
        .await;
        let mut usage = spent.usage;
        let turn = match result {
            Ok(m) => {
                usage.add(&m.usage);
                let context = self.context_use(p, &model, &m.usage);
                let text = m.text.join("\n\n").trim().to_string();
                let outcome = match m.stop_reason.as_deref() {
                    Some("refusal") => Outcome::Failure {
                        reason: FailureReason::AgentError,
                        message: "the model refused to answer".into(),
                    },
                    _ if text.is_empty() && !m.tools.is_empty() => Outcome::Failure {
                        reason: FailureReason::AgentError,
                        message: format!(
                            "the model asked for tools ({}) but the anthropic backend runs none; use claude-code for this role",
                            m.tools.join(", ")
                        ),
                    },
                    stop => Turn::answered(&text, stop == Some("max_tokens"), &model),
                };
                Turn {
                    outcome,
                    text,
                    usage,
                    context,
                }
            }
            Err(e) => Turn::failed(e, usage),
        };
        turn.report(NAME, p, events, model, messages)
    }

    fn context_use(&self, p: &Prepared<'_>, model: &str, last: &Usage) -> Option<ContextUse> {
        let window = p.context_window(model)?;
        Some(ContextUse {
            tokens: last.input_tokens + last.cache_creation_tokens + last.cache_read_tokens,
            window,
        })
    }

    /// One streamed request.
    async fn request(&self, body: &Value, events: &Events) -> Result<Message, CallError> {
        let mut req = self
            .client
            .post(self.url())
            .timeout(self.settings.request_timeout)
            .header("anthropic-version", API_VERSION)
            .header("accept", "text/event-stream")
            .json(body);
        if let Some(key) = &self.settings.api_key {
            req = req.header("x-api-key", key.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::transport("request to the Messages API", &e))?;
        let status = resp.status();
        if !status.is_success() {
            let headers = resp.headers().clone();
            let text = resp.text().await.unwrap_or_default();
            return Err(CallError::status(NAME, status.as_u16(), &headers, &text));
        }
        let mut stream = resp.bytes_stream().eventsource();
        let mut reading = Reading::default();
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(|e| {
                let mut err = CallError::network(format!("the Messages API stream broke: {e}"));
                err.usage = reading.msg.usage;
                err
            })?;
            let data: Value = match serde_json::from_str(&ev.data) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let kind = data
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or(ev.event.as_str())
                .to_string();
            if reading.event(&kind, &data, events)? {
                return Ok(reading.msg);
            }
        }
        let mut err = CallError::network(if reading.started {
            "the Messages API stream ended before message_stop"
        } else {
            "the Messages API stream ended before message_start"
        });
        err.usage = reading.msg.usage;
        Err(err)
    }
}

/// What the stream of one request said so far.
#[derive(Default)]
struct Reading {
    blocks: BTreeMap<u64, Block>,
    msg: Message,
    started: bool,
    thinking: bool,
}

impl Reading {
    /// Takes one event of the stream; true once the message is complete (`message_stop`).
    fn event(&mut self, kind: &str, data: &Value, events: &Events) -> Result<bool, CallError> {
        match kind {
            "message_start" => {
                self.started = true;
                if let Some(usage) = data.pointer("/message/usage") {
                    merge_usage(&mut self.msg.usage, usage);
                }
            }
            "content_block_start" => self.block_start(data, events),
            "content_block_delta" => self.block_delta(data),
            "content_block_stop" => self.block_stop(data, events),
            "message_delta" => {
                if let Some(r) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.msg.stop_reason = Some(r.to_string());
                }
                if let Some(usage) = data.get("usage") {
                    merge_usage(&mut self.msg.usage, usage);
                }
            }
            "message_stop" => return Ok(true),
            "error" => {
                let kind = data
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let message = data
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let (reason, retryable) = http::error_type_reason(kind);
                let mut err = CallError::new(
                    reason,
                    retryable,
                    format!("{NAME} stream error {kind}: {message}"),
                );
                err.usage = self.msg.usage;
                return Err(err);
            }
            _ => {}
        }
        Ok(false)
    }

    fn block_start(&mut self, data: &Value, events: &Events) {
        let index = u(data, "index").unwrap_or(0);
        let cb = data.get("content_block").cloned().unwrap_or(Value::Null);
        let block = match cb.get("type").and_then(Value::as_str) {
            Some("text") => {
                Block::Text(cb.get("text").and_then(Value::as_str).unwrap_or("").into())
            }
            Some("tool_use") | Some("server_tool_use") => Block::Tool {
                id: cb.get("id").and_then(Value::as_str).unwrap_or("").into(),
                name: cb.get("name").and_then(Value::as_str).unwrap_or("").into(),
                json: String::new(),
            },
            Some("thinking") | Some("redacted_thinking") => {
                if !self.thinking {
                    self.thinking = true;
                    events.send(EventKind::Thinking);
                }
                Block::Other
            }
            _ => Block::Other,
        };
        self.blocks.insert(index, block);
    }

    fn block_delta(&mut self, data: &Value) {
        let index = u(data, "index").unwrap_or(0);
        let delta = data.get("delta").cloned().unwrap_or(Value::Null);
        match (
            self.blocks.get_mut(&index),
            delta.get("type").and_then(Value::as_str),
        ) {
            (Some(Block::Text(t)), Some("text_delta")) => {
                t.push_str(delta.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            (Some(Block::Tool { json, .. }), Some("input_json_delta")) => {
                json.push_str(
                    delta
                        .get("partial_json")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                );
            }
            _ => {}
        }
    }

    /// A finished block: text for the answer, or a tool call (reported, never run).
    fn block_stop(&mut self, data: &Value, events: &Events) {
        let index = u(data, "index").unwrap_or(0);
        match self.blocks.remove(&index) {
            Some(Block::Text(t)) if !t.is_empty() => {
                events.send(EventKind::Text { text: t.clone() });
                self.msg.text.push(t);
            }
            Some(Block::Tool { id, name, json }) => {
                let input: Value = if json.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&json).unwrap_or(Value::String(json))
                };
                events.send(EventKind::ToolCall {
                    call_id: id,
                    name: name.clone(),
                    input: input.to_string(),
                });
                self.msg.tools.push(name);
            }
            _ => {}
        }
    }
}
