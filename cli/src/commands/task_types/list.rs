//! `orchctl task-types list`.

use crate::commands::Ctx;
use crate::output;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl task-types list
  orchctl submit \"fix the crash on empty input\" --task-type <NAME>";

/// List the task types and what each plans
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List the task types the coordinator can plan: pass a name to \
`orchctl submit --task-type`.",
    after_long_help = EXAMPLES
)]
pub struct Args {}

pub async fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let types = client.task_types().await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &types)?;
    } else {
        let mut t = output::table(["NAME", "DESCRIPTION"]);
        for tt in &types {
            t.add_row(vec![tt.name.clone(), tt.description.clone()]);
        }
        output::print_table(&mut out, &t)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
