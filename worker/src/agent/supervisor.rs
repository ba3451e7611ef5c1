//! The supervisor: what makes every process a worker starts for a job die with the worker, on
//! Linux, whatever kills the worker (SIGKILL and the OOM killer included).
//!
//! A process cannot be given a parent-death signal from the outside, and setting it in the
//! child between fork and exec takes `unsafe` (`pre_exec`). So the worker starts the worker
//! binary itself in a hidden mode ([`SUPERVISE`]), a small single-threaded program that:
//! - sets `PR_SET_PDEATHSIG` on itself, then checks `getppid()` against the worker pid it was
//!   given (the worker may have died before the signal was armed: then it starts nothing);
//! - becomes a child subreaper, so whatever the program starts and orphans (a tool's
//!   background command, a double-forked dev server) is re-parented to it instead of init;
//! - starts the real program through a second hidden mode ([`EXEC`]) that arms
//!   `PR_SET_PDEATHSIG` = SIGKILL towards the supervisor and `exec`s the program, keeping the
//!   pid, stdin, stdout and stderr: the program dies even if the supervisor is SIGKILLed (the
//!   worker's `kill_on_drop`);
//! - forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the program and exits with its status (a
//!   program killed by a signal makes the supervisor die of the same signal when it can);
//! - when the program exits, or when the worker dies, kills every process left under it
//!   (its process group and all descendants), reaps them, and exits.
//!
//! The parent-death signal fires when the *thread* that forked exits, not only the process (a
//! tokio blocking thread ends after a while idle). The supervisor therefore treats the signal
//! only as a cue to look: while `getppid()` is still the worker, nothing happened.
//!
//! Each supervisor records itself as `<records>/<pid>` holding its start time
//! (`/proc/<pid>/stat` field 22) and removes the file when it is done, so a worker restarted on
//! the same data directory finds what a SIGKILLed supervisor may have left
//! ([`super::process::kill_recorded`]).

use super::process;
use nix::sys::prctl;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid, getppid};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The hidden first argument that runs the worker binary as a supervisor:
/// `orch-worker __orch-supervise <worker pid> <records dir> <program> [args...]`.
pub const SUPERVISE: &str = "__orch-supervise";
/// The hidden first argument that arms the parent-death signal and execs the program:
/// `orch-worker __orch-exec <supervisor pid> <program> [args...]`.
pub const EXEC: &str = "__orch-exec";
/// The exit code when the worker was gone before the program could start.
pub const PARENT_GONE: u8 = 125;
/// The exit code when the program could not be started.
const CANNOT_START: u8 = 127;
/// The signal the kernel sends the supervisor when the thread that started it ends.
const PDEATH: Signal = Signal::SIGUSR1;

/// Runs a hidden mode when the process was started as one (its first argument), and returns
/// its exit code; `None` for a normal start. Call it first thing in `main`, before any thread
/// (a runtime) exists: the supervisor relies on blocked signals.
pub fn hidden_mode() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let mode = args.next()?;
    if mode == SUPERVISE {
        Some(supervise(args))
    } else if mode == EXEC {
        Some(exec(args))
    } else {
        None
    }
}

fn usage(mode: &str, expected: &str) -> ExitCode {
    eprintln!("orch-worker {mode}: expected {expected}");
    ExitCode::from(2)
}

fn parse_pid(arg: Option<OsString>) -> Option<Pid> {
    let pid: i32 = arg?.to_str()?.parse().ok()?;
    (pid > 1).then(|| Pid::from_raw(pid))
}

