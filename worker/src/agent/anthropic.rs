//! The `anthropic` backend: the Messages API (`POST /v1/messages`, `stream: true`) driven by
//! the tool loop ([`super::tool_loop`]): the role's system prompt, the conversation and the
//! role's native tools (`tools` with their JSON schemas) go out; `tool_use` blocks come back,
//! are run, and go back as `tool_result` blocks of a user message, until the model ends its
//! turn without a tool call. Prompt caching: `cache_control` breakpoints on the system prompt,
//! the tools and the end of the conversation, so the repeated prefix of every loop request
//! bills as cache reads.
//!
//! The stream is read event by event (`message_start` with the input-side usage,
//! `content_block_start/delta/stop` with text, thinking and `input_json_delta`, `message_delta`
//! with the stop reason and the final output tokens, `message_stop`, and `error`). Usage is the
//! provider's, summed over every request the job made (a stream cut after `message_start` was
//! billed too); cost comes from the price table.
//!
//! Sessions: the conversation is the JSON list of its messages in the Messages API's format
//! (see [`super::chat`]); a plain answer is stored as `{role: assistant, content: text}`, a
//! tool round as its content blocks.

use super::http::{self, CallError};
use super::tool_loop::{self, Api, Step};
use super::tools::{Call, Spec, ToolOutput};
use super::{AgentOutput, Events, Prepared, Report};
use crate::config::ApiSettings;
use eventsource_stream::Eventsource;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Usage};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "anthropic";
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
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
    /// The finished text and tool_use blocks, in order, as the API takes them back.
    content: Vec<Value>,
    calls: Vec<Call>,
    usage: Usage,
    stop_reason: Option<String>,
}

impl Message {
    fn step(self) -> Step {
        let text = self.text.join("\n\n");
        // A plain answer keeps the simple form sessions always had.
        let assistant = if self.calls.is_empty() {
            json!({"role": "assistant", "content": text.trim()})
        } else {
            json!({"role": "assistant", "content": self.content})
        };
        Step {
            refused: (self.stop_reason.as_deref() == Some("refusal"))
                .then(|| "the model refused to answer".to_string()),
            cut: self.stop_reason.as_deref() == Some("max_tokens"),
            text,
            calls: self.calls,
            usage: self.usage,
            assistant,
        }
    }
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

    /// This backend on one credential of the pool, for one job: a 429 is not retried in
    /// place but reported to the limit broker.
    pub fn on_credential(&self, key: &crate::config::Secret) -> Self {
        let mut settings = self.settings.clone();
        settings.api_key = Some(key.clone());
        settings.park_on_limit = true;
        Self::new(settings, self.client.clone())
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
        if self.settings.api_key.is_none() && self.settings.base_url.is_none() {
            return Report {
                parked: None,
                output: AgentOutput::failure(
                    FailureReason::BadRequest,
                    "the anthropic backend has no API key: set ANTHROPIC_API_KEY or [backends.anthropic] api_key",
                ),
                backend: NAME,
                model: Some(model),
                context: None,
                session: None,
            };
        }
        tool_loop::run(self, p, events, cancel, model).await
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

impl Api for Anthropic {
    const NAME: &'static str = NAME;

    fn settings(&self) -> &ApiSettings {
        &self.settings
    }

    fn body(&self, model: &str, system: &str, messages: &[Value], tools: &[Spec]) -> Value {
        // Prompt caching: breakpoints after the system prompt, after the tools and at the end
        // of the conversation so far (its last block, when it has blocks: a tool round), so
        // every further request of the loop reads the prefix from the cache. The stored
        // conversation keeps no marker.
        let cached = json!({"type": "ephemeral"});
        let mut sent = messages.to_vec();
        if let Some(block) = sent
            .last_mut()
            .and_then(|m| m.get_mut("content"))
            .and_then(Value::as_array_mut)
            .and_then(|blocks| blocks.last_mut())
        {
            block["cache_control"] = cached.clone();
        }
        let mut body = json!({
            "model": model,
            "max_tokens": self.settings.max_tokens.unwrap_or(8192),
            "system": [{"type": "text", "text": system, "cache_control": cached}],
            "messages": sent,
            "stream": true,
        });
        if !tools.is_empty() {
            let mut defs: Vec<Value> = tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.schema}))
                .collect();
            if let Some(last) = defs.last_mut() {
                last["cache_control"] = cached;
            }
            body["tools"] = Value::Array(defs);
        }
        body
    }

    fn send<'a>(
        &'a self,
        body: &'a Value,
        events: &'a Events,
    ) -> BoxFuture<'a, Result<Step, CallError>> {
        self.request(body, events)
            .map(|r| r.map(Message::step))
            .boxed()
    }

    fn results(&self, calls: &[Call], outputs: &[ToolOutput]) -> Vec<Value> {
        let blocks: Vec<Value> = calls
            .iter()
            .zip(outputs)
            .map(|(c, o)| {
                json!({"type": "tool_result", "tool_use_id": c.id, "content": o.text, "is_error": o.is_error})
            })
            .collect();
        vec![json!({"role": "user", "content": blocks})]
    }

    fn elide_results(&self, message: &mut Value) -> usize {
        let mut saved = 0;
        let blocks = message.get_mut("content").and_then(Value::as_array_mut);
        for b in blocks.into_iter().flatten() {
            if b.get("type").and_then(Value::as_str) != Some("tool_result") {
                continue;
            }
            if let Some(text) = b.get("content").and_then(Value::as_str)
                && !text.starts_with("[tool result elided")
            {
                saved += text.len();
                b["content"] = json!(tool_loop::elided(text.len()));
            }
        }
        saved
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

    /// A finished block: text for the answer, or a tool call (the loop reports and runs it).
    fn block_stop(&mut self, data: &Value, events: &Events) {
        let index = u(data, "index").unwrap_or(0);
        match self.blocks.remove(&index) {
            Some(Block::Text(t)) if !t.is_empty() => {
                events.send(EventKind::Text { text: t.clone() });
                self.msg
                    .content
                    .push(json!({"type": "text", "text": t.clone()}));
                self.msg.text.push(t);
            }
            Some(Block::Tool { id, name, json }) => {
                let input: Value = if json.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&json).unwrap_or(Value::String(json))
                };
                self.msg.content.push(
                    json!({"type": "tool_use", "id": id.clone(), "name": name.clone(), "input": input.clone()}),
                );
                self.msg.calls.push(Call { id, name, input });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Anthropic {
        let settings = crate::config::from_flags(Vec::<std::ffi::OsString>::new())
            .unwrap()
            .backends
            .anthropic;
        Anthropic::new(settings, reqwest::Client::new())
    }

    #[test]
    fn tool_results_go_back_as_blocks_and_can_be_elided_once() {
        let a = api();
        let calls = [Call {
            id: "t1".into(),
            name: "bash".into(),
            input: json!({"command": "false"}),
        }];
        let mut msgs = a.results(&calls, &[ToolOutput::error("boom")]);
        assert_eq!(
            msgs[0],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                   "content": "boom", "is_error": true}]})
        );
        assert_eq!(a.elide_results(&mut msgs[0]), 4);
        assert_eq!(
            msgs[0]["content"][0]["content"],
            "[tool result elided to save context: 4 bytes]"
        );
        assert_eq!(a.elide_results(&mut msgs[0]), 0);
        let mut text = json!({"role": "user", "content": "hello"});
        assert_eq!(a.elide_results(&mut text), 0);
    }
}
