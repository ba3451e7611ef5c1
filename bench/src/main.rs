//! `orch-bench`: measures a real local cluster (nats-server, redis-server, one coordinator,
//! workers running `sim` agents) beside the anchors in `../shared/bench/anchors` in the same
//! run, and writes absolute figures, ratios and the targets met or missed to
//! `bench/results/<time>.json` and `.md` (plus the growth curves as `<time>-growth.png`). Only
//! same-run ratios mean anything: the machines are shared and noisy.
//!
//! Layout:
//! - [`cluster`]: the processes (Redis started with the settings of the anchor compared to).
//! - [`watch`]: arrival times of task events, from a core NATS subscription.
//! - [`scenarios`]: throughput, latency (light and at 80 % of the maximum), footprint, recovery,
//!   and `replicas`: R3 streams on a 3-server NATS cluster against R1 on one server.
//! - [`concurrency`]: one worker holding 1,000 long agents; heartbeats and redeliveries.
//! - [`native`]: native tool-loop agents on one worker against a fake Messages API: worker
//!   RSS per agent, CPU and loop time (p50, p99) per tool round, heartbeats sent late; with
//!   `--native-backend claude-code` the real Claude Code CLI's memory per agent instead
//!   (`--native-agents` takes several sizes; the baseline build's too).
//! - [`checkpoints`]: one agent's checkpoints on a 10,000-file repository (off, pushed, written
//!   straight into a local repository adding the whole tree each time or only the files
//!   written; the baseline build's too).
//! - [`growth`]: the per-task cost against history size and worker count.
//! - [`anchors`]: jsbench and Celery, run by the harness.
//! - [`report`] and [`plot`]: the markdown table, the targets and the PNG.
//!
//! `cargo run --release -p orch-bench` runs everything (about 5 minutes on 2 cores);
//! `--baseline-bin-dir DIR` measures another build's binaries in the same run (before/after);
//! `--check` is the CI regression check: a small scenario and jsbench, failing only on a gross
//! slowdown.

mod anchors;
mod bigrepo;
mod checkpoints;
mod cluster;
mod concurrency;
mod growth;
mod history;
mod native;
mod plot;
mod prompts;
mod report;
mod scenarios;
mod watch;

