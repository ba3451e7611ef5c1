//! `GET /v1/events`: every task's events as they happen.

use crate::http::answer::{Answer, list_of, query};
use crate::http::app::App;
use crate::http::sse::{self, last_event_id, sse_event};
use crate::metrics as m;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use orch_shared::event::{Event, EventKind};
use serde::Deserialize;
use std::convert::Infallible;
use strum::VariantNames;

/// How long text fields of `GET /v1/events` are by default.
pub const DEFAULT_MAX_CHARS: usize = 2_000;

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventParams {
    /// Comma-separated event kinds (`job_started,tool_call,...`); all when absent.
    kinds: Option<String>,
    /// Longest text, tool input and tool output sent, in characters (0: no limit).
    max_chars: Option<usize>,
}

/// Cuts `s` to `max` characters, saying how much was cut.
fn cut(s: &mut String, max: usize) {
    if max == 0 {
        return;
    }
    let n = s.chars().count();
    if n > max {
        let kept: String = s.chars().take(max).collect();
        *s = format!("{kept}… [{} more characters]", n - max);
    }
}

fn shorten(event: &mut Event, max: usize) {
    match &mut event.kind {
        EventKind::Text { text } => cut(text, max),
        EventKind::ToolCall { input, .. } => cut(input, max),
        EventKind::ToolResult { output, .. } => cut(output, max),
        _ => {}
    }
}

/// Decrements the open-streams gauge when a stream ends, however it ends.
struct StreamGauge;

impl StreamGauge {
    fn open() -> Self {
        metrics::gauge!(m::EVENT_STREAMS).increment(1.0);
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::EVENT_STREAMS).decrement(1.0);
    }
}

/// `GET /v1/events`: every task's events as they happen, as server-sent events (id = event
/// id). Starts with the next event, or after `Last-Event-ID` to resume. Text fields are
/// cut to `max_chars`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "cluster",
    params(EventParams, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`N` or `N.M`, as sent in `id:`).")),
    responses((status = 200, description = "Server-sent events of every task, live: `id` the event id, `event` its kind, `data` the event as JSON.", content_type = "text/event-stream", body = Event))
)]
pub(super) async fn cluster_events(
    AxumState(app): AxumState<App>,
    params: Result<Query<EventParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let kinds: Vec<String> = list_of(
        "kinds",
        p.kinds.as_deref(),
        |s| EventKind::VARIANTS.contains(&s).then(|| s.to_string()),
        "event kinds such as job_started, tool_call, job_finished",
    )?;
    let max = p.max_chars.unwrap_or(DEFAULT_MAX_CHARS);
    let after = last_event_id(&headers)?;
    let live = app.transport.all_events(after, &kinds).await?;
    let gauge = StreamGauge::open();
    let stream = live
        .map(move |mut e| {
            let _open = &gauge;
            shorten(&mut e.event, max);
            Ok::<_, Infallible>(sse_event(&e))
        })
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(sse::respond(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_with_a_note() {
        let mut s = "abcdef".to_string();
        cut(&mut s, 3);
        assert_eq!(s, "abc… [3 more characters]");
        let mut s = "abc".to_string();
        cut(&mut s, 3);
        assert_eq!(s, "abc");
        let mut s = "abcdef".to_string();
        cut(&mut s, 0);
        assert_eq!(s, "abcdef");
    }
}
