//! `orchctl workers ...`: the registered workers.

pub mod list;

use super::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    List(list::Args),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(args) => list::run(ctx, args).await,
    }
}
