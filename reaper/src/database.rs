//! What the reaper connects to: the connection string, checked once at start, and TLS as
//! libpq's `sslmode` and `sslrootcert` (or `PGSSLMODE` and `PGSSLROOTCERT`) ask for it.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` and leaves certificates to the TLS
//! connector; managed PostgreSQL (hosted Supabase, RDS, Neon) is reached over the internet, where
//! only `verify-full` proves that the server is the database. So the two TLS settings are taken
//! out of the string here, and the rustls connector is built to mean what libpq means:
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `prefer` (the default) | if the server offers it | no |
//! | `require` | yes | no; the CA chain if a root certificate is given or `~/.postgresql/root.crt` exists |
//! | `verify-ca` | yes | the CA chain |
//! | `verify-full` | yes | the CA chain and the host name |
//!
//! The string holds the password, so it appears in no log line and no `Debug` print: a
//! [`Database`] prints as its host, port, database and sslmode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::ConfigError;

/// libpq's `sslmode` values (`allow` aside: it prefers an unencrypted connection, which no
/// deployment of this reaper wants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, ConfigError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::Invalid {
                    name: "sslmode",
                    problem: format!("{other:?} is not one of libpq's sslmode values this reaper knows"),
                    fix: "use disable, prefer, require, verify-ca or verify-full (verify-full over any network you do not control)",
                })
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// None given and no `~/.postgresql/root.crt`: nothing can be verified.
    None,
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted CAs.
    System,
}

/// A checked connection target. Cheap to clone; connects as often as the reaper reconnects.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    mode: SslMode,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.target())
            .field("sslmode", &self.mode.as_str())
            .finish()
    }
}

impl Database {
    /// Reads a connection string (URL or `key=value` form), with `PGSSLMODE` and `PGSSLROOTCERT`
    /// from `env` where the string does not set them, and builds the TLS connector. Every
    /// problem is named with its fix; the password is in no message.
    pub fn new(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Database, ConfigError> {
        let (rest, params) = take_tls_params(text)?;
        let mut config =
            rest.parse::<tokio_postgres::Config>()
                .map_err(|e| ConfigError::Invalid {
                    name: "DATABASE_URL",
                    problem: e.to_string(),
                    fix: "use a postgres://user:password@host:port/database URL",
                })?;
        let setting = |key: &str, var: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| env(var).filter(|v| !v.is_empty()))
        };
        let mode = match setting("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let roots = match setting("sslrootcert", "PGSSLROOTCERT") {
            Some(r) if r == "system" => Roots::System,
            Some(r) => Roots::File(PathBuf::from(r)),
            None => match env("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt")) {
                Some(p) if p.exists() => Roots::File(p),
                _ => Roots::None,
            },
        };
        let tls = connector(mode, &roots)?;
        // TCP keepalives keep an idle connection from going half-open behind a NAT or a
        // firewall; a minute unless the string says otherwise.
        config.keepalives(true);
        if !rest.contains("keepalives_idle") {
            config.keepalives_idle(std::time::Duration::from_secs(60));
        }
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        Ok(Database { config, mode, tls })
    }

    /// tokio-postgres's settings, without the password in their `Debug` print.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn tls(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// `host:port/dbname`, for log lines.
    pub fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("(user's database)");
        format!("{host}:{port}/{db}")
    }
}

