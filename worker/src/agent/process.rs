//! Agent processes (the Claude Code CLI, `command` programs, git) are started through
//! [`command`], which on Linux runs them under the worker's [`super::supervisor`] so they die
//! with the worker whatever kills it. Agents also run in a process group of their own, and are
//! stopped as a whole: the group and every descendant found under `/proc` (a tool may start its
//! own group or session), SIGTERM first, SIGKILL after a grace period. A finished agent's
//! leftovers (a dev server a tool started in the background) are killed the same way. Signals
//! go through `nix` (no `unsafe`).

use super::supervisor;
use nix::sys::signal::{Signal, kill as send, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};

/// How long an agent process gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_millis(1500);

/// How [`command`] supervises: the worker executable and where supervisors record themselves.
#[derive(Debug)]
struct Supervision {
    exe: PathBuf,
    records: PathBuf,
}

static SUPERVISION: OnceLock<Supervision> = OnceLock::new();

/// Turns supervision on for this process: from now on [`command`] starts programs under `exe`
/// (the worker binary, which must call [`supervisor::hidden_mode`] first thing in `main`), and
/// supervisors record themselves in `records`. Only on Linux; the first call wins. Without it
/// (unit tests, whose executable is not the worker) programs start directly.
pub fn supervise_with(exe: PathBuf, records: PathBuf) {
    if cfg!(target_os = "linux") {
        let _ = SUPERVISION.set(Supervision { exe, records });
    }
}

/// A command for `program` that dies with the worker when supervision is on (see
/// [`supervise_with`]); arguments added afterwards go to `program`. A program that cannot be
/// found on `PATH` starts directly, so spawning it fails with the usual error.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let program = program.as_ref();
    if let Some(s) = SUPERVISION.get()
        && let Some(path) = resolve(program)
    {
        let mut cmd = Command::new(&s.exe);
        cmd.arg(supervisor::SUPERVISE)
            .arg(std::process::id().to_string())
            .arg(&s.records)
            .arg(path);
        return cmd;
    }
    Command::new(program)
}

