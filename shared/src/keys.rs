//! Redis key names that more than one service reads or writes. Keys only one service uses live
//! in that service's `state` module.

use crate::ids::{JobId, TaskId, WorkerId};

/// A task's record (`codec`-encoded [`crate::api::Task`]), written only by the coordinator;
/// a worker reads it for the task's tenant.
pub fn task(id: TaskId) -> String {
    format!("orch:task:{id}")
}

/// Sorted set of worker ids scored by their last heartbeat (ms): listing workers never scans keys.
pub const WORKERS: &str = "orch:workers";

/// Hash describing one worker; expires unless the worker refreshes it.
pub fn worker(id: &WorkerId) -> String {
    format!("orch:worker:{id}")
}

/// Set by a worker once the result of a job attempt is durably published, before it acks the
/// job: a redelivered copy of an attempt that already finished is acked without running again.
pub fn job_done(job: JobId, attempt: u32) -> String {
    format!("orch:jobdone:{job}:{attempt}")
}

/// Fields of the [`worker`] hash.
pub mod worker_field {
    pub const HOST: &str = "host";
    pub const SLOTS: &str = "slots";
    pub const BUSY: &str = "busy";
    pub const VERSION: &str = "version";
    pub const STARTED_AT_MS: &str = "started_at_ms";
    pub const LAST_SEEN_MS: &str = "last_seen_ms";
    /// The backends the worker pulls jobs for, comma-separated wire names.
    pub const BACKENDS: &str = "backends";
}

/// Set by the coordinator when it cancels a job attempt: a worker that pulls it afterwards acks
/// it without running it.
pub fn job_cancelled(job: JobId, attempt: u32) -> String {
    format!("orch:jobcancelled:{job}:{attempt}")
}

/// The fencing token counter of a job attempt: every worker that takes the attempt's lease
/// increments it, and the coordinator applies a result only from the latest taker.
pub fn job_fence(job: JobId, attempt: u32) -> String {
    format!("orch:fence:{job}:{attempt}")
}

/// The lease on a job attempt: `<worker>:<fence>`, with a TTL renewed while the job runs.
pub fn job_lease(job: JobId, attempt: u32) -> String {
    format!("orch:lease:{job}:{attempt}")
}

/// The stored session of an agent (job): a hash of [`session_field`]s pointing at the object
/// `<job-id>` in the [`crate::subject::SESSIONS_BUCKET`] object store (or holding a small
/// session itself). Written by the coordinator as it applies the turn's result
/// ([`crate::job::JobResult::session`]), or by a worker serving an older coordinator.
pub fn session(job: JobId) -> String {
    format!("orch:session:{job}")
}

/// The latest checkpoint of an agent (job) still running or handed back: a JSON
/// [`crate::job::Checkpoint`], written by the worker holding the attempt's lease (a script
/// that refuses a writer whose lease is gone or whose fence is older than the one stored).
pub fn checkpoint(job: JobId) -> String {
    format!("orch:checkpoint:{job}")
}

/// Checkpoint refs to delete from the repositories of cleaned tasks: a sorted set of JSON
/// [`crate::job::RefCleanup`]s scored by when a worker may next try one (ms). The coordinator
/// adds them when it cleans a task; a worker claims one by moving its score a lease ahead,
/// deletes the refs (idempotent: refs already gone are fine) and removes it, so one that fails
/// or whose worker dies is tried again once the lease has passed.
pub const REF_CLEANUPS: &str = "orch:refcleanups";

/// Every kept checkpoint of an agent, oldest first: a list of JSON
/// [`crate::job::Checkpoint`]s (bounded by the workers' `checkpoints.keep`), for
/// `orchctl agents checkpoints` and rewinds.
pub fn checkpoints(job: JobId) -> String {
    format!("orch:checkpoints:{job}")
}

