//! `orchctl approvals ...`: the "needs you" queue of agents waiting for a person to approve a
//! tool (list, approve, deny).

pub mod answer;
pub mod list;

use crate::commands::Ctx;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    List(list::Args),
    Approve(answer::Args),
    Deny(answer::DenyArgs),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::List(args) => list::run(ctx, args).await,
        Command::Approve(args) => answer::approve(ctx, args).await,
        Command::Deny(args) => answer::deny(ctx, args).await,
    }
}
