//! The OpenAPI document: the coordinator serves the checked-in one, it describes every route
//! the coordinator answers with the error shapes those routes really give, and a schema
//! validator from PyPI (`openapi-spec-validator`, installed by `scripts/deps.sh`) accepts it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::{Cluster, Options, TOKEN};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn checked_in() -> String {
    std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap()
}

/// Every (method, path) the document describes.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                ops.push((method.clone(), path.clone()));
            }
        }
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_checked_in_one_and_open_to_all() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    // No token: the document holds no data, and clients fetch it before they have one.
    let r = cluster
        .http()
        .get(format!("{}/v1/openapi.json", cluster.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served = r.text().await.unwrap();
    assert!(
        served == checked_in(),
        "the coordinator serves another document than docs/openapi.json; run \
         `ORCH_BLESS=1 cargo nextest run -p orch-coordinator checked_in_document_is_current`"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
}

/// A route added with a bare `.route(..)` answers but is missing from the document: every
/// route must be registered with `routes!(handler)` (see ARCHITECTURE.md).
#[test]
fn no_route_bypasses_the_document() {
    let mut bare = Vec::new();
    let mut stack = vec![repo_root().join("coordinator/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    if line.contains(".route(\"/v1") || line.contains(".route(\"/healthz") {
                        bare.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        bare.is_empty(),
        "routes missing from the OpenAPI document:\n{}",
        bare.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_with_its_documented_error_shapes() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let doc: Value = serde_json::from_str(&checked_in()).unwrap();
    let ops = operations(&doc);
    assert!(ops.len() >= 25, "only {} operations: {ops:?}", ops.len());
    let error_ref = "#/components/schemas/ApiError";
    let response_schema = |resp: &Value| -> String {
        let resp = match resp["$ref"].as_str() {
            Some(r) => &doc["components"]["responses"][r.rsplit('/').next().unwrap()],
            None => resp,
        };
        resp["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for (method, path) in &ops {
        let op = &doc["paths"][path][method];
        let url = format!("{}{}", cluster.url, path.replace("{id}", "not-an-id"));
        let request = |token: Option<&str>| {
            let mut req = cluster
                .http()
                .request(method.to_uppercase().parse().unwrap(), &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if method == "post" {
                req = req.header("content-type", "application/json").body("{}");
            }
            req
        };
        if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
            let r = request(None).send().await.unwrap();
            assert!(
                r.status() == StatusCode::OK || path == "/metrics",
                "{method} {path}: {}",
                r.status()
            );
            continue;
        }
        // Without a token: 401 `{code, message}`, as documented.
        let r = request(None).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{method} {path}: {body}");
        assert_eq!(
            response_schema(&op["responses"]["401"]),
            error_ref,
            "{method} {path}"
        );
        // With a token, a malformed id or an empty body is bad input, named, as documented:
        // never the router's fallback ("no such endpoint"), which would mean the documented
        // route does not exist.
        let r = request(Some(TOKEN)).send().await.unwrap();
        let status = r.status();
        let is_stream = op["responses"]["200"]["content"]
            .as_object()
            .is_some_and(|c| c.contains_key("text/event-stream"));
        if status == StatusCode::OK && is_stream {
            continue; // `GET /v1/events`: a live stream, nothing to reject
        }
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_ne!(
            body["message"], "no such endpoint",
            "{method} {path} is documented but not routed"
        );
        if status.is_client_error() {
            let documented = &op["responses"][status.as_str()];
            assert!(
                !documented.is_null(),
                "{method} {path} answered {status}, not documented: {body}"
            );
            assert_eq!(response_schema(documented), error_ref, "{method} {path}");
            assert!(
                body["code"].is_string() && body["message"].is_string(),
                "{body}"
            );
            if path.contains("{id}") {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
                assert!(
                    body["message"].as_str().unwrap().starts_with("id:"),
                    "{method} {path}: {body}"
                );
            }
        } else {
            assert!(status.is_success(), "{method} {path}: {status} {body}");
            assert!(
                !op["responses"][status.as_str()].is_null(),
                "{method} {path} answered {status}, not documented"
            );
        }
    }
}

#[test]
fn a_schema_validator_accepts_the_document() {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from openapi_spec_validator import validate; \
             from openapi_spec_validator.readers import read_from_filename; \
             spec, _ = read_from_filename(sys.argv[1]); validate(spec); print('valid')",
        ])
        .arg(repo_root().join("docs/openapi.json"))
        .output()
        .expect("python3 runs (scripts/deps.sh installs openapi-spec-validator)");
    assert!(
        out.status.success(),
        "openapi-spec-validator refused docs/openapi.json:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
