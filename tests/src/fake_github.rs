//! A fake GitHub REST API on 127.0.0.1 (axum, port 0): the remote side of the coordinator's
//! forge, backed by real bare repositories on disk, so a pull request's head is whatever the
//! workers pushed to its branch.
//!
//! It serves what the coordinator asks: a repository (`default_branch`, `permissions.push`), a
//! branch, pull requests (list by head, create — refused with 422 while one is open for the
//! same head —, show with `head.sha` and `additions`/`deletions` from `git diff --numstat`),
//! a file's contents (raw, at a ref), a pull request's review comments (paged), its description (`PATCH`), labels and issue
//! comments, and the GraphQL mutation that marks a draft ready for review. Every request is
//! recorded with whether it carried the expected `Authorization: Bearer` token; one without
//! it gets GitHub's 401. Tests add review comments as a reviewer would.

use crate::fake_anthropic::serve;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The path and query, as sent.
    pub path: String,
    /// Whether it carried the expected bearer token.
    pub authorized: bool,
    pub body: Value,
}

/// A pull request the fake holds.
#[derive(Clone, Debug)]
pub struct FakePull {
    pub number: u64,
    pub repo: String,
    pub title: String,
    pub body: String,
    pub base: String,
    pub head: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub state: String,
    /// Issue comments on it (the conversation).
    pub comments: Vec<String>,
}

/// A review comment on a file of a pull request.
#[derive(Clone, Debug)]
pub struct FakeReviewComment {
    pub id: u64,
    pub pull: u64,
    pub path: String,
    pub line: u64,
    pub body: String,
}

struct FakeRepo {
    bare: PathBuf,
    default_branch: String,
    push: bool,
}

struct Inner {
    token: String,
    repos: BTreeMap<String, FakeRepo>,
    pulls: Vec<FakePull>,
    review_comments: Vec<FakeReviewComment>,
    calls: Vec<Call>,
    next_comment: u64,
    /// While set, a request to create a pull request is recorded and never answered, and
    /// creates nothing (the coordinator stops before GitHub acts on it).
    stall_creates: bool,
}

/// The fake API; stops when dropped.
pub struct FakeGitHub {
    /// `http://127.0.0.1:PORT`, what the coordinator's `forge-api-url` takes.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeGitHub {
    /// Starts the fake; requests must carry `token`.
    pub async fn start(token: &str) -> FakeGitHub {
        let inner = Arc::new(Mutex::new(Inner {
            token: token.to_string(),
            repos: BTreeMap::new(),
            pulls: vec![],
            review_comments: vec![],
            calls: vec![],
            next_comment: 1000,
            stall_creates: false,
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, server) = serve(app).await;
        FakeGitHub {
            url: format!("http://{addr}"),
            inner,
            server,
        }
    }

    /// Adds repository `name` (`owner/name`) backed by the bare repository `bare`; `push`
    /// says whether the token may push to it.
    pub fn add_repo(&self, name: &str, bare: &Path, default_branch: &str, push: bool) {
        self.inner.lock().unwrap().repos.insert(
            name.to_string(),
            FakeRepo {
                bare: bare.to_path_buf(),
                default_branch: default_branch.to_string(),
                push,
            },
        );
    }

    /// A reviewer comments on `line` of `path` in pull request `pull`; returns the comment's id.
    pub fn add_review_comment(&self, pull: u64, path: &str, line: u64, body: &str) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.next_comment += 1;
        let id = inner.next_comment;
        inner.review_comments.push(FakeReviewComment {
            id,
            pull,
            path: path.to_string(),
            line,
            body: body.to_string(),
        });
        id
    }

    /// From now on, requests to create a pull request hang unanswered and create nothing
    /// (`false`: served again).
    pub fn stall_creates(&self, stall: bool) {
        self.inner.lock().unwrap().stall_creates = stall;
    }

    pub fn pulls(&self) -> Vec<FakePull> {
        self.inner.lock().unwrap().pulls.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The bytes of `object` (`ref:path`) of the repository, if it exists.
fn git_bytes(dir: &Path, object: &str) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "blob", object])
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = segment
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, json!({"message": "Not Found"}))
}

