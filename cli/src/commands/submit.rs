//! `orchctl submit PROMPT` (alias `execute`): submit a task, optionally follow it live.

use super::{Ctx, failure};
use crate::client::Client;
use crate::follow::{self, MAX_RECONNECTS, Update};
use crate::output;
use crate::progress::{Panel, View};
use anyhow::{Context as _, anyhow, bail};
use orch_shared::api::{Mode, OnFailure, Planner, Priority, SubmitTask, Task, TaskStatus};
use orch_shared::ids::TaskId;
use orch_shared::job::{Backend, McpServer, SimParams};
use orch_shared::plan::PlanSpec;
use orch_shared::role::Role;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;

const LONG_ABOUT: &str = "\
Submit a task: the coordinator plans it into agent jobs (analyst, planner, builder, tester,
reviewer, documenter) and the workers run them.

Without --follow, prints the new task (id, status, roles) and exits. With --follow, shows live
progress on stderr until the task ends, then prints the result and its metrics on stdout; the exit
status is 0 when the task completed and 1 when it failed.

A second submit with the same --idempotency-key returns the first task instead of a new one.";

const EXAMPLES: &str = "\
Examples:
  orchctl submit \"add input validation to the signup form\" --follow
  orchctl submit \"fix the flaky login test\" --roles analyst,builder,tester --mode sequential
  orchctl submit \"write release notes\" --backend sim --sim-latency 2s --sim-fail-rate 0.1 -f
  git diff | orchctl submit - --task-type code_review --output json";

