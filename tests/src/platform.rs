//! A simulated managed platform (issue 14), as hosted Supabase, RDS or Neon give one: a cluster
//! of its own with no pg_orphan_cleanup preloaded, pg_cron preloaded and created by the
//! platform's superuser, and the app's database owned by a role that is no superuser and has no
//! special rights (`app_owner`). The platform's admin also creates the reaper's login role (on
//! hosted Supabase the main role may create roles; here it may not). Everything else, the
//! managed edition's install included, is done as `app_owner`, as the README tells a new user.

use postgres::{Client, NoTls};

use crate::{repo_root, OwnCluster};

/// The platform's cluster: started afresh, destroyed when dropped.
pub struct Platform {
    pub port: u16,
    _cluster: OwnCluster,
}

impl Platform {
    /// The platform, with the app's tables and the managed edition installed by `app_owner`.
    pub fn start() -> Platform {
        let port = crate::port() + 2;
        let platform = Platform {
            port,
            _cluster: OwnCluster::start(
                port,
                &[("PGOC_PLATFORM", "managed"), ("PGOC_CRON_DB", "app")],
            ),
        };
        // The platform's part, as its superuser.
        let mut admin = platform.connect("postgres", "postgres");
        admin
            .batch_execute(
                "CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;
                 CREATE ROLE orphan_cleanup_reaper NOLOGIN;
                 CREATE ROLE reaper_login LOGIN IN ROLE orphan_cleanup_reaper;",
            )
            .unwrap();
        admin
            .batch_execute("CREATE DATABASE app OWNER app_owner")
            .unwrap();
        let mut app = platform.connect("app", "postgres");
        app.batch_execute(
            "ALTER SCHEMA public OWNER TO app_owner;
             CREATE EXTENSION pg_cron;
             GRANT USAGE ON SCHEMA cron TO app_owner;",
        )
        .unwrap();
        // The user's part, as app_owner: the app's tables, the managed edition, the indexes.
        let mut owner = platform.owner();
        let superuser: bool = owner
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(!superuser);
        let read = |f: &str| std::fs::read_to_string(repo_root().join(f)).unwrap();
        owner.batch_execute(&read("sql/app_schema.sql")).unwrap();
        owner.batch_execute(&crate::managed_script()).unwrap();
        for stmt in crate::sql_statements(&read("sql/indexes.sql")) {
            owner.batch_execute(&stmt).unwrap();
        }
        platform
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        Client::connect(
            &format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port),
            NoTls,
        )
        .unwrap_or_else(|e| panic!("cannot connect to the platform as {user}: {e}"))
    }

    /// The app's database, as its owner.
    pub fn owner(&self) -> Client {
        self.connect("app", "app_owner")
    }

    /// A connection URL for the reaper's login role.
    pub fn reaper_url(&self) -> String {
        format!("postgres://reaper_login@127.0.0.1:{}/app", self.port)
    }
}
