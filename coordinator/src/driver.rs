//! Applies job results, job starts, timers and user controls to tasks. Tasks are spread over a
//! fixed number of lanes by id; each lane handles its messages one at a time, so the updates of
//! one task never race, while different tasks proceed in parallel. A lane caches the records of
//! the tasks it is driving (a task the API creates is handed to its lane at once); the
//! coordinator is the only writer of task records, so the cache stays true.
//!
//! Round trips per job: a result is one Redis script (fence check, record, day's spend,
//! estimates) and one batch of publishes; a job start is saved with the task's next save, or
//! after [`START_SAVE_DELAY`] together with the other starts of the lane (starts are best
//! effort: the result carries the same facts).
//!
//! Order per change: apply → save to Redis → carry out the actions (publish jobs and events,
//! arm timers, cancel, dead-letter) → ack the result. A crash anywhere before the ack
//! redelivers the result; applying it again is a no-op, and the queued jobs it had produced are
//! published again under the same message ids.

use crate::admission::Admission;
use crate::metrics as m;
use crate::pipeline::{self, Action};
use crate::state::{self, State};
use crate::transport::{self, Outgoing, ResultDelivery, Transport};
use orch_shared::api::{Task, TaskStatus};
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::{Backend, CancelJob, Outcome, PathsReport};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A user's request on a task.
#[derive(Debug, Clone)]
pub enum Control {
    Cancel,
    Kill(JobId),
    RetryDead(JobId),
    /// A further turn of agent `from` (or a fork of it) as the new agent `new`.
    Turn {
        from: JobId,
        new: JobId,
        message: String,
        fork: bool,
    },
    /// A new agent `new` from agent `from`'s checkpoint after `step` (`from` is stopped
    /// first if it still runs).
    Rewind {
        from: JobId,
        new: JobId,
        step: u32,
        message: String,
    },
    /// A change to the task's pull request (opened, a review round, an escalation).
    Forge(Box<crate::forge::review::Change>),
}

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("task {0} not found")]
    NoTask(TaskId),
    #[error("agent {0} is not part of task {1}")]
    NoJob(JobId, TaskId),
    #[error("agent {0} is not in the dead-letter set")]
    NotDead(JobId),
    #[error(transparent)]
    Turn(#[from] pipeline::TurnError),
    #[error(transparent)]
    Review(#[from] crate::forge::review::ApplyError),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error("the coordinator is shutting down")]
    Closed,
}

enum Command {
    /// A task the API just created: the lane caches it, so its first job start or result
    /// needs no read from Redis.
    Adopt(Box<Task>),
    /// A created task whose record could not be written: the lane drops it from its cache.
    Forget(TaskId),
    Result(Box<ResultDelivery>),
    Started(Event),
    /// A worker's report of the paths its job changed so far.
    Paths(Box<PathsReport>),
    Wake(TaskId),
    Control(TaskId, Control, oneshot::Sender<Result<Task, ControlError>>),
}

/// Handle on the lanes.
#[derive(Clone)]
pub struct Driver {
    lanes: Vec<mpsc::Sender<Command>>,
}

/// What carrying out actions needs.
#[derive(Clone)]
pub struct Effects {
    pub state: State,
    pub transport: Transport,
    pub driver: Driver,
    pub admission: Admission,
    /// The forge pull requests are opened on, when one is configured.
    pub forge: Option<crate::forge::Handle>,
    /// Which backends the live workers run (a job for another says why it waits).
    pub served: crate::routing::Served,
}

impl Driver {
    #[allow(
        clippy::too_many_arguments,
        reason = "what every lane's Effects holds, plus the lanes' own settings"
    )]
    pub fn start(
        lanes: usize,
        state: State,
        transport: Transport,
        admission: Admission,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        snapshot_after: Duration,
        forge: Option<crate::forge::Handle>,
    ) -> Self {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..lanes).map(|_| mpsc::channel(1024)).unzip();
        let driver = Driver { lanes: senders };
        for rx in receivers {
            let lane = Lane {
                meter: Default::default(),
                fx: Effects {
                    state: state.clone(),
                    transport: transport.clone(),
                    driver: driver.clone(),
                    admission: admission.clone(),
                    forge: forge.clone(),
                    served: crate::routing::Served::new(state.clone()),
                },
                cache: HashMap::new(),
                ended: Ended::default(),
                unsaved_starts: HashSet::new(),
                save_starts_at: None,
                snapshot_after_ms: snapshot_after.as_millis() as u64,
            };
            tracker.spawn(lane.run(rx, cancel.clone()));
        }
        driver
    }

    fn lane(&self, task: TaskId) -> &mpsc::Sender<Command> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        task.hash(&mut h);
        &self.lanes[(h.finish() % self.lanes.len() as u64) as usize]
    }

    /// Drops a task the API created but could not record from its lane's cache, so nothing
    /// is applied to it (see `http::tasks::create_and_publish`).
    pub async fn forget(&self, task: TaskId) {
        let _ = self.lane(task).send(Command::Forget(task)).await;
    }

    pub async fn result(&self, delivery: ResultDelivery) {
        let lane = self.lane(delivery.result.task_id);
        let _ = lane.send(Command::Result(Box::new(delivery))).await;
    }

    pub async fn started(&self, event: Event) {
        let _ = self.lane(event.task_id).send(Command::Started(event)).await;
    }

    pub async fn paths(&self, report: PathsReport) {
        let lane = self.lane(report.task_id);
        let _ = lane.send(Command::Paths(Box::new(report))).await;
    }

    /// Applies a user's request in the task's lane and returns the task afterwards.
    pub async fn control(&self, task: TaskId, control: Control) -> Result<Task, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.lane(task)
            .send(Command::Control(task, control, tx))
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)?
    }

    /// Wakes the task's lane at `at_ms` (retries and deadlines). The timer is a detached
    /// task: if the coordinator stops first, the restarted one re-arms it from the record.
    fn wake_at(&self, task: TaskId, at_ms: u64) {
        let lane = self.lane(task).clone();
        let delay = at_ms.saturating_sub(orch_shared::now_ms());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            let _ = lane.send(Command::Wake(task)).await;
        });
    }
}

