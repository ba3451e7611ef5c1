//! The limit broker and parked jobs: provider usage limits shared by every worker through
//! Redis (`state/limits`).
//!
//! A backend may have a pool of named credentials (`[backends.<b>] credentials`). Before a
//! job runs, [`Limits::pick_credential`] gives it the first credential of the pool that the
//! broker does not hold exhausted; a 429 (with `retry-after` and the `anthropic-ratelimit-*`
//! headers) marks the credential exhausted until its reset for every worker
//! ([`Limits::learn`]). The job then moves once to another credential with room, or is
//! **parked**: its spec goes to the parked set in Redis with the reset as its wake time, its
//! lease is released and its message acked, so it holds no slot, no JetStream delivery and no
//! attempt. [`run_waker`] (every worker runs one) re-publishes due parked jobs to the queue, the
//! highest task priority first, as the same attempt (unless a coordinator's admission wakes
//! them, so that a resumed job takes a place under its cap: `keys::ADMISSION_RESUMES`). A worker that dies after taking a due job
//! and before re-publishing it only delays it: the job stays in the set, held for
//! [`HOLD`], and another worker takes it.
//!
//! A parked job starts its turn again from the session it continues (the custody work adds
//! checkpoints within a turn).

use crate::config::Credential;
use crate::metrics as m;
use crate::state::{Due, State, ToPark};
use crate::transport::Transport;
use orch_shared::api::Priority;
use orch_shared::codec;
use orch_shared::job::JobSpec;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a worker holds a due parked job while it re-publishes it.
pub const HOLD: Duration = Duration::from_secs(30);
/// How often the waker looks for due parked jobs.
pub const WAKE_EVERY: Duration = Duration::from_millis(250);
/// The shortest park: a credential whose reset already passed is asked again after this.
const MIN_PARK: Duration = Duration::from_secs(1);

/// Why and until when a job waits for a credential.
#[derive(Debug, Clone, PartialEq)]
pub struct Park {
    pub backend: &'static str,
    /// The credential it waits for (the one that resets first).
    pub credential: String,
    pub until_ms: u64,
    pub reason: String,
}

/// The broker's answer for a job.
#[derive(Debug)]
pub enum Pick {
    /// Run on this credential.
    Use(Credential),
    /// Every credential of the pool is exhausted.
    Exhausted(Park),
}

/// A handle on the broker (cheap to clone).
#[derive(Clone)]
pub struct Limits {
    state: State,
}

impl Limits {
    pub fn new(state: State) -> Self {
        Self { state }
    }

    /// Lists the credentials of `backend`'s pool for `orchctl quotas`.
    pub async fn register(&self, backend: &str, pool: &[Credential]) {
        let names: Vec<&str> = pool.iter().map(|c| c.name.as_str()).collect();
        if let Err(e) = self.state.register_credentials(backend, &names).await {
            tracing::warn!(error = %e, backend, "could not register credentials");
        }
    }

