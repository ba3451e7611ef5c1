//! The approval broker ("needs you"): an agent's request to use a tool its role marks `ask`
//! goes to one cluster-wide queue in Redis (`state/approvals`) for a person to answer
//! (`orchctl approvals`, `POST /v1/approvals/{id}`, the dashboard); the agent waits.
//!
//! - [`Broker::ask`] first looks for a rule granted earlier for the task (`--for task`) or
//!   its tenant (`--always PATTERN`); else it writes the request with its deadline, tells the
//!   job's event stream (`approval_requested`), waits for the answer and tells it too
//!   (`approval_answered`). At the deadline the worker denies the request itself with the
//!   same script a person's answer runs, so a request is answered exactly once, and the agent
//!   is told why.
//! - [`mcp`]: the `claude-code` backend's permission-prompt tool (an MCP server each job's
//!   CLI reaches over loopback, or through the sandbox's proxy).
//! - [`Rule`]: the `Tool` / `Tool(pattern)` rules of the roles' `ask_tools` and of grants.

pub mod mcp;

use crate::agent::Events;
use crate::state::{NewApproval, State};
use orch_shared::event::EventKind;
use orch_shared::job::JobSpec;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a waiting agent looks for its answer.
const POLL: Duration = Duration::from_millis(200);
/// The longest summary kept (a command, a path).
const MAX_SUMMARY_CHARS: usize = 2_000;
/// The longest tool input kept (an edit's old and new text).
const MAX_INPUT_CHARS: usize = 16_000;

/// A tool rule: `Tool` (any use of the tool) or `Tool(pattern)` (uses whose subject, the
/// command, path or URL, matches `pattern`, where `*` matches anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub tool: String,
    pub pattern: Option<String>,
}

impl Rule {
    /// Parses `Tool` or `Tool(pattern)`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        let (tool, pattern) = match s.split_once('(') {
            None => (s, None),
            Some((tool, rest)) => match rest.strip_suffix(')') {
                Some(p) if !p.trim().is_empty() => (tool, Some(p.to_string())),
                Some(_) => return Err(format!("`{s}`: the pattern in parentheses is empty")),
                None => return Err(format!("`{s}`: missing the closing parenthesis")),
            },
        };
        if tool.is_empty()
            || !tool
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "`{s}`: expected a tool name (letters, digits, `_`, `-`), optionally with a pattern: `Bash(npm *)`"
            ));
        }
        Ok(Rule {
            tool: tool.to_string(),
            pattern,
        })
    }

    /// Whether a use of `tool` on `subject` falls under the rule.
    pub fn matches(&self, tool: &str, subject: &str) -> bool {
        self.tool == tool && self.pattern.as_deref().is_none_or(|p| glob(p, subject))
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (nothing else
/// is special).
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == text;
    };
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What a use of `tool` would do, as a person reads it and as rules match it: the command,
/// the path or the URL, else the input as JSON.
pub fn subject(input: &Value) -> String {
    [
        "command",
        "file_path",
        "notebook_path",
        "path",
        "url",
        "pattern",
    ]
    .iter()
    .find_map(|k| input.get(*k).and_then(Value::as_str))
    .map(str::to_string)
    .unwrap_or_else(|| input.to_string())
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// The answer an agent gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    /// Denied; what the agent is told.
    Deny(String),
}

/// Where new requests are POSTed, signed (`[approvals] webhook_url`, `webhook_secret`).
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: crate::config::Secret,
    pub client: reqwest::Client,
}

/// The header carrying a webhook body's signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-orch-signature";

impl Webhook {
    /// POSTs `request` (best effort: a failure is logged, the request waits anyway).
    fn send(&self, request: Value) {
        let body = request.to_string();
        let sig = orch_shared::signature::sign(self.secret.expose(), body.as_bytes());
        let post = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sig)
            .timeout(Duration::from_secs(10))
            .body(body);
        tokio::spawn(async move {
            match post.send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "the approval webhook refused a request")
                }
                Err(e) => tracing::warn!(error = %e, "the approval webhook is unreachable"),
            }
        });
    }
}

/// The request a parked agent waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub id: String,
    pub deadline_ms: u64,
}

/// The line between an agent waiting for a person and its runner: the broker asks here to be
/// parked, the runner checkpoints the agent, stops it and parks the job until the answer
/// (see [`crate::limits::park_for_approval`]). Cheap to clone.
#[derive(Clone, Default)]
pub struct Parking {
    asked: CancellationToken,
    waiting: Arc<Mutex<Option<Waiting>>>,
}