impl Effects {
    /// Carries out a task's actions: events and jobs in order in one batch (jobs go through
    /// admission instead when it is on), then timers, cancellations and dead letters.
    pub async fn perform(&self, task: &Task, actions: Vec<Action>) -> Result<(), ControlError> {
        if actions.is_empty() {
            return Ok(());
        }
        let (task_id, priority) = (task.id, task.options.priority);
        if !task.status.is_terminal()
            && actions
                .iter()
                .any(|a| matches!(a, Action::Emit(_, EventKind::TaskCreated { .. })))
        {
            // Before its jobs are published, so the adoption is ahead of any event about
            // them in the lane. Without room in the lane the task is read when needed.
            let _ = self
                .driver
                .lane(task_id)
                .try_send(Command::Adopt(Box::new(task.clone())));
        }
        let now = orch_shared::now_ms();
        let mut jobs = 0;
        let mut messages = Vec::new();
        // Open until the jobs are stored (their end is the publish's).
        let mut dispatches = Vec::new();
        // Jobs published now, by backend: those no live worker runs are said to wait.
        let mut published: Vec<(JobId, u32, Backend)> = Vec::new();
        for action in actions {
            match action {
                Action::Publish(spec) => {
                    let span = dispatch_span(task, &spec);
                    let traceparent = span.as_ref().and_then(orch_config::telemetry::traceparent);
                    dispatches.extend(span);
                    if self.admission.enabled() {
                        self.admission.offer(task_id, priority, *spec, traceparent);
                    } else {
                        jobs += 1;
                        published.push((spec.job_id, spec.attempt, spec.backend));
                        messages.push(Outgoing::Job(*spec, traceparent));
                    }
                }
                Action::Emit(job_id, kind) => {
                    crate::meter::emitted(&kind);
                    // A task's end is stamped with its record's end time, so that writing it
                    // again from the record makes the same message (`pipeline::finished_event`).
                    let at_ms = match kind {
                        EventKind::TaskFinished { .. } => task.finished_at_ms.unwrap_or(now),
                        _ => now,
                    };
                    messages.push(Outgoing::Event(Event {
                        task_id,
                        job_id,
                        attempt: 0,
                        at_ms,
                        kind,
                    }));
                }
                Action::WakeAt(at) => self.driver.wake_at(task_id, at),
                Action::Cancel { job, attempt } => {
                    self.admission.done(job, 0);
                    self.state.mark_cancelled(job, attempt).await?;
                    let cancel = CancelJob {
                        job_id: job,
                        attempt,
                        reason: "cancelled".into(),
                    };
                    self.transport.publish_cancel(&cancel).await?;
                }
                Action::DeadLetter(job) => self.state.dead_letter(job, now).await?,
                Action::Index(jobs) => self.state.index_jobs(task_id, &jobs).await?,
                Action::Snapshot => messages.push(Outgoing::Snapshot(task)),
            }
        }
        let wanted = published.iter().map(|(_, _, b)| *b).collect();
        let missing = self.served.missing(&wanted).await;
        for (job, attempt, backend) in published {
            if missing.contains(&backend) {
                messages.push(Outgoing::Event(Event {
                    task_id,
                    job_id: Some(job),
                    attempt,
                    at_ms: now,
                    kind: EventKind::JobWaiting {
                        reason: crate::routing::waiting_reason(backend),
                    },
                }));
            }
        }
        self.transport.publish_all(&messages).await?;
        drop(dispatches);
        metrics::counter!(m::JOBS_DISPATCHED).increment(jobs);
        Ok(())
    }
}

