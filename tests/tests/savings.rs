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
