//! Where an agent works and what it touched.
//!
//! A job's workspace is a local path the worker can see (`Workspace::Local`), a fresh scratch
//! directory under the worker's data directory (`Workspace::Scratch`), or a fresh clone of a git
//! repository in such a directory (`Workspace::Git`, see [`super::git`]); scratch directories are
//! removed when the job ends, except a git workspace whose work could not be pushed, which is
//! moved to `<data_dir>/kept/` (clean-up never deletes unsaved work). [`WorkDir::prepare`] makes it before the agent runs and
//! [`WorkDir::finish`] reports what the run changed, once, after it.
//!
//! Files read and written come from what really happened: the paths of the file tools the agent
//! called that succeeded (Read; Write, Edit, MultiEdit, NotebookEdit; the native `read_file`,
//! `write_file`, `edit_file`), and, when the workspace
//! is in a git repository, the entries of `git status --porcelain` that appeared or changed
//! between before and after the run (which also catches files a shell command wrote or deleted).
//! A git workspace reports exactly the files of its diff instead.
//!
//! The diff: a git workspace's is `git diff base..commit`; a scratch directory starts empty, so
//! every file in it at the end is new and its diff is read from the files themselves, without a
//! git process (ignore files respected, cut like git's); a local path in a repository gets the diff of the files that changed against
//! `HEAD` (untracked ones shown as added).

use super::git::{self, Checkout};
use orch_shared::job::{FailureReason, GitOutcome, JobSpec, Outcome, Workspace};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

/// Above this many dirty entries the git comparison is skipped (tool paths still count).
const MAX_GIT_ENTRIES: usize = 20_000;

/// The directory an agent runs in.
#[derive(Debug)]
pub struct WorkDir {
    pub path: PathBuf,
    scratch: bool,
    repo: Repo,
    /// The agent's work could not be pushed: the directory is moved to `<data_dir>/kept/`
    /// instead of being removed (clean-up never deletes unsaved work).
    keep: std::sync::atomic::AtomicBool,
}

/// What a workspace knows of its repository, to tell what the run changed.
#[derive(Debug)]
enum Repo {
    /// No repository (or no git on this worker).
    None,
    /// A local path in a repository: its dirty files before the run.
    Local(GitSnapshot),
    /// A scratch directory: it starts empty, so every file in it at the end is the run's
    /// (no git: a git process per step cost more CPU than a native agent's whole loop).
    Scratch,
    /// A clone of the job's repository.
    Git(Box<Checkout>),
}

/// What a run changed in its workspace.
#[derive(Debug, Default)]
pub struct Changes {
    pub files_read: Vec<String>,
    pub files_written: Vec<String>,
    /// A unified diff, cut at [`orch_shared::job::MAX_DIFF_BYTES`].
    pub diff: Option<String>,
    pub git: Option<GitOutcome>,
    /// The agent's work could not be kept (its branch could not be pushed): the job fails.
    pub failure: Option<(FailureReason, String)>,
}

impl Changes {
    /// The job's outcome: the agent's, unless its work could not be kept.
    pub fn outcome(&self, agent: Outcome) -> Outcome {
        match &self.failure {
            Some((reason, message)) if agent.is_success() => Outcome::Failure {
                reason: *reason,
                message: message.clone(),
            },
            _ => agent,
        }
    }
}

