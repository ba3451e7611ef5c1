//! The `claude-code` backend: the Claude Code CLI, headless
//! (`claude -p --output-format stream-json --verbose`, the prompt on stdin), in the job's
//! workspace, with the role's system prompt (`--append-system-prompt`), tools
//! (`--allowedTools`, `--disallowedTools`), permission mode, model, turn limit and MCP config.
//!
//! The CLI runs with a per-worker HOME (`claude_home`), an environment cleared down to what it
//! needs (the locale, PATH, proxies, `ANTHROPIC_*`, `CLAUDE_CODE_*`; never the worker's other
//! secrets), and `IS_SANDBOX=1` when `bypassPermissions` is asked for as root (the CLI refuses
//! that mode as root otherwise). On cancellation the whole process tree is stopped.
//!
//! Sessions: after a turn, the CLI's transcript of it is the agent's session (read, and
//! removed from the worker, by [`transcript`]). A further turn writes the stored
//! transcript into the project of its own working directory and runs the CLI with
//! `--resume <id> --fork-session`, so every turn has its own session id.
//!
//! Layout: this module starts the CLI, watches it to its end and reports the run; [`stream`]
//! reads its output line by line and judges a failed result; [`transcript`] moves its session
//! transcripts between workers.

pub mod stream;
pub mod transcript;

use super::http;
use super::process;
use super::workspace::WorkDir;
use super::{AgentOutput, ContextUse, Events, Prepared, Report};
use crate::config::{ApiSettings, ClaudeCodeSettings};
use crate::custody;
use crate::sandbox::Jail;
use crate::session::Snapshot;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, JobKind, Outcome, Usage};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use stream::{Stream, cut, failure, usage_of};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio_util::sync::CancellationToken;
use transcript::Restored;

pub const NAME: &str = "claude-code";
/// How long the CLI may take to exit after its result line.
const EXIT_GRACE: Duration = Duration::from_secs(5);
const STDERR_TAIL: usize = 4096;

/// Variables of the worker's environment the CLI gets; everything else is cleared.
const ENV_PASS: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];
/// Prefixes of variables the CLI gets (its own settings and the provider's).
const ENV_PASS_PREFIXES: &[&str] = &["ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_", "DISABLE_"];

pub struct ClaudeCode {
    settings: ClaudeCodeSettings,
    /// The Messages API settings (`ANTHROPIC_BASE_URL`, the key), shared with `anthropic`.
    provider: ApiSettings,
}

