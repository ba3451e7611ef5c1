//! Runs one job: start event, agent run with in-progress acks on a timer, events to the task's
//! log, then the result, the done marker and the ack — in that order, so a worker that dies at
//! any line either leaves the job to be redelivered or has already stored its result.

use crate::agent::{Agent, Events, Report};
use crate::custody::Custody;
use crate::metrics as m;
use crate::paths::PathWatch;
use crate::session::SessionStore;
use crate::state::{Claim, Lease, State};
use crate::transport::{JobDelivery, Transport};
use backon::{ExponentialBuilder, Retryable};
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, WorkerId};
use orch_shared::job::{FailureReason, JobResult, Outcome};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Cancellation tokens of the job attempts this worker is running.
pub type Running = Arc<Mutex<HashMap<(JobId, u32), CancellationToken>>>;

/// Everything a job run needs, shared by all slots.
#[derive(Clone)]
pub struct Runner {
    pub transport: Transport,
    pub state: State,
    pub worker_id: WorkerId,
    pub agent: Arc<dyn Agent>,
    pub running: Running,
    /// Where a successful turn's session is stored (`None`: sessions are not kept).
    pub sessions: Option<SessionStore>,
    /// Where a job waiting for a credential's reset is parked (`None`: it is handed back with
    /// a delay instead).
    pub limits: Option<crate::limits::Limits>,
    /// Where running agents are checkpointed (`None`: they are not).
    pub custody: Option<Custody>,
    /// The worker's data directory (where a job's clone is, for its changed paths).
    pub data_dir: std::path::PathBuf,
}

/// Whether the `backend` reports steps its runs can resume from.
fn checkpointable(backend: &str) -> bool {
    matches!(
        backend,
        crate::agent::claude_code::NAME
            | crate::agent::anthropic::NAME
            | crate::agent::openai::NAME
    )
}

/// Removes a job from [`Running`] when its run ends, however it ends.
struct Registered<'a> {
    running: &'a Running,
    key: (JobId, u32),
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.running.lock() {
            map.remove(&self.key);
        }
    }
}

impl Runner {
    fn event(&self, job: &JobDelivery, kind: EventKind) -> Event {
        Event {
            task_id: job.spec.task_id,
            job_id: Some(job.spec.job_id),
            attempt: job.spec.attempt,
            at_ms: orch_shared::now_ms(),
            kind,
        }
    }

    /// Publishes an event without waiting for JetStream's ack; the run's events are
    /// confirmed (and those lost sent again) before its result or park (see
    /// [`Transport::publish_events`]).
    async fn send(&self, job: &JobDelivery, kind: EventKind) {
        self.transport
            .publish_event(job, &self.event(job, kind))
            .await;
    }

    /// Waits until the run's events are stored before the job leaves this worker (parked or
    /// handed back); a failure is logged (the job runs again anyway).
    async fn confirm(&self, job: &JobDelivery) {
        if let Err(e) = self.transport.confirm_events(job).await {
            tracing::warn!(error = %e, "the job's events were not stored");
        }
    }

    /// `first` and whatever else the agent has ready, as events of `job`.
    fn burst(
        &self,
        job: &JobDelivery,
        first: Option<EventKind>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<EventKind>,
    ) -> Vec<Event> {
        let mut burst: Vec<Event> = first.into_iter().map(|k| self.event(job, k)).collect();
        while let Ok(kind) = rx.try_recv() {
            burst.push(self.event(job, kind));
        }
        burst
    }

    /// Publishes `first` and whatever else the agent has ready, as few messages as the log
    /// allows (a burst of output is one batch; an agent writing slowly gets one message per
    /// event, without waiting for more).
    async fn send_burst(
        &self,
        job: &JobDelivery,
        first: Option<EventKind>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<EventKind>,
        watch: Option<&mut PathWatch>,
    ) {
        let burst = self.burst(job, first, rx);
        if let Some(w) = watch {
            burst.iter().for_each(|e| w.observe(&e.kind));
        }
        self.transport.publish_events(job, &burst).await;
    }

