//! `bigrepo`: how long a job on a large repository waits before its agent starts, and the
//! disk it takes, against the floor (`git worktree add` of the same commit from a local
//! mirror) timed in the same run.
//!
//! The repository is generated: `--bigrepo-files` small text files in directories of 100,
//! one directory of larger incompressible files (100 kB each, one per 200 files), and
//! `--bigrepo-commits` later commits each changing 1 % of the files, written with
//! `git fast-import`. The cluster has one worker with `--bigrepo-concurrent` slots; jobs are
//! one-agent tasks on the `command` backend (a shell that exits at once, or holds its
//! workspace while the concurrent jobs are measured) with the repository as their `repo`: the
//! `sim` backend prepares no workspace. A job's wait is the time between its `job_started`
//! event (the worker took the delivery) and its agent's first event (`thinking`, sent once the
//! program started): the workspace preparation and the agent's start in its sandbox, which a
//! job without a repository measures alone in the same cluster. Measured: the first job on the
//! worker (its clone cache cold), then jobs one at a time (warm), then the concurrent jobs at
//! once; disk per job is the worker's data directory, less its clone cache, over the jobs
//! holding their workspaces.

use crate::cluster::{Cluster, Spec};
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Params {
    pub files: usize,
    pub commits: usize,
    pub warm_jobs: usize,
    pub concurrent: usize,
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(dir);
    c
}

/// A cheap deterministic byte stream (xorshift).
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `n` bytes of text-like lines.
    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = [
            "fn ", "let ", "value", " = ", "self.", "return ", "match ", "(x);\n",
        ];
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(WORDS[(self.next() % 8) as usize].as_bytes());
        }
        out
    }

    fn binary(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}

/// Generates the repository as a bare `origin.git` under `dir`; its size on disk in bytes.
fn generate(dir: &Path, p: &Params) -> anyhow::Result<u64> {
    let origin = dir.join("origin.git");
    run(Command::new("git")
        .args(["init", "-q", "--bare", "-b", "main"])
        .arg(&origin))?;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(&origin)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut w = std::io::BufWriter::new(child.stdin.take().context("stdin")?);
    let mut rng = Bytes(0x9E37_79B9_7F4A_7C15);
    let binaries = (p.files / 200).max(1);
    let mut mark = 0u64;
    let mut blob = |w: &mut dyn Write, data: &[u8]| -> anyhow::Result<u64> {
        mark += 1;
        write!(w, "blob\nmark :{mark}\ndata {}\n", data.len())?;
        w.write_all(data)?;
        writeln!(w)?;
        Ok(mark)
    };
    let path = |i: usize| format!("src/d{:04}/f{i:06}.rs", i / 100);
    let mut first = vec![];
    for i in 0..p.files {
        let len = 200 + (rng.next() % 1800) as usize;
        first.push((path(i), blob(&mut w, &rng.text(len))?));
    }
    for i in 0..binaries {
        first.push((
            format!("assets/blob{i:04}.bin"),
            blob(&mut w, &rng.binary(100_000))?,
        ));
    }
    // Each commit after the first continues the branch (fast-import's own tip of it).
    let commit = |w: &mut dyn Write, n: usize, files: &[(String, u64)]| -> anyhow::Result<()> {
        let at = 1_700_000_000 + n as u64 * 3600;
        write!(
            w,
            "commit refs/heads/main\ncommitter bench <bench@localhost> {at} +0000\ndata 10\ncommit {n:03}\n"
        )?;
        for (path, m) in files {
            writeln!(w, "M 100644 :{m} {path}")?;
        }
        writeln!(w)?;
        Ok(())
    };
    commit(&mut w, 0, &first)?;
    for n in 1..=p.commits {
        let mut changed = vec![];
        for _ in 0..(p.files / 100).max(1) {
            let i = (rng.next() % p.files as u64) as usize;
            let len = 200 + (rng.next() % 1800) as usize;
            changed.push((path(i), blob(&mut w, &rng.text(len))?));
        }
        commit(&mut w, n, &changed)?;
    }
    drop(w);
    if !child.wait()?.success() {
        bail!("git fast-import failed");
    }
    run(git(&origin).args(["repack", "-adq"]))?;
    du_bytes(&origin)
}

