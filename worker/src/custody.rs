//! Custody of a running agent: checkpoints after its steps, so that when its worker dies or
//! hands it back, the attempt resumes on any worker from where it was instead of starting over.
//!
//! A checkpoint is three things, written in this order:
//! - the **workspace** (git workspaces): a commit of the whole working tree, tracked and
//!   untracked files alike (ignore rules included: nothing but `.git` is left out), made with
//!   a temporary index (`GIT_INDEX_FILE`, `git add -A -f`, `write-tree`, `commit-tree`) so the
//!   agent's own index, `HEAD` and branch are never touched, and pushed to
//!   [`checkpoint_ref`] on the task's repository with `--force-with-lease` on the previous
//!   checkpoint (each checkpoint's parent is the one before it, so every step stays reachable
//!   for rewinds). The temporary index stays for the job; when the steps since the last
//!   checkpoint ran only file tools, only the files they named are brought into it
//!   (`git update-index`), and every `checkpoints.full_every`-th checkpoint adds the whole
//!   tree again ([`Step::paths`]). A tree in the middle of a merge (an integrator resolving conflicts) gets
//!   the merge's other side (`MERGE_HEAD`) as the checkpoint's second parent, and a restore
//!   puts it back, so the resumed agent's commit is still the merge. A scratch directory
//!   (nowhere to push) is read by the worker itself, without a git process
//!   ([`crate::scratch_pack`]: the same objects `git add -A -f` would make), committed as a
//!   root commit, and stored as a git bundle of that commit in
//!   the sessions store (`checkpoint.<job>.<step>.tree`, at most `checkpoints.max_tree_bytes`,
//!   itself at most [`MAX_TREE_BUNDLE_BYTES`]; a larger tree is not checkpointed, and a
//!   `checkpoint_skipped` event says so once per run). A plain local directory (the job's
//!   `workspace` path) is not copied: it is the user's, it stays where it is, and a resumed
//!   run finds its files as the agent left them, not as at the checkpoint. Its checkpoints
//!   keep the conversation alone; a redelivered attempt on a worker that sees the path (the
//!   same machine, or a shared volume) resumes the conversation, and its `resumed` event says
//!   the files were not restored. Such an agent is not handed back early on a drain (another
//!   worker may not see the path).
//! - the **conversation**: the Claude Code CLI's transcript file as it stands, or the API
//!   backends' message list, as the object `checkpoint.<job>.<step>` of the sessions store
//!   (the coordinator's bucket, readable by every worker).
//! - the **pointer**: a [`Checkpoint`] (JSON) in Redis ([`keys::checkpoint`], and the list
//!   [`keys::checkpoints`] of the newest `checkpoints.keep`), written by a script that refuses a
//!   writer that no longer holds the attempt's lease or whose fence is older than the stored
//!   one: a stale attempt never overwrites a newer checkpoint.
//!
//! Checkpoints never block the agent: a backend reports each finished step to its
//! [`Recorder`] (a channel), and the recorder's own task saves the latest one, at most one per
//! `checkpoints.interval`, except that a step that may have changed files (a write, an edit,
//! a shell command) is saved at once. A step is one model request whose tool calls have all
//! returned.
//!
//! Resuming: [`Custody::resume_point`] reads the pointer of a job attempt that ran before (a
//! redelivery or a hand-back of the same attempt) and loads its conversation; the backend
//! restores the tree ([`restore_tree`]) and the conversation and continues (`claude-code`:
//! `--resume` of the restored transcript with a short message saying where the run was cut;
//! the API backends: the message list as it was, sent again). Whatever cannot be restored
//! falls back to a clean start, with the reason as a `resume_failed` event.
//! [`Custody::resume_point`] with `any_attempt` also resumes a later attempt from an earlier
//! one's checkpoint: the entry point for jobs parked on provider limits.

use crate::agent::workspace::WorkDir;
use crate::agent::{Events, Prepared};
use crate::config::CheckpointSettings;
use crate::metrics as m;
use crate::state::{Lease, Saved, State};
use crate::transport::{SessionObject, SessionObjects};
use orch_shared::event::EventKind;
use orch_shared::ids::JobId;
use orch_shared::job::{
    Checkpoint, FailureReason, JobSpec, MAX_TREE_BUNDLE_BYTES, Usage, Workspace, checkpoint_ref,
};
use orch_shared::subject::MAX_SESSION_BYTES;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The checkpoints of the cluster: Redis pointers and sessions-store objects. Cheap to clone.
#[derive(Clone)]
pub struct Custody {
    state: State,
    objects: SessionObjects,
    settings: CheckpointSettings,
    worker: String,
}

/// A checkpoint to resume from, with its conversation loaded.
#[derive(Debug, Clone)]
pub struct Resume {
    pub checkpoint: Checkpoint,
    pub conversation: Vec<u8>,
    /// The agent whose checkpoint it is (its ref holds the tree).
    pub source: JobId,
    /// A rewind (`orchctl agents rewind`): a new agent starting from another's checkpoint,
    /// with the user's message as its next turn; it fails rather than start over.
    pub rewind: bool,
    /// A scratch workspace's tree: the git bundle holding `checkpoint.commit`.
    pub tree_bundle: Option<Vec<u8>>,
}

/// The name of the sessions-store object holding the tree of a scratch workspace's
/// checkpoint (a git bundle).
pub fn tree_object_name(job: JobId, step: u32) -> String {
    format!("checkpoint.{job}.{step}.tree")
}

/// The name of the sessions-store object holding `job`'s conversation at `step`.
pub fn object_name(job: JobId, step: u32) -> String {
    format!("checkpoint.{job}.{step}")
}

/// What a run of the backend saw when it finished a step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Steps done in this run (the recorder adds the steps of the run it resumed).
    pub n: u32,
    /// What this run has spent so far.
    pub usage: Usage,
    pub cost_usd: f64,
    /// The step may have changed files: save it at once.
    pub writes: bool,
    /// The files the step's tools wrote, when every tool of the step that may change files
    /// is a file tool naming its file ([`files_written`]); `None` when another may have
    /// changed anything (a shell, an MCP tool, a subagent): the checkpoint then looks at the
    /// whole tree.
    pub paths: Option<Vec<String>>,
    pub conversation: Conversation,
}

/// The files written by a step's tool calls (`(name, input)`), when all of them that may
/// change files are file tools naming their file (`write_file`, `edit_file`; the CLI's
/// `Write`, `Edit`, `MultiEdit`, `NotebookEdit`) and the others are in `read_only`; `None`
/// as soon as one is neither (a shell, an MCP tool, a subagent).
pub fn files_written<'a>(
    calls: impl IntoIterator<Item = (&'a str, &'a serde_json::Value)>,
    read_only: &[&str],
) -> Option<Vec<String>> {
    let mut paths = Vec::new();
    for (name, input) in calls {
        let key = match name {
            "write_file" | "edit_file" => "path",
            "Write" | "Edit" | "MultiEdit" => "file_path",
            "NotebookEdit" => "notebook_path",
            _ if read_only.contains(&name) => continue,
            _ => return None,
        };
        paths.push(input.get(key)?.as_str()?.to_string());
    }
    Some(paths)
}

/// Both steps' files written, as one step's (`None` when either does not know).
pub fn merge_paths(a: Option<Vec<String>>, b: Option<Vec<String>>) -> Option<Vec<String>> {
    let (mut a, b) = (a?, b?);
    a.extend(b);
    Some(a)
}

/// Where a step's conversation is.
#[derive(Debug, Clone)]
pub enum Conversation {
    /// The CLI's transcript file, complete once it names `must_contain` (the last tool call's
    /// id: the CLI may print a result a moment before its transcript has it).
    Transcript {
        path: PathBuf,
        must_contain: Option<String>,
        session_id: String,
        cwd: String,
    },
    /// The message list, as the session stores it.
    Messages(Vec<u8>),
}

enum Cmd {
    Step(Step),
    /// Save what is pending now; answers with the last step saved.
    Flush(oneshot::Sender<Option<u32>>),
}

/// Where a run's checkpoints go: what the backend gets (in its [`Events`]). Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Mutex<Shared>>,
}

/// What the backend and the recorder's task share.
struct Shared {
    /// The checkpoint the run may resume from (until the backend confirms or drops it).
    resume: Option<Arc<Resume>>,
    resumed: bool,
    /// The workspace, once the backend has one that can be checkpointed.
    tree: Option<Tree>,
    /// The workspace is a plain local directory: checkpoints keep the conversation alone.
    local: bool,
    /// The last checkpoint commit (the parent of the next one).
    last_commit: Option<String>,
    /// What the last checkpoint saved of the tree: a tree that has not changed since is not
    /// committed or sent again.
    last_tree: Option<LastTree>,
    /// `last_commit` is what this agent's checkpoint ref holds (not a rewind's source), with
    /// all it reaches in the task's repository.
    last_on_ref: bool,
    /// The temporary index is the one this run's last checkpoint was made from (all it names
    /// is in the task's repository).
    index_kept: bool,
    /// Steps and spending of the run this one resumed (0 when it starts afresh).
    base_step: u32,
    base_usage: Usage,
    base_cost: f64,
    turn: u32,
    backend: &'static str,
}

/// A git workspace that can be checkpointed.
#[derive(Debug, Clone)]
struct Tree {
    dir: PathBuf,
    /// The commit the agent started from (files changed are counted against it).
    base: String,
    /// A clone of the task's repository (checkpoints are pushed to it); else a scratch
    /// repository (checkpoints go to the sessions store as bundles).
    remote: bool,
    /// The git directory of the task's repository when it is on a local path this worker can
    /// write (checkpoints are written straight into it instead of pushed).
    store: Option<PathBuf>,
}

/// The tree the last checkpoint saved, and what it said of it.
#[derive(Debug, Clone)]
struct LastTree {
    tree: String,
    files_changed: u32,
    /// A scratch workspace's bundle of it.
    bundle: Option<Arc<Vec<u8>>>,
}

impl Custody {
    pub fn new(
        state: State,
        objects: SessionObjects,
        settings: CheckpointSettings,
        worker: &str,
    ) -> Self {
        Self {
            state,
            objects,
            settings,
            worker: worker.to_string(),
        }
    }

    pub fn settings(&self) -> &CheckpointSettings {
        &self.settings
    }

