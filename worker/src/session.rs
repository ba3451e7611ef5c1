//! Agents' sessions, owned by the cluster: what a further turn of a conversation
//! (`orchctl agents send`, `fork`) needs to continue it on any worker.
//!
//! After each successful turn the worker stores the agent's session under its job id, so a
//! job whose [`JobSpec::session`] names that agent can restore it anywhere:
//!
//! - the bytes: the Claude Code CLI's transcript (JSONL), or for the `anthropic` and `openai`
//!   backends the JSON list of messages (the system prompt is not stored), or for `sim` a JSON
//!   list of `{prompt, answer}`. They live in the JetStream object store
//!   [`subject::SESSIONS_BUCKET`] as the object `<job-id>` (file storage, no TTL; the
//!   coordinator creates the bucket, a worker waits for it), except a session of at most
//!   [`INLINE_MAX_BYTES`], which is kept in the pointer hash itself (field [`session_field::HISTORY`]):
//!   the sim's short histories always are, so a simulated job costs the worker no store of
//!   its own at all, which throughput benchmarks would feel.
//! - the pointer: the Redis hash [`keys::session`] (`orch:session:<job-id>`, no TTL) with the
//!   [`keys::session_field`]s. The coordinator accepts a further turn only while it exists.
//!   The worker puts it in the turn's result ([`JobResult::session`]) and the coordinator
//!   writes it in the same step as it applies the result, so the pointer exists exactly when
//!   the turn counts as done, and a Redis rebuilt from the log gets the pointers back from the
//!   results. (Given a spec from an older coordinator, without [`JobSpec::records_session`],
//!   the worker writes the pointer itself, before the result.) The object is stored before
//!   the result is published, so a pointer never points at nothing.
//!
//! A session larger than [`subject::MAX_SESSION_BYTES`] (64 MiB) is not stored: the job still
//! succeeds, with a warning in the worker's log and no `session_id` in its result (it cannot
//! be continued). The result's `session_id` is the backend's own conversation id (the CLI's),
//! or for backends without one the agent's job id, the name of its stored session.
//!
//! The objects go through [`crate::transport::SessionObjects`] and the pointers through
//! [`crate::state::State`]: this module decides what is stored where, not how.
//!
//! A worker keeps nothing of a session locally beyond the turn that uses it, so a turn that is
//! redelivered after its worker died restores from the same stored session on another worker.
//!
//! [`JobResult::session`]: orch_shared::job::JobResult::session

use crate::state::{self, State};
use crate::transport::{self, SessionObject, SessionObjects};
use orch_shared::ids::JobId;
use orch_shared::job::{JobKind, JobSpec, SessionPointer};
use orch_shared::keys::{self, session_field};
use orch_shared::subject;
use std::time::Duration;

/// A session at most this large is kept inline in its pointer hash instead of the object store.
pub const INLINE_MAX_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error("the session is {bytes} bytes, over the {max} bytes a session may have")]
    TooLarge { bytes: usize, max: usize },
    #[error("storing the session took longer than {0:?}")]
    Slow(Duration),
    #[error("the stored session {key} is damaged: {why}")]
    Damaged { key: String, why: String },
}

/// One agent's conversation as stored after a turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The backend that ran the turn (`claude-code`, `anthropic`, `openai`, `sim`): a turn
    /// continues only on the same backend.
    pub backend: String,
    /// The backend's own conversation id (the CLI's `session_id`), when it has one.
    pub session_id: Option<String>,
    /// The directory the agent ran in (the CLI's transcript names it; empty for backends
    /// without a workspace).
    pub workspace: String,
    /// How many turns the conversation has had, this one included (the first turn is 1).
    pub turn: u32,
    /// The conversation itself, in the backend's format (see the module docs).
    pub bytes: Vec<u8>,
}

impl Snapshot {
    /// The number of the turn that continues `previous` (1 without one).
    pub fn next_turn(previous: Option<&Snapshot>) -> u32 {
        previous.map_or(1, |s| s.turn.saturating_add(1))
    }
}

/// The stored sessions: the object store and the Redis pointers. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    objects: SessionObjects,
    state: State,
}

impl SessionStore {
    /// Binds to the object store (which the coordinator creates); the pointers go through
    /// `state`, the worker's one Redis connection.
    pub async fn connect(client: async_nats::Client, state: State) -> Result<Self, Error> {
        let objects = SessionObjects::bind(client).await?;
        Ok(Self { objects, state })
    }

    /// The object store the sessions live in (checkpoints keep their conversations there too).
    pub fn objects(&self) -> SessionObjects {
        self.objects.clone()
    }

