//! The per-task event log. The coordinator and the workers append [`Event`]s to one JetStream
//! stream (subject `orch.events.<task>.<kind>`); clients replay it as server-sent events, and a
//! reconnecting client resumes after the [`EventId`] it saw last. Events that are ready together
//! (an agent's burst of output) travel as one [`EventBatch`] message.

use crate::ids::{JobId, TaskId, WorkerId};
use crate::job::{FailureReason, Usage};
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;

/// One entry of a task's event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub task_id: TaskId,
    /// Set for job events; `None` for task-level events.
    #[serde(default)]
    pub job_id: Option<JobId>,
    #[serde(default)]
    pub attempt: u32,
    pub at_ms: u64,
    pub kind: EventKind,
}

/// A planned step as announced in [`EventKind::TaskCreated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepInfo {
    pub job_id: JobId,
    pub role: Role,
}

/// What happened. Task-level kinds come from the coordinator, job-level kinds from the worker.
///
/// Its names (`name`, [`EventKind::VARIANTS`]) are derived with the same spelling as serde's
/// `type` tag, so the list of kinds cannot drift from the enum.
#[derive(
    Clone,
    Debug,
    PartialEq,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::VariantNames,
    utoipa::ToSchema,
)]
#[serde(tag = "type", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EventKind {
    /// The task was accepted with this plan.
    TaskCreated { mode: String, steps: Vec<StepInfo> },
    /// The planner agent's plan was accepted (or, with `rejected`, the rules' plan replaced it):
    /// these steps were added to the task.
    TaskPlanned {
        source: String,
        steps: Vec<StepInfo>,
        rejected: Option<String>,
    },
    /// A job is ready but waits: the cluster is at its cap, a rate limit or the daily budget
    /// holds it back. It is dispatched as soon as that clears (sent once per wait).
    JobWaiting { reason: String },
    /// A job was published to the work queue.
    JobQueued { role: Role, step: u32 },
    /// A job will not run (a step it depends on failed, or the budget ran out).
    JobSkipped { reason: String },
    /// A job attempt failed with a retryable error; the next attempt is due at `retry_at_ms`.
    JobRetrying {
        reason: FailureReason,
        message: String,
        next_attempt: u32,
        retry_at_ms: u64,
    },
    /// A job was stopped by a user or a task deadline; it is never redelivered.
    JobCancelled { reason: String },
    /// A job failed for good and went to the dead-letter set.
    JobDeadLettered { reason: FailureReason },
    /// A worker started the agent.
    JobStarted {
        worker_id: WorkerId,
        role: Role,
        backend: String,
        model: Option<String>,
        delivery: u64,
        /// When the worker started the agent, in microseconds since the epoch (`at_ms` is in
        /// milliseconds): the exact end of the job's wait in the queue. 0 from older workers.
        #[serde(default)]
        started_at_us: u64,
        /// What the job's agent sandbox allows (writable paths, hosts, limits), in one line;
        /// `None` when the worker runs agents without a sandbox (or is older).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sandbox: Option<String>,
    },
    /// The agent is thinking (no output yet).
    Thinking,
    /// Text the agent produced.
    Text { text: String },
    /// The agent called a tool.
    ToolCall {
        call_id: String,
        name: String,
        input: String,
    },
    /// A tool answered.
    ToolResult {
        call_id: String,
        output: String,
        is_error: bool,
    },
    /// An MCP server of the job (its role's or its task's) started and offered `tools` tools
    /// to the agent (`withheld`: those its role's tool rules deny), or did not start (`error`,
    /// and the job fails).
    McpServer {
        server: String,
        tools: u32,
        withheld: u32,
        error: Option<String>,
    },
    /// The agent's sandbox refused a connection (a host its role does not allow).
    SandboxRefused { target: String },
    /// The agent asked to use a tool that needs a person's approval (`orchctl approvals`):
    /// the request `id`, the tool, what it would do (command, path or diff, shortened) and
    /// when it is denied unanswered.
    ApprovalRequested {
        id: String,
        tool: String,
        summary: String,
        deadline_ms: u64,
    },
    /// A request was answered: `decision` is `approved` or `denied` (`by` is `deadline` when
    /// nobody answered in time); `message` is what the agent was told.
    ApprovalAnswered {
        id: String,
        decision: String,
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// Token usage so far for this job (cumulative).
    Usage { usage: Usage, cost_usd: f64 },
    /// The agent's conversation neared its model's context window, so its earlier rounds were
    /// replaced by a summary the model wrote (one request, counted in `usage`): the context
    /// the request before it used and the one after it (`None` when no request followed).
    Compacted {
        tokens_before: u64,
        tokens_after: Option<u64>,
        /// Tool rounds summarized.
        rounds: u32,
    },
    /// The job is still running (sent with every in-progress ack).
    Heartbeat,
    /// The worker saved a checkpoint of the agent after `step` (its conversation and
    /// workspace, see `orchctl agents checkpoints`): a worker that takes the attempt over
    /// resumes from here.
    Checkpointed {
        step: u32,
        files_changed: u32,
        /// Tokens the attempt had spent by then.
        usage: Usage,
        /// How long the worker took to save it (the agent does not wait for it).
        #[serde(default)]
        took_ms: u64,
    },
    /// The attempt resumed from a checkpoint an earlier run of it left (that run's worker
    /// died or handed it back) instead of starting over: it starts after `from_step`, and
    /// `usage`/`cost_usd` are what the earlier run had spent up to there (counted in this
    /// attempt's totals).
    Resumed {
        from_attempt: u32,
        from_step: u32,
        from_worker: String,
        usage: Usage,
        cost_usd: f64,
        /// A rewind: the agent whose checkpoint this one started from (its spending stays
        /// that agent's, `usage`/`cost_usd` are then not counted here).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_agent: Option<JobId>,
        /// Why the workspace's files were not restored to the checkpoint (a plain local
        /// directory: they are as the earlier run left them); `None` when they were.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        files_not_restored: Option<String>,
    },
    /// A checkpoint was found but could not be restored: the attempt starts over (why).
    ResumeFailed { reason: String },
    /// The job attempt ended.
    JobFinished {
        success: bool,
        reason: Option<FailureReason>,
        message: Option<String>,
        usage: Usage,
        cost_usd: f64,
        duration_ms: u64,
    },
    /// The task's pull request was opened (or found open from an earlier attempt), as a
    /// draft while the task's check runs.
    PrOpened {
        number: u64,
        url: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        draft: bool,
    },
    /// The task's check passed: its draft pull request is ready for review.
    PrReady { number: u64 },
    /// The pull request could not be opened (why); `orchctl pr sync` tries again.
    PrFailed { reason: String },
    /// Review comments on the pull request's head went back to the agents that own the
    /// files they touch, as follow-up turns (round `round`).
    PrReviewed {
        round: u32,
        head: String,
        comments: u32,
        agents: Vec<JobId>,
    },
    /// The review loop stopped and asks a person: too many rounds, a finding that came back,
    /// or a diff grown past its bound (why).
    PrEscalated { reason: String },
    /// The task ended.
    TaskFinished {
        status: String,
        usage: Usage,
        cost_usd: f64,
        duration_ms: u64,
        /// The task completed with a pull request still to open or to mark ready: its
        /// outcome (`pr_opened` ready for review, `pr_ready` or `pr_failed`) follows, and a
        /// follower of the task's events goes on to it ([`LogEnd`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pr_pending: bool,
    },
    /// The job attempt was parked: it holds no worker slot and no attempt is burnt; it runs
    /// again (from its checkpoint, on any worker) at `parked.until_ms` or, for an approval,
    /// as soon as the request is answered.
    JobParked { parked: crate::api::Parked },
    /// Two running agents of the task touch the same paths, seen as they work (before their
    /// branches are merged): the event's agent changed `paths`, which agent `other` changed
    /// too (`kind` `same_file`) or which are inside `other`'s declared scope (`scope`). Sent
    /// once per pair of agents and path.
    ConflictWarning {
        other: JobId,
        role: Role,
        other_role: Role,
        kind: String,
        paths: Vec<String>,
    },
    /// The agent's workspace could not be checkpointed: its tree takes `tree_bytes`, over the
    /// `bound_bytes` a checkpoint stores (`[checkpoints] max_tree_bytes`). Sent once per job
    /// attempt run; the conversation is not checkpointed either (it would resume in the wrong
    /// files), so a redelivered attempt starts over.
    CheckpointSkipped {
        step: u32,
        tree_bytes: u64,
        bound_bytes: u64,
    },
}

