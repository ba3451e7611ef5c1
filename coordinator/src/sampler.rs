//! What the metrics need beyond the request path: gauges sampled every [`INTERVAL`] (queue
//! depth and in-flight jobs from the JetStream consumer's info, workers and slots from the
//! registry, unfinished tasks and jobs by status, dead letters, budgets left), and this
//! coordinator's entry in the coordinator registry (`orchctl status` lists it). Job counters
//! are taken by the leader where it applies the facts ([`crate::meter`]).
//!
//! Labels come from fixed sets: roles, backends, failure reasons, statuses, and models folded
//! into [`model_label`]'s short list.

use crate::metrics as m;
use crate::state::State;
use crate::transport::Transport;
use orch_shared::api::{JobStatus, TaskStatus};
use orch_shared::job::Backend;
use orch_shared::report::CoordinatorInfo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use strum::VariantNames;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often gauges are sampled and the registry entry refreshed.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// A coordinator that has not refreshed its entry for this long is no longer listed.
pub const COORDINATOR_TTL: Duration = Duration::from_secs(20);
/// A worker missing heartbeats for this long is not counted (as in `GET /v1/workers`).
const WORKER_MAX_AGE: Duration = Duration::from_secs(15);
/// Most unfinished tasks one sample reads (the rest are left out of the task gauges).
const MAX_SAMPLED_TASKS: usize = 10_000;

/// Models that get their own label value; everything else is `other`, no model is `default`.
const MODEL_FAMILIES: [&str; 10] = [
    "claude-opus",
    "claude-sonnet",
    "claude-haiku",
    "gpt-5",
    "gpt-4.1",
    "gpt-4o",
    "o3",
    "o4-mini",
    "gemini",
    "sim",
];

/// The model as a label value from a fixed set (a model name is user input).
pub fn model_label(model: Option<&str>) -> &'static str {
    let Some(model) = model.map(str::trim).filter(|m| !m.is_empty()) else {
        return "default";
    };
    let lower = model.to_ascii_lowercase();
    for family in ["opus", "sonnet", "haiku"] {
        if lower == family || lower.starts_with(&format!("claude-{family}")) {
            return match family {
                "opus" => "claude-opus",
                "sonnet" => "claude-sonnet",
                _ => "claude-haiku",
            };
        }
        // Older Claude names put the family after the version: claude-3-5-sonnet-...
        if lower.starts_with("claude-") && lower.contains(family) {
            return match family {
                "opus" => "claude-opus",
                "sonnet" => "claude-sonnet",
                _ => "claude-haiku",
            };
        }
    }
    MODEL_FAMILIES
        .iter()
        .find(|f| lower.starts_with(*f))
        .copied()
        .unwrap_or("other")
}

/// A backend name as a label value from a fixed set.
pub fn backend_label(name: &str) -> &'static str {
    Backend::VARIANTS
        .iter()
        .find(|b| **b == name)
        .copied()
        .unwrap_or("other")
}

/// Starts the sampling loop; it stops on `shutdown` (and deregisters this coordinator on its
/// way out).
pub fn spawn(
    tracker: &TaskTracker,
    state: State,
    transport: Transport,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let info = CoordinatorInfo {
        id: format!("{}-{}", hostname(), std::process::id()),
        addr: addr.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_ms: orch_shared::now_ms(),
        last_seen_ms: 0,
    };
    tracker.spawn(sample_loop(state, transport, info, shutdown));
}

fn hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn sample_loop(
    state: State,
    transport: Transport,
    mut info: CoordinatorInfo,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        info.last_seen_ms = orch_shared::now_ms();
        if let Err(e) = state.register_coordinator(&info, COORDINATOR_TTL).await {
            tracing::debug!(error = %e, "coordinator registry refresh failed");
        }
        sample(&state, &transport).await;
    }
    if let Err(e) = state.deregister_coordinator(&info.id).await {
        tracing::debug!(error = %e, "could not deregister the coordinator");
    }
}

/// One round of gauges. A source that fails leaves its gauges as they were and counts an error.
async fn sample(state: &State, transport: &Transport) {
    match transport.queue_info().await {
        Ok(q) => {
            metrics::gauge!(m::QUEUE_DEPTH).set(q.pending as f64);
            metrics::gauge!(m::JOBS_IN_FLIGHT).set(q.in_flight as f64);
            metrics::gauge!(m::QUEUE_REDELIVERED).set(q.redelivered as f64);
        }
        Err(e) => {
            tracing::debug!(error = %e, "queue sample failed");
            metrics::counter!(m::SAMPLE_ERRORS, "source" => "jetstream").increment(1);
        }
    }
    let redis_failed = || metrics::counter!(m::SAMPLE_ERRORS, "source" => "redis").increment(1);
    match state.workers(WORKER_MAX_AGE).await {
        Ok(workers) => {
            metrics::gauge!(m::WORKERS).set(workers.len() as f64);
            let total: u64 = workers.iter().map(|w| u64::from(w.slots)).sum();
            let busy: u64 = workers.iter().map(|w| u64::from(w.busy)).sum();
            metrics::gauge!(m::CLUSTER_SLOTS_TOTAL).set(total as f64);
            metrics::gauge!(m::CLUSTER_SLOTS_BUSY).set(busy as f64);
        }
        Err(_) => redis_failed(),
    }
    match state.dead_letter_count().await {
        Ok(n) => metrics::gauge!(m::DEAD_LETTERS).set(n as f64),
        Err(_) => redis_failed(),
    }
    match sampled_tasks(state).await {
        Ok(tasks) => set_task_gauges(&tasks),
        Err(_) => redis_failed(),
    }
}

