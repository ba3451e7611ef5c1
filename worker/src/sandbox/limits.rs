//! Per-job resource limits through cgroups: a child cgroup of the worker's own per job, with
//! a memory and a process limit (and a CPU limit when one is set and the `cpu` controller is
//! there), that the sandbox joins before bubblewrap starts
//! ([`super::bridge::ENTER`]).
//!
//! Where it holds: cgroup v2 when the worker's cgroup can delegate the `memory` and `pids`
//! controllers to children (a systemd unit with `Delegate=yes`, a container whose cgroup
//! namespace is its own and writable); the worker then moves itself into a leaf child first,
//! as v2 allows no process in a cgroup that hands controllers down. Else cgroup v1 when the
//! worker may create directories under its `memory` and `pids` hierarchies (a hybrid host run as
//! root). Else no limit, said once at start. A job the kernel killed for its memory is found in
//! `memory.events` (v2) or `memory.oom_control` (v1) as `oom_kill`.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where job cgroups are created.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// The worker's cgroup v2 directory (controllers enabled for its children).
    V2(PathBuf),
    /// The worker's cgroup v1 `memory` and `pids` directories, and its `cpu` one when the
    /// worker may create children there.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
}

impl fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hierarchy::V2(d) => write!(f, "v2 at {}", d.display()),
            Hierarchy::V1 { memory, pids, cpu } => {
                write!(f, "v1 at {} and {}", memory.display(), pids.display())?;
                match cpu {
                    Some(c) => write!(f, " (cpu: {})", c.display()),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Hierarchy {
    /// The hierarchy this worker may create job cgroups in, if any.
    pub fn detect() -> Option<Hierarchy> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        v2(&own).or_else(|| v1(&own))
    }

    /// Removes the job cgroups a killed worker left behind: empty `orch-*` cgroups older than
    /// a minute (a live job's has processes, and a new one is joined at once). Returns how many.
    pub fn sweep(&self) -> usize {
        let bases: Vec<&PathBuf> = match self {
            Hierarchy::V2(d) => vec![d],
            Hierarchy::V1 { memory, pids, cpu } => {
                let mut b = vec![memory, pids];
                b.extend(cpu);
                b
            }
        };
        let mut removed = 0;
        for base in bases {
            for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
                let stale = entry.file_name().to_string_lossy().starts_with("orch-")
                    && entry.file_name() != "orch-worker"
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() > 60));
                let empty = std::fs::read_to_string(entry.path().join("cgroup.procs"))
                    .is_ok_and(|p| p.trim().is_empty());
                if stale && empty && std::fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// A cgroup named `orch-<name>` with these limits (`cpus`: CPU time per wall-clock time,
    /// 1.5 = one and a half cores; not set where the `cpu` controller is missing).
    pub fn create(
        &self,
        name: &str,
        memory: Option<u64>,
        pids: Option<u64>,
        cpus: Option<f64>,
    ) -> io::Result<Cgroup> {
        let name = format!("orch-{name}");
        match self {
            Hierarchy::V2(base) => {
                let dir = base.join(&name);
                make(&dir)?;
                if let Some(m) = memory {
                    std::fs::write(dir.join("memory.max"), m.to_string())?;
                    // Past the limit the job is killed, not swapped out.
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                }
                if let Some(p) = pids {
                    std::fs::write(dir.join("pids.max"), p.to_string())?;
                }
                if let Some(c) = cpus.filter(|_| dir.join("cpu.max").exists()) {
                    std::fs::write(
                        dir.join("cpu.max"),
                        format!("{} {CPU_PERIOD_US}", quota_us(c)),
                    )?;
                }
                Ok(Cgroup { dirs: vec![dir] })
            }
            Hierarchy::V1 {
                memory: m_base,
                pids: p_base,
                cpu: c_base,
            } => {
                let (m_dir, p_dir) = (m_base.join(&name), p_base.join(&name));
                make(&m_dir)?;
                make(&p_dir)?;
                let mut cg = Cgroup {
                    dirs: vec![m_dir.clone(), p_dir.clone()],
                };
                if let (Some(c), Some(base)) = (cpus, c_base) {
                    let c_dir = base.join(&name);
                    make(&c_dir)?;
                    cg.dirs.push(c_dir.clone());
                    std::fs::write(c_dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    std::fs::write(c_dir.join("cpu.cfs_quota_us"), quota_us(c).to_string())?;
                }
                if let Some(m) = memory {
                    std::fs::write(m_dir.join("memory.limit_in_bytes"), m.to_string())?;
                    // Only with swap accounting; without it there is no swap limit to set.
                    let _ =
                        std::fs::write(m_dir.join("memory.memsw.limit_in_bytes"), m.to_string());
                }
                if let Some(p) = pids {
                    std::fs::write(p_dir.join("pids.max"), p.to_string())?;
                }
                Ok(cg)
            }
        }
    }
}

/// The CPU limit's accounting period (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// The CPU time per period that `cpus` allows (at least the kernel's 1 ms minimum).
fn quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64) as u64).max(1_000)
}

fn make(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// The cgroup v2 mount: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host.
fn v2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|m| m.join("cgroup.controllers").exists())
}

fn v2(own: &str) -> Option<Hierarchy> {
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = v2_mount()?.join(path.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    if !(controllers.contains("memory") && controllers.contains("pids")) {
        return None;
    }
    let enable = || {
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids")?;
        // The CPU limit where the controller is delegated too; jobs go without one otherwise.
        if controllers.contains("cpu") {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpu");
        }
        Ok::<(), io::Error>(())
    };
    if enable().is_err() {
        // Busy: this cgroup holds processes. Move the worker into a leaf of its own, then try
        // again (it fails again if other processes share the cgroup).
        let leaf = dir.join("orch-worker");
        make(&leaf).ok()?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).ok()?;
        enable().ok()?;
    }
    // A probe that the worker may create children.
    let probe = dir.join(format!("orch-probe-{}", std::process::id()));
    make(&probe).ok()?;
    let _ = std::fs::remove_dir(&probe);
    Some(Hierarchy::V2(dir))
}

fn v1(own: &str) -> Option<Hierarchy> {
    let dir_of = |controller: &str| {
        own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',').any(|c| c == controller).then(|| {
                Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(path.trim_start_matches('/'))
            })
        })
    };
    let probe = |base: &Path| {
        let probe = base.join(format!("orch-probe-{}", std::process::id()));
        let made = make(&probe).is_ok();
        let _ = std::fs::remove_dir(&probe);
        made
    };
    let (memory, pids) = (dir_of("memory")?, dir_of("pids")?);
    if !(probe(&memory) && probe(&pids)) {
        return None;
    }
    let cpu = dir_of("cpu").filter(|c| probe(c));
    Some(Hierarchy::V1 { memory, pids, cpu })
}

/// One job's cgroup (one directory per hierarchy in v1).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// The files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Whether the kernel killed a process here for the memory limit.
    pub fn oom_killed(&self) -> bool {
        self.dirs.iter().any(|d| {
            ["memory.events", "memory.oom_control"].iter().any(|f| {
                std::fs::read_to_string(d.join(f)).is_ok_and(|s| {
                    s.lines().any(|l| {
                        l.strip_prefix("oom_kill ")
                            .and_then(|n| n.trim().parse::<u64>().ok())
                            .is_some_and(|n| n > 0)
                    })
                })
            })
        })
    }

    /// Kills what is left in it and removes it.
    pub fn remove(self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    if pid > 1 {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
