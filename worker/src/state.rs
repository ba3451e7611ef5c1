//! Everything the worker keeps in Redis: its registry entry, the leases and done markers of
//! job attempts, agents' session pointers, and (`state/limits`) the limit broker's credential
//! states and the parked job attempts. Key names come from [`orch_shared::keys`],
//! shared with the coordinator.

use orch_config::redis::{ConnectError, Connection, Redis};

mod approvals;
mod limits;

pub use approvals::{Answer, NewApproval};
pub use limits::{Due, ToPark};
use orch_shared::ids::{JobId, WorkerId};
use orch_shared::job::SessionPointer;
use orch_shared::keys::{self, worker_field};
use std::collections::HashMap;
use std::time::Duration;

/// A registry entry outlives its last refresh by this long.
pub const REGISTRY_TTL: Duration = Duration::from_secs(15);
/// How long a done marker is kept (longer than any redelivery of the same attempt).
const DONE_TTL_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
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

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Redis { op, source }
}

/// Claims a job attempt in one round trip: if its done or cancel marker is set, says so and
/// takes nothing; otherwise takes the lease with a new fencing token.
/// KEYS: done marker, cancel marker, fence counter, lease. ARGV: worker id, ttl ms.
/// Returns the token, or -1 (already finished) / -2 (cancelled).
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
local f = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 604800)
redis.call('SET', KEYS[4], ARGV[1] .. ':' .. f, 'PX', ARGV[2])
return f
"#;

/// Ends a job attempt whose result is stored, in one round trip: sets the done marker and
/// drops the lease, unless a later worker took the attempt since (its fence counter moved past
/// this worker's fence: then it returns 0 and changes nothing). The test is the coordinator's
/// own (`APPLY_RESULT`: a result is applied unless the counter names another fence), so a
/// marked attempt's result is always applied: once the marker is set, no claim can move the
/// counter. The lease alone cannot tell: it expires, and a holder that finished drops it.
/// An empty lease value (an unfenced run) always marks.
/// KEYS: done marker, lease, fence counter. ARGV: done ttl s, lease value, fence.
const FINISH: &str = r#"
if ARGV[2] ~= '' then
  local current = redis.call('GET', KEYS[3])
  if current and current ~= ARGV[3] then return 0 end
end
redis.call('SET', KEYS[1], 1, 'EX', ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"#;

/// Extends the lease if this worker still holds it. KEYS: lease. ARGV: value, ttl ms.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Saves an agent's checkpoint if the writer still holds the attempt's lease and no later
/// attempt or fence wrote one: the latest (a JSON string) and the list of kept ones, trimmed to
/// the newest `keep`. Returns the trimmed entries (their objects are the caller's to delete),
/// or -1 when the writer was fenced out.
/// KEYS: lease, latest, list. ARGV: lease value, attempt, fence, checkpoint JSON, keep, ttl s.
const SAVE_CHECKPOINT: &str = r#"
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local cur = redis.call('GET', KEYS[2])
if cur then
  local c = cjson.decode(cur)
  local a, f = tonumber(ARGV[2]), tonumber(ARGV[3])
  if c.attempt > a or (c.attempt == a and c.fence > f) then return -1 end
end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[6])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[6])
local n = redis.call('LLEN', KEYS[3]) - tonumber(ARGV[5])
if n <= 0 then return {} end
local gone = redis.call('LRANGE', KEYS[3], 0, n - 1)
redis.call('LTRIM', KEYS[3], n, -1)
return gone
"#;

/// Claims the first due checkpoint-ref clean-up: its score moves a lease ahead (a worker that
/// dies before it is done leaves it to be tried again then). Returns it, or nil.
/// KEYS: the clean-ups. ARGV: now ms, lease ms.
const CLAIM_REF_CLEANUP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[1])
return due[1]
"#;

// The scripts, hashed once (`Script::new` computes the SHA1 the server caches them by).
static CLAIM_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM));
static RENEW_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RENEW));
static FINISH_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(FINISH));
static SAVE_CHECKPOINT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SAVE_CHECKPOINT));
static CLAIM_REF_CLEANUP_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM_REF_CLEANUP));