use anyhow::{Context, bail};
use clap::Parser;
use cluster::{RedisMode, Spec};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Scenarios to run, comma-separated: core, replicas, anchors, celery, concurrency, native,
    /// growth, recovery, checkpoints (or all, which leaves out the long ones: agents10k,
    /// history1m, bigrepo, prompts).
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// One-agent tasks of the throughput scenario (a fifth of it as 5-step tasks).
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Passes of the core and replicas scenarios per build (fresh cluster each; builds, or
    /// R1 and R3, alternate).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// replicas: light-load latency samples on each cluster.
    #[arg(long, default_value_t = 200)]
    replicas_samples: usize,
    /// Worker processes of the core scenario.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker of the core scenario.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Concurrent submit requests.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How the benchmark's Redis persists.
    #[arg(long, value_enum, default_value = "anchor")]
    redis: RedisMode,
    /// The orchestrator binaries measured (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Another build's binaries, measured in the same run as "before".
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
    /// Concurrency scenario: long agents held by one worker.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Concurrency scenario: how long each agent runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Concurrency scenario: the job ack wait (heartbeats every third of it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hold_ack_wait: Duration,
    /// Native scenario: agents at once on one worker; several (comma-separated) are run one
    /// after the other.
    #[arg(long, value_delimiter = ',', default_value = "500")]
    native_agents: Vec<usize>,
    /// Native scenario: the worker's own tool loop, or the real Claude Code CLI
    /// (`ORCH_CLAUDE_BIN`) against the same fake API.
    #[arg(long, value_enum, default_value = "native")]
    native_backend: native::Backend,
    /// Native scenario: tool rounds of each agent.
    #[arg(long, default_value_t = 5)]
    native_rounds: usize,
    /// Native scenario: how long the fake API takes to answer each request.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    native_delay: Duration,
    /// Checkpoints scenario: files in the repository.
    #[arg(long, default_value_t = 10_000)]
    checkpoint_files: usize,
    /// Checkpoints scenario: steps of the agent (each changes a file and adds one).
    #[arg(long, default_value_t = 30)]
    checkpoint_steps: usize,
    /// Checkpoints scenario: how long the fake API takes to answer each request.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    checkpoint_delay: Duration,
    /// Growth: tasks in history at each point.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    history: Vec<usize>,
    /// Growth: worker processes at each point.
    #[arg(long, value_delimiter = ',', default_value = "2,10,50")]
    worker_counts: Vec<usize>,
    /// Growth: slots per worker when the worker count varies.
    #[arg(long, default_value_t = 4)]
    worker_slots: u32,
    /// Growth: tasks measured at each point.
    #[arg(long, default_value_t = 2000)]
    growth_batch: usize,
    /// Growth: latency samples at each point.
    #[arg(long, default_value_t = 100)]
    growth_samples: usize,
    /// agents10k: running agents at each size, shared by --agents10k-workers workers.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    agents10k_sizes: Vec<usize>,
    /// agents10k: worker processes.
    #[arg(long, default_value_t = 20)]
    agents10k_workers: usize,
    /// agents10k: how long each agent runs.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    agents10k_hold: Duration,
    /// agents10k: the job ack wait (heartbeats every third of it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    agents10k_ack_wait: Duration,
    /// history1m: finished tasks in the history at each point (the full size is 100000,1000000).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    history_levels: Vec<usize>,
    /// history1m: the seeded history spans this many days.
    #[arg(long, default_value_t = 60)]
    history_span_days: u64,
    /// history1m: words of the repository's documentation added to each seeded prompt (long
    /// prompts, as real ones are; 0: the 7-word prompts only). Seeded with this build's
    /// code: a baseline's word index is this build's too.
    #[arg(long, default_value_t = 0)]
    history_prompt_words: usize,
    /// Jobs of each jsbench run.
    #[arg(long, default_value_t = 50_000)]
    jsbench_jobs: usize,
    /// Jobs of the Celery run.
    #[arg(long, default_value_t = 5000)]
    celery_jobs: usize,
    /// bigrepo: files of the generated repository.
    #[arg(long, default_value_t = 50_000)]
    bigrepo_files: usize,
    /// bigrepo: commits after the first, each changing 1 % of the files.
    #[arg(long, default_value_t = 20)]
    bigrepo_commits: usize,
    /// bigrepo: jobs started at once on the one worker.
    #[arg(long, default_value_t = 16)]
    bigrepo_concurrent: usize,
    /// bigrepo: jobs run one at a time on the warm worker.
    #[arg(long, default_value_t = 3)]
    bigrepo_warm_jobs: usize,
    /// prompts: tasks submitted with long prompts.
    #[arg(long, default_value_t = 2000)]
    prompts_tasks: usize,
    /// prompts: words per prompt (consecutive words of the repository's documentation).
    #[arg(long, default_value_t = 300)]
    prompts_words: usize,
    /// The anchors' folder.
    #[arg(long, default_value = "../shared/bench/anchors")]
    anchors: PathBuf,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// CI regression check: 2,000 one-agent tasks and jsbench in the same run; exits 1 only on
    /// a gross slowdown. Writes to target/bench-check/.
    #[arg(long)]
    check: bool,
}

/// The check fails below this share of jsbench's JetStream + Redis throughput...
const CHECK_MIN_RATIO: f64 = 0.05;
/// ...or above this p99 of submit → agent start at light load.
const CHECK_MAX_P99_MS: f64 = 50.0;

fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("executable has a directory")?.into())
}

