//! Fixtures for the storage half: a real `storage-emulator` process per test, and `reaper`
//! runs as real processes. Both binaries come from `target/debug` (scripts/test.sh builds them).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::process::{hermetic, Proc};

use serde_json::{json, Value};

pub const JWT_SECRET: &str = "e2e-test-jwt-secret-at-least-32-bytes-long";
/// Opaque keys, as new Supabase projects issue them (the gateway maps them to roles).
pub const OPAQUE_SECRET_KEY: &str = "sb_secret_e2e0123456789";
pub const OPAQUE_PUBLISHABLE_KEY: &str = "sb_publishable_e2e0123456789";

pub fn binary(name: &str) -> PathBuf {
    let path = crate::repo_root().join("target/debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p reaper -p storage-emulator` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Keys signed with [`JWT_SECRET`]: (service_role, anon).
pub fn keys() -> (String, String) {
    (
        minted_key(JWT_SECRET, "SERVICE_ROLE_KEY"),
        minted_key(JWT_SECRET, "ANON_KEY"),
    )
}

/// One of the keys `storage-emulator keys` prints for `secret`: `SERVICE_ROLE_KEY`, `ANON_KEY`
/// or `NO_ROLE_KEY` (signed, but without a role claim).
pub fn minted_key(secret: &str, which: &str) -> String {
    let out = crate::process::output(
        Command::new(binary("storage-emulator")).args(["keys", "--jwt-secret", secret]),
        Duration::from_secs(30),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("storage-emulator keys prints no {which}"))
        .to_string()
}

/// A service-role key signed with another project's secret: storage refuses it (403).
pub fn foreign_key() -> String {
    minted_key(
        "another-project-secret-that-is-long-enough",
        "SERVICE_ROLE_KEY",
    )
}

/// A free local address for `reaper run --metrics-addr`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// GET `path` from a reaper's metrics address: (status, body) whatever the status, or the
/// transport error's text.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    match ureq::get(&format!("http://{addr}{path}")).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => {
            Ok((r.status(), r.into_string().map_err(|e| e.to_string())?))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A running emulator on a free port, killed when dropped (or when its test's thread ends).
pub struct Emulator {
    _proc: Proc,
    pub base: String,
    pub host: String,
    pub service_key: String,
    pub anon_key: String,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "pgoc-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Kept for the post-mortem: reaper logs live here.
            eprintln!("kept {} (the test failed)", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

impl Emulator {
    pub fn start() -> Emulator {
        Emulator::start_with(&[])
    }

    /// An emulator that keeps `storage.objects` and `storage.buckets` in database `db`, as the
    /// real server keeps them in the project's database.
    pub fn start_keeping(db: &str) -> Emulator {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            crate::port()
        );
        Emulator::start_with(&["--database-url", &url])
    }

    fn start_with(extra: &[&str]) -> Emulator {
        let dir = TempDir::new("emulator");
        let mut child = Proc::spawn(
            Command::new(binary("storage-emulator"))
                .args([
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--jwt-secret",
                    JWT_SECRET,
                ])
                .args([
                    "--secret-key",
                    OPAQUE_SECRET_KEY,
                    "--publishable-key",
                    OPAQUE_PUBLISHABLE_KEY,
                    "--data-dir",
                ])
                .arg(&dir.0)
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped()),
        );
        let mut line = String::new();
        BufReader::new(child.take_stdout().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("storage-emulator listening on ")
            .expect("the emulator prints its address")
            .to_string();
        let host = base.trim_start_matches("http://").to_string();
        let (service_key, anon_key) = keys();
        Emulator {
            _proc: child,
            base,
            host,
            service_key,
            anon_key,
            _dir: dir,
        }
    }

    /// The emulator's process id.
    pub fn pid(&self) -> u32 {
        self._proc.id()
    }

    fn storage(&self, path: &str) -> String {
        format!("{}/storage/v1/{path}", self.base)
    }

    pub fn create_bucket(&self, name: &str) {
        ureq::post(&self.storage("bucket"))
            .set("Authorization", &format!("Bearer {}", self.service_key))
            .send_json(json!({"name": name, "public": true}))
            .unwrap();
    }

    pub fn upload(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path: Vec<String> = key.split('/').map(|s| s.replace(' ', "%20")).collect();
        ureq::post(&self.storage(&format!("object/{bucket}/{}", path.join("/"))))
            .set("Authorization", &format!("Bearer {}", self.service_key))
            .set("x-upsert", "true")
            .send_bytes(bytes)
            .unwrap();
    }

    /// Deletes one object through the API, as another client of storage would.
    pub fn delete_one(&self, bucket: &str, key: &str) {
        ureq::delete(&self.storage(&format!("object/{bucket}/{key}")))
            .set("Authorization", &format!("Bearer {}", self.service_key))
            .call()
            .unwrap();
    }

    /// Makes the objects of `bucket` under `prefix` as old as `days` days, as the list route
    /// gives them (for listings through the API; `storage.objects` is aged in the database).
    pub fn age(&self, bucket: &str, prefix: &str, days: u64) {
        let when = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
        let when = humantime::format_rfc3339_seconds(when).to_string();
        ureq::put(&format!("{}/__emulator/objects/created_at", self.base))
            .send_json(json!({"bucket": bucket, "prefix": prefix, "created_at": when}))
            .unwrap();
    }

    /// Every object, as `bucket/key`.
    pub fn objects(&self) -> std::collections::BTreeSet<String> {
        let v: Value = ureq::get(&format!("{}/__emulator/objects", self.base))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["bucket"].as_str().unwrap(),
                    o["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    pub fn set_faults(&self, faults: Value) {
        ureq::put(&format!("{}/__emulator/faults", self.base))
            .send_json(faults)
            .unwrap();
    }

    /// Lets `allow` more bulk deletes through, then holds every further one until
    /// [`Emulator::open_gate`]. See `storage-emulator/src/gate.rs`.
    pub fn gate(&self, allow: u64) {
        ureq::put(&format!("{}/__emulator/gate", self.base))
            .send_json(json!({ "allow": allow }))
            .unwrap();
    }

    pub fn open_gate(&self) {
        ureq::put(&format!("{}/__emulator/gate", self.base))
            .send_json(json!({}))
            .unwrap();
    }

    /// The gate's counters: `passed`, `held` (waiting now), `held_total` (ever held).
    pub fn gate_state(&self) -> Value {
        ureq::get(&format!("{}/__emulator/gate", self.base))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    /// Waits until a bulk delete is held at the gate beyond the `held_total` a test saw before:
    /// then a request is in flight and the drain cannot get past it until the gate opens.
    pub fn wait_for_held(&self, seen_before: u64) -> u64 {
        let mut total = 0;
        crate::wait_for(
            Duration::from_secs(120),
            "a bulk delete to be held at the emulator's gate",
            || {
                total = self.gate_state()["held_total"].as_u64().unwrap();
                total > seen_before
            },
        );
        total
    }

    /// The request log: (method, path, status, names, deleted) per storage request.
    pub fn requests(&self) -> Vec<Value> {
        let v: Value = ureq::get(&format!("{}/__emulator/requests", self.base))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        v.as_array().unwrap().clone()
    }

    /// Empties the request log (setup's uploads included).
    pub fn clear_requests(&self) {
        ureq::delete(&format!("{}/__emulator/requests", self.base))
            .call()
            .unwrap();
    }

    pub fn public_url(&self, bucket: &str, key: &str) -> String {
        format!(
            "{}/storage/v1/object/public/{bucket}/{}",
            self.base,
            key.replace(' ', "%20")
        )
    }
}

/// A reaper command against `db` and `emu`, as the reaper's own login role. Hermetic: the
/// process dies with the test's thread. Start it with [`Proc::spawn`] or [`run`].
pub fn reaper(db: &str, emu: &Emulator, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("reaper"));
    hermetic(&mut cmd);
    cmd.args(args)
        .env(
            "DATABASE_URL",
            format!("postgres://reaper_login@127.0.0.1:{}/{db}", crate::port()),
        )
        .env("SUPABASE_URL", &emu.base)
        .env("SUPABASE_SERVICE_ROLE_KEY", &emu.service_key)
        .env("REAPER_BUCKETS", "renders")
        .env("REAPER_LOG", "info")
        .env_remove("REAPER_WORKER_ID");
    cmd
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Creates the reaper's login role (a member of orphan_cleanup_reaper) if missing.
pub fn reaper_role() {
    crate::connect("postgres")
        .batch_execute(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reaper_login') THEN
                     CREATE ROLE reaper_login LOGIN IN ROLE orphan_cleanup_reaper;
                 END IF;
             END $$;",
        )
        .unwrap();
}

/// Runs a command to completion (a `reaper drain`, say) with a deadline of five minutes.
pub fn run(cmd: &mut Command) -> Output {
    crate::process::output(cmd, Duration::from_secs(300))
}

/// Sends `signal` to a child process.
pub fn signal(child: &Proc, signal: i32) {
    child.signal(signal);
}

/// Waits for a child with a deadline; kills it and panics past the deadline.
pub fn wait_with_deadline(child: Proc, deadline: Duration) -> Output {
    child.wait_with_deadline(deadline)
}