    /// The credential a job runs on: the first of `pool`, in order, that has room and is not
    /// in `tried`. When Redis cannot tell, the first untried one (losing Redis must not stop
    /// every agent). The sandbox proxy calls this too.
    pub async fn pick_credential(
        &self,
        backend: &'static str,
        pool: &[Credential],
        tried: &[String],
    ) -> Pick {
        let untried = || pool.iter().find(|c| !tried.contains(&c.name));
        let names: Vec<&str> = pool.iter().map(|c| c.name.as_str()).collect();
        let until = match self.state.limits_until(backend, &names).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, backend, "limit broker unreachable; using the pool in order");
                return match untried() {
                    Some(c) => Pick::Use(c.clone()),
                    None => Pick::Exhausted(self.park_for(backend, pool, &[])),
                };
            }
        };
        let now = orch_shared::now_ms();
        match pool
            .iter()
            .zip(&until)
            .find(|(c, u)| **u <= now && !tried.contains(&c.name))
        {
            Some((c, _)) => Pick::Use(c.clone()),
            None => Pick::Exhausted(self.park_for(backend, pool, &until)),
        }
    }

    /// A park until the first reset of the pool (`until`, per credential, may be empty).
    fn park_for(&self, backend: &'static str, pool: &[Credential], until: &[u64]) -> Park {
        let now = orch_shared::now_ms();
        let floor = now + MIN_PARK.as_millis() as u64;
        let (credential, until_ms) = pool
            .iter()
            .zip(until.iter().copied().chain(std::iter::repeat(0)))
            .map(|(c, u)| (c.name.clone(), u.max(floor)))
            .min_by_key(|(_, u)| *u)
            .unwrap_or_else(|| ("default".into(), floor));
        Park {
            backend,
            credential,
            until_ms,
            reason: "every credential of the pool is at its usage limit".into(),
        }
    }

    /// Records what the provider said about `backend/name`.
    pub async fn learn(&self, backend: &str, name: &str, learned: &crate::agent::http::Learned) {
        if learned.exhausted_until_ms.is_some() {
            metrics::counter!(m::CREDENTIALS_EXHAUSTED, "backend" => backend.to_string())
                .increment(1);
            tracing::warn!(
                backend,
                credential = name,
                until_ms = learned.exhausted_until_ms,
                "credential at its usage limit"
            );
        }
        if let Err(e) = self.state.record_limit(backend, name, learned).await {
            tracing::warn!(error = %e, backend, credential = name, "could not record a limit");
        }
    }

    /// Parks `spec` (pulled from `subject`) until `park.until_ms`; returns the park count.
    pub async fn park(
        &self,
        spec: &JobSpec,
        subject: &str,
        traceparent: Option<&str>,
        park: &Park,
    ) -> Result<u64, crate::state::Error> {
        let n = self
            .state
            .park(&ToPark {
                member: format!("{}:{}", spec.job_id, spec.attempt),
                spec: codec::encode(spec),
                subject,
                backend: park.backend,
                credential: &park.credential,
                priority: rank(spec.priority),
                wake_at_ms: park.until_ms,
                traceparent,
                approval: None,
            })
            .await?;
        metrics::counter!(m::JOBS_PARKED).increment(1);
        Ok(n)
    }
}

/// Parks `spec` (pulled from `subject`) until approval request `approval` is answered or its
/// deadline (`deadline_ms`) passes; returns the park count. The slot and the delivery are
/// released as for a limited job; the request stays in the queue as it was.
pub async fn park_for_approval(
    state: &State,
    spec: &JobSpec,
    subject: &str,
    traceparent: Option<&str>,
    approval: &str,
    deadline_ms: u64,
) -> Result<u64, crate::state::Error> {
    let n = state
        .park(&ToPark {
            member: format!("{}:{}", spec.job_id, spec.attempt),
            spec: codec::encode(spec),
            subject,
            backend: "",
            credential: "",
            priority: rank(spec.priority),
            wake_at_ms: deadline_ms,
            traceparent,
            approval: Some(approval),
        })
        .await?;
    metrics::counter!(m::JOBS_PARKED).increment(1);
    Ok(n)
}

fn rank(p: Priority) -> u8 {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

/// Re-publishes due parked jobs until `cancel`, highest priority first among those due
/// together (and in wake order within a priority).
pub async fn run_waker(state: State, transport: Transport, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(WAKE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut due = match state.take_due(256, HOLD).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for parked jobs");
                continue;
            }
        };
        // Stable: wake order is kept within one priority.
        due.sort_by_key(|d| std::cmp::Reverse(d.priority));
        for d in due {
            wake(&state, &transport, d).await;
        }
    }
}

async fn wake(state: &State, transport: &Transport, d: Due) {
    let spec: JobSpec = match codec::decode(&d.spec) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, member = %d.member, "a parked job does not decode; dropping it");
            let _ = state.unpark(&d).await;
            return;
        }
    };
    let msg_id = orch_shared::subject::unparked_msg_id(spec.job_id, spec.attempt, d.parks);
    match transport
        .publish_job(&d.subject, msg_id, d.spec.clone(), d.traceparent.as_deref())
        .await
    {
        Ok(()) => {
            tracing::info!(job_id = %spec.job_id, attempt = spec.attempt, parks = d.parks, "parked job back in the queue");
            metrics::counter!(m::JOBS_UNPARKED).increment(1);
            if let Err(e) = state.unpark(&d).await {
                // It is re-published again after the hold; the done marker and the lease
                // make the copy harmless.
                tracing::warn!(error = %e, "could not forget a re-published parked job");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not re-publish a parked job; retrying after the hold")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_rank_high_first() {
        assert!(rank(Priority::High) > rank(Priority::Normal));
        assert!(rank(Priority::Normal) > rank(Priority::Low));
    }
}
