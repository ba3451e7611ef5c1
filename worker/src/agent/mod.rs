//! Agent backends. One trait; the job's `backend` picks the implementation.
//!
//! An agent reports progress through an [`Events`] sink (text, tool calls, usage) and returns
//! an [`AgentOutput`]. It must stop promptly when its cancellation token fires.

pub mod sim;

use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{JobSpec, Outcome, Usage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What an agent run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentOutput {
    pub outcome: Outcome,
    pub output: String,
    pub usage: Usage,
    pub cost_usd: f64,
    pub files_read: Vec<String>,
    pub files_written: Vec<String>,
}

/// Where an agent sends its progress; the runner publishes it to the task's event log.
#[derive(Clone)]
pub struct Events(mpsc::UnboundedSender<EventKind>);

impl Events {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<EventKind>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    pub fn send(&self, kind: EventKind) {
        // The runner outlives the agent; a closed channel only means the job is being torn down.
        let _ = self.0.send(kind);
    }
}

/// An agent backend.
pub trait Agent: Send + Sync {
    /// The backend name reported in events.
    fn name(&self) -> &'static str;

    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, AgentOutput>;
}
