//! `orchctl local down`: stop the local cluster in dependency order.
//!
//! Workers go first and get the longest grace period: on SIGTERM a worker stops pulling jobs and
//! finishes (or hands back) the ones it runs. The coordinator goes next, then Redis and NATS,
//! which the others need until they are gone. Whatever outlives its grace period is killed.
//! Then no process of the cluster may be left: what ran below one of its processes or in one of
//! their process groups when `down` started (an agent a worker started, say) and still runs is
//! killed, and said so.

use super::cluster::{Cluster, Kind, Proc};
use super::process;
use super::{DataDirArg, Steps};
use crate::commands::Ctx;
use crate::output;
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  orchctl local down
  orchctl local down --data-dir /tmp/orch-test";

/// Stop the local cluster (workers drain first)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Stop the local cluster started by `orchctl local up`: SIGTERM to the workers \
(up to 60s each to drain their jobs), then the coordinator, then redis-server and nats-server; \
SIGKILL for anything still running after its grace period. Data and logs stay in the data \
directory. Does nothing when no cluster runs.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

/// Stop order and grace period of each kind of process.
const ORDER: [(Kind, Duration); 4] = [
    (Kind::Worker, Duration::from_secs(60)),
    (Kind::Coordinator, Duration::from_secs(30)),
    (Kind::Redis, Duration::from_secs(10)),
    (Kind::Nats, Duration::from_secs(10)),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exited after SIGTERM.
    Stopped,
    /// Still running after its grace period; got SIGKILL.
    Killed,
    /// Was not running any more.
    NotRunning,
}

#[derive(Debug, Serialize)]
struct Stopped<'a> {
    name: &'a str,
    pid: u32,
    outcome: Outcome,
}

/// Stops a group of processes together: SIGTERM to all, then wait for each until `grace` has
/// passed, then SIGKILL what is left.
async fn stop_group(procs: &[&Proc], grace: Duration) -> Vec<Outcome> {
    let running: Vec<bool> = procs
        .iter()
        .map(|p| p.is_running() && process::signal(p.pid, process::Signal::SIGTERM))
        .collect();
    let waits = procs.iter().zip(&running).map(|(p, &running)| async move {
        if !running {
            return Outcome::NotRunning;
        }
        let program = p.program();
        if process::wait_exit(p.pid, &program, grace).await {
            return Outcome::Stopped;
        }
        process::signal(p.pid, process::Signal::SIGKILL);
        process::wait_exit(p.pid, &program, Duration::from_secs(5)).await;
        Outcome::Killed
    });
    futures::future::join_all(waits).await
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.resolve(ctx)?;
    let Some(cluster) = Cluster::load(&data_dir)? else {
        let mut out = std::io::stdout().lock();
        if ctx.json() {
            output::json(&mut out, &Vec::<Stopped<'_>>::new())?;
        } else {
            writeln!(out, "no local cluster in {}", data_dir.display())?;
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    };

    let steps = Steps::new();
    // Taken before anything stops: once a process dies its children are re-parented.
    let roots: Vec<u32> = cluster
        .processes
        .iter()
        .filter(|p| p.is_running())
        .map(|p| p.pid)
        .collect();
    let family = process::family(&roots);
    let mut report = Vec::new();
    for (kind, grace) in ORDER {
        let procs: Vec<&Proc> = cluster.of_kind(kind).collect();
        if procs.is_empty() {
            continue;
        }
        let names: Vec<&str> = procs.iter().map(|p| p.name.as_str()).collect();
        steps.step(format!("stopping {}", names.join(", ")));
        let outcomes = stop_group(&procs, grace).await;
        for (p, outcome) in procs.iter().zip(outcomes) {
            if outcome == Outcome::Killed {
                steps.println(format!(
                    "{} (pid {}) did not stop within {}s and was killed",
                    p.name,
                    p.pid,
                    grace.as_secs()
                ));
            }
            report.push(Stopped {
                name: &p.name,
                pid: p.pid,
                outcome,
            });
        }
    }
    // Later members of the groups too (a process started while the others stopped).
    let mut left: Vec<process::ProcId> = family;
    left.extend(process::family(&roots));
    left.sort_unstable();
    left.dedup();
    left.retain(|p| process::proc_runs(*p));
    if !left.is_empty() {
        for p in &left {
            process::signal(p.0, process::Signal::SIGKILL);
        }
        let pids: Vec<String> = left.iter().map(|p| p.0.to_string()).collect();
        steps.println(format!(
            "killed {} leftover process(es) of the cluster: pid {}",
            left.len(),
            pids.join(", ")
        ));
    }
    steps.done();
    Cluster::remove(&data_dir)?;

    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(&mut out, &report)?;
    } else {
        let mut t = output::table(["NAME", "PID", "RESULT"]);
        for r in &report {
            let result = match r.outcome {
                Outcome::Stopped => "stopped",
                Outcome::Killed => "killed",
                Outcome::NotRunning => "was not running",
            };
            t.add_row(vec![r.name.to_string(), r.pid.to_string(), result.into()]);
        }
        writeln!(out, "local cluster in {} stopped", data_dir.display())?;
        output::print_table(&mut out, &t)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
