//! The `command` backend: any program that reads a prompt and writes its answer on stdout
//! (another agent CLI, a script). The prompt (the role's system prompt, then the job's prompt,
//! constraints and forward context) goes on stdin or as the last argument; the program runs in
//! the job's workspace with `ORCH_ROLE`, `ORCH_JOB_KIND`, `ORCH_MODEL`, `ORCH_TASK_ID`,
//! `ORCH_JOB_ID` and `ORCH_WORKSPACE` set, and `[backends.command] env`. In the agent sandbox
//! (the default, see [`crate::sandbox`]) it gets nothing else of the worker's environment but
//! `PATH` and the variables `[backends.command] pass_env` names; without the sandbox it gets
//! all of it (another agent CLI may need the provider keys in it). Exit 0 with
//! output is success; any other exit is an agent error carrying the end of stderr. Files
//! written and the diff come from git (see [`super::workspace`]); in a git workspace the work is
//! committed and pushed after a successful run. It reports no tokens and costs nothing. On
//! cancellation its whole process tree is stopped.

use super::process;
use super::workspace::{FileTracker, WorkDir};
use super::{AgentOutput, Events, Prepared, Report};
use crate::config::{CommandSettings, PromptVia};
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, JobKind, Outcome, Usage};
use std::process::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const NAME: &str = "command";
/// The most of stdout kept as the answer.
const MAX_OUTPUT: usize = 8 * 1024 * 1024;
/// How much of stderr a failure reports.
const STDERR_TAIL: usize = 2048;

pub struct CommandAgent {
    settings: CommandSettings,
}

impl CommandAgent {
    pub fn new(settings: CommandSettings) -> Self {
        Self { settings }
    }

    pub async fn run(
        &self,
        p: &Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let done = |output| Report {
            parked: None,
            output,
            backend: NAME,
            model: p.model.clone(),
            context: None,
            session: None,
        };
        let dir = match WorkDir::prepare(p.job, p.data_dir, p.sparse_checkout, cancel).await {
            Ok(d) => d,
            Err((reason, message)) => return done(AgentOutput::failure(reason, message)),
        };
        let prompt = format!("{}\n\n{}", p.profile.system_prompt, p.prompt);
        let jail = match p.jail(&dir.path, events) {
            Ok(j) => j,
            Err((reason, message)) => return done(AgentOutput::failure(reason, message)),
        };
        let mut cmd = match &jail {
            Some(j) => {
                let mut c = j.command(&self.settings.program);
                c.envs(
                    self.settings
                        .pass_env
                        .iter()
                        .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
                );
                c
            }
            None => process::command(&self.settings.program),
        };
        cmd.args(&self.settings.args)
            .current_dir(&dir.path)
            .envs(&self.settings.env)
            .env("ORCH_ROLE", p.job.role.as_str())
            .env(
                "ORCH_JOB_KIND",
                match p.job.kind {
                    JobKind::Agent => "agent",
                    JobKind::Plan => "plan",
                    JobKind::Check => "check",
                },
            )
            .env("ORCH_TASK_ID", p.job.task_id.to_string())
            .env("ORCH_JOB_ID", p.job.job_id.to_string())
            .env("ORCH_WORKSPACE", &dir.path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(m) = &p.model {
            cmd.env("ORCH_MODEL", m);
        }
        match self.settings.prompt {
            PromptVia::Stdin => {
                cmd.stdin(Stdio::piped());
            }
            PromptVia::Arg => {
                cmd.arg(&prompt).stdin(Stdio::null());
            }
        }
        process::isolate(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return done(AgentOutput::failure(
                    FailureReason::Internal,
                    format!("failed to start {}: {e}", self.settings.program.display()),
                ));
            }
        };
        let pgid = child.id();
        let mut guard = process::TreeGuard::new(pgid);
        events.send(EventKind::Thinking);
        if let Some(mut stdin) = child.stdin.take() {
            let prompt = prompt.clone();
            // A program that never reads its stdin must not block us: write in the background.
            tokio::spawn(async move {
                let _ = stdin.write_all(prompt.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stderr = child.stderr.take().map(|e| process::tail(e, STDERR_TAIL));
        let mut stdout = child.stdout.take();
        let read = async {
            let mut out = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(MAX_OUTPUT as u64).read_to_end(&mut out).await;
            }
            out
        };
        let (out, status) = tokio::select! {
            out = read => (out, child.wait().await),
            _ = cancel.cancelled() => {
                process::terminate(&mut child, process::KILL_GRACE).await;
                guard.disarm();
                return done(AgentOutput::failure(FailureReason::Cancelled, "agent stopped"));
            }
        };
        if let Some(pgid) = pgid {
            process::kill_leftovers(pgid);
        }
        guard.disarm();
        let err_tail = match stderr {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        let text = String::from_utf8_lossy(&out).trim().to_string();
        let outcome = match status {
            Ok(s) if s.success() && !text.is_empty() => Outcome::Success,
            Ok(s) if s.success() => Outcome::Failure {
                reason: FailureReason::AgentError,
                message: format!(
                    "{} wrote no answer on stdout",
                    self.settings.program.display()
                ),
            },
            Ok(s) => Outcome::Failure {
                reason: FailureReason::AgentError,
                message: format!(
                    "{} exited with {s}{}",
                    self.settings.program.display(),
                    if err_tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {err_tail}")
                    }
                ),
            },
            Err(e) => Outcome::Failure {
                reason: FailureReason::Internal,
                message: format!(
                    "failed to wait for {}: {e}",
                    self.settings.program.display()
                ),
            },
        };
        if !text.is_empty() {
            events.send(EventKind::Text { text: text.clone() });
        }
        // A git workspace commits and pushes here; a push that fails fails the job.
        let changes = dir
            .finish(p.job, outcome.is_success(), FileTracker::new(&dir.path))
            .await;
        let output = AgentOutput {
            outcome: changes.outcome(outcome),
            output: text,
            usage: Usage::default(),
            cost_usd: 0.0,
            files_read: changes.files_read,
            files_written: changes.files_written,
            diff: changes.diff,
            git: changes.git,
        };
        done(p.judge_memory(jail.as_ref(), output))
    }
}
