//! The `sim` backend: a deterministic simulated agent for demos, tests and benchmarks. For a
//! given job id and attempt it always takes the same time, uses the same tokens, costs the same
//! and fails or not the same way. Every output says it is simulated.
//!
//! Sessions: the sim keeps a deterministic history, a JSON list of `{prompt, answer}` (the
//! user's message and the first line of the answer, both cut short, the last
//! [`MAX_HISTORY_TURNS`] turns only), small enough that the session store keeps it inline in
//! Redis (see [`crate::session`]). A further turn's answer says which turn it is, what it
//! continues (or forks) and quotes the previous user message, so whole-system tests can see
//! the history arrive.

use super::{Agent, AgentOutput, Events};
use crate::session::{INLINE_MAX_BYTES, Snapshot};
use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, JobKind, JobSpec, Outcome, Usage};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Prices the simulation charges, in USD per million tokens (Sonnet-class list prices).
const PRICE_INPUT: f64 = 3.0;
const PRICE_OUTPUT: f64 = 15.0;
const PRICE_CACHE_WRITE: f64 = 3.75;
const PRICE_CACHE_READ: f64 = 0.30;

pub struct Sim;

/// The backend's name in events and stored sessions.
pub const NAME: &str = "sim";
/// How many turns a sim history keeps.
pub const MAX_HISTORY_TURNS: usize = 8;
/// How much of a prompt, and of an answer's first line, a history entry keeps (characters).
const HISTORY_PROMPT_CHARS: usize = 400;
const HISTORY_ANSWER_CHARS: usize = 200;

/// One turn of a sim conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub prompt: String,
    pub answer: String,
}

/// The history stored in a sim session (an unreadable one counts as empty: it is only ever
/// written by this module).
pub fn history(snapshot: &Snapshot) -> Vec<Exchange> {
    serde_json::from_slice(&snapshot.bytes).unwrap_or_default()
}

/// A stable 64-bit hash of the job attempt (the same on every worker and every run).
fn seed(job: &JobSpec) -> u64 {
    // FNV-1a over the bytes: std's DefaultHasher is not guaranteed stable across releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(&job.job_id.as_u128().to_le_bytes());
    feed(&job.attempt.to_le_bytes());
    h
}

/// Whether this attempt fails, given the job's fail rate and forced failures.
pub fn fails(job: &JobSpec) -> bool {
    if job.attempt <= job.sim.fail_first_attempts {
        return true;
    }
    let draw = (seed(job) % 1_000_000) as f64 / 1_000_000.0;
    draw < job.sim.fail_rate
}

/// The usage and cost of this attempt.
pub fn usage(job: &JobSpec) -> (Usage, f64) {
    let s = seed(job);
    let context_len = job.context.as_ref().map_or(0, String::len);
    let usage = Usage {
        input_tokens: 200 + (job.prompt.len() + context_len) as u64 / 4,
        output_tokens: 120 + s % 80,
        cache_creation_tokens: 50,
        cache_read_tokens: 400 + (s >> 8) % 200,
    };
    let cost = (usage.input_tokens as f64 * PRICE_INPUT
        + usage.output_tokens as f64 * PRICE_OUTPUT
        + usage.cache_creation_tokens as f64 * PRICE_CACHE_WRITE
        + usage.cache_read_tokens as f64 * PRICE_CACHE_READ)
        / 1_000_000.0;
    (usage, cost)
}

