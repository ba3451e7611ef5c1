//! The review loop's decisions, free of IO. [`decide`] looks at the task, its pull request and
//! the review comments and says what to do: nothing, a round of follow-up turns, or stop and
//! ask a person. [`apply`] makes a decided change to the task record in its lane (where the
//! record is written), checking again what may have changed meanwhile.
//!
//! Rules:
//! - A comment is handled once: comments up to the highest id already handed on are old.
//! - A head commit is reviewed once: a round is started for a head only if no round was.
//! - Each comment goes to the agent that owns the file it is on (the latest job whose branch
//!   changed that path; the latest agent for a comment on no file or a file no agent wrote),
//!   as a follow-up turn of that agent's conversation. Agents that own several comments get one
//!   turn with all of them.
//! - The loop stops and asks a person when a finding comes back (the same file and the same
//!   words, after the agents' turn was meant to address it), when `max_review_rounds` rounds
//!   were sent, or when the pull request changes more than `max_diff_lines` lines.

use super::{Config, Pull, ReviewComment};
use crate::pipeline::{self, Action, TurnError};
use orch_shared::api::{JobStatus, PullRequest, Task};
use orch_shared::event::EventKind;
use orch_shared::ids::JobId;
use orch_shared::job::JobKind;
use std::collections::BTreeMap;

/// What to do about a pull request's review comments.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing (why).
    Nothing(String),
    /// Stop the loop and ask a person (why); the comments up to `last_comment_id` are handled.
    Escalate {
        reason: String,
        last_comment_id: u64,
    },
    /// Send these turns.
    Round(Round),
}

/// One review round.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub head: String,
    pub last_comment_id: u64,
    pub comments: u32,
    /// Fingerprints of the round's findings.
    pub findings: Vec<String>,
    /// Per owning agent, the message of its follow-up turn.
    pub turns: Vec<(JobId, String)>,
}

/// A change to a task's pull request, applied in the task's lane.
#[derive(Debug, Clone)]
pub enum Change {
    Opened {
        number: u64,
        url: String,
        draft: bool,
    },
    /// The draft is ready for review (the check passed).
    Ready,
    Failed(String),
    Escalated {
        reason: String,
        last_comment_id: u64,
    },
    /// A round: `turns` pairs each owning agent with the id of its new turn.
    Round {
        head: String,
        last_comment_id: u64,
        comments: u32,
        findings: Vec<String>,
        turns: Vec<(JobId, JobId, String)>,
    },
}

/// Why a change was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("the task has no pull request")]
    NoPr,
    #[error("head {0} was already reviewed")]
    Reviewed(String),
    #[error(transparent)]
    Turn(#[from] TurnError),
}