/// Fields of the [`session`] hash.
pub mod session_field {
    /// The backend that ran the turn (`claude-code`, `anthropic`, `openai`, `sim`).
    pub const BACKEND: &str = "backend";
    /// The backend's own conversation id (the CLI's `session_id`), when it has one.
    pub const SESSION_ID: &str = "session_id";
    /// The directory the agent ran in (the CLI keys transcripts by it).
    pub const WORKSPACE: &str = "workspace";
    /// How many turns the conversation has had, this one included.
    pub const TURN: &str = "turn";
    /// Size of the stored object in bytes.
    pub const BYTES: &str = "bytes";
    pub const SAVED_AT_MS: &str = "saved_at_ms";
    /// The session itself, when it is small enough to be kept in the hash instead of the
    /// object store.
    pub const HISTORY: &str = "history";
}

/// Set of every credential a worker has registered with the limit broker, as
/// `<backend>/<name>` (listing them never scans keys).
pub const CREDENTIALS: &str = "orch:credentials";

/// The limit state of one named credential of a backend: a hash of [`limit_field`]s, written by
/// any worker that learns something about it (a 429, rate-limit headers, the CLI's
/// `rate_limit_event`) and read by every worker before it starts a job on it.
pub fn limit(backend: &str, name: &str) -> String {
    format!("orch:limit:{backend}/{name}")
}

/// Fields of the [`limit`] hash.
pub mod limit_field {
    /// Until when (ms since the epoch) the credential is exhausted; absent or past: it has room.
    pub const UNTIL_MS: &str = "until_ms";
    /// Why it is exhausted (the provider's message, cut short).
    pub const REASON: &str = "reason";
    /// When the provider last told us something about it (ms).
    pub const UPDATED_MS: &str = "updated_ms";
    /// Window figures from the provider's headers (`anthropic-ratelimit-*`, `x-ratelimit-*`).
    pub const REQUESTS_LIMIT: &str = "requests_limit";
    pub const REQUESTS_REMAINING: &str = "requests_remaining";
    pub const TOKENS_LIMIT: &str = "tokens_limit";
    pub const TOKENS_REMAINING: &str = "tokens_remaining";
    /// When the window's figures reset (ms).
    pub const RESET_MS: &str = "reset_ms";
    /// How many times the credential was found exhausted.
    pub const EXHAUSTED_TOTAL: &str = "exhausted_total";
}

/// Sorted set of parked job attempts (`<job>:<attempt>`), scored by when (ms) they go back to
/// the queue. A parked attempt holds no worker slot and no JetStream message: its spec lives in
/// [`parked_job`] until a worker re-publishes it.
pub const PARKED: &str = "orch:parked";

/// Present while a coordinator's admission (a cap, rate limits or a daily budget) wakes the
/// parked jobs itself, so that a resumed job takes an admission place like a new one; the
/// workers' wakers then leave them alone. Expires within [`RESUME_GATE_TTL_MS`] of that
/// coordinator's last refresh: with no coordinator, workers wake parked jobs again.
pub const ADMISSION_RESUMES: &str = "orch:admission:resumes";

/// How long [`ADMISSION_RESUMES`] outlives its coordinator's last refresh (ms).
pub const RESUME_GATE_TTL_MS: u64 = 10_000;

/// Takes up to ARGV[2] parked attempts due by ARGV[1] (ms): each is pushed ARGV[3] ms into
/// the future (so whoever dies before re-publishing it leaves it to another) and returned as
/// member, spec, subject, priority, parks, traceparent. Members without a record are dropped.
/// KEYS: the parked set, then optionally a gate key: while it exists, nothing is taken (a
/// worker's waker passes [`ADMISSION_RESUMES`]). ARGV: now ms, max, hold ms, record key prefix.
pub const TAKE_DUE_PARKED: &str = r#"
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, m in ipairs(due) do
  local h = redis.call('HMGET', ARGV[4] .. m, 'spec', 'subject', 'priority', 'parks', 'traceparent')
  if h[1] then
    redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[3], m)
    table.insert(out, m)
    table.insert(out, h[1])
    table.insert(out, h[2] or '')
    table.insert(out, h[3] or '1')
    table.insert(out, h[4] or '1')
    table.insert(out, h[5] or '')
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
"#;