impl WorkDir {
    /// The job's workspace: its local path, which must exist on this worker, or a fresh
    /// scratch directory `<data_dir>/scratch/<job>-<attempt>` (for a git workspace, with the
    /// repository cloned and checked out in it; with `sparse`, the worker's
    /// `workspace.sparse`, only the job's declared paths, see [`git::checkout`]). Stops when
    /// `cancel` fires.
    pub async fn prepare(
        job: &JobSpec,
        data_dir: &Path,
        sparse: bool,
        cancel: &CancellationToken,
    ) -> Result<WorkDir, (FailureReason, String)> {
        match &job.workspace {
            Workspace::Local { path } => {
                let p = PathBuf::from(path);
                match tokio::fs::metadata(&p).await {
                    Ok(m) if m.is_dir() => {
                        let repo = GitSnapshot::take(&p).await.map_or(Repo::None, Repo::Local);
                        Ok(WorkDir {
                            path: p,
                            scratch: false,
                            repo,
                            keep: Default::default(),
                        })
                    }
                    Ok(_) => Err((
                        FailureReason::BadRequest,
                        format!("workspace {path} is not a directory on this worker"),
                    )),
                    Err(e) => Err((
                        FailureReason::BadRequest,
                        format!("workspace {path} is not visible on this worker: {e}"),
                    )),
                }
            }
            Workspace::Git {
                url,
                base_ref,
                job: git_job,
            } => {
                let mut dir = Self::scratch(job, data_dir).await?;
                // Dropping the clone on cancellation kills git; dropping `dir` removes it.
                let checkout = tokio::select! {
                    c = git::checkout(&dir.path, data_dir, url, base_ref, git_job.as_ref(), sparse) => c,
                    _ = cancel.cancelled() => {
                        return Err((FailureReason::Cancelled, "agent stopped".to_string()));
                    }
                };
                dir.repo = Repo::Git(Box::new(checkout.map_err(|e| (e.reason, e.message))?));
                Ok(dir)
            }
            Workspace::Scratch => {
                let mut dir = Self::scratch(job, data_dir).await?;
                dir.repo = Repo::Scratch;
                Ok(dir)
            }
        }
    }

    /// A fresh, empty scratch directory for `job`.
    async fn scratch(job: &JobSpec, data_dir: &Path) -> Result<WorkDir, (FailureReason, String)> {
        let p = scratch_path(job, data_dir);
        // A redelivered attempt starts clean.
        let _ = tokio::fs::remove_dir_all(&p).await;
        tokio::fs::create_dir_all(&p).await.map_err(|e| {
            (
                FailureReason::Internal,
                format!(
                    "failed to create the scratch workspace {}: {e}",
                    p.display()
                ),
            )
        })?;
        Ok(WorkDir {
            path: p,
            scratch: true,
            repo: Repo::None,
            keep: Default::default(),
        })
    }

    pub fn is_scratch(&self) -> bool {
        self.scratch
    }

    /// The commit a git workspace's agent starts from.
    pub fn git_base(&self) -> Option<&str> {
        match &self.repo {
            Repo::Git(c) => Some(&c.base),
            _ => None,
        }
    }

    /// Whether this is a scratch directory (no clone): checkpoints make it a repository of
    /// their own when they first save it ([`ensure_scratch_repo`]).
    pub fn is_scratch_dir(&self) -> bool {
        matches!(self.repo, Repo::Scratch)
    }

