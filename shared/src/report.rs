//! JSON bodies of the coordinator's history, report and cluster-view endpoints (`/v1/status`,
//! `/v1/agents`, `/v1/reports/cost`, `/v1/export`, `/v1/clean`, `/v1/events`), used by the
//! coordinator and `orchctl`.
//!
//! Agents are jobs: an agent's id is its job's id, and everything here about an agent is read
//! from its task's record (and, for tool calls and transcripts, from the task's event log).

use crate::api::{Job, JobError, JobStatus, Worker};
use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{Backend, Usage};
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One agent (job) as listed by `GET /v1/agents` and in `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentSummary {
    pub id: JobId,
    pub task_id: TaskId,
    pub step: u32,
    pub role: Role,
    pub status: JobStatus,
    pub attempt: u32,
    #[serde(default)]
    pub worker_id: Option<WorkerId>,
    pub backend: Backend,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub queued_at_ms: Option<u64>,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub error: Option<JobError>,
    /// The task's prompt, cut to [`PROMPT_EXCERPT_CHARS`] characters.
    #[serde(default)]
    pub task_prompt: String,
    /// Why the agent is parked (status `parked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<crate::api::Parked>,
}

/// How much of a task's prompt an [`AgentSummary`] carries.
pub const PROMPT_EXCERPT_CHARS: usize = 200;

/// `GET /v1/agents`: newest task first, agents in plan order within a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentList {
    pub agents: Vec<AgentSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// `GET /v1/agents/{id}/checkpoints`: the checkpoints kept of an agent, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointList {
    pub agent_id: JobId,
    pub checkpoints: Vec<crate::job::Checkpoint>,
}

/// `GET /v1/agents/{id}`: one agent in full.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentDetail {
    pub task_id: TaskId,
    pub task_prompt: String,
    pub backend: Backend,
    #[serde(default)]
    pub model: Option<String>,
    /// The job record (status, timings, tokens by kind, cost, output, files read and written).
    pub job: Job,
    /// Tool calls in the agent's event log (all attempts).
    pub tool_calls: u64,
    /// Tool calls by tool name.
    #[serde(default)]
    pub tools: BTreeMap<String, u64>,
    /// The backend's conversation id, when the agent's session is stored in the cluster
    /// (`orchctl agents send` and `fork` continue it).
    #[serde(default)]
    pub session_id: Option<String>,
    /// Events of this agent in the log; 0 once the log has expired or was cleaned.
    pub log_events: u64,
}

/// One coordinator, as it registers itself every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CoordinatorInfo {
    pub id: String,
    pub addr: String,
    pub version: String,
    pub started_at_ms: u64,
    pub last_seen_ms: u64,
}

/// The job queue, summed over its consumers (one per backend, and the pre-routing one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueInfo {
    /// Jobs waiting for a worker.
    pub pending: u64,
    /// Jobs delivered to a worker and not yet acked.
    pub in_flight: u64,
    /// Jobs delivered more than once and not yet acked.
    pub redelivered: u64,
}

impl QueueInfo {
    /// `self` plus `other`.
    pub fn plus(self, other: QueueInfo) -> QueueInfo {
        QueueInfo {
            pending: self.pending + other.pending,
            in_flight: self.in_flight + other.in_flight,
            redelivered: self.redelivered + other.redelivered,
        }
    }
}

/// One backend's part of the job queue (its consumer) and the live workers that run it. Jobs
/// `pending` with no `workers` wait until a worker that runs the backend joins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendQueue {
    /// The backend's wire name; `legacy` for the consumer of jobs published by coordinators
    /// older than routing by backend.
    pub backend: String,
    #[serde(flatten)]
    pub queue: QueueInfo,
    /// Live workers that advertise this backend.
    pub workers: u64,
}

/// Cost since midnight UTC: `tasks` created today; `usage` and `cost_usd` of every agent
/// attempt that finished today, counted once (attempts of tasks created earlier included) —
/// `spent_usd`, what the daily budget counts, is the same sum. Kept in Redis as results
/// arrive, so reading it costs the same whatever the size of the history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostToday {
    pub since_ms: u64,
    pub tasks: u64,
    pub usage: Usage,
    pub cost_usd: f64,
    /// More tasks were created today than one request reads; the sums cover the newest ones.
    #[serde(default)]
    pub truncated: bool,
    /// The day's settled spend: the cost of every agent attempt that finished today.
    #[serde(default)]
    pub spent_usd: f64,
    /// Estimates the daily budget holds for agents admitted and not finished yet.
    #[serde(default)]
    pub reserved_usd: f64,
    /// The cluster's daily budget (the leading coordinator's `--daily-budget-usd`); `None`:
    /// no daily budget.
    #[serde(default)]
    pub budget_usd: Option<f64>,
}

/// `GET /v1/status`: the cluster at a glance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    pub version: String,
    pub now_ms: u64,
    pub coordinators: Vec<CoordinatorInfo>,
    pub workers: Vec<Worker>,
    pub slots_total: u64,
    pub slots_busy: u64,
    /// `None` when JetStream did not answer.
    #[serde(default)]
    pub queue: Option<QueueInfo>,
    /// The queue by backend, with the live workers that run each (empty when JetStream did
    /// not answer, or from an older coordinator).
    #[serde(default)]
    pub backends: Vec<BackendQueue>,
    pub dead_letters: u64,
    pub active_tasks: u64,
    /// Agents of unfinished tasks that are queued, running or waiting for a retry.
    pub active_agents: Vec<AgentSummary>,
    /// The latest failed agents among recent tasks, newest first.
    pub recent_failures: Vec<AgentSummary>,
    pub cost_today: CostToday,
}

