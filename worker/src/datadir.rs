//! The worker's data directory (`--data-dir`): scratch workspaces, the git clone cache, the
//! Claude Code CLI's home, and the records of running supervisors (`procs/`, see
//! [`crate::agent::supervisor`]). It belongs to one live worker at a time: [`claim`] takes an
//! exclusive `flock` on `<data_dir>/worker.lock` (released by the kernel when the worker dies,
//! however it dies), then removes what a previous worker on it left behind: processes still
//! running under a recorded supervisor, and scratch workspaces. Another live worker's
//! directory is never touched: its lock cannot be taken.

use crate::agent::process;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to prepare the data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {path} is in use by another live worker (give each worker its own --data-dir)"
    )]
    InUse { path: PathBuf },
}

/// The claimed data directory; its lock is held until this is dropped.
#[derive(Debug)]
pub struct DataDir {
    _lock: Flock<File>,
}

/// Where supervisors record themselves.
pub fn records(data_dir: &Path) -> PathBuf {
    data_dir.join("procs")
}

/// Locks `data_dir` for this worker and clears what a previous worker left in it.
pub fn claim(data_dir: &Path) -> Result<DataDir, Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let lock_path = data_dir.join("worker.lock");
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(Error::InUse {
                path: data_dir.to_path_buf(),
            });
        }
        Err((_, e)) => return Err(io(&lock_path)(e.into())),
    };
    let records = records(data_dir);
    let killed = process::kill_recorded(&records);
    if killed > 0 {
        tracing::warn!(
            killed,
            "killed processes a previous worker on this data directory left running"
        );
    }
    std::fs::create_dir_all(&records).map_err(io(&records))?;
    let scratch = data_dir.join("scratch");
    if let Ok(entries) = std::fs::read_dir(&scratch) {
        let mut removed = 0;
        for e in entries.flatten() {
            let path = e.path();
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed += usize::from(gone.is_ok());
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed stale scratch workspaces a previous worker left"
            );
        }
    }
    Ok(DataDir { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_claimed_once_and_cleared() {
        let dir = std::env::temp_dir().join(format!("orch-datadir-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("scratch/job-1/src")).unwrap();
        std::fs::create_dir_all(dir.join("git-cache/x.git")).unwrap();
        let held = claim(&dir).unwrap();
        assert!(!dir.join("scratch/job-1").exists());
        assert!(dir.join("git-cache/x.git").exists());
        assert!(records(&dir).is_dir());
        let err = claim(&dir).unwrap_err();
        assert!(matches!(err, Error::InUse { .. }), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
        drop(held);
        claim(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
