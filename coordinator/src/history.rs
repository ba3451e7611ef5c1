//! The history, report and cluster-view endpoints: filtered task listings, agents (jobs) and
//! their transcripts, the cluster status, the cluster-wide event stream, cost reports,
//! streaming exports and the deletion of old tasks.
//!
//! Bounds (no request scans keys, and none reads an unbounded part of the history):
//! - a filtered task listing in creation order examines at most [`SCAN_BUDGET`] tasks per page
//!   and returns a cursor to go on from where it stopped;
//! - a listing sorted by cost, duration or tokens, and a cost report, read at most
//!   [`MAX_SORTED_TASKS`] / [`MAX_REPORT_TASKS`] tasks of the requested window, newest first,
//!   and say so when there were more (`x-orch-truncated` header, `truncated` field);
//! - an export streams its window page by page ([`PAGE`] tasks, or events fetched in batches);
//! - a clean call examines at most [`MAX_CLEAN_BATCH`] tasks and returns where to go on.
//!
//! Transcripts come from the event log (`ORCH_EVENTS`, kept 7 days by default): every event
//! is one NATS message of at most 1 MiB (the server's max payload). Events are sent as stored,
//! except on `GET /v1/events`, which cuts text, tool inputs and tool outputs to `max_chars`
//! characters (default [`DEFAULT_MAX_CHARS`]) and says how much it cut.

use crate::api::{App, Failure};
use crate::metrics as m;
use crate::state::history::Range;
use crate::transport::events::ReadFrom;
use crate::transport::{self, StoredEvent};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use orch_shared::api::{Job, JobStatus, Task, TaskList, TaskStatus, TaskSummary};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::event::{Event, EventId, EventKind};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::{
    AgentDetail, AgentList, AgentSummary, COST_DIMENSIONS, CleanReport, CleanRequest,
    ClusterStatus, CostBreakdown, CostGroup, CostLine, CostReport, CostToday, EventRow, ExportWhat,
    MAX_CLEAN_BATCH, MAX_REPORT_TASKS, PROMPT_EXCERPT_CHARS, model_name,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

type Answer<T> = Result<T, Failure>;

/// Tasks a filtered listing in creation order examines per page.
pub const SCAN_BUDGET: usize = 5_000;
/// Tasks a listing sorted by something else than creation reads.
pub const MAX_SORTED_TASKS: usize = 10_000;
/// Tasks read from Redis at a time.
const PAGE: usize = 200;
/// Unfinished tasks `GET /v1/status` and `GET /v1/agents?status=<unfinished>` read.
const MAX_ACTIVE_TASKS: usize = 10_000;
/// Active agents listed by `GET /v1/status`.
const MAX_STATUS_AGENTS: usize = 500;
/// Recent tasks searched for failures by `GET /v1/status`, and failures shown.
const FAILURE_SCAN: usize = 200;
const MAX_FAILURES: usize = 10;
/// How long text fields of `GET /v1/events` are by default.
pub const DEFAULT_MAX_CHARS: usize = 2_000;
const WORKER_MAX_AGE: Duration = Duration::from_secs(15);
const COORDINATOR_MAX_AGE: Duration = crate::sampler::COORDINATOR_TTL;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}", get(agent))
        .route("/v1/agents/{id}/logs", get(agent_logs))
        .route("/v1/tasks/{id}/logs", get(task_logs))
        .route("/v1/events", get(cluster_events))
        .route("/v1/reports/cost", get(cost_report))
        .route("/v1/export", get(export))
        .route("/v1/clean", post(clean))
}

fn field(name: &str, msg: impl std::fmt::Display) -> Failure {
    ApiError::field(name, msg).into()
}

fn query<T>(params: Result<Query<T>, QueryRejection>) -> Answer<T> {
    params.map(|Query(p)| p).map_err(|e| {
        ApiError::new(ErrorCode::InvalidField, format!("query: {}", e.body_text())).into()
    })
}

fn parse_job(id: &str) -> Answer<JobId> {
    id.parse()
        .map_err(|e: orch_shared::ids::IdError| field("id", e))
}

/// Splits `a,b,c` and parses each part with `parse`, naming `name` on error.
fn list_of<T>(
    name: &str,
    value: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Answer<Vec<T>> {
    let Some(value) = value else {
        return Ok(vec![]);
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            parse(s)
                .ok_or_else(|| field(name, format!("unknown value `{s}` (expected {expected})")))
        })
        .collect()
}

