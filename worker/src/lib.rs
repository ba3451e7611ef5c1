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
mod scratch_pack;
pub mod session;
pub mod state;
pub mod transport;

use axum::routing::get;
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use config::Config;
use futures::{FutureExt, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use orch_shared::ids::WorkerId;
use orch_shared::job::Backend;
use runner::Runner;
use state::{State, WorkerInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transport::{Pulled, Queue, Transport};

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
    let (client, js) =
        Transport::connect(&config.nats_url, &config.nats, &config.id, config.slots).await?;
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
        expires: config.pull_expires,
        shutdown: &shutdown,
        hard_stop: &hard_stop,
        migrate: &migrate,
    };
    // The drain starts at the shutdown signal: the grace counts from the signal, as
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
    // Both loops withdraw their open pull requests at the signal instead of waiting for them
    // to expire.
    tokio::join!(
        pulling.run(&config.serves),
        reroute_loop(&transport, config.pull_expires, &shutdown)
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

/// The pull loop and what it shares with the jobs it starts: one semaphore of free slots over
/// every backend's queue.
///
/// No slot is ever held by an empty pull. A JetStream pull request cannot be taken back once a
/// job is on its way, so the loop asks for at most the free slots from each queue and, because
/// every served queue has a request open at once, may be given more jobs than it has slots for.
/// It keeps that rare:
/// 1. When slots are free, it first takes the jobs already waiting, queue by queue (`no_wait`
///    requests for at most the free slots, starting from a different queue each round so no
///    backend starves another). A backlog on several backends never over-delivers.
/// 2. Only if slots are still free does it open a request on every queue for that many jobs,
///    so a job on any served backend starts the moment it is published.
/// 3. As soon as the slots are taken, it drops the other requests (JetStream skips a request
///    whose inbox nobody listens to any more) and goes back to waiting for a slot.
///
/// Only jobs published on several queues within the same instant, with fewer free slots than
/// jobs, can reach a worker without a slot: those are handed back at once (`-NAK`), which
/// costs one delivery of the job's `max_deliver`. The alternatives cost more: a request that
/// reserves the slots holds them while empty and makes another backend's job wait up to the
/// expiry (the defect this replaces); handing back every surplus job while the queues hold a
/// backlog spends a delivery per job and per turn; short `no_wait` polling spins an idle
/// worker and delays a job by the polling interval.
struct Pulling<'a> {
    transport: &'a Transport,
    runner: &'a Arc<Runner>,
    jobs: &'a TaskTracker,
    busy: &'a Arc<AtomicU32>,
    free: Arc<Semaphore>,
    /// How long an open request waits on an empty queue.
    expires: Duration,
    shutdown: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
    migrate: &'a CancellationToken,
}

/// The slots the pull loop holds for the jobs it is about to be given.
type Slots = Vec<OwnedSemaphorePermit>;

impl Pulling<'_> {
    /// Pulls the jobs of every backend in `serves`, one per free slot, until `shutdown`; then
    /// withdraws its open requests at once. Jobs that arrive without a slot, or after
    /// `shutdown`, are handed back at once.
    async fn run(&self, serves: &[Backend]) {
        let shutdown = self.shutdown;
        // Each backend's queue once bound, and whether its absence was logged.
        let mut queues: Vec<(Backend, Option<Queue>, bool)> =
            serves.iter().map(|b| (*b, None, false)).collect();
        let mut unbound_wait = retry_forever().build();
        let mut first_queue = 0;
        loop {
            // A backend's consumer may appear later (a coordinator that does not know the
            // backend yet): the bound queues are pulled meanwhile.
            for (backend, queue, told) in queues.iter_mut().filter(|(_, q, _)| q.is_none()) {
                match self.transport.queue(Some(*backend)).await {
                    Ok(q) => *queue = Some(q),
                    Err(e) if !*told => {
                        *told = true;
                        tracing::info!(error = %e, backend = backend.as_str(), "waiting for the backend's job queue")
                    }
                    Err(_) => {}
                }
            }
            let bound: Vec<&Queue> = queues.iter().filter_map(|(_, q, _)| q.as_ref()).collect();
            if bound.is_empty() {
                let wait = unbound_wait.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                p = self.free.clone().acquire_owned() => p,
            };
            let Ok(first) = first else { return };
            let mut slots = vec![first];
            while let Ok(p) = self.free.clone().try_acquire_owned() {
                slots.push(p);
            }

            // 1. The jobs waiting now, a queue at a time.
            first_queue = (first_queue + 1) % bound.len();
            for i in 0..bound.len() {
                if slots.is_empty() {
                    break;
                }
                let queue = bound[(first_queue + i) % bound.len()];
                match self
                    .transport
                    .take_waiting(queue, slots.len(), self.expires)
                    .await
                {
                    Ok(waiting) => {
                        let mut waiting = std::pin::pin!(waiting);
                        while let Some(pulled) = waiting.next().await {
                            self.start(pulled, &mut slots).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, backend = ?queue.backend, "pull failed"),
                }
            }
            if slots.is_empty() || shutdown.is_cancelled() {
                continue;
            }

            // 2. A request on every queue for as many jobs as there are free slots.
            let mut pulls = futures::stream::SelectAll::new();
            for queue in &bound {
                match self.transport.pull(queue, slots.len(), self.expires).await {
                    Ok(p) => pulls.push(Box::pin(p)),
                    Err(e) => tracing::warn!(error = %e, backend = ?queue.backend, "pull failed"),
                }
            }
            if pulls.is_empty() {
                drop(slots);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let opened = tokio::time::Instant::now();
            let mut ended = false;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    next = pulls.next() => next,
                };
                let Some(pulled) = next else {
                    ended = true;
                    break;
                };
                self.start(pulled, &mut slots).await;
                if slots.is_empty() {
                    break;
                }
            }
            // 3. Withdraw the requests still open (dropping them unsubscribes their inboxes),
            // after taking the jobs that already reached this worker.
            while let Some(Some(pulled)) = pulls.next().now_or_never() {
                self.start(pulled, &mut slots).await;
            }
            drop(pulls);
            if shutdown.is_cancelled() {
                return;
            }
            // Requests the server ended long before their expiry with nothing to give (a
            // consumer at its `max_waiting`, say) are not renewed in a busy loop.
            if ended && opened.elapsed() < self.expires / 2 {
                drop(slots);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Runs a pulled job on one of `slots`, or a slot freed since; without a slot, or after
    /// `shutdown`, hands it back at once.
    async fn start(&self, pulled: Pulled, slots: &mut Slots) {
        let Pulled::Job(job) = pulled else { return };
        let permit = match slots.pop() {
            Some(p) => Some(p),
            None => self.free.clone().try_acquire_owned().ok(),
        };
        let permit = match permit {
            Some(p) if !self.shutdown.is_cancelled() => p,
            _ => {
                tracing::debug!(job_id = %job.spec.job_id, attempt = job.spec.attempt, "a job arrived without a free slot or after shutdown; handing it back");
                ::metrics::counter!(metrics::JOBS_HANDED_BACK).increment(1);
                let _ = job.hand_back().await;
                return;
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

/// Jobs the pre-routing queue holds at most per pull when moved.
const REROUTE_BATCH: usize = 64;

/// Moves the jobs of the pre-routing queue (published by coordinators older than routing by
/// backend, during a rolling update) to their backends' subjects, until `shutdown`. It holds
/// no slot: the job runs when its backend's consumer delivers it.
async fn reroute_loop(transport: &Transport, expires: Duration, shutdown: &CancellationToken) {
    let bind = || transport.queue(None);
    let queue = tokio::select! {
        q = bind.retry(retry_forever()) => match q { Ok(q) => q, Err(_) => return },
        _ = shutdown.cancelled() => return,
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = transport.pull(&queue, REROUTE_BATCH, expires) => b,
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
        let mut batch = std::pin::pin!(batch);
        loop {
            // At `shutdown` the request is withdrawn; the jobs that already reached this
            // worker are still moved (a move takes one publish).
            let pulled = tokio::select! {
                biased;
                _ = shutdown.cancelled() => match batch.next().now_or_never() {
                    Some(Some(p)) => p,
                    _ => return,
                },
                p = batch.next() => match p { Some(p) => p, None => break },
            };
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
