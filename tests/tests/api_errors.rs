//! Bad input gets a clear 4xx `{code, message}` naming the field, and leaves nothing behind.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::{Cluster, Options, TOKEN};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn raw_post(
    cluster: &Cluster,
    body: impl Into<reqwest::Body>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = cluster
        .http()
        .post(format!("{}/v1/tasks", cluster.url))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str, field: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(field),
        "message `{message}` does not name `{field}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submits_are_refused_with_the_field_named_and_nothing_stored() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "empty prompt",
            json!({"prompt": "  "}).to_string(),
            "invalid_field",
            "prompt:",
        ),
        (
            "missing prompt",
            json!({"mode": "parallel"}).to_string(),
            "invalid_field",
            "body: missing field `prompt`",
        ),
        (
            "unknown task type",
            json!({"prompt": "x", "task_type": "astrology"}).to_string(),
            "invalid_field",
            "task_type:",
        ),
        (
            "wrong type",
            json!({"prompt": ["x"]}).to_string(),
            "invalid_field",
            "prompt:",
        ),
        (
            "bad mode",
            json!({"prompt": "x", "mode": "sideways"}).to_string(),
            "invalid_field",
            "mode:",
        ),
        (
            "bad role",
            json!({"prompt": "x", "roles": ["scout"]}).to_string(),
            "invalid_field",
            "roles[0]:",
        ),
        (
            "a backend for an unknown role",
            json!({"prompt": "x", "backends": {"scout": "openai"}}).to_string(),
            "invalid_field",
            "backends",
        ),
        (
            "an unknown backend for a role",
            json!({"prompt": "x", "backends": {"builder": "gpt"}}).to_string(),
            "invalid_field",
            "backends",
        ),
        (
            "an empty model for a role",
            json!({"prompt": "x", "models": {"builder": " "}}).to_string(),
            "invalid_field",
            "models.builder:",
        ),
        (
            "no roles",
            json!({"prompt": "x", "roles": []}).to_string(),
            "invalid_field",
            "roles:",
        ),
        (
            "fail rate",
            json!({"prompt": "x", "sim": {"fail_rate": 1.5}}).to_string(),
            "invalid_field",
            "sim.fail_rate:",
        ),
        (
            "relative workspace",
            json!({"prompt": "x", "workspace": "src"}).to_string(),
            "invalid_field",
            "workspace:",
        ),
        (
            "workspace and repo",
            json!({"prompt": "x", "workspace": "/srv", "repo": "/srv/r.git"}).to_string(),
            "invalid_field",
            "repo:",
        ),
        (
            "ref without repo",
            json!({"prompt": "x", "ref": "main"}).to_string(),
            "invalid_field",
            "ref:",
        ),
        (
            "repo that is not a URL or path",
            json!({"prompt": "x", "repo": "my repo"}).to_string(),
            "invalid_field",
            "repo:",
        ),
        (
            "repo read as an option",
            json!({"prompt": "x", "repo": "--upload-pack=evil"}).to_string(),
            "invalid_field",
            "repo:",
        ),
        (
            "bad ref",
            json!({"prompt": "x", "repo": "/srv/r.git", "ref": "main..dev"}).to_string(),
            "invalid_field",
            "ref:",
        ),
        (
            "unknown field",
            json!({"prompt": "x", "colour": 3}).to_string(),
            "invalid_field",
            "colour: unknown field `colour`",
        ),
        (
            "wrong kind for an enum",
            json!({"prompt": "x", "priority": 3}).to_string(),
            "invalid_field",
            "priority:",
        ),
        (
            "malformed",
            "{\"prompt\": ".to_string(),
            "malformed_body",
            "body:",
        ),
        (
            "not an object",
            "[1, 2]".to_string(),
            "invalid_field",
            "body:",
        ),
    ];
    for (name, body, code, field) in cases {
        let (status, v) = raw_post(&cluster, body, Some(TOKEN)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {v}");
        assert_error(status, &v, StatusCode::BAD_REQUEST, code, field);
    }
    // The server answers 413 without reading the whole body and closes the connection, so the
    // oversized request goes on a connection of its own.
    let big = json!({"prompt": "x".repeat(2 * 1024 * 1024)}).to_string();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/tasks", cluster.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_error(
        status,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "body:",
    );
    // Nothing was half-written.
    let (_, list) = cluster.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_compared_and_health_is_open() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let body = json!({"prompt": "x"}).to_string();
    let (status, v) = raw_post(&cluster, body.clone(), None).await;
    assert_error(
        status,
        &v,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing bearer token",
    );
    let (status, v) = raw_post(&cluster, body, Some("test-token-0123456789abcdeX")).await;
    assert_error(
        status,
        &v,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "invalid bearer token",
    );
    for path in ["/v1/tasks", "/v1/workers", "/v1/task-types"] {
        let r = cluster
            .http()
            .get(format!("{}{path}", cluster.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = cluster
            .http()
            .get(format!("{}{path}", cluster.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_ids_and_queries() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let (status, v) = cluster
        .get("/v1/tasks/0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b")
        .await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "task 0192f0c4",
    );
    let (status, v) = cluster
        .get("/v1/tasks/0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9b/events")
        .await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "task 0192f0c4",
    );
    let (status, v) = cluster.get("/v1/tasks/not-an-id").await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_field", "id:");
    let (status, v) = cluster.get("/v1/tasks?limit=0").await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "limit:",
    );
    let (status, v) = cluster.get("/v1/tasks?limit=ten").await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "query:",
    );
    let (status, v) = cluster.get("/v1/tasks?before=yesterday").await;
    assert_error(
        status,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_field",
        "before:",
    );
    let (status, v) = cluster.get("/v1/nothing-here").await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_list_pages_newest_first() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            cluster
                .submit(json!({"prompt": format!("task {i}")}))
                .await
                .id
                .to_string(),
        );
    }
    let (_, page1) = cluster.get("/v1/tasks?limit=3").await;
    let got: Vec<&str> = page1["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str(), ids[2].as_str()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = cluster
        .get(&format!("/v1/tasks?limit=3&before={cursor}"))
        .await;
    let got: Vec<&str> = page2["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[1].as_str(), ids[0].as_str()]);
    assert!(page2["next_cursor"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_logs_or_events() {
    let cluster = Cluster::start(Options::default()).await;
    let wrong = "wrong-token-abcdefghijklmnop";
    let (status, _) = raw_post(&cluster, json!({"prompt": "x"}).to_string(), Some(wrong)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let task = cluster
        .submit(json!({"prompt": "build it", "roles": ["builder"]}))
        .await;
    let id = task.id.to_string();
    cluster
        .wait_task(&id, std::time::Duration::from_secs(60))
        .await;
    let events = cluster.events(&id, None).await;
    let text = serde_json::to_string(&events.iter().map(|(_, e)| e).collect::<Vec<_>>()).unwrap();
    assert!(
        !text.contains(TOKEN) && !text.contains(wrong),
        "a token is in the event log"
    );
    for entry in std::fs::read_dir(cluster.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                !log.contains(TOKEN),
                "the API token is in {}",
                path.display()
            );
            assert!(
                !log.contains(wrong),
                "a presented token is in {}",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_cannot_read_or_cancel_another_tenants_tasks() {
    let alpha = "alpha-token-0123456789";
    let beta = "beta-token-0123456789";
    let cluster = Cluster::start(Options {
        workers: 0,
        coordinator_args: vec![
            "--tenant".into(),
            format!("alpha={alpha}"),
            "--tenant".into(),
            format!("beta={beta}"),
        ],
        ..Options::default()
    })
    .await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, token: &'static str| {
        let req = http
            .request(method, format!("{}{path}", cluster.url))
            .bearer_auth(token);
        async move {
            let r = req
                .json(&json!({"prompt": "alpha's work", "roles": ["builder"]}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, task) = call(
        reqwest::Method::POST,
        "/v1/tasks".into(),
        "alpha-token-0123456789",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["tenant"], "alpha");
    let id = task["id"].as_str().unwrap().to_string();
    let job = task["jobs"][0]["id"].as_str().unwrap().to_string();
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    for (method, path) in [
        (get.clone(), format!("/v1/tasks/{id}")),
        (get.clone(), format!("/v1/tasks/{id}/events")),
        (get.clone(), format!("/v1/tasks/{id}/logs")),
        (post.clone(), format!("/v1/tasks/{id}/cancel")),
        (get.clone(), format!("/v1/agents/{job}")),
        (post.clone(), format!("/v1/agents/{job}/kill")),
    ] {
        let (status, v) = call(method.clone(), path.clone(), "beta-token-0123456789").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "beta reached {method} {path}: {v}"
        );
    }
    for path in [
        "/v1/events",
        "/v1/export",
        "/v1/dlq",
        "/v1/workers",
        "/v1/quotas",
        "/v1/status",
    ] {
        let (status, _) = call(get.clone(), path.into(), "beta-token-0123456789").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a tenant reached the cluster-wide {path}"
        );
    }
    let (_, list) = call(get.clone(), "/v1/tasks".into(), "beta-token-0123456789").await;
    assert_eq!(list["tasks"], json!([]), "beta lists alpha's task");
    let (_, list) = call(get.clone(), "/v1/tasks".into(), "alpha-token-0123456789").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    let (status, _) = call(
        get.clone(),
        format!("/v1/tasks/{id}"),
        "alpha-token-0123456789",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // An admin token sees everything.
    let (status, _) = cluster.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = call(
        post,
        format!("/v1/tasks/{id}/cancel"),
        "alpha-token-0123456789",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let _ = (alpha, beta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_forks_say_what_is_wrong() {
    let cluster = Cluster::start(Options::default()).await;
    let post = |path: String, body: Value| {
        let cluster = &cluster;
        async move { cluster.post(&path, &body).await }
    };
    let unknown = "0192f0c4-6f1e-7cc2-9b1a-3f5c2d1e0a9c";
    let (status, v) = post(
        format!("/v1/agents/{unknown}/send"),
        json!({"message": "hi"}),
    )
    .await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "not_found", "agent");
    let (status, v) = post("/v1/agents/nope/fork".into(), json!({"message": "hi"})).await;
    assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_field", "id:");

    // A long-running agent: its conversation cannot take another turn yet.
    let task = cluster
        .submit(json!({"prompt": "x", "roles": ["builder"], "sim": {"latency_ms": 60000}}))
        .await;
    let agent = task.jobs[0].id;
    for (body, field) in [
        (json!({"message": "  "}), "message:"),
        (json!({}), "body: missing field `message`"),
        (json!({"message": "x", "colour": 1}), "colour:"),
    ] {
        let (status, v) = post(format!("/v1/agents/{agent}/send"), body).await;
        assert_error(status, &v, StatusCode::BAD_REQUEST, "invalid_field", field);
    }
    let (status, v) = post(
        format!("/v1/agents/{agent}/send"),
        json!({"message": "go on"}),
    )
    .await;
    assert_error(status, &v, StatusCode::CONFLICT, "conflict", "agent");
    assert!(
        v["message"].as_str().unwrap().contains("still working"),
        "{v}"
    );
    let (status, v) = post(
        format!("/v1/agents/{agent}/fork"),
        json!({"message": "go on"}),
    )
    .await;
    assert_error(status, &v, StatusCode::CONFLICT, "conflict", "agent");

    // An agent that failed for good has no turn to continue.
    let task = cluster
        .submit(
            json!({"prompt": "x", "roles": ["builder"], "max_attempts": 1,
                       "sim": {"fail_first_attempts": 1, "fail_reason": "bad_request"}}),
        )
        .await;
    let done = cluster
        .wait_task(&task.id.to_string(), std::time::Duration::from_secs(30))
        .await;
    let failed = done.jobs[0].id;
    let (status, v) = post(
        format!("/v1/agents/{failed}/send"),
        json!({"message": "retry"}),
    )
    .await;
    assert_error(status, &v, StatusCode::CONFLICT, "conflict", "agent");
    assert!(v["message"].as_str().unwrap().contains("failed"), "{v}");
    // Nothing was added to either task.
    let after = cluster.task(&task.id.to_string()).await;
    assert_eq!(after.jobs.len(), 1);
}
