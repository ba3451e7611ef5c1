//! `orchctl tasks list` (also `orchctl list-tasks`): the task history, newest first, with the
//! original dashboard's filters (status, text, dates, cost), sorting and pages.

use crate::commands::Ctx;
use crate::output;
use crate::when;
use orch_shared::api::TaskList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl tasks list
  orchctl tasks list --status failed,cancelled --since 7d
  orchctl tasks list --search parser --min-cost 0.01 --sort cost
  orchctl tasks list --since 2025-01-01 --until 2025-02-01 --all -o json
  orchctl tasks list --cursor <CURSOR>      # the next page, as printed under the table
  orchctl tasks list -o json | jq -r '.tasks[].id'";

/// List tasks, newest first, with filters
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List tasks, newest first (or sorted by cost, duration or tokens), filtered by \
status, prompt text, creation time and cost. When there are more, the command to get the next \
page is printed on stderr; --all prints every page.\n\nTimes are ages (7d, 2h30m), dates \
(2025-01-31, midnight UTC) or UTC times (2025-01-31T12:00:00Z). A listing sorted by anything but \
creation time reads at most the newest 10,000 tasks of the window and says so when there were \
more.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// How many tasks to show per page
    #[arg(long, short = 'n', default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Only these statuses (comma separated: pending, running, completed, failed, cancelled)
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,

    /// Only tasks whose prompt holds every word of this text (whole words, case-insensitive), or
    /// whose id starts with it. Words of 3 or more letters that are not common English words
    /// are looked up in the first 50 such words of each prompt; short and common words
    /// (the, and, with...) anywhere in it, and a search of only those reads the history a
    /// page at a time
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,

    /// Only tasks created at or after this time
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// Only tasks created before this time
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,

    /// Only tasks that cost at least this many dollars
    #[arg(long, value_name = "USD")]
    pub min_cost: Option<f64>,

    /// Only tasks that cost at most this many dollars
    #[arg(long, value_name = "USD")]
    pub max_cost: Option<f64>,

    /// Sort by
    #[arg(long, value_enum, default_value_t = SortBy::Created)]
    pub sort: SortBy,

    /// Smallest (or oldest) first
    #[arg(long)]
    pub asc: bool,

    /// Show the page after this cursor (the `next_cursor` of the previous page)
    #[arg(long, value_name = "CURSOR", alias = "before")]
    pub cursor: Option<String>,

    /// Print every page (with --output json: one document with every task)
    #[arg(long)]
    pub all: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Created,
    Cost,
    Duration,
    Tokens,
}

impl SortBy {
    fn as_str(&self) -> &'static str {
        match self {
            SortBy::Created => "created",
            SortBy::Cost => "cost",
            SortBy::Duration => "duration",
            SortBy::Tokens => "tokens",
        }
    }
}

/// The query string of `GET /v1/tasks` for these arguments.
pub fn query(args: &Args, now_ms: u64) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut q = vec![("limit", args.limit.to_string())];
    if let Some(s) = &args.status {
        q.push(("status", s.clone()));
    }
    if let Some(s) = &args.search {
        q.push(("search", s.clone()));
    }
    if let Some(s) = &args.since {
        q.push(("since", when::parse_time("--since", s, now_ms)?.to_string()));
    }
    if let Some(s) = &args.until {
        q.push(("until", when::parse_time("--until", s, now_ms)?.to_string()));
    }
    for (name, flag, v) in [
        ("min_cost", "--min-cost", args.min_cost),
        ("max_cost", "--max-cost", args.max_cost),
    ] {
        if let Some(v) = v {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "{flag}: must be a non-negative number of dollars"
            );
            q.push((name, v.to_string()));
        }
    }
    if args.sort != SortBy::Created {
        q.push(("sort", args.sort.as_str().to_string()));
    }
    if args.asc {
        q.push(("order", "asc".to_string()));
    }
    Ok(q)
}

pub fn render(out: &mut dyn Write, list: &TaskList, now_ms: u64) -> std::io::Result<()> {
    if list.tasks.is_empty() {
        return writeln!(out, "no tasks");
    }
    // The pull request column shows only when a listed task has one.
    let with_pr = list.tasks.iter().any(|t| t.pr_url.is_some());
    let mut header = vec![
        "ID", "STATUS", "TYPE", "MODE", "ROLES", "DONE", "COST", "DURATION", "CREATED", "PROMPT",
    ];
    if with_pr {
        header.push("PULL REQUEST");
    }
    let mut t = output::table(header);
    for task in &list.tasks {
        let duration = task
            .finished_at_ms
            .unwrap_or(now_ms)
            .saturating_sub(task.created_at_ms);
        let mut row = vec![
            task.id.to_string(),
            task.status.as_str().to_string(),
            task.task_type.clone(),
            task.mode.as_str().to_string(),
            output::roles(&task.roles),
            format!("{}/{}", task.jobs_done, task.roles.len()),
            output::cost(task.cost_usd),
            output::duration_ms(duration),
            output::age(now_ms, task.created_at_ms),
            output::truncate(&task.prompt, 40),
        ];
        if with_pr {
            row.push(task.pr_url.clone().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let now = orch_shared::now_ms();
    let base = query(&args, now)?;
    let client = ctx.client()?;
    let mut cursor = args.cursor.clone();
    let mut all = TaskList {
        tasks: vec![],
        next_cursor: None,
    };
    let mut out = std::io::stdout().lock();
    let mut first = true;
    loop {
        let mut q = base.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let (list, note) = client.search_tasks(&q).await?;
        if let Some(note) = note {
            let _ = writeln!(std::io::stderr(), "note: {note}");
        }
        cursor = list.next_cursor.clone();
        if ctx.json() {
            if args.all {
                all.tasks.extend(list.tasks);
            } else {
                output::json(&mut out, &list)?;
            }
        } else if !(args.all && !first && list.tasks.is_empty()) {
            render(&mut out, &list, now)?;
        }
        first = false;
        if !args.all || cursor.is_none() {
            break;
        }
    }
    if ctx.json() && args.all {
        output::json(&mut out, &all)?;
    } else if !ctx.json()
        && !args.all
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
