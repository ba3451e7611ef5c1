//! Follows a task's event stream (`GET /v1/tasks/{id}/events`, server-sent events).
//!
//! Each message carries `id: <event id>` (`seq`, or `seq.index` inside a batch) and `data:
//! <Event JSON>`; the stream ends after the `task_finished` event, or, when that says the task's
//! pull request step follows (`pr_pending`), after the step's outcome ([`LogEnd`]; waited for
//! at most [`PR_WAIT`]). When the connection drops
//! before that, the follower reconnects with `Last-Event-ID` set to the last id it saw, so no
//! event is shown twice or lost.
//! Reconnects back off exponentially (backon) and give up after [`MAX_RECONNECTS`] attempts in a
//! row without a new event.

use crate::client::{self, Client};
use backon::{BackoffBuilder, ExponentialBuilder};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use orch_shared::event::{Event, EventId, LogEnd};
use orch_shared::ids::TaskId;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reconnect attempts in a row before giving up.
pub const MAX_RECONNECTS: usize = 5;

/// Longest wait after `task_finished` for the pull request's outcome (a coordinator without
/// its forge any more never sends one).
pub const PR_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] client::Error),
    #[error("lost the event stream after {attempts} reconnect attempts ({reason})")]
    GaveUp {
        attempts: usize,
        /// Why the last attempt failed.
        reason: String,
    },
}

/// What the follower reports.
#[derive(Debug)]
pub enum Update {
    /// One event of the task's log.
    Event(Box<Event>),
    /// The connection dropped; the follower waits `delay` and reconnects.
    Reconnecting {
        attempt: usize,
        delay: Duration,
        reason: String,
    },
}

/// One decoded SSE message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Event {
        seq: Option<EventId>,
        event: Box<Event>,
    },
    /// A message we do not understand (a newer server's event kind); only its sequence and
    /// whether it ends the stream matter.
    Unknown {
        seq: Option<EventId>,
        terminal: bool,
    },
}

impl Message {
    pub fn seq(&self) -> Option<EventId> {
        match self {
            Message::Event { seq, .. } | Message::Unknown { seq, .. } => *seq,
        }
    }

    /// Whether this message ends the followed stream (`end` holds what came before).
    pub fn ends(&self, end: &mut LogEnd) -> bool {
        match self {
            Message::Event { event, .. } => end.ends(&event.kind),
            Message::Unknown { terminal, .. } => *terminal,
        }
    }
}

/// Decodes one SSE message's `id` and `data`.
pub fn decode(id: &str, data: &str) -> Message {
    let seq = id.trim().parse::<EventId>().ok();
    match serde_json::from_str::<Event>(data) {
        Ok(event) => Message::Event {
            seq,
            event: Box::new(event),
        },
        Err(_) => {
            let terminal = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| {
                    v.pointer("/kind/type")
                        .and_then(|t| t.as_str())
                        .map(|t| t == "task_finished")
                })
                .unwrap_or(false);
            Message::Unknown { seq, terminal }
        }
    }
}

/// How one connection ended.
enum Ended {
    /// The `task_finished` event arrived.
    Finished,
    /// The server closed the stream early or the connection broke, for this reason.
    Dropped(String),
}

/// The reconnect policy: 0.5 s, 1 s, 2 s... up to 8 s, with jitter.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(8))
        .with_max_times(MAX_RECONNECTS)
        .with_jitter()
}

/// Follows the events of `task` until it finishes, sending every event and reconnect notice to
/// `updates`. Returns when the `task_finished` event has been sent, or when the server closed the
/// stream and the task turns out to be finished already.
pub async fn follow(
    client: Client,
    task: TaskId,
    updates: mpsc::UnboundedSender<Update>,
) -> Result<(), Error> {
    let mut last_seq: Option<EventId> = None;
    let mut end = LogEnd::default();
    let mut delays = backoff().build();
    let mut attempt = 0;
    loop {
        let seq_before = last_seq;
        let reason = match stream_once(&client, task, &mut last_seq, &mut end, &updates).await {
            Ok(Ended::Finished) => return Ok(()),
            Ok(Ended::Dropped(reason)) => reason,
            Err(e) if e.is_transient() => short_reason(&e),
            Err(e) => return Err(e.into()),
        };
        // The log may have ended without a `task_finished` we could read (an old task whose log
        // was trimmed); the task record says whether there is anything left to wait for.
        if let Ok(t) = client.task(task).await
            && t.status.is_terminal()
            && !t.pr_pending()
        {
            return Ok(());
        }
        if last_seq != seq_before {
            // Progress was made: a later drop starts the backoff from scratch.
            delays = backoff().build();
            attempt = 0;
        }
        attempt += 1;
        let Some(delay) = delays.next() else {
            return Err(Error::GaveUp {
                attempts: attempt - 1,
                reason,
            });
        };
        let _ = updates.send(Update::Reconnecting {
            attempt,
            delay,
            reason,
        });
        tokio::time::sleep(delay).await;
    }
}

