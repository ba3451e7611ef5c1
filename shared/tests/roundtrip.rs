//! Every protocol message round-trips through the codec, and the encoding of fixed sample
//! messages matches the golden bytes in `tests/golden/` (so an accidental wire change fails here).
//! Regenerate the golden files after a deliberate change with `UPDATE_GOLDEN=1 cargo test -p orch-shared`.

use orch_shared::api::{Job, JobError, JobStatus, Mode, Task, TaskStatus};
use orch_shared::codec::{self, DecodeError};
use orch_shared::event::{self as events, Event, EventBatch, EventKind, StepInfo};
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::job::{
    Backend, FailureReason, GitJob, GitOutcome, JobKind, JobResult, JobSpec, Limits, McpServer,
    Outcome, SessionPointer, SessionRef, SimParams, Usage, Workspace,
};
use orch_shared::role::Role;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn task_id() -> impl Strategy<Value = TaskId> {
    any::<u128>().prop_map(TaskId::from_u128)
}
fn job_id() -> impl Strategy<Value = JobId> {
    any::<u128>().prop_map(JobId::from_u128)
}
fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}
fn backend() -> impl Strategy<Value = Backend> {
    proptest::sample::select(vec![
        Backend::Sim,
        Backend::ClaudeCode,
        Backend::Anthropic,
        Backend::Openai,
        Backend::Command,
    ])
}
fn reason() -> impl Strategy<Value = FailureReason> {
    proptest::sample::select(vec![
        FailureReason::AgentError,
        FailureReason::RateLimited,
        FailureReason::Overloaded,
        FailureReason::Network,
        FailureReason::Timeout,
        FailureReason::Cancelled,
        FailureReason::BadRequest,
        FailureReason::BudgetExhausted,
        FailureReason::WorkerLost,
        FailureReason::Internal,
    ])
}
fn usage() -> impl Strategy<Value = Usage> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d)| Usage {
        input_tokens: a,
        output_tokens: b,
        cache_creation_tokens: c,
        cache_read_tokens: d,
    })
}
fn cost() -> impl Strategy<Value = f64> {
    0.0..1.0e6f64
}
fn workspace() -> impl Strategy<Value = Workspace> {
    prop_oneof![
        Just(Workspace::Scratch),
        ".*".prop_map(|path| Workspace::Local { path }),
        (
            ".*",
            ".*",
            proptest::option::of((
                ".*",
                proptest::collection::vec(".*", 0..3),
                any::<bool>(),
                proptest::collection::vec(".*", 0..3),
                proptest::option::of(any::<bool>())
            ))
        )
            .prop_map(|(url, base_ref, job)| Workspace::Git {
                url,
                base_ref,
                job: job.map(|(branch, start, integrate, paths, sparse)| GitJob {
                    branch,
                    start,
                    task_branch: "orch/t".into(),
                    integrate,
                    paths,
                    sparse,
                }),
            })
    ]
}
fn sim() -> impl Strategy<Value = SimParams> {
    (
        any::<u64>(),
        0.0..=1.0f64,
        any::<u32>(),
        proptest::option::of(reason()),
    )
        .prop_map(
            |(latency_ms, fail_rate, fail_first_attempts, fail_reason)| SimParams {
                latency_ms,
                fail_rate,
                fail_first_attempts,
                fail_reason,
            },
        )
}
fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Success),
        (reason(), ".*").prop_map(|(reason, message)| Outcome::Failure { reason, message })
    ]
}

