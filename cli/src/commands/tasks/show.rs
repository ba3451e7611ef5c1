//! `orchctl tasks show ID`: one task in full.

use crate::commands::{Ctx, failure};
use crate::output;
use anyhow::Context as _;
use orch_shared::ids::TaskId;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl tasks show 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b
  orchctl tasks show 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b -o json | jq -r .output";

/// Show one task: its plan, each agent's job, the result and the metrics
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show one task: its details, the result (the agents' output), the metrics and \
one row per agent job. Exits 1 when no task has this id.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The task's id (a UUID, as printed by `submit` and `tasks list`)
    #[arg(value_name = "ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: TaskId = args.id.parse().context("invalid task id")?;
    let client = ctx.client()?;
    let task = match client.task(id).await {
        Ok(task) => task,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "task {id} not found");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &task)?;
    } else {
        let now = orch_shared::now_ms();
        output::task_details(&mut out, &task, now)?;
        writeln!(out)?;
        output::task_result(&mut out, &task)?;
        output::task_metrics(&mut out, &task, now)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
