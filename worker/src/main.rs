//! `orch-worker`: parses configuration, sets up logging and metrics, handles signals, and runs
//! [`orch_worker::run`]. SIGTERM or SIGINT starts a drain; the process exits 0 once drained.
//! The same binary is also the supervisor of the processes a job starts (hidden modes, see
//! [`orch_worker::agent::supervisor`]), checked first, before any thread exists.

use clap::CommandFactory;
use orch_worker::agent::{process, supervisor};
use orch_worker::config::{self, Args, LogFormat};
use orch_worker::sandbox;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    if let Some(code) = supervisor::hidden_mode() {
        return code;
    }
    let mut args = std::env::args_os().skip(1);
    if let Some(mode) = args.next()
        && let Some(code) = sandbox::bridge::hidden_mode(&mode, args)
    {
        return code;
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(worker()),
        Err(e) => {
            eprintln!("orch-worker: failed to start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn worker() -> ExitCode {
    // clap prints --help and flag errors itself (exit 2 for a bad flag); a bad setting from any
    // layer is one line on stderr and exit 2.
    let matches = Args::command().get_matches();
    let config = match config::load(&matches, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orch-worker: {e}");
            return ExitCode::from(2);
        }
    };
    // Held to the end of `main`: dropping it sends the spans still batched.
    let _telemetry = orch_config::telemetry::init(
        "orch-worker",
        config.log_format == LogFormat::Json,
        &config.telemetry,
    );
    match std::env::current_exe() {
        Ok(exe) => process::supervise_with(exe, orch_worker::datadir::records(&config.data_dir)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot find the worker executable; agents will not die with the worker")
        }
    }
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            orch_worker::metrics::describe();
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics disabled");
            None
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    // On a runtime worker thread, not in `block_on`: the main thread is no worker, so every
    // job it pulled would wake a worker thread to start it (a cross-thread hop per job).
    match tokio::spawn(orch_worker::run(config, metrics, shutdown)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            let why = orch_config::telemetry::error_chain(&e);
            tracing::error!(error = %why, "worker failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "worker panicked");
            ExitCode::FAILURE
        }
    }
}

async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutdown requested; draining");
    shutdown.cancel();
}
