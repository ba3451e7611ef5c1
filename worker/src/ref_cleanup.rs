//! Deleting the checkpoint refs of cleaned tasks from their repositories. The coordinator
//! runs no git: when it cleans a git task (`orchctl clean`, the history retention) it queues
//! the task's `refs/orch/checkpoints/<agent>` refs in Redis ([`keys::REF_CLEANUPS`]), in the
//! same transaction that deletes the task, and every worker runs [`run`]: it claims a due
//! clean-up for a lease, lists which of its refs the repository still has (`git ls-remote`)
//! and deletes those with one `git push --delete`, then removes the clean-up. Deleting is
//! idempotent (refs already gone are fine); a clean-up that fails (the repository cannot be
//! reached) or whose worker dies is tried again when its lease has passed, by whatever worker
//! is up then.
//!
//! [`keys::REF_CLEANUPS`]: orch_shared::keys::REF_CLEANUPS

use crate::agent::git::git;
use crate::state::State;
use orch_shared::job::RefCleanup;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a worker looks for clean-ups.
const EVERY: Duration = Duration::from_secs(2);
/// How long a claimed clean-up is the claiming worker's before another may try it.
const LEASE: Duration = Duration::from_secs(60);

/// Runs the clean-ups that are due, until `cancel`. `data_dir`: where the empty repository git
/// pushes from is kept.
pub async fn run(state: State, data_dir: PathBuf, cancel: CancellationToken) {
    let scratch = data_dir.join("ref-cleanup.git");
    loop {
        loop {
            let json = match state.claim_ref_cleanup(LEASE).await {
                Ok(Some(json)) => json,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "checkpoint ref clean-ups could not be read");
                    break;
                }
            };
            let done = match serde_json::from_str::<RefCleanup>(&json) {
                Ok(c) => match delete_refs(&data_dir, &scratch, &c).await {
                    Ok(n) => {
                        tracing::info!(url = %c.url, deleted = n, "checkpoint refs of a cleaned task deleted");
                        true
                    }
                    Err(why) => {
                        tracing::warn!(url = %c.url, %why, "checkpoint refs not deleted; trying again later");
                        false
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "a damaged checkpoint ref clean-up dropped");
                    true
                }
            };
            if done && let Err(e) = state.finish_ref_cleanup(&json).await {
                tracing::warn!(error = %e, "a checkpoint ref clean-up could not be removed");
            }
            if cancel.is_cancelled() {
                return;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Deletes the refs of `c` its repository still has; how many there were.
async fn delete_refs(data_dir: &Path, scratch: &Path, c: &RefCleanup) -> Result<usize, String> {
    let refs: Vec<&str> = c
        .refs
        .iter()
        .map(String::as_str)
        .filter(|r| r.starts_with("refs/orch/checkpoints/"))
        .collect();
    if refs.is_empty() {
        return Ok(0);
    }
    if tokio::fs::metadata(scratch).await.is_err() {
        let name = scratch.display().to_string();
        let init = git(data_dir, &["init", "-q", "--bare", &name]).await;
        if !init.ok {
            return Err(format!("git init: {}", init.why()));
        }
    }
    let mut args = vec!["ls-remote", c.url.as_str()];
    args.extend(&refs);
    let listed = git(scratch, &args).await;
    if !listed.ok {
        return Err(format!("git ls-remote: {}", listed.why()));
    }
    let there: Vec<&str> = listed
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|r| refs.contains(r))
        .collect();
    if there.is_empty() {
        return Ok(0);
    }
    let mut args = vec!["push", "-q", c.url.as_str(), "--delete"];
    args.extend(&there);
    let pushed = git(scratch, &args).await;
    if !pushed.ok {
        return Err(format!("git push --delete: {}", pushed.why()));
    }
    Ok(there.len())
}
