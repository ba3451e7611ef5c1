//! The approval broker's Redis side: a request is a hash ([`keys::approval`]) listed in the
//! cluster-wide queue ([`keys::APPROVALS`]); the asking worker reads its answer, and answers
//! it itself at the deadline with the same script a person's answer runs
//! ([`keys::ANSWER_APPROVAL`]), so a request is answered exactly once.

use super::{Error, State, redis_err};
use orch_shared::ids::TaskId;
use orch_shared::keys::{self, approval_field as f};
use redis::AsyncCommands;
use std::collections::HashMap;

/// A request as the worker writes it.
pub struct NewApproval<'a> {
    pub id: &'a str,
    pub task: TaskId,
    pub job: &'a str,
    pub attempt: u32,
    pub role: &'a str,
    pub tool: &'a str,
    pub summary: &'a str,
    pub input: &'a str,
    pub created_ms: u64,
    pub deadline_ms: u64,
}

/// A request's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub approved: bool,
    pub by: String,
    pub message: String,
}

/// The field of [`keys::approval_asked`] for a use of `tool` on `summary`.
fn asked_field(tool: &str, summary: &str) -> String {
    format!("{tool}\n{summary}")
}

/// How long a request is kept after its deadline (listed as answered or expired).
const KEEP_SECS: u64 = 24 * 3600;

impl State {
    /// Writes a pending request and lists it.
    pub async fn create_approval(&self, a: &NewApproval<'_>) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let key = keys::approval(a.id);
        let ttl = (a.deadline_ms.saturating_sub(a.created_ms) / 1000) + KEEP_SECS;
        let fields: [(&str, String); 11] = [
            (f::ID, a.id.into()),
            (f::TASK, a.task.to_string()),
            (f::JOB, a.job.into()),
            (f::ATTEMPT, a.attempt.to_string()),
            (f::ROLE, a.role.into()),
            (f::TOOL, a.tool.into()),
            (f::SUMMARY, a.summary.into()),
            (f::INPUT, a.input.into()),
            (f::CREATED_MS, a.created_ms.to_string()),
            (f::DEADLINE_MS, a.deadline_ms.to_string()),
            (f::STATE, "pending".into()),
        ];
        let asked = keys::approval_asked(a.job, a.attempt);
        redis::pipe()
            .atomic()
            .hset_multiple(&key, &fields)
            .ignore()
            .expire(&key, ttl as i64)
            .ignore()
            .zadd(keys::APPROVALS, a.id, a.created_ms)
            .ignore()
            .hset(&asked, asked_field(a.tool, a.summary), a.id)
            .ignore()
            .expire(&asked, ttl as i64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("create approval"))
    }

    /// The request job `job`'s attempt made earlier for the same use of `tool` (`summary`)
    /// and has not had the answer of yet, with its deadline (ms), if it is still there.
    pub async fn asked_approval(
        &self,
        job: &str,
        attempt: u32,
        tool: &str,
        summary: &str,
    ) -> Result<Option<(String, u64)>, Error> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn
            .hget(
                keys::approval_asked(job, attempt),
                asked_field(tool, summary),
            )
            .await
            .map_err(redis_err("read asked approvals"))?;
        let Some(id) = id else { return Ok(None) };
        let deadline: Option<u64> = conn
            .hget(keys::approval(&id), f::DEADLINE_MS)
            .await
            .map_err(redis_err("read approval"))?;
        Ok(deadline.map(|d| (id, d)))
    }

    /// The agent got the answer to its request for `tool` (`summary`): a later request for
    /// the same use is a new one.
    pub async fn forget_asked(
        &self,
        job: &str,
        attempt: u32,
        tool: &str,
        summary: &str,
    ) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        conn.hdel::<_, _, ()>(
            keys::approval_asked(job, attempt),
            asked_field(tool, summary),
        )
        .await
        .map_err(redis_err("forget asked approval"))
    }

    /// The answer to request `id`, once it has one (`None` while pending, or if it is gone).
    pub async fn approval_answer(&self, id: &str) -> Result<Option<Answer>, Error> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn
            .hgetall(keys::approval(id))
            .await
            .map_err(redis_err("read approval"))?;
        let get = |k: &str| h.get(k).cloned().unwrap_or_default();
        Ok(match h.get(f::STATE).map(String::as_str) {
            Some("approved") | Some("denied") => Some(Answer {
                approved: get(f::STATE) == "approved",
                by: get(f::BY),
                message: get(f::MESSAGE),
            }),
            _ => None,
        })
    }

    /// Denies request `id` as `by` with `message` unless it was answered already; returns
    /// whether this call answered it.
    pub async fn deny_approval(&self, id: &str, by: &str, message: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let r: i64 = redis::Script::new(keys::ANSWER_APPROVAL)
            .key(keys::approval(id))
            .key(keys::PARKED)
            .arg("denied")
            .arg(by)
            .arg(message)
            .arg("")
            .arg(orch_shared::now_ms())
            .arg(KEEP_SECS)
            .arg("1")
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("deny approval"))?;
        Ok(r == 1)
    }

    /// The rules granted for `task` (`--for task`) and for its tenant (`--always`).
    pub async fn approval_grants(
        &self,
        task: TaskId,
        tenant: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        conn.sunion(&[
            keys::approval_grants_task(task),
            keys::approval_grants_tenant(tenant),
        ])
        .await
        .map_err(redis_err("read approval grants"))
    }

    /// The tenant of `task`, from its record (`None`: an admin's task, or none found).
    pub async fn task_tenant(&self, task: TaskId) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = conn
            .get(keys::task(task))
            .await
            .map_err(redis_err("read task"))?;
        Ok(bytes
            .and_then(|b| orch_shared::codec::decode::<orch_shared::api::Task>(&b).ok())
            .and_then(|t| t.tenant))
    }
}
