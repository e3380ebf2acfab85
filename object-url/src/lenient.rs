//! The object a stored value could reasonably name, for *protecting* it.
//!
//! [`crate::parse`] is narrow on purpose: it decides what may be deleted, and refuses anything it
//! would have to interpret. Protection must fail the other way. A saved job whose `output_url` the
//! strict parser refuses (a raw space, `/storage/v1/object/<bucket>/<key>` without `public`, a
//! trailing newline, a `..` segment, a URL without its scheme or host) still points at a file a
//! user kept, and another job naming that file correctly must not get it deleted. So this reading
//! interprets: it trims junk, drops the query and fragment, decodes what decodes, resolves `.` and
//! `..` over the whole path the way a browser would, and then finds the storage route wherever it
//! starts. A value the strict parser accepts may still be read otherwise by the app that wrote
//! it (a URL that lost its scheme reads, strictly, as a bucket named after the host), so a saved
//! job protects every reading: [`protected_keys`].
//!
//! Nothing is ever deleted because of this reading: deletion uses [`crate::parse`] alone.

/// Characters a copy-and-paste or a template leaves around a value: whitespace, quotes, angle
/// brackets.
fn is_junk(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// `bucket/key` of the object `raw` names: the strict reading where there is one, otherwise the
/// lenient one, or `None` when it names none at all. The one name `object_key()` shows a DBA.
pub fn protected_key(raw: &str) -> Option<String> {
    match crate::parse(raw) {
        Ok(o) => Some(o.object_key()),
        Err(_) => lenient_keys(raw).into_iter().next(),
    }
}

/// Every object `raw` could name, sorted and without repeats: what protection must cover.
///
/// One reading is not enough, whichever it is. A value the strict parser accepts can still
/// mean something else to the app that wrote it: `abcd.supabase.co/storage/v1/object/public/
/// renders/f.png` (a URL that lost its scheme) is, strictly, a bare `bucket/key` in a bucket
/// named `abcd.supabase.co`; `'renders/x.png'` is, strictly, bucket `'renders`; a bare
/// `renders/x.png?v=2` is, strictly, an object whose name ends in `?v=2`. The file the app
/// serves is the other reading, and another job naming that file correctly must not get it
/// deleted; nor may the strict reading's file, which may exist too. So a saved job protects
/// every reading: the strict one (when there is one, of the value as written and of the value
/// without the tabs and newlines a browser deletes from a URL) and the lenient readings of every
/// text [`texts_read`] finds in it. A value whose texts come to more than [`MAX_READING`] bytes
/// is read strictly alone: the save guard refuses to save a job with it (`_unread_url`).
pub fn protected_keys(raw: &str) -> Vec<String> {
    let stripped = browser_stripped(raw);
    let mut keys: Vec<String> = [raw, stripped.as_str()]
        .into_iter()
        .filter_map(|v| crate::parse(v).ok().map(|o| o.object_key()))
        .collect();
    if let Ok(Reading { mut texts, .. }) = texts_read(raw) {
        // Each text read once, however many ways lead to it: the value, each layer under it, and
        // the embedded URLs of each layer often coincide (a plain URL is its own embedded URL,
        // its decoded layer the decoded reading of it).
        texts.sort();
        texts.dedup();
        for text in &texts {
            keys.extend(lenient_keys(text));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// `raw` without the tabs and newlines a browser deletes from a URL: read as well as the value
/// as written, by the readings and by their count alike.
fn browser_stripped(raw: &str) -> String {
    raw.chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect()
}

/// The most bytes of text the lenient readings read for one value: more than the readings of
/// any value an app writes take (a signed URL with a 1 KB token takes about 10 KB, in markdown
/// 16 KB, two in a JSON array 23 KB), few enough that the slowest value we could build takes
/// under a second to read in the managed edition (0.65 s there, 46 ms here in a release build:
/// 1,600 two-byte segments, read by every path and count of empty segments). The tenth review of issue 14 crafted a 2 KB value whose readings took 16 s there, on
/// every write of its job; the eleventh, values of 32 and 63 KB (thousands of `..` segments or
/// of bad bytes) that took 12 and 56 s, which the managed edition now reads in linear time.
pub const MAX_READING: usize = 32_768;

/// What the lenient readings read of a value, and how much: [`MAX_READING`] bounds the sum.
#[derive(Default)]
struct Reading {
    texts: Vec<String>,
    size: usize,
}

/// The readings of a value would read more than [`MAX_READING`] bytes.
struct TooMuch;

impl Reading {
    /// Counts `n` more bytes read, or refuses to go past [`MAX_READING`].
    fn count(&mut self, n: usize) -> Result<(), TooMuch> {
        self.size += n;
        if self.size > MAX_READING {
            return Err(TooMuch);
        }
        Ok(())
    }
}

/// The texts the lenient readings read as values, in `raw`: each of its [`layer_texts`], and the
/// URLs embedded in each ([`embedded_readings`]), with the size read. The size counted is each
/// layer's length and that of each distinct cut of each embedded URL (every text read is one of
/// those, decoded or unescaped: no longer): past [`MAX_READING`], none.
fn texts_read(raw: &str) -> Result<Reading, TooMuch> {
    let mut reading = Reading::default();
    for layer in layer_texts(raw).0 {
        reading.count(layer.len())?;
        embedded_readings(&layer, &mut reading)?;
        reading.texts.push(layer);
    }
    Ok(reading)
}

/// How many bytes the lenient readings of `raw` read, or `None` past [`MAX_READING`] (when
/// only its strict reading is read): what the save guard holds against that bound.
pub fn reading_size(raw: &str) -> Option<usize> {
    texts_read(raw).ok().map(|reading| reading.size)
}

/// The texts read as values, whose embedded URLs are read too: the [`layers`] of the value as
/// written and of the value without a browser's tabs and newlines ([`browser_stripped`]), each
/// also without them (a JSON-escaped newline inside a URL is a newline only in the layers under
/// the value: the tenth review), each once, in that order; and whether either value is wrapped
/// deeper than [`MAX_LAYERS`].
fn layer_texts(raw: &str) -> (Vec<String>, bool) {
    let stripped = browser_stripped(raw);
    let mut texts: Vec<String> = Vec::new();
    let mut deeper = false;
    for value in [raw, stripped.as_str()] {
        let (layers, wrapped) = layers(value);
        deeper |= wrapped;
        for layer in layers {
            let layer_stripped = browser_stripped(&layer);
            for text in [layer, layer_stripped] {
                if !texts.contains(&text) {
                    texts.push(text);
                }
            }
        }
    }
    (texts, deeper)
}

/// How many layers of wrapping the readings take off a value.
pub const MAX_LAYERS: usize = 6;

/// The layers of a value whose storage routes are read: the value as written, then, while taking
/// off one more layer of JSON's escapes and of percent-encoding changes it, the value with that
/// layer taken off, up to [`MAX_LAYERS`] more; and whether it is wrapped deeper still. Where a
/// step takes off both, the value with only the JSON escapes taken off is a layer too: a URL
/// that only JSON reveals keeps its own `%3F` or `%20` there (the tenth review:
/// `{"publicUrl":"https:\/\/...\/renders\/a%3Fb.png?token=..."}` names `a?b.png`, which the
/// layer decoded as well reads as `a`). The
/// reviews of issue 14 hid routes behind each: PHP's `json_encode`
/// (`https:\/\/...\/storage\/v1\/...`), JSON inside JSON, an image CDN's URL inside an image
/// proxy's (`%252F`), URL-encoded JSON (`%5C%2F`), a route encoded in part (`%2Fstorage%2Fv1/`,
/// which only the decoded layer spells as a route; the eighth review). A
/// value wrapped deeper is never saved (`_unread_url`, OC003), and neither is one in which any
/// layer holds more routes than [`embedded_readings`] reads ([`route_count`]). The managed
/// edition's `_layers` is the same rule in PL/pgSQL.
fn layers(value: &str) -> (Vec<String>, bool) {
    let mut out = vec![value.to_string()];
    let mut last = value.to_string();
    for steps in 0.. {
        let json = unescape_json(&last);
        let next = decode_once(&json);
        if next == last {
            break;
        }
        if steps >= MAX_LAYERS {
            return (out, true);
        }
        if json != last && json != next {
            out.push(json);
        }
        out.push(next.clone());
        last = next;
    }
    (out, false)
}

/// Where [`embedded_readings`] starts a reading, in a layer written in ASCII lower case: a storage
/// route's first segment (`storage/`, also when dot or empty segments come before `v1`, as in
/// `storage/./v1/`, which a browser resolves: the ninth review), and a URL's scheme (a CDN's
/// URL has no route: `https://cdn.example.com/renders/x.png` inside a proxy's query or
/// markdown; the ninth review), each as written and percent-encoded once.
const MARKERS: [&str; 6] = [
    "storage/",
    "storage%2f",
    "http://",
    "https://",
    "http%3a%2f%2f",
    "https%3a%2f%2f",
];

/// How many readings [`embedded_readings`] starts in one layer: a value in which any layer holds
/// more [`MARKERS`] is never saved (`_unread_url`).
pub const MAX_ROUTES: usize = 16;

/// The next of [`MARKERS`] in `lower` from `pos` on: where it starts and how long it is.
fn next_marker(lower: &str, pos: usize) -> Option<(usize, usize)> {
    MARKERS
        .iter()
        .filter_map(|m| lower[pos..].find(m).map(|at| (pos + at, m.len())))
        .min()
}

/// How many [`MARKERS`] a layer holds, found as [`embedded_readings`] finds them.
fn routes_in(layer: &str) -> usize {
    let lower = layer.to_ascii_lowercase();
    let (mut pos, mut n) = (0, 0);
    while let Some((start, len)) = next_marker(&lower, pos) {
        n += 1;
        pos = start + len;
    }
    n
}

/// The most [`MARKERS`] (storage routes and URLs) any of the [`layer_texts`] of `raw` holds, or `None` when it is wrapped deeper than
/// [`MAX_LAYERS`]: what the save guard holds against the readings' limits (at most
/// [`MAX_ROUTES`] a layer are read).
/// Counted by taking the same layers off that the readings take off, so no spelling a layer
/// reveals can escape the count (the seventh review broke a count made by a pattern).
pub fn route_count(raw: &str) -> Option<usize> {
    let (texts, deeper) = layer_texts(raw);
    if deeper {
        return None;
    }
    Some(texts.iter().map(|t| routes_in(t)).max().unwrap_or(0))
}

/// `text` with one layer of JSON's escapes of ASCII punctuation, space and control characters
/// taken off: `\/`, `\\`, `\"`, `\n`, `\r`, `\t`, `\b`, `\f`, and `\u00XX` of punctuation or
/// space (`\u002B`, `\u0026`: .NET's encoders). Letters, digits and '%' stay as written: no
/// encoder escapes them. A control character taken off ends an embedded URL where the encoder's
/// input ended it (a worker's stdout with its newline, through `json.dumps`: the ninth review).
/// The managed edition's `_unescape_json` is the same rule in PL/pgSQL.
fn unescape_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let b = tail.as_bytes();
        let plain = match b.get(1) {
            Some(c @ (b'/' | b'\\' | b'"')) => Some(*c as char),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            Some(b'b') => Some('\x08'),
            Some(b'f') => Some('\x0c'),
            _ => None,
        };
        if let Some(c) = plain {
            out.push(c);
            rest = &tail[2..];
            continue;
        }
        if b.len() >= 6
            && &b[1..4] == b"u00"
            && b[4].is_ascii_hexdigit()
            && b[5].is_ascii_hexdigit()
        {
            let c = u8::from_str_radix(&tail[4..6], 16).unwrap_or(0);
            if c == b' ' || (c.is_ascii_punctuation() && c != b'%') {
                out.push(c as char);
                rest = &tail[6..];
                continue;
            }
        }
        out.push('\\');
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

/// Characters that end an embedded URL in the value as written: no URL holds them unencoded
/// (`encodeURI` escapes them), and no object name holds them (storage refuses `{}[]^|` in a
/// key), so a reading never needs to read past one: a Python dict's `str()`
/// (`{'url': 'https://.../x.png'}`), BBCode's `[img]...[/img]`, AsciiDoc's `image::...[]`,
/// pandoc's `![a](...){width=300}` (the eleventh review).
const HARD_STOPS: &[char] = &[
    '"', '<', '>', '`', '\t', '\n', '\r', '\x0b', '\x0c', '{', '}', '[', ']', '^', '|',
];

/// The texts of URLs embedded anywhere in a value, for [`texts_read`] to read as values: passed
/// to an image proxy, encoded once
/// (`/_next/image?url=https%3A%2F%2F...%2Fstorage%2Fv1%2F...&w=640`), inside markdown
/// (`![render](https://.../storage/v1/...)`), in text, or in a list. The ends are found in the
/// value as written, where an encoded `%20`, `%26` or `%3F` in a name is still part of it: each
/// reading starts at one of the [`MARKERS`] (a storage route, a URL's scheme) and runs to the
/// first of [`HARD_STOPS`]; it is read in the [`cuts`] of that span, each as it is, without one
/// trailing `)`, `]` or `'`, without all of them (markdown, quotes), without trailing
/// punctuation too (a URL ending a sentence), and cut at its last `@` when no `/` follows it
/// (imgproxy's `/plain/<url>@webp`: the ninth review); each of those as it is, decoded once,
/// decoded with `+` as a space (a form encoder's), and with markdown's backslash escapes taken
/// off (`photo%20\(1\).png`, as Turndown writes a link: the tenth review). Every marker gets a
/// pass of its own, so a second URL is read wherever it starts. At most [`MAX_ROUTES`] markers
/// of a value up to 64 KiB: past either, the save guard refuses to save the job
/// (`_unread_url`). Each distinct variant of a marker's span counts its length to `reading`.
fn embedded_readings(value: &str, reading: &mut Reading) -> Result<(), TooMuch> {
    if value.len() > MAX_PATH_LEN {
        return Ok(());
    }
    let lower = value.to_ascii_lowercase();
    let mut pos = 0;
    for _ in 0..MAX_ROUTES {
        let Some((start, route_len)) = next_marker(&lower, pos) else {
            break;
        };
        let span = &value[start
            ..value[start..]
                .find(HARD_STOPS)
                .map_or(value.len(), |n| start + n)];
        let mut seen: Vec<&str> = Vec::new();
        for cut in cuts(span) {
            let one = cut.strip_suffix([')', ']', '\'']).unwrap_or(cut);
            let at = cut
                .rfind('@')
                .filter(|&i| !cut[i..].contains('/'))
                .map_or(cut, |i| &cut[..i]);
            for variant in [
                cut,
                one,
                cut.trim_end_matches([')', ']', '\'']),
                cut.trim_end_matches([')', ']', '\'', '.', ',', ';', ':', '!', '?']),
                at,
            ] {
                // Most values have one route and no wrapping: each variant is read once.
                if seen.contains(&variant) {
                    continue;
                }
                seen.push(variant);
                reading.count(variant.len())?;
                reading.texts.push(variant.to_string());
                reading.texts.push(decode_once(variant));
                // In a query (an image proxy's `?url=`), a form encoder (URLSearchParams) writes
                // a space as `+`.
                if variant.contains('+') {
                    reading
                        .texts
                        .push(decode_once(&variant.replace('+', "%20")));
                }
                if variant.contains('\\') {
                    reading.texts.push(markdown_unescaped(variant));
                }
            }
        }
        // Every marker gets a pass of its own, even one inside the span of another.
        pos = start + route_len;
    }
    Ok(())
}

/// Where a URL embedded in text may end, in a span that runs to the first of [`HARD_STOPS`]:
/// the whole span; cut at the first space (a URL in a sentence, a `srcset`), at the first `&`
/// (a proxy's next parameter), at the first of either; and each of those cut at the first `,`
/// or `)` (a list of URLs, markdown images side by side), at the first `)` alone (a name with a
/// `,` in a linked image: `[![a](.../a,b.png)](...)`), at the `)` that closes no `(` before it
/// ([`balanced_cut`]: `![a](.../photo%20(1).png)![b](...)`, the eleventh review), and, where
/// it holds a backslash, at the first `,` or `)` that no backslash escapes (markdown:
/// `[a](.../p\(1\).png),[b](...)`). A raw `&` in a name is cut at the space alone (the tenth
/// review: `.../R&D.png (took 3s)`).
fn cuts(span: &str) -> Vec<&str> {
    let at = |c: &'static [char]| move |s: &str| s.find(c).unwrap_or(s.len());
    let first = [
        span,
        &span[..at(&[' '])(span)],
        &span[..at(&['&'])(span)],
        &span[..at(&['&', ' '])(span)],
    ];
    let mut cuts = first.to_vec();
    for cut in first {
        cuts.push(&cut[..at(&[',', ')'])(cut)]);
        cuts.push(&cut[..at(&[')'])(cut)]);
        cuts.push(balanced_cut(cut));
        if cut.contains('\\') {
            cuts.push(markdown_cut(cut));
        }
    }
    cuts
}

/// The longest start of `text` in which every `)` closes a `(` (one level deep, as in a name
/// like `photo (1).png`) and every backslash escapes the character after it: where a markdown
/// link destination with parentheses in it ends. The managed edition reads it with the regular
/// expression `^(?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*`, whose longest match this is.
fn balanced_cut(text: &str) -> &str {
    let mut chars = text.char_indices();
    let mut open = false;
    let mut end = 0;
    while let Some((_, c)) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => break,
            '(' if open => break,
            '(' => open = true,
            ')' if !open => break,
            ')' => open = false,
            _ => {}
        }
        if !open {
            end = chars.offset();
        }
    }
    &text[..end]
}

/// `text` up to its first `,` or `)` that no backslash escapes (or a backslash that ends it).
fn markdown_cut(text: &str) -> &str {
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            ',' | ')' => return &text[..i],
            '\\' if chars.next().is_none() => return &text[..i],
            _ => {}
        }
    }
    text
}

