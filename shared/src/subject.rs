//! NATS names: streams, subjects, consumers and message ids. Only the services' `transport`
//! modules use these.

use crate::ids::{JobId, TaskId};

/// Work queue of jobs (retention: work queue). Each backend has its own subject and durable
/// pull consumer ([`job`], [`job_consumer`]): a worker pulls only the consumers of the
/// backends it runs, so a job reaches only a worker that can run it.
pub const JOBS_STREAM: &str = "ORCH_JOBS";
/// Subjects of [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "orch.jobs.>";
/// The consumer every worker pulled from before jobs were routed by backend. It now reads
/// only [`LEGACY_JOBS_SUBJECT`], where coordinators of that time publish: during a rolling
/// update old workers keep pulling it, and new workers pull it too and move each job to its
/// backend's subject (or run it).
pub const JOBS_CONSUMER: &str = "workers";
/// The one subject of every job before routing by backend (`orch.jobs.default`).
pub const LEGACY_JOBS_SUBJECT: &str = "orch.jobs.default";
/// Prefix of the per-backend consumers (`workers-<backend>`).
pub const JOB_CONSUMER_PREFIX: &str = "workers-";

/// The subject of jobs that run on `backend` (`orch.jobs.<backend>`, a backend's wire name).
pub fn job(backend: &str) -> String {
    format!("orch.jobs.{backend}")
}

/// The durable consumer of [`job`]`(backend)`: `workers-<backend>`.
pub fn job_consumer(backend: &str) -> String {
    format!("{JOB_CONSUMER_PREFIX}{backend}")
}

/// Per-task event log (retention: limits).
pub const EVENTS_STREAM: &str = "ORCH_EVENTS";
pub const EVENTS_SUBJECTS: &str = "orch.events.>";

/// The latest snapshot of every task (retention: limits, one message per subject): with the
/// results stream, what the coordinator rebuilds Redis from after a data loss.
pub const TASKS_STREAM: &str = "ORCH_TASKS";
pub const TASKS_SUBJECTS: &str = "orch.tasks.>";

pub fn task_snapshot(task: TaskId) -> String {
    format!("orch.tasks.{task}")
}

/// Job results (retention: limits; read by the coordinator's durable consumer).
pub const RESULTS_STREAM: &str = "ORCH_RESULTS";
pub const RESULTS_SUBJECTS: &str = "orch.results.>";
pub const RESULTS_CONSUMER: &str = "coordinator";

/// The JetStream object store holding agents' sessions (CLI transcripts, API message
/// histories), one object per agent named by its job id.
pub const SESSIONS_BUCKET: &str = "ORCH_SESSIONS";
/// A stored session larger than this is not kept (the job still succeeds; it cannot be
/// continued, and its result says why).
pub const MAX_SESSION_BYTES: usize = 64 * 1024 * 1024;

pub fn event(task: TaskId, kind: &str) -> String {
    format!("orch.events.{task}.{kind}")
}

/// The last token of a subject carrying an [`crate::event::EventBatch`] instead of one event.
pub const BATCH_KIND: &str = "batch";

/// Several events of one task published as one message (see [`crate::event::EventBatch`]).
pub fn event_batch(task: TaskId) -> String {
    event(task, BATCH_KIND)
}

/// Every event batch of every task: readers filtering the log by kind add these, because a
/// batch's events can be of any kind that [`crate::event::EventKind::batchable`] allows.
pub const ALL_BATCHES: &str = "orch.events.*.batch";

/// The last token of the subject of a task's first message: an [`crate::event::EventBatch`]
/// holding its `task_created` (and first `job_queued`) events and its record as created.
pub const CREATED_KIND: &str = "created";

/// A task's creation: its first events and its record (see [`CREATED_KIND`]).
pub fn event_created(task: TaskId) -> String {
    event(task, CREATED_KIND)
}

/// The creation message of every task (readers filtering by kind add these too; a rebuild of
/// Redis reads the records of tasks that have no snapshot yet from them).
pub const ALL_CREATED: &str = "orch.events.*.created";

/// Every event of one task.
pub fn task_events(task: TaskId) -> String {
    format!("orch.events.{task}.>")
}

