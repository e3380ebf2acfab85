//! The savings ledger (issue 15): every deleted object's size is recorded on its queue row, as
//! storage's answer to the bulk delete gave it (the server returns the rows it removed from
//! storage.objects), so the totals equal the bytes that actually left storage.

use std::collections::BTreeMap;

use e2e::process::Hermetic;
use e2e::storage::*;
use e2e::*;

/// Orphans of assorted sizes and one whose file was never there, drained by a real reaper,
/// against an emulator that keeps storage.objects in the database and one that does not: the
/// recorded bytes of the deleted rows add up to exactly what left storage, and the absent row
/// reclaimed nothing.
#[test]
fn the_ledger_totals_equal_the_bytes_that_left_storage() {
    for keeping in [false, true] {
        let name = format!("savings_{keeping}");
        let db = TestDb::attached(&name);
        let emu = if keeping {
            Emulator::start_keeping(&name)
        } else {
            Emulator::start()
        };
        settings(&[("allowed_buckets", "renders"), ("allowed_hosts", &emu.host)]);
        reaper_role();
        emu.create_bucket("renders");
        let mut c = db.client();
        let mut sizes = BTreeMap::new();
        for i in 0..12usize {
            let key = format!("l/{i}.png");
            let size = 1 + i * 997;
            emu.upload("renders", &key, &vec![b'x'; size]);
            sizes.insert(key.clone(), size as i64);
            job(
                &mut c,
                "completed",
                Some(&emu.public_url("renders", &key)),
                "2 hours",
                "ledger",
            );
        }
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", "l/never-uploaded.png")),
            "2 hours",
            "ledger",
        );
        assert_eq!(cycle(&mut c).2, 13);
        let out = reaper(&db.name, &emu, &["drain", "--batch-size", "5"]).run();
        assert!(out.status.success(), "{}", output_text(&out));
        assert!(emu.objects().is_empty(), "every orphan's file left storage");

        let rows: BTreeMap<String, (String, Option<i64>)> = c
            .query(
                "SELECT object_path, state, bytes FROM orphan_cleanup.deletion_queue",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (key, size) in &sizes {
            assert_eq!(
                rows[key],
                ("deleted".to_string(), Some(*size)),
                "{key} (keeping storage.objects: {keeping})"
            );
        }
        assert_eq!(
            rows["l/never-uploaded.png"],
            ("absent".to_string(), None),
            "an absent object reclaimed nothing"
        );
        let total: i64 = c
            .query_one(
                "SELECT sum(bytes)::bigint FROM orphan_cleanup.deletion_queue WHERE state = 'deleted'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(total, sizes.values().sum::<i64>());
    }
}

/// confirm() refuses sizes that do not line up with the ids, or are negative, and changes
/// nothing then.
#[test]
fn confirm_refuses_sizes_that_do_not_fit_the_ids() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("savings_bad_sizes");
    let mut c = db.client();
    for i in 0..2 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("b/{i}.png"))),
            "2 hours",
            "b",
        );
    }
    assert_eq!(cycle(&mut c).2, 2);
    let held = claim(&mut c, "w1", 10);
    for sizes in ["{5}", "{5,-1}"] {
        let e = c
            .query(
                "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted', $3::text::bigint[])",
                &[&held.lease, &held.ids, &sizes],
            )
            .unwrap_err();
        assert!(
            db_error(&e).contains("sizes must hold one size in bytes per id"),
            "{sizes}: {}",
            db_error(&e)
        );
    }
    let claimed: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'claimed' AND bytes IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(claimed, 2);
    // One unknown size is fine: that row's bytes stay unknown.
    let rows = c
        .query(
            "SELECT result FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted', ARRAY[7, NULL]::bigint[])",
            &[&held.lease, &held.ids],
        )
        .unwrap();
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "confirmed"));
    let bytes: Vec<Option<i64>> = c
        .query(
            "SELECT bytes FROM orphan_cleanup.deletion_queue ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bytes, vec![Some(7), None]);
}

type Report = Vec<(String, i64, i64, i64, Option<String>, String)>;

