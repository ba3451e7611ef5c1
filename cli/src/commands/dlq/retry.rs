//! `orchctl dlq retry JOB_ID`: give a dead-lettered job a fresh attempt.

use crate::commands::{Ctx, print_task_or_missing};
use anyhow::Context as _;
use orch_shared::ids::JobId;
use std::process::ExitCode;

/// Retry a dead-lettered job; its task reopens and the steps after it run again
#[derive(Debug, clap::Args)]
#[command(after_long_help = "Examples:\n  orchctl dlq retry 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c")]
pub struct Args {
    /// The job's (agent's) id, as listed by `dlq list`
    #[arg(value_name = "JOB_ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: JobId = args.id.parse().context("invalid job id")?;
    let answer = ctx.client()?.retry_dead(id).await;
    print_task_or_missing(
        ctx,
        answer,
        format!("job {id} is not in the dead-letter set"),
    )
}
