//! `orchctl agents show ID` (also `orchctl agent-details ID`): one agent in full.

use crate::commands::{Ctx, failure};
use crate::output;
use anyhow::Context as _;
use orch_shared::ids::JobId;
use orch_shared::report::AgentDetail;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl agents show 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c
  orchctl agent-details 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c -o json | jq .tool_calls
  orchctl logs 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c      # its transcript";

/// Show one agent: role, model, worker, status, timings, tokens, cost, tools and files
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show one agent: its task, role, backend and model, the worker that ran it, \
its status and attempts, when it was queued, started and finished, its tokens by kind and cost, \
its tool calls (counted from its event log), the files it read and wrote, its session id (when \
the backend keeps one) and its output. Exits 1 when no agent has this id.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The agent's id (its job id, shown by `agents list` and `tasks show`)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
}

pub fn render(out: &mut dyn Write, d: &AgentDetail, now_ms: u64) -> std::io::Result<()> {
    let j = &d.job;
    let time = |t: Option<u64>| {
        t.map_or_else(
            || "-".to_string(),
            |t| format!("{} ({})", crate::when::iso(t), output::age(now_ms, t)),
        )
    };
    let mut status = j.status.as_str().to_string();
    if j.attempt > 1 {
        status.push_str(&format!(" (attempt {})", j.attempt));
    }
    let tools = if d.tools.is_empty() {
        "none".to_string()
    } else {
        d.tools
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let files = |f: &[String]| {
        if f.is_empty() {
            "none".to_string()
        } else {
            f.join(", ")
        }
    };
    let u = &j.usage;
    let mut rows = vec![
        ("agent", j.id.to_string()),
        ("name", j.role.agent_name()),
        ("role", j.role.to_string()),
        (
            "task",
            format!("{} ({})", d.task_id, output::truncate(&d.task_prompt, 60)),
        ),
        ("step", (j.step + 1).to_string()),
        ("status", status),
        ("backend", d.backend.as_str().to_string()),
        (
            "model",
            orch_shared::report::model_name(d.model.as_deref()).to_string(),
        ),
        (
            "worker",
            j.worker_id
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string),
        ),
        (
            "sandbox",
            j.sandbox.clone().unwrap_or_else(|| "none".into()),
        ),
        ("queued", time(j.queued_at_ms)),
        ("started", time(j.started_at_ms)),
        ("finished", time(j.finished_at_ms)),
        (
            "duration",
            output::job_duration_ms(j, now_ms).map_or_else(|| "-".into(), output::duration_ms),
        ),
        ("input tokens", output::count(u.input_tokens)),
        ("output tokens", output::count(u.output_tokens)),
        ("cache write tokens", output::count(u.cache_creation_tokens)),
        ("cache read tokens", output::count(u.cache_read_tokens)),
        ("cost", output::cost(j.cost_usd)),
        ("tool calls", format!("{} ({tools})", d.tool_calls)),
        ("files read", files(&j.files_read)),
        ("files written", files(&j.files_written)),
        (
            "session",
            d.session_id.clone().unwrap_or_else(|| "none".into()),
        ),
        (
            "log",
            if d.log_events == 0 {
                "no events (expired or cleaned)".to_string()
            } else {
                format!("{} events (`orchctl logs {}`)", d.log_events, j.id)
            },
        ),
    ];
    if let Some(from) = j.continues {
        let how = if j.forked { "forked from" } else { "continues" };
        rows.push((how, from.to_string()));
    }
    if let Some(g) = &j.git {
        let short = |c: &str| c.chars().take(10).collect::<String>();
        rows.push((
            "git",
            format!(
                "{} at {} (from {}){}",
                g.branch,
                short(&g.commit),
                short(&g.base),
                if g.merged {
                    ", merged into the task branch".to_string()
                } else if g.conflicts.is_empty() {
                    ", not merged into the task branch".to_string()
                } else {
                    format!(", not merged: conflicts in {}", g.conflicts.join(", "))
                }
            ),
        ));
    }
    if let Some(diff) = &j.diff {
        rows.push((
            "diff",
            format!(
                "{} line(s) (`orchctl agents diff {}`)",
                diff.lines().count(),
                j.id
            ),
        ));
    }
    if let Some(e) = &j.error {
        rows.push(("error", format!("{}: {}", e.reason.as_str(), e.message)));
    }
    output::print_table(out, &output::details(&rows))?;
    if let Some(text) = j.output.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        writeln!(out, "Output")?;
        writeln!(out, "──────")?;
        writeln!(out, "{text}")?;
    }
    Ok(())
}

/// The agent `id` names, or `None` (said on stderr) when there is none.
pub async fn fetch(ctx: &Ctx, id: &str) -> anyhow::Result<Option<AgentDetail>> {
    let id: JobId = id.parse().context("invalid agent id")?;
    match ctx.client()?.agent(id).await {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "agent {id} not found");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let Some(detail) = fetch(ctx, &args.id).await? else {
        return Ok(failure());
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &detail)?;
    } else {
        render(&mut out, &detail, orch_shared::now_ms())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
