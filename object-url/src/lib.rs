//! Turns the `output_url` a Supabase app stores into the object it names, and decides whether
//! this project may delete that object.
//!
//! Both halves of pg_orphan_cleanup use this crate: the extension when it enqueues a URL, and the
//! reaper again right before it sends a name to storage. Deleting the wrong object cannot be
//! undone, so the parser is deliberately narrow: a value is accepted only when it names exactly
//! one object without any interpretation. Everything a URL library would quietly normalize
//! (`..` and `%2e%2e` segments, `\` turned into `/`, stripped tabs and newlines, encoded slashes)
//! is refused instead, because the normalized object may not be the one the app meant.
//!
//! Accepted forms (see `shared/notes/supabase-storage-api.md`):
//! - `<base>/storage/v1/object/{public|authenticated|sign}/<bucket>/<key>` (query and fragment dropped)
//! - `<base>/storage/v1/render/image/{public|authenticated|sign}/<bucket>/<key>`
//! - a bare `<bucket>/<key>`, taken literally (no percent-decoding).

mod lenient;
mod policy;
mod redact;

pub use lenient::{
    protected_key, protected_keys, reading_size, route_count, MAX_LAYERS, MAX_READING,
};
pub use policy::{Policy, PolicyError, Refusal};
pub use redact::redact;

use percent_encoding::percent_decode_str;
use thiserror::Error;

/// Longest stored value we look at at all. Real Supabase URLs are far shorter.
pub const MAX_URL_LEN: usize = 4096;
/// Longest object key Supabase Storage accepts (bytes).
pub const MAX_KEY_LEN: usize = 1024;

/// How the value named its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlForm {
    /// `bucket/key`, no host.
    Bare,
    Public,
    Authenticated,
    Signed,
    /// `/render/image/...`, the image-transformation endpoint; the object is the original.
    RenderImage,
}

impl UrlForm {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlForm::Bare => "bare",
            UrlForm::Public => "public",
            UrlForm::Authenticated => "authenticated",
            UrlForm::Signed => "signed",
            UrlForm::RenderImage => "render_image",
        }
    }
}

/// One object in one bucket, possibly on a named host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// `host` or `host:port`, lower-case; `None` for a bare `bucket/key` value.
    pub host: Option<String>,
    pub bucket: String,
    /// The object name inside the bucket, percent-decoded.
    pub key: String,
    pub form: UrlForm,
}

impl ObjectRef {
    /// `bucket/key`: the identity used to notice two jobs sharing one object.
    pub fn object_key(&self) -> String {
        format!("{}/{}", self.bucket, self.key)
    }
}

/// Why a stored value is not an object this system may delete. Every message says what is
/// wrong; the value itself is left alone (nothing is ever deleted because of it).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("empty value")]
    Empty,
    #[error("value is {0} bytes long, longer than the {MAX_URL_LEN} bytes a storage URL can be")]
    TooLong(usize),
    #[error("object key is {0} bytes long, longer than the {MAX_KEY_LEN} bytes storage allows")]
    KeyTooLong(usize),
    #[error("contains a control character (U+{0:04X}); a URL that was cut or pasted wrongly")]
    ControlCharacter(u32),
    #[error("contains an encoded control character (U+{0:04X}, e.g. %00)")]
    EncodedControlCharacter(u32),
    #[error("contains whitespace outside the object key")]
    Whitespace,
    #[error("contains a backslash, which URL parsers silently turn into '/'")]
    Backslash,
    #[error("scheme '{0}' is not http or https")]
    NotHttp(String),
    #[error("not a valid URL: {0}")]
    InvalidUrl(String),
    #[error("URL carries a user name or password")]
    UserInfo,
    #[error("URL names no host")]
    NoHost,
    #[error("host '{0}' is not a plain host name or IPv4 address; IPv6 literals, internationalized (xn--) names, numeric shorthands such as 127.1 and empty or trailing labels are refused")]
    UnusualHost(String),
    #[error("port '{0}' is not a number from 1 to 65535 written without leading zeros")]
    BadPort(String),
    #[error("not a Supabase Storage object URL (expected /storage/v1/object/{{public|authenticated|sign}}/<bucket>/<key> or /storage/v1/render/image/...)")]
    NotAnObjectUrl,
    #[error("starts with '/': neither a full URL nor a bare bucket/key")]
    LeadingSlash,
    #[error("has an empty path segment ('//')")]
    EmptySegment,
    #[error("has a '.' or '..' path segment")]
    DotSegment,
    #[error("has an encoded '.' or '..' path segment (%2e)")]
    EncodedDotSegment,
    #[error("has an encoded slash (%2F) inside a path segment")]
    EncodedSlash,
    #[error("has a malformed percent-escape")]
    BadPercentEncoding,
    #[error("percent-encodes {0:?}, a character no client ever encodes (a disguised name)")]
    NeedlessEscape(char),
    #[error("has a path segment of spaces only")]
    BlankSegment,
    #[error("object names are ASCII only; this one has non-ASCII characters")]
    NonAscii,
    #[error("character {0:?} is not allowed in a storage object name")]
    InvalidKeyChar(char),
    #[error("names no bucket")]
    EmptyBucket,
    #[error("names a bucket but no object key")]
    EmptyKey,
    #[error("names a folder (ends with '/'), not an object")]
    Folder,
}

