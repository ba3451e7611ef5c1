//! Checkpoints on a repository of 10,000 files: one native agent (the `anthropic` backend's
//! tool loop against a fake Messages API answering after a model-like delay) whose every step
//! changes a tracked file and adds an untracked one, in a clone of a bare repository on a local
//! path. Passes in the same run, a fresh cluster each: checkpoints off; the baseline build
//! (`--baseline-bin-dir`, checkpoints as it makes them) when given; checkpoints pushed
//! (`--checkpoint-direct false`, the way a network remote gets them); checkpoints written
//! straight into the local repository, each adding the whole tree (`--checkpoint-full-every
//! 1`); and the default (straight in, only the files the steps wrote brought into the index,
//! the whole tree every tenth). Reports each checkpoint's latency (from
//! the step's last `tool_result` event to its `checkpointed` event, seen the same way for
//! every build; off the agent's path), the worker's own `took_ms` where the build reports it,
//! the agent's step time (between its tool calls, the fake's delay included) and the storage
//! the checkpoints took in the repository.

use crate::cluster::{Cluster, Spec};
use crate::scenarios::pct;
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use orch_shared::event::{Event, EventKind};
use orch_tests::TOKEN;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Params {
    /// Files in the repository (in directories of 100).
    pub files: usize,
    /// Steps of the agent.
    pub steps: usize,
    /// How long the fake API takes to answer each request.
    pub delay: Duration,
}

pub async fn run(spec: &Spec, baseline: Option<&Spec>, p: &Params) -> anyhow::Result<Value> {
    // (name, build, worker flags)
    let mut passes_to_run: Vec<(&str, &Spec, &[&str])> =
        vec![("off", spec, &["--checkpoints", "false"])];
    if let Some(b) = baseline {
        passes_to_run.push(("before", b, &[]));
    }
    passes_to_run.push(("push", spec, &["--checkpoint-direct", "false"]));
    passes_to_run.push(("whole_tree", spec, &["--checkpoint-full-every", "1"]));
    passes_to_run.push(("direct", spec, &[]));
    let tmp = tempfile::tempdir()?;
    let bare = make_repo(tmp.path(), p.files)?;
    let mut script = Vec::new();
    // Each pass writes its own contents: objects an earlier pass left in the repository
    // would make a later pass's checkpoints cheaper and smaller.
    for (pass, ..) in &passes_to_run {
        for k in 0..p.steps {
            let tracked = format!("d{}/f{}.txt", k % 100, k / 100);
            let untracked = format!("new/{k}.txt");
            script.push(
                Reply::tool_uses([
                    (
                        "write_file",
                        json!({"path": tracked, "content": format!("{pass} step {k}\n")}),
                    ),
                    (
                        "write_file",
                        json!({"path": untracked, "content": format!("{pass} new {k}\n")}),
                    ),
                ])
                .after(p.delay),
            );
        }
        script.push(Reply::text("## Summary\nDone.").after(p.delay));
    }
    let fake = FakeAnthropic::start(script).await;
    let mut passes = json!({});
    for (name, spec, flags) in passes_to_run {
        eprintln!("  checkpoints pass `{name}`");
        let mut worker_args = fake.worker_args("anthropic");
        worker_args.extend(flags.iter().map(|f| f.to_string()));
        let cluster = Cluster::start(Spec {
            workers: 1,
            slots: 1,
            worker_args,
            ..spec.clone()
        })
        .await?;
        let objects_before = du(&bare.join("objects"));
        let r = one_pass(&cluster, &bare, p).await?;
        let objects_after = du(&bare.join("objects"));
        let checkpoints = r["checkpoints"].as_u64().unwrap_or(0);
        passes[name] = json!({
            "storage_bytes": objects_after.saturating_sub(objects_before),
            "storage_bytes_per_checkpoint":
                objects_after.saturating_sub(objects_before).checked_div(checkpoints),
        });
        for (k, v) in r.as_object().into_iter().flatten() {
            passes[name][k] = v.clone();
        }
        eprintln!("    {}", passes[name]);
    }
    Ok(json!({
        "files": p.files,
        "steps": p.steps,
        "api_delay_ms": p.delay.as_millis() as u64,
        "passes": passes,
    }))
}

