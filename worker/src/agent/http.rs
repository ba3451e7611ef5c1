//! What the HTTP backends (`anthropic`, `openai`) share: failure reasons from HTTP statuses and
//! provider error types, `retry-after`, and the retry loop.
//!
//! A request that fails with a retryable error (429, 529, other 5xx, a dropped connection or
//! stream) is retried with exponential backoff and jitter (backon), waiting at least what the
//! server's `retry-after` asks, up to `max_attempts` requests. After that the job fails with the
//! error's (retryable) reason, so the coordinator retries the whole job later with its own
//! backoff. A `retry-after` longer than `max_retry_after` fails the attempt at once for the same
//! reason: the coordinator is the better place to wait minutes.

use crate::config::ApiSettings;
use backon::{BackoffBuilder, ExponentialBuilder};
use orch_shared::job::{FailureReason, Usage};
use reqwest::header::HeaderMap;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A failed request.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub reason: FailureReason,
    pub message: String,
    /// Whether sending the same request again can work.
    pub retryable: bool,
    /// How long the server asked us to wait.
    pub retry_after: Option<Duration>,
    /// Tokens the failed request was billed for before it failed (a stream cut midway).
    pub usage: Usage,
    /// What a 429 said about the credential's limits (for the limit broker); boxed, as most
    /// errors carry none.
    pub limit: Option<Box<Learned>>,
}

/// What a provider said about a credential's rate-limit windows: from a 429 (then
/// `exhausted_until_ms` is set), `retry-after`, the `anthropic-ratelimit-*` headers, OpenAI's
/// `x-ratelimit-*`, or the Claude Code CLI's `rate_limit_event` lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Learned {
    /// The credential has no room until then (ms since the epoch).
    pub exhausted_until_ms: Option<u64>,
    /// Why, in the provider's words (cut short; never a key).
    pub reason: String,
    pub requests_limit: Option<u64>,
    pub requests_remaining: Option<u64>,
    pub tokens_limit: Option<u64>,
    pub tokens_remaining: Option<u64>,
    /// When the window figures reset (ms since the epoch).
    pub reset_ms: Option<u64>,
}

/// How long a credential is held exhausted when a 429 names no reset at all.
pub const DEFAULT_LIMIT_WAIT: Duration = Duration::from_secs(60);

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// An RFC 3339 time (`anthropic-ratelimit-*-reset`) as ms since the epoch.
fn header_time_ms(headers: &HeaderMap, name: &str) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    // humantime takes `2026-12-06T02:00:00Z`, with or without fractional seconds; an offset
    // other than `Z` is not what the API sends.
    let at = humantime::parse_rfc3339_weak(v).ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

impl Learned {
    /// The windows the response headers describe (`None` when they describe none).
    pub fn from_headers(headers: &HeaderMap) -> Option<Learned> {
        let a = |field: &str| format!("anthropic-ratelimit-{field}");
        let requests_limit = header_u64(headers, &a("requests-limit"))
            .or_else(|| header_u64(headers, "x-ratelimit-limit-requests"));
        let requests_remaining = header_u64(headers, &a("requests-remaining"))
            .or_else(|| header_u64(headers, "x-ratelimit-remaining-requests"));
        let tokens_limit = header_u64(headers, &a("tokens-limit"))
            .or_else(|| header_u64(headers, &a("input-tokens-limit")))
            .or_else(|| header_u64(headers, "x-ratelimit-limit-tokens"));
        let tokens_remaining = header_u64(headers, &a("tokens-remaining"))
            .or_else(|| header_u64(headers, &a("input-tokens-remaining")))
            .or_else(|| header_u64(headers, "x-ratelimit-remaining-tokens"));
        let resets = [
            "requests-reset",
            "tokens-reset",
            "input-tokens-reset",
            "output-tokens-reset",
        ];
        // The window that runs out first decides: the latest reset among exhausted windows
        // is what a 429 waits for, the earliest is when figures next change.
        let reset_ms = resets
            .into_iter()
            .filter_map(|r| header_time_ms(headers, &a(r)))
            .min();
        let l = Learned {
            exhausted_until_ms: None,
            reason: String::new(),
            requests_limit,
            requests_remaining,
            tokens_limit,
            tokens_remaining,
            reset_ms,
        };
        (l != Learned::default()).then_some(l)
    }

