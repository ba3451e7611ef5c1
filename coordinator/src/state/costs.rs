//! Hourly cost rollups: what `GET /v1/reports/cost` reads instead of every task of its window.
//!
//! Keys:
//! - `orch:costs:<hour>` (hours since the epoch of the tasks' creation, as their UUIDv7 ids
//!   carry it): hash of integer sums, one field per `<dimension>\x1f<value>\x1f<metric>`, for
//!   the dimensions `role`, `model`, `backend`, `worker` and `status` and the metrics `n`
//!   (agents), `in`, `out`, `cw`, `cr` (tokens) and `usd` (cost in nano-dollars).
//! - `orch:costs:tasks:<hour>`: hash task id → what that task counts in `orch:costs:<hour>`
//!   (one entry per started agent, see [`entries`]): the marker that keeps a rollup exact when
//!   the same record is written again (a catch-up replay, a rebuild) or changes (a retry).
//! - `orch:costs:hours`: sorted set of the hours that have a rollup, scored by the hour.
//! - `orch:costs:ready`: present once every task record has its entries in the rollups (a new
//!   cluster at once, an upgraded one after [`State::backfill_costs`]); until then reports
//!   read the records.
//!
//! Every write of a task record that can change what it counts (a save, a result, a restore
//! from the log, a deletion) runs [`rollup_lua`] in the same script or transaction: it
//! subtracts the entries the marker holds that the record no longer has and adds the new
//! ones, so a rollup always equals the sum over the records it covers, however often a record
//! is written.

use super::{Error, State, TASKS, redis_err, task_key};
use orch_shared::api::Task;
use orch_shared::codec;
use orch_shared::ids::TaskId;
use orch_shared::report::{CostLine, id_bound, id_time_ms, model_name};
use std::collections::HashMap;

pub(super) const HOURS: &str = "orch:costs:hours";
const READY: &str = "orch:costs:ready";
pub const HOUR_MS: u64 = 3_600_000;
/// The dimensions rolled up, in the order of an entry's fields.
pub const DIMENSIONS: [&str; 5] = ["role", "model", "backend", "worker", "status"];

pub(super) fn hour_key(hour: u64) -> String {
    format!("orch:costs:{hour}")
}

pub(super) fn marks_key(hour: u64) -> String {
    format!("orch:costs:tasks:{hour}")
}

/// The hour (since the epoch) a task's costs roll up into: its id's creation time.
pub fn hour_of(id: TaskId) -> u64 {
    id_time_ms(id.as_u128()) / HOUR_MS
}

/// Separators of [`entries`], never in a value.
const FIELD_SEP: char = '\u{1f}';
const ENTRY_SEP: char = '\u{1e}';

fn clean(v: &str) -> String {
    v.replace([FIELD_SEP, ENTRY_SEP], "?")
}

/// What `task` counts in its hour's rollup: one entry per started agent (attempt above 0, as
/// the report counts), `role model backend worker status in out cw cr nano-usd` separated by
/// `\x1f`, entries sorted and separated by `\x1e` (the same record always gives the same
/// string).
pub fn entries(task: &Task) -> String {
    let mut out: Vec<String> = task
        .jobs
        .iter()
        .filter(|j| j.attempt > 0)
        .map(|j| {
            let model = model_name(j.model.as_deref().or(task.model_of(j.role)));
            let worker = j
                .worker_id
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string);
            let nano = (j.cost_usd.max(0.0) * 1e9).round() as u64;
            [
                clean(j.role.as_str()),
                clean(model),
                clean(task.backend_of(j.role).as_str()),
                clean(&worker),
                clean(j.status.as_str()),
                j.usage.input_tokens.to_string(),
                j.usage.output_tokens.to_string(),
                j.usage.cache_creation_tokens.to_string(),
                j.usage.cache_read_tokens.to_string(),
                nano.to_string(),
            ]
            .join("\u{1f}")
        })
        .collect();
    out.sort();
    out.join("\u{1e}")
}

