//! The sandbox every agent process of a job runs in: the Claude Code CLI and its tools, the
//! native loop's `bash` tool and the `command` backend's program. It is built from Linux
//! namespaces by bubblewrap (`bwrap`, run unprivileged in a user namespace), so that a job sees:
//!
//! - its workspace (read-write, at its real path) and what its role adds as writable;
//! - the system (`/usr`, `/etc` without its secrets, the `/bin`-style links) and the toolchains
//!   (the program's own install directory, `[sandbox] read_only`) read-only;
//! - a private `/tmp`, home, `/dev` and `/proc` (its own pid namespace: no other process,
//!   the worker's `/proc/<pid>/environ` included, is visible);
//! - its own network namespace with only a loopback interface: its one way out is the worker's
//!   proxy ([`proxy`]), reached through a unix socket bind-mounted at [`INSIDE_SOCKET`] and a
//!   small bridge ([`bridge`], the worker binary in a hidden mode) that listens on
//!   `127.0.0.1:`[`PROXY_PORT`] inside;
//! - uid and gid [`INSIDE_UID`] (mapped to the worker's own: without privileges no other uid
//!   can be mapped), hostname `sandbox`, no controlling terminal (`--new-session`).
//!
//! Never mounted: the worker's data directory (only the job's workspace inside it), other jobs'
//! workspaces, the worker's config, `/root`, `/home`, `/run`, `/var`. The environment is what
//! the caller sets on the [`Jail::command`] (it starts empty, with `PATH`) plus the sandbox's own
//! variables: no secret of the worker is passed.
//!
//! No credential enters: a job's [`Jail`] holds a per-job token, valid while the job runs; the
//! agent gets it as its API key and the proxy as its base URL, and the proxy swaps the token for
//! the real credential ([`proxy::Upstream::credential`]). Other hosts are reached through the same
//! proxy as an HTTP CONNECT proxy (`HTTPS_PROXY`), only those the role allows; a refusal is
//! a `sandbox_refused` event of the job and a warning in the log.
//!
//! Limits: memory and pids per job in a cgroup of the worker's own ([`limits`]), where the
//! worker may create one; a job killed by the kernel for its memory is reported as such.
//!
//! Layout: this module builds the bwrap command line and owns the per-job [`Jail`];
//! [`proxy`] is the worker's side of the network, [`bridge`] the sandbox's, [`limits`] the
//! cgroups.

pub mod bridge;
pub mod limits;
pub mod proxy;

use crate::agent::{Events, process};
use crate::config::Secret;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The port the bridge listens on inside every sandbox (each has its own network namespace,
/// so one fixed port never collides).
pub const PROXY_PORT: u16 = 47615;
/// The uid and gid of the agent inside the sandbox.
pub const INSIDE_UID: u32 = 1000;
/// Where the worker binary is mounted inside (read-only), to run the bridge.
pub const INSIDE_WORKER: &str = "/run/orch/worker";
/// Where the proxy's socket is mounted inside.
pub const INSIDE_SOCKET: &str = "/run/orch/proxy.sock";
/// The private home of a sandboxed process (on the private `/tmp`).
pub const INSIDE_HOME: &str = "/tmp/home";
/// Files and directories of the read-only system that are hidden (an empty file or directory
/// is mounted over them): secrets a process of the worker's own uid could otherwise read.
const HIDDEN: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/orch",
];

/// `[sandbox]` of the worker's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Off only by an explicit `sandbox = "off"` (`--sandbox off`): then agents run as the
    /// worker, with its files, network and `/proc` (a warning is logged at start).
    pub enabled: bool,
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// More read-only paths (toolchains); missing ones are skipped.
    pub read_only: Vec<PathBuf>,
    /// The memory limit of a job (all its processes), in bytes, unless its role sets one.
    pub memory_max: Option<u64>,
    /// The process limit of a job, unless its role sets one.
    pub pids_max: Option<u64>,
    /// The CPU limit of a job in cores (1.5: one and a half), unless its role sets one.
    pub cpus: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let cargo = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".cargo")));
        let rustup = std::env::var_os("RUSTUP_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".rustup")));
        // The toolchains, not `~/.cargo` as a whole (its `credentials.toml` is a secret).
        let read_only = [cargo.map(|c| c.join("bin")), rustup]
            .into_iter()
            .flatten()
            .collect();
        Self {
            enabled: true,
            bwrap: PathBuf::from("bwrap"),
            read_only,
            memory_max: Some(4 << 30),
            pids_max: Some(1024),
            cpus: None,
        }
    }
}

