//! `orchctl dlq ...`: jobs that failed for good.

pub mod list;
pub mod retry;

use crate::commands::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    List(list::Args),
    Retry(retry::Args),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(args) => list::run(ctx, args).await,
        Command::Retry(args) => retry::run(ctx, args).await,
    }
}
