//! The "needs you" queue: `GET /v1/approvals` lists the requests of agents waiting for a
//! person's approval of a tool, `POST /v1/approvals/{id}` answers one, exactly once (a second
//! answer is a 409). A tenant's token sees and answers only its own tasks' requests; another
//! tenant's is "not found".

use super::answer::{Answer, parse_body};
use super::app::App;
use super::auth::Caller;
use crate::state::approvals::{self as store, Answered};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State as AxumState};
use orch_shared::api::{AnswerApproval, Approval, ApprovalList};
use orch_shared::error::{ApiError, ErrorCode};
use orch_shared::ids::TaskId;
use std::collections::HashMap;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest message an answer may carry.
const MAX_MESSAGE_CHARS: usize = 4000;
/// The longest `--always` pattern.
const MAX_PATTERN_CHARS: usize = 500;

pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(answer))
}

fn tenant_of(caller: &Option<axum::Extension<Caller>>) -> Option<String> {
    caller.as_ref().and_then(|c| c.tenant.clone())
}

/// The tenant of the task a request belongs to (`None`: an admin's task, or a task gone).
async fn task_tenant(app: &App, task: &str) -> Answer<Option<String>> {
    let Ok(id) = task.parse::<TaskId>() else {
        return Ok(None);
    };
    Ok(app.state.load_task(id).await?.and_then(|t| t.tenant))
}

/// The requests of agents waiting for a person (pending ones first, oldest first), then
/// those answered in the last day.
#[utoipa::path(
    get,
    path = "/v1/approvals",
    operation_id = "list_approvals",
    tag = "approvals",
    responses((status = 200, description = "The approval requests the caller may see.", body = ApprovalList))
)]
async fn list(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
) -> Answer<axum::Json<ApprovalList>> {
    let mut all = app.state.approvals().await?;
    if let Some(tenant) = tenant_of(&caller) {
        let mut tenants: HashMap<String, Option<String>> = HashMap::new();
        let mut mine = Vec::with_capacity(all.len());
        for a in all {
            if !tenants.contains_key(&a.task_id) {
                let t = task_tenant(&app, &a.task_id).await?;
                tenants.insert(a.task_id.clone(), t);
            }
            if tenants.get(&a.task_id).and_then(Option::as_deref) == Some(tenant.as_str()) {
                mine.push(a);
            }
        }
        all = mine;
    }
    // Pending first, oldest first among them (the one waiting longest is at the top); then
    // the rest, newest first.
    all.sort_by_key(|a: &Approval| {
        let pending = a.state == "pending";
        (
            !pending,
            if pending {
                a.created_ms as i128
            } else {
                -(a.created_ms as i128)
            },
        )
    });
    Ok(axum::Json(ApprovalList {
        now_ms: orch_shared::now_ms(),
        approvals: all,
    }))
}

/// Approve or deny a request. `scope: task` also allows the same tool and input for the rest
/// of the task; `scope: always` with a `pattern` allows the tool for every task of the
/// caller's tenant.
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}",
    operation_id = "answer_approval",
    tag = "approvals",
    params(("id" = String, Path, description = "The request's id (16 hex digits).")),
    request_body = AnswerApproval,
    responses(
        (status = 200, description = "The request, answered.", body = Approval),
        (status = 409, description = "Already answered, or past its deadline (`conflict`).", body = orch_shared::error::ApiError),
    )
)]
async fn answer(
    AxumState(app): AxumState<App>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Answer<axum::Json<Approval>> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::field("id", format!("expected 16 hex digits, got `{id}`")).into());
    }
    let req: AnswerApproval = parse_body(body)?;
    let approved = match req.decision.as_str() {
        "approve" => true,
        "deny" => false,
        other => {
            return Err(ApiError::field(
                "decision",
                format!("unknown value `{other}` (expected approve or deny)"),
            )
            .into());
        }
    };
    let scope = req.scope.as_deref().unwrap_or("once");
    if !["once", "task", "always"].contains(&scope) {
        return Err(ApiError::field(
            "scope",
            format!("unknown value `{scope}` (expected once, task or always)"),
        )
        .into());
    }
    if scope != "once" && !approved {
        return Err(ApiError::field(
            "scope",
            "only an approval can be given for a task or always",
        )
        .into());
    }
    let pattern = match (scope, req.pattern.as_deref()) {
        ("always", Some(p)) if !p.trim().is_empty() && p.chars().count() <= MAX_PATTERN_CHARS => {
            Some(p.trim().to_string())
        }
        ("always", _) => {
            return Err(ApiError::field(
                "pattern",
                format!("required with scope always: 1 to {MAX_PATTERN_CHARS} characters, `*` matching anything"),
            )
            .into());
        }
        (_, Some(_)) => {
            return Err(ApiError::field("pattern", "only with scope always").into());
        }
        _ => None,
    };
    let message = req.message.unwrap_or_default();
    if message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(ApiError::field(
            "message",
            format!("longer than {MAX_MESSAGE_CHARS} characters"),
        )
        .into());
    }
    let not_found = || {
        ApiError::new(
            ErrorCode::NotFound,
            format!("approval request {id} not found"),
        )
    };
    let found = app.state.approval(&id).await?.ok_or_else(not_found)?;
    let task_tenant = task_tenant(&app, &found.task_id).await?;
    let caller_tenant = tenant_of(&caller);
    if caller_tenant.is_some() && caller_tenant != task_tenant {
        return Err(not_found().into());
    }
    let grant = match scope {
        "task" => {
            let task: TaskId = found.task_id.parse().map_err(|_| not_found())?;
            Some((
                format!("{}({})", found.tool, found.summary),
                store::task_grants(task),
            ))
        }
        "always" => Some((
            format!("{}({})", found.tool, pattern.unwrap_or_default()),
            store::tenant_grants(task_tenant.as_deref()),
        )),
        _ => None,
    };
    let by = match &caller_tenant {
        Some(t) => format!("tenant:{t}"),
        None => "admin".to_string(),
    };
    let stored = store::Answer {
        approved,
        by: &by,
        message: &message,
        grant,
    };
    match app.state.answer_approval(&id, &stored).await? {
        Answered::Done => {}
        Answered::Missing => return Err(not_found().into()),
        Answered::Already => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("approval request {id} was answered already"),
            )
            .into());
        }
        Answered::Expired => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("approval request {id} is past its deadline (it is denied)"),
            )
            .into());
        }
    }
    Ok(axum::Json(
        app.state.approval(&id).await?.ok_or_else(not_found)?,
    ))
}