fn exec(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let (Some(supervisor), Some(program)) = (parse_pid(args.next()), args.next()) else {
        return usage(EXEC, "<supervisor pid> <program> [args...]");
    };
    if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != supervisor {
        return ExitCode::from(PARENT_GONE);
    }
    // The supervisor's blocked signals are inherited through fork and `exec`: without this
    // the program (and all it starts) could not be stopped with SIGTERM, SIGINT or SIGHUP
    // (a `kill`, a `timeout` in an agent's shell). `exec` only returns on failure.
    if SigSet::all().thread_unblock().is_err() {
        return ExitCode::from(CANNOT_START);
    }
    let err = std::process::Command::new(&program).args(args).exec();
    eprintln!(
        "orch-worker: failed to start {}: {err}",
        PathBuf::from(program).display()
    );
    ExitCode::from(CANNOT_START)
}

fn supervise(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let (Some(worker), Some(records), Some(program)) =
        (parse_pid(args.next()), args.next(), args.next())
    else {
        return usage(SUPERVISE, "<worker pid> <records dir> <program> [args...]");
    };
    let signals = SigSet::from_iter([
        Signal::SIGCHLD,
        PDEATH,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ]);
    // Blocked, then taken one at a time with sigwait: no handler, no unsafe. The mask is
    // inherited through fork and exec: the `EXEC` mode clears it before the program starts.
    if signals.thread_block().is_err() {
        return ExitCode::from(CANNOT_START);
    }
    // Armed first, checked second: a worker that died in between is seen by the check.
    if prctl::set_pdeathsig(PDEATH).is_err() || getppid() != worker {
        return ExitCode::from(PARENT_GONE);
    }
    let me = getpid();
    // Without it orphans go to init and only the group kill below still reaches them.
    let _ = prctl::set_child_subreaper(true);
    let record = PathBuf::from(records).join(me.to_string());
    if let Some(start) = process::start_time(me.as_raw() as u32) {
        let _ = std::fs::write(&record, format!("{start}\n"));
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let child = std::process::Command::new(exe)
        .arg(EXEC)
        .arg(me.to_string())
        .arg(&program)
        .args(args)
        .spawn();
    let child = match child {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            let _ = std::fs::remove_file(&record);
            eprintln!(
                "orch-worker: failed to start {}: {e}",
                PathBuf::from(program).display()
            );
            return ExitCode::from(CANNOT_START);
        }
    };
    let status = loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(status) = reap(child) {
                    break Some(status);
                }
            }
            Ok(PDEATH) => {
                if getppid() != worker {
                    break None;
                }
            }
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
            Err(_) => {}
        }
    };
    // Once the program is reaped, whatever it left is our child (we are the subreaper) or
    // below one: with no child left there is nothing to look for under /proc.
    if status.is_none() || has_children() {
        kill_descendants(me);
    }
    let _ = std::fs::remove_file(&record);
    match status {
        Some(WaitStatus::Exited(_, code)) => ExitCode::from(code as u8),
        Some(WaitStatus::Signaled(_, sig, _)) => {
            // Die of the same signal, so the worker sees what the program saw.
            let _ = SigSet::from(sig).thread_unblock();
            let _ = nix::sys::signal::raise(sig);
            ExitCode::from(128u8.wrapping_add(sig as u8))
        }
        _ => ExitCode::from(PARENT_GONE),
    }
}

/// Reaps every child that has exited (the program and adopted orphans); the program's status
/// once it is among them.
fn reap(program: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid == program =>
            {
                found = Some(status)
            }
            Ok(_) => {}
        }
    }
}

/// Whether any child of ours has not been reaped yet.
fn has_children() -> bool {
    !matches!(
        waitpid(None, Some(WaitPidFlag::WNOHANG)),
        Err(nix::errno::Errno::ECHILD)
    )
}

/// SIGKILLs every process in our group or below us until none is left (a process may fork
/// between a scan and the kill), reaping what is re-parented to us. Gives up after 2 s.
fn kill_descendants(me: Pid) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let me = me.as_raw() as u32;
    loop {
        let left: Vec<u32> = process::tree(me)
            .into_iter()
            .filter(|&p| p != me && process::is_alive(p))
            .collect();
        for &p in &left {
            process::kill(p);
        }
        let _ = reap(Pid::from_raw(0));
        if left.is_empty() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
