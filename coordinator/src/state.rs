//! Everything the coordinator keeps in Redis. The only module that knows key names and scripts.
//!
//! Keys:
//! - `orch:task:<id>`: the task record ([`Task`], protocol-encoded).
//! - `orch:tasks`: sorted set of every task id, all scored 0 so it orders by member; ids are
//!   UUIDv7, so lexical order is creation order and a page is one `ZREVRANGEBYLEX`.
//! - `orch:tasks:unfinished`: sorted set of the task ids not yet finished (what a restarted
//!   coordinator resumes), scored 0 like `orch:tasks`, so the count is one `ZCARD` and the newest
//!   page one `ZREVRANGEBYLEX` however many agents run. It replaces the plain set
//!   `orch:tasks:active` of earlier builds, which a leader moves into it when it starts
//!   ([`State::migrate_active`]).
//! - `orch:idem:<key>`: the task id created for an idempotency key.
//! - `orch:jobindex`: hash job id → task id (agents are addressed by job id).
//! - `orch:dlq`: sorted set of dead-lettered job ids, scored by when they failed for good.
//! - `orch:stats:<role>:<model>`: the last 1,000 finished jobs of that role and model
//!   (`duration_ms cost_usd tokens`), for dry-run estimates.
//! - `orch:spend:<days since epoch>`: the day's spend (`spent`, `reserved`, and per job
//!   attempt `r:<job>:<attempt>` reservations and `s:<job>:<attempt>` settlements) and the
//!   tokens of the attempts that finished that day (`in`, `out`, `cw`, `cr`), so the status
//!   page sums the day without reading its tasks.
//! - `orch:forward:<id>`: a write forwarded by a standby, while the leader runs it (empty)
//!   and then its answer (protocol-encoded), for a few minutes: a repeated forward gets the
//!   first answer.
//! - `orch:costs:*`: hourly cost rollups for the cost report: see [`costs`].
//! - `orch:words:*`: the word index of task descriptions for searches: see [`search`].
//! - worker registry, done and cancel markers: see [`orch_shared::keys`].

pub mod approvals;
#[macro_use]
pub mod costs;
pub mod history;
pub mod search;

use crate::catchup::LogPosition;
use orch_config::redis::{ConnectError, Connection, Redis};
use orch_shared::api::{Task, Worker};
use orch_shared::codec;
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::job::{SessionPointer, Usage};
use orch_shared::keys::{self, worker_field};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TASKS: &str = "orch:tasks";
const ACTIVE: &str = "orch:tasks:unfinished";
/// The unordered set of unfinished task ids that builds before `ACTIVE` kept.
const LEGACY_ACTIVE: &str = "orch:tasks:active";
const JOB_INDEX: &str = "orch:jobindex";
const DLQ: &str = "orch:dlq";
/// Finished jobs kept per role and model for estimates.
const STATS_KEPT: isize = 1000;
/// Present while Redis holds the state built since the cluster's first start (or since the
/// last rebuild): its absence next to a non-empty JetStream log means Redis lost its data.
const EPOCH: &str = "orch:epoch";
/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL_SECS: u64 = 7 * 24 * 3600;
/// The daily budget the leading coordinator enforces (absent: none), so every replica's
/// `GET /v1/status` shows the budget that counts, not its own flag.
const DAILY_BUDGET: &str = "orch:budget:daily";
/// Tasks whose pull request may still need a step on the forge (opening it, marking it ready):
/// joined at submit, left once the task ended and its pull request is settled (see
/// [`crate::forge::service::run_pending`]).
const PR_PENDING: &str = "orch:pr:pending";

fn task_key(id: TaskId) -> String {
    keys::task(id)
}

/// Marks a task created with an idempotency key whose first publish is not done yet.
fn pending_key(id: TaskId) -> String {
    format!("orch:creating:{id}")
}

fn idem_key(key: &str) -> String {
    format!("orch:idem:{key}")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A write of a leader whose lease passed to another replica since (its epoch is not the
    /// current one): nothing was written.
    #[error("fenced out: leader epoch {0} is no longer the current one")]
    Fenced(u64),
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
    },
    #[error("stored record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: codec::DecodeError,
    },
}

impl Error {
    /// Whether connecting again may help (not when Redis refused the credentials).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(e) => e.is_transient(),
            _ => true,
        }
    }
}

/// The Lua check that opens every leader write: unless `ARGV[1]` is `0` (a replica that is not
/// leading: a rebuild, a test), the write goes through only while `KEYS[1]` (the leader epoch)
/// is still `ARGV[1]`, so a leader whose lease passed to another replica writes nothing.
macro_rules! fence_lua {
    () => {
        r#"
if ARGV[1] ~= '0' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
"#
    };
}

