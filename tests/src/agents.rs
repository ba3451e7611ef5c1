//! Running one agent in-process, as a worker would: its config loaded from flags (the same
//! loader the worker binary uses), its `Backends`, and a run that returns the report with every
//! event the agent sent.

use orch_shared::event::EventKind;
use orch_shared::job::JobSpec;
use orch_worker::agent::backends::Backends;
use orch_worker::agent::{Agent, Events, Report};
use orch_worker::config::{self, Config};
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A worker config named `id` with its data under `dir`, talking to the fake providers given
/// (with test keys), plus `more` flags; API retries are shortened so failures are fast.
pub fn worker_config(
    id: &str,
    dir: &Path,
    anthropic: Option<&str>,
    openai: Option<&str>,
    more: &[OsString],
) -> Config {
    let mut flags: Vec<OsString> = vec![
        "--id".into(),
        id.into(),
        "--data-dir".into(),
        dir.into(),
        "--anthropic-api-key".into(),
        "test-key-anthropic".into(),
        "--openai-api-key".into(),
        "test-key-openai".into(),
    ];
    if let Some(url) = anthropic {
        flags.extend(["--anthropic-base-url".into(), url.into()]);
    }
    if let Some(url) = openai {
        flags.extend(["--openai-base-url".into(), url.into()]);
    }
    flags.extend(more.iter().cloned());
    let mut cfg = config::from_flags(flags).expect("a valid config");
    for api in [&mut cfg.backends.anthropic, &mut cfg.backends.openai] {
        api.retry_min_delay = Duration::from_millis(50);
        api.retry_max_delay = Duration::from_millis(200);
        api.max_attempts = 3;
    }
    cfg
}

/// Runs `job` to its end (at most a minute); returns the report and every event the agent
/// sent.
pub async fn run(backends: &Backends, job: &JobSpec) -> (Report, Vec<EventKind>) {
    run_with(backends, job, CancellationToken::new()).await
}

/// [`run`], stopped when `cancel` is.
pub async fn run_with(
    backends: &Backends,
    job: &JobSpec,
    cancel: CancellationToken,
) -> (Report, Vec<EventKind>) {
    let (events, mut rx) = Events::new();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        backends.run_report(job, events, cancel),
    )
    .await
    .expect("the agent finished within a minute");
    let mut seen = vec![];
    while let Ok(e) = rx.try_recv() {
        seen.push(e);
    }
    (report, seen)
}
