//! `GET /v1/reports/cost`: spending over a window, broken down by role, model, backend, ...

use super::window::{range, tasks_in_range};
use crate::http::answer::{Answer, list_of, query};
use crate::http::app::App;
use crate::state::costs::{self as rollups, HOUR_MS};
use crate::state::history::Range;
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

/// The totals of a report being summed: the whole and each breakdown's groups.
struct Sums {
    total: CostLine,
    groups: Vec<HashMap<String, CostGroup>>,
}

impl Sums {
    fn new(breakdowns: usize) -> Self {
        Self {
            total: CostLine::default(),
            groups: vec![HashMap::new(); breakdowns],
        }
    }

    /// Adds the started agents of one task record.
    fn add_task(&mut self, by: &[String], task: &CostTask) {
        for job in task.jobs.iter().filter(|j| j.attempt > 0) {
            self.total.add(&job.usage, job.cost_usd);
            for (dim, groups) in by.iter().zip(self.groups.iter_mut()) {
                let key = dimension_value(dim, task, job);
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
    }

    /// Adds hourly rollups (summed per dimension); the total is the sum over the roles, as
    /// every agent has one.
    fn add_rollups(&mut self, by: &[String], dims: &HashMap<&'static str, rollups::Groups>) {
        for line in dims.get("role").into_iter().flat_map(|g| g.values()) {
            merge(&mut self.total, line);
        }
        for (dim, groups) in by.iter().zip(self.groups.iter_mut()) {
            for (key, line) in dims.get(dim.as_str()).into_iter().flatten() {
                let group = groups.entry(key.clone()).or_insert_with(|| CostGroup {
                    key: key.clone(),
                    role: None,
                    task_id: None,
                    totals: CostLine::default(),
                });
                merge(&mut group.totals, line);
            }
        }
    }
}

fn merge(into: &mut CostLine, line: &CostLine) {
    into.agents += line.agents;
    into.usage.add(&line.usage);
    into.cost_usd += line.cost_usd;
}

/// The whole hours `first..end` (since the epoch) inside `range`, if there is one.
fn whole_hours(range: Range) -> Option<(u64, u64)> {
    let first = range.since_ms.map_or(0, |s| s.div_ceil(HOUR_MS));
    let end = range.until_ms.map_or(u64::MAX, |u| u / HOUR_MS);
    (first < end).then_some((first, end))
}

/// The parts of `range` outside its whole hours `first..end`.
fn edges(range: Range, first: u64, end: u64) -> Vec<Range> {
    let mut out = vec![];
    if let Some(s) = range.since_ms
        && s < first * HOUR_MS
    {
        out.push(Range {
            since_ms: Some(s),
            until_ms: Some(first * HOUR_MS),
        });
    }
    if let Some(u) = range.until_ms
        && end * HOUR_MS < u
    {
        out.push(Range {
            since_ms: Some(end * HOUR_MS),
            until_ms: Some(u),
        });
    }
    out
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
    let mut sums = Sums::new(by.len());
    // The whole hours of the window come from the rollups (when they cover the history and
    // every dimension asked for is rolled up), the partial hours at its edges from the records.
    let hours = (by.iter().all(|d| rollups::DIMENSIONS.contains(&d.as_str()))
        && app.state.costs_ready().await?)
        .then(|| whole_hours(range))
        .flatten();
    let (tasks, truncated) = match hours {
        Some((first, end)) => {
            let mut truncated = false;
            for edge in edges(range, first, end) {
                truncated |= tasks_in_range(&app, edge, MAX_REPORT_TASKS, |t: CostTask| {
                    sums.add_task(&by, &t)
                })
                .await?;
            }
            let mut dims = HashMap::new();
            for hour in app.state.cost_hours(first, end).await? {
                rollups::add_hour(&mut dims, &hour);
            }
            sums.add_rollups(&by, &dims);
            (app.state.count_tasks(range).await?, truncated)
        }
        None => {
            let mut tasks = 0;
            let truncated = tasks_in_range(&app, range, MAX_REPORT_TASKS, |t: CostTask| {
                tasks += 1;
                sums.add_task(&by, &t);
            })
            .await?;
            (tasks, truncated)
        }
    };
    let Sums { total, groups } = sums;
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
