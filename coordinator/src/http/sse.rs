//! Server-sent event streams: one event per stored event, resumed after `Last-Event-ID`.

use super::answer::{Answer, field};
use crate::transport::{self, StoredEvent};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use orch_shared::api::Task;
use orch_shared::event::{Event, EventId, LogEnd};
use std::convert::Infallible;
use std::time::Duration;

/// Where a resumed stream goes on: the `Last-Event-ID` header (the start when absent).
pub fn last_event_id(headers: &HeaderMap) -> Answer<EventId> {
    match headers.get("last-event-id") {
        None => Ok(EventId::default()),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<EventId>().ok())
            .ok_or_else(|| {
                field(
                    "Last-Event-ID",
                    "expected an event id (N or N.M, as sent in `id:`)",
                )
            }),
    }
}

/// Which event ends a followed stream of `task`: its latest `task_finished`, or after one that
/// says a pull request step follows, that step's outcome ([`LogEnd`]). A task reopened by a
/// send, a fork or a dead-letter retry has older ends in its log; the task's latest end is at
/// or after everything it queued (the leader's clock stamps both), and at or after its
/// recorded end. A stream resumed past the end of a task whose pull request step is still to
/// come waits for the step's outcome.
pub fn task_end(task: &Task) -> impl Fn(&Event) -> bool + Send + Sync + 'static {
    let since = if task.status.is_terminal() {
        task.finished_at_ms.unwrap_or(0)
    } else {
        task.jobs
            .iter()
            .filter_map(|j| j.queued_at_ms)
            .max()
            .unwrap_or(0)
    };
    let end = std::sync::Mutex::new(LogEnd::resumed(
        task.status.is_terminal() && task.pr_pending(),
    ));
    move |e: &Event| {
        if transport::is_last(e) && e.at_ms < since {
            return false;
        }
        end.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ends(&e.kind)
    }
}

/// One stored event as an SSE event: its id (for resuming), its kind as the event name.
pub fn sse_event(e: &StoredEvent) -> SseEvent {
    let data = serde_json::to_string(&e.event).unwrap_or_default();
    SseEvent::default()
        .id(e.id().to_string())
        .event(e.event.kind.name())
        .data(data)
}

/// An SSE response of `events`, with a keep-alive comment every 10 s (proxies close idle
/// connections).
pub fn respond<S>(events: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}