/// `program` as the supervisor must exec it (a path as given, a bare name looked up on `PATH`),
/// if it is an executable file.
pub(crate) fn resolve(program: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = Path::new(program);
    if path.components().count() > 1 {
        return executable(path).then(|| path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// Makes `cmd` start a new process group (its pid is the group id) and die with its handle.
pub fn isolate(cmd: &mut Command) {
    cmd.process_group(0).kill_on_drop(true);
}

/// The fields of `/proc/<pid>/stat` after the command name (the state is the first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid, it
/// names one process for good (a pid is reused, a pid and a start time are not).
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` runs and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// The pids of `root`'s process group and of all its descendants, `root` included.
pub fn tree(root: u32) -> BTreeSet<u32> {
    let mut parent_of: HashMap<u32, u32> = HashMap::new();
    let mut out = BTreeSet::from([root]);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(ppid), Some(pgrp)) = (
            fields.get(1).and_then(|s| s.parse::<u32>().ok()),
            fields.get(2).and_then(|s| s.parse::<u32>().ok()),
        ) else {
            continue;
        };
        parent_of.insert(pid, ppid);
        if pgrp == root {
            out.insert(pid);
        }
    }
    // Descendants: walk up from every process until the root or init is reached.
    for &pid in parent_of.keys() {
        let mut at = pid;
        let mut hops = 0;
        while let Some(&up) = parent_of.get(&at) {
            if up == root {
                out.insert(pid);
                break;
            }
            if up <= 1 || hops > 64 {
                break;
            }
            at = up;
            hops += 1;
        }
    }
    out
}

/// A positive pid other than init's as `nix` wants it: signalling 0, 1 or a value read as
/// negative would reach a group or every process.
fn checked(pid: u32) -> Option<Pid> {
    let pid = i32::try_from(pid).ok()?;
    (pid > 1).then(|| Pid::from_raw(pid))
}

/// Sends `sig` to `pid`; false if there is no such process.
fn signal(pid: u32, sig: Signal) -> bool {
    checked(pid).is_some_and(|p| send(p, sig).is_ok())
}

/// Sends `sig` to the process group `pgid` (which our agent processes lead).
fn signal_group(pgid: u32, sig: Signal) {
    if let Some(p) = checked(pgid) {
        let _ = killpg(p, sig);
    }
}

/// SIGKILLs `pid`.
pub fn kill(pid: u32) {
    signal(pid, Signal::SIGKILL);
}

/// Kills what a previous worker on the same data directory left running: each file in
/// `records` names a supervisor (the file name is its pid, the content its start time). A
/// supervisor that still runs, with that start time, is killed with its group and
/// descendants; when it is gone its pid cannot have been reused while its process group still
/// has members, so those are killed; a pid now used by another process is left alone. Every
/// record is removed. Returns how many processes were killed.
pub fn kill_recorded(records: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(records) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let pid = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok());
        let recorded = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let (Some(pid), Some(recorded)) = (pid, recorded) {
            let victims: BTreeSet<u32> = match start_time(pid) {
                Some(now) if now == recorded => tree(pid),
                // Reused: another process's pid and maybe its group.
                Some(_) => BTreeSet::new(),
                None => group_members(pid),
            };
            for p in victims {
                if is_alive(p) && signal(p, Signal::SIGKILL) {
                    tracing::info!(
                        pid = p,
                        supervisor = pid,
                        "killed a process a previous worker left running"
                    );
                    killed += 1;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

/// The processes in process group `pgid`.
fn group_members(pgid: u32) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid).is_some_and(|f| f.get(2).and_then(|g| g.parse().ok()) == Some(pgid))
        })
        .collect()
}

/// Stops `child` and everything it started: SIGTERM to its group and descendants, SIGKILL to
/// what is left after `grace`, then reaps it.
pub async fn terminate(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else {
        // Already reaped: only its group may be left.
        return;
    };
    // Collect the tree before signalling: once the root dies its children are reparented.
    let pids = tree(pid);
    signal_group(pid, Signal::SIGTERM);
    for &p in &pids {
        signal(p, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::debug!(pid, "agent process ignored SIGTERM; killing it");
    }
    let mut pids = pids;
    pids.extend(tree(pid));
    signal_group(pid, Signal::SIGKILL);
    for &p in &pids {
        signal(p, Signal::SIGKILL);
    }
    let _ = child.wait().await;
}

/// Kills what is left of a finished agent's process group (background tools it started).
pub fn kill_leftovers(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// Kills an agent's whole process tree when dropped while armed: the runner drops an agent's
/// future without awaiting it on a job timeout, a drain deadline or a lost lease, and then
/// only this cleanup runs. Declare it after the `Child` so it drops first, while the leader is
/// not yet reaped and its pid cannot have been reused.
pub struct TreeGuard {
    pgid: Option<u32>,
}

impl TreeGuard {
    pub fn new(pgid: Option<u32>) -> Self {
        Self { pgid }
    }

    /// The run cleaned up after itself: nothing left to do on drop.
    pub fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            tracing::debug!(pgid, "agent dropped mid-run; killing its processes");
            let pids = tree(pgid);
            signal_group(pgid, Signal::SIGKILL);
            for p in pids {
                signal(p, Signal::SIGKILL);
            }
        }
    }
}

/// Reads `stderr` to the end in the background, keeping its last `max` bytes.
pub fn tail(mut stderr: ChildStderr, max: usize) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * max {
                        kept.drain(..kept.len() - max);
                    }
                }
            }
        }
        if kept.len() > max {
            kept.drain(..kept.len() - max);
        }
        String::from_utf8_lossy(&kept).trim().to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test]
    async fn terminate_stops_the_whole_tree_including_a_new_session() {
        let mut cmd = Command::new("sh");
        // A child in the group, and one in a new session (setsid) that has left the group:
        // both must go. (A double-forked daemon reparented to init is out of reach: only a
        // cgroup would hold it.)
        cmd.args(["-c", "sleep 30 & setsid sleep 31 & echo started; wait"])
            .stdout(Stdio::piped());
        isolate(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = [0u8; 8];
        let _ = out.read(&mut line).await.unwrap();
        // Give setsid a moment to start its sleep.
        let mut found = BTreeSet::new();
        for _ in 0..50 {
            found = tree(pid);
            if found.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(found.len() >= 3, "{found:?}");
        let started = std::time::Instant::now();
        terminate(&mut child, Duration::from_millis(500)).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(100)).await;
        for p in found {
            let alive = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            assert!(!alive, "process {p} survived");
        }
    }

    #[tokio::test]
    async fn a_dropped_guard_kills_the_tree() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo started; wait"])
            .stdout(Stdio::piped());
        isolate(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let guard = TreeGuard::new(child.id());
        let mut out = child.stdout.take().unwrap();
        let _ = out.read(&mut [0u8; 8]).await.unwrap();
        let pids = tree(child.id().unwrap());
        assert!(pids.len() >= 2, "{pids:?}");
        drop(guard);
        let _ = tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for p in pids {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty() || stat.contains(") Z "),
                "process {p} survived"
            );
        }
    }
}
