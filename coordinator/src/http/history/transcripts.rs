//! Transcripts: the event logs of an agent or a task, stored or followed live.

use super::agents::find_agent;
use crate::http::answer::{Answer, field, query};
use crate::http::app::App;
use crate::http::sse::{self, last_event_id, sse_event, task_end};
use crate::http::tasks::load;
use crate::transport::StoredEvent;
use crate::transport::events::ReadFrom;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State as AxumState};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::{Stream, StreamExt};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, TaskId};
use serde::Deserialize;
use std::convert::Infallible;

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct LogParams {
    /// Keep the stream open for new events until the agent ends.
    follow: Option<bool>,
}

/// Whether an agent's log has nothing more to say after this event.
fn ends_agent_log(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::JobFinished { success: true, .. }
            | EventKind::JobDeadLettered { .. }
            | EventKind::JobCancelled { .. }
            | EventKind::JobSkipped { .. }
            | EventKind::TaskFinished { .. }
    )
}

/// The task's event log as server-sent events, from the start or after `Last-Event-ID`; the
/// stream ends after `task_finished`.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/events",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id (a UUID)."), ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`N` or `N.M`, as sent in `id:`).")),
    responses((status = 200, description = "Server-sent events: `id` the event id, `event` its kind, `data` the event as JSON. Ends after the task's end.", content_type = "text/event-stream", body = Event))
)]
pub(super) async fn task_events(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Answer<Response> {
    let task = load(&app, &id).await?;
    let after = last_event_id(&headers)?;
    let stored = app.transport.task_events(task.id, after).await?;
    // Ends right after the task's latest end, without waiting for another event (a task
    // reopened by a send has earlier ends in its log).
    let ended = std::sync::Arc::new(task_end(&task));
    let stream = futures::stream::unfold((Box::pin(stored), false), move |(mut stored, done)| {
        let ended = ended.clone();
        async move {
            if done {
                return None;
            }
            let e = stored.next().await?;
            let last = ended(&e.event);
            Some((e, (stored, last)))
        }
    })
    .map(|e| Ok::<_, Infallible>(sse_event(&e)))
    .take_until(app.shutdown.clone().cancelled_owned());
    Ok(sse::respond(stream))
}

/// `GET /v1/agents/{id}/logs`: the agent's transcript (text, tool calls with their inputs, tool
/// results, usage, starts, ends, retries) as server-sent events with the event id
/// (`seq`, or `seq.index` inside a batch) as id. Without `follow` the stream ends with the last stored event; with it, after the agent's
/// last event. Resumes after `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/v1/agents/{id}/logs",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID)."), LogParams, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`N` or `N.M`, as sent in `id:`).")),
    responses((status = 200, description = "Server-sent events: `id` the event id, `event` its kind, `data` the event as JSON.", content_type = "text/event-stream", body = Event))
)]
pub(super) async fn agent_logs(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let (task, index) = find_agent(&app, &id).await?;
    let job = task.jobs[index].id;
    let after = last_event_id(&headers)?;
    let done = task.status.is_terminal() || task.jobs[index].status.is_terminal();
    let mine = move |e: &StoredEvent| e.id() > after && e.event.job_id == Some(job);
    let shutdown = app.shutdown.clone().cancelled_owned();
    let task_ended = task_end(&task);
    let stream: std::pin::Pin<Box<dyn Stream<Item = StoredEvent> + Send>> =
        if p.follow.unwrap_or(false) && !done {
            let live = app.transport.task_events(task.id, after).await?;
            let task_ended = std::sync::Arc::new(task_ended);
            Box::pin(
                futures::stream::unfold((Box::pin(live), false), move |(mut live, ended)| {
                    let task_ended = task_ended.clone();
                    async move {
                        if ended {
                            return None;
                        }
                        loop {
                            let e = live.next().await?;
                            let last = if e.event.job_id == Some(job) {
                                ends_agent_log(&e.event.kind)
                            } else {
                                task_ended(&e.event)
                            };
                            if e.event.job_id == Some(job) || last {
                                return Some((e, (live, last)));
                            }
                        }
                    }
                })
                .filter(move |e| futures::future::ready(e.id() > after)),
            )
        } else {
            let stored = app
                .transport
                .stored_events(Some(task.id), ReadFrom::Start)
                .await?;
            Box::pin(stored.filter(move |e| futures::future::ready(mine(e))))
        };
    let stream = stream
        .map(|e| Ok::<_, Infallible>(sse_event(&e)))
        .take_until(shutdown);
    Ok(sse::respond(stream))
}

/// `GET /v1/tasks/{id}/logs`: the transcripts of every agent of a task, as
/// `GET /v1/agents/{id}/logs` (without `follow`, the stream ends with the last stored event;
/// `GET /v1/tasks/{id}/events` always follows to the task's end).
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/logs",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id (a UUID)."), LogParams, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (`N` or `N.M`, as sent in `id:`).")),
    responses((status = 200, description = "Server-sent events: `id` the event id, `event` its kind, `data` the event as JSON.", content_type = "text/event-stream", body = Event))
)]
pub(super) async fn task_logs(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let id: TaskId = id
        .parse()
        .map_err(|e: orch_shared::ids::IdError| field("id", e))?;
    let task = app
        .state
        .load_task(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("task {id} not found")))?;
    let after = last_event_id(&headers)?;
    let shutdown = app.shutdown.clone().cancelled_owned();
    let stream: std::pin::Pin<Box<dyn Stream<Item = StoredEvent> + Send>> =
        if p.follow.unwrap_or(false) && !task.status.is_terminal() {
            let live = app.transport.task_events(task.id, after).await?;
            let task_ended = std::sync::Arc::new(task_end(&task));
            Box::pin(futures::stream::unfold(
                (Box::pin(live), false),
                move |(mut live, ended)| {
                    let task_ended = task_ended.clone();
                    async move {
                        if ended {
                            return None;
                        }
                        let e = live.next().await?;
                        let last = task_ended(&e.event);
                        Some((e, (live, last)))
                    }
                },
            ))
        } else {
            let stored = app
                .transport
                .stored_events(Some(task.id), ReadFrom::Start)
                .await?;
            Box::pin(stored.filter(move |e| futures::future::ready(e.id() > after)))
        };
    let stream = stream
        .map(|e| Ok::<_, Infallible>(sse_event(&e)))
        .take_until(shutdown);
    Ok(sse::respond(stream))
}
