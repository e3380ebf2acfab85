//! `reaper report`: what the cleanup reclaimed, per day or per week, from `savings_report()`,
//! for a terminal (a table with the totals in words above it), or as JSON or CSV for a
//! spreadsheet or another program. The figures are the database's: this module only lays them
//! out, so every format says the same thing.

use serde::Serialize;

mod page;
pub use page::page;

/// One period of `orphan_cleanup.savings_report()`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Period {
    /// The first day of the period (UTC), `YYYY-MM-DD`.
    pub period_start: String,
    pub objects_reclaimed: i64,
    pub bytes_reclaimed: i64,
    pub orphans_found: i64,
    /// Strays queued in the period: objects in storage that no job named (what leaked before).
    pub strays_found: i64,
    /// New orphan bytes per day in the period: the leak the cleanup keeps up with.
    pub leak_bytes_per_day: f64,
    /// Bytes of the objects still queued, where `storage.objects` is in the database (else
    /// unknown).
    pub bytes_still_queued: Option<i64>,
    /// What the period's reclaimed bytes would have cost per month, at
    /// `orphan_cleanup.storage_price_per_gb_month`.
    pub monthly_saving: f64,
    /// Rows waiting at the end of the period (now, for the current one).
    pub queue_depth: i64,
}

/// A report's rows laid out as a table, with the totals in words above it.
pub fn table(periods: &[Period], unit: &str) -> String {
    let mut out = summary(periods, unit);
    out.push('\n');
    let header = [
        unit_title(unit),
        "reclaimed",
        "bytes",
        "orphans found",
        "strays found",
        "leak per day",
        "saving / month",
        "waiting",
    ];
    let rows: Vec<[String; 8]> = periods
        .iter()
        .map(|p| {
            [
                p.period_start.clone(),
                thousands(p.objects_reclaimed),
                human_bytes(p.bytes_reclaimed as f64),
                thousands(p.orphans_found),
                thousands(p.strays_found),
                human_bytes(p.leak_bytes_per_day),
                dollars(p.monthly_saving),
                thousands(p.queue_depth),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out.push_str(&line(header.to_vec()));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Dollars to the cent; a saving under a cent says so rather than "$0.00" (a small first
/// reclaim would otherwise read as worthless).
fn dollars(x: f64) -> String {
    if x > 0.0 && x < 0.005 {
        "< $0.01".to_string()
    } else {
        format!("${x:.2}")
    }
}

/// The totals in words: what a DBA reads first, and pastes into a ticket.
pub fn summary(periods: &[Period], unit: &str) -> String {
    let objects: i64 = periods.iter().map(|p| p.objects_reclaimed).sum();
    let bytes: i64 = periods.iter().map(|p| p.bytes_reclaimed).sum();
    let found: i64 = periods.iter().map(|p| p.orphans_found).sum();
    let strays: i64 = periods.iter().map(|p| p.strays_found).sum();
    let saving: f64 = periods.iter().map(|p| p.monthly_saving).sum();
    let n = periods.len();
    let since = periods.first().map_or("-", |p| p.period_start.as_str());
    let mut out = format!(
        "Over the last {n} {unit}{s} (since {since}): {} objects reclaimed ({}), {} orphans and {} strays found; \
         storage that no longer costs {} a month.\n",
        thousands(objects),
        human_bytes(bytes as f64),
        thousands(found),
        thousands(strays),
        dollars(saving),
        s = if n == 1 { "" } else { "s" },
    );
    if let Some(last) = periods.last() {
        let this = if unit == "day" { "today" } else { "this week" };
        out.push_str(&format!(
            "Leak rate {this}: {} of new orphans a day. ",
            human_bytes(last.leak_bytes_per_day)
        ));
        out.push_str(&match last.bytes_still_queued {
            Some(b) => format!("Still queued: {}.\n", human_bytes(b as f64)),
            None => "Still queued: unknown (no storage.objects in this database).\n".to_string(),
        });
    }
    out
}

/// The rows as a JSON array, one object per period, numbers as numbers.
pub fn json(periods: &[Period]) -> String {
    serde_json::to_string_pretty(periods).expect("plain data serializes")
}

/// The rows as CSV with a header line (RFC 4180; no field needs quoting: dates and numbers).
pub fn csv(periods: &[Period]) -> String {
    let mut out = String::from(
        "period_start,objects_reclaimed,bytes_reclaimed,orphans_found,strays_found,leak_bytes_per_day,bytes_still_queued,monthly_saving,queue_depth\n",
    );
    for p in periods {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            p.period_start,
            p.objects_reclaimed,
            p.bytes_reclaimed,
            p.orphans_found,
            p.strays_found,
            p.leak_bytes_per_day,
            p.bytes_still_queued
                .map_or(String::new(), |b| b.to_string()),
            p.monthly_saving,
            p.queue_depth
        ));
    }
    out
}

fn unit_title(unit: &str) -> &'static str {
    if unit == "day" {
        "day"
    } else {
        "week of"
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Bytes in binary units, as `du -h` and the Supabase dashboard show them.
fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", v.round() as i64)
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_saving_under_a_cent_is_not_shown_as_nothing() {
        assert_eq!(super::dollars(0.0), "$0.00");
        assert_eq!(super::dollars(0.0004), "< $0.01");
        assert_eq!(super::dollars(0.006), "$0.01");
        assert_eq!(super::dollars(12.345), "$12.35");
    }

    use super::*;

    fn period(start: &str, objects: i64, bytes: i64) -> Period {
        Period {
            period_start: start.to_string(),
            objects_reclaimed: objects,
            bytes_reclaimed: bytes,
            orphans_found: objects + 1,
            strays_found: 2,
            leak_bytes_per_day: bytes as f64 / 7.0,
            bytes_still_queued: Some(2048),
            monthly_saving: 0.5,
            queue_depth: 3,
        }
    }

    #[test]
    fn the_table_says_the_totals_in_words_and_aligns_its_columns() {
        let rows = [
            period("2026-11-23", 1_234, 3 << 30),
            period("2026-11-30", 5, 1536),
        ];
        let t = table(&rows, "week");
        assert!(
            t.starts_with("Over the last 2 weeks (since 2026-11-23): 1,239 objects reclaimed (3.0 GiB), 1,241 orphans and 4 strays found; storage that no longer costs $1.00 a month.\n"),
            "{t}"
        );
        assert!(t.contains("Still queued: 2.0 KiB."), "{t}");
        let lines: Vec<&str> = t.lines().skip(3).collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("week of"), "{t}");
        assert!(
            lines[1].contains("1,234") && lines[1].contains("3.0 GiB"),
            "{t}"
        );
        assert_eq!(
            lines[1].len(),
            lines[2].len(),
            "right-aligned columns:\n{t}"
        );
    }

    #[test]
    fn csv_and_json_carry_the_numbers_unformatted() {
        let rows = [period("2026-11-30", 5, 1536)];
        let c = csv(&rows);
        assert_eq!(
            c.lines().nth(1),
            Some("2026-11-30,5,1536,6,2,219.42857142857142,2048,0.5,3")
        );
        let j: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        assert_eq!(j[0]["bytes_reclaimed"], 1536);
        assert_eq!(j[0]["bytes_still_queued"], 2048);
        let unknown = Period {
            bytes_still_queued: None,
            ..rows[0].clone()
        };
        assert!(csv(std::slice::from_ref(&unknown))
            .lines()
            .nth(1)
            .unwrap()
            .contains(",,0.5,3"));
        assert!(summary(&[unknown], "day").contains("Still queued: unknown"));
    }
}
