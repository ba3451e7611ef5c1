//! `orchctl agents ...`: list and inspect agents (an agent is one job of a task; its id is the
//! job id).

pub mod checkpoints;
pub mod diff;
pub mod list;
pub mod show;
pub mod turn;

use super::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    List(list::Args),
    Show(show::Args),
    Diff(diff::Args),
    Checkpoints(checkpoints::Args),
    Send(turn::SendArgs),
    Fork(turn::ForkArgs),
    Rewind(turn::RewindArgs),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(args) => list::run(ctx, args).await,
        Command::Show(args) => show::run(ctx, args).await,
        Command::Diff(args) => diff::run(ctx, args).await,
        Command::Checkpoints(args) => checkpoints::run(ctx, args).await,
        Command::Send(args) => turn::send(ctx, args).await,
        Command::Fork(args) => turn::fork(ctx, args).await,
        Command::Rewind(args) => turn::rewind(ctx, args).await,
    }
}
