//! The approval queue as the API sees it: listing requests ([`keys::APPROVALS`], each a
//! [`keys::approval`] hash the asking worker wrote) and answering one exactly once
//! ([`keys::ANSWER_APPROVAL`]), with the rule a broader answer grants.

use super::{Error, State, redis_err};
use orch_shared::api::Approval;
use orch_shared::ids::TaskId;
use orch_shared::keys::{self, approval_field as f};
use redis::AsyncCommands;
use std::collections::HashMap;

/// The most requests a listing reads (the newest).
const MAX_LISTED: isize = 500;
/// How long an answered request stays listed.
pub const KEEP_ANSWERED_SECS: u64 = 24 * 3600;

/// What answering a request did.
#[derive(Debug, PartialEq)]
pub enum Answered {
    /// This call answered it.
    Done,
    Missing,
    /// Someone (or the deadline) answered it first.
    Already,
    /// Its deadline passed: its worker denies it.
    Expired,
}

/// An answer to store.
pub struct Answer<'a> {
    pub approved: bool,
    pub by: &'a str,
    pub message: &'a str,
    /// A rule `Tool(pattern)` to grant, and the set it goes to.
    pub grant: Option<(String, String)>,
}

fn approval_of(h: &HashMap<String, String>, now_ms: u64) -> Option<Approval> {
    let s = |k: &str| h.get(k).cloned().unwrap_or_default();
    let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
    let opt = |k: &str| h.get(k).cloned().filter(|v| !v.is_empty());
    let deadline_ms = n(f::DEADLINE_MS).unwrap_or(0);
    let mut state = h.get(f::STATE)?.clone();
    if state == "pending" && deadline_ms < now_ms {
        state = "expired".into();
    }
    Some(Approval {
        id: s(f::ID),
        task_id: s(f::TASK),
        job_id: s(f::JOB),
        attempt: n(f::ATTEMPT).unwrap_or(0) as u32,
        role: s(f::ROLE),
        tool: s(f::TOOL),
        summary: s(f::SUMMARY),
        input: s(f::INPUT),
        created_ms: n(f::CREATED_MS).unwrap_or(0),
        deadline_ms,
        state,
        by: opt(f::BY),
        message: opt(f::MESSAGE),
        grant: opt(f::GRANT),
        answered_ms: n(f::ANSWERED_MS),
    })
}

impl State {
    /// The requests still listed, newest first (requests whose hash expired are dropped).
    pub async fn approvals(&self) -> Result<Vec<Approval>, Error> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .zrevrange(keys::APPROVALS, 0, MAX_LISTED - 1)
            .await
            .map_err(redis_err("list approvals"))?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::approval(id));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read approvals"))?;
        let now = orch_shared::now_ms();
        let mut gone = Vec::new();
        let mut out = Vec::new();
        for (id, h) in ids.iter().zip(hashes) {
            match approval_of(&h, now) {
                Some(a) => out.push(a),
                None => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> = conn.zrem(keys::APPROVALS, gone).await;
        }
        Ok(out)
    }

    /// One request.
    pub async fn approval(&self, id: &str) -> Result<Option<Approval>, Error> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn
            .hgetall(keys::approval(id))
            .await
            .map_err(redis_err("read approval"))?;
        Ok(approval_of(&h, orch_shared::now_ms()))
    }

    /// Answers request `id` once; a granted rule is stored only by the call that answered.
    pub async fn answer_approval(&self, id: &str, a: &Answer<'_>) -> Result<Answered, Error> {
        let mut conn = self.conn.clone();
        let grant = a.grant.as_ref().map_or("", |(rule, _)| rule.as_str());
        let r: i64 = redis::Script::new(keys::ANSWER_APPROVAL)
            .key(keys::approval(id))
            .key(keys::PARKED)
            .arg(if a.approved { "approved" } else { "denied" })
            .arg(a.by)
            .arg(a.message)
            .arg(grant)
            .arg(orch_shared::now_ms())
            .arg(KEEP_ANSWERED_SECS)
            .arg("0")
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("answer approval"))?;
        let answered = match r {
            1 => Answered::Done,
            0 => Answered::Missing,
            -2 => Answered::Expired,
            _ => Answered::Already,
        };
        if answered == Answered::Done
            && let Some((rule, set)) = &a.grant
        {
            let () = conn
                .sadd(set, rule)
                .await
                .map_err(redis_err("store approval grant"))?;
            let () = conn
                .expire(set, 30 * 24 * 3600)
                .await
                .map_err(redis_err("store approval grant"))?;
        }
        Ok(answered)
    }
}

/// The set a rule granted for the rest of `task` goes to.
pub fn task_grants(task: TaskId) -> String {
    keys::approval_grants_task(task)
}

/// The set a rule granted for every task of `tenant` goes to.
pub fn tenant_grants(tenant: Option<&str>) -> String {
    keys::approval_grants_tenant(tenant)
}