    /// The run ended (`success`: the agent's outcome): what it changed, from `files` (its tool
    /// calls) and the repository. A git workspace commits and pushes here (see [`super::git`]).
    pub async fn finish(&self, job: &JobSpec, success: bool, files: FileTracker) -> Changes {
        match &self.repo {
            Repo::None => {
                let (files_read, files_written) = files.finish(vec![]);
                Changes {
                    files_read,
                    files_written,
                    ..Changes::default()
                }
            }
            Repo::Local(before) => {
                let changed = git_changes(&self.path, Some(before)).await;
                let diff = git::worktree_diff(&self.path, &changed).await;
                let (files_read, files_written) = files.finish(changed);
                Changes {
                    files_read,
                    files_written,
                    diff,
                    ..Changes::default()
                }
            }
            Repo::Scratch => {
                let path = self.path.clone();
                let (changed, diff) = tokio::task::spawn_blocking(move || scratch_changes(&path))
                    .await
                    .unwrap_or_default();
                let (files_read, files_written) = files.finish(changed);
                Changes {
                    files_read,
                    files_written,
                    diff,
                    ..Changes::default()
                }
            }
            Repo::Git(checkout) => match checkout.finish(&self.path, job, success).await {
                Ok(done) => {
                    // The diff's files are the files written; reads come from the tool calls.
                    let (files_read, _) = files.finish(done.files.clone());
                    Changes {
                        files_read,
                        files_written: done.files,
                        diff: Some(done.diff),
                        git: done.git,
                        failure: None,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the agent's work was not pushed; its workspace is kept on this worker");
                    self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
                    let (files_read, files_written) = files.finish(vec![]);
                    Changes {
                        files_read,
                        files_written,
                        failure: Some((e.reason, e.message)),
                        ..Changes::default()
                    }
                }
            },
        }
    }
}

/// Where `job`'s scratch directory (or clone) is: `<data_dir>/scratch/<job>-<attempt>`.
pub fn scratch_path(job: &JobSpec, data_dir: &Path) -> PathBuf {
    data_dir
        .join("scratch")
        .join(format!("{}-{}", job.job_id, job.attempt))
}

/// The files of the scratch directory `dir` (which started empty) and their diff as new
/// files, in git's format and cut like git's, read without a git process. Ignore files in it
/// are respected, as `git status` would.
/// Makes the scratch directory `dir` a repository with an empty first commit unless it is one
/// already. Only checkpoints need it (a run's diff is listed without git), so a scratch run
/// starts no git process until its first checkpoint or restore.
pub async fn ensure_scratch_repo(dir: &Path) -> Result<(), String> {
    if tokio::fs::metadata(dir.join(".git")).await.is_ok() {
        return Ok(());
    }
    let steps: [&[&str]; 4] = [
        &["init", "-q"],
        &["config", "user.name", "orchestrator"],
        &["config", "user.email", "orchestrator@localhost"],
        &[
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "orchestrator: empty workspace",
        ],
    ];
    for args in steps {
        let out = git::git(dir, args).await;
        if !out.ok {
            return Err(format!("git {}: {}", args[0], out.why()));
        }
    }
    Ok(())
}

fn scratch_changes(dir: &Path) -> (Vec<String>, Option<String>) {
    use std::fmt::Write as _;
    let mut files: Vec<(String, std::path::PathBuf)> = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .require_git(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .flatten()
        .filter(|e| e.file_type().is_some_and(|t| t.is_file() || t.is_symlink()))
        .filter_map(|e| {
            let rel = e.path().strip_prefix(dir).ok()?.to_str()?.to_string();
            Some((rel, e.path().to_path_buf()))
        })
        .collect();
    files.sort();
    let mut diff = String::new();
    let mut more = false;
    for (rel, path) in &files {
        if diff.len() > orch_shared::job::MAX_DIFF_BYTES {
            more = true;
            break;
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let (mode, content) = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).unwrap_or_default();
            ("120000", target.to_string_lossy().into_owned().into_bytes())
        } else {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                "100755"
            } else {
                "100644"
            };
            let cap = (orch_shared::job::MAX_DIFF_BYTES + 1).saturating_sub(diff.len());
            let mut buf = Vec::new();
            if let Ok(f) = std::fs::File::open(path) {
                use std::io::Read as _;
                let _ = f.take(cap as u64).read_to_end(&mut buf);
            }
            if (buf.len() as u64) < meta.len() {
                more = true;
            }
            (mode, buf)
        };
        let _ = write!(diff, "diff --git a/{rel} b/{rel}\nnew file mode {mode}\n");
        if content.is_empty() {
            continue;
        }
        if content.contains(&0) {
            let _ = writeln!(diff, "Binary files /dev/null and b/{rel} differ");
            continue;
        }
        let text = String::from_utf8_lossy(&content);
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let range = if lines.len() == 1 {
            "1".to_string()
        } else {
            format!("1,{}", lines.len())
        };
        let _ = write!(diff, "--- /dev/null\n+++ b/{rel}\n@@ -0,0 +{range} @@\n");
        for line in &lines {
            diff.push('+');
            diff.push_str(line);
        }
        if !text.ends_with('\n') {
            diff.push_str("\n\\ No newline at end of file\n");
        }
    }
    let changed = files.into_iter().map(|(rel, _)| rel).collect();
    let diff = (!diff.is_empty()).then(|| git::cut_diff(diff.as_bytes(), more));
    (changed, diff)
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.scratch {
            return;
        }
        if self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            // `<data_dir>/scratch/<dir>` → `<data_dir>/kept/<dir>`, out of reach of the
            // clearing of stale scratch directories at start.
            if let (Some(name), Some(data)) = (
                self.path.file_name(),
                self.path.parent().and_then(Path::parent),
            ) {
                let kept = data.join("kept");
                let to = kept.join(name);
                let moved =
                    std::fs::create_dir_all(&kept).and_then(|()| std::fs::rename(&self.path, &to));
                match moved {
                    Ok(()) => {
                        tracing::warn!(path = %to.display(), "workspace with unpushed work kept")
                    }
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "workspace with unpushed work left in place")
                    }
                }
            }
            return;
        }
        // A redelivered attempt of the same job on this worker gets the same directory: move
        // this one out of its way at once (a rename), then remove it. Removing a big tree
        // blocks: do it off the async threads when there is a runtime.
        let trash = self.path.with_file_name(format!(
            ".trash-{}-{:016x}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rand::random::<u64>()
        ));
        let path = match std::fs::rename(&self.path, &trash) {
            Ok(()) => trash,
            Err(_) => self.path.clone(),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(&path);
                });
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Files an agent read and wrote, from its tool calls.
#[derive(Debug)]
pub struct FileTracker {
    root: PathBuf,
    /// The root with symlinks resolved, as git reports it.
    canonical: Option<PathBuf>,
    pending: HashMap<String, (Access, String)>,
    read: BTreeSet<String>,
    written: BTreeSet<String>,
}

