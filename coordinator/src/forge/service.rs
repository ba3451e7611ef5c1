//! The forge's IO flows: opening a completed task's pull request and syncing its review
//! comments. Each asks the forge, decides ([`super::review`]) and hands the change to the
//! task's lane ([`Control::Forge`]), the one writer of the record.

use super::review::{self, Change, Decision};
use super::{Error, Handle, NewPull, Pull};
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

/// Opens the pull request of a completed `task` (or finds the one a previous attempt opened)
/// and records it; a failure is recorded too. Nothing when the task asked for none or has one.
pub async fn open(fx: &Effects, handle: &Handle, task: &Task) -> Result<Option<Task>, SyncError> {
    let Some(pr) = &task.pr else {
        return Ok(None);
    };
    if pr.number.is_some() {
        return Ok(None);
    }
    let change = match find_or_create(handle, task).await {
        Ok(pull) => {
            tracing::info!(task_id = %task.id, number = pull.number, url = %pull.url, "pull request open");
            Change::Opened {
                number: pull.number,
                url: pull.url,
            }
        }
        Err(e) => {
            tracing::warn!(task_id = %task.id, error = %e, "pull request not opened");
            Change::Failed(e.to_string())
        }
    };
    let task = fx
        .driver
        .control(task.id, Control::Forge(Box::new(change)))
        .await?;
    Ok(Some(task))
}

async fn find_or_create(handle: &Handle, task: &Task) -> Result<Pull, Error> {
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
        draft: false,
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
    let Some(number) = pr.number else {
        if task.status != orch_shared::api::TaskStatus::Completed {
            return Ok(Synced {
                outcome: format!(
                    "the pull request is opened when the task completes (it is {})",
                    task.status.as_str()
                ),
                task: None,
            });
        }
        let task = open(fx, handle, &task).await?;
        let outcome = match task.as_ref().and_then(|t| t.pr.as_ref()) {
            Some(p) if p.url.is_some() => format!(
                "opened pull request #{}: {}",
                p.number.unwrap_or(0),
                p.url.as_deref().unwrap_or("")
            ),
            Some(p) => format!(
                "pull request not opened: {}",
                p.error.as_deref().unwrap_or("unknown error")
            ),
            None => "nothing to do".into(),
        };
        return Ok(Synced { outcome, task });
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
