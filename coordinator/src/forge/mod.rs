//! Pull requests on a forge: when a task submitted with `pr` completes, the coordinator opens a
//! pull request from the task branch (`orch/<task-id>`, which the workers push) to the base; review
//! comments on it go back to the agents as follow-up turns, under a convergence guard.
//!
//! - [`Forge`]: what the coordinator asks of a forge (repository permissions, branches, pull
//!   requests, review comments, comments). [`github::GitHub`] speaks GitHub's REST API
//!   (GitHub Enterprise by its base URL).
//! - [`repo_config`]: the repository's `.orch.toml`, read through the forge at submit, which
//!   fills what a submit leaves out (check command, pull request settings).
//! - [`pr_title`] and [`pr_body`]: the pull request's text, from the task record alone.
//! - [`review`]: the review loop's decisions, free of IO: which comments are new, which agent
//!   owns the files they touch, and when the loop stops and asks a person.
//! - [`signature_ok`]: the webhook's `X-Hub-Signature-256` check (HMAC-SHA256, constant time).
//!
//! The coordinator runs no git: the forge's API says whether the token can push and whether
//! the base exists, and the pull request is found by its head branch before one is created, so
//! a coordinator that fails over after creating it never opens a second one.

pub mod github;
pub mod repo_config;
pub mod review;
pub mod service;

use futures::future::BoxFuture;
use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::ids::TaskId;
use orch_shared::job::JobKind;
use std::sync::Arc;

/// The checked `[forge]` settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The REST API's base URL (`https://api.github.com`, or `https://HOST/api/v3` for GitHub
    /// Enterprise).
    pub api_url: String,
    pub token: Secret,
    /// The webhook's shared secret; without one the webhook endpoint refuses every delivery.
    pub webhook_secret: Option<Secret>,
    /// Labels every pull request gets.
    pub labels: Vec<String>,
    /// Review rounds sent to the agents before the loop asks a person.
    pub max_review_rounds: u32,
    /// Changed lines (additions plus deletions) past which the loop asks a person.
    pub max_diff_lines: u64,
    /// A task with a check command opens its pull request as a draft when the check starts
    /// and marks it ready when it passes (a submit's `pr.draft` decides for its task).
    pub draft: bool,
}

/// A secret setting: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Why a forge request failed. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the forge answered {status} to {what}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
    },
    #[error("failed to reach the forge for {what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

impl Error {
    /// The HTTP status the forge answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            Error::Http { .. } => None,
        }
    }
}

/// What the token may do with a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repository {
    pub default_branch: String,
    pub can_push: bool,
}

/// A pull request as the forge shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    pub number: u64,
    /// Its web page.
    pub url: String,
    pub head_sha: String,
    /// `open` or `closed`.
    pub state: String,
    /// Changed lines (additions plus deletions; 0 when the forge does not say).
    pub changed_lines: u64,
    pub draft: bool,
    /// The forge's global id for it (GitHub's `node_id`, what its GraphQL API names it by).
    pub node_id: String,
}

/// A pull request to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPull {
    pub title: String,
    pub body: String,
    pub base: String,
    pub head: String,
    pub draft: bool,
    pub labels: Vec<String>,
}

/// A review comment on a line of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewComment {
    pub id: u64,
    /// The file it is on (`None`: a comment on the whole pull request).
    pub path: Option<String>,
    pub line: Option<u64>,
    pub body: String,
    pub author: String,
}

