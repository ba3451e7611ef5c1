//! The streamable HTTP transport of the MCP client: `rmcp`'s [`StreamableHttpClient`] on the
//! worker's own `reqwest` (rmcp's built-in client wants another major of reqwest, and one
//! HTTP stack is enough). rmcp drives the protocol (the handshake, sessions, resumed streams);
//! this module only moves its messages: a POST per message, answered with JSON, an SSE
//! stream or `202 Accepted`; a GET for the server's own stream; a DELETE to end the session.
//!
//! What a server sends is bounded before it is parsed ([`StreamableHttpResponseLimits`]): a
//! JSON body and one SSE event each at most their limit, an error body read only so far as a
//! message needs. Redirects are not followed, so the declared headers (a bearer token among
//! them) go to the declared origin only. Header values are marked sensitive and never logged.

use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use rmcp::model::ServerJsonRpcMessage;
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, ErrorData, JsonRpcMessage};
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, HttpStatusError, InsufficientScopeError, SseError, StreamableHttpClient,
    StreamableHttpError, StreamableHttpPostResponse, StreamableHttpResponseLimits,
};
use sse_stream::{Sse, SseStream};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const SESSION_ID: &str = "mcp-session-id";
const LAST_EVENT_ID: &str = "last-event-id";
const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";
/// The longest a connection to a server may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an error body kept in a message.
const ERROR_BODY: usize = 512;
/// The longest SSE event accepted when rmcp names no limit (its own default).
const DEFAULT_SSE_EVENT: usize = 16 * 1024 * 1024;

type HttpError = StreamableHttpError<Error>;

/// Why a request to an MCP server failed, beyond what rmcp's error names itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request failed: {0}")]
    Request(#[from] reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("a response body is larger than {0} bytes")]
    TooLarge(usize),
}

/// The HTTP client of every job's MCP servers (one connection pool for the worker).
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
}

impl Http {
    /// The worker's client (built on first use).
    pub fn shared() -> Http {
        static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
        let client = CLIENT.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                // Building fails only when the TLS backend cannot start; a default client
                // then fails each request with the reason instead.
                .unwrap_or_default()
        });
        Http {
            client: client.clone(),
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        uri: &str,
        session_id: Option<&str>,
        auth: Option<String>,
        headers: HashMap<HeaderName, HeaderValue>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, uri);
        for (name, mut value) in headers {
            value.set_sensitive(true);
            req = req.header(name, value);
        }
        if let Some(token) = auth {
            req = req.bearer_auth(token);
        }
        if let Some(id) = session_id {
            req = req.header(SESSION_ID, id);
        }
        req
    }
}

fn client(e: reqwest::Error) -> HttpError {
    StreamableHttpError::Client(Error::Request(e))
}

/// The media type of a `content-type` value, lowercase, without its parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or(v).trim().to_ascii_lowercase())
}