/// Overwrites whole task records, each joining or leaving the active set and bringing its
/// cost rollup entries up to date ([`costs`]), if the leader epoch holds ([`fence_lua`]).
/// KEYS: leader epoch, active, cost hours, then per task its key, rollup marks and sums.
/// ARGV: epoch, then per task its id, record, 1 if terminal, rollup hour and entries.
/// Returns -1 when fenced out, else 1.
const SAVE_TASKS: &str = concat!(
    fence_lua!(),
    rollup_lua!(),
    r#"
for t = 0, (#KEYS - 3) / 3 - 1 do
  local k = 4 + t * 3
  local at = 2 + t * 5
  redis.call('SET', KEYS[k], ARGV[at + 1])
  if ARGV[at + 2] == '1' then redis.call('ZREM', KEYS[2], ARGV[at]) else redis.call('ZADD', KEYS[2], 0, ARGV[at]) end
  rollup(KEYS[k + 1], KEYS[k + 2], KEYS[3], ARGV[at], ARGV[at + 3], ARGV[at + 4])
end
return 1
"#
);

/// Moves the members of the plain set an earlier build kept (KEYS[1]) into the sorted set of
/// unfinished tasks (KEYS[2]), scored 0, and deletes it. Returns how many it moved.
const MIGRATE_ACTIVE: &str = r#"
local ids = redis.call('SMEMBERS', KEYS[1])
for i = 1, #ids, 1000 do
  local args = {}
  for j = i, math.min(i + 999, #ids) do
    args[#args + 1] = 0
    args[#args + 1] = ids[j]
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
redis.call('DEL', KEYS[1])
return #ids
"#;

/// How far in the JetStream log this Redis has everything ([`LogPosition`]).
const APPLIED: &str = "orch:applied";

/// The key holding the current leader epoch, raised by each replica that takes the lease.
const LEADER_EPOCH: &str = "orch:leader:epoch";

pub use orch_shared::keys::DueParked;

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Redis { op, source }
}

fn forward_key(id: &str) -> String {
    format!("orch:forward:{id}")
}

/// How long the answer to a forwarded write is remembered.
const FORWARD_TTL_SECS: u64 = 300;

/// Outcome of [`State::claim_forward`].
#[derive(Debug, PartialEq)]
pub enum ForwardClaim<T> {
    /// The first time this forward is seen: run it, then [`State::remember_forward`].
    First,
    /// Another delivery of it is running.
    Running,
    /// It ran: this was its answer.
    Answered(T),
}

/// Outcome of [`State::create_task`].
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    New,
    /// The idempotency key was used before, by this task.
    Existing(TaskId),
}

/// A cheap, cloneable handle on Redis.
#[derive(Clone)]
pub struct State {
    conn: Connection,
    /// The leader epoch this replica took with the lease (0 while it does not lead), the
    /// fencing token its task writes carry.
    epoch: Arc<AtomicU64>,
    /// Cancelled when a write was fenced out: another replica leads now.
    fenced: CancellationToken,
}

/// Creates the task, its index entries and its idempotency key in one step, or returns the
/// task that already holds the key; the new task is marked pending until its first publish
/// is done ([`State::created`]). KEYS: idem, task, tasks, active, job index, pending, then
/// the word index keys of its prompt. ARGV: id, record, ttl, then the job ids.
const CREATE_WITH_KEY: &str = r#"
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
for i = 7, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[6], 1, 'EX', 120)
for i = 4, #ARGV do redis.call('HSET', KEYS[5], ARGV[i], ARGV[1]) end
return false
"#;

/// Writes a task's record only if it has none, and its index entries either way: the retry of
/// a creation whose first write failed while its jobs were already published, when the
/// task's lane may have saved a newer record meanwhile. KEYS: task, tasks, active, job index,
/// then the word index keys of its prompt. ARGV: id, record, then the job ids.
const CREATE_IF_ABSENT: &str = r#"
for i = 5, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then redis.call('ZADD', KEYS[3], 0, ARGV[1]) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
for i = 3, #ARGV do redis.call('HSET', KEYS[4], ARGV[i], ARGV[1]) end
return 1
"#;

/// Takes back a creation by [`CREATE_WITH_KEY`] whose first publish failed: the record, its
/// index entries and the idempotency key (only while it still names this task).
/// KEYS: idem, task, tasks, active, job index, pending, then the word index keys of its
/// prompt. ARGV: id, then the job ids.
const UNCREATE: &str = r#"
for i = 7, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2], KEYS[6])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
for i = 2, #ARGV do redis.call('HDEL', KEYS[5], ARGV[i]) end
return 1
"#;

/// Reserves an estimate against the daily budget, once per job attempt.
/// KEYS: day hash. ARGV: job:attempt, estimate, limit. Returns 1 if reserved (or already).
const RESERVE_DAILY: &str = r#"
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], 'r:'..id) == 1 or redis.call('HEXISTS', KEYS[1], 's:'..id) == 1 then return 1 end
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
if spent + reserved + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'r:'..id, ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[2])
redis.call('EXPIRE', KEYS[1], 172800)
return 1
"#;

/// The settlement of one job attempt in a day hash, shared by [`SETTLE_DAILY`] and
/// [`APPLY_RESULT`]: once per attempt, releases its reservation and adds its cost and tokens.
/// Expects the locals `day` (the hash), `id` (job:attempt), `cost`, `tin`, `tout`, `tcw`,
/// `tcr`; sets `settled` to 1 when it settled now.
macro_rules! settle_lua {
    () => {
        r#"
local settled = 0
if redis.call('HEXISTS', day, 's:'..id) == 0 then
  local r = redis.call('HGET', day, 'r:'..id)
  if r then
    redis.call('HINCRBYFLOAT', day, 'reserved', -tonumber(r))
    redis.call('HDEL', day, 'r:'..id)
  end
  redis.call('HSET', day, 's:'..id, cost)
  redis.call('HINCRBYFLOAT', day, 'spent', cost)
  redis.call('HINCRBY', day, 'in', tin)
  redis.call('HINCRBY', day, 'out', tout)
  redis.call('HINCRBY', day, 'cw', tcw)
  redis.call('HINCRBY', day, 'cr', tcr)
  redis.call('EXPIRE', day, 172800)
  settled = 1
end
"#
    };
}

/// Settles a job attempt's real cost and tokens, once (see [`settle_lua`]).
/// KEYS: day hash. ARGV: job:attempt, cost, input, output, cache write, cache read tokens.
/// Returns 1 if settled now, 0 if it was before.
const SETTLE_DAILY: &str = concat!(
    "local day, id, cost, tin, tout, tcw, tcr = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]\n",
    settle_lua!(),
    "return settled\n"
);