/// The span of one job's dispatch, a child of the task's submit span, when traces are
/// exported and the task has one. Its `traceparent` travels in the job's NATS message.
fn dispatch_span(task: &Task, spec: &orch_shared::job::JobSpec) -> Option<tracing::Span> {
    if !orch_config::telemetry::enabled() {
        return None;
    }
    let parent = task.traceparent.as_deref()?;
    let span = tracing::info_span!(
        parent: None,
        "dispatch",
        otel.kind = "producer",
        task_id = %task.id,
        job_id = %spec.job_id,
        attempt = spec.attempt,
        role = %spec.role,
    );
    orch_config::telemetry::set_parent(&span, Some(parent));
    Some(span)
}

/// The ids of the last [`Ended::KEPT`] tasks that ended in a lane, oldest first out. A job
/// start arriving after its task's result is common for short jobs; this lets the lane drop
/// it without reading the finished task from Redis. Forgetting an id early costs only that
/// read.
#[derive(Default)]
struct Ended {
    order: VecDeque<TaskId>,
    ids: HashSet<TaskId>,
}

impl Ended {
    const KEPT: usize = 1024;

    fn insert(&mut self, id: TaskId) {
        if self.ids.insert(id) {
            self.order.push_back(id);
        }
        while self.order.len() > Self::KEPT {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    fn remove(&mut self, id: TaskId) {
        self.ids.remove(&id);
    }

    fn contains(&self, id: TaskId) -> bool {
        self.ids.contains(&id)
    }
}

/// A result for a task without a record is delivered this many times, a second apart,
/// before it is dropped.
const UNKNOWN_TASK_DELIVERIES: i64 = 3;

/// How long a job start waits in a lane before its task is saved. The start is best effort
/// (the result carries the same facts), and a short job's result usually arrives within this
/// time: its save then carries the start too, and the start costs no write of its own.
const START_SAVE_DELAY: Duration = Duration::from_millis(5);

struct Lane {
    fx: Effects,
    meter: crate::meter::JobMeter,
    cache: HashMap<TaskId, Task>,
    /// Tasks that ended here lately (they leave the cache when they end).
    ended: Ended,
    /// Cached tasks whose job start is not saved yet, and when they will be.
    unsaved_starts: HashSet<TaskId>,
    save_starts_at: Option<tokio::time::Instant>,
    /// Past this age a task gets a snapshot with each save (see [`Lane::keep_durable`]).
    snapshot_after_ms: u64,
}

impl Lane {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, cancel: CancellationToken) {
        loop {
            let save_starts = async {
                match self.save_starts_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let cmd = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = save_starts => {
                    self.save_starts().await;
                    continue;
                }
                cmd = rx.recv() => match cmd { Some(c) => c, None => break },
            };
            match cmd {
                Command::Adopt(task) => {
                    self.cache.entry(task.id).or_insert(*task);
                }
                Command::Forget(task) => {
                    self.cache.remove(&task);
                    self.unsaved_starts.remove(&task);
                }
                Command::Result(delivery) => self.on_result(*delivery).await,
                Command::Started(event) => self.on_started(event).await,
                Command::Paths(report) => {
                    let now = orch_shared::now_ms();
                    let changed = self
                        .change(report.task_id, |t| {
                            crate::conflicts::on_paths(t, &report, now)
                        })
                        .await;
                    if let Err(e) = changed {
                        tracing::warn!(task_id = %report.task_id, error = %e, "failed to apply a paths report");
                    }
                }
                Command::Wake(task) => {
                    let now = orch_shared::now_ms();
                    let _ = self.change(task, |t| Some(pipeline::on_wake(t, now))).await;
                }
                Command::Control(task, control, reply) => {
                    let _ = reply.send(self.on_control(task, control).await);
                }
            }
        }
        self.save_starts().await;
    }

    /// Saves the tasks whose job starts were applied but not saved, in one round trip.
    async fn save_starts(&mut self) {
        self.save_starts_at = None;
        let tasks: Vec<&Task> = self
            .unsaved_starts
            .drain()
            .filter_map(|id| self.cache.get(&id))
            .collect();
        if tasks.is_empty() {
            return;
        }
        if let Err(e) = self.fx.state.save_tasks(&tasks).await {
            // Best effort, like the start itself: the job's result carries the same facts.
            tracing::warn!(tasks = tasks.len(), error = %e, "failed to save job starts");
            return;
        }
        let old: Vec<Task> = tasks
            .into_iter()
            .filter(|t| self.is_old(t))
            .cloned()
            .collect();
        for task in old {
            if let Err(e) = self.fx.perform(&task, vec![Action::Snapshot]).await {
                tracing::warn!(task_id = %task.id, error = %e, "failed to snapshot a task");
            }
        }
    }

    /// Whether `task` is old enough for its creation message to leave the event log (after
    /// the log's max age) before it ends.
    fn is_old(&self, task: &Task) -> bool {
        orch_shared::now_ms().saturating_sub(task.created_at_ms) > self.snapshot_after_ms
    }

    /// Until its first snapshot a task's durable record is the one in its creation message,
    /// which the event log drops after its max age: a task older than half of it gets a
    /// snapshot with each save, so a rebuild of Redis always finds it.
    fn keep_durable(&self, task: &Task, actions: &mut Vec<Action>) {
        if self.is_old(task) && !actions.iter().any(|a| matches!(a, Action::Snapshot)) {
            actions.push(Action::Snapshot);
        }
    }

    /// Records that `id` was saved whole (so its pending start is saved too).
    fn saved(&mut self, id: TaskId) {
        self.unsaved_starts.remove(&id);
    }

    /// A finished task leaves the cache; its id is remembered for a while (see [`Ended`]).
    fn uncache_ended(&mut self, id: TaskId) {
        self.cache.remove(&id);
        self.ended.insert(id);
    }

    /// The task from the cache or Redis.
    async fn task(&mut self, id: TaskId) -> Result<Option<&mut Task>, state::Error> {
        if !self.cache.contains_key(&id) {
            match self.fx.state.load_task(id).await? {
                Some(task) => {
                    // Read again (to be reopened, say): it is no longer known as ended.
                    self.ended.remove(id);
                    self.cache.insert(id, task);
                }
                None => return Ok(None),
            }
        }
        Ok(self.cache.get_mut(&id))
    }

    /// Applies `f` to the task; if it returns actions, saves the task and carries them out.
    /// Returns the task afterwards (`None` when it does not exist).
    async fn change(
        &mut self,
        id: TaskId,
        f: impl FnOnce(&mut Task) -> Option<Vec<Action>>,
    ) -> Result<Option<Task>, ControlError> {
        let Some(task) = self.task(id).await? else {
            return Ok(None);
        };
        let before = task.status;
        let Some(actions) = f(task) else {
            let task = task.clone();
            if task.status.is_terminal() {
                // Nothing changed: a finished task is not kept in the cache.
                self.uncache_ended(id);
            }
            return Ok(Some(task));
        };
        let task = task.clone();
        let saved = self.fx.state.save_task(&task).await;
        if let Err(e) = saved {
            self.cache.remove(&id);
            return Err(e.into());
        }
        self.saved(id);
        self.after_save(before, &task, actions).await?;
        Ok(Some(task))
    }

    /// What follows a saved change: a finished task leaves the cache; the actions are carried
    /// out (on failure the task leaves the cache too, so it is read again from Redis).
    async fn after_save(
        &mut self,
        before: TaskStatus,
        task: &Task,
        mut actions: Vec<Action>,
    ) -> Result<(), ControlError> {
        self.keep_durable(task, &mut actions);
        if task.status.is_terminal() {
            if !before.is_terminal() {
                metrics::counter!(m::TASKS_FINISHED, "status" => task.status.as_str()).increment(1);
            }
            self.uncache_ended(task.id);
        }
        if let Err(e) = self.fx.perform(task, actions).await {
            self.cache.remove(&task.id);
            return Err(e);
        }
        self.pull_request_step(task);
        Ok(())
    }

    /// A task whose pull request needs a step now (opened when the task completes or its
    /// check starts, marked ready when the check passed) gets it, off the lane (the forge may
    /// be slow). The step is read from the saved record alone: if this coordinator stops
    /// first, the next leader's pending sweep takes it ([`crate::forge::service::run_pending`]).
    fn pull_request_step(&self, task: &Task) {
        let Some(handle) = &self.fx.forge else {
            return;
        };
        if crate::forge::next_step(task).is_none() {
            return;
        }
        let (fx, handle, task) = (self.fx.clone(), handle.clone(), task.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::forge::service::advance(&fx, &handle, &task, false).await {
                tracing::warn!(task_id = %task.id, error = %e, "pull request step not recorded");
            }
        });
    }

