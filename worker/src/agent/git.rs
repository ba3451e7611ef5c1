//! Git workspaces: a job works in a fresh clone of its task's repository and hands its work on
//! through branches, so agents on different workers see each other's changes.
//!
//! - **Clone cache**: each worker keeps a bare mirror per repository,
//!   `<data_dir>/git-cache/<hash of url>.git`, fetched before every job under a per-url lock (two
//!   jobs on one worker never fetch into one cache at once; jobs that waited for the lock while
//!   a fetch ran share the next one). The job's clone is made from the cache and borrows its
//!   objects (`git clone --shared`): no object is copied and only the cache's fetch crosses the
//!   network, so a job costs the checkout of its files. Its `origin` is the real url and its
//!   `origin/HEAD` the remote's default branch, as the cache fetched them.
//! - **Start**: the parents' branches ([`GitJob::start`]) that exist on `origin`, the first one
//!   checked out and the others merged in order; `base_ref` when none exists (`HEAD`: the
//!   remote's default branch). Parents whose branches conflict fail the job with `bad_request`
//!   (running it again cannot help). The agent works on a local branch named after
//!   [`GitJob::branch`], with a committer identity of its own so commits work on any machine.
//! - **Finish**, when the agent succeeded: everything is committed with a generated message and
//!   pushed with force to the job's branch (a redelivered attempt overwrites its own branch).
//!   Then the task branch is rebuilt: from `base_ref`, the job branches of the task (the branches
//!   next to [`GitJob::branch`]) that no later one contains are merged in name order
//!   (fast-forward when possible), and the result is pushed with `--force-with-lease`; when
//!   another finisher got there first, everything is fetched again and rebuilt. One refinement:
//!   the branches the task branch already contains are merged first, so work that was merged
//!   stays merged and a conflict falls on the newcomer, which is skipped (its job reports the
//!   files in [`GitOutcome::conflicts`]). Merges into the task branch carry the date of their
//!   newest parent, so rebuilding the same merge gives the same commit. A job whose agent failed
//!   pushes nothing.
//! - **Integrators** ([`GitJob::integrate`]): the job's starts are the task branch and the
//!   branch that did not merge into it; when that merge conflicts, it is left in progress for
//!   the agent (`diff3` markers, so the common ancestor shows), the job fails (`agent_error`,
//!   retried) if a conflicted file still holds a marker when the agent ends, and the commit is
//!   the merge (made even when the result equals the task branch), so the other side becomes
//!   part of the task branch.
//! - **Failures**: a repository that cannot be fetched or a job branch that cannot be pushed is
//!   `network` (retryable); a ref that does not exist is `bad_request`. A task branch that
//!   cannot be moved leaves the job successful, with `merged: false` and the reason.
//!
//! Git never prompts (`GIT_TERMINAL_PROMPT=0`, ssh in batch mode), runs no hooks, and every
//! command is killed when the job's future is dropped.

use orch_shared::job::{FailureReason, GitJob, GitOutcome, JobSpec, MAX_DIFF_BYTES};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Longest any one git command may take (a clone of a big repository included).
const GIT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Attempts at pushing the job's own branch.
const PUSH_ATTEMPTS: u32 = 3;
/// Attempts at moving the task branch (another finisher may win each round).
const TASK_BRANCH_ATTEMPTS: u32 = 10;
/// Longest prompt line in a commit subject, in characters.
const SUBJECT_MAX: usize = 72;
/// Who commits, in every clone.
pub(crate) const USER_NAME: &str = "orchestrator";
pub(crate) const USER_EMAIL: &str = "orchestrator@localhost";
/// Where the task branch and the job branches are fetched to while the task branch is rebuilt.
const SYNC_TASK: &str = "refs/orch-sync/task";
const SYNC_JOBS: &str = "refs/orch-sync/jobs/";

/// Why a git workspace could not be prepared or its work kept.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub reason: FailureReason,
    pub message: String,
}

