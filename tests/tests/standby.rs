//! On a hot standby the worker idles, cycles refuse, and health() says so.

use std::process::Command;
use std::time::Duration;

use e2e::process::Hermetic;
use e2e::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(args: &[&str]) {
    let out = Command::new("runuser")
        .arg("-u")
        .arg("postgres")
        .arg("--")
        .args(args)
        .run();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the cluster in `data` like a power cut, if it runs; any left from an earlier run too.
fn stop_immediately(data: &str) {
    let _ = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            data,
            "-m",
            "immediate",
            "-w",
            "stop",
        ])
        .run();
}

#[test]
fn on_a_hot_standby_the_worker_idles_and_health_says_so() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("interval", "1s"),
    ]);
    let mut primary = setup_postgres_db();

    let standby_port = (port() + 2).to_string();
    let dir = format!("/tmp/pg_orphan_cleanup-standby-{standby_port}");
    let data = format!("{dir}/data");
    let log = format!("{dir}/postgres.log");
    stop_immediately(&data);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Command::new("chown")
        .args(["postgres:postgres", &dir])
        .status()
        .unwrap()
        .success());
    let primary_port = port().to_string();
    as_postgres(&[
        &format!("{PG_BIN}/pg_basebackup"),
        "-h",
        "127.0.0.1",
        "-p",
        &primary_port,
        "-U",
        "postgres",
        "-D",
        &data,
        "-R",
        "-X",
        "stream",
        "--checkpoint=fast",
        "--no-sync",
    ]);
    // Stopped however the test ends: a standby left running would replay into the next run.
    let _stopped = e2e::process::Defer::new({
        let data = data.clone();
        move || stop_immediately(&data)
    });
    let opts = format!("-p {standby_port} -c unix_socket_directories={dir}");
    as_postgres(&[
        &format!("{PG_BIN}/pg_ctl"),
        "-D",
        &data,
        "-o",
        &opts,
        "-l",
        &log,
        "-w",
        "start",
    ]);

    let dsn = format!("host=127.0.0.1 port={standby_port} user=postgres dbname=postgres");
    let mut standby = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
    let in_recovery: bool = standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery);
    wait_for(
        Duration::from_secs(20),
        "the standby's worker to say it idles",
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("this server is a standby; cycles run on the primary only")
        },
    );
    let (status, detail): (String, String) = standby
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'standby'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (status.as_str(), detail.as_str()),
        (
            "warning",
            "this server is a standby: cycles and claims run on the primary"
        )
    );
    let ran = standby
        .query("SELECT * FROM orphan_cleanup.run_cycle()", &[])
        .unwrap();
    assert!(ran.is_empty(), "a cycle on a standby does nothing");

    as_postgres(&[
        &format!("{PG_BIN}/pg_ctl"),
        "-D",
        &data,
        "-m",
        "fast",
        "-w",
        "stop",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    settings(&[]);
    teardown_postgres_db(&mut primary);
}
