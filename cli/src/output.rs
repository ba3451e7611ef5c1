//! What orchctl prints on stdout: human tables (comfy-table) or the API's JSON.
//!
//! Every printer writes to a `&mut dyn Write` and returns `io::Result`, so a closed pipe surfaces
//! as an error that `main` turns into a quiet exit instead of a panic in `println!`.

use comfy_table::{Cell, ContentArrangement, Table, presets};
use orch_shared::api::{DryRun, Estimate, EstimateSource, Job, JobStatus, Task};
use orch_shared::role::Role;
use serde::Serialize;
use std::io::{self, Write};

/// `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    #[default]
    Table,
    /// The API's JSON, one document on stdout.
    Json,
}

/// Writes `value` as pretty JSON followed by a newline.
pub fn json<T: Serialize + ?Sized>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    // `From<serde_json::Error>` keeps an underlying io error's kind (a broken pipe stays one).
    serde_json::to_writer_pretty(&mut *out, value).map_err(io::Error::from)?;
    writeln!(out)
}

/// A table in the house style, with a header row.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<Cell>,
{
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .apply_modifier(comfy_table::modifiers::UTF8_ROUND_CORNERS)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// A two-column key/value table without a header.
pub fn details(rows: &[(&str, String)]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .apply_modifier(comfy_table::modifiers::UTF8_ROUND_CORNERS)
        .set_content_arrangement(ContentArrangement::Dynamic);
    for (k, v) in rows {
        t.add_row(vec![Cell::new(k), Cell::new(v)]);
    }
    t
}

pub fn print_table(out: &mut dyn Write, table: &Table) -> io::Result<()> {
    writeln!(out, "{table}")
}

/// `850ms`, `12.3s`, `2m05s`, `1h02m`.
pub fn duration_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// Dollars with four decimals (agent runs often cost fractions of a cent).
pub fn cost(usd: f64) -> String {
    format!("${usd:.4}")
}

/// `12,345`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How long ago `at_ms` was, relative to `now_ms`.
pub fn age(now_ms: u64, at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let d = now_ms.saturating_sub(at_ms);
    if d < 1_000 {
        "just now".into()
    } else if d < 60_000 {
        format!("{}s ago", d / 1000)
    } else if d < 3_600_000 {
        format!("{}m ago", d / 60_000)
    } else if d < 86_400_000 {
        format!("{}h ago", d / 3_600_000)
    } else {
        format!("{}d ago", d / 86_400_000)
    }
}

/// Cuts `s` to at most `max` characters (on one line), marking the cut with `…`.
/// How long until `at_ms` ("in 4m"), or "now" once it has passed.
pub fn age_until(now_ms: u64, at_ms: u64) -> String {
    if at_ms <= now_ms {
        "now".into()
    } else {
        format!("in {}", duration_ms(at_ms - now_ms))
    }
}

pub fn truncate(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The last 8 characters of an id: UUIDv7 ids made in the same millisecond share their start,
/// so the end is what tells them apart.
pub fn short_id(id: impl std::fmt::Display) -> String {
    let id = id.to_string();
    id[id.len().saturating_sub(8)..].to_string()
}

pub fn roles(roles: &[Role]) -> String {
    roles.iter().map(Role::as_str).collect::<Vec<_>>().join(",")
}

/// How long a job ran, if it started.
pub fn job_duration_ms(job: &Job, now_ms: u64) -> Option<u64> {
    let start = job.started_at_ms?;
    Some(job.finished_at_ms.unwrap_or(now_ms).saturating_sub(start))
}

/// `bug_fix (plan: bug_fix_template)`, or just the type when the plan has the same name.
fn task_type(task: &Task) -> String {
    if task.plan_source == task.task_type || task.plan_source.is_empty() {
        task.task_type.clone()
    } else {
        format!("{} (plan: {})", task.task_type, task.plan_source)
    }
}

/// The short table printed after a submit: id, status, roles.
pub fn task_brief(out: &mut dyn Write, task: &Task) -> io::Result<()> {
    let roles: Vec<Role> = task.jobs.iter().map(|j| j.role).collect();
    let rows = [
        ("id", task.id.to_string()),
        ("status", task.status.as_str().to_string()),
        (
            "roles",
            if roles.is_empty() {
                "-".to_string()
            } else {
                self::roles(&roles)
            },
        ),
        ("task type", task_type(task)),
        ("mode", task.mode.as_str().to_string()),
    ];
    let mut rows = rows.to_vec();
    if let Some(pr) = &task.pr {
        rows.push(("pull request", pull_request(pr)));
    }
    print_table(out, &details(&rows))
}

/// A task's pull request in one line: its URL once open, else where it will go.
pub fn pull_request(pr: &orch_shared::api::PullRequest) -> String {
    match (&pr.url, &pr.error) {
        (Some(url), _) => url.clone(),
        (None, Some(e)) => format!("not opened: {e}"),
        (None, None) => format!(
            "{} → {} on {} (when the task completes)",
            pr.head, pr.base, pr.repo
        ),
    }
}

/// The header block of `tasks show`.
pub fn task_details(out: &mut dyn Write, task: &Task, now_ms: u64) -> io::Result<()> {
    let mut rows = vec![
        ("id", task.id.to_string()),
        ("status", task.status.as_str().to_string()),
        ("prompt", truncate(&task.prompt, 200)),
        ("task type", task_type(task)),
        ("mode", task.mode.as_str().to_string()),
        (
            "backend",
            match &task.model {
                Some(m) => format!("{} ({m})", task.backend.as_str()),
                None => task.backend.as_str().to_string(),
            },
        ),
        ("created", age(now_ms, task.created_at_ms)),
    ];
    if let Some(key) = &task.idempotency_key {
        rows.push(("idempotency key", key.clone()));
    }
    if let orch_shared::job::Workspace::Git { url, base_ref, .. } = &task.workspace {
        rows.push(("repository", format!("{url} at {base_ref}")));
    }
    if let Some(branch) = &task.branch {
        rows.push(("branch", branch.clone()));
    }
    if let Some(pr) = &task.pr {
        rows.push(("pull request", pull_request(pr)));
        if let Some(why) = &pr.escalated {
            rows.push(("review", format!("stopped, a person is needed: {why}")));
        } else if pr.rounds > 0 {
            rows.push((
                "review",
                format!("{} round(s) sent to the agents", pr.rounds),
            ));
        }
    }
    if task.options.serialize_conflicts {
        rows.push((
            "conflicts",
            "serialized: a step whose scope overlaps a running one's waits".into(),
        ));
    }
    for w in &task.conflicts {
        let kind = match w.kind.as_str() {
            "same_file" => "both changed",
            _ => "changed inside the other's scope",
        };
        rows.push((
            "conflict warning",
            format!(
                "{} {} and {} {}, {kind}: {}",
                w.role,
                short_id(w.job),
                w.other_role,
                short_id(w.other),
                truncate(&w.paths.join(", "), 120)
            ),
        ));
    }
    print_table(out, &details(&rows))
}

/// A step's file scope for a table cell.
fn scope(paths: &[String]) -> String {
    match paths.is_empty() {
        true => "-".into(),
        false => truncate(&paths.join(" "), 40),
    }
}

/// The "Result" section: the task's output (and its error when it failed).
pub fn task_result(out: &mut dyn Write, task: &Task) -> io::Result<()> {
    writeln!(out, "Result")?;
    writeln!(out, "──────")?;
    let output = task.output.as_deref().map(str::trim).unwrap_or_default();
    if output.is_empty() {
        writeln!(out, "(no output)")?;
    } else {
        writeln!(out, "{output}")?;
    }
    // The coordinator may already have put the error at the end of the output.
    if let Some(err) = task.error.as_ref().filter(|e| !output.contains(e.as_str())) {
        writeln!(out)?;
        writeln!(out, "Error: {err}")?;
    }
    writeln!(out)
}

/// The metrics table (status, cost, tokens, wall time) and the per-agent table.
pub fn task_metrics(out: &mut dyn Write, task: &Task, now_ms: u64) -> io::Result<()> {
    let u = &task.usage;
    let rows = [
        ("status", task.status.as_str().to_string()),
        ("total cost", cost(task.cost_usd)),
        ("input tokens", count(u.input_tokens)),
        ("output tokens", count(u.output_tokens)),
        ("cache write tokens", count(u.cache_creation_tokens)),
        ("cache read tokens", count(u.cache_read_tokens)),
        ("wall time", duration_ms(task.elapsed_ms(now_ms))),
    ];
    let mut rows = rows.to_vec();
    if let Some(pr) = &task.pr {
        rows.push(("pull request", pull_request(pr)));
    }
    writeln!(out, "Metrics")?;
    print_table(out, &details(&rows))?;
    if task.jobs.is_empty() {
        return Ok(());
    }
    writeln!(out, "Agents")?;
    print_table(out, &jobs_table(&task.jobs, now_ms))
}

pub fn jobs_table(jobs: &[Job], now_ms: u64) -> Table {
    let scoped = jobs.iter().any(|j| !j.paths.is_empty());
    let mut header = vec![
        "#", "AGENT", "ROLE", "STATUS", "WORKER", "DURATION", "TOKENS", "COST",
    ];
    if scoped {
        header.push("SCOPE");
    }
    let mut t = table(header);
    for (i, job) in jobs.iter().enumerate() {
        let status = match (&job.status, &job.error) {
            (JobStatus::Failed, Some(e)) => format!("failed ({})", e.reason.as_str()),
            (JobStatus::Parked, _) => match &job.parked {
                Some(p) => format!(
                    "parked ({}, until {})",
                    p.summary(),
                    age_until(now_ms, p.until_ms)
                ),
                None => "parked".into(),
            },
            (JobStatus::Pending, _) if job.held_by.is_some() => format!(
                "pending (waiting for {}, scope overlap)",
                job.held_by.map(short_id).unwrap_or_default()
            ),
            (s, _) if job.attempt > 1 => format!("{} (attempt {})", s.as_str(), job.attempt),
            (s, _) => s.as_str().to_string(),
        };
        let mut row = vec![
            (i + 1).to_string(),
            job.id.to_string(),
            job.role.to_string(),
            status,
            job.worker_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into()),
            job_duration_ms(job, now_ms)
                .map(duration_ms)
                .unwrap_or_else(|| "-".into()),
            count(job.usage.total()),
            cost(job.cost_usd),
        ];
        if scoped {
            row.push(scope(&job.paths));
        }
        t.add_row(row);
    }
    t
}

/// `submit --dry-run`: the plan with an estimate per step and in total.
pub fn dry_run(out: &mut dyn Write, dry: &DryRun) -> io::Result<()> {
    let scoped = dry.steps.iter().any(|s| !s.paths.is_empty());
    let mut header = vec![
        "#",
        "ROLE",
        "BACKEND",
        "MODEL",
        "AFTER",
        "COST p50",
        "COST p90",
        "TIME p50",
        "TIME p90",
        "FROM",
        "INSTRUCTION",
    ];
    if scoped {
        header.push("SCOPE");
    }
    let mut t = table(header);
    let time = |ms: Option<u64>| ms.map(duration_ms).unwrap_or_else(|| "-".into());
    let source = |e: &Estimate| match e.source {
        EstimateSource::History => format!("history ({})", e.samples),
        EstimateSource::Planner => "planner".into(),
        EstimateSource::None => "no data".into(),
    };
    for s in &dry.steps {
        let after = if s.depends_on.is_empty() {
            "-".to_string()
        } else {
            s.depends_on
                .iter()
                .map(|d| (d + 1).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut row = vec![
            (s.step + 1).to_string(),
            s.role.to_string(),
            s.backend.as_str().to_string(),
            s.model.clone().unwrap_or_else(|| "-".into()),
            after,
            cost(s.estimate.cost_usd_p50),
            cost(s.estimate.cost_usd_p90),
            time(s.estimate.duration_ms_p50),
            time(s.estimate.duration_ms_p90),
            source(&s.estimate),
            truncate(&s.instruction, 60),
        ];
        if scoped {
            row.push(scope(&s.paths));
        }
        t.add_row(row);
    }
    writeln!(
        out,
        "Plan ({}, {}) — nothing was run",
        dry.plan_source,
        dry.mode.as_str()
    )?;
    print_table(out, &t)?;
    let e = &dry.total;
    let rows = [
        (
            "estimated cost",
            format!(
                "{} (p50) · {} (p90)",
                cost(e.cost_usd_p50),
                cost(e.cost_usd_p90)
            ),
        ),
        (
            "estimated time",
            format!(
                "{} (p50) · {} (p90)",
                time(e.duration_ms_p50),
                time(e.duration_ms_p90)
            ),
        ),
        ("based on", source(e)),
    ];
    print_table(out, &details(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(12_340), "12.3s");
        assert_eq!(duration_ms(125_000), "2m05s");
        assert_eq!(duration_ms(3_720_000), "1h02m");
    }

    #[test]
    fn costs_have_four_decimals() {
        assert_eq!(cost(0.0), "$0.0000");
        assert_eq!(cost(0.012345), "$0.0123");
        assert_eq!(cost(1.5), "$1.5000");
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn truncation_keeps_one_line() {
        assert_eq!(truncate("a\nb  c", 10), "a b c");
        assert_eq!(truncate("abcdefghij", 5), "abcd…");
    }

    #[test]
    fn ages_are_relative() {
        assert_eq!(age(10_000, 9_500), "just now");
        assert_eq!(age(100_000, 40_000), "1m ago");
        assert_eq!(age(100_000, 0), "-");
    }
}
