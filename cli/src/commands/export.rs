//! `orchctl export`: tasks, agents or events of a window as CSV, JSON or NDJSON. The server
//! streams newline-delimited JSON page by page and this command converts and writes each row
//! as it arrives, so a large history never has to fit in memory.

use crate::commands::Ctx;
use crate::when;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orch_shared::api::TaskSummary;
use orch_shared::report::{AgentSummary, EventRow, ExportWhat};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXAMPLES: &str = "\
Examples:
  orchctl export --what tasks --format csv > tasks.csv
  orchctl export --what agents --since 7d --format json --file agents.json
  orchctl export --what events --since 1h --format ndjson | jq -c .event.kind.type";

/// Export tasks, agents or events as CSV, JSON or NDJSON (streamed)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Write the tasks, agents or events of a window (oldest first) to stdout or a \
file. The server streams the rows page by page and each is written as it arrives, so any \
history size works in constant memory. A progress line is drawn on stderr when it is a \
terminal.\n\n--format json writes one JSON array, ndjson one object per line, csv a header and \
one row per object (times as UTC and as milliseconds). Events are kept 7 days by default.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// What to export
    #[arg(long, value_enum, default_value_t = What::Tasks)]
    pub what: What,

    /// csv, json (one array) or ndjson (one object per line)
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    pub format: ExportFormat,

    /// Only what was created at or after this time (7d, 2025-01-31, ...)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// Only what was created before this time
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,

    /// Write to this file instead of stdout
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Tasks,
    Agents,
    Events,
}