/// What [`State::save_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// Saved; these older checkpoints (JSON) fell off the kept list.
    Kept { dropped: Vec<String> },
    /// Refused: the writer no longer holds the attempt, or a newer one wrote.
    FencedOut,
}

/// A worker's lease on a job attempt and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job: JobId,
    pub attempt: u32,
    pub fence: u64,
    value: String,
    /// When Redis last confirmed the lease (taken or renewed), by this process's clocks.
    confirmed: Confirmed,
}

/// Both clocks: the monotonic one runs on while the process is stopped (SIGSTOP), the wall
/// clock also while the machine sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Confirmed {
    at: std::time::Instant,
    wall_ms: u64,
}

impl Confirmed {
    fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            wall_ms: orch_shared::now_ms(),
        }
    }

    fn within(&self, d: Duration) -> bool {
        let wall = orch_shared::now_ms().saturating_sub(self.wall_ms);
        self.at.elapsed() < d && u128::from(wall) < d.as_millis()
    }
}

/// What [`State::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The attempt is this worker's to run.
    Leased(Lease),
    /// The attempt must not run: why.
    Skip(&'static str),
}

impl Lease {
    /// Whether the lease is certainly still held without asking Redis: it was confirmed less
    /// than half its TTL ago. Another worker can only take it after JetStream redelivers the
    /// job, which happens a whole ack wait (the TTL) after this worker received it or last
    /// kept it alive; a process paused for longer fails this check and asks Redis.
    pub fn surely_held(&self, ttl: Duration) -> bool {
        self.confirmed.within(ttl / 2)
    }
}

/// What the worker tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub host: String,
    pub slots: u32,
    pub version: String,
    pub started_at_ms: u64,
    /// The backends whose jobs this worker pulls (the coordinator tells a job for a backend
    /// no live worker runs that it waits).
    pub backends: Vec<orch_shared::job::Backend>,
}

#[derive(Clone)]
pub struct State {
    conn: Connection,
}

impl State {
    /// Opens the service's one Redis connection (through Sentinel, one that follows the
    /// primary).
    pub async fn connect(redis: &Redis) -> Result<Self, Error> {
        let conn = redis.connect().await?;
        Ok(Self { conn })
    }