fn report(c: &mut postgres::Client, period: &str, periods: i32) -> Report {
    c.query(
        "SELECT period_start::text, objects_reclaimed, bytes_reclaimed::bigint, orphans_found,
                bytes_still_queued::text, monthly_saving::text
         FROM orphan_cleanup.savings_report($1, $2)",
        &[&period, &periods],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect()
}

/// savings_report() per day and per week: objects and bytes reclaimed by the day they were
/// deleted, orphans found by the day they were queued, the projected monthly saving at
/// storage_price_per_gb_month; and the same figures after history_retention has pruned the
/// queue rows they came from (the ledger keeps them).
#[test]
fn the_savings_report_adds_up_and_outlives_the_pruning_of_its_rows() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("storage_price_per_gb_month", "0.5"),
    ]);
    let db = TestDb::attached("savings_report");
    let mut c = db.client();
    for i in 0..6 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("r/{i}.png"))),
            "2 hours",
            "r",
        );
    }
    assert_eq!(cycle(&mut c).2, 6);
    let held = claim(&mut c, "w1", 10);
    // Four deleted (1 GiB, 1 GiB, 512 MiB and an unknown size), one absent, one still queued
    // at the end (given back).
    let gib: i64 = 1 << 30;
    c.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, ($2::bigint[])[1:4], 'deleted', $3::text::bigint[])",
        &[&held.lease, &held.ids, &format!("{{{gib},{gib},{},NULL}}", gib / 2)],
    )
    .unwrap();
    c.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, ($2::bigint[])[5:5], 'absent')",
        &[&held.lease, &held.ids],
    )
    .unwrap();
    c.query(
        "SELECT orphan_cleanup.release('w1', $1, ($2::bigint[])[6:6], NULL, true)",
        &[&held.lease, &held.ids],
    )
    .unwrap();
    // Spread over time: two deletions and their queueing ten days ago, the others today.
    c.execute(
        "UPDATE orphan_cleanup.deletion_queue
            SET enqueued_at = enqueued_at - interval '10 days', finished_at = finished_at - interval '10 days'
          WHERE id = ANY (($1::bigint[])[1:2])",
        &[&held.ids],
    )
    .unwrap();

    let days = report(&mut c, "day", 12);
    assert_eq!(days.len(), 12);
    let ten_days_ago = &days[1];
    let today = &days[11];
    assert_eq!(
        (ten_days_ago.1, ten_days_ago.2, ten_days_ago.3),
        (2, 2 * gib, 2)
    );
    assert_eq!(ten_days_ago.5, "1.00", "2 GiB at $0.50 per GB-month");
    assert_eq!(
        (today.1, today.2, today.3),
        (2, gib / 2, 4),
        "two deleted today (one of unknown size), four queued today"
    );
    assert_eq!(today.5, "0.25");
    assert_eq!(
        today.4, None,
        "no storage.objects here: the queued bytes are unknown"
    );
    assert!(days[2..11].iter().all(|d| (d.1, d.2, d.3) == (0, 0, 0)));
    let weeks = report(&mut c, "week", 3);
    assert_eq!(weeks.iter().map(|w| w.1).sum::<i64>(), 4);
    assert_eq!(weeks.iter().map(|w| w.2).sum::<i64>(), 2 * gib + gib / 2);
    assert_eq!(weeks.iter().map(|w| w.3).sum::<i64>(), 6);

    // history_retention prunes the rows finished ten days ago: the report does not change.
    c.batch_execute("SELECT orphan_cleanup._prune(interval '5 days')")
        .unwrap();
    let left: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 4, "the two old rows were pruned");
    assert_eq!(report(&mut c, "day", 12), days);
    assert_eq!(report(&mut c, "week", 3), weeks);

    // The queue's depth at the end of each day: one row queued five days ago and deleted today
    // waited through the days between; the row given back waits now.
    c.execute(
        "UPDATE orphan_cleanup.deletion_queue SET enqueued_at = enqueued_at - interval '5 days' WHERE id = ($1::bigint[])[4]",
        &[&held.ids],
    )
    .unwrap();
    let depth: Vec<i64> = c
        .query(
            "SELECT queue_depth FROM orphan_cleanup.savings_report('day', 12)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(depth, [vec![0; 6], vec![1; 6]].concat());

    for (period, periods, says) in [
        ("month", 3, "period must be 'day' or 'week'"),
        ("day", 0, "periods must be between 1 and 3660"),
    ] {
        let e = c
            .query(
                "SELECT * FROM orphan_cleanup.savings_report($1, $2)",
                &[&period, &periods],
            )
            .unwrap_err();
        assert!(db_error(&e).contains(says), "{}", db_error(&e));
    }
}

