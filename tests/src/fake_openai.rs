//! A fake OpenAI-compatible chat-completions server on 127.0.0.1 (what vLLM, llama.cpp server
//! and Ollama speak): the remote side of the `openai` backend.
//!
//! Each `POST /v1/chat/completions` takes the next [`Reply`] of the script (then a 500). A
//! streamed answer is `data: {"object":"chat.completion.chunk","choices":[{"delta":...}]}`
//! lines (the role, the content in pieces, then `finish_reason`), a last chunk with no choices
//! and the usage when the request asked for it (`stream_options.include_usage`), then
//! `data: [DONE]`. Tool calls stream as `delta.tool_calls` pieces (id and name, then the
//! arguments in parts) with `finish_reason: tool_calls`. Errors come as a status with OpenAI's error body and `retry-after`. Every
//! request is recorded and the usage served is summed.

use crate::fake_anthropic::{Recorded, chunked, headers_of, serve};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Token counts as an OpenAI-compatible server reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChatUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Part of `prompt_tokens` served from the server's prompt cache.
    pub cached_tokens: u64,
}

/// What the fake answers to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Answer {
        text: String,
        /// Streamed as `reasoning_content` before the answer (as vLLM does for reasoning models).
        reasoning: Option<String>,
        usage: ChatUsage,
        finish_reason: String,
    },
    /// Tool calls (function name, arguments), streamed as `delta.tool_calls` pieces, ending
    /// with `finish_reason: tool_calls`.
    ToolCalls {
        calls: Vec<(String, Value)>,
        usage: ChatUsage,
    },
    Error {
        status: u16,
        message: String,
        retry_after: Option<String>,
    },
    Delayed(Duration, Box<Reply>),
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::Answer {
            text: text.into(),
            reasoning: None,
            usage: ChatUsage {
                prompt_tokens: 210,
                completion_tokens: 42,
                cached_tokens: 64,
            },
            finish_reason: "stop".into(),
        }
    }

    /// Calls of the tools named, in parallel, with the default usage of [`Reply::text`].
    pub fn tool_calls<'a>(calls: impl IntoIterator<Item = (&'a str, Value)>) -> Reply {
        Reply::ToolCalls {
            calls: calls.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
            usage: ChatUsage {
                prompt_tokens: 210,
                completion_tokens: 42,
                cached_tokens: 64,
            },
        }
    }

    pub fn with_usage(self, prompt: u64, completion: u64, cached: u64) -> Reply {
        let usage = ChatUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        };
        match self {
            Reply::ToolCalls { calls, .. } => Reply::ToolCalls { calls, usage },
            Reply::Answer {
                text,
                reasoning,
                finish_reason,
                ..
            } => Reply::Answer {
                text,
                reasoning,
                finish_reason,
                usage,
            },
            other => other,
        }
    }

    pub fn status(status: u16) -> Reply {
        Reply::Error {
            status,
            message: format!("the fake answered {status}"),
            retry_after: None,
        }
    }

    /// 429 with `retry-after: secs`.
    pub fn rate_limited(secs: u64) -> Reply {
        Reply::Error {
            status: 429,
            message: "Rate limit reached".into(),
            retry_after: Some(secs.to_string()),
        }
    }
}

#[derive(Debug)]
struct Inner {
    script: VecDeque<Reply>,
    requests: Vec<Recorded>,
    served: ChatUsage,
    answers: u64,
    /// Bearer tokens at their usage limit, until when.
    exhausted: std::collections::BTreeMap<String, Instant>,
}

