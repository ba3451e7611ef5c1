//! The web dashboard: HTML pages served by the coordinator itself, on the API's port.
//!
//! Each page is a server-rendered shell (layout, navigation, forms) from the templates in
//! [`pages`]; a small script (`assets/app.js`) fills it from the same `/v1` JSON API and
//! server-sent event streams `orchctl` uses, so every action in the page is an API call a user
//! can also make with `orchctl`, and nothing the page shows is older than the last event. The
//! templates, the script and the stylesheet are compiled into the binary: `cargo build` yields
//! the whole product.
//!
//! Auth: the login page takes an API token and keeps it in the `orch_session` cookie
//! (`HttpOnly`, `SameSite=Strict`, hex-encoded), never in the page. The API accepts that
//! cookie on `/v1` too (an `EventSource` cannot send an `Authorization` header); a request
//! authenticated by the cookie that is not a `GET` must carry [`auth::CSRF_HEADER`]. Every
//! rule of who may call lives in [`crate::http::auth`]; this module only uses it.
//!
//! Layout:
//! - `mod.rs`: routes, login and logout, static assets.
//! - [`pages`]: the page templates (plain format strings, HTML-escaped values).
//! - `assets/`: `app.css` (light and dark themes, narrow screens) and `app.js`.

mod pages;

use crate::http::auth::{self, Tokens};
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use std::sync::Arc;

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// The dashboard's routes: pages, login/logout and assets. Merged into [`crate::http::router`]
/// outside the bearer-authenticated `/v1` router; pages check the session cookie themselves.
pub fn routes(tokens: Arc<Tokens>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/tasks/new", get(new_task))
        .route("/tasks/{id}", get(task))
        .route("/agents/{id}", get(agent))
        .route("/history", get(history))
        .route("/costs", get(costs))
        .route(
            "/ui/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route(
            "/ui/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route("/ui/icon.svg", get(|| asset("image/svg+xml", ICON_SVG)))
        .with_state(tokens)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// A page for a signed-in user, or a redirect to the login page that comes back here.
fn page(
    tokens: &Tokens,
    headers: &HeaderMap,
    here: &str,
    html: impl FnOnce() -> String,
) -> Response {
    if !tokens.signed_in(headers) {
        let next = pages::url_encode(here);
        return Redirect::to(&format!("/login?next={next}")).into_response();
    }
    no_store(Html(html()).into_response())
}

/// Pages hold live data: never cache them.
fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Only local paths are followed after a login (no open redirect to another site).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    let error = match q.error.as_deref() {
        Some("invalid") => Some("That token is not valid for this cluster."),
        Some("empty") => Some("Enter an API token."),
        _ => None,
    };
    no_store(Html(pages::login(safe_next(q.next.as_deref()), error)).into_response())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(tokens): State<Arc<Tokens>>, Form(form): Form<LoginForm>) -> Response {
    let next = safe_next(form.next.as_deref()).to_string();
    let token = form.token.trim();
    let back = |error: &str| {
        Redirect::to(&format!(
            "/login?error={error}&next={}",
            pages::url_encode(&next)
        ))
        .into_response()
    };
    if token.is_empty() {
        return back("empty");
    }
    if !tokens.accepts(token) {
        tracing::warn!("dashboard login refused: invalid token");
        return back("invalid");
    }
    let cookie = auth::session_cookie(token);
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(auth::END_SESSION),
    );
    r
}

async fn overview(State(tokens): State<Arc<Tokens>>, headers: HeaderMap) -> Response {
    page(&tokens, &headers, "/", pages::overview)
}

async fn new_task(State(tokens): State<Arc<Tokens>>, headers: HeaderMap) -> Response {
    page(&tokens, &headers, "/tasks/new", pages::new_task)
}

/// Ids go into the page as data attributes; anything but an id-like string is refused here so
/// a mistyped URL gets a plain 404 rather than a page that fails later.
fn id_like(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

async fn task(
    State(tokens): State<Arc<Tokens>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !id_like(&id) {
        return (StatusCode::NOT_FOUND, "no such task").into_response();
    }
    let here = format!("/tasks/{id}");
    page(&tokens, &headers, &here, || pages::task(&id))
}

async fn agent(
    State(tokens): State<Arc<Tokens>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !id_like(&id) {
        return (StatusCode::NOT_FOUND, "no such agent").into_response();
    }
    let here = format!("/agents/{id}");
    page(&tokens, &headers, &here, || pages::agent(&id))
}

async fn history(State(tokens): State<Arc<Tokens>>, headers: HeaderMap) -> Response {
    page(&tokens, &headers, "/history", pages::history)
}

async fn costs(State(tokens): State<Arc<Tokens>>, headers: HeaderMap) -> Response {
    page(&tokens, &headers, "/costs", pages::costs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::role::Role;

    /// The array literal `const NAME = [...]` of the dashboard's script, as strings.
    fn js_list(name: &str) -> Vec<String> {
        let start = format!("const {name} = [");
        let from = APP_JS
            .find(&start)
            .unwrap_or_else(|| panic!("app.js has no `{start}`"))
            + start.len();
        let end = from + APP_JS[from..].find(']').expect("an array literal ends");
        APP_JS[from..end]
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn names<T>(values: impl Iterator<Item = T>, name: fn(&T) -> &'static str) -> Vec<String> {
        values.map(|v| name(&v).to_string()).collect()
    }

    #[test]
    fn the_scripts_name_lists_are_the_rust_ones() {
        use orch_shared::api::{JobStatus, TaskStatus};
        use orch_shared::event::EventKind;
        use strum::{IntoEnumIterator, VariantNames};
        assert_eq!(js_list("EVENT_KINDS"), EventKind::VARIANTS);
        assert_eq!(js_list("ROLE_ORDER"), Role::VARIANTS);
        assert_eq!(
            js_list("TASK_ENDED"),
            names(
                TaskStatus::iter().filter(|s| s.is_terminal()),
                TaskStatus::as_str
            )
        );
        assert_eq!(
            js_list("JOB_ENDED"),
            names(
                JobStatus::iter().filter(|s| s.is_terminal()),
                JobStatus::as_str
            )
        );
    }

    #[test]
    fn login_only_redirects_to_local_paths() {
        assert_eq!(safe_next(Some("/tasks/x")), "/tasks/x");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
