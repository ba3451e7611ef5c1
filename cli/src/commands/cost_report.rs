//! `orchctl cost-report`: costs and tokens (input, output, cache write, cache read) of the
//! agents of a window of tasks, in total and broken down by agent, role, model, backend or task.

use crate::commands::Ctx;
use crate::output;
use crate::when;
use orch_shared::report::{CostGroup, CostLine, CostReport};
use std::io::Write;
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  orchctl cost-report                                  # everything still in the history
  orchctl cost-report --since 7d --by-role --by-model
  orchctl cost-report --by-agent --format csv > agents.csv
  orchctl cost-report --since 2025-01-01 --until 2025-02-01 --format json";

/// Costs and tokens, in total and by agent, role, model, backend or task
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Sum the cost and the tokens (input, output, cache write, cache read) of every \
agent that ran, for the tasks created in a window, and break them down by the dimensions asked \
for (one table each, most expensive first). A report reads at most the newest 50,000 tasks of \
the window and says so when there were more.\n\n--format csv prints one CSV table: a `total` \
row, then one row per group with its dimension in the first column.",
    after_long_help = EXAMPLES
)]
pub struct Args {
    /// table, json or csv (default: table, or json with --output json)
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<ReportFormat>,

    /// One row per agent (with its role and task)
    #[arg(long)]
    pub by_agent: bool,
    /// One row per role
    #[arg(long)]
    pub by_role: bool,
    /// One row per model
    #[arg(long)]
    pub by_model: bool,
    /// One row per agent backend
    #[arg(long)]
    pub by_backend: bool,
    /// One row per task
    #[arg(long)]
    pub by_task: bool,

    /// Tasks created at or after this time (7d, 2025-01-31, ...)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Tasks created before this time
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

pub fn query(args: &Args, now_ms: u64) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut q = Vec::new();
    let by: Vec<&str> = [
        (args.by_agent, "agent"),
        (args.by_role, "role"),
        (args.by_model, "model"),
        (args.by_backend, "backend"),
        (args.by_task, "task"),
    ]
    .into_iter()
    .filter_map(|(on, dim)| on.then_some(dim))
    .collect();
    if !by.is_empty() {
        q.push(("by", by.join(",")));
    }
    if let Some(s) = &args.since {
        q.push(("since", when::parse_time("--since", s, now_ms)?.to_string()));
    }
    if let Some(s) = &args.until {
        q.push(("until", when::parse_time("--until", s, now_ms)?.to_string()));
    }
    Ok(q)
}

const CSV_HEADER: [&str; 11] = [
    "dimension",
    "key",
    "role",
    "task_id",
    "agents",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "total_tokens",
    "cost_usd",
];

fn csv_row(dimension: &str, key: &str, group: Option<&CostGroup>, line: &CostLine) -> Vec<String> {
    let u = &line.usage;
    vec![
        dimension.to_string(),
        key.to_string(),
        group
            .and_then(|g| g.role)
            .map(|r| r.to_string())
            .unwrap_or_default(),
        group
            .and_then(|g| g.task_id)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        line.agents.to_string(),
        u.input_tokens.to_string(),
        u.output_tokens.to_string(),
        u.cache_creation_tokens.to_string(),
        u.cache_read_tokens.to_string(),
        u.total().to_string(),
        format!("{:.6}", line.cost_usd),
    ]
}

pub fn write_csv(out: &mut dyn Write, report: &CostReport) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(CSV_HEADER)?;
    w.write_record(csv_row("total", "", None, &report.total))?;
    for b in &report.breakdowns {
        for g in &b.groups {
            w.write_record(csv_row(&b.by, &g.key, Some(g), &g.totals))?;
        }
    }
    w.flush()?;
    Ok(())
}

fn window(report: &CostReport) -> String {
    match (report.since_ms, report.until_ms) {
        (None, None) => "all tasks in the history".to_string(),
        (Some(s), None) => format!("tasks created since {}", when::iso(s)),
        (None, Some(u)) => format!("tasks created before {}", when::iso(u)),
        (Some(s), Some(u)) => format!("tasks created from {} to {}", when::iso(s), when::iso(u)),
    }
}