/// Submit a task (and optionally follow it to the end)
#[derive(Debug, clap::Args)]
#[command(long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Args {
    /// What you want done (`-` reads it from stdin)
    #[arg(value_name = "PROMPT")]
    pub prompt: String,

    /// Task type (`auto` or a template family; see `orchctl task-types list`)
    #[arg(long, value_name = "TYPE")]
    pub task_type: Option<String>,

    /// Run the jobs one after another or all at once
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<ModeArg>,

    /// A custom workflow: these roles in this order, comma-separated
    /// (analyst, planner, builder, integrator, tester, reviewer, documenter, custom)
    #[arg(long, value_name = "ROLES", value_delimiter = ',')]
    pub roles: Option<Vec<String>>,

    /// Return the earlier task submitted with this key instead of creating another
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Agent backend: sim, claude-code, anthropic, openai or command; `ROLE=BACKEND` for one
    /// role (repeat to mix backends in one plan: `--backend builder=openai`)
    #[arg(long, value_name = "[ROLE=]BACKEND")]
    pub backend: Vec<String>,

    /// Model name passed to the backend; `ROLE=MODEL` for one role (repeatable)
    #[arg(long, value_name = "[ROLE=]MODEL")]
    pub model: Vec<String>,

    /// Directory the agents work in, as the workers see it (default: a scratch directory)
    #[arg(long, value_name = "PATH")]
    pub workspace: Option<PathBuf>,

    /// A git repository the agents work in, as the workers reach it (URL or path): each agent
    /// gets a fresh clone, commits its work, and the task's result is the branch `orch/<task-id>`
    #[arg(long, value_name = "URL", conflicts_with = "workspace")]
    pub repo: Option<String>,

    /// The branch, tag or commit of --repo to start from (default: the repository's HEAD)
    #[arg(long = "ref", value_name = "REF", requires = "repo")]
    pub git_ref: Option<String>,

    /// A shell command run in the sandbox on the task branch once every agent is done (e.g.
    /// "cargo test"); a failure goes back to the agent whose change broke it
    #[arg(long, value_name = "COMMAND", requires = "repo")]
    pub check: Option<String>,

    /// How many times the check may run before the task fails (1 to 10, default 3)
    #[arg(long, value_name = "N", requires = "check")]
    pub check_rounds: Option<u32>,
    /// Open a pull request from the task branch to --ref (default: the repository's default
    /// branch) when the task completes; needs a forge configured on the coordinator
    #[arg(long, requires = "repo")]
    pub pr: bool,

    /// Hold a plan step whose file scope (`paths` in the plan file) overlaps a running step's
    /// until that step ends, instead of only warning about overlapping edits
    #[arg(long)]
    pub serialize_conflicts: bool,

    /// Check out only the directories of each plan step's file scope (`paths` in the plan
    /// file) and the top-level files, not the whole tree (`--sparse-checkout false`: the whole
    /// tree even when the workers' default is sparse) [default: the workers' workspace.sparse]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        requires = "repo"
    )]
    pub sparse_checkout: Option<bool>,

    /// The repository on the forge, owner/name (default: the last two parts of --repo)
    #[arg(long, value_name = "OWNER/NAME", requires = "pr")]
    pub pr_repo: Option<String>,

    /// A label for the pull request (repeatable)
    #[arg(long, value_name = "LABEL", requires = "pr")]
    pub pr_label: Vec<String>,

    /// With --check: open the pull request as a draft while the check runs and mark it
    /// ready when it passes (`true` or `false`; default: the coordinator's forge-draft)
    #[arg(long, value_name = "BOOL", requires = "pr")]
    pub pr_draft: Option<bool>,

    /// How long each simulated agent works (sim backend), e.g. 500ms, 2s
    #[arg(long, value_name = "DURATION")]
    pub sim_latency: Option<String>,

    /// Probability in [0, 1] that a simulated agent attempt fails (sim backend)
    #[arg(long, value_name = "RATE")]
    pub sim_fail_rate: Option<String>,

    /// The first N attempts of every simulated job fail (sim backend; shows retries)
    #[arg(long, value_name = "N")]
    pub sim_fail_attempts: Option<u32>,

    /// Who plans the task: `rules` (templates and keywords) or `llm` (a planner agent, with
    /// the rules as the fallback when its plan is not valid)
    #[arg(long, value_enum, value_name = "PLANNER")]
    pub planner: Option<PlannerArg>,

    /// Run this plan (a JSON file, `-` for stdin) instead of planning: steps with role, scope,
    /// constraints, estimated_tokens and depends_on (0-based step indices)
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,

    /// What a failed step does to the steps that depend on it
    #[arg(long, value_enum, value_name = "POLICY")]
    pub on_failure: Option<OnFailureArg>,

    /// Attempts per job for retryable failures (rate limit, overload, network, lost worker)
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Most jobs of this task running at once
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<u32>,

    /// Stop dispatching once the task has spent this many US dollars
    #[arg(long, value_name = "USD")]
    pub budget_usd: Option<f64>,

    /// Stop dispatching once the task has used this many tokens
    #[arg(long, value_name = "TOKENS")]
    pub budget_tokens: Option<u64>,

    /// Wall-clock limit of one job attempt, e.g. 10m
    #[arg(long, value_name = "DURATION")]
    pub job_timeout: Option<String>,

    /// Wall-clock limit of the whole task, e.g. 1h
    #[arg(long, value_name = "DURATION")]
    pub task_timeout: Option<String>,

    /// Most turns an agent may take
    #[arg(long, value_name = "N")]
    pub max_turns: Option<u32>,

    /// An MCP server whose tools the anthropic and openai agents may call (repeatable):
    /// NAME=URL (streamable HTTP) or NAME=COMMAND ARG... (stdio, run in the job's workspace;
    /// words split on spaces)
    #[arg(long = "mcp", value_name = "NAME=SERVER")]
    pub mcp: Vec<String>,

    /// Dispatch priority when the cluster is at its cap: low, normal or high
    #[arg(long, value_enum, value_name = "PRIORITY")]
    pub priority: Option<PriorityArg>,

    /// Print the plan and its estimated cost and duration; run nothing
    #[arg(long, conflicts_with = "follow")]
    pub dry_run: bool,

    /// Show live progress until the task ends, then print its result
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PriorityArg {
    Low,
    Normal,
    High,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlannerArg {
    Rules,
    Llm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFailureArg {
    Stop,
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Sequential,
    Parallel,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Sequential => Mode::Sequential,
            ModeArg::Parallel => Mode::Parallel,
        }
    }
}

