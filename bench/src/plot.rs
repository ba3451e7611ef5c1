//! The growth curves as a PNG (plotters, bitmap backend): throughput, dispatch latency,
//! coordinator CPU per task and `orchctl status` time against the tasks in history (top row)
//! and against the number of worker processes (bottom row).
//!
//! Text needs a TrueType font; plotters is built without font-config, so a system font file is
//! loaded by path. Without one the plot is skipped and the report says so.

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    });
    if !ok {
        bail!(
            "no TrueType font found (looked in {})",
            FONT_PATHS.join(", ")
        );
    }
    Ok(())
}

/// One curve: its name, colour and (x, y) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One panel: curves against a log x axis.
struct Panel<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: Vec<Series<'a>>,
}

fn points(v: &Value, x: &str, y: &str) -> Vec<(f64, f64)> {
    v["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[x].as_f64()?, p[y].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn panels<'a>(growth: &Value, key: &str, x: &str, x_label: &'a str) -> Vec<Panel<'a>> {
    let g = &growth[key];
    vec![
        Panel {
            title: "throughput",
            x_label,
            y_label: "tasks/s",
            series: vec![("one-agent tasks/s", BLUE, points(g, x, "tasks_per_s"))],
        },
        Panel {
            title: "submit -> agent start",
            x_label,
            y_label: "ms",
            series: vec![
                ("p50", BLUE, points(g, x, "p50_ms")),
                ("p99", RED, points(g, x, "p99_ms")),
            ],
        },
        Panel {
            title: "coordinator CPU per task",
            x_label,
            y_label: "ms",
            series: vec![(
                "coordinator",
                BLUE,
                points(g, x, "coordinator_cpu_ms_per_task"),
            )],
        },
        Panel {
            title: "orchctl status",
            x_label,
            y_label: "ms",
            series: vec![("p50", BLUE, points(g, x, "orchctl_status_ms"))],
        },
    ]
}

/// Draws the growth figures of `growth` (`{"history": {...}, "workers": {...}}`) to `path`.
pub fn growth(growth: &Value, path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let rows = [
        panels(growth, "history", "history", "tasks in history"),
        panels(growth, "workers", "workers", "worker processes"),
    ];
    let root = BitMapBackend::new(path, (1800, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        "orchestrator growth: per-task cost vs history size and worker count",
        ("sans-serif", 22),
    )?;
    let areas = body.split_evenly((2, 4));
    for (area, panel) in areas.iter().zip(rows.iter().flatten()) {
        draw_panel(area, panel)?;
    }
    root.present().context("write the PNG")?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel<'_>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = p.series.iter().flat_map(|s| s.2.iter().copied()).collect();
    if all.is_empty() {
        area.titled(&format!("{} (no data)", p.title), ("sans-serif", 16))?;
        return Ok(());
    }
    let x_min = all.iter().map(|v| v.0).fold(f64::INFINITY, f64::min);
    let x_max = all.iter().map(|v| v.0).fold(f64::NEG_INFINITY, f64::max);
    let y_max = all.iter().map(|v| v.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25).log_scale(),
            0.0..(y_max * 1.2).max(0.001),
        )?;
    chart
        .configure_mesh()
        .x_desc(p.x_label)
        .y_desc(p.y_label)
        .x_labels(12)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (name, color, data) in &p.series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            data.iter()
                .map(|(x, y)| Circle::new((*x, *y), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// The `history1m` figures (`{"current": {...}, "baseline": {...}}`) against the tasks in
/// history: each read's time, this build and (when measured) the baseline build, to `path`.
pub fn history1m(h: &Value, path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let figures: [(&str, &str, &str); 8] = [
        ("cost-report --since 30d", "ms", "cost_report_30d_ms"),
        ("tasks list --search", "ms", "tasks_list_search_ms"),
        ("tasks list (first page)", "ms", "tasks_list_ms"),
        ("orchctl status", "ms", "orchctl_status_ms"),
        ("dashboard overview", "ms", "dashboard_overview_ms"),
        ("coordinator restart", "ms", "coordinator_restart_ms"),
        ("submit -> agent start p99", "ms", "dispatch_p99_ms"),
        (
            "Redis per finished task",
            "bytes",
            "redis_bytes_per_finished_task",
        ),
    ];
    let panels: Vec<Panel<'_>> = figures
        .iter()
        .map(|(title, unit, key)| {
            let mut series = vec![("this build", BLUE, points(&h["current"], "history", key))];
            if h.get("baseline").is_some() {
                series.push(("baseline", RED, points(&h["baseline"], "history", key)));
            }
            Panel {
                title,
                x_label: "finished tasks in history",
                y_label: unit,
                series,
            }
        })
        .collect();
    let root = BitMapBackend::new(path, (1800, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        "orchestrator history1m: each read against the size of the history",
        ("sans-serif", 22),
    )?;
    for (area, panel) in body.split_evenly((2, 4)).iter().zip(&panels) {
        draw_panel(area, panel)?;
    }
    root.present().context("write the PNG")?;
    Ok(())
}