/// Splits `sslmode` and `sslrootcert` off a connection string: tokio-postgres refuses
/// `verify-ca`, `verify-full` and `sslrootcert`, which are this module's to handle.
/// Client certificates are refused by name rather than ignored.
fn take_tls_params(text: &str) -> Result<(String, Vec<(String, String)>), ConfigError> {
    const OURS: [&str; 2] = ["sslmode", "sslrootcert"];
    const UNSUPPORTED: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcrl"];
    let unsupported = |key: &str| {
        ConfigError::Invalid {
        name: "DATABASE_URL",
        problem: format!("{key} is set: this reaper does not use client certificates or CRLs"),
        fix: "authenticate the reaper's role with a password (scram-sha-256) over sslmode=verify-full",
    }
    };
    let mut taken = Vec::new();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return Ok((text.to_string(), taken));
        };
        let mut kept = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = url::form_urlencoded::parse(part.as_bytes())
                .next()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .unwrap_or_default();
            if UNSUPPORTED.contains(&k.as_str()) {
                return Err(unsupported(&k));
            }
            if OURS.contains(&k.as_str()) {
                taken.push((k, v));
            } else {
                kept.push(part);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, taken));
    }
    let mut kept = Vec::new();
    for (k, v) in keywords(text)? {
        if UNSUPPORTED.contains(&k.as_str()) {
            return Err(unsupported(&k));
        }
        if OURS.contains(&k.as_str()) {
            taken.push((k, v));
        } else {
            kept.push(format!(
                "{k}='{}'",
                v.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    Ok((kept.join(" "), taken))
}

/// libpq's `key = value` form: values bare or single-quoted, with `\'` and `\\` escapes.
fn keywords(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |problem: &str| ConfigError::Invalid {
        name: "DATABASE_URL",
        problem: problem.to_string(),
        fix: "use a postgres://user:password@host:port/database URL",
    };
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(&format!(
                "{key:?} has no value (key=value pairs expected)"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(
                        chars
                            .next()
                            .ok_or_else(|| bad("a value ends in a backslash"))?,
                    ),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(bad("a quoted value is not closed")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

/// The rustls connector for `mode` and `roots`, refusing the combinations libpq refuses.
fn connector(mode: SslMode, roots: &Roots) -> Result<MakeRustlsConnect, ConfigError> {
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let verify = match (mode, roots) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, Roots::None) => None,
        (SslMode::VerifyCa | SslMode::VerifyFull, Roots::None) => {
            return Err(ConfigError::Invalid {
                name: "sslrootcert",
                problem: format!(
                    "sslmode={} checks the server's certificate, but no CA certificate was given and ~/.postgresql/root.crt does not exist",
                    mode.as_str()
                ),
                fix: "set sslrootcert=/path/to/ca.crt in DATABASE_URL (or PGSSLROOTCERT) to the CA that signed the server's certificate (hosted Supabase: the SSL certificate from the project's Database settings), or sslrootcert=system for a server with a publicly trusted certificate",
            })
        }
        (SslMode::Require | SslMode::VerifyCa, Roots::System) => {
            return Err(ConfigError::Invalid {
                name: "sslrootcert",
                problem: format!("sslrootcert=system with sslmode={}", mode.as_str()),
                fix: "sslrootcert=system trusts every public CA, so only the host name check makes it safe: use sslmode=verify-full with it, as libpq requires",
            })
        }
        (_, roots) => Some(root_store(roots)?),
    };
    let config = match verify {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider)))
            .with_no_client_auth(),
        Some(store) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| ConfigError::Invalid {
                    name: "sslrootcert",
                    problem: e.to_string(),
                    fix: "give a PEM file of CA certificates",
                })?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(roots: &Roots) -> Result<RootCertStore, ConfigError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::None => {}
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(ConfigError::Invalid {
                    name: "sslrootcert",
                    problem: "sslrootcert=system, but this system has no trusted CA certificates".into(),
                    fix: "install the ca-certificates package, or give the CA's file as sslrootcert=/path/to/ca.crt",
                });
            }
        }
        Roots::File(path) => {
            let unreadable = |problem: String| {
                ConfigError::Invalid {
                name: "sslrootcert",
                problem,
                fix: "point sslrootcert (or PGSSLROOTCERT) at a readable PEM file of the CA certificate(s) that signed the server's certificate",
            }
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| unreadable(format!("{}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unreadable(format!("{}: {e}", path.display())))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(unreadable(format!(
                    "{} holds no CA certificate",
                    path.display()
                )));
            }
        }
    }
    Ok(store)
}