/// Parses a stored output URL (or bare `bucket/key`) into the object it names.
pub fn parse(raw: &str) -> Result<ObjectRef, ParseError> {
    if raw.is_empty() {
        return Err(ParseError::Empty);
    }
    if raw.len() > MAX_URL_LEN {
        return Err(ParseError::TooLong(raw.len()));
    }
    if let Some(c) = raw.chars().find(|c| c.is_control()) {
        return Err(ParseError::ControlCharacter(c as u32));
    }
    if raw.contains('\\') {
        return Err(ParseError::Backslash);
    }
    if raw.starts_with(char::is_whitespace) || raw.ends_with(char::is_whitespace) {
        return Err(ParseError::Whitespace);
    }
    if raw.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    if raw.starts_with('/') {
        return Err(ParseError::LeadingSlash);
    }
    let first = raw.split('/').next().unwrap_or("");
    if first.contains(':') {
        parse_url(raw)
    } else {
        parse_bare(raw)
    }
}

/// The route prefixes that name one object, and the form each one means.
const ROUTES: &[(&[&str], UrlForm)] = &[
    (&["storage", "v1", "object", "public"], UrlForm::Public),
    (
        &["storage", "v1", "object", "authenticated"],
        UrlForm::Authenticated,
    ),
    (&["storage", "v1", "object", "sign"], UrlForm::Signed),
    (
        &["storage", "v1", "render", "image", "public"],
        UrlForm::RenderImage,
    ),
    (
        &["storage", "v1", "render", "image", "authenticated"],
        UrlForm::RenderImage,
    ),
    (
        &["storage", "v1", "render", "image", "sign"],
        UrlForm::RenderImage,
    ),
];

fn parse_url(raw: &str) -> Result<ObjectRef, ParseError> {
    let (scheme, rest) = raw.split_once(':').ok_or(ParseError::NotAnObjectUrl)?;
    let scheme_lc = scheme.to_ascii_lowercase();
    if scheme_lc != "http" && scheme_lc != "https" {
        return Err(ParseError::NotHttp(scheme.chars().take(32).collect()));
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(ParseError::Whitespace);
    }
    // Work on the raw text for the path: the url crate would resolve dot segments and decode.
    let after = rest.strip_prefix("//").ok_or(ParseError::NotAnObjectUrl)?;
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = &after[..authority_end];
    if authority.contains('@') {
        return Err(ParseError::UserInfo);
    }
    let path_and_more = &after[authority_end..];
    let path_end = path_and_more
        .find(['?', '#'])
        .unwrap_or(path_and_more.len());
    let path = &path_and_more[..path_end];

    let host = plain_authority(authority, &scheme_lc)?;
    // The url crate reads the whole URL as a browser would; it must find the same host.
    let parsed = url::Url::parse(raw).map_err(|e| ParseError::InvalidUrl(e.to_string()))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ParseError::UserInfo);
    }
    let browser_host = match (parsed.host_str(), parsed.port()) {
        (Some(h), Some(port)) => format!("{h}:{port}"),
        (Some(h), None) => h.to_string(),
        (None, _) => String::new(),
    };
    if browser_host != host {
        return Err(ParseError::InvalidUrl(format!(
            "a browser reads the host as '{browser_host}'"
        )));
    }

    let segments: Vec<&str> = path
        .strip_prefix('/')
        .ok_or(ParseError::NotAnObjectUrl)?
        .split('/')
        .collect();
    let (form, consumed) = ROUTES
        .iter()
        .find(|(route, _)| segments.len() > route.len() && segments[..route.len()] == **route)
        .map(|(route, form)| (*form, route.len()))
        .ok_or(ParseError::NotAnObjectUrl)?;
    let (bucket, key) = object_from_segments(&segments[consumed..], true)?;
    Ok(ObjectRef {
        host: Some(host),
        bucket,
        key,
        form,
    })
}

