//! Admission: decides when a ready job is published to the work queue. Off by default (jobs go
//! out as soon as they are ready, in FIFO order). With a cluster-wide cap, rate limits or a
//! daily budget configured, ready jobs wait here in priority order (high, normal, low; oldest
//! first) and are published when
//! - fewer than the cap are running (a fixed number, or `auto`: the registered workers' slots),
//! - the job's backend/model rate limit has room (requests and tokens per minute, bursts of
//!   ten seconds' worth; tokens are charged when the job's real usage is known, so a burst can
//!   overshoot by the jobs in flight),
//! - the daily budget can reserve the job's estimated cost (Redis Lua, idempotent per attempt).
//!
//! Waiting is backpressure, never loss: the job's record says `queued`, and a restarted
//! coordinator offers every queued job again (see `lib.rs::resume`).
//!
//! A **parked** job (its credential at its usage limit, or its agent waiting for a person)
//! holds no place: its `job_parked` event frees it ([`Admission::parked`]). While admission
//! runs, it also wakes the parked jobs itself (the workers' wakers leave them alone while
//! [`orch_shared::keys::ADMISSION_RESUMES`] exists): a due parked job waits here like a new one, ahead of
//! the new jobs of its priority, and goes back to its queue only when it has a place again. It
//! stays in the parked set until it is re-published, so a coordinator that dies meanwhile
//! loses nothing: the next one (or, once the gate expires, a worker) takes it.

use crate::state::{DueParked, State};
use crate::transport::{Outgoing, Transport};
use orch_shared::api::Priority;
use orch_shared::codec;
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::JobSpec;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most running agents, cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Off,
    Fixed(usize),
    /// The sum of the slots of the workers registered now.
    Auto,
}

/// Requests and tokens per minute for one backend, or one model of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub backend: String,
    pub model: Option<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl RateLimit {
    /// Parses `backend[/model]=N rpm[,N tpm]`, e.g. `anthropic/claude-haiku=50rpm,400000tpm`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let err =
            || format!("rate-limit: `{s}` is not of the form backend[/model]=60rpm[,100000tpm]");
        let (key, limits) = s.split_once('=').ok_or_else(err)?;
        let (backend, model) = match key.trim().split_once('/') {
            Some((b, m)) => (b.to_string(), Some(m.to_string())),
            None => (key.trim().to_string(), None),
        };
        if backend.is_empty() {
            return Err(err());
        }
        let mut limit = RateLimit {
            backend,
            model,
            requests_per_minute: None,
            tokens_per_minute: None,
        };
        for part in limits.split(',') {
            let part = part.trim();
            if let Some(n) = part.strip_suffix("rpm") {
                limit.requests_per_minute = Some(n.trim().parse().map_err(|_| err())?);
            } else if let Some(n) = part.strip_suffix("tpm") {
                limit.tokens_per_minute = Some(n.trim().parse().map_err(|_| err())?);
            } else {
                return Err(err());
            }
        }
        if limit.requests_per_minute == Some(0) || limit.tokens_per_minute == Some(0) {
            return Err(format!("rate-limit: `{s}`: a limit must be above 0"));
        }
        Ok(limit)
    }

    fn key(&self) -> String {
        match &self.model {
            Some(m) => format!("{}/{m}", self.backend),
            None => self.backend.clone(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub cap: Option<Cap>,
    pub rate_limits: Vec<RateLimit>,
    pub daily_budget_usd: Option<f64>,
    /// Cost reserved per job against the daily budget when its role has no history yet.
    pub default_job_estimate_usd: f64,
}

impl Config {
    pub fn enabled(&self) -> bool {
        !matches!(self.cap, None | Some(Cap::Off))
            || !self.rate_limits.is_empty()
            || self.daily_budget_usd.is_some()
    }
}

enum Msg {
    Offer(Box<Offered>),
    /// The job attempt ended (or was cancelled, or is waiting for a retry): its slot is free;
    /// `tokens` is what it really used, charged to its rate limit.
    Done {
        job: JobId,
        tokens: u64,
    },
    /// A job found running after a restart, or resumed from a park by a worker: it holds a
    /// slot until it is done.
    Running(JobId),
    /// The job attempt was parked: its slot is free, and it is not withdrawn (it comes back
    /// through the parked set).
    Parked(JobId),
}

/// How long admission holds a due parked job against anyone else taking it: it is taken again
/// (and found already waiting) while it waits longer.
const RESUME_HOLD: Duration = Duration::from_secs(30);

struct Offered {
    task: TaskId,
    priority: Priority,
    spec: JobSpec,
    /// The `traceparent` of the job's dispatch span.
    traceparent: Option<String>,
    /// A parked attempt going back to its queue (not a new publish).
    resume: Option<DueParked>,
}

struct Waiting {
    priority: Priority,
    seq: u64,
    offered: Offered,
    /// The reasons already reported to the task's event log.
    reported: HashSet<&'static str>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    /// The heap pops the greatest: higher priority first, then the older offer.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Handle to the admission actor (`None` inside when admission is off).
#[derive(Clone)]
pub struct Admission {
    tx: Option<mpsc::UnboundedSender<Msg>>,
}

impl Admission {
    pub fn off() -> Self {
        Self { tx: None }
    }

    pub fn start(
        config: Config,
        state: State,
        transport: Transport,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        if !config.enabled() {
            return Self::off();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            buckets: config
                .rate_limits
                .iter()
                .map(|l| (l.key(), Bucket::new(l)))
                .collect(),
            config,
            served: crate::routing::Served::new(state.clone()),
            state,
            transport,
            heap: BinaryHeap::new(),
            admitted: HashSet::new(),
            withdrawn: HashSet::new(),
            resuming: HashSet::new(),
            seq: 0,
            cap: usize::MAX,
            estimates: HashMap::new(),
        };
        tracker.spawn(actor.run(rx, cancel));
        Self { tx: Some(tx) }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Offers a ready job; it is published when admission allows.
    pub fn offer(
        &self,
        task: TaskId,
        priority: Priority,
        spec: JobSpec,
        traceparent: Option<String>,
    ) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Offer(Box::new(Offered {
                task,
                priority,
                spec,
                traceparent,
                resume: None,
            })));
        }
    }

    /// A job attempt no longer holds (or waits for) a slot.
    pub fn done(&self, job: JobId, tokens: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Done { job, tokens });
        }
    }

    /// Counts a job that is already running (after a restart, or resumed from a park without
    /// admission) against the cap.
    pub fn running(&self, job: JobId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Running(job));
        }
    }

    /// A job attempt was parked: it frees its place until it resumes.
    pub fn parked(&self, job: JobId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Parked(job));
        }
    }
}

