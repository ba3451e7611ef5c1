//! Everything the worker says to and hears from NATS: pulling jobs, acking them, publishing
//! events and results. The only module of the worker that knows subjects and bytes.

use async_nats::jetstream::{self, AckKind, consumer, object_store};
use backon::Retryable;
use futures::{Stream, StreamExt};
use orch_shared::codec;
use orch_shared::event::{self, Event};
use orch_shared::job::{Backend, CancelJob, JobResult, JobSpec, PathsReport};
use orch_shared::subject;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("failed to read the NATS credentials file: {0}")]
    Credentials(std::io::Error),
    #[error("the job consumer is not available yet: {0}")]
    Consumer(async_nats::Error),
    #[error("failed to pull jobs: {0}")]
    Pull(async_nats::Error),
    #[error("failed to publish to {subject}: {source}")]
    Publish {
        subject: String,
        source: async_nats::Error,
    },
    #[error("failed to {what} job message: {source}")]
    Ack {
        what: &'static str,
        source: async_nats::Error,
    },
    #[error("the session store {bucket} is not available yet: {source}")]
    Sessions {
        bucket: &'static str,
        source: async_nats::Error,
    },
    #[error("failed to {what} the session object {name}: {source}")]
    SessionObject {
        what: &'static str,
        name: String,
        source: async_nats::Error,
    },
}

/// The agents' session objects: the JetStream object store [`subject::SESSIONS_BUCKET`],
/// one object per agent (its job id). The coordinator creates the bucket with the cluster's
/// replica count; a worker only binds to it. Cheap to clone.
#[derive(Clone)]
pub struct SessionObjects {
    store: object_store::ObjectStore,
}

/// A session object as read back.
pub enum SessionObject {
    /// There is no such object (only a bucket purged by hand loses one).
    Missing,
    /// The object is larger than the reader accepts: its size.
    TooLarge(usize),
    Bytes(Vec<u8>),
}

impl SessionObjects {
    /// Binds to the bucket, which the coordinator creates.
    pub async fn bind(client: async_nats::Client) -> Result<Self, Error> {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            .build(client);
        let bucket = subject::SESSIONS_BUCKET;
        let store = js
            .get_object_store(bucket)
            .await
            .map_err(|e| Error::Sessions {
                bucket,
                source: e.into(),
            })?;
        Ok(Self { store })
    }

    /// Stores `bytes` as object `name` (replacing an earlier version).
    pub async fn put(&self, name: &str, mut bytes: &[u8]) -> Result<(), Error> {
        self.store
            .put(name, &mut bytes)
            .await
            .map(drop)
            .map_err(|e| Error::SessionObject {
                what: "store",
                name: name.to_string(),
                source: e.into(),
            })
    }

    /// Removes object `name` (nothing when it does not exist).
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        match self.store.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::SessionObject {
                what: "delete",
                name: name.to_string(),
                source: e.into(),
            }),
        }
    }

    /// Reads object `name` whole, unless it is larger than `max` bytes.
    pub async fn get(&self, name: &str, max: usize) -> Result<SessionObject, Error> {
        let failed = |source: async_nats::Error| Error::SessionObject {
            what: "read",
            name: name.to_string(),
            source,
        };
        let mut object = match self.store.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                return Ok(SessionObject::Missing);
            }
            Err(e) => return Err(failed(e.into())),
        };
        let size = object.info().size;
        if size > max {
            return Ok(SessionObject::TooLarge(size));
        }
        let mut bytes = Vec::with_capacity(size);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| failed(e.into()))?;
        Ok(SessionObject::Bytes(bytes))
    }
}

#[derive(Clone)]
pub struct Transport {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The consumers' ack wait (the coordinator gives every job consumer the same one): the
    /// in-progress ack timer runs well under it.
    pub ack_wait: Duration,
}