/// `host` or `host:port` of an authority, lower case and without the scheme's default port,
/// read narrowly: a host name of ASCII letters, digits and hyphens in dot-separated labels, or
/// a dotted-quad IPv4 address, and a port from 1 to 65535 written plainly. Whatever a URL
/// parser would have to interpret (an IPv6 literal, an internationalized or `xn--` name,
/// `127.1` or `0x7f.1`, a percent-escape, an empty port, a trailing dot) is refused: no real
/// storage URL needs it, and every reader of a URL (this crate, the managed edition's PL/pgSQL
/// parser, a browser) must find the same host in it.
pub(crate) fn plain_authority(authority: &str, scheme: &str) -> Result<String, ParseError> {
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err(ParseError::NoHost);
    }
    let unusual = || ParseError::UnusualHost(authority.chars().take(64).collect());
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok =
        |l: &&str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !labels.iter().all(label_ok) {
        return Err(unusual());
    }
    let host = host.to_ascii_lowercase();
    let last = host.rsplit('.').next().unwrap_or("");
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        // Read as an IPv4 address by browsers: only the dotted quad is read the same by all.
        let quad = labels.len() == 4
            && labels.iter().all(|l| {
                l.bytes().all(|b| b.is_ascii_digit())
                    && (*l == "0" || !l.starts_with('0'))
                    && l.len() <= 3
                    && l.parse::<u16>().is_ok_and(|n| n <= 255)
            });
        if !quad {
            return Err(unusual());
        }
    } else if host.split('.').any(|l| l.starts_with("xn--")) {
        return Err(unusual());
    }
    let Some(port) = port else {
        return Ok(host);
    };
    let number = port
        .parse::<u16>()
        .ok()
        .filter(|&n| n > 0 && !port.starts_with('0') && port.bytes().all(|b| b.is_ascii_digit()));
    match number {
        None => Err(ParseError::BadPort(port.chars().take(16).collect())),
        Some(443) if scheme == "https" => Ok(host),
        Some(80) if scheme == "http" => Ok(host),
        Some(n) => Ok(format!("{host}:{n}")),
    }
}

fn parse_bare(raw: &str) -> Result<ObjectRef, ParseError> {
    let segments: Vec<&str> = raw.split('/').collect();
    let (bucket, key) = object_from_segments(&segments, false)?;
    Ok(ObjectRef {
        host: None,
        bucket,
        key,
        form: UrlForm::Bare,
    })
}

/// Builds `(bucket, key)` from the path segments after the route. Each segment is checked both
/// as written and (for URLs) after percent-decoding, so `%2e%2e` is caught like `..`.
fn object_from_segments(segments: &[&str], decode: bool) -> Result<(String, String), ParseError> {
    let Some((bucket_raw, key_segments)) = segments.split_first() else {
        return Err(ParseError::EmptyBucket);
    };
    if bucket_raw.is_empty() {
        return Err(ParseError::EmptyBucket);
    }
    if key_segments.is_empty() || (key_segments.len() == 1 && key_segments[0].is_empty()) {
        return Err(ParseError::EmptyKey);
    }
    let bucket = segment(bucket_raw, decode)?;
    let last = key_segments.len() - 1;
    let mut key = String::new();
    for (i, raw) in key_segments.iter().enumerate() {
        if raw.is_empty() {
            return Err(if i == last {
                ParseError::Folder
            } else {
                ParseError::EmptySegment
            });
        }
        if i > 0 {
            key.push('/');
        }
        key.push_str(&segment(raw, decode)?);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ParseError::KeyTooLong(key.len()));
    }
    Ok((bucket, key))
}

/// Characters Supabase Storage allows in an object name, besides ASCII letters and digits
/// (`/` separates segments and is handled by the caller).
const KEY_PUNCTUATION: &str = "_!.*'() &$=@;:+,?-";

fn segment(raw: &str, decode: bool) -> Result<String, ParseError> {
    if raw == "." || raw == ".." {
        return Err(ParseError::DotSegment);
    }
    let text = if decode {
        if !valid_percent_escapes(raw) {
            return Err(ParseError::BadPercentEncoding);
        }
        let bytes: Vec<u8> = percent_decode_str(raw).collect();
        let text = String::from_utf8(bytes).map_err(|_| ParseError::NonAscii)?;
        if text == "." || text == ".." {
            return Err(ParseError::EncodedDotSegment);
        }
        if text.contains('/') {
            return Err(ParseError::EncodedSlash);
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(ParseError::EncodedControlCharacter(c as u32));
        }
        if text.contains('\\') {
            return Err(ParseError::Backslash);
        }
        if let Some(c) = needless_escape(raw) {
            return Err(ParseError::NeedlessEscape(c));
        }
        text
    } else {
        raw.to_string()
    };
    if !text.is_ascii() {
        return Err(ParseError::NonAscii);
    }
    if text.trim().is_empty() {
        return Err(ParseError::BlankSegment);
    }
    if let Some(c) = text
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !KEY_PUNCTUATION.contains(*c))
    {
        return Err(ParseError::InvalidKeyChar(c));
    }
    Ok(text)
}

/// The first character written as a percent-escape although it is unreserved (RFC 3986: letters,
/// digits, `-`, `.`, `_`, `~`), which neither `encodeURI` nor `encodeURIComponent` ever escapes.
/// `%72enders` names the `renders` bucket only to someone trying to hide that it does.
fn needless_escape(raw: &str) -> Option<char> {
    let b = raw.as_bytes();
    (0..b.len().saturating_sub(2))
        .filter(|&i| b[i] == b'%')
        .filter_map(|i| u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).ok()?, 16).ok())
        .map(char::from)
        .find(|c| c.is_ascii_alphanumeric() || "-._~".contains(*c))
}

fn valid_percent_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() {
                return false;
            }
            if !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

#[cfg(test)]
mod tests;