impl EventKind {
    /// The last token of the event's subject.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Whether the event may travel in an [`EventBatch`]. Lifecycle events that services and
    /// clients follow by subject (`orch.events.*.<kind>`) always travel alone; `job_finished`
    /// travels with the agent's last output (readers by kind read the batches too).
    pub fn batchable(&self) -> bool {
        !matches!(
            self,
            EventKind::JobStarted { .. }
                | EventKind::JobParked { .. }
                | EventKind::JobRetrying { .. }
                | EventKind::JobDeadLettered { .. }
                | EventKind::Heartbeat
                | EventKind::TaskFinished { .. }
        )
    }

    /// Whether this event is a `task_finished` (a follower ends at [`LogEnd`], which also
    /// waits for a pull request's outcome).
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::TaskFinished { .. })
    }

    /// Whether this event is the outcome of a task's pull request step: opened ready for
    /// review, marked ready, or failed.
    pub fn is_pr_outcome(&self) -> bool {
        matches!(
            self,
            EventKind::PrOpened { draft: false, .. }
                | EventKind::PrReady { .. }
                | EventKind::PrFailed { .. }
        )
    }
}

/// Where a follower of a task's events stops: at `task_finished`, or, when that says a pull
/// request step follows (`pr_pending`), at the step's outcome. Feed it every event in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogEnd {
    awaiting_pr: bool,
}

