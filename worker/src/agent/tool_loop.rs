//! The agent loop of the chat backends (`anthropic`, `openai`): send the conversation with the
//! role's tools, stream the answer, run the tool calls it asks for, send their results back,
//! until the model answers without calling a tool, the turn limit is reached, or the job is
//! cancelled (a job timeout cancels the agent too, or drops it: a running shell command's
//! process tree dies with it).
//!
//! What differs between the two APIs (the request body, reading the stream, how tool results
//! are written back) is an [`Api`]; everything else is here, once:
//! - the workspace ([`WorkDir`]) and the [`Toolbox`] with the role's native tools
//!   ([`crate::roles::Profile::native_tools`]); a read-only role on a scratch workspace gets
//!   neither (there is nothing to read), so planners stay a single cheap request;
//! - tool calls of one response: consecutive read-only calls run concurrently, a call that
//!   writes or runs a command runs alone, in the order the model gave; each call and its
//!   result are `tool_call` / `tool_result` events, and file tools count as files read and
//!   written;
//! - usage summed over every request (failed attempts included) and priced once, a cumulative
//!   `usage` event after every request, the context occupancy of the last request;
//! - the turn limit: the job's `max_turns`, else the role's, else [`DEFAULT_MAX_TURNS`]; a
//!   model still calling tools at the limit fails the job with `budget_exhausted`, as
//!   `claude-code` does;
//! - context that fits: once a request fills more than [`ELIDE_ABOVE`] of the model's window
//!   (when the window is known), the tool results the model has already seen are replaced by
//!   a note saying how much was elided (the newest results always go out whole);
//! - the session: the message list with every tool round in it ([`super::chat`]).

use super::chat;
use super::http::{self, CallError, Spent};
use super::tools::{self, Call, READ_ONLY, Spec, ToolOutput, Toolbox};
use super::workspace::{FileTracker, WorkDir};
use super::{AgentOutput, ContextUse, Events, Prepared, Report};
use crate::config::ApiSettings;
use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Outcome, Usage, Workspace};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The turn limit when neither the job nor the role sets one (a worker setting later).
pub const DEFAULT_MAX_TURNS: u32 = 100;
/// The most of a tool's input or output an event carries (the model gets the whole result).
const MAX_EVENT_TEXT: usize = 8 * 1024;
/// Above this fraction of the model's window, the tool results the model has already seen are
/// replaced by a note before the next request (a worker setting later).
const ELIDE_ABOVE: f64 = 0.8;

/// What one request produced.
#[derive(Debug, Default)]
pub struct Step {
    /// The answer's text.
    pub text: String,
    pub calls: Vec<Call>,
    /// What this request was billed for.
    pub usage: Usage,
    /// The message to add to the conversation, in the API's format.
    pub assistant: Value,
    /// Why the answer cannot be used whatever its text (a refusal, a content filter).
    pub refused: Option<String>,
    /// The answer was cut at the token limit.
    pub cut: bool,
}

/// One chat API.
pub trait Api: Sync {
    const NAME: &'static str;

    fn settings(&self) -> &ApiSettings;

    /// The streamed request for `messages` (without the system prompt) offering `tools`.
    fn body(&self, model: &str, system: &str, messages: &[Value], tools: &[Spec]) -> Value;

    /// Sends one request and reads its stream.
    fn send<'a>(
        &'a self,
        body: &'a Value,
        events: &'a Events,
    ) -> BoxFuture<'a, Result<Step, CallError>>;

    /// The messages that give the model `outputs`, the results of `calls`.
    fn results(&self, calls: &[Call], outputs: &[ToolOutput]) -> Vec<Value>;

    /// Replaces the tool results `message` holds (if any) with a short note; the bytes saved.
    fn elide_results(&self, message: &mut Value) -> usize;
}

/// The note that replaces a tool result the model already acted on, to save context.
pub fn elided(bytes: usize) -> String {
    format!("[tool result elided to save context: {bytes} bytes]")
}

