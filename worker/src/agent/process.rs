//! Agent processes (the Claude Code CLI, `command` programs) run in a process group of their
//! own, and are stopped as a whole: the group and every descendant found under `/proc` (a tool
//! may start its own group or session), SIGTERM first, SIGKILL after a grace period. A finished
//! agent's leftovers (a dev server a tool started in the background) are killed the same way.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};

/// How long an agent process gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_millis(1500);

/// Makes `cmd` start a new process group (its pid is the group id) and die with its handle.
pub fn isolate(cmd: &mut Command) {
    cmd.process_group(0).kill_on_drop(true);
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

/// Sends `sig` to `pid`; false if there is no such process. Never signals pid 0 or 1 (or a
/// value that would be read as a group).
#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is positive.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Sends `sig` to the process group `pgid` (which our agent processes lead).
#[allow(unsafe_code)]
fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names a group.
    unsafe {
        libc::kill(-pgid, sig);
    }
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
    signal_group(pid, libc::SIGTERM);
    for &p in &pids {
        signal(p, libc::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::debug!(pid, "agent process ignored SIGTERM; killing it");
    }
    let mut pids = pids;
    pids.extend(tree(pid));
    signal_group(pid, libc::SIGKILL);
    for &p in &pids {
        signal(p, libc::SIGKILL);
    }
    let _ = child.wait().await;
}

/// Kills what is left of a finished agent's process group (background tools it started).
pub fn kill_leftovers(pgid: u32) {
    signal_group(pgid, libc::SIGKILL);
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
            signal_group(pgid, libc::SIGKILL);
            for p in pids {
                signal(p, libc::SIGKILL);
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
