//! A fake Anthropic Messages API on 127.0.0.1 (axum, port 0): the remote side of the
//! `anthropic` and `claude-code` backends, so they run for real (the real Claude Code CLI
//! included) without the network.
//!
//! Each `POST /v1/messages` takes the next [`Reply`] of the script (then the fallback, by
//! default a 500) and answers it as the API does: a `text/event-stream` of `message_start`
//! (with the input-side usage), `content_block_start` / `content_block_delta` (`text_delta`,
//! `input_json_delta` in several pieces) / `content_block_stop`, `message_delta` (stop reason
//! and output tokens), `message_stop`, sent in small chunks that cut lines apart; or an error
//! status with the API's error body and `retry-after`; or an `error` event mid-stream. A
//! request without `stream: true` gets the whole message as JSON. `HEAD` answers 200 (older
//! CLIs probe with it). Every request is recorded, and the usage of every message served is
//! summed: that is what the provider reported.
//!
//! A tool call's input may name [`CWD`] in its strings: the fake puts there the working
//! directory the Claude Code CLI states in its request, so a script can write absolute
//! paths into a workspace the worker chooses (a git clone in its data directory).

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use orch_shared::job::Usage;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stands for the requester's working directory in a scripted tool input (see the module docs).
pub const CWD: &str = "{cwd}";

/// The working directory a Claude Code request states (in its first message's environment
/// notes, or its system prompt).
fn working_directory(body: &Value) -> Option<String> {
    fn find(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => ["Primary working directory: ", "Working directory: "]
                .iter()
                .find_map(|label| {
                    let at = s.find(label)? + label.len();
                    let line = s[at..].lines().next()?.trim();
                    (!line.is_empty()).then(|| line.to_string())
                }),
            Value::Array(items) => items.iter().find_map(find),
            Value::Object(map) => map.values().find_map(find),
            _ => None,
        }
    }
    find(body.get("system")?).or_else(|| find(body.get("messages")?))
}

/// `v` with [`CWD`] replaced by `cwd` in every string.
fn with_cwd(v: &Value, cwd: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace(CWD, cwd)),
        Value::Array(items) => Value::Array(items.iter().map(|i| with_cwd(i, cwd)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, i)| (k.clone(), with_cwd(i, cwd)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// One content block of a scripted message.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    Text(String),
    ToolUse { name: String, input: Value },
    Thinking(String),
}

/// What the fake answers to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A message, streamed.
    Message {
        blocks: Vec<Block>,
        usage: Usage,
        /// Default: `tool_use` when a block is one, else `end_turn`.
        stop_reason: Option<String>,
    },
    /// An HTTP error with the API's error body.
    Error {
        status: u16,
        error_type: String,
        message: String,
        retry_after: Option<String>,
    },
    /// A 200 stream that starts a message (its input usage, and the one output token that
    /// `message_start` always reports, are billed) and then sends an `error` event.
    StreamError {
        error_type: String,
        message: String,
        usage: Usage,
    },
    /// Waits, then answers.
    Delayed(Duration, Box<Reply>),
}

/// The usage scripted replies get unless told otherwise: every kind non-zero.
pub fn default_usage() -> Usage {
    Usage {
        input_tokens: 120,
        output_tokens: 30,
        cache_creation_tokens: 40,
        cache_read_tokens: 900,
    }
}

