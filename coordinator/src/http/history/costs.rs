//! `GET /v1/reports/cost`: spending over a window, broken down by role, model, backend, ...

use super::window::{range, tasks_in_range};
use crate::http::answer::{Answer, list_of, query};
use crate::http::app::App;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use orch_shared::api::{Job, Task};
use orch_shared::report::{
    COST_DIMENSIONS, CostBreakdown, CostGroup, CostLine, CostReport, MAX_REPORT_TASKS, model_name,
};
use serde::Deserialize;
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

fn dimension_value(dim: &str, task: &Task, job: &Job) -> String {
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
    let truncated = tasks_in_range(&app, range, MAX_REPORT_TASKS, |task| {
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