prop_compose! {
    fn job_spec()(task_id in task_id(), job_id in job_id(), attempt in any::<u32>(), step in any::<u32>(),
                  role in role(), prompt in ".*", context in proptest::option::of(".*"),
                  backend in backend(), model in proptest::option::of("[a-z0-9.-]{1,20}"),
                  workspace in workspace(), timeout_ms in proptest::option::of(any::<u64>()),
                  max_turns in proptest::option::of(any::<u32>()), sim in sim()) -> JobSpec {
        JobSpec { task_id, job_id, attempt, step, role, prompt, context, backend, model, workspace,
                  limits: Limits { timeout_ms, max_turns }, kind: JobKind::Agent, constraints: vec!["keep it small".into()], sim,
                  session: (attempt % 2 == 0).then_some(SessionRef { from: job_id, fork: attempt % 4 == 0, checkpoint: (attempt % 8 == 0).then_some(step) }),
                  records_session: attempt % 3 == 0,
                  priority: [orch_shared::api::Priority::Low, orch_shared::api::Priority::Normal, orch_shared::api::Priority::High][(step % 3) as usize],
                  mcp_servers: if attempt % 2 == 0 { Default::default() } else { [
                      ("fs".to_string(), McpServer { command: Some("mcp-server-filesystem".into()), args: vec![".".into()], env: [("A".to_string(), "b".to_string())].into(), url: None, ..McpServer::default() }),
                      ("docs".to_string(), McpServer { url: Some("https://example.com/mcp".into()), headers: [("X-Team".to_string(), "core".to_string())].into(), bearer_token_env: Some("DOCS_TOKEN".into()), ..McpServer::default() }),
                  ].into() } }
    }
}