    /// Applies a job result. One Redis round trip checks the attempt's fence and saves the
    /// task with the result's bookkeeping (day's spend, estimates); a fenced-out result
    /// changes nothing (the cached copy, already changed, is dropped and read again later).
    async fn on_result(&mut self, delivery: ResultDelivery) {
        let (result, ack) = delivery.into_parts();
        let task_id = result.task_id;
        let task = match self.task(task_id).await {
            Ok(Some(task)) => task,
            Ok(None) if ack.delivered() < UNKNOWN_TASK_DELIVERIES => {
                // A record written at the same time as the task's first publish (on a former
                // leader's connection) may still be on its way.
                tracing::info!(%task_id, job_id = %result.job_id, "result for a task not known yet; trying again shortly");
                ack.retry_after(Duration::from_secs(1)).await;
                return;
            }
            Ok(None) => {
                tracing::warn!(%task_id, job_id = %result.job_id, "result for an unknown task, dropping it");
                metrics::counter!(m::RESULTS_IGNORED, "why" => "unknown_task").increment(1);
                ack.ack().await;
                return;
            }
            Err(e) => {
                tracing::warn!(%task_id, error = %e, "failed to apply a result; it will be redelivered");
                return;
            }
        };
        let before = task.status;
        let role = task
            .jobs
            .iter()
            .find(|j| j.id == result.job_id)
            .map(|j| j.role);
        let now = orch_shared::now_ms();
        let (actions, applied) = match pipeline::on_result(task, &result, now) {
            Some(actions) => (actions, true),
            // Stale or duplicate: nothing changed. Publish the jobs it had queued again in
            // case the crash that caused the redelivery came before they were sent, and the
            // task's end if it ended lately: the leader that applied the result may have died
            // before its `task_finished` was stored (the log drops it if it was, by its
            // message id, inside the dedup window; an older end is not written again).
            None => {
                let mut actions: Vec<Action> = pipeline::resume(task)
                    .into_iter()
                    .filter(|a| matches!(a, Action::Publish(_)))
                    .collect();
                if let Some(ended) = task.finished_at_ms
                    && task.status.is_terminal()
                    && now.saturating_sub(ended) + 10_000
                        < transport::EVENTS_DEDUP_WINDOW.as_millis() as u64
                {
                    actions.push(Action::Emit(None, pipeline::finished_event(task)));
                }
                (actions, false)
            }
        };
        // Out of the cache while it is saved and its actions carried out (nothing else in
        // this lane runs meanwhile); it goes back only if all of that succeeds and it is not
        // finished, like every failure below leaves it to be read again from Redis.
        let Some(task) = self.cache.remove(&task_id) else {
            return;
        };
        let role = role.map_or("unknown", |r| r.as_str());
        let model = task.model.as_deref().unwrap_or("default");
        let write = state::ResultWrite {
            job: result.job_id,
            attempt: result.attempt,
            fence: result.fence,
            // The day's spend counts every attempt's cost once, applied or not (a cancelled
            // job's late report included).
            cost_usd: result.cost_usd,
            usage: result.usage,
            finished_at_ms: result.finished_at_ms,
            stats: (applied && result.outcome.is_success()).then(|| state::JobFigures {
                role,
                model,
                duration_ms: result.duration_ms(),
                cost_usd: result.cost_usd,
                tokens: result.usage.total(),
            }),
            session: result.session.as_ref(),
        };
        match self.fx.state.save_result(&task, &write).await {
            Ok(true) => {
                self.meter.finished(&task, &result);
                self.saved(task_id);
            }
            Ok(false) => {
                // A worker that lost its lease (paused, partitioned) reports late: another
                // worker took the attempt since. Its result is not applied nor charged (the
                // changed copy is dropped).
                tracing::warn!(%task_id, job_id = %result.job_id, fence = result.fence, worker = %result.worker_id, "fenced out a stale result");
                metrics::counter!(m::RESULTS_IGNORED, "why" => "fenced").increment(1);
                ack.ack().await;
                return;
            }
            Err(e) => {
                tracing::warn!(%task_id, error = %e, "failed to apply a result; it will be redelivered");
                return;
            }
        }
        if !applied {
            metrics::counter!(m::RESULTS_IGNORED, "why" => "duplicate").increment(1);
        }
        if let Err(e) = self.after_save(before, &task, actions).await {
            tracing::warn!(%task_id, error = %e, "failed to apply a result; it will be redelivered");
            return;
        }
        if applied {
            self.fx.admission.done(result.job_id, result.usage.total());
            record(&result, role);
        }
        if !task.status.is_terminal() {
            self.cache.insert(task_id, task);
        }
        ack.ack().await;
    }