/// When the worker exports traces: the CLI's OpenTelemetry environment, so that its own spans
/// (`claude_code.interaction` and its model requests and tools; the pinned CLI's enhanced
/// telemetry beta) go to the same collector as children of the job's `agent` span. The CLI
/// reads `TRACEPARENT` in headless mode. Its metrics and log events stay off. From inside the
/// sandbox the collector is reached through the job's proxy, like any other host: see
/// docs/observability.md.
fn trace_env(env: &mut BTreeMap<String, String>) {
    let (Some(endpoint), Some(traceparent)) = (
        orch_config::telemetry::traces_endpoint(),
        orch_config::telemetry::traceparent(&tracing::Span::current()),
    ) else {
        return;
    };
    env.remove("DISABLE_TELEMETRY");
    for (k, v) in [
        ("CLAUDE_CODE_ENABLE_TELEMETRY", "1"),
        ("CLAUDE_CODE_ENHANCED_TELEMETRY_BETA", "1"),
        ("OTEL_TRACES_EXPORTER", "otlp"),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_LOGS_EXPORTER", "none"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
        ("TRACEPARENT", &traceparent),
    ] {
        env.insert(k.into(), v.into());
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// How a Claude subscription's OAuth token starts (an API key starts `sk-ant-api`).
const OAUTH_TOKEN_PREFIX: &str = "sk-ant-oat";

impl ClaudeCode {
    pub fn new(settings: ClaudeCodeSettings, provider: ApiSettings) -> Self {
        Self { settings, provider }
    }

    /// The CLI on one credential of the `anthropic` pool, for one job.
    pub fn on_credential(&self, key: &crate::config::Secret) -> Self {
        let mut provider = self.provider.clone();
        provider.api_key = Some(key.clone());
        Self::new(self.settings.clone(), provider)
    }

    /// The CLI's arguments for `p` (the prompt goes on stdin). `ask`: the MCP config of the
    /// job's permission-prompt server, when its role has tools a person approves (then the
    /// CLI asks that server instead of refusing them outright in `dontAsk` mode).
    pub fn args(&self, p: &Prepared<'_>, ask: Option<&str>) -> Vec<String> {
        let profile = p.profile;
        let mode = match (ask, profile.permission_mode.as_str()) {
            (Some(_), "dontAsk") => "default",
            (_, m) => m,
        };
        let mut args: Vec<String> = [
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            mode,
            "--append-system-prompt",
            &profile.system_prompt,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !profile.allowed_tools.is_empty() {
            args.push("--allowedTools".into());
            args.push(profile.allowed_tools.join(","));
        }
        if !profile.disallowed_tools.is_empty() {
            args.push("--disallowedTools".into());
            args.push(profile.disallowed_tools.join(","));
        }
        if let Some(m) = &p.model {
            args.push("--model".into());
            args.push(m.clone());
        }
        if let Some(n) = p.job.limits.max_turns.or(profile.max_turns) {
            args.push("--max-turns".into());
            args.push(n.to_string());
        }
        let mcp: Vec<String> = self
            .settings
            .mcp_config
            .iter()
            .cloned()
            .chain(ask.map(str::to_string))
            .collect();
        if !mcp.is_empty() {
            args.push("--mcp-config".into());
            args.extend(mcp);
            args.push("--strict-mcp-config".into());
        }
        if ask.is_some() {
            args.push("--permission-prompt-tool".into());
            args.push(crate::approvals::mcp::PROMPT_TOOL.into());
        }
        args.extend(self.settings.args.iter().cloned());
        args
    }

    /// The CLI's environment: the allow-listed part of the worker's, then the provider
    /// settings, the home and the config's own variables.
    pub fn env(&self, p: &Prepared<'_>) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| {
                ENV_PASS.contains(&k.as_str()) || ENV_PASS_PREFIXES.iter().any(|p| k.starts_with(p))
            })
            .collect();
        env.insert("HOME".into(), self.settings.home.display().to_string());
        for (k, v) in [
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
        ] {
            env.entry(k.into()).or_insert_with(|| v.into());
        }
        if let Some(url) = &self.provider.base_url {
            env.insert("ANTHROPIC_BASE_URL".into(), url.clone());
        }
        if let Some(key) = &self.provider.api_key {
            // A subscription login (`claude setup-token`) is an OAuth token, not an API key.
            let var = if key.expose().starts_with(OAUTH_TOKEN_PREFIX) {
                "CLAUDE_CODE_OAUTH_TOKEN"
            } else {
                "ANTHROPIC_API_KEY"
            };
            env.insert(var.into(), key.expose().to_string());
        }
        if let Some(n) = self.settings.max_retries {
            env.insert("CLAUDE_CODE_MAX_RETRIES".into(), n.to_string());
        }
        if p.profile.permission_mode == "bypassPermissions" && running_as_root() {
            env.insert("IS_SANDBOX".into(), "1".into());
        }
        trace_env(&mut env);
        env.extend(self.settings.env.clone());
        env
    }

    /// One turn: the CLI's home (and the stored session) set up, the CLI started and watched
    /// to its end, its transcript collected as the session, and the run reported from its
    /// result line, or as cut short without one.
    pub async fn run(
        &self,
        p: &Prepared<'_>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Report {
        let failed = |(reason, message): (FailureReason, String)| Report {
            output: AgentOutput::failure(reason, message),
            backend: NAME,
            model: p.model.clone(),
            context: None,
            session: None,
            parked: None,
        };
        let (dir, resumed) = match custody::workspace_for(p, events, cancel).await {
            Ok(d) => d,
            Err(e) => return failed(e),
        };
        // The proxy sends the job's pool credential (the one this run was given) upstream.
        let mut jail = match p.jail_on(&dir.path, events, self.provider.api_key.as_ref()) {
            Ok(j) => j,
            Err(e) => return failed(e),
        };
        let mut env = self.env(p);
        // In the sandbox: a home of the job's own (no other job's transcripts in sight), and
        // the proxy with the job's token in place of the provider and its key.
        let job_home = jail.as_ref().map(|j| {
            let home = self
                .settings
                .home
                .join("jobs")
                .join(format!("{}-{}", p.job.job_id, p.job.attempt));
            env.insert("HOME".into(), home.display().to_string());
            env.insert("ANTHROPIC_BASE_URL".into(), Jail::base_url());
            env.insert("ANTHROPIC_API_KEY".into(), j.token().to_string());
            env.remove("ANTHROPIC_AUTH_TOKEN");
            env.remove("CLAUDE_CODE_OAUTH_TOKEN");
            home
        });
        let config_dir = transcript::config_dir(&env);
        if let (Some(j), Some(home)) = (jail.as_mut(), &job_home) {
            for d in [home, &config_dir] {
                if let Err(e) = tokio::fs::create_dir_all(d).await {
                    return failed((
                        FailureReason::Internal,
                        format!("failed to create {}: {e}", d.display()),
                    ));
                }
            }
            j.set_home(home);
            if !config_dir.starts_with(home) {
                j.add_writable(&config_dir);
            }
        }
        // A resumed run continues the checkpoint's transcript with a note of where it was cut
        // (its turn stays the job's); a rewind continues it with the user's message (a turn
        // further); a further turn continues the stored session.
        let (session, prompt) = match &resumed {
            Some(r) => (
                Some(Snapshot {
                    backend: NAME.into(),
                    session_id: r.checkpoint.session_id.clone(),
                    workspace: r.checkpoint.workspace.clone(),
                    turn: match r.rewind {
                        true => r.checkpoint.turn,
                        false => r.checkpoint.turn.saturating_sub(1),
                    },
                    bytes: r.conversation.clone(),
                }),
                match r.rewind {
                    true => p.prompt.clone(),
                    false => custody::continuation_prompt(r.checkpoint.step),
                },
            ),
            None => (p.session.clone(), p.prompt.clone()),
        };
        let restored = match self
            .prepare_home(session.as_ref(), &config_dir, &dir.path)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if resumed.as_ref().is_some_and(|r| !r.rewind)
                    && let Some(rec) = events.recorder()
                {
                    // The transcript cannot be used: start over, cleanly, without it.
                    rec.abandon_resume(events, e.1);
                    drop(jail);
                    drop(dir);
                    return Box::pin(self.run(p, events, cancel)).await;
                }
                return failed(e);
            }
        };
        if resumed.is_some()
            && let Some(rec) = events.recorder()
        {
            rec.confirm_resume(events);
        }
        // A role with tools a person approves: the CLI asks the worker's permission-prompt
        // server (through the sandbox's proxy, or on the worker's loopback port).
        let seat = match p.approvals {
            Some(desk) if !p.profile.ask_tools.is_empty() => {
                Some(desk.seat(p.job, events, cancel, p.profile.ask_tools.clone()))
            }
            _ => None,
        };
        let base = jail.as_ref().map(|_| Jail::base_url());
        let ask = seat.as_ref().and_then(|s| s.mcp_config(base.as_deref()));
        let child = match self.spawn(
            p,
            &dir.path,
            restored.as_ref(),
            &env,
            jail.as_ref(),
            ask.as_deref(),
        ) {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        let watching = Watching {
            prompt,
            config_dir: &config_dir,
        };
        let mut ended = watch(child, p, &watching, &dir.path, events, cancel).await;
        drop(seat);
        drop(restored);
        let session = collect_session(session.as_ref(), &config_dir, &dir, &ended.stream).await;
        let model = p.model.clone().or(ended.stream.model.take());
        if !ended.stream.denied.is_empty() {
            tracing::info!(denied = ?ended.stream.denied, "tools refused during the run");
        }
        let mut report = match ended.stream.result.take() {
            Some(result) => finished(p, events, dir, ended, result, model, session).await,
            None => cut_short(p, dir, ended, model).await,
        };
        report.output = p.judge_memory(jail.as_ref(), report.output);
        drop(jail);
        if let Some(home) = job_home {
            let _ = tokio::fs::remove_dir_all(home).await;
        }
        report
    }

    /// Makes the CLI's home and, for a further turn, writes the stored transcript back where
    /// the CLI run in `workspace` finds it.
    async fn prepare_home(
        &self,
        session: Option<&Snapshot>,
        config_dir: &Path,
        workspace: &Path,
    ) -> Result<Option<Restored>, (FailureReason, String)> {
        if let Err(e) = tokio::fs::create_dir_all(&self.settings.home).await {
            return Err((
                FailureReason::Internal,
                format!(
                    "failed to create the Claude Code home {}: {e}",
                    self.settings.home.display()
                ),
            ));
        }
        let Some(s) = session else {
            return Ok(None);
        };
        match transcript::restore(config_dir, s, workspace).await {
            Ok(r) => Ok(Some(r)),
            Err(e) => Err((
                FailureReason::Internal,
                format!("failed to restore the stored session: {e}"),
            )),
        }
    }

    /// Starts the CLI in `workspace` (resuming `restored`, when given) with `env`, in a
    /// process group of its own, in `jail` when the sandbox is on.
    fn spawn(
        &self,
        p: &Prepared<'_>,
        workspace: &Path,
        restored: Option<&Restored>,
        env: &BTreeMap<String, String>,
        jail: Option<&Jail>,
        ask: Option<&str>,
    ) -> Result<Child, (FailureReason, String)> {
        let mut cmd = match jail {
            Some(j) => j.command(&self.settings.bin),
            None => process::command(&self.settings.bin),
        };
        cmd.args(self.args(p, ask))
            .current_dir(workspace)
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = restored {
            cmd.args(["--resume", &r.id, "--fork-session"]);
        }
        process::isolate(&mut cmd);
        match cmd.spawn() {
            Ok(c) => Ok(c),
            Err(e) => Err((
                FailureReason::Internal,
                format!(
                    "failed to start the Claude Code CLI `{}` (set ORCH_CLAUDE_BIN or [backends.claude-code] bin): {e}",
                    self.settings.bin.display()
                ),
            )),
        }
    }
}

