//! `orchctl status`: readiness, workers and recent tasks at a glance.

use super::{Ctx, failure};
use crate::client::Client;
use crate::output;
use orch_shared::api::{Readiness, TaskList, TaskStatus, WorkerList};
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

/// Show the cluster's readiness, workers and recent tasks
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show the coordinator's readiness (NATS, Redis), a summary of the registered \
workers and how many of the last 100 tasks are in each status.\n\nExits 0 when the coordinator is \
ready and 1 when it answers but is not ready.",
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

    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(
            &mut out,
            &StatusJson {
                server: client.server(),
                readiness: &readiness,
                workers: workers.as_ref(),
                tasks,
            },
        )?;
    } else {
        let ok = |b: bool| if b { "ok" } else { "down" };
        let mut rows = vec![
            ("server", client.server().to_string()),
            (
                "ready",
                format!(
                    "{} (nats {}, redis {})",
                    if readiness.ready { "yes" } else { "no" },
                    ok(readiness.nats),
                    ok(readiness.redis)
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
        output::print_table(&mut out, &output::details(&rows))?;
    }
    out.flush()?;
    Ok(if readiness.ready {
        ExitCode::SUCCESS
    } else {
        failure()
    })
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
        }
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
