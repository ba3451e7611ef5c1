//! The anchors of `../shared/bench/anchors`, run by the harness in the same session:
//! `jsbench` (the JetStream + Redis floor, built here and run on the cluster's own servers) and
//! Celery + Redis (its `run.sh`, with Celery installed into a venv under `target/` on first use).
//! An anchor that cannot run is reported with the reason instead of figures.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first number after `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> Option<f64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let token: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    token.parse().ok()
}

/// Builds `jsbench` (once; cargo keeps it) and runs it on the given servers with `n` jobs.
pub fn jsbench(anchors: &Path, nats_url: &str, redis_url: &str, n: usize) -> anyhow::Result<Value> {
    let src = anchors.join("jsbench");
    let work = PathBuf::from("target/bench-anchors/jsbench");
    std::fs::create_dir_all(work.join("src"))?;
    for f in ["Cargo.toml", "src/main.rs"] {
        let from = src.join(f);
        let to = work.join(f);
        let text =
            std::fs::read_to_string(&from).with_context(|| format!("read {}", from.display()))?;
        // Inside our target directory it would count as a member of our workspace: it is not.
        let text = if f == "Cargo.toml" && !text.contains("[workspace]") {
            format!("{text}\n[workspace]\n")
        } else {
            text
        };
        if std::fs::read_to_string(&to).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&to, text)?;
        }
    }
    let build = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(work.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", "target/bench-anchors/target")
        .status()?;
    if !build.success() {
        bail!("jsbench did not build");
    }
    let out = Command::new("target/bench-anchors/target/release/jsbench")
        .args([nats_url, redis_url, &n.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "jsbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let grab = |prefix: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| number_after(l, " = "))
    };
    let lat = text.lines().find(|l| l.contains("latency")).unwrap_or("");
    Ok(json!({
        "jobs": n,
        "jetstream_jobs_per_s": grab("jetstream:"),
        "jetstream_redis_jobs_per_s": grab("jetstream+redis:"),
        "latency_p50_ms": number_after(lat, "p50"),
        "latency_p99_ms": number_after(lat, "p99"),
        "raw": text,
    }))
}

/// Runs `cmd` in its own process group; kills the group after `timeout`. Returns stdout,
/// stderr and whether it succeeded.
fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<(String, String, bool)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            // The whole group: run.sh's Celery worker and Redis too.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        Some(s) => Ok((out, err, s.success())),
        None => Ok((out, format!("timed out after {timeout:?}\n{err}"), false)),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" / ")
}

/// Celery + Redis: `celery/run.sh n`. Celery is installed into `target/bench-anchors/celery-venv`
/// with pip when it is missing. Returns `{"error": why}` when it cannot run.
pub fn celery(anchors: &Path, n: usize) -> Value {
    match try_celery(anchors, n) {
        Ok(v) => v,
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

fn try_celery(anchors: &Path, n: usize) -> anyhow::Result<Value> {
    let script = anchors.join("celery/run.sh");
    if !script.is_file() {
        bail!("{} not found", script.display());
    }
    let python = which("python3").context("python3 is not installed")?;
    which("redis-server").context("redis-server is not installed")?;
    let venv = std::env::current_dir()?.join("target/bench-anchors/celery-venv");
    let venv_python = venv.join("bin/python");
    let has_celery = |py: &Path| {
        Command::new(py)
            .args(["-c", "import celery, redis"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_celery(&venv_python) {
        eprintln!(
            "  installing Celery into {} (pip, from PyPI)",
            venv.display()
        );
        let mut make = Command::new(&python);
        make.args(["-m", "venv"]).arg(&venv);
        let (_, err, ok) = run_bounded(make, Duration::from_secs(120))?;
        if !ok {
            bail!("python3 -m venv failed: {}", tail(&err, 3));
        }
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args(["install", "-q", "celery[redis]==5.*"]);
        let (_, err, ok) = run_bounded(pip, Duration::from_secs(600))?;
        if !ok || !has_celery(&venv_python) {
            bail!("pip install celery[redis] failed: {}", tail(&err, 3));
        }
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(n.to_string())
        .env("CELERY_VENV", &venv);
    let (out, err, ok) = run_bounded(cmd, Duration::from_secs(600))?;
    let rate_line = out.lines().find(|l| l.contains("jobs/s"));
    let lat_line = out.lines().find(|l| l.contains("latency"));
    let (Some(rate_line), true) = (rate_line, ok) else {
        bail!("run.sh failed: {} {}", tail(&out, 3), tail(&err, 5));
    };
    let version = Command::new(&venv_python)
        .args(["-c", "import celery; print(celery.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(json!({
        "jobs": n,
        "celery_version": version,
        "jobs_per_s": number_after(rate_line, "s = "),
        "latency_p50_ms": lat_line.and_then(|l| number_after(l, "p50")),
        "latency_p99_ms": lat_line.and_then(|l| number_after(l, "p99")),
        "raw": out,
    }))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
