//! Pull requests: the `pr` checks of a submit (before any agent runs), `POST
//! /v1/tasks/{id}/pr/sync` (polling the review comments) and `POST /v1/forge/github/webhook`
//! (GitHub's deliveries, signed with the webhook secret instead of a bearer token).

use super::answer::{Answer, Failure};
use super::app::App;
use crate::forge::{self, Handle, repo_config, service};
use axum::body::Bytes;
use axum::extract::{Path, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use orch_shared::api::{PrRequest, PrSync, PullRequest, SubmitTask};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::TaskId;
use orch_shared::job::{GitJob, Workspace};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Authenticated with the API's bearer token, like every `/v1` route.
pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(sync))
}

/// Authenticated by the delivery's signature.
pub(super) fn hook_routes() -> OpenApiRouter<App> {
    OpenApiRouter::new().routes(routes!(github_webhook))
}

/// Where the forge delivers its webhooks.
pub(super) const WEBHOOK_PATH: &str = "/v1/forge/github/webhook";

/// Most labels a submit may add.
const MAX_LABELS: usize = 20;

/// Fills a submit from the repository's `.orch.toml` ([`repo_config`]) on its base (the
/// submit's `ref`, else the default branch), read through the forge, when one is configured
/// and the task works in a repository whose `owner/name` it can tell; the submit's own fields
/// win. A malformed file is a 400 naming the file and its key, before anything runs. A
/// repository the forge does not know or lets the token read has no file; a forge that does
/// not answer is a 503 (a task never runs without the checks its repository asks for).
pub(super) async fn with_repo_config(app: &App, mut req: SubmitTask) -> Answer<SubmitTask> {
    let (Some(handle), Some(url)) = (&app.forge, req.repo.as_deref()) else {
        return Ok(req);
    };
    let repo = req
        .pr
        .as_ref()
        .and_then(|p| p.repo.as_deref())
        .map(|r| r.trim().to_string())
        .or_else(|| forge::repo_from_url(url.trim()))
        .filter(|r| forge::valid_repo(r));
    let Some(repo) = repo else {
        return Ok(req);
    };
    let git_ref = req
        .git_ref
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty() && *r != "HEAD");
    let file = repo_config::FILE;
    let text = match handle.forge.file(&repo, file, git_ref).await {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(req),
        Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => {
            tracing::debug!(%repo, error = %e, "the forge does not show {file}; submitting without it");
            return Ok(req);
        }
        Err(e) => {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!("the forge did not answer for {file} of {repo}: {e}"),
            )
            .into());
        }
    };
    let config = repo_config::parse(&text).map_err(|e| ApiError::field(file, e))?;
    config.apply(&mut req);
    Ok(req)
}

/// Checks a submit's `pr` against the forge before the task is created: a forge is
/// configured, the task works in a repository, the token can push to it and the base branch
/// exists. Returns the pull request to record on the task (its head is set by the caller).
pub(super) async fn check_pr(
    app: &App,
    req: &PrRequest,
    workspace: &Workspace,
) -> Answer<PullRequest> {
    let Some(handle) = &app.forge else {
        return Err(ApiError::field(
            "pr",
            "no forge is configured on the coordinator (set forge-token or forge-token-file)",
        )
        .into());
    };
    let Workspace::Git { url, base_ref, .. } = workspace else {
        return Err(ApiError::field(
            "pr",
            "needs repo: the pull request is opened from the task's branch of that repository",
        )
        .into());
    };
    let repo = match &req.repo {
        Some(r) => r.trim().to_string(),
        None => forge::repo_from_url(url).ok_or_else(|| {
            ApiError::field(
                "pr.repo",
                format!("cannot tell owner/name from repo `{url}`; give pr.repo"),
            )
        })?,
    };
    if !forge::valid_repo(&repo) {
        return Err(ApiError::field("pr.repo", "expected owner/name").into());
    }
    if req.labels.len() > MAX_LABELS
        || req
            .labels
            .iter()
            .any(|l| l.trim().is_empty() || l.chars().count() > 50)
    {
        return Err(ApiError::field(
            "pr.labels",
            format!("at most {MAX_LABELS} labels of 1 to 50 characters"),
        )
        .into());
    }
    let repository = handle
        .forge
        .repository(&repo)
        .await
        .map_err(|e| forge_refused("pr.repo", &repo, e))?;
    if !repository.can_push {
        return Err(ApiError::field(
            "pr.repo",
            format!("the forge token cannot push to {repo} (its permissions.push is false)"),
        )
        .into());
    }
    let base = if base_ref == "HEAD" {
        repository.default_branch
    } else {
        base_ref.clone()
    };
    let exists = handle
        .forge
        .branch_exists(&repo, &base)
        .await
        .map_err(|e| forge_refused("ref", &repo, e))?;
    if !exists {
        return Err(ApiError::field(
            "ref",
            format!("base branch {base} does not exist on {repo}"),
        )
        .into());
    }
    Ok(PullRequest {
        repo,
        base,
        labels: req.labels.iter().map(|l| l.trim().to_string()).collect(),
        // Only a task with a check has a draft stage; the submit clears it otherwise.
        draft_while_checking: req.draft.unwrap_or(handle.config.draft),
        ..Default::default()
    })
}

