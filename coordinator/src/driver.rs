//! Applies job results and job starts to tasks. Tasks are spread over a fixed number of lanes
//! by id; each lane handles its messages one at a time, so the updates of one task never race,
//! while different tasks proceed in parallel. A lane caches the records of the tasks it is
//! driving; the coordinator is the only writer of task records, so the cache stays true.
//!
//! Order per result: apply → save to Redis → publish follow-up jobs and events → ack the result.
//! A crash anywhere before the ack redelivers the result; applying it again is a no-op, and the
//! queued jobs it had produced are published again under the same message ids.

use crate::metrics as m;
use crate::pipeline::{self, Action};
use crate::state::State;
use crate::transport::{Outgoing, ResultDelivery, Transport};
use orch_shared::api::Task;
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::TaskId;
use orch_shared::job::Outcome;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

enum Command {
    Result(Box<ResultDelivery>),
    Started(Event),
}

/// Handle on the lanes.
#[derive(Clone)]
pub struct Driver {
    lanes: Vec<mpsc::Sender<Command>>,
}

impl Driver {
    pub fn start(
        lanes: usize,
        state: State,
        transport: Transport,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let senders = (0..lanes)
            .map(|_| {
                let (tx, rx) = mpsc::channel(1024);
                let lane = Lane {
                    state: state.clone(),
                    transport: transport.clone(),
                    cache: HashMap::new(),
                };
                tracker.spawn(lane.run(rx, cancel.clone()));
                tx
            })
            .collect();
        Self { lanes: senders }
    }

    fn lane(&self, task: TaskId) -> &mpsc::Sender<Command> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        task.hash(&mut h);
        &self.lanes[(h.finish() % self.lanes.len() as u64) as usize]
    }

    pub async fn result(&self, delivery: ResultDelivery) {
        let lane = self.lane(delivery.result.task_id);
        let _ = lane.send(Command::Result(Box::new(delivery))).await;
    }

    pub async fn started(&self, event: Event) {
        let _ = self.lane(event.task_id).send(Command::Started(event)).await;
    }
}

struct Lane {
    state: State,
    transport: Transport,
    cache: HashMap<TaskId, Task>,
}

impl Lane {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, cancel: CancellationToken) {
        loop {
            let cmd = tokio::select! {
                _ = cancel.cancelled() => return,
                cmd = rx.recv() => match cmd { Some(c) => c, None => return },
            };
            match cmd {
                Command::Result(delivery) => self.on_result(*delivery).await,
                Command::Started(event) => self.on_started(event).await,
            }
        }
    }

    /// The task from the cache or Redis.
    async fn task(&mut self, id: TaskId) -> Option<&mut Task> {
        if !self.cache.contains_key(&id) {
            match self.state.load_task(id).await {
                Ok(Some(task)) => {
                    self.cache.insert(id, task);
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(task_id = %id, error = %e, "failed to load task");
                    return None;
                }
            }
        }
        self.cache.get_mut(&id)
    }

    async fn on_result(&mut self, delivery: ResultDelivery) {
        let result = &delivery.result;
        let task_id = result.task_id;
        let now = orch_shared::now_ms();
        let Some(task) = self.task(task_id).await else {
            tracing::warn!(%task_id, job_id = %result.job_id, "result for an unknown task, dropping it");
            metrics::counter!(m::RESULTS_IGNORED, "why" => "unknown_task").increment(1);
            delivery.ack().await;
            return;
        };
        let role = task
            .jobs
            .iter()
            .find(|j| j.id == result.job_id)
            .map(|j| j.role);
        let Some(actions) = pipeline::on_result(task, result, now) else {
            // Stale or duplicate: nothing changed. Publish the jobs it had queued again in case
            // the crash that caused the redelivery came before they were sent.
            metrics::counter!(m::RESULTS_IGNORED, "why" => "duplicate").increment(1);
            let again = pipeline::requeue(task);
            if self.carry_out(task_id, again).await {
                delivery.ack().await;
            }
            return;
        };
        let task = task.clone();
        if let Err(e) = self.state.save_task(&task).await {
            tracing::warn!(%task_id, error = %e, "failed to save task; the result will be redelivered");
            self.cache.remove(&task_id);
            return;
        }
        record_result_metrics(&delivery, role);
        if task.status.is_terminal() {
            metrics::counter!(m::TASKS_FINISHED, "status" => task.status.as_str()).increment(1);
            self.cache.remove(&task_id);
        }
        if self.carry_out(task_id, actions).await {
            delivery.ack().await;
        }
    }

    async fn on_started(&mut self, event: Event) {
        let (Some(job_id), EventKind::JobStarted { worker_id, .. }) = (event.job_id, &event.kind)
        else {
            return;
        };
        let Some(task) = self.task(event.task_id).await else {
            return;
        };
        if pipeline::on_started(task, job_id, event.attempt, worker_id.clone(), event.at_ms) {
            let task = task.clone();
            if let Some(queued) = task
                .jobs
                .iter()
                .find(|j| j.id == job_id)
                .and_then(|j| j.queued_at_ms)
            {
                metrics::histogram!(m::DISPATCH_LATENCY)
                    .record(event.at_ms.saturating_sub(queued) as f64 / 1000.0);
            }
            if let Err(e) = self.state.save_task(&task).await {
                tracing::warn!(task_id = %event.task_id, error = %e, "failed to save job start");
                self.cache.remove(&event.task_id);
            }
        }
    }

    /// Publishes what the state change asks for; on failure the cached task is dropped so the
    /// redelivered result starts from what Redis holds.
    async fn carry_out(&mut self, task_id: TaskId, actions: Vec<Action>) -> bool {
        match perform(&self.transport, task_id, actions).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%task_id, error = %e, "failed to publish follow-ups; the result will be redelivered");
                self.cache.remove(&task_id);
                false
            }
        }
    }
}

fn record_result_metrics(delivery: &ResultDelivery, role: Option<orch_shared::role::Role>) {
    let r = &delivery.result;
    let role = role.map_or("unknown", |r| r.as_str());
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

/// Carries out a task's actions: every event and job in order, in one batch.
pub async fn perform(
    transport: &Transport,
    task_id: TaskId,
    actions: Vec<Action>,
) -> Result<(), crate::transport::Error> {
    if actions.is_empty() {
        return Ok(());
    }
    let now = orch_shared::now_ms();
    let mut jobs = 0;
    let messages: Vec<Outgoing> = actions
        .into_iter()
        .map(|a| match a {
            Action::Publish(spec) => {
                jobs += 1;
                Outgoing::Job(spec)
            }
            Action::Emit(job_id, kind) => Outgoing::Event(Event {
                task_id,
                job_id,
                attempt: 0,
                at_ms: now,
                kind,
            }),
        })
        .collect();
    transport.publish_all(&messages).await?;
    metrics::counter!(m::JOBS_DISPATCHED).increment(jobs);
    Ok(())
}
