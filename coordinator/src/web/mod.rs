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
//! (`HttpOnly`, `SameSite=Strict`, hex-encoded), never in the page. [`crate::api`] accepts that
//! cookie on `/v1` too (an `EventSource` cannot send an `Authorization` header); a request
//! authenticated by the cookie that is not a `GET` must carry [`CSRF_HEADER`].
//!
//! Layout:
//! - `mod.rs`: routes, login and logout, the session cookie, static assets.
//! - [`pages`]: the page templates (plain format strings, HTML-escaped values).
//! - `assets/`: `app.css` (light and dark themes, narrow screens) and `app.js`.

mod pages;

use crate::api::{App, token_ok};
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

/// The session cookie's name.
pub const COOKIE: &str = "orch_session";
/// The header the page sends with every `/v1` request that changes something.
pub const CSRF_HEADER: &str = "x-orch-dashboard";
/// How long a session cookie lives (seconds).
const SESSION_MAX_AGE_S: u64 = 12 * 3600;

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// The dashboard's routes: pages, login/logout and assets. Merged into [`crate::api::router`]
/// outside the bearer-authenticated `/v1` router; pages check the session cookie themselves.
pub fn routes() -> Router<App> {
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

/// The token in the request's session cookie, if it has one.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| hex_decode(value))
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Whether the request carries a valid session (always, when the coordinator has no token).
fn signed_in(app: &App, headers: &HeaderMap) -> bool {
    app.tokens.is_open() || session_token(headers).is_some_and(|t| token_ok(app, &t))
}

/// A page for a signed-in user, or a redirect to the login page that comes back here.
fn page(app: &App, headers: &HeaderMap, here: &str, html: impl FnOnce() -> String) -> Response {
    if !signed_in(app, headers) {
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

async fn login(State(app): State<App>, Form(form): Form<LoginForm>) -> Response {
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
    if !token_ok(&app, token) {
        tracing::warn!("dashboard login refused: invalid token");
        return back("invalid");
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_MAX_AGE_S}",
        hex_encode(token)
    );
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
        HeaderValue::from_static("orch_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn overview(State(app): State<App>, headers: HeaderMap) -> Response {
    page(&app, &headers, "/", pages::overview)
}

async fn new_task(State(app): State<App>, headers: HeaderMap) -> Response {
    page(&app, &headers, "/tasks/new", pages::new_task)
}

/// Ids go into the page as data attributes; anything but an id-like string is refused here so
/// a mistyped URL gets a plain 404 rather than a page that fails later.
fn id_like(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

async fn task(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !id_like(&id) {
        return (StatusCode::NOT_FOUND, "no such task").into_response();
    }
    let here = format!("/tasks/{id}");
    page(&app, &headers, &here, || pages::task(&id))
}

async fn agent(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !id_like(&id) {
        return (StatusCode::NOT_FOUND, "no such agent").into_response();
    }
    let here = format!("/agents/{id}");
    page(&app, &headers, &here, || pages::agent(&id))
}

async fn history(State(app): State<App>, headers: HeaderMap) -> Response {
    page(&app, &headers, "/history", pages::history)
}

async fn costs(State(app): State<App>, headers: HeaderMap) -> Response {
    page(&app, &headers, "/costs", pages::costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_cookie_round_trips_any_token() {
        let token = "tök;en =,x";
        let mut headers = HeaderMap::new();
        let cookie = format!("a=b; {COOKIE}={}; c=d", hex_encode(token));
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some(token));
    }

    #[test]
    fn malformed_session_cookie_is_no_session() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("orch_session=zz1"));
        assert_eq!(session_token(&headers), None);
    }

    #[test]
    fn login_only_redirects_to_local_paths() {
        assert_eq!(safe_next(Some("/tasks/x")), "/tasks/x");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
