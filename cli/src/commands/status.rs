//! `orchctl status`: the cluster at a glance: readiness, coordinators, workers and their slots,
//! the job queue (depth, in flight), active agents, dead letters, cost today, the day's spend
//! against the daily budget and recent tasks.

use super::{Ctx, failure};
use crate::client::Client;
use crate::output;
use orch_shared::api::{Readiness, TaskList, TaskStatus, WorkerList};
use orch_shared::report::{ClusterStatus, CostToday};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

/// How many recent tasks the counts cover.
const SAMPLE: u32 = 100;

const EXAMPLES: &str = "\
Examples:
  orchctl status
  orchctl status --output json | jq .readiness.ready
  until orchctl status >/dev/null; do sleep 1; done   # wait for a cluster to be ready";

/// Show the cluster at a glance: readiness, workers and slots, queue, agents, cost today
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show the coordinator's readiness (NATS, Redis), the coordinators and workers \
(with their slots and busy slots), the job queue (jobs waiting and in flight, from JetStream), \
the active tasks and agents, the dead letters, what today cost (since midnight UTC), the day's \
spend against the cluster's daily budget (`--daily-budget-usd`) and how many of the last 100 \
tasks are in each status.\n\nExits 0 when the coordinator is ready and 1 \
when it answers but is not ready.",
    after_long_help = EXAMPLES
)]
pub struct Args {}

/// `--output json`: the API documents, side by side.
#[derive(Debug, Serialize)]
struct StatusJson<'a> {
    server: &'a str,
    readiness: &'a Readiness,
    workers: Option<&'a WorkerList>,
    tasks: Option<TaskCounts>,
    cluster: Option<&'a ClusterStatus>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct TaskCounts {
    /// How many tasks were counted (at most 100, the most recent).
    pub sampled: usize,
    pub by_status: BTreeMap<&'static str, usize>,
}

pub fn count_tasks(list: &TaskList) -> TaskCounts {
    let mut by_status: BTreeMap<&'static str, usize> = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
    ]
    .into_iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    for t in &list.tasks {
        *by_status.entry(t.status.as_str()).or_default() += 1;
    }
    TaskCounts {
        sampled: list.tasks.len(),
        by_status,
    }
}

/// Reads what is readable: a coordinator that is not ready may fail the other calls, and the
/// summary should still show its readiness.
async fn fetch<T>(
    ready: bool,
    call: impl Future<Output = Result<T, crate::client::Error>>,
) -> anyhow::Result<Option<T>> {
    match call.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if !ready && e.is_transient() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let client: Client = ctx.client()?;
    let readiness = client.readiness().await?;
    let workers = fetch(readiness.ready, client.workers()).await?;
    let tasks = fetch(readiness.ready, client.list_tasks(Some(SAMPLE), None))
        .await?
        .map(|l| count_tasks(&l));
    // An older coordinator has no `/v1/status`: show what the other calls tell.
    let cluster = match client.cluster_status().await {
        Ok(c) => Some(c),
        Err(e) if e.is_not_found() || (!readiness.ready && e.is_transient()) => None,
        Err(e) => return Err(e.into()),
    };

    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(
            &mut out,
            &StatusJson {
                server: client.server(),
                readiness: &readiness,
                workers: workers.as_ref(),
                tasks,
                cluster: cluster.as_ref(),
            },
        )?;
    } else {
        let ok = |b: bool| if b { "ok" } else { "down" };
        let mut rows = vec![
            ("server", client.server().to_string()),
            (
                "ready",
                format!(
                    "{} (nats {}, redis {}{})",
                    if readiness.ready { "yes" } else { "no" },
                    ok(readiness.nats),
                    ok(readiness.redis),
                    if readiness.redis && !readiness.state {
                        ", state being rebuilt from the log"
                    } else {
                        ""
                    }
                ),
            ),
        ];
        if !readiness.version.is_empty() {
            rows.push(("version", readiness.version.clone()));
        }
        rows.push((
            "workers",
            match &workers {
                Some(w) => {
                    let slots: u32 = w.workers.iter().map(|w| w.slots).sum();
                    let busy: u32 = w.workers.iter().map(|w| w.busy).sum();
                    format!("{} ({busy} of {slots} slots busy)", w.workers.len())
                }
                None => "unavailable".into(),
            },
        ));
        rows.push((
            "tasks",
            match &tasks {
                Some(c) => {
                    let parts: Vec<String> = ["running", "pending", "completed", "failed"]
                        .iter()
                        .map(|s| format!("{} {s}", c.by_status.get(s).copied().unwrap_or(0)))
                        .collect();
                    format!("{} (of the last {})", parts.join(" · "), c.sampled)
                }
                None => "unavailable".into(),
            },
        ));
        if let Some(c) = &cluster {
            cluster_rows(&mut rows, c);
        }
        output::print_table(&mut out, &output::details(&rows))?;
        if let Some(w) = workers.as_ref().filter(|w| !w.workers.is_empty()) {
            writeln!(out, "Workers")?;
            crate::commands::workers::list::render(&mut out, w, orch_shared::now_ms())?;
        }
    }
    out.flush()?;
    Ok(if readiness.ready {
        ExitCode::SUCCESS
    } else {
        failure()
    })
}

