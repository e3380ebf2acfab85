//! One URL parser in two languages must not drift (issue 14). The managed edition reads URLs in
//! PL/pgSQL (`pg_orphan_cleanup/managed/urls.sql`); the extension and the reaper read them with
//! the Rust crate `object-url`. This test feeds both the same values, 100,000 generated ones and
//! every line of the hostile corpus, and fails on any difference: accept or reject, host, bucket,
//! key, form, the error message, the lenient `object_key`, every reading (`object_keys`), the
//! redacted URL, and the allow-lists' verdict.
//!
//! The generator builds values from the parts real and hostile URLs are made of (schemes,
//! authorities, routes, escapes, Unicode spaces, dot segments, junk around the value), so that
//! most values get deep into the parser before they are accepted or refused; a share are plain
//! random strings. 20,000 more are canonical object URLs with up to three small edits, on both
//! sides of the edge of the PL/pgSQL parser's fast path for canonical values. `URL_SEED=<n>`
//! reproduces a run; the seed is printed.

use object_url::{parse, protected_key, protected_keys, reading_size, redact, route_count, Policy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use e2e::*;

const GENERATED: usize = 100_000;
const BATCH: usize = 5_000;
/// Values near the canonical spelling, on both sides of the PL/pgSQL fast path's edge.
const NEAR_CANONICAL: usize = 20_000;

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// One piece of an object name: plain characters, escapes of every kind, and the characters
/// that trip parsers up.
fn piece(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "0",
        "render",
        "job 1",
        "x.png",
        "_",
        "-",
        "!",
        "*",
        "'",
        "(",
        ")",
        " ",
        "&",
        "$",
        "=",
        "@",
        ";",
        ":",
        "+",
        ",",
        "~",
        "\"",
        "<",
        ">",
        "`",
        "^",
        "|",
        "{",
        "[",
        "]",
        "%",
        "%20",
        "%2F",
        "%2f",
        "%2E",
        "%2e",
        "%2e%2e",
        "%5C",
        "%00",
        "%01",
        "%1F",
        "%7F",
        "%7f",
        "%C2%85",
        "%c2%9F",
        "%C3%A9",
        "%FF",
        "%E2%80%A8",
        "%zz",
        "%2",
        "%41",
        "%61",
        "%72",
        "%2D",
        "%5F",
        "%7E",
        "%25",
        "%3F",
        "%23",
        "%22",
        "%27",
        "%3C",
        "%20%20",
        "é",
        "\u{a0}",
        "\u{2028}",
        "\u{85}",
        "\u{3000}",
        "\u{200b}",
        "\t",
        "\n",
        "\u{7f}",
        "\u{9f}",
        "\\",
        "?",
        "#",
        ".",
        "..",
        "...",
        "İ",
        "K",
        "ß",
        "日本",
    ];
    const GOOD: &[&str] = &[
        "a", "Z", "0", "render", "job 1", "x.png", "_", "-", "!", "*", "'", "(", ")", " x", "&",
        "$", "=", "@", ";", ":", "+", ",", "%20", "%3F", "%3f", "%2C", "%40", "%26",
    ];
    let n = rng.random_range(1..=3);
    (0..n)
        .map(|_| {
            if rng.random_range(0..10) == 0 {
                pick(rng, PIECES)
            } else {
                pick(rng, GOOD)
            }
        })
        .collect()
}

/// A path of `bucket/key` segments, with empty, dot and folder segments now and then.
fn object_path(rng: &mut StdRng) -> String {
    let n = if rng.random_range(0..8) == 0 {
        1
    } else {
        rng.random_range(2..=4)
    };
    let mut segs: Vec<String> = Vec::new();
    for _ in 0..n {
        segs.push(match rng.random_range(0..12) {
            0 if rng.random_range(0..3) == 0 => String::new(),
            1 if rng.random_range(0..3) == 0 => ".".into(),
            2 if rng.random_range(0..3) == 0 => "..".into(),
            3 | 7 | 8 => "renders".into(),
            4 => "thumbs".into(),
            5 => "user-1".into(),
            _ => piece(rng),
        });
    }
    if rng.random_range(0..10) == 0 {
        segs.push(String::new()); // a trailing '/'
    }
    if rng.random_range(0..200) == 0 {
        segs.push("k".repeat(rng.random_range(1000..1100)));
    }
    segs.join("/")
}

