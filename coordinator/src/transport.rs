//! Everything the coordinator says to and hears from NATS. The only module that knows subjects,
//! stream settings and bytes; the rest of the coordinator sees typed messages.

pub mod events;

use crate::catchup::LogPosition;
use async_nats::jetstream::{self, consumer, stream};
use backon::Retryable;
use futures::{Stream, StreamExt};
use orch_shared::api::Task;
use orch_shared::codec;
use orch_shared::event::{self, Event, EventId, EventKind};
use orch_shared::ids::TaskId;
use orch_shared::job::{Backend, CancelJob, JobResult, JobSpec, PathsReport};
use orch_shared::subject;
use std::sync::Arc;
use std::time::Duration;
use strum::VariantNames;

/// The JetStream settings of the streams and consumers [`Transport::ensure_topology`] creates
/// (built from the checked `config::Config`, so this module needs nothing else of it).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// How long a job may go without an in-progress ack before JetStream redelivers it.
    pub job_ack_wait: Duration,
    /// Deliveries of one job attempt before JetStream gives up on it.
    pub job_max_deliver: i64,
    /// Duplicate window of the jobs and results streams.
    pub dedup_window: Duration,
    /// Age limit of the events and results streams.
    pub events_max_age: Duration,
    /// Replicas of every stream and of the sessions object store.
    pub stream_replicas: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("failed to read the NATS credentials file: {0}")]
    Credentials(std::io::Error),
    #[error("failed to set up JetStream {what}: {source}")]
    Topology {
        what: String,
        source: async_nats::Error,
    },
    #[error("failed to publish to {subject}: {source}")]
    Publish {
        subject: String,
        source: async_nats::Error,
    },
    #[error("failed to read {what}: {source}")]
    Read {
        what: String,
        source: async_nats::Error,
    },
    /// No coordinator listened for forwarded writes: the request reached no leader.
    #[error("no leader answers forwarded writes")]
    NoLeader,
    /// The leader took the request and did not answer in time: it may have applied it.
    #[error("the leader did not answer within {0:?}")]
    LeaderTimeout(Duration),
}

/// A cheap, cloneable handle on the NATS connection.
#[derive(Clone)]
pub struct Transport(Arc<Links>);

/// The connection and its JetStream context, behind one pointer: the handle is cloned into
/// every request and lane, and cloning a NATS client copies several channels and counters.
struct Links {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// A job result pulled from the results stream; ack it once it has been applied.
pub struct ResultDelivery {
    pub result: JobResult,
    msg: jetstream::Message,
}

impl ResultDelivery {
    pub async fn ack(self) {
        self.into_parts().1.ack().await
    }

    /// The result, and what acks it once it has been applied.
    pub fn into_parts(self) -> (JobResult, ResultAck) {
        let ack = ResultAck {
            job_id: self.result.job_id,
            msg: self.msg,
        };
        (self.result, ack)
    }
}

/// Acks a result's message (see [`ResultDelivery::into_parts`]).
pub struct ResultAck {
    job_id: orch_shared::ids::JobId,
    msg: jetstream::Message,
}

impl ResultAck {
    pub async fn ack(self) {
        if let Err(e) = self.msg.ack().await {
            tracing::warn!(error = %e, job_id = %self.job_id, "failed to ack result");
        }
    }

    /// How many times the result has been delivered, this time included.
    pub fn delivered(&self) -> i64 {
        self.msg.info().map_or(1, |i| i.delivered)
    }