    /// Marks the job running in the cached task; the save follows within
    /// [`START_SAVE_DELAY`], or comes with the task's next save if that is sooner.
    async fn on_started(&mut self, event: Event) {
        if let (Some(job_id), EventKind::JobParked { parked }) = (event.job_id, &event.kind) {
            return self.on_parked(job_id, &event, parked.clone()).await;
        }
        let (
            Some(job_id),
            EventKind::JobStarted {
                worker_id, sandbox, ..
            },
        ) = (event.job_id, &event.kind)
        else {
            return;
        };
        self.meter.started(&event);
        if !self.cache.contains_key(&event.task_id) && self.ended.contains(event.task_id) {
            // The result came first (a short job's start and result travel on two consumers):
            // the start changes nothing, and reading the finished task back would cost a
            // Redis read per such task.
            return;
        }
        let task = match self.task(event.task_id).await {
            Ok(Some(task)) => task,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(task_id = %event.task_id, error = %e, "failed to apply a job start");
                return;
            }
        };
        let queued_at = task
            .jobs
            .iter()
            .find(|j| j.id == job_id)
            .and_then(|j| j.queued_at_ms);
        let was_parked = task
            .jobs
            .iter()
            .any(|j| j.id == job_id && j.status == orch_shared::api::JobStatus::Parked);
        if !pipeline::on_started(task, job_id, event.attempt, worker_id.clone(), event.at_ms) {
            // A start that arrives after its task ended (it raced the result) must not keep
            // the finished task in the cache for good.
            if task.status.is_terminal() {
                self.uncache_ended(event.task_id);
            }
            return;
        }
        if let Some(job) = task.jobs.iter_mut().find(|j| j.id == job_id) {
            job.sandbox.clone_from(sandbox);
        }
        if was_parked {
            // Resumed: it holds a place again (admission counted it already when it woke the
            // job; a worker's waker, with no coordinator gating, did not).
            self.fx.admission.running(job_id);
        }
        if let Some(q) = queued_at {
            metrics::histogram!(m::DISPATCH_LATENCY)
                .record(event.at_ms.saturating_sub(q) as f64 / 1000.0);
        }
        self.unsaved_starts.insert(event.task_id);
        self.save_starts_at
            .get_or_insert_with(|| tokio::time::Instant::now() + START_SAVE_DELAY);
    }

    /// Marks the job parked in the cached task (saved like a start).
    async fn on_parked(&mut self, job_id: JobId, event: &Event, parked: orch_shared::api::Parked) {
        if !self.cache.contains_key(&event.task_id) && self.ended.contains(event.task_id) {
            return;
        }
        let task = match self.task(event.task_id).await {
            Ok(Some(task)) => task,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(task_id = %event.task_id, error = %e, "failed to apply a job park");
                return;
            }
        };
        if !pipeline::on_parked(task, job_id, event.attempt, parked) {
            if task.status.is_terminal() {
                self.uncache_ended(event.task_id);
            }
            return;
        }
        // Parked, it holds no admission place until it resumes.
        self.fx.admission.parked(job_id);
        self.unsaved_starts.insert(event.task_id);
        self.save_starts_at
            .get_or_insert_with(|| tokio::time::Instant::now() + START_SAVE_DELAY);
    }

    async fn on_control(&mut self, id: TaskId, control: Control) -> Result<Task, ControlError> {
        let now = orch_shared::now_ms();
        if let Control::RetryDead(job) = control
            && !self.fx.state.undead_letter(job).await?
        {
            return Err(ControlError::NotDead(job));
        }
        let mut missing_job = None;
        let mut turn_error = None;
        let mut review_error = None;
        let retrying = matches!(control, Control::RetryDead(_));
        let task = self
            .change(id, |task| match control {
                Control::Turn {
                    from,
                    new,
                    message,
                    fork,
                } => match pipeline::add_turn(task, from, new, &message, fork, now) {
                    Ok(actions) => Some(actions),
                    Err(e) => {
                        turn_error = Some(e);
                        None
                    }
                },
                Control::Rewind {
                    from,
                    new,
                    step,
                    message,
                } => match pipeline::add_rewind(task, from, new, step, &message, now) {
                    Ok(actions) => Some(actions),
                    Err(e) => {
                        turn_error = Some(e);
                        None
                    }
                },
                Control::Forge(change) => match crate::forge::review::apply(task, *change, now) {
                    Ok(actions) => Some(actions),
                    Err(e) => {
                        review_error = Some(e);
                        None
                    }
                },
                Control::Cancel => Some(pipeline::cancel(task, "cancelled by a user", now)),
                Control::Kill(job) => {
                    let out = pipeline::kill(task, job, now);
                    if out.is_none() {
                        missing_job = Some(job);
                    }
                    out
                }
                Control::RetryDead(job) => {
                    let out = pipeline::retry_dead(task, job, now);
                    if out.is_none() {
                        missing_job = Some(job);
                    }
                    out
                }
            })
            .await?
            .ok_or(ControlError::NoTask(id))?;
        if let Some(e) = turn_error {
            return Err(e.into());
        }
        if let Some(e) = review_error {
            return Err(e.into());
        }
        if let Some(job) = missing_job {
            if retrying {
                // Put it back: nothing was retried.
                self.fx.state.dead_letter(job, now).await?;
                return Err(ControlError::NotDead(job));
            }
            return Err(ControlError::NoJob(job, id));
        }
        Ok(task)
    }
}