/// What a role lets its jobs do inside the sandbox (`[roles.<role>]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Allowance {
    /// Hosts reachable through the proxy besides the model API: `host`, `host:port` or
    /// `*.domain` (any port 443 or 80 when no port is named).
    pub allowed_hosts: Vec<String>,
    /// More read-write paths (existing ones only).
    pub writable: Vec<PathBuf>,
    /// The role's memory limit in bytes (else `[sandbox] memory_max`).
    pub memory_max: Option<u64>,
    /// The role's process limit (else `[sandbox] pids_max`).
    pub pids_max: Option<u64>,
    /// The role's CPU limit in cores (else `[sandbox] cpus`).
    pub cpus: Option<f64>,
}

impl Allowance {
    /// Whether `host:port` may be reached.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.iter().any(|rule| {
            let rule = rule.to_ascii_lowercase();
            let (name, ports): (&str, Vec<u16>) = match rule.rsplit_once(':') {
                Some((n, p)) => match p.parse() {
                    Ok(p) => (n, vec![p]),
                    Err(_) => return false,
                },
                None => (rule.as_str(), vec![443, 80]),
            };
            let name_ok = match name.strip_prefix("*.") {
                Some(domain) => host.ends_with(&format!(".{domain}")),
                None => host == name,
            };
            name_ok && ports.contains(&port)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the agent sandbox needs bubblewrap, and `{bwrap}` cannot run ({source}); install it (`apt-get install bubblewrap`) or turn the sandbox off with `--sandbox off` (agents then run with the worker's rights)"
    )]
    Missing {
        bwrap: String,
        source: std::io::Error,
    },
    #[error(
        "bubblewrap cannot create the agent sandbox here ({0}); unprivileged user namespaces must be allowed (sysctl kernel.unprivileged_userns_clone=1, or a container without seccomp/AppArmor blocks on unshare), or turn the sandbox off with `--sandbox off`"
    )]
    Unusable(String),
    #[error("cannot find the worker executable to run the sandbox's bridge: {0}")]
    Exe(std::io::Error),
    #[error("failed to serve the sandbox proxy on {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("failed to set up the job's resource limits: {0}")]
    Limits(std::io::Error),
}

/// The worker's sandbox: how to start one, the proxy every sandbox reaches, the cgroups.
pub struct Sandbox {
    bwrap: PathBuf,
    exe: PathBuf,
    socket: PathBuf,
    read_only: Vec<PathBuf>,
    memory_max: Option<u64>,
    pids_max: Option<u64>,
    cpus: Option<f64>,
    limits: Option<limits::Hierarchy>,
    grants: proxy::Grants,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("bwrap", &self.bwrap)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Checks that bubblewrap can build a sandbox here and starts the proxy on
    /// `<data_dir>/sandbox/proxy.sock`, served until `cancel`. `None` when the sandbox is off
    /// (with a warning).
    pub async fn start(
        settings: &Settings,
        data_dir: &Path,
        upstream: proxy::Upstream,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Option<Arc<Sandbox>>, Error> {
        if !settings.enabled {
            tracing::warn!(
                "the agent sandbox is OFF (sandbox = \"off\"): agents and their tools run as the worker, and can read its files, secrets and /proc, and reach Redis, NATS and any host"
            );
            return Ok(None);
        }
        let exe = std::env::current_exe().map_err(Error::Exe)?;
        check(&settings.bwrap).await?;
        let dir = data_dir.join("sandbox");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Socket {
            path: dir.display().to_string(),
            source,
        })?;
        let socket = dir.join("proxy.sock");
        let listener = proxy::bind(&socket).map_err(|source| Error::Socket {
            path: socket.display().to_string(),
            source,
        })?;
        let grants = proxy::Grants::default();
        tracker.spawn(proxy::serve(listener, grants.clone(), upstream, cancel));
        let limits = limits::Hierarchy::detect();
        match &limits {
            Some(h) => {
                let swept = h.sweep();
                tracing::info!(cgroups = %h, swept, "agent sandbox on; job limits through cgroups")
            }
            None => tracing::warn!(
                "agent sandbox on, but this worker cannot create cgroups: jobs have no memory or process limit"
            ),
        }
        Ok(Some(Arc::new(Sandbox {
            bwrap: settings.bwrap.clone(),
            exe,
            socket,
            read_only: settings.read_only.clone(),
            memory_max: settings.memory_max,
            pids_max: settings.pids_max,
            cpus: settings.cpus,
            limits,
            grants,
        })))
    }