    /// Has the result delivered again after `delay`.
    pub async fn retry_after(self, delay: Duration) {
        if let Err(e) = self
            .msg
            .ack_with(jetstream::AckKind::Nak(Some(delay)))
            .await
        {
            tracing::warn!(error = %e, job_id = %self.job_id, "failed to nak result");
        }
    }
}

/// Core NATS subject on which the leader answers writes that standbys received.
pub const LEADER_HTTP: &str = "orch.leader.http";

/// How long a standby waits for the leader's answer to a forwarded write.
const LEADER_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP write a standby forwards to the leader, protocol-encoded ([`codec`]: MessagePack,
/// the body as raw bytes, so a body near the 1 MiB request limit fits in one NATS message).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Forwarded {
    /// Names this forward (a UUID), the same on every attempt: the leader answers a repeat
    /// with the answer it gave the first, so a forward never applies a write twice.
    pub id: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The leader's answer to a [`Forwarded`] write.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForwardedReply {
    pub status: u16,
    pub content_type: Option<String>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A forwarded write as the leader receives it: the request (`None` when it cannot be read)
/// and where to send the answer ([`Transport::answer`]).
pub struct ForwardedWrite {
    pub request: Option<Forwarded>,
    pub reply_to: async_nats::Subject,
}

/// How long the event log drops a message whose id it has seen.
pub const EVENTS_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// A message for [`Transport::publish_all`].
#[allow(
    clippy::large_enum_variant,
    reason = "short-lived: built, published and dropped; boxing a job would only add an allocation"
)]
pub enum Outgoing<'a> {
    /// A job and the `traceparent` of its dispatch span (sent as a NATS header).
    Job(JobSpec, Option<String>),
    Event(Event),
    /// The task's record, as its latest snapshot in the durable log (borrowed: a task is
    /// large, and not cloned to be sent).
    Snapshot(&'a Task),
}

/// Whether `messages` hold the `task_created` event of `task`.
fn creates(messages: &[Outgoing<'_>], task: TaskId) -> bool {
    messages.iter().any(|m| {
        matches!(m, Outgoing::Event(e) if e.task_id == task && matches!(e.kind, EventKind::TaskCreated { .. }))
    })
}

/// The task of the events a creation message starts with.
fn message_task(events: &[&Event]) -> Option<TaskId> {
    events.first().map(|e| e.task_id)
}

/// [`event::pack`]'s messages, each with the task whose events it carries (a message carries
/// the events of one task).
fn pack_with_tasks(events: &[&Event]) -> Vec<(event::LogMessage, TaskId)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let task = events[start].task_id;
        let end = events[start..]
            .iter()
            .position(|e| e.task_id != task)
            .map_or(events.len(), |n| start + n);
        out.extend(
            event::pack(&events[start..end])
                .into_iter()
                .map(|m| (m, task)),
        );
        start = end;
    }
    out
}

/// One stored event with where it sits in the log (its SSE event id).
pub struct StoredEvent {
    pub seq: u64,
    /// Its position in a batch message (0 otherwise).
    pub index: u32,
    pub event: Event,
}

impl StoredEvent {
    pub fn id(&self) -> EventId {
        EventId::new(self.seq, self.index)
    }
}

/// The events of one message of the event log, with their ids (none if it does not decode).
pub(crate) fn stored_events(msg: &jetstream::Message) -> Vec<StoredEvent> {
    let Ok(info) = msg.info() else {
        return Vec::new();
    };
    let seq = info.stream_sequence;
    let kind = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
    event::decode_message(kind, &msg.payload)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, event)| StoredEvent {
            seq,
            index: index as u32,
            event,
        })
        .collect()
}

/// Where a read that resumes after `after` starts: the message holding it (a batch may have
/// more events after it), or the start of the log.
fn resume_policy(after: EventId) -> consumer::DeliverPolicy {
    if after.seq == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after.seq,
        }
    }
}

impl Transport {
    fn client(&self) -> &async_nats::Client {
        &self.0.client
    }

    fn js(&self) -> &jetstream::Context {
        &self.0.js
    }

