//! Metric names (constants, so dashboards and code cannot drift) and their descriptions.
//! Labels come from small fixed sets (status, reason, role, kind), never ids.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const MESSAGES_RESENT: &str = "orch_log_messages_resent_total";
pub const TASKS_SUBMITTED: &str = "orch_tasks_submitted_total";
pub const TASKS_FINISHED: &str = "orch_tasks_finished_total";
pub const JOBS_DISPATCHED: &str = "orch_jobs_dispatched_total";
pub const JOBS_FINISHED: &str = "orch_jobs_finished_total";
pub const JOB_DURATION: &str = "orch_job_duration_seconds";
pub const DISPATCH_LATENCY: &str = "orch_dispatch_latency_seconds";
pub const TOKENS: &str = "orch_tokens_total";
pub const COST_USD: &str = "orch_cost_usd_total";
pub const RESULTS_IGNORED: &str = "orch_results_ignored_total";
pub const HTTP_ERRORS: &str = "orch_http_errors_total";
pub const JOBS_WAITING: &str = "orch_jobs_waiting";
pub const LEADER: &str = "orch_coordinator_leader";
pub const ADMISSION_CAP: &str = "orch_admission_cap";

// Sampled every few seconds by `sampler` (gauges), or counted from job events (counters).
pub const QUEUE_DEPTH: &str = "orch_queue_depth";
pub const JOBS_IN_FLIGHT: &str = "orch_jobs_in_flight";
pub const QUEUE_REDELIVERED: &str = "orch_queue_redelivered";
pub const WORKERS: &str = "orch_workers";
pub const CLUSTER_SLOTS_TOTAL: &str = "orch_cluster_slots_total";
pub const CLUSTER_SLOTS_BUSY: &str = "orch_cluster_slots_busy";
pub const TASKS_ACTIVE: &str = "orch_tasks_active";
pub const JOBS_ACTIVE: &str = "orch_jobs_active";
pub const DEAD_LETTERS: &str = "orch_dead_letters";
pub const BUDGETED_TASKS: &str = "orch_budgeted_tasks";
pub const BUDGET_REMAINING_USD: &str = "orch_budget_remaining_usd";
pub const BUDGET_REMAINING_TOKENS: &str = "orch_budget_remaining_tokens";
pub const JOBS_STARTED: &str = "orch_jobs_started_total";
pub const JOB_REDELIVERIES: &str = "orch_job_redeliveries_total";
pub const JOB_RETRIES: &str = "orch_job_retries_total";
pub const JOBS_DEAD_LETTERED: &str = "orch_jobs_dead_lettered_total";
pub const JOB_ATTEMPTS: &str = "orch_job_attempts";
pub const AGENT_TOKENS: &str = "orch_agent_tokens_total";
pub const AGENT_COST_USD: &str = "orch_agent_cost_usd_total";
pub const SAMPLE_ERRORS: &str = "orch_sample_errors_total";
pub const EVENT_STREAMS: &str = "orch_event_streams";
pub const CONFLICT_WARNINGS: &str = "orch_conflict_warnings_total";

/// Bucket bounds of [`DISPATCH_LATENCY`]: 100 µs to 1 s, where a healthy cluster's dispatch
/// lies; the 10 s and 60 s bounds tell a queue held back by a cap or a rate limit.
pub const DISPATCH_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
    60.0,
];

/// Bucket bounds of [`JOB_DURATION`]: an agent runs from a second to a couple of hours.
pub const JOB_DURATION_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Bucket bounds of [`JOB_ATTEMPTS`]: attempts are small whole numbers.
pub const JOB_ATTEMPTS_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0];

/// Installs the Prometheus recorder. Every histogram is exported as a Prometheus histogram
/// (`_bucket` series with its own bounds), never as a summary: quantiles of summaries cannot
/// be aggregated across replicas, buckets can (`histogram_quantile` over `sum by (le)`).
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(DISPATCH_LATENCY.into()),
            DISPATCH_LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(JOB_DURATION.into()), JOB_DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(JOB_ATTEMPTS.into()), JOB_ATTEMPTS_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

