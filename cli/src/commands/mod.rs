//! The command tree: one module per noun, one file per verb.
//!
//! [`Cli`] is the whole clap definition; [`run`] resolves the shared context ([`Ctx`]) and hands
//! the parsed arguments to the verb's `run`. Handlers return `anyhow::Result<ExitCode>`: `Ok`
//! with 0 or 1 (not found, task failed), `Err` for everything else (mapped to 2 by `main`).

pub mod agents;
pub mod approvals;
pub mod cancel;
pub mod clean;
pub mod completions;
pub mod cost_report;
pub mod dlq;
pub mod export;
pub mod init;
pub mod kill;
pub mod local;
pub mod logs;
pub mod mcp;
pub mod pr;
pub mod quotas;
pub mod status;
pub mod submit;
pub mod task_types;
pub mod tasks;
pub mod watch;
pub mod workers;

use crate::client::Client;
use crate::config::{FileConfig, Paths, Settings};
use crate::output::Format;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

const ABOUT: &str = "Command-line client of the orchestrator cluster (LLM coding agents)";

const LONG_ABOUT: &str = "\
Command-line client of the orchestrator cluster, which runs LLM coding agents on a coordinator
and workers connected by NATS JetStream and Redis.

The server and token come from --server/--token (or ORCH_SERVER/ORCH_TOKEN), then from the config
file (`server = \"...\"`, `token = \"...\"` in $ORCH_HOME/config.toml, ORCH_HOME defaulting to
~/.orch), then the default server http://127.0.0.1:7070.

Exit status: 0 on success, 1 when a looked-up thing does not exist or a followed task failed,
2 on any error.";

const EXAMPLES: &str = "\
Examples:
  orchctl local up                                  # start a cluster on this machine
  orchctl submit \"add a /healthz endpoint\" --follow  # run a task and watch it
  orchctl watch                                     # the whole cluster, live
  orchctl tasks list --status failed --since 1d     # recent failures
  orchctl logs AGENT_ID --follow                    # an agent's transcript
  orchctl cost-report --since 7d --by-role          # what it cost
  orchctl local down                                # stop the local cluster";

#[derive(Debug, Parser)]
#[command(
    name = "orchctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct Global {
    /// Coordinator URL [default: from the config file, else http://127.0.0.1:7070]
    #[arg(
        long,
        global = true,
        env = "ORCH_SERVER",
        value_name = "URL",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub server: Option<String>,

    /// API token [default: from the config file]
    #[arg(
        long,
        global = true,
        env = "ORCH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub token: Option<String>,

    /// Output format: human tables, or the API's JSON on stdout
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        default_value_t = Format::Table,
        value_name = "FORMAT",
        help_heading = "Global options"
    )]
    pub output: Format,

    /// Config file [default: $ORCH_HOME/config.toml, ORCH_HOME defaulting to ~/.orch]
    #[arg(
        long,
        global = true,
        env = "ORCH_CONFIG",
        value_name = "FILE",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(visible_alias = "execute")]
    Submit(Box<submit::Args>),
    Status(status::Args),
    /// List and inspect tasks
    #[command(subcommand)]
    Tasks(tasks::Command),
    #[command(
        name = "list-tasks",
        about = "List recent tasks (same as `tasks list`)"
    )]
    ListTasks(tasks::list::Args),
    /// List workers
    #[command(subcommand)]
    Workers(workers::Command),
    Quotas(quotas::Args),
    /// Agents waiting for a person to approve a tool: list, approve, deny
    #[command(subcommand)]
    Approvals(approvals::Command),
    /// List the task types the coordinator can plan
    #[command(subcommand, name = "task-types")]
    TaskTypes(task_types::Command),
    #[command(
        name = "task-details",
        about = "Show one task in full (same as `tasks show`)"
    )]
    TaskDetails(tasks::show::Args),
    /// List and inspect agents (an agent is one job of a task)
    #[command(subcommand)]
    Agents(agents::Command),
    #[command(name = "list-agents", about = "List agents (same as `agents list`)")]
    ListAgents(agents::list::Args),
    #[command(
        name = "agent-details",
        about = "Show one agent in full (same as `agents show`)"
    )]
    AgentDetails(agents::show::Args),
    Logs(logs::Args),
    Watch(watch::Args),
    #[command(name = "cost-report")]
    CostReport(cost_report::Args),
    Export(export::Args),
    Clean(clean::Args),
    Init(init::Args),
    Completions(completions::Args),
    Cancel(cancel::Args),
    Kill(kill::Args),
    /// Jobs that failed for good: list them, retry one
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// A task's pull request: sync its review comments
    #[command(subcommand)]
    Pr(pr::Command),
    /// Run a whole cluster on this machine
    #[command(subcommand)]
    Local(local::Command),
    Mcp(mcp::Args),
}