/// Disk used under `path` (blocks, as `du` counts them), in bytes.
fn du_bytes(path: &Path) -> anyhow::Result<u64> {
    let out = run(Command::new("du").arg("-sk").arg(path))?;
    let kb: u64 = out
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("du output")?;
    Ok(kb * 1024)
}

/// The floor: a local mirror, then `git worktree add` of `main` from it (first, then the
/// median of `runs`), and the disk one worktree takes.
fn floor(dir: &Path, runs: usize) -> anyhow::Result<Value> {
    let mirror = dir.join("mirror.git");
    let t0 = Instant::now();
    run(Command::new("git")
        .args(["clone", "-q", "--mirror"])
        .arg(dir.join("origin.git"))
        .arg(&mirror))?;
    let mirror_s = t0.elapsed().as_secs_f64() * 1000.0;
    let mut ms = vec![];
    let mut disk = 0;
    let (mut clone_ms, mut sparse_ms, mut sparse_disk) = (vec![], vec![], 0);
    for i in 0..runs.max(1) {
        // What a job's git does, without the cluster: a clone sharing the mirror's objects,
        // then the checkout.
        let c = dir.join(format!("floor-clone-{i}"));
        let t0 = Instant::now();
        run(Command::new("git")
            .args(["clone", "-q", "--no-checkout", "--shared"])
            .arg(&mirror)
            .arg(&c))?;
        run(git(&c).args(["checkout", "-q", "--detach", "main"]))?;
        clone_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_dir_all(&c)?;
        // Below the floor: a worktree holding one directory of the tree (cone mode).
        let wt = dir.join(format!("floor-sparse-{i}"));
        let t0 = Instant::now();
        run(git(&mirror)
            .args(["worktree", "add", "-q", "--no-checkout", "--detach"])
            .arg(&wt)
            .arg("main"))?;
        run(git(&wt).args(["sparse-checkout", "set", "--cone", SPARSE_DIR]))?;
        run(git(&wt).args(["checkout", "-q", "--detach", "main"]))?;
        sparse_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        sparse_disk = du_bytes(&wt)?;
        run(git(&mirror)
            .args(["worktree", "remove", "--force"])
            .arg(&wt))?;
        let wt = dir.join(format!("floor-{i}"));
        let t0 = Instant::now();
        run(git(&mirror)
            .args(["worktree", "add", "-q", "--detach"])
            .arg(&wt)
            .arg("main"))?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        disk = du_bytes(&wt)? + du_bytes(&mirror.join("worktrees"))?;
        run(git(&mirror)
            .args(["worktree", "remove", "--force"])
            .arg(&wt))?;
    }
    let first = ms[0];
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "mirror_clone_ms": mirror_s,
        "worktree_add_first_ms": first,
        "worktree_add_ms": ms[ms.len() / 2],
        "worktree_disk_bytes": disk,
        "shared_clone_checkout_ms": median(&clone_ms),
        "sparse_worktree_add_ms": median(&sparse_ms),
        "sparse_worktree_disk_bytes": sparse_disk,
    }))
}

/// The agent: when its prompt says `HOLD`, holds its workspace until the bench writes
/// [`RELEASE`] into its clone's `.git` (inside the sandbox the agent sees its workspace only).
const AGENT: &str = "case \"$1\" in *HOLD*) while [ ! -e .git/bench-release ]; do sleep 0.1; done;; esac; echo looked";
const RELEASE: &str = ".git/bench-release";
/// The one directory a sparse job declares (`paths: ["src/d0000/**"]`): 100 of the files.
const SPARSE_DIR: &str = "src/d0000";

