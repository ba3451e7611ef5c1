//! `orchctl kill AGENT_ID`: stop one agent (its job is cancelled and never redelivered).

use crate::commands::{Ctx, print_task_or_missing};
use anyhow::Context as _;
use orch_shared::ids::JobId;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl tasks show TASK_ID          # the AGENT column lists agent ids
  orchctl kill 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c";

/// Kill one running agent; steps that depend on it follow the task's failure policy
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct Args {
    /// The agent's id (its job id, shown by `tasks show`)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: JobId = args.id.parse().context("invalid agent id")?;
    let answer = ctx.client()?.kill(id).await;
    print_task_or_missing(ctx, answer, format!("agent {id} not found"))
}
