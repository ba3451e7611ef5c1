//! `GET /v1/tasks`: the task history, filtered, sorted and paged.

use super::window::{MAX_SORTED_TASKS, PAGE, SCAN_BUDGET, range, tasks_in_range};
use crate::http::answer::{Answer, field, names_of, page_limit, query};
use crate::http::app::App;
use crate::http::auth::Caller;
use crate::state::search::{self, Source};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use orch_shared::api::{JobStatus, Mode, TaskList, TaskStatus, TaskSummary};
use orch_shared::ids::TaskId;
use orch_shared::job::Usage;
use orch_shared::role::Role;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};

/// The query of `GET /v1/tasks`.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size (1 to 1000, default 50).
    pub limit: Option<usize>,
    /// Tasks older than this id (the `next_cursor` of a page in creation order, newest first).
    pub before: Option<String>,
    /// The `next_cursor` of the previous page, whatever the order.
    pub cursor: Option<String>,
    /// Comma-separated statuses.
    pub status: Option<String>,
    /// Words that must all be in the description (case-insensitive, whole words: runs of
    /// letters and digits), or the start of the id. A word of 3 or more characters that is not
    /// a common English word must be among the first 50 such words of the description (the
    /// word index); a shorter or common one anywhere in it. A search of only short and common
    /// words reads the history a page at a time.
    pub search: Option<String>,
    /// Created at or after (ms since the epoch).
    pub since: Option<u64>,
    /// Created before (ms since the epoch).
    pub until: Option<u64>,
    /// Cost at least this many dollars.
    pub min_cost: Option<f64>,
    /// Cost at most this many dollars.
    pub max_cost: Option<f64>,
    /// `created` (default), `cost`, `duration` or `tokens`.
    pub sort: Option<String>,
    /// `desc` (default) or `asc`.
    pub order: Option<String>,
}

/// The part of a task record a listing reads (field names as in [`orch_shared::api::Task`]):
/// its summary and what the filters look at, not the outputs, contexts and job prompts.
#[derive(Deserialize)]
struct ListedTask {
    id: TaskId,
    prompt: String,
    task_type: String,
    mode: Mode,
    status: TaskStatus,
    #[serde(default)]
    tenant: Option<String>,
    created_at_ms: u64,
    #[serde(default)]
    finished_at_ms: Option<u64>,
    jobs: Vec<ListedJob>,
    #[serde(default)]
    usage: Usage,
    #[serde(default)]
    cost_usd: f64,
    #[serde(default)]
    pr: Option<ListedPr>,
}

#[derive(Deserialize)]
struct ListedPr {
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct ListedJob {
    role: Role,
    status: JobStatus,
}

impl ListedTask {
    /// As [`orch_shared::api::Task::summary`].
    fn summary(self) -> TaskSummary {
        TaskSummary {
            id: self.id,
            roles: self.jobs.iter().map(|j| j.role).collect(),
            jobs_done: self.jobs.iter().filter(|j| j.status.is_terminal()).count() as u32,
            prompt: self.prompt,
            task_type: self.task_type,
            mode: self.mode,
            status: self.status,
            usage: self.usage,
            cost_usd: self.cost_usd,
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
            pr_url: self.pr.and_then(|p| p.url),
        }
    }
}

/// A search: every word of it in the task's description, or, when it may be one, the start
/// of the task's id. A word the index keeps ([`search::indexed`]) must be among the words of
/// the description the index holds ([`search::index_words`]: the first 50 such), so the
/// index finds every match; a short or common one anywhere in it ([`search::words`]).
struct Search {
    text: String,
    words: Vec<String>,
    id_like: bool,
}

impl Search {
    fn new(text: &str) -> Option<Self> {
        let text = text.trim().to_lowercase();
        if text.is_empty() {
            return None;
        }
        let words: BTreeSet<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        Some(Self {
            id_like: search::is_id_prefix(&text),
            words: words.into_iter().collect(),
            text,
        })
    }

    fn matches(&self, t: &ListedTask) -> bool {
        (self.id_like && t.id.to_string().starts_with(self.text.as_str())) || {
            let (mut indexed, mut all) = (None, None);
            self.words.iter().all(|w| {
                if search::indexed(w) {
                    indexed
                        .get_or_insert_with(|| search::index_words(&t.prompt))
                        .contains(w)
                } else {
                    all.get_or_insert_with(|| search::words(&t.prompt))
                        .contains(w)
                }
            })
        }
    }

