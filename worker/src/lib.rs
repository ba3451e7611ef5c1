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
use orch_shared::job::Backend;
use runner::Runner;
use state::{State, WorkerInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
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
        backends: config.serves.clone(),
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
    let serves: Vec<&str> = config.serves.iter().map(|b| b.as_str()).collect();
    tracing::info!(worker_id = %id, slots = config.slots, ack_wait = ?transport.ack_wait, backends = %serves.join(","), "worker pulling jobs");
    if config.slots < config.serves.len() as u32 {
        tracing::warn!(
            slots = config.slots,
            backends = config.serves.len(),
            "fewer slots than backends: a job may wait up to a pull's expiry while another backend's pull holds the slots"
        );
    }

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
    let pulling = Pulling {
        transport: &transport,
        runner: &runner,
        jobs: &jobs,
        busy: &busy,
        free: Arc::new(Semaphore::new(config.slots as usize)),
        hungry: Arc::new(AtomicUsize::new(0)),
        shutdown: &shutdown,
        hard_stop: &hard_stop,
        migrate: &migrate,
    };
    let queues = config
        .serves
        .iter()
        .map(|b| pulling.pull_loop(*b))
        .collect::<Vec<_>>();
    // The drain starts at the shutdown signal, beside the pull loops that are still winding
    // down (an open pull lasts up to its expiry): the grace counts from the signal, as
    // Kubernetes counts its termination grace, and resumable agents are migrated at once.
    let drain_timer = {
        let (shutdown, hard_stop, migrate) = (shutdown.clone(), hard_stop.clone(), migrate.clone());
        let (grace, migrate_on_drain) = (
            config.drain_grace,
            config.checkpoints.enabled && config.checkpoints.migrate_on_drain,
        );
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if migrate_on_drain {
                // Agents that can be resumed are checkpointed and handed back now: another
                // worker takes them over in seconds instead of after the grace.
                migrate.cancel();
            }
            tokio::time::sleep(grace).await;
            hard_stop.cancel();
        })
    };
    tokio::join!(
        futures::future::join_all(queues),
        reroute_loop(&transport, &shutdown)
    );

    // Drain: in-flight jobs keep their in-progress acks running until they finish or the grace
    // period ends; then they are cancelled and handed back.
    let in_flight = busy.load(Ordering::Relaxed);
    tracing::info!(in_flight, grace = ?config.drain_grace, "draining");
    jobs.close();
    let finished = tokio::select! {
        biased;
        () = jobs.wait() => true,
        () = hard_stop.cancelled() => false,
    };
    if !finished {
        tracing::warn!("drain grace over; handing back unfinished jobs");
        let _ = tokio::time::timeout(Duration::from_secs(10), jobs.wait()).await;
    }
    drain_timer.abort();
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

/// What the pull loops share: one semaphore of free slots over every backend's queue.
struct Pulling<'a> {
    transport: &'a Transport,
    runner: &'a Arc<Runner>,
    jobs: &'a TaskTracker,
    busy: &'a Arc<AtomicU32>,
    free: Arc<Semaphore>,
    /// Pull loops waiting for their first slot: a loop that has one leaves this many free
    /// slots to them, so every backend keeps a pull open when there are slots enough.
    hungry: Arc<AtomicUsize>,
    shutdown: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
    migrate: &'a CancellationToken,
}

impl Pulling<'_> {
    /// Pulls `backend`'s jobs, one per free slot, until `shutdown`. Jobs that arrive after
    /// `shutdown` (from a pull request still open) are handed back at once.
    async fn pull_loop(&self, backend: Backend) {
        let shutdown = self.shutdown;
        let bind = || self.transport.queue(Some(backend));
        let queue = tokio::select! {
            q = bind.retry(retry_forever()).notify(|e, wait| tracing::info!(error = %e, ?wait, backend = backend.as_str(), "waiting for the backend's job queue")) => match q {
                Ok(q) => q,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let mut stopping = false;
        while !stopping {
            self.hungry.fetch_add(1, Ordering::SeqCst);
            let first = tokio::select! {
                _ = shutdown.cancelled() => { self.hungry.fetch_sub(1, Ordering::SeqCst); return; }
                p = self.free.clone().acquire_owned() => p,
            };
            self.hungry.fetch_sub(1, Ordering::SeqCst);
            let Ok(first) = first else { return };
            let mut permits = vec![first];
            while self.free.available_permits() > self.hungry.load(Ordering::SeqCst) {
                match self.free.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let batch = match self
                .transport
                .pull(&queue, permits.len(), PULL_EXPIRES)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, backend = backend.as_str(), "pull failed");
                    drop(permits);
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
                    self.runner.clone(),
                    self.busy.clone(),
                    self.hard_stop.clone(),
                    self.migrate.clone(),
                );
                busy.fetch_add(1, Ordering::Relaxed);
                ::metrics::gauge!(metrics::SLOTS_BUSY).increment(1.0);
                self.jobs.spawn(async move {
                    runner.run(job, hard_stop, migrate).await;
                    busy.fetch_sub(1, Ordering::Relaxed);
                    ::metrics::gauge!(metrics::SLOTS_BUSY).decrement(1.0);
                    drop(permit);
                });
            }
        }
    }
}

/// Jobs the pre-routing queue holds at most per pull when moved.
const REROUTE_BATCH: usize = 64;

/// Moves the jobs of the pre-routing queue (published by coordinators older than routing by
/// backend, during a rolling update) to their backends' subjects, until `shutdown`. It holds
/// no slot: the job runs when its backend's consumer delivers it.
async fn reroute_loop(transport: &Transport, shutdown: &CancellationToken) {
    let bind = || transport.queue(None);
    let queue = tokio::select! {
        q = bind.retry(retry_forever()) => match q { Ok(q) => q, Err(_) => return },
        _ = shutdown.cancelled() => return,
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = transport.pull(&queue, REROUTE_BATCH, PULL_EXPIRES) => b,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pull of the pre-routing queue failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        tokio::pin!(batch);
        // A batch is finished even after `shutdown`: moving a job takes one publish.
        while let Some(pulled) = batch.next().await {
            let Pulled::Job(job) = pulled else { continue };
            match transport.reroute(&job).await {
                Ok(()) => {
                    tracing::info!(job_id = %job.spec.job_id, attempt = job.spec.attempt, backend = job.spec.backend.as_str(), "moved a job from the pre-routing queue to its backend's")
                }
                Err(e) => {
                    tracing::warn!(error = %e, job_id = %job.spec.job_id, "could not move a job of the pre-routing queue; it is delivered again");
                    let _ = job.hand_back_after(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
