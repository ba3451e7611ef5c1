//! `orchctl agents checkpoints AGENT_ID`: the checkpoints kept of an agent (step, time, files
//! changed, tokens so far), the points another worker resumes it from.

use crate::commands::{Ctx, failure};
use crate::output;
use anyhow::Context;
use orch_shared::ids::JobId;
use orch_shared::report::CheckpointList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl agents checkpoints 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c
  orchctl agents checkpoints 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c --output json | jq '.checkpoints[-1].commit'";

/// List an agent's checkpoints (step, time, files changed, tokens so far)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List the checkpoints kept of an agent, oldest first: after which step, when, \
on which worker, how many files differed from where it started, the tokens and cost it had \
spent, and the commit of its whole working tree (on refs/orch/checkpoints/AGENT_ID of the task's \
repository; for a scratch workspace, in a bundle in the cluster's sessions store). Only agents on \
git or scratch workspaces with the claude-code, anthropic or openai backend are checkpointed. \
`orchctl agents rewind AGENT_ID --to STEP` starts a new agent from one of them. Exits 1 when \
the agent does not exist.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The agent's id (its job id)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
}

pub fn render(out: &mut dyn Write, list: &CheckpointList, now_ms: u64) -> std::io::Result<()> {
    if list.checkpoints.is_empty() {
        return writeln!(out, "agent {} has no checkpoints", list.agent_id);
    }
    let mut t = output::table([
        "STEP", "AT", "ATTEMPT", "WORKER", "FILES", "TOKENS", "COST", "COMMIT",
    ]);
    for c in &list.checkpoints {
        t.add_row(vec![
            c.step.to_string(),
            output::age(now_ms, c.at_ms),
            c.attempt.to_string(),
            c.worker.clone(),
            c.files_changed.to_string(),
            output::count(c.usage.total()),
            output::cost(c.cost_usd),
            c.commit
                .as_deref()
                .map_or_else(|| "-".to_string(), |s| s.chars().take(12).collect()),
        ]);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let id: JobId = args.id.parse().context("invalid agent id")?;
    let list = match ctx.client()?.agent_checkpoints(id).await {
        Ok(l) => l,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "agent {id} not found");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else {
        render(&mut out, &list, orch_shared::now_ms())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