/// How a run of the CLI ended.
struct Ended {
    /// What its output said.
    stream: Stream,
    /// How it exited (`None`: it was stopped).
    status: Option<ExitStatus>,
    /// The job was cancelled before the result line came.
    cancelled: bool,
    /// The end of its stderr.
    err_tail: String,
}

/// What watching a run needs besides the job.
struct Watching<'a> {
    /// What the CLI is told on stdin.
    prompt: String,
    /// The CLI's config directory (its transcripts, for checkpoints).
    config_dir: &'a Path,
}

/// Gives the CLI its prompt, reads its output until the result line, the end or `cancel`,
/// and waits for it to exit; its whole process tree is stopped however it ends.
async fn watch(
    mut child: Child,
    p: &Prepared<'_>,
    w: &Watching<'_>,
    workspace: &Path,
    events: &Events,
    cancel: &CancellationToken,
) -> Ended {
    let pgid = child.id();
    let mut guard = process::TreeGuard::new(pgid);
    if let Some(mut stdin) = child.stdin.take() {
        let prompt = w.prompt.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(prompt.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }
    let stderr = child.stderr.take().map(|e| process::tail(e, STDERR_TAIL));
    let mut stream = Stream::new(workspace);
    let cancelled = match child.stdout.take() {
        Some(stdout) => read(stdout, &mut stream, p, w, events, cancel).await,
        None => false,
    };
    let (status, cancelled) =
        wait_exit(&mut child, cancelled, stream.result.is_some(), cancel).await;
    if let Some(pgid) = pgid {
        process::kill_leftovers(pgid);
    }
    guard.disarm();
    let err_tail = match stderr {
        Some(h) => h.await.unwrap_or_default(),
        None => String::new(),
    };
    Ended {
        stream,
        status,
        cancelled,
        err_tail,
    }
}

/// Feeds the CLI's output to `stream` until the result line, the end of the output or
/// `cancel`; true when cancelled.
async fn read(
    stdout: ChildStdout,
    stream: &mut Stream,
    p: &Prepared<'_>,
    w: &Watching<'_>,
    events: &Events,
    cancel: &CancellationToken,
) -> bool {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return true,
            line = lines.next_line() => match line {
                Ok(Some(l)) => {
                    if stream.line(&l, events, p) {
                        return false;
                    }
                    if let Some((writes, paths)) = stream.take_step() {
                        checkpoint(stream, p, w, events, writes, paths);
                    }
                }
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "claude-code: reading its output failed");
                    return false;
                }
            }
        }
    }
}