async fn stream_once(
    client: &Client,
    task: TaskId,
    last_seq: &mut Option<EventId>,
    end: &mut LogEnd,
    updates: &mpsc::UnboundedSender<Update>,
) -> Result<Ended, client::Error> {
    let resp = client.events(task, *last_seq).await?;
    let mut stream = resp.bytes_stream().eventsource();
    let mut pr_deadline = None;
    loop {
        let item = if end.awaiting_pr() {
            let deadline =
                *pr_deadline.get_or_insert_with(|| tokio::time::Instant::now() + PR_WAIT);
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(item) => item,
                // The task ended; its pull request's outcome is late: stop waiting for it.
                Err(_) => return Ok(Ended::Finished),
            }
        } else {
            stream.next().await
        };
        let Some(item) = item else {
            break;
        };
        let sse = match item {
            Ok(sse) => sse,
            Err(eventsource_stream::EventStreamError::Transport(e)) => {
                return Ok(Ended::Dropped(format!("the connection broke: {e}")));
            }
            Err(e) => {
                // A garbled frame: reconnecting from the last good sequence recovers.
                return Ok(Ended::Dropped(format!("malformed event stream: {e}")));
            }
        };
        let message = decode(&sse.id, &sse.data);
        if let Some(seq) = message.seq() {
            // A replayed event (at or before what we saw) is dropped: the server should not
            // send one after Last-Event-ID, but showing an event twice would confuse the panel.
            if last_seq.is_some_and(|last| seq <= last) {
                continue;
            }
            *last_seq = Some(seq);
        }
        let terminal = message.ends(end);
        if let Message::Event { event, .. } = message {
            // The receiver going away means the caller stopped caring; keep reading to the end
            // anyway so the sequence stays right.
            let _ = updates.send(Update::Event(event));
        }
        if terminal {
            return Ok(Ended::Finished);
        }
    }
    Ok(Ended::Dropped(
        "the server closed the stream before the task finished".into(),
    ))
}

/// A few words on why a connection attempt failed, for the reconnect notice.
fn short_reason(e: &client::Error) -> String {
    match e {
        client::Error::Connect { url } => format!("cannot connect to {url}"),
        client::Error::Timeout { .. } => "timed out".into(),
        client::Error::Http { source, .. } => source.to_string(),
        client::Error::Api { status, error } => format!("HTTP {status}: {}", error.message),
        client::Error::Status { status, .. } => format!("HTTP {status}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::event::EventKind;

    #[test]
    fn messages_decode_with_their_sequence() {
        let data = r#"{"task_id":"00000000-0000-0000-0000-000000000abc","job_id":null,"attempt":0,"at_ms":5,"kind":{"type":"task_finished","status":"completed","usage":{"input_tokens":1,"output_tokens":2,"cache_creation_tokens":0,"cache_read_tokens":0},"cost_usd":0.1,"duration_ms":9}}"#;
        let m = decode("42", data);
        assert_eq!(m.seq(), Some(EventId::new(42, 0)));
        assert_eq!(decode("42.3", data).seq(), Some(EventId::new(42, 3)));
        assert!(m.ends(&mut LogEnd::default()));
        match m {
            Message::Event { event, .. } => {
                assert!(matches!(event.kind, EventKind::TaskFinished { .. }))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_event_kinds_are_skipped_but_can_still_end_the_stream() {
        let m = decode("7", r#"{"kind":{"type":"something_new"}}"#);
        assert_eq!(
            m,
            Message::Unknown {
                seq: Some(EventId::new(7, 0)),
                terminal: false
            }
        );
        let m = decode("", r#"{"kind":{"type":"task_finished","extra":1}}"#);
        assert_eq!(
            m,
            Message::Unknown {
                seq: None,
                terminal: true
            }
        );
    }

    #[test]
    fn reconnects_are_bounded() {
        let delays: Vec<Duration> = backoff().build().collect();
        assert_eq!(delays.len(), MAX_RECONNECTS);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(16)));
    }
}