/// The fake server; stops when dropped.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1` (what `OPENAI_BASE_URL` takes).
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeOpenAi {
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> FakeOpenAi {
        let inner = Arc::new(Mutex::new(Inner {
            script: script.into_iter().collect(),
            requests: vec![],
            served: ChatUsage::default(),
            answers: 0,
            exhausted: std::collections::BTreeMap::new(),
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, server) = serve(app).await;
        FakeOpenAi {
            url: format!("http://{addr}/v1"),
            inner,
            server,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Requests with `Authorization: Bearer key` get a 429 for `period` from now, without
    /// taking a scripted reply.
    pub fn exhaust_key(&self, key: &str, period: Duration) {
        self.inner
            .lock()
            .unwrap()
            .exhausted
            .insert(key.to_string(), Instant::now() + period);
    }

    /// The usage of every answer served (only those whose request asked for usage).
    pub fn served_usage(&self) -> ChatUsage {
        self.inner.lock().unwrap().served
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = headers_of(req.headers());
    let bytes = axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut reply = {
        let mut i = inner.lock().unwrap();
        i.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            headers,
            body: body.clone(),
            at: Instant::now(),
        });
        if method != Method::POST || path != "/v1/chat/completions" {
            return (StatusCode::NOT_FOUND, "not a chat-completions route").into_response();
        }
        let token = i
            .requests
            .last()
            .and_then(|r| r.headers.get("authorization"))
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::to_string);
        if let Some(until) = token.and_then(|t| i.exhausted.get(&t).copied())
            && Instant::now() < until
        {
            // As OpenAI answers a key over its limit: 429, `retry-after` and `x-ratelimit-*`.
            let wait = until.saturating_duration_since(Instant::now());
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}})),
            )
                .into_response();
            let h = resp.headers_mut();
            h.insert(
                "retry-after",
                wait.as_secs_f64()
                    .ceil()
                    .max(1.0)
                    .to_string()
                    .parse()
                    .expect("a header value"),
            );
            h.insert(
                "x-ratelimit-limit-requests",
                "10".parse().expect("a header value"),
            );
            h.insert(
                "x-ratelimit-remaining-requests",
                "0".parse().expect("a header value"),
            );
            return resp;
        }
        i.script.pop_front().unwrap_or_else(|| Reply::status(500))
    };
    while let Reply::Delayed(d, r) = reply {
        tokio::time::sleep(d).await;
        reply = *r;
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model")
        .to_string();
    match reply {
        Reply::Delayed(..) => unreachable!("unwrapped above"),
        Reply::Error {
            status,
            message,
            retry_after,
        } => {
            let kind = if status == 429 {
                "rate_limit_exceeded"
            } else {
                "server_error"
            };
            let mut resp = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                axum::Json(json!({"error": {"message": message, "type": kind, "code": null}})),
            )
                .into_response();
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", ra.parse().expect("a header value"));
            }
            resp
        }
        Reply::ToolCalls { calls, usage } => {
            let include_usage = serve_usage(&inner, &body, &usage);
            let n = {
                let mut i = inner.lock().unwrap();
                i.answers += 1;
                i.answers
            };
            let chunk = |choices: Value, usage: Value| {
                json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
                       "model": model, "choices": choices, "usage": usage})
            };
            let mut lines = vec![chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": null}, "finish_reason": null}]),
                Value::Null,
            )];
            for (index, (name, args)) in calls.iter().enumerate() {
                lines.push(chunk(
                    json!([{"index": 0, "delta": {"tool_calls": [{"index": index, "id": format!("call_fake_{n}_{index}"),
                        "type": "function", "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}]),
                    Value::Null,
                ));
                let args: Vec<char> = args.to_string().chars().collect();
                for piece in args.chunks(args.len().div_ceil(3).max(1)) {
                    let piece: String = piece.iter().collect();
                    lines.push(chunk(
                        json!([{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, "finish_reason": null}]),
                        Value::Null,
                    ));
                }
            }
            lines.push(chunk(
                json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
                Value::Null,
            ));
            if include_usage {
                lines.push(chunk(json!([]), usage_json(&usage)));
            }
            done(lines)
        }
        Reply::Answer {
            text,
            reasoning,
            usage,
            finish_reason,
        } => {
            let include_usage = serve_usage(&inner, &body, &usage);
            let chunk = |choices: Value, usage: Value| {
                json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
                       "model": model, "choices": choices, "usage": usage})
            };
            let mut lines = vec![chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                Value::Null,
            )];
            if let Some(r) = reasoning {
                lines.push(chunk(
                    json!([{"index": 0, "delta": {"reasoning_content": r}, "finish_reason": null}]),
                    Value::Null,
                ));
            }
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(chars.len().div_ceil(4).max(1)) {
                let piece: String = piece.iter().collect();
                lines.push(chunk(
                    json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]),
                    Value::Null,
                ));
            }
            lines.push(chunk(
                json!([{"index": 0, "delta": {}, "finish_reason": finish_reason}]),
                Value::Null,
            ));
            if include_usage {
                lines.push(chunk(json!([]), usage_json(&usage)));
            }
            done(lines)
        }
    }
}

/// Counts `usage` as served when the request asked for it; whether it did.
fn serve_usage(inner: &Arc<Mutex<Inner>>, body: &Value, usage: &ChatUsage) -> bool {
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if include_usage {
        let mut i = inner.lock().unwrap();
        i.served.prompt_tokens += usage.prompt_tokens;
        i.served.completion_tokens += usage.completion_tokens;
        i.served.cached_tokens += usage.cached_tokens;
    }
    include_usage
}

fn usage_json(usage: &ChatUsage) -> Value {
    json!({"prompt_tokens": usage.prompt_tokens,
           "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.prompt_tokens + usage.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}})
}

/// The stream of `lines`, then `[DONE]`.
fn done(lines: Vec<Value>) -> Response {
    let mut text: String = lines.iter().map(|l| format!("data: {l}\n\n")).collect();
    text.push_str("data: [DONE]\n\n");
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(chunked(text))
        .expect("a response")
}
