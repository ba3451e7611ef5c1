//! Arrival times of task events, taken from a core NATS subscription by a background reader,
//! so a scenario measures when an event was published, not when it got round to looking.

use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Events seen so far: `<task id>.<kind>` → when it arrived, plus counts per kind.
#[derive(Clone, Default)]
pub struct Watch {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: Mutex<Seen>,
    notify: Notify,
}

impl Inner {
    /// The figures so far. A panic while they were held cannot leave them half-updated (each
    /// update is one map insert), so a poisoned lock is read as it is.
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Seen {
    at: HashMap<String, Instant>,
    counts: HashMap<String, u64>,
    payloads: Vec<(String, Instant, bytes::Bytes)>,
    first: HashMap<String, bytes::Bytes>,
}

/// The events of `kinds` one message brings: `(<task>.<kind>, kind, the event's encoding)`; a
/// batch's events are taken out of it (each re-encoded as if it had come alone).
fn arrivals(msg: &async_nats::Message, kinds: &[String]) -> Vec<(String, String, bytes::Bytes)> {
    use orch_shared::subject::{BATCH_KIND, CREATED_KIND};
    let key = orch_shared::subject::event_key(msg.subject.as_str()).unwrap_or_default();
    let kind = key.rsplit('.').next().unwrap_or_default();
    if kind != BATCH_KIND && kind != CREATED_KIND {
        return vec![(key.to_string(), kind.to_string(), msg.payload.clone())];
    }
    orch_shared::event::decode_message(kind, &msg.payload)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| kinds.iter().any(|k| k == e.kind.name()))
        .map(|e| {
            let kind = e.kind.name().to_string();
            let key = format!("{}.{kind}", e.task_id);
            (key, kind, orch_shared::codec::encode(&e).into())
        })
        .collect()
}

/// Which events a [`Watch`] keeps the payload of (for scenarios that decode them).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Times,
    /// Every payload, in arrival order ([`Watch::take_payloads`]).
    Payloads,
    /// The payload of each key's first event ([`Watch::first_payload`]).
    First,
}

impl Watch {
    /// Follows `orch.events.*.<kind>` for every kind in `kinds`, and the event batches and
    /// creation messages (whose events of those kinds count as if they had come alone, at the
    /// message's arrival).
    pub async fn start(nats_url: &str, kinds: &[&str], keep: Keep) -> anyhow::Result<Watch> {
        let client = async_nats::connect(nats_url).await?;
        let mut subs = Vec::new();
        for kind in kinds {
            subs.push(
                client
                    .subscribe(orch_shared::subject::all_events_of(kind))
                    .await?,
            );
        }
        subs.push(client.subscribe(orch_shared::subject::ALL_BATCHES).await?);
        subs.push(client.subscribe(orch_shared::subject::ALL_CREATED).await?);
        let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
        // The subscriptions are registered once the server has seen the flush.
        client.flush().await?;
        let watch = Watch::default();
        let inner = watch.inner.clone();
        tokio::spawn(async move {
            let _client = client;
            let mut all = futures::stream::select_all(subs);
            while let Some(msg) = all.next().await {
                let now = Instant::now();
                let seen_now = arrivals(&msg, &kinds);
                {
                    let mut seen = inner.seen();
                    for (key, kind, payload) in seen_now {
                        *seen.counts.entry(kind).or_default() += 1;
                        match keep {
                            Keep::Times => {}
                            Keep::Payloads => seen.payloads.push((key.clone(), now, payload)),
                            Keep::First => {
                                seen.first.entry(key.clone()).or_insert(payload);
                            }
                        }
                        seen.at.entry(key).or_insert(now);
                    }
                }
                inner.notify.notify_waiters();
            }
        });
        Ok(watch)
    }

    /// Follows `subject`, keying each message by `key(payload)` (messages it returns `None`
    /// for are skipped).
    pub async fn start_with(
        nats_url: &str,
        subject: &str,
        key: impl Fn(&[u8]) -> Option<String> + Send + 'static,
    ) -> anyhow::Result<Watch> {
        let client = async_nats::connect(nats_url).await?;
        let mut sub = client.subscribe(subject.to_string()).await?;
        client.flush().await?;
        let watch = Watch::default();
        let inner = watch.inner.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let now = Instant::now();
                if let Some(k) = key(&msg.payload) {
                    inner.seen().at.entry(k).or_insert(now);
                    inner.notify.notify_waiters();
                }
            }
        });
        Ok(watch)
    }

    /// When `<task>.<kind>` first arrived, waiting up to `timeout` for it.
    pub async fn wait(&self, task: &str, kind: &str, timeout: Duration) -> Option<Instant> {
        let key = format!("{task}.{kind}");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.notify.notified();
            if let Some(at) = self.inner.seen().at.get(&key) {
                return Some(*at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// How many events of `kind` arrived.
    pub fn count(&self, kind: &str) -> u64 {
        self.inner.seen().counts.get(kind).copied().unwrap_or(0)
    }

    /// Waits until `n` events of `kind` arrived; false if `stall` passes without a new one.
    pub async fn wait_count(&self, kind: &str, n: u64, stall: Duration) -> bool {
        let mut last = self.count(kind);
        let mut last_change = Instant::now();
        loop {
            let notified = self.inner.notify.notified();
            let now = self.count(kind);
            if now >= n {
                return true;
            }
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if last_change.elapsed() > stall {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }

    /// The payload of `<task>.<kind>`'s first event (with [`Keep::First`]), once it arrived.
    pub fn first_payload(&self, task: &str, kind: &str) -> Option<bytes::Bytes> {
        let key = format!("{task}.{kind}");
        self.inner.seen().first.get(&key).cloned()
    }

    /// The payloads kept so far (with [`Keep::Payloads`]), taken out.
    pub fn take_payloads(&self) -> Vec<(String, Instant, bytes::Bytes)> {
        std::mem::take(&mut self.inner.seen().payloads)
    }
}