impl Reply {
    /// A text answer.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::Message {
            blocks: vec![Block::Text(text.into())],
            usage: default_usage(),
            stop_reason: None,
        }
    }

    /// A call of tool `name` with `input` (streamed as `input_json_delta` pieces).
    pub fn tool_use(name: impl Into<String>, input: Value) -> Reply {
        Reply::Message {
            blocks: vec![Block::ToolUse {
                name: name.into(),
                input,
            }],
            usage: default_usage(),
            stop_reason: None,
        }
    }

    /// Several tool calls in one message (the model asks for them in parallel).
    pub fn tool_uses<'a>(calls: impl IntoIterator<Item = (&'a str, Value)>) -> Reply {
        Reply::Message {
            blocks: calls
                .into_iter()
                .map(|(name, input)| Block::ToolUse {
                    name: name.into(),
                    input,
                })
                .collect(),
            usage: default_usage(),
            stop_reason: None,
        }
    }

    /// The same message with other usage.
    pub fn with_usage(self, input: u64, output: u64, cache_write: u64, cache_read: u64) -> Reply {
        match self {
            Reply::Message {
                blocks,
                stop_reason,
                ..
            } => Reply::Message {
                blocks,
                stop_reason,
                usage: Usage {
                    input_tokens: input,
                    output_tokens: output,
                    cache_creation_tokens: cache_write,
                    cache_read_tokens: cache_read,
                },
            },
            other => other,
        }
    }

    /// An error status with the API's error type for it.
    pub fn status(status: u16) -> Reply {
        let (error_type, message) = match status {
            400 => ("invalid_request_error", "the request is not valid"),
            401 => ("authentication_error", "invalid x-api-key"),
            429 => ("rate_limit_error", "rate limited by the fake"),
            529 => ("overloaded_error", "the fake is overloaded"),
            _ => ("api_error", "the fake failed"),
        };
        Reply::Error {
            status,
            error_type: error_type.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 with `retry-after: secs`.
    pub fn rate_limited(secs: u64) -> Reply {
        match Reply::status(429) {
            Reply::Error {
                status,
                error_type,
                message,
                ..
            } => Reply::Error {
                status,
                error_type,
                message,
                retry_after: Some(secs.to_string()),
            },
            other => other,
        }
    }

    pub fn after(self, delay: Duration) -> Reply {
        Reply::Delayed(delay, Box::new(self))
    }
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    pub at: Instant,
}

#[derive(Debug)]
struct Inner {
    script: VecDeque<Reply>,
    fallback: Reply,
    requests: Vec<Recorded>,
    served: Usage,
    messages: usize,
    next_id: u64,
    /// [`FakeAnthropic::start_rounds`]: tool rounds per conversation and the answer's delay.
    rounds: Option<(usize, Duration)>,
    /// The tool call of each round (`list_files` unless [`FakeAnthropic::start_rounds_calling`]).
    round_call: Option<(String, Value)>,
    /// Usage limits per API key (`x-api-key`).
    limits: BTreeMap<String, KeyLimit>,
}

/// A usage limit on one API key, as a provider enforces it: exhausted until a time, or a
/// fixed window of so many requests.
#[derive(Debug, Clone)]
struct KeyLimit {
    blocked_until: Option<Instant>,
    window: Option<Window>,
}

#[derive(Debug, Clone)]
struct Window {
    max: u32,
    period: Duration,
    start: Instant,
    used: u32,
}

impl KeyLimit {
    /// `Some(reset)` when this request is over the limit; counts it otherwise.
    fn check(&mut self, now: Instant) -> (Option<Instant>, Option<(u32, u32, Instant)>) {
        if let Some(until) = self.blocked_until {
            if now < until {
                return (Some(until), Some((0, 0, until)));
            }
            self.blocked_until = None;
        }
        let Some(w) = &mut self.window else {
            return (None, None);
        };
        while now >= w.start + w.period {
            w.start += w.period;
            w.used = 0;
        }
        let reset = w.start + w.period;
        if w.used >= w.max {
            return (Some(reset), Some((w.max, 0, reset)));
        }
        w.used += 1;
        (None, Some((w.max, w.max - w.used, reset)))
    }
}

/// `at` (an `Instant`) as an RFC 3339 wall-clock time, as `anthropic-ratelimit-*-reset` says.
fn rfc3339(at: Instant) -> String {
    let wall = std::time::SystemTime::now() + at.saturating_duration_since(Instant::now());
    humantime::format_rfc3339_seconds(wall).to_string()
}

/// The headers of a response on a limited key: the window's figures, and on a 429 the
/// `retry-after` (whole seconds, rounded up) until the reset.
fn limit_headers(resp: &mut Response, figures: (u32, u32, Instant), limited: bool) {
    let (max, remaining, reset) = figures;
    let h = resp.headers_mut();
    let mut set = |name: &'static str, v: String| {
        h.insert(name, v.parse().expect("a header value"));
    };
    set("anthropic-ratelimit-requests-limit", max.to_string());
    set(
        "anthropic-ratelimit-requests-remaining",
        remaining.to_string(),
    );
    set("anthropic-ratelimit-requests-reset", rfc3339(reset));
    if limited {
        let wait = reset.saturating_duration_since(Instant::now());
        set(
            "retry-after",
            wait.as_secs_f64().ceil().max(1.0).to_string(),
        );
    }
}