/// The finding a comment makes, comparable across rounds: its file and its words, in lower
/// case, without punctuation or spacing differences.
pub fn fingerprint(c: &ReviewComment) -> String {
    let words: Vec<String> = c
        .body
        .split(|ch: char| !ch.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    format!("{}: {}", c.path.as_deref().unwrap_or(""), words.join(" "))
}

/// The agent that owns `path`: the latest succeeded agent job that wrote it, else the latest
/// succeeded agent job.
pub fn owner_of(task: &Task, path: Option<&str>) -> Option<JobId> {
    let agents = || {
        task.jobs
            .iter()
            .rev()
            .filter(|j| j.kind == JobKind::Agent && j.status == JobStatus::Succeeded)
    };
    path.and_then(|p| agents().find(|j| j.files_written.iter().any(|f| f == p)))
        .or_else(|| agents().next())
        .map(|j| j.id)
}

/// Decides what the review comments of `pull` call for.
pub fn decide(
    task: &Task,
    pr: &PullRequest,
    pull: &Pull,
    comments: &[ReviewComment],
    config: &Config,
) -> Decision {
    if let Some(why) = &pr.escalated {
        return Decision::Nothing(format!(
            "the review loop is stopped and waits for a person: {why}"
        ));
    }
    if pull.state != "open" {
        return Decision::Nothing(format!("pull request #{} is {}", pull.number, pull.state));
    }
    let new: Vec<&ReviewComment> = comments
        .iter()
        .filter(|c| c.id > pr.last_comment_id && !c.body.trim().is_empty())
        .collect();
    let Some(last_comment_id) = new.iter().map(|c| c.id).max() else {
        return Decision::Nothing("no new review comments".into());
    };
    if pr.reviewed_heads.contains(&pull.head_sha) {
        return Decision::Nothing(format!(
            "head {} was already reviewed; the new comments wait for the agents' next commit",
            short(&pull.head_sha)
        ));
    }
    if !task.status.is_terminal() {
        return Decision::Nothing(
            "the task's agents are still working; the comments wait for their commit".into(),
        );
    }
    let escalate = |reason: String| Decision::Escalate {
        reason,
        last_comment_id,
    };
    if let Some(again) = new.iter().find(|c| pr.findings.contains(&fingerprint(c))) {
        return escalate(format!(
            "the same finding came back after the agents addressed it: {}{}",
            again
                .path
                .as_deref()
                .map_or(String::new(), |p| format!("{p}: ")),
            cut(again.body.trim(), 200)
        ));
    }
    if pr.rounds >= config.max_review_rounds {
        return escalate(format!(
            "{} review round(s) were sent to the agents (the limit is forge.max-review-rounds)",
            pr.rounds
        ));
    }
    if pull.changed_lines > config.max_diff_lines {
        return escalate(format!(
            "the pull request changes {} lines, more than forge.max-diff-lines ({})",
            pull.changed_lines, config.max_diff_lines
        ));
    }
    let mut by_owner: BTreeMap<JobId, Vec<&ReviewComment>> = BTreeMap::new();
    for c in &new {
        let Some(owner) = owner_of(task, c.path.as_deref()) else {
            return escalate(
                "no agent of the task succeeded: there is no one to send the review to".into(),
            );
        };
        by_owner.entry(owner).or_default().push(c);
    }
    let number = pull.number;
    let turns = by_owner
        .into_iter()
        .map(|(owner, cs)| (owner, message(number, &pull.head_sha, &cs)))
        .collect();
    Decision::Round(Round {
        head: pull.head_sha.clone(),
        last_comment_id,
        comments: new.len() as u32,
        findings: new.iter().map(|c| fingerprint(c)).collect(),
        turns,
    })
}

/// The follow-up turn's message for the comments one agent owns.
fn message(number: u64, head: &str, comments: &[&ReviewComment]) -> String {
    let mut m = format!(
        "Review comments on pull request #{number} (head {}) ask for changes to your work. \
         Address each one in the files; when you finish, your changes are committed and pushed \
         to the same branch.\n",
        short(head)
    );
    for (i, c) in comments.iter().enumerate() {
        let at = match (&c.path, c.line) {
            (Some(p), Some(l)) => format!("`{p}` line {l}"),
            (Some(p), None) => format!("`{p}`"),
            _ => "the pull request".to_string(),
        };
        let by = if c.author.is_empty() {
            String::new()
        } else {
            format!(" (by {})", c.author)
        };
        m.push_str(&format!("\n{}. On {at}{by}:\n", i + 1));
        for line in c.body.trim().lines() {
            m.push_str(&format!("   > {line}\n"));
        }
    }
    m
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

/// Applies `change` to the task record; returns the actions to carry out.
pub fn apply(task: &mut Task, change: Change, now_ms: u64) -> Result<Vec<Action>, ApplyError> {
    let pr = task.pr.as_ref().ok_or(ApplyError::NoPr)?;
    match change {
        Change::Opened { number, url, draft } => {
            let pr = task.pr.get_or_insert_with(PullRequest::default);
            if pr.number == Some(number) {
                return Ok(vec![]);
            }
            pr.number = Some(number);
            pr.url = Some(url.clone());
            pr.draft = draft;
            pr.error = None;
            Ok(vec![
                Action::Emit(None, EventKind::PrOpened { number, url, draft }),
                Action::Snapshot,
            ])
        }
        Change::Ready => {
            let pr = task.pr.get_or_insert_with(PullRequest::default);
            let Some(number) = pr.number.filter(|_| pr.draft) else {
                return Ok(vec![]);
            };
            pr.draft = false;
            pr.error = None;
            Ok(vec![
                Action::Emit(None, EventKind::PrReady { number }),
                Action::Snapshot,
            ])
        }
        Change::Failed(reason) => {
            let pr = task.pr.get_or_insert_with(PullRequest::default);
            pr.error = Some(reason.clone());
            Ok(vec![
                Action::Emit(None, EventKind::PrFailed { reason }),
                Action::Snapshot,
            ])
        }
        Change::Escalated {
            reason,
            last_comment_id,
        } => {
            if pr.escalated.is_some() {
                return Ok(vec![]);
            }
            let pr = task.pr.get_or_insert_with(PullRequest::default);
            pr.escalated = Some(reason.clone());
            pr.last_comment_id = pr.last_comment_id.max(last_comment_id);
            Ok(vec![
                Action::Emit(None, EventKind::PrEscalated { reason }),
                Action::Snapshot,
            ])
        }
        Change::Round {
            head,
            last_comment_id,
            comments,
            findings,
            turns,
        } => {
            if pr.reviewed_heads.contains(&head) {
                return Err(ApplyError::Reviewed(head));
            }
            // Every turn is checked before any is added, so a refused round changes nothing.
            let froms = turns
                .iter()
                .map(|(owner, _, _)| pipeline::latest_turn(task, *owner))
                .collect::<Result<Vec<_>, _>>()?;
            let mut actions = Vec::new();
            let mut agents = Vec::new();
            for (from, (_, new, message)) in froms.into_iter().zip(turns) {
                actions.extend(pipeline::add_turn(
                    task, from, new, &message, false, now_ms,
                )?);
                agents.push(new);
            }
            let pr = task.pr.get_or_insert_with(PullRequest::default);
            pr.rounds += 1;
            pr.reviewed_heads.push(head.clone());
            pr.last_comment_id = pr.last_comment_id.max(last_comment_id);
            pr.findings.extend(findings);
            actions.push(Action::Emit(
                None,
                EventKind::PrReviewed {
                    round: pr.rounds,
                    head,
                    comments,
                    agents,
                },
            ));
            actions.push(Action::Snapshot);
            Ok(actions)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forge::Secret;
    use orch_shared::api::TaskStatus;

    fn config() -> Config {
        Config {
            api_url: "http://127.0.0.1:1".into(),
            token: Secret::new("t".into()),
            webhook_secret: None,
            labels: vec![],
            max_review_rounds: 2,
            max_diff_lines: 100,
            draft: true,
        }
    }

    fn comment(id: u64, path: &str, body: &str) -> ReviewComment {
        ReviewComment {
            id,
            path: Some(path.into()),
            line: Some(3),
            body: body.into(),
            author: "rev".into(),
        }
    }

    fn pull(head: &str, lines: u64) -> Pull {
        Pull {
            number: 7,
            url: "https://example/pr/7".into(),
            head_sha: head.into(),
            state: "open".into(),
            changed_lines: lines,
            draft: false,
            node_id: "PR_7".into(),
        }
    }

    /// A completed task of two agents: the analyst wrote `notes.md`, the builder `src/a.rs`.
    fn task() -> Task {
        let (mut task, _) = crate::pipeline::new_task(
            orch_shared::ids::TaskId::new(),
            crate::pipeline::TaskOptions {
                prompt: "p".into(),
                task_type: "custom".into(),
                mode: Default::default(),
                backend: Default::default(),
                model: None,
                backends: Default::default(),
                models: Default::default(),
                workspace: Default::default(),
                sim: Default::default(),
                idempotency_key: None,
                execution: Default::default(),
                llm_planner: false,
                mcp_servers: Default::default(),
                check: None,
            },
            crate::planner::plan(
                "custom",
                "p",
                Some(&[
                    orch_shared::role::Role::Analyst,
                    orch_shared::role::Role::Builder,
                ]),
                None,
            )
            .unwrap(),
            1,
        )
        .unwrap();
        for (job, file) in task.jobs.iter_mut().zip(["notes.md", "src/a.rs"]) {
            job.status = JobStatus::Succeeded;
            job.files_written = vec![file.into()];
        }
        task.status = TaskStatus::Completed;
        task.pr = Some(PullRequest {
            repo: "o/r".into(),
            base: "main".into(),
            head: "orch/x".into(),
            number: Some(7),
            ..Default::default()
        });
        task
    }

    #[test]
    fn the_next_step_of_a_pull_request_comes_from_the_record_alone() {
        use crate::forge::{Step, next_step, step_ignoring_errors};
        let mut task = task();
        // Open already, never a draft: nothing to do.
        assert_eq!(next_step(&task), None);
        // Completed and not open yet: open it, ready for review.
        task.pr.as_mut().unwrap().number = None;
        assert_eq!(next_step(&task), Some(Step::Open { draft: false }));
        // Running: nothing yet, unless it drafts while a check job exists.
        task.status = TaskStatus::Running;
        assert_eq!(next_step(&task), None);
        task.pr.as_mut().unwrap().draft_while_checking = true;
        assert_eq!(next_step(&task), None, "no check queued yet");
        task.jobs[1].kind = orch_shared::job::JobKind::Check;
        assert_eq!(next_step(&task), Some(Step::Open { draft: true }));
        // Open as a draft: marked ready once the task completes, not when it fails.
        let pr = task.pr.as_mut().unwrap();
        pr.number = Some(7);
        pr.draft = true;
        assert_eq!(next_step(&task), None);
        task.status = TaskStatus::Failed;
        assert_eq!(next_step(&task), None);
        task.status = TaskStatus::Completed;
        assert_eq!(next_step(&task), Some(Step::Ready));
        // A failed step waits for a person's retry.
        task.pr.as_mut().unwrap().error = Some("the forge answered 502".into());
        assert_eq!(next_step(&task), None);
        assert_eq!(step_ignoring_errors(&task), Some(Step::Ready));
        // Marked ready: nothing more.
        let mut actions = apply(&mut task, Change::Ready, 2).unwrap();
        assert!(!task.pr.as_ref().unwrap().draft);
        assert_eq!(task.pr.as_ref().unwrap().error, None);
        assert!(matches!(
            actions.remove(0),
            Action::Emit(None, EventKind::PrReady { number: 7 })
        ));
        assert_eq!(next_step(&task), None);
        assert_eq!(apply(&mut task, Change::Ready, 3).unwrap().len(), 0);
    }

    #[test]
    fn the_pull_request_body_says_how_the_check_went() {
        let mut task = task();
        assert!(!crate::forge::pr_body(&task).contains("### Check"));
        task.check = Some(orch_shared::api::CheckReport {
            command: "cargo test".into(),
            max_rounds: 3,
            rounds: 2,
            passed: Some(false),
            output_tail: "test a ... FAILED".into(),
            blamed: vec![],
        });
        let body = crate::forge::pr_body(&task);
        assert!(
            body.contains("`cargo test`: **failed** after 2 of at most 3 rounds"),
            "{body}"
        );
        assert!(body.contains("> test a ... FAILED"), "{body}");
        task.check.as_mut().unwrap().passed = Some(true);
        let body = crate::forge::pr_body(&task);
        assert!(
            body.contains("**passed**") && !body.contains("FAILED"),
            "{body}"
        );
    }

    #[test]
    fn comments_go_to_the_agent_that_wrote_the_file_and_the_round_is_recorded() {
        let mut task = task();
        let pr = task.pr.clone().unwrap();
        let builder = task.jobs[1].id;
        let comments = [
            comment(10, "src/a.rs", "Handle the error."),
            comment(11, "README.md", "Say what it does."),
        ];
        let Decision::Round(round) = decide(&task, &pr, &pull("aaa", 10), &comments, &config())
        else {
            panic!("expected a round");
        };
        // README.md was written by no one: the latest agent (the builder) gets it too.
        assert_eq!(round.turns.len(), 1);
        assert_eq!(round.turns[0].0, builder);
        assert!(round.turns[0].1.contains("`src/a.rs` line 3 (by rev)"));
        assert!(round.turns[0].1.contains("> Say what it does."));
        let new = JobId::new();
        let actions = apply(
            &mut task,
            Change::Round {
                head: round.head.clone(),
                last_comment_id: round.last_comment_id,
                comments: round.comments,
                findings: round.findings.clone(),
                turns: vec![(builder, new, round.turns[0].1.clone())],
            },
            2,
        )
        .unwrap();
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Publish(s) if s.job_id == new))
        );
        assert_eq!(task.status, TaskStatus::Running);
        let pr = task.pr.clone().unwrap();
        assert_eq!((pr.rounds, pr.last_comment_id), (1, 11));
        // The same head is never reviewed twice, even by a round decided before this one.
        let again = apply(
            &mut task,
            Change::Round {
                head: "aaa".into(),
                last_comment_id: 12,
                comments: 1,
                findings: vec![],
                turns: vec![],
            },
            3,
        );
        assert_eq!(again, Err(ApplyError::Reviewed("aaa".into())));
    }

    #[test]
    fn the_loop_asks_a_person_when_a_finding_repeats_rounds_run_out_or_the_diff_grows() {
        let task = task();
        let mut pr = task.pr.clone().unwrap();
        pr.rounds = 1;
        pr.last_comment_id = 10;
        pr.reviewed_heads = vec!["aaa".into()];
        pr.findings = vec![fingerprint(&comment(10, "src/a.rs", "Handle the error."))];
        let cfg = config();
        // Nothing new, or a head already reviewed: nothing to do.
        let old = [comment(10, "src/a.rs", "Handle the error.")];
        assert!(matches!(
            decide(&task, &pr, &pull("bbb", 1), &old, &cfg),
            Decision::Nothing(_)
        ));
        let repeated = [comment(12, "src/a.rs", "handle the  error")];
        assert!(matches!(
            decide(&task, &pr, &pull("aaa", 1), &repeated, &cfg),
            Decision::Nothing(_)
        ));
        match decide(&task, &pr, &pull("bbb", 1), &repeated, &cfg) {
            Decision::Escalate {
                reason,
                last_comment_id,
            } => {
                assert!(reason.contains("same finding"), "{reason}");
                assert_eq!(last_comment_id, 12);
            }
            other => panic!("{other:?}"),
        }
        let fresh = [comment(13, "src/a.rs", "Rename it.")];
        assert!(matches!(
            decide(&task, &pr, &pull("bbb", 500), &fresh, &cfg),
            Decision::Escalate { reason, .. } if reason.contains("max-diff-lines")
        ));
        pr.rounds = 2;
        assert!(matches!(
            decide(&task, &pr, &pull("bbb", 1), &fresh, &cfg),
            Decision::Escalate { reason, .. } if reason.contains("max-review-rounds")
        ));
    }
}