/// Runs a turn of the conversation on `api` with `model`.
pub async fn run<A: Api>(
    api: &A,
    p: &Prepared<'_>,
    events: &Events,
    cancel: &CancellationToken,
    model: String,
) -> Report {
    let fail = |reason, message: String| Report {
        model: Some(model.clone()),
        ..Report::failure(A::NAME, reason, message)
    };
    let mut messages = match chat::history(A::NAME, p.session.as_ref()) {
        Ok(m) => m,
        Err(message) => return fail(FailureReason::BadRequest, message),
    };
    messages.push(json!({"role": "user", "content": p.prompt}));
    let allowed = p.profile.native_tools();
    let useful = !allowed.is_empty()
        && (!matches!(p.job.workspace, Workspace::Scratch)
            || allowed.iter().any(|t| !READ_ONLY.contains(t)));
    let role = p.job.role.as_str();
    let (dir, toolbox) = if useful {
        let dir = match WorkDir::prepare(p.job, p.data_dir, cancel).await {
            Ok(d) => d,
            Err((reason, message)) => return fail(reason, message),
        };
        // The file tools run in the worker, confined to the workspace by path; `bash` runs
        // in the job's sandbox.
        let jail = if allowed.contains(&"bash") {
            match p.jail(&dir.path, events) {
                Ok(j) => j.map(Arc::new),
                Err((reason, message)) => return fail(reason, message),
            }
        } else {
            None
        };
        match Toolbox::new(&dir.path, allowed, role) {
            Ok(t) => (Some(dir), t.with_jail(jail)),
            Err(message) => return fail(FailureReason::Internal, message),
        }
    } else {
        (None, Toolbox::none(role))
    };
    let specs = tools::specs(toolbox.allowed());
    let mut files = dir.as_ref().map(|d| FileTracker::new(&d.path));
    let max_turns = p
        .job
        .limits
        .max_turns
        .or(p.profile.max_turns)
        .unwrap_or(DEFAULT_MAX_TURNS);

    events.send(EventKind::Thinking);
    let mut usage = Usage::default();
    let mut context = None;
    let mut turns = 0;
    let (outcome, text) = loop {
        turns += 1;
        let body = api.body(&model, &p.profile.system_prompt, &messages, &specs);
        let mut spent = Spent::default();
        let result = http::with_retries(A::NAME, api.settings(), cancel, &mut spent, || {
            api.send(&body, events)
        })
        .await;
        usage.add(&spent.usage);
        let step = match result {
            Ok(s) => s,
            Err(e) => {
                break (
                    Outcome::Failure {
                        reason: e.reason,
                        message: e.message,
                    },
                    String::new(),
                );
            }
        };
        usage.add(&step.usage);
        let last = step.usage;
        context = p.context_window(&model).map(|window| ContextUse {
            tokens: last.input_tokens + last.cache_creation_tokens + last.cache_read_tokens,
            window,
        });
        events.send(EventKind::Usage {
            usage,
            cost_usd: p.cost(Some(&model), &usage),
        });
        messages.push(step.assistant);
        if let Some(message) = step.refused {
            break (
                Outcome::Failure {
                    reason: FailureReason::AgentError,
                    message,
                },
                String::new(),
            );
        }
        if step.calls.is_empty() {
            let text = step.text.trim().to_string();
            break (chat::answered(&text, step.cut, &model), text);
        }
        if turns >= max_turns {
            break (
                Outcome::Failure {
                    reason: FailureReason::BudgetExhausted,
                    message: format!(
                        "the agent reached its turn limit ({max_turns}) still calling tools"
                    ),
                },
                String::new(),
            );
        }
        let outputs = run_calls(&toolbox, &step.calls, events, files.as_mut(), cancel).await;
        if cancel.is_cancelled() {
            break (
                Outcome::Failure {
                    reason: FailureReason::Cancelled,
                    message: "agent stopped".into(),
                },
                String::new(),
            );
        }
        if context.is_some_and(|c| c.fraction() > ELIDE_ABOVE) {
            let saved: usize = messages.iter_mut().map(|m| api.elide_results(m)).sum();
            if saved > 0 {
                tracing::info!(saved, model = %model, "context nearly full: earlier tool results elided");
            }
        }
        messages.extend(api.results(&step.calls, &outputs));
    };

    let cost_usd = p.cost(Some(&model), &usage);
    let success = outcome.is_success();
    let (outcome, changes) = match (&dir, files) {
        (Some(d), Some(f)) => {
            let changes = d.finish(p.job, success, f).await;
            (changes.outcome(outcome), Some(changes))
        }
        _ => (outcome, None),
    };
    drop(dir);
    let changes = changes.unwrap_or_default();
    let session = outcome
        .is_success()
        .then(|| chat::session(A::NAME, p, &messages));
    Report {
        output: AgentOutput {
            outcome,
            output: text,
            usage,
            cost_usd,
            files_read: changes.files_read,
            files_written: changes.files_written,
            diff: changes.diff,
            git: changes.git,
        },
        backend: A::NAME,
        model: Some(model),
        context,
        session,
    }
}