/// The oldest [`MAX_SAMPLED_TASKS`] unfinished tasks, a page at a time, only the fields the
/// gauges count (prompts and outputs stay undecoded).
async fn sampled_tasks(state: &State) -> Result<Vec<Sampled>, crate::state::Error> {
    let mut tasks = Vec::new();
    let mut after = None;
    while tasks.len() < MAX_SAMPLED_TASKS {
        let ids = state
            .active_ids_asc(after, SAMPLE_PAGE.min(MAX_SAMPLED_TASKS - tasks.len()))
            .await?;
        let Some(last) = ids.last() else { break };
        after = Some(*last);
        let short = ids.len() < SAMPLE_PAGE;
        tasks.extend(state.load_records::<Sampled>(&ids).await?);
        if short {
            break;
        }
    }
    Ok(tasks)
}

/// Unfinished task ids one sample reads at a time.
const SAMPLE_PAGE: usize = 500;

/// What the task gauges read of a task record (field names as in [`orch_shared::api::Task`]).
#[derive(serde::Deserialize)]
struct Sampled {
    status: TaskStatus,
    #[serde(default)]
    jobs: Vec<SampledJob>,
    #[serde(default)]
    options: SampledOptions,
    #[serde(default)]
    cost_usd: f64,
    #[serde(default)]
    usage: orch_shared::job::Usage,
}

#[derive(serde::Deserialize)]
struct SampledJob {
    status: JobStatus,
}

#[derive(Default, serde::Deserialize)]
struct SampledOptions {
    #[serde(default)]
    budget_usd: Option<f64>,
    #[serde(default)]
    budget_tokens: Option<u64>,
}

/// Gauges of the unfinished tasks: by status, their jobs by status, budgets left.
fn set_task_gauges(tasks: &[Sampled]) {
    let mut by_status: HashMap<&'static str, u64> = [TaskStatus::Pending, TaskStatus::Running]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    let mut jobs: HashMap<&'static str, u64> = [
        JobStatus::Pending,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Retrying,
        JobStatus::Parked,
    ]
    .iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    let (mut budgeted, mut usd_left, mut tokens_left) = (0u64, 0f64, 0u64);
    for task in tasks.iter().filter(|t| !t.status.is_terminal()) {
        *by_status.entry(task.status.as_str()).or_default() += 1;
        for job in task.jobs.iter().filter(|j| !j.status.is_terminal()) {
            *jobs.entry(job.status.as_str()).or_default() += 1;
        }
        let o = &task.options;
        if o.budget_usd.is_some() || o.budget_tokens.is_some() {
            budgeted += 1;
        }
        if let Some(b) = o.budget_usd {
            usd_left += (b - task.cost_usd).max(0.0);
        }
        if let Some(b) = o.budget_tokens {
            tokens_left += b.saturating_sub(task.usage.total());
        }
    }
    for (status, n) in by_status {
        metrics::gauge!(m::TASKS_ACTIVE, "status" => status).set(n as f64);
    }
    for (status, n) in jobs {
        metrics::gauge!(m::JOBS_ACTIVE, "status" => status).set(n as f64);
    }
    metrics::gauge!(m::BUDGETED_TASKS).set(budgeted as f64);
    metrics::gauge!(m::BUDGET_REMAINING_USD).set(usd_left);
    metrics::gauge!(m::BUDGET_REMAINING_TOKENS).set(tokens_left as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_fold_into_a_fixed_set() {
        assert_eq!(model_label(None), "default");
        assert_eq!(model_label(Some(" ")), "default");
        assert_eq!(model_label(Some("claude-sonnet-4-5")), "claude-sonnet");
        assert_eq!(
            model_label(Some("claude-3-5-haiku-20241022")),
            "claude-haiku"
        );
        assert_eq!(model_label(Some("opus")), "claude-opus");
        assert_eq!(model_label(Some("gpt-4o-mini")), "gpt-4o");
        assert_eq!(model_label(Some("my-finetune-123")), "other");
    }

    #[test]
    fn backends_fold_into_a_fixed_set() {
        assert_eq!(backend_label("sim"), "sim");
        assert_eq!(backend_label("claude-code"), "claude-code");
        assert_eq!(backend_label("whatever"), "other");
    }
}