/// `text` with markdown's backslash escapes taken off: a backslash before ASCII punctuation
/// stands for that character (CommonMark), and before a space for the space (CSS, in an unquoted
/// `url(.../photo\ \(1\).png)`: the twelfth review), read left to right (`\\` is one
/// backslash).
fn markdown_unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(next) if next.is_ascii_punctuation() || next == ' ' => out.push(next),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// `text` percent-decoded once: in each run of escapes (`%XX%XX...`), every character the bytes
/// spell in UTF-8 is decoded, and each byte that is no part of one (or a NUL) stays as written,
/// as does everything else. A server decodes what it can (an image proxy reads `%E9` as U+FFFD
/// and still fetches the file): one bad escape must not keep the rest of a value from being
/// read (the fourth review, for the value; the eighth, for the run: `%FF%2F..` is `%FF/..`).
/// The managed edition's `_decode_once` is the same rule in PL/pgSQL.
fn decode_once(text: &str) -> String {
    let bytes = text.as_bytes();
    let is_escape = |i: usize| {
        i + 2 < bytes.len()
            && bytes[i] == b'%'
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
    };
    let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        if !is_escape(i) {
            i += 1;
            continue;
        }
        let start = i;
        let mut run = Vec::new();
        while is_escape(i) {
            run.push(hex(bytes[i + 1]) * 16 + hex(bytes[i + 2]));
            i += 3;
        }
        out.push_str(&text[copied..start]);
        let mut byte = start;
        for chunk in run.utf8_chunks() {
            for c in chunk.valid().chars() {
                let written = &text[byte..byte + 3 * c.len_utf8()];
                if c == '\0' {
                    out.push_str(written);
                } else {
                    out.push(c);
                }
                byte += written.len();
            }
            let bad = 3 * chunk.invalid().len();
            out.push_str(&text[byte..byte + bad]);
            byte += bad;
        }
        copied = i;
    }
    out.push_str(&text[copied..]);
    out
}