/// Parses `--roles` values (already split on commas).
pub fn parse_roles(values: &[String]) -> anyhow::Result<Vec<Role>> {
    let roles = values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<Role>()
                .map_err(|e| anyhow!("invalid --roles: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if roles.is_empty() {
        bail!("invalid --roles: the list is empty (expected e.g. analyst,builder,tester)");
    }
    Ok(roles)
}

/// The values of a flag that takes `VALUE` (for the task, once) or `ROLE=VALUE` (for one
/// role, once per role), parsed with `parse`.
fn per_role<T>(
    flag: &str,
    values: &[String],
    parse: impl Fn(&str) -> anyhow::Result<T>,
) -> anyhow::Result<(Option<T>, BTreeMap<Role, T>)> {
    let mut all = None;
    let mut by_role = BTreeMap::new();
    for v in values.iter().map(|v| v.trim()) {
        if v.is_empty() {
            bail!("invalid {flag}: the value is empty");
        }
        match v.split_once('=') {
            Some((role, value)) => {
                let role = role
                    .trim()
                    .parse::<Role>()
                    .map_err(|e| anyhow!("invalid {flag} `{v}`: {e}"))?;
                let value = value.trim();
                if value.is_empty() {
                    bail!("invalid {flag} `{v}`: nothing after `=`");
                }
                if by_role.insert(role, parse(value)?).is_some() {
                    bail!("invalid {flag}: {role} is given twice");
                }
            }
            None if all.is_some() => {
                bail!("invalid {flag}: give one value for the task, and ROLE=VALUE for roles")
            }
            None => all = Some(parse(v)?),
        }
    }
    Ok((all, by_role))
}

/// Parses `--backend` with the protocol's own names, so a backend added to the protocol works
/// without changing orchctl.
pub fn parse_backend(value: &str) -> anyhow::Result<Backend> {
    serde_json::from_value(serde_json::Value::String(value.trim().to_ascii_lowercase())).map_err(
        |_| {
            anyhow!(
                "invalid --backend `{value}` (expected one of sim, claude-code, anthropic, openai, command)"
            )
        },
    )
}

/// Parses a `--job-timeout`-like duration flag into milliseconds.
pub fn parse_duration_ms(flag: &str, value: &str) -> anyhow::Result<u64> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| anyhow!("invalid {flag} `{value}`: {e} (expected e.g. 90s or 10m)"))?;
    u64::try_from(d.as_millis()).map_err(|_| anyhow!("invalid {flag} `{value}`: too long"))
}

/// Reads and parses `--plan FILE` (`-` for stdin).
pub fn read_plan(path: &std::path::Path) -> anyhow::Result<PlanSpec> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("failed to read the plan from stdin")?;
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("invalid --plan: cannot read {}", path.display()))?
    };
    serde_json::from_str(&text).map_err(|e| anyhow!("invalid --plan {}: {e}", path.display()))
}

/// Parses `--sim-latency` (`500ms`, `2s`, `1m`) into milliseconds.
pub fn parse_latency_ms(value: &str) -> anyhow::Result<u64> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| anyhow!("invalid --sim-latency `{value}`: {e} (expected e.g. 500ms or 2s)"))?;
    u64::try_from(d.as_millis()).map_err(|_| anyhow!("invalid --sim-latency `{value}`: too long"))
}

