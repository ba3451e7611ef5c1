//! The orchestrator worker: pulls agent jobs from JetStream, one per free slot, runs each agent,
//! streams its events, keeps the job alive with in-progress acks, publishes the result and acks.
//! It keeps no state another worker could not rebuild: a job it drops is redelivered.
//!
//! Layout:
//! - [`config`]: flags, environment and config file.
//! - [`transport`]: the only code that knows NATS subjects and bytes.
//! - [`state`]: the only code that knows Redis keys (registry, done markers).
//! - [`roles`]: what each role is told and which tools it may use.
//! - [`agent`]: the agent backends behind one trait (sim, claude-code, anthropic, openai,
//!   command), each given an [`agent::Prepared`] by the dispatcher
//!   [`agent::backends::Backends`]; the chat backends share the tool loop [`agent::tool_loop`] with
//!   its native [`agent::tools`] and [`agent::chat`], the Claude Code
//!   backend is a folder (`claude_code/{mod,stream,transcript}.rs`); workspaces, git,
//!   processes and prices beside them.
//! - [`runner`]: one job from pull to ack.
//! - [`limits`]: the limit broker over credential pools (shared through Redis) and the parked
//!   jobs waiting for a credential's reset, re-published by every worker's waker.
//! - [`session`]: agents' sessions in the cluster (JetStream object store and Redis pointers),
//!   so any worker can run the next turn of a conversation.
//! - [`custody`]: checkpoints of running agents (workspace, conversation, fenced pointer),
//!   so a redelivered or handed-back attempt resumes on any worker.
//! - [`datadir`]: the data directory, locked for one live worker and cleared of what a
//!   previous worker left at start.
//! - [`metrics`]: metric names.
//! - [`sandbox`]: the bubblewrap sandbox every agent process runs in, the proxy that is its
//!   only way out (and holds the model credential), the per-job cgroups.

pub mod agent;
pub mod approvals;
pub mod config;
pub mod custody;
pub mod datadir;
pub mod limits;
pub mod metrics;
pub mod paths;
pub mod ref_cleanup;
pub mod roles;
pub mod runner;
pub mod sandbox;
pub mod session;
pub mod state;
pub mod transport;

