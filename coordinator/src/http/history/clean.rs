//! `POST /v1/clean`: deleting old finished tasks.

use crate::http::answer::{Answer, Failure, field};
use crate::http::app::App;
use crate::state::history::Range;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::extract::rejection::BytesRejection;
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::JobId;
use orch_shared::report::{CleanReport, CleanRequest, MAX_CLEAN_BATCH};

/// `POST /v1/clean`: deletes the finished tasks created more than `older_than_ms` ago, with
/// their agents, index entries, dead letters, markers, sessions and checkpoints (pointers,
/// stored conversations and scratch trees; the checkpoint refs stay in the task's repository)
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
    let now = orch_shared::now_ms();
    let cutoff = now.saturating_sub(req.older_than_ms);
    let window = Range {
        since_ms: None,
        until_ms: Some(cutoff.max(1)),
    };
    let ids = app
        .state
        .task_ids_asc(window, req.after, limit as usize)
        .await?;
    let mut report = CleanReport {
        cutoff_ms: cutoff,
        dry_run: req.dry_run,
        next: (ids.len() == limit as usize)
            .then(|| ids.last().copied())
            .flatten(),
        ..Default::default()
    };
    for task in app.state.load_tasks(&ids).await? {
        if !task.status.is_terminal() {
            report.skipped_unfinished += 1;
            continue;
        }
        report.tasks += 1;
        report.agents += task.jobs.len() as u64;
        if req.dry_run {
            continue;
        }
        // The logs go first: a failure leaves the record, so a later clean finds it again.
        let (events, results) = app.transport.purge_task(task.id).await?;
        let jobs: Vec<JobId> = task.jobs.iter().map(|j| j.id).collect();
        // Checkpoints: their conversations here, their pointers with the task's keys.
        let checkpoints = app.state.checkpoint_objects(&jobs).await?;
        app.transport.purge_sessions(&jobs, &checkpoints).await?;
        report.events_purged += events;
        report.results_purged += results;
        app.state.delete_task(&task).await?;
    }
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
