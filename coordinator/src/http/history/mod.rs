//! The history, report and cluster-view endpoints: filtered task listings, agents (jobs) and
//! their transcripts, the cluster status, the cluster-wide event stream, cost reports,
//! streaming exports and the deletion of old tasks.
//!
//! Bounds (no request scans keys, and none reads an unbounded part of the history):
//! - a filtered task listing in creation order examines at most [`window::SCAN_BUDGET`] tasks per page
//!   and returns a cursor to go on from where it stopped;
//! - a listing sorted by cost, duration or tokens, and a cost report, read at most
//!   [`window::MAX_SORTED_TASKS`] / [`orch_shared::report::MAX_REPORT_TASKS`] tasks of the requested window, newest first,
//!   and say so when there were more (`x-orch-truncated` header, `truncated` field);
//! - an export streams its window page by page ([`window::PAGE`] tasks, or events fetched in batches);
//! - a clean call examines at most [`orch_shared::report::MAX_CLEAN_BATCH`] tasks and returns where to go on.
//!
//! Transcripts come from the event log (`ORCH_EVENTS`, kept 7 days by default): every event
//! is one NATS message of at most 1 MiB (the server's max payload). Events are sent as stored,
//! except on `GET /v1/events`, which cuts text, tool inputs and tool outputs to `max_chars`
//! characters (default [`events::DEFAULT_MAX_CHARS`]) and says how much it cut.
//!
//! Layout: [`tasks`] (`GET /v1/tasks`), [`agents`], [`transcripts`] (logs and a task's event
//! stream), [`status`] (status, workers), [`events`] (`GET /v1/events`), [`costs`], [`export`],
//! [`clean`]; [`window`] is the time range and paging they share.

pub mod agents;
pub mod clean;
pub mod costs;
pub mod events;
pub mod export;
pub mod status;
pub mod tasks;
pub mod transcripts;
pub mod window;

use super::app::App;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(super) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(tasks::list))
        .routes(routes!(transcripts::task_events))
        .routes(routes!(transcripts::task_logs))
        .routes(routes!(agents::agents))
        .routes(routes!(agents::agent))
        .routes(routes!(agents::checkpoints))
        .routes(routes!(transcripts::agent_logs))
        .routes(routes!(status::status))
        .routes(routes!(status::workers))
        .routes(routes!(status::quotas))
        .routes(routes!(events::cluster_events))
        .routes(routes!(costs::cost_report))
        .routes(routes!(export::export))
        .routes(routes!(clean::clean))
}