fn excerpt(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() <= max {
        line.to_string()
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}

/// The simulated planner's answer: a JSON plan following the planner rubric, from the task
/// description at the end of the planner prompt. A task containing `[sim:bad-plan]` gets a
/// plan with a dependency cycle, so the coordinator's fallback can be seen working.
pub fn plan(job: &JobSpec) -> String {
    let task = job
        .prompt
        .split(orch_shared::plan::TASK_HEADING)
        .nth(1)
        .unwrap_or(&job.prompt);
    if task.contains("[sim:bad-plan]") {
        return r#"{"complexity":"simple","rationale":"[simulated] a broken plan","workflow":[{"agent_role":"BUILDER","depends_on":[1]},{"agent_role":"TESTER","depends_on":[0]}]}"#.into();
    }
    let words: Vec<String> = task
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let has = |list: &[&str]| words.iter().any(|w| list.contains(&w.as_str()));
    let docs = has(&["document", "docs", "readme", "documentation"]);
    let complex = words.len() >= 50
        || has(&[
            "refactor",
            "redesign",
            "migrate",
            "architecture",
            "system",
            "comprehensive",
        ]);
    let medium = words.len() >= 15 || has(&["several", "multiple", "module", "modules"]);
    let (complexity, roles, skip): (&str, &[&str], &str) = if docs {
        (
            "simple",
            &["DOCUMENTER", "REVIEWER"],
            "documentation only: no analyst, planner or builder",
        )
    } else if complex {
        (
            "complex",
            &["ANALYST", "PLANNER", "BUILDER", "TESTER", "REVIEWER"],
            "nothing skipped: architecture work",
        )
    } else if medium {
        (
            "medium",
            &["ANALYST", "BUILDER", "TESTER", "REVIEWER"],
            "no separate planner for a medium change",
        )
    } else {
        (
            "simple",
            &["BUILDER", "TESTER"],
            "simple change: analyst and reviewer skipped",
        )
    };
    let steps: Vec<serde_json::Value> = roles
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let tokens = match *role {
                "ANALYST" => 30_000,
                "PLANNER" => 20_000,
                "BUILDER" => 40_000,
                "TESTER" => 25_000,
                _ => 15_000,
            };
            serde_json::json!({
                "agent_role": role,
                "scope": format!("[simulated] {} step", role.to_lowercase()),
                "constraints": if *role == "TESTER" { vec!["test only what changed"] } else { vec![] },
                "estimated_tokens": tokens,
                "depends_on": if i == 0 { vec![] } else { vec![i - 1] },
            })
        })
        .collect();
    serde_json::json!({
        "complexity": complexity,
        "rationale": format!("[simulated] {complexity} task by the sim planner's rubric"),
        "workflow": steps,
        "skip_reasoning": skip,
    })
    .to_string()
}

/// How a further turn introduces itself: which turn, what it continues, the previous message.
fn continuation(job: &JobSpec, previous: &Snapshot) -> String {
    let turn = Snapshot::next_turn(Some(previous));
    let (how, from) = match &job.session {
        Some(s) if s.fork => ("a fork of", s.from.to_string()),
        Some(s) => ("continuing from", s.from.to_string()),
        None => ("continuing from", "an earlier agent".to_string()),
    };
    let before = history(previous);
    let last = before
        .last()
        .map_or(String::new(), |e| excerpt(&e.prompt, 160));
    format!(
        "Turn {turn} ({how} {from}): this conversation has {} earlier turn(s). Previous message: {last}\n",
        before.len()
    )
}

/// The simulated answer, in the sections forward context is cut from.
pub fn output(job: &JobSpec) -> String {
    output_after(job, None)
}

/// The simulated answer of a turn that continues `previous` (a first turn without it).
pub fn output_after(job: &JobSpec, previous: Option<&Snapshot>) -> String {
    let role = job.role;
    let turn = previous.map_or(String::new(), |p| continuation(job, p));
    let received = match &job.context {
        Some(ctx) => {
            let summary = ctx
                .split("### Summary")
                .nth(1)
                .map(|s| excerpt(s.trim_start(), 120))
                .unwrap_or_default();
            format!(
                "- Received forward context ({} bytes): {summary}",
                ctx.len()
            )
        }
        None => "- Received no forward context.".to_string(),
    };
    format!(
        "## Summary\n{turn}[simulated] The {name} (sim backend, attempt {attempt}) handled: {task}\n\n\
         ## Files\n- none (simulated agents do not touch files)\n\n\
         ## Key Findings\n- This output is simulated; no model was called.\n{received}\n\n\
         ## For Next Agent\n[simulated] Continue from the {role}'s work on: {task}\n",
        name = role.agent_name(),
        attempt = job.attempt,
        task = excerpt(&job.prompt, 160),
    )
}

