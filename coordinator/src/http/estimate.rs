//! Dry runs: the plan a submit would make, priced from past runs.

use super::answer::{Answer, parse_body};
use super::app::App;
use super::tasks::validate;
use crate::pipeline;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::extract::rejection::BytesRejection;
use orch_shared::api::{DryRun, Estimate, EstimateSource, StepEstimate, SubmitTask};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::TaskId;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(dry_run))
}

/// Blended list price per token for a planner's token estimate (mostly input, some output).
const PLANNER_PRICE_PER_TOKEN: f64 = 5.4 / 1_000_000.0;

/// The plan a submit of this body would run and what it should cost; nothing runs.
#[utoipa::path(
    post,
    path = "/v1/tasks/dry-run",
    tag = "tasks",
    request_body = SubmitTask,
    responses((status = 200, description = "The plan and its estimates.", body = DryRun))
)]
async fn dry_run(
    AxumState(app): AxumState<App>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<axum::Json<DryRun>> {
    let req: SubmitTask = parse_body(body)?;
    let req = super::forge::with_repo_config(&app, req).await?;
    let (mut opts, plan) = validate(req)?;
    // A dry run never calls a planner agent (that would cost money): it shows the rules' plan.
    opts.llm_planner = false;
    let mode = opts.mode;
    let (task, _) = pipeline::new_task(TaskId::new(), opts, plan, orch_shared::now_ms())
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.to_string()))?;
    let mut steps = Vec::new();
    for job in &task.jobs {
        steps.push(step_estimate(&app, &task, job).await?);
    }
    let mut total = total_estimate(&steps);
    let integrator = match pipeline::possible_integrator(&task) {
        Some(job) => {
            let step = step_estimate(&app, &task, &job).await?;
            // It runs only if the parallel branches conflict: the bad case, not the usual one.
            total.cost_usd_p90 += step.estimate.cost_usd_p90;
            total.duration_ms_p90 = total
                .duration_ms_p90
                .zip(step.estimate.duration_ms_p90)
                .map(|(a, b)| a + b);
            Some(step)
        }
        None => None,
    };
    Ok(axum::Json(DryRun {
        plan_source: task.plan_source,
        mode,
        plan: task.plan,
        steps,
        total,
        integrator,
    }))
}

/// One step's estimate: from the history of its role and model, else the planner's tokens.
async fn step_estimate(
    app: &App,
    task: &orch_shared::api::Task,
    job: &orch_shared::api::Job,
) -> Answer<StepEstimate> {
    let model = task.model_of(job.role).unwrap_or("default");
    let estimate = match app.state.job_stats(job.role.as_str(), model).await? {
        Some(s) => Estimate {
            source: EstimateSource::History,
            samples: s.samples,
            cost_usd_p50: s.cost_usd.0,
            cost_usd_p90: s.cost_usd.1,
            duration_ms_p50: Some(s.duration_ms.0),
            duration_ms_p90: Some(s.duration_ms.1),
        },
        None => match job.estimated_tokens {
            Some(t) => Estimate {
                source: EstimateSource::Planner,
                samples: 0,
                cost_usd_p50: t as f64 * PLANNER_PRICE_PER_TOKEN,
                cost_usd_p90: t as f64 * PLANNER_PRICE_PER_TOKEN,
                duration_ms_p50: None,
                duration_ms_p90: None,
            },
            None => Estimate {
                source: EstimateSource::None,
                samples: 0,
                cost_usd_p50: 0.0,
                cost_usd_p90: 0.0,
                duration_ms_p50: None,
                duration_ms_p90: None,
            },
        },
    };
    Ok(StepEstimate {
        step: job.step,
        role: job.role,
        backend: task.backend_of(job.role),
        model: task.model_of(job.role).map(str::to_string),
        depends_on: job.depends_on.clone(),
        instruction: job.prompt.clone(),
        estimate,
        paths: job.paths.clone(),
    })
}

/// Costs add up; durations follow the longest dependency path (steps are in topological
/// order: a step only depends on earlier ones or the plan was rejected).
fn total_estimate(steps: &[StepEstimate]) -> Estimate {
    let mut finish: Vec<(Option<u64>, Option<u64>)> = vec![(Some(0), Some(0)); steps.len()];
    let order = topological(steps);
    for &i in &order {
        let s = &steps[i];
        let start = s.depends_on.iter().fold((Some(0), Some(0)), |acc, &p| {
            let f = finish[p as usize];
            (max_opt(acc.0, f.0), max_opt(acc.1, f.1))
        });
        finish[i] = (
            start.0.zip(s.estimate.duration_ms_p50).map(|(a, b)| a + b),
            start.1.zip(s.estimate.duration_ms_p90).map(|(a, b)| a + b),
        );
    }
    let sources: Vec<EstimateSource> = steps.iter().map(|s| s.estimate.source).collect();
    let source = if sources.iter().all(|s| *s == EstimateSource::History) {
        EstimateSource::History
    } else if sources.contains(&EstimateSource::None) {
        EstimateSource::None
    } else {
        EstimateSource::Planner
    };
    Estimate {
        source,
        samples: steps.iter().map(|s| s.estimate.samples).min().unwrap_or(0),
        cost_usd_p50: steps.iter().map(|s| s.estimate.cost_usd_p50).sum(),
        cost_usd_p90: steps.iter().map(|s| s.estimate.cost_usd_p90).sum(),
        duration_ms_p50: finish
            .iter()
            .map(|f| f.0)
            .try_fold(0, |m, f| f.map(|f| m.max(f))),
        duration_ms_p90: finish
            .iter()
            .map(|f| f.1)
            .try_fold(0, |m, f| f.map(|f| m.max(f))),
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.zip(b).map(|(a, b)| a.max(b))
}

/// Steps ordered so that every step comes after the steps it depends on.
fn topological(steps: &[StepEstimate]) -> Vec<usize> {
    let mut done = vec![false; steps.len()];
    let mut order = Vec::with_capacity(steps.len());
    while order.len() < steps.len() {
        let before = order.len();
        for (i, s) in steps.iter().enumerate() {
            if !done[i] && s.depends_on.iter().all(|&p| done[p as usize]) {
                done[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            break; // a cycle; new_task rejects those, so this cannot happen
        }
    }
    order
}
