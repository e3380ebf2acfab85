//! Alerting as operators run it (issue 15): the Prometheus alert rules pass their unit tests
//! under `promtool`, and every metric the rules and the Grafana dashboard name is one a real
//! reaper serves on /metrics, so a renamed metric cannot silently blind an alert.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::process::Hermetic;
use e2e::storage::*;
use e2e::*;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool ({e}): install Debian's prometheus package (scripts/setup.sh does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every alert the issue asks for exists, the rules are valid, and each is shown firing and
/// staying silent by `promtool test rules`.
#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "pg_orphan_cleanup.rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "pg_orphan_cleanup.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let rules = std::fs::read_to_string(deploy("prometheus/pg_orphan_cleanup.rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(deploy("prometheus/pg_orphan_cleanup.rules.test.yml")).unwrap();
    for alert in [
        "PgOrphanCleanupDeadLetters",
        "PgOrphanCleanupNoSuccessfulDelete",
        "PgOrphanCleanupBreakerTripped",
        "PgOrphanCleanupSavesRefused",
        "PgOrphanCleanupQueueGrowing",
        "PgOrphanCleanupReaperHeldBack",
        "PgOrphanCleanupStorageRefusesReaper",
        "PgOrphanCleanupNothingDeletedSuspected",
    ] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert}");
        // Each is tested firing (exp_alerts with labels) somewhere in the test file.
        let fired = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(&format!("{alert}\n")) && t.contains("exp_labels"));
        assert!(fired, "{alert} is never shown firing");
    }
}

/// The metric names an expression uses.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("reaper_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The series names /metrics serves: each `# TYPE` line's family, with the suffixes its type
/// adds (`_total` of a counter, `_bucket`, `_sum`, `_count` of a histogram).
fn served(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_is_one_the_reaper_serves() {
    let emu = Emulator::start();
    settings(&[("allowed_buckets", "renders"), ("allowed_hosts", &emu.host)]);
    let db = TestDb::attached("alerting_metrics");
    reaper_role();
    emu.create_bucket("renders");
    let mut c = db.client();
    for i in 0..5 {
        let key = format!("a/{i}.png");
        emu.upload("renders", &key, b"bytes");
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", &key)),
            "2 hours",
            "alerting",
        );
    }
    assert_eq!(cycle(&mut c).2, 5);
    // A dead letter and a refused save, for the database's figures to show on /metrics.
    c.batch_execute(
        "UPDATE orphan_cleanup.deletion_queue SET state = 'dead'
          WHERE id = (SELECT min(id) FROM orphan_cleanup.deletion_queue);
         SELECT nextval('orphan_cleanup.refused_saves'), nextval('orphan_cleanup.refused_saves');",
    )
    .unwrap();
    let addr = free_addr();
    let child = reaper(&db.name, &emu, &["run", "--metrics-addr", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .start();
    wait_for(
        Duration::from_secs(60),
        "the 4 objects deleted, the dead letter and the refused saves shown",
        || {
            http_get(&addr, "/metrics").is_ok_and(|(_, m)| {
                m.contains("reaper_objects_total{outcome=\"deleted\"} 4")
                    && m.contains("\nreaper_queue_dead 1\n")
                    && m.contains("\nreaper_refused_saves 2\n")
            })
        },
    );
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    signal(&child, libc::SIGTERM);
    let out = wait_with_deadline(child, Duration::from_secs(20));
    assert!(out.status.success(), "{}", output_text(&out));

    let served = served(&metrics);
    // What the database reports reaches the metrics too.
    for name in [
        "reaper_queue_dead",
        "reaper_breaker_tripped",
        "reaper_refused_saves",
        "reaper_database_health",
    ] {
        assert!(served.contains(name), "{name} not served:\n{metrics}");
    }
    let rules = std::fs::read_to_string(deploy("prometheus/pg_orphan_cleanup.rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(deploy("grafana/pg_orphan_cleanup.json")).unwrap();
    for (file, text) in [
        ("prometheus/pg_orphan_cleanup.rules.yml", &rules),
        ("grafana/pg_orphan_cleanup.json", &dashboard),
    ] {
        let named = names_in(text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        let unknown: Vec<_> = named.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics /metrics does not serve: {unknown:?}\n{metrics}"
        );
    }
    // The dashboard is valid JSON with a panel per query.
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| !p["targets"].as_array().unwrap().is_empty()));
}

/// A name the reaper does not serve is caught (the check above can fail).
#[test]
fn a_metric_the_reaper_does_not_serve_is_caught() {
    let served = served("# TYPE reaper_objects counter\n# TYPE reaper_queue_depth gauge\n");
    let named = names_in(
        "max(reaper_queue_depth) > 0 and rate(reaper_objects_total[5m]) and reaper_queue_dpeth",
    );
    let unknown: Vec<_> = named.difference(&served).cloned().collect();
    assert_eq!(unknown, vec!["reaper_queue_dpeth".to_string()]);
    assert!(names_in("preaper_x foo").is_empty());
}
