//! Job counters, taken where the leader applies the facts: a job's start (the `job_started`
//! event its lane applies), its end (the result its lane applies), retries and dead letters
//! (the events the pipeline itself emits). Only the leader counts, so the cluster counts each
//! fact once (every replica used to count every event it heard), and no event is received
//! twice for metrics.
//!
//! Labels come from fixed sets (see [`crate::sampler::model_label`] and
//! [`crate::sampler::backend_label`]).

use crate::metrics as m;
use crate::sampler::{backend_label, model_label};
use orch_shared::api::Task;
use orch_shared::event::{Event, EventKind};
use orch_shared::ids::JobId;
use orch_shared::job::JobResult;
use std::collections::HashMap;

/// Job starts remembered (per lane) to label the job's end; older ones are forgotten.
const MAX_REMEMBERED_STARTS: usize = 100_000;

/// Labels of a job attempt, learnt from its start.
#[derive(Clone, Copy)]
struct Labels {
    role: &'static str,
    model: &'static str,
    backend: &'static str,
}

/// The starts a lane has seen, to label the ends (a result names no backend).
#[derive(Default)]
pub struct JobMeter {
    starts: HashMap<(JobId, u32), Labels>,
}

impl JobMeter {
    /// A worker started a job attempt.
    pub fn started(&mut self, event: &Event) {
        let (
            Some(job_id),
            EventKind::JobStarted {
                role,
                backend,
                model,
                delivery,
                ..
            },
        ) = (event.job_id, &event.kind)
        else {
            return;
        };
        let labels = Labels {
            role: role.as_str(),
            model: model_label(model.as_deref()),
            backend: backend_label(backend),
        };
        metrics::counter!(m::JOBS_STARTED, "role" => labels.role, "backend" => labels.backend)
            .increment(1);
        if *delivery > 1 {
            metrics::counter!(m::JOB_REDELIVERIES, "role" => labels.role).increment(1);
        }
        if self.starts.len() >= MAX_REMEMBERED_STARTS {
            // Jobs whose end never came (a lost worker): forget them all; a later end is
            // labelled from the task record.
            self.starts.clear();
        }
        self.starts.insert((job_id, event.attempt), labels);
    }

    /// A job attempt's result was applied to `task` (charged, fence checked).
    pub fn finished(&mut self, task: &Task, result: &JobResult) {
        let role = task
            .jobs
            .iter()
            .find(|j| j.id == result.job_id)
            .map(|j| j.role);
        let labels = self
            .starts
            .remove(&(result.job_id, result.attempt))
            .unwrap_or_else(|| Labels {
                role: role.map_or("unknown", |r| r.as_str()),
                model: model_label(
                    result
                        .model
                        .as_deref()
                        .or(role.and_then(|r| task.model_of(r))),
                ),
                backend: backend_label(role.map_or(task.backend, |r| task.backend_of(r)).as_str()),
            });
        let usage = &result.usage;
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_write", usage.cache_creation_tokens),
            ("cache_read", usage.cache_read_tokens),
        ] {
            metrics::counter!(m::AGENT_TOKENS, "role" => labels.role, "model" => labels.model,
                "backend" => labels.backend, "kind" => kind)
            .increment(n);
        }
        metrics::gauge!(m::AGENT_COST_USD, "role" => labels.role, "model" => labels.model,
            "backend" => labels.backend)
        .increment(result.cost_usd);
        if result.outcome.is_success() {
            metrics::histogram!(m::JOB_ATTEMPTS, "role" => labels.role)
                .record(f64::from(result.attempt.max(1)));
        }
    }
}

/// An event the coordinator emits: retries and dead letters are counted.
pub fn emitted(kind: &EventKind) {
    match kind {
        EventKind::JobRetrying { reason, .. } => {
            metrics::counter!(m::JOB_RETRIES, "reason" => reason.as_str()).increment(1);
        }
        EventKind::JobDeadLettered { reason } => {
            metrics::counter!(m::JOBS_DEAD_LETTERED, "reason" => reason.as_str()).increment(1);
        }
        EventKind::ConflictWarning { kind, .. } => {
            let kind = match kind.as_str() {
                crate::conflicts::SAME_FILE => crate::conflicts::SAME_FILE,
                _ => crate::conflicts::IN_SCOPE,
            };
            metrics::counter!(m::CONFLICT_WARNINGS, "kind" => kind).increment(1);
        }
        _ => {}
    }
}
