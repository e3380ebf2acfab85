//! SQL faces of the shared `object-url` crate: the same parser and allow-lists the reaper uses,
//! so the database and the daemon can never disagree about which object a URL names.

use pgrx::prelude::*;

/// Parses a stored output URL into the object it names, without judging whether it may be
/// deleted. `error` says why a value names no single object.
#[pg_extern(immutable, parallel_safe)]
fn parse_output_url(
    url: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(host, Option<String>),
        name!(bucket, Option<String>),
        name!(object_path, Option<String>),
        name!(form, Option<String>),
        name!(error, Option<String>),
    ),
> {
    let row = match url.map(object_url::parse) {
        None => (
            None,
            None,
            None,
            None,
            Some("output_url is NULL".to_string()),
        ),
        Some(Ok(o)) => (
            o.host,
            Some(o.bucket),
            Some(o.key),
            Some(o.form.as_str().to_string()),
            None,
        ),
        Some(Err(e)) => (None, None, None, None, Some(e.to_string())),
    };
    TableIterator::once(row)
}

/// Parses the URL and checks it against the `orphan_cleanup.allowed_*` settings. `error` is the
/// reason a row is rejected; NULL means this project may delete the object.
#[pg_extern(stable, parallel_safe)]
fn check_output_url(
    url: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(host, Option<String>),
        name!(bucket, Option<String>),
        name!(object_path, Option<String>),
        name!(error, Option<String>),
    ),
> {
    let row = match url.map(object_url::parse) {
        None => (None, None, None, Some("output_url is NULL".to_string())),
        Some(Err(e)) => (None, None, None, Some(format!("malformed URL: {e}"))),
        Some(Ok(o)) => {
            let verdict = match crate::guc::policy() {
                Err(e) => Some(format!("invalid allow-list setting: {e}")),
                Ok(p) => p.check(&o).err().map(|r| format!("not allowed: {r}")),
            };
            (o.host, Some(o.bucket), Some(o.key), verdict)
        }
    };
    TableIterator::once(row)
}

/// `bucket/key` of the object a URL names, or could reasonably name, or NULL. The one identity
/// of an object for *protection*: saves, job writes and the keeper checks of cycles and claims.
/// A spelling the strict parser refuses (a raw space, a trailing newline, `/object/<bucket>/...`)
/// still names the object a user kept, so it is read leniently here and fails closed; deletion
/// reads URLs strictly (`parse_output_url`, `check_output_url`), and where the strict parser
/// accepts a URL both agree. Immutable, so jobs can be indexed by the object they point to.
#[pg_extern(immutable, parallel_safe, strict)]
fn object_key(url: &str) -> Option<String> {
    object_url::protected_key(url)
}

/// Every `bucket/key` a URL could name, sorted, or NULL when it names none: what a saved job
/// protects. object_key() shows one reading; a value the strict parser accepts can mean another
/// to the app that wrote it (a URL that lost its scheme reads, strictly, as a bucket named after
/// the host), and both files must survive. Immutable: jobs are indexed by it (GIN), and every
/// "which jobs name this object" lookup of cycles, claims and the pruning of object records is
/// `object_keys(output_url) @> ARRAY[key]`.
#[pg_extern(immutable, parallel_safe, strict)]
fn object_keys(url: &str) -> Option<Vec<String>> {
    let keys = object_url::protected_keys(url);
    (!keys.is_empty()).then_some(keys)
}

/// The most URLs and storage routes (object-url's markers: a storage URL is two) any layer of a
/// URL's readings holds, or -1 when it is wrapped (JSON, percent-encoding) deeper than the
/// readings take off: `_unread_url()` refuses a saved job past either limit (OC003), since
/// object_keys() reads at most 16 a layer.
#[pg_extern(immutable, parallel_safe, strict)]
fn _route_count(url: &str) -> i32 {
    object_url::route_count(url).map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX))
}

/// How many bytes object_keys() reads to read a URL every way it could be meant (object-url's
/// reading_size), or -1 past object-url's MAX_READING (32,768 bytes), when it reads only the
/// strict reading: `_unread_url()` refuses a saved job past it (OC003), so that no value costs
/// every write of its job seconds (the tenth review of issue 14).
#[pg_extern(immutable, parallel_safe, strict)]
fn _reading_size(url: &str) -> i32 {
    object_url::reading_size(url).map_or(-1, |n| i32::try_from(n).unwrap_or(i32::MAX))
}

/// The URL with signed-URL tokens and other credentials replaced by `REDACTED`.
#[pg_extern(immutable, parallel_safe, strict)]
fn redact_url(url: &str) -> String {
    object_url::redact(url)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn object_key_and_redaction_from_sql() {
        let key = Spi::get_one::<String>(
            "SELECT orphan_cleanup.object_key('https://abcd.supabase.co/storage/v1/object/sign/renders/a%20b.png?token=x')",
        );
        assert_eq!(key, Ok(Some("renders/a b.png".to_string())));
        let bad = Spi::get_one::<String>("SELECT orphan_cleanup.object_key('renders/../x.png')");
        assert_eq!(bad, Ok(None));
        let red = Spi::get_one::<String>("SELECT orphan_cleanup.redact_url('https://h/storage/v1/object/sign/r/a.png?token=secret')");
        assert_eq!(
            red,
            Ok(Some(
                "https://h/storage/v1/object/sign/r/a.png?token=REDACTED".to_string()
            ))
        );
    }

    #[pg_test]
    fn check_output_url_refuses_without_allow_list() {
        let err = Spi::get_one::<String>(
            "SELECT error FROM orphan_cleanup.check_output_url('renders/a.png')",
        );
        let err = err.unwrap().unwrap();
        assert!(err.contains("bucket allow-list is empty"), "{err}");
        let err = Spi::get_one::<String>(
            "SELECT error FROM orphan_cleanup.check_output_url('renders/%2e%2e/a.png')",
        );
        assert!(err.unwrap().unwrap().starts_with("malformed URL"));
    }
}
