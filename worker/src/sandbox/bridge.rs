//! Two hidden modes of the worker binary around the sandbox (see [`super`]), run before any
//! runtime or thread exists:
//!
//! - [`ENTER`] (outside, under the supervisor): moves itself into the job's cgroups and
//!   `exec`s bubblewrap, so the whole sandbox is limited from its first instruction (the
//!   parent-death signal the supervisor armed survives the `exec`).
//! - [`BRIDGE`] (inside, the first process bubblewrap starts): listens on the sandbox's
//!   loopback and copies each connection to the worker's proxy socket, runs the agent program
//!   as its child, and exits with its status. Plain threads: a few connections at a time.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitCode;

/// `orch-worker __orch-enter <n> <cgroup.procs file>... <program> [args...]`.
pub const ENTER: &str = "__orch-enter";
/// `orch-worker __orch-bridge <listen address> <proxy socket> <program> [args...]`.
pub const BRIDGE: &str = "__orch-bridge";

/// Runs `mode` when it is one of these two; `None` otherwise.
pub fn hidden_mode(mode: &OsString, args: impl Iterator<Item = OsString>) -> Option<ExitCode> {
    if mode == ENTER {
        Some(enter(args))
    } else if mode == BRIDGE {
        Some(bridge(args))
    } else {
        None
    }
}

fn usage(mode: &str, expected: &str) -> ExitCode {
    eprintln!("orch-worker {mode}: expected {expected}");
    ExitCode::from(2)
}

fn enter(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let Some(n) = args
        .next()
        .and_then(|n| n.to_str().and_then(|s| s.parse::<usize>().ok()))
    else {
        return usage(ENTER, "<n> <cgroup.procs file>... <program> [args...]");
    };
    let pid = std::process::id().to_string();
    for _ in 0..n {
        let Some(file) = args.next() else {
            return usage(ENTER, "<n> <cgroup.procs file>... <program> [args...]");
        };
        if let Err(e) = std::fs::write(&file, &pid) {
            eprintln!(
                "orch-worker {ENTER}: cannot join the job's cgroup {}: {e}",
                file.to_string_lossy()
            );
            return ExitCode::from(126);
        }
    }
    let Some(program) = args.next() else {
        return usage(ENTER, "<n> <cgroup.procs file>... <program> [args...]");
    };
    let e = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "orch-worker {ENTER}: cannot start {}: {e}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}

fn bridge(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let (Some(listen), Some(socket), Some(program)) = (args.next(), args.next(), args.next())
    else {
        return usage(
            BRIDGE,
            "<listen address> <proxy socket> <program> [args...]",
        );
    };
    // The agent starts with no signal blocked, whatever the chain above it blocked.
    let _ = nix::sys::signal::SigSet::all().thread_unblock();
    let listener = match TcpListener::bind(listen.to_string_lossy().as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "orch-worker {BRIDGE}: cannot listen on {}: {e}",
                listen.to_string_lossy()
            );
            return ExitCode::from(126);
        }
    };
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let socket = socket.clone();
            std::thread::spawn(move || {
                if let Ok(up) = UnixStream::connect(&socket) {
                    pipe(conn, up);
                }
            });
        }
    });
    let status = match std::process::Command::new(&program).args(args).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "orch-worker {BRIDGE}: cannot start {}: {e}",
                program.to_string_lossy()
            );
            return ExitCode::from(127);
        }
    };
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        // A program killed by a signal: report it the way a shell does.
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

/// Copies both ways between a connection and the proxy until both sides are done.
fn pipe(conn: TcpStream, up: UnixStream) {
    let (Ok(conn2), Ok(up2)) = (conn.try_clone(), up.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || copy(up2, conn2, |c| c.shutdown(Shutdown::Write)));
    copy(conn, up, |u| u.shutdown(Shutdown::Write));
    let _ = back.join();
}

fn copy<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W) -> std::io::Result<()>) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = close(&to);
}
