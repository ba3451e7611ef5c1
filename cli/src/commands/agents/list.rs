//! `orchctl agents list` (also `orchctl list-agents`): agents of recent tasks, newest task
//! first, filtered by role, status and task.

use crate::commands::Ctx;
use crate::output;
use crate::when;
use orch_shared::report::{AgentList, AgentSummary};
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl agents list                          # agents of recent tasks
  orchctl agents list --active                 # queued, running or waiting for a retry
  orchctl list-agents --role builder --status failed --since 1d
  orchctl agents list --task <TASK_ID> -o json | jq -r '.agents[].id'";

/// The statuses `--active` stands for.
const ACTIVE: &str = "pending,queued,running,retrying";

/// List agents (jobs) with their role, status, worker, tokens and cost
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List agents: every agent job of recent tasks, newest task first and in plan \
order within a task, filtered by role, status, task and creation time of their task. With \
--active (or only unfinished statuses) every unfinished agent is listed, however old its task.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// Only these roles (comma separated: analyst, planner, builder, tester, reviewer,
    /// documenter, custom, integrator)
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,

    /// Only these statuses (comma separated: pending, queued, running, succeeded, failed,
    /// skipped, retrying, cancelled)
    #[arg(long, value_name = "STATUS", conflicts_with = "active")]
    pub status: Option<String>,

    /// Only agents that have not finished (pending, queued, running, retrying)
    #[arg(long)]
    pub active: bool,

    /// Only the agents of this task
    #[arg(long, value_name = "TASK_ID")]
    pub task: Option<String>,

    /// Only agents of tasks created at or after this time (7d, 2025-01-31, ...)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// Only agents of tasks created before this time
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,

    /// How many agents per page
    #[arg(long, short = 'n', default_value_t = 50, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Show the page after this cursor
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,

    /// Print every page
    #[arg(long)]
    pub all: bool,
}

pub fn query(args: &Args, now_ms: u64) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut q = vec![("limit", args.limit.to_string())];
    if let Some(r) = &args.role {
        q.push(("role", r.clone()));
    }
    if args.active {
        q.push(("status", ACTIVE.to_string()));
    } else if let Some(s) = &args.status {
        q.push(("status", s.clone()));
    }
    if let Some(t) = &args.task {
        let id: orch_shared::ids::TaskId = t.parse().map_err(|e| anyhow::anyhow!("--task: {e}"))?;
        q.push(("task", id.to_string()));
    }
    if let Some(s) = &args.since {
        q.push(("since", when::parse_time("--since", s, now_ms)?.to_string()));
    }
    if let Some(s) = &args.until {
        q.push(("until", when::parse_time("--until", s, now_ms)?.to_string()));
    }
    Ok(q)
}

/// `running (attempt 2)`, `failed (timeout)`.
pub fn status_text(a: &AgentSummary) -> String {
    match &a.error {
        Some(e) if a.status == orch_shared::api::JobStatus::Failed => {
            format!("failed ({})", e.reason.as_str())
        }
        _ if a.attempt > 1 => format!("{} (attempt {})", a.status.as_str(), a.attempt),
        _ => a.status.as_str().to_string(),
    }
}

pub fn render(out: &mut dyn Write, agents: &[AgentSummary], now_ms: u64) -> std::io::Result<()> {
    if agents.is_empty() {
        return writeln!(out, "no agents");
    }
    let mut t = output::table([
        "AGENT", "ROLE", "STATUS", "WORKER", "STARTED", "DURATION", "TOKENS", "COST", "TASK",
    ]);
    for a in agents {
        let duration = a
            .started_at_ms
            .map(|s| a.finished_at_ms.unwrap_or(now_ms).saturating_sub(s));
        t.add_row(vec![
            a.id.to_string(),
            a.role.to_string(),
            status_text(a),
            a.worker_id
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string),
            a.started_at_ms
                .map_or_else(|| "-".to_string(), |s| output::age(now_ms, s)),
            duration.map_or_else(|| "-".to_string(), output::duration_ms),
            output::count(a.usage.total()),
            output::cost(a.cost_usd),
            format!(
                "{} {}",
                output::short_id(a.task_id),
                output::truncate(&a.task_prompt, 30)
            ),
        ]);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let now = orch_shared::now_ms();
    let base = query(&args, now)?;
    let client = ctx.client()?;
    let mut cursor = args.cursor.clone();
    let mut all: Vec<AgentSummary> = Vec::new();
    let mut out = std::io::stdout().lock();
    loop {
        let mut q = base.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = match client.agents(&q).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => {
                let _ = writeln!(std::io::stderr(), "{e}");
                return Ok(crate::commands::failure());
            }
            Err(e) => return Err(e.into()),
        };
        cursor = page.next_cursor.clone();
        if args.all {
            all.extend(page.agents);
        } else if ctx.json() {
            output::json(&mut out, &page)?;
        } else {
            render(&mut out, &page.agents, now)?;
        }
        if !args.all || cursor.is_none() {
            break;
        }
    }
    if args.all {
        if ctx.json() {
            output::json(
                &mut out,
                &AgentList {
                    agents: all,
                    next_cursor: None,
                },
            )?;
        } else {
            render(&mut out, &all, now)?;
        }
    } else if !ctx.json()
        && let Some(c) = &cursor
    {
        let _ = writeln!(
            std::io::stderr(),
            "more: repeat with --cursor {c} (or --all for every page)"
        );
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
