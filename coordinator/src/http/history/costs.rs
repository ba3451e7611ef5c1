//! `GET /v1/reports/cost`: spending over a window, broken down by role, model, backend, ...

use super::window::{range, tasks_in_range};
use crate::http::answer::{Answer, list_of, query};
use crate::http::app::App;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use orch_shared::api::JobStatus;
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::job::{Backend, Usage};
use orch_shared::report::{
    COST_DIMENSIONS, CostBreakdown, CostGroup, CostLine, CostReport, MAX_REPORT_TASKS, model_name,
};
use orch_shared::role::Role;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::HashMap;

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CostParams {
    /// Of tasks created at or after (ms since the epoch).
    since: Option<u64>,
    /// Of tasks created before (ms since the epoch).
    until: Option<u64>,
    /// Comma-separated dimensions, one breakdown each.
    by: Option<String>,
}

/// The part of a task record a cost report reads (field names as in [`orch_shared::api::Task`]).
#[derive(Deserialize)]
struct CostTask {
    id: TaskId,
    backend: Backend,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    backends: BTreeMap<Role, Backend>,
    #[serde(default)]
    models: BTreeMap<Role, String>,
    jobs: Vec<CostJob>,
}

/// The part of a job a cost report reads (as in [`orch_shared::api::Job`]).
#[derive(Deserialize)]
struct CostJob {
    id: JobId,
    role: Role,
    status: JobStatus,
    attempt: u32,
    #[serde(default)]
    worker_id: Option<WorkerId>,
    #[serde(default)]
    usage: Usage,
    #[serde(default)]
    cost_usd: f64,
    #[serde(default)]
    model: Option<String>,
}

impl CostTask {
    /// As [`orch_shared::api::Task::backend_of`].
    fn backend_of(&self, role: Role) -> Backend {
        self.backends.get(&role).copied().unwrap_or(self.backend)
    }

    /// As [`orch_shared::api::Task::model_of`].
    fn model_of(&self, role: Role) -> Option<&str> {
        self.models
            .get(&role)
            .or(self.model.as_ref())
            .map(String::as_str)
    }
}

fn dimension_value(dim: &str, task: &CostTask, job: &CostJob) -> String {
    match dim {
        "agent" => job.id.to_string(),
        "role" => job.role.as_str().to_string(),
        "model" => model_name(job.model.as_deref().or(task.model_of(job.role))).to_string(),
        "backend" => task.backend_of(job.role).as_str().to_string(),
        "task" => task.id.to_string(),
        "worker" => job
            .worker_id
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string),
        _ => job.status.as_str().to_string(),
    }
}

/// Costs of the agents of the tasks created in a window, summed and broken down.
#[utoipa::path(
    get,
    path = "/v1/reports/cost",
    tag = "reports",
    params(CostParams),
    responses((status = 200, description = "The cost report.", body = CostReport))
)]
pub(super) async fn cost_report(
    AxumState(app): AxumState<App>,
    params: Result<Query<CostParams>, QueryRejection>,
) -> Answer<axum::Json<CostReport>> {
    let p = query(params)?;
    let by: Vec<String> = list_of(
        "by",
        p.by.as_deref(),
        |s| COST_DIMENSIONS.contains(&s).then(|| s.to_string()),
        &COST_DIMENSIONS.join(", "),
    )?;
    let range = range(p.since, p.until)?;
    let mut tasks = 0;
    let mut total = CostLine::default();
    let mut groups: Vec<HashMap<String, CostGroup>> = vec![HashMap::new(); by.len()];
    let truncated = tasks_in_range(&app, range, MAX_REPORT_TASKS, |task: CostTask| {
        tasks += 1;
        for job in task.jobs.iter().filter(|j| j.attempt > 0) {
            total.add(&job.usage, job.cost_usd);
            for (dim, groups) in by.iter().zip(groups.iter_mut()) {
                let key = dimension_value(dim, &task, job);
                let agent = dim == "agent";
                groups
                    .entry(key.clone())
                    .or_insert_with(|| CostGroup {
                        key,
                        role: agent.then_some(job.role),
                        task_id: agent.then_some(task.id),
                        totals: CostLine::default(),
                    })
                    .totals
                    .add(&job.usage, job.cost_usd);
            }
        }
    })
    .await?;
    let breakdowns = by
        .into_iter()
        .zip(groups)
        .map(|(by, groups)| {
            let mut groups: Vec<CostGroup> = groups.into_values().collect();
            groups.sort_by(|a, b| {
                b.totals
                    .cost_usd
                    .total_cmp(&a.totals.cost_usd)
                    .then(a.key.cmp(&b.key))
            });
            CostBreakdown { by, groups }
        })
        .collect();
    Ok(axum::Json(CostReport {
        since_ms: range.since_ms,
        until_ms: range.until_ms,
        tasks,
        total,
        breakdowns,
        truncated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cost_record_reads_back_every_dimension_of_the_full_task() {
        let task = super::super::tasks::tests::stored_task();
        let view: CostTask =
            orch_shared::codec::decode(&orch_shared::codec::encode(&task)).unwrap();
        assert_eq!(view.id, task.id);
        assert_eq!(view.jobs.len(), task.jobs.len());
        for (v, j) in view.jobs.iter().zip(&task.jobs) {
            assert_eq!(
                (v.id, v.role, v.status, v.attempt, v.usage, v.cost_usd),
                (j.id, j.role, j.status, j.attempt, j.usage, j.cost_usd)
            );
            assert_eq!(v.worker_id, j.worker_id);
            assert_eq!(v.model, j.model);
            assert_eq!(view.backend_of(v.role), task.backend_of(j.role));
            assert_eq!(view.model_of(v.role), task.model_of(j.role));
        }
        assert_eq!(view.backend_of(Role::Tester), Backend::Anthropic);
        assert_eq!(view.model_of(Role::Builder), Some("m-1"));
    }
}
