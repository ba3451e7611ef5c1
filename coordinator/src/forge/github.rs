//! GitHub's REST API (and GitHub Enterprise's, by its base URL): the few endpoints
//! [`Forge`] needs, with the token as a bearer credential. The token is sent only in the
//! `Authorization` header and never appears in an error or a log.

use super::{Config, Error, Forge, NewPull, Pull, Repository, ReviewComment};
use futures::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::time::Duration;

/// Longest any one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Review comments asked for per page, and the most pages read.
const PER_PAGE: usize = 100;
const MAX_PAGES: usize = 20;

pub struct GitHub {
    http: reqwest::Client,
    base: String,
    /// The GraphQL endpoint: the only way GitHub offers to mark a draft ready for review
    /// (its REST API can open a draft but not take the draft state away).
    graphql: String,
    token: String,
}

/// GitHub's GraphQL endpoint beside the REST base: `https://api.github.com/graphql`, or
/// `https://HOST/api/graphql` for GitHub Enterprise's `https://HOST/api/v3`.
fn graphql_url(base: &str) -> String {
    match base.strip_suffix("/api/v3") {
        Some(host) => format!("{host}/api/graphql"),
        None => format!("{base}/graphql"),
    }
}

#[derive(Deserialize)]
struct RepoBody {
    default_branch: String,
    #[serde(default)]
    permissions: Option<Permissions>,
}

#[derive(Deserialize)]
struct Permissions {
    #[serde(default)]
    push: bool,
}

#[derive(Deserialize)]
struct PullBody {
    number: u64,
    html_url: String,
    state: String,
    head: HeadBody,
    #[serde(default)]
    additions: Option<u64>,
    #[serde(default)]
    deletions: Option<u64>,
    #[serde(default)]
    draft: bool,
    #[serde(default)]
    node_id: String,
}

#[derive(Deserialize)]
struct HeadBody {
    sha: String,
}

#[derive(Deserialize)]
struct CommentBody {
    id: u64,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    line: Option<u64>,
    #[serde(default)]
    original_line: Option<u64>,
    body: String,
    #[serde(default)]
    user: Option<UserBody>,
}

#[derive(Deserialize)]
struct UserBody {
    login: String,
}

