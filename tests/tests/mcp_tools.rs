//! MCP tools in the native tool loop (the coordinator's own MCP server is tested in
//! `mcp.rs`): real MCP servers nobody here wrote (the reference filesystem server from npm
//! over stdio, and the reference "everything" server over streamable HTTP, see
//! `orch_tests::mcp_server`) declared for a role in the worker's configuration or by the
//! task, started or reached by the worker through `rmcp`'s client, and called by a fake model
//! API that scripts the tool calls. Its tools are offered next to the built-in ones under the role's
//! rules; a server that cannot start fails the job, not hangs it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::event::EventKind;
use orch_shared::ids::{JobId, TaskId};
use orch_shared::job::{Backend, FailureReason, JobSpec, McpServer, Outcome, Workspace};
use orch_shared::role::Role;
use orch_tests::agents::{run, worker_config};
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_openai::{self, FakeOpenAi};
use orch_tests::mcp_server::{EverythingServer, filesystem_server};
use orch_tests::{Cluster, Options, assert_completed};
use orch_worker::agent::backends::Backends;
use orch_worker::config::Config;
use orch_worker::roles::{Override, Roles};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The filesystem server serving the job's workspace (its working directory).
fn files_server() -> McpServer {
    McpServer {
        command: Some(filesystem_server().display().to_string()),
        args: vec![".".into()],
        ..McpServer::default()
    }
}

/// A worker config talking to the fakes given, with `[roles.<role>]` tables from `roles`.
fn config(data: &Path, anthropic: Option<&str>, openai: Option<&str>, roles: Value) -> Config {
    let mut cfg = worker_config("mcp-test", data, anthropic, openai, &[]);
    cfg.backends.openai.models.default = Some("gpt-4.1".into());
    let overrides: BTreeMap<String, Override> = serde_json::from_value(roles).unwrap();
    cfg.roles = Roles::with_overrides(&overrides).unwrap();
    cfg
}

fn job(role: Role, backend: Backend, dir: &Path) -> JobSpec {
    JobSpec {
        backend,
        workspace: Workspace::Local {
            path: dir.display().to_string(),
        },
        ..JobSpec::new(TaskId::new(), JobId::new(), role, "Do the task")
    }
}