use axum::routing::get;
use backon::{ExponentialBuilder, Retryable};
use config::Config;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use orch_shared::ids::WorkerId;
use runner::Runner;
use state::{State, WorkerInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transport::{Pulled, Transport};

/// How long one pull request waits for jobs before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How often the registry entry is refreshed.
const REGISTRY_REFRESH: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Session(#[from] session::Error),
    #[error(transparent)]
    DataDir(#[from] datadir::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("failed to serve the permission-prompt server on a loopback port: {0}")]
    Approvals(std::io::Error),
    #[error("failed to listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

fn retry_forever() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(usize::MAX)
        .with_jitter()
}

/// Runs the worker until `shutdown`, then drains: no new pulls, in-flight jobs get
/// `drain_grace` to finish, the rest are handed back; the worker deregisters and returns.
pub async fn run(
    config: Config,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let id = WorkerId(config.id.clone());
    // Held until the worker returns; the kernel drops it when the process dies.
    let _data_dir = datadir::claim(&config.data_dir)?;
    let background = TaskTracker::new();
    let bg_cancel = CancellationToken::new();
    // Before anything else: a worker that cannot sandbox its agents refuses to start.
    let sandbox = sandbox::Sandbox::start(
        &config.sandbox,
        &config.data_dir,
        sandbox::proxy::Upstream {
            base_url: config
                .backends
                .anthropic
                .base_url
                .clone()
                .unwrap_or_else(|| agent::anthropic::DEFAULT_BASE_URL.to_string()),
            api_key: config.backends.anthropic.api_key.clone(),
            client: reqwest::Client::new(),
        },
        &background,
        bg_cancel.clone(),
    )
    .await?;
    let (client, js) = Transport::connect(&config.nats_url, &config.nats, &config.id).await?;
    let bind = || Transport::bind(client.clone(), js.clone());
    let transport = tokio::select! {
        t = bind.retry(retry_forever()).notify(|e, wait| tracing::info!(error = %e, ?wait, "waiting for the job queue")) => t?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let connect = || State::connect(&config.redis);
    let state = tokio::select! {
        s = connect.retry(retry_forever()).when(state::Error::is_transient).notify(|e, wait| tracing::warn!(error = %e, ?wait, "Redis not ready, retrying")) => s?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let open_sessions = || session::SessionStore::connect(client.clone(), state.clone());
    let sessions = tokio::select! {
        s = open_sessions.retry(retry_forever()).notify(|e, wait| tracing::warn!(error = %e, ?wait, "waiting for the session store")) => s?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let info = WorkerInfo {
        id: id.clone(),
        host: config::hostname(),
        slots: config.slots,
        version: env!("CARGO_PKG_VERSION").into(),
        started_at_ms: orch_shared::now_ms(),
    };
    let busy = Arc::new(AtomicU32::new(0));
    ::metrics::gauge!(metrics::SLOTS_TOTAL).set(config.slots as f64);

    if let Some(addr) = config.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/metrics",
                get(move || {
                    let m = metrics.clone();
                    async move { m.map(|h| h.render()).unwrap_or_default() }
                }),
            );
        let cancel = bg_cancel.clone();
        background.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
        });
    }
    {
        let (state, info, busy, cancel) =
            (state.clone(), info.clone(), busy.clone(), bg_cancel.clone());
        background.spawn(async move {
            let mut tick = tokio::time::interval(REGISTRY_REFRESH);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = state.heartbeat(&info, busy.load(Ordering::Relaxed)).await {
                            tracing::warn!(error = %e, "registry heartbeat failed");
                        }
                    }
                }
            }
        });
    }
    tracing::info!(worker_id = %id, slots = config.slots, ack_wait = ?transport.ack_wait, "worker pulling jobs");

    let limits = limits::Limits::new(state.clone());
    // The approval broker's permission-prompt server: on a loopback port for CLIs run
    // without the sandbox, and through the proxy for those in it.
    let webhook = match (
        &config.approvals.webhook_url,
        &config.approvals.webhook_secret,
    ) {
        (Some(url), Some(secret)) => Some(approvals::Webhook {
            url: url.clone(),
            secret: secret.clone(),
            client: reqwest::Client::new(),
        }),
        _ => None,
    };
    let desk = approvals::mcp::Desk::new(
        approvals::Broker::new(state.clone(), config.approvals.timeout)
            .with_park_after(config.approvals.park_after)
            .with_webhook(webhook),
    );
    desk.serve_loopback(&background, bg_cancel.clone())
        .await
        .map_err(Error::Approvals)?;
    if let Some(s) = &sandbox {
        s.serve_local(desk.router(bg_cancel.clone()));
    }
    let backends = agent::backends::Backends::from_config(&config)
        .with_sessions(sessions.clone())
        .with_limits(limits.clone())
        .with_sandbox(sandbox.clone())
        .with_approvals(desk);
    backends.register_pools().await;
    {
        let (state, transport, cancel) = (state.clone(), transport.clone(), bg_cancel.clone());
        background.spawn(limits::run_waker(state, transport, cancel));
    }
    background.spawn(ref_cleanup::run(
        state.clone(),
        config.data_dir.clone(),
        bg_cancel.clone(),
    ));
    // Shared by every job: a job's task takes a pointer, not a copy of each handle.
    let runner = Arc::new(Runner {
        transport: transport.clone(),
        state: state.clone(),
        worker_id: id.clone(),
        limits: Some(limits),
        agent: Arc::new(backends),
        running: Default::default(),
        custody: Some(custody::Custody::new(
            state.clone(),
            sessions.objects(),
            config.checkpoints.clone(),
            &config.id,
        )),
        sessions: Some(sessions),
        data_dir: config.data_dir.clone(),
    });
    {
        let mut cancels = Box::pin(transport.cancellations().await?);
        let (running, cancel) = (runner.running.clone(), bg_cancel.clone());
        background.spawn(async move {
            loop {
                let c = tokio::select! {
                    _ = cancel.cancelled() => return,
                    c = cancels.next() => match c { Some(c) => c, None => return },
                };
                let token = running.lock().ok().and_then(|m| m.get(&(c.job_id, c.attempt)).cloned());
                if let Some(token) = token {
                    tracing::info!(job_id = %c.job_id, attempt = c.attempt, reason = %c.reason, "cancelling job");
                    token.cancel();
                }
            }
        });
    }
    let jobs = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let migrate = CancellationToken::new();
    pull_loop(
        &transport,
        &runner,
        &jobs,
        &busy,
        config.slots,
        &shutdown,
        (&hard_stop, &migrate),
    )
    .await;
    if config.checkpoints.enabled && config.checkpoints.migrate_on_drain {
        // Agents that can be resumed are checkpointed and handed back now: another worker
        // takes them over in seconds instead of after the grace.
        migrate.cancel();
    }

    // Drain: in-flight jobs keep their in-progress acks running until they finish or the grace
    // period ends; then they are cancelled and handed back.
    let in_flight = busy.load(Ordering::Relaxed);
    tracing::info!(in_flight, grace = ?config.drain_grace, "draining");
    jobs.close();
    if tokio::time::timeout(config.drain_grace, jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain grace over; handing back unfinished jobs");
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), jobs.wait()).await;
    }
    bg_cancel.cancel();
    background.close();
    background.wait().await;
    if let Err(e) = state.deregister(&id).await {
        tracing::warn!(error = %e, "failed to deregister");
    }
    transport.flush().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Pulls one job per free slot until `shutdown`. Jobs that arrive after `shutdown` (from a
/// pull request still open) are handed back at once.
async fn pull_loop(
    transport: &Transport,
    runner: &Arc<Runner>,
    jobs: &TaskTracker,
    busy: &Arc<AtomicU32>,
    slots: u32,
    shutdown: &CancellationToken,
    (hard_stop, migrate): (&CancellationToken, &CancellationToken),
) {
    let free = Arc::new(Semaphore::new(slots as usize));
    let mut stopping = false;
    while !stopping {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = free.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        while let Ok(p) = free.clone().try_acquire_owned() {
            permits.push(p);
        }
        let batch = match transport.pull(permits.len(), PULL_EXPIRES).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        tokio::pin!(batch);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled(), if !stopping => { stopping = true; continue; }
                next = batch.next() => next,
            };
            let job = match next {
                None => break,
                Some(Pulled::Undecodable) => continue,
                Some(Pulled::Job(job)) => job,
            };
            let permit = match (stopping, permits.pop()) {
                (false, Some(p)) => p,
                _ => {
                    ::metrics::counter!(metrics::JOBS_HANDED_BACK).increment(1);
                    let _ = job.hand_back().await;
                    continue;
                }
            };
            let (runner, busy, hard_stop, migrate) = (
                runner.clone(),
                busy.clone(),
                hard_stop.clone(),
                migrate.clone(),
            );
            busy.fetch_add(1, Ordering::Relaxed);
            ::metrics::gauge!(metrics::SLOTS_BUSY).increment(1.0);
            jobs.spawn(async move {
                runner.run(job, hard_stop, migrate).await;
                busy.fetch_sub(1, Ordering::Relaxed);
                ::metrics::gauge!(metrics::SLOTS_BUSY).decrement(1.0);
                drop(permit);
            });
        }
    }
}