/// A parked job attempt that is due, as [`TAKE_DUE_PARKED`] returns it.
#[derive(Debug, Clone)]
pub struct DueParked {
    /// `<job>:<attempt>`.
    pub member: String,
    /// The encoded spec, as stored.
    pub spec: Vec<u8>,
    /// The queue subject it goes back to.
    pub subject: String,
    pub priority: u8,
    pub parks: u64,
    pub traceparent: Option<String>,
}

impl DueParked {
    /// The attempts of a [`TAKE_DUE_PARKED`] reply (six fields each).
    pub fn from_reply(flat: Vec<Vec<u8>>) -> Vec<DueParked> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        flat.chunks_exact(6)
            .map(|c| DueParked {
                member: text(&c[0]),
                spec: c[1].clone(),
                subject: text(&c[2]),
                priority: text(&c[3]).parse().unwrap_or(1),
                parks: text(&c[4]).parse().unwrap_or(1),
                traceparent: Some(text(&c[5])).filter(|t| !t.is_empty()),
            })
            .collect()
    }
}

/// Drops a re-published attempt's record unless it was parked again meanwhile.
/// KEYS: record, parked set. ARGV: member, park count it was taken with.
pub const UNPARK: &str = r#"
if redis.call('HGET', KEYS[1], 'parks') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"#;

/// One parked job attempt: a hash of [`parked_field`]s.
pub fn parked_job(member: &str) -> String {
    format!("orch:parked:{member}")
}

/// Fields of the [`parked_job`] hash.
pub mod parked_field {
    /// The job spec, as `codec::encode` writes it.
    pub const SPEC: &str = "spec";
    /// The queue subject it goes back to.
    pub const SUBJECT: &str = "subject";
    pub const BACKEND: &str = "backend";
    /// The credential it waits for.
    pub const CREDENTIAL: &str = "credential";
    pub const PRIORITY: &str = "priority";
    pub const PARKED_AT_MS: &str = "parked_at_ms";
    pub const WAKE_AT_MS: &str = "wake_at_ms";
    /// The W3C `traceparent` of the job's dispatch (empty without one): the re-published job
    /// carries it, so its next run stays in the task's trace.
    pub const TRACEPARENT: &str = "traceparent";
    /// How many times the attempt was parked (each re-publish has its own message id).
    pub const PARKS: &str = "parks";
    /// Why it is parked: `limit` (a credential's usage limit) or `approval` (a person's
    /// answer to [`APPROVAL`]); absent in records written before approvals parked jobs.
    pub const REASON: &str = "reason";
    /// The approval request it waits for (reason `approval`).
    pub const APPROVAL: &str = "approval";
}

/// Sorted set of approval requests (their ids), scored by when they were made (ms): the
/// cluster-wide "needs you" queue. An id whose [`approval`] hash has expired is dropped by
/// whoever lists it.
pub const APPROVALS: &str = "orch:approvals";

/// One approval request: a hash of [`approval_field`]s, written by the worker whose agent
/// asks, answered once by [`ANSWER_APPROVAL`] (a person through the API, or the asking worker
/// at the deadline).
pub fn approval(id: &str) -> String {
    format!("orch:approval:{id}")
}

/// Tool rules granted for the rest of one task (`orchctl approvals approve ID --for task`):
/// a set of `Tool(pattern)` rules.
pub fn approval_grants_task(task: TaskId) -> String {
    format!("orch:approval-grants:task:{task}")
}

/// Tool rules granted for every task of a tenant (`--always PATTERN`; the admin's without
/// tenants is `-`): a set of `Tool(pattern)` rules.
pub fn approval_grants_tenant(tenant: Option<&str>) -> String {
    format!("orch:approval-grants:tenant:{}", tenant.unwrap_or("-"))
}

