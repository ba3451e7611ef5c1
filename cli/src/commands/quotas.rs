//! `orchctl quotas`: the provider credentials of the workers' pools, their usage limits as
//! the limit broker knows them, and the jobs parked waiting for a reset.

use crate::commands::Ctx;
use crate::output;
use orch_shared::api::QuotaList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl quotas
  orchctl quotas -o json | jq '.credentials[] | select(.state == \"exhausted\")'";

/// Show each provider credential's limit state and the jobs parked on it
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show every credential of the workers' pools (by name: keys never leave a \
worker): whether it is at its usage limit and until when, the window figures the provider \
last reported, how often it ran out, and how many jobs are parked waiting for its reset.",
    after_long_help = EXAMPLES
)]
pub struct Args {}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn render(out: &mut dyn Write, list: &QuotaList) -> std::io::Result<()> {
    if list.credentials.is_empty() {
        writeln!(out, "no credentials registered")?;
    } else {
        let mut t = output::table([
            "BACKEND",
            "CREDENTIAL",
            "STATE",
            "RESETS IN",
            "REQUESTS LEFT",
            "TOKENS LEFT",
            "EXHAUSTED",
            "PARKED",
        ]);
        for q in &list.credentials {
            t.add_row(vec![
                q.backend.clone(),
                q.name.clone(),
                q.state.clone(),
                q.until_ms.map_or_else(
                    || "-".into(),
                    |u| output::duration_ms(u.saturating_sub(list.now_ms)),
                ),
                format!("{}/{}", opt(q.requests_remaining), opt(q.requests_limit)),
                format!("{}/{}", opt(q.tokens_remaining), opt(q.tokens_limit)),
                q.exhausted_total.to_string(),
                q.parked.to_string(),
            ]);
        }
        output::print_table(out, &t)?;
    }
    writeln!(out, "parked jobs: {}", list.parked)
}

pub async fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let list = client.quotas().await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else {
        render(&mut out, &list)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
