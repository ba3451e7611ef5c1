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
//! - the turn limit: the job's `max_turns`, else the role's, else the worker's
//!   (`agent.max_turns`); a
//!   model still calling tools at the limit fails the job with `budget_exhausted`, as
//!   `claude-code` does;
//! - context that fits: once a request fills more than `agent.elide_above` of the model's
//!   window (when the window is known), the tool results the model has already seen are
//!   replaced by a note saying how much was elided (the newest results always go out whole);
//!   if the request still fills more than `agent.compact_above` (less what eliding saved,
//!   estimated), the model summarizes the conversation before its latest
//!   `agent.keep_rounds` rounds in one more request (billed and counted like any other)
//!   and the summary replaces them; a `compacted` event gives the context before and after;
//! - the session: the message list with every tool round in it ([`super::chat`]).

use super::chat;
use super::http::{self, CallError, Spent};
use super::tools::{self, Call, Limits, READ_ONLY, Spec, ToolOutput, Toolbox, mcp};
use super::workspace::FileTracker;
use super::{AgentOutput, ContextUse, Events, Prepared, Report};
use crate::config::ApiSettings;
use crate::custody;
use futures::future::BoxFuture;
use orch_shared::event::EventKind;
use orch_shared::job::{FailureReason, Outcome, Usage, Workspace};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The most of a tool's input or output an event carries (the model gets the whole result).
const MAX_EVENT_TEXT: usize = 8 * 1024;

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
    let settings = p.tool_loop;
    let gate = Gate::of(p, events, cancel);
    let mut allowed = p.profile.native_tools();
    // Tools the role marks `ask` are offered too; each call waits for a person.
    if let Some(g) = &gate {
        for (native, _) in &g.asked {
            if !allowed.contains(native) {
                allowed.push(native);
            }
        }
    }
    let servers = mcp::declared(p.profile, &p.job.mcp_servers);
    let useful = !servers.is_empty()
        || !allowed.is_empty()
            && (!matches!(p.job.workspace, Workspace::Scratch)
                || allowed.iter().any(|t| !READ_ONLY.contains(t)));
    let role = p.job.role.as_str();
    let (dir, toolbox, resumed) = if useful {
        let (dir, resumed) = match custody::workspace_for(p, events, cancel).await {
            Ok(d) => d,
            Err((reason, message)) => return fail(reason, message),
        };
        // The file tools run in the worker, confined to the workspace by path; `bash` runs
        // in the job's sandbox.
        let stdio = servers.values().any(|s| s.command.is_some());
        let jail = if allowed.contains(&"bash") || stdio {
            match p.jail(&dir.path, events) {
                Ok(j) => j.map(Arc::new),
                Err((reason, message)) => return fail(reason, message),
            }
        } else {
            None
        };
        // A role's own timeout may be longer than the worker's longest (a tester's suite).
        let bash_timeout = p.profile.bash_timeout.unwrap_or(settings.bash_timeout);
        let limits = Limits {
            max_result_bytes: settings.max_result_bytes,
            bash_timeout,
            bash_max_timeout: settings.bash_max_timeout.max(bash_timeout),
        };
        let toolbox = match Toolbox::new(&dir.path, allowed, role, limits) {
            Ok(t) => t,
            Err(message) => return fail(FailureReason::Internal, message),
        };
        let started = mcp::McpTools::start(
            &servers,
            p.profile,
            &dir.path,
            jail.as_deref(),
            settings.mcp_start_timeout,
            cancel,
        )
        .await;
        let mcp_tools = match started {
            Ok((tools, started)) => {
                for s in started {
                    events.send(EventKind::McpServer {
                        server: s.server,
                        tools: s.tools,
                        withheld: s.withheld,
                        error: None,
                    });
                }
                tools
            }
            Err(e) => {
                events.send(EventKind::McpServer {
                    server: e.server.clone(),
                    tools: 0,
                    withheld: 0,
                    error: Some(e.message.clone()),
                });
                return fail(
                    FailureReason::BadRequest,
                    format!("the MCP server `{}` {}", e.server, e.message),
                );
            }
        };
        (
            Some(dir),
            toolbox.with_jail(jail).with_mcp(mcp_tools),
            resumed,
        )
    } else {
        (None, Toolbox::none(role), None)
    };
    // A resumed run sends the checkpoint's message list as it was: its last message holds
    // the tool results the interrupted run was about to send.
    let resumed_messages = match &resumed {
        Some(r) => match serde_json::from_slice::<Value>(&r.conversation) {
            // A rewind: the user's message follows (beside the tool results it ends with).
            Ok(Value::Array(m)) if !m.is_empty() && r.rewind => Some(with_user_text(&m, &p.prompt)),
            Ok(Value::Array(m)) if !m.is_empty() => Some(m),
            Ok(_) | Err(_) if r.rewind => {
                return fail(
                    FailureReason::BadRequest,
                    "the rewind cannot start: the checkpoint's message list is damaged".into(),
                );
            }
            _ => {
                if let Some(rec) = events.recorder() {
                    rec.abandon_resume(events, "the checkpoint's message list is damaged".into());
                }
                None
            }
        },
        None => None,
    };
    let mut messages = match resumed_messages {
        Some(m) => {
            if let Some(rec) = events.recorder() {
                rec.confirm_resume(events);
            }
            m
        }
        None => {
            let mut m = match chat::history(A::NAME, p.session.as_ref()) {
                Ok(m) => m,
                Err(message) => return fail(FailureReason::BadRequest, message),
            };
            m.push(json!({"role": "user", "content": p.prompt}));
            m
        }
    };
    let specs = toolbox.specs();
    let mut files = dir.as_ref().map(|d| FileTracker::new(&d.path));
    let max_turns = p
        .job
        .limits
        .max_turns
        .or(p.profile.max_turns)
        .unwrap_or(settings.max_turns);

    events.send(EventKind::Thinking);
    let mut usage = Usage::default();
    let mut context = None;
    let mut turns = 0;
    // A compaction's context before it and the rounds it summarized, reported with the
    // occupancy of the next request.
    let mut compacted: Option<(u64, u32)> = None;
    // Tools the model called that its role may not use: the answer is then not a plain success.
    let mut denied: Vec<String> = vec![];
    let mut steps = 0;
    // The last response's end and its tools' run time: the loop's own time per tool round is
    // what lies between that end and the next request, the tools left out.
    let mut round: Option<(std::time::Instant, std::time::Duration)> = None;
    let (outcome, text) = loop {
        turns += 1;
        let body = api.body(&model, &p.profile.system_prompt, &messages, &specs);
        if let Some((responded, tools)) = round.take() {
            let own = responded.elapsed().saturating_sub(tools);
            metrics::histogram!(crate::metrics::TOOL_ROUND_OVERHEAD_SECONDS)
                .record(own.as_secs_f64());
        }
        let mut spent = Spent::default();
        let result = http::with_retries(A::NAME, api.settings(), cancel, &mut spent, || {
            api.send(&body, events)
        })
        .instrument(step_span(
            || tracing::info_span!("model", backend = A::NAME, %model, turn = turns),
        ))
        .await;
        usage.add(&spent.usage);
        if let Some((tokens_before, rounds)) = compacted.take() {
            events.send(EventKind::Compacted {
                tokens_before,
                tokens_after: result.as_ref().ok().map(|s| input_tokens(&s.usage)),
                rounds,
            });
        }
        let responded = std::time::Instant::now();
        let step = match result {
            Ok(s) => s,
            Err(e) => {
                if let Some(l) = e.limit {
                    p.note_limit(*l);
                }
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
            tokens: input_tokens(&last),
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
        // A job without tools (a read-only role on scratch) offered none: a call there is a
        // model's mistake, not a permission it lacked.
        if !toolbox.is_empty() {
            denied.extend(
                step.calls
                    .iter()
                    .filter(|c| !toolbox.offers(&c.name))
                    .map(|c| c.name.clone()),
            );
        }
        let tools_started = std::time::Instant::now();
        let outputs = run_calls(
            &toolbox,
            gate.as_ref(),
            &step.calls,
            events,
            files.as_mut(),
            cancel,
        )
        .await;
        let tools_took = tools_started.elapsed();
        if let Some(g) = &gate {
            denied.append(&mut g.take_denied());
        }
        if cancel.is_cancelled() {
            break (
                Outcome::Failure {
                    reason: FailureReason::Cancelled,
                    message: "agent stopped".into(),
                },
                String::new(),
            );
        }
        let mut saved = 0;
        if context.is_some_and(|c| c.fraction() > settings.elide_above) {
            saved = messages.iter_mut().map(|m| api.elide_results(m)).sum();
            if saved > 0 {
                tracing::info!(saved, model = %model, "context nearly full: earlier tool results elided");
            }
        }
        messages.extend(api.results(&step.calls, &outputs));
        steps += 1;
        if let Some(rec) = events.recorder() {
            rec.step(custody::Step {
                n: steps,
                usage,
                cost_usd: p.cost(Some(&model), &usage),
                writes: step
                    .calls
                    .iter()
                    .any(|c| !READ_ONLY.contains(&c.name.as_str())),
                paths: custody::files_written(
                    step.calls.iter().map(|c| (c.name.as_str(), &c.input)),
                    READ_ONLY,
                ),
                conversation: custody::Conversation::Messages(
                    serde_json::to_vec(&messages).unwrap_or_default(),
                ),
            });
        }
        round = Some((responded, tools_took));
        // What eliding saved is known in bytes only: about four of them make a token.
        let Some(c) = context else { continue };
        let estimate = c.tokens.saturating_sub(saved as u64 / 4);
        if estimate as f64 / c.window.max(1) as f64 <= settings.compact_above {
            continue;
        }
        let cut = match compaction_cut(&messages, settings.keep_rounds) {
            Some(cut) => cut,
            None => continue,
        };
        // A summary request is no part of the loop's own time.
        round = None;
        let mut spent = Spent::default();
        let summary = summarize(
            api,
            p,
            &model,
            &specs,
            &messages[..cut.at],
            cancel,
            &mut spent,
        )
        .await;
        usage.add(&spent.usage);
        events.send(EventKind::Usage {
            usage,
            cost_usd: p.cost(Some(&model), &usage),
        });
        match summary {
            Ok(Some(summary)) => {
                let mut kept = vec![
                    json!({"role": "user", "content": compacted_message(&p.prompt, &summary)}),
                ];
                kept.extend(messages.drain(cut.at..));
                messages = kept;
                tracing::info!(tokens = c.tokens, rounds = cut.rounds, model = %model, "context nearly full: earlier rounds compacted into a summary");
                compacted = Some((c.tokens, cut.rounds));
            }
            Ok(None) => {
                tracing::warn!(model = %model, "the model wrote no summary: the conversation stays as it is");
            }
            Err(e) => {
                break (
                    Outcome::Failure {
                        reason: e.reason,
                        message: format!("compacting the conversation failed: {}", e.message),
                    },
                    String::new(),
                );
            }
        }
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
    let outcome = match outcome {
        Outcome::Success if !denied.is_empty() => Outcome::Failure {
            reason: FailureReason::NeedsAttention,
            message: format!(
                "the agent was denied {} tool call(s) it asked for: {}",
                denied.len(),
                denied.join(", ")
            ),
        },
        o => o,
    };
    let changes = changes.unwrap_or_default();
    let session = outcome
        .is_success()
        .then(|| chat::session(A::NAME, p, &messages));
    Report {
        parked: None,
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

/// The input tokens of one request: fresh, cache writes and cache reads.
fn input_tokens(u: &Usage) -> u64 {
    u.input_tokens + u.cache_creation_tokens + u.cache_read_tokens
}

/// Where a compaction cuts the conversation.
#[derive(Debug, PartialEq)]
struct Cut {
    /// The messages before this index are summarized; the rest stay as they are.
    at: usize,
    /// The rounds (answers of the model, with the tool results that follow them) summarized.
    rounds: u32,
}

/// The cut that keeps the latest `keep` rounds; `None` when there are no more rounds than
/// that. A round starts with an answer of the model, so the kept part starts with one and every
/// tool result stays with the call it answers.
fn compaction_cut(messages: &[Value], keep: usize) -> Option<Cut> {
    let starts: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .map(|(i, _)| i)
        .collect();
    let rounds = starts.len().checked_sub(keep).filter(|r| *r > 0)?;
    let at = if keep == 0 {
        messages.len()
    } else {
        starts[rounds]
    };
    Some(Cut {
        at,
        rounds: u32::try_from(rounds).unwrap_or(u32::MAX),
    })
}

/// What the model is asked when its conversation is compacted.
const SUMMARY_REQUEST: &str = "\
The conversation is about to be cut to fit your context window: everything above this message \
will be replaced by your summary of it. Do not call any tool now. Write that summary for \
yourself, to continue the work from it alone: the task and the user's requests, what you did \
and found (files read, created or changed, with the details you will need again: names, \
decisions, errors and their fixes, test results), and what remains to be done.";

/// The message that replaces the conversation a compaction summarized.
fn compacted_message(prompt: &str, summary: &str) -> String {
    format!(
        "{prompt}\n\n[The earlier conversation was compacted to fit the context window. \
         Your summary of it:]\n\n{summary}"
    )
}

/// `older` with the request for its summary at the end (see [`with_user_text`]).
fn summary_request(older: &[Value]) -> Vec<Value> {
    with_user_text(older, SUMMARY_REQUEST)
}

/// `older` with the user's `message` at the end: a text block after the tool results of a
/// last user message that has blocks (the Messages API wants user and assistant turns to
/// alternate), else a user message of its own.
fn with_user_text(older: &[Value], message: &str) -> Vec<Value> {
    let mut asked = older.to_vec();
    let text = json!({"type": "text", "text": message});
    match asked.last_mut() {
        Some(last) if last.get("role").and_then(Value::as_str) == Some("user") => {
            match last.get_mut("content") {
                Some(Value::Array(blocks)) => blocks.push(text),
                Some(content) => {
                    let earlier = content.take();
                    *content = json!([{"type": "text", "text": earlier}, text]);
                }
                None => last["content"] = json!([text]),
            }
        }
        _ => asked.push(json!({"role": "user", "content": message})),
    }
    asked
}

/// Asks the model to summarize `older` (with the same system prompt and tools, so the
/// request reads the cached prefix). The summary, or `None` when the answer had no text; what
/// the request was billed for is added to `spent`. Its streamed text is not shown as the
/// agent's output.
async fn summarize<A: Api>(
    api: &A,
    p: &Prepared<'_>,
    model: &str,
    specs: &[Spec],
    older: &[Value],
    cancel: &CancellationToken,
    spent: &mut Spent,
) -> Result<Option<String>, CallError> {
    let asked = summary_request(older);
    let body = api.body(model, &p.profile.system_prompt, &asked, specs);
    let (quiet, _) = Events::new();
    let step = http::with_retries(A::NAME, api.settings(), cancel, spent, || {
        api.send(&body, &quiet)
    })
    .await?;
    spent.usage.add(&step.usage);
    let text = step.text.trim();
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// Runs the calls of one response (see the module docs) and reports them as events; stops
/// early when `cancel` fires (the calls not run get no output).
/// The approval broker's gate on the tools a role marks `ask` (`[roles.<r>] ask_tools`, in
/// Claude Code's names): a call of one waits for a person's answer before it runs.
struct Gate<'a> {
    broker: &'a crate::approvals::Broker,
    job: &'a orch_shared::job::JobSpec,
    events: &'a Events,
    cancel: &'a CancellationToken,
    /// Native tool name and the Claude Code name its rules use.
    asked: Vec<(&'static str, &'static str)>,
    /// The native tools the role may use without asking.
    outright: Vec<&'static str>,
    rules: &'a [crate::approvals::Rule],
    denied: std::sync::Mutex<Vec<String>>,
}

impl<'a> Gate<'a> {
    fn of(p: &'a Prepared<'_>, events: &'a Events, cancel: &'a CancellationToken) -> Option<Self> {
        let desk = p.approvals?;
        let rules = &p.profile.ask_tools;
        let asked: Vec<(&'static str, &'static str)> = crate::roles::NATIVE_TOOLS
            .iter()
            .filter(|(claude, _)| rules.iter().any(|r| r.tool == *claude))
            .map(|(claude, native)| (*native, *claude))
            .collect();
        (!asked.is_empty()).then(|| Gate {
            broker: desk.broker(),
            job: p.job,
            events,
            cancel,
            asked,
            outright: p.profile.native_tools(),
            rules,
            denied: std::sync::Mutex::new(vec![]),
        })
    }

    /// `None`: the call may run; else the refusal it gets instead.
    async fn check(&self, call: &Call) -> Option<ToolOutput> {
        if self.outright.contains(&call.name.as_str()) {
            return None;
        }
        let claude = self
            .asked
            .iter()
            .find(|(native, _)| *native == call.name)
            .map(|(_, claude)| *claude)?;
        let subject = crate::approvals::subject(&call.input);
        let verdict = if self.rules.iter().any(|r| r.matches(claude, &subject)) {
            self.broker
                .ask(self.job, claude, &call.input, self.events, self.cancel)
                .await
        } else {
            crate::approvals::Verdict::Deny(format!(
                "`{}` with this input is not allowed for the {} role",
                call.name,
                self.job.role.as_str()
            ))
        };
        match verdict {
            crate::approvals::Verdict::Allow => None,
            crate::approvals::Verdict::Deny(message) => {
                if let Ok(mut d) = self.denied.lock() {
                    d.push(call.name.clone());
                }
                Some(ToolOutput::error(message))
            }
        }
    }

    fn take_denied(&self) -> Vec<String> {
        self.denied
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

/// Runs one call, through the gate when there is one.
async fn run_one(
    toolbox: &Toolbox,
    gate: Option<&Gate<'_>>,
    call: &Call,
    cancel: &CancellationToken,
) -> ToolOutput {
    if let Some(g) = gate
        && let Some(refused) = g.check(call).await
    {
        return refused;
    }
    toolbox.run(call, cancel).await
}

async fn run_calls(
    toolbox: &Toolbox,
    gate: Option<&Gate<'_>>,
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
                .map(|c| run_one(toolbox, gate, c, cancel).instrument(tool_span(c)));
            outputs.extend(futures::future::join_all(batch).await);
        } else {
            let c = &calls[from];
            outputs.push(
                run_one(toolbox, gate, c, cancel)
                    .instrument(tool_span(c))
                    .await,
            );
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

/// A span of one agent step, made only when traces are exported (the logs stay as they are
/// otherwise).
fn step_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if orch_config::telemetry::enabled() {
        make()
    } else {
        tracing::Span::none()
    }
}

fn tool_span(call: &Call) -> tracing::Span {
    step_span(|| tracing::info_span!("tool", name = %call.name, call_id = %call.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_request_keeps_user_and_assistant_turns_alternating() {
        let results = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "out"}]});
        let asked = summary_request(&[results]);
        assert_eq!(asked.len(), 1);
        let blocks = asked[0]["content"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "tool_result");
        assert_eq!(blocks[1]["text"], SUMMARY_REQUEST);
        let tool = json!({"role": "tool", "tool_call_id": "c1", "content": "out"});
        let asked = summary_request(std::slice::from_ref(&tool));
        assert_eq!(asked[0], tool);
        assert_eq!(
            asked[1],
            json!({"role": "user", "content": SUMMARY_REQUEST})
        );
    }

    #[test]
    fn a_compaction_keeps_the_latest_rounds_whole() {
        let user = |t: &str| json!({"role": "user", "content": t});
        let answer = json!({"role": "assistant", "content": "calls"});
        let result = json!({"role": "tool", "content": "out"});
        let m = vec![
            user("task"),
            answer.clone(),
            result.clone(),
            result.clone(),
            answer.clone(),
            result.clone(),
            answer.clone(),
            result.clone(),
        ];
        assert_eq!(compaction_cut(&m, 1), Some(Cut { at: 6, rounds: 2 }));
        assert_eq!(compaction_cut(&m, 2), Some(Cut { at: 4, rounds: 1 }));
        assert_eq!(compaction_cut(&m, 0), Some(Cut { at: 8, rounds: 3 }));
        assert_eq!(compaction_cut(&m, 3), None);
        assert_eq!(compaction_cut(&m[..1], 0), None);
    }

    #[tokio::test]
    async fn calls_of_one_response_run_in_order_and_each_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let all = vec!["read_file", "write_file", "edit_file", "list_files"];
        let toolbox = Toolbox::new(dir.path(), all, "builder", Limits::default()).unwrap();
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
            None,
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
