//! `GET /v1/export`: a window of tasks, agents or events as newline-delimited JSON.

use super::agents::agent_summary;
use super::window::{PAGE, range};
use crate::http::answer::{Answer, query};
use crate::http::app::App;
use crate::transport::events::ReadFrom;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use orch_shared::ids::TaskId;
use orch_shared::report::{EventRow, ExportWhat};
use serde::Deserialize;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ExportParams {
    /// What to export.
    what: ExportWhat,
    /// Created at or after (ms since the epoch).
    since: Option<u64>,
    /// Created before (ms since the epoch).
    until: Option<u64>,
}

fn ndjson_line<T: serde::Serialize>(value: &T) -> Result<Bytes, std::io::Error> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// `GET /v1/export?what=tasks|agents|events`: the window as newline-delimited JSON, oldest
/// first, streamed page by page ([`TaskSummary`], [`AgentSummary`] or [`EventRow`] lines).
#[utoipa::path(
    get,
    path = "/v1/export",
    tag = "reports",
    params(ExportParams),
    responses((status = 200, description = "Newline-delimited JSON, oldest first: one `TaskSummary`, `AgentSummary` or `EventRow` per line.", content_type = "application/x-ndjson", body = String))
)]
pub(super) async fn export(
    AxumState(app): AxumState<App>,
    params: Result<Query<ExportParams>, QueryRejection>,
) -> Answer<Response> {
    let p = query(params)?;
    let range = range(p.since, p.until)?;
    let body = match p.what {
        ExportWhat::Tasks | ExportWhat::Agents => {
            let what = p.what;
            let state = app.state.clone();
            // Each step reads one page of tasks after the last one sent.
            let pages = futures::stream::unfold(Some(None), move |after| {
                let state = state.clone();
                async move {
                    let after: Option<TaskId> = after?;
                    let page = async {
                        let ids = state.task_ids_asc(range, after, PAGE).await?;
                        let tasks = state.load_tasks(&ids).await?;
                        Ok::<_, crate::state::Error>((ids, tasks))
                    };
                    match page.await {
                        Ok((ids, _)) if ids.is_empty() => None,
                        Ok((ids, tasks)) => {
                            let mut lines = Vec::new();
                            for task in &tasks {
                                match what {
                                    ExportWhat::Tasks => lines.push(ndjson_line(&task.summary())),
                                    _ => lines.extend(
                                        task.jobs
                                            .iter()
                                            .map(|j| ndjson_line(&agent_summary(task, j))),
                                    ),
                                }
                            }
                            let next = (ids.len() == PAGE).then(|| ids.last().copied());
                            Some((futures::stream::iter(lines), next))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "export stopped: storage error");
                            let err = std::io::Error::other("task storage (Redis) failed");
                            Some((futures::stream::iter(vec![Err(err)]), None))
                        }
                    }
                }
            });
            Body::from_stream(pages.flatten())
        }
        ExportWhat::Events => {
            let from = range.since_ms.map_or(ReadFrom::Start, ReadFrom::Time);
            let until = range.until_ms;
            let events = app.transport.stored_events(None, from).await?;
            let lines = events
                .take_while(move |e| {
                    futures::future::ready(until.is_none_or(|u| e.event.at_ms < u))
                })
                .map(|e| {
                    ndjson_line(&EventRow {
                        seq: e.seq,
                        index: e.index,
                        event: e.event,
                    })
                });
            Body::from_stream(lines)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