    /// The checkpoint `job` resumes from: one left by an earlier run of the same attempt (or,
    /// with `any_attempt`, of any earlier attempt), with its conversation. `Err` says why a
    /// checkpoint that exists cannot be used (the attempt then starts over).
    pub async fn resume_point(
        &self,
        job: &JobSpec,
        any_attempt: bool,
    ) -> Result<Option<Resume>, String> {
        if !self.settings.enabled {
            return Ok(None);
        }
        let json = match self.state.checkpoint(job.job_id).await {
            Ok(Some(j)) => j,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("the checkpoint could not be read: {e}")),
        };
        let checkpoint: Checkpoint = serde_json::from_str(&json)
            .map_err(|e| format!("the checkpoint record is damaged: {e}"))?;
        let usable =
            checkpoint.attempt == job.attempt || (any_attempt && checkpoint.attempt < job.attempt);
        if !usable {
            return Ok(None);
        }
        self.load(checkpoint, job.job_id, false).await.map(Some)
    }

    /// The checkpoint a rewind job (`session.checkpoint` set) starts from: the one its source
    /// agent left after that step. `Ok(None)` for a job that is no rewind; `Err` says why the
    /// rewind cannot start.
    pub async fn rewind_point(&self, job: &JobSpec) -> Result<Option<Resume>, String> {
        let Some((from, step)) = job
            .session
            .as_ref()
            .and_then(|s| s.checkpoint.map(|step| (s.from, step)))
        else {
            return Ok(None);
        };
        if !self.settings.enabled {
            return Err("checkpoints are off on this worker ([checkpoints] enabled)".into());
        }
        let kept = self
            .state
            .checkpoint_list(from)
            .await
            .map_err(|e| format!("the checkpoints of agent {from} could not be read: {e}"))?;
        let checkpoint = kept
            .iter()
            .filter_map(|json| serde_json::from_str::<Checkpoint>(json).ok())
            .rfind(|c| c.step == step)
            .ok_or_else(|| format!("agent {from} has no checkpoint after step {step} any more"))?;
        self.load(checkpoint, from, true).await.map(Some)
    }

    /// `checkpoint` of agent `source` with its conversation.
    async fn load(
        &self,
        checkpoint: Checkpoint,
        source: JobId,
        rewind: bool,
    ) -> Result<Resume, String> {
        let conversation = match self
            .objects
            .get(&checkpoint.transcript, MAX_SESSION_BYTES)
            .await
        {
            Ok(SessionObject::Bytes(b)) => b,
            Ok(SessionObject::Missing) => {
                return Err(format!(
                    "the conversation of step {} ({}) is gone",
                    checkpoint.step, checkpoint.transcript
                ));
            }
            Ok(SessionObject::TooLarge(n)) => {
                return Err(format!("the conversation has {n} bytes, too many"));
            }
            Err(e) => return Err(format!("the conversation could not be read: {e}")),
        };
        check_conversation(&checkpoint, &conversation)?;
        let tree_bundle = match &checkpoint.tree_object {
            None => None,
            Some(name) => match self.objects.get(name, MAX_TREE_BUNDLE_BYTES).await {
                Ok(SessionObject::Bytes(b)) => Some(b),
                Ok(SessionObject::Missing) => {
                    return Err(format!(
                        "the tree of step {} ({name}) is gone",
                        checkpoint.step
                    ));
                }
                Ok(SessionObject::TooLarge(n)) => {
                    return Err(format!("the tree has {n} bytes, too many"));
                }
                Err(e) => return Err(format!("the tree could not be read: {e}")),
            },
        };
        Ok(Resume {
            checkpoint,
            conversation,
            source,
            rewind,
            tree_bundle,
        })
    }

    /// A recorder for a run of `job` under `lease`, which may resume from `resume`; its task
    /// saves checkpoints until every clone is dropped. `None` when checkpoints are off.
    pub fn recorder(
        &self,
        job: &JobSpec,
        lease: Option<&Lease>,
        resume: Option<Resume>,
        backend: &'static str,
        events: Events,
    ) -> Option<Recorder> {
        if !self.settings.enabled {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared {
            resume: resume.map(Arc::new),
            resumed: false,
            tree: None,
            local: false,
            last_commit: None,
            last_tree: None,
            last_on_ref: false,
            index_kept: false,
            base_step: 0,
            base_usage: Usage::default(),
            base_cost: 0.0,
            turn: 1,
            backend,
        }));
        let task = Task {
            custody: self.clone(),
            job: job.job_id,
            attempt: job.attempt,
            fence: lease.map_or(0, |l| l.fence),
            lease: lease.cloned(),
            shared: shared.clone(),
            events,
            fenced_out: false,
            skipped_sent: false,
            unindexed: Some(Vec::new()),
            since_full: 0,
        };
        tokio::spawn(task.run(rx));
        Some(Recorder { tx, shared })
    }
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checkpoint this run may resume from.
    pub fn resume(&self) -> Option<Arc<Resume>> {
        let s = self.lock();
        s.resume
            .clone()
            .filter(|r| r.checkpoint.backend == s.backend)
    }

    /// The run resumed from [`Recorder::resume`]: its steps and spending count from there.
    pub fn confirm_resume(&self, events: &Events) {
        let mut s = self.lock();
        let Some(r) = s.resume.clone() else { return };
        let c = &r.checkpoint;
        s.resumed = true;
        s.base_step = c.step;
        let files_not_restored = (s.local && c.commit.is_none()).then(|| {
            "the workspace is a plain local directory: its files are as the earlier run left \
             them there, not as they were at the checkpoint (only the conversation is kept)"
                .to_string()
        });
        s.last_commit = c.commit.clone();
        s.last_on_ref = !r.rewind && c.commit.is_some() && c.tree_object.is_none();
        if r.rewind {
            // What the source agent spent stays its own; this agent's conversation is one
            // turn further.
            s.turn = c.turn + 1;
        } else {
            s.base_usage = c.usage;
            s.base_cost = c.cost_usd;
        }
        events.send(EventKind::Resumed {
            from_attempt: c.attempt,
            from_step: c.step,
            from_worker: c.worker.clone(),
            usage: c.usage,
            cost_usd: c.cost_usd,
            from_agent: r.rewind.then_some(r.source),
            files_not_restored,
        });
        metrics::counter!(m::JOBS_RESUMED).increment(1);
    }

    /// The checkpoint could not be restored: the run starts over, and says why.
    pub fn abandon_resume(&self, events: &Events, reason: String) {
        let mut s = self.lock();
        if s.resume.take().is_some() {
            tracing::warn!(%reason, "checkpoint not restored; starting over");
            events.send(EventKind::ResumeFailed { reason });
        }
    }

    /// What the runs before this one spent (counted in this attempt's totals), when it resumed.
    pub fn resumed_spend(&self) -> Option<(Usage, f64)> {
        let s = self.lock();
        s.resumed.then_some((s.base_usage, s.base_cost))
    }

    /// The turn of the conversation this job is (1 unless it continues a stored session).
    pub fn set_turn(&self, turn: u32) {
        self.lock().turn = turn;
    }

    /// The git workspace `dir` (started at `base`; `remote`: a clone of the task's
    /// repository, else a scratch repository) is what checkpoints save of the tree.
    pub fn track_tree(&self, dir: &Path, base: &str, remote: bool, store: Option<PathBuf>) {
        self.lock().tree = Some(Tree {
            dir: dir.to_path_buf(),
            base: base.to_string(),
            remote,
            store,
        });
    }

    /// The workspace is the plain local directory the job names: checkpoints keep the
    /// conversation alone (the files stay in the directory, on this worker's disk or a shared
    /// path, as the agent leaves them).
    pub fn track_local(&self) {
        self.lock().local = true;
    }

    /// Whether this run can be checkpointed (it has a tree to save): a drain may then hand it
    /// back at once. Not a plain local directory's (another worker may not see it).
    pub fn can_migrate(&self) -> bool {
        self.lock().tree.is_some()
    }

    /// A step finished (never waits).
    pub fn step(&self, step: Step) {
        let _ = self.tx.send(Cmd::Step(step));
    }

    /// Saves the pending step now and returns the last step saved (a drain's last checkpoint).
    pub async fn flush(&self) -> Option<u32> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).is_err() {
            return None;
        }
        rx.await.ok().flatten()
    }
}

/// The recorder's task: saves the latest step, rate-limited.
struct Task {
    custody: Custody,
    job: JobId,
    attempt: u32,
    fence: u64,
    lease: Option<Lease>,
    shared: Arc<Mutex<Shared>>,
    events: Events,
    fenced_out: bool,
    /// A `checkpoint_skipped` event was sent (once per run).
    skipped_sent: bool,
    /// The files written since the temporary index was last brought up to date (`None`:
    /// unknown, the next checkpoint adds the whole tree).
    unindexed: Option<Vec<String>>,
    /// Checkpoints since the last one that added the whole tree.
    since_full: u32,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let interval = self.custody.settings.interval;
        let mut pending: Option<Step> = None;
        let mut last_saved: Option<u32> = None;
        let mut last_at: Option<Instant> = None;
        loop {
            let due = match (&pending, last_at) {
                (Some(p), Some(at)) if !p.writes => Some(at + interval),
                (Some(_), _) => Some(Instant::now()),
                (None, _) => None,
            };
            let sleep = async {
                match due {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                cmd = rx.recv() => match cmd {
                    // The run ended: its result (or the next run) takes over.
                    None => return,
                    Some(Cmd::Step(mut s)) => {
                        if let Some(p) = pending.take() {
                            s.writes |= p.writes;
                            s.paths = merge_paths(p.paths, s.paths);
                        }
                        pending = Some(s);
                    }
                    Some(Cmd::Flush(answer)) => {
                        if let Some(step) = pending.take()
                            && let Some(n) = self.save(step).await
                        {
                            last_saved = Some(n);
                            last_at = Some(Instant::now());
                        }
                        let _ = answer.send(last_saved);
                    }
                },
                _ = sleep => {
                    if let Some(step) = pending.take()
                        && let Some(n) = self.save(step).await
                    {
                        last_saved = Some(n);
                    }
                    last_at = Some(Instant::now());
                }
            }
        }
    }

