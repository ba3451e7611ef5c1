//! Everything the worker keeps in Redis: its registry entry and the done markers of job
//! attempts. Key names come from [`orch_shared::keys`], shared with the coordinator.

use orch_shared::ids::{JobId, WorkerId};
use orch_shared::keys::{self, worker_field};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// A registry entry outlives its last refresh by this long.
pub const REGISTRY_TTL: Duration = Duration::from_secs(15);
/// How long a done marker is kept (longer than any redelivery of the same attempt).
const DONE_TTL_SECS: u64 = 7 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
    },
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Redis { op, source }
}

/// Takes the lease on a job attempt with a new fencing token.
/// KEYS: fence counter, lease. ARGV: worker id, ttl ms. Returns the token.
const ACQUIRE: &str = r#"
local f = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 604800)
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. f, 'PX', ARGV[2])
return f
"#;

/// Extends the lease if this worker still holds it. KEYS: lease. ARGV: value, ttl ms.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Drops the lease if this worker still holds it. KEYS: lease. ARGV: value.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A worker's lease on a job attempt and its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job: JobId,
    pub attempt: u32,
    pub fence: u64,
    value: String,
}

/// What the worker tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub host: String,
    pub slots: u32,
    pub version: String,
    pub started_at_ms: u64,
}

#[derive(Clone)]
pub struct State {
    conn: ConnectionManager,
}

impl State {
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let connect = |source| Error::Connect {
            url: orch_shared::redact_url(url),
            source,
        };
        let client = redis::Client::open(url).map_err(connect)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(connect)?;
        Ok(Self { conn })
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

    /// Why this job attempt must not run: it already finished with a durable result, or the
    /// coordinator cancelled it. One round trip.
    pub async fn skip_reason(
        &self,
        job: JobId,
        attempt: u32,
    ) -> Result<Option<&'static str>, Error> {
        let mut conn = self.conn.clone();
        let (done, cancelled): (bool, bool) = redis::pipe()
            .exists(keys::job_done(job, attempt))
            .exists(keys::job_cancelled(job, attempt))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("check job markers"))?;
        Ok(if done {
            Some("already finished")
        } else if cancelled {
            Some("cancelled")
        } else {
            None
        })
    }

    /// Marks a job attempt as finished (after its result is stored in JetStream).
    pub async fn mark_done(&self, job: JobId, attempt: u32) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.set_ex(keys::job_done(job, attempt), 1, DONE_TTL_SECS)
            .await
            .map_err(redis_err("mark job done"))
    }

    /// Takes the lease on a job attempt; the returned fence outranks every earlier taker's.
    pub async fn acquire(
        &self,
        worker: &WorkerId,
        job: JobId,
        attempt: u32,
        ttl: Duration,
    ) -> Result<Lease, Error> {
        let mut conn = self.conn.clone();
        let fence: u64 = redis::Script::new(ACQUIRE)
            .key(keys::job_fence(job, attempt))
            .key(keys::job_lease(job, attempt))
            .arg(&worker.0)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("acquire lease"))?;
        Ok(Lease {
            job,
            attempt,
            fence,
            value: format!("{}:{fence}", worker.0),
        })
    }

    /// Extends the lease; false when another worker took the attempt (or the lease lapsed).
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let held: i64 = redis::Script::new(RENEW)
            .key(keys::job_lease(lease.job, lease.attempt))
            .arg(&lease.value)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("renew lease"))?;
        Ok(held == 1)
    }

    pub async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(RELEASE)
            .key(keys::job_lease(lease.job, lease.attempt))
            .arg(&lease.value)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("release lease"))?;
        Ok(())
    }
}