impl From<What> for ExportWhat {
    fn from(w: What) -> Self {
        match w {
            What::Tasks => ExportWhat::Tasks,
            What::Agents => ExportWhat::Agents,
            What::Events => ExportWhat::Events,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
    Ndjson,
}

pub const TASK_COLUMNS: [&str; 17] = [
    "id",
    "created_at",
    "created_at_ms",
    "finished_at_ms",
    "duration_ms",
    "status",
    "task_type",
    "mode",
    "roles",
    "jobs_done",
    "jobs",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_usd",
    "prompt",
];

pub const AGENT_COLUMNS: [&str; 21] = [
    "id",
    "task_id",
    "step",
    "role",
    "status",
    "attempt",
    "worker",
    "backend",
    "model",
    "queued_at_ms",
    "started_at_ms",
    "finished_at_ms",
    "started_at",
    "duration_ms",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost_usd",
    "error_reason",
    "error",
];

pub const EVENT_COLUMNS: [&str; 8] = [
    "seq", "at", "at_ms", "task_id", "job_id", "attempt", "kind", "data",
];

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

pub fn task_record(t: &TaskSummary) -> Vec<String> {
    let u = &t.usage;
    vec![
        t.id.to_string(),
        when::iso(t.created_at_ms),
        t.created_at_ms.to_string(),
        opt(t.finished_at_ms),
        opt(t.finished_at_ms.map(|f| f.saturating_sub(t.created_at_ms))),
        t.status.as_str().to_string(),
        t.task_type.clone(),
        t.mode.as_str().to_string(),
        crate::output::roles(&t.roles),
        t.jobs_done.to_string(),
        t.roles.len().to_string(),
        u.input_tokens.to_string(),
        u.output_tokens.to_string(),
        u.cache_creation_tokens.to_string(),
        u.cache_read_tokens.to_string(),
        format!("{:.6}", t.cost_usd),
        t.prompt.clone(),
    ]
}

pub fn agent_record(a: &AgentSummary) -> Vec<String> {
    let u = &a.usage;
    vec![
        a.id.to_string(),
        a.task_id.to_string(),
        a.step.to_string(),
        a.role.to_string(),
        a.status.as_str().to_string(),
        a.attempt.to_string(),
        opt(a.worker_id.as_ref()),
        a.backend.as_str().to_string(),
        orch_shared::report::model_name(a.model.as_deref()).to_string(),
        opt(a.queued_at_ms),
        opt(a.started_at_ms),
        opt(a.finished_at_ms),
        a.started_at_ms.map(when::iso).unwrap_or_default(),
        opt(a
            .started_at_ms
            .zip(a.finished_at_ms)
            .map(|(s, f)| f.saturating_sub(s))),
        u.input_tokens.to_string(),
        u.output_tokens.to_string(),
        u.cache_creation_tokens.to_string(),
        u.cache_read_tokens.to_string(),
        format!("{:.6}", a.cost_usd),
        a.error
            .as_ref()
            .map(|e| e.reason.as_str().to_string())
            .unwrap_or_default(),
        a.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
    ]
}

pub fn event_record(e: &EventRow) -> Vec<String> {
    let ev = &e.event;
    vec![
        e.id().to_string(),
        when::iso(ev.at_ms),
        ev.at_ms.to_string(),
        ev.task_id.to_string(),
        opt(ev.job_id),
        ev.attempt.to_string(),
        ev.kind.name().to_string(),
        serde_json::to_string(&ev.kind).unwrap_or_default(),
    ]
}

/// Where rows go: straight out, or through a CSV writer.
enum Sink<'a> {
    Raw(&'a mut dyn Write),
    Csv(Box<csv::Writer<&'a mut dyn Write>>),
}

/// Writes rows in one format as they come.
pub struct Writer<'a> {
    format: ExportFormat,
    what: What,
    sink: Sink<'a>,
    rows: u64,
}

impl<'a> Writer<'a> {
    pub fn new(format: ExportFormat, what: What, out: &'a mut dyn Write) -> anyhow::Result<Self> {
        let sink = match format {
            ExportFormat::Csv => {
                let mut csv = csv::Writer::from_writer(out);
                match what {
                    What::Tasks => csv.write_record(TASK_COLUMNS)?,
                    What::Agents => csv.write_record(AGENT_COLUMNS)?,
                    What::Events => csv.write_record(EVENT_COLUMNS)?,
                }
                Sink::Csv(Box::new(csv))
            }
            ExportFormat::Json => {
                out.write_all(b"[")?;
                Sink::Raw(out)
            }
            ExportFormat::Ndjson => Sink::Raw(out),
        };
        Ok(Self {
            format,
            what,
            sink,
            rows: 0,
        })
    }

    /// Writes one NDJSON line from the server.
    pub fn line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        match &mut self.sink {
            Sink::Raw(out) if self.format == ExportFormat::Ndjson => {
                out.write_all(line)?;
                out.write_all(b"\n")?;
            }
            Sink::Raw(out) => {
                if self.rows > 0 {
                    out.write_all(b",")?;
                }
                out.write_all(b"\n")?;
                out.write_all(line)?;
            }
            Sink::Csv(csv) => {
                let record = match self.what {
                    What::Tasks => task_record(&serde_json::from_slice(line)?),
                    What::Agents => agent_record(&serde_json::from_slice(line)?),
                    What::Events => event_record(&serde_json::from_slice(line)?),
                };
                csv.write_record(&record)?;
            }
        }
        self.rows += 1;
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn finish(self) -> anyhow::Result<u64> {
        match self.sink {
            Sink::Raw(out) => {
                if self.format == ExportFormat::Json {
                    out.write_all(if self.rows > 0 { b"\n]\n" } else { b"]\n" })?;
                }
                out.flush()?;
            }
            Sink::Csv(mut csv) => csv.flush()?,
        }
        Ok(self.rows)
    }
}

fn progress() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner:.cyan} exporting {msg} · {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let now = orch_shared::now_ms();
    let since = args
        .since
        .as_deref()
        .map(|s| when::parse_time("--since", s, now))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| when::parse_time("--until", s, now))
        .transpose()?;
    let client = ctx.client()?;
    let mut resp = client.export(args.what.into(), since, until).await?;
    let mut file;
    let mut stdout;
    let out: &mut dyn Write = match &args.file {
        Some(path) => {
            file = std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("failed to create {}", path.display()))?,
            );
            &mut file
        }
        None => {
            stdout = std::io::stdout().lock();
            &mut stdout
        }
    };
    let mut writer = Writer::new(args.format, args.what, out)?;
    let bar = progress();
    let what = format!("{:?}", args.what).to_lowercase();
    let mut pending: Vec<u8> = Vec::new();
    let mut bytes = 0u64;
    while let Some(chunk) = client.chunk(&mut resp).await? {
        bytes += chunk.len() as u64;
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            writer.line(&line)?;
        }
        if let Some(bar) = &bar {
            bar.set_message(format!(
                "{what}: {} rows, {} KiB",
                writer.rows(),
                bytes / 1024
            ));
        }
    }
    writer.line(&pending)?;
    let rows = writer.finish()?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &args.file {
        let _ = writeln!(
            std::io::stderr(),
            "exported {rows} {what} to {}",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_export_is_one_array_written_row_by_row() {
        let mut buf = Vec::new();
        let mut w = Writer::new(ExportFormat::Json, What::Events, &mut buf).unwrap();
        w.line(b"{\"a\":1}\n").unwrap();
        w.line(b"{\"a\":2}").unwrap();
        w.line(b"").unwrap();
        assert_eq!(w.finish().unwrap(), 2);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v, serde_json::json!([{"a": 1}, {"a": 2}]));

        let mut buf = Vec::new();
        let w = Writer::new(ExportFormat::Json, What::Tasks, &mut buf).unwrap();
        assert_eq!(w.finish().unwrap(), 0);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&buf).unwrap(),
            serde_json::json!([])
        );
    }
}