/// Submits a one-agent task on `repo` (none: a scratch workspace); `hold` keeps its agent
/// running until released; `sparse`: its one step declares [`SPARSE_DIR`] as its scope and
/// the task asks for a sparse checkout.
async fn submit(
    cluster: &Cluster,
    repo: Option<&str>,
    hold: bool,
    sparse: bool,
) -> anyhow::Result<String> {
    let prompt = if hold {
        "look around the repository, HOLD"
    } else {
        "look around the repository"
    };
    let mut body = json!({
        "prompt": prompt,
        "roles": ["builder"],
        "backend": "command",
    });
    if let Some(repo) = repo {
        body["repo"] = json!(repo);
    }
    if sparse {
        body["sparse_checkout"] = json!(true);
        body["plan"] = json!({"steps": [
            {"role": "builder", "scope": prompt, "paths": [format!("{SPARSE_DIR}/**")]}
        ]});
        if let Some(o) = body.as_object_mut() {
            o.remove("roles");
        }
    }
    let r = cluster
        .client()
        .post(format!("{}/v1/tasks", cluster.url))
        .bearer_auth(orch_tests::TOKEN)
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("submit refused: {status} {v}");
    }
    v["id"].as_str().map(str::to_string).context("task id")
}

const KINDS: [&str; 4] = ["job_started", "thinking", "job_failed", "task_finished"];

/// The tasks' workspace waits: `job_started` → the agent's first event (`thinking`), in ms,
/// as their events arrived.
async fn waits(cluster: &Cluster, watch: &Watch, tasks: &[String]) -> anyhow::Result<Vec<f64>> {
    let timeout = Duration::from_secs(1800);
    let mut out = vec![];
    for t in tasks {
        let started = tokio::select! {
            a = watch.wait(t, "thinking", timeout) => a,
            _ = watch.wait(t, "job_failed", timeout) => None,
        };
        let (Some(s), Some(a)) = (watch.wait(t, "job_started", timeout).await, started) else {
            let task = cluster
                .get(&format!("/v1/tasks/{t}"))
                .await
                .unwrap_or_default();
            bail!("the agent of {t} did not start: {task}\n{}", cluster.logs());
        };
        out.push(a.saturating_duration_since(s).as_secs_f64() * 1000.0);
    }
    Ok(out)
}

async fn wait_finished(cluster: &Cluster, watch: &Watch, tasks: &[String]) -> anyhow::Result<()> {
    for t in tasks {
        if watch
            .wait(t, "task_finished", Duration::from_secs(1800))
            .await
            .is_none()
        {
            bail!("{t} did not finish\n{}", cluster.logs());
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One build's jobs on the repository at `repo` (the floor is the caller's).
async fn jobs(spec: &Spec, dir: &Path, repo: &str, p: &Params) -> anyhow::Result<Value> {
    let data = dir.join(format!("data-{}", orch_shared::now_ms()));
    let config = dir.join(format!("worker-{}.toml", orch_shared::now_ms()));
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", {AGENT:?}, \"agent\"]\n\
             prompt = \"arg\"\n"
        ),
    )?;
    let spec = Spec {
        workers: 1,
        slots: p.concurrent as u32,
        worker_args: vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ],
        ..spec.clone()
    };
    let cluster = Cluster::start(spec).await?;
    let watch = Watch::start(&cluster.nats_url, &KINDS, Keep::Times).await?;
    // The agent's own start, without a repository.
    let mut scratch = vec![];
    for _ in 0..3 {
        let t = submit(&cluster, None, false, false).await?;
        scratch.extend(waits(&cluster, &watch, std::slice::from_ref(&t)).await?);
        wait_finished(&cluster, &watch, &[t]).await?;
    }
    let cold = submit(&cluster, Some(repo), false, false).await?;
    let cold_ms = waits(&cluster, &watch, std::slice::from_ref(&cold)).await?[0];
    wait_finished(&cluster, &watch, &[cold]).await?;
    let full = warm_and_concurrent(&cluster, &watch, &data, repo, p, false).await?;
    let sparse = warm_and_concurrent(&cluster, &watch, &data, repo, p, true).await?;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&data);
    let mut one = json!({
        "scratch_ms": median(&scratch),
        "cold_ms": cold_ms,
        "sparse": sparse,
    });
    if let (Some(o), Value::Object(f)) = (one.as_object_mut(), full) {
        o.extend(f);
    }
    eprintln!("  {one}");
    Ok(one)
}

