//! What the chat backends (`anthropic`, `openai`) share besides their tool loop
//! ([`super::tool_loop`]): a conversation is the JSON list of its messages in the API's format
//! (the user's prompt, every tool round, and the answer of every turn, without the system
//! prompt), stored as the session; and how an answer is judged.

use super::Prepared;
use crate::session::Snapshot;
use orch_shared::job::{FailureReason, Outcome};
use serde_json::Value;

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

/// The session after a turn: the whole message list, ending with the answer.
pub fn session(backend: &str, p: &Prepared<'_>, messages: &[Value]) -> Snapshot {
    Snapshot {
        backend: backend.into(),
        session_id: None,
        workspace: String::new(),
        turn: Snapshot::next_turn(p.session.as_ref()),
        bytes: serde_json::to_vec(messages).unwrap_or_default(),
    }
}

/// The outcome of an answer that no API-specific reason failed: an empty answer fails, one
/// cut at the token limit succeeds (with a warning).
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