/// What every handler gets: the output format, the resolved paths and a way to build a client.
#[derive(Debug)]
pub struct Ctx {
    pub output: Format,
    pub paths: Paths,
    /// `--server` and `--token` (clap falls back on their variables, which `env` also holds).
    flags: FileConfig,
    /// `ORCH_SERVER` and `ORCH_TOKEN`.
    env: FileConfig,
}

impl Ctx {
    pub fn new(global: Global, paths: Paths, env: FileConfig) -> Self {
        Self {
            output: global.output,
            paths,
            flags: FileConfig {
                server: global.server,
                token: global.token,
            },
            env,
        }
    }

    /// Server and token after applying flags, environment and the config file.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let file = FileConfig::load(&self.paths)?;
        Ok(Settings::resolve(
            self.flags.clone(),
            self.env.clone(),
            file,
            self.paths.config.as_deref(),
        )?)
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let settings = self.settings()?;
        Ok(Client::new(&settings.server, settings.token.clone())?
            .with_auth_hint(settings.auth_hint()))
    }

    pub fn json(&self) -> bool {
        self.output == Format::Json
    }
}

/// Exit status 1: the thing looked up does not exist, or the followed task failed.
pub fn failure() -> ExitCode {
    ExitCode::from(1)
}

/// Prints the task a control verb (cancel, kill, dlq retry) returned, or `missing` on stderr
/// with exit status 1 when the server says it does not exist.
pub fn print_task_or_missing(
    ctx: &Ctx,
    answer: Result<orch_shared::api::Task, crate::client::Error>,
    missing: impl std::fmt::Display,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let task = match answer {
        Ok(task) => task,
        Err(e) if e.is_not_found() => {
            let _ = writeln!(std::io::stderr(), "{missing}");
            return Ok(failure());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if ctx.json() {
        crate::output::json(&mut out, &task)?;
    } else {
        crate::output::task_brief(&mut out, &task)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths::from_env(cli.global.config.clone());
    let ctx = Ctx::new(cli.global, paths, FileConfig::from_env());
    match cli.command {
        Command::Submit(args) => submit::run(&ctx, *args).await,
        Command::Status(args) => status::run(&ctx, args).await,
        Command::Tasks(cmd) => tasks::run(&ctx, cmd).await,
        Command::ListTasks(args) => tasks::list::run(&ctx, args).await,
        Command::Workers(cmd) => workers::run(&ctx, cmd).await,
        Command::Quotas(args) => quotas::run(&ctx, args).await,
        Command::Approvals(cmd) => approvals::run(&ctx, cmd).await,
        Command::TaskTypes(cmd) => task_types::run(&ctx, cmd).await,
        Command::TaskDetails(args) => tasks::show::run(&ctx, args).await,
        Command::Agents(cmd) => agents::run(&ctx, cmd).await,
        Command::ListAgents(args) => agents::list::run(&ctx, args).await,
        Command::AgentDetails(args) => agents::show::run(&ctx, args).await,
        Command::Logs(args) => logs::run(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::CostReport(args) => cost_report::run(&ctx, args).await,
        Command::Export(args) => export::run(&ctx, args).await,
        Command::Clean(args) => clean::run(&ctx, args).await,
        Command::Init(args) => init::run(&ctx, args).await,
        Command::Completions(args) => completions::run(&ctx, args).await,
        Command::Cancel(args) => cancel::run(&ctx, args).await,
        Command::Kill(args) => kill::run(&ctx, args).await,
        Command::Dlq(cmd) => dlq::run(&ctx, cmd).await,
        Command::Pr(cmd) => pr::run(&ctx, cmd).await,
        Command::Local(cmd) => local::run(&ctx, cmd).await,
        Command::Mcp(args) => mcp::run(&ctx, args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_verb() {
        let cli = Cli::try_parse_from([
            "orchctl",
            "tasks",
            "list",
            "--output",
            "json",
            "--server",
            "http://x:1",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Format::Json);
        assert_eq!(cli.global.server.as_deref(), Some("http://x:1"));
    }

    #[test]
    fn execute_is_an_alias_of_submit() {
        let cli = Cli::try_parse_from(["orchctl", "execute", "do it"]).unwrap();
        assert!(matches!(cli.command, Command::Submit(_)));
    }
}
