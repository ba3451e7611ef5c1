//! `orchctl logs AGENT_ID` / `orchctl logs --task TASK_ID`: agent transcripts from the
//! cluster's event log (text, tool calls with their inputs, tool results, usage, starts, ends
//! and retries), reachable from any machine and after the agent finished (the log is kept 7
//! days by default). `--follow` keeps reading as the agent works and reconnects with
//! `Last-Event-ID` if the connection drops.

use crate::client::Client;
use crate::commands::{Ctx, failure};
use crate::follow::{self, Message};
use crate::output;
use crate::when;
use anyhow::Context as _;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use orch_shared::event::{Event, EventId, EventKind, LogEnd};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::report::EventRow;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  orchctl logs 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c            # one agent's transcript
  orchctl logs 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c --follow   # as it happens
  orchctl logs --task 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b -f  # every agent of a task
  orchctl logs AGENT_ID -o json | jq -c 'select(.event.kind.type == \"tool_call\")'";

/// Reconnect attempts in a row before `--follow` gives up.
const MAX_RECONNECTS: u32 = 5;

/// Show an agent's transcript (or every agent's of a task), live with --follow
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show what an agent did: its text, tool calls with their inputs, tool results, \
token usage, start, end and retries, from the cluster's event log. Works from any machine and \
after the agent finished, for as long as the log is kept (7 days by default; `clean` removes \
it earlier). Each event is at most 1 MiB (the NATS payload limit); --max-chars shortens long \
text on screen.\n\nWith --task, the transcripts of every agent of the task, interleaved in \
order. With --follow, new events are shown as they happen until the agent (or task) ends.\n\n\
--output json prints one JSON object per line: {\"seq\": N, \"event\": {...}}. Exits 1 when the \
agent or task does not exist.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// The agent's id (its job id)
    #[arg(
        value_name = "AGENT_ID",
        required_unless_present = "task",
        conflicts_with = "task"
    )]
    pub id: Option<String>,

    /// Every agent of this task instead
    #[arg(long, value_name = "TASK_ID")]
    pub task: Option<String>,

    /// Keep reading new events until the agent (or task) ends
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// Cut text, tool inputs and tool results to this many characters on screen (0: no limit)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_chars: usize,

    /// Also show heartbeats (one per in-progress ack)
    #[arg(long)]
    pub heartbeats: bool,
}

/// Whether nothing more will come for one agent after this event (as the server decides).
fn ends_agent(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::JobFinished { success: true, .. }
            | EventKind::JobDeadLettered { .. }
            | EventKind::JobCancelled { .. }
            | EventKind::JobSkipped { .. }
            | EventKind::TaskFinished { .. }
    )
}

fn cut(s: &str, max: usize) -> String {
    if max == 0 || s.chars().count() <= max {
        return s.to_string();
    }
    let kept: String = s.chars().take(max).collect();
    format!("{kept}… [{} more characters]", s.chars().count() - max)
}

/// Indents every line after the first, so multi-line text stays under its event.
fn block(s: &str) -> String {
    s.trim_end().replace('\n', "\n    ")
}

