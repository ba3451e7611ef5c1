//! `orchctl workers list`.

use crate::commands::Ctx;
use crate::output;
use orch_shared::api::WorkerList;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl workers list
  orchctl workers list -o json | jq '[.workers[].slots] | add'";

/// List the registered workers with their slots and load
#[derive(Debug, clap::Args)]
#[command(
    long_about = "List the workers registered with the coordinator: their slots (concurrent \
agent jobs), how many are busy, the backends whose jobs they pull (a job reaches only a worker \
that runs its backend), their version, uptime and last heartbeat.",
    after_long_help = EXAMPLES
)]
pub struct Args {}

pub fn render(out: &mut dyn Write, list: &WorkerList, now_ms: u64) -> std::io::Result<()> {
    if list.workers.is_empty() {
        return writeln!(out, "no workers");
    }
    let mut t = output::table([
        "ID",
        "HOST",
        "BUSY/SLOTS",
        "BACKENDS",
        "VERSION",
        "UP",
        "LAST SEEN",
    ]);
    for w in &list.workers {
        t.add_row(vec![
            w.id.to_string(),
            w.host.clone(),
            format!("{}/{}", w.busy, w.slots),
            if w.backends.is_empty() {
                // Older than routing by backend: it pulls the pre-routing queue only.
                "(pre-routing)".into()
            } else {
                w.backends.join(",")
            },
            w.version.clone(),
            output::duration_ms(now_ms.saturating_sub(w.started_at_ms)),
            output::age(now_ms, w.last_seen_ms),
        ]);
    }
    output::print_table(out, &t)
}

pub async fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let list = client.workers().await?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &list)?;
    } else {
        render(&mut out, &list, orch_shared::now_ms())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