/// Runs the calls of one response (see the module docs) and reports them as events; stops
/// early when `cancel` fires (the calls not run get no output).
async fn run_calls(
    toolbox: &Toolbox,
    calls: &[Call],
    events: &Events,
    mut files: Option<&mut FileTracker>,
    cancel: &CancellationToken,
) -> Vec<ToolOutput> {
    for c in calls {
        events.send(EventKind::ToolCall {
            call_id: c.id.clone(),
            name: c.name.clone(),
            input: tools::cap(&c.input.to_string(), MAX_EVENT_TEXT),
        });
        if let Some(f) = files.as_deref_mut() {
            f.on_call(&c.id, &c.name, &c.input);
        }
    }
    let mut outputs: Vec<ToolOutput> = Vec::with_capacity(calls.len());
    while outputs.len() < calls.len() && !cancel.is_cancelled() {
        let from = outputs.len();
        let reads = calls[from..]
            .iter()
            .take_while(|c| READ_ONLY.contains(&c.name.as_str()))
            .count();
        if reads > 0 {
            let batch = calls[from..from + reads]
                .iter()
                .map(|c| toolbox.run(c, cancel));
            outputs.extend(futures::future::join_all(batch).await);
        } else {
            outputs.push(toolbox.run(&calls[from], cancel).await);
        }
    }
    for (c, o) in calls.iter().zip(&outputs) {
        if let Some(f) = files.as_deref_mut() {
            f.on_result(&c.id, o.is_error);
        }
        events.send(EventKind::ToolResult {
            call_id: c.id.clone(),
            output: tools::cap(&o.text, MAX_EVENT_TEXT),
            is_error: o.is_error,
        });
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_of_one_response_run_in_order_and_each_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let all = vec!["read_file", "write_file", "edit_file", "list_files"];
        let toolbox = Toolbox::new(dir.path(), all, "builder").unwrap();
        let call = |id: &str, name: &str, input: Value| Call {
            id: id.into(),
            name: name.into(),
            input,
        };
        // Reads between writes see the writes before them.
        let calls = [
            call("1", "write_file", json!({"path": "a", "content": "one"})),
            call("2", "read_file", json!({"path": "a"})),
            call("3", "list_files", json!({})),
            call(
                "4",
                "edit_file",
                json!({"path": "a", "old_string": "one", "new_string": "two"}),
            ),
            call("5", "read_file", json!({"path": "a"})),
            call("6", "bash", json!({"command": "true"})),
        ];
        let (events, mut rx) = Events::new();
        let mut files = FileTracker::new(dir.path());
        let outputs = run_calls(
            &toolbox,
            &calls,
            &events,
            Some(&mut files),
            &CancellationToken::new(),
        )
        .await;
        let texts: Vec<&str> = outputs.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(texts[1], "     1\tone\n");
        assert_eq!(texts[2], "a");
        assert_eq!(texts[4], "     1\ttwo\n");
        assert!(outputs[5].is_error && texts[5].contains("not allowed"));
        let mut kinds = vec![];
        while let Ok(e) = rx.try_recv() {
            kinds.push(e.name());
        }
        assert_eq!(kinds, [["tool_call"; 6], ["tool_result"; 6]].concat());
        let (read, written) = files.finish(vec![]);
        assert_eq!((read, written), (vec![], vec!["a".to_string()]));
    }
}
