//! `orchctl agents send AGENT_ID MESSAGE`, `orchctl agents fork AGENT_ID MESSAGE` and
//! `orchctl agents rewind AGENT_ID --to STEP [MESSAGE]`: the next turn of an agent's
//! conversation, a new agent with the same history, or a new agent from one of its
//! checkpoints. Each runs on whichever worker pulls it: the session is stored in the cluster
//! after each turn, the checkpoints after each step.

use crate::commands::{Ctx, failure, logs};
use anyhow::Context as _;
use orch_shared::api::{AgentMessage, AgentRewind, JobStatus};
use orch_shared::ids::JobId;
use std::io::{Read, Write};
use std::process::ExitCode;

const SEND_EXAMPLES: &str = "\
Examples:
  orchctl agents send 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c \"now add tests for the edge cases\" -f
  echo \"explain the failing test\" | orchctl agents send 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c -";

const REWIND_EXAMPLES: &str = "\
Examples:
  orchctl agents checkpoints 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c
  orchctl agents rewind 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c --to 3
  orchctl agents rewind 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c --to 3 \"do not touch the schema\" -f";

const FORK_EXAMPLES: &str = "\
Examples:
  orchctl agents fork 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c \"try it with a state machine instead\"
  orchctl agents fork 0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c \"try it with a lookup table\"";

/// Send the agent a message: its conversation continues (on any worker) as a new agent
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Continue an agent's conversation: MESSAGE becomes its next user message. The \
turn runs as a new agent of the same task (its id is printed), on whichever worker pulls it: \
the worker restores the session the cluster stored after the previous turn (the Claude Code \
transcript, or an API backend's message history). Sending to an agent that was continued \
already continues its latest turn. Refused (exit 1) while that turn is still running, and for \
agents without a stored session (the command backend keeps none). With --follow, shows the new \
turn's transcript until it ends and exits 1 if it failed.",
    after_long_help = SEND_EXAMPLES
)]
pub struct SendArgs {
    /// The agent's id (its job id, shown by `tasks show` and `agents list`)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
    /// The message (`-` reads it from stdin)
    #[arg(value_name = "MESSAGE")]
    pub message: String,
    /// Show the new turn's transcript until it ends
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// Fork an agent: a new agent with the same history takes MESSAGE as its next turn
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Fork an agent: a new agent of the same task starts from a copy of the \
agent's conversation and takes MESSAGE as its next turn; the original can still be continued \
or forked again (e.g. to try two approaches side by side). Refused (exit 1) unless the agent \
finished its turn successfully and has a stored session. With --follow, shows the fork's \
transcript until it ends and exits 1 if it failed.",
    after_long_help = FORK_EXAMPLES
)]
pub struct ForkArgs {
    /// The agent's id (its job id)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
    /// The fork's first message (`-` reads it from stdin)
    #[arg(value_name = "MESSAGE")]
    pub message: String,
    /// Show the fork's transcript until it ends
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// Rewind an agent: a new agent starts from one of its checkpoints (conversation and files)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Rewind an agent: a new agent of the same task starts from the agent's \
checkpoint after step STEP (see `orchctl agents checkpoints`): its conversation as it was then \
and its whole working tree (tracked and untracked files), restored on whichever worker pulls \
it. MESSAGE (default: a note that it was rewound) is its next user message. An agent still \
running is stopped first (what depends on it is skipped, as for a kill). Refused (exit 1) for \
an unknown agent or a step with no kept checkpoint. With --follow, shows the new agent's \
transcript until it ends and exits 1 if it failed.",
    after_long_help = REWIND_EXAMPLES
)]
pub struct RewindArgs {
    /// The agent's id (its job id)
    #[arg(value_name = "AGENT_ID")]
    pub id: String,
    /// The step whose checkpoint the new agent starts from
    #[arg(long, value_name = "STEP", value_parser = clap::value_parser!(u32).range(1..))]
    pub to: u32,
    /// The new agent's next message (`-` reads it from stdin)
    #[arg(value_name = "MESSAGE")]
    pub message: Option<String>,
    /// Show the new agent's transcript until it ends
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// What kind of new turn.
#[derive(Clone, Copy)]
enum Verb {
    Send,
    Fork,
    Rewind(u32),
}

pub async fn send(ctx: &Ctx, args: SendArgs) -> anyhow::Result<ExitCode> {
    run(ctx, &args.id, Some(&args.message), args.follow, Verb::Send).await
}

pub async fn fork(ctx: &Ctx, args: ForkArgs) -> anyhow::Result<ExitCode> {
    run(ctx, &args.id, Some(&args.message), args.follow, Verb::Fork).await
}

pub async fn rewind(ctx: &Ctx, args: RewindArgs) -> anyhow::Result<ExitCode> {
    let verb = Verb::Rewind(args.to);
    run(ctx, &args.id, args.message.as_deref(), args.follow, verb).await
}

async fn run(
    ctx: &Ctx,
    id: &str,
    message: Option<&str>,
    follow: bool,
    verb: Verb,
) -> anyhow::Result<ExitCode> {
    let id: JobId = id.parse().context("invalid agent id")?;
    let message = match message {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("failed to read the message from stdin")?;
            Some(s)
        }
        other => other.map(str::to_string),
    };
    if message.as_deref().is_some_and(|m| m.trim().is_empty()) {
        anyhow::bail!("invalid MESSAGE: must not be empty");
    }
    let client = ctx.client()?;
    let asked = match (verb, message) {
        (Verb::Rewind(to), message) => client.agent_rewind(id, &AgentRewind { to, message }).await,
        (Verb::Send | Verb::Fork, message) => {
            let message = message.unwrap_or_default();
            let fork = matches!(verb, Verb::Fork);
            client.agent_turn(id, &AgentMessage { message }, fork).await
        }
    };
    let turn = match asked {
        Ok(turn) => turn,
        Err(e) if e.is_not_found() || e.is_conflict() => {
            let _ = writeln!(std::io::stderr(), "{e}");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        crate::output::json(&mut out, &turn)?;
    } else {
        let what = match verb {
            Verb::Send => "next turn of".to_string(),
            Verb::Fork => "fork of".to_string(),
            Verb::Rewind(step) => format!("rewind to step {step} of"),
        };
        writeln!(
            out,
            "agent {} ({what} {}) queued in task {}",
            turn.agent_id, turn.from, turn.task_id
        )?;
    }
    out.flush()?;
    drop(out);
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let code = logs::run(
        ctx,
        logs::Args {
            id: Some(turn.agent_id.to_string()),
            task: None,
            follow: true,
            max_chars: 0,
            heartbeats: false,
        },
    )
    .await?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    // The transcript ends when the worker reports; the coordinator records the result a
    // moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = client.agent(turn.agent_id).await?.job.status;
        if status.is_terminal() || std::time::Instant::now() >= deadline {
            return Ok(if status == JobStatus::Succeeded {
                ExitCode::SUCCESS
            } else {
                failure()
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