/// What the coordinator asks of a forge. Every method names the repository as `owner/name`.
pub trait Forge: Send + Sync {
    /// The repository's default branch and whether the token can push to it; a repository the
    /// token cannot see is a 404 [`Error::Status`].
    fn repository<'a>(&'a self, repo: &'a str) -> BoxFuture<'a, Result<Repository, Error>>;
    /// The text of the file at `path` on `git_ref` (the default branch when `None`); `None`
    /// when there is no such file (or ref).
    fn file<'a>(
        &'a self,
        repo: &'a str,
        path: &'a str,
        git_ref: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, Error>>;
    /// Whether `branch` exists.
    fn branch_exists<'a>(
        &'a self,
        repo: &'a str,
        branch: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>>;
    /// The open pull request from `head` (a branch of `repo`), if any.
    fn find_pull<'a>(
        &'a self,
        repo: &'a str,
        head: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pull>, Error>>;
    /// Opens a pull request (and labels it).
    fn create_pull<'a>(
        &'a self,
        repo: &'a str,
        pr: &'a NewPull,
    ) -> BoxFuture<'a, Result<Pull, Error>>;
    fn pull<'a>(&'a self, repo: &'a str, number: u64) -> BoxFuture<'a, Result<Pull, Error>>;
    /// Replaces the pull request's description.
    fn update_body<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Marks a draft pull request ready for review.
    fn mark_ready<'a>(&'a self, repo: &'a str, pull: &'a Pull) -> BoxFuture<'a, Result<(), Error>>;
    /// Every review comment of the pull request, oldest first.
    fn review_comments<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
    ) -> BoxFuture<'a, Result<Vec<ReviewComment>, Error>>;
    /// Adds a comment to the pull request's conversation.
    fn comment<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// The forge and its settings, as the coordinator holds them.
#[derive(Clone)]
pub struct Handle {
    pub forge: Arc<dyn Forge>,
    pub config: Arc<Config>,
    /// Tasks whose pull request this coordinator is taking a step for right now (so the
    /// step after a save and the pending sweep never run it twice at once).
    busy: Arc<std::sync::Mutex<std::collections::HashSet<TaskId>>>,
}

impl Handle {
    /// GitHub's REST API with these settings.
    pub fn github(config: Config) -> Result<Self, Error> {
        Ok(Self {
            forge: Arc::new(github::GitHub::new(&config)?),
            config: Arc::new(config),
            busy: Arc::default(),
        })
    }

    /// Claims task `id` for one step on the forge; `None` while another step holds it.
    pub fn claim(&self, id: TaskId) -> Option<Claim> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        busy.insert(id).then(|| Claim {
            busy: self.busy.clone(),
            id,
        })
    }
}

/// A task's claim on the forge ([`Handle::claim`]), released when dropped.
pub struct Claim {
    busy: Arc<std::sync::Mutex<std::collections::HashSet<TaskId>>>,
    id: TaskId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// The next step a task's pull request needs on the forge, read from the task record alone
/// (so any coordinator that leads can take it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Open it (or find the one an earlier attempt opened), as a draft or ready for review.
    Open { draft: bool },
    /// The check passed: put the result in its description and mark it ready for review.
    Ready,
}

/// What `task`'s pull request needs next: opened when the task completes, or, for one opened
/// as a draft while the check runs, as soon as the task's first check is queued and marked
/// ready when the task completes. `None` when it needs nothing now, or when the last step
/// failed (`pr.error`: `orchctl pr sync` tries again).
pub fn next_step(task: &Task) -> Option<Step> {
    let pr = task.pr.as_ref()?;
    if pr.error.is_some() {
        return None;
    }
    step_ignoring_errors(task)
}

/// [`next_step`], also after a failed step (a person asked for a retry).
pub fn step_ignoring_errors(task: &Task) -> Option<Step> {
    let pr = task.pr.as_ref()?;
    let completed = task.status == TaskStatus::Completed;
    match pr.number {
        None if completed => Some(Step::Open { draft: false }),
        None => (pr.draft_while_checking
            && !task.status.is_terminal()
            && task.jobs.iter().any(|j| j.kind == JobKind::Check))
        .then_some(Step::Open { draft: true }),
        Some(_) => (pr.draft && completed).then_some(Step::Ready),
    }
}

/// `owner/name` from a repository URL or path: its last two parts, without `.git`
/// (`https://github.com/acme/app.git`, `git@github.com:acme/app`, `/srv/git/acme/app.git`).
pub fn repo_from_url(url: &str) -> Option<String> {
    let url = url.trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let mut parts = url.rsplit(['/', ':']).filter(|p| !p.is_empty());
    let name = parts.next()?;
    let owner = parts.next()?;
    let ok = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    (ok(owner) && ok(name) && !owner.contains('@')).then(|| format!("{owner}/{name}"))
}

