//! The `bash` tool: a command run by `bash -c` in the workspace, under the supervisor (it dies
//! with the worker) and in a process group of its own
//! ([`super::super::process`]), with an environment scrubbed down to [`ENV_ALLOWLIST`] (no API
//! key or other secret of the worker reaches it), stdout and stderr read together and capped,
//! and its whole process tree killed on timeout, on cancel, or when the run is dropped (a job
//! timeout drops the agent). What it left running in the background is killed when it exits.

use super::super::process;
use super::{ToolOutput, grouped};
use crate::sandbox::Jail;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// The only variables of the worker's environment a command sees.
pub const ENV_ALLOWLIST: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TZ", "TMPDIR"];
/// How long the output pipe may stay open after the command exited (a background process
/// holding it is killed first, so this is only a bound).
const DRAIN: Duration = Duration::from_secs(2);

/// Runs `command` in `dir` (in the job's sandbox `jail`, when it has one), keeping at most
/// `max_bytes` of its output; an error output when it cannot start, fails, times out or is
/// cancelled.
pub async fn run(
    dir: &Path,
    command: &str,
    timeout: Duration,
    max_bytes: usize,
    cancel: &CancellationToken,
    jail: Option<&Jail>,
) -> ToolOutput {
    let mut cmd = match jail {
        Some(j) => j.command("bash"),
        None => process::command("bash"),
    };
    // One pipe for both streams keeps their order.
    cmd.arg("-c")
        .arg(format!("exec 2>&1\n{command}"))
        .current_dir(dir)
        .env_clear()
        .envs(
            ENV_ALLOWLIST
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    process::isolate(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ToolOutput::error(format!("bash: failed to start: {e}")),
    };
    let pgid = child.id();
    let mut guard = process::TreeGuard::new(pgid);
    let reader = child.stdout.take().map(|mut out| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut more = 0usize;
            let mut buf = [0u8; 8192];
            loop {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = max_bytes.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        more += n.saturating_sub(room);
                    }
                }
            }
            (kept, more)
        })
    });
    let ended = tokio::select! {
        s = child.wait() => Ok(s),
        _ = tokio::time::sleep(timeout) => Err(format!("timed out after {}", humantime::format_duration(timeout))),
        _ = cancel.cancelled() => Err("cancelled".to_string()),
    };
    if ended.is_err() {
        process::terminate(&mut child, process::KILL_GRACE).await;
    } else if let Some(pgid) = pgid {
        process::kill_leftovers(pgid);
    }
    guard.disarm();
    let (kept, more) = match reader {
        Some(r) => match tokio::time::timeout(DRAIN, r).await {
            Ok(Ok(v)) => v,
            _ => (vec![], 0),
        },
        None => (vec![], 0),
    };
    let mut output = String::from_utf8_lossy(&kept).into_owned();
    if more > 0 {
        output.push_str(&format!("\n[truncated: {} more bytes]", grouped(more)));
    }
    match ended {
        Ok(Ok(status)) if status.success() => ToolOutput::ok(if output.is_empty() {
            "(no output)".to_string()
        } else {
            output
        }),
        Ok(Ok(status)) => ToolOutput::error(format!(
            "{output}\n[exit status: {}]",
            status
                .code()
                .map_or("killed".to_string(), |c| c.to_string())
        )),
        Ok(Err(e)) => ToolOutput::error(format!("{output}\n[bash: waiting failed: {e}]")),
        Err(why) => ToolOutput::error(format!(
            "{output}\n[bash: {why}; the command and everything it started were killed]"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
    const MAX: usize = 30_000;

    #[tokio::test]
    async fn a_command_runs_in_the_workspace_with_a_scrubbed_environment() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let out = run(
            dir.path(),
            "pwd; echo err >&2; env | cut -d= -f1 | sort",
            DEFAULT_TIMEOUT,
            MAX,
            &cancel,
            None,
        )
        .await;
        assert!(!out.is_error, "{out:?}");
        let canonical = dir.path().canonicalize().unwrap();
        assert!(
            out.text
                .starts_with(&format!("{}\nerr\n", canonical.display()))
                || out
                    .text
                    .starts_with(&format!("{}\nerr\n", dir.path().display())),
            "{}",
            out.text
        );
        for line in out.text.lines().skip(2) {
            assert!(
                ENV_ALLOWLIST.contains(&line) || ["PWD", "SHLVL", "_", "OLDPWD"].contains(&line),
                "unexpected variable {line}"
            );
        }
        let failed = run(
            dir.path(),
            "echo no; exit 3",
            DEFAULT_TIMEOUT,
            MAX,
            &cancel,
            None,
        )
        .await;
        assert!(
            failed.is_error && failed.text.ends_with("[exit status: 3]"),
            "{failed:?}"
        );
    }

    /// A job timeout drops the agent mid-command: the command's whole tree dies with it.
    #[tokio::test]
    async fn a_dropped_run_kills_the_command_and_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let script = "echo $$ > shell.pid; sleep 300 & echo $! > bg.pid; wait";
        // Boxed, so that dropping it drops the future itself.
        let mut run = Box::pin(run(dir.path(), script, DEFAULT_TIMEOUT, MAX, &cancel, None));
        let bg = dir.path().join("bg.pid");
        let started = tokio::time::Instant::now();
        while !std::fs::read_to_string(&bg).is_ok_and(|s| !s.trim().is_empty()) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the command never started"
            );
            tokio::select! {
                _ = &mut run => panic!("the command ended"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        drop(run);
        for f in ["shell.pid", "bg.pid"] {
            let pid = std::fs::read_to_string(dir.path().join(f)).unwrap();
            let stat = format!("/proc/{}/stat", pid.trim());
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(std::time::Instant::now() < deadline, "{f} {pid} survived");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test]
    async fn long_output_is_cut_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            dir.path(),
            "head -c 50000 /dev/zero | tr '\\0' x",
            DEFAULT_TIMEOUT,
            MAX,
            &CancellationToken::new(),
            None,
        )
        .await;
        assert!(
            out.text.ends_with("[truncated: 20,000 more bytes]"),
            "{}",
            &out.text[out.text.len() - 60..]
        );
    }
}
