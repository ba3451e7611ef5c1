//! The cluster at a glance: `GET /v1/status`, `GET /v1/workers` and `GET /v1/quotas`.

use super::agents::agent_summary;
use super::window::{MAX_ACTIVE_TASKS, PAGE};
use crate::http::answer::Answer;
use crate::http::app::App;
use crate::state::history::Range;
use axum::extract::State as AxumState;
use orch_shared::api::{JobStatus, WorkerList};
use orch_shared::report::{AgentSummary, ClusterStatus, CostToday};
use std::time::Duration;

/// Active agents listed by `GET /v1/status`.
const MAX_STATUS_AGENTS: usize = 500;
/// Recent tasks searched for failures by `GET /v1/status`, and failures shown.
const FAILURE_SCAN: usize = 200;
const MAX_FAILURES: usize = 10;

const WORKER_MAX_AGE: Duration = Duration::from_secs(15);
const COORDINATOR_MAX_AGE: Duration = crate::sampler::COORDINATOR_TTL;

/// The cluster at a glance: coordinators, workers, queue, active agents, today's costs.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "cluster",
    responses((status = 200, description = "The cluster's status.", body = ClusterStatus))
)]
pub(super) async fn status(AxumState(app): AxumState<App>) -> Answer<axum::Json<ClusterStatus>> {
    let now = orch_shared::now_ms();
    let coordinators = app.state.coordinators(COORDINATOR_MAX_AGE).await?;
    let workers = app.state.workers(WORKER_MAX_AGE).await?;
    let (queue, backends) = match app.transport.queue_by_backend().await {
        Ok(mut parts) => {
            for part in &mut parts {
                part.workers = workers
                    .iter()
                    .filter(|w| w.backends.contains(&part.backend))
                    .count() as u64;
            }
            (Some(crate::transport::events::total(&parts)), parts)
        }
        Err(e) => {
            tracing::warn!(error = %e, "queue info unavailable");
            (None, vec![])
        }
    };
    let dead_letters = app.state.dead_letter_count().await?;

    // The count is the sorted set's size and the agents come from its newest tasks, a page
    // at a time until the listed agents are found: nothing here grows with the running agents.
    let active_tasks = app.state.active_count().await?;
    let mut active_agents = Vec::new();
    let (mut before, mut read) = (None, 0);
    while active_agents.len() < MAX_STATUS_AGENTS && read < MAX_ACTIVE_TASKS {
        let page = app
            .state
            .active_ids_desc(Range::default(), before.map(|b| (b, false)), PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        before = Some(*last);
        read += page.len();
        for task in app.state.load_tasks(&page).await? {
            for job in task.jobs.iter().filter(|j| !j.status.is_terminal()) {
                if active_agents.len() < MAX_STATUS_AGENTS {
                    active_agents.push(agent_summary(&task, job));
                }
            }
        }
        if page.len() < PAGE {
            break;
        }
    }

    let recent = app
        .state
        .task_ids_desc(Range::default(), None, FAILURE_SCAN)
        .await?;
    let mut recent_failures: Vec<AgentSummary> = app
        .state
        .load_tasks(&recent)
        .await?
        .iter()
        .flat_map(|t| {
            t.jobs
                .iter()
                .filter(|j| j.status == JobStatus::Failed)
                .map(|j| agent_summary(t, j))
                .collect::<Vec<_>>()
        })
        .collect();
    recent_failures.sort_by_key(|a| std::cmp::Reverse(a.finished_at_ms.unwrap_or(0)));
    recent_failures.truncate(MAX_FAILURES);

    // The day's figures are kept as results arrive: no read of today's tasks (a busy day has
    // tens of thousands).
    let midnight = now - now % 86_400_000;
    let today = app.state.today(midnight).await?;
    let cost_today = CostToday {
        since_ms: midnight,
        tasks: today.tasks,
        usage: today.usage,
        cost_usd: today.spent_usd,
        truncated: false,
        spent_usd: today.spent_usd,
        reserved_usd: today.reserved_usd,
        budget_usd: app.state.daily_budget().await?,
    };

    Ok(axum::Json(ClusterStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        now_ms: now,
        coordinators,
        slots_total: workers.iter().map(|w| u64::from(w.slots)).sum(),
        slots_busy: workers.iter().map(|w| u64::from(w.busy)).sum(),
        workers,
        queue,
        backends,
        dead_letters,
        active_tasks,
        active_agents,
        recent_failures,
        cost_today,
    }))
}

/// The workers that reported in recently.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "cluster",
    responses((status = 200, description = "The workers.", body = WorkerList))
)]
pub(super) async fn workers(AxumState(app): AxumState<App>) -> Answer<axum::Json<WorkerList>> {
    let workers = app.state.workers(WORKER_MAX_AGE).await?;
    Ok(axum::Json(WorkerList { workers }))
}

#[utoipa::path(
    get,
    path = "/v1/quotas",
    tag = "cluster",
    responses((status = 200, description = "Every credential the workers registered with the limit broker, and the jobs parked waiting for one (admin only).", body = orch_shared::api::QuotaList))
)]
pub(super) async fn quotas(
    AxumState(app): AxumState<App>,
) -> Answer<axum::Json<orch_shared::api::QuotaList>> {
    Ok(axum::Json(app.state.quotas().await?))
}