    /// Saves one checkpoint; the step saved, or `None` (logged) when it was not.
    async fn save(&mut self, mut step: Step) -> Option<u32> {
        if self.fenced_out {
            return None;
        }
        // Kept until a checkpoint has put them in the temporary index.
        self.unindexed = merge_paths(self.unindexed.take(), step.paths.take());
        let started = Instant::now();
        let (tree, last, base_step, base_usage, base_cost, turn, backend) = {
            let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            // A workspace that cannot be saved: a conversation alone would resume in the
            // wrong files. Except in a plain local directory, which stays where it is: a
            // resumed run finds the files as the agent left them there.
            let tree = s.tree.clone();
            if tree.is_none() && !s.local {
                return None;
            }
            let last = Last {
                commit: s.last_commit.clone(),
                tree: s.last_tree.clone(),
                on_ref: s.last_on_ref,
                index_kept: s.index_kept,
            };
            (
                tree,
                last,
                s.base_step,
                s.base_usage,
                s.base_cost,
                s.turn,
                s.backend,
            )
        };
        let n = base_step + step.n;
        let (bytes, session_id, workspace) = match read_conversation(&step.conversation).await {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!(step = n, %why, "checkpoint skipped");
                return None;
            }
        };
        // The conversation is stored while the tree is saved.
        let transcript = object_name(self.job, n);
        let direct = self.custody.settings.direct;
        // Every `full_every`th checkpoint adds the whole tree whatever the steps said: it
        // catches what something else wrote (a process a shell left running).
        let paths = self
            .unindexed
            .clone()
            .filter(|_| self.since_full + 1 < self.custody.settings.full_every);
        let snapshot = async {
            match &tree {
                Some(t) => snapshot_tree(t, self.job, &last, n, direct, paths.as_deref())
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (snapshot, stored) =
            tokio::join!(snapshot, self.custody.objects.put(&transcript, &bytes));
        if let Ok(Some(snapshot)) = &snapshot {
            self.unindexed = Some(Vec::new());
            self.since_full = match snapshot.full {
                true => 0,
                false => self.since_full + 1,
            };
            // The tree is saved (the ref moved) whatever happens to the rest: the next
            // checkpoint's parent is this one.
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            s.last_commit = Some(snapshot.commit.clone());
            s.last_on_ref = tree.as_ref().is_some_and(|t| t.remote);
            s.index_kept = true;
            s.last_tree = Some(LastTree {
                tree: snapshot.tree.clone(),
                files_changed: snapshot.files_changed,
                bundle: snapshot.bundle.clone(),
            });
        }
        let snapshot = match (snapshot, stored) {
            (Ok(snapshot), Ok(())) => snapshot,
            (Err(why), _) => {
                tracing::warn!(step = n, %why, "checkpoint skipped: the workspace was not saved");
                let _ = self.custody.objects.delete(&transcript).await;
                return None;
            }
            (_, Err(e)) => {
                tracing::warn!(step = n, error = %e, "checkpoint skipped: the conversation was not stored");
                return None;
            }
        };
        let tree_object = match snapshot.as_ref().and_then(|s| s.bundle.as_ref()) {
            Some(b) if b.len() as u64 > self.custody.settings.max_tree_bytes => {
                let bound = self.custody.settings.max_tree_bytes;
                tracing::warn!(
                    step = n,
                    bytes = b.len(),
                    bound,
                    "checkpoint skipped: the workspace's tree is over the bound"
                );
                metrics::counter!(m::CHECKPOINTS_TOO_LARGE).increment(1);
                let _ = self.custody.objects.delete(&transcript).await;
                if !self.skipped_sent {
                    self.skipped_sent = true;
                    self.events.send(EventKind::CheckpointSkipped {
                        step: n,
                        tree_bytes: b.len() as u64,
                        bound_bytes: bound,
                    });
                }
                return None;
            }
            Some(b) => {
                let name = tree_object_name(self.job, n);
                if let Err(e) = self.custody.objects.put(&name, b).await {
                    tracing::warn!(step = n, error = %e, "checkpoint skipped: the tree was not stored");
                    let _ = self.custody.objects.delete(&transcript).await;
                    return None;
                }
                Some(name)
            }
            None => None,
        };
        let commit = snapshot.as_ref().map(|s| s.commit.clone());
        let files_changed = snapshot.as_ref().map_or(0, |s| s.files_changed);
        let mut usage = base_usage;
        usage.add(&step.usage);
        let checkpoint = Checkpoint {
            attempt: self.attempt,
            fence: self.fence,
            step: n,
            worker: self.custody.worker.clone(),
            backend: backend.to_string(),
            transcript: transcript.clone(),
            transcript_bytes: bytes.len() as u64,
            session_id,
            workspace,
            turn,
            commit: commit.clone(),
            tree_object: tree_object.clone(),
            files_changed,
            usage,
            cost_usd: base_cost + step.cost_usd,
            at_ms: orch_shared::now_ms(),
        };
        let json = serde_json::to_string(&checkpoint).unwrap_or_default();
        let settings = &self.custody.settings;
        let saved = self
            .custody
            .state
            .save_checkpoint(
                self.job,
                self.lease.as_ref(),
                (self.attempt, self.fence),
                &json,
                settings.keep,
                settings.retention,
            )
            .await;
        match saved {
            Ok(Saved::Kept { dropped }) => {
                for old in dropped {
                    if let Ok(c) = serde_json::from_str::<Checkpoint>(&old) {
                        let _ = self.custody.objects.delete(&c.transcript).await;
                        if let Some(t) = &c.tree_object {
                            let _ = self.custody.objects.delete(t).await;
                        }
                    }
                }
            }
            Ok(Saved::FencedOut) => {
                tracing::warn!(
                    step = n,
                    "checkpoint refused: another worker holds this attempt now"
                );
                self.fenced_out = true;
                let _ = self.custody.objects.delete(&transcript).await;
                if let Some(t) = &tree_object {
                    let _ = self.custody.objects.delete(t).await;
                }
                return None;
            }
            Err(e) => {
                tracing::warn!(step = n, error = %e, "checkpoint pointer not saved");
                return None;
            }
        }
        let took = started.elapsed();
        metrics::histogram!(m::CHECKPOINT_SECONDS).record(took.as_secs_f64());
        tracing::debug!(step = n, ?took, bytes = bytes.len(), "checkpoint saved");
        self.events.send(EventKind::Checkpointed {
            step: n,
            files_changed,
            usage,
            took_ms: took.as_millis() as u64,
        });
        Some(n)
    }
}

/// Why `conversation` cannot be what `checkpoint`'s backend resumes from, if it cannot: a
/// Claude Code transcript is JSON lines under a session id, an API conversation a non-empty
/// JSON list of messages.
fn check_conversation(checkpoint: &Checkpoint, conversation: &[u8]) -> Result<(), String> {
    let damaged = |why: &str| {
        Err(format!(
            "the conversation of step {} is damaged: {why}",
            checkpoint.step
        ))
    };
    if checkpoint.backend == crate::agent::claude_code::NAME {
        if checkpoint.session_id.as_deref().is_none_or(str::is_empty) {
            return damaged("no Claude Code session id");
        }
        let Ok(text) = std::str::from_utf8(conversation) else {
            return damaged("not UTF-8");
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return damaged("empty");
        }
        if let Some(n) = lines
            .iter()
            .position(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        {
            return damaged(&format!("line {} is not JSON", n + 1));
        }
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(conversation) {
        Ok(serde_json::Value::Array(m)) if !m.is_empty() => Ok(()),
        _ => damaged("not a list of messages"),
    }
}

/// The conversation bytes, and the session id and working directory they name.
async fn read_conversation(c: &Conversation) -> Result<(Vec<u8>, Option<String>, String), String> {
    match c {
        Conversation::Messages(bytes) => Ok((bytes.clone(), None, String::new())),
        Conversation::Transcript {
            path,
            must_contain,
            session_id,
            cwd,
        } => {
            // The CLI appends to its transcript as it goes; give it a moment to catch up
            // with what it printed.
            for _ in 0..50 {
                if let Ok(mut bytes) = tokio::fs::read(path).await {
                    // A line the CLI is still writing is not part of the step.
                    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                    bytes.truncate(end);
                    let complete = must_contain.as_deref().is_none_or(|needle| {
                        bytes
                            .windows(needle.len().max(1))
                            .any(|w| w == needle.as_bytes())
                    });
                    if complete {
                        if bytes.len() > MAX_SESSION_BYTES {
                            return Err("the transcript is too large".into());
                        }
                        return Ok((bytes, Some(session_id.clone()), cwd.clone()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(format!(
                "the transcript {} does not have the step yet",
                path.display()
            ))
        }
    }
}

/// The temporary index checkpoints use (inside `.git`, so never part of a tree). It stays for
/// the whole job: its stat data spares `git add` hashing the files no step changed.
fn checkpoint_index(dir: &Path) -> PathBuf {
    dir.join(".git").join("orch-checkpoint.index")
}

/// What the previous checkpoint of the run left (the parent of the next one).
#[derive(Debug, Clone, Default)]
struct Last {
    commit: Option<String>,
    tree: Option<LastTree>,
    on_ref: bool,
    /// The temporary index is the one `commit` was made from: everything it names is in the
    /// task's repository (when `on_ref`).
    index_kept: bool,
}

/// One checkpoint of the tree.
#[derive(Debug)]
struct Snapshot {
    commit: String,
    tree: String,
    files_changed: u32,
    /// A scratch workspace's bundle of it.
    bundle: Option<Arc<Vec<u8>>>,
    /// The whole tree was looked at (`git add -A`), not only the files the steps named.
    full: bool,
}

/// Why a checkpoint written straight into the task's repository was not.
enum NotWritten {
    /// The ref was not at the last checkpoint (a stale run): the checkpoint is refused.
    Refused(String),
    /// It could not be done this way (the repository is not writable, another hash): the
    /// checkpoint is pushed instead.
    Failed(String),
}

/// Commits the whole working tree of `tree` with a temporary index: for a clone, with parent
/// the last checkpoint (else `HEAD`), sent to `job`'s checkpoint ref; for a scratch
/// directory, as a root commit bundled by the worker ([`scratch_snapshot`]). A tree equal to the last checkpoint's is neither
/// committed nor sent again: the last commit stands for it.
///
/// A clone of a repository on a local path ([`Tree::store`], with `direct`) whose last
/// checkpoint is on the ref gets the next one written straight into that repository
/// ([`write_into_store`]: two git processes, or none when the steps wrote nothing); there
/// `paths`, the files written since the last checkpoint when they are known, are all that
/// is brought into the temporary index. Otherwise the commit is pushed
/// ([`send_checkpoint`]) and the whole tree added.
async fn snapshot_tree(
    tree: &Tree,
    job: JobId,
    last: &Last,
    step: u32,
    direct: bool,
    paths: Option<&[String]>,
) -> Result<Snapshot, String> {
    let dir = tree.dir.as_path();
    if !tree.remote {
        return scratch_snapshot(dir, job, last, step).await;
    }
    let index = checkpoint_index(dir);
    if !last.index_kept || tokio::fs::metadata(&index).await.is_err() {
        fresh_index(dir).await;
    }
    let store = tree
        .store
        .as_deref()
        // A merge in progress is pushed: its checkpoint has the merge's other side as a
        // second parent, which only the agent's clone may have.
        .filter(|_| direct && last.on_ref && last.index_kept && !merging(dir));
    if let (Some(store), Some(parent)) = (store, &last.commit) {
        let paths = paths.and_then(|p| tree_paths(dir, p));
        match write_into_store(tree, store, job, last, parent, step, paths).await {
            Ok(snapshot) => return Ok(snapshot),
            Err(NotWritten::Refused(why)) => return Err(why),
            Err(NotWritten::Failed(why)) => {
                tracing::debug!(%why, "checkpoint not written into the repository; pushing it");
                // The index may name objects only the repository has.
                fresh_index(dir).await;
            }
        }
    }
    push_snapshot(tree, job, last, step, direct).await
}

/// Whether the agent's clone is in the middle of a merge.
fn merging(dir: &Path) -> bool {
    dir.join(".git").join("MERGE_HEAD").exists()
}

/// Starts the temporary index again from the agent's (whose stat data spares hashing the
/// files it has), with the agent's index's modification time: git takes an entry as
/// certainly unchanged only when its file is older than the index, so a copy dated now would
/// hide a file rewritten with the same size in the second the agent's index was written.
async fn fresh_index(dir: &Path) {
    let index = checkpoint_index(dir);
    let agents = dir.join(".git").join("index");
    let _ = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&index);
        std::fs::copy(&agents, &index)?;
        let modified = std::fs::metadata(&agents)?.modified()?;
        std::fs::File::options()
            .write(true)
            .open(&index)?
            .set_modified(modified)
    })
    .await;
}

/// The most files a checkpoint brings into its index by name; more are added with the
/// whole tree.
const MAX_NAMED_PATHS: usize = 500;

/// `paths` (as the tools named them: relative to the workspace `dir`, or absolute) as paths
/// of its tree, sorted, once each; `None` when one is not a file of the tree (outside the
/// workspace, in `.git`, with `..`), when there are too many, or in a sparse checkout (a file
/// outside the cone keeps its skip-worktree mark, which `update-index` leaves as it was, and
/// `add --sparse` takes): the whole tree is added then.
fn tree_paths(dir: &Path, paths: &[String]) -> Option<Vec<String>> {
    use std::path::Component;
    if dir.join(".git/info/sparse-checkout").exists() {
        return None;
    }
    let canonical = std::fs::canonicalize(dir).ok();
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let path = Path::new(p);
        let rel = match path.is_absolute() {
            true => path
                .strip_prefix(dir)
                .ok()
                .or_else(|| canonical.as_deref().and_then(|c| path.strip_prefix(c).ok()))?,
            false => path,
        };
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) if n != ".git" => parts.push(n.to_str()?),
                Component::CurDir => {}
                _ => return None,
            }
        }
        if parts.is_empty() {
            return None;
        }
        // A file in a repository inside the workspace: `git add -A` takes that repository
        // as one entry, `update-index` would take the file.
        let mut ancestor = dir.to_path_buf();
        for part in &parts[..parts.len() - 1] {
            ancestor.push(part);
            if ancestor.join(".git").exists() {
                return None;
            }
        }
        out.push(parts.join("/"));
    }
    out.sort_unstable();
    out.dedup();
    (out.len() <= MAX_NAMED_PATHS).then_some(out)
}

/// `git` options of every checkpoint command: the temporary index is ours alone (no checksum
/// to compute on every write and read). (The untracked-files cache does not apply: `add -f`
/// reads no ignore rules; a split index and index version 4 measured no faster.)
const INDEX_OPTIONS: [&str; 2] = ["-c", "index.skipHash=true"];

/// `git add -A -f` of the whole tree into the temporary index, with `env`. In a sparse
/// checkout the temporary index starts as a copy of the agent's, so the files the cone leaves
/// out keep their skip-worktree mark and are not taken for deleted; `--sparse` takes the files
/// the agent wrote outside the cone (without it git refuses the whole `add`).
async fn add_all(dir: &Path, env: &[(&str, &str)]) -> Result<(), String> {
    let args = [&INDEX_OPTIONS[..], &["add", "-A", "-f", "--sparse"]].concat();
    let add = crate::agent::git::git_env_unsupervised(dir, &args, env).await;
    match add.ok {
        true => Ok(()),
        false => Err(format!("git add: {}", add.why())),
    }
}

/// `git write-tree` of the temporary index, with `env`: the tree's id.
async fn write_tree(dir: &Path, env: &[(&str, &str)]) -> Result<String, String> {
    let args = [&INDEX_OPTIONS[..], &["write-tree"]].concat();
    let written = crate::agent::git::git_env_unsupervised(dir, &args, env).await;
    if !written.ok {
        return Err(format!("git write-tree: {}", written.why()));
    }
    Ok(written.text().to_string())
}

/// `git update-index` of `paths` alone into the temporary index, with `env`: a file there
/// is added or updated, one gone is removed; the rest of the tree is not looked at.
async fn update_paths(dir: &Path, paths: &[String], env: &[(&str, &str)]) -> Result<(), String> {
    let mut args = [
        &INDEX_OPTIONS[..],
        &["update-index", "--add", "--remove", "--"],
    ]
    .concat();
    args.extend(paths.iter().map(String::as_str));
    let updated = crate::agent::git::git_env_unsupervised(dir, &args, env).await;
    match updated.ok {
        true => Ok(()),
        false => Err(format!("git update-index: {}", updated.why())),
    }
}

/// The snapshot that stands for an unchanged tree: the last one.
fn unchanged(last: &Last, tree_id: &str, remote: bool, full: bool) -> Option<Snapshot> {
    match (&last.commit, &last.tree) {
        (Some(commit), Some(prev)) if prev.tree == tree_id && (last.on_ref || !remote) => {
            Some(Snapshot {
                commit: commit.clone(),
                tree: tree_id.to_string(),
                files_changed: prev.files_changed,
                bundle: prev.bundle.clone(),
                full,
            })
        }
        _ => None,
    }
}

/// The checkpoint of a clone written straight into the object store of the task's repository
/// `store` (the next after `parent`, which its ref holds): `git add` and `git write-tree`
/// write the new blobs and trees there (`GIT_OBJECT_DIRECTORY`; the workspace's own objects
/// are not looked at, so nothing the repository lacks is taken as present), the commit is
/// written by the worker as a loose object, and the ref moves by a compare-and-swap from
/// `parent` ([`move_ref`]). No pack, no push, no `gc --auto`. The files changed are counted
/// (`diff-index` of the index) while the tree is written.
///
/// With `paths` (the files written since the last checkpoint, as paths of the tree), only
/// they are brought into the index (`git update-index`, instead of `git add -A` reading
/// every file's metadata and every directory), and none at all means the tree is the last
/// checkpoint's: no process runs. These git commands start without the supervisor
/// ([`crate::agent::git::git_env_unsupervised`]).
async fn write_into_store(
    tree: &Tree,
    store: &Path,
    job: JobId,
    last: &Last,
    parent: &str,
    step: u32,
    paths: Option<Vec<String>>,
) -> Result<Snapshot, NotWritten> {
    use crate::agent::git::git_env_unsupervised;
    let dir = tree.dir.as_path();
    if let (Some([]), Some(prev)) = (paths.as_deref(), &last.tree)
        && let Some(same) = unchanged(last, &prev.tree, true, false)
    {
        return Ok(same);
    }
    let objects = store.join("objects");
    let objects_s = objects.display().to_string();
    let index_s = checkpoint_index(dir).display().to_string();
    let env = [
        ("GIT_INDEX_FILE", index_s.as_str()),
        ("GIT_OBJECT_DIRECTORY", objects_s.as_str()),
    ];
    // Reading only: the agent's base may be a commit of its own (a merge of its parents).
    let own = dir.join(".git").join("objects").display().to_string();
    let read_env = [
        env[0],
        env[1],
        ("GIT_ALTERNATE_OBJECT_DIRECTORIES", own.as_str()),
    ];
    let diff = [
        &INDEX_OPTIONS[..],
        &[
            "diff-index",
            "--cached",
            "-r",
            "--name-only",
            "--no-renames",
            &tree.base,
        ],
    ]
    .concat();
    let full = match &paths {
        Some(p) => match update_paths(dir, p, &env).await {
            Ok(()) => false,
            Err(why) => {
                // A path git will not take by name (a file in a nested repository, under
                // a symbolic link): the whole tree then.
                tracing::debug!(%why, "checkpoint: adding the whole tree");
                true
            }
        },
        None => true,
    };
    if full {
        add_all(dir, &env).await.map_err(NotWritten::Failed)?;
    }
    let (written, changed) = tokio::join!(
        write_tree(dir, &env),
        git_env_unsupervised(dir, &diff, &read_env)
    );
    let tree_id = written.map_err(NotWritten::Failed)?;
    if let Some(same) = unchanged(last, &tree_id, true, full) {
        return Ok(same);
    }
    if !changed.ok {
        return Err(NotWritten::Failed(format!(
            "git diff-index: {}",
            changed.why()
        )));
    }
    let files_changed = changed.stdout.lines().filter(|l| !l.is_empty()).count() as u32;
    let body = commit_body(&tree_id, Some(parent), job, step);
    let commit = {
        let objects = objects.clone();
        tokio::task::spawn_blocking(move || write_loose_object(&objects, "commit", &body))
            .await
            .map_err(|e| NotWritten::Failed(e.to_string()))?
            .map_err(|e| NotWritten::Failed(format!("the commit was not written: {e}")))?
    };
    if commit.len() != tree_id.len() {
        // A repository of another hash (SHA-256): git writes the commit.
        return Err(NotWritten::Failed(
            "the repository does not use SHA-1".into(),
        ));
    }
    move_ref(store, &checkpoint_ref(job), &commit, parent).await?;
    Ok(Snapshot {
        commit,
        tree: tree_id,
        files_changed,
        bundle: None,
        full,
    })
}

/// The checkpoint of a clone pushed to the task's repository (or of a scratch repository,
/// bundled).
async fn push_snapshot(
    tree: &Tree,
    job: JobId,
    last: &Last,
    step: u32,
    direct: bool,
) -> Result<Snapshot, String> {
    use crate::agent::git::git;
    let (dir, base, remote) = (tree.dir.as_path(), tree.base.as_str(), tree.remote);
    let index_s = checkpoint_index(dir).display().to_string();
    let mut env = vec![("GIT_INDEX_FILE", index_s.as_str())];
    // Earlier checkpoints may have been written into the repository alone.
    let store_objects = tree
        .store
        .as_ref()
        .filter(|_| direct && remote)
        .map(|s| s.join("objects").display().to_string());
    if let Some(o) = &store_objects {
        env.push(("GIT_ALTERNATE_OBJECT_DIRECTORIES", o.as_str()));
    }
    add_all(dir, &env).await?;
    let tree_id = write_tree(dir, &env).await?;
    if let Some(same) = unchanged(last, &tree_id, remote, true) {
        return Ok(same);
    }
    let head;
    let parent = match &last.commit {
        Some(p) => p.as_str(),
        None => {
            head = git(dir, &["rev-parse", "HEAD"]).await;
            if !head.ok {
                return Err(format!("git rev-parse HEAD: {}", head.why()));
            }
            head.text()
        }
    };
    // A merge in progress keeps its other side in the checkpoint ([`restore_tree`]).
    let merge_head = git(dir, &["rev-parse", "-q", "--verify", "MERGE_HEAD^{commit}"]).await;
    let merge_head = merge_head.ok.then(|| merge_head.text().to_string());
    let parents: Vec<&str> = std::iter::once(parent)
        .chain(merge_head.as_deref())
        .collect();
    let commit = commit_tree(dir, &tree_id, &parents, job, step, &env).await?;
    // The files changed are counted while the commit travels.
    let (sent, changed) = tokio::join!(
        send_checkpoint(dir, job, &commit, parent, last.on_ref, &env),
        files_changed(dir, base, &commit, &env)
    );
    sent?;
    Ok(Snapshot {
        commit,
        tree: tree_id,
        files_changed: changed,
        bundle: None,
        full: true,
    })
}

/// The message of `job`'s checkpoint commit after `step`.
fn commit_message(job: JobId, step: u32) -> String {
    format!("orchestrator checkpoint: agent {job}, step {step}")
}

/// A checkpoint commit object's content, as `git commit-tree` writes it (the workspace's
/// committer identity, dated now).
fn commit_body(tree: &str, parent: Option<&str>, job: JobId, step: u32) -> Vec<u8> {
    use crate::agent::git::{USER_EMAIL, USER_NAME};
    use std::fmt::Write;
    let who = format!(
        "{USER_NAME} <{USER_EMAIL}> {} +0000",
        orch_shared::now_ms() / 1000
    );
    let mut body = format!("tree {tree}\n");
    if let Some(p) = parent {
        let _ = writeln!(body, "parent {p}");
    }
    let _ = write!(
        body,
        "author {who}\ncommitter {who}\n\n{}\n",
        commit_message(job, step)
    );
    body.into_bytes()
}

/// Writes a loose object of `kind` with `content` into the object directory `objects` the way
/// git does (zlib-compressed, under its SHA-1, written aside and renamed into place, read-only);
/// its id. An object already there is left alone.
fn write_loose_object(objects: &Path, kind: &str, content: &[u8]) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let header = format!("{kind} {}\0", content.len());
    let mut hash = sha1_smol::Sha1::new();
    hash.update(header.as_bytes());
    hash.update(content);
    let id = hash.digest().to_string();
    let dir = objects.join(&id[..2]);
    let path = dir.join(&id[2..]);
    if path.exists() {
        return Ok(id);
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("tmp_obj_orch_{}", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut z = flate2::write::ZlibEncoder::new(file, flate2::Compression::default());
        z.write_all(header.as_bytes())?;
        z.write_all(content)?;
        let file = z.finish()?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| id)
}

/// Moves `refname` of the repository `store` from `old` to `new`, refused (never forced) when
/// it is not at `old`: git's own protocol for a ref in files (`<ref>.lock` created exclusively,
/// the value checked, the lock renamed over the ref), done by the worker; `git update-ref NEW
/// OLD` for a repository that keeps its refs otherwise (reftable).
async fn move_ref(store: &Path, refname: &str, new: &str, old: &str) -> Result<(), NotWritten> {
    let refused = |why: String| {
        NotWritten::Refused(format!(
            "the checkpoint ref {refname} was not at the last checkpoint: {why}"
        ))
    };
    if store.join("reftable").exists() {
        let moved = crate::agent::git::git(store, &["update-ref", refname, new, old]).await;
        return match moved.ok {
            true => Ok(()),
            false => Err(refused(moved.why())),
        };
    }
    let (store, refname_s, new_s, old_s) = (
        store.to_path_buf(),
        refname.to_string(),
        new.to_string(),
        old.to_string(),
    );
    let moved = tokio::task::spawn_blocking(move || {
        compare_and_swap_ref(&store, &refname_s, &new_s, &old_s)
    })
    .await
    .map_err(|e| NotWritten::Failed(e.to_string()))?;
    match moved {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(refused(why)),
        Err(e) => Err(NotWritten::Failed(format!(
            "the ref {refname} could not be written: {e}"
        ))),
    }
}

/// The compare-and-swap of [`move_ref`] on a ref stored as a file: `Ok(Err(why))` when the ref
/// is not at `old` (or another process is moving it).
fn compare_and_swap_ref(
    store: &Path,
    refname: &str,
    new: &str,
    old: &str,
) -> std::io::Result<Result<(), String>> {
    use std::io::Write;
    let path = store.join(refname);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&lock)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Ok(Err("another process is moving it".into()));
        }
        Err(e) => return Err(e),
    };
    let swapped = (|| {
        let current = match std::fs::read_to_string(&path) {
            Ok(v) => Some(v.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => packed_ref(store, refname)?,
            Err(e) => return Err(e),
        };
        if current.as_deref() != Some(old) {
            return Ok(Err(format!(
                "it is at {}",
                current.as_deref().unwrap_or("nothing")
            )));
        }
        file.write_all(format!("{new}\n").as_bytes())?;
        std::fs::rename(&lock, &path)?;
        Ok(Ok(()))
    })();
    if !matches!(swapped, Ok(Ok(()))) {
        let _ = std::fs::remove_file(&lock);
    }
    swapped
}