impl FileTracker {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            canonical: std::fs::canonicalize(root).ok().filter(|c| c != root),
            pending: HashMap::new(),
            read: BTreeSet::new(),
            written: BTreeSet::new(),
        }
    }

    /// A path as reported: relative to the workspace when inside it, else absolute.
    fn display(&self, path: &str) -> String {
        let p = Path::new(path);
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        };
        for root in std::iter::once(&self.root).chain(self.canonical.as_ref()) {
            if let Ok(rel) = abs.strip_prefix(root)
                && !rel.as_os_str().is_empty()
            {
                return rel.display().to_string();
            }
        }
        abs.display().to_string()
    }

    /// The agent called a tool; a file tool's path counts once its result says it worked.
    pub fn on_call(&mut self, call_id: &str, name: &str, input: &Value) {
        let (access, key) = match name {
            "Read" | "NotebookRead" => (Access::Read, "file_path"),
            "Write" | "Edit" | "MultiEdit" => (Access::Write, "file_path"),
            "NotebookEdit" => (Access::Write, "notebook_path"),
            // The native tools of the chat backends' tool loop.
            "read_file" => (Access::Read, "path"),
            "write_file" | "edit_file" => (Access::Write, "path"),
            _ => return,
        };
        let path = input
            .get(key)
            .or_else(|| input.get("file_path"))
            .and_then(Value::as_str);
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            let shown = self.display(path);
            self.pending.insert(call_id.to_string(), (access, shown));
        }
    }

    /// A tool answered.
    pub fn on_result(&mut self, call_id: &str, is_error: bool) {
        if let Some((access, path)) = self.pending.remove(call_id)
            && !is_error
        {
            match access {
                Access::Read => self.read.insert(path),
                Access::Write => self.written.insert(path),
            };
        }
    }

    /// The files written so far.
    pub fn written(&self) -> impl Iterator<Item = &String> {
        self.written.iter()
    }

    /// `(files read, files written)`: a file both read and written counts as written; `git`
    /// adds the paths it saw change.
    pub fn finish(mut self, git_changed: Vec<String>) -> (Vec<String>, Vec<String>) {
        for p in git_changed {
            let shown = self.display(&p);
            self.written.insert(shown);
        }
        let read = self
            .read
            .iter()
            .filter(|p| !self.written.contains(*p))
            .cloned()
            .collect();
        (read, self.written.into_iter().collect())
    }
}

/// One `git status` entry: its two-letter status and the file's size and modification time.
type Entry = (String, Option<(u64, SystemTime)>);

/// The dirty files of the repository holding a workspace, by absolute path.
#[derive(Debug, Clone, PartialEq)]
pub struct GitSnapshot {
    entries: BTreeMap<PathBuf, Entry>,
}