    /// Writes agent `job`'s session pointer, whole: a stored turn saved again (a redelivery)
    /// leaves no field of the earlier version behind.
    pub async fn write_session_pointer(
        &self,
        job: JobId,
        pointer: &SessionPointer,
    ) -> Result<(), Error> {
        let key = keys::session(job);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(&key)
            .hset_multiple(&key, &pointer.fields())
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("save session pointer"))
    }

    /// The fields of agent `job`'s session pointer ([`keys::session_field`]); empty when it
    /// has none.
    pub async fn session_pointer(&self, job: JobId) -> Result<HashMap<String, Vec<u8>>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("HGETALL")
            .arg(keys::session(job))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("load session pointer"))
    }

    /// Saves `json`, agent `job`'s checkpoint under `lease` (none: unfenced, always saved
    /// unless a newer one is there), keeping the newest `keep` in its list for `ttl`.
    pub async fn save_checkpoint(
        &self,
        job: JobId,
        lease: Option<&Lease>,
        (attempt, fence): (u32, u64),
        json: &str,
        keep: u32,
        ttl: Duration,
    ) -> Result<Saved, Error> {
        let mut conn = self.conn.clone();
        let value: redis::Value = SAVE_CHECKPOINT_SCRIPT
            .key(keys::job_lease(job, attempt))
            .key(keys::checkpoint(job))
            .key(keys::checkpoints(job))
            .arg(lease.map_or("", |l| l.value.as_str()))
            .arg(attempt)
            .arg(fence)
            .arg(json)
            .arg(keep.max(1))
            .arg(ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("save checkpoint"))?;
        Ok(match value {
            redis::Value::Int(_) => Saved::FencedOut,
            other => Saved::Kept {
                dropped: redis::from_redis_value(other).map_err(|e| Error::Redis {
                    op: "save checkpoint",
                    source: e.into(),
                })?,
            },
        })
    }

    /// A due clean-up of a cleaned task's checkpoint refs ([`keys::REF_CLEANUPS`], JSON
    /// [`orch_shared::job::RefCleanup`]), now this worker's for `lease`.
    pub async fn claim_ref_cleanup(&self, lease: Duration) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        CLAIM_REF_CLEANUP_SCRIPT
            .key(keys::REF_CLEANUPS)
            .arg(orch_shared::now_ms())
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("claim ref clean-up"))
    }

    /// The clean-up `json` is done.
    pub async fn finish_ref_cleanup(&self, json: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::cmd("ZREM")
            .arg(keys::REF_CLEANUPS)
            .arg(json)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("finish ref clean-up"))
    }

    /// Agent `job`'s latest checkpoint (JSON), if it has one.
    pub async fn checkpoint(&self, job: JobId) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(keys::checkpoint(job))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("load checkpoint"))
    }

    /// Every kept checkpoint of agent `job` (JSON), oldest first.
    pub async fn checkpoint_list(&self, job: JobId) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("LRANGE")
            .arg(keys::checkpoints(job))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list checkpoints"))
    }

    /// Writes or refreshes the registry entry with the current busy count.
    pub async fn heartbeat(&self, info: &WorkerInfo, busy: u32) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let now = orch_shared::now_ms();
        let key = keys::worker(&info.id);
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    (worker_field::HOST, info.host.clone()),
                    (worker_field::SLOTS, info.slots.to_string()),
                    (worker_field::BUSY, busy.to_string()),
                    (worker_field::VERSION, info.version.clone()),
                    (worker_field::STARTED_AT_MS, info.started_at_ms.to_string()),
                    (worker_field::LAST_SEEN_MS, now.to_string()),
                    (
                        worker_field::BACKENDS,
                        info.backends
                            .iter()
                            .map(|b| b.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ],
            )
            .expire(&key, REGISTRY_TTL.as_secs() as i64)
            .zadd(keys::WORKERS, info.id.0.as_str(), now)
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("worker heartbeat"))
    }

    /// Removes the registry entry (clean exit).
    pub async fn deregister(&self, id: &WorkerId) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(keys::worker(id))
            .zrem(keys::WORKERS, id.0.as_str())
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("deregister worker"))
    }

    /// Claims a job attempt: [`Claim::Skip`] when it already finished with a durable result
    /// or the coordinator cancelled it, else its lease with a fence that outranks every
    /// earlier taker's. One round trip.
    pub async fn claim(
        &self,
        worker: &WorkerId,
        job: JobId,
        attempt: u32,
        ttl: Duration,
    ) -> Result<Claim, Error> {
        let mut conn = self.conn.clone();
        let fence: i64 = CLAIM_SCRIPT
            .key(keys::job_done(job, attempt))
            .key(keys::job_cancelled(job, attempt))
            .key(keys::job_fence(job, attempt))
            .key(keys::job_lease(job, attempt))
            .arg(&worker.0)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("claim job"))?;
        Ok(match fence {
            -1 => Claim::Skip("already finished"),
            -2 => Claim::Skip("cancelled"),
            fence => Claim::Leased(Lease {
                job,
                attempt,
                fence: fence as u64,
                value: format!("{}:{fence}", worker.0),
                confirmed: Confirmed::now(),
            }),
        })
    }

    /// Extends the lease; false when another worker took the attempt (or the lease lapsed).
    pub async fn renew(&self, lease: &mut Lease, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let asked = Confirmed::now();
        let held: i64 = RENEW_SCRIPT
            .key(keys::job_lease(lease.job, lease.attempt))
            .arg(&lease.value)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("renew lease"))?;
        if held == 1 {
            lease.confirmed = asked;
        }
        Ok(held == 1)
    }

    /// Marks a job attempt as finished (after its result is stored in JetStream) and drops
    /// its lease if this worker still holds it; false, and nothing changed, when a later
    /// worker took the attempt (this worker's result is fenced out).
    pub async fn finish(
        &self,
        job: JobId,
        attempt: u32,
        lease: Option<&Lease>,
    ) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let marked: i64 = FINISH_SCRIPT
            .key(keys::job_done(job, attempt))
            .key(keys::job_lease(job, attempt))
            .key(keys::job_fence(job, attempt))
            .arg(DONE_TTL_SECS)
            .arg(lease.map_or("", |l| l.value.as_str()))
            .arg(lease.map_or(0, |l| l.fence))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("mark job done"))?;
        Ok(marked == 1)
    }
}
