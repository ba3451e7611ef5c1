//! `orchctl approvals list`: requests waiting for a person, then recently answered ones.

use crate::commands::Ctx;
use crate::output;
use orch_shared::api::ApprovalList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl approvals list
  orchctl approvals list --all
  orchctl approvals list -o json | jq -r '.approvals[] | select(.state == \"pending\") | .id'";

/// List the agents' requests to use a tool that wait for a person
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct Args {
    /// Also show requests answered (or expired) in the last day
    #[arg(long)]
    pub all: bool,
}

fn cut(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max).collect();
    out.push('…');
    out
}

pub fn render(out: &mut dyn Write, list: &ApprovalList, all: bool) -> std::io::Result<()> {
    let shown: Vec<_> = list
        .approvals
        .iter()
        .filter(|a| all || a.state == "pending")
        .collect();
    if shown.is_empty() {
        return writeln!(
            out,
            "{}",
            if all {
                "no approval requests"
            } else {
                "no approval requests waiting"
            }
        );
    }
    let mut t = output::table(["ID", "STATE", "TOOL", "WHAT", "ROLE", "AGENT", "DEADLINE"]);
    for a in shown {
        let deadline = if a.state == "pending" {
            format!(
                "in {}",
                output::duration_ms(a.deadline_ms.saturating_sub(list.now_ms))
            )
        } else {
            a.by.clone().unwrap_or_else(|| "-".into())
        };
        t.add_row(vec![
            a.id.clone(),
            a.state.clone(),
            a.tool.clone(),
            cut(&a.summary, 60),
            a.role.clone(),
            a.job_id.clone(),
            deadline,
        ]);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let list = ctx.client()?.approvals().await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else {
        render(&mut out, &list, args.all)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
