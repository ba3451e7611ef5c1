//! `orchctl tasks list` (also `orchctl list-tasks`): recent tasks, newest first.

use crate::commands::Ctx;
use crate::output;
use orch_shared::api::TaskList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl tasks list
  orchctl tasks list --limit 50
  orchctl tasks list --before <CURSOR>       # the next page, as printed under the table
  orchctl tasks list -o json | jq -r '.tasks[].id'";

/// List recent tasks, newest first
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List recent tasks, newest first. When there are more, the command to get the \
next page is printed on stderr.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// How many tasks to show
    #[arg(long, short = 'n', default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Show tasks older than this cursor (the `next_cursor` of the previous page)
    #[arg(long, value_name = "CURSOR")]
    pub before: Option<String>,
}

pub fn render(out: &mut dyn Write, list: &TaskList, now_ms: u64) -> std::io::Result<()> {
    if list.tasks.is_empty() {
        return writeln!(out, "no tasks");
    }
    let mut t = output::table([
        "ID", "STATUS", "TYPE", "MODE", "ROLES", "DONE", "COST", "CREATED", "PROMPT",
    ]);
    for task in &list.tasks {
        t.add_row(vec![
            task.id.to_string(),
            task.status.as_str().to_string(),
            task.task_type.clone(),
            task.mode.as_str().to_string(),
            output::roles(&task.roles),
            format!("{}/{}", task.jobs_done, task.roles.len()),
            output::cost(task.cost_usd),
            output::age(now_ms, task.created_at_ms),
            output::truncate(&task.prompt, 40),
        ]);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let list = client
        .list_tasks(Some(args.limit), args.before.as_deref())
        .await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else {
        render(&mut out, &list, orch_shared::now_ms())?;
        if let Some(cursor) = &list.next_cursor {
            let _ = writeln!(
                std::io::stderr(),
                "more: orchctl tasks list --limit {} --before {cursor}",
                args.limit
            );
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
