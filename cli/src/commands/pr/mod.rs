//! `orchctl pr ...`: a task's pull request.

pub mod sync;

use crate::commands::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Sync(sync::Args),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Sync(args) => sync::run(ctx, args).await,
    }
}