/// The challenge of a 401 or 403 that carries one, as rmcp's errors for them.
fn auth_error(status: StatusCode, headers: &HeaderMap) -> Option<HttpError> {
    let challenge = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?.to_string();
    match status {
        StatusCode::UNAUTHORIZED => Some(StreamableHttpError::AuthRequired(
            AuthRequiredError::new(challenge),
        )),
        StatusCode::FORBIDDEN => {
            let scope = challenge
                .split("scope=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_string);
            Some(StreamableHttpError::InsufficientScope(
                InsufficientScopeError::new(challenge, scope),
            ))
        }
        _ => None,
    }
}

/// A 429 or 5xx as rmcp's status error (it decides about retrying).
fn status_error(status: StatusCode, headers: &HeaderMap) -> Option<HttpStatusError> {
    (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()).then(|| {
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        HttpStatusError::new(status.as_u16(), retry_after)
    })
}

/// The body of `resp`, at most `max` bytes (more is an error when `strict`, else cut).
async fn read_body(
    resp: reqwest::Response,
    max: usize,
    strict: bool,
) -> Result<Vec<u8>, HttpError> {
    if strict && resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(StreamableHttpError::Client(Error::TooLarge(max)));
    }
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(client)?;
        if body.len() + chunk.len() > max {
            if strict {
                return Err(StreamableHttpError::Client(Error::TooLarge(max)));
            }
            body.extend_from_slice(&chunk[..max - body.len()]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The SSE events of a byte stream, none longer than `max` bytes: the count of bytes since
/// the last blank line is checked as they come, before an event is assembled.
fn bounded_events<S>(
    bytes: S,
    max: usize,
) -> futures::stream::BoxStream<'static, Result<Sse, SseError>>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
{
    let mut in_event = 0usize;
    let mut after_newline = false;
    let checked = bytes.map(move |chunk| {
        let chunk = chunk.map_err(BodyError::Request)?;
        for &b in chunk.iter() {
            match b {
                b'\r' => {}
                b'\n' if after_newline => in_event = 0,
                b'\n' => after_newline = true,
                _ => {
                    after_newline = false;
                    in_event += 1;
                }
            }
            if in_event > max {
                return Err(BodyError::Oversized(Oversized(max)));
            }
        }
        Ok(chunk)
    });
    SseStream::from_bytes_stream(checked).boxed()
}

/// Why an SSE body stopped: the connection, or an event over the limit.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("{0}")]
    Request(#[from] reqwest::Error),
    #[error("{0}")]
    Oversized(#[from] Oversized),
}

#[derive(Debug, thiserror::Error)]
#[error("an SSE event is larger than {0} bytes")]
struct Oversized(usize);

/// A `server/discover` that a server of the older protocol rejects (a 4xx without session):
/// answered as the JSON-RPC error rmcp expects, so it falls back to `initialize`.
fn rejected_discover(
    message: &ClientJsonRpcMessage,
    status: StatusCode,
    body: &str,
) -> Option<StreamableHttpPostResponse> {
    let JsonRpcMessage::Request(request) = message else {
        return None;
    };
    if !matches!(request.request, ClientRequest::DiscoverRequest(_))
        || !status.is_client_error()
        || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
    {
        return None;
    }
    let error = match serde_json::from_str::<ServerJsonRpcMessage>(body) {
        Ok(JsonRpcMessage::Error(e)) => e.error,
        _ => ErrorData::invalid_request(format!("server/discover answered HTTP {status}"), None),
    };
    Some(StreamableHttpPostResponse::Json(
        ServerJsonRpcMessage::error(error, Some(request.id.clone())),
        None,
    ))
}

impl StreamableHttpClient for Http {
    type Error = Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = max_sse_event_size;
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            limits,
        )
        .await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let resp = self
            .request(
                reqwest::Method::POST,
                &uri,
                session_id.as_deref(),
                auth_header,
                custom_headers,
            )
            .header(ACCEPT, format!("{JSON}, {EVENT_STREAM}"))
            .json(&message)
            .send()
            .await
            .map_err(client)?;
        let status = resp.status();
        if let Some(e) = auth_error(status, resp.headers()) {
            return Err(e);
        }
        if matches!(status, StatusCode::ACCEPTED | StatusCode::NO_CONTENT) {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == StatusCode::NOT_FOUND && session_id.is_some() {
            return Err(StreamableHttpError::SessionExpired);
        }
        let media = media_type(resp.headers());
        let is_json = media.as_deref() == Some(JSON);
        if let Some(e) = status_error(status, resp.headers())
            && (!is_json || status == StatusCode::TOO_MANY_REQUESTS)
        {
            return Err(e.into());
        }
        let new_session = resp
            .headers()
            .get(SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !status.is_success() {
            // A JSON-RPC error in the body is the server's answer to the request; anything
            // else is reported with the start of the body.
            let max = if is_json {
                limits.max_json_response_size
            } else {
                limits.max_error_response_size.min(ERROR_BODY)
            };
            let body = read_body(resp, max, false).await?;
            let text = String::from_utf8_lossy(&body);
            if session_id.is_none()
                && let Some(r) = rejected_discover(&message, status, &text)
            {
                return Ok(r);
            }
            if is_json
                && let Ok(m @ JsonRpcMessage::Error(_)) =
                    serde_json::from_slice::<ServerJsonRpcMessage>(&body)
            {
                return Ok(StreamableHttpPostResponse::Json(m, new_session));
            }
            let mut text = text.into_owned();
            if text.len() > ERROR_BODY {
                let mut end = ERROR_BODY;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            return Err(StreamableHttpError::Client(Error::Status {
                status: status.as_u16(),
                body: text.trim().to_string(),
            }));
        }
        let awaits_nothing = !matches!(message, JsonRpcMessage::Request(_));
        match media.as_deref() {
            Some(EVENT_STREAM) => Ok(StreamableHttpPostResponse::Sse(
                bounded_events(resp.bytes_stream(), limits.max_sse_event_size),
                new_session,
            )),
            Some(JSON) => {
                let body = read_body(resp, limits.max_json_response_size, true).await?;
                if body.is_empty() && awaits_nothing {
                    return Ok(StreamableHttpPostResponse::Accepted);
                }
                let parsed: ServerJsonRpcMessage = serde_json::from_slice(&body)?;
                Ok(StreamableHttpPostResponse::Json(parsed, new_session))
            }
            _ if awaits_nothing && resp.content_length() == Some(0) => {
                Ok(StreamableHttpPostResponse::Accepted)
            }
            other => Err(StreamableHttpError::UnexpectedContentType(
                other.map(str::to_string),
            )),
        }
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), HttpError> {
        let resp = self
            .request(
                reqwest::Method::DELETE,
                &uri,
                Some(&session_id),
                auth_header,
                custom_headers,
            )
            .send()
            .await
            .map_err(client)?;
        let status = resp.status();
        // A server that keeps no sessions to delete says 405: nothing to do.
        if status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED {
            return Ok(());
        }
        Err(StreamableHttpError::Client(Error::Status {
            status: status.as_u16(),
            body: String::new(),
        }))
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<futures::stream::BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        self.get_stream_with_max_sse_event_size(
            uri,
            session_id,
            last_event_id,
            auth_header,
            custom_headers,
            DEFAULT_SSE_EVENT,
        )
        .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<futures::stream::BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        let mut req = self
            .request(
                reqwest::Method::GET,
                &uri,
                session_id.as_deref(),
                auth_header,
                custom_headers,
            )
            .header(ACCEPT, format!("{EVENT_STREAM}, {JSON}"));
        if let Some(id) = last_event_id {
            req = req.header(LAST_EVENT_ID, id);
        }
        let resp = req.send().await.map_err(client)?;
        let status = resp.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            return Err(StreamableHttpError::ServerDoesNotSupportSse);
        }
        if let Some(e) = auth_error(status, resp.headers()) {
            return Err(e);
        }
        if let Some(e) = status_error(status, resp.headers()) {
            return Err(e.into());
        }
        if !status.is_success() {
            return Err(StreamableHttpError::Client(Error::Status {
                status: status.as_u16(),
                body: String::new(),
            }));
        }
        match media_type(resp.headers()).as_deref() {
            Some(EVENT_STREAM | JSON) => {
                Ok(bounded_events(resp.bytes_stream(), max_sse_event_size))
            }
            other => Err(StreamableHttpError::UnexpectedContentType(
                other.map(str::to_string),
            )),
        }
    }
}
