//! Redis is a cache of the JetStream log that knows how far it got. Every second the leader
//! records in Redis the [`LogPosition`] up to which Redis has everything: the results
//! consumer's ack floor (a result is acked only after its task was saved) and the last
//! sequences of the event log (creation messages) and of the snapshot stream, read before the
//! record is queued on the one Redis connection, so every write they count is executed first.
//!
//! The record comes back, in the same atomic step, with the position the server held before
//! and the server's run id. When the run id changes, Redis is another server (a Sentinel
//! failover, a restart) that may hold less than the log: a replica that missed the primary's
//! last acknowledged writes, say. The leader then replays the log past the position that
//! server held, as the rebuild does (`reconcile`): tasks it does not know come back from their
//! creation messages and snapshots, results are applied again (applying is idempotent: one
//! already in the record changes nothing) and settled once per attempt. A replica that becomes
//! leader replays past the stored position the same way before it dispatches.
//!
//! What this does not bring back is what only Redis knew (worker registrations, done markers,
//! running marks), as after a rebuild.

use crate::pipeline;
use crate::state::{self, State};
use crate::transport::{self, Transport};
use orch_shared::ids::TaskId;
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the leader records the log position.
pub const RECORD_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
}

/// How far in the log Redis has everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogPosition {
    /// Results stream sequence: every result up to it is applied.
    pub results: u64,
    /// Event log sequence: every task created up to it is recorded.
    pub events: u64,
    /// Snapshot stream sequence: every snapshot up to it is recorded.
    pub tasks: u64,
}

impl LogPosition {
    /// The hash fields it is stored as.
    pub fn fields(&self) -> [(&'static str, u64); 3] {
        [
            ("results", self.results),
            ("events", self.events),
            ("tasks", self.tasks),
        ]
    }

    /// Read back from [`LogPosition::fields`]; `None` when nothing was stored.
    pub fn from_fields(fields: &HashMap<String, u64>) -> Option<Self> {
        if fields.is_empty() {
            return None;
        }
        let get = |k: &str| fields.get(k).copied().unwrap_or(0);
        Some(Self {
            results: get("results"),
            events: get("events"),
            tasks: get("tasks"),
        })
    }
}

/// What a catch-up did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Tasks Redis did not know, or knew unfinished though the log has them finished.
    pub restored: usize,
    /// Results that changed a task record.
    pub applied: usize,
    /// Results charged now (they were not in the day's figures).
    pub settled: usize,
}

/// Replays the log past `from` into Redis, idempotently, up to `upto`: the results up to the
/// results consumer's ack floor were applied, saved and followed up (events, next jobs) before
/// they were acked, so only Redis lost them; a result past it is still pending in the consumer
/// and is delivered to a lane, which applies it with everything that follows from it.
pub async fn replay(
    state: &State,
    transport: &Transport,
    from: LogPosition,
    upto: LogPosition,
) -> Result<Report, Error> {
    let mut report = Report::default();
    let mut tasks: HashMap<TaskId, orch_shared::api::Task> = HashMap::new();
    for task in transport.tasks_between(&from, &upto).await? {
        tasks.insert(task.id, task);
    }
    for task in tasks.values() {
        let behind = match state.load_task(task.id).await? {
            None => true,
            Some(current) => !current.status.is_terminal() && task.status.is_terminal(),
        };
        if behind {
            state.restore_task(task).await?;
            report.restored += 1;
        }
    }
    for r in transport
        .results_between(from.results, upto.results)
        .await?
    {
        if let Some(mut task) = state.load_task(r.task_id).await?
            && pipeline::on_result(&mut task, &r, r.finished_at_ms).is_some()
        {
            state.restore_task(&task).await?;
            report.applied += 1;
        }
        if state
            .settle_daily(r.job_id, r.attempt, r.cost_usd, &r.usage, r.finished_at_ms)
            .await?
        {
            report.settled += 1;
        }
        if let Some(pointer) = &r.session {
            state.restore_session(r.job_id, pointer).await?;
        }
    }
    Ok(report)
}

/// Replays past the stored position: a replica that just became leader does, before it
/// dispatches. Tried again for a while: a leader may take over while NATS elects new stream
/// leaders, when the log cannot be read for seconds. Whether it is done; when it is not, [`run`]
/// does it before it records any position (recording first would skip what Redis lacks).
pub async fn on_leading(state: &State, transport: &Transport) -> bool {
    let mut waits = backon::BackoffBuilder::build(crate::while_nats_elects());
    loop {
        if catch_up_to_the_log(state, transport).await {
            return true;
        }
        match waits.next() {
            Some(wait) => tokio::time::sleep(wait).await,
            None => {
                tracing::warn!(
                    "not caught up with the log yet; dispatching, and trying again every second"
                );
                return false;
            }
        }
    }
}

/// One replay from the stored position to the log's end; whether it is done (nothing stored
/// is done: a Redis without a position was rebuilt from the whole log).
async fn catch_up_to_the_log(state: &State, transport: &Transport) -> bool {
    let from = match state.position().await {
        Ok(Some(from)) => from,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read how far Redis has the log");
            return false;
        }
    };
    match transport.log_position().await {
        Ok(upto) => catch_up(state, transport, from, upto, "this coordinator leads now").await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the log position");
            false
        }
    }
}

/// Records the position every [`RECORD_EVERY`] and replays whenever Redis turned out to be
/// another server, until `cancel`; first finishes the replay [`on_leading`] could not
/// (`caught_up` false).
pub async fn run(state: State, transport: Transport, cancel: CancellationToken, caught_up: bool) {
    let mut caught_up = caught_up;
    let mut server: Option<String> = None;
    let mut tick = tokio::time::interval(RECORD_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !caught_up {
            caught_up = catch_up_to_the_log(&state, &transport).await;
            if !caught_up {
                continue;
            }
        }
        let at = match transport.log_position().await {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the log position");
                continue;
            }
        };
        let (before, run_id) = match state.record_position(&at).await {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::debug!(error = %e, "cannot record the log position");
                continue;
            }
        };
        if server.as_ref().is_some_and(|s| *s != run_id) {
            // No position at all: a Redis that never had one (wiped): replay everything.
            let from = before.unwrap_or_default();
            if !catch_up(&state, &transport, from, at, "Redis is another server").await {
                // Run again from the same position at the next tick.
                if let Err(e) = state.set_position(&from).await {
                    tracing::warn!(error = %e, "cannot put the log position back");
                }
                continue;
            }
        }
        server = Some(run_id);
    }
}

/// One replay with its logs; whether it finished.
async fn catch_up(
    state: &State,
    transport: &Transport,
    from: LogPosition,
    upto: LogPosition,
    why: &str,
) -> bool {
    tracing::info!(?from, ?upto, why, "replaying the log past what Redis has");
    match replay(state, transport, from, upto).await {
        Ok(report) => {
            if report != Report::default() {
                tracing::warn!(
                    restored = report.restored,
                    applied = report.applied,
                    settled = report.settled,
                    "Redis was behind the log: caught up"
                );
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "catching Redis up with the log failed; trying again");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_from_its_fields() {
        let at = LogPosition {
            results: 7,
            events: 42,
            tasks: 3,
        };
        let fields: HashMap<String, u64> = at
            .fields()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(LogPosition::from_fields(&fields), Some(at));
        assert_eq!(LogPosition::from_fields(&HashMap::new()), None);
    }
}
