//! `orchctl clean --older-than 7d`: deletes finished tasks created before a cutoff, with their
//! agents, their index entries and their messages in the event log and the results stream.

use crate::ask;
use crate::commands::Ctx;
use crate::output;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orch_shared::report::{CleanReport, CleanRequest};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  orchctl clean --older-than 7d --dry-run     # count what would go
  orchctl clean --older-than 30d --yes        # delete without asking
  orchctl clean --older-than 12h -o json";

/// Delete finished tasks older than a cutoff, with their agents and logs
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Delete the finished tasks (completed, failed, cancelled) created more than \
--older-than ago: their records, their agents, their history and agent index entries, their \
dead letters, and their messages in the event log (transcripts) and the results stream. \
Unfinished tasks are never deleted. Asks before deleting when run on a terminal, unless --yes \
or --dry-run.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// Age of the newest task to delete, e.g. 7d, 12h, 30m
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub older_than: Duration,

    /// Only count what would be deleted
    #[arg(long)]
    pub dry_run: bool,

    /// Do not ask for confirmation
    #[arg(long, short = 'y')]
    pub yes: bool,
}

fn add(total: &mut CleanReport, r: &CleanReport) {
    total.cutoff_ms = r.cutoff_ms;
    total.dry_run = r.dry_run;
    total.tasks += r.tasks;
    total.agents += r.agents;
    total.events_purged += r.events_purged;
    total.results_purged += r.results_purged;
    total.skipped_unfinished += r.skipped_unfinished;
}

/// Calls `POST /v1/clean` batch after batch until the window is done.
async fn clean_all(
    client: &crate::client::Client,
    older_than_ms: u64,
    dry_run: bool,
    bar: Option<&ProgressBar>,
) -> anyhow::Result<CleanReport> {
    let mut total = CleanReport::default();
    let mut after = None;
    loop {
        let r = client
            .clean(&CleanRequest {
                older_than_ms,
                dry_run,
                limit: None,
                after,
            })
            .await?;
        add(&mut total, &r);
        if let Some(bar) = bar {
            bar.set_message(format!("{} tasks, {} agents", total.tasks, total.agents));
        }
        match r.next {
            Some(next) => after = Some(next),
            None => return Ok(total),
        }
    }
}

pub fn render(out: &mut dyn Write, r: &CleanReport) -> std::io::Result<()> {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let rows = [
        ("cutoff", crate::when::iso(r.cutoff_ms)),
        ("tasks", format!("{} {verb}", output::count(r.tasks))),
        ("agents", format!("{} {verb}", output::count(r.agents))),
        ("events purged", output::count(r.events_purged)),
        ("results purged", output::count(r.results_purged)),
        ("unfinished (kept)", output::count(r.skipped_unfinished)),
    ];
    output::print_table(out, &output::details(&rows))
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let older_than_ms = args.older_than.as_millis() as u64;
    let client = ctx.client()?;
    if !args.dry_run && !args.yes && ask::interactive() {
        let count = clean_all(&client, older_than_ms, true, None).await?;
        if count.tasks == 0 {
            let _ = writeln!(std::io::stderr(), "nothing to clean");
            return Ok(ExitCode::SUCCESS);
        }
        let question = format!(
            "delete {} finished tasks ({} agents) and their logs?",
            count.tasks, count.agents
        );
        if !ask::confirm(&question)? {
            let _ = writeln!(std::io::stderr(), "nothing deleted");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} cleaning: {msg} · {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let report = clean_all(&client, older_than_ms, args.dry_run, bar.as_ref()).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &report)?;
    } else {
        render(&mut out, &report)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