impl LogEnd {
    /// A follower that starts after the task's `task_finished`: `awaiting_pr` when the task's
    /// pull request step is still to come ([`crate::api::Task::pr_pending`]).
    pub fn resumed(awaiting_pr: bool) -> Self {
        Self { awaiting_pr }
    }

    /// Whether `kind` ends what is followed.
    pub fn ends(&mut self, kind: &EventKind) -> bool {
        match kind {
            EventKind::TaskFinished { pr_pending, .. } => {
                self.awaiting_pr = *pr_pending;
                !*pr_pending
            }
            k => self.awaiting_pr && k.is_pr_outcome(),
        }
    }

    /// Whether a `task_finished` was seen and the pull request's outcome is awaited.
    pub fn awaiting_pr(&self) -> bool {
        self.awaiting_pr
    }
}

/// Events of one task that were ready at the same moment, published as one message on
/// `orch.events.<task>.batch` (an agent's burst of output): one stored message instead of
/// several. Only [`EventKind::batchable`] kinds. A task's creation is a batch too, on
/// `orch.events.<task>.created`, carrying the task's record as created ([`pack_created`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventBatch {
    pub events: Vec<Event>,
    /// On a creation message only: the task's record as it was created, the durable copy a
    /// rebuild of Redis uses until the task has a snapshot of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Box<crate::api::Task>>,
}

/// At most this many events go in one [`EventBatch`].
pub const MAX_BATCH_EVENTS: usize = 64;
/// A batch whose encoding is larger than this is split (NATS refuses messages over its
/// `max_payload`, 1 MiB by default; one event alone is never split).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A creation message larger than this is not made: the record goes alone as a snapshot
/// (NATS refuses messages over its `max_payload`, 1 MiB by default).
pub const MAX_CREATED_BYTES: usize = 768 * 1024;

/// The creation message of `task`: its leading [`EventKind::batchable`] events from `events`
/// (which start with its `task_created`; at most [`MAX_BATCH_EVENTS`]) and its record, on
/// `orch.events.<task>.created`. Returns the message and how many events it took, or `None`
/// when `events` does not start with the task's `task_created` or the message would be
/// larger than [`MAX_CREATED_BYTES`].
pub fn pack_created<E: Borrow<Event>>(
    task: &crate::api::Task,
    events: &[E],
) -> Option<(LogMessage, usize)> {
    let first = events.first()?.borrow();
    if first.task_id != task.id || !matches!(first.kind, EventKind::TaskCreated { .. }) {
        return None;
    }
    let taken = events
        .iter()
        .map(Borrow::borrow)
        .take(MAX_BATCH_EVENTS)
        .take_while(|e: &&Event| e.task_id == task.id && e.kind.batchable())
        .count();
    let payload = crate::codec::encode(&BatchOut {
        events: Events(&events[..taken]),
        task: Some(task),
    });
    (payload.len() <= MAX_CREATED_BYTES).then(|| {
        let subject = crate::subject::event_created(task.id);
        (LogMessage { subject, payload }, taken)
    })
}

