//! `orchctl local status`: the local cluster's processes and the coordinator's readiness.

use super::DataDirArg;
use super::cluster::Cluster;
use crate::client::Client;
use crate::commands::{Ctx, failure};
use crate::output;
use orch_shared::api::Readiness;
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl local status
  orchctl local status --output json | jq '.processes[] | select(.running | not)'";

/// Show the local cluster's processes and readiness
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Show each process of the local cluster (pid, port, whether it runs, its log) \
and whether the coordinator is ready. Exits 0 when everything runs and the coordinator is \
ready, 1 when there is no local cluster or part of it is down.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, Serialize)]
struct ProcStatus<'a> {
    name: &'a str,
    pid: u32,
    port: Option<u16>,
    running: bool,
    log: &'a std::path::Path,
}

#[derive(Debug, Serialize)]
struct StatusJson<'a> {
    data_dir: &'a std::path::Path,
    server: &'a str,
    processes: Vec<ProcStatus<'a>>,
    /// `None` when the coordinator did not answer.
    readiness: Option<Readiness>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.resolve(ctx)?;
    let Some(cluster) = Cluster::load(&data_dir)? else {
        let _ = writeln!(
            std::io::stderr(),
            "no local cluster in {} (start one with `orchctl local up`)",
            data_dir.display()
        );
        return Ok(failure());
    };
    let processes: Vec<ProcStatus<'_>> = cluster
        .processes
        .iter()
        .map(|p| ProcStatus {
            name: &p.name,
            pid: p.pid,
            port: p.port,
            running: p.is_running(),
            log: &p.log,
        })
        .collect();
    // /readyz needs no token.
    let readiness = match Client::new(&cluster.server, None) {
        Ok(client) => client.readiness().await.ok(),
        Err(_) => None,
    };
    let healthy =
        processes.iter().all(|p| p.running) && readiness.as_ref().is_some_and(|r| r.ready);

    let mut out = std::io::stdout().lock();
    if ctx.json() {
        output::json(
            &mut out,
            &StatusJson {
                data_dir: &cluster.data_dir,
                server: &cluster.server,
                processes,
                readiness,
            },
        )?;
    } else {
        let mut t = output::table(["NAME", "PID", "PORT", "STATE", "LOG"]);
        for p in &processes {
            t.add_row(vec![
                p.name.to_string(),
                p.pid.to_string(),
                p.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if p.running { "running" } else { "not running" }.to_string(),
                p.log.display().to_string(),
            ]);
        }
        output::print_table(&mut out, &t)?;
        let ready = match &readiness {
            Some(r) if r.ready => "ready".to_string(),
            Some(r) => format!(
                "not ready (nats {}, redis {})",
                if r.nats { "ok" } else { "down" },
                if r.redis { "ok" } else { "down" }
            ),
            None => "not answering".to_string(),
        };
        writeln!(out, "coordinator {}: {ready}", cluster.server)?;
    }
    out.flush()?;
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        failure()
    })
}