pub fn describe() {
    describe_counter!(
        MESSAGES_RESENT,
        "Job and event messages sent again because JetStream did not confirm them (a NATS node lost)"
    );
    describe_counter!(TASKS_SUBMITTED, "Tasks accepted by the API");
    describe_counter!(
        TASKS_FINISHED,
        "Tasks that ended, by status (completed, failed)"
    );
    describe_counter!(JOBS_DISPATCHED, "Job attempts published to the work queue");
    describe_counter!(
        JOBS_FINISHED,
        "Job attempts that ended, by outcome and failure reason"
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Agent run time of a job attempt, by role"
    );
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "Time from a job being queued to its agent starting"
    );
    describe_counter!(TOKENS, "Tokens used by agents, by role and kind");
    describe_gauge!(COST_USD, "Agent cost in US dollars, by role (only grows)");
    describe_counter!(
        RESULTS_IGNORED,
        "Results not applied because they were stale or duplicates"
    );
    describe_counter!(HTTP_ERRORS, "HTTP requests answered with an error, by code");
    describe_gauge!(
        LEADER,
        "1 while this coordinator replica holds the leader lease (dispatches), else 0"
    );
    metrics::gauge!(LEADER).set(0.0);
    describe_gauge!(
        JOBS_WAITING,
        "Ready jobs held back by the cluster cap, a rate limit or the daily budget"
    );
    describe_gauge!(
        ADMISSION_CAP,
        "Most agents the cluster runs at once (-1: no cap)"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs waiting in the work queue for a worker (JetStream consumer info, sampled)"
    );
    describe_gauge!(
        JOBS_IN_FLIGHT,
        "Jobs delivered to a worker and not yet acked (JetStream consumer info, sampled)"
    );
    describe_gauge!(
        QUEUE_REDELIVERED,
        "Unacked jobs that were delivered more than once (JetStream consumer info, sampled)"
    );
    describe_gauge!(
        WORKERS,
        "Workers registered with a recent heartbeat (sampled)"
    );
    describe_gauge!(
        CLUSTER_SLOTS_TOTAL,
        "Agent slots of all registered workers (sampled)"
    );
    describe_gauge!(
        CLUSTER_SLOTS_BUSY,
        "Agent slots running a job, over all registered workers (sampled)"
    );
    describe_gauge!(
        TASKS_ACTIVE,
        "Unfinished tasks by status (pending, running); finished ones are counted by orch_tasks_finished_total"
    );
    describe_gauge!(
        JOBS_ACTIVE,
        "Jobs of unfinished tasks by status (pending, queued, running, retrying)"
    );
    describe_gauge!(DEAD_LETTERS, "Jobs in the dead-letter set (sampled)");
    describe_gauge!(BUDGETED_TASKS, "Unfinished tasks with a budget (sampled)");
    describe_gauge!(
        BUDGET_REMAINING_USD,
        "Dollars left, summed over unfinished tasks with a dollar budget (sampled)"
    );
    describe_gauge!(
        BUDGET_REMAINING_TOKENS,
        "Tokens left, summed over unfinished tasks with a token budget (sampled)"
    );
    describe_counter!(
        JOBS_STARTED,
        "Job attempts an agent started on, by role and backend (from job_started events)"
    );
    describe_counter!(
        JOB_REDELIVERIES,
        "Agent starts of a job attempt that JetStream delivered again (a worker died or stalled), by role"
    );
    describe_counter!(
        JOB_RETRIES,
        "Job attempts that failed and will be tried again, by failure reason"
    );
    describe_counter!(
        JOBS_DEAD_LETTERED,
        "Jobs that failed for good and went to the dead-letter set, by failure reason"
    );
    describe_counter!(
        CONFLICT_WARNINGS,
        "Overlapping edits of running agents of one task (conflict_warning events), by kind: same_file or scope"
    );
    describe_histogram!(JOB_ATTEMPTS, "Attempts a job needed to succeed, by role");
    describe_counter!(
        AGENT_TOKENS,
        "Tokens used by agents, by role, model, backend and kind (input, output, cache_write, cache_read)"
    );
    describe_gauge!(
        AGENT_COST_USD,
        "Agent cost in US dollars by role, model and backend (only grows)"
    );
    describe_counter!(
        SAMPLE_ERRORS,
        "Periodic samples that failed, by source (jetstream, redis)"
    );
    describe_gauge!(
        EVENT_STREAMS,
        "Open cluster-wide event streams (GET /v1/events)"
    );
    // Unlabelled series exist from the start, so rate() and absent() work before the first
    // task.
    metrics::counter!(TASKS_SUBMITTED).absolute(0);
    metrics::counter!(JOBS_DISPATCHED).absolute(0);
    metrics::gauge!(EVENT_STREAMS).set(0.0);
}