/// A forge error while checking `field`: what the user can fix is a 400 naming the field;
/// a forge that does not answer is a 503.
fn forge_refused(field: &str, repo: &str, e: forge::Error) -> Failure {
    match e.status() {
        Some(404) => ApiError::field(
            field,
            format!("repository {repo} not found, or the forge token cannot see it"),
        )
        .into(),
        Some(401 | 403) => ApiError::field(
            field,
            format!("the forge refused the token for {repo}: {e}"),
        )
        .into(),
        _ => ApiError::new(
            ErrorCode::Unavailable,
            format!("the forge did not answer: {e}"),
        )
        .into(),
    }
}

/// The forge, or a 409 saying none is configured.
fn handle(app: &App) -> Answer<&Handle> {
    app.forge.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            "no forge is configured on the coordinator (set forge-token or forge-token-file)",
        )
        .into()
    })
}

async fn run_sync(app: &App, task_id: TaskId) -> Answer<PrSync> {
    let handle = handle(app)?;
    let task =
        app.state.load_task(task_id).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("task {task_id} not found"))
        })?;
    let fx = app.effects()?;
    let before = task.pr.clone();
    let synced = service::sync(fx, handle, task).await.map_err(|e| match e {
        service::SyncError::Control(e) => Failure::from(e),
        service::SyncError::Forge(e) => ApiError::new(
            ErrorCode::Unavailable,
            format!("the forge did not answer: {e}"),
        )
        .into(),
    })?;
    Ok(PrSync {
        task_id: Some(task_id),
        outcome: synced.outcome,
        pr: synced.task.and_then(|t| t.pr).or(before),
    })
}

/// Sync a task's pull request: open it if the task completed without one, then hand new
/// review comments to the agents that own the files they touch (or stop the loop and ask a
/// person). Never reviews the same head twice.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/pr/sync",
    tag = "tasks",
    params(("id" = TaskId, Path, description = "The task's id (a UUID).")),
    responses(
        (status = 200, description = "What the sync did.", body = PrSync),
        (status = 409, description = "No forge is configured, or a turn cannot start now (`conflict`).", body = ApiError),
        (status = 503, description = "The forge did not answer (`unavailable`).", body = ApiError),
    )
)]
async fn sync(
    AxumState(app): AxumState<App>,
    Path(id): Path<String>,
) -> Answer<axum::Json<PrSync>> {
    let task_id = super::answer::parse_id(&id)?;
    Ok(axum::Json(run_sync(&app, task_id).await?))
}

#[derive(Deserialize)]
struct Delivery {
    #[serde(default)]
    pull_request: Option<DeliveryPull>,
}

#[derive(Deserialize)]
struct DeliveryPull {
    head: DeliveryHead,
}

#[derive(Deserialize)]
struct DeliveryHead {
    #[serde(rename = "ref")]
    branch: String,
}

/// Events that can carry review comments.
const REVIEW_EVENTS: [&str; 3] = [
    "pull_request_review_comment",
    "pull_request_review",
    "pull_request",
];

/// GitHub's webhook: a delivery signed with the webhook secret (`X-Hub-Signature-256`,
/// HMAC-SHA256 of the body) about a pull request from a task branch syncs that task, as
/// `pr/sync` does. A missing or wrong signature is a 401 and changes nothing.
#[utoipa::path(
    post,
    path = "/v1/forge/github/webhook",
    tag = "tasks",
    request_body(content = String, description = "GitHub's JSON delivery.", content_type = "application/json"),
    params(
        ("X-Hub-Signature-256" = String, Header, description = "`sha256=` and the HMAC-SHA256 of the body under the webhook secret, in hex."),
        ("X-GitHub-Event" = String, Header, description = "The event's name (`pull_request_review_comment`, `pull_request_review`, `ping`, ...)."),
    ),
    responses(
        (status = 200, description = "What the delivery did (`outcome`).", body = PrSync),
        (status = 401, description = "The signature is missing or wrong (`unauthorized`).", body = ApiError),
    )
)]
async fn github_webhook(
    AxumState(app): AxumState<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer<(StatusCode, axum::Json<PrSync>)> {
    let unauthorized = || {
        Failure(ApiError::new(
            ErrorCode::Unauthorized,
            "X-Hub-Signature-256: missing or not the signature of this body under the webhook secret",
        ))
    };
    let secret = app
        .forge
        .as_ref()
        .and_then(|h| h.config.webhook_secret.as_ref())
        .ok_or_else(unauthorized)?;
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !orch_shared::signature::verify(secret.expose(), &body, signature) {
        tracing::warn!("forge webhook delivery with a bad signature refused");
        return Err(unauthorized());
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ignored = |why: String| {
        Ok((
            StatusCode::OK,
            axum::Json(PrSync {
                task_id: None,
                outcome: why,
                pr: None,
            }),
        ))
    };
    if !REVIEW_EVENTS.contains(&event) {
        return ignored(format!("event `{event}` ignored"));
    }
    let delivery: Delivery = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("body: {e}")))?;
    let Some(branch) = delivery.pull_request.map(|p| p.head.branch) else {
        return ignored("no pull request in the delivery".into());
    };
    let Some(task_id) = service::task_of_branch(&branch) else {
        return ignored(format!("branch {branch} is not a task branch"));
    };
    if branch != GitJob::task_branch(task_id) {
        return ignored(format!("branch {branch} is not a task branch"));
    }
    Ok((StatusCode::OK, axum::Json(run_sync(&app, task_id).await?)))
}