fn authority(rng: &mut StdRng) -> String {
    const HOSTS: &[&str] = &[
        "abcd.supabase.co",
        "ABCD.Supabase.CO",
        "127.0.0.1",
        "localhost",
        "10.0.0.255",
        "256.0.0.1",
        "127.1",
        "0x7f000001",
        "2130706433",
        "127.0.0.01",
        "1.2.3.4.5",
        "a.0x",
        "a.0X1f",
        "[::1]",
        "[::ffff:1.2.3.4]",
        "xn--bcd-4na.supabase.co",
        "a.XN--p1ai",
        "bücher.de",
        "ex%41mple.com",
        "under_score.com",
        "abcd.supabase.co.",
        ".abcd.co",
        "a..b",
        "",
        "a-b.c0",
        "-a-.co",
        "user@h.co",
        "user:pw@h.co",
        "h.co@evil.com",
        "日本.jp",
        "h co",
    ];
    const PORTS: &[&str] = &[
        "", "", "", ":443", ":80", ":54321", ":", ":0", ":0443", ":65535", ":65536", ":1:2", ":+1",
        ":abc", ":8080",
    ];
    const GOOD: &[&str] = &[
        "abcd.supabase.co",
        "ABCD.Supabase.CO",
        "127.0.0.1:54321",
        "localhost",
    ];
    if rng.random_range(0..10) < 7 {
        return pick(rng, GOOD).to_string();
    }
    format!("{}{}", pick(rng, HOSTS), pick(rng, PORTS))
}

fn route(rng: &mut StdRng) -> &'static str {
    if rng.random_range(0..2) == 0 {
        return "/storage/v1/object/public/";
    }
    pick(
        rng,
        &[
            "/storage/v1/object/public/",
            "/storage/v1/object/authenticated/",
            "/storage/v1/object/sign/",
            "/storage/v1/render/image/public/",
            "/storage/v1/render/image/authenticated/",
            "/storage/v1/render/image/sign/",
            "/storage/v1/object/",
            "/storage/v1/object/info/public/",
            "/storage/v1/object/upload/sign/",
            "/storage/v1/object/list/",
            "/storage/v1/s3/",
            "/Storage/V1/Object/Public/",
            "/%73torage/v1/object/public/",
            "/proxy/storage/v1/object/public/",
            "/storage/v1/object/public/../",
            "/storage//v1/object/public/",
            "/storage/./v1/object/public/",
            "/storage/x/../v1/object/public/",
            "/storage%2F.%2Fv1/object/public/",
            // The storage server's own routes, behind no gateway (self-hosted).
            "/object/public/",
            "/object/authenticated/",
            "/object/info/public/",
            "/render/image/sign/",
            "/s3/",
            "/",
            "",
        ],
    )
}

fn tail(rng: &mut StdRng) -> String {
    // A signed URL whose token makes it longer than any URL the strict parser reads.
    if rng.random_range(0..300) == 0 {
        return format!("?token={}", "t".repeat(rng.random_range(4000..4200)));
    }
    pick(
        rng,
        &[
            "",
            "",
            "",
            "?token=eyJ.abc.def",
            "?TOKEN=t&download=1",
            "?a=1&sig=s#frag",
            "#x",
            "?apikey=k&x-amz-signature=s&keep=1",
            "?&=&token",
            "?token=a=b",
            "?x#y?token=z",
            ";v=2",
            ";a?b",
        ],
    )
    .to_string()
}

fn junk(rng: &mut StdRng) -> &'static str {
    if rng.random_range(0..6) > 0 {
        return "";
    }
    pick(
        rng,
        &[
            "", "", "", "", " ", "\"", "'", "<", ">", "`", "\u{a0}", "\n", "\t", "\u{3000}",
        ],
    )
}