/// A pull request's global id, as GitHub's GraphQL API names it.
fn node_id(p: &FakePull) -> String {
    format!("PR_{}_{}", p.repo.replace('/', "_"), p.number)
}

fn pull_json(p: &FakePull, repo: &FakeRepo) -> Value {
    let sha = git(
        &repo.bare,
        &["rev-parse", &format!("refs/heads/{}", p.head)],
    )
    .unwrap_or_default();
    let numstat = git(
        &repo.bare,
        &["diff", "--numstat", &format!("{}...{}", p.base, p.head)],
    )
    .unwrap_or_default();
    let (mut additions, mut deletions) = (0u64, 0u64);
    for line in numstat.lines() {
        let mut f = line.split_whitespace();
        additions += f.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        deletions += f.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    }
    json!({
        "number": p.number,
        "node_id": node_id(p),
        "html_url": format!("https://github.example/{}/pull/{}", p.repo, p.number),
        "state": p.state,
        "title": p.title,
        "body": p.body,
        "draft": p.draft,
        "head": {"ref": p.head, "sha": sha},
        "base": {"ref": p.base},
        "additions": additions,
        "deletions": deletions,
    })
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stalled = {
        let mut inner = inner.lock().unwrap();
        let expected = format!("Bearer {}", inner.token);
        let authorized = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == expected);
        inner.calls.push(Call {
            method: method.to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_string(), |p| p.to_string()),
            authorized,
            body: body.clone(),
        });
        if !authorized {
            return answer(
                StatusCode::UNAUTHORIZED,
                json!({"message": "Bad credentials"}),
            );
        }
        inner.stall_creates && method == Method::POST && uri.path().ends_with("/pulls")
    };
    if stalled {
        return std::future::pending().await;
    }
    respond(&mut inner.lock().unwrap(), &method, &uri, &body)
}

