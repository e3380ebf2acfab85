//! PgBouncer (Debian's `pgbouncer`) in front of the test cluster, as hosted platforms put
//! Supavisor in front of theirs: session mode (a server connection per client, for as long as
//! it stays) or transaction mode (a server connection per transaction, shared by all clients).
//!
//! Each [`Pooler`] is a process of its own, run as `postgres` (PgBouncer refuses root), on a free
//! port, with a small pool so that clients really share server connections. It dies with the
//! test (a [`Proc`]). Drop it before the test's database: PostgreSQL refuses `DROP DATABASE`
//! while PgBouncer keeps server connections to it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::Proc;
use crate::storage::{free_addr, TempDir};

pub struct Pooler {
    pub port: u16,
    pub mode: &'static str,
    _proc: Proc,
    dir: TempDir,
}

/// The postgres user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no postgres user on this machine (scripts/setup.sh)"
    );
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl Pooler {
    /// PgBouncer in `mode` (`session` or `transaction`) for the database `db`, with at most
    /// `pool_size` server connections per user.
    pub fn start(db: &str, mode: &'static str, pool_size: u32) -> Pooler {
        let dir = TempDir::new(&format!("pgbouncer-{mode}"));
        let port: u16 = free_addr().rsplit(':').next().unwrap().parse().unwrap();
        let users = dir.0.join("users.txt");
        std::fs::write(
            &users,
            "\"postgres\" \"\"\n\"reaper_login\" \"\"\n\"app_owner\" \"\"\n",
        )
        .unwrap();
        let ini = dir.0.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {db} = host=127.0.0.1 port={pg} dbname={db}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = {mode}\n\
                 default_pool_size = {pool_size}\n\
                 max_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits\n\
                 logfile = {log}\n",
                pg = crate::port(),
                users = users.display(),
                log = dir.0.join("pgbouncer.log").display(),
            ),
        )
        .unwrap();
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid)).unwrap();
        let proc = Proc::spawn(
            Command::new("pgbouncer")
                .arg(&ini)
                .uid(uid)
                .gid(gid)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let pooler = Pooler {
            port,
            mode,
            _proc: proc,
            dir,
        };
        crate::wait_for(Duration::from_secs(20), "pgbouncer to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        pooler
    }

    /// A connection URL through the pooler.
    pub fn url(&self, db: &str, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// A client through the pooler.
    pub fn connect(&self, db: &str, user: &str) -> postgres::Client {
        postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port),
            postgres::NoTls,
        )
        .unwrap_or_else(|e| panic!("cannot connect through pgbouncer ({}): {e}", self.mode))
    }

    /// PgBouncer's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.0.join("pgbouncer.log")
    }
}