/// `reaper report`, as the reaper's own role: the JSON says what savings_report() says, today's
/// row holds the bytes that left storage and the bytes still queued (the emulator keeps
/// storage.objects), the CSV carries the same numbers, the table says the totals in words; a
/// period or a count it cannot report is refused by name.
#[test]
fn reaper_report_says_what_the_ledger_holds_in_every_format() {
    let name = "savings_reaper_report";
    let db = TestDb::attached(name);
    let emu = Emulator::start_keeping(name);
    settings(&[("allowed_buckets", "renders"), ("allowed_hosts", &emu.host)]);
    reaper_role();
    emu.create_bucket("renders");
    let mut c = db.client();
    for (key, size) in [
        ("p/a.png", 1000usize),
        ("p/b.png", 2500),
        ("p/c.png", 40_000),
    ] {
        emu.upload("renders", key, &vec![b'x'; size]);
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", key)),
            "2 hours",
            "report",
        );
    }
    assert_eq!(cycle(&mut c).2, 3);
    let out = reaper(&db.name, &emu, &["drain"]).run();
    assert!(out.status.success(), "{}", output_text(&out));
    // One more orphan, queued and not yet deleted.
    emu.upload("renders", "p/queued.png", &vec![b'x'; 777]);
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "p/queued.png")),
        "2 hours",
        "report",
    );
    assert_eq!(cycle(&mut c).2, 1);

    let report = |args: &[&str]| {
        let mut all = vec!["report", "--period", "day", "--periods", "3"];
        all.extend_from_slice(args);
        let out = reaper(&db.name, &emu, &all).run();
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&report(&["--format", "json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let today = &rows[2];
    assert_eq!(today["objects_reclaimed"], 3);
    assert_eq!(today["bytes_reclaimed"], 43_500);
    assert_eq!(today["orphans_found"], 4);
    assert_eq!(today["strays_found"], 0);
    assert_eq!(today["bytes_still_queued"], 777);
    assert_eq!(today["queue_depth"], 1);
    let sql: Vec<(String, i64, i64)> = c
        .query(
            "SELECT period_start::text, objects_reclaimed, bytes_reclaimed::bigint FROM orphan_cleanup.savings_report('day', 3)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let from_json: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["period_start"].as_str().unwrap().to_string(),
                r["objects_reclaimed"].as_i64().unwrap(),
                r["bytes_reclaimed"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(from_json, sql);

    let csv = report(&["--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[0].starts_with("period_start,objects_reclaimed,bytes_reclaimed"),
        "{csv}"
    );
    assert!(
        lines[3].starts_with(&format!("{},3,43500,4,0,", sql[2].0)),
        "{csv}"
    );

    let table = report(&[]);
    assert!(
        table.starts_with(&format!(
            "Over the last 3 days (since {}): 3 objects reclaimed (42.5 KiB), 4 orphans and 0 strays found;",
            sql[0].0
        )),
        "{table}"
    );
    assert!(table.contains("Still queued: 777 B."), "{table}");

    // /metrics: the bytes reclaimed by kind (every reaper shows the database's total) and the
    // bytes still queued.
    let addr = free_addr();
    let child = reaper(
        &db.name,
        &emu,
        &["run", "--no-probe", "--metrics-addr", &addr],
    )
    .env("REAPER_BUCKETS", "none-of-these")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .start();
    wait_for(
        std::time::Duration::from_secs(60),
        "the reclaimed and queued bytes on /metrics",
        || {
            http_get(&addr, "/metrics").is_ok_and(|(_, m)| {
                m.contains("\nreaper_reclaimed_bytes{kind=\"orphan\"} 43500.0\n")
                    && m.contains("\nreaper_reclaimed_bytes{kind=\"stray\"} 0.0\n")
                    && m.contains("\nreaper_queued_bytes 777.0\n")
            })
        },
    );
    signal(&child, libc::SIGTERM);
    let out = wait_with_deadline(child, std::time::Duration::from_secs(20));
    assert!(out.status.success(), "{}", output_text(&out));

    for (args, says) in [
        (
            &["report", "--period", "month"][..],
            "possible values: day, week",
        ),
        (&["report", "--periods", "0"][..], "0 is not in 1..=3660"),
    ] {
        let out = reaper(&db.name, &emu, args).run();
        assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
        assert!(output_text(&out).contains(says), "{}", output_text(&out));
    }
}

/// `reaper report --html`: one self-contained page, loaded in a real headless browser (Debian's
/// `chromium`): every chart shows one laid-out point per day and series, the totals are in words
/// above them, and a screenshot is kept (`target/test-artifacts/savings-report.png`).
#[test]
fn the_html_report_renders_its_charts_in_a_real_browser() {
    let name = "savings_html_report";
    let db = TestDb::attached(name);
    let emu = Emulator::start_keeping(name);
    settings(&[("allowed_buckets", "renders"), ("allowed_hosts", &emu.host)]);
    reaper_role();
    emu.create_bucket("renders");
    let mut c = db.client();
    for i in 0..5usize {
        let key = format!("h/{i}.png");
        emu.upload("renders", &key, &vec![b'x'; 1000 * (i + 1)]);
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", &key)),
            "2 hours",
            "html",
        );
    }
    assert_eq!(cycle(&mut c).2, 5);
    let out = reaper(&db.name, &emu, &["drain"]).run();
    assert!(out.status.success(), "{}", output_text(&out));
    // Spread over the week: row i queued and deleted i days ago.
    c.batch_execute(
        "UPDATE orphan_cleanup.deletion_queue
            SET enqueued_at = enqueued_at - (substring(object_path FROM 'h/(.)')::int * interval '1 day'),
                finished_at = finished_at - (substring(object_path FROM 'h/(.)')::int * interval '1 day')",
    )
    .unwrap();

    let artifacts = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let html = artifacts.join("savings-report.html");
    let _ = std::fs::remove_file(&html);
    let html_arg = html.to_str().unwrap();
    let out = reaper(
        &db.name,
        &emu,
        &[
            "report",
            "--period",
            "day",
            "--periods",
            "7",
            "--html",
            html_arg,
        ],
    )
    .run();
    assert!(out.status.success(), "{}", output_text(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("Over the last 7 days") && page.contains("5 objects reclaimed (14.6 KiB)"),
        "the totals in words"
    );

    let url = format!("file://{}", html.display());
    let dom = chromium(&["--dump-dom", "--virtual-time-budget=5000", &url]);
    assert!(
        dom.contains(r#"data-ready="yes""#),
        "the page's script ran:\n{dom:.2000}"
    );
    for (chart, points) in [
        ("bytes-reclaimed", 7),
        ("found-and-deleted", 21),
        ("queue-depth", 7),
        ("leak-rate", 7),
    ] {
        let at = dom
            .find(&format!(r#"data-chart="{chart}""#))
            .unwrap_or_else(|| panic!("no chart {chart}"));
        let svg_tag = &dom[dom[..at].rfind("<svg").unwrap()..at + dom[at..].find('>').unwrap()];
        assert!(
            svg_tag.contains(&format!(r#"data-rendered="{points}""#)),
            "{chart}: {svg_tag}"
        );
    }
    let shot = artifacts.join("savings-report.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=800,1400",
        "--virtual-time-budget=5000",
        &url,
    ]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// Runs headless Chromium with `args`, offline, and returns its standard output.
fn chromium(args: &[&str]) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--user-data-dir=/tmp/pg_orphan_cleanup-chromium",
        ])
        .args(args)
        .output()
        .expect("chromium (scripts/setup.sh installs it)");
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