/// Saves a task after a job result was applied, with the result's bookkeeping, in one round
/// trip: unless a later worker took the attempt's lease (its fence moved on), writes the
/// record, joins or leaves the active set, settles the attempt's cost and tokens in the day's
/// figures once (as [`SETTLE_DAILY`]), keeps the job's figures for estimates and writes the
/// agent's session pointer when the result reports a stored session.
/// KEYS: fence, task, active, day hash, stats list, session pointer, leader epoch, cost
/// rollup marks, sums and hours.
/// ARGV: fence (0: the worker held no lease), record, 1 if terminal, task id, job:attempt,
/// cost, stats row ('' for none), rows kept, input, output, cache write, cache read tokens,
/// leader epoch (as in [`fence_lua`]), rollup hour and entries ([`costs`]), then the
/// pointer's field/value pairs (none: no session).
/// Returns -1 when this leader is fenced out, 0 when the worker is, else 1.
const APPLY_RESULT: &str = concat!(
    rollup_lua!(),
    r#"
if ARGV[13] ~= '0' and redis.call('GET', KEYS[7]) ~= ARGV[13] then return -1 end
if ARGV[1] ~= '0' then
  local current = redis.call('GET', KEYS[1])
  if current and current ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[2], ARGV[2])
rollup(KEYS[8], KEYS[9], KEYS[10], ARGV[4], ARGV[14], ARGV[15])
if ARGV[3] == '1' then redis.call('ZREM', KEYS[3], ARGV[4]) else redis.call('ZADD', KEYS[3], 0, ARGV[4]) end
local day, id, cost, tin, tout, tcw, tcr = KEYS[4], ARGV[5], ARGV[6], ARGV[9], ARGV[10], ARGV[11], ARGV[12]
"#,
    settle_lua!(),
    r#"
if ARGV[7] ~= '' then
  redis.call('LPUSH', KEYS[5], ARGV[7])
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[8]) - 1)
end
if #ARGV > 15 then
  redis.call('DEL', KEYS[6])
  redis.call('HSET', KEYS[6], unpack(ARGV, 16))
end
return 1
"#
);

// Scripts hashed once (`Script::new` computes the SHA1 the server caches them by).
static SAVE_TASKS_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SAVE_TASKS));
static TAKE_LEAD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TAKE_LEAD));
static APPLY_RESULT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPLY_RESULT));
static SETTLE_DAILY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SETTLE_DAILY));
static RESERVE_DAILY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RESERVE_DAILY));
static CREATE_WITH_KEY_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CREATE_WITH_KEY));
static UNCREATE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(UNCREATE));
static CREATE_IF_ABSENT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CREATE_IF_ABSENT));
static RENEW_LEAD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RENEW_LEAD));
static RELEASE_LEAD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE_LEAD));

/// The day hash's `spent`, `reserved`, `in`, `out`, `cw` and `cr` fields.
type DayFields = (
    Option<f64>,
    Option<f64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// Today's figures (see [`State::today`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Today {
    /// Tasks created today.
    pub tasks: u64,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    /// Tokens of the agent attempts that finished today.
    pub usage: Usage,
}

/// A job result's bookkeeping, written with the task by [`State::save_result`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResultWrite<'a> {
    pub job: JobId,
    pub attempt: u32,
    /// The fence the worker held (0: none).
    pub fence: u64,
    pub cost_usd: f64,
    /// The attempt's tokens, counted in the day's figures once, like its cost.
    pub usage: Usage,
    pub finished_at_ms: u64,
    /// For estimates, when the result was applied and succeeded.
    pub stats: Option<JobFigures<'a>>,
    /// The session the turn stored, written as the agent's session pointer.
    pub session: Option<&'a SessionPointer>,
}

/// One finished job's figures for estimates (see [`State::job_stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobFigures<'a> {
    pub role: &'a str,
    pub model: &'a str,
    pub duration_ms: u64,
    pub cost_usd: f64,
    pub tokens: u64,
}

fn stats_key(role: &str, model: &str) -> String {
    format!("orch:stats:{role}:{model}")
}

/// The daily spend hash of the UTC day of `now_ms`.
fn day_key(now_ms: u64) -> String {
    format!("orch:spend:{}", now_ms / 86_400_000)
}

const LEADER: &str = "orch:leader";

/// Takes the leader lease if nobody holds it and raises the leader epoch. KEYS: leader, epoch.
/// ARGV: id, ttl ms. Returns the new epoch, or 0 when another replica holds the lease.
const TAKE_LEAD: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"#;

/// Extends the leader lease if `ARGV[1]` holds it; takes it again if nobody holds it and the
/// leader epoch is still `ARGV[3]` (no replica led since: Redis lost the lease, say a failover
/// to a replica that missed its last renewals). KEYS: leader, epoch. ARGV: id, ttl ms, epoch.
const RENEW_LEAD: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Drops the leader lease if `ARGV[1]` holds it. KEYS: leader. ARGV: id.
const RELEASE_LEAD: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// One entry of the dead-letter set.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub job_id: JobId,
    pub task_id: TaskId,
    pub at_ms: u64,
}

/// Median and 90th percentile of finished jobs of one role and model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobStats {
    pub samples: usize,
    pub duration_ms: (u64, u64),
    pub cost_usd: (f64, f64),
    pub tokens: (u64, u64),
}

impl State {
    /// Opens the service's one Redis connection (through Sentinel, one that follows the
    /// primary).
    pub async fn connect(redis: &Redis) -> Result<Self, Error> {
        let conn = redis.connect().await?;
        Ok(Self {
            conn,
            epoch: Arc::default(),
            fenced: CancellationToken::new(),
        })
    }