/// Hands the step `stream` just finished to the run's checkpoint recorder.
fn checkpoint(
    stream: &Stream,
    p: &Prepared<'_>,
    w: &Watching<'_>,
    events: &Events,
    writes: bool,
    paths: Option<Vec<String>>,
) {
    let (Some(rec), Some(session_id), Some(cwd)) =
        (events.recorder(), &stream.session_id, &stream.cwd)
    else {
        return;
    };
    let model = p.model.as_deref().or(stream.model.as_deref());
    rec.step(custody::Step {
        n: stream.steps,
        usage: stream.running,
        cost_usd: p.cost(model, &stream.running),
        writes,
        paths,
        conversation: custody::Conversation::Transcript {
            path: transcript::path(w.config_dir, cwd, session_id),
            must_contain: stream.last_tool.clone(),
            session_id: session_id.clone(),
            cwd: cwd.clone(),
        },
    });
}

/// Waits for the CLI to exit after its output ended, stopping it when it was `cancelled`,
/// takes longer than [`EXIT_GRACE`] or the job is cancelled meanwhile. The exit status
/// (`None`: stopped), and whether the job counts as cancelled (not when the result came).
async fn wait_exit(
    child: &mut Child,
    cancelled: bool,
    has_result: bool,
    cancel: &CancellationToken,
) -> (Option<ExitStatus>, bool) {
    if cancelled {
        process::terminate(child, process::KILL_GRACE).await;
        return (None, true);
    }
    tokio::select! {
        s = tokio::time::timeout(EXIT_GRACE, child.wait()) => match s {
            Ok(Ok(s)) => (Some(s), false),
            _ => {
                process::terminate(child, process::KILL_GRACE).await;
                (None, false)
            }
        },
        _ = cancel.cancelled() => {
            process::terminate(child, process::KILL_GRACE).await;
            (None, !has_result)
        }
    }
}

