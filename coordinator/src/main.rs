//! `orch-coordinator`: parses configuration, sets up logging and metrics, handles signals, and
//! runs [`orch_coordinator::run`].

use clap::CommandFactory;
use orch_coordinator::config::{self, Args, LogFormat};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    // clap prints --help and flag errors itself (exit 2 for a bad flag); a bad setting from any
    // layer is one line on stderr and exit 2.
    let matches = Args::command().get_matches();
    let config = match config::load(&matches, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orch-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    // Held to the end of `main`: dropping it sends the spans still batched.
    let _telemetry = orch_config::telemetry::init(
        "orch-coordinator",
        config.log_format == LogFormat::Json,
        &config.telemetry,
    );
    let metrics = match orch_coordinator::metrics::install() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics disabled");
            None
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    // Every way out says why: the error with its causes, or the shutdown that was asked for
    // (a panic is logged by the telemetry's panic hook; only SIGKILL leaves no line).
    match orch_coordinator::run(config, metrics, shutdown).await {
        Ok(()) => {
            tracing::info!(code = 0, "coordinator exits: shutdown requested");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let why = orch_config::telemetry::error_chain(&e);
            tracing::error!(code = 1, error = %why, "coordinator exits: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!(
            "cannot handle SIGTERM, SIGINT and SIGHUP: they will stop the coordinator at once"
        );
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
    };
    tracing::info!(signal = name, "shutdown requested");
    shutdown.cancel();
}
