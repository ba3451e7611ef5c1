//! Metric names (constants, so dashboards and code cannot drift) and their descriptions.
//! Labels come from small fixed sets (status, reason, role, kind), never ids.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

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

pub fn describe() {
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
}