/// One value, shaped like what an app could store in `output_url`.
fn value(rng: &mut StdRng) -> String {
    let v = match rng.random_range(0..10) {
        0..=4 => {
            let scheme = if rng.random_range(0..10) < 7 {
                "https"
            } else {
                pick(
                    rng,
                    &[
                        "https",
                        "http",
                        "HTTPS",
                        "Http",
                        "ftp",
                        "javascript",
                        "file",
                        "s3",
                        "h",
                    ],
                )
            };
            let sep = pick(
                rng,
                &[
                    "://", "://", "://", "://", "://", "://", ":/", ":", ":///", "://\\",
                ],
            );
            format!(
                "{scheme}{sep}{}{}{}{}",
                authority(rng),
                route(rng),
                object_path(rng),
                tail(rng)
            )
        }
        5 => format!(
            "//{}{}{}{}",
            authority(rng),
            route(rng),
            object_path(rng),
            tail(rng)
        ),
        // A route without its leading slash, or a URL that lost its scheme: read strictly as a
        // bare value, meant as the URL.
        6 => {
            let lost = if rng.random_range(0..2) == 0 {
                String::new()
            } else {
                authority(rng).to_string()
            };
            format!(
                "{lost}{}{}{}",
                if lost.is_empty() {
                    route(rng).trim_start_matches('/')
                } else {
                    route(rng)
                },
                object_path(rng),
                tail(rng)
            )
        }
        // A bare value, now and then with a query (a cache buster).
        7 | 8 => {
            let t = if rng.random_range(0..8) == 0 {
                tail(rng)
            } else {
                String::new()
            };
            format!("{}{t}", object_path(rng))
        }
        _ => (0..rng.random_range(0..12))
            .map(|_| piece(rng))
            .collect::<Vec<_>>()
            .join(pick(rng, &["/", ":", "//", ""])),
    };
    let v = format!("{}{v}{}", junk(rng), junk(rng));
    // Wrapped: in markdown, in text, or passed to an image proxy (encoded in its query).
    let mut v = match rng.random_range(0..44) {
        0 => format!("![render]({v})"),
        1 => format!("see {v} for the render"),
        2 => format!(
            "https://app.example.com/_next/image?url={}&w=640",
            v.chars()
                .map(|c| match c {
                    ':' | '/' | '?' | '&' | '=' | '%' | ' ' | '#' => format!("%{:02X}", c as u32),
                    c => c.to_string(),
                })
                .collect::<String>()
        ),
        // The same, form-encoded (URLSearchParams): a space is '+', a '+' is %2B.
        3 => format!(
            "https://app.example.com/_next/image?url={}&w=640",
            v.chars()
                .map(|c| match c {
                    ' ' => "+".to_string(),
                    ':' | '/' | '?' | '&' | '=' | '%' | '#' | '+' => format!("%{:02X}", c as u32),
                    c => c.to_string(),
                })
                .collect::<String>()
        ),
        // In a list, side by side in markdown, or ending a sentence (the fourth review).
        4 => format!(
            "{v}{}{}{}",
            pick(rng, &[",", ";", "|", ")![b](", " and "]),
            v.replacen('a', "b", 1),
            pick(rng, &["", ".", ")", "!", ",", "%E9", "%C3"])
        ),
        // In JSON with its escapes (PHP's json_encode escapes every '/', .NET's '+' and '&'),
        // and encoded twice (an image CDN's URL inside an image proxy's) (the fifth review).
        5 => format!(r#"{{"publicUrl":"{}"}}"#, v.replace('/', "\\/")),
        6 => format!(
            r#"["{}"]"#,
            v.replace('/', pick(rng, &["\\/", "\\u002F", "/"]))
                .replace('+', "\\u002B")
                .replace('&', "\\u0026")
        ),
        7 => {
            let encode = |s: &str| -> String {
                s.chars()
                    .map(|c| match c {
                        ':' | '/' | '?' | '&' | '=' | '%' | ' ' | '#' => {
                            format!("%{:02X}", c as u32)
                        }
                        c => c.to_string(),
                    })
                    .collect()
            };
            format!(
                "https://app.example.com/_next/image?url={}&w=640",
                encode(&format!("https://cdn.example.com/img?src={}", encode(&v)))
            )
        }
        // The seventh review: JSON up to eight times over (PHP's json_encode in a loop), an
        // escaped backslash, escapes whose run decodes to %2F, URL-encoded JSON.
        8 => {
            let depth = if rng.random_bool(0.1) {
                rng.random_range(6..9)
            } else {
                rng.random_range(1..4)
            };
            php_json(depth, &v)
        }
        9 => v.replace(
            '/',
            pick(
                rng,
                &[
                    "\\u005c/",
                    "\\u005c\\u002f",
                    "%25%32%66",
                    "%252%66",
                    "%5C%2F",
                ],
            ),
        ),
        // The ninth review: JSON's control escapes (a worker's stdout through json.dumps),
        // imgproxy's `@extension`, a URL inside markdown (a CDN's has no route), `..` after an
        // encoded slash, a bad byte inside a run of escapes.
        10 => format!(
            r#"{{"url": "{}{}"}}"#,
            v.replace('"', "\\\""),
            pick(
                rng,
                &["\\n", "\\r\\n", "\\t", "\\f", "\\b", "\\\"", "\\u0020"]
            )
        ),
        11 => format!(
            "https://img.example.com/sig/rs:fill:300/plain/{v}@{}",
            pick(rng, &["webp", "png", "avif", "", "x/y"])
        ),
        12 => format!("![r]({v}) and https://cdn.example.com/{v}"),
        13 => v.replacen(
            '/',
            pick(rng, &["/a%2Fb/../", "/a%2fb/%2E%2E/", "/a%5Cb/.%2e/"]),
            2,
        ),
        14 => v.replacen(
            '/',
            pick(rng, &["%FF%2F", "%2F%FF", "%E2%82%2F", "%C3%A9%FF%2F.."]),
            2,
        ),
        // The tenth review: a URL only a JSON layer reveals, with escapes of its own; markdown's
        // backslash escapes; a raw '&' in a name followed by a space or a comma; a JSON-escaped
        // newline inside a URL; and values whose readings pass their bound.
        15 => format!(
            r#"{{"msg":"done: {} in 3s"}}"#,
            v.replace('/', "\\/").replacen(
                'a',
                pick(rng, &["a%3Fb", "a%23b", "a%20b", "a%26b", "a%2520b"]),
                1
            )
        ),
        16 => format!(
            "[render]({}){}",
            v.replacen(
                'a',
                pick(rng, &["\\(1\\)", "my\\_a", "\\*a", "a\\\\", "\\a", "a\\ b"]),
                1
            ),
            pick(rng, &["", ",[b](x)", " done", ")"])
        ),
        17 => {
            let name = pick(rng, &["R&D", "Tom%20&%20Jerry", "a&b", "&"]);
            let named = v.replacen('a', name, 1);
            match rng.random_range(0..3) {
                0 => format!("Render complete: {named} (took 3.2s)"),
                1 => format!("{named} 1x, {v} 2x"),
                _ => format!("{named},{v}"),
            }
        }
        18 => format!(
            r#"{{"u":"{}"}}"#,
            v.replacen('a', pick(rng, &["a\\n", "\\ta", "a\\r\\n"]), 1)
        ),
        // The eleventh review: a Python dict's str(), BBCode, AsciiDoc, pandoc's attributes;
        // a name with ',' or parentheses in markdown followed by more text; runs of bad bytes
        // and of '..' (which the managed edition read in quadratic time).
        20 => format!(
            "{}{v}{}",
            pick(
                rng,
                &["{'url': '", "[img]", "[url=", "image::", "[![a](", "![a]("]
            ),
            pick(
                rng,
                &[
                    "'}",
                    "[/img]",
                    "]x[/url]",
                    "[]",
                    "[A,1,2]",
                    ")](https://e.x)",
                    "){width=3}",
                    ")![b](y)"
                ]
            )
        ),
        21 => v.replacen(
            'a',
            pick(rng, &["a,b", "p%20(1)", "(x)", "a(b", "a)b", "\\(c\\)"]),
            1,
        ),
        22 if rng.random_range(0..8) == 0 => v.replacen(
            '/',
            &pick(rng, &["%E2", "%C3%A9%FF", "a/../", "%2F.."]).repeat(rng.random_range(50..400)),
            1,
        ),
        19 if rng.random_range(0..4) == 0 => {
            format!("{v} a&b,c)d e&f,g)h ").repeat(rng.random_range(2..10))
        }
        _ => v,
    };
    // A tab or a newline inside the value, which a browser deletes from a URL.
    if rng.random_range(0..12) == 0 && !v.is_empty() {
        let at = rng.random_range(0..v.len());
        if v.is_char_boundary(at) {
            v.insert_str(at, pick(rng, &["\t", "\n", "\r"]));
        }
    }
    // PostgreSQL text holds no NUL; the parsers' answers for it are tested in Rust alone.
    v.replace('\0', "")
}

/// The Rust crate's answers for one value, in the shape the SQL query returns them.
#[derive(Debug, PartialEq)]
struct Answer {
    host: Option<String>,
    bucket: Option<String>,
    key: Option<String>,
    form: Option<String>,
    error: Option<String>,
    object_key: Option<String>,
    object_keys: Vec<String>,
    route_count: i32,
    reading_size: i32,
    redacted: String,
    refusals: Vec<Option<String>>,
}

fn policies() -> Vec<Policy> {
    [
        ["renders, thumbs", "", "abcd.supabase.co, 127.0.0.1:54321"],
        ["renders", "user-, renders/", ""],
        ["", "", "localhost:443"],
    ]
    .into_iter()
    .map(|lists| Policy::from_lists(lists[0], lists[1], lists[2]).unwrap())
    .collect()
}

fn rust_answer(v: &str, policies: &[Policy]) -> Answer {
    let parsed = parse(v);
    let refusals = policies
        .iter()
        .map(|p| match &parsed {
            Ok(o) => p.check(o).err().map(|r| r.to_string()),
            Err(_) => None,
        })
        .collect();
    let (host, bucket, key, form, error) = match parsed {
        Ok(o) => (
            o.host,
            Some(o.bucket),
            Some(o.key),
            Some(o.form.as_str().to_string()),
            None,
        ),
        Err(e) => (None, None, None, None, Some(e.to_string())),
    };
    Answer {
        host,
        bucket,
        key,
        form,
        error,
        object_key: protected_key(v),
        object_keys: protected_keys(v),
        route_count: route_count(v).map_or(-1, |n| n as i32),
        reading_size: reading_size(v).map_or(-1, |n| n as i32),
        redacted: redact(v),
        refusals,
    }
}

/// The PL/pgSQL edition's answers for a batch of values.
fn sql_answers(c: &mut postgres::Client, values: &[String], policies: &[Policy]) -> Vec<Answer> {
    let lists = |i: usize| {
        let p = &policies[i];
        [p.buckets.clone(), p.prefixes.clone(), p.hosts.clone()]
    };
    let (p0, p1, p2) = (lists(0), lists(1), lists(2));
    let rows = c
        .query(
            "SELECT p.host, p.bucket, p.object_path, p.form, p.error,
                    orphan_cleanup.object_key(u), orphan_cleanup.redact_url(u),
                    coalesce(orphan_cleanup.object_keys(u), '{}'),
                    CASE WHEN p.error IS NULL THEN orphan_cleanup._url_refusal(p.host, p.bucket, p.object_path, $2, $3, $4) END,
                    CASE WHEN p.error IS NULL THEN orphan_cleanup._url_refusal(p.host, p.bucket, p.object_path, $5, $6, $7) END,
                    CASE WHEN p.error IS NULL THEN orphan_cleanup._url_refusal(p.host, p.bucket, p.object_path, $8, $9, $10) END,
                    orphan_cleanup._route_count(u), orphan_cleanup._reading_size(u)
             FROM unnest($1::text[]) WITH ORDINALITY AS t(u, n)
             CROSS JOIN LATERAL orphan_cleanup.parse_output_url(u) AS p
             ORDER BY n",
            &[&values, &p0[0], &p0[1], &p0[2], &p1[0], &p1[1], &p1[2], &p2[0], &p2[1], &p2[2]],
        )
        .unwrap();
    rows.iter()
        .map(|r| Answer {
            host: r.get(0),
            bucket: r.get(1),
            key: r.get(2),
            form: r.get(3),
            error: r.get(4),
            object_key: r.get(5),
            redacted: r.get(6),
            object_keys: r.get(7),
            refusals: vec![r.get(8), r.get(9), r.get(10)],
            route_count: r.get(11),
            reading_size: r.get(12),
        })
        .collect()
}

/// A database with nothing but the managed edition's URL functions.
fn urls_db() -> postgres::Client {
    let mut admin = connect("postgres");
    admin
        .batch_execute("DROP DATABASE IF EXISTS url_parsers WITH (FORCE)")
        .unwrap();
    admin.batch_execute("CREATE DATABASE url_parsers").unwrap();
    let mut c = connect("url_parsers");
    let sql =
        std::fs::read_to_string(repo_root().join("pg_orphan_cleanup/managed/urls.sql")).unwrap();
    c.batch_execute("CREATE SCHEMA orphan_cleanup").unwrap();
    c.batch_execute(&sql).unwrap();
    c
}

/// Compares both parsers on `values`; returns the differences, described.
fn differences(c: &mut postgres::Client, values: &[String]) -> Vec<String> {
    let policies = policies();
    let mut found = Vec::new();
    for batch in values.chunks(BATCH) {
        let sql = sql_answers(c, batch, &policies);
        for (v, s) in batch.iter().zip(sql) {
            let r = rust_answer(v, &policies);
            if r != s {
                found.push(format!("value {v:?}\n  rust:     {r:?}\n  pl/pgsql: {s:?}"));
            }
        }
    }
    found
}

/// The hostile corpus, as the chaos suite reads it ({HOST} is a storage host the policy allows).
fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("tests/corpus/hostile_urls.txt")).unwrap();
    text.lines()
        .filter(|l| l.starts_with('"'))
        .map(|l| {
            serde_json::from_str::<String>(l)
                .unwrap()
                .replace("{HOST}", "127.0.0.1:54321")
        })
        .map(|v| v.replace('\0', ""))
        .collect()
}