prop_compose! {
    fn job_result()(task_id in task_id(), job_id in job_id(), attempt in any::<u32>(), delivery in any::<u64>(),
                    worker in "[a-z0-9-]{1,30}", outcome in outcome(), output in ".*", usage in usage(),
                    prompt_bytes in proptest::collection::vec(any::<u8>(), 0..64),
                    cost_usd in cost(), files_read in proptest::collection::vec(".*", 0..4),
                    files_written in proptest::collection::vec(".*", 0..4),
                    started_at_ms in any::<u64>(), finished_at_ms in any::<u64>(), fence in any::<u64>()) -> JobResult {
        JobResult { task_id, job_id, attempt, delivery, worker_id: WorkerId(worker), outcome, output,
                    usage, cost_usd, files_read, files_written, started_at_ms, finished_at_ms, fence,
                    model: Some("m".into()), context_tokens: Some(1), context_window: None,
                    diff: Some("--- a\n+++ b\n".into()), git: None, session_id: Some("s".into()),
                    session: (attempt % 2 == 0).then(|| SessionPointer { backend: "sim".into(), session_id: None,
                        workspace: String::new(), turn: attempt, bytes: fence, saved_at_ms: started_at_ms,
                        inline: (fence % 2 == 0).then(|| prompt_bytes.clone()) }) }
    }
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (
            "[a-z]{1,10}",
            proptest::collection::vec((job_id(), role()), 0..5)
        )
            .prop_map(|(mode, steps)| EventKind::TaskCreated {
                mode,
                steps: steps
                    .into_iter()
                    .map(|(job_id, role)| StepInfo { job_id, role })
                    .collect()
            }),
        (role(), any::<u32>()).prop_map(|(role, step)| EventKind::JobQueued { role, step }),
        ("[a-z]{1,10}", any::<u32>(), proptest::option::of(".*")).prop_map(
            |(server, tools, error)| {
                EventKind::McpServer {
                    server,
                    tools,
                    withheld: tools / 2,
                    error,
                }
            }
        ),
        ".*".prop_map(|reason| EventKind::JobSkipped { reason }),
        (
            "[a-z0-9-]{1,20}",
            role(),
            "[a-z-]{1,12}",
            proptest::option::of("[a-z0-9-]{1,12}"),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(".*")
        )
            .prop_map(
                |(w, role, backend, model, delivery, started_at_us, sandbox)| {
                    EventKind::JobStarted {
                        worker_id: WorkerId(w),
                        role,
                        backend,
                        model,
                        delivery,
                        started_at_us,
                        sandbox,
                    }
                }
            ),
        Just(EventKind::Thinking),
        ".*".prop_map(|text| EventKind::Text { text }),
        (".*", ".*", ".*").prop_map(|(call_id, name, input)| EventKind::ToolCall {
            call_id,
            name,
            input
        }),
        (".*", ".*", any::<bool>()).prop_map(|(call_id, output, is_error)| {
            EventKind::ToolResult {
                call_id,
                output,
                is_error,
            }
        }),
        (usage(), cost()).prop_map(|(usage, cost_usd)| EventKind::Usage { usage, cost_usd }),
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u32>()
        )
            .prop_map(
                |(tokens_before, tokens_after, rounds)| EventKind::Compacted {
                    tokens_before,
                    tokens_after,
                    rounds
                }
            ),
        Just(EventKind::Heartbeat),
        (any::<u32>(), any::<u32>(), usage(), any::<u64>()).prop_map(
            |(step, files_changed, usage, took_ms)| EventKind::Checkpointed {
                step,
                files_changed,
                usage,
                took_ms,
            }
        ),
        (any::<u32>(), any::<u32>(), ".*", usage(), cost()).prop_map(
            |(from_attempt, from_step, from_worker, usage, cost_usd)| EventKind::Resumed {
                from_attempt,
                from_step,
                from_agent: (from_step % 2 == 0)
                    .then(|| JobId::from_u128(u128::from(from_attempt))),
                from_worker,
                usage,
                cost_usd,
                files_not_restored: (from_step % 3 == 0).then(|| "a local directory".to_string()),
            }
        ),
        ".*".prop_map(|reason| EventKind::ResumeFailed { reason }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(step, tree_bytes, bound_bytes)| {
            EventKind::CheckpointSkipped {
                step,
                tree_bytes,
                bound_bytes,
            }
        }),
        (any::<u64>(), ".*", any::<bool>()).prop_map(|(number, url, draft)| EventKind::PrOpened {
            number,
            url,
            draft
        }),
        any::<u64>().prop_map(|number| EventKind::PrReady { number }),
        ".*".prop_map(|reason| EventKind::PrFailed { reason }),
        (any::<u32>(), ".*", any::<u32>()).prop_map(|(round, head, comments)| {
            EventKind::PrReviewed {
                round,
                head,
                comments,
                agents: vec![JobId::from_u128(7)],
            }
        }),
        ".*".prop_map(|reason| EventKind::PrEscalated { reason }),
        (
            any::<bool>(),
            proptest::option::of(reason()),
            proptest::option::of(".*"),
            usage(),
            cost(),
            any::<u64>()
        )
            .prop_map(|(success, reason, message, usage, cost_usd, duration_ms)| {
                EventKind::JobFinished {
                    success,
                    reason,
                    message,
                    usage,
                    cost_usd,
                    duration_ms,
                }
            }),
        ("[a-z]{1,10}", usage(), cost(), any::<u64>(), any::<bool>()).prop_map(
            |(status, usage, cost_usd, duration_ms, pr_pending)| EventKind::TaskFinished {
                status,
                usage,
                cost_usd,
                duration_ms,
                pr_pending,
            }
        ),
    ]
}

prop_compose! {
    fn event()(task_id in task_id(), job_id in proptest::option::of(job_id()), attempt in any::<u32>(),
               at_ms in any::<u64>(), kind in event_kind()) -> Event {
        Event { task_id, job_id, attempt, at_ms, kind }
    }
}

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let bytes = codec::encode(msg);
    let back: T = codec::decode(&bytes).expect("decodes what it encoded");
    assert_eq!(&back, msg);
}