pub fn render(out: &mut dyn Write, report: &CostReport) -> std::io::Result<()> {
    let t = &report.total;
    let u = &t.usage;
    writeln!(out, "Cost report ({})", window(report))?;
    let rows = [
        ("tasks", output::count(report.tasks)),
        ("agents", output::count(t.agents)),
        ("total cost", output::cost(t.cost_usd)),
        ("total tokens", output::count(u.total())),
        ("input tokens", output::count(u.input_tokens)),
        ("output tokens", output::count(u.output_tokens)),
        ("cache write tokens", output::count(u.cache_creation_tokens)),
        ("cache read tokens", output::count(u.cache_read_tokens)),
    ];
    output::print_table(out, &output::details(&rows))?;
    for b in &report.breakdowns {
        writeln!(out, "By {}", b.by)?;
        let agent = b.by == "agent";
        let mut header = vec![b.by.to_uppercase()];
        if agent {
            header.extend(["ROLE".to_string(), "TASK".to_string()]);
        } else {
            header.push("AGENTS".to_string());
        }
        header.extend(
            ["INPUT", "OUTPUT", "CACHE W", "CACHE R", "COST"]
                .iter()
                .map(|s| s.to_string()),
        );
        let mut table = output::table(header);
        for g in &b.groups {
            let gu = &g.totals.usage;
            let mut row = vec![g.key.clone()];
            if agent {
                row.push(g.role.map(|r| r.to_string()).unwrap_or_default());
                row.push(g.task_id.map(|t| t.to_string()).unwrap_or_default());
            } else {
                row.push(output::count(g.totals.agents));
            }
            row.extend([
                output::count(gu.input_tokens),
                output::count(gu.output_tokens),
                output::count(gu.cache_creation_tokens),
                output::count(gu.cache_read_tokens),
                output::cost(g.totals.cost_usd),
            ]);
            table.add_row(row);
        }
        if b.groups.is_empty() {
            writeln!(out, "(no agents)")?;
        } else {
            output::print_table(out, &table)?;
        }
    }
    Ok(())
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let q = query(&args, orch_shared::now_ms())?;
    let report = ctx.client()?.cost_report(&q).await?;
    if report.truncated {
        let _ = writeln!(
            std::io::stderr(),
            "note: the window has more than 50,000 tasks; the report covers the newest 50,000 (narrow it with --since/--until)"
        );
    }
    let format = args.format.unwrap_or(if ctx.json() {
        ReportFormat::Json
    } else {
        ReportFormat::Table
    });
    let mut out = std::io::stdout().lock();
    match format {
        ReportFormat::Json => output::json(&mut out, &report)?,
        ReportFormat::Csv => write_csv(&mut out, &report)?,
        ReportFormat::Table => render(&mut out, &report)?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_shared::job::Usage;
    use orch_shared::report::CostBreakdown;

    #[test]
    fn csv_has_a_total_row_and_one_row_per_group() {
        let line = CostLine {
            agents: 2,
            usage: Usage {
                input_tokens: 10,
                output_tokens: 20,
                cache_creation_tokens: 1,
                cache_read_tokens: 2,
            },
            cost_usd: 0.5,
        };
        let report = CostReport {
            since_ms: None,
            until_ms: None,
            tasks: 1,
            total: line.clone(),
            breakdowns: vec![CostBreakdown {
                by: "role".into(),
                groups: vec![CostGroup {
                    key: "builder".into(),
                    role: None,
                    task_id: None,
                    totals: line,
                }],
            }],
            truncated: false,
        };
        let mut buf = Vec::new();
        write_csv(&mut buf, &report).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("dimension,key,role"));
        assert_eq!(lines[1], "total,,,,2,10,20,1,2,33,0.500000");
        assert_eq!(lines[2], "role,builder,,,2,10,20,1,2,33,0.500000");
    }
}