/// The session to store: the CLI's transcript of this turn (see [`transcript::collect`],
/// which also removes the worker's copy).
async fn collect_session(
    previous: Option<&Snapshot>,
    config_dir: &Path,
    dir: &WorkDir,
    stream: &Stream,
) -> Option<Snapshot> {
    let session_id = stream.session_id.as_deref()?;
    let cwd = stream
        .cwd
        .clone()
        .unwrap_or_else(|| dir.path.display().to_string());
    let bytes = transcript::collect(
        config_dir,
        &cwd,
        session_id,
        stream.result.is_some(),
        dir.is_scratch(),
    )
    .await?;
    Some(Snapshot {
        backend: NAME.into(),
        session_id: Some(session_id.to_string()),
        workspace: cwd,
        turn: Snapshot::next_turn(previous),
        bytes,
    })
}

/// The report of a run cut short (cancelled, or the CLI died without a result): what it
/// spent so far is the running estimate.
async fn cut_short(p: &Prepared<'_>, dir: WorkDir, ended: Ended, model: Option<String>) -> Report {
    let Ended {
        stream,
        status,
        cancelled,
        err_tail,
    } = ended;
    let cost_usd = p.cost(model.as_deref(), &stream.running);
    let (reason, message) = if cancelled {
        (FailureReason::Cancelled, "agent stopped".to_string())
    } else {
        let why = stream
            .synthetic
            .or_else(|| (!err_tail.is_empty()).then(|| cut(&err_tail, 1000)))
            .unwrap_or_else(|| "no output".into());
        let status = status.map_or("was killed".to_string(), |s| format!("exited with {s}"));
        let reason = match &stream.last_retry {
            Some((Some(s), _)) => http::status_reason(*s as u16).0,
            _ => FailureReason::AgentError,
        };
        (
            reason,
            format!("the Claude Code CLI {status} before its result: {why}"),
        )
    };
    let changes = dir.finish(p.job, false, stream.files).await;
    let output = AgentOutput {
        outcome: Outcome::Failure { reason, message },
        output: String::new(),
        usage: stream.running,
        cost_usd,
        files_read: changes.files_read,
        files_written: changes.files_written,
        diff: changes.diff,
        git: changes.git,
    };
    Report {
        output,
        backend: NAME,
        model,
        context: None,
        session: None,
        parked: None,
    }
}

