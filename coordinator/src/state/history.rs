//! History queries, deletion of old tasks and the coordinator registry.
//!
//! Keys (besides those of the parent module):
//! - `orch:coordinators`: sorted set of coordinator ids scored by their last heartbeat (ms).
//! - `orch:coordinator:<id>`: hash describing one coordinator; expires unless refreshed.
//!
//! Nothing here scans keys: time ranges of the history are id ranges of the `orch:tasks` index
//! (UUIDv7 ids sort by creation time), read one bounded page at a time.

use super::{DLQ, Error, JOB_INDEX, State, TASKS, idem_key, redis_err, task_key};
use orch_shared::api::Task;
use orch_shared::codec;
use orch_shared::ids::TaskId;
use orch_shared::keys;
use orch_shared::report::{CoordinatorInfo, id_bound};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::time::Duration;

const COORDINATORS: &str = "orch:coordinators";

fn coordinator_key(id: &str) -> String {
    format!("orch:coordinator:{id}")
}

/// Records loaded by one MGET.
const LOAD_BATCH: usize = 200;

/// Deletes an idempotency key only if it still names this task. KEYS: idem. ARGV: task id.
const DELETE_IDEM: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;
static DELETE_IDEM_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(DELETE_IDEM));

/// A window of the history: created at or after `since_ms`, before `until_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl State {
    /// Up to `limit` task ids of `range`, newest first, strictly older than `before`.
    pub async fn task_ids_desc(
        &self,
        range: Range,
        before: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        self.ids_desc(TASKS, range, before.map(|b| (b, false)), limit)
            .await
    }

    /// Up to `limit` task ids of `range`, oldest first, strictly newer than `after`.
    pub async fn task_ids_asc(
        &self,
        range: Range,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        self.ids_asc(TASKS, range, after, limit).await
    }

    /// How many tasks have not finished.
    pub async fn active_count(&self) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        conn.zcard(super::ACTIVE)
            .await
            .map_err(redis_err("count active tasks"))
    }

    /// Up to `limit` ids of unfinished tasks of `range`, newest first, older than `from`
    /// (or `from` itself too, when `inclusive`).
    pub async fn active_ids_desc(
        &self,
        range: Range,
        from: Option<(TaskId, bool)>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        self.ids_desc(super::ACTIVE, range, from, limit).await
    }

    /// Up to `limit` ids of unfinished tasks, oldest first, strictly newer than `after`.
    pub async fn active_ids_asc(
        &self,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        self.ids_asc(super::ACTIVE, Range::default(), after, limit)
            .await
    }

    /// A page of a sorted set of task ids scored 0 (ordered by id, so by creation), newest
    /// first: ids of `range`, older than `from` (or equal, when its flag says inclusive).
    async fn ids_desc(
        &self,
        key: &str,
        range: Range,
        from: Option<(TaskId, bool)>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let mut max = range
            .until_ms
            .map_or_else(|| "+".to_string(), |u| format!("({}", id_bound(u)));
        if let Some((b, inclusive)) = from {
            let b = b.to_string();
            if range.until_ms.is_none_or(|u| b < id_bound(u)) {
                max = format!("{}{b}", if inclusive { '[' } else { '(' });
            }
        }
        let min = range
            .since_ms
            .map_or_else(|| "-".to_string(), |s| format!("[{}", id_bound(s)));
        let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
            .arg(key)
            .arg(max)
            .arg(min)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list task ids"))?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// As [`State::ids_desc`], oldest first, strictly newer than `after`.
    async fn ids_asc(
        &self,
        key: &str,
        range: Range,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskId>, Error> {
        let mut conn = self.conn.clone();
        let mut min = range
            .since_ms
            .map_or_else(|| "-".to_string(), |s| format!("[{}", id_bound(s)));
        if let Some(a) = after {
            let a = a.to_string();
            let lower = range.since_ms.map(id_bound);
            if lower.is_none_or(|l| a >= l) {
                min = format!("({a}");
            }
        }
        let max = range
            .until_ms
            .map_or_else(|| "+".to_string(), |u| format!("({}", id_bound(u)));
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(key)
            .arg(min)
            .arg(max)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list task ids"))?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// The records of `ids` that still exist, in the order given. Unreadable records are
    /// skipped with a warning: one corrupt record must not hide the rest of the history.
    pub async fn load_tasks(&self, ids: &[TaskId]) -> Result<Vec<Task>, Error> {
        self.load_records(ids).await
    }

    /// The records of `ids` as `T`, a part of [`Task`] (serde skips the fields `T` does not
    /// name, without building them: a listing or a report that reads thousands of records
    /// leaves prompts, outputs and contexts undecoded), like [`State::load_tasks`].
    pub async fn load_records<T: serde::de::DeserializeOwned>(
        &self,
        ids: &[TaskId],
    ) -> Result<Vec<T>, Error> {
        let mut conn = self.conn.clone();
        let mut tasks = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(LOAD_BATCH) {
            let keys: Vec<String> = chunk.iter().map(|id| task_key(*id)).collect();
            let records: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("load tasks"))?;
            for (key, bytes) in keys.into_iter().zip(records) {
                let Some(bytes) = bytes else { continue };
                match codec::decode::<T>(&bytes) {
                    Ok(task) => tasks.push(task),
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "skipping an unreadable task record")
                    }
                }
            }
        }
        Ok(tasks)
    }

    /// How many jobs are in the dead-letter set.
    pub async fn dead_letter_count(&self) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        conn.zcard(DLQ)
            .await
            .map_err(redis_err("count dead letters"))
    }

    /// The checkpoints kept of agent `job`, oldest first (an unreadable entry is skipped).
    pub async fn checkpoints(
        &self,
        job: orch_shared::ids::JobId,
    ) -> Result<Vec<orch_shared::job::Checkpoint>, Error> {
        let mut conn = self.conn.clone();
        let kept: Vec<String> = conn
            .lrange(keys::checkpoints(job), 0, -1)
            .await
            .map_err(redis_err("list checkpoints"))?;
        Ok(kept
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    /// The sessions-store objects holding the checkpointed conversations (and scratch
    /// workspaces' trees) of these agents.
    pub async fn checkpoint_objects(
        &self,
        jobs: &[orch_shared::ids::JobId],
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let mut out = vec![];
        for job in jobs {
            let kept: Vec<String> = conn
                .lrange(keys::checkpoints(*job), 0, -1)
                .await
                .map_err(redis_err("list checkpoints"))?;
            let latest: Option<String> = conn
                .get(keys::checkpoint(*job))
                .await
                .map_err(redis_err("load checkpoint"))?;
            for json in kept.iter().chain(latest.iter()) {
                if let Ok(c) = serde_json::from_str::<orch_shared::job::Checkpoint>(json) {
                    for name in std::iter::once(c.transcript).chain(c.tree_object) {
                        if !out.contains(&name) {
                            out.push(name);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes a task and everything Redis keeps about it: its record, its history and job
    /// index entries, its dead letters, its jobs' done and cancel markers, session pointers and
    /// checkpoints, and its idempotency key (if the key still names it). The caller checks that the task has finished.
    /// A git task's checkpoint refs are queued, in the same transaction, for a worker to delete
    /// from its repository ([`keys::REF_CLEANUPS`]).
    pub async fn delete_task(&self, task: &Task) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let id = task.id.to_string();
        let jobs: Vec<String> = task.jobs.iter().map(|j| j.id.to_string()).collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(task_key(task.id))
            .zrem(TASKS, &id)
            .zrem(super::ACTIVE, &id);
        if !jobs.is_empty() {
            pipe.hdel(JOB_INDEX, &jobs).zrem(DLQ, &jobs);
            let markers: Vec<String> = task
                .jobs
                .iter()
                .flat_map(|j| {
                    (1..=j.attempt.max(1))
                        .flat_map(move |a| [keys::job_done(j.id, a), keys::job_cancelled(j.id, a)])
                        .chain([
                            keys::session(j.id),
                            keys::checkpoint(j.id),
                            keys::checkpoints(j.id),
                        ])
                })
                .collect();
            pipe.del(markers);
            if let orch_shared::job::Workspace::Git { url, .. } = &task.workspace {
                let cleanup = orch_shared::job::RefCleanup {
                    url: url.clone(),
                    refs: task
                        .jobs
                        .iter()
                        .map(|j| orch_shared::job::checkpoint_ref(j.id))
                        .collect(),
                };
                let json = serde_json::to_string(&cleanup).unwrap_or_default();
                pipe.zadd(keys::REF_CLEANUPS, json, orch_shared::now_ms());
            }
        }
        super::costs::rollup_in(&mut pipe, task.id, "");
        for key in super::search::word_keys(&task.prompt) {
            pipe.zrem(key, &id).ignore();
        }
        pipe.exec_async(&mut conn)
            .await
            .map_err(redis_err("delete task"))?;
        if let Some(key) = &task.idempotency_key {
            let _: i64 = DELETE_IDEM_SCRIPT
                .key(idem_key(key))
                .arg(&id)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err("delete idempotency key"))?;
        }
        Ok(())
    }

    /// Announces this coordinator for `ttl` (called every few seconds).
    pub async fn register_coordinator(
        &self,
        info: &CoordinatorInfo,
        ttl: Duration,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let key = coordinator_key(&info.id);
        redis::pipe()
            .zadd(COORDINATORS, &info.id, info.last_seen_ms)
            .hset_multiple(
                &key,
                &[
                    ("addr", info.addr.clone()),
                    ("version", info.version.clone()),
                    ("started_at_ms", info.started_at_ms.to_string()),
                    ("last_seen_ms", info.last_seen_ms.to_string()),
                ],
            )
            .pexpire(&key, ttl.as_millis() as i64)
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("register coordinator"))
    }

    /// Removes this coordinator from the registry (on shutdown).
    pub async fn deregister_coordinator(&self, id: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .zrem(COORDINATORS, id)
            .del(coordinator_key(id))
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("deregister coordinator"))
    }

    /// Coordinators seen within `max_age`; stale entries are pruned on the way.
    pub async fn coordinators(&self, max_age: Duration) -> Result<Vec<CoordinatorInfo>, Error> {
        let mut conn = self.conn.clone();
        let cutoff = orch_shared::now_ms().saturating_sub(max_age.as_millis() as u64);
        let _: () = conn
            .zrembyscore(COORDINATORS, "-inf", format!("({cutoff}"))
            .await
            .map_err(redis_err("prune coordinators"))?;
        let ids: Vec<String> = conn
            .zrange(COORDINATORS, 0, -1)
            .await
            .map_err(redis_err("list coordinators"))?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(coordinator_key(id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list coordinators"))?;
        let num = |h: &HashMap<String, String>, f: &str| -> u64 {
            h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        Ok(ids
            .into_iter()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .map(|(id, h)| CoordinatorInfo {
                id,
                addr: h.get("addr").cloned().unwrap_or_default(),
                version: h.get("version").cloned().unwrap_or_default(),
                started_at_ms: num(&h, "started_at_ms"),
                last_seen_ms: num(&h, "last_seen_ms"),
            })
            .collect())
    }
}
