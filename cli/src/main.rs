//! `orchctl`, the command-line client of the orchestrator cluster.
//!
//! Layout:
//! - `main.rs`: parse the arguments, run the command, map its result to an exit status
//!   (0 ok, 1 not found or task failed, 2 error; a closed stdout pipe is a quiet success).
//! - [`commands`]: the clap command tree, one module per noun and one file per verb
//!   (`commands/tasks/list.rs`); only these handlers use `anyhow`.
//! - [`client`]: the typed HTTP client of the coordinator's `/v1` API ([`client::Error`]).
//! - [`config`]: server and token resolution (flags/env > config file > default).
//! - [`follow`]: the reconnecting server-sent-events follower of a task's event log.
//! - [`progress`]: the live progress panel of `submit --follow` (a pure state machine plus an
//!   indicatif view on stderr).
//! - [`output`]: tables (comfy-table), JSON and value formatting for stdout.
//! - [`when`]: times and ages as written on the command line (`--since 7d`), and back.
//! - [`ask`]: questions on the terminal (`init`, `clean`).
//!
//! Data goes to stdout, progress and errors to stderr.

mod ask;
mod client;
mod commands;
mod config;
mod follow;
mod output;
mod progress;
mod when;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&anyhow::Error::new(e).context("failed to start the runtime")),
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(err) => report(&err),
    }
}

/// Prints `err` as one `error: ...` line (its context chain joined with `: `) and picks the
/// exit status.
fn report(err: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(err) {
        // `orchctl tasks list | head`: the reader has what it wanted.
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(std::io::stderr(), "error: {err:#}");
    match client_error(err) {
        Some(e) if e.is_not_found() => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

fn client_error(err: &anyhow::Error) -> Option<&client::Error> {
    err.chain().find_map(|e| {
        e.downcast_ref::<client::Error>().or_else(|| {
            // `follow::Error::Client` is transparent, so the chain skips the client error.
            match e.downcast_ref::<follow::Error>() {
                Some(follow::Error::Client(c)) => Some(c),
                _ => None,
            }
        })
    })
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::error::{ApiError, ErrorCode};

    #[test]
    fn broken_pipes_are_recognized_through_context() {
        let err = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the table");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }

    #[test]
    fn not_found_api_errors_are_found_through_context() {
        let api = client::Error::Api {
            status: 404,
            error: ApiError::new(ErrorCode::NotFound, "task x not found"),
        };
        let err = anyhow::Error::new(api).context("failed to get the task");
        assert!(client_error(&err).is_some_and(|e| e.is_not_found()));

        let wrapped = anyhow::Error::new(follow::Error::Client(client::Error::Api {
            status: 404,
            error: ApiError::new(ErrorCode::NotFound, "gone"),
        }));
        assert!(client_error(&wrapped).is_some_and(|e| e.is_not_found()));
    }
}