proptest! {
    #[test]
    fn job_spec_roundtrips(spec in job_spec()) { roundtrip(&spec); }

    #[test]
    fn job_result_roundtrips(result in job_result()) { roundtrip(&result); }

    #[test]
    fn event_roundtrips(event in event()) { roundtrip(&event); }

    /// Whatever events are packed, readers get exactly them back, in order.
    #[test]
    fn packed_events_read_back_in_order(list in proptest::collection::vec(event(), 0..80)) {
        let read: Vec<Event> = events::pack(&list)
            .iter()
            .flat_map(|m| {
                let kind = m.subject.rsplit('.').next().unwrap();
                events::decode_message(kind, &m.payload).unwrap()
            })
            .collect();
        prop_assert_eq!(read, list);
    }

    #[test]
    fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = codec::decode::<JobSpec>(&bytes);
        let _ = codec::decode::<JobResult>(&bytes);
        let _ = codec::decode::<Event>(&bytes);
        let _ = events::decode_message("batch", &bytes);
    }
}

#[test]
fn decode_rejects_other_versions_and_empty_input() {
    let mut bytes = codec::encode(&sample_spec());
    bytes[0] = 9;
    assert!(matches!(
        codec::decode::<JobSpec>(&bytes),
        Err(DecodeError::Version(9))
    ));
    assert!(matches!(
        codec::decode::<JobSpec>(&[]),
        Err(DecodeError::Empty)
    ));
}

fn sample_spec() -> JobSpec {
    JobSpec {
        task_id: TaskId::from_u128(0x0192_f0c4_6f1e_7cc2_9b1a_3f5c_2d1e_0a9b),
        job_id: JobId::from_u128(0x0192_f0c4_6f1f_7cc2_9b1a_3f5c_2d1e_0a9c),
        attempt: 1,
        step: 2,
        role: Role::Builder,
        prompt: "Implement the fix following the plan: add a login form".into(),
        context: Some("## Summary\nplanned".into()),
        backend: Backend::Sim,
        model: Some("sim-1".into()),
        workspace: Workspace::Local {
            path: "/srv/repo".into(),
        },
        limits: Limits {
            timeout_ms: Some(600_000),
            max_turns: Some(30),
        },
        kind: JobKind::Plan,
        constraints: vec!["no new dependencies".into()],
        sim: SimParams {
            latency_ms: 250,
            fail_rate: 0.125,
            fail_first_attempts: 1,
            fail_reason: Some(FailureReason::Overloaded),
        },
        session: Some(SessionRef {
            from: JobId::from_u128(0x0192_f0c4_6f1f_7cc2_9b1a_3f5c_2d1e_0a9d),
            fork: true,
            checkpoint: None,
        }),
        records_session: true,
        priority: orch_shared::api::Priority::Normal,
        mcp_servers: Default::default(),
    }
}

fn sample_result() -> JobResult {
    let spec = sample_spec();
    JobResult {
        task_id: spec.task_id,
        job_id: spec.job_id,
        attempt: 1,
        delivery: 2,
        worker_id: WorkerId("host-1234-ab12".into()),
        outcome: Outcome::Failure {
            reason: FailureReason::RateLimited,
            message: "429 from provider".into(),
        },
        output: "## Summary\nsimulated".into(),
        usage: Usage {
            input_tokens: 1200,
            output_tokens: 340,
            cache_creation_tokens: 5,
            cache_read_tokens: 9000,
        },
        cost_usd: 0.012_345,
        files_read: vec!["src/lib.rs".into()],
        files_written: vec!["src/login.rs".into()],
        started_at_ms: 1_764_000_000_000,
        finished_at_ms: 1_764_000_001_500,
        fence: 3,
        model: Some("claude-haiku-4-5".into()),
        context_tokens: Some(1200),
        context_window: Some(200_000),
        diff: Some(
            "--- a/src/login.rs\n+++ b/src/login.rs\n@@ -0,0 +1 @@\n+fn login() {}\n".into(),
        ),
        git: Some(GitOutcome {
            branch: "orch/jobs/t/03-builder".into(),
            commit: "0123abcd".into(),
            base: "fedc3210".into(),
            merged: false,
            conflicts: vec!["src/login.rs".into()],
        }),
        session_id: Some("9f1c2d3e-0000-4000-8000-000000000001".into()),
        session: Some(SessionPointer {
            backend: "claude-code".into(),
            session_id: Some("9f1c2d3e-0000-4000-8000-000000000001".into()),
            workspace: "/data/scratch/x-1".into(),
            turn: 2,
            bytes: 17,
            saved_at_ms: 1_764_000_001_400,
            inline: Some(b"{\"type\":\"user\"}\n".to_vec()),
        }),
    }
}

