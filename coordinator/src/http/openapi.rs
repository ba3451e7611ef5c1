//! The OpenAPI 3.1 document of the HTTP API, built from the same handlers the router serves.
//!
//! Every route is registered through [`utoipa_axum::router::OpenApiRouter::routes`] with
//! `routes!(handler)`, where `handler` carries a `#[utoipa::path(...)]` attribute naming its
//! method, path, parameters, body and success answers; the router and the document therefore
//! come from one line per route. [`document`] adds what every route shares: the bearer token,
//! and the error answers (`{code, message}`, [`ApiError`]) each kind of route can give, so a
//! handler's attribute lists only its own special cases (a 409, a second success status).
//!
//! The document is checked in as `docs/openapi.json`; the test `checked_in_document_is_current`
//! fails when the two differ, and rewrites the file when run with `ORCH_BLESS=1`.

use axum::response::IntoResponse;
use orch_shared::error::{ApiError, ErrorCode};
use utoipa::openapi::path::{HttpMethod, Operation, ParameterIn};
use utoipa::openapi::response::Response;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{ContentBuilder, InfoBuilder, LicenseBuilder, OpenApi, Ref, RefOr, Tag};
use utoipa::{OpenApi as _, ToSchema};

/// Where the document is served (without authentication: it holds no data).
pub const PATH: &str = "/v1/openapi.json";

#[derive(utoipa::OpenApi)]
// Types only referenced from query parameters are not collected by their routes.
#[openapi(components(schemas(ApiError, ErrorCode, orch_shared::report::ExportWhat)))]
struct Base;

/// The shared error answers: (status, name, description).
const ERRORS: [(&str, &str, &str); 6] = [
    (
        "400",
        "BadRequest",
        "Bad input: `malformed_body` or `invalid_field`; the message starts with the field at fault (`prompt: must not be empty`).",
    ),
    (
        "401",
        "Unauthorized",
        "No valid bearer token (when the coordinator has tokens configured).",
    ),
    (
        "404",
        "NotFound",
        "No such task or agent, or not visible to this tenant's token (`not_found`).",
    ),
    (
        "413",
        "PayloadTooLarge",
        "The body is larger than 1 MiB (`payload_too_large`).",
    ),
    ("500", "Internal", "An internal error (`internal`)."),
    (
        "503",
        "Unavailable",
        "Redis or NATS is unreachable, or no coordinator leads right now; retry (`unavailable`).",
    ),
];

/// The whole document: the routes' own annotations plus the shared parts.
pub fn document() -> OpenApi {
    let (_, routes) = super::api_routes().split_for_parts();
    let mut doc = Base::openapi();
    doc.info = InfoBuilder::new()
        .title("orchestrator")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The coordinator's HTTP API: submit tasks to a cluster of coding agents, follow \
             them, steer their agents, and read the cluster's history and costs. Every error \
             is a JSON object `{code, message}`.",
        ))
        .license(Some(LicenseBuilder::new().name("MIT").build()))
        .build();
    doc.merge(routes);
    doc.tags = Some(tags());
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    for (_, name, description) in ERRORS {
        let body = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(ApiError::name())))
            .build();
        components.responses.insert(
            name.to_string(),
            RefOr::T(
                Response::builder()
                    .description(description)
                    .content("application/json", body)
                    .build(),
            ),
        );
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let v1 = path.starts_with("/v1/") && path != PATH;
        // The forge's webhook is signed rather than authenticated with a token.
        let signed = path == super::forge::WEBHOOK_PATH;
        for method in [HttpMethod::Get, HttpMethod::Post] {
            let op = match method {
                HttpMethod::Get => item.get.as_mut(),
                _ => item.post.as_mut(),
            };
            if let Some(op) = op
                && v1
            {
                add_errors(op);
                if signed {
                    op.security = Some(vec![SecurityRequirement::default()]);
                }
            }
        }
    }
    doc
}

/// The error answers an operation can give, from what it takes: every `/v1` route checks the
/// token and reaches Redis or NATS; one with input can reject it; one with a path id can miss.
fn add_errors(op: &mut Operation) {
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_path_id = params
        .iter()
        .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == ParameterIn::Path));
    let has_body = op.request_body.is_some();
    let mut wanted = vec!["401", "500", "503"];
    if has_body || !params.is_empty() {
        wanted.push("400");
    }
    if has_path_id {
        wanted.push("404");
    }
    if has_body {
        wanted.push("413");
    }
    for (status, name, _) in ERRORS {
        if wanted.contains(&status) {
            op.responses
                .responses
                .entry(status.to_string())
                .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
        }
    }
    op.security = Some(vec![
        SecurityRequirement::new("bearer", Vec::<String>::new()),
        // No token at all, for a coordinator without tokens configured.
        SecurityRequirement::default(),
    ]);
}

fn tags() -> Vec<Tag> {
    [
        ("tasks", "Submit, show, list, follow and cancel tasks."),
        (
            "agents",
            "The agents (jobs) of tasks: details, transcripts, kill, send, fork.",
        ),
        (
            "cluster",
            "Cluster status, workers, the event stream, dead letters.",
        ),
        (
            "approvals",
            "Agents waiting for a person's approval of a tool: list and answer.",
        ),
        ("reports", "Cost reports, exports and clean-up."),
        ("meta", "Health, readiness, metrics and this document."),
    ]
    .into_iter()
    .map(|(name, description)| {
        TagBuilder::new()
            .name(name)
            .description(Some(description))
            .build()
    })
    .collect()
}

/// The document as served: pretty JSON with a final newline (the checked-in file's bytes).
pub fn render(doc: &OpenApi) -> String {
    let mut text = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// `GET /v1/openapi.json`: the document, built once.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json"))
)]
pub(super) async fn serve() -> impl IntoResponse {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        TEXT.get_or_init(|| render(&document())).as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let built = render(&document());
        if std::env::var_os("ORCH_BLESS").is_some() {
            std::fs::write(path, &built).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == built,
            "docs/openapi.json is not the document the routes describe; run \
             `ORCH_BLESS=1 cargo nextest run -p orch-coordinator checked_in_document_is_current` \
             and commit the file"
        );
    }

    #[test]
    fn every_v1_operation_has_the_error_shapes() {
        let doc = document();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.post].into_iter().flatten() {
                if !path.starts_with("/v1/") || path == PATH {
                    continue;
                }
                operations += 1;
                for status in ["401", "500", "503"] {
                    assert!(
                        op.responses.responses.contains_key(status),
                        "{path} lacks {status}"
                    );
                }
                if path.contains("{id}") {
                    assert!(
                        op.responses.responses.contains_key("404"),
                        "{path} lacks 404"
                    );
                    assert!(
                        op.responses.responses.contains_key("400"),
                        "{path} lacks 400"
                    );
                }
            }
        }
        assert!(operations >= 20, "only {operations} operations");
    }
}
