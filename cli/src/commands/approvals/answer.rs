//! `orchctl approvals approve|deny ID`: answer a request (once: a second answer is refused).

use crate::commands::{Ctx, failure};
use orch_shared::api::{AnswerApproval, Approval};
use std::io::Write;
use std::process::ExitCode;

/// Approve a request: the agent uses the tool
#[derive(Debug, clap::Args)]
#[command(after_long_help = "Examples:
  orchctl approvals approve 5f1c2a9e0b7d4c31
  orchctl approvals approve 5f1c2a9e0b7d4c31 --for task
  orchctl approvals approve 5f1c2a9e0b7d4c31 --always 'npm install*'")]
pub struct Args {
    /// The request's id, as listed by `approvals list`
    #[arg(value_name = "ID")]
    pub id: String,
    /// Also allow the same tool and input for the rest of the request's task (`task`)
    #[arg(long = "for", value_name = "SCOPE", value_parser = ["task"], conflicts_with = "always")]
    pub for_scope: Option<String>,
    /// Also allow the tool, whenever its command, path or URL matches PATTERN (`*` matches
    /// anything), for every task of your tenant
    #[arg(long, value_name = "PATTERN")]
    pub always: Option<String>,
    /// What the agent is told
    #[arg(long, short = 'm', value_name = "TEXT")]
    pub message: Option<String>,
}

/// Deny a request: the agent is told it may not use the tool (and your message)
#[derive(Debug, clap::Args)]
#[command(after_long_help = "Examples:
  orchctl approvals deny 5f1c2a9e0b7d4c31 --message 'use the vendored copy instead'")]
pub struct DenyArgs {
    /// The request's id, as listed by `approvals list`
    #[arg(value_name = "ID")]
    pub id: String,
    /// What the agent is told (why, or what to do instead)
    #[arg(long, short = 'm', value_name = "TEXT")]
    pub message: Option<String>,
}

pub async fn approve(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let (scope, pattern) = match (&args.for_scope, &args.always) {
        (Some(_), _) => (Some("task".to_string()), None),
        (None, Some(p)) => (Some("always".to_string()), Some(p.clone())),
        (None, None) => (None, None),
    };
    let body = AnswerApproval {
        decision: "approve".into(),
        message: args.message,
        scope,
        pattern,
    };
    send(ctx, &args.id, &body).await
}

pub async fn deny(ctx: &Ctx, args: DenyArgs) -> anyhow::Result<ExitCode> {
    let body = AnswerApproval {
        decision: "deny".into(),
        message: args.message,
        scope: None,
        pattern: None,
    };
    send(ctx, &args.id, &body).await
}

async fn send(ctx: &Ctx, id: &str, body: &AnswerApproval) -> anyhow::Result<ExitCode> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        anyhow::bail!("invalid request id `{id}`: expected the id `approvals list` shows");
    }
    let answered: Approval = match ctx.client()?.answer_approval(id, body).await {
        Ok(a) => a,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "approval request {id} not found");
            return Ok(failure());
        }
        Err(e) if e.is_conflict() => {
            let _ = writeln!(std::io::stderr(), "{e}");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        crate::output::json(&mut out, &answered)?;
    } else {
        write!(
            out,
            "{} {}: {} ({})",
            answered.id, answered.state, answered.tool, answered.summary
        )?;
        if let Some(g) = &answered.grant {
            write!(out, "; granted {g}")?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