    /// What a 429 teaches: the windows in its headers, and exhaustion until `retry-after`,
    /// else the exhausted window's reset, else [`DEFAULT_LIMIT_WAIT`].
    pub fn from_429(headers: &HeaderMap, reason: &str) -> Learned {
        let now = orch_shared::now_ms();
        let mut l = Learned::from_headers(headers).unwrap_or_default();
        let a = |field: &str| format!("anthropic-ratelimit-{field}");
        let exhausted_reset = [
            ("requests-remaining", "requests-reset"),
            ("tokens-remaining", "tokens-reset"),
            ("input-tokens-remaining", "input-tokens-reset"),
            ("output-tokens-remaining", "output-tokens-reset"),
        ]
        .into_iter()
        .filter(|(rem, _)| header_u64(headers, &a(rem)) == Some(0))
        .filter_map(|(_, reset)| header_time_ms(headers, &a(reset)))
        .max();
        let until = retry_after(headers)
            .map(|d| now + d.as_millis() as u64)
            .or(exhausted_reset)
            .or(l.reset_ms)
            .unwrap_or(now + DEFAULT_LIMIT_WAIT.as_millis() as u64);
        l.exhausted_until_ms = Some(until.max(now));
        l.reason = reason.chars().take(200).collect();
        l
    }
}

impl CallError {
    pub fn new(reason: FailureReason, retryable: bool, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retryable,
            retry_after: None,
            usage: Usage::default(),
            limit: None,
        }
    }

    /// A connection that failed or dropped: retryable.
    pub fn network(message: impl Into<String>) -> Self {
        Self::new(FailureReason::Network, true, message)
    }

    /// From a transport error of reqwest (connect, timeout, body).
    pub fn transport(what: &str, e: &reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else {
            "failed"
        };
        // reqwest's Display names the URL but never headers, so no key leaks here.
        Self::network(format!("{what} {kind}: {e}"))
    }

    /// From an HTTP error status and the provider's error body.
    pub fn status(provider: &str, status: u16, headers: &HeaderMap, body: &str) -> Self {
        let (reason, retryable) = status_reason(status);
        let detail = error_detail(body);
        let hint = match status {
            401 | 403 => " (check the API key)",
            _ => "",
        };
        let message = format!("{provider} answered {status}{hint}: {detail}");
        Self {
            reason,
            limit: (status == 429).then(|| Box::new(Learned::from_429(headers, &detail))),
            message,
            retryable,
            retry_after: retry_after(headers),
            usage: Usage::default(),
        }
    }
}

/// The failure reason of an HTTP status, and whether a retry can help.
pub fn status_reason(status: u16) -> (FailureReason, bool) {
    match status {
        429 => (FailureReason::RateLimited, true),
        529 => (FailureReason::Overloaded, true),
        408 | 500..=599 => (FailureReason::Network, true),
        _ => (FailureReason::BadRequest, false),
    }
}

/// The failure reason of a provider's error type (Anthropic's `error.type`, also used by some
/// OpenAI-compatible servers in a stream's error chunk).
pub fn error_type_reason(kind: &str) -> (FailureReason, bool) {
    match kind {
        "overloaded_error" | "overloaded" => (FailureReason::Overloaded, true),
        "rate_limit_error" | "rate_limit_exceeded" | "rate_limit" => {
            (FailureReason::RateLimited, true)
        }
        "api_error" | "server_error" | "timeout_error" | "internal_error" => {
            (FailureReason::Network, true)
        }
        "invalid_request_error"
        | "authentication_error"
        | "permission_error"
        | "not_found_error"
        | "request_too_large"
        | "invalid_request" => (FailureReason::BadRequest, false),
        _ => (FailureReason::AgentError, false),
    }
}