/// A canonical object URL (what supabase-js writes), then up to three small edits: the
/// PL/pgSQL parser answers canonical values on a fast path (`_canonical_url`), and these values
/// sit on both sides of its edge (a character of another class, a second route, a port out of
/// range, with leading zeros or the scheme's own, an upper-case host, a numeric last label, an
/// address that is not a dotted quad, a dot segment).
fn near_canonical(rng: &mut StdRng) -> String {
    const HOSTS: &[&str] = &[
        "abcd.supabase.co",
        "localhost",
        "cdn.example.com",
        "a-b.c0",
        "127.0.0.1:54321",
        "storage:5000",
        "1.2.3.4",
        "255.0.10.9",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3",
        "localhost:0",
        "localhost:80",
        "localhost:443",
        "localhost:65535",
        "localhost:65536",
        "localhost:099",
        "localhost:123456",
        "xn--bcher-kva.example",
        "ABCD.supabase.co",
        "storage",
        "x.0x1f",
    ];
    const NAME: &[&str] = &["a", "z", "0", "9", "-", "_", ".", "img", "user-1", "v1"];
    const EDITS: &[&str] = &[
        "%",
        "%2e",
        "%2F",
        "%41",
        ".",
        "..",
        "/",
        "//",
        ":",
        ":443",
        ":80",
        ":5000",
        ":0",
        ":65536",
        "0",
        "?",
        "?a=b",
        "#",
        ";",
        "A",
        "X",
        " ",
        "@",
        "~",
        "storage",
        "STORAGE/V1/",
        "storage/v1/object/public/",
        "sign",
        "info",
        "\\",
        "é",
        "-",
        "_",
    ];
    let name = |rng: &mut StdRng| -> String {
        (0..rng.random_range(1..4))
            .map(|_| pick(rng, NAME))
            .collect()
    };
    let key: Vec<String> = (0..rng.random_range(1..4)).map(|_| name(rng)).collect();
    // Two in five as supabase-js writes them; the others varied and edited.
    let plain = rng.random_bool(0.4);
    let mut v = format!(
        "{}://{}/storage/v1/object/{}/{}/{}",
        pick(
            rng,
            &["https", "http", "HTTPS"][..if plain { 2 } else { 3 }]
        ),
        pick(rng, &HOSTS[..if plain { 6 } else { HOSTS.len() }]),
        pick(
            rng,
            &["public", "authenticated", "sign", "info", "render"][..if plain { 3 } else { 5 }]
        ),
        name(rng),
        key.join("/")
    );
    for _ in 0..if plain { 0 } else { rng.random_range(1..4) } {
        let chars: Vec<char> = v.chars().collect();
        let at = rng.random_range(0..=chars.len());
        let edit = pick(rng, EDITS);
        let (head, tail): (String, String) =
            (chars[..at].iter().collect(), chars[at..].iter().collect());
        v = match rng.random_range(0..3) {
            0 => format!("{head}{edit}{tail}"),
            1 => format!("{head}{edit}{}", tail.chars().skip(1).collect::<String>()),
            _ => format!("{head}{}", tail.chars().skip(1).collect::<String>()),
        };
    }
    v
}

