//! The `openai` backend: any OpenAI-compatible chat-completions server (vLLM, llama.cpp
//! server, Ollama, OpenAI itself), so cheap or local models can serve simple roles.
//!
//! Driven by the tool loop ([`super::tool_loop`]): each request (`POST {base}/chat/completions`,
//! `stream: true`, `stream_options: {include_usage: true}`) carries the system prompt, the
//! conversation and the role's native tools as `tools` (functions). The answer arrives as
//! `data: {"choices":[{"delta":{"content":...}}]}` lines ending with `data: [DONE]`; tool calls
//! as `delta.tool_calls` pieces (by index: id and name first, then the arguments in parts),
//! answered with one `tool` message per call; the usage comes in a last chunk with no choices. Cached prompt tokens
//! (`prompt_tokens_details.cached_tokens`) count as cache reads. Retries as for `anthropic`.
//!
//! Sessions as for `anthropic`: the stored conversation is its messages (tool rounds
//! included) without the system message, which every request sends first.

use super::http::{self, CallError};
use super::tool_loop::{self, Api, Step};
use super::tools::{Call, Spec, ToolOutput};
use super::{Events, Prepared, Report};
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

pub const NAME: &str = "openai";

pub struct OpenAi {
    settings: ApiSettings,
    client: reqwest::Client,
}

#[derive(Default)]
struct Answer {
    text: String,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    /// Tool calls by index: id, function name, arguments (JSON text streamed in pieces).
    calls: BTreeMap<u64, (String, String, String)>,
}

impl Answer {
    /// A piece of a streamed tool call: the first piece of each has its id and name.
    fn tool_delta(&mut self, d: &Value) {
        let index = d.get("index").and_then(Value::as_u64).unwrap_or(0);
        let entry = self.calls.entry(index).or_default();
        let s = |p: &str| d.pointer(p).and_then(Value::as_str).unwrap_or("");
        // Some servers repeat the id and name in every piece: only the first one counts.
        if entry.0.is_empty() {
            entry.0 = s("/id").to_string();
        }
        if entry.1.is_empty() {
            entry.1 = s("/function/name").to_string();
        }
        entry.2.push_str(s("/function/arguments"));
    }

    fn step(self) -> Step {
        let text = self.text.trim().to_string();
        let calls: Vec<Call> = self
            .calls
            .into_values()
            .map(|(id, name, args)| Call {
                id,
                name,
                input: if args.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&args).unwrap_or(Value::String(args))
                },
            })
            .collect();
        let mut assistant = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            if text.is_empty() {
                assistant["content"] = Value::Null;
            }
            assistant["tool_calls"] = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.input.to_string()}})
                })
                .collect();
        }
        Step {
            refused: (self.finish_reason.as_deref() == Some("content_filter"))
                .then(|| "the server's content filter stopped the answer".to_string()),
            cut: self.finish_reason.as_deref() == Some("length"),
            usage: self.usage.unwrap_or_else(|| {
                tracing::debug!("the server reported no usage");
                Usage::default()
            }),
            text,
            calls,
            assistant,
        }
    }
}

/// The provider's usage object as token kinds.
fn usage_of(v: &Value) -> Usage {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let prompt = n("/prompt_tokens");
    let cached = n("/prompt_tokens_details/cached_tokens").min(prompt);
    Usage {
        input_tokens: prompt - cached,
        output_tokens: n("/completion_tokens"),
        cache_creation_tokens: 0,
        cache_read_tokens: cached,
    }
}

impl OpenAi {
    pub fn new(settings: ApiSettings, client: reqwest::Client) -> Self {
        Self { settings, client }
    }

    /// This backend on one credential of the pool, for one job (see
    /// [`super::anthropic::Anthropic::on_credential`]).
    pub fn on_credential(&self, key: &crate::config::Secret) -> Self {
        let mut settings = self.settings.clone();
        settings.api_key = Some(key.clone());
        settings.park_on_limit = true;
        Self::new(settings, self.client.clone())
    }

    pub async fn run(
        &self,
        p: &Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let fail = |reason, message: String| Report {
            model: p.model.clone(),
            ..Report::failure(NAME, reason, message)
        };
        if self.settings.base_url.is_none() {
            return fail(
                FailureReason::BadRequest,
                "the openai backend has no server: set OPENAI_BASE_URL or [backends.openai] base_url".into(),
            );
        }
        let Some(model) = p.model.clone() else {
            return fail(
                FailureReason::BadRequest,
                "the openai backend has no model: submit with --model or set [backends.openai] model".into(),
            );
        };
        tool_loop::run(self, p, events, cancel, model).await
    }

