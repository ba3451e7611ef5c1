//! Agents (jobs) across tasks: the filtered listing and one agent's detail.

use super::window::{MAX_ACTIVE_TASKS, PAGE, SCAN_BUDGET, range};
use crate::http::answer::{Answer, Failure, field, names_of, page_limit, parse_job, query};
use crate::http::app::App;
use crate::transport::events::ReadFrom;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State as AxumState};
use futures::StreamExt;
use orch_shared::api::{Job, JobStatus, Task};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::event::EventKind;
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::{
    AgentDetail, AgentList, AgentSummary, CheckpointList, PROMPT_EXCERPT_CHARS,
};
use orch_shared::role::Role;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

fn excerpt(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

pub fn agent_summary(task: &Task, job: &Job) -> AgentSummary {
    AgentSummary {
        id: job.id,
        task_id: task.id,
        step: job.step,
        role: job.role,
        status: job.status,
        attempt: job.attempt,
        worker_id: job.worker_id.clone(),
        backend: task.backend_of(job.role),
        model: job
            .model
            .clone()
            .or_else(|| task.model_of(job.role).map(str::to_string)),
        queued_at_ms: job.queued_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        usage: job.usage,
        cost_usd: job.cost_usd,
        error: job.error.clone(),
        task_prompt: excerpt(&task.prompt, PROMPT_EXCERPT_CHARS),
        parked: job.parked.clone(),
    }
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AgentParams {
    /// Comma-separated roles.
    role: Option<String>,
    /// Comma-separated agent statuses.
    status: Option<String>,
    /// Only this task's agents (its id).
    task: Option<String>,
    /// Of tasks created at or after (ms since the epoch).
    since: Option<u64>,
    /// Of tasks created before (ms since the epoch).
    until: Option<u64>,
    /// Page size (1 to 1000, default 50).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `task:index`: the next agent to list.
fn parse_agent_cursor(c: &str) -> Answer<(TaskId, usize)> {
    let bad = || field("cursor", "expected the next_cursor of the previous page");
    let (task, index) = c.split_once(':').ok_or_else(bad)?;
    Ok((
        task.parse().map_err(|_| bad())?,
        index.parse().map_err(|_| bad())?,
    ))
}

/// Agents (jobs) of the history, newest task first, filtered and paged.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    params(AgentParams),
    responses((status = 200, description = "One page of agents.", body = AgentList))
)]
pub(super) async fn agents(
    AxumState(app): AxumState<App>,
    params: Result<Query<AgentParams>, QueryRejection>,
) -> Answer<axum::Json<AgentList>> {
    let p = query(params)?;
    let limit = page_limit(p.limit)?;
    let roles: Vec<Role> = names_of("role", p.role.as_deref())?;
    let statuses: Vec<JobStatus> = names_of("status", p.status.as_deref())?;
    let range = range(p.since, p.until)?;
    let cursor = p.cursor.as_deref().map(parse_agent_cursor).transpose()?;
    let keep = |j: &Job| {
        (roles.is_empty() || roles.contains(&j.role))
            && (statuses.is_empty() || statuses.contains(&j.status))
    };
    let mut agents = Vec::new();
    // Takes the matching agents of `task` from `from` on; returns the cursor if the page
    // filled up before the task's end.
    let mut take = |task: &Task, from: usize| -> Option<String> {
        for (i, job) in task.jobs.iter().enumerate().skip(from) {
            if agents.len() == limit {
                return Some(format!("{}:{i}", task.id));
            }
            if keep(job) {
                agents.push(agent_summary(task, job));
            }
        }
        None
    };

    if let Some(task) = &p.task {
        let id: TaskId = task
            .parse()
            .map_err(|e: orch_shared::ids::IdError| field("task", e))?;
        let task =
            app.state.load_task(id).await?.ok_or_else(|| {
                ApiError::new(ErrorCode::NotFound, format!("task {id} not found"))
            })?;
        let from = cursor.filter(|(t, _)| *t == id).map_or(0, |(_, i)| i);
        let next = take(&task, from);
        return Ok(axum::Json(AgentList {
            agents,
            next_cursor: next,
        }));
    }

    // Only unfinished statuses asked for: the active set has every such agent.
    if !statuses.is_empty() && statuses.iter().all(|s| !s.is_terminal()) {
        // Newest first from the cursor's task on, a page at a time until the page is full.
        let mut from = cursor.map(|(c, _)| (c, true));
        let (mut next, mut read) = (None, 0);
        'pages: while read < MAX_ACTIVE_TASKS {
            let ids = app
                .state
                .active_ids_desc(range, from, PAGE.min(MAX_ACTIVE_TASKS - read))
                .await?;
            let Some(last) = ids.last() else { break };
            from = Some((*last, false));
            read += ids.len();
            for task in app.state.load_tasks(&ids).await? {
                let skip = cursor.filter(|(t, _)| *t == task.id).map_or(0, |(_, i)| i);
                if let Some(c) = take(&task, skip) {
                    next = Some(c);
                    break 'pages;
                }
            }
            if ids.len() < PAGE {
                break;
            }
        }
        return Ok(axum::Json(AgentList {
            agents,
            next_cursor: next,
        }));
    }

    let mut next = None;
    let mut before = None;
    if let Some((id, from)) = cursor {
        if let Some(task) = app.state.load_task(id).await? {
            next = take(&task, from);
        }
        before = Some(id);
    }
    let mut examined = 0;
    while next.is_none() {
        if examined >= SCAN_BUDGET {
            // Out of budget: go on after the last task examined.
            next = before.map(|id| format!("{id}:{}", usize::MAX));
            break;
        }
        let ids = app.state.task_ids_desc(range, before, PAGE).await?;
        if ids.is_empty() {
            break;
        }
        let exhausted = ids.len() < PAGE;
        let tasks = app.state.load_tasks(&ids).await?;
        let mut by_id: HashMap<TaskId, Task> = tasks.into_iter().map(|t| (t.id, t)).collect();
        for id in &ids {
            examined += 1;
            before = Some(*id);
            if let Some(task) = by_id.remove(id)
                && let Some(c) = take(&task, 0)
            {
                next = Some(c);
                break;
            }
        }
        if exhausted {
            break;
        }
    }
    // A full page ending exactly at the end of the history gets a cursor that finds nothing:
    // the client stops one call later.
    if next.is_none() && agents.len() == limit {
        next = before.map(|id| format!("{id}:{}", usize::MAX));
    }
    Ok(axum::Json(AgentList {
        agents,
        next_cursor: next,
    }))
}