/// The session after a turn that answered `answer`: the previous history plus this turn.
fn session_after(job: &JobSpec, previous: Option<&Snapshot>, answer: &str) -> Option<Snapshot> {
    let mut turns = previous.map(history).unwrap_or_default();
    // The answer's gist: its first line that is not a heading.
    let gist = answer
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    turns.push(Exchange {
        prompt: cut_chars(&job.prompt, HISTORY_PROMPT_CHARS),
        answer: excerpt(gist, HISTORY_ANSWER_CHARS),
    });
    let mut from = turns.len().saturating_sub(MAX_HISTORY_TURNS);
    let mut bytes = serde_json::to_vec(&turns[from..]).ok()?;
    // Always inline: the oldest turns go first if long messages would make it an object.
    while bytes.len() > INLINE_MAX_BYTES && from + 1 < turns.len() {
        from += 1;
        bytes = serde_json::to_vec(&turns[from..]).ok()?;
    }
    Some(Snapshot {
        backend: NAME.into(),
        session_id: None,
        workspace: String::new(),
        turn: Snapshot::next_turn(previous),
        bytes,
    })
}

fn cut_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

impl Sim {
    /// One turn: continues `previous` when given; returns the output and the session after
    /// it (on success).
    pub async fn turn(
        &self,
        job: &JobSpec,
        previous: Option<&Snapshot>,
        events: Events,
        cancel: CancellationToken,
    ) -> (AgentOutput, Option<Snapshot>) {
        let out = self.run_after(job, previous, events, cancel).await;
        let session = match &out.outcome {
            Outcome::Success => session_after(job, previous, &out.output),
            Outcome::Failure { .. } => None,
        };
        (out, session)
    }

    async fn run_after(
        &self,
        job: &JobSpec,
        previous: Option<&Snapshot>,
        events: Events,
        cancel: CancellationToken,
    ) -> AgentOutput {
        let (usage, cost_usd) = usage(job);
        let half = Duration::from_millis(job.sim.latency_ms / 2);
        let cancelled = |usage| AgentOutput {
            outcome: Outcome::Failure {
                reason: FailureReason::Cancelled,
                message: "simulated agent stopped".into(),
            },
            output: String::new(),
            usage,
            cost_usd: 0.0,
            files_read: vec![],
            files_written: vec![],
            diff: None,
            git: None,
        };
        events.send(EventKind::Thinking);
        if !half.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return cancelled(Usage::default()),
                _ = tokio::time::sleep(half) => {}
            }
        }
        let call_id = format!("sim-{:x}", seed(job) & 0xffff);
        events.send(EventKind::ToolCall {
            call_id: call_id.clone(),
            name: "Read".into(),
            input: "{\"file_path\":\"README.md\"}".into(),
        });
        events.send(EventKind::ToolResult {
            call_id,
            output: "[simulated] README.md contents".into(),
            is_error: false,
        });
        let rest = Duration::from_millis(job.sim.latency_ms) - half;
        if !rest.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return cancelled(Usage::default()),
                _ = tokio::time::sleep(rest) => {}
            }
        }
        let text = match job.kind {
            JobKind::Plan => plan(job),
            JobKind::Agent | JobKind::Check => output_after(job, previous),
        };
        events.send(EventKind::Text { text: text.clone() });
        events.send(EventKind::Usage { usage, cost_usd });
        let outcome = if fails(job) {
            Outcome::Failure {
                reason: job.sim.fail_reason.unwrap_or(FailureReason::AgentError),
                message: format!(
                    "simulated failure (attempt {}, sim fail rate {}, first {} attempts fail)",
                    job.attempt, job.sim.fail_rate, job.sim.fail_first_attempts
                ),
            }
        } else {
            Outcome::Success
        };
        AgentOutput {
            outcome,
            output: text,
            usage,
            cost_usd,
            files_read: vec!["README.md".into()],
            files_written: vec![],
            diff: None,
            git: None,
        }
    }
}