#[test]
fn both_parsers_agree_on_every_generated_value_and_the_hostile_corpus() {
    let seed: u64 = std::env::var("URL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("URL_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut values: Vec<String> = (0..GENERATED).map(|_| value(&mut rng)).collect();
    values.extend((0..NEAR_CANONICAL).map(|_| near_canonical(&mut rng)));
    let corpus = corpus();
    assert!(
        corpus.len() > 200,
        "the corpus is read: {} values",
        corpus.len()
    );
    values.extend(corpus);
    let accepted = values.iter().filter(|v| parse(v).is_ok()).count();
    let mut c = urls_db();
    let found = differences(&mut c, &values);
    // Both sides of the fast path's edge are reached.
    let fast: i64 = c
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) AS v WHERE orphan_cleanup._canonical_url(v) IS NOT NULL",
            &[&values],
        )
        .unwrap()
        .get(0);
    println!("{fast} values took the PL/pgSQL parser's canonical fast path");
    assert!(
        fast > (NEAR_CANONICAL / 5) as i64 && fast < (NEAR_CANONICAL * 4 / 5) as i64,
        "{fast} values took the canonical fast path"
    );
    assert!(
        found.is_empty(),
        "{} of {} values read differently (URL_SEED={seed}); the first:\n{}",
        found.len(),
        values.len(),
        found
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The generator must reach deep: a good share accepted, and refusals of many kinds.
    let kinds: std::collections::BTreeSet<String> = values
        .iter()
        .filter_map(|v| parse(v).err())
        .map(|e| format!("{e:?}").split('(').next().unwrap().to_string())
        .collect();
    let lenient = values
        .iter()
        .filter(|v| parse(v).is_err() && protected_key(v).is_some())
        .count();
    // Values with more than one reading (the strict parser's, and another an app could mean).
    let ambiguous = values
        .iter()
        .filter(|v| parse(v).is_ok() && protected_keys(v).len() > 1)
        .count();
    println!(
        "{} values, {accepted} accepted ({ambiguous} of them with another reading too), {lenient} refused but still naming an object to protect, refusal kinds: {kinds:?}",
        values.len()
    );
    assert!(
        accepted > values.len() / 12,
        "only {accepted} values accepted"
    );
    assert!(
        ambiguous > values.len() / 100,
        "only {ambiguous} values accepted with another reading"
    );
    assert!(
        lenient > values.len() / 10,
        "only {lenient} values read leniently"
    );
    assert!(
        kinds.len() >= 25,
        "only {} kinds of refusal reached: {kinds:?}",
        kinds.len()
    );
}

