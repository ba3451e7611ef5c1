//! The forge's IO flows: opening a completed task's pull request and syncing its review
//! comments. Each asks the forge, decides ([`super::review`]) and hands the change to the
//! task's lane ([`Control::Forge`]), the one writer of the record.

use super::review::{self, Change, Decision};
use super::{Error, Handle, NewPull, Pull, Step};
use crate::driver::{Control, ControlError, Effects};
use orch_shared::api::Task;
use orch_shared::ids::{JobId, TaskId};

/// Why a sync did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Forge(#[from] Error),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What a sync did, in one sentence for people.
#[derive(Debug, Clone)]
pub struct Synced {
    pub outcome: String,
    pub task: Option<Task>,
}

/// How often the leader looks for pull requests that still need a step ([`run_pending`]).
pub const PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the steps `task`'s pull request needs ([`super::next_step`]; with `retry`, also
/// after a failed one: a person asked) and records each; a failure is recorded too. `None`
/// when there was nothing to do, or another step of the task is under way here.
///
/// Each step reads the record afresh once it holds the task's claim, and opening looks for
/// an open pull request from the task branch before creating one, so a step taken again (by
/// a new leader, the pending sweep, `orchctl pr sync`) never opens a second one.
pub async fn advance(
    fx: &Effects,
    handle: &Handle,
    task: &Task,
    retry: bool,
) -> Result<Option<Task>, SyncError> {
    let wanted = |t: &Task| {
        if retry {
            super::step_ignoring_errors(t)
        } else {
            super::next_step(t)
        }
    };
    if wanted(task).is_none() {
        return Ok(None);
    }
    let Some(_claim) = handle.claim(task.id) else {
        return Ok(None);
    };
    let Some(mut task) = fx
        .state
        .load_task(task.id)
        .await
        .map_err(ControlError::from)?
    else {
        return Ok(None);
    };
    let mut changed = None;
    // Opening a draft of a completed task is followed by marking it ready: two steps at most.
    for _ in 0..2 {
        let Some(step) = wanted(&task) else {
            break;
        };
        let change = take(handle, &task, step).await;
        task = fx
            .driver
            .control(task.id, Control::Forge(Box::new(change)))
            .await?;
        let failed = task.pr.as_ref().is_some_and(|p| p.error.is_some());
        changed = Some(task.clone());
        if failed {
            break;
        }
    }
    Ok(changed)
}

/// Carries out one step on the forge; what to record.
async fn take(handle: &Handle, task: &Task, step: Step) -> Change {
    let outcome = match step {
        Step::Open { draft } => find_or_create(handle, task, draft).await.map(|pull| {
            tracing::info!(task_id = %task.id, number = pull.number, url = %pull.url, draft = pull.draft, "pull request open");
            Change::Opened {
                number: pull.number,
                url: pull.url,
                draft: pull.draft,
            }
        }),
        Step::Ready => ready(handle, task).await.map(|()| {
            tracing::info!(task_id = %task.id, "pull request ready for review");
            Change::Ready
        }),
    };
    outcome.unwrap_or_else(|e| {
        tracing::warn!(task_id = %task.id, error = %e, ?step, "pull request step failed");
        Change::Failed(e.to_string())
    })
}

/// The check passed: the description gets the final record (the check's result) and the
/// draft becomes ready for review.
async fn ready(handle: &Handle, task: &Task) -> Result<(), Error> {
    let (Some(pr), Some(number)) = (&task.pr, task.pr.as_ref().and_then(|p| p.number)) else {
        return Ok(());
    };
    let forge = &handle.forge;
    forge
        .update_body(&pr.repo, number, &super::pr_body(task))
        .await?;
    let pull = forge.pull(&pr.repo, number).await?;
    if pull.draft {
        forge.mark_ready(&pr.repo, &pull).await?;
    }
    Ok(())
}

/// Sees to the pull requests that still need a step, on the leader: at once (a new leader
/// finishes what the last one left, a rebuilt Redis what its log brought back) and every
/// [`PENDING_EVERY`] (Redis caught up with the log while this one leads). A task leaves the
/// set once it ended and its pull request needs nothing more.
pub async fn run_pending(fx: Effects, handle: Handle, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(PENDING_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep(&fx, &handle).await {
            tracing::warn!(error = %e, "could not see to pending pull requests");
        }
    }
}

async fn sweep(fx: &Effects, handle: &Handle) -> Result<(), SyncError> {
    for id in fx.state.pr_pending().await.map_err(ControlError::from)? {
        let task = fx.state.load_task(id).await.map_err(ControlError::from)?;
        let Some(task) = task else {
            fx.state
                .remove_pr_pending(id)
                .await
                .map_err(ControlError::from)?;
            continue;
        };
        if super::next_step(&task).is_some() {
            if let Err(e) = advance(fx, handle, &task, false).await {
                tracing::warn!(task_id = %id, error = %e, "pull request step not recorded");
            }
        } else if task.status.is_terminal() && super::step_ignoring_errors(&task).is_none() {
            fx.state
                .remove_pr_pending(id)
                .await
                .map_err(ControlError::from)?;
        }
    }
    Ok(())
}