fn version(cmd: &str, arg: &str) -> String {
    std::process::Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = Spec {
        workers: args.workers,
        slots: args.slots,
        ack_wait: Duration::from_secs(30),
        redis: args.redis,
        bin_dir: args.bin_dir.clone().map_or_else(exe_dir, Ok)?,
        worker_metrics: false,
        worker_args: vec![],
        coordinator_args: vec![],
        nats_nodes: 1,
    };
    let mut results = json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "at_ms": orch_shared::now_ms(),
        "redis_mode": args.redis.describe(),
        "redis_version": version("redis-server", "--version"),
        "nats_version": version("nats-server", "--version"),
        "bin_dir": spec.bin_dir.display().to_string(),
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    if args.check {
        return check(&args, &spec, results).await;
    }
    const SCENARIOS: [&str; 14] = [
        "all",
        "prompts",
        "core",
        "replicas",
        "anchors",
        "celery",
        "concurrency",
        "native",
        "growth",
        "recovery",
        "checkpoints",
        "agents10k",
        "history1m",
        "bigrepo",
    ];
    if let Some(unknown) = args.scenarios.split(',').find(|x| !SCENARIOS.contains(x)) {
        eprintln!(
            "orch-bench: --scenarios: unknown scenario `{unknown}` (expected {})",
            SCENARIOS.join(", ")
        );
        std::process::exit(2);
    }
    let want = |s: &str| args.scenarios == "all" || args.scenarios.split(',').any(|x| x == s);
    let started = Instant::now();

    if want("core") {
        let baseline = args.baseline_bin_dir.as_ref().map(|dir| Spec {
            bin_dir: dir.clone(),
            ..spec.clone()
        });
        let mut current = Vec::new();
        let mut before = Vec::new();
        let mut js = Vec::new();
        for pass in 0..args.repeat {
            let mut load_of = None;
            if let Some(b) = &baseline {
                eprintln!("core pass {}: baseline ({})", pass + 1, b.bin_dir.display());
                let r = scenarios::core(b, args.tasks, args.concurrency, None).await?;
                load_of = r["throughput_one_agent"]["tasks_per_s"].as_f64();
                before.push(r);
            }
            eprintln!("core pass {}: this build", pass + 1);
            let (r, j) = core_with_jsbench(&args, &spec, want("anchors"), load_of).await?;
            current.push(r);
            if let Some(j) = j {
                js.push(j);
            }
        }
        results["core"] = json!({"current": current, "baseline": before});
        results["jsbench"] = json!(js);
    }
    if want("replicas") {
        eprintln!(
            "replicas: {} one-agent tasks and {} latency samples on 1 NATS server (R1), then on \
             a cluster of 3 (R3); {} pass(es)",
            args.tasks, args.replicas_samples, args.repeat
        );
        results["replicas"] = scenarios::replicas(
            &spec,
            args.tasks,
            args.replicas_samples,
            args.concurrency,
            args.repeat,
        )
        .await?;
        eprintln!("  R3 / R1: {}", results["replicas"]["ratio_r3_to_r1"]);
    }
    if want("celery") {
        eprintln!("celery anchor ({} jobs)", args.celery_jobs);
        results["celery"] = anchors::celery(&args.anchors, args.celery_jobs);
        eprintln!("  celery: {}", compact(&results["celery"]));
    }
    if want("concurrency") {
        eprintln!(
            "concurrency: {} agents of {:?} on one worker",
            args.agents, args.hold
        );
        results["concurrency"] = concurrency::run(
            &spec,
            &concurrency::Params {
                agents: args.agents,
                hold: args.hold,
                ack_wait: args.hold_ack_wait,
                workers: 1,
                samples: 0,
            },
        )
        .await?;
        eprintln!("  {}", results["concurrency"]);
    }
    if want("native") {
        // Each size on the baseline's binaries first when given, then on these.
        let builds: Vec<(&str, Spec)> = args
            .baseline_bin_dir
            .iter()
            .map(|dir| {
                let b = Spec {
                    bin_dir: dir.clone(),
                    ..spec.clone()
                };
                ("baseline", b)
            })
            .chain([("current", spec.clone())])
            .collect();
        let mut runs = Vec::new();
        for &agents in &args.native_agents {
            for (build, s) in &builds {
                eprintln!(
                    "native ({build}, {:?}): {agents} agents of {} rounds on one worker, API answers after {:?}",
                    args.native_backend, args.native_rounds, args.native_delay
                );
                let load = load_average();
                let mut r = native::run(
                    s,
                    &native::Params {
                        agents,
                        rounds: args.native_rounds,
                        delay: args.native_delay,
                        backend: args.native_backend,
                    },
                )
                .await?;
                r["build"] = json!(build);
                r["load_average_before"] = json!(load);
                r["load_average_after"] = json!(load_average());
                eprintln!("  {r}");
                runs.push(r);
            }
        }
        results["native"] = match runs.len() {
            1 => runs.remove(0),
            _ => json!(runs),
        };
    }
    if want("checkpoints") {
        eprintln!(
            "checkpoints: one agent of {} steps on a repository of {} files",
            args.checkpoint_steps, args.checkpoint_files
        );
        let baseline = args.baseline_bin_dir.as_ref().map(|dir| Spec {
            bin_dir: dir.clone(),
            ..spec.clone()
        });
        results["checkpoints"] = checkpoints::run(
            &spec,
            baseline.as_ref(),
            &checkpoints::Params {
                files: args.checkpoint_files,
                steps: args.checkpoint_steps,
                delay: args.checkpoint_delay,
            },
        )
        .await?;
    }
    if want("growth") {
        eprintln!("growth: history {:?}", args.history);
        let history =
            growth::history(&spec, &args.history, args.growth_batch, args.growth_samples).await?;
        eprintln!("growth: workers {:?}", args.worker_counts);
        let workers = growth::workers(
            &spec,
            &args.worker_counts,
            args.worker_slots,
            args.growth_batch,
            args.growth_samples,
        )
        .await?;
        results["growth"] = json!({"history": history, "workers": workers});
    }
    if args.scenarios.split(',').any(|x| x == "agents10k") {
        let mut runs = json!({});
        let mut builds = vec![("current", spec.clone())];
        if let Some(dir) = &args.baseline_bin_dir {
            builds.insert(
                0,
                (
                    "baseline",
                    Spec {
                        bin_dir: dir.clone(),
                        ..spec.clone()
                    },
                ),
            );
        }
        for (build, spec) in builds {
            let mut sizes = Vec::new();
            for &agents in &args.agents10k_sizes {
                eprintln!(
                    "agents10k ({build}): {agents} agents of {:?} on {} workers",
                    args.agents10k_hold, args.agents10k_workers
                );
                let r = concurrency::run(
                    &spec,
                    &concurrency::Params {
                        agents,
                        hold: args.agents10k_hold,
                        ack_wait: args.agents10k_ack_wait,
                        workers: args.agents10k_workers,
                        samples: 20,
                    },
                )
                .await?;
                eprintln!("  {r}");
                sizes.push(r);
            }
            let ratios = concurrency::per_agent_ratios(&sizes);
            runs[build] = json!({"sizes": sizes, "per_agent_ratio_largest_to_smallest": ratios});
        }
        results["agents10k"] = runs;
    }
    if args.scenarios.split(',').any(|x| x == "history1m") {
        let p = history::Params {
            levels: args.history_levels.clone(),
            span_days: args.history_span_days,
            prompt_words: args.history_prompt_words,
            batch: args.growth_batch,
            samples: args.growth_samples,
        };
        let mut runs = json!({});
        if let Some(dir) = &args.baseline_bin_dir {
            eprintln!(
                "history1m: baseline ({}), history {:?}",
                dir.display(),
                p.levels
            );
            let b = Spec {
                bin_dir: dir.clone(),
                ..spec.clone()
            };
            runs["baseline"] = history::run(&b, &p).await?;
        }
        eprintln!("history1m: this build, history {:?}", p.levels);
        runs["current"] = history::run(&spec, &p).await?;
        results["history1m"] = runs;
    }
    if args.scenarios.split(',').any(|x| x == "bigrepo") {
        let mut builds = vec![];
        if let Some(dir) = &args.baseline_bin_dir {
            builds.push((
                "baseline",
                Spec {
                    bin_dir: dir.clone(),
                    ..spec.clone()
                },
            ));
        }
        builds.push(("current", spec.clone()));
        eprintln!(
            "bigrepo: {} files, {} commits",
            args.bigrepo_files,
            args.bigrepo_commits + 1
        );
        results["bigrepo"] = bigrepo::run_all(
            &builds,
            &bigrepo::Params {
                files: args.bigrepo_files,
                commits: args.bigrepo_commits,
                warm_jobs: args.bigrepo_warm_jobs,
                concurrent: args.bigrepo_concurrent,
            },
        )
        .await?;
    }
    if args.scenarios.split(',').any(|x| x == "prompts") {
        let p = prompts::Params {
            tasks: args.prompts_tasks,
            words: args.prompts_words,
        };
        let mut runs = json!({});
        if let Some(dir) = &args.baseline_bin_dir {
            eprintln!("prompts: baseline ({})", dir.display());
            let b = Spec {
                bin_dir: dir.clone(),
                ..spec.clone()
            };
            runs["baseline"] = prompts::run(&b, &p).await?;
            eprintln!("  {}", runs["baseline"]);
        }
        eprintln!(
            "prompts: this build, {} tasks of {} words",
            p.tasks, p.words
        );
        runs["current"] = prompts::run(&spec, &p).await?;
        eprintln!("  {}", runs["current"]);
        results["prompts"] = runs;
    }
    if want("recovery") {
        eprintln!("recovery");
        results["recovery"] = scenarios::recovery(&spec).await?;
        eprintln!("  {}", results["recovery"]);
    }
    results["duration_s"] = json!(started.elapsed().as_secs_f64());
    results["load_average_at_end"] = json!(
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    std::fs::create_dir_all(&args.out)?;
    let stamp = results["at_ms"].as_u64().unwrap_or(0);
    if results.get("growth").is_some() {
        let png = args.out.join(format!("{stamp}-growth.png"));
        results["growth_plot"] = match plot::growth(&results["growth"], &png) {
            Ok(()) => json!(png.file_name().map(|f| f.to_string_lossy().to_string())),
            Err(e) => json!({"error": format!("{e:#}")}),
        };
    }
    if results.get("history1m").is_some() {
        let png = args.out.join(format!("{stamp}-history1m.png"));
        results["history1m_plot"] = match plot::history1m(&results["history1m"], &png) {
            Ok(()) => json!(png.file_name().map(|f| f.to_string_lossy().to_string())),
            Err(e) => json!({"error": format!("{e:#}")}),
        };
    }
    report::targets(&mut results);
    std::fs::write(
        args.out.join(format!("{stamp}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = report::markdown(&results);
    std::fs::write(args.out.join(format!("{stamp}.md")), &md)?;
    println!("{md}");
    Ok(())
}

/// One core pass of this build, with jsbench on the same servers right after.
async fn core_with_jsbench(
    args: &Args,
    spec: &Spec,
    with_jsbench: bool,
    load_of: Option<f64>,
) -> anyhow::Result<(Value, Option<Value>)> {
    let r = scenarios::core(spec, args.tasks, args.concurrency, load_of).await?;
    if !with_jsbench {
        return Ok((r, None));
    }
    // A fresh pair of servers with the same settings, so jsbench does not inherit a store
    // full of the scenario's messages.
    let cluster = cluster::Cluster::start(Spec {
        workers: 0,
        ..spec.clone()
    })
    .await?;
    let j = anchors::jsbench(
        &args.anchors,
        &cluster.nats_url,
        &cluster.redis_url,
        args.jsbench_jobs,
    )?;
    eprintln!(
        "  jsbench: {} / {} jobs/s",
        j["jetstream_jobs_per_s"], j["jetstream_redis_jobs_per_s"]
    );
    Ok((r, Some(j)))
}

fn compact(v: &Value) -> String {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("raw");
    }
    v.to_string()
}

/// The CI regression check: 2,000 one-agent tasks, 100 light-load latency samples and
/// jsbench (20,000 jobs) on servers with the same settings; fails only on a gross slowdown.
/// Without the anchors (another checkout layout) only the latency bound is checked.
async fn check(args: &Args, spec: &Spec, mut results: Value) -> anyhow::Result<()> {
    let cluster = cluster::Cluster::start(spec.clone()).await?;
    let t = scenarios::throughput(&cluster, 2000, &["builder"], args.concurrency).await?;
    let l = scenarios::latency_light(&cluster, 100).await?;
    drop(cluster);
    let ours = t["tasks_per_s"].as_f64().unwrap_or(0.0);
    let p99 = l["submit_to_start"]["p99_ms"].as_f64().unwrap_or(f64::NAN);
    results["throughput"] = t;
    results["latency_light"] = l;
    let floor = if args.anchors.join("jsbench").is_dir() {
        let servers = cluster::Cluster::start(Spec {
            workers: 0,
            ..spec.clone()
        })
        .await?;
        let j = anchors::jsbench(&args.anchors, &servers.nats_url, &servers.redis_url, 20_000)?;
        let floor = j["jetstream_redis_jobs_per_s"].as_f64();
        results["jsbench"] = j;
        floor
    } else {
        println!(
            "bench check: no anchors at {}; checking latency only",
            args.anchors.display()
        );
        None
    };
    let ratio = floor.map(|f| ours / f);
    results["ratio_vs_jetstream_redis"] = json!(ratio);
    let dir = PathBuf::from("target/bench-check");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("check.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!(
        "bench check ({}): {ours:.0} tasks/s{}; submit → agent start p99 {p99:.2} ms (fails above \
         {CHECK_MAX_P99_MS} ms)",
        spec.bin_dir.display(),
        match (ratio, floor) {
            (Some(r), Some(f)) => format!(
                " = {:.1}% of jsbench JetStream + Redis ({f:.0} jobs/s; fails below {:.0}%)",
                r * 100.0,
                CHECK_MIN_RATIO * 100.0
            ),
            _ => String::new(),
        }
    );
    if let Some(r) = ratio
        && (r.is_nan() || r < CHECK_MIN_RATIO)
    {
        bail!("gross slowdown: throughput is {r:.3} of jsbench's JetStream + Redis figure");
    }
    if p99.is_nan() || p99 > CHECK_MAX_P99_MS {
        bail!("gross slowdown: submit → agent start p99 is {p99:.1} ms");
    }
    Ok(())
}

/// The 1-minute load average (`/proc/loadavg`): how busy the machine was around a run.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