    /// Where the candidates come from: the ids it may start, and the tasks holding its rarest
    /// indexed word (the record check does the rest); every task while the index is not
    /// ready, or when the search has only short and common words.
    async fn sources(&self, app: &App) -> Answer<Vec<Source>> {
        if !app.state.words_ready().await? {
            return Ok(vec![Source::All]);
        }
        let mut sources = vec![];
        if self.id_like {
            sources.push(Source::IdPrefix(self.text.clone()));
        }
        let indexed: Vec<String> = self
            .words
            .iter()
            .filter(|w| search::indexed(w))
            .cloned()
            .collect();
        if indexed.is_empty() {
            return Ok(vec![Source::All]);
        }
        let counts = app.state.word_counts(&indexed).await?;
        if let Some((word, count)) = indexed.iter().zip(counts).min_by_key(|(_, c)| *c)
            && count > 0
        {
            sources.push(Source::Word(word.clone()));
        }
        Ok(sources)
    }
}

struct Filter {
    /// Only this tenant's tasks (a tenant's token).
    tenant: Option<String>,
    statuses: Vec<TaskStatus>,
    search: Option<Search>,
    min_cost: Option<f64>,
    max_cost: Option<f64>,
}

impl Filter {
    fn matches(&self, t: &ListedTask) -> bool {
        self.tenant
            .as_ref()
            .is_none_or(|tenant| t.tenant.as_ref() == Some(tenant))
            && (self.statuses.is_empty() || self.statuses.contains(&t.status))
            && self.search.as_ref().is_none_or(|s| s.matches(t))
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
async fn list_tasks(app: &App, p: ListParams, tenant: Option<String>) -> Answer<Response> {
    let limit = page_limit(p.limit)?;
    let statuses: Vec<TaskStatus> = names_of("status", p.status.as_deref())?;
    for (name, v) in [("min_cost", p.min_cost), ("max_cost", p.max_cost)] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(field(name, "must be a non-negative number of dollars"));
        }
    }
    let filter = Filter {
        tenant,
        statuses,
        search: p.search.as_deref().and_then(Search::new),
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
        let sources = match &filter.search {
            Some(search) => search.sources(app).await?,
            None => vec![Source::All],
        };
        let mut rows = Vec::new();
        let mut examined = 0;
        let mut next = None;
        while rows.len() < limit && !sources.is_empty() {
            if examined >= SCAN_BUDGET {
                // Out of budget: the client goes on from the last task examined.
                next = start;
                break;
            }
            let (ids, exhausted) = app
                .state
                .ids_page(&sources, range, start, PAGE, ascending)
                .await?;
            if ids.is_empty() {
                break;
            }
            let tasks = app.state.load_records::<ListedTask>(&ids).await?;
            let mut by_id: HashMap<TaskId, ListedTask> =
                tasks.into_iter().map(|t| (t.id, t)).collect();
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
    let truncated = tasks_in_range(app, range, MAX_SORTED_TASKS, |t: ListedTask| {
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

/// The task history: filtered, sorted and paged, newest first by default.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(ListParams),
    responses((
        status = 200,
        description = "One page of tasks. A listing sorted by cost, duration or tokens that could not read its whole window says so in the `x-orch-truncated` header.",
        body = TaskList,
        headers(("x-orch-truncated" = String, description = "Present when only the newest tasks of the window were sorted.")),
    ))
)]
pub(super) async fn list(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Answer<Response> {
    let params = query(params)?;
    let tenant = caller.and_then(|c| c.0.tenant);
    list_tasks(&app, params, tenant).await
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use orch_shared::api::Task;

    /// A finished two-job task with every field a listing or a report reads set.
    pub fn stored_task() -> Task {
        serde_json::from_value(serde_json::json!({
            "id": TaskId::new().to_string(), "prompt": "Fix the Parser", "task_type": "custom",
            "plan_source": "custom", "mode": "parallel", "status": "failed",
            "backend": "sim", "model": "m-1", "backends": {"tester": "anthropic"},
            "models": {"tester": "m-2"}, "tenant": "acme",
            "created_at_ms": 1000, "finished_at_ms": 5000, "cost_usd": 0.75,
            "usage": {"input_tokens": 10, "output_tokens": 20, "cache_creation_tokens": 3,
                      "cache_read_tokens": 4},
            "output": "a long output", "error": "tester failed",
            "jobs": [
                {"id": orch_shared::ids::JobId::new().to_string(), "step": 0, "role": "builder",
                 "status": "succeeded", "attempt": 1, "prompt": "build", "cost_usd": 0.25,
                 "worker_id": "w-1", "context": "forward context", "output": "built",
                 "usage": {"input_tokens": 4, "output_tokens": 8, "cache_creation_tokens": 1,
                           "cache_read_tokens": 2}},
                {"id": orch_shared::ids::JobId::new().to_string(), "step": 1, "role": "tester",
                 "status": "failed", "attempt": 2, "prompt": "test", "cost_usd": 0.5,
                 "model": "m-3",
                 "usage": {"input_tokens": 6, "output_tokens": 12, "cache_creation_tokens": 2,
                           "cache_read_tokens": 2}},
            ],
        }))
        .unwrap()
    }

    #[test]
    fn a_listed_record_reads_back_the_summary_and_what_the_filters_see() {
        let task = stored_task();
        let listed: ListedTask =
            orch_shared::codec::decode(&orch_shared::codec::encode(&task)).unwrap();
        assert_eq!(listed.tenant.as_deref(), Some("acme"));
        assert_eq!(listed.summary(), task.summary());
    }
}
