//! The cluster as an MCP server: the real Claude Code CLI, as a developer would run it with
//! `--mcp-config`, talks to the fake Messages API (the only fake), which asks for the
//! cluster's tools; the cluster runs the task it submits.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::claude_cli::claude_bin;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::{Cluster, Options, TOKEN};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `claude -p` with the cluster as its MCP server `orch` over streamable HTTP,
/// authenticated with `token`.
async fn claude_with_the_cluster(
    cluster: &Cluster,
    fake: &FakeAnthropic,
    home: &Path,
    token: &str,
) -> std::process::Output {
    let config = json!({"mcpServers": {"orch": {
        "type": "http",
        "url": format!("{}/v1/mcp", cluster.url),
        "headers": {"Authorization": format!("Bearer {token}")},
    }}});
    claude_with(config, fake, home).await
}

/// Runs `claude -p` with `config` as its MCP servers.
async fn claude_with(config: Value, fake: &FakeAnthropic, home: &Path) -> std::process::Output {
    let mut cmd = Command::new(claude_bin());
    cmd.args([
        "-p",
        "hand this to the cluster",
        "--output-format",
        "stream-json",
    ])
    .args(["--verbose", "--permission-mode", "bypassPermissions"])
    .args([
        "--model",
        "claude-sonnet-4-5",
        "--strict-mcp-config",
        "--mcp-config",
    ])
    .arg(config.to_string())
    .current_dir(home)
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("HOME", home)
    .env("ANTHROPIC_BASE_URL", &fake.url)
    .env("ANTHROPIC_API_KEY", "test-key")
    .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
    .env("DISABLE_TELEMETRY", "1")
    .env("DISABLE_AUTOUPDATER", "1")
    // Root may bypass permissions only in a sandbox (the tests run as root in CI).
    .env("IS_SANDBOX", "1")
    .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// The `tool_result` blocks Claude Code sent back to the model.
fn tool_results(fake: &FakeAnthropic) -> Vec<Value> {
    let mut found = Vec::new();
    for r in fake.message_requests() {
        for m in r.body["messages"].as_array().into_iter().flatten() {
            for block in m["content"].as_array().into_iter().flatten() {
                if block["type"] == "tool_result" && !found.contains(block) {
                    found.push(block.clone());
                }
            }
        }
    }
    found
}

/// The JSON a tool answered (its first text line: the CLI may add a note after it).
fn result_json(block: &Value) -> Value {
    let text = result_text(block);
    let first = text.lines().next().unwrap_or_default();
    serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn result_text(block: &Value) -> String {
    match &block["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_hands_a_task_to_the_cluster_and_reads_its_outcome() {
    let cluster = Cluster::start(Options::default()).await;
    cluster.wait_workers(2).await;
    let fake = FakeAnthropic::start_with_fallback(
        [
            Reply::tool_use(
                "mcp__orch__submit",
                json!({"prompt": "MCP-TASK: write the release notes", "roles": ["builder"],
                       "backend": "sim"}),
            ),
            Reply::text("Submitted; I will check on it."),
        ],
        Reply::text("done"),
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let out = claude_with_the_cluster(&cluster, &fake, home.path(), TOKEN).await;
    assert!(
        out.status.success(),
        "claude failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The cluster got the task and runs it to the end.
    let (_, list) = cluster.get("/v1/tasks?search=MCP-TASK").await;
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{list}\n{}", cluster.logs());
    let id = tasks[0]["id"].as_str().unwrap().to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(60)).await;
    assert_eq!(task.status.as_str(), "completed");
    // And Claude Code got the task's id back from the tool.
    let results = tool_results(&fake);
    assert_eq!(results.len(), 1, "{results:?}");
    assert_ne!(results[0]["is_error"], true, "{}", results[0]);
    let view = result_json(&results[0]);
    assert_eq!(view["task_id"], id.as_str());
    assert_eq!(view["agents"][0]["role"], "builder");

    // Its outcome, through the other tools.
    let agent = task.jobs[0].id.to_string();
    let fake = FakeAnthropic::start_with_fallback(
        [
            Reply::tool_uses([
                (
                    "mcp__orch__status",
                    json!({"task_id": id, "wait_seconds": 5}),
                ),
                ("mcp__orch__agent_result", json!({"agent_id": agent})),
            ]),
            Reply::text("It is done."),
        ],
        Reply::text("done"),
    )
    .await;
    let out = claude_with_the_cluster(&cluster, &fake, home.path(), TOKEN).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = tool_results(&fake);
    assert_eq!(results.len(), 2, "{results:?}");
    let status = result_json(&results[0]);
    assert_eq!(status["status"], "completed", "{status}");
    let result = result_json(&results[1]);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(
        result["output"],
        task.jobs[0].output.clone().unwrap().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_bad_tokens_are_refused_with_the_field_named() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    // Bad arguments: the tool call fails with the protocol's error, naming the field.
    let fake = FakeAnthropic::start_with_fallback(
        [
            Reply::tool_uses([
                ("mcp__orch__submit", json!({"prompt": "   "})),
                ("mcp__orch__agent_result", json!({"agent_id": "../status"})),
            ]),
            Reply::text("Both refused."),
        ],
        Reply::text("done"),
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let out = claude_with_the_cluster(&cluster, &fake, home.path(), TOKEN).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = tool_results(&fake);
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["is_error"], true, "{}", results[0]);
    assert!(
        result_text(&results[0]).contains("prompt: must not be empty"),
        "{}",
        results[0]
    );
    assert_eq!(results[1]["is_error"], true, "{}", results[1]);
    assert!(
        result_text(&results[1]).contains("agent_id:"),
        "{}",
        results[1]
    );
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0, "{list}");

    // A bad token: the endpoint answers 401 with the API's `{code, message}`.
    let r = cluster
        .http()
        .post(format!("{}/v1/mcp", cluster.url))
        .bearer_auth("wrong-token-abcdefghijklmnop")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchctl_mcp_serves_the_same_tools_over_stdio() {
    let cluster = Cluster::start(Options::default()).await;
    cluster.wait_workers(2).await;
    let fake = FakeAnthropic::start_with_fallback(
        [
            Reply::tool_use(
                "mcp__orch__submit",
                json!({"prompt": "STDIO-TASK: tidy the changelog", "roles": ["builder"],
                       "backend": "sim"}),
            ),
            Reply::text("Submitted."),
        ],
        Reply::text("done"),
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let config = json!({"mcpServers": {"orch": {
        "type": "stdio",
        "command": orch_tests::workspace_bin("orchctl").display().to_string(),
        "args": ["--server", cluster.url, "mcp"],
        "env": {"ORCH_TOKEN": TOKEN},
    }}});
    let out = claude_with(config, &fake, home.path()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = tool_results(&fake);
    assert_eq!(results.len(), 1, "{results:?}");
    let view = result_json(&results[0]);
    let id = view["task_id"].as_str().unwrap().to_string();
    let task = cluster.wait_task(&id, Duration::from_secs(60)).await;
    assert_eq!(task.prompt, "STDIO-TASK: tidy the changelog");
    assert_eq!(task.status.as_str(), "completed");
}

const ALPHA: &str = "alpha-token-0123456789abcdef";
const BETA: &str = "beta-token-0123456789abcdefg";

/// One MCP `tools/call` over streamable HTTP with `token`, as any MCP client sends it (the
/// endpoint is stateless: no session to open first). `Ok`: the tool's JSON answer; `Err`: the
/// protocol's error object, or the HTTP status and body when the endpoint refused the request.
async fn call_tool(
    cluster: &Cluster,
    token: &str,
    tool: &str,
    arguments: Value,
) -> Result<Value, Value> {
    let r = cluster
        .http()
        .post(format!("{}/v1/mcp", cluster.url))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                      "params": {"name": tool, "arguments": arguments}}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    if !status.is_success() {
        return Err(json!({"http_status": status.as_u16(), "body": body}));
    }
    if let Some(error) = body.get("error") {
        return Err(error.clone());
    }
    let result = &body["result"];
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    if result["isError"] == true {
        return Err(json!({"tool_error": text}));
    }
    Ok(serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {body}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_and_cancels_only_its_own_tasks_through_mcp() {
    // No workers: the tasks stay running until cancelled.
    let cluster = Cluster::start(Options {
        workers: 0,
        coordinator_args: vec![
            "--tenant".into(),
            format!("alpha={ALPHA}"),
            "--tenant".into(),
            format!("beta={BETA}"),
        ],
        ..Options::default()
    })
    .await;
    let submit = |token: &'static str, prompt: &'static str| {
        let cluster = &cluster;
        async move {
            call_tool(
                cluster,
                token,
                "submit",
                json!({"prompt": prompt, "roles": ["builder"]}),
            )
            .await
            .unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let a = submit(ALPHA, "alpha's task").await;
    let b = submit(BETA, "beta's task").await;

    // Each tenant lists only its own task.
    for (token, own) in [(ALPHA, &a), (BETA, &b)] {
        let list = call_tool(&cluster, token, "list_tasks", json!({}))
            .await
            .unwrap();
        let ids: Vec<&str> = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![own.as_str()], "{list}");
    }
    // Another tenant's task does not exist for alpha: neither its status nor a cancel.
    for tool in ["status", "cancel"] {
        let err = call_tool(&cluster, ALPHA, tool, json!({"task_id": b}))
            .await
            .unwrap_err();
        assert_eq!(err["data"]["code"], "not_found", "{tool}: {err}");
        assert_eq!(err["code"], -32602, "{tool}: {err}");
    }
    let (_, still) = cluster.get(&format!("/v1/tasks/{b}")).await;
    assert_eq!(still["status"], "running", "{still}");

    // Its own task alpha cancels.
    let cancelled = call_tool(&cluster, ALPHA, "cancel", json!({"task_id": a}))
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let (_, shown) = cluster.get(&format!("/v1/tasks/{a}")).await;
    assert_eq!(shown["status"], "cancelled", "{shown}");

    // A token no tenant has is refused before any tool runs, with the API's error body.
    let err = call_tool(
        &cluster,
        "gamma-token-0123456789abcde",
        "list_tasks",
        json!({}),
    )
    .await
    .unwrap_err();
    assert_eq!(err["http_status"], 401, "{err}");
    assert_eq!(err["body"]["code"], "unauthorized", "{err}");
}
