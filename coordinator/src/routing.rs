//! Routing by backend: every backend has its own job subject and consumer, and a worker pulls
//! only those of the backends it runs (it advertises them in the registry). A job whose
//! backend no live worker runs is not refused: it waits in its backend's queue (workers may be
//! scaling up from zero, or restarting), and its task's log says why at once, with a
//! `job_waiting` event naming the backend. [`Served`] is what the dispatch asks.

use crate::state::State;
use orch_shared::job::Backend;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A worker missing heartbeats for this long does not count (as in `GET /v1/workers`).
const WORKER_MAX_AGE: Duration = Duration::from_secs(15);
/// How long a read of the registry answers "served".
const FRESH: Duration = Duration::from_secs(5);
/// A backend missing from the last read is looked up again after this long: a worker that
/// just joined counts at once.
const RECHECK: Duration = Duration::from_millis(500);

/// The last read of the registry: when, and the backends the live workers ran then.
type Sighting = (Instant, BTreeSet<String>);

/// Which backends the live workers run, read from the registry and cached briefly.
#[derive(Clone)]
pub struct Served {
    state: State,
    seen: Arc<Mutex<Option<Sighting>>>,
}

impl Served {
    pub fn new(state: State) -> Self {
        Self {
            state,
            seen: Arc::default(),
        }
    }

    /// The backends among `wanted` that no live worker runs. When the registry cannot be read
    /// nothing is reported missing (a wrong "waiting" would mislead more than none).
    pub async fn missing(&self, wanted: &BTreeSet<Backend>) -> Vec<Backend> {
        if wanted.is_empty() {
            return vec![];
        }
        let cached = self.seen.lock().ok().and_then(|s| s.clone());
        let lacking = |set: &BTreeSet<String>| -> Vec<Backend> {
            wanted
                .iter()
                .filter(|b| !set.contains(b.as_str()))
                .copied()
                .collect()
        };
        if let Some((at, set)) = &cached {
            let missing = lacking(set);
            if at.elapsed() < RECHECK || (missing.is_empty() && at.elapsed() < FRESH) {
                return missing;
            }
        }
        match self.state.workers(WORKER_MAX_AGE).await {
            Ok(workers) => {
                let set: BTreeSet<String> = workers.into_iter().flat_map(|w| w.backends).collect();
                let missing = lacking(&set);
                if let Ok(mut s) = self.seen.lock() {
                    *s = Some((Instant::now(), set));
                }
                missing
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not read the worker registry");
                vec![]
            }
        }
    }
}

/// What a job's `job_waiting` event says when no live worker runs its backend.
pub fn waiting_reason(backend: Backend) -> String {
    format!(
        "waiting for a worker with backend {backend}: no live worker runs it (see `orchctl workers`); \
         the job stays queued and runs when one joins",
        backend = backend.as_str()
    )
}