fn sample_events() -> Vec<Event> {
    let spec = sample_spec();
    let at = |kind| Event {
        task_id: spec.task_id,
        job_id: Some(spec.job_id),
        attempt: 1,
        at_ms: 1_764_000_000_000,
        kind,
    };
    vec![
        at(EventKind::TaskCreated {
            mode: "sequential".into(),
            steps: vec![StepInfo {
                job_id: spec.job_id,
                role: Role::Analyst,
            }],
        }),
        at(EventKind::JobStarted {
            worker_id: WorkerId("w1".into()),
            role: Role::Builder,
            backend: "sim".into(),
            model: None,
            delivery: 1,
            started_at_us: 1_764_000_000_123_456,
            sandbox: None,
        }),
        at(EventKind::ToolCall {
            call_id: "c1".into(),
            name: "Read".into(),
            input: "{\"file_path\":\"a.rs\"}".into(),
        }),
        at(EventKind::JobFinished {
            success: true,
            reason: None,
            message: None,
            usage: sample_result().usage,
            cost_usd: 0.5,
            duration_ms: 1500,
        }),
    ]
}

fn sample_task() -> Task {
    let spec = sample_spec();
    Task {
        id: spec.task_id,
        prompt: "add a login form".into(),
        task_type: "auto".into(),
        plan_source: "auto".into(),
        mode: Mode::Sequential,
        status: TaskStatus::Failed,
        backend: Backend::Sim,
        model: None,
        backends: Default::default(),
        models: Default::default(),
        workspace: Workspace::Scratch,
        sim: spec.sim.clone(),
        idempotency_key: Some("k1".into()),
        tenant: Some("alpha".into()),
        options: Default::default(),
        plan: Default::default(),
        created_at_ms: 1_764_000_000_000,
        finished_at_ms: Some(1_764_000_002_000),
        mcp_servers: Default::default(),
        jobs: vec![Job {
            id: spec.job_id,
            step: 0,
            role: Role::Builder,
            kind: JobKind::Agent,
            status: JobStatus::Failed,
            attempt: 1,
            prompt: spec.prompt.clone(),
            depends_on: vec![0],
            constraints: vec![],
            estimated_tokens: Some(1000),
            retry_at_ms: None,
            context: None,
            worker_id: Some(WorkerId("w1".into())),
            sandbox: None,
            queued_at_ms: Some(1),
            started_at_ms: Some(2),
            finished_at_ms: Some(3),
            usage: sample_result().usage,
            cost_usd: 0.25,
            output: Some("out".into()),
            error: Some(JobError {
                reason: FailureReason::AgentError,
                message: "is_error".into(),
            }),
            files_read: vec![],
            files_written: vec!["a.rs".into()],
            model: Some("claude-sonnet-4-5".into()),
            context_tokens: Some(52_000),
            context_window: Some(200_000),
            continues: Some(JobId::from_u128(7)),
            forked: true,
            rewound_to: None,
            paths: vec![],
            changed_paths: vec![],
            held_by: None,
            session_id: Some("sid".into()),
            diff: None,
            git: None,
            parked: Some(orch_shared::api::Parked {
                reason: "approval".into(),
                credential: None,
                until_ms: 1_700_000_000_000,
                approval: Some("0123456789abcdef".into()),
            }),
        }],
        usage: sample_result().usage,
        cost_usd: 0.25,
        output: None,
        error: Some("step 1 (builder) failed".into()),
        branch: Some("orch/t".into()),
        check: None,
        pr: None,
        conflicts: vec![],
        // Optional and skipped when absent: the golden record of older versions still decodes.
        trace_id: None,
        traceparent: None,
    }
}