/// One of the job queue's consumers this worker pulls: a backend's, or the pre-routing one
/// (`backend: None`), whose jobs the worker moves to their backends' subjects.
#[derive(Clone)]
pub struct Queue {
    pub backend: Option<Backend>,
    consumer: consumer::PullConsumer,
}

/// A job pulled from the queue. The message stays with it so the job can be acked, kept alive
/// (`+WPI`) or handed back.
pub enum Pulled {
    Job(JobDelivery),
    /// The message is not a job this worker understands; it has been terminated.
    Undecodable,
}

#[derive(Clone)]
pub struct JobDelivery {
    pub spec: Arc<JobSpec>,
    /// JetStream's delivery count (1 for a first delivery).
    pub delivery: u64,
    /// The W3C `traceparent` of the job's dispatch span (the message's header), when the
    /// coordinator exports traces.
    pub traceparent: Option<String>,
    msg: Arc<jetstream::Message>,
    /// The run's events not yet confirmed stored (see [`Transport::publish_events`]).
    events: Arc<tokio::sync::Mutex<EventLog>>,
}

/// The log messages of one run of a job attempt, each with its message id
/// ([`subject::job_events_msg_id`]), kept until JetStream confirmed it stored.
struct EventLog {
    /// What tells this run apart from the attempt's other runs.
    run: String,
    /// Messages sent so far (the next one's number).
    seq: u64,
    unconfirmed: std::collections::VecDeque<Sent>,
}

/// A log message sent, with the ack JetStream owes for it (none when the send itself failed).
struct Sent {
    subject: String,
    msg_id: String,
    payload: bytes::Bytes,
    ack: Option<jetstream::context::PublishAckFuture>,
}

/// Unconfirmed messages a run may have before the oldest are awaited: it bounds the memory a
/// talkative agent holds and makes a run that outpaces JetStream wait for it. Their acks
/// mostly arrived already, so waiting for them costs nothing in the common case.
const MAX_UNCONFIRMED: usize = 64;

/// The publish acks the worker's JetStream context lets it await at once. Each one holds a
/// permit until it is awaited, and a run awaits its oldest only when it is about to pass
/// [`MAX_UNCONFIRMED`]: with fewer permits than its slots' runs may hold (async-nats's default
/// is 5,000: a thousand agents of five unconfirmed events), every run ends up waiting for a
/// permit that only another run's next publish would give back, and the worker stalls for
/// good. So there is room for every slot's runs, and some for results and reports.
pub fn acks_in_flight(slots: u32) -> usize {
    (slots as usize)
        .saturating_mul(MAX_UNCONFIRMED)
        .saturating_add(1_000)
        .max(5_000)
}

/// How a message whose ack failed (its NATS node died, the stream's leader moved) is sent
/// again: JetStream drops a copy it already stored, by its message id.
fn resend_policy() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(12)
}

impl JobDelivery {
    /// Restarts the ack-wait timer (`+WPI`).
    pub async fn in_progress(&self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|source| Error::Ack {
                what: "keep alive",
                source,
            })
    }

    /// Acknowledges the job without waiting for the server to confirm: the done marker is set
    /// before, so a lost ack only means a redelivered copy that is acked without running.
    pub async fn ack(&self) -> Result<(), Error> {
        self.msg.ack().await.map_err(|source| Error::Ack {
            what: "ack",
            source,
        })
    }

    /// The queue subject the job came from.
    pub fn subject(&self) -> &str {
        self.msg.subject.as_str()
    }

    /// Hands the job back, to be delivered again after `delay` (when it cannot be parked).
    pub async fn hand_back_after(&self, delay: Duration) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|source| Error::Ack {
                what: "hand back",
                source,
            })
    }

    /// Hands the job back for another worker, now.
    pub async fn hand_back(&self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|source| Error::Ack {
                what: "hand back",
                source,
            })
    }
}

