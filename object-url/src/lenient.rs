//! The object a stored value could reasonably name, for *protecting* it.
//!
//! [`crate::parse`] is narrow on purpose: it decides what may be deleted, and refuses anything it
//! would have to interpret. Protection must fail the other way. A saved job whose `output_url` the
//! strict parser refuses (a raw space, `/storage/v1/object/<bucket>/<key>` without `public`, a
//! trailing newline, a `..` segment, a URL without its scheme or host) still points at a file a
//! user kept, and another job naming that file correctly must not get it deleted. So this reading
//! interprets: it trims junk, drops the query and fragment, decodes what decodes, resolves `.` and
//! `..` over the whole path the way a browser would, and then finds the storage route wherever it
//! starts. Whenever the strict parser accepts a value, this returns exactly its object (a property
//! test checks it).
//!
//! Nothing is ever deleted because of this reading: deletion uses [`crate::parse`] alone.

use percent_encoding::percent_decode_str;

/// Characters a copy-and-paste or a template leaves around a value: whitespace, quotes, angle
/// brackets.
fn is_junk(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// `bucket/key` of the object `raw` could reasonably name, or `None` when it names none at all.
pub fn protected_key(raw: &str) -> Option<String> {
    if let Ok(o) = crate::parse(raw) {
        return Some(o.object_key());
    }
    if raw.len() > crate::MAX_URL_LEN {
        return None;
    }
    let value = raw.trim_matches(is_junk).replace('\\', "/");
    // A URL: with a scheme, or scheme-relative (`//host/...`). Its host is dropped.
    let first = value.split('/').next().unwrap_or("");
    let (url, rest) = match value.split_once(':') {
        Some((scheme, rest)) if first.contains(':') => {
            if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
                return None;
            }
            (true, after_authority(rest))
        }
        _ if value.starts_with("//") => (true, after_authority(&value[2..])),
        _ => (false, value.as_str()),
    };
    let has_route = url || rest.to_ascii_lowercase().contains("storage/v1/");
    let path = if has_route {
        &rest[..rest.find(['?', '#']).unwrap_or(rest.len())]
    } else {
        rest
    };
    // Decoded even when bare: `%` is no character of an object name, so `renders/a%20b.png`
    // can only mean `renders/a b.png`.
    let segments = normalize(path);
    let object = if has_route {
        after_route(&segments)?
    } else {
        &segments[..]
    };
    let (bucket, key) = object.split_first()?;
    if key.is_empty() {
        return None;
    }
    Some(format!("{bucket}/{}", key.join("/")))
}

/// What follows a URL's authority (`host:port`), from the first `/`, `?` or `#` on.
fn after_authority(rest: &str) -> &str {
    let rest = rest.trim_start_matches('/');
    &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..]
}

/// The segments after the storage route, wherever `storage/v1` starts (after a host without a
/// scheme, or a proxy's own prefix): `object/{public|authenticated|sign}/`,
/// `object/info/[public|authenticated]/`, `object/upload/sign/`, `object/` alone (the
/// authenticated download), or `render/image/{public|authenticated|sign}/`, in any case.
fn after_route(segments: &[String]) -> Option<&[String]> {
    let start = (0..segments.len()).find(|&i| {
        segments.len() > i + 1
            && segments[i].eq_ignore_ascii_case("storage")
            && segments[i + 1].eq_ignore_ascii_case("v1")
    })?;
    let route: Vec<String> = segments[start + 2..]
        .iter()
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let route: Vec<&str> = route.iter().map(String::as_str).collect();
    let skip = match route.as_slice() {
        ["object", "info", "public" | "authenticated", _, _, ..] => 3,
        ["object", "upload", "sign", _, _, ..] => 3,
        ["object", "public" | "authenticated" | "sign" | "info", _, _, ..] => 2,
        ["object", _, _, ..] => 1,
        ["render", "image", "public" | "authenticated" | "sign", _, _, ..] => 3,
        _ => return None,
    };
    Some(&segments[start + 2 + skip..])
}

/// Path segments as a server would see them: percent-decoded (an invalid escape stays as
/// written), with empty and `.` segments dropped and `..` resolved. A path whose escapes decode
/// to no text (bytes that are not UTF-8, or a NUL) is read as written: no object a strict
/// parse accepts has such a name, and the managed edition's PL/pgSQL reading (whose text
/// cannot hold a NUL) must find the same key.
fn normalize(path: &str) -> Vec<String> {
    let text = String::from_utf8(percent_decode_str(path).collect::<Vec<u8>>())
        .ok()
        .filter(|t| !t.contains('\0'))
        .unwrap_or_else(|| path.to_string());
    let mut out: Vec<String> = Vec::new();
    for part in text.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p.to_string()),
        }
    }
    out
}