/// The fake API; stops when dropped.
pub struct FakeAnthropic {
    /// `http://127.0.0.1:PORT` (what `ANTHROPIC_BASE_URL` takes: no `/v1`).
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Serves `app` on a free loopback port in the current runtime.
pub(crate) async fn serve(app: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// The body of a streamed response, cut into small chunks (lines are split across them, as
/// a real network does).
pub(crate) fn chunked(text: String) -> Body {
    let bytes = text.into_bytes();
    let chunks: Vec<Result<Vec<u8>, Infallible>> =
        bytes.chunks(61).map(|c| Ok(c.to_vec())).collect();
    Body::from_stream(futures::stream::iter(chunks))
}

pub(crate) fn headers_of(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn sse(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}

/// `s` in `n` roughly equal pieces (on char boundaries).
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

impl FakeAnthropic {
    /// A worker's flags for running `backend` (`anthropic`, the native loop, or `claude-code`)
    /// agents by default against this fake.
    pub fn worker_args(&self, backend: &str) -> Vec<String> {
        [
            "--default-backend",
            backend,
            "--anthropic-base-url",
            &self.url,
            "--anthropic-api-key",
            "test-key",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts the fake with `script`; requests after it get a 500.
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> FakeAnthropic {
        Self::start_with_fallback(script, Reply::status(500)).await
    }

    /// Starts the fake with `script`, then `fallback` for every later request.
    pub async fn start_with_fallback(
        script: impl IntoIterator<Item = Reply>,
        fallback: Reply,
    ) -> FakeAnthropic {
        let inner = Arc::new(Mutex::new(Inner {
            script: script.into_iter().collect(),
            fallback,
            requests: vec![],
            served: Usage::default(),
            messages: 0,
            next_id: 0,
            rounds: None,
            round_call: None,
            limits: BTreeMap::new(),
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, server) = serve(app).await;
        FakeAnthropic {
            url: format!("http://{addr}"),
            inner,
            server,
        }
    }

    /// Adds `replies` to the end of the script (for a script that needs what is only known
    /// once the fake runs, such as the cluster's ports).
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().unwrap().script.extend(replies);
    }

    /// Starts a fake that serves any number of agents at once without a script: each request
    /// is answered after `delay`, with a `list_files` call while its conversation has fewer
    /// than `rounds` answers, else with a final text (for load measurements; request bodies
    /// are not kept).
    pub async fn start_rounds(rounds: usize, delay: Duration) -> FakeAnthropic {
        let fake = Self::start([]).await;
        fake.inner.lock().unwrap().rounds = Some((rounds, delay));
        fake
    }

    /// [`FakeAnthropic::start_rounds`] whose rounds call tool `name` with `input` (a tool the
    /// agent has: the Claude Code CLI's are not the native loop's).
    pub async fn start_rounds_calling(
        rounds: usize,
        delay: Duration,
        name: &str,
        input: Value,
    ) -> FakeAnthropic {
        let fake = Self::start_rounds(rounds, delay).await;
        fake.inner.lock().unwrap().round_call = Some((name.to_string(), input));
        fake
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The `POST /v1/messages` requests so far.
    pub fn message_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.starts_with("/v1/messages"))
            .collect()
    }

    /// The summed usage of every message and cut stream served: what the provider billed.
    pub fn served_usage(&self) -> Usage {
        self.inner.lock().unwrap().served
    }

    /// How many messages were served whole.
    pub fn messages_served(&self) -> usize {
        self.inner.lock().unwrap().messages
    }

    /// Requests with `x-api-key: key` get a 429 (`rate_limit_error`, `retry-after` and
    /// `anthropic-ratelimit-*` headers with the reset) for `period` from now, without taking a
    /// scripted reply.
    pub fn exhaust_key(&self, key: &str, period: Duration) {
        let mut inner = self.inner.lock().unwrap();
        let l = inner.limits.entry(key.to_string()).or_insert(KeyLimit {
            blocked_until: None,
            window: None,
        });
        l.blocked_until = Some(Instant::now() + period);
    }

    /// `key` allows `max` requests per fixed window of `period` (starting now); more get a
    /// 429 until the window resets. Every answer on the key carries the window's figures.
    pub fn window_key(&self, key: &str, max: u32, period: Duration) {
        let mut inner = self.inner.lock().unwrap();
        inner.limits.insert(
            key.to_string(),
            KeyLimit {
                blocked_until: None,
                window: Some(Window {
                    max,
                    period,
                    start: Instant::now(),
                    used: 0,
                }),
            },
        );
    }

    /// The `POST /v1/messages` requests made with `x-api-key: key`.
    pub fn requests_with_key(&self, key: &str) -> Vec<Recorded> {
        self.message_requests()
            .into_iter()
            .filter(|r| r.headers.get("x-api-key").map(String::as_str) == Some(key))
            .collect()
    }

    /// Replies not used yet.
    pub fn remaining(&self) -> usize {
        self.inner.lock().unwrap().script.len()
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
    let reply = {
        let mut inner = inner.lock().unwrap();
        let kept = if inner.rounds.is_some() {
            Value::Null
        } else {
            body.clone()
        };
        inner.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            headers,
            body: kept,
            at: Instant::now(),
        });
        if method == Method::HEAD {
            return StatusCode::OK.into_response();
        }
        if method != Method::POST || !path.starts_with("/v1/messages") {
            return (StatusCode::NOT_FOUND, "not a Messages API route").into_response();
        }
        if path.starts_with("/v1/messages/count_tokens") {
            return axum::Json(json!({"input_tokens": 100})).into_response();
        }
        if let Some((rounds, delay)) = inner.rounds {
            let answers = body["messages"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
            let reply = if answers < rounds {
                match &inner.round_call {
                    Some((name, input)) => Reply::tool_use(name.clone(), input.clone()),
                    None => Reply::tool_use("list_files", json!({})),
                }
            } else {
                Reply::text("## Summary\nDone.")
            };
            (reply.after(delay), None)
        } else {
            let key = inner
                .requests
                .last()
                .and_then(|r| r.headers.get("x-api-key").cloned());
            let checked = key
                .and_then(|k| inner.limits.get_mut(&k))
                .map(|l| l.check(Instant::now()));
            if let Some((Some(_), Some(figures))) = checked {
                let mut resp = (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({"type": "error", "error": {"type": "rate_limit_error", "message": "This request would exceed your account's rate limit. Please try again later."}})),
                )
                    .into_response();
                limit_headers(&mut resp, figures, true);
                return resp;
            }
            let reply = match inner.script.pop_front() {
                Some(r) => r,
                None => inner.fallback.clone(),
            };
            (reply, checked.and_then(|(_, f)| f))
        }
    };
    let (reply, figures) = reply;
    let mut resp = answer(&inner, reply, &body).await;
    if let Some(f) = figures {
        limit_headers(&mut resp, f, false);
    }
    resp
}

async fn answer(inner: &Arc<Mutex<Inner>>, mut reply: Reply, body: &Value) -> Response {
    while let Reply::Delayed(d, r) = reply {
        tokio::time::sleep(d).await;
        reply = *r;
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-sonnet-4-5")
        .to_string();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let id = {
        let mut i = inner.lock().unwrap();
        i.next_id += 1;
        i.next_id
    };
    match reply {
        Reply::Delayed(..) => unreachable!("unwrapped above"),
        Reply::Error {
            status,
            error_type,
            message,
            retry_after,
        } => {
            let mut resp = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                axum::Json(
                    json!({"type": "error", "error": {"type": error_type, "message": message}}),
                ),
            )
                .into_response();
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", ra.parse().expect("a header value"));
            }
            resp
        }
        Reply::StreamError {
            error_type,
            message,
            usage,
        } => {
            // What message_start reported is what was billed: its output count is 1.
            let billed = Usage {
                output_tokens: 1,
                ..usage
            };
            inner.lock().unwrap().served.add(&billed);
            let text = sse(&[
                ("message_start", message_start(id, &model, &usage)),
                ("ping", json!({"type": "ping"})),
                (
                    "error",
                    json!({"type": "error", "error": {"type": error_type, "message": message}}),
                ),
            ]);
            stream_response(text)
        }
        Reply::Message {
            blocks,
            usage,
            stop_reason,
        } => {
            let blocks: Vec<Block> = match working_directory(body) {
                Some(cwd) => blocks
                    .into_iter()
                    .map(|b| match b {
                        Block::ToolUse { name, input } => Block::ToolUse {
                            name,
                            input: with_cwd(&input, &cwd),
                        },
                        other => other,
                    })
                    .collect(),
                None => blocks,
            };
            let stop = stop_reason.unwrap_or_else(|| {
                if blocks.iter().any(|b| matches!(b, Block::ToolUse { .. })) {
                    "tool_use".into()
                } else {
                    "end_turn".into()
                }
            });
            {
                let mut i = inner.lock().unwrap();
                i.served.add(&usage);
                i.messages += 1;
            }
            if !stream {
                return axum::Json(whole_message(id, &model, &blocks, &usage, &stop))
                    .into_response();
            }
            let mut events = vec![("message_start", message_start(id, &model, &usage))];
            for (index, block) in blocks.iter().enumerate() {
                match block {
                    Block::Text(t) => {
                        events.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "text", "text": ""}}),
                        ));
                        for piece in pieces(t, 3) {
                            events.push((
                                "content_block_delta",
                                json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "text_delta", "text": piece}}),
                            ));
                        }
                    }
                    Block::Thinking(t) => {
                        events.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "thinking", "thinking": ""}}),
                        ));
                        events.push((
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "thinking_delta", "thinking": t}}),
                        ));
                        events.push((
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                   "delta": {"type": "signature_delta", "signature": "fake-signature"}}),
                        ));
                    }
                    Block::ToolUse { name, input } => {
                        events.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "tool_use", "id": format!("toolu_fake_{id}_{index}"),
                                                     "name": name, "input": {}}}),
                        ));
                        for piece in pieces(&input.to_string(), 3) {
                            events.push((
                                "content_block_delta",
                                json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "input_json_delta", "partial_json": piece}}),
                            ));
                        }
                    }
                }
                events.push((
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ));
                if index == 0 {
                    events.push(("ping", json!({"type": "ping"})));
                }
            }
            events.push((
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                       "usage": {"output_tokens": usage.output_tokens}}),
            ));
            events.push(("message_stop", json!({"type": "message_stop"})));
            stream_response(sse(&events))
        }
    }
}

fn message_start(id: u64, model: &str, usage: &Usage) -> Value {
    json!({"type": "message_start", "message": {
        "id": format!("msg_fake_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": usage.input_tokens,
                  "cache_creation_input_tokens": usage.cache_creation_tokens,
                  "cache_read_input_tokens": usage.cache_read_tokens,
                  "output_tokens": 1}}})
}

fn whole_message(id: u64, model: &str, blocks: &[Block], usage: &Usage, stop: &str) -> Value {
    let content: Vec<Value> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            Block::Text(t) => json!({"type": "text", "text": t}),
            Block::Thinking(t) => json!({"type": "thinking", "thinking": t, "signature": "fake"}),
            Block::ToolUse { name, input } => {
                json!({"type": "tool_use", "id": format!("toolu_fake_{id}_{i}"), "name": name, "input": input})
            }
        })
        .collect();
    json!({"id": format!("msg_fake_{id}"), "type": "message", "role": "assistant", "model": model,
           "content": content, "stop_reason": stop, "stop_sequence": null,
           "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                     "cache_creation_input_tokens": usage.cache_creation_tokens,
                     "cache_read_input_tokens": usage.cache_read_tokens}})
}

fn stream_response(text: String) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(chunked(text))
        .expect("a response")
}