/// The comparison itself can fail: a value the two parsers read differently is reported.
#[test]
fn a_difference_between_the_parsers_is_reported() {
    let mut c = urls_db();
    // Make the PL/pgSQL parser accept what the Rust one refuses: '..' segments.
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION orphan_cleanup.parse_output_url(url text)
         RETURNS TABLE (host text, bucket text, object_path text, form text, error text)
         LANGUAGE sql IMMUTABLE AS $$ SELECT NULL::text, 'renders', 'a.png', 'bare', NULL::text $$",
    )
    .unwrap();
    let found = differences(
        &mut c,
        &["renders/../a.png".to_string(), "renders/a.png".to_string()],
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("renders/../a.png"), "{found:?}");
}

/// Review of issue 14 (suspicion S4): a NULL in an allow-list made `host = ANY (hosts)` NULL,
/// and the host check was skipped. A NULL entry (only a direct write to the settings table could
/// put one there) matches nothing.
#[test]
fn a_null_in_an_allow_list_allows_nothing() {
    let mut c = urls_db();
    for (host, buckets, hosts) in [
        (Some("evil.example"), "{renders}", "{NULL,h.co}"),
        (None, "{NULL}", "{}"),
    ] {
        let refusal: Option<String> = c
            .query_one(
                "SELECT orphan_cleanup._url_refusal($1, 'renders', 'a.png', $2::text::text[], '{}', $3::text::text[])",
                &[&host, &buckets, &hosts],
            )
            .unwrap()
            .get(0);
        assert!(refusal.is_some(), "{host:?} {buckets} {hosts}");
    }
}