#[cfg(test)]
fn running_marker(job: JobId) -> JobSpec {
    JobSpec {
        attempt: 0,
        ..JobSpec::new(
            TaskId::from_u128(0),
            job,
            orch_shared::role::Role::Custom,
            "",
        )
    }
}

/// A token bucket for requests and one for tokens, refilled at the per-minute rate and holding
/// at most ten seconds' worth (so a burst is bounded, as providers' limiters do).
struct Bucket {
    rpm: Option<f64>,
    tpm: Option<f64>,
    requests: f64,
    tokens: f64,
    at: std::time::Instant,
}

/// The burst a bucket allows: ten seconds of its rate, at least one.
fn burst(per_minute: f64) -> f64 {
    (per_minute / 6.0).max(1.0)
}

impl Bucket {
    fn new(l: &RateLimit) -> Self {
        let rpm = l.requests_per_minute.map(f64::from);
        let tpm = l.tokens_per_minute.map(|t| t as f64);
        Self {
            rpm,
            tpm,
            requests: rpm.map_or(0.0, burst),
            tokens: tpm.map_or(0.0, burst),
            at: std::time::Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = std::time::Instant::now();
        let minutes = now.duration_since(self.at).as_secs_f64() / 60.0;
        self.at = now;
        if let Some(r) = self.rpm {
            self.requests = (self.requests + r * minutes).min(burst(r));
        }
        if let Some(t) = self.tpm {
            self.tokens = (self.tokens + t * minutes).min(burst(t));
        }
    }

    /// How long until a request fits, or zero if it fits now.
    fn wait(&mut self) -> Duration {
        self.refill();
        let mut wait = 0.0f64;
        if let Some(r) = self.rpm
            && self.requests < 1.0
        {
            wait = wait.max((1.0 - self.requests) / r * 60.0);
        }
        if let Some(t) = self.tpm
            && self.tokens <= 0.0
        {
            wait = wait.max((1.0 - self.tokens) / t * 60.0);
        }
        Duration::from_secs_f64(wait)
    }

    fn take_request(&mut self) {
        if self.rpm.is_some() {
            self.requests -= 1.0;
        }
    }

    fn charge_tokens(&mut self, tokens: u64) {
        if self.tpm.is_some() {
            self.refill();
            self.tokens -= tokens as f64;
        }
    }
}

struct Actor {
    config: Config,
    state: State,
    transport: Transport,
    served: crate::routing::Served,
    heap: BinaryHeap<Waiting>,
    /// Published (or already running) and not yet done.
    admitted: HashSet<JobId>,
    /// Done or cancelled while still waiting: dropped when they reach the top.
    withdrawn: HashSet<JobId>,
    /// Parked attempts (`<job>:<attempt>`) waiting in the heap to go back to their queue.
    resuming: HashSet<String>,
    seq: u64,
    cap: usize,
    buckets: HashMap<String, Bucket>,
    /// Reserve per (role, model), refreshed from history at most once a minute.
    estimates: HashMap<(String, String), (f64, std::time::Instant)>,
}

/// Where the backend/model of a job is limited, if anywhere: the model's own limit first.
fn bucket_key(buckets: &HashMap<String, Bucket>, spec: &JobSpec) -> Option<String> {
    let backend = spec.backend.as_str();
    if let Some(model) = &spec.model {
        let key = format!("{backend}/{model}");
        if buckets.contains_key(&key) {
            return Some(key);
        }
    }
    buckets.contains_key(backend).then(|| backend.to_string())
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut cap_refresh = tokio::time::interval(Duration::from_secs(2));
        self.refresh_cap().await;
        self.gate_resumes().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(Msg::Running(job)) => {
                        self.admitted.insert(job);
                    }
                    Some(Msg::Parked(job)) => {
                        self.admitted.remove(&job);
                    }
                    Some(Msg::Offer(o)) => {
                        self.seq += 1;
                        self.withdrawn.remove(&o.spec.job_id);
                        self.heap.push(Waiting { priority: o.priority, seq: self.seq, offered: *o, reported: HashSet::new() });
                    }
                    Some(Msg::Done { job, tokens }) => {
                        if !self.admitted.remove(&job) {
                            self.withdrawn.insert(job);
                        }
                        self.charge(tokens);
                    }
                    None => return,
                },
                _ = tick.tick() => self.take_resumes().await,
                _ = cap_refresh.tick() => {
                    self.refresh_cap().await;
                    self.gate_resumes().await;
                }
            }
            self.pump().await;
        }
    }

    /// Tells the workers' wakers that this coordinator wakes the parked jobs.
    async fn gate_resumes(&self) {
        if let Err(e) = self.state.gate_resumes().await {
            tracing::warn!(error = %e, "could not take over waking parked jobs; workers wake them");
        }
    }

    /// Takes the parked jobs that are due into the heap, to wait for a place like new ones
    /// (ahead of the new ones of their priority: they started first).
    async fn take_resumes(&mut self) {
        let due = match self.state.take_due_parked(256, RESUME_HOLD).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for parked jobs");
                return;
            }
        };
        for d in due {
            if self.resuming.contains(&d.member) {
                continue;
            }
            let spec: JobSpec = match codec::decode(&d.spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, member = %d.member, "a parked job does not decode; dropping it");
                    let _ = self.state.unpark(&d).await;
                    continue;
                }
            };
            if !self.still_wanted(&spec).await {
                tracing::info!(job_id = %spec.job_id, attempt = spec.attempt, "a parked job's attempt ended meanwhile (cancelled or superseded); dropping it");
                if let Err(e) = self.state.unpark(&d).await {
                    tracing::warn!(error = %e, "could not drop a parked job that ended");
                }
                continue;
            }
            self.withdrawn.remove(&spec.job_id);
            self.resuming.insert(d.member.clone());
            self.heap.push(Waiting {
                priority: spec.priority,
                seq: 0,
                offered: Offered {
                    task: spec.task_id,
                    priority: spec.priority,
                    traceparent: d.traceparent.clone(),
                    spec,
                    resume: Some(d),
                },
                reported: HashSet::new(),
            });
        }
    }

    /// Whether the task still waits for this parked attempt: not cancelled, finished or
    /// superseded by a later attempt since it parked (a worker would skip it without a result,
    /// and its place would never be freed). When the record cannot be read, it resumes.
    async fn still_wanted(&self, spec: &JobSpec) -> bool {
        match self.state.load_task(spec.task_id).await {
            Ok(Some(task)) => task
                .jobs
                .iter()
                .find(|j| j.id == spec.job_id)
                .is_none_or(|j| !j.status.is_terminal() && j.attempt <= spec.attempt),
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(error = %e, "could not read a parked job's task; resuming it");
                true
            }
        }
    }

    fn charge(&mut self, tokens: u64) {
        // Tokens are charged to every limited key alike: the actor does not keep the job's
        // backend after it was published, and clusters rarely limit more than one key.
        for bucket in self.buckets.values_mut() {
            bucket.charge_tokens(tokens);
        }
    }

    async fn refresh_cap(&mut self) {
        self.cap = match self.config.cap {
            None | Some(Cap::Off) => usize::MAX,
            Some(Cap::Fixed(n)) => n,
            Some(Cap::Auto) => match self.state.workers(Duration::from_secs(15)).await {
                Ok(workers) => workers.iter().map(|w| w.slots as usize).sum(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the worker registry; keeping the cap");
                    self.cap
                }
            },
        };
        metrics::gauge!(crate::metrics::ADMISSION_CAP).set(if self.cap == usize::MAX {
            -1.0
        } else {
            self.cap as f64
        });
    }

    /// Publishes waiting jobs while admission allows, in priority order.
    async fn pump(&mut self) {
        let mut deferred = Vec::new();
        while let Some(mut top) = self.heap.pop() {
            let job = top.offered.spec.job_id;
            if self.withdrawn.remove(&job) {
                if let Some(d) = &top.offered.resume {
                    // Cancelled while parked: it does not run again.
                    self.resuming.remove(&d.member);
                    if let Err(e) = self.state.unpark(d).await {
                        tracing::warn!(error = %e, "could not drop a cancelled parked job");
                    }
                }
                continue;
            }
            if self.admitted.len() >= self.cap {
                self.report(
                    &mut top,
                    "cap",
                    format!("the cluster runs its cap of {} agents", self.cap),
                )
                .await;
                deferred.push(top);
                break;
            }
            if let Some(key) = bucket_key(&self.buckets, &top.offered.spec) {
                let bucket = self.buckets.get_mut(&key).expect("key from the map");
                let wait = bucket.wait();
                if !wait.is_zero() {
                    self.report(
                        &mut top,
                        "rate",
                        format!("rate limit of {key} (next slot in {} ms)", wait.as_millis()),
                    )
                    .await;
                    deferred.push(top);
                    continue;
                }
            }
            if let Some(limit) = self.config.daily_budget_usd {
                let estimate = self.estimate(&top.offered.spec).await;
                match self
                    .state
                    .reserve_daily(job, top.offered.spec.attempt, estimate, limit)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        self.report(
                            &mut top,
                            "budget",
                            format!("daily budget of ${limit} reached (reserving ${estimate:.4})"),
                        )
                        .await;
                        deferred.push(top);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "daily budget reservation failed; the job waits");
                        deferred.push(top);
                        continue;
                    }
                }
            }
            if let Some(key) = bucket_key(&self.buckets, &top.offered.spec) {
                self.buckets
                    .get_mut(&key)
                    .expect("key from the map")
                    .take_request();
            }
            self.admitted.insert(job);
            if top.offered.resume.is_some() {
                self.publish_resumed(top.offered).await;
            } else {
                self.publish(top.offered);
            }
        }
        for w in deferred {
            self.heap.push(w);
        }
        metrics::gauge!(crate::metrics::JOBS_WAITING).set(self.heap.len() as f64);
    }

    /// Tells the task's log once per reason why its job waits.
    async fn report(&self, w: &mut Waiting, why: &'static str, message: String) {
        if !w.reported.insert(why) {
            return;
        }
        let event = Event {
            task_id: w.offered.task,
            job_id: Some(w.offered.spec.job_id),
            attempt: w.offered.spec.attempt,
            at_ms: orch_shared::now_ms(),
            kind: EventKind::JobWaiting { reason: message },
        };
        if let Err(e) = self.transport.publish_all(&[Outgoing::Event(event)]).await {
            tracing::debug!(error = %e, "could not report a waiting job");
        }
    }

    /// The cost reserved for a job: the p90 of its role and model, else the default.
    async fn estimate(&mut self, spec: &JobSpec) -> f64 {
        let key = (
            spec.role.as_str().to_string(),
            spec.model.clone().unwrap_or_else(|| "default".into()),
        );
        if let Some((v, at)) = self.estimates.get(&key)
            && at.elapsed() < Duration::from_secs(60)
        {
            return *v;
        }
        let v = match self.state.job_stats(&key.0, &key.1).await {
            Ok(Some(s)) => s.cost_usd.1,
            _ => self.config.default_job_estimate_usd,
        };
        self.estimates.insert(key, (v, std::time::Instant::now()));
        v
    }

    /// Puts a parked attempt back in its queue, then forgets it in the parked set. One that
    /// fails to go out frees its place again and is taken after its hold.
    async fn publish_resumed(&mut self, offered: Offered) {
        let Some(d) = offered.resume else {
            return;
        };
        self.resuming.remove(&d.member);
        let (job, attempt) = (offered.spec.job_id, offered.spec.attempt);
        let msg_id = orch_shared::subject::unparked_msg_id(job, attempt, d.parks);
        match self
            .transport
            .publish_unparked(&d.subject, msg_id, d.spec.clone(), d.traceparent.as_deref())
            .await
        {
            Ok(()) => {
                tracing::info!(job_id = %job, attempt, parks = d.parks, "parked job admitted back to its queue");
                metrics::counter!(crate::metrics::JOBS_DISPATCHED).increment(1);
                if let Err(e) = self.state.unpark(&d).await {
                    // Taken again after the hold and re-published with the same message id:
                    // JetStream drops the copy.
                    tracing::warn!(error = %e, "could not forget a re-published parked job");
                }
            }
            Err(e) => {
                tracing::warn!(job_id = %job, error = %e, "could not re-publish a parked job; retrying after the hold");
                self.admitted.remove(&job);
            }
        }
    }

    fn publish(&self, offered: Offered) {
        let (transport, served) = (self.transport.clone(), self.served.clone());
        // Publishing must not hold up admission; a failed publish is retried by the
        // coordinator's resume on restart (the record says `queued`).
        tokio::spawn(async move {
            let (task, job, attempt, backend) = (
                offered.spec.task_id,
                offered.spec.job_id,
                offered.spec.attempt,
                offered.spec.backend,
            );
            let mut messages = vec![Outgoing::Job(offered.spec, offered.traceparent)];
            if !served.missing(&[backend].into()).await.is_empty() {
                messages.push(Outgoing::Event(Event {
                    task_id: task,
                    job_id: Some(job),
                    attempt,
                    at_ms: orch_shared::now_ms(),
                    kind: EventKind::JobWaiting {
                        reason: crate::routing::waiting_reason(backend),
                    },
                }));
            }
            if let Err(e) = transport.publish_all(&messages).await {
                tracing::error!(%job, error = %e, "failed to publish an admitted job");
            }
            metrics::counter!(crate::metrics::JOBS_DISPATCHED).increment(1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse() {
        let l = RateLimit::parse("anthropic/claude-haiku=50rpm,400000tpm").unwrap();
        assert_eq!(l.backend, "anthropic");
        assert_eq!(l.model.as_deref(), Some("claude-haiku"));
        assert_eq!(l.requests_per_minute, Some(50));
        assert_eq!(l.tokens_per_minute, Some(400_000));
        assert_eq!(RateLimit::parse("sim=60rpm").unwrap().key(), "sim");
        assert!(RateLimit::parse("sim").is_err());
        assert!(RateLimit::parse("sim=60").is_err());
        assert!(RateLimit::parse("sim=0rpm").is_err());
    }

    #[test]
    fn waiting_jobs_pop_by_priority_then_age() {
        let w = |priority, seq| Waiting {
            priority,
            seq,
            offered: Offered {
                task: TaskId::from_u128(1),
                priority,
                spec: running_marker(JobId::from_u128(seq as u128)),
                traceparent: None,
                resume: None,
            },
            reported: HashSet::new(),
        };
        let mut heap = BinaryHeap::from(vec![
            w(Priority::Low, 1),
            w(Priority::High, 3),
            w(Priority::Normal, 2),
            w(Priority::High, 4),
        ]);
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|w| w.seq)).collect();
        assert_eq!(order, vec![3, 4, 2, 1]);
    }

    #[test]
    fn a_bucket_refuses_when_empty_and_says_how_long() {
        let mut b = Bucket::new(&RateLimit::parse("sim=60rpm").unwrap());
        for _ in 0..10 {
            assert!(b.wait().is_zero());
            b.take_request();
        }
        let wait = b.wait();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_millis(1000),
            "{wait:?}"
        );
    }
}