fn task_status(s: &str) -> Option<TaskStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn job_status(s: &str) -> Option<JobStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn range(since: Option<u64>, until: Option<u64>) -> Answer<Range> {
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(field("until", "must be after since"));
    }
    Ok(Range {
        since_ms: since,
        until_ms: until,
    })
}

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
        backend: task.backend,
        model: task.model.clone(),
        queued_at_ms: job.queued_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        usage: job.usage,
        cost_usd: job.cost_usd,
        error: job.error.clone(),
        task_prompt: excerpt(&task.prompt, PROMPT_EXCERPT_CHARS),
    }
}

/// Every task of `range`, newest first, `PAGE` at a time, at most `max`; and whether more were
/// left.
async fn tasks_in_range(
    app: &App,
    range: Range,
    max: usize,
    mut each: impl FnMut(Task),
) -> Answer<bool> {
    let mut before = None;
    let mut read = 0;
    loop {
        let want = PAGE.min(max - read);
        if want == 0 {
            let more = !app.state.task_ids_desc(range, before, 1).await?.is_empty();
            return Ok(more);
        }
        let ids = app.state.task_ids_desc(range, before, want).await?;
        if ids.is_empty() {
            return Ok(false);
        }
        read += ids.len();
        before = ids.last().copied();
        let short = ids.len() < want;
        for task in app.state.load_tasks(&ids).await? {
            each(task);
        }
        if short {
            return Ok(false);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Task listing with filters (`GET /v1/tasks`).

/// The query of `GET /v1/tasks`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<usize>,
    /// Tasks older than this id (the `next_cursor` of a page in creation order, newest first).
    pub before: Option<String>,
    /// The `next_cursor` of the previous page, whatever the order.
    pub cursor: Option<String>,
    /// Comma-separated statuses.
    pub status: Option<String>,
    /// Case-insensitive text in the prompt, or the start of the id.
    pub search: Option<String>,
    /// Created at or after (ms since the epoch).
    pub since: Option<u64>,
    /// Created before (ms since the epoch).
    pub until: Option<u64>,
    pub min_cost: Option<f64>,
    pub max_cost: Option<f64>,
    /// `created` (default), `cost`, `duration` or `tokens`.
    pub sort: Option<String>,
    /// `desc` (default) or `asc`.
    pub order: Option<String>,
}

struct Filter {
    /// Only this tenant's tasks (a tenant's token).
    tenant: Option<String>,
    statuses: Vec<TaskStatus>,
    search: Option<String>,
    min_cost: Option<f64>,
    max_cost: Option<f64>,
}

impl Filter {
    fn matches(&self, t: &Task) -> bool {
        self.tenant
            .as_ref()
            .is_none_or(|tenant| t.tenant.as_ref() == Some(tenant))
            && (self.statuses.is_empty() || self.statuses.contains(&t.status))
            && self.search.as_ref().is_none_or(|s| {
                t.prompt.to_lowercase().contains(s) || t.id.to_string().starts_with(s.as_str())
            })
            && self.min_cost.is_none_or(|c| t.cost_usd >= c)
            && self.max_cost.is_none_or(|c| t.cost_usd <= c)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sort {
    Created,
    Cost,
    Duration,
    Tokens,
}

/// `GET /v1/tasks`: filtered, sorted and paged. Answers a [`TaskList`]; a sorted listing that
/// could not read its whole window says so in the `x-orch-truncated` header.
pub async fn list_tasks(app: &App, p: ListParams, tenant: Option<String>) -> Answer<Response> {
    let limit = p.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(field("limit", "must be between 1 and 1000"));
    }
    let statuses = list_of(
        "status",
        p.status.as_deref(),
        task_status,
        "pending, running, completed, failed or cancelled",
    )?;
    for (name, v) in [("min_cost", p.min_cost), ("max_cost", p.max_cost)] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(field(name, "must be a non-negative number of dollars"));
        }
    }
    let filter = Filter {
        tenant,
        statuses,
        search: p
            .search
            .map(|s| s.trim().to_lowercase())
            .filter(|s| !s.is_empty()),
        min_cost: p.min_cost,
        max_cost: p.max_cost,
    };
    let range = range(p.since, p.until)?;
    let sort = match p.sort.as_deref().unwrap_or("created") {
        "created" => Sort::Created,
        "cost" => Sort::Cost,
        "duration" => Sort::Duration,
        "tokens" => Sort::Tokens,
        other => {
            return Err(field(
                "sort",
                format!("unknown value `{other}` (expected created, cost, duration or tokens)"),
            ));
        }
    };
    let ascending = match p.order.as_deref().unwrap_or("desc") {
        "desc" => false,
        "asc" => true,
        other => {
            return Err(field(
                "order",
                format!("unknown value `{other}` (expected asc or desc)"),
            ));
        }
    };
    if p.before.is_some() && p.cursor.is_some() {
        return Err(field("before", "give either before or cursor, not both"));
    }
    let (cursor_field, cursor) = match p.before {
        Some(b) => ("before", Some(b)),
        None => ("cursor", p.cursor),
    };

    if sort == Sort::Created {
        let mut start: Option<TaskId> = cursor
            .map(|c| {
                c.parse()
                    .map_err(|e: orch_shared::ids::IdError| field(cursor_field, e))
            })
            .transpose()?;
        let mut rows = Vec::new();
        let mut examined = 0;
        let mut next = None;
        while rows.len() < limit {
            if examined >= SCAN_BUDGET {
                // Out of budget: the client goes on from the last task examined.
                next = start;
                break;
            }
            let ids = if ascending {
                app.state.task_ids_asc(range, start, PAGE).await?
            } else {
                app.state.task_ids_desc(range, start, PAGE).await?
            };
            if ids.is_empty() {
                break;
            }
            let exhausted = ids.len() < PAGE;
            let tasks = app.state.load_tasks(&ids).await?;
            let mut by_id: HashMap<TaskId, Task> = tasks.into_iter().map(|t| (t.id, t)).collect();
            for id in &ids {
                examined += 1;
                start = Some(*id);
                if let Some(task) = by_id.remove(id)
                    && filter.matches(&task)
                {
                    rows.push(task.summary());
                    if rows.len() == limit {
                        break;
                    }
                }
            }
            if rows.len() == limit {
                // More may follow: a final empty page is cheaper than counting.
                let last_in_page = start == ids.last().copied();
                if !(exhausted && last_in_page) {
                    next = start;
                }
                break;
            }
            if exhausted {
                break;
            }
        }
        let list = TaskList {
            tasks: rows,
            next_cursor: next.map(|id| id.to_string()),
        };
        return Ok(axum::Json(list).into_response());
    }

    let offset = match cursor {
        None => 0,
        Some(c) => c
            .strip_prefix('@')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                field(
                    cursor_field,
                    "expected the next_cursor of a page with the same sort (`@N`)",
                )
            })?,
    };
    let mut rows: Vec<TaskSummary> = Vec::new();
    let truncated = tasks_in_range(app, range, MAX_SORTED_TASKS, |t| {
        if filter.matches(&t) {
            rows.push(t.summary());
        }
    })
    .await?;
    let now = orch_shared::now_ms();
    let key = |t: &TaskSummary| -> f64 {
        match sort {
            Sort::Cost => t.cost_usd,
            Sort::Duration => t
                .finished_at_ms
                .unwrap_or(now)
                .saturating_sub(t.created_at_ms) as f64,
            Sort::Tokens => t.usage.total() as f64,
            Sort::Created => t.created_at_ms as f64,
        }
    };
    // Ties keep creation order (newest first), so pages are stable.
    rows.sort_by(|a, b| {
        let o = key(a).total_cmp(&key(b));
        let o = if ascending { o } else { o.reverse() };
        o.then(b.id.cmp(&a.id))
    });
    let total = rows.len();
    let page: Vec<TaskSummary> = rows.into_iter().skip(offset).take(limit).collect();
    let end = offset + page.len();
    let list = TaskList {
        tasks: page,
        next_cursor: (end < total).then(|| format!("@{end}")),
    };
    let mut resp = axum::Json(list).into_response();
    if truncated {
        resp.headers_mut().insert(
            "x-orch-truncated",
            HeaderValue::from_static("sorted the newest 10000 tasks of the window only"),
        );
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Agents.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AgentParams {
    role: Option<String>,
    status: Option<String>,
    task: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<usize>,
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

async fn agents(
    AxumState(app): AxumState<App>,
    params: Result<Query<AgentParams>, QueryRejection>,
) -> Answer<axum::Json<AgentList>> {
    let p = query(params)?;
    let limit = p.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(field("limit", "must be between 1 and 1000"));
    }
    let roles = list_of(
        "role",
        p.role.as_deref(),
        |s| s.parse().ok(),
        "analyst, planner, builder, tester, reviewer, documenter or custom",
    )?;
    let statuses = list_of(
        "status",
        p.status.as_deref(),
        job_status,
        "pending, queued, running, succeeded, failed, skipped, retrying or cancelled",
    )?;
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
        let mut ids = app.state.active_tasks().await?;
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.retain(|id| {
            let ms = orch_shared::report::id_time_ms(id.as_u128());
            range.since_ms.is_none_or(|s| ms >= s)
                && range.until_ms.is_none_or(|u| ms < u)
                && cursor.is_none_or(|(c, _)| *id <= c)
        });
        ids.truncate(MAX_ACTIVE_TASKS);
        let mut next = None;
        for task in app.state.load_tasks(&ids).await? {
            let from = cursor.filter(|(t, _)| *t == task.id).map_or(0, |(_, i)| i);
            if let Some(c) = take(&task, from) {
                next = Some(c);
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
async fn find_agent(app: &App, id: &str) -> Answer<(Task, usize)> {
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

async fn agent(
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
        backend: task.backend,
        model: task.model.clone(),
        tool_calls: tools.values().sum(),
        tools,
        session_id: job.session_id.clone(),
        log_events,
        job,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// Keep the stream open for new events until the agent ends.
    follow: Option<bool>,
}

pub(crate) fn last_event_id(headers: &HeaderMap) -> Answer<EventId> {
    match headers.get("last-event-id") {
        None => Ok(EventId::default()),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<EventId>().ok())
            .ok_or_else(|| {
                field(
                    "Last-Event-ID",
                    "expected an event id (N or N.M, as sent in `id:`)",
                )
            }),
    }
}

/// Which `task_finished` event ends a followed stream of `task`: a task reopened by a send, a
/// fork or a dead-letter retry has older ones in its log. The task's latest end is at or after
/// everything it queued (the leader's clock stamps both), and at or after its recorded end.
pub(crate) fn task_end(task: &Task) -> impl Fn(&Event) -> bool + Send + Sync + 'static {
    let since = if task.status.is_terminal() {
        task.finished_at_ms.unwrap_or(0)
    } else {
        task.jobs
            .iter()
            .filter_map(|j| j.queued_at_ms)
            .max()
            .unwrap_or(0)
    };
    move |e: &Event| transport::is_last(e) && e.at_ms >= since
}

/// Whether an agent's log has nothing more to say after this event.
fn ends_agent_log(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::JobFinished { success: true, .. }
            | EventKind::JobDeadLettered { .. }
            | EventKind::JobCancelled { .. }
            | EventKind::JobSkipped { .. }
            | EventKind::TaskFinished { .. }
    )
}

pub(crate) fn sse_event(e: &StoredEvent) -> SseEvent {
    let data = serde_json::to_string(&e.event).unwrap_or_default();
    SseEvent::default()
        .id(e.id().to_string())
        .event(e.event.kind.name())
        .data(data)
}

/// `GET /v1/agents/{id}/logs`: the agent's transcript (text, tool calls with their inputs, tool
/// results, usage, starts, ends, retries) as server-sent events with the event id
/// (`seq`, or `seq.index` inside a batch) as id. Without `follow` the stream ends with the last stored event; with it, after the agent's
/// last event. Resumes after `Last-Event-ID`.
async fn agent_logs(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let (task, index) = find_agent(&app, &id).await?;
    let job = task.jobs[index].id;
    let after = last_event_id(&headers)?;
    let done = task.status.is_terminal() || task.jobs[index].status.is_terminal();
    let mine = move |e: &StoredEvent| e.id() > after && e.event.job_id == Some(job);
    let shutdown = app.shutdown.clone().cancelled_owned();
    let task_ended = task_end(&task);
    let stream: std::pin::Pin<Box<dyn Stream<Item = StoredEvent> + Send>> =
        if p.follow.unwrap_or(false) && !done {
            let live = app.transport.task_events(task.id, after).await?;
            let task_ended = std::sync::Arc::new(task_ended);
            Box::pin(
                futures::stream::unfold((Box::pin(live), false), move |(mut live, ended)| {
                    let task_ended = task_ended.clone();
                    async move {
                        if ended {
                            return None;
                        }
                        loop {
                            let e = live.next().await?;
                            let last = if e.event.job_id == Some(job) {
                                ends_agent_log(&e.event.kind)
                            } else {
                                task_ended(&e.event)
                            };
                            if e.event.job_id == Some(job) || last {
                                return Some((e, (live, last)));
                            }
                        }
                    }
                })
                .filter(move |e| futures::future::ready(e.id() > after)),
            )
        } else {
            let stored = app
                .transport
                .stored_events(Some(task.id), ReadFrom::Start)
                .await?;
            Box::pin(stored.filter(move |e| futures::future::ready(mine(e))))
        };
    let stream = stream
        .map(|e| Ok::<_, Infallible>(sse_event(&e)))
        .take_until(shutdown);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// `GET /v1/tasks/{id}/logs`: the transcripts of every agent of a task, as
/// `GET /v1/agents/{id}/logs` (without `follow`, the stream ends with the last stored event;
/// `GET /v1/tasks/{id}/events` always follows to the task's end).
async fn task_logs(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let id: TaskId = id
        .parse()
        .map_err(|e: orch_shared::ids::IdError| field("id", e))?;
    let task = app
        .state
        .load_task(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("task {id} not found")))?;
    let after = last_event_id(&headers)?;
    let shutdown = app.shutdown.clone().cancelled_owned();
    let stream: std::pin::Pin<Box<dyn Stream<Item = StoredEvent> + Send>> =
        if p.follow.unwrap_or(false) && !task.status.is_terminal() {
            let live = app.transport.task_events(task.id, after).await?;
            let task_ended = std::sync::Arc::new(task_end(&task));
            Box::pin(futures::stream::unfold(
                (Box::pin(live), false),
                move |(mut live, ended)| {
                    let task_ended = task_ended.clone();
                    async move {
                        if ended {
                            return None;
                        }
                        let e = live.next().await?;
                        let last = task_ended(&e.event);
                        Some((e, (live, last)))
                    }
                },
            ))
        } else {
            let stored = app
                .transport
                .stored_events(Some(task.id), ReadFrom::Start)
                .await?;
            Box::pin(stored.filter(move |e| futures::future::ready(e.id() > after)))
        };
    let stream = stream
        .map(|e| Ok::<_, Infallible>(sse_event(&e)))
        .take_until(shutdown);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// The cluster: status and live events.

async fn status(AxumState(app): AxumState<App>) -> Answer<axum::Json<ClusterStatus>> {
    let now = orch_shared::now_ms();
    let coordinators = app.state.coordinators(COORDINATOR_MAX_AGE).await?;
    let workers = app.state.workers(WORKER_MAX_AGE).await?;
    let queue = match app.transport.queue_info().await {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::warn!(error = %e, "queue info unavailable");
            None
        }
    };
    let dead_letters = app.state.dead_letter_count().await?;

    let mut active_ids = app.state.active_tasks().await?;
    active_ids.sort_unstable_by(|a, b| b.cmp(a));
    let active_tasks = active_ids.len() as u64;
    active_ids.truncate(MAX_ACTIVE_TASKS);
    let mut active_agents = Vec::new();
    for task in app.state.load_tasks(&active_ids).await? {
        for job in task.jobs.iter().filter(|j| !j.status.is_terminal()) {
            if active_agents.len() < MAX_STATUS_AGENTS {
                active_agents.push(agent_summary(&task, job));
            }
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
        dead_letters,
        active_tasks,
        active_agents,
        recent_failures,
        cost_today,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventParams {
    /// Comma-separated event kinds (`job_started,tool_call,...`); all when absent.
    kinds: Option<String>,
    /// Longest text, tool input and tool output sent, in characters (0: no limit).
    max_chars: Option<usize>,
}

const EVENT_KINDS: [&str; 16] = [
    "task_created",
    "task_planned",
    "job_queued",
    "job_skipped",
    "job_retrying",
    "job_cancelled",
    "job_dead_lettered",
    "job_started",
    "thinking",
    "text",
    "tool_call",
    "tool_result",
    "usage",
    "heartbeat",
    "job_finished",
    "task_finished",
];

/// Cuts `s` to `max` characters, saying how much was cut.
fn cut(s: &mut String, max: usize) {
    if max == 0 {
        return;
    }
    let n = s.chars().count();
    if n > max {
        let kept: String = s.chars().take(max).collect();
        *s = format!("{kept}… [{} more characters]", n - max);
    }
}

fn shorten(event: &mut Event, max: usize) {
    match &mut event.kind {
        EventKind::Text { text } => cut(text, max),
        EventKind::ToolCall { input, .. } => cut(input, max),
        EventKind::ToolResult { output, .. } => cut(output, max),
        _ => {}
    }
}

/// Decrements the open-streams gauge when a stream ends, however it ends.
struct StreamGauge;

impl StreamGauge {
    fn open() -> Self {
        metrics::gauge!(m::EVENT_STREAMS).increment(1.0);
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::EVENT_STREAMS).decrement(1.0);
    }
}

/// `GET /v1/events`: every task's events as they happen, as server-sent events (id = event
/// id). Starts with the next event, or after `Last-Event-ID` to resume. Text fields are
/// cut to `max_chars`.
async fn cluster_events(
    AxumState(app): AxumState<App>,
    params: Result<Query<EventParams>, QueryRejection>,
    headers: HeaderMap,
) -> Answer<Response> {
    let p = query(params)?;
    let kinds: Vec<String> = list_of(
        "kinds",
        p.kinds.as_deref(),
        |s| EVENT_KINDS.contains(&s).then(|| s.to_string()),
        "event kinds such as job_started, tool_call, job_finished",
    )?;
    let max = p.max_chars.unwrap_or(DEFAULT_MAX_CHARS);
    let after = last_event_id(&headers)?;
    let live = app.transport.all_events(after, &kinds).await?;
    let gauge = StreamGauge::open();
    let stream = live
        .map(move |mut e| {
            let _open = &gauge;
            shorten(&mut e.event, max);
            Ok::<_, Infallible>(sse_event(&e))
        })
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Cost report.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CostParams {
    since: Option<u64>,
    until: Option<u64>,
    /// Comma-separated dimensions, one breakdown each.
    by: Option<String>,
}

fn dimension_value(dim: &str, task: &Task, job: &Job) -> String {
    match dim {
        "agent" => job.id.to_string(),
        "role" => job.role.as_str().to_string(),
        "model" => model_name(task.model.as_deref()).to_string(),
        "backend" => task.backend.as_str().to_string(),
        "task" => task.id.to_string(),
        "worker" => job
            .worker_id
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string),
        _ => job.status.as_str().to_string(),
    }
}

async fn cost_report(
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

// ---------------------------------------------------------------------------------------------
// Export.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    what: ExportWhat,
    since: Option<u64>,
    until: Option<u64>,
}

fn ndjson_line<T: serde::Serialize>(value: &T) -> Result<Bytes, std::io::Error> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// `GET /v1/export?what=tasks|agents|events`: the window as newline-delimited JSON, oldest
/// first, streamed page by page ([`TaskSummary`], [`AgentSummary`] or [`EventRow`] lines).
async fn export(
    AxumState(app): AxumState<App>,
    params: Result<Query<ExportParams>, QueryRejection>,
) -> Answer<Response> {
    let p = query(params)?;
    let range = range(p.since, p.until)?;
    let body = match p.what {
        ExportWhat::Tasks | ExportWhat::Agents => {
            let what = p.what;
            let state = app.state.clone();
            // Each step reads one page of tasks after the last one sent.
            let pages = futures::stream::unfold(Some(None), move |after| {
                let state = state.clone();
                async move {
                    let after: Option<TaskId> = after?;
                    let page = async {
                        let ids = state.task_ids_asc(range, after, PAGE).await?;
                        let tasks = state.load_tasks(&ids).await?;
                        Ok::<_, crate::state::Error>((ids, tasks))
                    };
                    match page.await {
                        Ok((ids, _)) if ids.is_empty() => None,
                        Ok((ids, tasks)) => {
                            let mut lines = Vec::new();
                            for task in &tasks {
                                match what {
                                    ExportWhat::Tasks => lines.push(ndjson_line(&task.summary())),
                                    _ => lines.extend(
                                        task.jobs
                                            .iter()
                                            .map(|j| ndjson_line(&agent_summary(task, j))),
                                    ),
                                }
                            }
                            let next = (ids.len() == PAGE).then(|| ids.last().copied());
                            Some((futures::stream::iter(lines), next))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "export stopped: storage error");
                            let err = std::io::Error::other("task storage (Redis) failed");
                            Some((futures::stream::iter(vec![Err(err)]), None))
                        }
                    }
                }
            });
            Body::from_stream(pages.flatten())
        }
        ExportWhat::Events => {
            let from = range.since_ms.map_or(ReadFrom::Start, ReadFrom::Time);
            let until = range.until_ms;
            let events = app.transport.stored_events(None, from).await?;
            let lines = events
                .take_while(move |e| {
                    futures::future::ready(until.is_none_or(|u| e.event.at_ms < u))
                })
                .map(|e| {
                    ndjson_line(&EventRow {
                        seq: e.seq,
                        index: e.index,
                        event: e.event,
                    })
                });
            Body::from_stream(lines)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

// ---------------------------------------------------------------------------------------------
// Clean.

/// `POST /v1/clean`: deletes the finished tasks created more than `older_than_ms` ago, with
/// their agents, index entries, dead letters, markers and their messages in the event log and
/// the results stream. Examines at most `limit` tasks, oldest first; `next` says where to go on.
async fn clean(
    AxumState(app): AxumState<App>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<axum::Json<CleanReport>> {
    let bytes = body.map_err(|e| {
        Failure::from(ApiError::new(
            ErrorCode::MalformedBody,
            format!("body: {}", e.body_text()),
        ))
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let req: CleanRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        field(if path == "." { "body" } else { &path }, e.into_inner())
    })?;
    let limit = req.limit.unwrap_or(MAX_CLEAN_BATCH);
    if !(1..=MAX_CLEAN_BATCH).contains(&limit) {
        return Err(field(
            "limit",
            format!("must be between 1 and {MAX_CLEAN_BATCH}"),
        ));
    }
    let now = orch_shared::now_ms();
    let cutoff = now.saturating_sub(req.older_than_ms);
    let window = Range {
        since_ms: None,
        until_ms: Some(cutoff.max(1)),
    };
    let ids = app
        .state
        .task_ids_asc(window, req.after, limit as usize)
        .await?;
    let mut report = CleanReport {
        cutoff_ms: cutoff,
        dry_run: req.dry_run,
        next: (ids.len() == limit as usize)
            .then(|| ids.last().copied())
            .flatten(),
        ..Default::default()
    };
    for task in app.state.load_tasks(&ids).await? {
        if !task.status.is_terminal() {
            report.skipped_unfinished += 1;
            continue;
        }
        report.tasks += 1;
        report.agents += task.jobs.len() as u64;
        if req.dry_run {
            continue;
        }
        // The logs go first: a failure leaves the record, so a later clean finds it again.
        let (events, results) = app.transport.purge_task(task.id).await?;
        let jobs: Vec<JobId> = task.jobs.iter().map(|j| j.id).collect();
        app.transport.purge_sessions(&jobs).await?;
        report.events_purged += events;
        report.results_purged += results;
        app.state.delete_task(&task).await?;
    }
    if !req.dry_run && report.tasks > 0 {
        tracing::info!(
            tasks = report.tasks,
            agents = report.agents,
            events = report.events_purged,
            "cleaned old tasks"
        );
    }
    Ok(axum::Json(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_with_a_note() {
        let mut s = "abcdef".to_string();
        cut(&mut s, 3);
        assert_eq!(s, "abc… [3 more characters]");
        let mut s = "abc".to_string();
        cut(&mut s, 3);
        assert_eq!(s, "abc");
        let mut s = "abcdef".to_string();
        cut(&mut s, 0);
        assert_eq!(s, "abcdef");
    }

    #[test]
    fn agent_cursors_round_trip() {
        let id = TaskId::new();
        let (t, i) = parse_agent_cursor(&format!("{id}:3")).ok().unwrap();
        assert_eq!((t, i), (id, 3));
        assert!(parse_agent_cursor("nope").is_err());
    }

    #[test]
    fn every_event_kind_can_be_asked_for() {
        for k in EVENT_KINDS {
            assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }
}
