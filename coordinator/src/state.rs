//! Everything the coordinator keeps in Redis. The only module that knows key names and scripts.
//!
//! Keys:
//! - `orch:task:<id>`: the task record ([`Task`], protocol-encoded).
//! - `orch:tasks`: sorted set of every task id, all scored 0 so it orders by member; ids are
//!   UUIDv7, so lexical order is creation order and a page is one `ZREVRANGEBYLEX`.
//! - `orch:tasks:active`: set of task ids not yet finished (what a restarted coordinator resumes).
//! - `orch:idem:<key>`: the task id created for an idempotency key.
//! - worker registry: see [`orch_shared::keys`].

use orch_shared::api::{Task, Worker};
use orch_shared::codec;
use orch_shared::ids::{TaskId, WorkerId};
use orch_shared::keys::{self, worker_field};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;

const TASKS: &str = "orch:tasks";
const ACTIVE: &str = "orch:tasks:active";
/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL_SECS: u64 = 7 * 24 * 3600;

fn task_key(id: TaskId) -> String {
    format!("orch:task:{id}")
}

fn idem_key(key: &str) -> String {
    format!("orch:idem:{key}")
}

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
    #[error("stored record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: codec::DecodeError,
    },
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Redis { op, source }
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
    conn: ConnectionManager,
}

/// Creates the task, its index entries and its idempotency key in one step, or returns the
/// task that already holds the key. KEYS: idem, task, tasks, active. ARGV: id, record, ttl.
const CREATE_WITH_KEY: &str = r#"
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return false
"#;

impl State {
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let connect = |source| Error::Connect {
            url: url.to_string(),
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
    pub async fn create_task(&self, task: &Task) -> Result<Created, Error> {
        let mut conn = self.conn.clone();
        let record = codec::encode(task);
        let id = task.id.to_string();
        if let Some(key) = &task.idempotency_key {
            let existing: Option<String> = redis::Script::new(CREATE_WITH_KEY)
                .key(idem_key(key))
                .key(task_key(task.id))
                .key(TASKS)
                .key(ACTIVE)
                .arg(&id)
                .arg(record)
                .arg(IDEMPOTENCY_TTL_SECS)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err("create task"))?;
            return Ok(match existing.and_then(|s| s.parse().ok()) {
                Some(other) => Created::Existing(other),
                None => Created::New,
            });
        }
        redis::pipe()
            .atomic()
            .set(task_key(task.id), record)
            .zadd(TASKS, &id, 0)
            .sadd(ACTIVE, &id)
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("create task"))?;
        Ok(Created::New)
    }

    /// Overwrites a task record; a finished task leaves the active set in the same step.
    pub async fn save_task(&self, task: &Task) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().set(task_key(task.id), codec::encode(task));
        if task.status.is_terminal() {
            pipe.srem(ACTIVE, task.id.to_string());
        }
        pipe.exec_async(&mut conn)
            .await
            .map_err(redis_err("save task"))
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

    /// Ids of every task that has not finished.
    pub async fn active_tasks(&self) -> Result<Vec<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .smembers(ACTIVE)
            .await
            .map_err(redis_err("active tasks"))?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
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
            })
            .collect())
    }
}
