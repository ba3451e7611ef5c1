//! The history's retention: deleting finished tasks older than a cutoff, with everything kept
//! about them (record, index entries, dead letters, markers, sessions, checkpoints, their
//! messages in the event log and the results stream). `POST /v1/clean` runs one bounded batch
//! on request; the leader runs batches on its own every [`sweep_every`] for the tasks older
//! than `--history-retention` (90 days by default, `0s` keeps everything), so a history that
//! grows for months keeps a bounded size in Redis.

use crate::state::history::Range;
use crate::state::{self, State};
use crate::transport::{self, Transport};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::{CleanReport, MAX_CLEAN_BATCH};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
}

/// Deletes (or with `dry_run` counts) the finished tasks created before `cutoff_ms`, oldest
/// first after `after`, examining at most `limit` tasks; `next` says where to go on.
pub async fn clean(
    state: &State,
    transport: &Transport,
    cutoff_ms: u64,
    after: Option<TaskId>,
    limit: usize,
    dry_run: bool,
) -> Result<CleanReport, Error> {
    let window = Range {
        since_ms: None,
        until_ms: Some(cutoff_ms.max(1)),
    };
    let ids = state.task_ids_asc(window, after, limit).await?;
    let mut report = CleanReport {
        cutoff_ms,
        dry_run,
        next: (ids.len() == limit).then(|| ids.last().copied()).flatten(),
        ..Default::default()
    };
    for task in state.load_tasks(&ids).await? {
        if !task.status.is_terminal() {
            report.skipped_unfinished += 1;
            continue;
        }
        report.tasks += 1;
        report.agents += task.jobs.len() as u64;
        if dry_run {
            continue;
        }
        // The logs go first: a failure leaves the record, so a later clean finds it again.
        let (events, results) = transport.purge_task(task.id).await?;
        let jobs: Vec<JobId> = task.jobs.iter().map(|j| j.id).collect();
        // Checkpoints: their conversations here, their pointers with the task's keys.
        let checkpoints = state.checkpoint_objects(&jobs).await?;
        transport.purge_sessions(&jobs, &checkpoints).await?;
        report.events_purged += events;
        report.results_purged += results;
        state.delete_task(&task).await?;
    }
    Ok(report)
}

/// How often the leader looks for tasks past the retention: a tenth of it, between 1 s and
/// 10 minutes.
pub fn sweep_every(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Deletes every finished task older than `retention`, batch after batch; the tasks deleted.
pub async fn sweep(
    state: &State,
    transport: &Transport,
    retention: Duration,
    cancel: &CancellationToken,
) -> Result<u64, Error> {
    let cutoff = orch_shared::now_ms().saturating_sub(retention.as_millis() as u64);
    let mut after = None;
    let mut deleted = 0;
    loop {
        let batch = MAX_CLEAN_BATCH as usize;
        let report = clean(state, transport, cutoff, after, batch, false).await?;
        deleted += report.tasks;
        match report.next {
            Some(next) if !cancel.is_cancelled() => after = Some(next),
            _ => return Ok(deleted),
        }
    }
}

/// The leader's retention loop: a sweep at once, then every [`sweep_every`], until `cancel`.
pub async fn run(
    state: State,
    transport: Transport,
    retention: Duration,
    cancel: CancellationToken,
) {
    let every = sweep_every(retention);
    loop {
        match sweep(&state, &transport, retention, &cancel).await {
            Ok(0) => {}
            Ok(tasks) => tracing::info!(
                tasks,
                retention = %humantime::format_duration(retention),
                "deleted the finished tasks past the history retention"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "history retention sweep failed; trying again later")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