/// A pulled message as a job, or terminated when it is not one.
async fn decode_pulled(msg: Result<jetstream::Message, async_nats::Error>) -> Option<Pulled> {
    let msg = match msg {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "pull error");
            return None;
        }
    };
    let (delivery, stream_seq) = msg
        .info()
        .map(|i| (i.delivered as u64, i.stream_sequence))
        .unwrap_or((1, 0));
    match codec::decode::<JobSpec>(&msg.payload) {
        Ok(spec) => Some(Pulled::Job(JobDelivery {
            spec: Arc::new(spec),
            delivery,
            traceparent: orch_config::telemetry::from_nats_headers(msg.headers.as_ref()),
            msg: Arc::new(msg),
            events: Arc::new(tokio::sync::Mutex::new(EventLog {
                run: format!("{stream_seq}.{delivery}"),
                seq: 0,
                unconfirmed: Default::default(),
            })),
        })),
        Err(e) => {
            tracing::error!(error = %e, "undecodable job message, terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            Some(Pulled::Undecodable)
        }
    }
}

impl Transport {
    /// Connects and waits (with backoff, until `cancel`) for the coordinator's job consumer.
    pub async fn connect(
        url: &str,
        nats: &orch_config::nats::Nats,
        name: &str,
        slots: u32,
    ) -> Result<(async_nats::Client, jetstream::Context), Error> {
        let client = nats
            .connect_options(name)
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
            .max_ack_inflight(acks_in_flight(slots))
            .build(client.clone());
        Ok((client, js))
    }

    /// Binds to the job queue, which the coordinator creates: reads the ack wait of its
    /// consumers from the pre-routing one (coordinators of every version create it).
    pub async fn bind(client: async_nats::Client, js: jetstream::Context) -> Result<Self, Error> {
        let transport = Self {
            client,
            js,
            ack_wait: Duration::ZERO,
        };
        let mut legacy = transport.queue(None).await?;
        let ack_wait = legacy
            .consumer
            .info()
            .await
            .map_err(|e| Error::Consumer(e.into()))?
            .config
            .ack_wait;
        Ok(Self {
            ack_wait,
            ..transport
        })
    }

    /// Binds to `backend`'s job consumer, or the pre-routing one for `None` (a coordinator
    /// older than routing by backend creates only that one).
    pub async fn queue(&self, backend: Option<Backend>) -> Result<Queue, Error> {
        let stream = self
            .js
            .get_stream(subject::JOBS_STREAM)
            .await
            .map_err(|e| Error::Consumer(e.into()))?;
        let name = match backend {
            Some(b) => subject::job_consumer(b.as_str()),
            None => subject::JOBS_CONSUMER.to_string(),
        };
        let consumer = stream.get_consumer(&name).await.map_err(Error::Consumer)?;
        Ok(Queue { backend, consumer })
    }