/// An [`EventBatch`] as it is written, from borrowed events and record (the same encoding,
/// without copying them).
#[derive(Serialize)]
#[serde(bound = "E: Borrow<Event>")]
struct BatchOut<'a, E> {
    events: Events<'a, E>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a crate::api::Task>,
}

/// Events, owned or borrowed, encoded as a list.
struct Events<'a, E>(&'a [E]);

impl<E: Borrow<Event>> Serialize for Events<'_, E> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(Borrow::borrow))
    }
}

/// One message of the event log, ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct LogMessage {
    pub subject: String,
    pub payload: Vec<u8>,
}

/// The messages that carry `events` (owned or borrowed), in order: runs of
/// [`EventKind::batchable`] events of one task become [`EventBatch`]es (bounded by
/// [`MAX_BATCH_EVENTS`] and [`MAX_BATCH_BYTES`]), every other event its own message on its
/// kind's subject.
pub fn pack<E: Borrow<Event>>(events: &[E]) -> Vec<LogMessage> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let first = events[start].borrow();
        let mut end = start + 1;
        if first.kind.batchable() {
            while end < events.len()
                && end - start < MAX_BATCH_EVENTS
                && events[end].borrow().kind.batchable()
                && events[end].borrow().task_id == first.task_id
            {
                end += 1;
            }
        }
        pack_run(&events[start..end], &mut out);
        start = end;
    }
    out
}

fn pack_run<E: Borrow<Event>>(run: &[E], out: &mut Vec<LogMessage>) {
    if let [one] = run {
        let one = one.borrow();
        out.push(LogMessage {
            subject: crate::subject::event(one.task_id, one.kind.name()),
            payload: crate::codec::encode(one),
        });
        return;
    }
    let payload = crate::codec::encode(&BatchOut {
        events: Events(run),
        task: None,
    });
    if payload.len() > MAX_BATCH_BYTES {
        let (a, b) = run.split_at(run.len() / 2);
        pack_run(a, out);
        pack_run(b, out);
        return;
    }
    out.push(LogMessage {
        subject: crate::subject::event_batch(run[0].borrow().task_id),
        payload,
    });
}

/// The events of one message of the log: a batch's events, or the one event of any other
/// subject (`kind` is the subject's last token).
pub fn decode_message(kind: &str, payload: &[u8]) -> Result<Vec<Event>, crate::codec::DecodeError> {
    if kind == crate::subject::BATCH_KIND || kind == crate::subject::CREATED_KIND {
        Ok(crate::codec::decode::<EventBatch>(payload)?.events)
    } else {
        Ok(vec![crate::codec::decode::<Event>(payload)?])
    }
}

/// Where an event sits in the log: the stream sequence of its message and its position in
/// that message (0 unless the message is a batch). Ids order like the log. Written `seq` when
/// `index` is 0 (every id of a log without batches), else `seq.index`: the SSE event id, and
/// what `Last-Event-ID` resumes after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub seq: u64,
    pub index: u32,
}

impl EventId {
    pub fn new(seq: u64, index: u32) -> Self {
        Self { seq, index }
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.index == 0 {
            write!(f, "{}", self.seq)
        } else {
            write!(f, "{}.{}", self.seq, self.index)
        }
    }
}

/// `Last-Event-ID` or an id column that is not `N` or `N.M`.
#[derive(Debug, thiserror::Error)]
#[error("expected an event id (N or N.M), got {0:?}")]
pub struct BadEventId(pub String);