/// The message of an `{"error": {"message": ...}}` body, else the body's start.
pub fn error_detail(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let msg = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(|m| m.as_str())
            .map(str::to_string)
    });
    let text = msg.unwrap_or_else(|| body.trim().to_string());
    let mut cut: String = text.chars().take(300).collect();
    if cut.is_empty() {
        cut = "(no body)".into();
    }
    cut
}

/// `retry-after-ms` (OpenAI) or `retry-after` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = humantime::parse_rfc3339_weak(v)
        .ok()
        .or_else(|| httpdate::parse_http_date(v).ok())?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// What a sequence of requests cost, failed ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub usage: Usage,
    pub requests: u32,
}

/// Runs `attempt` until it succeeds, fails for good, runs out of attempts or `cancel` fires
/// (then `Err` with reason `Cancelled`). Each error's billed usage is added to `spent`.
pub async fn with_retries<T, F, Fut>(
    provider: &str,
    settings: &ApiSettings,
    cancel: &CancellationToken,
    spent: &mut Spent,
    mut attempt: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(settings.retry_min_delay)
        .with_max_delay(settings.retry_max_delay)
        .with_max_times(settings.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build();
    loop {
        spent.requests += 1;
        let result = tokio::select! {
            r = attempt() => r,
            _ = cancel.cancelled() => return Err(cancelled()),
        };
        let err = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        spent.usage.add(&err.usage);
        if !err.retryable {
            return Err(err);
        }
        // With a limit broker, a rate-limited credential is not hammered: the job moves to
        // another credential or parks until the reset (see `crate::limits`).
        if settings.park_on_limit && err.reason == FailureReason::RateLimited {
            return Err(err);
        }
        if let Some(ra) = err.retry_after
            && ra > settings.max_retry_after
        {
            let mut err = err;
            err.message = format!(
                "{} (retry-after {} is longer than {}: leaving the retry to the coordinator)",
                err.message,
                humantime::format_duration(ra),
                humantime::format_duration(settings.max_retry_after)
            );
            return Err(err);
        }
        let Some(delay) = backoff.next() else {
            let mut err = err;
            err.message = format!("{} (after {} attempts)", err.message, spent.requests);
            return Err(err);
        };
        // Honour the server's retry-after: never earlier than it asks.
        let wait = err.retry_after.map_or(delay, |ra| ra.max(delay));
        tracing::info!(provider, reason = err.reason.as_str(), attempt = spent.requests, ?wait, error = %err.message, "request failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Err(cancelled()),
        }
    }
}

fn cancelled() -> CallError {
    CallError::new(FailureReason::Cancelled, false, "agent stopped")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn settings(max_attempts: u32) -> ApiSettings {
        let mut s = crate::config::from_flags::<_, &str>([])
            .unwrap()
            .backends
            .anthropic;
        s.max_attempts = max_attempts;
        s.retry_min_delay = Duration::from_millis(100);
        s.retry_max_delay = Duration::from_millis(200);
        s
    }

    #[test]
    fn statuses_map_to_reasons() {
        assert_eq!(status_reason(429), (FailureReason::RateLimited, true));
        assert_eq!(status_reason(529), (FailureReason::Overloaded, true));
        assert_eq!(status_reason(503), (FailureReason::Network, true));
        assert_eq!(status_reason(400), (FailureReason::BadRequest, false));
        assert_eq!(status_reason(401), (FailureReason::BadRequest, false));
        assert_eq!(
            error_type_reason("overloaded_error"),
            (FailureReason::Overloaded, true)
        );
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut d = HeaderMap::new();
        d.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&d), Some(Duration::ZERO));
        let e = CallError::status(
            "anthropic",
            401,
            &HeaderMap::new(),
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
        );
        assert_eq!(
            e.message,
            "anthropic answered 401 (check the API key): invalid x-api-key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_limit_broker_a_429_is_not_retried_in_place() {
        let mut s = settings(4);
        s.park_on_limit = true;
        let mut n = 0;
        let r: Result<(), CallError> = with_retries(
            "p",
            &s,
            &CancellationToken::new(),
            &mut Spent::default(),
            || {
                n += 1;
                async {
                    Err(CallError::new(
                        FailureReason::RateLimited,
                        true,
                        "slow down",
                    ))
                }
            },
        )
        .await;
        assert_eq!(r.unwrap_err().reason, FailureReason::RateLimited);
        assert_eq!(n, 1);
    }

    #[test]
    fn a_429_holds_its_credential_until_retry_after_else_the_exhausted_window_resets() {
        let now = orch_shared::now_ms();
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_static("2099-01-01T00:00:00Z"),
        );
        let l = Learned::from_429(&h, "slow down");
        let until = l.exhausted_until_ms.unwrap();
        assert!(
            (now + 2_900..now + 4_000).contains(&until),
            "{until} vs {now}"
        );
        assert_eq!(
            (l.requests_limit, l.requests_remaining),
            (Some(50), Some(0))
        );
        assert_eq!(l.reason, "slow down");
        // Without retry-after, the exhausted window's reset.
        h.remove("retry-after");
        let l = Learned::from_429(&h, "x");
        assert_eq!(l.exhausted_until_ms, Some(4_070_908_800_000));
        // With nothing at all, the default wait.
        let l = Learned::from_429(&HeaderMap::new(), "x");
        let until = l.exhausted_until_ms.unwrap();
        assert!(until >= now + DEFAULT_LIMIT_WAIT.as_millis() as u64);
        // A 200's headers teach windows, not exhaustion.
        assert_eq!(Learned::from_headers(&HeaderMap::new()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_honour_retry_after_and_stop_after_max_attempts() {
        let s = settings(3);
        let cancel = CancellationToken::new();
        let mut spent = Spent::default();
        let start = tokio::time::Instant::now();
        let mut n = 0;
        let r: Result<(), CallError> = with_retries("p", &s, &cancel, &mut spent, || {
            n += 1;
            async {
                let mut e = CallError::new(FailureReason::RateLimited, true, "slow down");
                e.retry_after = Some(Duration::from_secs(5));
                e.usage.input_tokens = 10;
                Err(e)
            }
        })
        .await;
        let e = r.unwrap_err();
        assert_eq!((n, spent.requests), (3, 3));
        assert_eq!(e.reason, FailureReason::RateLimited);
        assert!(e.message.ends_with("(after 3 attempts)"), "{}", e.message);
        assert_eq!(spent.usage.input_tokens, 30);
        // Two waits of at least the 5 s the server asked for.
        assert!(start.elapsed() >= Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_retry_after_or_a_bad_request_ends_at_once_and_cancel_stops_waiting() {
        let s = settings(5);
        let cancel = CancellationToken::new();
        let mut spent = Spent::default();
        let r: Result<(), CallError> = with_retries("p", &s, &cancel, &mut spent, || async {
            let mut e = CallError::new(FailureReason::RateLimited, true, "later");
            e.retry_after = Some(Duration::from_secs(3600));
            Err(e)
        })
        .await;
        assert!(
            r.unwrap_err()
                .message
                .contains("leaving the retry to the coordinator")
        );
        assert_eq!(spent.requests, 1);

        let mut spent = Spent::default();
        let r: Result<(), CallError> = with_retries("p", &s, &cancel, &mut spent, || async {
            Err(CallError::new(FailureReason::BadRequest, false, "bad"))
        })
        .await;
        assert_eq!(r.unwrap_err().reason, FailureReason::BadRequest);
        assert_eq!(spent.requests, 1);

        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.cancel();
        });
        let r: Result<(), CallError> =
            with_retries("p", &s, &cancel, &mut Spent::default(), || async {
                let mut e = CallError::network("down");
                e.retry_after = Some(Duration::from_secs(30));
                Err(e)
            })
            .await;
        assert_eq!(r.unwrap_err().reason, FailureReason::Cancelled);
    }
}