async fn git(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = super::process::command("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    out.status.success().then_some(out.stdout)
}

impl GitSnapshot {
    /// The snapshot of `dir`'s repository; `None` when `dir` is not in one (or git is
    /// missing, or too much is dirty to compare).
    pub async fn take(dir: &Path) -> Option<GitSnapshot> {
        let top = git(dir, &["rev-parse", "--show-toplevel"]).await?;
        let top = PathBuf::from(String::from_utf8_lossy(&top).trim());
        let raw = git(
            dir,
            &["status", "--porcelain=v1", "-z", "--untracked-files=all"],
        )
        .await?;
        let mut entries = BTreeMap::new();
        let mut fields = raw.split(|b| *b == 0).filter(|f| !f.is_empty());
        while let Some(field) = fields.next() {
            if field.len() < 4 {
                continue;
            }
            let status = String::from_utf8_lossy(&field[..2]).to_string();
            let path = top.join(String::from_utf8_lossy(&field[3..]).as_ref());
            if status.contains('R') || status.contains('C') {
                // A rename or copy is followed by its source path.
                fields.next();
            }
            let meta = std::fs::symlink_metadata(&path)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            entries.insert(path, (status, meta));
            if entries.len() > MAX_GIT_ENTRIES {
                tracing::debug!(dir = %dir.display(), "too many dirty files to track changes with git");
                return None;
            }
        }
        Some(GitSnapshot { entries })
    }

    /// Paths whose status or content changed from `self` to `after` (absolute).
    pub fn changed(&self, after: &GitSnapshot) -> Vec<String> {
        let mut out = BTreeSet::new();
        for (path, entry) in &after.entries {
            if self.entries.get(path) != Some(entry) {
                out.insert(path.display().to_string());
            }
        }
        for path in self.entries.keys() {
            if !after.entries.contains_key(path) {
                out.insert(path.display().to_string());
            }
        }
        out.into_iter().collect()
    }
}

/// What changed in `dir`'s repository between `before` and now.
pub async fn git_changes(dir: &Path, before: Option<&GitSnapshot>) -> Vec<String> {
    let Some(before) = before else {
        return vec![];
    };
    match GitSnapshot::take(dir).await {
        Some(after) => before.changed(&after),
        None => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_file_tools_that_succeeded_count() {
        let mut t = FileTracker::new(Path::new("/ws"));
        t.on_call("1", "Read", &json!({"file_path": "/ws/src/a.rs"}));
        t.on_call(
            "2",
            "Write",
            &json!({"file_path": "/ws/src/b.rs", "content": ""}),
        );
        t.on_call("3", "Edit", &json!({"file_path": "/etc/hosts"}));
        t.on_call("4", "NotebookEdit", &json!({"notebook_path": "nb.ipynb"}));
        t.on_call("5", "Bash", &json!({"command": "cat /ws/x"}));
        t.on_call("6", "MultiEdit", &json!({"file_path": "/ws/src/a.rs"}));
        for (id, err) in [
            ("1", false),
            ("2", false),
            ("3", true),
            ("4", false),
            ("5", false),
            ("6", false),
        ] {
            t.on_result(id, err);
        }
        let (read, written) = t.finish(vec!["/ws/out.txt".into()]);
        assert!(read.is_empty(), "a.rs was read then written: {read:?}");
        assert_eq!(written, ["nb.ipynb", "out.txt", "src/a.rs", "src/b.rs"]);
    }

    #[tokio::test]
    async fn git_sees_files_a_shell_wrote_changed_or_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let sh = |script: &str| sh(dir, script);
        sh(
            "git init -q . && git config user.email t@t && git config user.name t \
            && echo a > a.txt && echo b > b.txt && echo d > dirty.txt \
            && git add . && git commit -qm init && echo changed-before > dirty.txt",
        );
        let before = GitSnapshot::take(dir).await.unwrap();
        sh("echo new > new.txt && rm b.txt && sleep 0.01 && echo again >> dirty.txt");
        let mut changed = git_changes(dir, Some(&before)).await;
        changed.iter_mut().for_each(|p| {
            *p = Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string()
        });
        assert_eq!(changed, ["b.txt", "dirty.txt", "new.txt"]);
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        assert!(GitSnapshot::take(dir).await.is_none(), "not a repository");
    }

    fn job(workspace: Workspace) -> JobSpec {
        JobSpec {
            backend: orch_shared::job::Backend::Command,
            workspace,
            ..JobSpec::new(
                orch_shared::ids::TaskId::new(),
                orch_shared::ids::JobId::new(),
                orch_shared::role::Role::Builder,
                "x",
            )
        }
    }

    /// Runs a shell script in `dir`; it must succeed.
    fn sh(dir: &Path, script: &str) {
        let ok = std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "{script}");
    }

    #[tokio::test]
    async fn a_scratch_workspace_reports_the_exact_diff_of_the_run() {
        let data = tempfile::tempdir().unwrap();
        let j = job(Workspace::Scratch);
        let dir = WorkDir::prepare(&j, data.path(), false, &CancellationToken::new())
            .await
            .unwrap();
        std::fs::create_dir_all(dir.path.join("sub")).unwrap();
        std::fs::write(dir.path.join("a.txt"), "alpha\n").unwrap();
        std::fs::write(dir.path.join("sub/b.txt"), "beta\n").unwrap();
        let changes = dir.finish(&j, true, FileTracker::new(&dir.path)).await;
        assert_eq!(changes.files_written, ["a.txt", "sub/b.txt"]);
        let diff = changes.diff.unwrap();
        assert!(
            diff.contains("new file mode")
                && diff.contains("+++ b/a.txt\n@@ -0,0 +1 @@\n+alpha")
                && diff.contains("+++ b/sub/b.txt\n@@ -0,0 +1 @@\n+beta"),
            "{diff}"
        );
        assert!(changes.git.is_none() && changes.failure.is_none());
        drop(dir);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    #[test]
    fn a_scratch_diff_is_read_without_git_like_git_writes_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".gitignore"), "target/\n").unwrap();
        std::fs::create_dir_all(d.path().join("target")).unwrap();
        std::fs::write(d.path().join("target/out.o"), "ignored").unwrap();
        std::fs::write(d.path().join("two.txt"), "a\nb").unwrap();
        std::fs::write(d.path().join("blob.bin"), [1u8, 0, 2]).unwrap();
        std::fs::write(d.path().join("empty"), "").unwrap();
        let (files, diff) = scratch_changes(d.path());
        assert_eq!(files, [".gitignore", "blob.bin", "empty", "two.txt"]);
        let diff = diff.unwrap();
        assert!(
            diff.contains("+++ b/two.txt\n@@ -0,0 +1,2 @@\n+a\n+b\n\\ No newline at end of file\n"),
            "{diff}"
        );
        assert!(
            diff.contains("Binary files /dev/null and b/blob.bin differ"),
            "{diff}"
        );
        assert!(diff.contains("diff --git a/empty b/empty\nnew file mode 100644\n"));
        assert!(!diff.contains("out.o"));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(scratch_changes(empty.path()), (vec![], None));
    }

    #[tokio::test]
    async fn a_git_workspace_whose_push_fails_is_kept_not_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let bare = tmp.path().join("origin.git");
        let seed = tmp.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        sh(tmp.path(), "git init -q --bare -b main origin.git");
        sh(
            &seed,
            "git init -q -b main && echo r > README.md && git add . \
             && git -c user.name=s -c user.email=s@s commit -qm init && git push -q ../origin.git main",
        );
        // The remote takes no more objects: every push of new work fails.
        sh(&bare, "git config receive.maxInputSize 1");
        let j = job(Workspace::Git {
            url: bare.display().to_string(),
            base_ref: "main".into(),
            job: Some(orch_shared::job::GitJob {
                branch: "orch/jobs/t/01-builder".into(),
                start: vec![],
                task_branch: "orch/t".into(),
                integrate: false,
                paths: vec![],
                sparse: None,
            }),
        });
        let dir = WorkDir::prepare(&j, &data, false, &CancellationToken::new())
            .await
            .unwrap();
        std::fs::write(dir.path.join("work.txt"), "unpushed\n").unwrap();
        let name = dir.path.file_name().unwrap().to_owned();
        let changes = dir.finish(&j, true, FileTracker::new(&dir.path)).await;
        assert!(changes.failure.is_some(), "the push failed: {changes:?}");
        drop(dir);
        let kept = data.join("kept").join(name).join("work.txt");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "unpushed\n");
    }

    #[tokio::test]
    async fn a_local_workspace_in_a_repository_gets_the_diff_of_the_files_that_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path();
        let sh = |script: &str| sh(ws, script);
        sh(
            "git init -q . && git config user.email t@t && git config user.name t \
            && echo a > a.txt && echo same > same.txt && git add . && git commit -qm init",
        );
        let j = job(Workspace::Local {
            path: ws.display().to_string(),
        });
        let dir = WorkDir::prepare(
            &j,
            Path::new("/nonexistent"),
            false,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        sh("echo changed >> a.txt && echo new > new.txt");
        let changes = dir.finish(&j, true, FileTracker::new(&dir.path)).await;
        assert_eq!(changes.files_written, ["a.txt", "new.txt"]);
        let diff = changes.diff.unwrap();
        assert!(
            diff.contains("--- a/a.txt\n+++ b/a.txt") && diff.contains("+changed"),
            "{diff}"
        );
        assert!(
            diff.contains("+++ b/new.txt") && diff.contains("+new") && !diff.contains("same.txt"),
            "{diff}"
        );
        assert!(
            ws.join("a.txt").is_file(),
            "a local workspace is never removed"
        );
    }
}
