//! The chaos suites' ledger check (Jepsen's queue checker, for tasks): every task must end
//! completed, no job attempt may run twice unnoticed, and no job may be charged more than the
//! executions it finished; with a stuck-run detector that fails fast, dumping the tasks that
//! stopped moving.

use crate::Cluster;
use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::event::EventKind;
use orch_shared::ids::JobId;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a task may take to end once the run moves.
const WAIT: Duration = Duration::from_secs(600);
/// How long no task may change state before the run counts as stuck.
const STUCK: Duration = Duration::from_secs(30);

/// Waits until every task ended, failing fast (with their state) when none moves for `STUCK`.
pub async fn wait_moving(cluster: &Cluster, ids: &[String]) {
    let mut last: HashMap<String, String> = HashMap::new();
    let mut moved = Instant::now();
    loop {
        let mut open = Vec::new();
        for id in ids {
            if last
                .get(id)
                .is_some_and(|s| s == "completed" || s == "failed" || s == "cancelled")
            {
                continue;
            }
            let t = cluster.task(id).await;
            let state = format!(
                "{}:{}",
                t.status.as_str(),
                t.jobs
                    .iter()
                    .map(|j| format!("{}{}", j.status.as_str(), j.attempt))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let key = if t.status.is_terminal() {
                t.status.as_str().to_string()
            } else {
                state
            };
            if last.insert(id.clone(), key.clone()).as_ref() != Some(&key) {
                moved = Instant::now();
            }
            if !t.status.is_terminal() {
                open.push(t);
            }
        }
        if open.is_empty() {
            return;
        }
        assert!(
            moved.elapsed() < STUCK,
            "stuck: {} tasks made no progress for {STUCK:?}: {:#?}\n{}",
            open.len(),
            open.iter().take(5).collect::<Vec<_>>(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the ledger check found over a set of tasks.
#[derive(Debug, Default)]
pub struct Ledger {
    pub tasks: usize,
    pub lost: Vec<String>,
    pub failed: Vec<String>,
    /// Job attempts that started more than once (a worker died or stalled mid-job).
    pub duplicate_starts: usize,
    /// Jobs whose charged cost differs from one finished execution's cost.
    pub double_charged: Vec<String>,
    /// Tokens every run of every job spent (the runs cut short included).
    pub tokens_spent: u64,
    /// Tokens spent again: what runs cut short (a killed worker, a failed attempt retried)
    /// had spent beyond the checkpoint the next run resumed from ([`tokens_redone`]).
    pub tokens_redone: u64,
}

/// One run of a job (from its `job_started` event to the next one).
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    /// Tokens of the checkpoint it resumed from (0 when it started afresh).
    resumed_at: u64,
    /// Tokens it spent itself (its last cumulative `usage` event).
    spent: u64,
    succeeded: bool,
}

/// Tokens spent, and tokens spent again, over one job's events in order: each run that did not
/// succeed and was followed by another had its tokens redone, less what the next run kept by
/// resuming from a checkpoint further on than its own start.
pub fn tokens_redone<'a>(kinds: impl IntoIterator<Item = &'a EventKind>) -> (u64, u64) {
    let mut runs: Vec<Run> = Vec::new();
    for kind in kinds {
        match kind {
            EventKind::JobStarted { .. } => runs.push(Run::default()),
            EventKind::Resumed {
                usage,
                from_agent: None,
                ..
            } => {
                if let Some(r) = runs.last_mut() {
                    r.resumed_at = usage.total();
                }
            }
            EventKind::Usage { usage, .. } => {
                if let Some(r) = runs.last_mut() {
                    r.spent = r.spent.max(usage.total());
                }
            }
            EventKind::JobFinished { success, .. } => {
                if let Some(r) = runs.last_mut() {
                    r.succeeded = *success;
                }
            }
            _ => {}
        }
    }
    let spent = runs.iter().map(|r| r.spent).sum();
    let redone = runs
        .windows(2)
        .filter(|w| !w[0].succeeded)
        .map(|w| {
            let kept = w[1].resumed_at.saturating_sub(w[0].resumed_at);
            w[0].spent.saturating_sub(kept)
        })
        .sum();
    (spent, redone)
}

pub async fn check(cluster: &Cluster, ids: &[String]) -> Ledger {
    let mut ledger = Ledger {
        tasks: ids.len(),
        ..Default::default()
    };
    wait_moving(cluster, ids).await;
    for id in ids {
        let task: Task = cluster.wait_task(id, WAIT).await;
        if task.status != TaskStatus::Completed {
            if task.status.is_terminal() {
                ledger.failed.push(format!("{id}: {:?}", task.error));
            } else {
                ledger.lost.push(id.clone());
            }
            continue;
        }
        let events = cluster.events(id, None).await;
        let mut starts: HashMap<(JobId, u32), usize> = HashMap::new();
        let mut finished: HashMap<(JobId, u32), Vec<f64>> = HashMap::new();
        for (_, e) in &events {
            let Some(job) = e.job_id else { continue };
            match &e.kind {
                EventKind::JobStarted { .. } => *starts.entry((job, e.attempt)).or_default() += 1,
                EventKind::JobFinished { cost_usd, .. } => finished
                    .entry((job, e.attempt))
                    .or_default()
                    .push(*cost_usd),
                _ => {}
            }
        }
        ledger.duplicate_starts += starts.values().map(|n| n.saturating_sub(1)).sum::<usize>();
        for job in &task.jobs {
            let (spent, redone) = tokens_redone(
                events
                    .iter()
                    .filter(|(_, e)| e.job_id == Some(job.id))
                    .map(|(_, e)| &e.kind),
            );
            ledger.tokens_spent += spent;
            ledger.tokens_redone += redone;
        }
        for job in &task.jobs {
            let charged: f64 = (1..=job.attempt)
                .filter_map(|a| finished.get(&(job.id, a)).and_then(|c| c.first()))
                .sum();
            if job.status != JobStatus::Succeeded || (job.cost_usd - charged).abs() > 1e-12 {
                // The task's log as it was read, to tell a lost event from a second charge.
                let log: Vec<String> = events
                    .iter()
                    .map(|(eid, e)| format!("{eid} {} {}", e.attempt, e.kind.name()))
                    .collect();
                ledger.double_charged.push(format!(
                    "{} job {} (attempt {}): charged {} for executions costing {charged}; log: {}",
                    id,
                    job.id,
                    job.attempt,
                    job.cost_usd,
                    log.join(", ")
                ));
            }
        }
        let sum: f64 = task.jobs.iter().map(|j| j.cost_usd).sum();
        if (task.cost_usd - sum).abs() > 1e-9 {
            ledger.double_charged.push(format!(
                "{id}: task charged {} for jobs costing {sum}",
                task.cost_usd
            ));
        }
    }
    eprintln!(
        "ledger: {} tasks, {} lost, {} failed, {} duplicate executions, {} double charges, \
         {} of {} tokens spent again after kills",
        ledger.tasks,
        ledger.lost.len(),
        ledger.failed.len(),
        ledger.duplicate_starts,
        ledger.double_charged.len(),
        ledger.tokens_redone,
        ledger.tokens_spent
    );
    ledger
}

pub fn assert_clean(ledger: &Ledger, cluster: &Cluster) {
    assert!(
        ledger.lost.is_empty(),
        "lost: {:?}\n{}",
        ledger.lost,
        cluster.logs()
    );
    assert!(ledger.failed.is_empty(), "failed: {:?}", ledger.failed);
    assert!(
        ledger.double_charged.is_empty(),
        "double charges: {:?}",
        ledger.double_charged
    );
}

/// Submits `n` one-job tasks whose simulated agent takes `latency_ms`; returns their ids.
pub async fn submit_many(cluster: &Cluster, n: usize, latency_ms: u64) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let t = cluster
            .submit(json!({"prompt": format!("chaos task {i}"), "roles": ["builder"], "sim": {"latency_ms": latency_ms}}))
            .await;
        ids.push(t.id.to_string());
    }
    ids
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use orch_shared::job::Usage;

    fn usage(tokens: u64) -> EventKind {
        EventKind::Usage {
            usage: Usage {
                input_tokens: tokens,
                ..Usage::default()
            },
            cost_usd: 0.0,
        }
    }

    fn started() -> EventKind {
        EventKind::JobStarted {
            worker_id: orch_shared::ids::WorkerId("w".into()),
            role: orch_shared::role::Role::Builder,
            backend: "anthropic".into(),
            model: None,
            delivery: 1,
            started_at_us: 0,
            sandbox: None,
        }
    }

    fn resumed(tokens: u64) -> EventKind {
        EventKind::Resumed {
            from_attempt: 1,
            from_step: 1,
            from_worker: "w".into(),
            usage: Usage {
                input_tokens: tokens,
                ..Usage::default()
            },
            cost_usd: 0.0,
            from_agent: None,
            files_not_restored: None,
        }
    }

    fn finished() -> EventKind {
        EventKind::JobFinished {
            success: true,
            reason: None,
            message: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            duration_ms: 1,
        }
    }

    #[test]
    fn a_killed_run_s_tokens_are_redone_less_what_the_next_run_resumed_from() {
        // Killed after 80 tokens, restarted from nothing: all 80 again.
        let off = [
            started(),
            usage(40),
            usage(80),
            started(),
            usage(100),
            finished(),
        ];
        assert_eq!(tokens_redone(&off), (180, 80));
        // Resumed from a checkpoint at 70: 10 again.
        let on = [
            started(),
            usage(40),
            usage(80),
            started(),
            resumed(70),
            usage(20),
            finished(),
        ];
        assert_eq!(tokens_redone(&on), (100, 10));
        // A run that finished is never redone.
        assert_eq!(tokens_redone(&[started(), usage(5), finished()]), (5, 0));
    }
}
