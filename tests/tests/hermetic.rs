//! The suite's own hygiene: a test that panics, or whose test binary is killed outright, leaves
//! no process behind. A leaked reaper kept claiming rows in the shared cluster with an earlier
//! test's settings and failed the next run (issue 10).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::process::Proc;
use e2e::storage::*;
use e2e::*;

/// Run by the tests below in a child test process (it does nothing in a normal run): starts an
/// emulator and a reaper that would run forever, prints their pids, then dies the way
/// `PGOC_HERMETIC_HELPER` says.
#[test]
#[ignore = "a helper the other tests in this file run in a child process"]
fn helper_starts_processes_then_dies() {
    let Ok(how) = std::env::var("PGOC_HERMETIC_HELPER") else {
        return;
    };
    let emu = Emulator::start();
    // `reaper run` against a port where nothing listens retries forever.
    let reaper = Proc::spawn(
        reaper("postgres", &emu, &["run", "--no-probe"])
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    println!("PIDS {} {}", emu.pid(), reaper.id());
    match how.as_str() {
        "panic" => panic!("this helper test fails on purpose"),
        _ => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
    }
}

fn alive(pid: i32) -> bool {
    // A zombie has ended: only its exit status waits for its (new) parent.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Runs the helper in a child test process and returns the pids it printed, after it is gone.
fn helper(how: &str) -> Vec<i32> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_starts_processes_then_dies",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PGOC_HERMETIC_HELPER", how)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read on a thread of its own, so that a helper that never prints fails this test instead
    // of hanging it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test ... " on the same line first.
            if let Some(rest) = line.split("PIDS ").nth(1) {
                let pids: Vec<i32> = rest
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect();
                let _ = tx.send(pids);
                return;
            }
        }
    });
    let pids = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the helper printed no pids within a minute");
        });
    assert_eq!(pids.len(), 2, "the helper printed its children's pids");
    assert!(pids.iter().all(|p| alive(*p)), "both children were running");
    if how == "killed" {
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the helper died as asked: {status}");
    pids
}

#[test]
fn a_test_that_panics_leaves_no_process_behind() {
    let pids = helper("panic");
    wait_for(
        Duration::from_secs(10),
        "the panicking test's children to end",
        || pids.iter().all(|p| !alive(*p)),
    );
}

#[test]
fn a_test_binary_killed_outright_leaves_no_process_behind() {
    // No unwinding, no Drop: only the kernel's parent-death signal can end the children.
    let pids = helper("killed");
    wait_for(
        Duration::from_secs(10),
        "the killed test's children to end",
        || pids.iter().all(|p| !alive(*p)),
    );
}