impl Parking {
    /// Asks the runner to park the job until `waiting` is answered.
    pub fn request(&self, waiting: Waiting) {
        if let Ok(mut w) = self.waiting.lock()
            && w.is_none()
        {
            *w = Some(waiting);
        }
        self.asked.cancel();
    }

    /// Fires once an agent asked to be parked.
    pub async fn requested(&self) {
        self.asked.cancelled().await
    }

    /// The request the job waits for, once parking was asked.
    pub fn waiting(&self) -> Option<Waiting> {
        self.waiting.lock().ok().and_then(|w| w.clone())
    }
}

/// How a wait for an answer ended.
enum Waited {
    Answered {
        approved: bool,
        by: String,
        message: String,
    },
    /// The agent is being parked: it gets no answer in this run.
    Parked,
}

/// A handle on the broker (cheap to clone).
#[derive(Clone)]
pub struct Broker {
    state: State,
    /// How long a request waits for a person before it is denied.
    pub timeout: Duration,
    /// How long an agent waits holding its slot before it is parked (`None`: never).
    park_after: Option<Duration>,
    webhook: Option<Webhook>,
}

impl Broker {
    pub fn new(state: State, timeout: Duration) -> Self {
        Self {
            state,
            timeout,
            park_after: None,
            webhook: None,
        }
    }

    /// Parks an agent whose request is unanswered for `after` (zero: never).
    pub fn with_park_after(mut self, after: Duration) -> Self {
        self.park_after = (!after.is_zero()).then_some(after);
        self
    }

    /// Also POSTs every new request to `webhook`.
    pub fn with_webhook(mut self, webhook: Option<Webhook>) -> Self {
        self.webhook = webhook;
        self
    }