/// The report of a run that ended with its `result` line: usage and cost from that line,
/// the answer judged, and the work kept (a git workspace commits and pushes here).
async fn finished(
    p: &Prepared<'_>,
    events: &Events,
    dir: WorkDir,
    ended: Ended,
    result: Value,
    model: Option<String>,
    session: Option<Snapshot>,
) -> Report {
    let Ended { stream, status, .. } = ended;
    let usage = result.get("usage").map(usage_of).unwrap_or(stream.running);
    let reported = result.get("total_cost_usd").and_then(Value::as_f64);
    // The CLI's own figure wins; a model it has no price for shows as 0 there.
    let cost_usd = match reported {
        Some(c) if c > 0.0 || usage.total() == 0 => c,
        _ => p.cost(model.as_deref(), &usage),
    };
    events.send(EventKind::Usage { usage, cost_usd });
    let context = context_use(p, &result, model.as_deref(), stream.last_request);
    let (outcome, output) = judge(p, &result, &stream);
    // A git workspace commits and pushes here; a push that fails fails the job.
    let changes = dir.finish(p.job, outcome.is_success(), stream.files).await;
    let outcome = changes.outcome(outcome);
    tracing::debug!(session_id = stream.session_id.as_deref().unwrap_or(""), exit = ?status, "claude-code finished");
    let session = session.filter(|_| outcome.is_success());
    Report {
        session,
        parked: None,
        output: AgentOutput {
            outcome,
            output,
            usage,
            cost_usd,
            files_read: changes.files_read,
            files_written: changes.files_written,
            diff: changes.diff,
            git: changes.git,
        },
        backend: NAME,
        model,
        context,
    }
}

/// How full the context window was on the last top-level request: the window from the
/// result's `modelUsage`, else the price table's.
fn context_use(
    p: &Prepared<'_>,
    result: &Value,
    model: Option<&str>,
    last_request: Option<Usage>,
) -> Option<ContextUse> {
    let window = result
        .get("modelUsage")
        .and_then(Value::as_object)
        .and_then(|m| {
            model
                .and_then(|name| m.get(name))
                .or_else(|| m.values().next())
                .and_then(|u| u.get("contextWindow"))
                .and_then(Value::as_u64)
        })
        .or_else(|| model.and_then(|m| p.context_window(m)));
    match (last_request, window) {
        (Some(u), Some(window)) if window > 0 => Some(ContextUse {
            tokens: u.input_tokens + u.cache_creation_tokens + u.cache_read_tokens,
            window,
        }),
        _ => None,
    }
}

/// What a `result` line's `permission_denials` list (`{tool_name, tool_input}` each) says,
/// as one line naming each denied tool and what it was asked to do; `None` when it is empty.
fn denials(result: &Value) -> Option<String> {
    let list = result.get("permission_denials")?.as_array()?;
    if list.is_empty() {
        return None;
    }
    let named: Vec<String> = list
        .iter()
        .map(|d| {
            let tool = d.get("tool_name").and_then(Value::as_str).unwrap_or("?");
            let input = d.get("tool_input");
            let what = ["command", "file_path", "path", "url", "pattern"]
                .iter()
                .find_map(|k| input.and_then(|i| i.get(*k)).and_then(Value::as_str));
            match what {
                Some(w) => {
                    let w: String = w.chars().take(120).collect();
                    format!("{tool} ({w})")
                }
                None => tool.to_string(),
            }
        })
        .collect();
    Some(format!(
        "the agent was denied {} tool call(s) it asked for: {}",
        list.len(),
        named.join(", ")
    ))
}

/// The outcome and answer of a `result` line: an error it reports (see [`failure`]), a
/// planner with no answer, or the answer (the result's text, else what the agent wrote).
fn judge(p: &Prepared<'_>, result: &Value, stream: &Stream) -> (Outcome, String) {
    let is_error = result
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let subtype = result.get("subtype").and_then(Value::as_str).unwrap_or("");
    let answer = result
        .get("result")
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| stream.texts.join("\n\n"));
    if is_error || subtype != "success" {
        let (reason, message) = failure(result, stream.last_retry.as_ref());
        (Outcome::Failure { reason, message }, String::new())
    } else if let Some(message) = denials(result) {
        // Never lie: an agent that was refused what it asked for did not simply succeed.
        (
            Outcome::Failure {
                reason: FailureReason::NeedsAttention,
                message,
            },
            answer,
        )
    } else if answer.trim().is_empty() && p.job.kind == JobKind::Plan {
        (
            Outcome::Failure {
                reason: FailureReason::AgentError,
                message: "the planner answered with no text".into(),
            },
            String::new(),
        )
    } else {
        (Outcome::Success, answer)
    }
}