impl Agent for Sim {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        events: Events,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, AgentOutput> {
        Box::pin(self.run_after(job, None, events, cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::ids::{JobId, TaskId};
    use orch_shared::job::SimParams;
    use orch_shared::role::Role;

    fn job(attempt: u32, fail_rate: f64) -> JobSpec {
        JobSpec {
            attempt,
            context: Some("## Context\n### Summary\nanalysis done\n".into()),
            sim: SimParams {
                latency_ms: 0,
                fail_rate,
                ..Default::default()
            },
            ..JobSpec::new(
                TaskId::from_u128(1),
                JobId::from_u128(2),
                Role::Builder,
                "Implement: a parser",
            )
        }
    }

    #[test]
    fn the_same_attempt_behaves_the_same() {
        assert_eq!(usage(&job(1, 0.0)), usage(&job(1, 0.0)));
        assert_eq!(output(&job(1, 0.0)), output(&job(1, 0.0)));
        assert!(!fails(&job(1, 0.0)));
        assert!(fails(&job(1, 1.0)));
    }

    #[test]
    fn the_sim_planner_follows_the_rubric_and_can_be_asked_for_a_bad_plan() {
        let mut j = job(1, 0.0);
        j.kind = JobKind::Plan;
        let with = |task: &str| format!("rubric...\n{}{task}", orch_shared::plan::TASK_HEADING);
        j.prompt = with("add a button");
        let p = orch_shared::plan::parse_answer(&plan(&j), true).unwrap();
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.complexity.as_deref(), Some("simple"));
        j.prompt = with("redesign the auth system");
        assert_eq!(
            orch_shared::plan::parse_answer(&plan(&j), true)
                .unwrap()
                .steps
                .len(),
            5
        );
        j.prompt = with("update the README");
        let p = orch_shared::plan::parse_answer(&plan(&j), true).unwrap();
        assert_eq!(p.steps[0].role, orch_shared::role::Role::Documenter);
        j.prompt = with("x [sim:bad-plan]");
        assert!(
            orch_shared::plan::parse_answer(&plan(&j), true)
                .unwrap_err()
                .contains("cycle")
        );
    }

    #[test]
    fn forced_failures_hit_the_first_attempts_only() {
        let mut j = job(1, 0.0);
        j.sim.fail_first_attempts = 2;
        assert!(fails(&j));
        j.attempt = 2;
        assert!(fails(&j));
        j.attempt = 3;
        assert!(!fails(&j));
    }

    #[test]
    fn fail_rate_is_roughly_honoured() {
        let failed = (1..=2000).filter(|a| fails(&job(*a, 0.25))).count();
        assert!((350..650).contains(&failed), "{failed} of 2000 failed");
    }

    #[test]
    fn output_says_it_is_simulated_and_echoes_context() {
        let out = output(&job(1, 0.0));
        assert!(out.contains("[simulated]"));
        assert!(out.contains("## Summary"));
        assert!(out.contains("Received forward context"));
        assert!(out.contains("analysis done"));
    }

    #[tokio::test]
    async fn a_further_turn_quotes_the_history_and_keeps_it_small() {
        let mut previous = None;
        let mut j = job(1, 0.0);
        for turn in 1..=12u32 {
            j.job_id = JobId::from_u128(100 + u128::from(turn));
            j.prompt = format!("message {turn}: {}", "é".repeat(1000));
            if turn > 1 {
                j.session = Some(orch_shared::job::SessionRef {
                    from: JobId::from_u128(99 + u128::from(turn)),
                    fork: turn == 3,
                    checkpoint: None,
                });
            }
            let (events, _rx) = Events::new();
            let (out, session) = Sim
                .turn(&j, previous.as_ref(), events, CancellationToken::new())
                .await;
            let s = session.unwrap();
            assert_eq!(s.turn, turn);
            assert!(s.bytes.len() <= INLINE_MAX_BYTES, "{}", s.bytes.len());
            let h = history(&s);
            assert!(h.len() <= MAX_HISTORY_TURNS);
            assert!(
                h.last()
                    .unwrap()
                    .prompt
                    .starts_with(&format!("message {turn}:"))
            );
            assert!(
                h.last().unwrap().answer.starts_with("Turn") || turn == 1,
                "{h:?}"
            );
            match turn {
                1 => assert!(!out.output.contains("Turn 1")),
                3 => assert!(
                    out.output
                        .contains(&format!("Turn 3 (a fork of {})", JobId::from_u128(102)))
                ),
                _ => {
                    assert!(
                        out.output
                            .contains(&format!("Turn {turn} (continuing from"))
                    );
                    assert!(
                        out.output
                            .contains(&format!("Previous message: message {}:", turn - 1))
                    );
                }
            }
            previous = Some(s);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn latency_and_cancellation() {
        let mut j = job(1, 0.0);
        j.sim.latency_ms = 10_000;
        let (events, mut rx) = Events::new();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let out = Sim.run(&j, events, cancel).await;
        assert!(matches!(
            out.outcome,
            Outcome::Failure {
                reason: FailureReason::Cancelled,
                ..
            }
        ));
        assert_eq!(rx.recv().await, Some(EventKind::Thinking));
    }
}
