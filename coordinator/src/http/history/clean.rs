//! `POST /v1/clean`: deleting old finished tasks.

use crate::http::answer::{Answer, Failure, field};
use crate::http::app::App;
use crate::retention;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::extract::rejection::BytesRejection;
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::report::{CleanReport, CleanRequest, MAX_CLEAN_BATCH};

/// `POST /v1/clean`: deletes the finished tasks created more than `older_than_ms` ago, with
/// their agents, index entries, dead letters, markers, sessions and checkpoints (pointers,
/// stored conversations and scratch trees; a worker deletes the checkpoint refs from the task's repository)
/// and their messages in the event log and
/// the results stream. Examines at most `limit` tasks, oldest first; `next` says where to go on.
#[utoipa::path(
    post,
    path = "/v1/clean",
    tag = "reports",
    request_body = CleanRequest,
    responses((status = 200, description = "What was (or, with `dry_run`, would be) deleted.", body = CleanReport))
)]
pub(super) async fn clean(
    AxumState(app): AxumState<App>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<axum::Json<CleanReport>> {
    let bytes = body.map_err(|e| {
        Failure::from(ApiError::new(
            ErrorCode::MalformedBody,
            format!("body: {}", e.body_text()),
        ))
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let req: CleanRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        field(if path == "." { "body" } else { &path }, e.into_inner())
    })?;
    let limit = req.limit.unwrap_or(MAX_CLEAN_BATCH);
    if !(1..=MAX_CLEAN_BATCH).contains(&limit) {
        return Err(field(
            "limit",
            format!("must be between 1 and {MAX_CLEAN_BATCH}"),
        ));
    }
    let cutoff = orch_shared::now_ms().saturating_sub(req.older_than_ms);
    let report = retention::clean(
        &app.state,
        &app.transport,
        cutoff,
        req.after,
        limit as usize,
        req.dry_run,
    )
    .await
    .map_err(|e| match e {
        retention::Error::State(e) => Failure::from(e),
        retention::Error::Transport(e) => Failure::from(e),
    })?;
    if !req.dry_run && report.tasks > 0 {
        tracing::info!(
            tasks = report.tasks,
            agents = report.agents,
            events = report.events_purged,
            "cleaned old tasks"
        );
    }
    Ok(axum::Json(report))
}
