//! What a running agent has changed so far, for the coordinator's conflict warnings
//! (`coordinator/src/conflicts.rs`): the runner feeds a job's events to its [`PathWatch`];
//! after an agent step (a tool result, a checkpoint) or a heartbeat, at most once per
//! [`MIN_INTERVAL`], the watch works out the job's changed paths and the runner publishes them
//! as a [`PathsReport`] when the set differs from the last one sent.
//!
//! The paths: in a clone of the task's repository, `git status` of the clone (everything the
//! agent changed, tracked or not, shell commands included), relative to the repository's root;
//! in a local directory (which other agents may share, so its `git status` is not this
//! agent's alone), the files its file tools wrote. A scratch directory is the job's own: no
//! other agent can touch its files, so nothing is reported. A check job changes nothing.

use crate::agent::git::git;
use crate::agent::workspace::{FileTracker, scratch_path};
use orch_shared::event::EventKind;
use orch_shared::job::{JobKind, JobSpec, MAX_REPORTED_PATHS, PathsReport, Workspace};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Reports of one job are at least this far apart.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The changed paths of one running job attempt.
#[derive(Debug)]
pub struct PathWatch {
    dir: PathBuf,
    /// The workspace is a clone of the task's repository: ask `git status`.
    clone: bool,
    files: FileTracker,
    /// Something happened since the last look.
    dirty: bool,
    last_look: Option<Instant>,
    last_sent: Option<Vec<String>>,
}

impl PathWatch {
    /// The watch of `job`, run with its scratch directories under `data_dir`; `None` when its
    /// changes cannot conflict with another job's (a scratch directory, a check).
    pub fn for_job(job: &JobSpec, data_dir: &Path) -> Option<PathWatch> {
        if job.kind == JobKind::Check {
            return None;
        }
        let (dir, clone) = match &job.workspace {
            Workspace::Git { .. } => (scratch_path(job, data_dir), true),
            Workspace::Local { path } => (PathBuf::from(path), false),
            Workspace::Scratch => return None,
        };
        Some(PathWatch {
            files: FileTracker::new(&dir),
            dir,
            clone,
            dirty: false,
            last_look: None,
            last_sent: None,
        })
    }

    /// An event of the job's agent went by.
    pub fn observe(&mut self, kind: &EventKind) {
        match kind {
            EventKind::ToolCall {
                call_id,
                name,
                input,
            } => {
                let input = serde_json::from_str(input).unwrap_or_default();
                self.files.on_call(call_id, name, &input);
            }
            EventKind::ToolResult {
                call_id, is_error, ..
            } => {
                self.files.on_result(call_id, *is_error);
                self.dirty = true;
            }
            EventKind::Checkpointed { .. } | EventKind::Heartbeat => self.dirty = true,
            _ => {}
        }
    }

    /// Whether it is time to look at the workspace again.
    pub fn due(&self) -> bool {
        self.dirty && self.last_look.is_none_or(|at| at.elapsed() >= MIN_INTERVAL)
    }

    /// The report to send when the job's changed paths differ from the last ones sent.
    pub async fn look(&mut self, job: &JobSpec) -> Option<PathsReport> {
        self.dirty = false;
        self.last_look = Some(Instant::now());
        let mut paths: BTreeSet<String> = self.files.written().cloned().collect();
        if self.clone {
            paths.extend(status(&self.dir).await);
        }
        let truncated = paths.len() > MAX_REPORTED_PATHS;
        let paths: Vec<String> = paths.into_iter().take(MAX_REPORTED_PATHS).collect();
        if self.last_sent.as_ref() == Some(&paths) || (self.last_sent.is_none() && paths.is_empty())
        {
            return None;
        }
        self.last_sent = Some(paths.clone());
        Some(PathsReport {
            task_id: job.task_id,
            job_id: job.job_id,
            attempt: job.attempt,
            paths,
            truncated,
        })
    }
}

/// The paths `git status` lists in the clone `dir` (relative to its root; none before the
/// clone exists).
async fn status(dir: &Path) -> Vec<String> {
    if tokio::fs::metadata(dir.join(".git")).await.is_err() {
        return vec![];
    }
    let out = git(
        dir,
        &["status", "--porcelain=v1", "-z", "--untracked-files=all"],
    )
    .await;
    if !out.ok {
        return vec![];
    }
    parse_status(&out.stdout)
}

/// The paths of `git status --porcelain=v1 -z` output (a rename counts by both names).
fn parse_status(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fields = raw.split('\0').filter(|f| !f.is_empty());
    while let Some(field) = fields.next() {
        if field.len() < 4 {
            continue;
        }
        let status = &field[..2];
        out.push(field[3..].to_string());
        if status.contains('R') || status.contains('C') {
            // A rename or copy is followed by its source path.
            if let Some(from) = fields.next() {
                out.push(from.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_changed_added_and_renamed_paths() {
        let raw = " M src/a.rs\0?? new file.txt\0R  b.rs\0old b.rs\0UU greet.sh\0";
        assert_eq!(
            parse_status(raw),
            ["src/a.rs", "new file.txt", "b.rs", "old b.rs", "greet.sh"]
        );
    }

    #[tokio::test]
    async fn a_local_directory_reports_what_the_file_tools_wrote_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
            "task_id": orch_shared::ids::TaskId::new(), "job_id": orch_shared::ids::JobId::new(),
            "attempt": 1, "step": 0, "role": "builder", "prompt": "p", "backend": "sim",
        }))
        .unwrap();
        assert!(PathWatch::for_job(&spec, dir.path()).is_none(), "scratch");
        spec.workspace = Workspace::Local {
            path: dir.path().display().to_string(),
        };
        let mut w = PathWatch::for_job(&spec, dir.path()).unwrap();
        assert!(!w.due());
        let file = dir.path().join("src/a.rs").display().to_string();
        w.observe(&EventKind::ToolCall {
            call_id: "1".into(),
            name: "write_file".into(),
            input: serde_json::json!({ "path": file }).to_string(),
        });
        w.observe(&EventKind::ToolResult {
            call_id: "1".into(),
            output: String::new(),
            is_error: false,
        });
        assert!(w.due());
        let report = w.look(&spec).await.unwrap();
        assert_eq!(report.paths, ["src/a.rs"]);
        w.observe(&EventKind::Heartbeat);
        assert!(!w.due(), "at most one look per interval");
        w.last_look = None;
        assert!(w.due());
        assert!(
            w.look(&spec).await.is_none(),
            "the same set is not sent again"
        );
    }
}
