//! The orchestrator coordinator: accepts tasks over HTTP, plans them into agent jobs, publishes
//! the jobs to JetStream, applies the results the workers send back, and keeps task state in
//! Redis.
//!
//! Layout:
//! - [`config`]: flags, environment and config file, checked into [`config::Config`].
//! - [`http`]: the HTTP API (axum): tasks, controls, dry runs, history and reports, auth,
//!   forwarding from standbys to the leader, health, readiness and metrics.
//! - [`web`]: the dashboard's pages, served beside the API.
//! - [`planner`]: templates, `auto` keyword roles, custom role lists.
//! - [`context`]: forward context cut from an agent's structured output.
//! - [`pipeline`]: the task state machine, free of IO.
//! - [`driver`]: lanes that apply results and job starts to tasks, in order per task.
//! - [`admission`]: the optional cluster-wide cap, priorities, rate limits and daily budget.
//! - [`forge`]: pull requests on GitHub (REST) for tasks submitted with `pr`, and the review
//!   loop that hands review comments back to the agents.
//! - [`transport`]: the only code that knows NATS subjects, streams and bytes.
//! - [`state`]: the only code that knows Redis keys.
//! - [`reconcile`]: rebuilds Redis from the JetStream log after a data loss.
//! - [`retention`]: deletes old finished tasks, on request and past `--history-retention`.
//! - [`catchup`]: records how far Redis has the log and replays past it when Redis is another
//!   server (a failover, a restart) or this replica starts leading.
//! - [`leader`]: the leader lease between coordinator replicas (only the leader dispatches).
//! - [`metrics`]: metric names and descriptions.
//! - [`meter`]: job counters, taken by the leader where it applies starts, results, retries.
//! - [`sampler`]: gauges sampled from JetStream and Redis, and this
//!   coordinator's entry in the coordinator registry.

pub mod admission;
pub mod catchup;
pub mod config;
pub mod conflicts;
pub mod context;
pub mod driver;
pub mod forge;
pub mod http;
pub mod leader;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod planner;
pub mod reconcile;
pub mod retention;
pub mod routing;
pub mod sampler;
pub mod state;
pub mod transport;
pub mod web;

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