/// The rows only `GET /v1/status` knows.
fn cluster_rows(rows: &mut Vec<(&'static str, String)>, c: &ClusterStatus) {
    let coordinators = if c.coordinators.is_empty() {
        "none registered".to_string()
    } else {
        let ids: Vec<String> = c
            .coordinators
            .iter()
            .map(|k| format!("{} ({})", k.id, k.addr))
            .collect();
        format!("{}: {}", c.coordinators.len(), ids.join(", "))
    };
    rows.insert(2, ("coordinators", coordinators));
    rows.push((
        "queue",
        match &c.queue {
            Some(q) => format!(
                "{} waiting · {} in flight · {} redelivered",
                q.pending, q.in_flight, q.redelivered
            ),
            None => "unavailable (JetStream did not answer)".into(),
        },
    ));
    // Jobs waiting on a backend no live worker runs: they stay queued until one joins.
    for b in c
        .backends
        .iter()
        .filter(|b| b.workers == 0 && b.queue.pending > 0 && b.backend != "legacy")
    {
        rows.push((
            "unserved",
            format!(
                "{} {} jobs waiting: no live worker runs backend {}",
                b.queue.pending, b.backend, b.backend
            ),
        ));
    }
    let running = c
        .active_agents
        .iter()
        .filter(|a| a.status == orch_shared::api::JobStatus::Running)
        .count();
    rows.push((
        "active",
        format!(
            "{} tasks · {} agents ({running} running)",
            c.active_tasks,
            c.active_agents.len()
        ),
    ));
    rows.push(("dead letters", c.dead_letters.to_string()));
    let today = &c.cost_today;
    rows.push((
        "cost today",
        format!(
            "{} · {} tokens · {} tasks{}",
            output::cost(today.cost_usd),
            output::count(today.usage.total()),
            today.tasks,
            if today.truncated {
                " (newest 50,000)"
            } else {
                ""
            }
        ),
    ));
    rows.push(("daily budget", daily_budget(today)));
}

/// `spent today $0.4200 of $5.0000 (8%) · $0.0300 reserved`, or what was spent without a budget.
fn daily_budget(today: &CostToday) -> String {
    let reserved = if today.reserved_usd > 0.0 {
        format!(" · {} reserved", output::cost(today.reserved_usd))
    } else {
        String::new()
    };
    match today.budget_usd {
        Some(budget) => format!(
            "spent today {} of {} ({:.0}%){reserved}",
            output::cost(today.spent_usd),
            output::cost(budget),
            if budget > 0.0 {
                100.0 * today.spent_usd / budget
            } else {
                0.0
            }
        ),
        None => format!(
            "no daily budget · spent today {}",
            output::cost(today.spent_usd)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::api::{Mode, TaskSummary};
    use orch_shared::ids::TaskId;
    use orch_shared::job::Usage;

    fn summary(status: TaskStatus) -> TaskSummary {
        TaskSummary {
            id: TaskId::new(),
            prompt: "p".into(),
            task_type: "auto".into(),
            mode: Mode::Sequential,
            status,
            roles: vec![],
            jobs_done: 0,
            usage: Usage::default(),
            cost_usd: 0.0,
            created_at_ms: 1,
            finished_at_ms: None,
            pr_url: None,
        }
    }

    #[test]
    fn daily_budget_reads_as_spend_of_budget() {
        let mut today = CostToday {
            spent_usd: 0.42,
            ..Default::default()
        };
        assert_eq!(
            daily_budget(&today),
            "no daily budget · spent today $0.4200"
        );
        today.budget_usd = Some(5.0);
        today.reserved_usd = 0.03;
        assert_eq!(
            daily_budget(&today),
            "spent today $0.4200 of $5.0000 (8%) · $0.0300 reserved"
        );
    }

    #[test]
    fn tasks_are_counted_by_status_with_zeros() {
        let list = TaskList {
            tasks: vec![
                summary(TaskStatus::Completed),
                summary(TaskStatus::Completed),
                summary(TaskStatus::Failed),
            ],
            next_cursor: None,
        };
        let c = count_tasks(&list);
        assert_eq!(c.sampled, 3);
        assert_eq!(c.by_status["completed"], 2);
        assert_eq!(c.by_status["failed"], 1);
        assert_eq!(c.by_status["running"], 0);
        assert_eq!(c.by_status["pending"], 0);
    }
}
