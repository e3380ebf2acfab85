//! Signed URLs carry a bearer token in their query string. Whatever stores or logs a URL goes
//! through [`redact`] first, so the audit trail never becomes a list of working download links.

/// Query parameters whose values are credentials.
const SECRET_PARAMS: &[&str] = &[
    "token",
    "apikey",
    "access_token",
    "signature",
    "x-amz-signature",
    "sig",
];

/// Replaces the values of credential-bearing query parameters with `REDACTED`.
pub fn redact(raw: &str) -> String {
    let Some((base, rest)) = raw.split_once('?') else {
        return raw.to_string();
    };
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let mut out = String::with_capacity(raw.len());
    out.push_str(base);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}