fn check_golden(name: &str, bytes: &[u8]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.hex"));
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &hex)
            .unwrap_or_else(|e| panic!("cannot write golden file {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("missing golden file {}: {e}", path.display()));
    assert_eq!(
        hex.trim(),
        expected.trim(),
        "the wire encoding of {name} changed; if deliberate, bump codec::VERSION or regenerate with UPDATE_GOLDEN=1"
    );
}

#[test]
fn golden_job_spec() {
    check_golden("job_spec", &codec::encode(&sample_spec()));
}

#[test]
fn golden_job_result() {
    check_golden("job_result", &codec::encode(&sample_result()));
}

#[test]
fn golden_events() {
    for (i, e) in sample_events().iter().enumerate() {
        check_golden(&format!("event_{i}"), &codec::encode(e));
        roundtrip(e);
    }
}

/// The bytes of a fixture in `tests/golden/compat/`: a message as an older build wrote it.
fn compat_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/golden/compat/{name}.hex"));
    let hex = std::fs::read_to_string(&path).expect("compat fixture");
    (0..hex.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A spec and a result from before sessions were recorded by the coordinator decode: the
/// spec does not ask for the pointer in the result (the worker writes it), the result has none.
#[test]
fn spec_and_result_without_session_recording_decode() {
    let spec: JobSpec = codec::decode(&compat_fixture("job_spec_v0")).expect("old spec decodes");
    assert!(!spec.records_session);
    assert_eq!(
        spec,
        JobSpec {
            records_session: false,
            ..sample_spec()
        }
    );
    let result: JobResult =
        codec::decode(&compat_fixture("job_result_v0")).expect("old result decodes");
    assert_eq!(
        result,
        JobResult {
            session: None,
            ..sample_result()
        }
    );
}

/// A `job_started` from a worker that predates `started_at_us` still decodes (as 0).
#[test]
fn job_started_without_start_time_decodes() {
    let bytes = compat_fixture("job_started_v0");
    let event: Event = codec::decode(&bytes).expect("old job_started decodes");
    let EventKind::JobStarted {
        started_at_us,
        delivery,
        ..
    } = event.kind
    else {
        panic!("expected job_started, got {:?}", event.kind);
    };
    assert_eq!((started_at_us, delivery), (0, 1));
}

#[test]
fn golden_event_batch() {
    let batch = EventBatch {
        events: sample_events().into_iter().take(3).collect(),
        task: None,
    };
    check_golden("event_batch", &codec::encode(&batch));
    roundtrip(&batch);
}

#[test]
fn golden_task_record() {
    let task = sample_task();
    roundtrip(&task);
    check_golden("task", &codec::encode(&task));
}

/// A task's creation message: its leading batchable events and its record; `job_started`
/// (not batchable) stays out, and only a run that starts with the task's `task_created` is
/// packed.
#[test]
fn golden_created_batch() {
    let task = sample_task();
    let log = sample_events();
    let (message, taken) = events::pack_created(&task, &log).expect("a creation message");
    assert_eq!(taken, 1, "job_started is not batchable");
    assert_eq!(message.subject, format!("orch.events.{}.created", task.id));
    check_golden("event_created", &message.payload);
    let batch: EventBatch = codec::decode(&message.payload).unwrap();
    assert_eq!(batch.task.as_deref(), Some(&task));
    assert_eq!(
        events::decode_message("created", &message.payload).unwrap(),
        log[..1].to_vec()
    );
    assert!(events::pack_created(&task, &log[1..]).is_none());
    // A reader older than the record field reads the events and skips the record.
    #[derive(serde::Deserialize)]
    struct OldBatch {
        events: Vec<Event>,
    }
    let old: OldBatch = codec::decode(&message.payload).unwrap();
    assert_eq!(old.events, log[..1].to_vec());
}