/// The events of `kind` of every task (published alone; batches are [`ALL_BATCHES`]).
pub fn all_events_of(kind: &str) -> String {
    format!("orch.events.*.{kind}")
}

/// `<task>.<kind>` of an event subject; `None` for a subject outside the event log.
pub fn event_key(subject: &str) -> Option<&str> {
    subject.strip_prefix("orch.events.")
}

/// The `job_started` events of every task (the coordinator follows them to mark jobs running).
pub const ALL_JOB_STARTED: &str = "orch.events.*.job_started";

/// The `job_parked` events of every task (the coordinator follows them to mark jobs parked).
pub const ALL_JOB_PARKED: &str = "orch.events.*.job_parked";

pub fn result(task: TaskId) -> String {
    format!("orch.results.{task}")
}

/// `Nats-Msg-Id` of a job attempt: JetStream drops a second publish inside its dedup window.
pub fn job_msg_id(job: JobId, attempt: u32) -> String {
    format!("job/{job}/{attempt}")
}

/// `Nats-Msg-Id` of a parked job attempt going back to the queue for the `park`-th time: not
/// the attempt's own id, which the dedup window would drop.
pub fn unparked_msg_id(job: JobId, attempt: u32, park: u64) -> String {
    format!("job/{job}/{attempt}/unparked/{park}")
}

/// `Nats-Msg-Id` of a job attempt that a worker moved from [`LEGACY_JOBS_SUBJECT`] to its
/// backend's subject: not the attempt's own id, which the dedup window would drop.
pub fn rerouted_msg_id(job: JobId, attempt: u32) -> String {
    format!("job/{job}/{attempt}/routed")
}

/// `Nats-Msg-Id` of a job attempt's result, published under lease `fence` (0: unfenced). A
/// retried publish of the same result is dropped as a duplicate; the result of a later lease
/// holder of the same attempt is not (with one id per attempt, the fenced-out result of a
/// worker that lost its lease would silently take the place of the holder's).
pub fn result_msg_id(job: JobId, attempt: u32, fence: u64) -> String {
    format!("result/{job}/{attempt}/{fence}")
}

/// `Nats-Msg-Id` of the `seq`-th log message of one run of a job attempt. `run` tells the
/// runs of an attempt apart (the job message's stream sequence and delivery count: a
/// redelivered, parked or moved attempt runs again under another), so a re-sent message of a
/// run is dropped as a duplicate and another run's messages are not.
pub fn job_events_msg_id(job: JobId, attempt: u32, run: &str, seq: u64) -> String {
    format!("ev/{job}/{attempt}/{run}/{seq}")
}

/// `Nats-Msg-Id` of a coordinator's log message about `task`: a digest of its payload, so the
/// same message sent again (a retried publish, or a `task_finished` written again by the next
/// leader from the task's record, whose time is the task's end) is dropped as a duplicate.
pub fn task_events_msg_id(task: TaskId, payload: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, payload);
    let hex: String = digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ev/{task}/{hex}")
}

/// Core NATS subject every worker listens on for job cancellations (`JobControl`).
pub const CONTROL_CANCEL: &str = "orch.control.cancel";

/// Core NATS subject of a running job's changed paths (`job::PathsReport`), read by the
/// leading coordinator (best effort: each report carries the whole set).
pub fn paths(task: TaskId) -> String {
    format!("orch.paths.{task}")
}

/// Every task's [`paths`] subject.
pub const ALL_PATHS: &str = "orch.paths.*";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_message_ids_repeat_for_the_same_message_only() {
        let task = TaskId::new();
        assert_eq!(
            task_events_msg_id(task, b"finished"),
            task_events_msg_id(task, b"finished")
        );
        assert_ne!(
            task_events_msg_id(task, b"finished"),
            task_events_msg_id(task, b"finished again")
        );
        assert_ne!(
            task_events_msg_id(task, b"finished"),
            task_events_msg_id(TaskId::new(), b"finished")
        );
        let job = JobId::new();
        assert_eq!(
            job_events_msg_id(job, 1, "7.1", 3),
            job_events_msg_id(job, 1, "7.1", 3)
        );
        // A redelivered run of the same attempt writes its own messages.
        assert_ne!(
            job_events_msg_id(job, 1, "7.1", 3),
            job_events_msg_id(job, 1, "7.2", 3)
        );
    }
}