/// Defines the Lua function `rollup(marks, hour_hash, hours, task_id, hour, entries)` that
/// brings a task's counted entries (in `marks`) to `entries` (see the module's doc).
macro_rules! rollup_lua {
    () => {
        r#"
local function rollup(marks, sums, hours, tid, hour, new)
  local old = redis.call('HGET', marks, tid) or ''
  if old == new then return end
  local dims = {'role', 'model', 'backend', 'worker', 'status'}
  local metrics = {'in', 'out', 'cw', 'cr', 'usd'}
  local function apply(entry, sign)
    local p = {}
    for v in string.gmatch(entry .. '\31', '([^\31]*)\31') do p[#p + 1] = v end
    for d = 1, 5 do
      local base = dims[d] .. '\31' .. p[d] .. '\31'
      local function incr(field, v)
        if redis.call('HINCRBY', sums, field, v) == 0 then redis.call('HDEL', sums, field) end
      end
      incr(base .. 'n', sign)
      for m = 1, 5 do
        local v = p[5 + m]
        if v ~= '0' then
          if sign < 0 then v = '-' .. v end
          incr(base .. metrics[m], v)
        end
      end
    end
  end
  local counted = {}
  for e in string.gmatch(old, '[^\30]+') do counted[e] = (counted[e] or 0) + 1 end
  for e in string.gmatch(new, '[^\30]+') do
    if (counted[e] or 0) > 0 then counted[e] = counted[e] - 1 else apply(e, 1) end
  end
  for e, c in pairs(counted) do
    for _ = 1, c do apply(e, -1) end
  end
  if new == '' then
    redis.call('HDEL', marks, tid)
    if redis.call('HLEN', marks) == 0 then
      redis.call('DEL', sums)
      redis.call('ZREM', hours, hour)
    end
  else
    redis.call('HSET', marks, tid, new)
    redis.call('ZADD', hours, hour, hour)
  end
end
"#
    };
}

/// Brings one task's entries in the rollups to `ARGV[3]`. KEYS: marks, sums, hours.
/// ARGV: task id, hour, entries.
pub(super) const ROLLUP: &str = concat!(
    rollup_lua!(),
    "rollup(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])\nreturn 1\n"
);

/// [`ROLLUP`] and the task's word index entries ([`super::search`]), only while the task's
/// record is still `ARGV[4]` (a backfill that read it before a newer save or a deletion).
/// KEYS: marks, sums, hours, task, then the word index keys. Returns 1 if applied.
const BACKFILL: &str = concat!(
    rollup_lua!(),
    r#"
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return 0 end
rollup(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
for i = 5, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
return 1
"#
);
static BACKFILL_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(BACKFILL));

/// Adds the [`ROLLUP`] of `task` (to `entries`, `""` when it is deleted) to a pipeline, as
/// an `EVAL` (a script call that works inside `MULTI`).
pub(super) fn rollup_in(pipe: &mut redis::Pipeline, task: TaskId, entries: &str) {
    let hour = hour_of(task);
    pipe.cmd("EVAL")
        .arg(ROLLUP)
        .arg(3)
        .arg(marks_key(hour))
        .arg(hour_key(hour))
        .arg(HOURS)
        .arg(task.to_string())
        .arg(hour)
        .arg(entries)
        .ignore();
}

/// The sums of one dimension's groups: value → totals.
pub type Groups = HashMap<String, CostLine>;

/// Adds an hour's rollup (its hash's fields) into per-dimension groups.
pub fn add_hour(into: &mut HashMap<&'static str, Groups>, fields: &HashMap<String, i64>) {
    for (field, &v) in fields {
        let mut parts = field.split(FIELD_SEP);
        let (Some(dim), Some(value), Some(metric), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(dim) = DIMENSIONS.iter().find(|d| **d == dim) else {
            continue;
        };
        let line = into
            .entry(dim)
            .or_default()
            .entry(value.to_string())
            .or_default();
        let v = v.max(0) as u64;
        match metric {
            "n" => line.agents += v,
            "in" => line.usage.input_tokens += v,
            "out" => line.usage.output_tokens += v,
            "cw" => line.usage.cache_creation_tokens += v,
            "cr" => line.usage.cache_read_tokens += v,
            "usd" => line.cost_usd += v as f64 / 1e9,
            _ => {}
        }
    }
}

impl State {
    /// Whether the rollups cover every task record (see the module's doc).
    pub async fn costs_ready(&self) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(READY)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read the cost rollups' state"))
    }

    /// How many tasks `range` holds (one `ZLEXCOUNT`).
    pub async fn count_tasks(&self, range: super::history::Range) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let min = range
            .since_ms
            .map_or_else(|| "-".to_string(), |s| format!("[{}", id_bound(s)));
        let max = range
            .until_ms
            .map_or_else(|| "+".to_string(), |u| format!("({}", id_bound(u)));
        redis::cmd("ZLEXCOUNT")
            .arg(TASKS)
            .arg(min)
            .arg(max)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("count tasks"))
    }

    /// The rollups of the hours `first..end` that have one (hours since the epoch).
    pub async fn cost_hours(
        &self,
        first: u64,
        end: u64,
    ) -> Result<Vec<HashMap<String, i64>>, Error> {
        let mut conn = self.conn.clone();
        if end <= first {
            return Ok(vec![]);
        }
        let hours: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
            .arg(HOURS)
            .arg(first)
            .arg(format!("({end}"))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("list cost rollups"))?;
        let mut out = Vec::with_capacity(hours.len());
        for chunk in hours.chunks(256) {
            let mut pipe = redis::pipe();
            for h in chunk {
                pipe.hgetall(hour_key(*h));
            }
            let sums: Vec<HashMap<String, i64>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(redis_err("read cost rollups"))?;
            out.extend(sums);
        }
        Ok(out)
    }

    /// Brings every task record into the cost rollups and the word index, a page at a time,
    /// then marks both ready: what a cluster whose history predates them runs once (the
    /// leader, at start; a new cluster has nothing to read). A record saved meanwhile keeps
    /// what its save wrote. The tasks read.
    pub async fn backfill_indexes(&self) -> Result<u64, Error> {
        let words_ready = self.words_ready().await?;
        if self.costs_ready().await? && words_ready {
            return Ok(0);
        }
        if !words_ready {
            let dropped = self.drop_word_index().await?;
            if dropped > 0 {
                tracing::info!(
                    keys = dropped,
                    "dropped the word index an earlier build kept"
                );
            }
        }
        let mut conn = self.conn.clone();
        let mut after: Option<String> = None;
        let mut done = 0;
        loop {
            let min = after
                .as_ref()
                .map_or_else(|| "-".into(), |a| format!("({a}"));
            let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(TASKS)
                .arg(min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(200)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("list task ids"))?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let ids: Vec<TaskId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
            let keys: Vec<String> = ids.iter().map(|id| task_key(*id)).collect();
            let records: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("load tasks"))?;
            for (key, bytes) in keys.iter().zip(records) {
                let Some(bytes) = bytes else { continue };
                let Ok(task) = codec::decode::<Task>(&bytes) else {
                    continue;
                };
                let hour = hour_of(task.id);
                let mut call = BACKFILL_SCRIPT.prepare_invoke();
                call.key(marks_key(hour))
                    .key(hour_key(hour))
                    .key(HOURS)
                    .key(key);
                for word in super::search::word_keys(&task.prompt) {
                    call.key(word);
                }
                let _: i64 = call
                    .arg(task.id.to_string())
                    .arg(hour)
                    .arg(entries(&task))
                    .arg(bytes)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_err("roll up costs"))?;
                done += 1;
            }
            after = Some(last);
        }
        let _: () = redis::cmd("MSET")
            .arg(READY)
            .arg(1)
            .arg(super::search::READY)
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("mark the cost rollups and word index ready"))?;
        Ok(done)
    }
}