    /// Connects to `url` (a server list) with `nats`'s TLS and credentials.
    pub async fn connect(url: &str, nats: &orch_config::nats::Nats) -> Result<Self, Error> {
        let client = nats
            .connect_options("orch-coordinator")
            .await
            .map_err(Error::Credentials)?
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(orch_shared::nats_servers(url))
            .await
            .map_err(|source| Error::Connect {
                url: orch_shared::redact_url(url),
                source,
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        Ok(Self(Arc::new(Links { client, js })))
    }

    pub fn is_connected(&self) -> bool {
        self.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Creates or updates the streams and the durable consumers. The coordinator owns the
    /// topology, so every worker sees one ack wait and one max-deliver.
    pub async fn ensure_topology(&self, cfg: &Topology) -> Result<(), Error> {
        let topo = |what: &str| {
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Topology { what, source: e }
        };
        self.js()
            .create_or_update_stream(stream::Config {
                name: subject::JOBS_STREAM.into(),
                subjects: vec![subject::JOBS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                duplicate_window: cfg.dedup_window,
                num_replicas: cfg.stream_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| topo("jobs stream")(e.into()))?;
        self.js()
            .create_or_update_stream(stream::Config {
                name: subject::EVENTS_STREAM.into(),
                subjects: vec![subject::EVENTS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: cfg.events_max_age,
                // Events are sent again only while their sender retries (seconds) or when the
                // next leader applies a redelivered result (the results' ack wait): two
                // minutes, JetStream's default, covers both without keeping the ids of a
                // busy log's half hour in the servers' memory. JetStream refuses a window
                // longer than the stream's max age (a log kept less than two minutes).
                duplicate_window: EVENTS_DEDUP_WINDOW.min(cfg.events_max_age),
                allow_direct: true,
                num_replicas: cfg.stream_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| topo("events stream")(e.into()))?;
        self.js()
            .create_or_update_stream(stream::Config {
                name: subject::RESULTS_STREAM.into(),
                subjects: vec![subject::RESULTS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: cfg.dedup_window,
                max_age: cfg.events_max_age,
                num_replicas: cfg.stream_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| topo("results stream")(e.into()))?;
        let jobs = self
            .js()
            .get_stream(subject::JOBS_STREAM)
            .await
            .map_err(|e| topo("jobs stream")(e.into()))?;
        // One consumer per backend, so a worker pulls only jobs it can run. On a work-queue
        // stream consumers may not overlap: the pre-routing `workers` consumer, which read
        // every job, is narrowed to the legacy subject first (see `subject::JOBS_CONSUMER`).
        let job_consumer =
            |name: String, filter: String, description: String| consumer::pull::Config {
                durable_name: Some(name),
                description: Some(description),
                filter_subject: filter,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: cfg.job_ack_wait,
                max_deliver: cfg.job_max_deliver,
                max_ack_pending: 100_000,
                ..Default::default()
            };
        create_or_update_consumer(
            &jobs,
            job_consumer(
                subject::JOBS_CONSUMER.into(),
                subject::LEGACY_JOBS_SUBJECT.into(),
                "jobs from coordinators older than routing by backend".into(),
            ),
        )
        .await
        .map_err(topo("workers consumer"))?;
        for backend in Backend::VARIANTS {
            create_or_update_consumer(
                &jobs,
                job_consumer(
                    subject::job_consumer(backend),
                    subject::job(backend),
                    format!(
                        "agent jobs on the {backend} backend, pulled by the workers that run it"
                    ),
                ),
            )
            .await
            .map_err(topo(&format!(
                "{} consumer",
                subject::job_consumer(backend)
            )))?;
        }
        let coordinator = consumer::pull::Config {
            durable_name: Some(subject::RESULTS_CONSUMER.into()),
            description: Some("job results, applied by the coordinator".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            // Only a coordinator that died holding results waits this out; keep it short.
            ack_wait: Duration::from_secs(10),
            max_ack_pending: 10_000,
            ..Default::default()
        };
        self.js()
            .create_or_update_stream(stream::Config {
                name: subject::TASKS_STREAM.into(),
                subjects: vec![subject::TASKS_SUBJECTS.into()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                num_replicas: cfg.stream_replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| topo("tasks stream")(e.into()))?;
        let results = self
            .js()
            .get_stream(subject::RESULTS_STREAM)
            .await
            .map_err(|e| topo("results stream")(e.into()))?;
        create_or_update_consumer(&results, coordinator)
            .await
            .map_err(topo("results consumer"))?;
        if self
            .js()
            .get_object_store(subject::SESSIONS_BUCKET)
            .await
            .is_err()
        {
            // Only coordinators create it (workers wait for it); two replicas creating it at
            // once is fine: an identical create is accepted.
            self.js()
                .create_object_store(jetstream::object_store::Config {
                    bucket: subject::SESSIONS_BUCKET.into(),
                    description: Some("agents' sessions, one object per agent (job id)".into()),
                    storage: stream::StorageType::File,
                    max_bytes: -1,
                    num_replicas: cfg.stream_replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| topo("sessions object store")(e.into()))?;
        }
        Ok(())
    }

    /// Deletes the stored sessions of these agents (those that have one) and the sessions-store
    /// objects named in `also` (their checkpointed conversations).
    pub async fn purge_sessions(
        &self,
        jobs: &[orch_shared::ids::JobId],
        also: &[String],
    ) -> Result<(), Error> {
        let Ok(store) = self.js().get_object_store(subject::SESSIONS_BUCKET).await else {
            return Ok(());
        };
        let names = jobs
            .iter()
            .map(|j| j.to_string())
            .chain(also.iter().cloned());
        for job in names {
            if let Err(e) = store.delete(&job).await
                && e.kind() != jetstream::object_store::DeleteErrorKind::NotFound
            {
                return Err(Error::Read {
                    what: format!("the session of agent {job}"),
                    source: e.into(),
                });
            }
        }
        Ok(())
    }

    /// Publishes jobs and events in order and waits until JetStream stored every one. All
    /// messages are sent before the first ack is awaited, so a batch costs one round trip.
    /// Every job and event message has a message id (a job's: its attempt; an event
    /// message's: a digest of its content, [`subject::task_events_msg_id`]), so a message
    /// whose ack failed is sent again, and a second publish of the same message (a retry, a
    /// result redelivered to the next leader) is a no-op inside the dedup window.
    ///
    /// Every message asks for an ack: an ack for the last one alone does not cover the
    /// others when a NATS node dies (those it carried are lost, later ones are stored).
    pub async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), Error> {
        // Consecutive events go out as few log messages as `event::pack` makes of them, and
        // snapshots last: they are for rebuilding Redis, whose record is already written, so
        // a job waits for no snapshot and a task's first events travel together. A new task's
        // record travels in its creation message instead of a snapshot.
        struct Wire {
            subject: String,
            payload: Vec<u8>,
            msg_id: Option<String>,
            headers: Option<async_nats::HeaderMap>,
        }
        let mut wire: Vec<Wire> = Vec::new();
        let mut snapshots = Vec::new();
        let mut run: Vec<&Event> = Vec::new();
        // A task created by this publish: its record rides in its creation message
        // (`event::pack_created`) instead of a snapshot of its own.
        let mut created: Option<&Task> = messages.iter().find_map(|m| match m {
            Outgoing::Snapshot(task) if creates(messages, task.id) => Some(*task),
            _ => None,
        });
        let mut recorded = None;
        let mut flush = |run: &mut Vec<&Event>, wire: &mut Vec<Wire>| {
            let mut rest = &run[..];
            if let Some((message, taken)) = created.and_then(|t| event::pack_created(t, rest)) {
                recorded = created.take().map(|t| t.id);
                rest = &rest[taken..];
                let id =
                    message_task(rest).map(|t| subject::task_events_msg_id(t, &message.payload));
                wire.push(Wire {
                    subject: message.subject,
                    payload: message.payload,
                    msg_id: id,
                    headers: None,
                });
            }
            for (m, task) in pack_with_tasks(rest) {
                wire.push(Wire {
                    msg_id: Some(subject::task_events_msg_id(task, &m.payload)),
                    subject: m.subject,
                    payload: m.payload,
                    headers: None,
                });
            }
            run.clear();
        };
        for message in messages {
            match message {
                Outgoing::Event(e) => run.push(e),
                Outgoing::Job(spec, traceparent) => {
                    flush(&mut run, &mut wire);
                    wire.push(Wire {
                        subject: subject::job(spec.backend.as_str()),
                        payload: codec::encode(spec),
                        msg_id: Some(subject::job_msg_id(spec.job_id, spec.attempt)),
                        headers: orch_config::telemetry::nats_headers(traceparent.as_deref()),
                    });
                }
                Outgoing::Snapshot(task) => snapshots.push(Wire {
                    subject: subject::task_snapshot(task.id),
                    payload: codec::encode(*task),
                    msg_id: None,
                    headers: None,
                }),
            }
        }
        flush(&mut run, &mut wire);
        wire.extend(snapshots);
        if let Some(id) = recorded {
            let subject = subject::task_snapshot(id);
            wire.retain(|w| w.subject != subject);
        }
        let mut pending: Vec<(Wire, Option<jetstream::context::PublishAckFuture>)> =
            Vec::with_capacity(wire.len());
        for w in wire {
            let ack = self
                .send_wire(&w.subject, &w.payload, &w.msg_id, &w.headers)
                .await;
            pending.push((w, ack));
        }
        // The acks, in order; then what was not confirmed is sent again until it is.
        let mut failed = Vec::new();
        for (w, ack) in pending {
            let stored = match ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if !stored {
                failed.push(w);
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        metrics::counter!(crate::metrics::MESSAGES_RESENT).increment(failed.len() as u64);
        let failed = tokio::sync::Mutex::new(failed);
        let resend = || async {
            let mut pending = failed.lock().await;
            let mut acks = Vec::with_capacity(pending.len());
            for w in pending.iter() {
                acks.push(
                    self.send_wire(&w.subject, &w.payload, &w.msg_id, &w.headers)
                        .await,
                );
            }
            let mut still = Vec::new();
            let mut last_error = None;
            for (w, ack) in pending.drain(..).zip(acks) {
                let result = match ack {
                    Some(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                    None => Err("not sent".to_string()),
                };
                if let Err(e) = result {
                    last_error = Some(Error::Publish {
                        subject: w.subject.clone(),
                        source: e.into(),
                    });
                    still.push(w);
                }
            }
            *pending = still;
            last_error.map_or(Ok(()), Err)
        };
        resend
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(8),
            )
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "messages not stored, sending them again"))
            .await
    }

    /// Sends one message to a stream; `None` when it could not be sent (it is sent again).
    async fn send_wire(
        &self,
        subject: &str,
        payload: &[u8],
        msg_id: &Option<String>,
        headers: &Option<async_nats::HeaderMap>,
    ) -> Option<jetstream::context::PublishAckFuture> {
        let mut publish =
            jetstream::message::PublishMessage::build().payload(payload.to_vec().into());
        if let Some(headers) = headers {
            publish = publish.headers(headers.clone());
        }
        // After the headers, which would replace it.
        if let Some(id) = msg_id {
            publish = publish.message_id(id);
        }
        match self.js().send_publish(subject.to_string(), publish).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                tracing::debug!(error = %e, subject, "message not sent; it will be sent again");
                None
            }
        }
    }

    /// The results consumer as a stream of typed deliveries. Undecodable messages are
    /// terminated (they would fail the same way on every redelivery) and logged.
    pub async fn results(&self) -> Result<impl Stream<Item = ResultDelivery> + use<>, Error> {
        let read = |e: Box<dyn std::error::Error + Send + Sync>| Error::Read {
            what: "results".into(),
            source: e,
        };
        let stream = self
            .js()
            .get_stream(subject::RESULTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let consumer: consumer::PullConsumer = stream
            .get_consumer(subject::RESULTS_CONSUMER)
            .await
            .map_err(read)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| read(e.into()))?;
        Ok(messages.filter_map(|msg| async move {
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    tracing::warn!(error = %e, "results consumer error");
                    return None;
                }
            };
            match codec::decode::<JobResult>(&msg.payload) {
                Ok(result) => Some(ResultDelivery { result, msg }),
                Err(e) => {
                    tracing::error!(error = %e, subject = %msg.subject, "undecodable result, terminating it");
                    let _ = msg.ack_with(jetstream::AckKind::Term).await;
                    None
                }
            }
        }))
    }

    /// `job_started` and `job_parked` events of every task, as they are published (best
    /// effort: the result of a job carries the same facts, so a missed one only delays the
    /// `running` or `parked` status).
    pub async fn job_started(&self) -> Result<impl Stream<Item = Event> + use<>, Error> {
        let subscribe = |subject: &'static str| async move {
            self.client()
                .subscribe(subject)
                .await
                .map_err(|e| Error::Read {
                    what: format!("{subject} events"),
                    source: e.into(),
                })
        };
        let started = subscribe(subject::ALL_JOB_STARTED).await?;
        let parked = subscribe(subject::ALL_JOB_PARKED).await?;
        Ok(futures::stream::select(started, parked)
            .filter_map(|msg| async move { codec::decode::<Event>(&msg.payload).ok() }))
    }

    /// Workers' reports of the paths their running jobs changed, as they are published (best
    /// effort: each carries the job's whole set).
    pub async fn paths_reports(&self) -> Result<impl Stream<Item = PathsReport> + use<>, Error> {
        let sub = self
            .client()
            .subscribe(subject::ALL_PATHS)
            .await
            .map_err(|e| Error::Read {
                what: "paths reports".into(),
                source: e.into(),
            })?;
        Ok(sub.filter_map(|msg| async move { codec::decode::<PathsReport>(&msg.payload).ok() }))
    }

    /// A task's events after `after` (the default id: from the start), then live ones.
    pub async fn task_events(
        &self,
        task: TaskId,
        after: EventId,
    ) -> Result<impl Stream<Item = StoredEvent> + use<>, Error> {
        let read = |e: Box<dyn std::error::Error + Send + Sync>| Error::Read {
            what: format!("events of task {task}"),
            source: e,
        };
        let stream = self
            .js()
            .get_stream(subject::EVENTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject::task_events(task),
                deliver_policy: resume_policy(after),
                ..Default::default()
            })
            .await
            .map_err(|e| read(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| read(e.into()))?;
        Ok(messages
            .flat_map(|msg| {
                futures::stream::iter(msg.map(|m| stored_events(&m)).unwrap_or_default())
            })
            .filter(move |e| futures::future::ready(e.id() > after)))
    }

    /// Puts a parked job attempt back in its queue (`subject`, with message id `msg_id`, its
    /// encoded spec as stored when it was parked), and waits for JetStream to store it.
    pub async fn publish_unparked(
        &self,
        subject: &str,
        msg_id: String,
        spec: Vec<u8>,
        traceparent: Option<&str>,
    ) -> Result<(), Error> {
        orch_config::nats::publish_stored(&self.0.js, subject, msg_id, spec, traceparent)
            .await
            .map_err(|source| Error::Publish {
                subject: subject.to_string(),
                source,
            })
    }

    /// Tells every worker to stop a job attempt (core NATS: the workers running it act within
    /// milliseconds; one that pulls it later finds the cancel marker in Redis).
    pub async fn publish_cancel(&self, cancel: &CancelJob) -> Result<(), Error> {
        self.client()
            .publish(subject::CONTROL_CANCEL, codec::encode(cancel).into())
            .await
            .map_err(|e| Error::Publish {
                subject: subject::CONTROL_CANCEL.into(),
                source: e.into(),
            })?;
        self.client().flush().await.map_err(|e| Error::Publish {
            subject: subject::CONTROL_CANCEL.into(),
            source: e.into(),
        })
    }

    /// Every stored message of `stream`, decoded, in order, until the ones present when the
    /// call began are read. For rebuilding Redis.
    async fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        stream_name: &str,
        filter: Option<&str>,
    ) -> Result<Vec<T>, Error> {
        let all = self.read_after(stream_name, filter, 0).await?;
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// The stored messages of `stream` after sequence `after` (0: all), decoded, in order,
    /// each with its sequence, until the ones present when the call began are read.
    async fn read_after<T: serde::de::DeserializeOwned>(
        &self,
        stream_name: &str,
        filter: Option<&str>,
        after: u64,
    ) -> Result<Vec<(u64, T)>, Error> {
        let read = |e: async_nats::Error| Error::Read {
            what: format!("stream {stream_name}"),
            source: e,
        };
        let mut stream = self
            .js()
            .get_stream(stream_name)
            .await
            .map_err(|e| read(e.into()))?;
        let total = stream
            .info()
            .await
            .map_err(|e| read(e.into()))?
            .state
            .messages;
        let mut out = Vec::new();
        if total == 0 {
            return Ok(out);
        }
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: if after == 0 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    }
                },
                filter_subject: filter.unwrap_or_default().into(),
                ..Default::default()
            })
            .await
            .map_err(|e| read(e.into()))?;
        if (filter.is_some() || after > 0)
            && consumer
                .info()
                .await
                .map_err(|e| read(e.into()))?
                .num_pending
                == 0
        {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(|e| read(e.into()))?;
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .ok()
            .flatten()
        {
            let msg = msg.map_err(|e| read(e.into()))?;
            let (pending, seq) = msg
                .info()
                .map(|i| (i.pending, i.stream_sequence))
                .unwrap_or((0, 0));
            match codec::decode::<T>(&msg.payload) {
                Ok(v) => out.push((seq, v)),
                Err(e) => {
                    tracing::warn!(error = %e, subject = %msg.subject, "skipping an unreadable message")
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The latest snapshot of every task in the durable log (the stream keeps one per task).
    pub async fn task_snapshots(&self) -> Result<Vec<Task>, Error> {
        self.read_all(subject::TASKS_STREAM, None).await
    }

    /// The records of every task as they were created, from the tasks' creation messages
    /// still in the event log (see [`event::pack_created`]).
    pub async fn created_records(&self) -> Result<Vec<Task>, Error> {
        let batches: Vec<event::EventBatch> = self
            .read_all(subject::EVENTS_STREAM, Some(subject::ALL_CREATED))
            .await?;
        Ok(batches
            .into_iter()
            .filter_map(|b| b.task.map(|t| *t))
            .collect())
    }

    /// Every stored job result, oldest first.
    pub async fn all_results(&self) -> Result<Vec<JobResult>, Error> {
        self.read_all(subject::RESULTS_STREAM, None).await
    }

    /// The job results after the results stream's sequence `after` up to `upto`, oldest
    /// first.
    pub async fn results_between(&self, after: u64, upto: u64) -> Result<Vec<JobResult>, Error> {
        if upto <= after {
            return Ok(vec![]);
        }
        let all = self
            .read_after(subject::RESULTS_STREAM, None, after)
            .await?;
        Ok(all
            .into_iter()
            .filter(|(seq, _)| *seq <= upto)
            .map(|(_, r)| r)
            .collect())
    }

    /// The task records of the creation messages and snapshots between two positions
    /// (event log and snapshot stream sequences), the later of each task's last.
    pub async fn tasks_between(
        &self,
        from: &LogPosition,
        upto: &LogPosition,
    ) -> Result<Vec<Task>, Error> {
        let mut tasks = Vec::new();
        if upto.events > from.events {
            let created: Vec<(u64, event::EventBatch)> = self
                .read_after(
                    subject::EVENTS_STREAM,
                    Some(subject::ALL_CREATED),
                    from.events,
                )
                .await?;
            tasks.extend(
                created
                    .into_iter()
                    .filter(|(seq, _)| *seq <= upto.events)
                    .filter_map(|(_, b)| b.task.map(|t| *t)),
            );
        }
        if upto.tasks > from.tasks {
            let snapshots: Vec<(u64, Task)> = self
                .read_after(subject::TASKS_STREAM, None, from.tasks)
                .await?;
            // A snapshot is always later than the creation.
            tasks.extend(
                snapshots
                    .into_iter()
                    .filter(|(seq, _)| *seq <= upto.tasks)
                    .map(|(_, t)| t),
            );
        }
        Ok(tasks)
    }

    /// How far the log is: the results consumer's ack floor (every result up to it was
    /// applied and saved before it was acked) and the last sequences of the event log and the
    /// snapshot stream.
    pub async fn log_position(&self) -> Result<LogPosition, Error> {
        let read = |what: &str, e: async_nats::Error| Error::Read {
            what: what.into(),
            source: e,
        };
        let last = |name: &'static str| async move {
            let mut stream = self
                .js()
                .get_stream(name)
                .await
                .map_err(|e| read(name, e.into()))?;
            let info = stream.info().await.map_err(|e| read(name, e.into()))?;
            Ok::<u64, Error>(info.state.last_sequence)
        };
        let mut consumer: consumer::PullConsumer = self
            .js()
            .get_stream(subject::RESULTS_STREAM)
            .await
            .map_err(|e| read("results", e.into()))?
            .get_consumer(subject::RESULTS_CONSUMER)
            .await
            .map_err(|e| read("results consumer", e))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| read("results consumer", e.into()))?;
        Ok(LogPosition {
            results: info.ack_floor.stream_sequence,
            events: last(subject::EVENTS_STREAM).await?,
            tasks: last(subject::TASKS_STREAM).await?,
        })
    }

    /// Sends a write a standby received to the leader and waits for its answer.
    /// [`Error::NoLeader`] when no coordinator listens (the write reached nobody: safe to
    /// send again); [`Error::LeaderTimeout`] when the leader took it and did not answer (it
    /// may have applied it: never sent again).
    pub async fn ask_leader(&self, request: &Forwarded) -> Result<ForwardedReply, Error> {
        use async_nats::client::RequestErrorKind;
        let ask = async_nats::Request::new()
            .payload(codec::encode(request).into())
            .timeout(Some(LEADER_ANSWER_TIMEOUT));
        let reply = self
            .client()
            .send_request(LEADER_HTTP, ask)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => Error::NoLeader,
                RequestErrorKind::TimedOut => Error::LeaderTimeout(LEADER_ANSWER_TIMEOUT),
                _ => Error::Publish {
                    subject: LEADER_HTTP.into(),
                    source: e.into(),
                },
            })?;
        codec::decode(&reply.payload).map_err(|e| Error::Read {
            what: "the leader's answer".into(),
            source: e.into(),
        })
    }

    /// Writes forwarded by standbys (the leader answers them; one leader, so one queue group).
    pub async fn forwarded(&self) -> Result<impl Stream<Item = ForwardedWrite> + use<>, Error> {
        let sub = self
            .client()
            .queue_subscribe(LEADER_HTTP, "leader".into())
            .await
            .map_err(|e| Error::Read {
                what: "forwarded writes".into(),
                source: e.into(),
            })?;
        Ok(sub.filter_map(|msg| async move {
            let reply_to = msg.reply?;
            let request = codec::decode(&msg.payload).ok();
            Some(ForwardedWrite { request, reply_to })
        }))
    }

    /// Answers a forwarded write.
    pub async fn answer(&self, reply_to: async_nats::Subject, reply: &ForwardedReply) {
        if let Err(e) = self
            .client()
            .publish(reply_to, codec::encode(reply).into())
            .await
        {
            tracing::warn!(error = %e, "could not answer a forwarded write");
        }
    }

    /// Flushes buffered messages before shutdown.
    pub async fn drain(&self) {
        let _ = self.client().flush().await;
    }
}

async fn create_or_update_consumer(
    stream: &stream::Stream,
    config: consumer::pull::Config,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let name = config.durable_name.clone().unwrap_or_default();
    match stream.get_consumer::<consumer::pull::Config>(&name).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.ack_wait != config.ack_wait
                || info.config.max_deliver != config.max_deliver
                || info.config.filter_subject != config.filter_subject
            {
                stream.update_consumer(config).await?;
            }
        }
        Err(_) => {
            stream.create_consumer(config).await?;
        }
    }
    Ok(())
}

/// `true` when the event ends a task's log (the SSE stream closes after it).
pub fn is_last(event: &Event) -> bool {
    matches!(event.kind, EventKind::TaskFinished { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_writes_round_trip_with_their_bodies_as_bytes() {
        let request = Forwarded {
            id: "0b6f3c1e-8d7a-4a55-9d1e-2f4f0c7b9a10".into(),
            method: "POST".into(),
            path: "/v1/tasks?x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: vec![b'x'; 900 * 1024],
        };
        let bytes = codec::encode(&request);
        // Raw bytes, not an array of numbers: the body costs its own size and little more.
        assert!(bytes.len() < request.body.len() + 1024, "{}", bytes.len());
        assert_eq!(codec::decode::<Forwarded>(&bytes).unwrap(), request);

        let reply = ForwardedReply {
            status: 201,
            content_type: Some("application/json".into()),
            body: b"{\"id\":\"t\"}".to_vec(),
        };
        let decoded: ForwardedReply = codec::decode(&codec::encode(&reply)).unwrap();
        assert_eq!(decoded, reply);
        assert!(codec::decode::<Forwarded>(b"\x01not msgpack").is_err());
    }
}
