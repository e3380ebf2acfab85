//! The reaper speaks TLS to PostgreSQL as libpq does (issue 14): the test cluster turns `ssl`
//! on with a server certificate for `localhost` signed by a CA made here, and `reaper status`
//! connects with each `sslmode`. A wrong CA and a wrong host name are refused, each named; the
//! password is in no line the reaper prints.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::process::hermetic;
use e2e::storage::{binary, output_text, reaper_role};
use e2e::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const PASSWORD: &str = "pw-never-logged-7f3a";

/// A CA, a server certificate for `localhost` (and no IP address) signed by it, and a second,
/// unrelated CA: written where the postgres user can read them.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Certs {
        let dir = PathBuf::from(format!("/tmp/pg_orphan_cleanup-{}/tls", port()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("pg_orphan_cleanup test CA");
        let (other_pem, _) = ca("some other CA");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let server = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("ca.crt", &ca_pem, 0o644);
        write("other-ca.crt", &other_pem, 0o644);
        write("server.crt", &server.pem(), 0o644);
        // PostgreSQL refuses a key that others can read, or one it does not own.
        write("server.key", &key.serialize_pem(), 0o600);
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// Turns the server's TLS on (or off) and waits until new connections see it.
fn server_ssl(certs: &Certs, on: bool) {
    let mut c = connect("postgres");
    if on {
        for stmt in [
            format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}'",
                certs.path("server.crt")
            ),
            format!(
                "ALTER SYSTEM SET ssl_key_file = '{}'",
                certs.path("server.key")
            ),
            "ALTER SYSTEM SET ssl = on".to_string(),
        ] {
            c.batch_execute(&stmt).unwrap();
        }
    } else {
        c.batch_execute("ALTER SYSTEM RESET ssl").unwrap();
    }
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let want = if on { "on" } else { "off" };
    wait_for(
        Duration::from_secs(30),
        "the ssl setting to be reloaded",
        || {
            connect("postgres")
                .query_one("SHOW ssl", &[])
                .unwrap()
                .get::<_, String>(0)
                == want
        },
    );
}

/// `reaper status` with `url` (the password added) and the environment `env`; HOME is an
/// empty directory, so no ~/.postgresql/root.crt is found by accident.
fn status(url: &str, env: &[(&str, &str)]) -> (bool, String) {
    let home = std::env::temp_dir().join(format!("pgoc-tls-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(binary("reaper"));
    hermetic(&mut cmd);
    cmd.arg("status")
        .env("DATABASE_URL", url)
        .env("HOME", &home)
        .env("REAPER_LOG", "debug")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let text = output_text(&out);
    assert!(
        !text.contains(PASSWORD),
        "the password appears in the reaper's output: {text}"
    );
    (out.status.success(), text)
}

fn url(db: &str, host: &str, query: &str) -> String {
    format!(
        "postgres://reaper_login:{PASSWORD}@{host}:{}/{db}?{query}",
        port()
    )
}

fn assert_ok(what: &str, (ok, text): (bool, String)) {
    assert!(ok, "{what}: the reaper could not connect: {text}");
    assert!(
        text.contains("health:"),
        "{what}: no status printed: {text}"
    );
}

fn assert_refused(what: &str, (ok, text): (bool, String), says: &str) {
    assert!(!ok, "{what}: the reaper connected: {text}");
    assert!(
        text.contains(says),
        "{what}: the refusal does not say {says:?}: {text}"
    );
}

#[test]
fn the_reaper_verifies_the_server_as_libpq_s_sslmode_says() {
    settings(BASE_SETTINGS);
    // After the extension exists: on a fresh cluster its orphan_cleanup_reaper role does not.
    let db = TestDb::attached("tls_modes");
    reaper_role();
    let certs = Certs::make();
    let ca = certs.path("ca.crt");
    let other = certs.path("other-ca.crt");

    // Without TLS on the server, a mode that requires it is refused, naming why: so the
    // successes below went over TLS.
    server_ssl(&certs, false);
    assert_refused(
        "verify-full against a server without TLS",
        status(
            &url(
                &db.name,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            &[],
        ),
        "does not accept TLS connections",
    );
    assert_ok(
        "prefer against a server without TLS",
        status(&url(&db.name, "localhost", "sslmode=prefer"), &[]),
    );

    server_ssl(&certs, true);
    assert_ok(
        "verify-full with the right CA",
        status(
            &url(
                &db.name,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            &[],
        ),
    );
    assert_refused(
        "verify-full with another CA",
        status(
            &url(
                &db.name,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            &[],
        ),
        "is not signed by a CA that sslrootcert trusts",
    );
    assert_refused(
        "verify-ca with another CA",
        status(
            &url(
                &db.name,
                "localhost",
                &format!("sslmode=verify-ca&sslrootcert={other}"),
            ),
            &[],
        ),
        "is not signed by a CA that sslrootcert trusts",
    );
    // The certificate names localhost, not 127.0.0.1.
    assert_refused(
        "verify-full by a name the certificate does not have",
        status(
            &url(
                &db.name,
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            &[],
        ),
        "does not name the host this reaper connects to (127.0.0.1",
    );
    assert_ok(
        "verify-ca by a name the certificate does not have",
        status(
            &url(
                &db.name,
                "127.0.0.1",
                &format!("sslmode=verify-ca&sslrootcert={ca}"),
            ),
            &[],
        ),
    );
    assert_ok(
        "require without a CA: encrypted, not verified",
        status(&url(&db.name, "127.0.0.1", "sslmode=require"), &[]),
    );
    assert_refused(
        "require with a CA given checks it, as libpq does",
        status(
            &url(
                &db.name,
                "localhost",
                &format!("sslmode=require&sslrootcert={other}"),
            ),
            &[],
        ),
        "is not signed by a CA that sslrootcert trusts",
    );
    assert_refused(
        "verify-full with no CA at all",
        status(&url(&db.name, "localhost", "sslmode=verify-full"), &[]),
        "set sslrootcert=",
    );

    // libpq's environment variables, where the string does not say.
    assert_ok(
        "PGSSLMODE and PGSSLROOTCERT",
        status(
            &url(&db.name, "localhost", ""),
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca)],
        ),
    );
    assert_refused(
        "PGSSLROOTCERT naming another CA",
        status(
            &url(&db.name, "localhost", ""),
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &other)],
        ),
        "is not signed by a CA that sslrootcert trusts",
    );
    // The key=value form too.
    assert_ok(
        "a key=value string",
        status(
            &format!(
                "host=localhost port={} dbname={} user=reaper_login password={PASSWORD} sslmode=verify-full sslrootcert={ca}",
                port(),
                db.name
            ),
            &[],
        ),
    );
    server_ssl(&certs, false);
    assert!(Path::new(&ca).exists());
}