/// How a new leader tries again what needs NATS (resuming unfinished tasks, catching Redis up
/// with the log): for about a minute, while NATS elects new stream leaders or the connection
/// moves off a server that dropped off the network.
pub(crate) fn while_nats_elects() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(12)
}

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
    #[error(transparent)]
    Leader(#[from] leader::Error),
    #[error("failed to resume unfinished tasks: {0}")]
    Resume(String),
    #[error("the {0} loop stopped unexpectedly: {1}")]
    LoopEnded(&'static str, String),
    #[error(transparent)]
    Forge(#[from] forge::Error),
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

    let transport = Transport::connect(&config.nats_url, &config.nats).await?;
    let jetstream = config.topology();
    let topology = || transport.ensure_topology(&jetstream);
    let ready = topology
        .retry(retry_policy())
        .notify(|e, wait| tracing::warn!(error = %e, ?wait, "JetStream not ready, retrying"));
    tokio::select! {
        r = ready => r?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    let connect = || State::connect(&config.redis);
    let state = tokio::select! {
        r = connect.retry(retry_policy()).when(state::Error::is_transient).notify(|e, wait| tracing::warn!(error = %e, ?wait, "Redis not ready, retrying")) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };

    let forge = match &config.forge {
        Some(f) => Some(forge::Handle::github(f.clone())?),
        None => None,
    };
    let tracker = TaskTracker::new();
    let lanes_cancel = CancellationToken::new();

    // Every replica serves the API; only the leader dispatches.
    let id = coordinator_id();
    let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(false);
    let nats = transport.clone();
    let campaign = tracker.spawn(leader::campaign(
        state.clone(),
        id.clone(),
        config.leader_lease,
        leader_tx,
        shutdown.clone(),
        move || nats.is_connected(),
    ));
    let effects_cell: Arc<std::sync::OnceLock<driver::Effects>> = Arc::default();

    if let Some(path) = &config.addr_file {
        std::fs::write(path, addr.to_string()).map_err(|source| Error::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(%addr, coordinator = %id, "coordinator listening");
    sampler::spawn(
        &tracker,
        state.clone(),
        transport.clone(),
        addr,
        shutdown.clone(),
    );
    let tokens = Arc::new(http::auth::Tokens::new(&config.tokens, &config.tenants));
    let app = http::App {
        effects: effects_cell.clone(),
        leader: leader_rx.clone(),
        state: state.clone(),
        transport: transport.clone(),
        tokens: tokens.clone(),
        metrics,
        shutdown: shutdown.clone(),
        forge: forge.clone(),
    };
    let router = http::router(app.clone(), web::routes(tokens));
    let forward_router = router.clone();
    let server_cancel = shutdown.clone();
    let serve = tracker.spawn(async move {
        // Nagle off: a response waits for no ACK of the previous one.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { server_cancel.cancelled().await })
            .await
    });
    tokio::pin!(serve, campaign);

    // A standby waits here until it holds the lease (or the server or campaign ends).
    tokio::select! {
        _ = leader_rx.wait_for(|l| *l) => {}
        r = &mut serve => return finish(&shutdown, &lanes_cancel, &tracker, &transport, flatten_serve(r)).await,
        r = &mut campaign => return finish(&shutdown, &lanes_cancel, &tracker, &transport, flatten_campaign(r)).await,
        _ = shutdown.cancelled() => return finish(&shutdown, &lanes_cancel, &tracker, &transport, Ok(())).await,
    }

    // A Redis an earlier build wrote keeps its unfinished tasks in a plain set: into the
    // sorted set before anything reads or writes them (the rebuild's catch-up included).
    let moved = state.migrate_active().await?;
    if moved > 0 {
        tracing::info!(
            tasks = moved,
            "moved the unfinished tasks to their sorted set"
        );
    }
    // Tried again for a while: a new leader may take over while NATS elects new stream
    // leaders or its connection moves off a server that dropped off the network.
    (|| reconcile::run_if_needed(&state, &transport))
        .retry(while_nats_elects())
        .notify(
            |e, wait| tracing::warn!(error = %e, ?wait, "could not resume unfinished tasks yet"),
        )
        .await
        .map_err(|e| Error::Resume(e.to_string()))?;
    let caught_up = catchup::on_leading(&state, &transport).await;
    tracker.spawn(catchup::run(
        state.clone(),
        transport.clone(),
        shutdown.clone(),
        caught_up,
    ));
    {
        // A history older than the cost rollups and the word index gets them once (reports
        // and searches read the records until then).
        let state = state.clone();
        tracker.spawn(async move {
            match state.backfill_indexes().await {
                Ok(0) => {}
                Ok(tasks) => tracing::info!(tasks, "rolled up the costs of the history and indexed its words"),
                Err(e) => tracing::warn!(error = %e, "could not index the history; cost reports and searches read the records"),
            }
        });
    }
    if let Some(retention) = config.history_retention {
        tracker.spawn(retention::run(
            state.clone(),
            transport.clone(),
            retention,
            shutdown.clone(),
        ));
    }
    if let Err(e) = state
        .set_daily_budget(config.admission.daily_budget_usd)
        .await
    {
        tracing::warn!(error = %e, "failed to record the daily budget for the status page");
    }
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
        config.events_max_age / 2,
        forge.clone(),
    );
    let effects = driver::Effects {
        state: state.clone(),
        transport: transport.clone(),
        driver: driver.clone(),
        admission,
        forge: forge.clone(),
        served: routing::Served::new(state.clone()),
    };
    // Safe to repeat (message ids); tried again while NATS settles, as the rebuild above.
    (|| resume(&effects))
        .retry(while_nats_elects())
        .notify(
            |e, wait| tracing::warn!(error = %e, ?wait, "could not resume unfinished tasks yet"),
        )
        .await?;
    if let Some(handle) = forge.clone() {
        tracker.spawn(forge::service::run_pending(
            effects.clone(),
            handle,
            shutdown.clone(),
        ));
    }
    let _ = effects_cell.set(effects);
    // Standbys forward the writes they receive: answer them.
    let forward_cancel = shutdown.clone();
    let forward_tracker = tracker.clone();
    tracker.spawn(async move {
        if let Err(e) =
            http::serve_forwarded(app, forward_router, forward_tracker, forward_cancel).await
        {
            tracing::error!(error = %e, "cannot answer writes forwarded by standbys");
        }
    });

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

    let paths_driver = driver.clone();
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

    // Workers' reports of the paths their agents changed (best effort, like job starts: each
    // report carries the whole set, so the next one makes a lost one good).
    let mut paths = Box::pin(transport.paths_reports().await?);
    let paths_cancel = shutdown.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = paths_cancel.cancelled() => return,
                next = paths.next() => match next {
                    Some(report) => paths_driver.paths(report).await,
                    None => return,
                },
            }
        }
    });

    // Critical parts: the server, the results loop (without it results pile up unapplied) and
    // the leader lease (without it another replica may dispatch too).
    let outcome = tokio::select! {
        r = &mut serve => flatten_serve(r),
        r = results_loop => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::LoopEnded("results", e.to_string())),
        },
        r = &mut campaign => flatten_campaign(r),
    };
    finish(&shutdown, &lanes_cancel, &tracker, &transport, outcome).await
}

fn flatten_serve(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(r) => r.map_err(Error::Serve),
        Err(e) => Err(Error::LoopEnded("HTTP server", e.to_string())),
    }
}

fn flatten_campaign(
    r: Result<Result<(), leader::Error>, tokio::task::JoinError>,
) -> Result<(), Error> {
    match r {
        Ok(r) => r.map_err(Error::Leader),
        Err(e) => Err(Error::LoopEnded("leader election", e.to_string())),
    }
}

/// A name for this coordinator replica: host, pid and a random suffix.
fn coordinator_id() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "coordinator".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xffff)
        .unwrap_or(0);
    format!("{host}-{}-{nonce:04x}", std::process::id())
}

/// Shutdown order: stop accepting HTTP and consuming, let lanes finish the message in hand,
/// release the lease, flush NATS.
async fn finish(
    shutdown: &CancellationToken,
    lanes_cancel: &CancellationToken,
    tracker: &TaskTracker,
    transport: &Transport,
    outcome: Result<(), Error>,
) -> Result<(), Error> {
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
    // Finished or deleted while an earlier build led (it kept the plain set): not active.
    let mut stale = Vec::new();
    for id in &ids {
        let Some(task) = fx.state.load_task(*id).await? else {
            stale.push(*id);
            continue;
        };
        if task.status.is_terminal() {
            stale.push(*id);
            continue;
        }
        // A parked job holds no place: admission takes it again when it wakes.
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
    fx.state.forget_active(&stale).await?;
    if !ids.is_empty() {
        tracing::info!(
            tasks = ids.len() - stale.len(),
            jobs = republished,
            "resumed unfinished tasks"
        );
    }
    Ok(())
}