/// The lenient readings of `raw`, in order: for URLs (and values that contain a storage route)
/// the object after the route, or, for a URL with no route (a CDN's, a proxy's), its path as
/// `bucket/key`; for bare values and `s3://bucket/key`, the value as a path, then without its
/// query or fragment. Each path is also read cut at a `;` (which some servers take for the end
/// of the path), and with `..` resolved over empty segments too (as a browser resolves them). A
/// URL's path is also read with what follows a `?` when that holds no `=` (a `?` in a name).
///
/// The value is read without the junk around it ([`is_junk`]), and, when that took a quote or
/// bracket from either end, also with only its whitespace trimmed: `'` is a character of object
/// names (`it's'`), and a name ending in one must not lose it.
fn lenient_keys(raw: &str) -> Vec<String> {
    let trimmed = raw.trim_matches(is_junk);
    let kept = raw.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    let mut keys = lenient_keys_of(trimmed);
    if kept != trimmed {
        keys.extend(lenient_keys_of(kept));
        // And with one wrapping pair taken off (`"renders/it's'"`), the rest kept (the sixth
        // review).
        let pairs = [('"', '"'), ('\'', '\''), ('<', '>'), ('`', '`')];
        if let Some(inner) = pairs.iter().find_map(|(open, close)| {
            kept.strip_prefix(*open)
                .and_then(|s| s.strip_suffix(*close))
                .filter(|_| kept.len() >= 2)
        }) {
            let inner = inner.trim_matches(|c: char| c.is_whitespace() || c.is_control());
            if inner != trimmed && inner != kept {
                keys.extend(lenient_keys_of(inner));
            }
        }
    }
    keys
}