    async fn request(&self, body: &Value, events: &Events) -> Result<Answer, CallError> {
        let url = format!(
            "{}/chat/completions",
            self.settings.base_url.as_deref().unwrap_or_default()
        );
        let mut req = self
            .client
            .post(url)
            .timeout(self.settings.request_timeout)
            .header("accept", "text/event-stream")
            .json(body);
        if let Some(key) = &self.settings.api_key {
            req = req.bearer_auth(key.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::transport("request to the chat-completions server", &e))?;
        let status = resp.status();
        if !status.is_success() {
            let headers = resp.headers().clone();
            let text = resp.text().await.unwrap_or_default();
            return Err(CallError::status(NAME, status.as_u16(), &headers, &text));
        }
        let mut stream = resp.bytes_stream().eventsource();
        let mut answer = Answer::default();
        let mut thinking = false;
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(|e| {
                CallError::network(format!("the chat-completions stream broke: {e}"))
            })?;
            let data = ev.data.trim();
            if data == "[DONE]" {
                return Ok(answer);
            }
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(err) = chunk.get("error") {
                let kind = err
                    .get("type")
                    .or_else(|| err.get("code"))
                    .and_then(Value::as_str)
                    .unwrap_or("server_error");
                let message = err.get("message").and_then(Value::as_str).unwrap_or("");
                let (reason, retryable) = http::error_type_reason(kind);
                return Err(CallError::new(
                    reason,
                    retryable,
                    format!("{NAME} stream error {kind}: {message}"),
                ));
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                answer.usage = Some(usage_of(u));
            }
            let Some(choice) = chunk.pointer("/choices/0") else {
                continue;
            };
            if let Some(t) = choice.pointer("/delta/content").and_then(Value::as_str) {
                answer.text.push_str(t);
            }
            for call in choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                answer.tool_delta(call);
            }
            let reasoning = ["/delta/reasoning_content", "/delta/reasoning"]
                .iter()
                .any(|p| {
                    choice
                        .pointer(p)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                });
            if reasoning && !thinking {
                thinking = true;
                events.send(EventKind::Thinking);
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                answer.finish_reason = Some(r.to_string());
            }
        }
        // Some servers close the stream without `[DONE]`; a finished choice is still whole.
        if answer.finish_reason.is_some() {
            return Ok(answer);
        }
        Err(CallError::network(
            "the chat-completions stream ended before the answer finished",
        ))
    }
}

impl Api for OpenAi {
    const NAME: &'static str = NAME;

    fn settings(&self) -> &ApiSettings {
        &self.settings
    }

    fn body(&self, model: &str, system: &str, messages: &[Value], tools: &[Spec]) -> Value {
        let mut sent = vec![json!({"role": "system", "content": system})];
        sent.extend(messages.iter().cloned());
        let mut body = json!({
            "model": model,
            "messages": sent,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(max) = self.settings.max_tokens {
            body["max_tokens"] = json!(max);
        }
        if !tools.is_empty() {
            body["tools"] = tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.schema}})
                })
                .collect();
        }
        body
    }

    fn send<'a>(
        &'a self,
        body: &'a Value,
        events: &'a Events,
    ) -> BoxFuture<'a, Result<Step, CallError>> {
        self.request(body, events)
            .map(|r| {
                r.map(|a| {
                    let step = a.step();
                    if !step.text.is_empty() {
                        events.send(EventKind::Text {
                            text: step.text.clone(),
                        });
                    }
                    step
                })
            })
            .boxed()
    }

    /// One `tool` message per call (the API has no error flag: an error says so in its text).
    fn results(&self, calls: &[Call], outputs: &[ToolOutput]) -> Vec<Value> {
        calls
            .iter()
            .zip(outputs)
            .map(|(c, o)| {
                let content = if o.is_error {
                    format!("error: {}", o.text)
                } else {
                    o.text.clone()
                };
                json!({"role": "tool", "tool_call_id": c.id, "content": content})
            })
            .collect()
    }

    fn elide_results(&self, message: &mut Value) -> usize {
        if message.get("role").and_then(Value::as_str) != Some("tool") {
            return 0;
        }
        match message.get("content").and_then(Value::as_str) {
            Some(text) if !text.starts_with("[tool result elided") => {
                let saved = text.len();
                message["content"] = json!(tool_loop::elided(saved));
                saved
            }
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_tool_calls_are_put_together_by_index() {
        let mut a = Answer::default();
        for d in [
            json!({"index": 1, "id": "c2", "function": {"name": "search", "arguments": ""}}),
            json!({"index": 0, "id": "c1", "function": {"name": "read_file", "arguments": "{\"pa"}}),
            json!({"index": 0, "id": "c1", "function": {"arguments": "th\": \"a\"}"}}),
            json!({"index": 1, "function": {"arguments": "{\"pattern\": \"x\"}"}}),
        ] {
            a.tool_delta(&d);
        }
        a.finish_reason = Some("tool_calls".into());
        let step = a.step();
        assert_eq!(
            step.calls,
            [
                Call {
                    id: "c1".into(),
                    name: "read_file".into(),
                    input: json!({"path": "a"})
                },
                Call {
                    id: "c2".into(),
                    name: "search".into(),
                    input: json!({"pattern": "x"})
                },
            ]
        );
        assert_eq!(step.assistant["content"], Value::Null);
        assert_eq!(
            step.assistant["tool_calls"][1]["function"]["name"],
            "search"
        );
    }

    #[test]
    fn cached_prompt_tokens_are_cache_reads() {
        let u = usage_of(&json!({"prompt_tokens": 100, "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 60}}));
        assert_eq!(
            u,
            Usage {
                input_tokens: 40,
                output_tokens: 7,
                cache_creation_tokens: 0,
                cache_read_tokens: 60
            }
        );
        assert_eq!(usage_of(&json!({})).total(), 0);
    }
}
