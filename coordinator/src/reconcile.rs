//! Rebuilding Redis from the durable log. Redis is fast state; JetStream keeps every task's
//! latest snapshot (`ORCH_TASKS`, written at planning, user changes, the end, and for a task
//! older than half the event log's max age at each of its saves; until then a task's record as
//! created is in its creation message, `orch.events.<task>.created`) and every job result (`ORCH_RESULTS`, the usage ledger). A task's current state is its snapshot
//! with its results applied again in order — applying a result is idempotent, so results the
//! snapshot already contains change nothing. The day's spend is re-settled from the results
//! the same way (settlement is idempotent per job attempt).
//!
//! Agents' session pointers come back from the results that reported them (the sessions
//! themselves are in the object store, or inline in the result).
//!
//! It runs at startup when Redis has no epoch marker but the log has tasks: Redis was wiped or
//! replaced. What Redis alone knew is gone and comes back by itself: worker registrations (next
//! heartbeat), `running` marks (next result), job statistics for estimates (next jobs), and the
//! workers' done markers (a redelivered job may run again; it is counted as a duplicate).

use crate::pipeline;
use crate::state::{self, State};
use crate::transport::{self, Outgoing, Transport};
use orch_shared::api::Task;
use orch_shared::event::Event;
use orch_shared::ids::TaskId;
use orch_shared::job::JobResult;
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
}

/// What a rebuild restored.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub tasks: usize,
    pub results: usize,
    pub settled: usize,
    /// Agents' session pointers written again from their turns' results.
    pub sessions: usize,
}

/// Every task the log knows, each at its latest durable record: its snapshot, or for a task
/// that has none yet, its record as created.
async fn tasks_in_log(transport: &Transport) -> Result<Vec<Task>, Error> {
    let mut tasks: HashMap<TaskId, Task> = transport
        .created_records()
        .await?
        .into_iter()
        .map(|t| (t.id, t))
        .collect();
    // A snapshot is always later than the creation.
    tasks.extend(
        transport
            .task_snapshots()
            .await?
            .into_iter()
            .map(|t| (t.id, t)),
    );
    let mut tasks: Vec<_> = tasks.into_values().collect();
    tasks.sort_by_key(|t| t.id);
    Ok(tasks)
}

/// Rebuilds Redis if it lost the cluster's state; returns what was restored.
pub async fn run_if_needed(state: &State, transport: &Transport) -> Result<Option<Report>, Error> {
    if state.epoch().await?.is_some() {
        return Ok(None);
    }
    let snapshots = tasks_in_log(transport).await?;
    let now = orch_shared::now_ms();
    if snapshots.is_empty() {
        // A new cluster: nothing to rebuild.
        state.set_epoch(now).await?;
        return Ok(None);
    }
    tracing::warn!(
        tasks = snapshots.len(),
        "Redis holds no cluster state but the log does: rebuilding"
    );
    let results = transport.all_results().await?;
    let mut by_task: HashMap<TaskId, Vec<&JobResult>> = HashMap::new();
    for r in &results {
        by_task.entry(r.task_id).or_default().push(r);
    }
    let mut report = Report {
        results: results.len(),
        ..Default::default()
    };
    for mut task in snapshots {
        let mut log = Vec::new();
        let mut snapshot = false;
        for r in by_task.get(&task.id).into_iter().flatten() {
            // Events the coordinator had not written before Redis went (a `task_finished`,
            // say) are written now; queued jobs are republished by `resume` afterwards.
            for action in pipeline::on_result(&mut task, r, r.finished_at_ms)
                .into_iter()
                .flatten()
            {
                match action {
                    pipeline::Action::Emit(job_id, kind) => log.push(Outgoing::Event(Event {
                        task_id: task.id,
                        job_id,
                        attempt: 0,
                        at_ms: orch_shared::now_ms(),
                        kind,
                    })),
                    pipeline::Action::Snapshot => snapshot = true,
                    _ => {}
                }
            }
        }
        // The stream keeps one snapshot per task: the last state is the one to send.
        if snapshot {
            log.push(Outgoing::Snapshot(&task));
        }
        state.restore_task(&task).await?;
        transport.publish_all(&log).await?;
        report.tasks += 1;
    }
    for r in &results {
        if state
            .settle_daily(r.job_id, r.attempt, r.cost_usd, &r.usage, r.finished_at_ms)
            .await?
        {
            report.settled += 1;
        }
        // Results in log order: a turn stored again by a redelivery ends with its last copy.
        if let Some(pointer) = &r.session {
            state.restore_session(r.job_id, pointer).await?;
            report.sessions += 1;
        }
    }
    state.set_epoch(now).await?;
    tracing::warn!(
        tasks = report.tasks,
        results = report.results,
        settled = report.settled,
        sessions = report.sessions,
        "Redis rebuilt from the durable log"
    );
    Ok(Some(report))
}
