//! Worker metric names and descriptions. Labels come from small fixed sets, never ids.

use metrics::{describe_counter, describe_gauge, describe_histogram};

pub const JOBS_STARTED: &str = "orch_worker_jobs_started_total";
pub const JOBS_FINISHED: &str = "orch_worker_jobs_finished_total";
pub const JOBS_REDELIVERED: &str = "orch_worker_jobs_redelivered_total";
pub const JOBS_ALREADY_DONE: &str = "orch_worker_jobs_already_done_total";
pub const JOBS_HANDED_BACK: &str = "orch_worker_jobs_handed_back_total";
pub const HEARTBEATS: &str = "orch_worker_in_progress_acks_total";
pub const HEARTBEATS_LATE: &str = "orch_worker_in_progress_acks_late_total";
pub const LEASES_LOST: &str = "orch_worker_leases_lost_total";
pub const JOBS_RESUMED: &str = "orch_worker_jobs_resumed_total";
pub const JOBS_MIGRATED: &str = "orch_worker_jobs_migrated_total";
pub const CHECKPOINT_SECONDS: &str = "orch_worker_checkpoint_seconds";
pub const TOOL_ROUND_OVERHEAD_SECONDS: &str = "orch_worker_tool_round_overhead_seconds";
pub const CHECKPOINTS_TOO_LARGE: &str = "orch_worker_checkpoints_too_large_total";
pub const SLOTS_BUSY: &str = "orch_worker_slots_busy";
pub const SLOTS_TOTAL: &str = "orch_worker_slots_total";
pub const JOBS_PARKED: &str = "orch_worker_jobs_parked_total";
pub const JOBS_UNPARKED: &str = "orch_worker_jobs_unparked_total";
pub const EVENTS_RESENT: &str = "orch_worker_events_resent_total";
pub const CREDENTIALS_EXHAUSTED: &str = "orch_worker_credential_exhausted_total";

pub fn describe() {
    describe_counter!(
        EVENTS_RESENT,
        "Event log messages sent again because JetStream did not confirm them (a NATS node lost)"
    );
    describe_counter!(JOBS_STARTED, "Job attempts this worker started");
    describe_counter!(
        JOBS_FINISHED,
        "Job attempts this worker finished, by outcome and failure reason"
    );
    describe_counter!(
        JOBS_REDELIVERED,
        "Jobs received again after another delivery (a worker died or stalled)"
    );
    describe_counter!(
        JOBS_ALREADY_DONE,
        "Redelivered jobs acked without running because their result was already stored"
    );
    describe_counter!(
        JOBS_HANDED_BACK,
        "Jobs handed back to the queue (drain deadline, or result not publishable)"
    );
    describe_counter!(HEARTBEATS, "In-progress acks sent for running jobs");
    describe_counter!(
        HEARTBEATS_LATE,
        "In-progress acks sent more than half their period after they were due (a busy worker)"
    );
    describe_counter!(
        LEASES_LOST,
        "Jobs dropped because another worker took their lease (this worker was paused or cut off)"
    );
    describe_counter!(
        JOBS_PARKED,
        "Job attempts parked because every credential of their backend was at its usage limit"
    );
    describe_counter!(
        JOBS_UNPARKED,
        "Parked job attempts this worker put back in the queue at their credential's reset"
    );
    describe_counter!(
        CREDENTIALS_EXHAUSTED,
        "Times a provider said a credential is at its usage limit (429), by backend"
    );
    describe_counter!(
        JOBS_RESUMED,
        "Job attempts resumed from a checkpoint instead of starting over"
    );
    describe_counter!(
        JOBS_MIGRATED,
        "Jobs checkpointed and handed back at once by a draining worker"
    );
    describe_counter!(
        CHECKPOINTS_TOO_LARGE,
        "Checkpoints not saved: a scratch workspace's tree over the bundle bound"
    );
    describe_histogram!(
        TOOL_ROUND_OVERHEAD_SECONDS,
        "A native agent's own time per tool round: from the end of a model response to the \
         next request sent, the tools' run time left out"
    );
    describe_histogram!(
        CHECKPOINT_SECONDS,
        "Time to save one checkpoint (workspace commit and push, conversation, pointer)"
    );
    describe_gauge!(SLOTS_BUSY, "Slots running an agent");
    describe_gauge!(SLOTS_TOTAL, "Slots this worker offers");
    // Unlabelled series exist from the start, so rate() and alerts work on a worker that has
    // not yet seen a redelivery or a drain.
    for name in [
        JOBS_STARTED,
        JOBS_REDELIVERED,
        JOBS_ALREADY_DONE,
        JOBS_HANDED_BACK,
        HEARTBEATS,
        HEARTBEATS_LATE,
        JOBS_PARKED,
        JOBS_UNPARKED,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for backend in ["anthropic", "openai"] {
        metrics::counter!(CREDENTIALS_EXHAUSTED, "backend" => backend).absolute(0);
    }
    metrics::gauge!(SLOTS_BUSY).set(0.0);
}