/// One agent on `cluster` in a clone of `bare`: its checkpoints and step times.
async fn one_pass(cluster: &Cluster, bare: &Path, p: &Params) -> anyhow::Result<Value> {
    let watch = Watch::start(
        &cluster.nats_url,
        &["tool_call", "tool_result", "checkpointed", "task_finished"],
        Keep::Payloads,
    )
    .await?;
    let r = cluster
        .client()
        .post(format!("{}/v1/tasks", cluster.url))
        .bearer_auth(TOKEN)
        .json(&json!({
            "prompt": "change the files",
            "roles": ["builder"],
            "repo": bare.display().to_string(),
            "ref": "main",
        }))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("submit refused: {status} {v}");
    }
    let id = v["id"].as_str().context("task id")?.to_string();
    let deadline = Instant::now() + p.delay * (p.steps as u32 + 1) * 4 + Duration::from_secs(300);
    while watch.count("task_finished") < 1 {
        if Instant::now() > deadline {
            bail!("the task did not finish\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task = cluster.get(&format!("/v1/tasks/{id}")).await?;
    if task["status"] != "completed" {
        bail!("the task ended {}: {}", task["status"], task["error"]);
    }
    let (mut took, mut calls, mut latency) = (Vec::new(), Vec::new(), Vec::new());
    let mut events = watch.take_payloads();
    events.sort_by_key(|(_, at, _)| *at);
    let mut last_result: Option<Instant> = None;
    for (_, at, payload) in events {
        let event: Event = orch_shared::codec::decode(&payload).context("an event")?;
        match event.kind {
            EventKind::Checkpointed { took_ms, .. } => {
                if took_ms > 0 {
                    took.push(took_ms as f64);
                }
                if let Some(r) = last_result {
                    latency.push((at - r).as_secs_f64() * 1000.0);
                }
            }
            EventKind::ToolResult { .. } => last_result = Some(at),
            // The first of a step's two calls.
            EventKind::ToolCall { name, input, .. }
                if name == "write_file"
                    && serde_json::from_str::<Value>(&input)
                        .is_ok_and(|v| v["path"].as_str().is_some_and(|p| p.starts_with('d'))) =>
            {
                calls.push(at)
            }
            _ => {}
        }
    }
    let mut steps: Vec<f64> = calls
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect();
    steps.sort_by(f64::total_cmp);
    took.sort_by(f64::total_cmp);
    latency.sort_by(f64::total_cmp);
    let or_null = |v: &[f64], p: f64| {
        if v.is_empty() {
            Value::Null
        } else {
            json!(pct(v, p))
        }
    };
    Ok(json!({
        "checkpoints": latency.len(),
        "latency_ms_p50": or_null(&latency, 0.5),
        "latency_ms_p99": or_null(&latency, 0.99),
        "latency_ms_max": latency.last(),
        "took_ms_p50": or_null(&took, 0.5),
        "took_ms_p99": or_null(&took, 0.99),
        "took_ms_max": took.last(),
        "step_ms_p50": or_null(&steps, 0.5),
        "step_ms_p99": or_null(&steps, 0.99),
        "steps_measured": steps.len(),
    }))
}

/// A repository of `files` files in directories of 100, committed on `main`, and its bare
/// clone (returned).
fn make_repo(root: &Path, files: usize) -> anyhow::Result<std::path::PathBuf> {
    let src = root.join("src");
    for i in 0..files {
        let dir = src.join(format!("d{}", i % 100));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join(format!("f{}.txt", i / 100)),
            format!("file {i}\n{}\n", "x".repeat(200)),
        )?;
    }
    let git = |dir: &Path, args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("git")
            .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
            .args(args)
            .current_dir(dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    git(&src, &["init", "-q", "-b", "main"])?;
    git(&src, &["add", "-A"])?;
    git(&src, &["commit", "-qm", "10,000 files"])?;
    git(root, &["clone", "-q", "--bare", "src", "bare.git"])?;
    Ok(root.join("bare.git"))
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
