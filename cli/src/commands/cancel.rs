//! `orchctl cancel TASK_ID`: stop a task; running agents are stopped within a second.

use crate::commands::{Ctx, print_task_or_missing};
use anyhow::Context as _;
use orch_shared::ids::TaskId;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl cancel 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b";

/// Cancel a task: nothing more is dispatched and its running agents are stopped
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct Args {
    /// The task's id
    #[arg(value_name = "TASK_ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: TaskId = args.id.parse().context("invalid task id")?;
    let answer = ctx.client()?.cancel(id).await;
    print_task_or_missing(ctx, answer, format!("task {id} not found"))
}
