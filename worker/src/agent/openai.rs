//! The `openai` backend: any OpenAI-compatible chat-completions server (vLLM, llama.cpp
//! server, Ollama, OpenAI itself), so cheap or local models can serve simple roles.
//!
//! One streamed request (`POST {base}/chat/completions`, `stream: true`,
//! `stream_options: {include_usage: true}`) with the role's system prompt and the job's
//! prompt. The answer arrives as `data: {"choices":[{"delta":{"content":...}}]}` lines ending
//! with `data: [DONE]`; the usage comes in a last chunk with no choices. Cached prompt tokens
//! (`prompt_tokens_details.cached_tokens`) count as cache reads. Retries as for `anthropic`.
//!
//! Sessions as for `anthropic`: the stored conversation is its `{role, content}` messages
//! without the system message, which every turn sends first.

use super::chat::{self, Turn};
use super::http::{self, CallError, Spent};
use super::{ContextUse, Events, Prepared, Report};
use crate::config::ApiSettings;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Outcome, Usage};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "openai";

pub struct OpenAi {
    settings: ApiSettings,
    client: reqwest::Client,
}

struct Answer {
    text: String,
    usage: Option<Usage>,
    finish_reason: Option<String>,
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
        let Some(base) = self.settings.base_url.as_deref() else {
            return fail(
                FailureReason::BadRequest,
                "the openai backend has no server: set OPENAI_BASE_URL or [backends.openai] base_url".into(),
            );
        };
        let Some(model) = p.model.clone() else {
            return fail(
                FailureReason::BadRequest,
                "the openai backend has no model: submit with --model or set [backends.openai] model".into(),
            );
        };
        let url = format!("{base}/chat/completions");
        let mut messages = match chat::history(NAME, p.session.as_ref()) {
            Ok(m) => m,
            Err(message) => return fail(FailureReason::BadRequest, message),
        };
        messages.push(json!({"role": "user", "content": p.prompt}));
        let mut sent = vec![json!({"role": "system", "content": p.profile.system_prompt})];
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
        events.send(EventKind::Thinking);
        let mut spent = Spent::default();
        let result = http::with_retries(NAME, &self.settings, cancel, &mut spent, || {
            self.request(&url, &body, events)
        })
        .await;
        let mut usage = spent.usage;
        let turn = match result {
            Ok(a) => {
                let last = a.usage.unwrap_or_default();
                if a.usage.is_none() {
                    tracing::debug!(model = %model, "the server reported no usage");
                }
                usage.add(&last);
                let context = p.context_window(&model).map(|window| ContextUse {
                    tokens: last.input_tokens + last.cache_read_tokens,
                    window,
                });
                let text = a.text.trim().to_string();
                if !text.is_empty() {
                    events.send(EventKind::Text { text: text.clone() });
                }
                let outcome = match a.finish_reason.as_deref() {
                    Some("content_filter") => Outcome::Failure {
                        reason: FailureReason::AgentError,
                        message: "the server's content filter stopped the answer".into(),
                    },
                    finish => Turn::answered(&text, finish == Some("length"), &model),
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

    async fn request(&self, url: &str, body: &Value, events: &Events) -> Result<Answer, CallError> {
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
        let mut answer = Answer {
            text: String::new(),
            usage: None,
            finish_reason: None,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

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