/// Parses `--sim-fail-rate`, a probability.
pub fn parse_fail_rate(value: &str) -> anyhow::Result<f64> {
    let rate: f64 = value
        .trim()
        .parse()
        .map_err(|_| anyhow!("invalid --sim-fail-rate `{value}`: not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        bail!("invalid --sim-fail-rate `{value}`: must be between 0 and 1");
    }
    Ok(rate)
}

/// Checks the arguments and builds the request body. `prompt` is the prompt after `-` was read.
pub fn build_request(args: &Args, prompt: String) -> anyhow::Result<SubmitTask> {
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let roles = args.roles.as_deref().map(parse_roles).transpose()?;
    let (backend, backends) = per_role("--backend", &args.backend, parse_backend)?;
    let (model, models) = per_role("--model", &args.model, |m| Ok(m.to_string()))?;
    let latency_ms = args
        .sim_latency
        .as_deref()
        .map(parse_latency_ms)
        .transpose()?;
    let fail_rate = args
        .sim_fail_rate
        .as_deref()
        .map(parse_fail_rate)
        .transpose()?;
    let sim = (latency_ms.is_some() || fail_rate.is_some() || args.sim_fail_attempts.is_some())
        .then(|| SimParams {
            latency_ms: latency_ms.unwrap_or_default(),
            fail_rate: fail_rate.unwrap_or_default(),
            fail_first_attempts: args.sim_fail_attempts.unwrap_or_default(),
            fail_reason: None,
        });
    let workspace = args
        .workspace
        .as_deref()
        .map(|p| {
            // A relative path means "relative to where I am", not to the worker's directory.
            let abs = std::path::absolute(p)
                .with_context(|| format!("invalid --workspace `{}`", p.display()))?;
            abs.to_str()
                .map(String::from)
                .ok_or_else(|| anyhow!("invalid --workspace `{}`: not UTF-8", p.display()))
        })
        .transpose()?;
    let repo = non_empty(&args.repo).map(|r| {
        // A local path means "relative to where I am", like --workspace.
        let path = std::path::Path::new(&r);
        if !r.contains("://") && !r.contains('@') && path.exists() {
            std::path::absolute(path)
                .ok()
                .and_then(|p| p.to_str().map(String::from))
                .unwrap_or(r)
        } else {
            r
        }
    });
    Ok(SubmitTask {
        prompt,
        repo,
        git_ref: non_empty(&args.git_ref),
        // Sent as given: the coordinator refuses an empty one, naming the field.
        check: args.check.clone(),
        check_rounds: args.check_rounds,
        serialize_conflicts: args.serialize_conflicts.then_some(true),
        sparse_checkout: args.sparse_checkout,
        pr: args.pr.then(|| orch_shared::api::PrRequest {
            repo: non_empty(&args.pr_repo),
            labels: args.pr_label.clone(),
            draft: args.pr_draft,
        }),
        task_type: non_empty(&args.task_type),
        mode: args.mode.map(Mode::from),
        roles,
        idempotency_key: non_empty(&args.idempotency_key),
        backend,
        model,
        backends: (!backends.is_empty()).then_some(backends),
        models: (!models.is_empty()).then_some(models),
        workspace,
        sim,
        planner: args.planner.map(|p| match p {
            PlannerArg::Rules => Planner::Rules,
            PlannerArg::Llm => Planner::Llm,
        }),
        plan: args.plan.as_deref().map(read_plan).transpose()?,
        on_failure: args.on_failure.map(|p| match p {
            OnFailureArg::Stop => OnFailure::Stop,
            OnFailureArg::Continue => OnFailure::Continue,
        }),
        max_attempts: args.max_attempts,
        max_parallel: args.max_parallel,
        budget_usd: args.budget_usd,
        budget_tokens: args.budget_tokens,
        job_timeout_ms: args
            .job_timeout
            .as_deref()
            .map(|v| parse_duration_ms("--job-timeout", v))
            .transpose()?,
        task_timeout_ms: args
            .task_timeout
            .as_deref()
            .map(|v| parse_duration_ms("--task-timeout", v))
            .transpose()?,
        max_turns: args.max_turns,
        mcp_servers: parse_mcp(&args.mcp)?,
        priority: args.priority.map(|p| match p {
            PriorityArg::Low => Priority::Low,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::High => Priority::High,
        }),
    })
}

/// `--mcp NAME=URL` or `--mcp NAME=COMMAND ARG...`, checked as the coordinator checks them.
fn parse_mcp(values: &[String]) -> anyhow::Result<Option<BTreeMap<String, McpServer>>> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut servers = BTreeMap::new();
    for v in values {
        let Some((name, spec)) = v.split_once('=') else {
            bail!("invalid --mcp `{v}`: expected NAME=URL or NAME=COMMAND ARG...");
        };
        let name = name.trim();
        let mut words = spec.split_whitespace().map(String::from);
        let Some(first) = words.next() else {
            bail!("invalid --mcp `{v}`: no URL or command after `=`");
        };
        let server = if first.contains("://") {
            McpServer {
                url: Some(first),
                ..McpServer::default()
            }
        } else {
            McpServer {
                command: Some(first),
                args: words.collect(),
                ..McpServer::default()
            }
        };
        server
            .check(name)
            .map_err(|e| anyhow!("invalid --mcp `{v}`: {e}"))?;
        if servers.insert(name.to_string(), server).is_some() {
            bail!("invalid --mcp: the server name `{name}` is given twice");
        }
    }
    Ok(Some(servers))
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
}