    /// Moves a job of the pre-routing queue to its backend's subject, then acks it there:
    /// the backend's consumer then delivers it to a worker that runs the backend. A crash in
    /// between leaves both copies; the second one to run finds the done marker or the lease.
    pub async fn reroute(&self, job: &JobDelivery) -> Result<(), Error> {
        let subject = subject::job(job.spec.backend.as_str());
        self.publish_job(
            &subject,
            subject::rerouted_msg_id(job.spec.job_id, job.spec.attempt),
            job.msg.payload.to_vec(),
            job.traceparent.as_deref(),
        )
        .await?;
        job.msg.double_ack().await.map_err(|source| Error::Ack {
            what: "ack the moved",
            source,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// One pull request for up to `n` jobs; messages arrive as the server delivers them and the
    /// stream ends when `n` arrived or `expires` passed. Dropping the stream withdraws the
    /// request: its inbox loses its subscription and JetStream skips a request nobody listens
    /// to (a job already on its way is redelivered after the ack wait).
    pub async fn pull(
        &self,
        queue: &Queue,
        n: usize,
        expires: Duration,
    ) -> Result<impl Stream<Item = Pulled> + use<>, Error> {
        let batch = queue
            .consumer
            .batch()
            .max_messages(n)
            .expires(expires)
            .messages()
            .await
            .map_err(|e| Error::Pull(e.into()))?;
        Ok(batch.filter_map(decode_pulled))
    }

    /// Up to `n` of the jobs waiting now, without waiting for more: the stream ends as soon as
    /// the queue has none left to give, or after `within`. The server answers such a request
    /// at once, but one lost with a server cut off from the network is never answered, and
    /// async-nats sets no deadline on it: without one, the pull loop would wait forever (a job
    /// still on its way is redelivered after its ack wait).
    pub async fn take_waiting(
        &self,
        queue: &Queue,
        n: usize,
        within: Duration,
    ) -> Result<impl Stream<Item = Pulled> + use<>, Error> {
        let batch = queue
            .consumer
            .fetch()
            .max_messages(n)
            .messages()
            .await
            .map_err(|e| Error::Pull(e.into()))?;
        Ok(batch
            .filter_map(decode_pulled)
            .take_until(tokio::time::sleep(within)))
    }

    /// Publishes an event of `job`'s run to the log, like [`Transport::publish_events`].
    pub async fn publish_event(&self, job: &JobDelivery, event: &Event) {
        self.publish_events(job, std::slice::from_ref(event)).await;
    }
    /// Publishes a running job's changed paths for the coordinator (core NATS, best effort:
    /// the next report carries the whole set again).
    pub async fn publish_paths(&self, report: &PathsReport) -> Result<(), Error> {
        let subject = subject::paths(report.task_id);
        self.client
            .publish(subject.clone(), codec::encode(report).into())
            .await
            .map_err(|e| Error::Publish {
                subject,
                source: e.into(),
            })
    }

    /// Publishes a burst of `job`'s events, as few messages as [`event::pack`] makes of them
    /// (a burst of agent output is one batch), each with its message id, without waiting for
    /// JetStream's acks: they are collected by [`Transport::confirm_events`] (or here, once a
    /// run has [`MAX_UNCONFIRMED`] of them), and a message whose ack failed is sent again.
    ///
    /// An ack for the last message alone would not do: when a NATS node dies, the messages
    /// it was carrying (to the stream's leader, or from a client whose connection then moves
    /// to another node) are lost while later ones are stored and acked.
    pub async fn publish_events(&self, job: &JobDelivery, events: &[Event]) {
        let mut log = job.events.lock().await;
        for message in event::pack(events) {
            // The oldest are awaited before the next goes out: a run never holds more than
            // its share of the worker's in-flight acks ([`acks_in_flight`]).
            while log.unconfirmed.len() >= MAX_UNCONFIRMED {
                if let Some(sent) = log.unconfirmed.pop_front()
                    && let Err(e) = self.confirm([sent]).await
                {
                    tracing::warn!(error = %e, "an event was not stored");
                }
            }
            let msg_id =
                subject::job_events_msg_id(job.spec.job_id, job.spec.attempt, &log.run, log.seq);
            log.seq += 1;
            let payload = bytes::Bytes::from(message.payload);
            let ack = self
                .send_logged(&message.subject, &msg_id, payload.clone())
                .await;
            log.unconfirmed.push_back(Sent {
                subject: message.subject,
                msg_id,
                payload,
                ack,
            });
        }
    }

    /// Waits until every event `job`'s run published is stored, sending again those whose
    /// ack failed (for about a minute: a NATS node's loss and the election of the stream's
    /// new leader take seconds).
    pub async fn confirm_events(&self, job: &JobDelivery) -> Result<(), Error> {
        let mut log = job.events.lock().await;
        let sent: Vec<Sent> = log.unconfirmed.drain(..).collect();
        self.confirm(sent).await
    }

    /// Sends one log message with its message id; `None` when it could not be sent (it is
    /// sent again when confirmed).
    async fn send_logged(
        &self,
        subject: &str,
        msg_id: &str,
        payload: bytes::Bytes,
    ) -> Option<jetstream::context::PublishAckFuture> {
        let publish = jetstream::message::PublishMessage::build()
            .message_id(msg_id)
            .payload(payload);
        match self.js.send_publish(subject.to_string(), publish).await {
            Ok(ack) => Some(ack),
            Err(e) => {
                tracing::debug!(error = %e, subject, "event not sent; it will be sent again");
                None
            }
        }
    }

    /// Awaits the acks of `sent`, in order, and sends again (in order, with backoff) the
    /// messages whose ack failed until each is stored.
    async fn confirm(&self, sent: impl IntoIterator<Item = Sent>) -> Result<(), Error> {
        let mut failed = Vec::new();
        for s in sent {
            let stored = match s.ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if !stored {
                failed.push((s.subject, s.msg_id, s.payload));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        metrics::counter!(crate::metrics::EVENTS_RESENT).increment(failed.len() as u64);
        let failed = tokio::sync::Mutex::new(failed);
        let resend = || async {
            let mut pending = failed.lock().await;
            let mut acks = Vec::with_capacity(pending.len());
            for (subject, msg_id, payload) in pending.iter() {
                acks.push(self.send_logged(subject, msg_id, payload.clone()).await);
            }
            let mut still = Vec::new();
            let mut last_error = None;
            for (entry, ack) in pending.drain(..).zip(acks) {
                let result = match ack {
                    Some(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                    None => Err("not sent".to_string()),
                };
                if let Err(e) = result {
                    last_error = Some(Error::Publish {
                        subject: entry.0.clone(),
                        source: e.into(),
                    });
                    still.push(entry);
                }
            }
            *pending = still;
            last_error.map_or(Ok(()), Err)
        };
        resend
            .retry(resend_policy())
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "events not stored, sending them again"))
            .await
    }

    /// Sends `job`'s last events (its `job_finished` last) like
    /// [`Transport::publish_events`] and waits until every event of the run is stored: only
    /// then may the result be published.
    pub async fn send_events(&self, job: &JobDelivery, events: &[Event]) -> Result<(), Error> {
        self.publish_events(job, events).await;
        self.confirm_events(job).await
    }

    /// Puts an encoded job spec (a parked attempt) back in the queue on `subject` and waits
    /// until JetStream stored it.
    pub async fn publish_job(
        &self,
        subject: &str,
        msg_id: String,
        spec: Vec<u8>,
        traceparent: Option<&str>,
    ) -> Result<(), Error> {
        orch_config::nats::publish_stored(&self.js, subject, msg_id, spec, traceparent)
            .await
            .map_err(|source| Error::Publish {
                subject: subject.to_string(),
                source,
            })
    }

    /// Publishes a job result and waits until JetStream stored it. Its message id makes a
    /// repeated publish of the same attempt's result a no-op inside the dedup window.
    pub async fn publish_result(&self, result: &JobResult) -> Result<(), Error> {
        let subject = subject::result(result.task_id);
        let publish = jetstream::message::PublishMessage::build()
            .message_id(subject::result_msg_id(
                result.job_id,
                result.attempt,
                result.fence,
            ))
            .payload(codec::encode(result).into());
        let err = |source: async_nats::Error| Error::Publish {
            subject: subject.clone(),
            source,
        };
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| err(e.into()))?;
        ack.await.map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// Cancellation requests for job attempts (core NATS, to every worker).
    pub async fn cancellations(&self) -> Result<impl Stream<Item = CancelJob> + use<>, Error> {
        let sub = self
            .client
            .subscribe(subject::CONTROL_CANCEL)
            .await
            .map_err(|e| Error::Pull(e.into()))?;
        Ok(sub.filter_map(|msg| async move { codec::decode::<CancelJob>(&msg.payload).ok() }))
    }

    pub async fn flush(&self) {
        let _ = self.client.flush().await;
    }
}