    /// Asks for `job`'s agent to use `tool` with `input`: a granted rule answers at once,
    /// else a person (or the deadline) does. The wait ends early, denied, on `cancel`.
    pub async fn ask(
        &self,
        job: &JobSpec,
        tool: &str,
        input: &Value,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Verdict {
        let subject = subject(input);
        if self.granted(job, tool, &subject).await {
            tracing::info!(job_id = %job.job_id, tool, "tool allowed by a granted rule");
            return Verdict::Allow;
        }
        let summary = cut(&subject, MAX_SUMMARY_CHARS);
        let job_id = job.job_id.to_string();
        // An agent resumed after it was parked asks again: the request it made then answers.
        let earlier = match self
            .state
            .asked_approval(&job_id, job.attempt, tool, &summary)
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for an earlier request");
                None
            }
        };
        let (id, deadline_ms) = match earlier {
            Some(earlier) => {
                tracing::info!(job_id = %job.job_id, tool, approval = %earlier.0, "asked again after parking: the earlier request answers");
                earlier
            }
            None => match self.create(job, tool, input, &summary, events).await {
                Ok(created) => created,
                Err(verdict) => return verdict,
            },
        };
        let park_at = self
            .park_after
            .map(|after| orch_shared::now_ms() + after.as_millis() as u64);
        let (approved, by, message) = match self
            .wait(&id, tool, deadline_ms, park_at, events, cancel)
            .await
        {
            Waited::Answered {
                approved,
                by,
                message,
            } => (approved, by, message),
            Waited::Parked => {
                return Verdict::Deny(
                    "the job is parked until a person answers; it resumes then".into(),
                );
            }
        };
        if let Err(e) = self
            .state
            .forget_asked(&job_id, job.attempt, tool, &summary)
            .await
        {
            tracing::debug!(error = %e, "could not forget an answered request");
        }
        events.send(EventKind::ApprovalAnswered {
            id: id.clone(),
            decision: if approved { "approved" } else { "denied" }.into(),
            by: by.clone(),
            message: (!message.is_empty()).then(|| message.clone()),
        });
        tracing::info!(job_id = %job.job_id, tool, approval = %id, approved, by, "approval answered");
        if approved {
            Verdict::Allow
        } else if message.is_empty() {
            Verdict::Deny(format!("a person denied {tool} ({summary})"))
        } else {
            Verdict::Deny(format!("a person denied {tool} ({summary}): {message}"))
        }
    }

    /// Writes a new request (and tells the webhook and the job's events): its id and deadline.
    async fn create(
        &self,
        job: &JobSpec,
        tool: &str,
        input: &Value,
        summary: &str,
        events: &Events,
    ) -> Result<(String, u64), Verdict> {
        let id = format!("{:016x}", rand::random::<u64>());
        let created_ms = orch_shared::now_ms();
        let deadline_ms = created_ms + self.timeout.as_millis() as u64;
        let request = NewApproval {
            id: &id,
            task: job.task_id,
            job: &job.job_id.to_string(),
            attempt: job.attempt,
            role: job.role.as_str(),
            tool,
            summary,
            input: &cut(&input.to_string(), MAX_INPUT_CHARS),
            created_ms,
            deadline_ms,
        };
        if let Err(e) = self.state.create_approval(&request).await {
            tracing::warn!(error = %e, job_id = %job.job_id, tool, "could not ask for an approval");
            return Err(Verdict::Deny(format!(
                "{tool} needs a person's approval, and the approval queue is unreachable; do without it"
            )));
        }
        tracing::info!(job_id = %job.job_id, tool, approval = %id, "waiting for a person's approval");
        if let Some(w) = &self.webhook {
            w.send(serde_json::json!({
                "id": id,
                "task_id": job.task_id.to_string(),
                "job_id": job.job_id.to_string(),
                "attempt": job.attempt,
                "role": job.role.as_str(),
                "tool": tool,
                "summary": summary,
                "input": request.input,
                "created_ms": created_ms,
                "deadline_ms": deadline_ms,
                "state": "pending",
            }));
        }
        events.send(EventKind::ApprovalRequested {
            id: id.clone(),
            tool: tool.to_string(),
            summary: summary.to_string(),
            deadline_ms,
        });
        Ok((id, deadline_ms))
    }

    async fn granted(&self, job: &JobSpec, tool: &str, subject: &str) -> bool {
        let tenant = match self.state.task_tenant(job.task_id).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the task's tenant");
                None
            }
        };
        match self
            .state
            .approval_grants(job.task_id, tenant.as_deref())
            .await
        {
            Ok(rules) => rules
                .iter()
                .filter_map(|r| Rule::parse(r).ok())
                .any(|r| r.matches(tool, subject)),
            Err(e) => {
                tracing::debug!(error = %e, "could not read approval grants");
                false
            }
        }
    }

    /// Waits for request `id`'s answer; from `park_at` (ms) on, asks the runner to park the
    /// job (when it can) and gives up the wait.
    async fn wait(
        &self,
        id: &str,
        tool: &str,
        deadline_ms: u64,
        park_at: Option<u64>,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Waited {
        let answered = |approved, by: &str, message| Waited::Answered {
            approved,
            by: by.to_string(),
            message,
        };
        loop {
            match self.state.approval_answer(id).await {
                Ok(Some(a)) => return answered(a.approved, &a.by, a.message),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, approval = id, "could not read an approval"),
            }
            let now = orch_shared::now_ms();
            let give_up = if cancel.is_cancelled() {
                Some((
                    "cancelled",
                    "the job was stopped while it waited for approval".to_string(),
                ))
            } else if now >= deadline_ms {
                Some((
                    "deadline",
                    format!(
                        "nobody answered the request to use {tool} within {}s; do without it or finish and say what you need",
                        self.timeout.as_secs()
                    ),
                ))
            } else {
                None
            };
            if let Some((by, message)) = give_up {
                match self.state.deny_approval(id, by, &message).await {
                    Ok(true) => return answered(false, by, message),
                    // Answered meanwhile: the next read returns it.
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, approval = id, "could not deny an approval");
                        return answered(false, by, message);
                    }
                }
            }
            if let Some(parking) = events.parking()
                && park_at.is_some_and(|at| now >= at)
            {
                // The request stays pending in the queue; the runner checkpoints the agent,
                // stops it (firing `cancel`) and parks the job until the answer.
                tracing::info!(approval = id, "no answer yet: parking the job");
                parking.request(Waiting {
                    id: id.to_string(),
                    deadline_ms,
                });
                cancel.cancelled().await;
                return Waited::Parked;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_tool_and_pattern() {
        let r = Rule::parse("Bash(npm install*)").unwrap();
        assert!(r.matches("Bash", "npm install left-pad"));
        assert!(!r.matches("Bash", "rm -rf /"));
        assert!(!r.matches("Write", "npm install"));
        let any = Rule::parse("Write").unwrap();
        assert!(any.matches("Write", "/w/a.txt"));
        assert!(Rule::parse("Bash(").is_err());
        assert!(Rule::parse("Bash()").is_err());
        assert!(Rule::parse("rm -rf").is_err());
    }

    #[test]
    fn glob_matches_stars_only() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a*b*c", "a-b-c"));
        assert!(!glob("a*c", "ab"));
        assert!(glob("exact", "exact"));
        assert!(!glob("ex?ct", "exact"));
        assert!(glob("*.rs", "src/main.rs"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn subject_is_the_command_or_path() {
        assert_eq!(subject(&serde_json::json!({"command": "ls -l"})), "ls -l");
        assert_eq!(subject(&serde_json::json!({"file_path": "/w/a"})), "/w/a");
        assert_eq!(subject(&serde_json::json!({"x": 1})), r#"{"x":1}"#);
    }
}