/// The value of `refname` in `store`'s `packed-refs`, if it is there.
fn packed_ref(store: &Path, refname: &str) -> std::io::Result<Option<String>> {
    let text = match std::fs::read_to_string(store.join("packed-refs")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
        .filter_map(|l| l.split_once(' '))
        .find(|(_, name)| *name == refname)
        .map(|(id, _)| id.to_string()))
}

/// `git commit-tree` of `tree` with `parents` (none: a root commit), dated now.
async fn commit_tree(
    dir: &Path,
    tree: &str,
    parents: &[&str],
    job: JobId,
    step: u32,
    env: &[(&str, &str)],
) -> Result<String, String> {
    let message = commit_message(job, step);
    let date = format!("@{} +0000", orch_shared::now_ms() / 1000);
    let mut args = vec!["commit-tree", tree];
    for p in parents {
        args.extend(["-p", p]);
    }
    args.extend(["-m", &message]);
    let mut env = env.to_vec();
    env.extend([
        ("GIT_AUTHOR_DATE", date.as_str()),
        ("GIT_COMMITTER_DATE", date.as_str()),
    ]);
    let commit = crate::agent::git::git_env(dir, &args, &env).await;
    if !commit.ok {
        return Err(format!("git commit-tree: {}", commit.why()));
    }
    Ok(commit.text().to_string())
}

