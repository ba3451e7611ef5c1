//! `orchctl agents diff AGENT_ID`: what an agent changed in its workspace, as a unified diff.

use crate::commands::{Ctx, failure};
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl agents diff 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c
  orchctl agents diff 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c | git apply   # replay it locally";

/// Show what an agent changed in its workspace (a unified diff)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Print the unified diff of what the agent changed in its workspace: for a git \
workspace (`submit --repo`), its commit against where it started; for a scratch directory, \
every file it created or changed. Diffs longer than 256 KiB are cut, with a last line saying \
so. Exits 1 when the agent does not exist or no diff was recorded (an agent that changed \
nothing, or a backend without a workspace).",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The agent's id (its job id)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let Some(detail) = super::show::fetch(ctx, &args.id).await? else {
        return Ok(failure());
    };
    let id = detail.job.id;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        crate::output::json(
            &mut out,
            &serde_json::json!({"agent_id": id, "diff": detail.job.diff, "git": detail.job.git}),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    match detail.job.diff.as_deref().filter(|d| !d.is_empty()) {
        Some(diff) => {
            out.write_all(diff.as_bytes())?;
            if !diff.ends_with('\n') {
                writeln!(out)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "agent {id} has no recorded changes ({})",
                detail.job.status.as_str()
            );
            Ok(failure())
        }
    }
}