/// Jobs one at a time on the warm cache, then `p.concurrent` at once, each holding its
/// workspace until all are measured; `sparse`: jobs scoped to [`SPARSE_DIR`] with a sparse
/// checkout. Disk per job: the data directory less the clone cache, over the held jobs.
async fn warm_and_concurrent(
    cluster: &Cluster,
    watch: &Watch,
    data: &Path,
    repo: &str,
    p: &Params,
    sparse: bool,
) -> anyhow::Result<Value> {
    let mut warm = vec![];
    for _ in 0..p.warm_jobs {
        let t = submit(cluster, Some(repo), false, sparse).await?;
        warm.extend(waits(cluster, watch, std::slice::from_ref(&t)).await?);
        wait_finished(cluster, watch, &[t]).await?;
    }
    let tasks: Vec<String> = futures::future::try_join_all(
        (0..p.concurrent).map(|_| submit(cluster, Some(repo), true, sparse)),
    )
    .await?;
    let concurrent = waits(cluster, watch, &tasks).await?;
    let cache = data.join("git-cache");
    let all = du_bytes(data)?;
    let cache_bytes = du_bytes(&cache).unwrap_or(0);
    let per_job = all.saturating_sub(cache_bytes) / p.concurrent.max(1) as u64;
    for ws in std::fs::read_dir(data.join("scratch"))? {
        let _ = std::fs::write(ws?.path().join(RELEASE), "");
    }
    wait_finished(cluster, watch, &tasks).await?;
    Ok(json!({
        "warm_ms": median(&warm),
        "warm_runs_ms": warm,
        "concurrent_median_ms": median(&concurrent),
        "concurrent_max_ms": concurrent.iter().copied().fold(0.0, f64::max),
        "concurrent_ms": concurrent,
        "disk_per_job_bytes": per_job,
        "clone_cache_bytes": cache_bytes,
    }))
}

/// Runs the scenario: the repository, its floor, then each build's jobs.
pub async fn run_all(builds: &[(&str, Spec)], p: &Params) -> anyhow::Result<Value> {
    let dir = tempfile::Builder::new().prefix("orch-bigrepo-").tempdir()?;
    let t0 = Instant::now();
    let size = generate(dir.path(), p)?;
    eprintln!(
        "  generated {} files, {} commits, {} MB packed in {:.1} s",
        p.files,
        p.commits + 1,
        size / 1_000_000,
        t0.elapsed().as_secs_f64()
    );
    let floor = floor(dir.path(), 3)?;
    eprintln!("  floor: {floor}");
    let repo = format!("file://{}", dir.path().join("origin.git").display());
    let mut out = json!({
        "files": p.files,
        "commits": p.commits + 1,
        "packed_bytes": size,
        "concurrent": p.concurrent,
        "floor": floor,
    });
    for (name, spec) in builds {
        eprintln!("bigrepo: {name}");
        let r = jobs(spec, dir.path(), &repo, p).await?;
        let f = out["floor"]["worktree_add_ms"].as_f64().unwrap_or(1.0);
        let disk = out["floor"]["worktree_disk_bytes"].as_f64().unwrap_or(1.0);
        let warm = r["warm_ms"].as_f64().unwrap_or(0.0);
        out[*name] = json!({
            "jobs": r,
            "warm_over_floor": warm / f,
            "concurrent_median_over_warm": r["concurrent_median_ms"].as_f64().unwrap_or(0.0) / warm.max(1.0),
            "disk_per_job_over_floor_worktree": r["disk_per_job_bytes"].as_f64().unwrap_or(0.0) / disk,
            "sparse_warm_over_floor": r["sparse"]["warm_ms"].as_f64().unwrap_or(0.0) / f,
            "sparse_concurrent_median_over_warm": r["sparse"]["concurrent_median_ms"].as_f64().unwrap_or(0.0)
                / r["sparse"]["warm_ms"].as_f64().unwrap_or(0.0).max(1.0),
        });
    }
    Ok(out)
}