    /// Serves `router` to every sandbox under `/orch/` on the proxy's address.
    pub fn serve_local(&self, router: axum::Router) {
        self.grants.serve_local(router);
    }

    /// What a job with `allowance` may do inside, in one line (for the job's start event and
    /// `orchctl agents show`).
    pub fn describe(&self, allowance: &Allowance) -> String {
        let memory = allowance.memory_max.or(self.memory_max);
        let pids = allowance.pids_max.or(self.pids_max);
        let cpus = allowance.cpus.or(self.cpus);
        let limited = self.limits.is_some();
        summary(
            "the workspace",
            &allowance.writable,
            &allowance.allowed_hosts,
            Limits {
                memory: memory.filter(|_| limited),
                pids: pids.filter(|_| limited),
                cpus: cpus.filter(|_| self.limits_cpu()),
            },
        )
    }

    /// Whether jobs' CPU limits can be set (a cgroup hierarchy with the `cpu` controller).
    fn limits_cpu(&self) -> bool {
        match &self.limits {
            Some(limits::Hierarchy::V2(d)) => {
                std::fs::read_to_string(d.join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
            }
            Some(limits::Hierarchy::V1 { cpu, .. }) => cpu.is_some(),
            None => false,
        }
    }

    /// The sandbox of one job attempt working in `workspace`, allowed what `allowance` says;
    /// its token is valid until the [`Jail`] is dropped.
    pub fn jail(
        self: &Arc<Self>,
        name: &str,
        workspace: &Path,
        allowance: &Allowance,
        events: Option<Events>,
        credential: Option<&Secret>,
    ) -> Result<Jail, Error> {
        let memory_max = allowance.memory_max.or(self.memory_max);
        let pids_max = allowance.pids_max.or(self.pids_max);
        let cpus = allowance.cpus.or(self.cpus);
        let cgroup = match &self.limits {
            Some(h) => Some(
                h.create(name, memory_max, pids_max, cpus)
                    .map_err(Error::Limits)?,
            ),
            None => None,
        };
        let token = proxy::new_token();
        self.grants.insert(
            token.clone(),
            proxy::Grant {
                job: name.to_string(),
                allowance: allowance.clone(),
                events,
                credential: credential.cloned(),
            },
        );
        Ok(Jail {
            sandbox: self.clone(),
            token,
            workspace: workspace.to_path_buf(),
            writable: allowance
                .writable
                .iter()
                .filter(|p| p.exists())
                .cloned()
                .collect(),
            home: None,
            allowance: allowance.clone(),
            memory_max: cgroup.as_ref().and(memory_max),
            pids_max: cgroup.as_ref().and(pids_max),
            cpus: cpus.filter(|_| self.limits_cpu()),
            cgroup,
        })
    }
}

/// Runs bubblewrap once with every namespace the sandbox uses.
async fn check(bwrap: &Path) -> Result<(), Error> {
    let out = Command::new(bwrap)
        .args([
            "--unshare-all",
            "--unshare-user",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--die-with-parent",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "true",
        ])
        .env_clear()
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::Missing {
            bwrap: bwrap.display().to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Unusable(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The sandbox of one job attempt: its token at the proxy, its cgroup, and what it may
/// mount. Dropping it revokes the token and removes the cgroup.
pub struct Jail {
    sandbox: Arc<Sandbox>,
    token: String,
    workspace: PathBuf,
    writable: Vec<PathBuf>,
    /// `HOME` inside, when not the private [`INSIDE_HOME`].
    home: Option<PathBuf>,
    allowance: Allowance,
    memory_max: Option<u64>,
    pids_max: Option<u64>,
    cpus: Option<f64>,
    cgroup: Option<limits::Cgroup>,
}

impl Jail {
    /// The model API's base URL inside the sandbox (the bridge to the proxy).
    pub fn base_url() -> String {
        format!("http://127.0.0.1:{PROXY_PORT}")
    }

    /// The job's token: the agent's API key, swapped for the real one by the proxy.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Makes `path` (an existing directory outside the workspace: the CLI's home) writable
    /// inside too.
    pub fn add_writable(&mut self, path: &Path) {
        self.writable.push(path.to_path_buf());
    }

    /// Makes `path` (an existing directory outside the workspace) the home inside, writable
    /// and kept after the run (the CLI's transcripts are read from it).
    pub fn set_home(&mut self, path: &Path) {
        self.add_writable(path);
        self.home = Some(path.to_path_buf());
    }

    /// Whether the kernel killed a process of this job for its memory limit.
    pub fn memory_exceeded(&self) -> bool {
        self.cgroup.as_ref().is_some_and(limits::Cgroup::oom_killed)
    }

    /// The memory limit in force, in bytes.
    pub fn memory_max(&self) -> Option<u64> {
        self.memory_max
    }

    /// What this job is allowed, in one line (for the logs).
    pub fn describe(&self) -> String {
        summary(
            &self.workspace.display().to_string(),
            &self.writable,
            &self.allowance.allowed_hosts,
            Limits {
                memory: self.memory_max,
                pids: self.pids_max,
                cpus: self.cpus,
            },
        )
    }

    /// A command for `program` inside this job's sandbox; arguments added afterwards go to
    /// `program`. Its environment starts empty but for `PATH` (the caller adds what the
    /// program needs; the sandbox adds `HOME`, `TMPDIR` and the proxy variables, which win),
    /// and its working directory is the workspace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        let sb = &self.sandbox;
        let mut cmd = match &self.cgroup {
            Some(cg) => {
                let mut c = process::command(&sb.exe);
                c.arg(bridge::ENTER).arg(cg.procs_files().len().to_string());
                c.args(cg.procs_files());
                c.arg(&sb.bwrap);
                c
            }
            None => process::command(&sb.bwrap),
        };
        cmd.args(self.bwrap_args(program));
        cmd.arg("--")
            .arg(INSIDE_WORKER)
            .arg(bridge::BRIDGE)
            .arg(format!("127.0.0.1:{PROXY_PORT}"))
            .arg(INSIDE_SOCKET)
            .arg(program);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .current_dir(&self.workspace);
        cmd
    }

    /// bubblewrap's arguments up to the program.
    fn bwrap_args(&self, program: &OsStr) -> Vec<String> {
        let sb = &self.sandbox;
        let mut a: Vec<String> = vec![];
        let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
        let uid = INSIDE_UID.to_string();
        push(&[
            "--unshare-all",
            "--unshare-user",
            "--uid",
            &uid,
            "--gid",
            &uid,
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
        ]);
        // `/bin`, `/lib`... are links into /usr on a merged system, directories elsewhere.
        for dir in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::read_link(dir) {
                Ok(target) => push(&["--symlink", &target.to_string_lossy(), dir]),
                Err(_) if Path::new(dir).is_dir() => push(&["--ro-bind", dir, dir]),
                Err(_) => {}
            }
        }
        push(&["--ro-bind", "/etc", "/etc"]);
        for hidden in HIDDEN {
            let p = Path::new(hidden);
            if p.is_dir() {
                push(&["--tmpfs", hidden, "--remount-ro", hidden]);
            } else if p.exists() {
                push(&["--ro-bind", "/dev/null", hidden]);
            }
        }
        push(&[
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--dir",
            INSIDE_HOME,
        ]);
        let mut read_only: BTreeSet<PathBuf> = sb.read_only.iter().cloned().collect();
        read_only.extend(install_dirs(program));
        for p in read_only.iter().filter(|p| p.exists() && !under_system(p)) {
            let p = p.to_string_lossy();
            push(&["--ro-bind", &p, &p]);
        }
        for p in std::iter::once(&self.workspace).chain(&self.writable) {
            let p = p.to_string_lossy();
            push(&["--bind", &p, &p]);
        }
        push(&[
            "--ro-bind",
            &sb.exe.to_string_lossy(),
            INSIDE_WORKER,
            "--bind",
            &sb.socket.to_string_lossy(),
            INSIDE_SOCKET,
            "--chdir",
            &self.workspace.to_string_lossy(),
        ]);
        let proxy = format!("http://orch:{}@127.0.0.1:{PROXY_PORT}", self.token);
        let home = self
            .home
            .as_ref()
            .map_or(INSIDE_HOME.into(), |h| h.to_string_lossy());
        for (k, v) in [
            ("HOME", home.as_ref()),
            ("TMPDIR", "/tmp"),
            ("HTTPS_PROXY", &proxy),
            ("HTTP_PROXY", &proxy),
            ("https_proxy", &proxy),
            ("http_proxy", &proxy),
            ("NO_PROXY", "127.0.0.1,localhost"),
            ("no_proxy", "127.0.0.1,localhost"),
        ] {
            push(&["--setenv", k, v]);
        }
        a
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.sandbox.grants.remove(&self.token);
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
    }
}

/// One line on what a sandbox allows.
/// The limits in force on a job (`None`: none).
struct Limits {
    memory: Option<u64>,
    pids: Option<u64>,
    cpus: Option<f64>,
}

fn summary(workspace: &str, writable: &[PathBuf], hosts: &[String], limits: Limits) -> String {
    let hosts = if hosts.is_empty() {
        "the model API only".to_string()
    } else {
        format!("the model API, {}", hosts.join(", "))
    };
    let mut writes = vec![workspace.to_string()];
    writes.extend(writable.iter().map(|p| p.display().to_string()));
    format!(
        "writes {}; network: {hosts}; memory: {}; processes: {}; cpu: {}",
        writes.join(", "),
        limits
            .memory
            .map_or("no limit".into(), |b| format!("{} MiB", b >> 20)),
        limits.pids.map_or("no limit".into(), |n| n.to_string()),
        limits
            .cpus
            .map_or("no limit".into(), |c| format!("{c} core(s)")),
    )
}

/// Whether `p` is already visible inside through the system mounts.
fn under_system(p: &Path) -> bool {
    ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64"]
        .iter()
        .any(|s| p.starts_with(s))
}

/// The directories a program needs to be found and run inside: its own directory, and that
/// of the file it links to (an npm `.bin` link into its package). A bare name is looked up on
/// the worker's `PATH`.
fn install_dirs(program: &OsStr) -> Vec<PathBuf> {
    let path = Path::new(program);
    let found = if path.components().count() > 1 {
        Some(path.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    let Some(found) = found else {
        return vec![];
    };
    let mut dirs: Vec<PathBuf> = found.parent().map(Path::to_path_buf).into_iter().collect();
    if let Ok(real) = found.canonicalize()
        && let Some(parent) = real.parent()
    {
        dirs.push(parent.to_path_buf());
    }
    // A program of an npm package (an MCP server in `node_modules/.bin`) needs the packages
    // beside it: the outermost `node_modules` it is in.
    let packages: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| {
            d.ancestors()
                .filter(|a| a.file_name().is_some_and(|n| n == "node_modules"))
                .last()
                .map(Path::to_path_buf)
        })
        .collect();
    dirs.extend(packages);
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_allowed_by_name_wildcard_and_port() {
        let a = Allowance {
            allowed_hosts: vec![
                "crates.io".into(),
                "*.npmjs.org".into(),
                "mirror.local:8080".into(),
            ],
            ..Allowance::default()
        };
        assert!(a.allows("crates.io", 443));
        assert!(a.allows("CRATES.IO.", 443));
        assert!(!a.allows("crates.io", 22));
        assert!(!a.allows("static.crates.io", 443));
        assert!(a.allows("registry.npmjs.org", 443));
        assert!(!a.allows("npmjs.org.evil.com", 443));
        assert!(a.allows("mirror.local", 8080));
        assert!(!a.allows("mirror.local", 443));
        assert!(!Allowance::default().allows("127.0.0.1", 6379));
    }
}
