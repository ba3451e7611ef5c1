//! What the chat backends (`anthropic`, `openai`) share: a conversation is the JSON list of
//! its `{role, content}` messages (the user's prompt and the answer of every turn, without the
//! system prompt), and a turn ends the same way on both ([`Turn`]: its outcome, cost, `usage`
//! event and session).

use super::http::CallError;
use super::{AgentOutput, ContextUse, Events, Prepared, Report};
use crate::session::Snapshot;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Outcome, Usage};
use serde_json::{Value, json};

/// The messages of a stored conversation (none for a first turn); an error message when the
/// stored session is not a message list.
pub fn history(backend: &str, session: Option<&Snapshot>) -> Result<Vec<Value>, String> {
    let Some(s) = session else {
        return Ok(vec![]);
    };
    match serde_json::from_slice::<Value>(&s.bytes) {
        Ok(Value::Array(messages)) => Ok(messages),
        _ => Err(format!(
            "the stored session is not a {backend} message list"
        )),
    }
}

/// The session after a turn: the messages sent (`messages` ends with this turn's prompt)
/// and the answer.
fn session_after(
    backend: &str,
    p: &Prepared<'_>,
    mut messages: Vec<Value>,
    answer: &str,
) -> Snapshot {
    messages.push(json!({"role": "assistant", "content": answer}));
    Snapshot {
        backend: backend.into(),
        session_id: None,
        workspace: String::new(),
        turn: Snapshot::next_turn(p.session.as_ref()),
        bytes: serde_json::to_vec(&messages).unwrap_or_default(),
    }
}

/// How an API backend's turn ended: the answer's outcome and text, the tokens of all its
/// requests, and the context its last request used.
pub struct Turn {
    pub outcome: Outcome,
    pub text: String,
    pub usage: Usage,
    pub context: Option<ContextUse>,
}

impl Turn {
    /// The outcome of an answer that no API-specific reason failed: an empty answer fails,
    /// one cut at the token limit succeeds (with a warning).
    pub fn answered(text: &str, cut_at_limit: bool, model: &str) -> Outcome {
        if text.is_empty() {
            return Outcome::Failure {
                reason: FailureReason::AgentError,
                message: "the model answered with no text".into(),
            };
        }
        if cut_at_limit {
            tracing::warn!(model = %model, "answer cut at the token limit");
        }
        Outcome::Success
    }

    /// A turn whose request failed for good (after its retries): no answer. `usage` is what
    /// its attempts were billed for.
    pub fn failed(e: CallError, usage: Usage) -> Self {
        Turn {
            outcome: Outcome::Failure {
                reason: e.reason,
                message: e.message,
            },
            text: String::new(),
            usage,
            context: None,
        }
    }

    /// The turn's report: its cost, a `usage` event, and when it succeeded the conversation
    /// with its answer as the session (`messages` ends with this turn's prompt).
    pub fn report(
        self,
        backend: &'static str,
        p: &Prepared<'_>,
        events: &Events,
        model: String,
        messages: Vec<Value>,
    ) -> Report {
        let Turn {
            outcome,
            text,
            usage,
            context,
        } = self;
        let cost_usd = p.cost(Some(&model), &usage);
        events.send(EventKind::Usage { usage, cost_usd });
        let session = outcome
            .is_success()
            .then(|| session_after(backend, p, messages, &text));
        Report {
            session,
            output: AgentOutput {
                outcome,
                output: text,
                usage,
                cost_usd,
                files_read: vec![],
                files_written: vec![],
                diff: None,
                git: None,
            },
            backend,
            model: Some(model),
            context,
        }
    }
}