/// One transcript line (possibly several for multi-line text), or `None` for events not shown.
pub fn line(event: &Event, max: usize, heartbeats: bool) -> Option<String> {
    let who = match event.job_id {
        Some(job) => format!("[{}]", output::short_id(job)),
        None => "[task]".to_string(),
    };
    let what = match &event.kind {
        EventKind::TaskCreated { mode, steps } => {
            format!("task created: {} step(s), {mode}", steps.len())
        }
        EventKind::JobQueued { role, step } => format!("{role} queued (step {})", step + 1),
        EventKind::JobStarted {
            worker_id,
            role,
            backend,
            model,
            delivery,
            ..
        } => {
            let mut s = format!(
                "{} started on {worker_id} ({backend}, {}), attempt {}",
                role.agent_name(),
                orch_shared::report::model_name(model.as_deref()),
                event.attempt
            );
            if *delivery > 1 {
                s.push_str(&format!(", delivery {delivery}"));
            }
            s
        }
        EventKind::Thinking => "thinking…".to_string(),
        EventKind::Text { text } => format!("text: {}", block(&cut(text, max))),
        EventKind::ToolCall {
            call_id,
            name,
            input,
        } => format!("tool call {name} ({call_id}): {}", block(&cut(input, max))),
        EventKind::ToolResult {
            call_id,
            output: out,
            is_error,
        } => format!(
            "tool result ({call_id}, {}): {}",
            if *is_error { "error" } else { "ok" },
            block(&cut(out, max))
        ),
        EventKind::Usage { usage, cost_usd } => format!(
            "usage: in {} · out {} · cache write {} · cache read {} · {}",
            output::count(usage.input_tokens),
            output::count(usage.output_tokens),
            output::count(usage.cache_creation_tokens),
            output::count(usage.cache_read_tokens),
            output::cost(*cost_usd)
        ),
        EventKind::Compacted {
            tokens_before,
            tokens_after,
            rounds,
        } => format!(
            "context compacted: {rounds} round(s) summarized, {} → {} tokens",
            output::count(*tokens_before),
            tokens_after.map_or("?".to_string(), output::count)
        ),
        EventKind::McpServer {
            server,
            error: Some(e),
            ..
        } => format!("MCP server {server} failed: {e}"),
        EventKind::McpServer {
            server,
            tools,
            withheld,
            error: None,
        } => format!(
            "MCP server {server} started: {tools} tool(s) offered, {withheld} withheld by the role"
        ),
        EventKind::SandboxRefused { target } => {
            format!("sandbox refused a connection to {target} (not an allowed host)")
        }
        EventKind::Heartbeat if heartbeats => "heartbeat".to_string(),
        EventKind::Heartbeat => return None,
        EventKind::Checkpointed {
            step,
            files_changed,
            usage,
            ..
        } => format!(
            "checkpoint after step {step}: {files_changed} file(s) changed, {} tokens so far",
            output::count(usage.total())
        ),
        EventKind::Resumed {
            from_step,
            from_worker,
            from_agent: Some(agent),
            ..
        } => format!(
            "rewound: started from the checkpoint after step {from_step} of agent {agent} (left by {from_worker})"
        ),
        EventKind::Resumed {
            from_attempt,
            from_step,
            from_worker,
            usage,
            cost_usd,
            from_agent: None,
            files_not_restored,
        } => {
            let mut line = format!(
                "resumed after step {from_step} of attempt {from_attempt} (left by {from_worker}, which had spent {} tokens, {})",
                output::count(usage.total()),
                output::cost(*cost_usd)
            );
            if let Some(why) = files_not_restored {
                line.push_str(&format!("; files not restored: {why}"));
            }
            line
        }
        EventKind::ResumeFailed { reason } => {
            format!("checkpoint not restored, starting over: {reason}")
        }
        EventKind::CheckpointSkipped {
            step,
            tree_bytes,
            bound_bytes,
        } => format!(
            "not checkpointed after step {step}: the workspace's tree takes {tree_bytes} bytes, over the bound of {bound_bytes} ([checkpoints] max_tree_bytes); a restart would start over"
        ),
        EventKind::PrOpened { .. }
        | EventKind::PrReady { .. }
        | EventKind::PrFailed { .. }
        | EventKind::PrReviewed { .. }
        | EventKind::PrEscalated { .. } => describe_pr(&event.kind),
        EventKind::ConflictWarning { .. } => describe_conflict(&event.kind),
        EventKind::JobFinished {
            success,
            reason,
            message,
            usage,
            cost_usd,
            duration_ms,
        } => {
            let outcome = if *success {
                "succeeded".to_string()
            } else {
                let reason = reason.map_or("failed", |r| r.as_str());
                match message.as_deref().filter(|m| !m.is_empty()) {
                    Some(m) => format!("failed ({reason}: {})", cut(m, max.max(200))),
                    None => format!("failed ({reason})"),
                }
            };
            format!(
                "finished: {outcome} in {} · {} tokens · {}",
                output::duration_ms(*duration_ms),
                output::count(usage.total()),
                output::cost(*cost_usd)
            )
        }
        EventKind::JobRetrying {
            reason,
            message,
            next_attempt,
            retry_at_ms,
        } => format!(
            "will retry (attempt {next_attempt}) in {} after {}: {message}",
            output::duration_ms(retry_at_ms.saturating_sub(event.at_ms)),
            reason.as_str()
        ),
        EventKind::JobCancelled { reason } => format!("cancelled: {reason}"),
        EventKind::JobSkipped { reason } => format!("skipped: {reason}"),
        EventKind::JobDeadLettered { reason } => {
            format!(
                "failed for good ({}); see `orchctl dlq list`",
                reason.as_str()
            )
        }
        EventKind::TaskFinished {
            status,
            cost_usd,
            duration_ms,
            ..
        } => format!(
            "task {status} in {} · {}",
            output::duration_ms(*duration_ms),
            output::cost(*cost_usd)
        ),
        other => other.name().replace('_', " "),
    };
    Some(format!("{} {who} {what}", when::clock(event.at_ms)))
}

