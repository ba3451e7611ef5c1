//! The orchestrator coordinator: accepts tasks over HTTP, plans them into agent jobs, publishes
//! the jobs to JetStream, applies the results the workers send back, and keeps task state in
//! Redis.
//!
//! Layout:
//! - [`config`]: flags, environment and config file, checked into [`config::Config`].
//! - [`api`]: the HTTP API (axum), health, readiness and metrics endpoints.
//! - [`planner`]: templates, `auto` keyword roles, custom role lists.
//! - [`context`]: forward context cut from an agent's structured output.
//! - [`pipeline`]: the task state machine, free of IO.
//! - [`driver`]: lanes that apply results and job starts to tasks, in order per task.
//! - [`admission`]: the optional cluster-wide cap, priorities, rate limits and daily budget.
//! - [`transport`]: the only code that knows NATS subjects, streams and bytes.
//! - [`state`]: the only code that knows Redis keys.
//! - [`reconcile`]: rebuilds Redis from the JetStream log after a data loss.
//! - [`metrics`]: metric names and descriptions.
//! - [`history`]: history, agents and transcripts, cluster status and event stream, cost
//!   reports, exports and the clean-up of old tasks (HTTP).
//! - [`sampler`]: gauges sampled from JetStream and Redis, counters from job events, and this
//!   coordinator's entry in the coordinator registry.

pub mod admission;
pub mod api;
pub mod config;
pub mod context;
pub mod driver;
pub mod history;
pub mod metrics;
pub mod pipeline;
pub mod planner;
pub mod reconcile;
pub mod sampler;
pub mod state;
pub mod transport;

use backon::{ExponentialBuilder, Retryable};
use config::Config;
use driver::Driver;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use state::State;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to write {path}: {source}")]
    AddrFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("failed to resume unfinished tasks: {0}")]
    Resume(String),
    #[error("the {0} loop stopped unexpectedly")]
    LoopEnded(&'static str),
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(usize::MAX)
        .with_jitter()
}

/// Runs the coordinator until `shutdown` is cancelled or a critical part fails.
///
/// Startup order: NATS (topology), Redis, resume unfinished tasks, result lanes, consumers,
/// HTTP. Shutdown order: stop accepting HTTP, stop consumers, let lanes finish the message in
/// hand, flush NATS.
pub async fn run(
    config: Config,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(Error::Serve)?;

    let transport = Transport::connect(&config.nats_url).await?;
    let topology = || transport.ensure_topology(&config);
    let ready = topology
        .retry(retry_policy())
        .notify(|e, wait| tracing::warn!(error = %e, ?wait, "JetStream not ready, retrying"));
    tokio::select! {
        r = ready => r?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    let connect = || State::connect(&config.redis_url);
    let state = tokio::select! {
        r = connect.retry(retry_policy()).notify(|e, wait| tracing::warn!(error = %e, ?wait, "Redis not ready, retrying")) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    reconcile::run_if_needed(&state, &transport)
        .await
        .map_err(|e| Error::Resume(e.to_string()))?;

    let tracker = TaskTracker::new();
    let lanes_cancel = CancellationToken::new();
    let admission = admission::Admission::start(
        config.admission.clone(),
        state.clone(),
        transport.clone(),
        &tracker,
        lanes_cancel.clone(),
    );
    let driver = Driver::start(
        config.lanes,
        state.clone(),
        transport.clone(),
        admission.clone(),
        &tracker,
        lanes_cancel.clone(),
    );
    let effects = driver::Effects {
        state: state.clone(),
        transport: transport.clone(),
        driver: driver.clone(),
        admission,
    };
    resume(&effects).await?;

    let mut results = Box::pin(transport.results().await?);
    let results_driver = driver.clone();
    let results_cancel = shutdown.clone();
    let results_transport = transport.clone();
    let results_loop = tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = results_cancel.cancelled() => return Ok(()),
                next = results.next() => match next {
                    Some(delivery) => results_driver.result(delivery).await,
                    None => {
                        // The pull stream ended (NATS restarted, say): bind it again. Results
                        // wait in the durable consumer meanwhile; nothing is lost.
                        tracing::warn!("results stream ended; re-binding the consumer");
                        let rebind = || results_transport.results();
                        let again = rebind
                            .retry(retry_policy())
                            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "results consumer not ready, retrying"));
                        tokio::select! {
                            _ = results_cancel.cancelled() => return Ok(()),
                            s = again => results = Box::pin(s?),
                        }
                    }
                },
            }
        }
    });

    let mut started = Box::pin(transport.job_started().await?);
    let started_cancel = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = started_cancel.cancelled() => return,
                next = started.next() => match next {
                    Some(event) => driver.started(event).await,
                    None => return,
                },
            }
        }
    });

    if let Some(path) = &config.addr_file {
        std::fs::write(path, addr.to_string()).map_err(|source| Error::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(%addr, "coordinator listening");
    sampler::spawn(
        &tracker,
        state.clone(),
        transport.clone(),
        addr,
        shutdown.clone(),
    );

    let app = api::App {
        effects,
        state,
        transport: transport.clone(),
        tokens: Arc::new(config.tokens.clone()),
        metrics,
        shutdown: shutdown.clone(),
    };
    let server_cancel = shutdown.clone();
    let serve = axum::serve(listener, api::router(app))
        .with_graceful_shutdown(async move { server_cancel.cancelled().await });

    // The results loop is critical: if it ends, results would pile up unapplied.
    let outcome = tokio::select! {
        r = serve => r.map_err(Error::Serve),
        r = results_loop => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::LoopEnded("results")),
        },
    };
    shutdown.cancel();
    lanes_cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    transport.drain().await;
    tracing::info!("coordinator stopped");
    outcome
}

/// Publishes again the queued jobs of every unfinished task (a previous coordinator may have
/// stored them and died before publishing) and re-arms retry and deadline timers. Message ids
/// make this safe to repeat.
async fn resume(fx: &driver::Effects) -> Result<(), Error> {
    let ids = fx.state.active_tasks().await?;
    let mut republished = 0;
    for id in &ids {
        let Some(task) = fx.state.load_task(*id).await? else {
            continue;
        };
        for job in task
            .jobs
            .iter()
            .filter(|j| j.status == orch_shared::api::JobStatus::Running)
        {
            fx.admission.running(job.id);
        }
        let actions = pipeline::resume(&task);
        republished += actions
            .iter()
            .filter(|a| matches!(a, pipeline::Action::Publish(_)))
            .count();
        fx.perform(&task, actions)
            .await
            .map_err(|e| Error::Resume(e.to_string()))?;
    }
    if !ids.is_empty() {
        tracing::info!(
            tasks = ids.len(),
            jobs = republished,
            "resumed unfinished tasks"
        );
    }
    Ok(())
}
