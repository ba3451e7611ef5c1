//! `orchctl pr sync TASK_ID`: poll a task's pull request for review comments.

use crate::commands::{Ctx, failure};
use anyhow::Context as _;
use orch_shared::ids::TaskId;
use std::io::Write;
use std::process::ExitCode;

/// Sync a task's pull request: open it if the task completed without one, then send new
/// review comments to the agents that own the files they touch (as follow-up turns), or stop
/// the loop and ask a person. The same head is never reviewed twice.
#[derive(Debug, clap::Args)]
#[command(
    after_long_help = "Examples:\n  orchctl pr sync 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c\n  orchctl pr sync 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c --output json"
)]
pub struct Args {
    /// The task's id
    #[arg(value_name = "TASK_ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: TaskId = args.id.parse().context("invalid task id")?;
    let synced = match ctx.client()?.pr_sync(id).await {
        Ok(s) => s,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "task {id} not found");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        crate::output::json(&mut out, &synced)?;
    } else {
        writeln!(out, "{}", synced.outcome)?;
        if let Some(pr) = &synced.pr {
            writeln!(out, "pull request: {}", crate::output::pull_request(pr))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