enum Target {
    Agent(JobId),
    Task(TaskId),
}

impl Target {
    fn path(&self) -> String {
        match self {
            Target::Agent(id) => format!("/v1/agents/{id}/logs"),
            Target::Task(id) => format!("/v1/tasks/{id}/logs"),
        }
    }

    fn what(&self) -> String {
        match self {
            Target::Agent(id) => format!("agent {id}"),
            Target::Task(id) => format!("task {id}"),
        }
    }

    /// Whether this event ends what is followed (a task's end waits for its pull request's
    /// outcome when one follows; `end` keeps that across reconnects).
    fn ends_with(&self, event: &Event, end: &mut LogEnd) -> bool {
        match self {
            Target::Agent(_) => ends_agent(&event.kind),
            Target::Task(_) => end.ends(&event.kind),
        }
    }
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let target = match (&args.id, &args.task) {
        (Some(id), _) => Target::Agent(id.parse().context("invalid agent id")?),
        (None, Some(id)) => Target::Task(id.parse().context("invalid task id")?),
        (None, None) => anyhow::bail!("give an AGENT_ID or --task TASK_ID"),
    };
    let client = ctx.client()?;
    let mut out = std::io::stdout().lock();
    let mut last_seq: Option<EventId> = None;
    let mut end = LogEnd::default();
    let mut attempt = 0;
    loop {
        match read(
            &client,
            &target,
            &args,
            &mut last_seq,
            &mut end,
            ctx.json(),
            &mut out,
        )
        .await
        {
            Ok(Read::Ended) => break,
            Ok(Read::Dropped(reason)) if args.follow => {
                attempt += 1;
                anyhow::ensure!(
                    attempt <= MAX_RECONNECTS,
                    "lost the log of {} after {MAX_RECONNECTS} reconnect attempts ({reason})",
                    target.what()
                );
                let _ = writeln!(std::io::stderr(), "reconnecting ({reason})");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            Ok(Read::Dropped(_)) => break,
            Err(e) if e.is_not_found() => {
                let _ = writeln!(std::io::stderr(), "{} not found", target.what());
                return Ok(failure());
            }
            Err(e) if args.follow && e.is_transient() && attempt < MAX_RECONNECTS => {
                attempt += 1;
                let _ = writeln!(std::io::stderr(), "reconnecting ({e})");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

enum Read {
    /// The server ended the stream: all stored events were sent, or (following) the end came.
    Ended,
    /// The connection broke before the end of what is followed.
    Dropped(String),
}

async fn read(
    client: &Client,
    target: &Target,
    args: &Args,
    last_seq: &mut Option<EventId>,
    end: &mut LogEnd,
    json: bool,
    out: &mut dyn Write,
) -> Result<Read, crate::client::Error> {
    let query = if args.follow {
        vec![("follow", "true".to_string())]
    } else {
        vec![]
    };
    let resp = client.sse(&target.path(), &query, *last_seq).await?;
    let mut stream = resp.bytes_stream().eventsource();
    let mut ended = false;
    while let Some(item) = stream.next().await {
        let sse = match item {
            Ok(sse) => sse,
            Err(e) => return Ok(Read::Dropped(e.to_string())),
        };
        let Message::Event { seq, event } = follow::decode(&sse.id, &sse.data) else {
            continue;
        };
        if let Some(seq) = seq {
            if last_seq.is_some_and(|l| seq <= l) {
                continue;
            }
            *last_seq = Some(seq);
        }
        ended = target.ends_with(&event, end);
        let written = if json {
            let row = EventRow {
                seq: seq.map_or(0, |s| s.seq),
                index: seq.map_or(0, |s| s.index),
                event: *event,
            };
            serde_json::to_writer(&mut *out, &row)
                .map_err(std::io::Error::from)
                .and_then(|_| writeln!(out))
        } else {
            match line(&event, args.max_chars, args.heartbeats) {
                Some(l) => writeln!(out, "{l}"),
                None => Ok(()),
            }
        };
        if let Err(e) = written.and_then(|_| out.flush()) {
            // A closed pipe (`orchctl logs ID | head`) ends the command quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(Read::Ended);
            }
            return Ok(Read::Dropped(e.to_string()));
        }
    }
    if !args.follow || ended {
        Ok(Read::Ended)
    } else {
        Ok(Read::Dropped("the server closed the stream early".into()))
    }
}

/// One line for a pull request event (empty for any other kind).
pub(crate) fn describe_pr(kind: &EventKind) -> String {
    match kind {
        EventKind::PrOpened { number, url, draft } => {
            let draft = if *draft { " as a draft" } else { "" };
            format!("pull request #{number} open{draft}: {url}")
        }
        EventKind::PrReady { number } => {
            format!("the check passed: pull request #{number} is ready for review")
        }
        EventKind::PrFailed { reason } => format!("pull request not opened: {reason}"),
        EventKind::PrReviewed {
            round,
            head,
            comments,
            agents,
        } => {
            let agents: Vec<String> = agents.iter().map(ToString::to_string).collect();
            format!(
                "review round {round} of {}: {comments} comment(s) sent to agent(s) {}",
                &head[..head.len().min(12)],
                agents.join(", ")
            )
        }
        EventKind::PrEscalated { reason } => {
            format!("review loop stopped, a person is needed: {reason}")
        }
        _ => String::new(),
    }
}

/// A `conflict_warning` in one line: what the event's agent changed that another running
/// agent changed too, or that is in its declared scope.
pub(crate) fn describe_conflict(kind: &EventKind) -> String {
    let EventKind::ConflictWarning {
        other,
        other_role,
        kind,
        paths,
        ..
    } = kind
    else {
        return String::new();
    };
    let paths = output::truncate(&paths.join(", "), 200);
    match kind.as_str() {
        "same_file" => format!("conflict warning: {paths} also changed by {other_role} {other}"),
        _ => format!("conflict warning: changed {paths}, inside the scope of {other_role} {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::ids::WorkerId;
    use orch_shared::role::Role;

    fn ev(kind: EventKind) -> Event {
        Event {
            task_id: TaskId::from_u128(1),
            job_id: Some(JobId::from_u128(0xabcdef12)),
            attempt: 1,
            at_ms: 1_767_225_601_234,
            kind,
        }
    }

    #[test]
    fn transcript_lines_show_tools_text_and_usage() {
        let l = line(
            &ev(EventKind::ToolCall {
                call_id: "c1".into(),
                name: "Read".into(),
                input: "{\"file_path\":\"README.md\"}".into(),
            }),
            0,
            false,
        )
        .unwrap();
        assert_eq!(
            l,
            "00:00:01.234 [abcdef12] tool call Read (c1): {\"file_path\":\"README.md\"}"
        );
        let l = line(
            &ev(EventKind::Text {
                text: "a\nb".into(),
            }),
            0,
            false,
        )
        .unwrap();
        assert!(l.ends_with("text: a\n    b"), "{l}");
        let l = line(
            &ev(EventKind::Text {
                text: "abcdef".into(),
            }),
            3,
            false,
        )
        .unwrap();
        assert!(l.ends_with("text: abc… [3 more characters]"), "{l}");
        assert!(line(&ev(EventKind::Heartbeat), 0, false).is_none());
        let l = line(
            &ev(EventKind::JobStarted {
                worker_id: WorkerId("w1".into()),
                role: Role::Builder,
                backend: "sim".into(),
                model: None,
                delivery: 2,
                started_at_us: 0,
                sandbox: None,
            }),
            0,
            false,
        )
        .unwrap();
        assert!(
            l.ends_with("Builder Agent started on w1 (sim, default), attempt 1, delivery 2"),
            "{l}"
        );
    }

    #[test]
    fn an_agent_log_ends_with_its_last_event() {
        assert!(ends_agent(&EventKind::JobCancelled { reason: "x".into() }));
        assert!(!ends_agent(&EventKind::Thinking));
        assert!(!ends_agent(&EventKind::JobFinished {
            success: false,
            reason: None,
            message: None,
            usage: Default::default(),
            cost_usd: 0.0,
            duration_ms: 0,
        }));
    }
}
