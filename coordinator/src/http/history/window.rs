//! The window of history a request reads: a time range of tasks, newest first, page by page.

use crate::http::answer::{Answer, field};
use crate::http::app::App;
use crate::state::history::Range;

/// Tasks a filtered listing in creation order examines per page.
pub const SCAN_BUDGET: usize = 5_000;
/// Tasks a listing sorted by something else than creation reads.
pub const MAX_SORTED_TASKS: usize = 10_000;
/// Tasks read from Redis at a time.
pub const PAGE: usize = 200;
/// Unfinished tasks `GET /v1/status` and `GET /v1/agents?status=<unfinished>` read.
pub const MAX_ACTIVE_TASKS: usize = 10_000;

/// The `since`/`until` window of a query (ms since the epoch), `until` after `since`.
pub fn range(since: Option<u64>, until: Option<u64>) -> Answer<Range> {
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(field("until", "must be after since"));
    }
    Ok(Range {
        since_ms: since,
        until_ms: until,
    })
}

/// Every task of `range` (as `T`, the part of the record read: see
/// [`crate::state::State::load_records`]), newest first, `PAGE` at a time, at most `max`; and whether more were
/// left.
pub async fn tasks_in_range<T: serde::de::DeserializeOwned>(
    app: &App,
    range: Range,
    max: usize,
    mut each: impl FnMut(T),
) -> Answer<bool> {
    let mut before = None;
    let mut read = 0;
    loop {
        let want = PAGE.min(max - read);
        if want == 0 {
            let more = !app.state.task_ids_desc(range, before, 1).await?.is_empty();
            return Ok(more);
        }
        let ids = app.state.task_ids_desc(range, before, want).await?;
        if ids.is_empty() {
            return Ok(false);
        }
        read += ids.len();
        before = ids.last().copied();
        let short = ids.len() < want;
        for task in app.state.load_records::<T>(&ids).await? {
            each(task);
        }
        if short {
            return Ok(false);
        }
    }
}