fn read_prompt(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut prompt = String::new();
    std::io::stdin()
        .read_to_string(&mut prompt)
        .context("failed to read the prompt from stdin")?;
    Ok(prompt)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let prompt = read_prompt(&args.prompt)?;
    let request = build_request(&args, prompt)?;
    let client = ctx.client()?;
    if args.dry_run {
        let dry = client.dry_run(&request).await?;
        let mut out = std::io::stdout().lock();
        if ctx.json() {
            output::json(&mut out, &dry)?;
        } else {
            output::dry_run(&mut out, &dry)?;
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let submitted = client.submit(&request).await?;
    if !submitted.created {
        let _ = writeln!(
            std::io::stderr(),
            "note: a task with this idempotency key already exists: {}",
            submitted.task.id
        );
    }

    if !args.follow {
        let mut out = std::io::stdout().lock();
        if ctx.json() {
            output::json(&mut out, &submitted.task)?;
        } else {
            output::task_brief(&mut out, &submitted.task)?;
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }

    let Some((task, finished_status)) = watch(&client, submitted.task).await? else {
        // Interrupted: the task keeps running on the cluster.
        return Ok(ExitCode::from(130));
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &task)?;
    } else {
        let now = orch_shared::now_ms();
        output::task_result(&mut out, &task)?;
        output::task_metrics(&mut out, &task, now)?;
    }
    out.flush()?;
    let completed = match task.status {
        TaskStatus::Completed => true,
        TaskStatus::Failed | TaskStatus::Cancelled => false,
        // The record lags the event log: trust the `task_finished` event.
        TaskStatus::Pending | TaskStatus::Running => {
            finished_status.as_deref() == Some("completed")
        }
    };
    Ok(if completed {
        ExitCode::SUCCESS
    } else {
        failure()
    })
}

/// Follows `task` with a live panel on stderr. Returns the final task record and the status its
/// `task_finished` event announced, or `None` when the user pressed Ctrl-C.
async fn watch(client: &Client, task: Task) -> anyhow::Result<Option<(Task, Option<String>)>> {
    let id = task.id;
    let view = View::stderr();
    let mut panel = Panel::new(&task);
    view.draw(&panel, orch_shared::now_ms());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let follower = tokio::spawn(follow::follow(client.clone(), id, tx));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        tokio::select! {
            update = rx.recv() => match update {
                Some(Update::Event(event)) => {
                    if let Some(line) = panel.apply(&event) {
                        view.note(&line);
                    }
                    view.draw(&panel, orch_shared::now_ms());
                }
                Some(Update::Reconnecting { attempt, delay, reason }) => {
                    let notice = format!(
                        "connection lost ({reason}); reconnecting in {:.1}s (attempt {attempt}/{MAX_RECONNECTS})",
                        delay.as_secs_f64()
                    );
                    view.note(&notice);
                    panel.set_notice(notice);
                    view.draw(&panel, orch_shared::now_ms());
                }
                // The follower is done (the task ended or it gave up).
                None => break,
            },
            _ = tick.tick() => view.draw(&panel, orch_shared::now_ms()),
            _ = &mut ctrl_c => {
                follower.abort();
                view.abandon();
                let _ = writeln!(
                    std::io::stderr(),
                    "stopped following; task {id} keeps running (see `orchctl tasks show {id}`)"
                );
                return Ok(None);
            }
        }
    }

    match follower.await.context("the event follower crashed")? {
        Ok(()) => {}
        Err(e) => {
            view.clear();
            return Err(e).with_context(|| format!("failed to follow task {id}"));
        }
    }
    view.finish(&panel, orch_shared::now_ms());
    let task = final_record(client, id).await?;
    Ok(Some((task, panel.finished_status().map(String::from))))
}

/// Reads the task once it ended. The coordinator records the end before it announces it, but a
/// short grace period costs nothing and covers a coordinator that does it the other way round
/// (and a pull request's outcome, announced just before it is recorded).
async fn final_record(client: &Client, id: TaskId) -> anyhow::Result<Task> {
    let mut task = client.task(id).await?;
    for _ in 0..10 {
        if task.status.is_terminal() && !task.pr_pending() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        task = client.task(id).await?;
    }
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: Args,
        }
        let mut argv = vec!["submit", "do it"];
        argv.extend_from_slice(extra);
        Wrap::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn sparse_checkout_is_sent_as_given_and_needs_a_repository() {
        let url = "https://example.com/r.git";
        let req = |extra: &[&str]| {
            let mut all = vec!["--repo", url];
            all.extend_from_slice(extra);
            build_request(&args(&all), "x".into())
                .unwrap()
                .sparse_checkout
        };
        assert_eq!(req(&[]), None, "the workers' default");
        assert_eq!(req(&["--sparse-checkout"]), Some(true));
        assert_eq!(req(&["--sparse-checkout", "false"]), Some(false));
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: Args,
        }
        let parsed = Only::try_parse_from(["submit", "x", "--sparse-checkout"]);
        assert!(
            parsed.is_err_and(|e| e.kind() == clap::error::ErrorKind::MissingRequiredArgument),
            "--sparse-checkout without --repo is refused"
        );
    }

    #[test]
    fn a_plain_submit_sends_only_the_prompt() {
        let req = build_request(&args(&[]), "do it".into()).unwrap();
        assert_eq!(
            req,
            SubmitTask {
                prompt: "do it".into(),
                ..SubmitTask::default()
            }
        );
    }

    #[test]
    fn mcp_servers_are_a_url_or_a_command_with_its_arguments() {
        let a = args(&[
            "--mcp",
            "fs=mcp-server-filesystem . /tmp",
            "--mcp",
            "docs=https://mcp.example.com/mcp",
        ]);
        let servers = build_request(&a, "do it".into())
            .unwrap()
            .mcp_servers
            .unwrap();
        assert_eq!(
            servers["fs"].command.as_deref(),
            Some("mcp-server-filesystem")
        );
        assert_eq!(servers["fs"].args, [".", "/tmp"]);
        assert_eq!(
            servers["docs"].url.as_deref(),
            Some("https://mcp.example.com/mcp")
        );
        for bad in ["fs", "fs=", "a__b=x", "bad name=x"] {
            let e = build_request(&args(&["--mcp", bad]), "x".into()).unwrap_err();
            assert!(e.to_string().starts_with("invalid --mcp"), "{bad}: {e}");
        }
    }

    #[test]
    fn backends_and_models_can_be_given_per_role() {
        let a = args(&[
            "--backend",
            "anthropic",
            "--backend",
            "builder=openai",
            "--backend",
            "reviewer = claude-code",
            "--model",
            "builder=qwen2.5-coder",
        ]);
        let req = build_request(&a, "do it".into()).unwrap();
        assert_eq!(req.backend, Some(Backend::Anthropic));
        assert_eq!(
            req.backends,
            Some(BTreeMap::from([
                (Role::Builder, Backend::Openai),
                (Role::Reviewer, Backend::ClaudeCode)
            ]))
        );
        assert_eq!(req.model, None);
        assert_eq!(
            req.models,
            Some(BTreeMap::from([(
                Role::Builder,
                "qwen2.5-coder".to_string()
            )]))
        );
        let err = |flags: &[&str]| {
            build_request(&args(flags), "do it".into())
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(&["--backend", "scout=openai"])
                .starts_with("invalid --backend `scout=openai`: unknown role")
        );
        assert!(err(&["--backend", "builder=gpt"]).contains("--backend"));
        assert!(err(&["--model", "builder="]).starts_with("invalid --model `builder=`"));
        assert!(err(&["--backend", "sim", "--backend", "openai"]).starts_with("invalid --backend"));
        assert!(
            err(&["--model", "tester=a", "--model", "tester=b"])
                .starts_with("invalid --model: tester is given twice")
        );
    }

    #[test]
    fn every_flag_lands_in_the_request() {
        let a = args(&[
            "--task-type",
            "bug_fix",
            "--mode",
            "parallel",
            "--roles",
            "Analyst, builder,tester",
            "--idempotency-key",
            "k1",
            "--backend",
            "claude-code",
            "--model",
            "m",
            "--workspace",
            "/tmp/ws",
            "--sim-latency",
            "2s",
            "--sim-fail-rate",
            "0.1",
        ]);
        let req = build_request(&a, "do it".into()).unwrap();
        assert_eq!(req.task_type.as_deref(), Some("bug_fix"));
        assert_eq!(req.mode, Some(Mode::Parallel));
        assert_eq!(
            req.roles,
            Some(vec![Role::Analyst, Role::Builder, Role::Tester])
        );
        assert_eq!(req.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(req.backend, Some(Backend::ClaudeCode));
        assert_eq!(req.model.as_deref(), Some("m"));
        assert_eq!(req.workspace.as_deref(), Some("/tmp/ws"));
        assert_eq!(
            req.sim,
            Some(SimParams {
                latency_ms: 2000,
                fail_rate: 0.1,
                ..Default::default()
            })
        );
    }

    #[test]
    fn bad_roles_are_one_line_naming_the_flag() {
        let err = build_request(&args(&["--roles", "analyst,scout"]), "x".into()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("invalid --roles: unknown role `scout`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        assert!(parse_roles(&[" ".into()]).is_err());
    }

    #[test]
    fn sim_latency_takes_human_durations() {
        assert_eq!(parse_latency_ms("500ms").unwrap(), 500);
        assert_eq!(parse_latency_ms("2s").unwrap(), 2000);
        assert_eq!(parse_latency_ms("1m 30s").unwrap(), 90_000);
        assert!(parse_latency_ms("soon").is_err());
    }

    #[test]
    fn fail_rate_must_be_a_probability() {
        assert_eq!(parse_fail_rate("0").unwrap(), 0.0);
        assert_eq!(parse_fail_rate("1").unwrap(), 1.0);
        assert!(parse_fail_rate("1.5").is_err());
        assert!(parse_fail_rate("-0.1").is_err());
        assert!(parse_fail_rate("NaN").is_err());
        assert!(parse_fail_rate("often").is_err());
    }

    #[test]
    fn backends_use_the_protocol_names() {
        assert_eq!(parse_backend("sim").unwrap(), Backend::Sim);
        assert_eq!(parse_backend("OpenAI").unwrap(), Backend::Openai);
        assert!(
            parse_backend("gpt")
                .unwrap_err()
                .to_string()
                .contains("--backend")
        );
    }

    #[test]
    fn an_empty_prompt_is_refused() {
        assert!(build_request(&args(&[]), "  \n".into()).is_err());
    }

    #[test]
    fn relative_workspaces_become_absolute() {
        let req = build_request(&args(&["--workspace", "src"]), "x".into()).unwrap();
        assert!(req.workspace.unwrap().starts_with('/'));
    }
}