impl Error {
    fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    fn network(message: impl Into<String>) -> Self {
        Self::new(FailureReason::Network, message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(FailureReason::BadRequest, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(FailureReason::Internal, message)
    }
}

/// What one git command did.
#[derive(Debug)]
pub(crate) struct Out {
    pub ok: bool,
    /// The exit code (`None`: killed, timed out or never started).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The output, trimmed.
    pub fn text(&self) -> &str {
        self.stdout.trim()
    }

    /// Why it failed, in one line: git's first `fatal:` line, else the remote's error, else a
    /// refused ref (`! [rejected] ...`), else its first `error:` line, else its first line.
    pub fn why(&self) -> String {
        let lines = || self.stderr.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = |p: &dyn Fn(&str) -> bool| lines().find(|l| p(l));
        first(&|l| l.starts_with("fatal:"))
            .or_else(|| {
                first(&|l| l.starts_with("remote: error:") || l.starts_with("remote: fatal:"))
            })
            .or_else(|| first(&|l| l.starts_with("! ")))
            .or_else(|| first(&|l| l.starts_with("error:")))
            .or_else(|| lines().next())
            .unwrap_or("git failed without a message")
            .to_string()
    }
}

/// `git -C dir` with an environment that never prompts, runs no hooks and speaks English,
/// under the supervisor.
fn command(dir: &Path) -> Command {
    configured(super::process::command("git"), dir)
}

/// `cmd` (git, supervised or not) as [`command`] sets it up.
fn configured(mut cmd: Command, dir: &Path) -> Command {
    cmd.arg("-C")
        .arg(dir)
        .args(["-c", "core.hooksPath=/dev/null"])
        .args(["-c", "commit.gpgSign=false", "-c", "tag.gpgSign=false"])
        .args(["-c", "advice.detachedHead=false"])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        // Variables that would point git at another repository than the one asked for.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .env_remove("GIT_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if std::env::var_os("GIT_SSH_COMMAND").is_none() && std::env::var_os("GIT_SSH").is_none() {
        // ssh must fail rather than ask for a password or a host key.
        cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    cmd
}

/// Runs git in `dir` with extra environment variables.
pub(crate) async fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    run(command(dir), args, env).await
}

/// Runs git in `dir` with extra environment variables, started straight from the worker
/// instead of under the supervisor (two `exec`s of the worker binary fewer). Only for the
/// checkpoints' short local commands (`custody`: `update-index`, `add`, `write-tree`,
/// `diff-index`), which end on their own and write nothing but the checkpoints' temporary
/// index and new objects: one that outlives a killed worker finishes and exits, harmless
/// (ARCHITECTURE.md, the supervisor's invariant).
pub(crate) async fn git_env_unsupervised(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    run(configured(Command::new("git"), dir), args, env).await
}

/// Runs `cmd` (from [`command`]) with `args` and extra environment variables `env`.
async fn run(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Out {
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let failed = |stderr: String| Out {
        ok: false,
        code: None,
        stdout: String::new(),
        stderr,
    };
    match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => Out {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => failed(format!("fatal: failed to run git: {e}")),
        Err(_) => failed(format!(
            "fatal: git {} took longer than {}",
            args.first().unwrap_or(&""),
            humantime::format_duration(GIT_TIMEOUT)
        )),
    }
}

/// Runs git in `dir`.
pub(crate) async fn git(dir: &Path, args: &[&str]) -> Out {
    git_env(dir, args, &[]).await
}

/// Runs git in `dir` and keeps at most `max` bytes of its output; `None` when it failed (exit
/// codes 0 and 1 count as success: a diff with `--no-index` exits 1 when files differ). The
/// flag says whether there was more.
async fn git_capped(dir: &Path, args: &[&str], max: usize) -> Option<(Vec<u8>, bool)> {
    let mut cmd = command(dir);
    cmd.args(args).stderr(Stdio::null());
    let run = async {
        let mut child = cmd.spawn().ok()?;
        let mut stdout = child.stdout.take()?;
        let mut buf = Vec::new();
        (&mut stdout)
            .take(max as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .ok()?;
        // Closing the pipe stops a git that has more to say.
        drop(stdout);
        let status = child.wait().await.ok()?;
        let more = buf.len() > max;
        if !more && !matches!(status.code(), Some(0 | 1)) {
            return None;
        }
        buf.truncate(max);
        Some((buf, more))
    };
    tokio::time::timeout(GIT_TIMEOUT, run).await.ok().flatten()
}

/// A diff as reported: at most [`MAX_DIFF_BYTES`], cut at a line end, with a last line saying
/// so when it was cut.
pub(crate) fn cut_diff(raw: &[u8], more: bool) -> String {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    if !more && text.len() <= MAX_DIFF_BYTES {
        return text;
    }
    let mut end = text.len().min(MAX_DIFF_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end = text[..end].rfind('\n').map_or(0, |i| i + 1);
    text.truncate(end);
    text.push_str(&format!("[diff cut: longer than {MAX_DIFF_BYTES} bytes]\n"));
    text
}

/// Git's diff of `args` (`git diff <args>`), cut at [`MAX_DIFF_BYTES`].
pub(crate) async fn diff(dir: &Path, args: &[&str]) -> Option<String> {
    let mut all = vec!["diff", "--no-color", "--no-ext-diff", "--no-renames"];
    all.extend_from_slice(args);
    let (raw, more) = git_capped(dir, &all, MAX_DIFF_BYTES).await?;
    Some(cut_diff(&raw, more))
}

/// The paths `git diff --name-only <args>` names.
pub(crate) async fn diff_names(dir: &Path, args: &[&str]) -> Option<Vec<String>> {
    let mut all = vec!["diff", "--name-only", "-z", "--no-renames"];
    all.extend_from_slice(args);
    let out = git(dir, &all).await;
    out.ok.then(|| {
        out.stdout
            .split('\0')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// What the working tree of `dir` changed since `base`, untracked files included (it stages
/// everything: only for a workspace the job owns).
pub(crate) async fn staged_changes(dir: &Path, base: &str) -> Option<(Vec<String>, String)> {
    if !git(dir, &["add", "-A", "--sparse"]).await.ok {
        return None;
    }
    let names = diff_names(dir, &["--cached", base]).await?;
    let diff = diff(dir, &["--cached", base]).await?;
    Some((names, diff))
}

/// The diff of `paths` (absolute, in `dir`'s repository) against `HEAD`; untracked ones show
/// as added. Without staging anything: `dir` is the user's.
pub(crate) async fn worktree_diff(dir: &Path, paths: &[String]) -> Option<String> {
    /// More paths than this and the diff is not worth a command line this long.
    const MAX_PATHS: usize = 2000;
    if paths.is_empty() || paths.len() > MAX_PATHS {
        return None;
    }
    let top = git(dir, &["rev-parse", "--show-toplevel"]).await;
    if !top.ok {
        return None;
    }
    let top = PathBuf::from(top.text());
    let mut args = vec!["ls-files", "--others", "--exclude-standard", "-z", "--"];
    args.extend(paths.iter().map(String::as_str));
    let untracked: Vec<String> = git(&top, &args)
        .await
        .stdout
        .split('\0')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let untracked_abs: Vec<PathBuf> = untracked.iter().map(|p| top.join(p)).collect();
    let tracked: Vec<&str> = paths
        .iter()
        .filter(|p| !untracked_abs.iter().any(|u| u == Path::new(p)))
        .map(String::as_str)
        .collect();
    let mut raw = Vec::new();
    let mut more = false;
    if !tracked.is_empty() {
        let mut args = vec![
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-renames",
            "HEAD",
            "--",
        ];
        args.extend(tracked.iter().copied());
        if let Some((out, cut)) = git_capped(&top, &args, MAX_DIFF_BYTES).await {
            raw.extend(out);
            more |= cut;
        }
    }
    for path in &untracked {
        if more || raw.len() > MAX_DIFF_BYTES {
            more = true;
            break;
        }
        let args = [
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--no-index",
            "--",
            "/dev/null",
            path.as_str(),
        ];
        if let Some((out, cut)) = git_capped(&top, &args, MAX_DIFF_BYTES).await {
            raw.extend(out);
            more |= cut;
        }
    }
    Some(cut_diff(&raw, more))
}

/// A clone cache's lock; it holds when the last successful fetch into the cache started.
type CacheLock = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// Locks on the clone caches of this process, by cache path.
static CACHE_LOCKS: LazyLock<Mutex<HashMap<PathBuf, CacheLock>>> = LazyLock::new(Default::default);

fn cache_lock(cache: &Path) -> CacheLock {
    let mut locks = CACHE_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(cache.to_path_buf()).or_default().clone()
}

/// A name for `url` that is the same on every build (64-bit FNV-1a; std's hasher may change).
fn url_hash(url: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The clone cache of `url` on a worker with `data_dir`.
pub fn cache_path(data_dir: &Path, url: &str) -> PathBuf {
    data_dir
        .join("git-cache")
        .join(format!("{}.git", url_hash(url)))
}

/// Removes the lock files a git killed in the middle of a fetch left in `cache` (they would
/// fail every later fetch). Only for a cache whose lock this process holds: a data directory
/// belongs to one worker, so no other git can be using it.
fn clear_stale_locks(cache: &Path) {
    fn walk(dir: &Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && depth > 0 {
                walk(&path, depth - 1);
            } else if path.extension().is_some_and(|x| x == "lock") {
                tracing::info!(file = %path.display(), "removing a stale git lock from the clone cache");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    walk(cache, 0);
    walk(&cache.join("refs"), 16);
}

/// Brings the cache at `cache` up to date with `url`, creating it the first time. The caller
/// holds the cache's lock.
async fn refresh_cache(cache: &Path, url: &str) -> Result<(), Error> {
    if tokio::fs::try_exists(cache.join("HEAD"))
        .await
        .unwrap_or(false)
    {
        clear_stale_locks(cache);
    } else {
        let parent = cache.parent().unwrap_or(cache);
        tokio::fs::create_dir_all(parent).await.map_err(|e| {
            Error::internal(format!(
                "failed to create the clone cache {}: {e}",
                parent.display()
            ))
        })?;
        // Made aside and renamed, so a crash never leaves a cache without its remote.
        let tmp = parent.join(format!(
            "{}.new-{:08x}",
            url_hash(url),
            rand::random::<u32>()
        ));
        let tmp_s = tmp.display().to_string();
        let init = git(parent, &["init", "-q", "--bare", &tmp_s]).await;
        // The remote has a url and no fetch refspec: the fetch below names its own.
        let configured = init.ok && git(&tmp, &["config", "remote.origin.url", url]).await.ok;
        if !configured || tokio::fs::rename(&tmp, cache).await.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            if !tokio::fs::try_exists(cache.join("HEAD"))
                .await
                .unwrap_or(false)
            {
                return Err(Error::internal(format!(
                    "failed to create the clone cache {}: {}",
                    cache.display(),
                    init.why()
                )));
            }
        }
    }
    let fetch = |with_head: bool| {
        let mut args = vec![
            "fetch",
            "-q",
            "--prune",
            "origin",
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ];
        if with_head {
            // The remote's default branch, what a clone's `origin/HEAD` names.
            args.push(FETCH_REMOTE_HEAD);
        }
        async move { git(cache, &args).await }
    };
    let mut out = fetch(true).await;
    if !out.ok {
        // A remote without a default branch (empty, or its HEAD names no branch): the rest.
        let _ = git(cache, &["update-ref", "-d", REMOTE_HEAD]).await;
        out = fetch(false).await;
    }
    if !out.ok {
        return Err(Error::network(format!(
            "failed to fetch {url}: {}",
            out.why()
        )));
    }
    Ok(())
}

/// Where the clone cache keeps the commit of the remote's `HEAD`.
const REMOTE_HEAD: &str = "refs/orch/remote-head";
const FETCH_REMOTE_HEAD: &str = "+HEAD:refs/orch/remote-head";

/// A job's clone, checked out where its agent starts.
#[derive(Debug)]
pub struct Checkout {
    url: String,
    base_ref: String,
    /// The commit `base_ref` named when the job started.
    base_ref_commit: String,
    /// The commit the agent started from: `base_ref`'s, or the merge of the parents' branches.
    pub base: String,
    job: Option<GitJob>,
    /// An integrator's job: the files whose conflicts it was left to resolve.
    pub conflicted: Vec<String>,
    /// A sparse checkout: the directories it holds (besides the top-level files).
    pub sparse: Option<Vec<String>>,
}

/// Whether `name` is a valid branch name.
async fn valid_branch(dir: &Path, name: &str) -> bool {
    !name.starts_with('-')
        && git(dir, &["check-ref-format", &format!("refs/heads/{name}")])
            .await
            .ok
}

/// The commit `rev` names in `dir`, if any.
async fn commit_of(dir: &Path, rev: &str) -> Option<String> {
    let out = git(
        dir,
        &["rev-parse", "-q", "--verify", &format!("{rev}^{{commit}}")],
    )
    .await;
    out.ok.then(|| out.text().to_string())
}

/// Whether `a` is an ancestor of (or is) `b`.
async fn is_ancestor(dir: &Path, a: &str, b: &str) -> bool {
    git(dir, &["merge-base", "--is-ancestor", a, b]).await.ok
}

/// How a merge went.
enum Merge {
    Merged,
    /// It conflicted in these files (and was aborted).
    Conflict(Vec<String>),
    Failed(String),
}

/// Merges `rev` into `HEAD` (a fast-forward when possible). The merge commit carries the date
/// of its newest parent, so the same merge always gives the same commit.
async fn merge(dir: &Path, rev: &str, message: &str) -> Merge {
    merge_keeping(dir, rev, message, false).await
}

/// [`merge`]; with `keep_conflicts`, a merge that conflicts is left in progress (markers in
/// the files, `MERGE_HEAD` set) instead of aborted.
async fn merge_keeping(dir: &Path, rev: &str, message: &str, keep_conflicts: bool) -> Merge {
    let dates = git(dir, &["show", "-s", "--format=%ct", "HEAD", rev]).await;
    let newest = dates
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let date = format!("@{newest} +0000");
    // A conflict left to an integrator shows the common ancestor too (`diff3`): what each side
    // changed, not only where they ended up.
    let style = if keep_conflicts { "diff3" } else { "merge" };
    let style = format!("merge.conflictStyle={style}");
    let out = git_env(
        dir,
        &[
            "-c",
            &style,
            "merge",
            "-q",
            "--ff",
            "--no-edit",
            "-m",
            message,
            rev,
        ],
        &[
            ("GIT_AUTHOR_DATE", date.as_str()),
            ("GIT_COMMITTER_DATE", date.as_str()),
        ],
    )
    .await;
    if out.ok {
        return Merge::Merged;
    }
    let files = diff_names(dir, &["--diff-filter=U"])
        .await
        .unwrap_or_default();
    if keep_conflicts && !files.is_empty() {
        return Merge::Conflict(files);
    }
    let _ = git(dir, &["merge", "--abort"]).await;
    if files.is_empty() {
        Merge::Failed(out.why())
    } else {
        Merge::Conflict(files)
    }
}

/// Clones `url` into the empty directory `dir` through the worker's clone cache under
/// `data_dir`, and checks out where the job starts (see the module docs).
///
/// With `sparse` (the worker's default; the job's [`GitJob::sparse`] wins) and a job that
/// declared [`GitJob::paths`], only the directories of those paths and the top-level files
/// are checked out ([`sparse_dirs`]).
pub async fn checkout(
    dir: &Path,
    data_dir: &Path,
    url: &str,
    base_ref: &str,
    job: Option<&GitJob>,
    sparse: bool,
) -> Result<Checkout, Error> {
    let base_ref = check_inputs(dir, url, base_ref, job).await?;
    clone_through_cache(dir, data_dir, url).await?;
    let cone = sparse_scope(job, sparse);
    if let Some(dirs) = &cone {
        let mut args = vec!["sparse-checkout", "set", "--cone", "--"];
        args.extend(dirs.iter().map(String::as_str));
        let out = git(dir, &args).await;
        if !out.ok {
            return Err(Error::internal(format!(
                "failed to set up the sparse checkout: {}",
                out.why()
            )));
        }
    }
    let base_ref_commit = resolve_base_ref(dir, url, base_ref).await?;
    let conflicted = check_out_start(dir, job, &base_ref_commit).await?;
    let base = commit_of(dir, "HEAD")
        .await
        .ok_or_else(|| Error::internal("the clone has no HEAD after checkout"))?;
    Ok(Checkout {
        url: url.to_string(),
        base_ref: base_ref.to_string(),
        base_ref_commit,
        base,
        job: job.cloned(),
        conflicted,
        sparse: cone,
    })
}

/// The directories `job`'s sparse checkout holds, when it gets one: it declared paths that
/// allow one, and its task asked for it (`sparse`, the worker's default, when it did not say).
pub fn sparse_scope(job: Option<&GitJob>, sparse: bool) -> Option<Vec<String>> {
    job.filter(|j| j.sparse.unwrap_or(sparse))
        .and_then(|j| sparse_dirs(&j.paths))
}

/// What the agent of a sparse checkout of `dirs` is told about its workspace.
pub fn sparse_note(dirs: &[String]) -> String {
    let held = if dirs.is_empty() {
        "only the files at the top of the repository are".to_string()
    } else {
        format!(
            "only {} and the files at the top of the repository (and directly in the parents \
             of those directories) are",
            dirs.iter()
                .map(|d| format!("`{d}/`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "## Workspace\nThis is a sparse checkout of the repository: {held} checked out, for \
         the paths this step declared. The other files exist in the repository but not here; \
         they are not deleted, and your commit changes only the files you write. Run `git \
         sparse-checkout add DIR` if you need another directory.\n"
    )
}

/// The directories a sparse checkout of the file scope `paths` holds (cone mode: each one
/// whole, with the files directly in its parents and at the top), or `None` when the scope
/// needs the whole tree (no paths, or a glob whose first directory is a wildcard such as
/// `**/*.rs`). A glob's directory is its literal start: `src/a/**` and `src/a/*.rs` give
/// `src/a`, `src/*/mod.rs` gives `src`; `*.md` needs none (top-level files are always there).
/// A path without wildcards may be a file or a directory: both it and its parent are taken.
pub fn sparse_dirs(paths: &[String]) -> Option<Vec<String>> {
    let wild = |part: &str| part.contains(['*', '?', '[', '{']);
    let mut dirs = std::collections::BTreeSet::new();
    for p in paths {
        let parts: Vec<&str> = p
            .trim()
            .trim_end_matches('/')
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        match parts.iter().position(|part| wild(part)) {
            // A literal path: a file (its directory) or a directory (itself).
            None if parts.is_empty() => return None,
            None => {
                if parts.len() > 1 {
                    dirs.insert(parts[..parts.len() - 1].join("/"));
                }
                dirs.insert(parts.join("/"));
            }
            // A wildcard in the last part names files of the directory before it.
            Some(i) if i + 1 == parts.len() => {
                if i > 0 {
                    dirs.insert(parts[..i].join("/"));
                }
            }
            // A wildcard directory at the top: anything may match.
            Some(0) => return None,
            Some(i) => {
                dirs.insert(parts[..i].join("/"));
            }
        }
    }
    (!paths.is_empty()).then(|| dirs.into_iter().collect())
}

/// The ref to start from (`HEAD` when none is named), once the url, the ref and the job's
/// branch names are known to be usable.
async fn check_inputs<'a>(
    dir: &Path,
    url: &str,
    base_ref: &'a str,
    job: Option<&GitJob>,
) -> Result<&'a str, Error> {
    if url.trim().is_empty() || url.starts_with('-') {
        return Err(Error::bad_request(format!(
            "workspace url `{url}` is not a repository url"
        )));
    }
    let base_ref = if base_ref.trim().is_empty() {
        "HEAD"
    } else {
        base_ref.trim()
    };
    if base_ref.starts_with('-') {
        return Err(Error::bad_request(format!("ref `{base_ref}` is not a ref")));
    }
    if let Some(j) = job {
        for name in [&j.branch, &j.task_branch].into_iter().chain(&j.start) {
            if !valid_branch(dir, name).await {
                return Err(Error::bad_request(format!(
                    "`{name}` is not a valid branch name"
                )));
            }
        }
    }
    Ok(base_ref)
}

/// Brings the clone cache of `url` up to date and clones from it into `dir`, with the
/// committer identity of every clone.
async fn clone_through_cache(dir: &Path, data_dir: &Path, url: &str) -> Result<(), Error> {
    let cache = cache_path(data_dir, url);
    let dir_s = dir.display().to_string();
    let asked = Instant::now();
    let head = {
        let lock = cache_lock(&cache);
        let mut last_fetch = lock.lock().await;
        // A fetch that started after this job asked saw all it needs: jobs that start
        // together share one fetch.
        if last_fetch.is_none_or(|at| at < asked) {
            let started = Instant::now();
            refresh_cache(&cache, url).await?;
            *last_fetch = Some(started);
        }
        // Under the lock too: a fetch into the cache may repack what the clone is reading.
        // The clone borrows the cache's objects (nothing is copied, nothing crosses the
        // network): its refs are the cache's, just fetched.
        let cache_s = cache.display().to_string();
        let parent = dir.parent().unwrap_or(dir);
        let out = git(
            parent,
            &[
                "clone",
                "-q",
                "--no-checkout",
                "--shared",
                "--",
                &cache_s,
                &dir_s,
            ],
        )
        .await;
        if !out.ok {
            return Err(Error::internal(format!(
                "failed to clone {url} from the clone cache: {}",
                out.why()
            )));
        }
        commit_of(&cache, REMOTE_HEAD).await
    };
    let mut setup: Vec<Vec<&str>> = vec![
        vec!["remote", "set-url", "origin", url],
        vec!["config", "user.name", USER_NAME],
        vec!["config", "user.email", USER_EMAIL],
    ];
    setup.push(match &head {
        Some(commit) => vec![
            "update-ref",
            "--no-deref",
            "refs/remotes/origin/HEAD",
            commit,
        ],
        None => vec!["update-ref", "--no-deref", "-d", "refs/remotes/origin/HEAD"],
    });
    for args in setup {
        let out = git(dir, &args).await;
        if !out.ok {
            return Err(Error::internal(format!(
                "failed to configure the clone: {}",
                out.why()
            )));
        }
    }
    Ok(())
}

/// The commit `base_ref` names in the clone: a branch of `origin`, a tag, or any revision.
async fn resolve_base_ref(dir: &Path, url: &str, base_ref: &str) -> Result<String, Error> {
    let candidates = if base_ref == "HEAD" {
        vec!["refs/remotes/origin/HEAD".to_string()]
    } else {
        vec![
            format!("refs/remotes/origin/{base_ref}"),
            format!("refs/tags/{base_ref}"),
            base_ref.to_string(),
        ]
    };
    for c in &candidates {
        if let Some(commit) = commit_of(dir, c).await {
            return Ok(commit);
        }
    }
    Err(Error::bad_request(if base_ref == "HEAD" {
        format!("{url} has no default branch (is it empty?)")
    } else {
        format!("ref `{base_ref}` does not exist in {url}")
    }))
}

/// Checks out where the job starts: the first of its parents' branches that exist, the others
/// merged in order, else `base_ref_commit`; on the job's local branch when it has one. For an
/// integrator ([`GitJob::integrate`]) the last merge may be left conflicted: the files in
/// conflict are returned.
async fn check_out_start(
    dir: &Path,
    job: Option<&GitJob>,
    base_ref_commit: &str,
) -> Result<Vec<String>, Error> {
    let integrate = job.is_some_and(|j| j.integrate);
    let mut starts = vec![];
    for b in job.map(|j| j.start.as_slice()).unwrap_or_default() {
        if let Some(commit) = commit_of(dir, &format!("refs/remotes/origin/{b}")).await {
            starts.push((b.clone(), commit));
        }
    }
    let first = starts
        .first()
        .map_or(base_ref_commit.to_string(), |(_, c)| c.clone());
    let out = match job {
        Some(j) => {
            git(
                dir,
                &[
                    "checkout",
                    "-q",
                    "-f",
                    "--no-track",
                    "-B",
                    &j.branch,
                    &first,
                ],
            )
            .await
        }
        None => git(dir, &["checkout", "-q", "-f", "--detach", &first]).await,
    };
    if !out.ok {
        return Err(Error::internal(format!(
            "failed to check out {first}: {}",
            out.why()
        )));
    }
    for (i, (branch, commit)) in starts.iter().enumerate().skip(1) {
        // Only the last merge can be left to the agent: git holds one merge at a time.
        let keep = integrate && i + 1 == starts.len();
        match merge_keeping(dir, commit, &format!("Merge {branch}"), keep).await {
            Merge::Merged => {}
            Merge::Conflict(files) if keep => return Ok(files),
            Merge::Conflict(files) => {
                let merged: Vec<&str> = starts[..i].iter().map(|(b, _)| b.as_str()).collect();
                return Err(Error::bad_request(format!(
                    "the parents' branches {} and {branch} conflict in {}",
                    merged.join(", "),
                    files.join(", ")
                )));
            }
            Merge::Failed(why) => {
                return Err(Error::internal(format!("failed to merge {branch}: {why}")));
            }
        }
    }
    Ok(vec![])
}

/// The files of `files` (relative to `dir`) that still hold a conflict marker line.
async fn with_markers(dir: &Path, files: &[String]) -> Vec<String> {
    let mut left = vec![];
    for f in files {
        let Ok(text) = tokio::fs::read(dir.join(f)).await else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        if text.lines().any(|l| {
            l.starts_with("<<<<<<< ")
                || l.starts_with("||||||| ")
                || l.starts_with(">>>>>>> ")
                || l == "======="
        }) {
            left.push(f.clone());
        }
    }
    left
}

/// The commit message of `job`'s work: `<role>: <first line of the prompt>`, then its ids.
pub fn commit_message(job: &JobSpec) -> String {
    let first = job
        .prompt
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no prompt)");
    let subject = if first.chars().count() > SUBJECT_MAX {
        let mut s: String = first.chars().take(SUBJECT_MAX - 1).collect();
        s.push('…');
        s
    } else {
        first.to_string()
    };
    format!(
        "{}: {subject}\n\nTask: {}\nJob: {} (attempt {})\n",
        job.role, job.task_id, job.job_id, job.attempt
    )
}

/// What a finished job leaves: the files it changed (`git diff --name-only base..commit`),
/// the diff, and for a job that pushed, its outcome.
#[derive(Debug)]
pub struct Finish {
    pub files: Vec<String>,
    pub diff: String,
    pub git: Option<GitOutcome>,
}

/// The short pause before attempt `n` (from 1) of something another worker may be racing.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(50 * u64::from(n) + rand::random_range(0..100))
}

/// A job branch of the task and its tip.
type Tip = (String, String);

impl Checkout {
    /// The job ended: commit and push its work when the agent succeeded (see the module docs).
    pub async fn finish(&self, dir: &Path, job: &JobSpec, success: bool) -> Result<Finish, Error> {
        let Some(gj) = self.job.as_ref().filter(|_| success) else {
            // Nothing is kept: report what the agent changed against its start.
            let (files, diff) = staged_changes(dir, &self.base).await.unwrap_or_default();
            return Ok(Finish {
                files,
                diff,
                git: None,
            });
        };
        let unresolved = with_markers(dir, &self.conflicted).await;
        if !unresolved.is_empty() {
            return Err(Error::new(
                FailureReason::AgentError,
                format!(
                    "the integrator left conflict markers in {}",
                    unresolved.join(", ")
                ),
            ));
        }
        let commit = commit_work(dir, job).await?;
        self.push_job_branch(dir, gj).await?;
        let files = diff_names(dir, &[&self.base, &commit])
            .await
            .unwrap_or_default();
        let diff = diff(dir, &[&self.base, &commit]).await.unwrap_or_default();
        let (merged, conflicts) = self.move_task_branch(dir, gj, &commit).await;
        Ok(Finish {
            files,
            diff,
            git: Some(GitOutcome {
                branch: gj.branch.clone(),
                commit,
                base: self.base.clone(),
                merged,
                conflicts,
            }),
        })
    }

    /// Pushes `HEAD` to the job's branch with force (a redelivered attempt overwrites its own
    /// branch), trying again after a short pause.
    async fn push_job_branch(&self, dir: &Path, gj: &GitJob) -> Result<(), Error> {
        let target = format!("HEAD:refs/heads/{}", gj.branch);
        let mut pushed = git(dir, &["push", "-q", "--force", "origin", &target]).await;
        for n in 1..PUSH_ATTEMPTS {
            if pushed.ok {
                break;
            }
            tokio::time::sleep(backoff(n) * 4).await;
            pushed = git(dir, &["push", "-q", "--force", "origin", &target]).await;
        }
        if !pushed.ok {
            return Err(Error::network(format!(
                "failed to push {} to {}: {}",
                gj.branch,
                self.url,
                pushed.why()
            )));
        }
        Ok(())
    }

    /// Moves the task branch to the merge of the task's job branches; `(merged, conflicts)`
    /// for `own` (this job's commit).
    async fn move_task_branch(&self, dir: &Path, gj: &GitJob, own: &str) -> (bool, Vec<String>) {
        let mut why = String::new();
        for n in 1..=TASK_BRANCH_ATTEMPTS {
            if n > 1 {
                tokio::time::sleep(backoff(n)).await;
            }
            match self.rebuild_task_branch(dir, gj, own).await {
                Ok(done) => return done,
                Err(e) => {
                    tracing::debug!(attempt = n, error = %e, branch = %gj.task_branch, "task branch not moved, trying again");
                    why = e;
                }
            }
        }
        tracing::warn!(branch = %gj.task_branch, error = %why, "gave up moving the task branch");
        (
            false,
            vec![format!(
                "moving {} failed {TASK_BRANCH_ATTEMPTS} times: {why}",
                gj.task_branch
            )],
        )
    }

    /// One round of [`Checkout::move_task_branch`]; `Err` when it should be tried again.
    async fn rebuild_task_branch(
        &self,
        dir: &Path,
        gj: &GitJob,
        own: &str,
    ) -> Result<(bool, Vec<String>), String> {
        let task_ref = format!("refs/heads/{}", gj.task_branch);
        let (task_listed, jobs) = list_task_branches(dir, gj, &task_ref).await?;
        let (task_tip, tips) = fetch_task_branches(dir, &task_ref, task_listed, &jobs).await?;
        let order = merge_order(dir, task_tip.as_deref(), tips).await;
        let out = git(
            dir,
            &["checkout", "-q", "-f", "--detach", &self.base_ref_commit],
        )
        .await;
        if !out.ok {
            return Err(format!(
                "failed to check out {}: {}",
                self.base_ref,
                out.why()
            ));
        }
        let mut conflicts = merge_job_branches(dir, gj, own, &order).await?;
        let result = commit_of(dir, "HEAD")
            .await
            .ok_or("no HEAD after merging")?;
        if task_tip.as_deref() != Some(result.as_str()) {
            push_task_branch(dir, gj, &task_ref, task_tip.as_deref()).await?;
        }
        let merged = is_ancestor(dir, own, &result).await;
        if !merged && conflicts.is_empty() {
            conflicts.push(format!(
                "{} does not contain this job's commit",
                gj.task_branch
            ));
        }
        Ok((merged, conflicts))
    }
}

/// Stages and commits everything the agent changed (when it changed anything) with a
/// generated message; the commit the job ends on.
async fn commit_work(dir: &Path, job: &JobSpec) -> Result<String, Error> {
    // `--sparse`: a file the agent wrote outside a sparse checkout's cone is its work too
    // (without it git refuses the whole `add`); the files the cone leaves out are absent
    // but not deleted (their index entries are marked skip-worktree, which `add` keeps).
    let add = git(dir, &["add", "-A", "--sparse"]).await;
    if !add.ok {
        return Err(Error::internal(format!(
            "failed to stage the agent's changes: {}",
            add.why()
        )));
    }
    let staged = git(dir, &["diff", "--cached", "--quiet"]).await;
    // An integrator's merge is committed even when its result equals `HEAD`: the commit's
    // second parent is what tells the task branch that the other side is merged.
    let merging = commit_of(dir, "MERGE_HEAD").await.is_some();
    if staged.code == Some(1) || merging {
        let out = git(dir, &["commit", "-q", "-m", &commit_message(job)]).await;
        if !out.ok {
            return Err(Error::internal(format!(
                "failed to commit the agent's changes: {}",
                out.why()
            )));
        }
    }
    commit_of(dir, "HEAD")
        .await
        .ok_or_else(|| Error::internal("the clone has no HEAD after the commit"))
}

/// Whether `origin` has the task branch `task_ref`, and the job branches of the task (the
/// ones next to this job's, `orch/<task>/...`), in name order.
async fn list_task_branches(
    dir: &Path,
    gj: &GitJob,
    task_ref: &str,
) -> Result<(bool, Vec<String>), String> {
    let prefix = match gj.branch.rfind('/') {
        Some(i) => format!("refs/heads/{}", &gj.branch[..=i]),
        None => format!("refs/heads/{}", gj.branch),
    };
    let pattern = if prefix.ends_with('/') {
        format!("{prefix}*")
    } else {
        prefix.clone()
    };
    let listed = git(dir, &["ls-remote", "origin", task_ref, &pattern]).await;
    if !listed.ok {
        return Err(format!(
            "failed to list the task's branches: {}",
            listed.why()
        ));
    }
    let mut task_listed = false;
    let mut jobs = vec![];
    for line in listed.stdout.lines() {
        let Some((_, name)) = line.split_once('\t') else {
            continue;
        };
        if name == task_ref {
            task_listed = true;
        } else if name.starts_with(&prefix) && name != task_ref {
            jobs.push(name.trim_start_matches("refs/heads/").to_string());
        }
    }
    jobs.sort();
    Ok((task_listed, jobs))
}

/// Fetches the task branch (when `task_listed`) and the job branches `jobs` to the sync refs;
/// the task branch's tip and the job branches' tips.
async fn fetch_task_branches(
    dir: &Path,
    task_ref: &str,
    task_listed: bool,
    jobs: &[String],
) -> Result<(Option<String>, Vec<Tip>), String> {
    let mut refspecs = vec![];
    if task_listed {
        refspecs.push(format!("+{task_ref}:{SYNC_TASK}"));
    } else {
        let _ = git(dir, &["update-ref", "-d", SYNC_TASK]).await;
    }
    refspecs.extend(
        jobs.iter()
            .map(|j| format!("+refs/heads/{j}:{SYNC_JOBS}{j}")),
    );
    if !refspecs.is_empty() {
        let mut args = vec!["fetch", "-q", "--no-tags", "origin"];
        args.extend(refspecs.iter().map(String::as_str));
        let fetched = git(dir, &args).await;
        if !fetched.ok {
            return Err(format!(
                "failed to fetch the task's branches: {}",
                fetched.why()
            ));
        }
    }
    let task_tip = if task_listed {
        commit_of(dir, SYNC_TASK).await
    } else {
        None
    };
    let mut tips = vec![];
    for j in jobs {
        if let Some(c) = commit_of(dir, &format!("{SYNC_JOBS}{j}")).await {
            tips.push((j.clone(), c));
        }
    }
    Ok((task_tip, tips))
}

/// The job branches to merge, in order: only those no later one contains, and those the task
/// branch (at `task_tip`) already holds first, so they stay merged.
async fn merge_order(dir: &Path, task_tip: Option<&str>, tips: Vec<Tip>) -> Vec<Tip> {
    let mut kept = vec![];
    for (i, (name, tip)) in tips.iter().enumerate() {
        let mut contained = false;
        for (_, later) in &tips[i + 1..] {
            if is_ancestor(dir, tip, later).await {
                contained = true;
                break;
            }
        }
        if !contained {
            kept.push((name.clone(), tip.clone()));
        }
    }
    let mut first = vec![];
    let mut rest = vec![];
    for b in kept {
        match task_tip {
            Some(t) if is_ancestor(dir, &b.1, t).await => first.push(b),
            _ => rest.push(b),
        }
    }
    first.extend(rest);
    first
}

/// Merges `order` into `HEAD`, skipping a branch that conflicts; the files of the conflicts
/// that fall on `own` (this job's commit).
async fn merge_job_branches(
    dir: &Path,
    gj: &GitJob,
    own: &str,
    order: &[Tip],
) -> Result<Vec<String>, String> {
    let mut conflicts = vec![];
    for (name, tip) in order {
        let message = format!("Merge {name} into {}", gj.task_branch);
        match merge(dir, tip, &message).await {
            Merge::Merged => {}
            Merge::Conflict(files) => {
                tracing::info!(branch = %name, files = ?files, "skipped a job branch that conflicts with the task branch");
                if is_ancestor(dir, own, tip).await {
                    conflicts.extend(files);
                }
            }
            Merge::Failed(why) => return Err(format!("failed to merge {name}: {why}")),
        }
    }
    Ok(conflicts)
}

/// Pushes `HEAD` to the task branch, if it is still at `task_tip` (another finisher may have
/// moved it meanwhile).
async fn push_task_branch(
    dir: &Path,
    gj: &GitJob,
    task_ref: &str,
    task_tip: Option<&str>,
) -> Result<(), String> {
    let lease = format!("--force-with-lease={task_ref}:{}", task_tip.unwrap_or(""));
    let target = format!("HEAD:{task_ref}");
    let pushed = git(dir, &["push", "-q", &lease, "origin", &target]).await;
    if !pushed.ok {
        return Err(format!(
            "failed to push {}: {}",
            gj.task_branch,
            pushed.why()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Against real git and bare repositories in temporary directories.

    use super::*;
    use orch_shared::ids::{JobId, TaskId};
    use orch_shared::job::{Backend, Workspace};
    use orch_shared::role::Role;
    use tempfile::TempDir;

    /// A directory `name` in `tmp`, made if missing.
    fn subdir(tmp: &TempDir, name: &str) -> PathBuf {
        let p = tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs a shell script in `dir`; its stdout, trimmed.
    fn sh(dir: &Path, script: &str) -> String {
        let out = std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A bare repository with one commit on `main` (README.md); its path.
    fn origin(tmp: &TempDir) -> String {
        let seed = subdir(tmp, "seed");
        sh(
            tmp.path(),
            "git init -q --bare -b main origin.git && cd seed && git init -q -b main \
             && echo hello > README.md && git add . && git commit -qm init \
             && git push -q ../origin.git main",
        );
        let _ = seed;
        tmp.path().join("origin.git").display().to_string()
    }

    /// Pushes a branch `name` to `origin`, made from `from` with `script` run in a clone.
    fn push_branch(tmp: &TempDir, origin: &str, name: &str, from: &str, script: &str) -> String {
        let dir = tmp
            .path()
            .join(format!("push-{:08x}", rand::random::<u32>()));
        sh(
            tmp.path(),
            &format!(
                "git clone -q {origin} {d} && cd {d} && git checkout -q -B {name} origin/{from} \
                 && {script} && git add -A && git commit -qm '{name}' && git push -q origin {name}",
                d = dir.display()
            ),
        );
        sh(&dir, "git rev-parse HEAD")
    }

    /// Job branches next to each other and away from the task branch (`orch/<task>` cannot
    /// coexist with branches under `orch/<task>/`).
    fn job_branch(task: TaskId, step: u32, role: Role) -> String {
        format!("orch/jobs/{task}/{:02}-{role}", step + 1)
    }

    fn spec(task: TaskId, step: u32, role: Role, prompt: &str, start: Vec<String>) -> JobSpec {
        JobSpec {
            step,
            backend: Backend::Command,
            workspace: Workspace::Git {
                url: String::new(),
                base_ref: "main".into(),
                job: Some(GitJob {
                    branch: job_branch(task, step, role),
                    start,
                    task_branch: GitJob::task_branch(task),
                    integrate: role == Role::Integrator,
                    paths: vec![],
                    sparse: None,
                }),
            },
            ..JobSpec::new(task, JobId::new(), role, prompt)
        }
    }

    fn git_job(job: &JobSpec) -> &GitJob {
        match &job.workspace {
            Workspace::Git { job: Some(j), .. } => j,
            _ => unreachable!("a git job"),
        }
    }

    /// Checks `job` out in a fresh directory of `tmp` with the worker data dir `data`.
    async fn start(tmp: &TempDir, data: &Path, url: &str, job: &JobSpec) -> (PathBuf, Checkout) {
        let dir = subdir(tmp, &format!("ws-{}-{}", job.job_id, job.attempt));
        let c = checkout(&dir, data, url, "main", Some(git_job(job)), false)
            .await
            .unwrap_or_else(|e| panic!("checkout: {e}"));
        (dir, c)
    }

    /// Checks `job` out, runs `script` as its agent, and finishes it.
    async fn run(tmp: &TempDir, url: &str, job: &JobSpec, script: &str) -> Finish {
        let (dir, c) = start(tmp, &tmp.path().join("data"), url, job).await;
        sh(&dir, script);
        c.finish(&dir, job, true)
            .await
            .unwrap_or_else(|e| panic!("finish: {e}"))
    }

    fn outcome(f: &Finish) -> &GitOutcome {
        f.git.as_ref().expect("the job pushed")
    }

    #[tokio::test]
    async fn the_clone_cache_is_made_once_and_fetched_before_every_job() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let data = subdir(&tmp, "data");
        let task = TaskId::new();
        let first = spec(task, 0, Role::Builder, "one", vec![]);
        let (dir, c) = start(&tmp, &data, &url, &first).await;
        let cache = cache_path(&data, &url);
        let caches: Vec<_> = std::fs::read_dir(data.join("git-cache")).unwrap().collect();
        assert_eq!(caches.len(), 1, "one cache per url");
        // The clone borrows the cache's objects, and its origin is the real url.
        let alternates = std::fs::read_to_string(dir.join(".git/objects/info/alternates")).unwrap();
        assert_eq!(
            alternates.trim(),
            cache.join("objects").display().to_string()
        );
        assert_eq!(sh(&dir, "git remote get-url origin"), url);
        assert_eq!(sh(&dir, "git config user.email"), USER_EMAIL);
        let main = sh(Path::new(&url), "git rev-parse main");
        assert_eq!(c.base, main);

        // New work on the remote is in the cache when the next job starts.
        let tip = push_branch(&tmp, &url, "feature", "main", "echo f > f.txt");
        let second = spec(task, 1, Role::Tester, "two", vec![]);
        start(&tmp, &data, &url, &second).await;
        assert_eq!(sh(&cache, "git rev-parse feature"), tip);
        assert_eq!(
            std::fs::read_dir(data.join("git-cache")).unwrap().count(),
            1
        );

        // A worker killed in the middle of a fetch leaves lock files: the next fetch works.
        std::fs::write(cache.join("refs/heads/main.lock"), "").unwrap();
        std::fs::write(cache.join("packed-refs.lock"), "").unwrap();
        let tip = push_branch(&tmp, &url, "main", "main", "echo more >> README.md");
        let third = spec(task, 2, Role::Reviewer, "three", vec![]);
        let (_, c) = start(&tmp, &data, &url, &third).await;
        assert_eq!(
            (sh(&cache, "git rev-parse main"), c.base),
            (tip.clone(), tip)
        );
    }

    #[tokio::test]
    async fn a_job_starts_from_the_parents_branches_that_exist_merged_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let p1 = push_branch(&tmp, &url, "p1", "main", "echo a > a.txt");
        let p2 = push_branch(&tmp, &url, "p2", "main", "echo b > b.txt");
        let task = TaskId::new();
        let job = spec(
            task,
            2,
            Role::Reviewer,
            "review",
            vec!["missing".into(), "p1".into(), "p2".into()],
        );
        let (dir, c) = start(&tmp, &tmp.path().join("data"), &url, &job).await;
        assert!(dir.join("a.txt").is_file() && dir.join("b.txt").is_file());
        assert_eq!(
            sh(&dir, "git rev-parse HEAD^1"),
            p1,
            "the first parent is checked out"
        );
        assert_eq!(
            sh(&dir, "git rev-parse HEAD^2"),
            p2,
            "the next one merged into it"
        );
        assert_eq!(sh(&dir, "git rev-parse HEAD"), c.base);
        assert_eq!(sh(&dir, "git branch --show-current"), git_job(&job).branch);

        // No parent branch exists: the job starts from base_ref.
        let job = spec(task, 3, Role::Tester, "t", vec!["missing".into()]);
        let (dir, c) = start(&tmp, &tmp.path().join("data"), &url, &job).await;
        assert_eq!(c.base, sh(Path::new(&url), "git rev-parse main"));
        assert!(!dir.join("a.txt").exists());
    }

    #[tokio::test]
    async fn parents_that_conflict_fail_the_job_with_the_branches_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        push_branch(&tmp, &url, "left", "main", "echo left > README.md");
        push_branch(&tmp, &url, "right", "main", "echo right > README.md");
        let job = spec(
            TaskId::new(),
            2,
            Role::Builder,
            "x",
            vec!["left".into(), "right".into()],
        );
        let dir = subdir(&tmp, "ws");
        let e = checkout(
            &dir,
            &tmp.path().join("data"),
            &url,
            "main",
            Some(git_job(&job)),
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason, FailureReason::BadRequest);
        assert_eq!(
            e.message,
            "the parents' branches left and right conflict in README.md"
        );
    }

    #[tokio::test]
    async fn an_unreachable_repository_is_a_network_failure_and_a_missing_ref_a_bad_request() {
        let tmp = tempfile::tempdir().unwrap();
        let job = spec(TaskId::new(), 0, Role::Builder, "x", vec![]);
        let missing = tmp.path().join("nowhere.git").display().to_string();
        let e = checkout(
            &subdir(&tmp, "a"),
            &tmp.path().join("data"),
            &missing,
            "main",
            Some(git_job(&job)),
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason, FailureReason::Network);
        assert!(
            e.message
                .starts_with(&format!("failed to fetch {missing}: fatal:"))
                && !e.message.contains('\n'),
            "{}",
            e.message
        );
        let url = origin(&tmp);
        let e = checkout(
            &subdir(&tmp, "b"),
            &tmp.path().join("data"),
            &url,
            "no-such-ref",
            None,
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(e.reason, FailureReason::BadRequest);
        assert_eq!(
            e.message,
            format!("ref `no-such-ref` does not exist in {url}")
        );
        // HEAD is the remote's default branch; tags and commits work too.
        let main = sh(Path::new(&url), "git rev-parse main");
        for r in ["HEAD", &main[..12]] {
            let c = checkout(
                &subdir(&tmp, &format!("c-{r}")),
                &tmp.path().join("data"),
                &url,
                r,
                None,
                false,
            )
            .await
            .unwrap();
            assert_eq!(c.base, main);
        }
    }

    #[tokio::test]
    async fn a_job_commits_its_work_with_a_generated_message_and_pushes_its_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let task = TaskId::new();
        let prompt = format!("Add the greeting {}\nand more lines", "x".repeat(80));
        let job = spec(task, 0, Role::Builder, &prompt, vec![]);
        let f = run(
            &tmp,
            &url,
            &job,
            "echo hi >> README.md && mkdir src && echo new > src/n.txt",
        )
        .await;
        let o = outcome(&f);
        let remote = Path::new(&url);
        assert_eq!(sh(remote, &format!("git rev-parse {}", o.branch)), o.commit);
        assert_eq!(o.branch, git_job(&job).branch);
        assert_eq!(o.base, sh(remote, "git rev-parse main"));
        let message = sh(remote, &format!("git log -1 --format=%B {}", o.commit));
        let subject = message.lines().next().unwrap();
        assert!(subject.starts_with("builder: Add the greeting xxx") && subject.ends_with('…'));
        assert_eq!(subject.chars().count(), "builder: ".len() + SUBJECT_MAX);
        assert_eq!(
            message.lines().skip(1).collect::<Vec<_>>(),
            [
                "",
                &format!("Task: {task}"),
                &format!("Job: {} (attempt 1)", job.job_id)
            ]
        );
        assert_eq!(
            sh(
                remote,
                &format!("git log -1 --format='%an <%ae>' {}", o.commit)
            ),
            "orchestrator <orchestrator@localhost>"
        );
        // The files are the diff's, and the diff is base..commit.
        assert_eq!(f.files, ["README.md", "src/n.txt"]);
        assert_eq!(
            sh(
                remote,
                &format!("git diff --name-only --no-renames {}..{}", o.base, o.commit)
            ),
            f.files.join("\n")
        );
        assert_eq!(
            format!(
                "{}\n",
                sh(
                    remote,
                    &format!("git diff --no-renames {}..{}", o.base, o.commit)
                )
            ),
            f.diff
        );
        assert!(f.diff.contains("+hi") && f.diff.contains("+++ b/src/n.txt"));
        // Alone in its task: the task branch is the job's commit.
        assert!(o.merged && o.conflicts.is_empty(), "{o:?}");
        assert_eq!(sh(remote, &format!("git rev-parse orch/{task}")), o.commit);
    }

    #[tokio::test]
    async fn a_job_whose_agent_failed_pushes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let job = spec(TaskId::new(), 0, Role::Builder, "x", vec![]);
        let (dir, c) = start(&tmp, &tmp.path().join("data"), &url, &job).await;
        sh(&dir, "echo partial > p.txt");
        let f = c.finish(&dir, &job, false).await.unwrap();
        assert!(f.git.is_none());
        assert_eq!(f.files, ["p.txt"], "what it changed is still reported");
        assert!(f.diff.contains("+partial"));
        assert_eq!(
            sh(Path::new(&url), "git for-each-ref --format='%(refname)'"),
            "refs/heads/main"
        );
    }

    #[tokio::test]
    async fn sequential_jobs_fast_forward_the_task_branch_and_see_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let task = TaskId::new();
        let a = spec(task, 0, Role::Analyst, "analyse", vec![]);
        let fa = run(&tmp, &url, &a, "echo analysis > analysis.md").await;
        let b = spec(
            task,
            1,
            Role::Builder,
            "build",
            vec![git_job(&a).branch.clone()],
        );
        let fb = run(
            &tmp,
            &url,
            &b,
            "test -f analysis.md && echo code > code.txt",
        )
        .await;
        assert_eq!(outcome(&fb).base, outcome(&fa).commit);
        assert_eq!(fb.files, ["code.txt"], "only this job's changes");
        let remote = Path::new(&url);
        assert_eq!(
            sh(remote, &format!("git rev-parse orch/{task}")),
            outcome(&fb).commit
        );
        assert_eq!(
            sh(remote, &format!("git rev-list --merges orch/{task}")),
            ""
        );
        assert!(outcome(&fa).merged && outcome(&fb).merged);
    }

    #[tokio::test]
    async fn concurrent_finishers_both_land_in_the_task_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let task = TaskId::new();
        let data = tmp.path().join("data");
        let roles = [Role::Analyst, Role::Builder, Role::Tester, Role::Documenter];
        let mut started = vec![];
        for (i, role) in roles.into_iter().enumerate() {
            let job = spec(task, i as u32, role, "work", vec![]);
            let (dir, c) = start(&tmp, &data, &url, &job).await;
            sh(&dir, &format!("echo {role} > {role}.txt"));
            started.push((dir, c, job));
        }
        let finished =
            futures::future::join_all(started.iter().map(|(dir, c, job)| c.finish(dir, job, true)))
                .await;
        let remote = Path::new(&url);
        for f in finished {
            let f = f.unwrap();
            let o = outcome(&f);
            assert!(o.merged && o.conflicts.is_empty(), "{o:?}");
            sh(
                remote,
                &format!("git merge-base --is-ancestor {} orch/{task}", o.commit),
            );
        }
        let files = sh(remote, &format!("git ls-tree --name-only orch/{task}"));
        assert_eq!(
            files.lines().collect::<Vec<_>>(),
            [
                "README.md",
                "analyst.txt",
                "builder.txt",
                "documenter.txt",
                "tester.txt"
            ]
        );
    }

    #[tokio::test]
    async fn a_finisher_that_conflicts_is_skipped_and_reports_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let task = TaskId::new();
        let data = tmp.path().join("data");
        // Both start from main; the later-named one finishes first and is merged.
        let a = spec(task, 0, Role::Builder, "a", vec![]);
        let b = spec(task, 1, Role::Builder, "b", vec![]);
        let (da, ca) = start(&tmp, &data, &url, &a).await;
        let (db, cb) = start(&tmp, &data, &url, &b).await;
        sh(&da, "echo from-a > same.txt");
        sh(&db, "echo from-b > same.txt");
        let fb = cb.finish(&db, &b, true).await.unwrap();
        let fa = ca.finish(&da, &a, true).await.unwrap();
        assert!(outcome(&fb).merged && outcome(&fb).conflicts.is_empty());
        assert!(!outcome(&fa).merged);
        assert_eq!(outcome(&fa).conflicts, ["same.txt"]);
        let remote = Path::new(&url);
        assert_eq!(
            sh(remote, &format!("git show orch/{task}:same.txt")),
            "from-b"
        );

        // A third job merges; what was merged stays merged, the conflicting one stays out.
        let c = spec(task, 2, Role::Documenter, "c", vec![]);
        let fc = run(&tmp, &url, &c, "echo docs > docs.md").await;
        assert!(outcome(&fc).merged && outcome(&fc).conflicts.is_empty());
        assert_eq!(
            sh(remote, &format!("git show orch/{task}:same.txt")),
            "from-b"
        );
        assert_eq!(sh(remote, &format!("git show orch/{task}:docs.md")), "docs");

        // An integrator starts from the task branch with the conflicting branch being merged:
        // it may not finish with markers left, and its resolution merges both.
        let i = spec(
            task,
            3,
            Role::Integrator,
            "integrate",
            vec![format!("orch/{task}"), outcome(&fa).branch.clone()],
        );
        let (di, ci) = start(&tmp, &data, &url, &i).await;
        assert_eq!(ci.conflicted, ["same.txt"]);
        let text = std::fs::read_to_string(di.join("same.txt")).unwrap();
        assert!(
            text.contains("||||||| ") && text.contains("from-a"),
            "{text}"
        );
        let e = ci.finish(&di, &i, true).await.unwrap_err();
        assert_eq!(e.reason, FailureReason::AgentError);
        assert_eq!(
            e.message,
            "the integrator left conflict markers in same.txt"
        );
        let i = JobSpec { attempt: 2, ..i };
        let (di, ci) = start(&tmp, &data, &url, &i).await;
        sh(&di, "printf 'from-a\\nfrom-b\\n' > same.txt");
        let fi = ci.finish(&di, &i, true).await.unwrap();
        assert!(outcome(&fi).merged, "{fi:?}");
        assert_eq!(
            sh(remote, &format!("git show orch/{task}:same.txt")),
            "from-a\nfrom-b"
        );
        for done in [&fa, &fb, &fc, &fi] {
            sh(
                remote,
                &format!(
                    "git merge-base --is-ancestor {} orch/{task}",
                    outcome(done).commit
                ),
            );
        }
    }

    #[tokio::test]
    async fn a_redelivered_attempt_overwrites_its_branch_and_the_task_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let task = TaskId::new();
        let first = spec(task, 0, Role::Builder, "x", vec![]);
        let f1 = run(&tmp, &url, &first, "echo one > out.txt").await;
        let mut second = first.clone();
        second.attempt = 2;
        let f2 = run(&tmp, &url, &second, "echo two > out.txt").await;
        let remote = Path::new(&url);
        let o2 = outcome(&f2);
        assert_ne!(outcome(&f1).commit, o2.commit);
        assert_eq!(
            sh(remote, &format!("git rev-parse {}", o2.branch)),
            o2.commit
        );
        assert_eq!(sh(remote, &format!("git rev-parse orch/{task}")), o2.commit);
        assert!(o2.merged);
    }

    #[tokio::test]
    async fn a_job_that_cannot_push_its_branch_fails_with_a_network_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin(&tmp);
        let job = spec(TaskId::new(), 0, Role::Builder, "x", vec![]);
        let (dir, c) = start(&tmp, &tmp.path().join("data"), &url, &job).await;
        sh(&dir, "echo x > x.txt");
        // The remote goes away while the agent works.
        std::fs::rename(&url, tmp.path().join("moved.git")).unwrap();
        let e = c.finish(&dir, &job, true).await.unwrap_err();
        assert_eq!(e.reason, FailureReason::Network);
        assert!(
            e.message.starts_with(&format!(
                "failed to push {} to {url}: ",
                git_job(&job).branch
            )),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_sparse_checkout_holds_the_literal_directories_of_the_scope() {
        let dirs =
            |paths: &[&str]| sparse_dirs(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        assert_eq!(
            dirs(&["src/a/**", "src/b/*.rs", "docs/guide.md", "*.md"]),
            Some(
                ["docs", "docs/guide.md", "src/a", "src/b"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(dirs(&["src/*/mod.rs"]), Some(vec!["src".to_string()]));
        assert_eq!(dirs(&["**/*.rs"]), None, "anything may match");
        assert_eq!(dirs(&["*/x"]), None);
        assert_eq!(dirs(&[]), None, "no scope: the whole tree");
        assert_eq!(dirs(&["*.toml"]), Some(vec![]), "top-level files only");
        // A literal path may name a directory: a top-level one is taken whole.
        assert_eq!(dirs(&["Cargo.toml"]), Some(vec!["Cargo.toml".to_string()]));
    }

    /// A bare repository with `README.md`, `src/a/a.txt`, `src/b/b.txt` and `src/top.txt`.
    fn origin_with_dirs(tmp: &TempDir) -> String {
        let url = origin(tmp);
        push_branch(
            tmp,
            &url,
            "main",
            "main",
            "mkdir -p src/a src/b && echo a > src/a/a.txt && echo b > src/b/b.txt \
             && echo top > src/top.txt",
        );
        url
    }

    fn sparse_spec(task: TaskId, step: u32, paths: &[&str], sparse: Option<bool>) -> JobSpec {
        let mut job = spec(task, step, Role::Builder, "x", vec![]);
        if let Workspace::Git { job: Some(j), .. } = &mut job.workspace {
            j.paths = paths.iter().map(|p| p.to_string()).collect();
            j.sparse = sparse;
        }
        job
    }

    #[tokio::test]
    async fn a_sparse_job_sees_its_scope_and_pushes_only_what_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let url = origin_with_dirs(&tmp);
        let data = tmp.path().join("data");
        let task = TaskId::new();
        // The worker's default is sparse; the job declared src/a.
        let job = sparse_spec(task, 0, &["src/a/**"], None);
        let dir = subdir(&tmp, "ws");
        let c = checkout(&dir, &data, &url, "main", Some(git_job(&job)), true)
            .await
            .unwrap();
        assert_eq!(c.sparse, Some(vec!["src/a".to_string()]));
        assert!(dir.join("README.md").is_file() && dir.join("src/a/a.txt").is_file());
        assert!(
            dir.join("src/top.txt").is_file(),
            "files of a cone dir's parents"
        );
        assert!(!dir.join("src/b").exists(), "outside the scope");
        // It edits its scope and writes one file outside it.
        sh(
            &dir,
            "echo more >> src/a/a.txt && mkdir -p src/c && echo c > src/c/c.txt",
        );
        let f = c.finish(&dir, &job, true).await.unwrap();
        assert_eq!(f.files, ["src/a/a.txt", "src/c/c.txt"]);
        let o = outcome(&f);
        let remote = Path::new(&url);
        assert_eq!(
            sh(remote, &format!("git ls-tree -r --name-only {}", o.commit)),
            "README.md\nsrc/a/a.txt\nsrc/b/b.txt\nsrc/c/c.txt\nsrc/top.txt",
            "the files outside the scope are still in the branch"
        );
        assert_eq!(
            sh(remote, &format!("git show {}:src/b/b.txt", o.commit)),
            "b"
        );

        // The task says no: the whole tree, whatever the worker's default.
        let job = sparse_spec(task, 1, &["src/a/**"], Some(false));
        let (dir, c) = {
            let dir = subdir(&tmp, "ws-full");
            let c = checkout(&dir, &data, &url, "main", Some(git_job(&job)), true)
                .await
                .unwrap();
            (dir, c)
        };
        assert!(c.sparse.is_none() && dir.join("src/b/b.txt").is_file());
        // The task says yes on a worker whose default is no; no paths: the whole tree.
        let job = sparse_spec(task, 2, &["src/b/**"], Some(true));
        let (dir, c) = {
            let dir = subdir(&tmp, "ws-b");
            let c = checkout(&dir, &data, &url, "main", Some(git_job(&job)), false)
                .await
                .unwrap();
            (dir, c)
        };
        assert!(
            c.sparse.is_some() && !dir.join("src/a").exists() && dir.join("src/b/b.txt").is_file()
        );
        let job = sparse_spec(task, 3, &[], Some(true));
        let dir = subdir(&tmp, "ws-none");
        let c = checkout(&dir, &data, &url, "main", Some(git_job(&job)), true)
            .await
            .unwrap();
        assert!(
            c.sparse.is_none()
                && dir.join("src/a/a.txt").is_file()
                && dir.join("src/b/b.txt").is_file()
        );
    }

    #[test]
    fn a_long_diff_is_cut_at_a_line_end_with_a_note() {
        let line = "+".to_string() + &"x".repeat(99) + "\n";
        let raw = line.repeat(MAX_DIFF_BYTES / 100 + 10);
        let cut = cut_diff(raw.as_bytes(), false);
        let (body, note) = cut.trim_end().rsplit_once('\n').unwrap();
        assert!(body.len() <= MAX_DIFF_BYTES && body.ends_with('x'));
        assert_eq!(
            note,
            format!("[diff cut: longer than {MAX_DIFF_BYTES} bytes]")
        );
        assert_eq!(cut_diff(b"+a\n", false), "+a\n");
        assert!(cut_diff(b"+a\n", true).ends_with("bytes]\n"));
    }
}
