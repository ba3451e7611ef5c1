//! Leader election between coordinator replicas: a lease in Redis (`orch:leader`, the holder's
//! id, a few seconds' TTL) taken with `SET NX PX` and renewed with a compare-and-extend script.
//! Only the leader dispatches (consumes results, runs lanes, timers and admission); every
//! replica serves reads. A standby takes over within the lease TTL plus one renewal period
//! after the leader dies. A leader that cannot renew in time stops (exit 1) rather than risk
//! two dispatchers: its process manager restarts it as a standby. A renewal that fails is tried
//! again every [`RENEW_RETRY`], and the Redis connection sends it again to a primary the
//! sentinels just promoted, so a Sentinel failover shorter than the lease (`--leader-lease`,
//! [`LEASE_TTL`] by default) less one renewal period does not cost the leader its lease.
//!
//! Each replica that takes the lease raises the leader epoch (`orch:leader:epoch`), and every
//! task write of the leader carries its epoch, checked in the same Lua script that writes: a
//! leader paused or partitioned past its lease, whose lease another replica took, has its
//! next write refused (`state::Error::Fenced`), so it neither applies a result nor publishes
//! what would follow it, and stops at once.
//!
//! A leader must reach NATS as well as Redis: one whose NATS connection has been down for
//! [`NATS_GRACE`] (its machine cut off from the NATS servers, while Redis still answers it)
//! gives the lease back and stops, so a standby that reaches both takes over at once; a
//! replica without NATS does not campaign.

use crate::state::{self, State};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a lease lasts without renewal, by default (`--leader-lease`).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// The shortest lease accepted: three renewal periods.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
/// How often the holder renews and a standby tries to take it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How soon a renewal that failed is tried again (a Redis failover takes seconds).
pub const RENEW_RETRY: Duration = Duration::from_millis(250);
/// How long a leader may be without a NATS connection before it gives up the lease (a
/// server restart or a move to another node of the cluster takes less).
pub const NATS_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "lost the leader lease (another coordinator holds it, or Redis did not answer for {0:?})"
    )]
    Lost(Duration),
    #[error("fenced out: another coordinator took the leader lease (epoch {0} is stale)")]
    Fenced(u64),
    #[error("no NATS connection for {0:?} while leading: gave the leader lease back")]
    NatsLost(Duration),
    #[error(transparent)]
    State(#[from] state::Error),
}

/// Campaigns until `cancel`: `leader` turns true once this replica holds the lease. Returns an
/// error if it lost the lease after holding it, or gave it back for want of NATS (`nats` says
/// whether the NATS connection is up).
pub async fn campaign(
    state: State,
    id: String,
    ttl: Duration,
    leader: watch::Sender<bool>,
    cancel: CancellationToken,
    nats: impl Fn() -> bool + Send + 'static,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let mut renewed_at: Option<Instant> = None;
    // Since when the NATS connection has been down (None while it is up).
    let mut nats_down: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if renewed_at.is_some() {
                    let _ = state.release_leader(&id).await;
                }
                return Ok(());
            }
            _ = tick.tick() => {}
            _ = state.fenced() => return Err(Error::Fenced(state.leader_epoch())),
        }
        nats_down = match (nats(), nats_down) {
            (true, _) => None,
            (false, since) => Some(since.unwrap_or_else(Instant::now)),
        };
        if let (Some(_), Some(since)) = (renewed_at, nats_down)
            && since.elapsed() >= NATS_GRACE
        {
            let _ = state.release_leader(&id).await;
            return Err(Error::NatsLost(since.elapsed()));
        }
        match renewed_at {
            None if nats_down.is_some() => {}
            None => match state.try_lead(&id, ttl).await {
                Ok(true) => {
                    tracing::info!(%id, epoch = state.leader_epoch(), "this coordinator is the leader");
                    renewed_at = Some(Instant::now());
                    metrics::gauge!(crate::metrics::LEADER).set(1.0);
                    let _ = leader.send(true);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not campaign for leadership"),
            },
            Some(at) => match state.renew_lead(&id, ttl).await {
                Ok(true) => renewed_at = Some(Instant::now()),
                Ok(false) => return Err(Error::Lost(at.elapsed())),
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    // Step down before the lease can lapse and a standby take over.
                    if at.elapsed() + RENEW_EVERY >= ttl {
                        return Err(Error::Lost(at.elapsed()));
                    }
                    // Try again soon: a Sentinel failover moves the connection to the new
                    // primary any moment, and the lease is there, still ours.
                    tick.reset_after(RENEW_RETRY);
                }
            },
        }
    }
}
