//! `orchctl kill AGENT_ID`: stop one agent (its job is cancelled and never redelivered).

use crate::commands::{Ctx, failure};
use crate::output;
use anyhow::Context as _;
use orch_shared::ids::JobId;
use std::io::Write;
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
    let task = match ctx.client()?.kill(id).await {
        Ok(task) => task,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "agent {id} not found");
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