/// [`lenient_keys`] of a value already trimmed.
fn lenient_keys_of(trimmed: &str) -> Vec<String> {
    let value = trimmed.replace('\\', "/");
    // A URL: with a scheme, or scheme-relative (`//host/...`). Its host is dropped.
    let first = value.split('/').next().unwrap_or("");
    let (url, rest) = match value.split_once(':') {
        // `host:port/...`: a URL that lost its scheme (a self-hosted project's
        // `localhost:8000/storage/v1/...`), not a scheme named after the host.
        Some(_) if is_host_and_port(first) => (true, after_authority(&value)),
        Some((scheme, rest)) if first.contains(':') => match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => (true, after_authority(rest)),
            // The S3 URI of an object: the bucket is the authority.
            "s3" => (false, rest.trim_start_matches('/')),
            _ => return Vec::new(),
        },
        _ if value.starts_with("//") => (true, after_authority(&value[2..])),
        _ => (false, value.as_str()),
    };
    let has_route = url || rest.to_ascii_lowercase().contains("storage/v1/");
    let without_query = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let mut paths = if has_route {
        // A `?` in a name (supabase-js writes URLs with `encodeURI`, which leaves it as is):
        // the path read with what follows, when that is no query of parameters.
        if without_query.len() < rest.len() && !rest[without_query.len()..].contains('=') {
            vec![without_query, rest]
        } else {
            vec![without_query]
        }
    } else if without_query.len() < rest.len() {
        vec![rest, without_query]
    } else {
        vec![rest]
    };
    if let Some(i) = without_query.find(';') {
        paths.push(&without_query[..i]);
    }
    let mut keys = Vec::new();
    for path in paths {
        for keep_empty in [false, true] {
            // `..` after an encoded slash (`job%2F123/../x.png`) goes up one segment as written
            // in a browser, which resolves dots before anything is decoded (the ninth review):
            // such a path is also read with its dots resolved so first.
            let mut read = vec![path.to_string()];
            if path.len() <= MAX_PATH_LEN && has_encoded_separator(path) {
                read.push(dots_resolved(path, keep_empty));
            }
            for path in &read {
                if !has_route {
                    keys.extend(key_of_path(path, Route::None, keep_empty));
                    // A route that only resolving dot segments spells (`storage/./v1/...`).
                    keys.extend(key_of_path(path, Route::Gateway, keep_empty));
                    continue;
                }
                match key_of_path(path, Route::Gateway, keep_empty) {
                    Some(key) => keys.push(key),
                    // A URL with no `storage/v1`: the storage server's own (a self-hosted
                    // project's `http://storage:5000/object/public/...`, behind no gateway), and
                    // a CDN's path.
                    None if url => {
                        keys.extend(key_of_path(path, Route::Server, keep_empty));
                        keys.extend(key_of_path(path, Route::None, keep_empty));
                    }
                    None => {}
                }
            }
        }
    }
    keys
}