#[derive(Deserialize)]
struct GraphQlAnswer {
    #[serde(default)]
    errors: Vec<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

impl From<PullBody> for Pull {
    fn from(p: PullBody) -> Self {
        Pull {
            number: p.number,
            url: p.html_url,
            head_sha: p.head.sha,
            state: p.state,
            changed_lines: p.additions.unwrap_or(0) + p.deletions.unwrap_or(0),
            draft: p.draft,
            node_id: p.node_id,
        }
    }
}

impl GitHub {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Http {
                what: "the HTTP client".into(),
                source,
            })?;
        let base = config.api_url.trim_end_matches('/').to_string();
        Ok(Self {
            http,
            graphql: graphql_url(&base),
            base,
            token: config.token.expose().to_string(),
        })
    }

    /// Sends a request and returns the status and body; a status outside 2xx and `ok` is an
    /// [`Error::Status`] with GitHub's message.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        ok: &[StatusCode],
        what: &str,
    ) -> Result<(StatusCode, bytes::Bytes), Error> {
        let http_err = |source| Error::Http {
            what: what.to_string(),
            source,
        };
        let url = if path.starts_with("https://") || path.starts_with("http://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28");
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(http_err)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(http_err)?;
        if status.is_success() || ok.contains(&status) {
            return Ok((status, bytes));
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        Err(Error::Status {
            what: what.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<T, Error> {
        let (_, bytes) = self.send(Method::GET, path, None, &[], what).await?;
        parse(&bytes, what)
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Status {
        what: what.to_string(),
        status: 200,
        message: format!("unexpected answer: {e}"),
    })
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `owner/name` with each part encoded.
fn repo_path(repo: &str) -> String {
    repo.split('/').map(segment).collect::<Vec<_>>().join("/")
}

impl Forge for GitHub {
    fn repository<'a>(&'a self, repo: &'a str) -> BoxFuture<'a, Result<Repository, Error>> {
        Box::pin(async move {
            let body: RepoBody = self
                .get(
                    &format!("/repos/{}", repo_path(repo)),
                    &format!("repository {repo}"),
                )
                .await?;
            Ok(Repository {
                default_branch: body.default_branch,
                can_push: body.permissions.is_some_and(|p| p.push),
            })
        })
    }

    fn file<'a>(
        &'a self,
        repo: &'a str,
        path: &'a str,
        git_ref: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, Error>> {
        Box::pin(async move {
            let what = format!("{path} of {repo}");
            let http_err = |source| Error::Http {
                what: what.clone(),
                source,
            };
            let path: Vec<String> = path.split('/').map(segment).collect();
            let mut url = format!(
                "{}/repos/{}/contents/{}",
                self.base,
                repo_path(repo),
                path.join("/")
            );
            if let Some(r) = git_ref {
                url.push_str("?ref=");
                url.push_str(&segment(r));
            }
            // The raw media type: the file's bytes rather than base64 in JSON.
            let resp = self
                .http
                .get(url)
                .bearer_auth(&self.token)
                .header("Accept", "application/vnd.github.raw+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
                .send()
                .await
                .map_err(http_err)?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let bytes = resp.bytes().await.map_err(http_err)?;
            if !status.is_success() {
                let message = serde_json::from_slice::<ErrorBody>(&bytes)
                    .map(|e| e.message)
                    .unwrap_or_else(|_| {
                        String::from_utf8_lossy(&bytes).chars().take(300).collect()
                    });
                return Err(Error::Status {
                    what,
                    status: status.as_u16(),
                    message,
                });
            }
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        })
    }

    fn branch_exists<'a>(
        &'a self,
        repo: &'a str,
        branch: &'a str,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            let (status, _) = self
                .send(
                    Method::GET,
                    &format!("/repos/{}/branches/{}", repo_path(repo), segment(branch)),
                    None,
                    &[StatusCode::NOT_FOUND],
                    &format!("branch {branch} of {repo}"),
                )
                .await?;
            Ok(status != StatusCode::NOT_FOUND)
        })
    }

    fn find_pull<'a>(
        &'a self,
        repo: &'a str,
        head: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pull>, Error>> {
        Box::pin(async move {
            let owner = repo.split('/').next().unwrap_or(repo);
            let found: Vec<PullBody> = self
                .get(
                    &format!(
                        "/repos/{}/pulls?state=open&head={}:{}",
                        repo_path(repo),
                        segment(owner),
                        segment(head)
                    ),
                    &format!("the pull requests from {head}"),
                )
                .await?;
            Ok(found.into_iter().next().map(Pull::from))
        })
    }

    fn create_pull<'a>(
        &'a self,
        repo: &'a str,
        pr: &'a NewPull,
    ) -> BoxFuture<'a, Result<Pull, Error>> {
        Box::pin(async move {
            let what = format!("a new pull request from {} to {}", pr.head, pr.base);
            let (_, bytes) = self
                .send(
                    Method::POST,
                    &format!("/repos/{}/pulls", repo_path(repo)),
                    Some(json!({
                        "title": pr.title,
                        "body": pr.body,
                        "base": pr.base,
                        "head": pr.head,
                        "draft": pr.draft,
                        "maintainer_can_modify": false,
                    })),
                    &[],
                    &what,
                )
                .await?;
            let pull: Pull = parse::<PullBody>(&bytes, &what)?.into();
            if !pr.labels.is_empty() {
                // Pull requests are issues as far as labels go.
                self.send(
                    Method::POST,
                    &format!("/repos/{}/issues/{}/labels", repo_path(repo), pull.number),
                    Some(json!({ "labels": pr.labels })),
                    &[],
                    &format!("the labels of pull request #{}", pull.number),
                )
                .await?;
            }
            Ok(pull)
        })
    }

    fn pull<'a>(&'a self, repo: &'a str, number: u64) -> BoxFuture<'a, Result<Pull, Error>> {
        Box::pin(async move {
            let body: PullBody = self
                .get(
                    &format!("/repos/{}/pulls/{number}", repo_path(repo)),
                    &format!("pull request #{number}"),
                )
                .await?;
            Ok(body.into())
        })
    }

    fn update_body<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.send(
                Method::PATCH,
                &format!("/repos/{}/pulls/{number}", repo_path(repo)),
                Some(json!({ "body": body })),
                &[],
                &format!("the description of pull request #{number}"),
            )
            .await?;
            Ok(())
        })
    }

    fn mark_ready<'a>(
        &'a self,
        _repo: &'a str,
        pull: &'a Pull,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let what = format!("marking pull request #{} ready for review", pull.number);
            let (_, bytes) = self
                .send(
                    Method::POST,
                    &self.graphql,
                    Some(json!({
                        "query": "mutation($id: ID!) { markPullRequestReadyForReview(input: {pullRequestId: $id}) { pullRequest { isDraft } } }",
                        "variables": { "id": pull.node_id },
                    })),
                    &[],
                    &what,
                )
                .await?;
            // GraphQL answers 200 with its errors in the body.
            let answer: GraphQlAnswer = parse(&bytes, &what)?;
            match answer.errors.first() {
                Some(e) => Err(Error::Status {
                    what,
                    status: 200,
                    message: e.message.clone(),
                }),
                None => Ok(()),
            }
        })
    }

    fn review_comments<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
    ) -> BoxFuture<'a, Result<Vec<ReviewComment>, Error>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for page in 1..=MAX_PAGES {
                let batch: Vec<CommentBody> = self
                    .get(
                        &format!(
                            "/repos/{}/pulls/{number}/comments?per_page={PER_PAGE}&page={page}",
                            repo_path(repo)
                        ),
                        &format!("the review comments of pull request #{number}"),
                    )
                    .await?;
                let last = batch.len() < PER_PAGE;
                all.extend(batch.into_iter().map(|c| ReviewComment {
                    id: c.id,
                    path: c.path,
                    line: c.line.or(c.original_line),
                    body: c.body,
                    author: c.user.map(|u| u.login).unwrap_or_default(),
                }));
                if last {
                    break;
                }
            }
            all.sort_by_key(|c| c.id);
            Ok(all)
        })
    }

    fn comment<'a>(
        &'a self,
        repo: &'a str,
        number: u64,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.send(
                Method::POST,
                &format!("/repos/{}/issues/{number}/comments", repo_path(repo)),
                Some(json!({ "body": body })),
                &[],
                &format!("a comment on pull request #{number}"),
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graphql_endpoint_sits_beside_the_rest_base() {
        assert_eq!(
            graphql_url("https://api.github.com"),
            "https://api.github.com/graphql"
        );
        assert_eq!(
            graphql_url("https://git.example.com/api/v3"),
            "https://git.example.com/api/graphql"
        );
    }
}
