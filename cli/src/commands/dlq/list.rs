//! `orchctl dlq list`: the dead-letter set, newest first.

use crate::commands::Ctx;
use crate::output;
use std::io::Write;
use std::process::ExitCode;

/// List jobs that failed for good (after their last attempt)
#[derive(Debug, clap::Args)]
#[command(
    after_long_help = "Examples:\n  orchctl dlq list\n  orchctl dlq list -o json | jq -r '.jobs[].job_id'"
)]
pub struct Args {
    /// Most entries to show
    #[arg(long, short = 'n', value_name = "N")]
    pub limit: Option<u32>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let list = ctx.client()?.dead_letters(args.limit).await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else if list.jobs.is_empty() {
        writeln!(out, "no dead letters")?;
    } else {
        let now = orch_shared::now_ms();
        let mut t = output::table(["AGENT", "TASK", "ROLE", "ATTEMPT", "REASON", "WHEN"]);
        for j in &list.jobs {
            let reason = j
                .error
                .as_ref()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.reason.as_str(),
                        output::truncate(&e.message, 60)
                    )
                })
                .unwrap_or_else(|| "-".into());
            t.add_row(vec![
                j.job_id.to_string(),
                j.task_id.to_string(),
                j.role.to_string(),
                j.attempt.to_string(),
                reason,
                output::age(now, j.dead_at_ms),
            ]);
        }
        output::print_table(&mut out, &t)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