/// How many files `commit` changed against `base`.
async fn files_changed(dir: &Path, base: &str, commit: &str, env: &[(&str, &str)]) -> u32 {
    let files = crate::agent::git::git_env(
        dir,
        &[
            "diff-tree",
            "-r",
            "--name-only",
            "--no-renames",
            base,
            commit,
        ],
        env,
    )
    .await;
    files.stdout.lines().filter(|l| !l.is_empty()).count() as u32
}

/// Pushes checkpoint `commit` (child of `parent`) to `job`'s checkpoint ref of the task's
/// repository, with `env` (the objects of earlier checkpoints written into a local repository
/// alone). When `parent` is the ref's last checkpoint (`parent_on_ref`), only a ref still at
/// `parent` moves (`--force-with-lease`): a stale run sending from an older checkpoint is
/// refused.
async fn send_checkpoint(
    dir: &Path,
    job: JobId,
    commit: &str,
    parent: &str,
    parent_on_ref: bool,
    env: &[(&str, &str)],
) -> Result<(), String> {
    let refname = checkpoint_ref(job);
    let target = format!("{commit}:{refname}");
    let lease = match parent_on_ref {
        true => format!("--force-with-lease={refname}:{parent}"),
        false => "--force".to_string(),
    };
    let push =
        crate::agent::git::git_env(dir, &["push", "-q", &lease, "origin", &target], env).await;
    if !push.ok {
        return Err(format!("git push of the checkpoint: {}", push.why()));
    }
    Ok(())
}

/// The git directory of the repository at `url` when it is a local path this worker can see
/// (a bare repository or a working copy's `.git`); `None` for a network URL.
pub fn local_store(url: &str) -> Option<PathBuf> {
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    if !path.is_absolute() {
        return None;
    }
    [path.to_path_buf(), path.join(".git")]
        .into_iter()
        .find(|d| d.join("objects").join("pack").is_dir() && d.join("HEAD").is_file())
}

/// The ref a scratch directory's checkpoint bundle names its commit under.
const BUNDLE_REF: &str = crate::scratch_pack::REF;

/// git's empty tree: what a scratch directory's checkpoints count changed files against.
const EMPTY_TREE: &str = crate::scratch_pack::EMPTY_TREE;