/// Whether `path` holds an encoded `/` or `\` (`%2F`, `%5C`, in any case).
fn has_encoded_separator(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("%2f") || lower.contains("%5c")
}

/// Where the object starts in a path.
#[derive(Clone, Copy)]
enum Route {
    /// After `storage/v1/<route>`, wherever it starts (the API gateway's path).
    Gateway,
    /// After `<route>` at the start of the path (the storage server's own, without a gateway).
    Server,
    /// The whole path is `bucket/key`.
    None,
}

/// The object a path names (after the storage route when it has one), or `None`. Paths longer
/// than [`MAX_PATH_LEN`] are not read (the work stays bounded); a reading whose key is longer
/// than any object name storage allows names no object (and would not fit in an index entry).
fn key_of_path(path: &str, route: Route, keep_empty: bool) -> Option<String> {
    if path.len() > MAX_PATH_LEN {
        return None;
    }
    // Decoded even when bare: `%` is no character of an object name, so `renders/a%20b.png`
    // can only mean `renders/a b.png`.
    let segments = normalize(path, keep_empty);
    let object = match route {
        Route::Gateway => {
            let start = (0..segments.len()).find(|&i| {
                segments.len() > i + 1
                    && segments[i].eq_ignore_ascii_case("storage")
                    && segments[i + 1].eq_ignore_ascii_case("v1")
            })?;
            after_route(&segments[start + 2..])?
        }
        Route::Server => after_route(&segments)?,
        Route::None => &segments[..],
    };
    let (bucket, key) = object.split_first()?;
    let key = key.join("/");
    if key.is_empty() || key.len() > crate::MAX_KEY_LEN || bucket.len() > crate::MAX_KEY_LEN {
        return None;
    }
    Some(format!("{bucket}/{key}"))
}

