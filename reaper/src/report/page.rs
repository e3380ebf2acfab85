//! `reaper report --html FILE`: one self-contained page (no external asset, no network: it opens
//! offline and can be attached to a ticket) with the totals in words, four charts and the table.
//!
//! The charts are SVG written here rather than by a chart crate: plotters, the usual choice,
//! needs a font backend to lay out its labels, and a page whose text the browser lays out is
//! both smaller and sharper. A few lines of script count, after the browser has laid the page
//! out, the points each chart really shows (`data-rendered`), which the end-to-end test reads
//! through a headless Chromium.

use super::{human_bytes, summary, thousands, Period};

/// The whole page for `periods`, one row per `unit` ("day" or "week"), generated at `when`.
pub fn page(periods: &[Period], unit: &str, when: &str) -> String {
    let labels: Vec<String> = periods.iter().map(|p| p.period_start.clone()).collect();
    let per = if unit == "day" { "day" } else { "week" };
    let values = |f: fn(&Period) -> f64| periods.iter().map(f).collect::<Vec<f64>>();
    let charts = [
        chart(
            "bytes-reclaimed",
            &format!("Bytes reclaimed per {per}"),
            &labels,
            &[Series::new(
                "reclaimed",
                "#2f7d32",
                values(|p| p.bytes_reclaimed as f64),
            )],
            human_bytes,
        ),
        chart(
            "found-and-deleted",
            &format!("Orphans and strays found, and objects deleted, per {per}"),
            &labels,
            &[
                Series::new("orphans", "#c62828", values(|p| p.orphans_found as f64)),
                Series::new("strays", "#8d6e63", values(|p| p.strays_found as f64)),
                Series::new("deleted", "#1565c0", values(|p| p.objects_reclaimed as f64)),
            ],
            |v| thousands(v.round() as i64),
        ),
        chart(
            "queue-depth",
            &format!("Rows waiting in the queue at the end of each {per}"),
            &labels,
            &[Series::new(
                "waiting",
                "#6a1b9a",
                values(|p| p.queue_depth as f64),
            )],
            |v| thousands(v.round() as i64),
        ),
        chart(
            "leak-rate",
            "Leak rate: bytes of new orphans per day",
            &labels,
            &[Series::new(
                "leak",
                "#ef6c00",
                values(|p| p.leak_bytes_per_day),
            )],
            human_bytes,
        ),
    ];
    let summary = summary(periods, unit);
    let rows: String = periods
        .iter()
        .map(|p| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>${:.2}</td><td>{}</td></tr>\n",
                escape(&p.period_start),
                thousands(p.objects_reclaimed),
                human_bytes(p.bytes_reclaimed as f64),
                thousands(p.orphans_found),
                thousands(p.strays_found),
                human_bytes(p.leak_bytes_per_day),
                p.monthly_saving,
                thousands(p.queue_depth)
            )
        })
        .collect();
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pg_orphan_cleanup: storage reclaimed</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 760px; color: #222; }}
p.summary {{ font-size: 1.1em; line-height: 1.5; }}
p.generated {{ color: #666; font-size: 0.9em; }}
figure {{ margin: 1.5em 0; }}
figcaption {{ font-weight: 600; margin-bottom: 0.3em; }}
svg.chart text {{ font-size: 11px; fill: #555; }}
svg.chart .grid {{ stroke: #ddd; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9em; }}
th, td {{ padding: 0.25em 0.5em; text-align: right; border-bottom: 1px solid #eee; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
</style>
</head>
<body>
<h1>Storage reclaimed by pg_orphan_cleanup</h1>
<p class="summary">{summary}</p>
<p class="generated">Generated {when} from <code>orphan_cleanup.savings_report('{unit}', {n})</code>.</p>
{charts}
<table>
<tr><th>{unit}</th><th>objects reclaimed</th><th>bytes</th><th>orphans found</th><th>strays found</th><th>leak per day</th><th>saving / month</th><th>waiting</th></tr>
{rows}</table>
<script>
// How many points each chart shows once the browser has laid it out.
for (const svg of document.querySelectorAll("svg.chart")) {{
  let shown = 0;
  for (const point of svg.querySelectorAll("circle.point")) {{
    const box = point.getBBox();
    if (box.width > 0 && box.height > 0) shown++;
  }}
  svg.dataset.rendered = shown;
}}
document.body.dataset.ready = "yes";
</script>
</body>
</html>
"#,
        summary = escape(summary.trim_end()).replace('\n', "<br>\n"),
        when = escape(when),
        unit = escape(unit),
        n = periods.len(),
        charts = charts.join("\n"),
    )
}

/// One line of a chart.
struct Series {
    name: &'static str,
    color: &'static str,
    values: Vec<f64>,
}

impl Series {
    fn new(name: &'static str, color: &'static str, values: Vec<f64>) -> Series {
        Series {
            name,
            color,
            values,
        }
    }
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

/// A line chart of `series` over `labels`, one point per label, the y axis from 0 to the largest
/// value, its three grid lines labelled by `fmt`.
fn chart(
    id: &str,
    title: &str,
    labels: &[String],
    series: &[Series],
    fmt: fn(f64) -> String,
) -> String {
    let n = labels.len();
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0_f64, f64::max);
    let top = nice_ceiling(max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |i: usize| {
        if n <= 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| TOP + plot_h * (1.0 - v / top);
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption>
<svg class="chart" data-chart="{}" data-points="{}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}">
"#,
        escape(title),
        escape(id),
        n * series.len(),
        escape(title)
    );
    for step in 0..=2 {
        let v = top * step as f64 / 2.0;
        svg.push_str(&format!(
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>
"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            escape(&fmt(v)),
            y = y(v)
        ));
    }
    let every = n.div_ceil(8).max(1);
    for (i, label) in labels.iter().enumerate() {
        if i % every == 0 || i + 1 == n {
            svg.push_str(&format!(
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>
"#,
                x(i),
                HEIGHT - BOTTOM + 16.0,
                escape(label)
            ));
        }
    }
    for (k, s) in series.iter().enumerate() {
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        svg.push_str(&format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>
"#,
            s.color,
            points.join(" ")
        ));
        for (i, v) in s.values.iter().enumerate() {
            svg.push_str(&format!(
                r#"<circle class="point" data-series="{}" cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{}: {} {}</title></circle>
"#,
                s.name,
                x(i),
                y(*v),
                s.color,
                escape(&labels[i]),
                escape(&fmt(*v)),
                s.name
            ));
        }
        if series.len() > 1 {
            svg.push_str(&format!(
                r#"<text x="{}" y="{}" fill="{}" style="fill:{}">{}</text>
"#,
                LEFT + 8.0 + 90.0 * k as f64,
                HEIGHT - 6.0,
                s.color,
                s.color,
                s.name
            ));
        }
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The top of a chart's y axis: the smallest of 1, 2, 4, 5 or 10 times a power of ten, and at
/// least 2, at or above `max`, so that the grid line halfway is a round number too (a count of
/// one is not drawn against a grid of 0, 0.5 and 1).
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 {
        return 2.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 4.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&top| top >= max && top >= 2.0)
        .unwrap_or(10.0 * power)
}

/// Text for HTML: `&`, `<`, `>` and `"` as entities.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_every_point_and_nothing_from_outside() {
        let periods: Vec<Period> = (0..5)
            .map(|i| Period {
                period_start: format!("2026-11-2{i}"),
                objects_reclaimed: i,
                bytes_reclaimed: i << 20,
                orphans_found: i + 1,
                strays_found: i,
                leak_bytes_per_day: 10.0 * i as f64,
                bytes_still_queued: None,
                monthly_saving: 0.01,
                queue_depth: 5 - i,
            })
            .collect();
        let html = page(&periods, "day", "2026-12-03T12:00:00Z");
        assert_eq!(html.matches(r#"<circle class="point""#).count(), 6 * 5);
        assert_eq!(html.matches(r#"data-series="strays""#).count(), 5);
        assert!(html.contains("Over the last 5 days (since 2026-11-20)"));
        for outside in ["src=", "href=", "@import", "url("] {
            assert!(!html.contains(outside), "{outside}");
        }
        assert!(escape("<a & \"b\">") == "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
