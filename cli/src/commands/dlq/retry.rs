//! `orchctl dlq retry JOB_ID`: give a dead-lettered job a fresh attempt.

use crate::commands::{Ctx, failure};
use crate::output;
use anyhow::Context as _;
use orch_shared::ids::JobId;
use std::io::Write;
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
    let task = match ctx.client()?.retry_dead(id).await {
        Ok(task) => task,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "job {id} is not in the dead-letter set");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &task)?;
    } else {
        output::task_brief(&mut out, &task)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