/// Totals of one group of agents in a cost report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostLine {
    pub agents: u64,
    pub usage: Usage,
    pub cost_usd: f64,
}

impl CostLine {
    pub fn add(&mut self, usage: &Usage, cost_usd: f64) {
        self.agents += 1;
        self.usage.add(usage);
        self.cost_usd += cost_usd;
    }
}

/// One row of a cost breakdown: the group's value of the dimension and its totals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostGroup {
    /// The value of the breakdown's dimension: an agent id, a role, a model...
    pub key: String,
    /// For the `agent` dimension: the agent's role and task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(flatten)]
    pub totals: CostLine,
}

/// Costs grouped by one dimension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostBreakdown {
    /// `agent`, `role`, `model`, `backend`, `task`, `worker` or `status`.
    pub by: String,
    /// Most expensive first.
    pub groups: Vec<CostGroup>,
}

/// The dimensions a cost report can group by.
pub const COST_DIMENSIONS: [&str; 7] = [
    "agent", "role", "model", "backend", "task", "worker", "status",
];

/// `GET /v1/reports/cost`: the agents of the tasks created in a window (agents that never
/// started are left out), summed, and broken down by each requested dimension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostReport {
    #[serde(default)]
    pub since_ms: Option<u64>,
    #[serde(default)]
    pub until_ms: Option<u64>,
    pub tasks: u64,
    pub total: CostLine,
    pub breakdowns: Vec<CostBreakdown>,
    /// More tasks matched than one report reads ([`MAX_REPORT_TASKS`]); the sums cover the
    /// newest ones. Narrow the range with `since`/`until`.
    #[serde(default)]
    pub truncated: bool,
}

/// Most tasks one cost report or one sorted task listing reads.
pub const MAX_REPORT_TASKS: usize = 50_000;

/// `POST /v1/clean`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanRequest {
    /// Finished tasks created more than this long ago are deleted.
    pub older_than_ms: u64,
    /// Count what would go without deleting anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Most tasks one call examines (default and maximum [`MAX_CLEAN_BATCH`]).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Continue after this task (the `next` of the previous call).
    #[serde(default)]
    pub after: Option<TaskId>,
}

pub const MAX_CLEAN_BATCH: u32 = 1000;

/// The answer to `POST /v1/clean`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CleanReport {
    pub cutoff_ms: u64,
    pub dry_run: bool,
    /// Finished tasks deleted (or that would be).
    pub tasks: u64,
    /// Their agents.
    pub agents: u64,
    /// Messages purged from the event log (0 in a dry run).
    pub events_purged: u64,
    /// Messages purged from the results stream (0 in a dry run).
    pub results_purged: u64,
    /// Old tasks kept because they have not finished.
    pub skipped_unfinished: u64,
    /// The batch limit was reached: call again with `after` set to this for the rest.
    #[serde(default)]
    pub next: Option<TaskId>,
}

/// What `GET /v1/export` streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportWhat {
    Tasks,
    Agents,
    Events,
}

impl ExportWhat {
    pub fn as_str(&self) -> &'static str {
        match self {
            ExportWhat::Tasks => "tasks",
            ExportWhat::Agents => "agents",
            ExportWhat::Events => "events",
        }
    }
}

/// One line of `GET /v1/export?what=events`: an event of the log and where it sits in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRow {
    pub seq: u64,
    /// The event's position in a batch message (0 otherwise; omitted when 0): with `seq`, the
    /// event's [`crate::event::EventId`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: u32,
    pub event: crate::event::Event,
}

impl EventRow {
    pub fn id(&self) -> crate::event::EventId {
        crate::event::EventId::new(self.seq, self.index)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The UUIDv7 lower bound of ids created at `ms` (every id created at or after `ms` sorts at or
/// after it), as the hyphenated lower-case string the task index stores.
pub fn id_bound(ms: u64) -> String {
    let ms = ms & 0xffff_ffff_ffff;
    format!(
        "{:08x}-{:04x}-0000-0000-000000000000",
        ms >> 16,
        ms & 0xffff
    )
}

/// The creation time embedded in a UUIDv7 id (ms since the epoch).
pub fn id_time_ms(id: u128) -> u64 {
    (id >> 80) as u64
}

/// The model as a metric label or report key: `default` when none was asked for.
pub fn model_name(model: Option<&str>) -> &str {
    match model {
        Some(m) if !m.trim().is_empty() => m,
        _ => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TaskId;

    #[test]
    fn id_bounds_order_like_creation_times() {
        let id = TaskId::new();
        let ms = id_time_ms(id.as_u128());
        let now = crate::now_ms();
        assert!(ms <= now && now - ms < 10_000, "{ms} vs {now}");
        assert!(id_bound(ms) <= id.to_string());
        assert!(id_bound(ms + 1) > id.to_string());
        assert!(id_bound(ms - 1) < id.to_string());
    }
}
