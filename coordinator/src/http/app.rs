//! [`App`]: what every handler can reach.

use super::answer::{Answer, Failure};
use super::auth::Tokens;
use crate::driver;
use crate::state::State;
use crate::transport::Transport;
use metrics_exporter_prometheus::PrometheusHandle;
use orch_shared::error::{ApiError, ErrorCode};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What every handler can reach.
#[derive(Clone)]
pub struct App {
    /// Set once this replica leads (only the leader dispatches and takes writes).
    pub effects: Arc<std::sync::OnceLock<driver::Effects>>,
    pub leader: tokio::sync::watch::Receiver<bool>,
    pub state: State,
    pub transport: Transport,
    pub tokens: Arc<Tokens>,
    pub metrics: Option<PrometheusHandle>,
    pub shutdown: CancellationToken,
    /// The forge pull requests are opened on, when one is configured.
    pub forge: Option<crate::forge::Handle>,
}

impl App {
    /// What writes need. A standby forwards writes to the leader before they get here, so
    /// this fails only while no replica leads (an election in progress).
    pub fn effects(&self) -> Answer<&driver::Effects> {
        self.effects.get().filter(|_| self.leads()).ok_or_else(|| {
            Failure(ApiError::new(
                ErrorCode::Unavailable,
                "no coordinator leads right now (an election is in progress); retry in a few seconds",
            ))
        })
    }

    /// Whether this replica leads and can take writes.
    pub fn leads(&self) -> bool {
        *self.leader.borrow() && self.effects.get().is_some()
    }
}