/// The characters Supabase Storage allows in an object name (its `isValidKey`).
const STORAGE_NAME_CHARS: &[char] = &[
    'a', 'b', 'z', 'A', 'Q', 'Z', '0', '7', '9', '_', '!', '.', '*', '\'', '(', ')', ' ', '&', '$',
    '=', '@', ';', ':', '+', ',', '?', '-',
];

/// JavaScript's `encodeURI` (what supabase-js runs over every URL it builds) and
/// `encodeURIComponent` (what an app may run over each segment itself): every character outside
/// `keep` and the ASCII letters and digits becomes its UTF-8 escapes.
fn js_encode(s: &str, keep: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || keep.contains(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}
const ENCODE_URI_KEEPS: &str = ";,/?:@&=+$-_.!~*'()#";
const ENCODE_URI_COMPONENT_KEEPS: &str = "-_.!~*'()";
/// RFC 3986's unreserved characters and '/': what `urllib.parse.quote` and most server-side
/// URL builders keep.
const RFC3986_KEEPS: &str = "-._~/";

/// Every spelling of one object's URL that a client, a browser or a server-side builder writes,
/// with whether the storage server reads the object from it. A name containing '?' is cut there
/// by any spelling that leaves the '?' as written: the server (and every browser) reads the
/// object before it and the rest as a query, so such a URL names that other object, and only
/// the spellings that escape the '?' name this one.
fn client_spellings(base: &str, bucket: &str, key: &str) -> Vec<(String, bool)> {
    let object = format!("{bucket}/{key}");
    let cut = key.contains('?');
    let url = |route: &str, query: &str| {
        js_encode(
            &format!("{base}/storage/v1/{route}/{object}{query}"),
            ENCODE_URI_KEEPS,
        )
    };
    let per_segment = |keep: &str| {
        object
            .split('/')
            .map(|s| js_encode(s, keep))
            .collect::<Vec<_>>()
            .join("/")
    };
    let raw = format!("{base}/storage/v1/object/public/{object}");
    vec![
        // supabase-js: getPublicUrl(), with download and with a transform; createSignedUrl()
        // (the server's signedURL, then encodeURI); an authenticated URL.
        (url("object/public", ""), !cut),
        (url("object/public", "?download="), !cut),
        (url("object/public", "?download=report%20final.png"), !cut),
        (
            url("render/image/public", "?width=100&height=100&resize=cover"),
            !cut,
        ),
        (
            url(
                "object/sign",
                "?token=eyJhbGciOiJIUzI1NiJ9.eyJ1cmwiOiJ4In0.c2ln",
            ),
            !cut,
        ),
        (url("object/authenticated", ""), !cut),
        // What a browser shows and copies (the WHATWG serialization) of supabase-js's URL and of
        // the URL as the app concatenated it without encoding.
        (
            url::Url::parse(&url("object/public", ""))
                .unwrap()
                .to_string(),
            !cut,
        ),
        // (A browser also drops the spaces that end the unencoded URL: it names the object
        // without them.)
        (
            url::Url::parse(&raw).unwrap().to_string(),
            !cut && !key.ends_with(' '),
        ),
        // An app that escapes each segment itself, and a server-side builder (RFC 3986).
        (
            format!(
                "{base}/storage/v1/object/public/{}",
                per_segment(ENCODE_URI_COMPONENT_KEEPS)
            ),
            true,
        ),
        (
            format!(
                "{base}/storage/v1/object/public/{}",
                js_encode(&object, RFC3986_KEEPS)
            ),
            true,
        ),
    ]
}

/// A random object name Supabase Storage accepts: one to four segments of its allowed
/// characters, none of them empty, '.' or '..' (a browser resolves those before any server
/// sees the name, so no URL can name such an object).
fn storage_name(rng: &mut StdRng) -> String {
    let segment = |rng: &mut StdRng| loop {
        let s: String = (0..rng.random_range(1..9))
            .map(|_| STORAGE_NAME_CHARS[rng.random_range(0..STORAGE_NAME_CHARS.len())])
            .collect();
        if s != "." && s != ".." {
            return s;
        }
    };
    (0..rng.random_range(1..5))
        .map(|_| segment(rng))
        .collect::<Vec<_>>()
        .join("/")
}

/// The oracle: every URL a real client writes for an object must protect that object, in both
/// parsers. A saved job whose URL names its file in a spelling the readings miss would leave the
/// file unprotected against another job naming it plainly.
#[test]
fn every_spelling_a_client_writes_protects_its_object() {
    let seed: u64 = std::env::var("URL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("URL_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cases = Vec::new();
    for _ in 0..2_000 {
        let base = pick(
            &mut rng,
            &[
                "https://abcd.supabase.co",
                "http://127.0.0.1:54321",
                "http://storage:5000",
            ],
        );
        let bucket = pick(&mut rng, &["renders", "user-uploads", "b_1"]);
        let key = storage_name(&mut rng);
        for (spelling, names_it) in client_spellings(base, bucket, &key) {
            cases.push((spelling, format!("{bucket}/{key}"), names_it));
        }
    }
    let values: Vec<String> = cases.iter().map(|(v, _, _)| v.clone()).collect();
    let mut c = urls_db();
    let mut pl: Vec<Vec<String>> = Vec::new();
    for batch in values.chunks(BATCH) {
        let rows = c
            .query(
                "SELECT coalesce(orphan_cleanup.object_keys(u), '{}')
                 FROM unnest($1::text[]) WITH ORDINALITY AS t(u, n) ORDER BY n",
                &[&batch],
            )
            .unwrap();
        pl.extend(rows.iter().map(|r| r.get::<_, Vec<String>>(0)));
    }
    let mut missed = Vec::new();
    for ((spelling, object, names_it), pl_keys) in cases.iter().zip(&pl) {
        if !names_it {
            continue;
        }
        let rust_keys = protected_keys(spelling);
        if !rust_keys.contains(object) || !pl_keys.contains(object) {
            missed.push(format!(
                "{spelling:?} names {object:?}\n  rust:     {rust_keys:?}\n  pl/pgsql: {pl_keys:?}"
            ));
        }
    }
    let checked = cases.iter().filter(|c| c.2).count();
    println!(
        "{checked} spellings checked, {} of them escaped",
        values.iter().filter(|v| v.contains('%')).count()
    );
    assert!(checked > 12_000, "only {checked} spellings checked");
    assert!(
        missed.is_empty(),
        "{} of {checked} client spellings do not protect their object (URL_SEED={seed}); the first:\n{}",
        missed.len(),
        missed.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}