/// The names of the tools a request offered.
fn offered(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|t| {
                    t.get("name")
                        .or_else(|| t.pointer("/function/name"))
                        .and_then(Value::as_str)
                        .unwrap()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(server, tools, withheld, error)` of every `mcp_server` event.
fn mcp_events(events: &[EventKind]) -> Vec<(String, u32, u32, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            EventKind::McpServer {
                server,
                tools,
                withheld,
                error,
            } => Some((server.clone(), *tools, *withheld, error.clone())),
            _ => None,
        })
        .collect()
}

/// `(content, is_error)` of the tool results the last message of an Anthropic request holds.
fn anthropic_results(body: &Value) -> Vec<(String, bool)> {
    let last = body["messages"].as_array().unwrap().last().unwrap();
    last["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["content"].as_str().unwrap().to_string(),
                b["is_error"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_builder_reads_and_writes_through_a_role_s_mcp_server() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("notes.txt"), "hello from the workspace\n").unwrap();
    // A file longer than a tool result may be.
    std::fs::write(work.path().join("big.txt"), "x".repeat(5_000)).unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_uses([
            ("mcp__files__read_text_file", json!({"path": "notes.txt"})),
            ("mcp__files__read_text_file", json!({"path": "big.txt"})),
        ]),
        Reply::tool_use(
            "mcp__files__write_file",
            json!({"path": "out.txt", "content": "written through MCP\n"}),
        ),
        Reply::text("Done."),
    ])
    .await;
    let roles = json!({"builder": {"mcp_servers": {"files": {
        "command": filesystem_server(), "args": ["."]}}}});
    let mut cfg = config(data.path(), Some(&fake.url), None, roles);
    cfg.tool_loop.max_result_bytes = 1_024;
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(
        &backends,
        &job(Role::Builder, Backend::Anthropic, work.path()),
    )
    .await;
    assert!(r.output.outcome.is_success(), "{r:#?}\n{events:#?}");

    // The server's tools are offered next to the built-in ones, named after their server.
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 3);
    let tools = offered(&reqs[0].body);
    for t in [
        "bash",
        "write_file",
        "mcp__files__read_text_file",
        "mcp__files__write_file",
        "mcp__files__list_directory",
    ] {
        assert!(tools.contains(&t.to_string()), "{t} not in {tools:?}");
    }
    let started = mcp_events(&events);
    assert_eq!(started.len(), 1, "{started:?}");
    let (server, n, withheld, error) = &started[0];
    assert_eq!((server.as_str(), *withheld, error), ("files", 0, &None));
    assert_eq!(
        *n as usize,
        tools.iter().filter(|t| t.starts_with("mcp__")).count()
    );

    // The server read the workspace; a long result is cut with a note, like a built-in's.
    let results = anthropic_results(&reqs[1].body);
    assert_eq!(results.len(), 2);
    assert_eq!(results[0], ("hello from the workspace\n".into(), false));
    assert!(!results[1].1);
    assert!(
        results[1].0.ends_with("more bytes]") && results[1].0.contains("[truncated: "),
        "{}",
        results[1].0
    );
    assert!(results[1].0.len() < 1_100, "{}", results[1].0.len());
    // What it wrote is in the workspace.
    assert!(!anthropic_results(&reqs[2].body)[0].1);
    assert_eq!(
        std::fs::read_to_string(work.path().join("out.txt")).unwrap(),
        "written through MCP\n"
    );
}

#[tokio::test]
async fn a_read_only_role_gets_only_the_mcp_tools_its_rules_allow() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "a").unwrap();
    let servers: BTreeMap<String, McpServer> = [("files".to_string(), files_server())].into();

    // A reviewer by default: the task's server is not even started.
    let fake = FakeOpenAi::start([fake_openai::Reply::text("Looks fine.")]).await;
    let cfg = config(data.path(), None, Some(&fake.url), json!({}));
    let backends = Backends::from_config(&cfg);
    let reviewer = JobSpec {
        mcp_servers: servers.clone(),
        ..job(Role::Reviewer, Backend::Openai, work.path())
    };
    let (r, events) = run(&backends, &reviewer).await;
    assert!(r.output.outcome.is_success(), "{r:#?}");
    assert!(mcp_events(&events).is_empty(), "{events:#?}");
    let tools = offered(&fake.requests()[0].body);
    assert!(tools.iter().all(|t| !t.starts_with("mcp__")), "{tools:?}");

    // Allowed one tool of it by its role's rules: that tool is offered, the others are
    // withheld, and a call to one of those is refused and makes the job need attention.
    let fake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([
            ("mcp__files__list_directory", json!({"path": "."})),
            (
                "mcp__files__write_file",
                json!({"path": "b.txt", "content": "no"}),
            ),
        ]),
        fake_openai::Reply::text("Reviewed."),
    ])
    .await;
    let roles = json!({"reviewer": {"allowed_tools": ["Read", "Glob", "Grep", "LS", "mcp__files__list_directory"]}});
    let cfg = config(data.path(), None, Some(&fake.url), roles);
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(&backends, &reviewer).await;
    let tools = offered(&fake.requests()[0].body);
    let mcp: Vec<&String> = tools.iter().filter(|t| t.starts_with("mcp__")).collect();
    assert_eq!(mcp, ["mcp__files__list_directory"]);
    let started = mcp_events(&events);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].1, 1);
    assert!(started[0].2 > 5, "{started:?}");
    let results: Vec<String> = fake.requests()[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert!(results[0].contains("[FILE] a.txt"), "{results:?}");
    assert!(
        results[1].contains("not allowed for the reviewer role"),
        "{results:?}"
    );
    assert!(!work.path().join("b.txt").exists());
    assert!(
        matches!(&r.output.outcome, Outcome::Failure { reason: FailureReason::NeedsAttention, message } if message.contains("mcp__files__write_file")),
        "{:?}",
        r.output.outcome
    );
}

#[tokio::test]
async fn a_server_that_cannot_start_fails_the_job_with_its_reason() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([Reply::text("never asked")]).await;
    let mut cfg = config(data.path(), Some(&fake.url), None, json!({}));
    cfg.tool_loop.mcp_start_timeout = Duration::from_secs(2);
    let backends = Backends::from_config(&cfg);
    let with = |name: &str, server: McpServer| JobSpec {
        mcp_servers: [(name.to_string(), server)].into(),
        ..job(Role::Builder, Backend::Anthropic, work.path())
    };
    let cases = [
        (
            "gone",
            McpServer {
                command: Some("/nonexistent/mcp-server".into()),
                ..McpServer::default()
            },
            "failed to start",
        ),
        (
            "crashes",
            McpServer {
                command: Some("sh".into()),
                args: vec!["-c".into(), "echo no such config >&2; exit 3".into()],
                ..McpServer::default()
            },
            "its stderr ends: no such config",
        ),
        // A program that never speaks MCP: the job fails after the start timeout.
        (
            "silent",
            McpServer {
                command: Some("sleep".into()),
                args: vec!["600".into()],
                ..McpServer::default()
            },
            "within 2s",
        ),
    ];
    for (name, server, says) in cases {
        let started = Instant::now();
        let (r, events) = run(&backends, &with(name, server)).await;
        assert!(started.elapsed() < Duration::from_secs(30));
        match &r.output.outcome {
            Outcome::Failure { reason, message } => {
                assert_eq!(*reason, FailureReason::BadRequest);
                assert!(
                    message.contains(&format!("MCP server `{name}`")) && message.contains(says),
                    "{name}: {message}"
                );
            }
            o => panic!("{name}: expected a failure, got {o:?}"),
        }
        let e = mcp_events(&events);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, name);
        assert!(e[0].3.as_deref().unwrap().contains(says), "{e:?}");
    }
    assert_eq!(fake.message_requests().len(), 0);
}

/// Through the whole cluster: a task declares a server (the filesystem server, given the whole
/// filesystem); the worker runs it in the job's sandbox, where the workspace is and the
/// worker's data directory is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_s_mcp_server_runs_in_the_job_s_sandbox() {
    let data = tempfile::tempdir().unwrap();
    let secret = data.path().join("secret.toml");
    std::fs::write(&secret, "token = \"data-dir-secret\"\n").unwrap();
    let ws = tempfile::tempdir().unwrap();
    let notes = ws.path().join("notes.txt");
    std::fs::write(&notes, "in the workspace\n").unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_uses([
            ("mcp__files__read_text_file", json!({"path": notes})),
            ("mcp__files__read_text_file", json!({"path": secret})),
        ]),
        Reply::text("## Summary\nRead."),
    ])
    .await;
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-mcp".into()),
        ],
        worker_args: vec!["--data-dir".into(), data.path().display().to_string()],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "read the notes", "roles": ["builder"], "backend": "anthropic",
            "model": "claude-sonnet-4-5", "workspace": ws.path().display().to_string(),
            "max_attempts": 1,
            "mcp_servers": {"files": {"command": filesystem_server(), "args": ["/"]}},
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(90))
        .await;
    assert_completed(&cluster, &task);
    assert_eq!(
        task.mcp_servers["files"].command.as_deref(),
        Some(filesystem_server().display().to_string().as_str())
    );
    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    let results = anthropic_results(&reqs[1].body);
    assert_eq!(results[0], ("in the workspace\n".into(), false));
    assert!(results[1].1, "{results:?}");
    assert!(!results[1].0.contains("data-dir-secret"), "{results:?}");
    // The job's events say what the server offered.
    let events = cluster.events(&task.id.to_string(), None).await;
    assert!(
        events.iter().any(|(_, e)| matches!(&e.kind,
            EventKind::McpServer { server, tools, error: None, .. } if server == "files" && *tools > 5)),
        "{events:#?}"
    );
}

/// A streamable HTTP server declared for a role: its tools are offered next to the built-in
/// ones and what it answered over HTTP reaches the model.
#[tokio::test]
async fn a_builder_calls_a_streamable_http_server_s_tools() {
    let server = EverythingServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_uses([
            (
                "mcp__everything__echo",
                json!({"message": "hello over HTTP"}),
            ),
            ("mcp__everything__get-sum", json!({"a": 2, "b": 3})),
        ]),
        Reply::text("Done."),
    ])
    .await;
    let roles = json!({"builder": {"mcp_servers": {"everything": {
        "url": server.url, "headers": {"X-Team": "core"}}}}});
    let cfg = config(data.path(), Some(&fake.url), None, roles);
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(
        &backends,
        &job(Role::Builder, Backend::Anthropic, work.path()),
    )
    .await;
    assert!(
        r.output.outcome.is_success(),
        "{r:#?}\n{events:#?}\n{}",
        server.log()
    );

    let reqs = fake.message_requests();
    assert_eq!(reqs.len(), 2);
    let tools = offered(&reqs[0].body);
    for t in ["bash", "mcp__everything__echo", "mcp__everything__get-sum"] {
        assert!(tools.contains(&t.to_string()), "{t} not in {tools:?}");
    }
    let started = mcp_events(&events);
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0].0, "everything");
    assert!(started[0].1 >= 5, "{started:?}");
    assert_eq!(started[0].3, None);
    // The server's answers, as the model got them.
    assert_eq!(
        anthropic_results(&reqs[1].body),
        [
            ("Echo: hello over HTTP".to_string(), false),
            ("The sum of 2 and 3 is 5.".to_string(), false),
        ]
    );
}

/// A task's own HTTP server must be on a host the role's agents may reach, and may not read
/// a bearer token from the worker's environment; allowed, it works like a role's.
#[tokio::test]
async fn a_task_s_http_server_is_held_to_the_role_s_allowed_hosts() {
    let server = EverythingServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let declared = |s: McpServer| JobSpec {
        mcp_servers: [("everything".to_string(), s)].into(),
        ..job(Role::Builder, Backend::Openai, work.path())
    };
    let http = McpServer {
        url: Some(server.url.clone()),
        ..McpServer::default()
    };

    // The default builder may reach the package registries, not this server.
    let fake = FakeOpenAi::start([fake_openai::Reply::text("never asked")]).await;
    let cfg = config(data.path(), None, Some(&fake.url), json!({}));
    let (r, events) = run(&Backends::from_config(&cfg), &declared(http.clone())).await;
    match &r.output.outcome {
        Outcome::Failure { reason, message } => {
            assert_eq!(*reason, FailureReason::BadRequest);
            assert!(
                message.contains("MCP server `everything` url:")
                    && message.contains(&format!("127.0.0.1:{}", server.port))
                    && message.contains("allowed_hosts"),
                "{message}"
            );
        }
        o => panic!("expected a failure, got {o:?}"),
    }
    assert_eq!(mcp_events(&events).len(), 1);
    assert!(fake.requests().is_empty());

    // Allowed: the tool is called over HTTP.
    let fake = FakeOpenAi::start([
        fake_openai::Reply::tool_calls([(
            "mcp__everything__echo",
            json!({"message": "from a task's server"}),
        )]),
        fake_openai::Reply::text("Done."),
    ])
    .await;
    let roles = json!({"builder": {"allowed_hosts": [format!("127.0.0.1:{}", server.port)]}});
    let cfg = config(data.path(), None, Some(&fake.url), roles);
    let backends = Backends::from_config(&cfg);
    let (r, events) = run(&backends, &declared(http.clone())).await;
    assert!(
        r.output.outcome.is_success(),
        "{r:#?}\n{events:#?}\n{}",
        server.log()
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let results: Vec<String> = reqs[1].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(results, ["Echo: from a task's server"]);

    // A task naming a variable of the worker's environment for its token is refused.
    let (r, _) = run(
        &backends,
        &declared(McpServer {
            bearer_token_env: Some("PATH".into()),
            ..http
        }),
    )
    .await;
    assert!(
        matches!(&r.output.outcome, Outcome::Failure { reason: FailureReason::BadRequest, message }
            if message.contains("bearer_token_env")),
        "{:?}",
        r.output.outcome
    );
}
