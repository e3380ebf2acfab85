//! Shared fixtures for the end-to-end tests: a database per test on the throwaway cluster that
//! `scripts/test.sh` starts (`PGOC_PORT`, default 25433), with the app schema, the extension,
//! its indexes and `attach()` done, and helpers to change the cluster-wide settings.
//!
//! Settings are cluster-wide (`ALTER SYSTEM`), so the tests run one at a time
//! (`--test-threads=1`). Every test starts from a clean slate, even after an earlier test failed:
//! its first connection resets every setting the suite may have changed (`ALTER SYSTEM RESET
//! ALL`) and waits until new sessions see the defaults. libtest runs each test in a thread of
//! its own, named after it; the reset happens once per such thread.

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::process::Hermetic;

pub use postgres;

pub mod chaos;
pub mod platform;
pub mod pooler;
pub mod process;
pub mod storage;

pub fn port() -> u16 {
    std::env::var("PGOC_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(25433)
}

/// The repository root (the tests read `sql/*.sql` from it).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn connect(db: &str) -> Client {
    connect_as(db, "postgres")
}

pub fn connect_as(db: &str, user: &str) -> Client {
    start_of_test();
    raw_connect(db, user)
}

thread_local! {
    static STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This test's managed-edition databases, and the settings it asked for last: the managed
    /// edition keeps its settings per database, in a table, so [`settings`] writes them there too.
    static MANAGED_DBS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    static WANTED: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether the end-to-end tests install the managed edition instead of the extension
/// (`PGOC_EDITION=managed`; `scripts/test.sh` runs the suites that apply to both twice).
pub fn managed() -> bool {
    std::env::var("PGOC_EDITION").as_deref() == Ok("managed")
}

/// How a hint tells a DBA to change `setting` in the edition under test.
pub fn how_to_set(setting: &str) -> String {
    if managed() {
        format!("SELECT orphan_cleanup.set_setting('{setting}'")
    } else {
        format!("ALTER SYSTEM SET orphan_cleanup.{setting}")
    }
}

/// Gives a managed-edition database the settings the test asked for, through set_setting():
/// every setting back to its default, then the wanted ones. Names the edition does not have
/// (pause_points, a test hook that stays a GUC) are left to ALTER SYSTEM.
fn apply_managed_settings(db: &str) {
    let wanted = WANTED.with(|w| w.borrow().clone());
    let mut c = raw_connect(db, "postgres");
    c.batch_execute("SELECT orphan_cleanup.set_setting(name, NULL) FROM orphan_cleanup.settings")
        .unwrap();
    for (name, value) in wanted {
        c.query(
            "SELECT orphan_cleanup.set_setting(d.name, $2) FROM orphan_cleanup._setting_defs() AS d WHERE d.name = $1",
            &[&name, &value],
        )
        .unwrap_or_else(|e| panic!("set_setting({name}, {value}): {}", db_error(&e)));
    }
}

/// Once per test (per libtest thread, which carries the test's name; helper threads a test
/// spawns have no name and never reset): resets every setting an earlier test may have left.
fn start_of_test() {
    let is_test_thread = std::thread::current().name().is_some_and(|n| n != "main");
    if !is_test_thread || STARTED.get() {
        return;
    }
    STARTED.set(true);
    reset_settings();
}

/// `ALTER SYSTEM RESET ALL`, reloaded, and waited for: afterwards no new session sees any value
/// from `postgresql.auto.conf`.
pub fn reset_settings() {
    let mut admin = raw_connect("postgres", "postgres");
    let from_auto_conf = "SELECT count(*) FROM pg_catalog.pg_file_settings WHERE sourcefile LIKE '%/postgresql.auto.conf'";
    let left: i64 = admin.query_one(from_auto_conf, &[]).unwrap().get(0);
    if left > 0 {
        admin.batch_execute("ALTER SYSTEM RESET ALL").unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    wait_for(
        Duration::from_secs(30),
        "the settings of an earlier test to be reset",
        || {
            raw_connect("postgres", "postgres")
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_settings WHERE sourcefile LIKE '%/postgresql.auto.conf'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 0
        },
    );
}

fn raw_connect(db: &str, user: &str) -> Client {
    let dsn = format!(
        "host=127.0.0.1 port={} user={user} dbname={db} application_name=e2e",
        port()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(&dsn, NoTls) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("cannot connect to the test cluster on port {} as {user}: {e} (run scripts/cluster.sh start)", port()),
        }
    }
}

/// `ALTER SYSTEM SET orphan_cleanup.<name> = <value>`, quoted by the server (`format('%I = %L')`):
/// it validates the value as a reload would. No reload.
pub fn alter_system_set(
    admin: &mut Client,
    name: &str,
    value: &str,
) -> Result<(), postgres::Error> {
    let sql: String = admin
        .query_one(
            "SELECT format('ALTER SYSTEM SET %I = %L', $1::text, $2::text)",
            &[&format!("orphan_cleanup.{name}"), &value],
        )?
        .get(0);
    admin.batch_execute(&sql)
}

/// Sets `orphan_cleanup.*` settings cluster-wide after resetting all of them, reloads, and waits
/// until a new session sees every value. Give values as `SHOW` prints them (`'1s'`, `'0'`).
///
/// A test that does not name `cycle_time_budget` gets `1h`: a cycle's work then never depends on
/// how fast the machine is (the default 5 s budget stopped a 5,001-job first cycle of the managed
/// edition after one chunk on a slower CI machine). The tests of the budget set it themselves.
pub fn settings(pairs: &[(&str, &str)]) {
    start_of_test();
    let mut pairs = pairs.to_vec();
    if !pairs.iter().any(|(name, _)| *name == "cycle_time_budget") {
        pairs.push(("cycle_time_budget", "1h"));
    }
    let pairs = pairs.as_slice();
    let mut admin = raw_connect("postgres", "postgres");
    admin.batch_execute("ALTER SYSTEM RESET ALL").unwrap();
    for (name, value) in pairs {
        alter_system_set(&mut admin, name, value).unwrap();
    }
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    WANTED.with(|w| {
        *w.borrow_mut() = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    });
    for db in MANAGED_DBS.with(|d| d.borrow().clone()) {
        apply_managed_settings(&db);
    }
    wait_for(Duration::from_secs(30), "settings to be reloaded", || {
        let mut c = raw_connect("postgres", "postgres");
        // The library defines the settings; load it so SHOW knows them.
        c.batch_execute("LOAD 'pg_orphan_cleanup'").unwrap();
        pairs.iter().all(|(name, value)| {
            let shown: String = c
                .query_one(&format!("SHOW orphan_cleanup.{name}"), &[])
                .unwrap()
                .get(0);
            shown == *value
        })
    });
}

/// Polls `check` until it is true, panicking with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster of a test's own: `scripts/cluster.sh` on `port` with `env` (PGOC_PRELOAD,
/// PGOC_PLATFORM, ...), started afresh and destroyed when dropped. The drop ignores a failed
/// destroy: it may run while the test unwinds, where a second panic would abort the suite.
pub struct OwnCluster {
    port: u16,
    env: Vec<(String, String)>,
}

impl OwnCluster {
    pub fn start(port: u16, env: &[(&str, &str)]) -> OwnCluster {
        let cluster = OwnCluster {
            port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        cluster.run("destroy");
        cluster.run("start");
        cluster
    }

    /// Destroys it now, and fails the test if that fails.
    pub fn destroy(self) {
        self.run("destroy");
    }

    fn run(&self, cmd: &str) {
        let out = self.command(cmd).run();
        assert!(
            out.status.success(),
            "cluster.sh {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn command(&self, cmd: &str) -> std::process::Command {
        let mut c = std::process::Command::new(repo_root().join("scripts/cluster.sh"));
        c.arg(cmd)
            .env("PGOC_PORT", self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.command("destroy").run();
    }
}

/// A database of its own for one test: app schema, extension, recommended indexes.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Creates the database afresh. Does not attach: call [`TestDb::attach`].
    pub fn create(name: &str) -> TestDb {
        TestDb::create_at(name, None)
    }

    /// Like [`TestDb::create`], with the extension at `version` (a released version's install
    /// script, from `pg_orphan_cleanup/released/`) instead of the current one.
    pub fn create_at(name: &str, version: Option<&str>) -> TestDb {
        if version.is_none() && managed() {
            let db = TestDb::create_managed(name);
            MANAGED_DBS.with(|d| d.borrow_mut().push(name.to_string()));
            apply_managed_settings(name);
            return db;
        }
        let db = TestDb::empty(name);
        install_app_at(&mut db.client(), version);
        db
    }

    /// The database, dropped if it was there and created again, with nothing in it.
    pub fn empty(name: &str) -> TestDb {
        let mut admin = connect("postgres");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        TestDb {
            name: name.to_string(),
        }
    }

    /// Like [`TestDb::create`], with the managed edition (`scripts/managed.py`'s install
    /// script, built afresh) instead of the extension.
    pub fn create_managed(name: &str) -> TestDb {
        TestDb::create_managed_with(name, &managed_script())
    }

    /// Like [`TestDb::create_managed`], with the given install script.
    pub fn create_managed_with(name: &str, script: &str) -> TestDb {
        let db = TestDb::empty(name);
        let mut c = db.client();
        let read = |f: &str| std::fs::read_to_string(repo_root().join(f)).unwrap();
        c.batch_execute(&read("sql/app_schema.sql")).unwrap();
        c.batch_execute(script).unwrap();
        for stmt in sql_statements(&read("sql/indexes.sql")) {
            c.batch_execute(&stmt).unwrap();
        }
        db
    }

    /// Creates the database and attaches the extension to the default tables.
    pub fn attached(name: &str) -> TestDb {
        let db = TestDb::create(name);
        db.attach();
        db
    }

    pub fn attach(&self) {
        self.client()
            .query("SELECT * FROM orphan_cleanup.attach()", &[])
            .unwrap();
    }

    pub fn client(&self) -> Client {
        connect(&self.name)
    }
}

/// The managed edition's install script, as `scripts/managed.py` builds it from the sources.
pub fn managed_script() -> String {
    managed_py(&[])
}

/// What `scripts/managed.py <args> --out <file>` writes.
pub fn managed_py(args: &[&str]) -> String {
    let out = std::env::temp_dir().join(format!("pgoc-managed-{}.sql", std::process::id()));
    let status = std::process::Command::new("python3")
        .arg(repo_root().join("scripts/managed.py"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 runs scripts/managed.py");
    assert!(status.success(), "scripts/managed.py failed");
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    text
}

/// Installs the app and the extension, attached, in the worker's own database (`postgres`),
/// for the tests that need the background worker to act.
pub fn setup_postgres_db() -> Client {
    let mut c = connect("postgres");
    teardown_postgres_db(&mut c);
    install_app(&mut c);
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    c
}

pub fn teardown_postgres_db(c: &mut Client) {
    c.batch_execute(
        "DROP EXTENSION IF EXISTS pg_orphan_cleanup CASCADE;
         DROP TABLE IF EXISTS public.render_jobs, public.user_assets CASCADE;",
    )
    .unwrap();
}

/// Loads `sql/app_schema.sql`, creates the extension and the indexes of `sql/indexes.sql` (a
/// released version: those it recommended) (one statement at a time: CREATE INDEX CONCURRENTLY cannot run in a transaction block).
pub fn install_app(c: &mut Client) {
    install_app_at(c, None)
}

fn install_app_at(c: &mut Client, version: Option<&str>) {
    let read = |f: &str| std::fs::read_to_string(repo_root().join(f)).unwrap();
    c.batch_execute(&read("sql/app_schema.sql")).unwrap();
    let create = match version {
        Some(v) => format!("CREATE EXTENSION pg_orphan_cleanup VERSION '{v}'"),
        None => "CREATE EXTENSION pg_orphan_cleanup".to_string(),
    };
    c.batch_execute(&create).unwrap();
    // A released version gets the indexes it recommended.
    let indexes = match version {
        Some(v) => format!("pg_orphan_cleanup/released/indexes--{v}.sql"),
        None => "sql/indexes.sql".to_string(),
    };
    for stmt in sql_statements(&read(&indexes)) {
        c.batch_execute(&stmt).unwrap();
    }
}

/// Splits a file of SQL statements on `;` at line ends, dropping comment-only lines. Enough for
/// this project's own files, which keep one statement per `;`.
pub fn sql_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("--") || line.trim().is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if line.trim_end().ends_with(';') {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Replaces the seed's render_jobs with one partitioned by created_at: render_jobs_old before
/// 2000, render_jobs_now from 2020, 2000-2020 left for a partition made later, with the
/// version-independent indexes. Run before attach().
pub const PARTITIONED_JOBS: &str = "
    DROP TABLE public.render_jobs;
    CREATE TABLE public.render_jobs (
        id uuid NOT NULL DEFAULT gen_random_uuid(), user_id uuid, status text NOT NULL, output_url text,
        prompt text, error text, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz,
        completed_at timestamptz, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
    CREATE TABLE public.render_jobs_old PARTITION OF public.render_jobs FOR VALUES FROM (MINVALUE) TO ('2000-01-01');
    CREATE TABLE public.render_jobs_now PARTITION OF public.render_jobs FOR VALUES FROM ('2020-01-01') TO (MAXVALUE);
    CREATE INDEX ON public.render_jobs (created_at, id) WHERE status = 'completed' AND output_url IS NOT NULL;
    CREATE INDEX ON public.render_jobs (id);";

/// The jobs table's index on the objects its URLs name, as this version needs it.
pub const OBJECT_KEYS_INDEX: &str = "CREATE INDEX ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off)";

pub const HOST: &str = "abcd.supabase.co";

/// A public object URL on this project's host.
pub fn public_url(bucket: &str, key: &str) -> String {
    format!("https://{HOST}/storage/v1/object/public/{bucket}/{key}")
}

/// Settings most tests want: the renders bucket and this project's host allowed.
pub const BASE_SETTINGS: &[(&str, &str)] =
    &[("allowed_buckets", "renders"), ("allowed_hosts", HOST)];

/// Inserts a job and returns its id. `age` is how long ago it was created, e.g. `'2 hours'`.
pub fn job(
    c: &mut impl postgres::GenericClient,
    status: &str,
    url: Option<&str>,
    age: &str,
    tag: &str,
) -> uuid_text::Uuid {
    let row = c
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at, prompt) VALUES ($1, $2, now() - $3::text::interval, $4) RETURNING id::text",
            &[&status, &url, &age, &tag],
        )
        .unwrap();
    uuid_text::Uuid(row.get(0))
}

/// Inserts `n` completed, unsaved jobs, two hours old, whose objects are
/// `renders/<tag>/<1..n>.png`, and analyzes the table: a backlog of orphans. Before attach() it
/// writes no guard rows, so large backlogs are quick to make.
pub fn backlog(c: &mut postgres::Client, n: i64, tag: &str) {
    c.execute(
        &format!(
            "INSERT INTO render_jobs (status, output_url, created_at, prompt)
             SELECT 'completed', 'https://{HOST}/storage/v1/object/public/renders/{tag}/' || g || '.png',
                    now() - interval '2 hours', $1
             FROM generate_series(1, $2::bigint) AS g"
        ),
        &[&tag, &n],
    )
    .unwrap();
    c.batch_execute("ANALYZE render_jobs").unwrap();
}

/// Saves a job: a user_assets row whose metadata.render_job_id is `reference`.
pub fn save(c: &mut Client, asset_type: &str, reference: &str) -> Result<u64, postgres::Error> {
    c.execute(
        "INSERT INTO user_assets (asset_type, metadata, file_size) VALUES ($1, jsonb_build_object('render_job_id', $2::text), 1000)",
        &[&asset_type, &reference],
    )
}

/// The states of the queue rows of a job, oldest first.
pub fn queue_states(c: &mut Client, job: &uuid_text::Uuid) -> Vec<String> {
    c.query(
        "SELECT state FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid ORDER BY id",
        &[&job.0],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Runs one cycle and returns (status, found, enqueued, protected, rejected).
pub fn cycle(c: &mut Client) -> (String, i64, i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT status, found, enqueued, protected, rejected FROM orphan_cleanup.run_cycle()",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// What one claim() handed out: the queue ids, and the claim's lease token, which confirm,
/// fail, release and refuse need (empty when nothing was claimed). Reads as its ids.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub ids: Vec<i64>,
    pub lease: String,
}

impl std::ops::Deref for Claim {
    type Target = Vec<i64>;
    fn deref(&self) -> &Vec<i64> {
        &self.ids
    }
}

/// Claims for `worker` (in a transaction too).
pub fn claim(c: &mut impl postgres::GenericClient, worker: &str, max: i32) -> Claim {
    claim_sql(
        c,
        "SELECT id, lease_token FROM orphan_cleanup.claim($1, $2)",
        &[&worker, &max],
    )
}

/// A claim by a query whose first two columns are claim()'s id and lease_token.
pub fn claim_sql(
    c: &mut impl postgres::GenericClient,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Claim {
    let rows = c.query(sql, params).unwrap();
    Claim {
        lease: rows.first().map(|r| r.get(1)).unwrap_or_default(),
        ids: rows.iter().map(|r| r.get(0)).collect(),
    }
}

/// Runs `f` on a new session of database `db` in its own thread, and returns the thread and
/// the session's backend pid (for [`wait_until_blocked`]) as soon as the session exists: the
/// way a test starts a statement that must wait for another session.
pub fn session_in_thread<T: Send + 'static>(
    db: &str,
    f: impl FnOnce(&mut Client) -> T + Send + 'static,
) -> (std::thread::JoinHandle<T>, i32) {
    let db = db.to_string();
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut s = connect(&db);
        pid_tx.send(backend_pid(&mut s)).unwrap();
        f(&mut s)
    });
    (handle, pid_rx.recv().unwrap())
}

/// Waits until session `pid` is blocked by another session (pg_blocking_pids), so a test can
/// drive an interleaving step by step without sleeps.
pub fn wait_until_blocked(observer: &mut Client, pid: i32) {
    wait_for(
        Duration::from_secs(10),
        "the session to block on a lock",
        || {
            observer
                .query_one("SELECT cardinality(pg_blocking_pids($1)) > 0", &[&pid])
                .unwrap()
                .get::<_, bool>(0)
        },
    );
}

/// The advisory lock class of the extension's pause points (sql/pause.sql).
const PAUSE_CLASS: i32 = 7310247;

/// Holds pause point `point` on session `c`: work that reaches it (with
/// `orphan_cleanup.pause_points` naming it) waits until [`release_pause_point`] or until `c`'s
/// session ends.
pub fn hold_pause_point(c: &mut Client, point: &str) {
    c.execute(
        "SELECT pg_advisory_lock($1, hashtext($2))",
        &[&PAUSE_CLASS, &point],
    )
    .unwrap();
}

pub fn release_pause_point(c: &mut Client, point: &str) {
    let released: bool = c
        .query_one(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&PAUSE_CLASS, &point],
        )
        .unwrap()
        .get(0);
    assert!(released, "this session did not hold pause point {point}");
}

/// Waits until a backend other than `except` waits at pause point `point`, and returns its
/// pid. The point is reached for certain (the work must pass it), so this waits for an event,
/// not for a window.
pub fn wait_paused_at(observer: &mut Client, point: &str, except: Option<i32>) -> i32 {
    let mut pid = None;
    wait_for(
        Duration::from_secs(120),
        &format!("a backend to wait at pause point {point}"),
        || {
            pid = observer
                .query_opt(
                    "SELECT l.pid FROM pg_catalog.pg_locks AS l
                     WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = $1::int::oid
                       AND l.objid = hashtext($2)::oid AND l.objsubid = 2 AND l.pid IS DISTINCT FROM $3
                     LIMIT 1",
                    &[&PAUSE_CLASS, &point, &except],
                )
                .unwrap()
                .map(|r| r.get(0));
            pid.is_some()
        },
    );
    pid.unwrap()
}

/// Waits until the background worker says (in pg_stat_activity.query) what `prefix` says:
/// `paused`, `idle`, `waiting`, `running`. It says so only after it has read a reloaded setting,
/// so this is how a test knows the worker, not only new sessions, sees a change.
pub fn wait_worker(observer: &mut Client, prefix: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("the worker to say {prefix:?} in pg_stat_activity"),
        || {
            observer
                .query_opt(
                    "SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_orphan_cleanup'",
                    &[],
                )
                .unwrap()
                .is_some_and(|r| {
                    r.get::<_, Option<String>>(0)
                        .is_some_and(|q| q.starts_with(prefix))
                })
        },
    );
}

/// The 'reaper allow-lists' line of health(): (status, detail).
pub fn allow_list_health(c: &mut Client) -> (String, String) {
    c.query_one(
        "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'reaper allow-lists'",
        &[],
    )
    .map(|r| (r.get(0), r.get(1)))
    .unwrap()
}

/// The background worker's pid, if it is running.
pub fn worker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_orphan_cleanup'",
        &[],
    )
    .unwrap()
    .map(|r| r.get(0))
}

pub fn backend_pid(c: &mut Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0)
}

/// The server's message (and detail, hint) of a database error, for asserting on.
pub fn db_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!(
            "{}: {}{}{}",
            d.code().code(),
            d.message(),
            d.detail()
                .map(|x| format!(" DETAIL: {x}"))
                .unwrap_or_default(),
            d.hint().map(|x| format!(" HINT: {x}")).unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// Job ids travel as text: the tests need no uuid crate.
pub mod uuid_text {
    #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct Uuid(pub String);

    impl std::fmt::Display for Uuid {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
}

/// A URL as PHP's `json_encode` writes it inside an object, `n` times over (each time the JSON
/// of the layer before inside a new object): every '/' and '"' escaped again at each layer.
pub fn php_json(n: usize, url: &str) -> String {
    let mut s = url.to_string();
    for i in 0..n {
        let escaped = s
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('/', "\\/");
        s = format!("{{\"k{i}\":\"{escaped}\"}}");
    }
    s
}