async fn find_or_create(handle: &Handle, task: &Task, draft: bool) -> Result<Pull, Error> {
    let Some(pr) = &task.pr else {
        return Err(Error::Status {
            what: "the task".into(),
            status: 400,
            message: "no pull request asked for".into(),
        });
    };
    let forge = &handle.forge;
    if let Some(found) = forge.find_pull(&pr.repo, &pr.head).await? {
        return Ok(found);
    }
    let mut labels = handle.config.labels.clone();
    labels.extend(pr.labels.iter().cloned());
    labels.dedup();
    let new = NewPull {
        title: super::pr_title(task),
        body: super::pr_body(task),
        base: pr.base.clone(),
        head: pr.head.clone(),
        draft,
        labels,
    };
    match forge.create_pull(&pr.repo, &new).await {
        // Another coordinator (or a sync) opened it meanwhile: the forge allows one.
        Err(e) if e.status() == Some(422) => forge.find_pull(&pr.repo, &pr.head).await?.ok_or(e),
        other => other,
    }
}

/// Syncs the review comments of `task_id`'s pull request: opens it first if the task
/// completed without one, then decides and applies a round or an escalation.
pub async fn sync(fx: &Effects, handle: &Handle, task: Task) -> Result<Synced, SyncError> {
    let Some(pr) = task.pr.clone() else {
        return Ok(Synced {
            outcome: "the task asked for no pull request".into(),
            task: None,
        });
    };
    if super::step_ignoring_errors(&task).is_some() {
        let was_open = pr.number.is_some();
        let done = advance(fx, handle, &task, true).await?;
        let outcome = match done.as_ref().and_then(|t| t.pr.as_ref()) {
            Some(p) if p.error.is_some() => format!(
                "pull request step failed: {}",
                p.error.as_deref().unwrap_or("unknown error")
            ),
            Some(p) => {
                let (number, url) = (p.number.unwrap_or(0), p.url.as_deref().unwrap_or(""));
                match (was_open, p.draft) {
                    (true, _) => format!("pull request #{number} is ready for review: {url}"),
                    (false, true) => format!("opened draft pull request #{number}: {url}"),
                    (false, false) => format!("opened pull request #{number}: {url}"),
                }
            }
            None => "another step of this pull request is under way".into(),
        };
        return Ok(Synced {
            outcome,
            task: done,
        });
    }
    let Some(number) = pr.number else {
        return Ok(Synced {
            outcome: format!(
                "the pull request is opened when the task completes (it is {})",
                task.status.as_str()
            ),
            task: None,
        });
    };
    let pull = handle.forge.pull(&pr.repo, number).await?;
    let comments = handle.forge.review_comments(&pr.repo, number).await?;
    match review::decide(&task, &pr, &pull, &comments, &handle.config) {
        Decision::Nothing(why) => Ok(Synced {
            outcome: why,
            task: None,
        }),
        Decision::Escalate {
            reason,
            last_comment_id,
        } => {
            let task = fx
                .driver
                .control(
                    task.id,
                    Control::Forge(Box::new(Change::Escalated {
                        reason: reason.clone(),
                        last_comment_id,
                    })),
                )
                .await?;
            tracing::warn!(task_id = %task.id, number, %reason, "review loop stopped; a person is needed");
            let note = format!(
                "The orchestrator stopped sending review comments to its agents: {reason}. \
                 A person needs to look at this pull request."
            );
            if let Err(e) = handle.forge.comment(&pr.repo, number, &note).await {
                tracing::warn!(task_id = %task.id, error = %e, "could not comment on the pull request");
            }
            Ok(Synced {
                outcome: format!("escalated: {reason}"),
                task: Some(task),
            })
        }
        Decision::Round(round) => {
            let turns: Vec<(JobId, JobId, String)> = round
                .turns
                .iter()
                .map(|(owner, message)| (*owner, JobId::new(), message.clone()))
                .collect();
            let agents: Vec<String> = turns.iter().map(|(_, new, _)| new.to_string()).collect();
            let task = fx
                .driver
                .control(
                    task.id,
                    Control::Forge(Box::new(Change::Round {
                        head: round.head.clone(),
                        last_comment_id: round.last_comment_id,
                        comments: round.comments,
                        findings: round.findings,
                        turns,
                    })),
                )
                .await?;
            let rounds = task.pr.as_ref().map_or(0, |p| p.rounds);
            tracing::info!(task_id = %task.id, number, round = rounds, comments = round.comments, "review comments sent to the agents");
            let note = format!(
                "The orchestrator sent {} review comment(s) to its agent(s) ({}), round {rounds} of at most {}.",
                round.comments,
                agents.join(", "),
                handle.config.max_review_rounds
            );
            if let Err(e) = handle.forge.comment(&pr.repo, number, &note).await {
                tracing::warn!(task_id = %task.id, error = %e, "could not comment on the pull request");
            }
            Ok(Synced {
                outcome: format!(
                    "review round {rounds}: {} comment(s) sent to agent(s) {}",
                    round.comments,
                    agents.join(", ")
                ),
                task: Some(task),
            })
        }
    }
}

/// The task a branch belongs to: `orch/<task-id>`.
pub fn task_of_branch(branch: &str) -> Option<TaskId> {
    branch.strip_prefix("orch/")?.parse().ok()
}
