//! `orchctl mcp`: the cluster's MCP server over stdio, for MCP clients that start a command
//! (`claude mcp add orch -- orchctl mcp`). Each JSON-RPC message read from stdin (one per
//! line) is posted to the coordinator's `/v1/mcp` with the configured server and token, and
//! its answer is written to stdout as one line; the tools are the coordinator's.

use crate::commands::Ctx;
use std::process::ExitCode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const EXAMPLES: &str = "\
Examples:
  claude mcp add orch -- orchctl mcp
  claude mcp add orch -- orchctl --server https://orch.example.com mcp";

/// Serve the cluster's MCP tools (submit, dry_run, status, list_tasks, cancel, agent_result, send) over stdio
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct Args {}

pub async fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<ExitCode> {
    let client = ctx.client()?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        // Notifications have no answer; an error reaching the coordinator ends the session
        // (the client sees the server exit and reports it).
        for answer in client.mcp(line).await? {
            stdout.write_all(answer.as_bytes()).await?;
            stdout.write_all(b"\n").await?;
            stdout.flush().await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