/// Whether `repo` is `owner/name` as a forge spells it.
pub fn valid_repo(repo: &str) -> bool {
    let mut parts = repo.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Longest title, in characters.
const TITLE_MAX: usize = 72;

/// The pull request's title: the prompt's first line, cut short.
pub fn pr_title(task: &Task) -> String {
    let first = task
        .prompt
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("agents' work");
    let title = if first.chars().count() > TITLE_MAX {
        first.chars().take(TITLE_MAX - 1).collect::<String>() + "…"
    } else {
        first.to_string()
    };
    format!("orch: {title}")
}

/// The pull request's body, from the task record alone: the prompt, each agent's summary,
/// role, model, files and cost, and the totals. Anything later steps add to the record (a
/// check result) belongs here too.
pub fn pr_body(task: &Task) -> String {
    let mut body = format!(
        "Task `{}` ({}, {} plan), run by the orchestrator's agents.\n\n### Prompt\n\n{}\n",
        task.id,
        task.task_type,
        task.plan_source,
        quote(&task.prompt, 2_000)
    );
    body.push_str(
        "\n### Agents\n\n| Step | Agent | Model | Files written | Cost |\n|---|---|---|---|---|\n",
    );
    for job in &task.jobs {
        if job.status != JobStatus::Succeeded {
            continue;
        }
        let files = if job.files_written.is_empty() {
            "—".to_string()
        } else {
            let mut shown: Vec<String> = job
                .files_written
                .iter()
                .take(8)
                .map(|f| format!("`{f}`"))
                .collect();
            if job.files_written.len() > 8 {
                shown.push(format!("and {} more", job.files_written.len() - 8));
            }
            shown.join(", ")
        };
        let turn = match job.continues {
            Some(from) => format!(" (follow-up of `{from}`)"),
            None => String::new(),
        };
        body.push_str(&format!(
            "| {} | {} `{}`{turn} | {} | {files} | ${:.4} |\n",
            job.step + 1,
            job.role,
            job.id,
            job.model.as_deref().unwrap_or("—"),
            job.cost_usd
        ));
    }
    let summaries: Vec<String> = task
        .jobs
        .iter()
        .filter(|j| j.status == JobStatus::Succeeded)
        .filter_map(|j| {
            let out = j.output.as_deref()?.trim();
            (!out.is_empty())
                .then(|| format!("**{}** (`{}`):\n\n{}\n", j.role, j.id, quote(out, 1_500)))
        })
        .collect();
    if !summaries.is_empty() {
        body.push_str("\n### Summary\n\n");
        body.push_str(&summaries.join("\n"));
    }
    if let Some(check) = &task.check {
        let verdict = match check.passed {
            Some(true) => "passed",
            Some(false) => "failed",
            None => "not run",
        };
        body.push_str(&format!(
            "\n### Check\n\n`{}`: **{verdict}** after {} of at most {} rounds.\n",
            check.command.replace('`', "'"),
            check.rounds,
            check.max_rounds
        ));
        if check.passed == Some(false) && !check.output_tail.trim().is_empty() {
            body.push_str(&format!(
                "\nThe end of its output:\n\n{}\n",
                quote(check.output_tail.trim(), 1_500)
            ));
        }
    }
    body.push_str(&format!(
        "\n### Cost\n\n{} tokens, ${:.4} in all.\n",
        task.usage.total(),
        task.cost_usd
    ));
    body
}

/// `text` as a markdown quote, cut after `max` characters.
fn quote(text: &str, max: usize) -> String {
    let cut: String = text.chars().take(max).collect();
    let more = if text.chars().count() > max {
        "\n> …"
    } else {
        ""
    };
    cut.lines()
        .map(|l| format!("> {l}"))
        .collect::<Vec<_>>()
        .join("\n")
        + more
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_come_from_urls_and_paths() {
        for (url, want) in [
            ("https://github.com/acme/app.git", Some("acme/app")),
            ("https://github.com/acme/app/", Some("acme/app")),
            ("git@github.com:acme/app.git", Some("acme/app")),
            ("/srv/git/acme/app.git", Some("acme/app")),
            ("/app.git", None),
        ] {
            assert_eq!(repo_from_url(url).as_deref(), want, "{url}");
        }
        assert!(valid_repo("acme/app.rs"));
        assert!(!valid_repo("acme"));
        assert!(!valid_repo("acme/app/x"));
        assert!(!valid_repo("acme/../x"));
    }

    #[test]
    fn a_secret_is_never_shown_by_debug() {
        assert_eq!(format!("{:?}", Secret::new("ghp_x".into())), "***");
    }
}