impl std::str::FromStr for EventId {
    type Err = BadEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEventId(s.to_string());
        let (seq, index) = match s.trim().split_once('.') {
            Some((seq, index)) => (seq, index.parse().map_err(|_| bad())?),
            None => (s.trim(), 0),
        };
        Ok(EventId {
            seq: seq.parse().map_err(|_| bad())?,
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TaskId;

    fn ev(task: TaskId, kind: EventKind) -> Event {
        Event {
            task_id: task,
            job_id: None,
            attempt: 1,
            at_ms: 1,
            kind,
        }
    }

    fn text(task: TaskId, n: usize) -> Event {
        ev(
            task,
            EventKind::Text {
                text: "x".repeat(n),
            },
        )
    }

    /// What a reader gets back from the packed messages.
    fn unpack(messages: &[LogMessage]) -> Vec<Event> {
        messages
            .iter()
            .flat_map(|m| {
                decode_message(m.subject.rsplit('.').next().unwrap(), &m.payload).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_follower_ends_at_task_finished_or_at_the_pull_requests_outcome() {
        let finished = |pr_pending| EventKind::TaskFinished {
            status: "completed".into(),
            usage: Default::default(),
            cost_usd: 0.0,
            duration_ms: 1,
            pr_pending,
        };
        let opened = |draft| EventKind::PrOpened {
            number: 1,
            url: "u".into(),
            draft,
        };
        let mut end = LogEnd::default();
        assert!(!end.ends(&opened(false)), "not before the task ends");
        assert!(end.ends(&finished(false)));

        let mut end = LogEnd::default();
        assert!(!end.ends(&opened(true)));
        assert!(!end.ends(&finished(true)));
        assert!(end.awaiting_pr());
        assert!(!end.ends(&EventKind::Heartbeat));
        assert!(!end.ends(&opened(true)), "a draft is not the outcome");
        assert!(end.ends(&opened(false)));
        for outcome in [
            EventKind::PrReady { number: 1 },
            EventKind::PrFailed { reason: "x".into() },
        ] {
            let mut end = LogEnd::default();
            end.ends(&finished(true));
            assert!(end.ends(&outcome), "{outcome:?}");
        }
    }

    #[test]
    fn bursts_of_output_travel_together_and_lifecycle_events_alone() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let events = vec![
            text(a, 1),
            ev(a, EventKind::Thinking),
            ev(a, EventKind::Heartbeat),
            text(a, 2),
            text(b, 3),
            ev(
                b,
                EventKind::TaskFinished {
                    status: "completed".into(),
                    usage: Default::default(),
                    cost_usd: 0.0,
                    duration_ms: 1,
                    pr_pending: false,
                },
            ),
        ];
        let messages = pack(&events);
        let subjects: Vec<String> = messages.iter().map(|m| m.subject.clone()).collect();
        assert_eq!(
            subjects,
            [
                format!("orch.events.{a}.batch"),
                format!("orch.events.{a}.heartbeat"),
                format!("orch.events.{a}.text"),
                format!("orch.events.{b}.text"),
                format!("orch.events.{b}.task_finished"),
            ]
        );
        assert_eq!(unpack(&messages), events);
    }

    #[test]
    fn batches_stay_under_their_bounds() {
        let task = TaskId::new();
        let many: Vec<Event> = (0..150).map(|_| text(task, 10)).collect();
        let messages = pack(&many);
        assert_eq!(messages.len(), 3, "64 + 64 + 22 events");
        assert_eq!(unpack(&messages), many);
        let big: Vec<Event> = (0..8).map(|_| text(task, 100 * 1024)).collect();
        let messages = pack(&big);
        assert!(messages.len() >= 4);
        assert!(
            messages
                .iter()
                .all(|m| m.payload.len() <= MAX_BATCH_BYTES || !m.subject.ends_with(".batch"))
        );
        assert_eq!(unpack(&messages), big);
    }

    #[test]
    fn event_ids_print_parse_and_order_like_the_log() {
        for (text, id) in [("7", EventId::new(7, 0)), ("7.2", EventId::new(7, 2))] {
            assert_eq!(text.parse::<EventId>().unwrap(), id);
            assert_eq!(id.to_string(), text);
        }
        assert!(EventId::new(7, 0) < EventId::new(7, 1));
        assert!(EventId::new(7, 9) < EventId::new(8, 0));
        for bad in ["", "x", "7.", ".2", "7.2.1", "-1", "7.x"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
    }
}
