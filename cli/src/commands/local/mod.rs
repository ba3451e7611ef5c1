//! `orchctl local ...`: a whole cluster (nats-server, redis-server, one coordinator, N workers)
//! as background processes on this machine.
//!
//! - [`cluster`]: the `DIR/cluster.json` record (pids, ports, logs).
//! - [`process`]: finding programs, detached spawning, signals, liveness.
//! - `up`, `down`, `status`: the verbs.

pub mod cluster;
pub mod down;
pub mod process;
pub mod status;
pub mod up;

use super::Ctx;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Up(up::Args),
    Down(down::Args),
    Status(status::Args),
}

pub async fn run(ctx: &Ctx, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Up(args) => up::run(ctx, args).await,
        Command::Down(args) => down::run(ctx, args).await,
        Command::Status(args) => status::run(ctx, args).await,
    }
}

/// `--data-dir` of every `local` verb.
#[derive(Debug, clap::Args)]
pub struct DataDirArg {
    /// Where the cluster keeps its data, logs and cluster.json [default: $ORCH_HOME/local]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArg {
    /// The data directory as an absolute path (the services get it on their command line).
    pub fn resolve(&self, ctx: &Ctx) -> anyhow::Result<PathBuf> {
        let dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => ctx.paths.require_home()?.join("local"),
        };
        std::path::absolute(&dir)
            .with_context(|| format!("invalid data directory {}", dir.display()))
    }
}

/// The command that stops the cluster in `dir` (with `--data-dir` unless it is the default).
pub fn down_command(ctx: &Ctx, dir: &Path) -> String {
    let default = ctx
        .paths
        .home
        .as_ref()
        .and_then(|h| std::path::absolute(h.join("local")).ok());
    if default.as_deref() == Some(dir) {
        "orchctl local down".to_string()
    } else {
        format!("orchctl local down --data-dir {}", dir.display())
    }
}

/// Progress of a long `local` verb on stderr: a spinner on a terminal, plain lines otherwise.
pub struct Steps {
    bar: Option<ProgressBar>,
    /// The last plain line, so a repeated step ("waiting... (1/2)") is printed once.
    last: std::cell::RefCell<String>,
}

impl Steps {
    pub fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Steps {
                bar: None,
                last: Default::default(),
            };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        Steps {
            bar: Some(bar),
            last: Default::default(),
        }
    }

    pub fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None => {
                let mut last = self.last.borrow_mut();
                if *last != msg {
                    let _ = writeln!(std::io::stderr(), "{msg}");
                    *last = msg;
                }
            }
        }
    }

    /// Prints a line that stays (above the spinner on a terminal).
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => {
                let _ = writeln!(std::io::stderr(), "{}", msg.as_ref());
            }
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