/// The longest path the lenient reading reads: far more than any URL of an object (4,096 bytes),
/// so that padding (`./` repeated) cannot hide one.
const MAX_PATH_LEN: usize = 65_536;

/// Whether `first` (what comes before the first `/`) is `host:port`, digits after the last `:`.
fn is_host_and_port(first: &str) -> bool {
    matches!(first.rsplit_once(':'),
             Some((host, port)) if !host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

/// What follows a URL's authority (`host:port`), from the first `/`, `?` or `#` on.
fn after_authority(rest: &str) -> &str {
    let rest = rest.trim_start_matches('/');
    &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..]
}

/// The segments after the route `segments` start with (what follows `storage/v1/` behind the
/// gateway, or the whole path on the storage server itself): `object/{public|authenticated|sign}/`,
/// `object/info/[public|authenticated]/`, `object/upload/sign/`, `object/` alone (the
/// authenticated download), `render/image/{public|authenticated|sign}/`, or `s3/` (the
/// S3-compatible endpoint, `/storage/v1/s3/<bucket>/<key>`), in any case.
fn after_route(segments: &[String]) -> Option<&[String]> {
    let route: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let route: Vec<&str> = route.iter().map(String::as_str).collect();
    let skip = match route.as_slice() {
        ["object", "info", "public" | "authenticated", _, _, ..] => 3,
        ["object", "upload", "sign", _, _, ..] => 3,
        ["object", "public" | "authenticated" | "sign" | "info", _, _, ..] => 2,
        ["object", _, _, ..] => 1,
        ["render", "image", "public" | "authenticated" | "sign", _, _, ..] => 3,
        ["s3", _, _, ..] => 1,
        _ => return None,
    };
    Some(&segments[skip..])
}

/// `path` with its dot segments resolved over the segments as written, before any decoding, as a
/// browser resolves them: `.` and `%2E` are dots, `..`, `.%2E`, `%2E.` and `%2E%2E` (in any case)
/// go up one; with `keep_empty`, an empty segment counts. The rest is kept as written, for
/// [`normalize`] to decode (and resolve again).
fn dots_resolved(path: &str, keep_empty: bool) -> String {
    resolve_dots(path, keep_empty, |part| {
        match part.to_ascii_lowercase().as_str() {
            "." | "%2e" => Some(Dot::Current),
            ".." | ".%2e" | "%2e." | "%2e%2e" => Some(Dot::Parent),
            _ => None,
        }
    })
    .join("/")
}

/// A dot segment: `.` stays where it is, `..` goes up one.
enum Dot {
    Current,
    Parent,
}

/// The segments of `path` (split at `/` and `\\`) with its dot segments, as `dot` tells them,
/// resolved; with `keep_empty`, an empty segment counts (a leading separator aside), as a browser
/// counts it, and otherwise is dropped. [`normalize`] and [`dots_resolved`] differ only in what
/// they take for a dot.
fn resolve_dots(path: &str, keep_empty: bool, dot: impl Fn(&str) -> Option<Dot>) -> Vec<&str> {
    let path = if keep_empty {
        path.strip_prefix(['/', '\\']).unwrap_or(path)
    } else {
        path
    };
    let mut out: Vec<&str> = Vec::new();
    for part in path.split(['/', '\\']) {
        match dot(part) {
            _ if part.is_empty() && !keep_empty => {}
            Some(Dot::Current) => {}
            Some(Dot::Parent) => {
                out.pop();
            }
            None => out.push(part),
        }
    }
    out
}

/// Path segments as a server would see them: percent-decoded (an invalid escape stays as
/// written), with `.` segments dropped and `..` resolved, then empty segments dropped. With
/// `keep_empty`, an empty segment counts while `..` is resolved, as a browser counts it
/// (`renders//../x.png` is `renders/x.png` there, `x.png` otherwise). A path whose escapes
/// decode to no text (bytes that are not UTF-8, or a NUL) is read as written: no object a strict
/// parse accepts has such a name, and the managed edition's PL/pgSQL reading (whose text
/// cannot hold a NUL) must find the same key.
fn normalize(path: &str, keep_empty: bool) -> Vec<String> {
    let text = decode_once(path);
    resolve_dots(&text, keep_empty, |part| match part {
        "." => Some(Dot::Current),
        ".." => Some(Dot::Parent),
        _ => None,
    })
    .into_iter()
    .filter(|s| !s.is_empty())
    .map(str::to_string)
    .collect()
}
