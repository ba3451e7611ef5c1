//! Leader election between coordinator replicas: a lease in Redis (`orch:leader`, the holder's
//! id, a few seconds' TTL) taken with `SET NX PX` and renewed with a compare-and-extend script.
//! Only the leader dispatches (consumes results, runs lanes, timers and admission); every
//! replica serves reads. A standby takes over within the lease TTL plus one renewal period
//! after the leader dies. A leader that cannot renew in time stops (exit 1) rather than risk
//! two dispatchers: its process manager restarts it as a standby.
//!
//! Each replica that takes the lease raises the leader epoch (`orch:leader:epoch`), and every
//! task write of the leader carries its epoch, checked in the same Lua script that writes: a
//! leader paused or partitioned past its lease, whose lease another replica took, has its
//! next write refused (`state::Error::Fenced`), so it neither applies a result nor publishes
//! what would follow it, and stops at once.

use crate::state::{self, State};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the holder renews and a standby tries to take it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "lost the leader lease (another coordinator holds it, or Redis did not answer for {0:?})"
    )]
    Lost(Duration),
    #[error("fenced out: another coordinator took the leader lease (epoch {0} is stale)")]
    Fenced(u64),
    #[error(transparent)]
    State(#[from] state::Error),
}

/// Campaigns until `cancel`: `leader` turns true once this replica holds the lease. Returns an
/// error if it lost the lease after holding it.
pub async fn campaign(
    state: State,
    id: String,
    leader: watch::Sender<bool>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    let mut renewed_at: Option<Instant> = None;
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
        match renewed_at {
            None => match state.try_lead(&id, LEASE_TTL).await {
                Ok(true) => {
                    tracing::info!(%id, epoch = state.leader_epoch(), "this coordinator is the leader");
                    renewed_at = Some(Instant::now());
                    metrics::gauge!(crate::metrics::LEADER).set(1.0);
                    let _ = leader.send(true);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not campaign for leadership"),
            },
            Some(at) => match state.renew_lead(&id, LEASE_TTL).await {
                Ok(true) => renewed_at = Some(Instant::now()),
                Ok(false) => return Err(Error::Lost(at.elapsed())),
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader lease");
                    // Step down before the lease can lapse and a standby take over.
                    if at.elapsed() + RENEW_EVERY >= LEASE_TTL {
                        return Err(Error::Lost(at.elapsed()));
                    }
                }
            },
        }
    }
}