/// A scratch directory's checkpoint, made by the worker without a git process
/// ([`crate::scratch_pack`]): its tree as a root commit, bundled. A tree equal to the last
/// checkpoint's is not bundled again.
async fn scratch_snapshot(
    dir: &Path,
    job: JobId,
    last: &Last,
    step: u32,
) -> Result<Snapshot, String> {
    let walked = dir.to_path_buf();
    let scanned = tokio::task::spawn_blocking(move || {
        crate::scratch_pack::scan(&walked, MAX_TREE_BUNDLE_BYTES)
    })
    .await
    .map_err(|e| format!("the workspace was not read: {e}"))?
    .map_err(|e| format!("the workspace could not be read: {e}"))?;
    if let Some(same) = unchanged(last, &scanned.tree, false, true) {
        return Ok(same);
    }
    let (tree, files_changed) = (scanned.tree.clone(), scanned.files);
    let body = commit_body(&tree, None, job, step);
    let bundled = tokio::task::spawn_blocking(move || scanned.bundle(&body))
        .await
        .map_err(|e| format!("the workspace was not bundled: {e}"))?;
    let Some((commit, bytes)) = bundled else {
        return Err(format!(
            "the workspace is over {} MiB packed",
            MAX_TREE_BUNDLE_BYTES / (1024 * 1024)
        ));
    };
    Ok(Snapshot {
        commit,
        tree,
        files_changed,
        bundle: Some(Arc::new(bytes)),
        full: true,
    })
}

/// Puts the working tree of the fresh clone `dir` in the state of checkpoint `commit` of
/// `job` (fetched from `origin`), leaving the agent's index and `HEAD` where they are: files
/// the checkpoint had and `HEAD` lacks come back untracked, as they were.
///
/// A checkpoint taken in the middle of a merge (its second parent, the merge's other side)
/// is restored in the middle of that merge: the clone's own start of it (an integrator's
/// checkout leaves the conflicts in the files) is set aside, the checkpoint's files written
/// over `HEAD`, and `MERGE_HEAD` set again, so the agent's commit is the merge, its files as
/// the agent left them (resolved or not: the conflicts are checked when the agent ends).
pub async fn restore_tree(dir: &Path, job: JobId, commit: &str) -> Result<(), String> {
    use crate::agent::git::git;
    let fetch = git(
        dir,
        &[
            "fetch",
            "-q",
            "origin",
            &format!("+{}:refs/orch/restore", checkpoint_ref(job)),
        ],
    )
    .await;
    if !fetch.ok {
        return Err(format!(
            "the checkpoint ref {} could not be fetched: {}",
            checkpoint_ref(job),
            fetch.why()
        ));
    }
    let have = git(dir, &["cat-file", "-e", &format!("{commit}^{{commit}}")]).await;
    if !have.ok {
        return Err(format!(
            "the checkpoint commit {commit} is not on {}",
            checkpoint_ref(job)
        ));
    }
    let merging = git(dir, &["rev-parse", "-q", "--verify", "MERGE_HEAD^{commit}"]).await;
    let other = git(
        dir,
        &["rev-parse", "-q", "--verify", &format!("{commit}^2")],
    )
    .await;
    // The checkpoint's own record of the merge, else the clone's (a checkpoint from before
    // merges were recorded).
    let merge_head = match (other.ok, merging.ok) {
        (true, _) => Some(other.text().to_string()),
        (false, true) => Some(merging.text().to_string()),
        (false, false) => None,
    };
    if merging.ok {
        let abort = git(dir, &["merge", "--abort"]).await;
        if !abort.ok {
            return Err(format!(
                "the clone's merge could not be set aside: {}",
                abort.why()
            ));
        }
    }
    check_out(dir, commit).await?;
    if let Some(merge_head) = merge_head {
        // A pseudoref: git writes the file itself (`update-ref` refuses it).
        tokio::fs::write(
            dir.join(".git").join("MERGE_HEAD"),
            format!("{merge_head}\n"),
        )
        .await
        .map_err(|e| format!("MERGE_HEAD could not be restored: {e}"))?;
    }
    Ok(())
}

/// Puts the working tree of the fresh scratch repository `dir` in the state of checkpoint
/// `commit`, held by the git bundle `bundle`.
pub async fn restore_bundle(dir: &Path, bundle: &[u8], commit: &str) -> Result<(), String> {
    use crate::agent::git::git;
    let file = dir.join(".git").join("orch-restore.bundle");
    tokio::fs::write(&file, bundle)
        .await
        .map_err(|e| format!("the checkpoint's bundle could not be written: {e}"))?;
    let file_s = file.display().to_string();
    let fetch = git(
        dir,
        &[
            "fetch",
            "-q",
            &file_s,
            &format!("+{BUNDLE_REF}:refs/orch/restore"),
        ],
    )
    .await;
    let _ = tokio::fs::remove_file(&file).await;
    if !fetch.ok {
        return Err(format!(
            "the checkpoint's bundle could not be read: {}",
            fetch.why()
        ));
    }
    let have = git(dir, &["cat-file", "-e", &format!("{commit}^{{commit}}")]).await;
    if !have.ok {
        return Err(format!(
            "the checkpoint commit {commit} is not in its bundle"
        ));
    }
    check_out(dir, commit).await
}

/// Writes the files of `commit` into `dir`'s working tree, leaving the agent's index and
/// `HEAD` where they are.
async fn check_out(dir: &Path, commit: &str) -> Result<(), String> {
    use crate::agent::git::git_env;
    let index = dir.join(".git").join("orch-restore.index");
    let index_s = index.display().to_string();
    let env = [("GIT_INDEX_FILE", index_s.as_str())];
    // Sparse checkout off for this index: a file the agent wrote outside its cone is
    // written back too (the files the cone leaves out are absent, and an absent file is
    // left absent where the checkpoint did not change it).
    let read = git_env(
        dir,
        &["-c", "core.sparseCheckout=false", "read-tree", "HEAD"],
        &env,
    )
    .await;
    // A fresh index has no stat data: without a refresh, every file the checkpoint changed
    // and `HEAD` has would be taken for modified ("not uptodate") and refused. Files that do
    // differ from `HEAD` stay so (and a change of theirs is refused, as it should be).
    let _ = git_env(dir, &["update-index", "-q", "--refresh"], &env).await;
    let update = if read.ok {
        git_env(
            dir,
            &[
                "-c",
                "core.sparseCheckout=false",
                "read-tree",
                "-m",
                "-u",
                "HEAD",
                commit,
            ],
            &env,
        )
        .await
    } else {
        read
    };
    let _ = tokio::fs::remove_file(&index).await;
    if !update.ok {
        return Err(format!(
            "the checkpoint's files could not be written: {}",
            update.why()
        ));
    }
    Ok(())
}