    /// Whether Redis answers a PING within a second.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(_))
        )
    }

    /// Stores a new task atomically (record, history index, active set, idempotency key).
    ///
    /// Every clone of a `State` shares one multiplexed connection, whose requests Redis
    /// executes in the order they were queued; the write is queued at the first poll of this
    /// future, so any command issued after that poll (a lane's save) is executed after it.
    pub async fn create_task(&self, task: &Task) -> Result<Created, Error> {
        let mut conn = self.conn.clone();
        let record = codec::encode(task);
        let id = task.id.to_string();
        if let Some(key) = &task.idempotency_key {
            let script = &*CREATE_WITH_KEY_SCRIPT;
            let mut call = script.prepare_invoke();
            call.key(idem_key(key))
                .key(task_key(task.id))
                .key(TASKS)
                .key(ACTIVE)
                .key(JOB_INDEX)
                .key(pending_key(task.id));
            for key in search::word_keys(&task.prompt) {
                call.key(key);
            }
            call.arg(&id).arg(record).arg(IDEMPOTENCY_TTL_SECS);
            for job in &task.jobs {
                call.arg(job.id.to_string());
            }
            let existing: Option<String> = call
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err("create task"))?;
            return Ok(match existing.and_then(|s| s.parse().ok()) {
                Some(other) => Created::Existing(other),
                None => Created::New,
            });
        }
        let index: Vec<(String, &str)> = task
            .jobs
            .iter()
            .map(|j| (j.id.to_string(), id.as_str()))
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(task_key(task.id), record)
            .zadd(TASKS, &id, 0)
            .zadd(ACTIVE, &id, 0)
            .hset_multiple(JOB_INDEX, &index);
        for key in search::word_keys(&task.prompt) {
            pipe.zadd(key, &id, 0).ignore();
        }
        pipe.exec_async(&mut conn)
            .await
            .map_err(redis_err("create task"))?;
        Ok(Created::New)
    }

    /// Takes back the creation of a task with an idempotency key whose first jobs could not be
    /// published: a client that sends the submit again then creates it anew, instead of
    /// getting back a task that nothing runs.
    pub async fn uncreate_task(&self, task: &Task) -> Result<(), Error> {
        let Some(key) = &task.idempotency_key else {
            return Ok(());
        };
        let mut conn = self.conn.clone();
        let script = &*UNCREATE_SCRIPT;
        let mut call = script.prepare_invoke();
        call.key(idem_key(key))
            .key(task_key(task.id))
            .key(TASKS)
            .key(ACTIVE)
            .key(JOB_INDEX)
            .key(pending_key(task.id));
        for key in search::word_keys(&task.prompt) {
            call.key(key);
        }
        call.arg(task.id.to_string());
        for job in &task.jobs {
            call.arg(job.id.to_string());
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(redis_err("take back a task"))
    }

    /// The first publish of a task created with an idempotency key is done: a submit with
    /// the same key gets it from now on.
    pub async fn created(&self, id: TaskId) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(pending_key(id))
            .await
            .map_err(redis_err("mark a task created"))
    }

    /// Whether a task created with an idempotency key still waits for its first publish (and
    /// may be taken back).
    pub async fn pending(&self, id: TaskId) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        conn.exists(pending_key(id))
            .await
            .map_err(redis_err("read a task's creation"))
    }

    /// Creates a task without an idempotency key, like [`State::create_task`], but never
    /// overwrites a record that exists (its lane may have saved a newer one): the retry of a
    /// first write that failed after the task's jobs were published.
    pub async fn ensure_task(&self, task: &Task) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let script = &*CREATE_IF_ABSENT_SCRIPT;
        let mut call = script.prepare_invoke();
        let id = task.id.to_string();
        call.key(task_key(task.id))
            .key(TASKS)
            .key(ACTIVE)
            .key(JOB_INDEX);
        for key in search::word_keys(&task.prompt) {
            call.key(key);
        }
        call.arg(&id).arg(codec::encode(task));
        for job in &task.jobs {
            call.arg(job.id.to_string());
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(redis_err("create task"))
    }

    /// Overwrites a task record; it joins or leaves the active set in the same step. Fenced
    /// ([`Error::Fenced`]) once another replica took the lease.
    pub async fn save_task(&self, task: &Task) -> Result<(), Error> {
        self.save_tasks(&[task]).await
    }

    /// Overwrites several task records in one round trip; each joins or leaves the active set
    /// as [`State::save_task`] does, and all are fenced together.
    pub async fn save_tasks(&self, tasks: &[&Task]) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut call = SAVE_TASKS_SCRIPT.key(LEADER_EPOCH);
        call.key(ACTIVE).key(costs::HOURS).arg(epoch);
        for task in tasks {
            let hour = costs::hour_of(task.id);
            call.key(task_key(task.id))
                .key(costs::marks_key(hour))
                .key(costs::hour_key(hour))
                .arg(task.id.to_string())
                .arg(codec::encode(task))
                .arg(u8::from(task.status.is_terminal()))
                .arg(hour)
                .arg(costs::entries(task));
        }
        let written: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("save tasks"))?;
        self.fenced_if(written, epoch)
    }

    /// [`Error::Fenced`] for a script's -1, which also tells [`State::fenced`]'s waiters.
    fn fenced_if(&self, written: i64, epoch: u64) -> Result<(), Error> {
        if written == -1 {
            self.fenced.cancel();
            return Err(Error::Fenced(epoch));
        }
        Ok(())
    }

    /// Saves a task after applying a job result, with the result's bookkeeping, in one round
    /// trip (see [`APPLY_RESULT`]); false, and nothing written, when the result is fenced out:
    /// another worker took the attempt's lease since.
    pub async fn save_result(&self, task: &Task, w: &ResultWrite<'_>) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let epoch = self.epoch.load(Ordering::Relaxed);
        let stats = w.stats.map(|f| {
            (
                stats_key(f.role, f.model),
                format!("{} {} {}", f.duration_ms, f.cost_usd, f.tokens),
            )
        });
        let hour = costs::hour_of(task.id);
        let mut call = APPLY_RESULT_SCRIPT.key(keys::job_fence(w.job, w.attempt));
        call.key(task_key(task.id))
            .key(ACTIVE)
            .key(day_key(w.finished_at_ms))
            .key(stats.as_ref().map_or("orch:stats:none", |s| s.0.as_str()))
            .key(keys::session(w.job))
            .key(LEADER_EPOCH)
            .key(costs::marks_key(hour))
            .key(costs::hour_key(hour))
            .key(costs::HOURS)
            .arg(w.fence)
            .arg(codec::encode(task))
            .arg(u8::from(task.status.is_terminal()))
            .arg(task.id.to_string())
            .arg(format!("{}:{}", w.job, w.attempt))
            .arg(w.cost_usd)
            .arg(stats.as_ref().map_or("", |s| s.1.as_str()))
            .arg(STATS_KEPT)
            .arg(w.usage.input_tokens)
            .arg(w.usage.output_tokens)
            .arg(w.usage.cache_creation_tokens)
            .arg(w.usage.cache_read_tokens)
            .arg(epoch)
            .arg(hour)
            .arg(costs::entries(task));
        for (field, value) in w.session.map(SessionPointer::fields).unwrap_or_default() {
            call.arg(field).arg(value);
        }
        let written: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("save task"))?;
        self.fenced_if(written, epoch)?;
        Ok(written == 1)
    }

    /// Writes agent `job`'s session pointer whole (a rebuild restoring it from the result).
    pub async fn restore_session(&self, job: JobId, pointer: &SessionPointer) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let key = keys::session(job);
        redis::pipe()
            .atomic()
            .del(&key)
            .hset_multiple(&key, &pointer.fields())
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("restore session"))
    }

    pub async fn load_task(&self, id: TaskId) -> Result<Option<Task>, Error> {
        let mut conn = self.conn.clone();
        let key = task_key(id);
        let bytes: Option<Vec<u8>> = conn.get(&key).await.map_err(redis_err("load task"))?;
        bytes
            .map(|b| codec::decode(&b).map_err(|source| Error::Corrupt { key, source }))
            .transpose()
    }

    /// Up to `limit` tasks, newest first, older than `before` when given; and the cursor of
    /// the next page.
    pub async fn list_tasks(
        &self,
        limit: usize,
        before: Option<TaskId>,
    ) -> Result<(Vec<Task>, Option<TaskId>), Error> {
        let mut conn = self.conn.clone();
        let max = match before {
            Some(id) => format!("({id}"),
            None => "+".into(),
        };
        let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
            .arg(TASKS)
            .arg(max)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list tasks"))?;
        let more = ids.len() > limit;
        let ids: Vec<TaskId> = ids
            .iter()
            .take(limit)
            .filter_map(|s| s.parse().ok())
            .collect();
        if ids.is_empty() {
            return Ok((vec![], None));
        }
        let keys: Vec<String> = ids.iter().map(|id| task_key(*id)).collect();
        let records: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list tasks"))?;
        let mut tasks = Vec::with_capacity(records.len());
        for (key, bytes) in keys.into_iter().zip(records) {
            if let Some(bytes) = bytes {
                tasks.push(codec::decode(&bytes).map_err(|source| Error::Corrupt { key, source })?);
            }
        }
        let next = if more { ids.last().copied() } else { None };
        Ok((tasks, next))
    }

    /// Records that task `id` asked for a pull request: the leader sees to it until it is
    /// settled, whichever leader that is.
    pub async fn add_pr_pending(&self, id: TaskId) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.sadd(PR_PENDING, id.to_string())
            .await
            .map_err(redis_err("record a pull request to open"))
    }

    /// The task's pull request needs nothing more.
    pub async fn remove_pr_pending(&self, id: TaskId) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.srem(PR_PENDING, id.to_string())
            .await
            .map_err(redis_err("settle a pull request"))
    }

    /// Ids of the tasks whose pull request may still need a step on the forge.
    pub async fn pr_pending(&self) -> Result<Vec<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .smembers(PR_PENDING)
            .await
            .map_err(redis_err("pull requests to open"))?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Ids of every task that has not finished, oldest first (a leader resuming them reads
    /// them all; a reader of a page uses [`State::active_ids_desc`]).
    pub async fn active_tasks(&self) -> Result<Vec<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .zrange(ACTIVE, 0, -1)
            .await
            .map_err(redis_err("active tasks"))?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Moves the unordered set of unfinished tasks an earlier build kept into the sorted set
    /// (in one step; nothing to do once done). Returns how many ids it moved.
    pub async fn migrate_active(&self) -> Result<u64, Error> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(MIGRATE_ACTIVE));
        let mut conn = self.conn.clone();
        SCRIPT
            .key(LEGACY_ACTIVE)
            .key(ACTIVE)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("move the active tasks to their sorted set"))
    }

    /// Takes ids out of the unfinished tasks (a resuming leader found them finished or
    /// gone: an earlier build finished them after [`State::migrate_active`] had run).
    pub async fn forget_active(&self, ids: &[TaskId]) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        conn.zrem(ACTIVE, ids)
            .await
            .map_err(redis_err("forget finished tasks"))
    }

    /// Says, for [`keys::RESUME_GATE_TTL_MS`], that this coordinator's admission wakes the
    /// parked jobs (workers' wakers leave them alone meanwhile).
    pub async fn gate_resumes(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(keys::ADMISSION_RESUMES)
            .arg("1")
            .arg("PX")
            .arg(keys::RESUME_GATE_TTL_MS)
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("gate parked jobs' resumes"))
    }

    /// Takes up to `max` parked attempts due now, holding each for `hold` against anyone else
    /// while admission finds them a place.
    pub async fn take_due_parked(
        &self,
        max: usize,
        hold: Duration,
    ) -> Result<Vec<DueParked>, Error> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(keys::TAKE_DUE_PARKED));
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = SCRIPT
            .key(keys::PARKED)
            .arg(orch_shared::now_ms())
            .arg(max)
            .arg(hold.as_millis() as u64)
            .arg(keys::parked_job(""))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("take parked jobs"))?;
        Ok(DueParked::from_reply(flat))
    }

    /// Forgets a re-published parked attempt (unless it was parked again meanwhile).
    pub async fn unpark(&self, due: &DueParked) -> Result<(), Error> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(keys::UNPARK));
        let mut conn = self.conn.clone();
        let _: i64 = SCRIPT
            .key(keys::parked_job(&due.member))
            .key(keys::PARKED)
            .arg(&due.member)
            .arg(due.parks)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("unpark job"))?;
        Ok(())
    }

    /// The limit broker's credentials (`orch:credentials`, each `orch:limit:<backend>/<name>`)
    /// and the parked jobs waiting for each.
    pub async fn quotas(&self) -> Result<orch_shared::api::QuotaList, Error> {
        use orch_shared::keys::{limit_field as f, parked_field};
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn
            .smembers(keys::CREDENTIALS)
            .await
            .map_err(redis_err("list credentials"))?;
        names.sort();
        let parked: Vec<String> = conn
            .zrange(keys::PARKED, 0, -1)
            .await
            .map_err(redis_err("list parked jobs"))?;
        let mut pipe = redis::pipe();
        for n in &names {
            let (backend, name) = n.split_once('/').unwrap_or((n.as_str(), ""));
            pipe.hgetall(keys::limit(backend, name));
        }
        for m in &parked {
            pipe.cmd("HMGET")
                .arg(keys::parked_job(m))
                .arg(parked_field::BACKEND)
                .arg(parked_field::CREDENTIAL);
        }
        let mut replies: Vec<redis::Value> = if names.is_empty() && parked.is_empty() {
            vec![]
        } else {
            pipe.query_async(&mut conn)
                .await
                .map_err(redis_err("read credentials"))?
        };
        let waiting: Vec<Vec<Option<String>>> = replies
            .split_off(names.len())
            .into_iter()
            .map(|v| redis::from_redis_value(v).unwrap_or_default())
            .collect();
        let now = orch_shared::now_ms();
        let credentials = names
            .iter()
            .zip(replies)
            .map(|(n, v)| {
                let h: HashMap<String, String> = redis::from_redis_value(v).unwrap_or_default();
                let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
                let (backend, name) = n.split_once('/').unwrap_or((n.as_str(), ""));
                let until = num(f::UNTIL_MS).filter(|u| *u > now);
                orch_shared::api::Quota {
                    backend: backend.to_string(),
                    name: name.to_string(),
                    state: if until.is_some() { "exhausted" } else { "ok" }.into(),
                    until_ms: until,
                    reason: h.get(f::REASON).cloned().filter(|r| !r.is_empty()),
                    requests_limit: num(f::REQUESTS_LIMIT),
                    requests_remaining: num(f::REQUESTS_REMAINING),
                    tokens_limit: num(f::TOKENS_LIMIT),
                    tokens_remaining: num(f::TOKENS_REMAINING),
                    reset_ms: num(f::RESET_MS),
                    exhausted_total: num(f::EXHAUSTED_TOTAL).unwrap_or(0),
                    parked: waiting
                        .iter()
                        .filter(|w| {
                            w.first().and_then(Option::as_deref) == Some(backend)
                                && w.get(1).and_then(Option::as_deref) == Some(name)
                        })
                        .count() as u64,
                }
            })
            .collect();
        Ok(orch_shared::api::QuotaList {
            now_ms: now,
            credentials,
            parked: parked.len() as u64,
        })
    }

    /// Workers seen within `max_age`, with their last reported state. Stale registry entries
    /// are pruned on the way.
    pub async fn workers(&self, max_age: Duration) -> Result<Vec<Worker>, Error> {
        let mut conn = self.conn.clone();
        let cutoff = orch_shared::now_ms().saturating_sub(max_age.as_millis() as u64);
        let _: () = conn
            .zrembyscore(keys::WORKERS, "-inf", format!("({cutoff}"))
            .await
            .map_err(redis_err("prune workers"))?;
        let ids: Vec<String> = conn
            .zrange(keys::WORKERS, 0, -1)
            .await
            .map_err(redis_err("list workers"))?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::worker(&WorkerId(id.clone())));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list workers"))?;
        let num = |h: &HashMap<String, String>, f: &str| -> u64 {
            h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        Ok(ids
            .into_iter()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .map(|(id, h)| Worker {
                id: WorkerId(id),
                host: h.get(worker_field::HOST).cloned().unwrap_or_default(),
                slots: num(&h, worker_field::SLOTS) as u32,
                busy: num(&h, worker_field::BUSY) as u32,
                version: h.get(worker_field::VERSION).cloned().unwrap_or_default(),
                started_at_ms: num(&h, worker_field::STARTED_AT_MS),
                last_seen_ms: num(&h, worker_field::LAST_SEEN_MS),
                backends: h
                    .get(worker_field::BACKENDS)
                    .map(|b| {
                        b.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// Records that `jobs` belong to `task` (jobs added after creation, by a planner).
    pub async fn index_jobs(&self, task: TaskId, jobs: &[JobId]) -> Result<(), Error> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let task = task.to_string();
        let pairs: Vec<(String, &str)> = jobs
            .iter()
            .map(|j| (j.to_string(), task.as_str()))
            .collect();
        conn.hset_multiple(JOB_INDEX, &pairs)
            .await
            .map_err(redis_err("index jobs"))
    }

    /// The task a job (agent) belongs to.
    pub async fn task_of_job(&self, job: JobId) -> Result<Option<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn
            .hget(JOB_INDEX, job.to_string())
            .await
            .map_err(redis_err("find job"))?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    /// Whether a worker stored a session for this agent (see [`keys::session`]).
    pub async fn has_session(&self, job: JobId) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        conn.exists(keys::session(job))
            .await
            .map_err(redis_err("find session"))
    }

    /// Marks a job attempt cancelled (workers drop it if they pull it later).
    pub async fn mark_cancelled(&self, job: JobId, attempt: u32) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.set_ex(keys::job_cancelled(job, attempt), 1, IDEMPOTENCY_TTL_SECS)
            .await
            .map_err(redis_err("mark cancelled"))
    }

    pub async fn dead_letter(&self, job: JobId, at_ms: u64) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.zadd(DLQ, job.to_string(), at_ms)
            .await
            .map_err(redis_err("dead-letter job"))
    }

    /// Removes a job from the dead-letter set; false if it was not there.
    pub async fn undead_letter(&self, job: JobId) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let n: u32 = conn
            .zrem(DLQ, job.to_string())
            .await
            .map_err(redis_err("retry dead letter"))?;
        Ok(n > 0)
    }

    /// The newest `limit` dead letters.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let mut conn = self.conn.clone();
        let entries: Vec<(String, u64)> = conn
            .zrevrange_withscores(DLQ, 0, limit.saturating_sub(1) as isize)
            .await
            .map_err(redis_err("list dead letters"))?;
        if entries.is_empty() {
            return Ok(vec![]);
        }
        let jobs: Vec<&str> = entries.iter().map(|(j, _)| j.as_str()).collect();
        let tasks: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(JOB_INDEX)
            .arg(&jobs)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list dead letters"))?;
        Ok(entries
            .into_iter()
            .zip(tasks)
            .filter_map(|((job, at_ms), task)| {
                Some(DeadLetter {
                    job_id: job.parse().ok()?,
                    task_id: task?.parse().ok()?,
                    at_ms,
                })
            })
            .collect())
    }

    /// Median and p90 of the finished jobs of a role and model, if any finished.
    pub async fn job_stats(&self, role: &str, model: &str) -> Result<Option<JobStats>, Error> {
        let mut conn = self.conn.clone();
        let rows: Vec<String> = conn
            .lrange(stats_key(role, model), 0, -1)
            .await
            .map_err(redis_err("job stats"))?;
        let mut durations = Vec::new();
        let mut costs = Vec::new();
        let mut tokens = Vec::new();
        for row in &rows {
            let mut it = row.split(' ');
            if let (Some(d), Some(c), Some(t)) = (it.next(), it.next(), it.next())
                && let (Ok(d), Ok(c), Ok(t)) =
                    (d.parse::<u64>(), c.parse::<f64>(), t.parse::<u64>())
            {
                durations.push(d);
                costs.push(c);
                tokens.push(t);
            }
        }
        if durations.is_empty() {
            return Ok(None);
        }
        durations.sort_unstable();
        tokens.sort_unstable();
        costs.sort_by(f64::total_cmp);
        let pct = |n: usize, p: usize| ((n - 1) * p) / 100;
        let n = durations.len();
        Ok(Some(JobStats {
            samples: n,
            duration_ms: (durations[pct(n, 50)], durations[pct(n, 90)]),
            cost_usd: (costs[pct(n, 50)], costs[pct(n, 90)]),
            tokens: (tokens[pct(n, 50)], tokens[pct(n, 90)]),
        }))
    }

    /// Reserves `estimate` dollars of today's budget for a job attempt; false if it does not
    /// fit under `limit`. Idempotent per attempt.
    pub async fn reserve_daily(
        &self,
        job: JobId,
        attempt: u32,
        estimate: f64,
        limit: f64,
    ) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let ok: i64 = RESERVE_DAILY_SCRIPT
            .key(day_key(orch_shared::now_ms()))
            .arg(format!("{job}:{attempt}"))
            .arg(estimate)
            .arg(limit)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("reserve budget"))?;
        Ok(ok == 1)
    }

    /// Adds a job attempt's real cost and tokens to the figures of the day it finished, once,
    /// releasing its reservation.
    pub async fn settle_daily(
        &self,
        job: JobId,
        attempt: u32,
        cost: f64,
        usage: &Usage,
        finished_at_ms: u64,
    ) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let settled: i64 = SETTLE_DAILY_SCRIPT
            .key(day_key(finished_at_ms))
            .arg(format!("{job}:{attempt}"))
            .arg(cost)
            .arg(usage.input_tokens)
            .arg(usage.output_tokens)
            .arg(usage.cache_creation_tokens)
            .arg(usage.cache_read_tokens)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("settle cost"))?;
        Ok(settled == 1)
    }

    /// Today's (UTC) figures: spend and open reservations in dollars, the tokens of the
    /// attempts that finished today, and how many tasks were created since `midnight_ms`. Two
    /// reads, whatever the size of the history.
    pub async fn today(&self, midnight_ms: u64) -> Result<Today, Error> {
        let mut conn = self.conn.clone();
        let first = TaskId::from_u128(u128::from(midnight_ms) << 80).to_string();
        let ((spent, reserved, i, o, cw, cr), tasks): (DayFields, u64) = redis::pipe()
            .cmd("HMGET")
            .arg(day_key(midnight_ms))
            .arg(&["spent", "reserved", "in", "out", "cw", "cr"])
            // Task ids are UUIDv7 strings, and the history set holds them at one score: their
            // lexical order is their creation order.
            .cmd("ZLEXCOUNT")
            .arg(TASKS)
            .arg(format!("[{first}"))
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read today's figures"))?;
        Ok(Today {
            tasks,
            spent_usd: spent.unwrap_or(0.0),
            reserved_usd: reserved.unwrap_or(0.0),
            usage: Usage {
                input_tokens: i.unwrap_or(0),
                output_tokens: o.unwrap_or(0),
                cache_creation_tokens: cw.unwrap_or(0),
                cache_read_tokens: cr.unwrap_or(0),
            },
        })
    }

    /// Records the daily budget this coordinator enforces now that it leads.
    pub async fn set_daily_budget(&self, usd: Option<f64>) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        match usd {
            Some(usd) => conn.set::<_, _, ()>(DAILY_BUDGET, usd).await,
            None => conn.del::<_, ()>(DAILY_BUDGET).await,
        }
        .map_err(redis_err("write daily budget"))
    }

    /// The daily budget the leading coordinator enforces, if it has one.
    pub async fn daily_budget(&self) -> Result<Option<f64>, Error> {
        let mut conn = self.conn.clone();
        conn.get(DAILY_BUDGET)
            .await
            .map_err(redis_err("read daily budget"))
    }

    /// Claims a forwarded write by its id, or finds that it was claimed, and its answer if it
    /// has one.
    pub async fn claim_forward<T: serde::de::DeserializeOwned>(
        &self,
        id: &str,
    ) -> Result<ForwardClaim<T>, Error> {
        let key = forward_key(id);
        let mut conn = self.conn.clone();
        let claimed: bool = redis::cmd("SET")
            .arg(&key)
            .arg("")
            .arg("NX")
            .arg("EX")
            .arg(FORWARD_TTL_SECS)
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(redis_err("claim forwarded write"))?
            .is_some();
        if claimed {
            return Ok(ForwardClaim::First);
        }
        let answer: Option<Vec<u8>> = conn
            .get(&key)
            .await
            .map_err(redis_err("read forwarded answer"))?;
        match answer {
            // Expired in between: the first answer is forgotten; claim it anew.
            None => Box::pin(self.claim_forward(id)).await,
            Some(bytes) if bytes.is_empty() => Ok(ForwardClaim::Running),
            Some(bytes) => codec::decode(&bytes)
                .map(ForwardClaim::Answered)
                .map_err(|source| Error::Corrupt { key, source }),
        }
    }

    /// Remembers the answer to a forwarded write claimed with [`State::claim_forward`].
    pub async fn remember_forward<T: serde::Serialize>(
        &self,
        id: &str,
        answer: &T,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.set_ex(forward_key(id), codec::encode(answer), FORWARD_TTL_SECS)
            .await
            .map_err(redis_err("remember forwarded answer"))
    }

    /// When this Redis state began (ms), if it holds the cluster's state.
    pub async fn epoch(&self) -> Result<Option<u64>, Error> {
        let mut conn = self.conn.clone();
        conn.get(EPOCH).await.map_err(redis_err("read epoch"))
    }

    pub async fn set_epoch(&self, at_ms: u64) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.set(EPOCH, at_ms)
            .await
            .map_err(redis_err("write epoch"))
    }

    /// Writes back a task rebuilt from the durable log, with all its index entries.
    pub async fn restore_task(&self, task: &Task) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let id = task.id.to_string();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(task_key(task.id), codec::encode(task))
            .zadd(TASKS, &id, 0);
        if task.status.is_terminal() {
            pipe.zrem(ACTIVE, &id);
        } else {
            pipe.zadd(ACTIVE, &id, 0);
        }
        let index: Vec<(String, &str)> = task
            .jobs
            .iter()
            .map(|j| (j.id.to_string(), id.as_str()))
            .collect();
        if !index.is_empty() {
            pipe.hset_multiple(JOB_INDEX, &index);
        }
        if let Some(key) = &task.idempotency_key {
            pipe.set_ex(idem_key(key), &id, IDEMPOTENCY_TTL_SECS);
        }
        if task.pr.is_some() {
            // The leader's pending sweep drops it again if nothing is left to do.
            pipe.sadd(PR_PENDING, &id);
        }
        for job in &task.jobs {
            if job.status == orch_shared::api::JobStatus::Failed
                && job.kind == orch_shared::job::JobKind::Agent
            {
                pipe.zadd(
                    DLQ,
                    job.id.to_string(),
                    job.finished_at_ms.unwrap_or(task.created_at_ms),
                );
            }
        }
        costs::rollup_in(&mut pipe, task.id, &costs::entries(task));
        for key in search::word_keys(&task.prompt) {
            pipe.zadd(key, &id, 0).ignore();
        }
        pipe.exec_async(&mut conn)
            .await
            .map_err(redis_err("restore task"))
    }

    /// Records how far in the log this Redis has everything (see [`crate::catchup`]) and
    /// returns, from the same atomic step, the position it held before and the run id of the
    /// server that executed it (another one after a failover or a restart).
    pub async fn record_position(
        &self,
        at: &LogPosition,
    ) -> Result<(Option<LogPosition>, String), Error> {
        let mut conn = self.conn.clone();
        let (before, info): (HashMap<String, u64>, String) = redis::pipe()
            .atomic()
            .hgetall(APPLIED)
            .hset_multiple(APPLIED, &at.fields())
            .ignore()
            .cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("record the log position"))?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok((LogPosition::from_fields(&before), run_id))
    }

    /// How far in the log this Redis has everything; `None` before the first record.
    pub async fn position(&self) -> Result<Option<LogPosition>, Error> {
        let mut conn = self.conn.clone();
        let fields: HashMap<String, u64> = conn
            .hgetall(APPLIED)
            .await
            .map_err(redis_err("read the log position"))?;
        Ok(LogPosition::from_fields(&fields))
    }

    /// Puts back a position (a catch-up that failed half way is run again from it).
    pub async fn set_position(&self, at: &LogPosition) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(APPLIED, &at.fields())
            .await
            .map_err(redis_err("record the log position"))
    }

    /// Takes the leader lease if nobody holds it, with a new leader epoch that every task
    /// write of this replica carries from now on (see [`fence_lua`]).
    pub async fn try_lead(&self, id: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let epoch: u64 = TAKE_LEAD_SCRIPT
            .key(LEADER)
            .key(LEADER_EPOCH)
            .arg(id)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("take the leader lease"))?;
        if epoch == 0 {
            return Ok(false);
        }
        self.epoch.store(epoch, Ordering::Relaxed);
        Ok(true)
    }

    /// The leader epoch this replica took with the lease (0: it never led).
    pub fn leader_epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Resolves once a write of this replica was fenced out: another replica took the lease.
    pub async fn fenced(&self) {
        self.fenced.cancelled().await
    }

    /// Extends the leader lease; false if `id` no longer holds it.
    pub async fn renew_lead(&self, id: &str, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let held: i64 = RENEW_LEAD_SCRIPT
            .key(LEADER)
            .key(LEADER_EPOCH)
            .arg(id)
            .arg(ttl.as_millis() as u64)
            .arg(self.epoch.load(Ordering::Relaxed))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("renew the leader lease"))?;
        Ok(held == 1)
    }

    pub async fn release_leader(&self, id: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE_LEAD_SCRIPT
            .key(LEADER)
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("release the leader lease"))?;
        Ok(())
    }

    /// The id of the coordinator holding the leader lease.
    pub async fn leader(&self) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        conn.get(LEADER).await.map_err(redis_err("read the leader"))
    }
}