    /// Stores `snapshot` as agent `job`'s session: the object (unless it is small enough to
    /// go inline), then the pointer.
    pub async fn save(&self, job: JobId, snapshot: &Snapshot) -> Result<(), Error> {
        let pointer = self.store(job, snapshot).await?;
        self.write_pointer(job, &pointer).await
    }

    /// Stores `snapshot`'s object (unless it goes inline) and returns the pointer to it, not
    /// yet written.
    pub async fn store(&self, job: JobId, snapshot: &Snapshot) -> Result<SessionPointer, Error> {
        let size = snapshot.bytes.len();
        if size > subject::MAX_SESSION_BYTES {
            return Err(Error::TooLarge {
                bytes: size,
                max: subject::MAX_SESSION_BYTES,
            });
        }
        let inline = size <= INLINE_MAX_BYTES;
        if !inline {
            self.objects.put(&job.to_string(), &snapshot.bytes).await?;
        }
        Ok(SessionPointer {
            backend: snapshot.backend.clone(),
            session_id: snapshot.session_id.clone(),
            workspace: snapshot.workspace.clone(),
            turn: snapshot.turn,
            bytes: size as u64,
            saved_at_ms: orch_shared::now_ms(),
            inline: inline.then(|| snapshot.bytes.clone()),
        })
    }

    /// Writes agent `job`'s session pointer.
    pub async fn write_pointer(&self, job: JobId, pointer: &SessionPointer) -> Result<(), Error> {
        Ok(self.state.write_session_pointer(job, pointer).await?)
    }

    /// Agent `from`'s stored session; `None` when it has none.
    pub async fn load(&self, from: JobId) -> Result<Option<Snapshot>, Error> {
        let key = keys::session(from);
        let mut hash = self.state.session_pointer(from).await?;
        if hash.is_empty() {
            return Ok(None);
        }
        let damaged = |why: String| Error::Damaged {
            key: key.clone(),
            why,
        };
        let text = |field: &str| {
            hash.get(field)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let backend = text(session_field::BACKEND).ok_or_else(|| damaged("no backend".into()))?;
        let session_id = text(session_field::SESSION_ID).filter(|s| !s.is_empty());
        let workspace = text(session_field::WORKSPACE).unwrap_or_default();
        let turn = text(session_field::TURN)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| damaged("no turn number".into()))?;
        let bytes = match hash.remove(session_field::HISTORY) {
            Some(inline) => inline,
            None => match self
                .objects
                .get(&from.to_string(), subject::MAX_SESSION_BYTES)
                .await?
            {
                SessionObject::Bytes(bytes) => bytes,
                SessionObject::Missing => {
                    // Only a bucket purged by hand leaves a pointer without its object.
                    tracing::warn!(%from, "session pointer without its object");
                    return Ok(None);
                }
                SessionObject::TooLarge(size) => {
                    return Err(damaged(format!("the object has {size} bytes")));
                }
            },
        };
        Ok(Some(Snapshot {
            backend,
            session_id,
            workspace,
            turn,
            bytes,
        }))
    }

    /// Stores the session a finished turn of `job` produced and returns what its result says
    /// about it: `None` when nothing was stored (too large, the store failed or took longer
    /// than `within`: a warning, never a lost or late result). The pointer is written here
    /// unless the spec leaves it to the coordinator ([`JobSpec::records_session`]), which then
    /// gets it in the result. A planner's session is not stored: the coordinator never
    /// continues a planner.
    pub async fn keep(&self, job: &JobSpec, snapshot: Snapshot, within: Duration) -> Option<Kept> {
        if job.kind == JobKind::Plan {
            return None;
        }
        let started = std::time::Instant::now();
        let stored = async {
            let pointer = self.store(job.job_id, &snapshot).await?;
            if job.records_session {
                return Ok(Some(pointer));
            }
            self.write_pointer(job.job_id, &pointer).await?;
            Ok(None)
        };
        let saved = tokio::time::timeout(within, stored)
            .await
            .unwrap_or_else(|_| Err(Error::Slow(within)));
        match saved {
            Ok(pointer) => {
                tracing::debug!(
                    bytes = snapshot.bytes.len(),
                    turn = snapshot.turn,
                    took = ?started.elapsed(),
                    "session stored"
                );
                Some(Kept {
                    session_id: snapshot
                        .session_id
                        .unwrap_or_else(|| job.job_id.to_string()),
                    pointer,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "the agent's session was not stored: it cannot be continued");
                None
            }
        }
    }
}

/// A turn's stored session, as its result reports it.
#[derive(Debug)]
pub struct Kept {
    /// The result's `session_id`: the backend's conversation id, or the job id.
    pub session_id: String,
    /// The pointer for the coordinator to write (`None`: written by the worker already).
    pub pointer: Option<SessionPointer>,
}
