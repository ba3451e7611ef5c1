//! The task's check command ([`JobKind::Check`](orch_shared::job::JobKind::Check)): `sh -c`
//! with the job's prompt as the script, in the job's workspace (the task branch), under the
//! same sandbox as an agent of the job's role. Stdout and stderr go to one pipe; the end of it
//! is the job's output. Exit 0 is success; any other exit fails with `check_failed` and the
//! exit status. Nothing is committed or pushed: a check changes no branch.

use super::process;
use super::workspace::{FileTracker, WorkDir};
use super::{AgentOutput, Events, Prepared, Report};
use orch_shared::job::{FailureReason, Outcome, Usage};
use std::process::Stdio;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "check";
/// The most of the check's output kept (its end: where test runners print their verdict).
pub const OUTPUT_TAIL: usize = 16 * 1024;

/// The last `max` bytes of `text`, from a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs the check of `p.job` (see the module docs).
pub async fn run(p: &Prepared<'_>, events: &Events, cancel: &CancellationToken) -> Report {
    let done = |output| Report {
        parked: None,
        output,
        backend: NAME,
        model: None,
        context: None,
        session: None,
    };
    let dir = match WorkDir::prepare(p.job, p.data_dir, p.sparse_checkout, cancel).await {
        Ok(d) => d,
        Err((reason, message)) => return done(AgentOutput::failure(reason, message)),
    };
    let jail = match p.jail(&dir.path, events) {
        Ok(j) => j,
        Err((reason, message)) => return done(AgentOutput::failure(reason, message)),
    };
    let mut cmd = match &jail {
        Some(j) => j.command("sh"),
        None => process::command("sh"),
    };
    cmd.args(["-c", "exec 2>&1\neval \"$ORCH_CHECK\""])
        .current_dir(&dir.path)
        .env("ORCH_CHECK", &p.job.prompt)
        .env("ORCH_TASK_ID", p.job.task_id.to_string())
        .env("ORCH_JOB_ID", p.job.job_id.to_string())
        .env("ORCH_WORKSPACE", &dir.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    process::isolate(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return done(AgentOutput::failure(
                FailureReason::Internal,
                format!("failed to start the check: {e}"),
            ));
        }
    };
    let pgid = child.id();
    let mut guard = process::TreeGuard::new(pgid);
    let mut stdout = child.stdout.take();
    let read = async {
        // Keeps the end: a long test run's verdict is its last lines.
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        if let Some(s) = stdout.as_mut() {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_TAIL {
                    kept.drain(..kept.len() - OUTPUT_TAIL);
                }
            }
        }
        kept
    };
    let (out, status) = tokio::select! {
        out = read => (out, child.wait().await),
        _ = cancel.cancelled() => {
            process::terminate(&mut child, process::KILL_GRACE).await;
            guard.disarm();
            return done(AgentOutput::failure(FailureReason::Cancelled, "check stopped"));
        }
    };
    if let Some(pgid) = pgid {
        process::kill_leftovers(pgid);
    }
    guard.disarm();
    let text = String::from_utf8_lossy(&out);
    let text = tail(text.trim_end(), OUTPUT_TAIL).to_string();
    let outcome = match status {
        Ok(s) if s.success() => Outcome::Success,
        Ok(s) => Outcome::Failure {
            reason: FailureReason::CheckFailed,
            message: format!("the check `{}` exited with {s}", p.job.prompt.trim()),
        },
        Err(e) => Outcome::Failure {
            reason: FailureReason::Internal,
            message: format!("failed to wait for the check: {e}"),
        },
    };
    // Not a success for the workspace: nothing is committed or pushed.
    let changes = dir.finish(p.job, false, FileTracker::new(&dir.path)).await;
    let output = AgentOutput {
        outcome,
        output: text,
        usage: Usage::default(),
        cost_usd: 0.0,
        files_read: vec![],
        files_written: vec![],
        diff: None,
        git: changes.git,
    };
    done(p.judge_memory(jail.as_ref(), output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_starts_at_a_character_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