/// Counts an applied result in the metrics (its figures for estimates are saved with the task).
fn record(r: &orch_shared::job::JobResult, role: &'static str) {
    let (outcome, reason) = match &r.outcome {
        Outcome::Success => ("success", "none"),
        Outcome::Failure { reason, .. } => ("failure", reason.as_str()),
    };
    metrics::counter!(m::JOBS_FINISHED, "outcome" => outcome, "reason" => reason).increment(1);
    metrics::histogram!(m::JOB_DURATION, "role" => role).record(r.duration_ms() as f64 / 1000.0);
    for (kind, n) in [
        ("input", r.usage.input_tokens),
        ("output", r.usage.output_tokens),
        ("cache_write", r.usage.cache_creation_tokens),
        ("cache_read", r.usage.cache_read_tokens),
    ] {
        metrics::counter!(m::TOKENS, "role" => role, "kind" => kind).increment(n);
    }
    metrics::gauge!(m::COST_USD, "role" => role).increment(r.cost_usd);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_tasks_are_remembered_up_to_a_bound_oldest_forgotten_first() {
        let mut ended = Ended::default();
        let ids: Vec<TaskId> = (0..=Ended::KEPT).map(|_| TaskId::new()).collect();
        for id in &ids {
            ended.insert(*id);
        }
        assert!(!ended.contains(ids[0]), "the oldest is forgotten");
        assert!(ended.contains(ids[1]) && ended.contains(ids[Ended::KEPT]));
        assert!(ended.order.len() <= Ended::KEPT && ended.ids.len() <= Ended::KEPT);
        // A task read again (reopened) is no longer known as ended.
        ended.remove(ids[5]);
        assert!(!ended.contains(ids[5]));
        ended.insert(ids[5]);
        assert!(ended.contains(ids[5]));
        assert!(ended.order.len() <= Ended::KEPT);
    }
}