/// `prefer`, and `require` without a root certificate: encrypted, not authenticated, as libpq
/// does it. The handshake's signatures are still checked against the certificate presented.
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not compared. WebPKI
/// checks the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A certificate problem in a failed connection, said with its fix; `None` for other errors.
pub fn explain_tls(e: &tokio_postgres::Error, db: &Database) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        let rustls_error = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = rustls_error {
            let host = db.target();
            return Some(match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                    "the server's certificate ({host}) is not signed by a CA that sslrootcert trusts (sslmode={}): set sslrootcert to the CA certificate of this server",
                    db.mode.as_str()
                ),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate does not name the host this reaper connects to ({host}; {cert}): connect with a host name the certificate names, or use sslmode=verify-ca to check the CA only"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("the server's certificate ({host}) has expired ({cert}): renew it on the server")
                }
                other => format!("the server's certificate ({host}) was refused: {other}"),
            });
        }
        if err.to_string().contains("server does not support TLS") {
            return Some(format!(
                "the server ({}) does not accept TLS connections and sslmode={} requires TLS: turn ssl on in the server's postgresql.conf, or use sslmode=prefer on a network you trust",
                db.target(),
                db.mode.as_str()
            ));
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_tls_settings_are_taken_out_and_the_rest_is_kept() {
        let (rest, taken) = take_tls_params(
            "postgres://reaper:s3cret@db.example.com:6543/postgres?sslmode=verify-full&application_name=reaper&sslrootcert=%2Fetc%2Fca.crt",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://reaper:s3cret@db.example.com:6543/postgres?application_name=reaper"
        );
        assert_eq!(
            taken,
            vec![
                ("sslmode".to_string(), "verify-full".to_string()),
                ("sslrootcert".to_string(), "/etc/ca.crt".to_string())
            ]
        );
    }

    #[test]
    fn key_value_strings_are_read_as_libpq_reads_them() {
        let (rest, taken) =
            take_tls_params("host=db port=5432 password='a b\\'c' sslmode = verify-ca user=reaper")
                .unwrap();
        assert_eq!(
            taken,
            vec![("sslmode".to_string(), "verify-ca".to_string())]
        );
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(config.get_user(), Some("reaper"));
        assert!(take_tls_params("host=db password='open").is_err());
    }

    #[test]
    fn libpq_s_defaults_and_environment_apply() {
        let db = Database::new("postgres://r@localhost/postgres", &no_env).unwrap();
        assert_eq!(db.ssl_mode(), SslMode::Prefer, "libpq's default");
        let env = |k: &str| (k == "PGSSLMODE").then(|| "disable".to_string());
        let db = Database::new("postgres://r@localhost/postgres", &env).unwrap();
        assert_eq!(db.ssl_mode(), SslMode::Disable);
        let db = Database::new("postgres://r@localhost/postgres?sslmode=require", &env).unwrap();
        assert_eq!(
            db.ssl_mode(),
            SslMode::Require,
            "the string wins over PGSSLMODE"
        );
    }

    #[test]
    fn verification_without_a_ca_is_refused_naming_the_fix() {
        for mode in ["verify-ca", "verify-full"] {
            let e = Database::new(&format!("postgres://r@db/postgres?sslmode={mode}"), &no_env)
                .unwrap_err();
            let text = e.to_string();
            assert!(text.contains("sslrootcert"), "{text}");
            assert!(text.contains(mode), "{text}");
        }
        let e = Database::new(
            "postgres://r@db/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
        let e = Database::new(
            "postgres://r@db/postgres?sslmode=require&sslrootcert=system",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("verify-full"), "{e}");
        let e = Database::new("postgres://r@db/postgres?sslmode=verify-any", &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-any") && e.contains("verify-full"), "{e}");
        let e = Database::new("postgres://r@db/postgres?sslcert=/c.pem", &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert"), "{e}");
    }

    #[test]
    fn the_password_is_in_no_debug_print_or_error() {
        let db = Database::new(
            "postgres://reaper:hunter2-secret@db.example.com/postgres?sslmode=require",
            &no_env,
        )
        .unwrap();
        let printed = format!("{db:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("db.example.com:5432/postgres"),
            "{printed}"
        );
        let e = Database::new(
            "postgres://reaper:hunter2-secret@db.example.com/postgres?sslmode=verify-full",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