/// The answer to an authorized request.
fn respond(inner: &mut Inner, method: &Method, uri: &Uri, body: &Value) -> Response {
    if *method == Method::POST && uri.path() == "/graphql" {
        return graphql(inner, body);
    }
    let parts: Vec<String> = uri
        .path()
        .trim_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let q = query(uri);
    let ["repos", owner, name, rest @ ..] = parts.as_slice() else {
        return not_found();
    };
    let full = format!("{owner}/{name}");
    let Some(repo) = inner.repos.get(&full) else {
        return not_found();
    };
    let (bare, default_branch, push) = (repo.bare.clone(), repo.default_branch.clone(), repo.push);
    let repo = FakeRepo {
        bare,
        default_branch,
        push,
    };
    match (method.as_str(), rest) {
        ("GET", []) => answer(
            StatusCode::OK,
            json!({
                "full_name": full,
                "default_branch": repo.default_branch,
                "permissions": {"pull": true, "push": repo.push, "admin": false},
            }),
        ),
        // The raw media type only (what the coordinator asks for): the file's bytes.
        ("GET", ["contents", path @ ..]) => {
            let git_ref = q
                .get("ref")
                .cloned()
                .unwrap_or_else(|| repo.default_branch.clone());
            match git_bytes(&repo.bare, &format!("{git_ref}:{}", path.join("/"))) {
                Some(bytes) => (StatusCode::OK, bytes).into_response(),
                None => not_found(),
            }
        }
        ("GET", ["branches", branch]) => {
            match git(
                &repo.bare,
                &["rev-parse", "--verify", &format!("refs/heads/{branch}")],
            ) {
                Some(sha) => answer(
                    StatusCode::OK,
                    json!({"name": branch, "commit": {"sha": sha}}),
                ),
                None => answer(
                    StatusCode::NOT_FOUND,
                    json!({"message": "Branch not found"}),
                ),
            }
        }
        ("GET", ["pulls"]) => {
            let state = q.get("state").map_or("open", String::as_str);
            let head = q
                .get("head")
                .map(|h| h.split_once(':').map_or(h.as_str(), |(_, b)| b).to_string());
            let found: Vec<Value> = inner
                .pulls
                .iter()
                .filter(|p| p.repo == full && (state == "all" || p.state == state))
                .filter(|p| head.as_ref().is_none_or(|h| *h == p.head))
                .map(|p| pull_json(p, &repo))
                .collect();
            answer(StatusCode::OK, Value::Array(found))
        }
        ("POST", ["pulls"]) => {
            let s = |k: &str| {
                body.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            let (head, base) = (s("head"), s("base"));
            if inner
                .pulls
                .iter()
                .any(|p| p.repo == full && p.head == head && p.state == "open")
            {
                return answer(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"message": format!("A pull request already exists for {owner}:{head}.")}),
                );
            }
            for b in [&head, &base] {
                if git(
                    &repo.bare,
                    &["rev-parse", "--verify", &format!("refs/heads/{b}")],
                )
                .is_none()
                {
                    return answer(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"message": format!("Validation Failed: no branch {b}")}),
                    );
                }
            }
            let pull = FakePull {
                number: inner.pulls.len() as u64 + 1,
                repo: full.clone(),
                title: s("title"),
                body: s("body"),
                base,
                head,
                draft: body.get("draft").and_then(Value::as_bool).unwrap_or(false),
                labels: vec![],
                state: "open".into(),
                comments: vec![],
            };
            let json = pull_json(&pull, &repo);
            inner.pulls.push(pull);
            answer(StatusCode::CREATED, json)
        }
        ("GET", ["pulls", n]) => {
            let n: u64 = n.parse().unwrap_or(0);
            match inner.pulls.iter().find(|p| p.repo == full && p.number == n) {
                Some(p) => answer(StatusCode::OK, pull_json(p, &repo)),
                None => not_found(),
            }
        }
        ("PATCH", ["pulls", n]) => {
            let n: u64 = n.parse().unwrap_or(0);
            let Some(p) = inner
                .pulls
                .iter_mut()
                .find(|p| p.repo == full && p.number == n)
            else {
                return not_found();
            };
            if let Some(b) = body.get("body").and_then(Value::as_str) {
                p.body = b.to_string();
            }
            let p = p.clone();
            answer(StatusCode::OK, pull_json(&p, &repo))
        }
        ("GET", ["pulls", n, "comments"]) => {
            let n: u64 = n.parse().unwrap_or(0);
            let per_page: usize = q.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(30);
            let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1);
            let all: Vec<Value> = inner
                .review_comments
                .iter()
                .filter(|c| c.pull == n)
                .skip(per_page * (page.max(1) - 1))
                .take(per_page)
                .map(|c| {
                    json!({"id": c.id, "path": c.path, "line": c.line, "body": c.body,
                           "user": {"login": "reviewer"}})
                })
                .collect();
            answer(StatusCode::OK, Value::Array(all))
        }
        ("POST", ["issues", n, what @ ("labels" | "comments")]) => {
            let n: u64 = n.parse().unwrap_or(0);
            let Some(p) = inner
                .pulls
                .iter_mut()
                .find(|p| p.repo == full && p.number == n)
            else {
                return not_found();
            };
            if *what == "labels" {
                let labels = body
                    .get("labels")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                p.labels
                    .extend(labels.iter().filter_map(|l| l.as_str().map(String::from)));
                answer(StatusCode::OK, json!([]))
            } else {
                p.comments.push(
                    body.get("body")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                );
                answer(StatusCode::CREATED, json!({"id": p.comments.len()}))
            }
        }
        _ => not_found(),
    }
}

/// GitHub's GraphQL endpoint, for the one mutation REST lacks: marking a draft ready for
/// review. Answers 200 with `errors` for anything else, as GitHub does.
fn graphql(inner: &mut Inner, body: &Value) -> Response {
    let query = body.get("query").and_then(Value::as_str).unwrap_or("");
    let id = body
        .pointer("/variables/id")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !query.contains("markPullRequestReadyForReview") {
        return answer(
            StatusCode::OK,
            json!({"errors": [{"message": "the fake knows only markPullRequestReadyForReview"}]}),
        );
    }
    match inner.pulls.iter_mut().find(|p| node_id(p) == id) {
        Some(p) => {
            p.draft = false;
            answer(
                StatusCode::OK,
                json!({"data": {"markPullRequestReadyForReview": {"pullRequest": {"isDraft": false}}}}),
            )
        }
        None => answer(
            StatusCode::OK,
            json!({"errors": [{"message": format!("Could not resolve to a node with the global id of '{id}'")}]}),
        ),
    }
}