    /// Runs `job` to the end, or hands it back when `hard_stop` fires first, or, once
    /// `migrate` fires, as soon as it is checkpointed (when it can be).
    pub async fn run(
        &self,
        job: JobDelivery,
        hard_stop: CancellationToken,
        migrate: CancellationToken,
    ) {
        let spec = &job.spec;
        let trace_id = job
            .traceparent
            .as_deref()
            .and_then(orch_config::telemetry::trace_id);
        let span = tracing::info_span!("job", task_id = %spec.task_id, job_id = %spec.job_id, attempt = spec.attempt, role = %spec.role, trace_id, otel.kind = "consumer");
        // The job's span continues its dispatch's trace (the task's).
        orch_config::telemetry::set_parent(&span, job.traceparent.as_deref());
        self.run_in_span(job, hard_stop, migrate)
            .instrument(span)
            .await
    }

    async fn run_in_span(
        &self,
        job: JobDelivery,
        hard_stop: CancellationToken,
        migrate: CancellationToken,
    ) {
        let spec = job.spec.clone();
        if job.delivery > 1 {
            metrics::counter!(m::JOBS_REDELIVERED).increment(1);
        }
        // One round trip checks the done and cancel markers and takes the lease. The lease's
        // TTL is the ack wait: a worker that stops renewing loses the attempt at the same
        // moment JetStream gives the job to another worker.
        let lease_ttl = self.transport.ack_wait;
        let mut lease = match self
            .state
            .claim(&self.worker_id, spec.job_id, spec.attempt, lease_ttl)
            .await
        {
            Ok(Claim::Skip(why)) => {
                tracing::info!(why, "job attempt not to be run; acking it");
                metrics::counter!(m::JOBS_ALREADY_DONE).increment(1);
                let _ = job.ack().await;
                return;
            }
            Ok(Claim::Leased(lease)) => Some(lease),
            Err(e) => {
                tracing::warn!(error = %e, "could not claim the job; running it unfenced");
                None
            }
        };
        metrics::counter!(m::JOBS_STARTED).increment(1);
        let started_at_ms = orch_shared::now_ms();
        self.send(
            &job,
            EventKind::JobStarted {
                worker_id: self.worker_id.clone(),
                role: spec.role,
                backend: self.agent.backend_for(&spec).into(),
                model: self.agent.model_for(&spec),
                delivery: job.delivery,
                started_at_us: orch_shared::now_us(),
                sandbox: self.agent.sandbox_for(&spec),
            },
        )
        .await;

        let agent_cancel = hard_stop.child_token();
        let key = (spec.job_id, spec.attempt);
        if let Ok(mut map) = self.running.lock() {
            map.insert(key, agent_cancel.clone());
        }
        let _registered = Registered {
            running: &self.running,
            key,
        };
        let (events, mut rx) = Events::new();
        // Custody: the checkpoint an earlier run of this attempt left, and the recorder of
        // this run's (its task gets the events without the recorder, or it would keep itself
        // alive).
        let backend = self.agent.backend_for(&spec);
        let mut recorder = match &self.custody {
            Some(custody) if checkpointable(backend) => {
                let resume = match custody.resume_point(&spec, false).await {
                    Ok(r) => r,
                    Err(reason) => {
                        tracing::warn!(%reason, "checkpoint not usable; starting over");
                        self.send(&job, EventKind::ResumeFailed { reason }).await;
                        None
                    }
                };
                // A rewind's first run starts from the checkpoint of the agent it rewinds.
                let resume = match resume {
                    Some(r) => Some(r),
                    None => match custody.rewind_point(&spec).await {
                        Ok(r) => r,
                        Err(reason) => {
                            tracing::warn!(%reason, "the rewind's checkpoint cannot be loaded");
                            self.send(&job, EventKind::ResumeFailed { reason }).await;
                            None
                        }
                    },
                };
                custody.recorder(&spec, lease.as_ref(), resume, backend, events.clone())
            }
            _ => None,
        };
        // An agent waiting for a person may ask to be parked (when the job can be: parking
        // needs the parked set, and the run a checkpoint to resume from).
        let parking = self
            .limits
            .is_some()
            .then(crate::approvals::Parking::default);
        let events = events
            .with_recorder(recorder.clone())
            .with_parking(parking.clone());
        let parking_asked = async {
            match &parking {
                Some(p) => p.requested().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(parking_asked);
        let mut parked_for: Option<crate::approvals::Waiting> = None;
        let agent_span = if orch_config::telemetry::enabled() {
            tracing::info_span!("agent", backend = %backend)
        } else {
            tracing::Span::none()
        };
        let agent_run = self
            .agent
            .run_report(&spec, events, agent_cancel.clone())
            .instrument(agent_span);
        tokio::pin!(agent_run);
        // The paths the agent changed, reported after its steps for conflict warnings.
        let mut watch = PathWatch::for_job(&spec, &self.data_dir);
        let mut look = tokio::time::interval(crate::paths::MIN_INTERVAL);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let period = (self.transport.ack_wait / 3).max(Duration::from_millis(100));
        // The first at a random point of the second half of a period: jobs started together
        // (a worker's slots filled at once) do not all renew their leases at the same instant.
        let first = period / 2 + period.mul_f64(rand::random::<f64>() / 2.0);
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
        // After a stall, one heartbeat and the period again, not a burst of the missed ones.
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = spec.limits.timeout_ms.map(Duration::from_millis);
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(timeout);

        let output = loop {
            tokio::select! {
                out = &mut agent_run => break Some(out),
                Some(kind) = rx.recv() => self.send_burst(&job, Some(kind), &mut rx, watch.as_mut()).await,
                _ = look.tick(), if watch.as_ref().is_some_and(PathWatch::due) => {
                    if let Some(w) = watch.as_mut()
                        && let Some(report) = w.look(&spec).await
                        && let Err(e) = self.transport.publish_paths(&report).await
                    {
                        tracing::debug!(error = %e, "changed paths not reported");
                    }
                }
                due = keepalive.tick() => {
                    if !self.still_holds(lease.as_mut(), lease_ttl, true).await {
                        // Paused or cut off past the ack wait: another worker owns the attempt.
                        tracing::warn!("lease lost: another worker took the job; dropping it");
                        metrics::counter!(m::LEASES_LOST).increment(1);
                        agent_cancel.cancel();
                        return;
                    }
                    metrics::counter!(m::HEARTBEATS).increment(1);
                    if let Err(e) = job.in_progress().await {
                        tracing::warn!(error = %e, "in-progress ack failed");
                    }
                    // Sent well after it was due: the worker is too busy for its jobs (the
                    // ack wait is three periods, so a late one is a warning, not a loss yet).
                    let lag = due.elapsed();
                    if lag > period / 2 {
                        metrics::counter!(m::HEARTBEATS_LATE).increment(1);
                        tracing::warn!(lag_ms = lag.as_millis() as u64, "in-progress ack sent late");
                    }
                    self.send(&job, EventKind::Heartbeat).await;
                    if let Some(w) = watch.as_mut() {
                        w.observe(&EventKind::Heartbeat);
                    }
                }
                _ = &mut timeout => {
                    agent_cancel.cancel();
                    break Some(Report::failure(
                        self.agent.backend_for(&spec),
                        FailureReason::Timeout,
                        format!("job timed out after {}", humantime::format_duration(deadline.unwrap_or_default())),
                    ));
                }
                _ = hard_stop.cancelled() => break None,
                _ = migrate.cancelled(), if recorder.as_ref().is_some_and(|r| r.can_migrate()) => {
                    // Draining: the agent's latest step goes into a checkpoint and the job
                    // goes back to the queue at once, for another worker to resume.
                    let saved = match &recorder {
                        Some(r) => r.flush().await,
                        None => None,
                    };
                    tracing::info!(step = ?saved, "draining: agent checkpointed; handing the job back");
                    metrics::counter!(m::JOBS_MIGRATED).increment(1);
                    agent_cancel.cancel();
                    break None;
                }
                _ = &mut parking_asked, if parked_for.is_none() => {
                    // Waiting for a person for long: the agent's latest step goes into a
                    // checkpoint, the agent stops, and the job is parked until the answer.
                    parked_for = parking.as_ref().and_then(|p| p.waiting());
                    let saved = match &recorder {
                        Some(r) => r.flush().await,
                        None => None,
                    };
                    tracing::info!(step = ?saved, approval = ?parked_for.as_ref().map(|w| &w.id), "waiting for a person: agent checkpointed; parking the job");
                    agent_cancel.cancel();
                    let _ = (&mut agent_run).await;
                    break None;
                }
                _ = agent_cancel.cancelled(), if !hard_stop.is_cancelled() => {
                    // Cancelled by the coordinator: the agent stops; what it reports next is
                    // the attempt's result (failure: cancelled).
                    let out = (&mut agent_run).await;
                    break Some(out);
                }
            }
        };
        // The spending of the runs this one resumed counts in the attempt's totals.
        let resumed_spend = recorder.take().and_then(|r| r.resumed_spend());
        // What the agent said last goes out with its `job_finished` (or before a hand-back).
        let mut tail = self.burst(&job, None, &mut rx);
        // The drain deadline also cancels the agent, which may then report "cancelled" before
        // the deadline branch is seen: that is a hand-back, not the job's outcome.
        let output = output.filter(|r| {
            !(hard_stop.is_cancelled()
                && matches!(
                    r.output.outcome,
                    Outcome::Failure {
                        reason: FailureReason::Cancelled,
                        ..
                    }
                ))
        });
        if let Some(waiting) = &parked_for
            && !hard_stop.is_cancelled()
        {
            self.transport.publish_events(&job, &tail).await;
            self.park_for_approval(&job, lease.as_ref(), waiting).await;
            return;
        }
        let Some(report) = output else {
            tracing::warn!("draining; handing the job back");
            self.transport.publish_events(&job, &tail).await;
            self.confirm(&job).await;
            self.hand_back(&job).await;
            return;
        };
        if let Some(park) = &report.parked {
            self.transport.publish_events(&job, &tail).await;
            self.park(&job, lease.as_ref(), park).await;
            return;
        }
        let mut output = report.output;
        if let Some((usage, cost_usd)) = resumed_spend {
            output.usage.add(&usage);
            output.cost_usd += cost_usd;
        }
        let finished_at_ms = orch_shared::now_ms();
        let (success, reason, message) = match &output.outcome {
            Outcome::Success => (true, None, None),
            Outcome::Failure { reason, message } => (false, Some(*reason), Some(message.clone())),
        };
        // Every event of the run is stored before the result is published.
        tail.push(self.event(
            &job,
            EventKind::JobFinished {
                success,
                reason,
                message,
                usage: output.usage,
                cost_usd: output.cost_usd,
                duration_ms: finished_at_ms.saturating_sub(started_at_ms),
            },
        ));
        let events_stored = self.transport.send_events(&job, &tail);
        // Stored before the result is published (a result with a session id can be
        // continued), while the events are confirmed and the lease is checked.
        let session_kept = async {
            match (&self.sessions, report.session) {
                (Some(store), Some(snapshot)) if output.outcome.is_success() => {
                    // A large session takes a moment to store: the job must not look abandoned.
                    if snapshot.bytes.len() > crate::session::INLINE_MAX_BYTES {
                        let _ = job.in_progress().await;
                    }
                    store.keep(&spec, snapshot, lease_ttl / 2).await
                }
                _ => None,
            }
        };
        let (stored, held, kept) = tokio::join!(
            events_stored,
            self.still_holds(lease.as_mut(), lease_ttl, false),
            session_kept
        );
        if let Err(e) = stored {
            // A result whose `job_finished` is not in the log would leave the job's events
            // without their end: the job runs again, like a result that cannot be stored.
            tracing::error!(error = %e, "the job's events were not stored; handing the job back");
            self.hand_back(&job).await;
            return;
        }
        if !held {
            // Publishing now would only be fenced out (and acking could ack the new owner's
            // delivery): leave the attempt to the worker that holds it.
            tracing::warn!("lease lost before the result was published; dropping it");
            metrics::counter!(m::LEASES_LOST).increment(1);
            return;
        }
        let result = JobResult {
            task_id: spec.task_id,
            job_id: spec.job_id,
            attempt: spec.attempt,
            delivery: job.delivery,
            worker_id: self.worker_id.clone(),
            outcome: output.outcome,
            output: output.output,
            usage: output.usage,
            cost_usd: output.cost_usd,
            files_read: output.files_read,
            files_written: output.files_written,
            started_at_ms,
            finished_at_ms,
            fence: lease.as_ref().map_or(0, |l| l.fence),
            model: report.model.clone(),
            context_tokens: report.context.map(|c| c.tokens),
            context_window: report.context.map(|c| c.window),
            diff: output.diff,
            git: output.git,
            session_id: kept.as_ref().map(|k| k.session_id.clone()),
            session: kept.and_then(|k| k.pointer),
        };
        let publish = || self.transport.publish_result(&result);
        let stored = publish
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(10),
            )
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "result not stored, retrying"))
            .await;
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not store the result; handing the job back");
            self.hand_back(&job).await;
            return;
        }
        let (outcome, reason) = match &result.outcome {
            Outcome::Success => ("success", "none"),
            Outcome::Failure { reason, .. } => ("failure", reason.as_str()),
        };
        metrics::counter!(m::JOBS_FINISHED, "outcome" => outcome, "reason" => reason).increment(1);
        // In the job's span: the line carries the task, job and trace ids.
        tracing::info!(outcome, reason, "job finished");
        // One round trip sets the done marker and drops the lease, unless a later worker
        // took the attempt: the same test the coordinator applies to the result.
        let finish = || self.state.finish(spec.job_id, spec.attempt, lease.as_ref());
        let finished = finish
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(4),
            )
            .when(crate::state::Error::is_transient)
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "done marker not set, retrying"))
            .await;
        match finished {
            Ok(true) => {}
            Ok(false) => {
                // Another worker took the attempt while this one published: this result is
                // fenced out. Marking the attempt done or acking it would end the holder's run
                // (JetStream accepts the ack of an earlier delivery).
                tracing::warn!(
                    "lease taken over after the result was published; leaving the attempt to its holder"
                );
                metrics::counter!(m::LEASES_LOST).increment(1);
                return;
            }
            Err(e) if lease.is_some() => {
                // Whether this result will be applied is unknown: acking could end the run of
                // a worker that took the attempt since. Left unacked, the job comes back; its
                // next claim finds the marker (if it was set after all) or runs it again.
                tracing::warn!(error = %e, "could not set the done marker; leaving the job to be redelivered");
                return;
            }
            // Unfenced: the coordinator applies this result whatever the fence.
            Err(e) => tracing::warn!(error = %e, "could not set the done marker"),
        }
        if let Err(e) = job.ack().await {
            // The result is stored and the attempt marked done: a redelivery finds the marker.
            tracing::warn!(error = %e, "ack failed after the result was stored");
        }
    }

    /// Whether this worker still holds the lease (true when there is none to check, or Redis
    /// cannot tell: losing Redis must not stop every running agent). With `extend` the lease
    /// is renewed; without, a lease confirmed moments ago is not asked about again.
    async fn still_holds(&self, lease: Option<&mut Lease>, ttl: Duration, extend: bool) -> bool {
        let Some(lease) = lease else {
            return true;
        };
        if !extend && lease.surely_held(ttl) {
            return true;
        }
        match self.state.renew(lease, ttl).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the lease; carrying on");
                true
            }
        }
    }

    /// Parks an attempt whose credentials are all at their usage limit: into the parked set
    /// (with a `job_waiting` event saying until when), lease released, message acked. It then
    /// holds no slot and no delivery, and its attempt count does not move. Without Redis, it
    /// is handed back to be delivered again at the reset.
    async fn park(&self, job: &JobDelivery, lease: Option<&Lease>, park: &crate::limits::Park) {
        let wait = Duration::from_millis(park.until_ms.saturating_sub(orch_shared::now_ms()));
        let until = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(park.until_ms),
        );
        tracing::info!(backend = park.backend, credential = %park.credential, %until, "job parked until its credential's reset");
        self.send(
            job,
            EventKind::JobWaiting {
                reason: format!(
                    "parked: {} (credential {}/{} resets at {until})",
                    park.reason, park.backend, park.credential
                ),
            },
        )
        .await;
        // Before the park, so that it cannot follow the start of the run that resumes it.
        self.send(
            job,
            EventKind::JobParked {
                parked: orch_shared::api::Parked {
                    reason: "limit".into(),
                    credential: Some(format!("{}/{}", park.backend, park.credential)),
                    until_ms: park.until_ms,
                    approval: None,
                },
            },
        )
        .await;
        self.confirm(job).await;
        let parked = match &self.limits {
            Some(limits) => {
                limits
                    .park(&job.spec, job.subject(), job.traceparent.as_deref(), park)
                    .await
            }
            None => Ok(0),
        };
        match parked {
            Ok(n) if self.limits.is_some() => {
                tracing::debug!(parks = n, "parked");
                if let Some(lease) = lease
                    && let Err(e) = self.state.release(lease).await
                {
                    tracing::warn!(error = %e, "could not release the lease of a parked job");
                }
                if let Err(e) = job.ack().await {
                    tracing::warn!(error = %e, "could not ack a parked job; it may run again before its reset");
                }
            }
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "could not park the job; handing it back until the reset");
                }
                if let Some(lease) = lease {
                    let _ = self.state.release(lease).await;
                }
                metrics::counter!(m::JOBS_HANDED_BACK).increment(1);
                if let Err(e) = job.hand_back_after(wait).await {
                    tracing::warn!(error = %e, "hand back failed");
                }
            }
        }
    }

    /// Parks an attempt whose agent waits for a person's answer to request `waiting`: into
    /// the parked set, due at the request's deadline or as soon as it is answered, lease
    /// released, message acked. If it cannot be parked, it is handed back (it runs again at
    /// once, and its agent asks the same request again).
    async fn park_for_approval(
        &self,
        job: &JobDelivery,
        lease: Option<&Lease>,
        waiting: &crate::approvals::Waiting,
    ) {
        let deadline = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(waiting.deadline_ms),
        );
        tracing::info!(approval = %waiting.id, %deadline, "job parked until a person answers");
        self.send(
            job,
            EventKind::JobWaiting {
                reason: format!(
                    "parked: waiting for a person to answer approval request {} (deadline {deadline})",
                    waiting.id
                ),
            },
        )
        .await;
        // Before the park, so that it cannot follow the start of the run that resumes it.
        self.send(
            job,
            EventKind::JobParked {
                parked: orch_shared::api::Parked {
                    reason: "approval".into(),
                    credential: None,
                    until_ms: waiting.deadline_ms,
                    approval: Some(waiting.id.clone()),
                },
            },
        )
        .await;
        self.confirm(job).await;
        let parked = crate::limits::park_for_approval(
            &self.state,
            &job.spec,
            job.subject(),
            job.traceparent.as_deref(),
            &waiting.id,
            waiting.deadline_ms,
        )
        .await;
        if let Some(lease) = lease
            && let Err(e) = self.state.release(lease).await
        {
            tracing::warn!(error = %e, "could not release the lease of a parked job");
        }
        match parked {
            Ok(n) => {
                tracing::debug!(parks = n, "parked");
                if let Err(e) = job.ack().await {
                    tracing::warn!(error = %e, "could not ack a parked job; it may run again before its answer");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not park the job; handing it back");
                self.hand_back(job).await;
            }
        }
    }

    async fn hand_back(&self, job: &JobDelivery) {
        metrics::counter!(m::JOBS_HANDED_BACK).increment(1);
        if let Err(e) = job.hand_back().await {
            tracing::warn!(error = %e, "hand back failed; the job will be redelivered after the ack wait");
        }
    }
}