/// The workspace of `p`'s job, restored to the checkpoint its run resumes from when there is
/// one (returned only when it was restored). A checkpoint whose tree cannot be restored is
/// dropped (a `resume_failed` event says why) and the run gets a fresh workspace.
pub async fn workspace_for(
    p: &Prepared<'_>,
    events: &Events,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(WorkDir, Option<Arc<Resume>>), (FailureReason, String)> {
    let dir = WorkDir::prepare(p.job, p.data_dir, p.sparse_checkout, cancel).await?;
    let Some(rec) = events.recorder() else {
        return Ok((dir, None));
    };
    track(rec, &dir, p.job);
    let Some(resume) = rec.resume() else {
        return Ok((dir, None));
    };
    let restored = match (&resume.checkpoint.commit, &resume.tree_bundle) {
        // A plain local directory: nothing to restore, the files are where the run left them.
        (None, None) if !dir.is_scratch() && dir.git_base().is_none() && !resume.rewind => Ok(()),
        (None, _) => Err("the checkpoint has no workspace to restore".to_string()),
        (Some(commit), None) if dir.git_base().is_some() => {
            restore_tree(&dir.path, resume.source, commit).await
        }
        (Some(commit), Some(bundle)) if dir.is_scratch_dir() => {
            match crate::agent::workspace::ensure_scratch_repo(&dir.path).await {
                Ok(()) => restore_bundle(&dir.path, bundle, commit).await,
                Err(e) => Err(e),
            }
        }
        (Some(_), None) => Err("this job's workspace is not a git clone".to_string()),
        (Some(_), Some(_)) => Err("this job's workspace is not a scratch repository".to_string()),
    };
    match restored {
        Ok(()) => Ok((dir, Some(resume))),
        // A rewind that cannot restore its tree has nothing to start from.
        Err(why) if resume.rewind => Err((
            FailureReason::BadRequest,
            format!("the rewind cannot start: {why}"),
        )),
        Err(why) => {
            rec.abandon_resume(events, why);
            drop(dir);
            let dir = WorkDir::prepare(p.job, p.data_dir, p.sparse_checkout, cancel).await?;
            track(rec, &dir, p.job);
            Ok((dir, None))
        }
    }
}

/// Tells `rec` which tree checkpoints save: a clone's or a scratch repository's.
fn track(rec: &Recorder, dir: &WorkDir, job: &JobSpec) {
    if let Some(base) = dir.git_base() {
        let store = match &job.workspace {
            Workspace::Git { url, .. } => local_store(url),
            _ => None,
        };
        rec.track_tree(&dir.path, base, true, store);
    } else if dir.is_scratch_dir() {
        rec.track_tree(&dir.path, EMPTY_TREE, false, None);
    } else if !dir.is_scratch() {
        rec.track_local();
    }
}

/// The message a resumed Claude Code session continues with.
pub fn continuation_prompt(step: u32) -> String {
    format!(
        "The previous run of this task was interrupted after step {step} (its worker stopped). \
         The conversation and the files are as they were then. Continue where you left off and \
         finish the task."
    )
}

#[cfg(test)]
mod tests {
    //! The checkpoint of a clone's tree, against real git and a bare repository on a local
    //! path (what `direct` writes into).
    #![allow(clippy::unwrap_used)]

    use super::*;

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
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A bare repository with one commit, and a clone of it: (tmp, bare, clone, base).
    fn repo() -> (tempfile::TempDir, PathBuf, PathBuf, String) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let root = root.as_path();
        sh(
            root,
            "git init -q src && cd src && echo one > a.txt && git add a.txt && git commit -qm one \
             && cd .. && git clone -q --bare src bare.git && git clone -q bare.git clone",
        );
        let clone = root.join("clone");
        let base = sh(&clone, "git rev-parse HEAD");
        let bare = root.join("bare.git");
        (tmp, bare, clone, base)
    }

    fn tree(clone: &Path, base: &str, store: Option<PathBuf>) -> Tree {
        Tree {
            dir: clone.to_path_buf(),
            base: base.to_string(),
            remote: true,
            store,
        }
    }

    /// The next `Last` after `s`.
    fn after(s: &Snapshot) -> Last {
        Last {
            commit: Some(s.commit.clone()),
            tree: Some(LastTree {
                tree: s.tree.clone(),
                files_changed: s.files_changed,
                bundle: None,
            }),
            on_ref: true,
            index_kept: true,
        }
    }

    #[tokio::test]
    async fn checkpoints_go_straight_into_a_local_repository_and_an_unchanged_tree_is_not_sent_again()
     {
        let (_tmp, bare, clone, base) = repo();
        let store = local_store(&bare.display().to_string());
        assert_eq!(store.as_deref(), Some(bare.as_path()));
        let t = tree(&clone, &base, store);
        let job = JobId::new();
        let refname = checkpoint_ref(job);
        let packs = || {
            std::fs::read_dir(bare.join("objects/pack"))
                .unwrap()
                .count()
        };
        let in_clone = |id: &str| in_clone_object(&clone, id);

        // The first checkpoint is pushed (its parent is the agent's HEAD).
        std::fs::write(clone.join("b.txt"), "untracked\n").unwrap();
        let first = snapshot_tree(&t, job, &Last::default(), 1, true, None)
            .await
            .unwrap();
        assert_eq!(sh(&bare, &format!("git rev-parse {refname}")), first.commit);
        assert_eq!(first.files_changed, 1);

        // The next one is written into the bare repository (no pack, no push: the clone never
        // had its objects), the ref moved.
        let before = packs();
        std::fs::write(clone.join("a.txt"), "two\n").unwrap();
        std::fs::create_dir(clone.join("sub")).unwrap();
        std::fs::write(clone.join("sub/c.txt"), "three\n").unwrap();
        let second = snapshot_tree(&t, job, &after(&first), 2, true, None)
            .await
            .unwrap();
        assert_eq!(packs(), before, "a pack was sent");
        assert!(
            !in_clone(&second.commit),
            "the commit was made in the clone"
        );
        assert!(!in_clone(&second.tree), "the tree was made in the clone");
        assert_eq!(
            sh(&bare, &format!("git cat-file -t {}", second.commit)),
            "commit"
        );
        // The commit is git's own: the same bytes `git commit-tree` would have written.
        let log = sh(
            &bare,
            &format!("git log -1 --format=%an%x20%ae%x20%s {refname}"),
        );
        assert_eq!(
            log,
            format!(
                "orchestrator orchestrator@localhost orchestrator checkpoint: agent {job}, step 2"
            )
        );
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            second.commit
        );
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}^")),
            first.commit
        );
        assert_eq!(second.files_changed, 3);
        assert_eq!(sh(&bare, &format!("git show {refname}:sub/c.txt")), "three");
        assert_eq!(sh(&bare, &format!("git show {refname}:a.txt")), "two");
        // Every object is there: the repository is whole.
        sh(&bare, "git fsck --connectivity-only --no-progress");
        // The agent's index and HEAD were not touched.
        assert_eq!(sh(&clone, "git rev-parse HEAD"), base);
        assert_eq!(sh(&clone, "git diff --cached --name-only"), "");

        // Nothing changed: the same commit, nothing sent.
        let before = packs();
        let third = snapshot_tree(&t, job, &after(&second), 3, true, None)
            .await
            .unwrap();
        assert_eq!(third.commit, second.commit);
        assert_eq!(third.files_changed, 3);
        assert_eq!(packs(), before);

        // A stale run (its last checkpoint is not the ref's any more) is refused.
        std::fs::write(clone.join("a.txt"), "stale\n").unwrap();
        let err = snapshot_tree(&t, job, &after(&first), 3, true, None)
            .await
            .unwrap_err();
        assert!(err.contains("was not at the last checkpoint"), "{err}");
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            second.commit
        );
        // So is one that finds the ref packed elsewhere (`git pack-refs`) at another commit,
        // and the one that is up to date moves a packed ref.
        sh(&bare, "git pack-refs --all");
        let err = snapshot_tree(&t, job, &after(&first), 3, true, None)
            .await
            .unwrap_err();
        assert!(err.contains("was not at the last checkpoint"), "{err}");
        let fourth = snapshot_tree(&t, job, &after(&second), 4, true, None)
            .await
            .unwrap();
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            fourth.commit
        );
        assert_eq!(sh(&bare, &format!("git show {refname}:a.txt")), "stale");
        sh(&bare, "git fsck --no-progress");
        // No lock was left behind.
        assert!(!bare.join(format!("{refname}.lock")).exists());
    }

    #[tokio::test]
    async fn a_repository_that_cannot_be_written_gets_its_checkpoints_pushed() {
        let (_tmp, bare, clone, base) = repo();
        let t = tree(&clone, &base, local_store(&bare.display().to_string()));
        let job = JobId::new();
        let refname = checkpoint_ref(job);
        std::fs::write(clone.join("b.txt"), "one\n").unwrap();
        let first = snapshot_tree(&t, job, &Last::default(), 1, true, None)
            .await
            .unwrap();
        // A new blob written directly would go into this object directory: make it a file,
        // so writing there fails and the checkpoint is pushed instead.
        std::fs::write(clone.join("b.txt"), "two\n").unwrap();
        let blob = sh(&clone, "git hash-object b.txt");
        let fan = bare.join("objects").join(&blob[..2]);
        // The push keeps what it receives as a pack (not loose objects in that directory).
        sh(&bare, "git config receive.unpackLimit 1");
        let _ = std::fs::remove_dir_all(&fan);
        std::fs::write(&fan, "in the way").unwrap();
        let second = snapshot_tree(&t, job, &after(&first), 2, true, None).await;
        std::fs::remove_file(&fan).unwrap();
        let second = second.unwrap();
        assert!(in_clone_object(&clone, &second.commit), "it was not pushed");
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            second.commit
        );
        assert_eq!(sh(&bare, &format!("git show {refname}:b.txt")), "two");
        // The next one goes straight in again.
        std::fs::write(clone.join("b.txt"), "three\n").unwrap();
        let third = snapshot_tree(&t, job, &after(&second), 3, true, None)
            .await
            .unwrap();
        assert!(!in_clone_object(&clone, &third.commit));
        assert_eq!(sh(&bare, &format!("git show {refname}:b.txt")), "three");
        sh(&bare, "git fsck --no-progress");
    }

    #[tokio::test]
    async fn named_files_alone_are_taken_in_and_a_whole_tree_checkpoint_catches_what_a_shell_wrote()
    {
        let (_tmp, bare, clone, base) = repo();
        let t = tree(&clone, &base, local_store(&bare.display().to_string()));
        let job = JobId::new();
        let refname = checkpoint_ref(job);
        let has = |path: &str| {
            std::process::Command::new("git")
                .args(["cat-file", "-e", &format!("{refname}:{path}")])
                .current_dir(&bare)
                .status()
                .unwrap()
                .success()
        };
        let names = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        std::fs::write(clone.join("b.txt"), "one\n").unwrap();
        let first = snapshot_tree(&t, job, &Last::default(), 1, true, None)
            .await
            .unwrap();
        assert!(first.full);

        // A file tool wrote `sub/c.txt` (named absolute, as the CLI does) and changed a.txt;
        // a shell's background process wrote `shell.txt` meanwhile: only the named files
        // are looked at.
        std::fs::create_dir(clone.join("sub")).unwrap();
        std::fs::write(clone.join("sub/c.txt"), "three\n").unwrap();
        std::fs::write(clone.join("a.txt"), "two\n").unwrap();
        std::fs::write(clone.join("shell.txt"), "from a shell\n").unwrap();
        let c = clone.join("sub/c.txt").display().to_string();
        let second = snapshot_tree(
            &t,
            job,
            &after(&first),
            2,
            true,
            Some(names(&[&c, "a.txt"]).as_slice()),
        )
        .await
        .unwrap();
        assert!(!second.full);
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            second.commit
        );
        assert_eq!(sh(&bare, &format!("git show {refname}:sub/c.txt")), "three");
        assert_eq!(sh(&bare, &format!("git show {refname}:a.txt")), "two");
        assert!(has("b.txt"), "a file no step named was dropped");
        assert!(!has("shell.txt"));
        assert_eq!(second.files_changed, 3);

        // No file written: the last checkpoint stands, nothing is looked at.
        let third = snapshot_tree(
            &t,
            job,
            &after(&second),
            3,
            true,
            Some(names(&[]).as_slice()),
        )
        .await
        .unwrap();
        assert_eq!(third.commit, second.commit);

        // A named file that is gone is removed; a path git will not take by name (beyond a
        // symbolic link) makes it add the whole tree, the shell's file with it.
        std::fs::remove_file(clone.join("b.txt")).unwrap();
        let fourth = snapshot_tree(
            &t,
            job,
            &after(&third),
            4,
            true,
            Some(names(&["b.txt"]).as_slice()),
        )
        .await
        .unwrap();
        assert!(!fourth.full && !has("b.txt") && !has("shell.txt"));
        std::os::unix::fs::symlink("sub", clone.join("link")).unwrap();
        std::fs::write(clone.join("sub/c.txt"), "four\n").unwrap();
        let fifth = snapshot_tree(
            &t,
            job,
            &after(&fourth),
            5,
            true,
            Some(names(&["link/c.txt"]).as_slice()),
        )
        .await
        .unwrap();
        assert!(fifth.full);
        assert!(has("shell.txt") && has("link"));
        assert_eq!(sh(&bare, &format!("git show {refname}:sub/c.txt")), "four");
        assert_eq!(sh(&bare, &format!("git rev-parse {refname}")), fifth.commit);

        // A file in a repository inside the workspace: the whole tree, where that repository
        // is one entry (a gitlink), as `git add -A` records it.
        sh(
            &clone,
            "mkdir nested && cd nested && git init -q && echo n > n.txt && git add n.txt \
             && git commit -qm n",
        );
        let sixth = snapshot_tree(
            &t,
            job,
            &after(&fifth),
            6,
            true,
            Some(names(&["nested/n.txt"]).as_slice()),
        )
        .await
        .unwrap();
        assert!(sixth.full);
        assert!(sh(&bare, &format!("git ls-tree {refname} nested")).starts_with("160000 "));

        // The whole tree (no names: a shell ran) is what `git add -A` of the clone gives.
        std::fs::write(clone.join("later.txt"), "later\n").unwrap();
        let seventh = snapshot_tree(&t, job, &after(&sixth), 7, true, None)
            .await
            .unwrap();
        assert!(seventh.full && has("later.txt"));
        let expected = sh(
            &clone,
            "export GIT_INDEX_FILE=\"$PWD/.git/expected.index\" && cp -p .git/index \"$GIT_INDEX_FILE\" \
             && git add -A -f 2>/dev/null && git write-tree && rm \"$GIT_INDEX_FILE\"",
        );
        assert_eq!(
            seventh.tree,
            expected,
            "{}",
            sh(
                &clone,
                &format!(
                    "GIT_ALTERNATE_OBJECT_DIRECTORIES={}/objects git diff-tree -r {} {expected}",
                    bare.display(),
                    seventh.tree
                )
            )
        );
        sh(&bare, "git fsck --no-progress");
        // The agent's own index was never touched.
        assert_eq!(sh(&clone, "git diff --cached --name-only"), "");
    }

    #[test]
    fn the_named_files_are_paths_of_the_tree_or_the_whole_tree_is_added() {
        let dir = Path::new("/ws/agent");
        let v = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            tree_paths(dir, &v(&["b.txt", "/ws/agent/sub/a.txt", "./b.txt"])),
            Some(v(&["b.txt", "sub/a.txt"]))
        );
        for bad in [
            "/etc/hosts",
            "../x",
            "sub/../../x",
            ".git/config",
            "/ws/agent",
            "",
        ] {
            assert_eq!(tree_paths(dir, &v(&["a.txt", bad])), None, "{bad}");
        }
        let many: Vec<String> = (0..=MAX_NAMED_PATHS).map(|i| format!("f{i}")).collect();
        assert_eq!(tree_paths(dir, &many), None);
        // A shell, an MCP tool or a subagent among the calls: not known.
        let input = serde_json::json!({"path": "a.txt", "file_path": "/ws/agent/b.txt"});
        assert_eq!(
            files_written(
                [
                    ("read_file", &input),
                    ("write_file", &input),
                    ("Edit", &input)
                ],
                &["read_file"]
            ),
            Some(v(&["a.txt", "/ws/agent/b.txt"]))
        );
        for other in ["bash", "Bash", "mcp__fs__write", "Task"] {
            assert_eq!(files_written([(other, &input)], &["read_file"]), None);
        }
        assert_eq!(
            merge_paths(Some(v(&["a"])), Some(v(&["b"]))),
            Some(v(&["a", "b"]))
        );
        assert_eq!(merge_paths(Some(v(&["a"])), None), None);
    }

    /// Whether the clone's own object store has `id`.
    fn in_clone_object(clone: &Path, id: &str) -> bool {
        std::process::Command::new("git")
            .args(["cat-file", "-e", id])
            .current_dir(clone)
            .status()
            .unwrap()
            .success()
    }

    #[tokio::test]
    async fn with_direct_off_or_a_network_url_checkpoints_are_pushed_with_a_lease() {
        assert_eq!(local_store("https://example.com/repo.git"), None);
        assert_eq!(local_store("relative/path"), None);
        let (_tmp, bare, clone, base) = repo();
        let t = tree(
            &clone,
            &base,
            local_store(&format!("file://{}", bare.display())),
        );
        assert!(t.store.is_some());
        let job = JobId::new();
        let refname = checkpoint_ref(job);
        std::fs::write(clone.join("b.txt"), "one\n").unwrap();
        let first = snapshot_tree(&t, job, &Last::default(), 1, false, None)
            .await
            .unwrap();
        let packs = std::fs::read_dir(bare.join("objects/pack"))
            .unwrap()
            .count();
        std::fs::write(clone.join("b.txt"), "two\n").unwrap();
        let second = snapshot_tree(&t, job, &after(&first), 2, false, None)
            .await
            .unwrap();
        assert_eq!(
            sh(&bare, &format!("git rev-parse {refname}")),
            second.commit
        );
        // A push of a few objects leaves them loose: no pack was written.
        assert_eq!(
            std::fs::read_dir(bare.join("objects/pack"))
                .unwrap()
                .count(),
            packs
        );
        std::fs::write(clone.join("b.txt"), "stale\n").unwrap();
        let err = snapshot_tree(&t, job, &after(&first), 2, false, None)
            .await
            .unwrap_err();
        assert!(err.contains("push"), "{err}");
    }

    /// A sparse clone of `bare` (cone `a`) in `root/name`; its path.
    fn sparse_clone(root: &Path, bare: &Path, name: &str) -> PathBuf {
        sh(
            root,
            &format!(
                "git clone -q --no-checkout {} {name} && cd {name} \
                 && git sparse-checkout set --cone a && git checkout -q main",
                bare.display()
            ),
        );
        root.join(name)
    }

    #[tokio::test]
    async fn a_sparse_checkout_is_checkpointed_without_deleting_what_it_left_out_and_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        sh(
            root,
            "git init -q -b main src && cd src && mkdir a b && echo a > a/a.txt \
             && echo b > b/b.txt && echo r > README.md && git add . && git commit -qm one \
             && cd .. && git clone -q --bare src bare.git",
        );
        let bare = root.join("bare.git");
        let clone = sparse_clone(root, &bare, "clone");
        assert!(!clone.join("b").exists() && clone.join("a/a.txt").is_file());
        let base = sh(&clone, "git rev-parse HEAD");
        let job = JobId::new();
        let refname = checkpoint_ref(job);
        // Pushed, then written straight into the repository: both ways keep b/b.txt.
        let t = tree(&clone, &base, local_store(&bare.display().to_string()));
        std::fs::write(clone.join("a/a.txt"), "changed\n").unwrap();
        let first = snapshot_tree(&t, job, &Last::default(), 1, true, None)
            .await
            .unwrap();
        assert_eq!(first.files_changed, 1, "b/b.txt is not taken for deleted");
        std::fs::create_dir(clone.join("c")).unwrap();
        std::fs::write(clone.join("c/c.txt"), "outside\n").unwrap();
        let second = snapshot_tree(&t, job, &after(&first), 2, true, None)
            .await
            .unwrap();
        assert_eq!(second.files_changed, 2);
        assert_eq!(
            sh(&bare, &format!("git ls-tree -r --name-only {refname}")),
            "README.md\na/a.txt\nb/b.txt\nc/c.txt"
        );
        assert_eq!(sh(&bare, &format!("git show {refname}:b/b.txt")), "b");

        // Another worker resumes into a fresh sparse clone: the agent's files come back, the
        // cone still leaves b out, and its commit changes only what the agent wrote.
        let resumed = sparse_clone(root, &bare, "resumed");
        restore_tree(&resumed, job, &second.commit).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(resumed.join("a/a.txt")).unwrap(),
            "changed\n"
        );
        assert_eq!(
            std::fs::read_to_string(resumed.join("c/c.txt")).unwrap(),
            "outside\n",
            "a file written outside the cone is restored"
        );
        assert!(!resumed.join("b").exists());
        sh(&resumed, "git add -A --sparse && git commit -qm work");
        assert_eq!(
            sh(&resumed, "git diff --name-only HEAD^ HEAD"),
            "a/a.txt\nc/c.txt"
        );
    }

    #[tokio::test]
    async fn a_tree_checkpointed_mid_merge_is_restored_mid_merge_and_commits_as_the_merge() {
        let (_tmp, bare, clone, _) = repo();
        // Two sides that change the same line, pushed; the clone starts merging them and
        // conflicts, as an integrator's checkout does.
        let conflicted = "git checkout -q -b left && echo left > a.txt && git commit -qam left \
             && git push -q origin left && git checkout -q -b right HEAD~1 \
             && echo right > a.txt && git commit -qam right && git push -q origin right \
             && git checkout -q left && (git merge -q right -m merge >/dev/null 2>&1 || true)";
        sh(&clone, conflicted);
        let right = sh(&clone, "git rev-parse right");
        assert_eq!(sh(&clone, "git rev-parse MERGE_HEAD"), right);
        let base = sh(&clone, "git rev-parse HEAD");
        // The agent resolves it and adds a file; the checkpoint records the merge.
        std::fs::write(clone.join("a.txt"), "left\nright\n").unwrap();
        std::fs::write(clone.join("new.txt"), "new\n").unwrap();
        let job = JobId::new();
        let t = tree(&clone, &base, None);
        let snap = snapshot_tree(&t, job, &Last::default(), 1, true, None)
            .await
            .unwrap();
        assert_eq!(
            sh(
                &bare,
                &format!("git rev-list --parents -n 1 {}", snap.commit)
            ),
            format!("{} {base} {right}", snap.commit)
        );

        // Another worker's fresh clone in the same conflicted merge gets the agent's files and
        // the merge back; the commit it makes has both parents.
        let root = bare.parent().unwrap();
        sh(root, "git clone -q bare.git again");
        let again = root.join("again");
        sh(
            &again,
            "git checkout -q left && (git merge -q origin/right -m merge >/dev/null 2>&1 || true)",
        );
        restore_tree(&again, job, &snap.commit).await.unwrap();
        assert_eq!(sh(&again, "cat a.txt"), "left\nright");
        assert_eq!(sh(&again, "cat new.txt"), "new");
        assert_eq!(sh(&again, "git rev-parse MERGE_HEAD"), right);
        let parents = sh(
            &again,
            "git add -A && git commit -qm resolved && git rev-list --parents -n 1 HEAD",
        );
        assert_eq!(
            parents.split(' ').skip(1).collect::<Vec<_>>(),
            [&base, &right]
        );

        // A checkpoint of a tree that is not merging restores no merge.
        let plain = snapshot_tree(
            &tree(&again, &base, None),
            JobId::new(),
            &Last::default(),
            1,
            true,
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            sh(
                &bare,
                &format!("git rev-list --parents -n 1 {}", plain.commit)
            )
            .split(' ')
            .count(),
            2
        );
    }
}