/// The task of an agent and the agent's job, or 404.
pub(super) async fn find_agent(app: &App, id: &str) -> Answer<(Task, usize)> {
    let job = parse_job(id)?;
    let not_found = || -> Failure {
        ApiError::new(ErrorCode::NotFound, format!("agent {job} not found")).into()
    };
    let task_id = app.state.task_of_job(job).await?.ok_or_else(not_found)?;
    let task = app.state.load_task(task_id).await?.ok_or_else(not_found)?;
    let index = task
        .jobs
        .iter()
        .position(|j| j.id == job)
        .ok_or_else(not_found)?;
    Ok((task, index))
}

/// `GET /v1/agents/{id}/checkpoints`: the checkpoints kept of an agent (404 for no agent).
#[utoipa::path(
    get,
    path = "/v1/agents/{id}/checkpoints",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    responses((status = 200, description = "The agent's checkpoints, newest first.", body = CheckpointList))
)]
pub(super) async fn checkpoints(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> Answer<axum::Json<CheckpointList>> {
    let (task, index) = find_agent(&app, &id).await?;
    let agent_id = task.jobs[index].id;
    let checkpoints = app.state.checkpoints(agent_id).await?;
    Ok(axum::Json(CheckpointList {
        agent_id,
        checkpoints,
    }))
}

/// One agent: its job record, its task, its tool calls.
#[utoipa::path(
    get,
    path = "/v1/agents/{id}",
    tag = "agents",
    params(("id" = JobId, Path, description = "The agent's (job's) id (a UUID).")),
    responses((status = 200, description = "The agent.", body = AgentDetail))
)]
pub(super) async fn agent(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> Answer<axum::Json<AgentDetail>> {
    let (task, index) = find_agent(&app, &id).await?;
    let job = task.jobs[index].clone();
    let mut tools: BTreeMap<String, u64> = BTreeMap::new();
    let mut log_events = 0;
    let mut events = Box::pin(
        app.transport
            .stored_events(Some(task.id), ReadFrom::Start)
            .await?,
    );
    while let Some(e) = events.next().await {
        if e.event.job_id != Some(job.id) {
            continue;
        }
        log_events += 1;
        if let EventKind::ToolCall { name, .. } = &e.event.kind {
            *tools.entry(name.clone()).or_default() += 1;
        }
    }
    Ok(axum::Json(AgentDetail {
        task_id: task.id,
        task_prompt: task.prompt.clone(),
        backend: task.backend_of(job.role),
        model: job
            .model
            .clone()
            .or_else(|| task.model_of(job.role).map(str::to_string)),
        tool_calls: tools.values().sum(),
        tools,
        session_id: job.session_id.clone(),
        log_events,
        job,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_cursors_round_trip() {
        let id = TaskId::new();
        let (t, i) = parse_agent_cursor(&format!("{id}:3")).ok().unwrap();
        assert_eq!((t, i), (id, 3));
        assert!(parse_agent_cursor("nope").is_err());
    }
}
