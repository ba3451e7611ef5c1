//! Reading the event log beyond one live task: the cluster-wide live stream, reads that end
//! once they have caught up with the log (transcripts, exports), purging a task's messages,
//! and the work queue's depth from its consumer's info.

use super::{Error, StoredEvent, Transport, stored_events};
use async_nats::jetstream::consumer;
use futures::{Stream, StreamExt};
use orch_shared::event::EventId;
use orch_shared::ids::TaskId;
use orch_shared::job::Backend;
use orch_shared::report::{BackendQueue, QueueInfo};
use orch_shared::subject;
use std::time::Duration;
use strum::VariantNames;

/// The name [`Transport::queue_by_backend`] gives the pre-routing consumer.
pub const LEGACY: &str = "legacy";

/// The sum of a queue's parts.
pub fn total(parts: &[BackendQueue]) -> QueueInfo {
    parts
        .iter()
        .fold(QueueInfo::default(), |sum, p| sum.plus(p.queue))
}

/// Messages one fetch of a catch-up read asks for.
const FETCH_BATCH: usize = 512;
/// How long one fetch of a catch-up read may take (the server answers at once).
const FETCH_DEADLINE: Duration = Duration::from_secs(10);

/// Where a catch-up read of the event log starts.
#[derive(Clone, Copy, Debug)]
pub enum ReadFrom {
    /// The first stored event.
    Start,
    /// The first event stored at or after this time (ms since the epoch).
    Time(u64),
}

fn read_err(what: impl Into<String>) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error {
    let what = what.into();
    move |source| Error::Read {
        what: what.clone(),
        source,
    }
}

impl Transport {
    /// The work queue by consumer: each backend's (wire name) and the pre-routing one
    /// (`legacy`), with jobs waiting, held by workers and delivered more than once, from the
    /// consumers' info (`workers` left 0 for the caller to fill).
    pub async fn queue_by_backend(&self) -> Result<Vec<BackendQueue>, Error> {
        let read = read_err("the job queue's consumer info");
        let stream = self
            .js()
            .get_stream(subject::JOBS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let consumers = Backend::VARIANTS
            .iter()
            .map(|b| ((*b).to_string(), subject::job_consumer(b)))
            .chain([(LEGACY.to_string(), subject::JOBS_CONSUMER.to_string())]);
        // One request per consumer, all at once: getting a consumer brings its info.
        let stream = &stream;
        let read = &read;
        futures::future::try_join_all(consumers.map(|(backend, name)| async move {
            let consumer: consumer::PullConsumer =
                stream.get_consumer(&name).await.map_err(read)?;
            let info = consumer.cached_info();
            Ok(BackendQueue {
                backend,
                queue: QueueInfo {
                    pending: info.num_pending,
                    in_flight: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                },
                workers: 0,
            })
        }))
        .await
    }

    /// The whole work queue: [`Transport::queue_by_backend`] summed.
    pub async fn queue_info(&self) -> Result<QueueInfo, Error> {
        Ok(total(&self.queue_by_backend().await?))
    }

    /// Events of every task after `after` (the default id: only events stored from now on),
    /// then live ones; only the kinds in `kinds` when it is not empty.
    pub async fn all_events(
        &self,
        after: EventId,
        kinds: &[String],
    ) -> Result<impl Stream<Item = StoredEvent> + use<>, Error> {
        let read = read_err("the cluster's events");
        let stream = self
            .js()
            .get_stream(subject::EVENTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        // From the message holding `after`: a batch may have more events after it.
        let deliver_policy = if after.seq == 0 {
            consumer::DeliverPolicy::New
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after.seq,
            }
        };
        let mut config = consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        };
        if kinds.is_empty() {
            config.filter_subject = subject::EVENTS_SUBJECTS.into();
        } else {
            // Batches carry events of several kinds: they are read too and filtered here.
            config.filter_subjects = kinds.iter().map(|k| subject::all_events_of(k)).collect();
            config.filter_subjects.push(subject::ALL_BATCHES.into());
            config.filter_subjects.push(subject::ALL_CREATED.into());
        }
        let kinds: Vec<String> = kinds.to_vec();
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| read(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| read(e.into()))?;
        Ok(messages
            .flat_map(|msg| {
                futures::stream::iter(msg.map(|m| stored_events(&m)).unwrap_or_default())
            })
            .filter(move |e| {
                let wanted = e.id() > after
                    && (kinds.is_empty() || kinds.iter().any(|k| k == e.event.kind.name()));
                futures::future::ready(wanted)
            }))
    }

    /// The stored events of one task (or of every task when `task` is `None`) from `from`,
    /// ending once the read has caught up with the log: what was stored when the read began
    /// and whatever arrived while it ran. Memory stays bounded: events are fetched
    /// [`FETCH_BATCH`] at a time as the caller consumes them.
    pub async fn stored_events(
        &self,
        task: Option<TaskId>,
        from: ReadFrom,
    ) -> Result<impl Stream<Item = StoredEvent> + use<>, Error> {
        let what = match task {
            Some(t) => format!("events of task {t}"),
            None => "the event log".to_string(),
        };
        let read = read_err(what);
        let stream = self
            .js()
            .get_stream(subject::EVENTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let deliver_policy = match from {
            ReadFrom::Start => consumer::DeliverPolicy::All,
            ReadFrom::Time(ms) => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        };
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: match task {
                    Some(t) => subject::task_events(t),
                    None => subject::EVENTS_SUBJECTS.into(),
                },
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                // An abandoned read (the client went away) cleans itself up.
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| read(e.into()))?;
        // Each step fetches what is available without waiting; an empty fetch means the read
        // has caught up.
        let pages = futures::stream::unfold(Some((stream, consumer)), |state| async move {
            let (stream, consumer) = state?;
            let batch = consumer
                .fetch()
                .max_messages(FETCH_BATCH)
                .messages()
                .await
                .ok()?;
            // A fetch lost with a server cut off from the network is never answered (and
            // async-nats sets no deadline on it): the read ends there instead of hanging.
            let events: Vec<StoredEvent> = batch
                .take_until(tokio::time::sleep(FETCH_DEADLINE))
                .flat_map(|m| {
                    futures::stream::iter(m.map(|m| stored_events(&m)).unwrap_or_default())
                })
                .collect()
                .await;
            if events.is_empty() {
                let name = consumer.cached_info().name.clone();
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(error = %e, "could not delete a finished read's consumer");
                }
                return None;
            }
            Some((futures::stream::iter(events), Some((stream, consumer))))
        });
        Ok(pages.flatten())
    }

    /// Deletes every message of a task from the event log and the results stream; returns how
    /// many of each went.
    pub async fn purge_task(&self, task: TaskId) -> Result<(u64, u64), Error> {
        let read = read_err(format!("the streams of task {task}"));
        let events = self
            .js()
            .get_stream(subject::EVENTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let purged_events = events
            .purge()
            .filter(subject::task_events(task))
            .await
            .map_err(|e| read(e.into()))?
            .purged;
        let results = self
            .js()
            .get_stream(subject::RESULTS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        let purged_results = results
            .purge()
            .filter(subject::result(task))
            .await
            .map_err(|e| read(e.into()))?
            .purged;
        // And its snapshot, or a rebuild of Redis from the log would bring the task back.
        let tasks = self
            .js()
            .get_stream(subject::TASKS_STREAM)
            .await
            .map_err(|e| read(e.into()))?;
        tasks
            .purge()
            .filter(subject::task_snapshot(task))
            .await
            .map_err(|e| read(e.into()))?;
        Ok((purged_events, purged_results))
    }
}