/// The approval requests one job attempt made and has not had the answer of yet: a hash of
/// `<tool>\n<subject>` → request id. An agent resumed after it was parked asks the same
/// question again and gets the stored request's answer instead of a new request.
pub fn approval_asked(job: &str, attempt: u32) -> String {
    format!("orch:approval-asked:{job}:{attempt}")
}

/// Fields of the [`approval`] hash.
pub mod approval_field {
    pub const ID: &str = "id";
    pub const TASK: &str = "task";
    pub const JOB: &str = "job";
    pub const ATTEMPT: &str = "attempt";
    pub const ROLE: &str = "role";
    /// The tenant of the task (absent: an admin's task).
    pub const TENANT: &str = "tenant";
    pub const TOOL: &str = "tool";
    /// What the tool would do: the command, the path, or the edit (shortened).
    pub const SUMMARY: &str = "summary";
    /// The tool's whole input as JSON (shortened).
    pub const INPUT: &str = "input";
    pub const CREATED_MS: &str = "created_ms";
    pub const DEADLINE_MS: &str = "deadline_ms";
    /// `pending`, `approved` or `denied`.
    pub const STATE: &str = "state";
    /// Who answered: `admin`, `tenant:<name>`, or `deadline`.
    pub const BY: &str = "by";
    /// What the agent is told.
    pub const MESSAGE: &str = "message";
    /// The rule the answer granted beyond this request (`Tool(pattern)`), if any.
    pub const GRANT: &str = "grant";
    pub const ANSWERED_MS: &str = "answered_ms";
    /// The parked attempt (`<job>:<attempt>`, a member of [`PARKED`](super::PARKED)) that
    /// waits for this answer: answering the request makes it due at once.
    pub const PARKED: &str = "parked";
}

/// Answers an approval request exactly once. KEYS: the request's hash, [`PARKED`]. ARGV: state
/// (`approved`/`denied`), by, message, grant, now ms, keep seconds (how long an answered
/// request stays listed), and `1` when a request past its deadline may still be answered (the
/// deadline itself answers so). A job attempt parked waiting for the answer is made due at
/// once, in the same step (so an answer never misses its parked agent). Returns 1 when this
/// call answered it, 0 when the request does not exist, -1 when it was answered already, -2
/// when its deadline has passed.
pub const ANSWER_APPROVAL: &str = r#"
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state ~= 'pending' then return -1 end
if ARGV[7] ~= '1' and tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or '0') < tonumber(ARGV[5]) then return -2 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'by', ARGV[2], 'message', ARGV[3], 'grant', ARGV[4], 'answered_ms', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local parked = redis.call('HGET', KEYS[1], 'parked')
if parked then redis.call('ZADD', KEYS[2], 'XX', 'LT', ARGV[5], parked) end
return 1
"#;

/// Parks a job attempt waiting for approval request KEYS[3]: like the limit broker's park
/// (record KEYS[1] with the park count from counter KEYS[4], member ARGV[1] in [`PARKED`]
/// KEYS[2] scored ARGV[2], the wake time: the request's deadline), and the pending request
/// names the parked attempt. A request answered already (between the agent's last look and
/// this park), or gone, makes the attempt due at once. ARGV[3] is now (ms), then field and value pairs. Returns
/// the park count.
pub const PARK_FOR_APPROVAL: &str = r#"
local n = redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], 604800)
redis.call('HSET', KEYS[1], 'parks', n)
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local wake = ARGV[2]
local state = redis.call('HGET', KEYS[3], 'state')
if state ~= 'pending' then wake = ARGV[3] else redis.call('HSET', KEYS[3], 'parked', ARGV[1]) end
redis.call('ZADD', KEYS[2], wake, ARGV[1])
return n
"#;
