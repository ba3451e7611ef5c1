//! `orchctl tasks ...`: list and inspect tasks.

pub mod list;
pub mod show;

use super::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    List(list::Args),
    Show(show::Args),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(args) => list::run(ctx, args).await,
        Command::Show(args) => show::run(ctx, args).await,
    }
}
