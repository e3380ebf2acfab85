//! What `claim()` and `confirm()` cost per row on their own, with no storage and no reaper: the
//! database work every drain is made of. Measured for this version and for the last release
//! (0.1.0, installed from its script in `pg_orphan_cleanup/released/`) on the same data, so a
//! change to the save guard's protocol shows its price (issue 11 allows at most 20% more).

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::{psql_client, queued_db_at, Env, Install};

#[derive(Serialize)]
pub struct QueueCost {
    pub version: String,
    pub rows: u64,
    /// The one cycle that queued the rows (n orphans among 10n jobs), per orphan.
    pub cycle_us_per_orphan: f64,
    pub claim_us_per_row: f64,
    pub confirm_us_per_row: f64,
    /// The per-object record (`orphan_cleanup.objects`, 0.2.0 on): rows after the drain, then
    /// after the pruning of a day later and of 30 days later (the clock moved by rewriting the
    /// rows' times), and the table's bytes per row after the drain.
    pub record: Option<ObjectRecord>,
}

#[derive(Serialize)]
pub struct ObjectRecord {
    pub after_drain: i64,
    pub after_a_day: i64,
    pub after_30_days: i64,
    pub bytes_per_row: i64,
}

/// How the per-object record grows with a drain and shrinks as it ages.
fn object_record(c: &mut postgres::Client) -> Result<ObjectRecord> {
    let count = |c: &mut postgres::Client| -> Result<i64> {
        Ok(
            c.query_one("SELECT count(*) FROM orphan_cleanup.objects", &[])?
                .get(0),
        )
    };
    let after_drain = count(c)?;
    let bytes: i64 = c
        .query_one(
            "SELECT pg_total_relation_size('orphan_cleanup.objects')",
            &[],
        )?
        .get(0);
    let prune =
        "SELECT orphan_cleanup._prune_objects(a, 'bench', clock_timestamp() + interval '1 hour') FROM orphan_cleanup.attachment AS a";
    c.batch_execute(&format!(
        "UPDATE orphan_cleanup.objects SET touched_at = touched_at - interval '2 days'; {prune};"
    ))?;
    let after_a_day = count(c)?;
    c.batch_execute(&format!(
        "UPDATE orphan_cleanup.objects SET touched_at = touched_at - interval '31 days',
                last_handed_out_at = last_handed_out_at - interval '31 days'; {prune};"
    ))?;
    let after_30_days = count(c)?;
    Ok(ObjectRecord {
        after_drain,
        after_a_day,
        after_30_days,
        bytes_per_row: bytes / after_drain.max(1),
    })
}

/// Queues `n` orphans (beside 9n saved jobs) with `install`, then claims them 4,000 at a
/// time, as the reaper does, confirming each batch.
pub fn queue_cost(env: &Env, n: u64, install: Install) -> Result<QueueCost> {
    let queued = queued_db_at(env, n, install)?;
    let mut c = psql_client(env, "bench_drain")?;
    let installed: String = match install {
        Install::Managed => format!(
            "{} (managed)",
            c.query_one("SELECT orphan_cleanup.managed_version()", &[])?
                .get::<_, String>(0)
        ),
        _ => c
            .query_one(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_orphan_cleanup'",
                &[],
            )?
            .get(0),
    };
    let (mut claim_s, mut confirm_s, mut rows) = (0.0, 0.0, 0u64);
    loop {
        let t = Instant::now();
        // 0.1.0's claim has no lease token, and its confirm takes none.
        let with_token = installed != "0.1.0";
        let rows_claimed = c.query(
            if with_token {
                "SELECT id, lease_token FROM orphan_cleanup.claim('bench-cost', 4000)"
            } else {
                "SELECT id, NULL::text FROM orphan_cleanup.claim('bench-cost', 4000)"
            },
            &[],
        )?;
        let ids: Vec<i64> = rows_claimed.iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            break;
        }
        let lease: Option<String> = rows_claimed[0].get(1);
        claim_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let results = match &lease {
            Some(lease) => c.query(
                "SELECT result FROM orphan_cleanup.confirm('bench-cost', $1, $2, 'deleted')",
                &[lease, &ids],
            )?,
            None => c.query(
                "SELECT result FROM orphan_cleanup.confirm('bench-cost', $1, 'deleted')",
                &[&ids],
            )?,
        };
        confirm_s += t.elapsed().as_secs_f64();
        if let Some(r) = results
            .iter()
            .map(|r| r.get::<_, String>(0))
            .find(|r| r != "confirmed")
        {
            bail!("{installed}: a confirm came back {r:?}");
        }
        rows += ids.len() as u64;
    }
    if rows != n {
        bail!("{installed}: claimed {rows} of {n} queued rows");
    }
    let record = if installed == "0.1.0" {
        None
    } else {
        Some(object_record(&mut c)?)
    };
    Ok(QueueCost {
        record,
        version: installed,
        rows,
        cycle_us_per_orphan: queued.cycle_ms * 1000.0 / n as f64,
        claim_us_per_row: claim_s * 1e6 / rows as f64,
        confirm_us_per_row: confirm_s * 1e6 / rows as f64,
    })
}
