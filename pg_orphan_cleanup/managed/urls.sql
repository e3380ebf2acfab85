-- The managed edition's URL functions: parse_output_url, object_key and redact_url in PL/pgSQL,
-- for databases that cannot load the extension's native library (hosted Supabase, RDS, Neon).
--
-- They are a second writing of the Rust crate object-url (object-url/src/lib.rs, lenient.rs,
-- redact.rs, policy.rs), rule for rule and message for message. A differential test
-- (tests/tests/url_parsers.rs) feeds both the same 100,000 generated values and the hostile
-- corpus and fails on any difference in accept or reject, host, bucket, key or message. Change
-- one parser, change the other.
--
-- Character classes follow Rust's: `char::is_control` is Unicode's Cc (U+0000-U+001F and
-- U+007F-U+009F; PostgreSQL text holds no U+0000), `char::is_whitespace` is Unicode's
-- White_Space. Lower-casing is ASCII only (lower() would also fold other letters). The database
-- encoding must be UTF8, as on every managed platform.

-- ASCII letters to lower case, nothing else.
CREATE FUNCTION orphan_cleanup._ascii_lower(s text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.translate(s, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');

-- A character as Rust's Debug prints it, for the ASCII characters messages quote: 'c', '\''.
CREATE FUNCTION orphan_cleanup._char_debug(c text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN CASE WHEN c = '''' THEN '''\''''' ELSE '''' || c || '''' END;

-- A code point as the messages print it: U+000A.
CREATE FUNCTION orphan_cleanup._code_point(code int) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 'U+' || pg_catalog.lpad(pg_catalog.upper(pg_catalog.to_hex(code)), 4, '0');

-- The bytes `s` stands for with its valid %XX escapes decoded (an invalid '%' stays as
-- written). A %00 becomes `nul`, or makes the answer NULL when `nul` is NULL.
CREATE FUNCTION orphan_cleanup._percent_bytes(s text, nul bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    parts text[] := pg_catalog.string_to_array(s, '%');
    bytes bytea := pg_catalog.convert_to(coalesce(parts[1], ''), 'UTF8');
    part text;
BEGIN
    FOR i IN 2 .. coalesce(pg_catalog.array_length(parts, 1), 0) LOOP
        part := parts[i];
        IF part ~ '^[0-9A-Fa-f]{2}' THEN
            IF pg_catalog.left(part, 2) = '00' THEN
                IF nul IS NULL THEN
                    RETURN NULL;
                END IF;
                bytes := bytes || nul;
            ELSE
                bytes := bytes || pg_catalog.decode(pg_catalog.left(part, 2), 'hex');
            END IF;
            bytes := bytes || pg_catalog.convert_to(pg_catalog.substr(part, 3), 'UTF8');
        ELSE
            bytes := bytes || pg_catalog.convert_to('%' || part, 'UTF8');
        END IF;
    END LOOP;
    RETURN bytes;
END
$$;

-- The bytes as UTF-8 text, or NULL when they are not UTF-8.
CREATE FUNCTION orphan_cleanup._utf8(bytes bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN pg_catalog.convert_from(bytes, 'UTF8');
EXCEPTION WHEN character_not_in_repertoire THEN
    RETURN NULL;
END
$$;

-- Escapes as UTF-8 reads them: group 1 a run of characters (ASCII but NUL; two, three and four
-- bytes with the second byte's range set by the first: no overlong form, no surrogate, nothing
-- past U+10FFFF), group 2 one byte that starts none (a NUL or a byte past ASCII). The two never
-- match the same text, so the longest match at each place is the one UTF-8 reads.
CREATE FUNCTION orphan_cleanup._utf8_escapes() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT '((?:%(?:0[1-9A-Fa-f]|[1-7][0-9A-Fa-f])'
               || '|%[Cc][2-9A-Fa-f]' || c || '|%[Dd][0-9A-Fa-f]' || c
               || '|%[Ee]0%[ABab][0-9A-Fa-f]' || c || '|%[Ee][1-9A-Ca-cEeFf]' || c || c || '|%[Ee][Dd]%[89][0-9A-Fa-f]' || c
               || '|%[Ff]0%(?:9[0-9A-Fa-f]|[ABab][0-9A-Fa-f])' || c || c || '|%[Ff][1-3]' || c || c || c
               || '|%[Ff]4%8[0-9A-Fa-f]' || c || c
               || ')+)|(%(?:00|[89A-Fa-f][0-9A-Fa-f]))'
        FROM (SELECT '%[89ABab][0-9A-Fa-f]' AS c) AS k);

-- A run of escapes (%XX%XX...) decoded as object-url's decode_once decodes it: every character
-- its bytes spell in UTF-8, and each byte that is no part of one (or a NUL) as written. One
-- regular expression pass (_utf8_escapes) tells the two apart by UTF-8's byte ranges: checking
-- each byte by converting it and catching the error (a subtransaction each) made a value with
-- thousands of bad bytes take a minute (the eleventh review).
CREATE FUNCTION orphan_cleanup._decode_run(run text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (SELECT pg_catalog.string_agg(
                   CASE WHEN t.m[1] IS NOT NULL
                        THEN pg_catalog.convert_from(pg_catalog.decode(pg_catalog.replace(t.m[1], '%', ''), 'hex'), 'UTF8')
                        ELSE t.m[2] END, '' ORDER BY t.n)
        FROM pg_catalog.regexp_matches(run, orphan_cleanup._utf8_escapes(), 'g') WITH ORDINALITY AS t(m, n));

-- The text percent-decoded once (object-url's decode_once): in each run of escapes, every
-- character its bytes spell in UTF-8 is decoded (_decode_run); everything else stays as written.
CREATE FUNCTION orphan_cleanup._decode_once(s text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF pg_catalog.strpos(s, '%') = 0 THEN
        RETURN s;
    END IF;
    -- One pass over the text, a run of escapes or a stretch without any at a time (the tenth
    -- review: cutting the rest of the text after each run made a value with many runs take
    -- seconds).
    RETURN (SELECT pg_catalog.string_agg(CASE WHEN t.m[1] IS NOT NULL THEN orphan_cleanup._decode_run(t.m[1])
                                              ELSE t.m[2] END, '' ORDER BY t.n)
            FROM pg_catalog.regexp_matches(s, '((?:%[0-9A-Fa-f]{2})+)|([^%]+|%)', 'g') WITH ORDINALITY AS t(m, n));
END
$$;

-- `host` or `host:port` of an authority, read narrowly (object-url's plain_authority): a host
-- name of ASCII letters, digits and hyphens in dot-separated labels, or a dotted-quad IPv4
-- address, and a port from 1 to 65535 written plainly, the scheme's default dropped.
CREATE FUNCTION orphan_cleanup._plain_authority(authority text, scheme text, OUT host text, OUT error text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    name text := pg_catalog.split_part(authority, ':', 1);
    port text := CASE WHEN pg_catalog.strpos(authority, ':') > 0
                      THEN pg_catalog.substr(authority, pg_catalog.strpos(authority, ':') + 1) END;
    unusual text := pg_catalog.format('host ''%s'' is not a plain host name or IPv4 address; IPv6 literals, internationalized (xn--) names, numeric shorthands such as 127.1 and empty or trailing labels are refused',
                                      pg_catalog.left(authority, 64));
    last text;
BEGIN
    IF name = '' THEN
        error := 'URL names no host';
        RETURN;
    END IF;
    IF name !~ '^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$' THEN
        error := unusual;
        RETURN;
    END IF;
    name := orphan_cleanup._ascii_lower(name);
    last := pg_catalog.regexp_replace(name, '^.*\.', '');
    IF last ~ '^[0-9]+$' OR last ~ '^0x[0-9a-f]*$' THEN
        -- Read as an IPv4 address by browsers: only the dotted quad is read the same by all.
        IF name !~ '^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}$'
           OR EXISTS (SELECT FROM pg_catalog.unnest(pg_catalog.string_to_array(name, '.')) AS o
                      WHERE o::int > 255) THEN
            error := unusual;
            RETURN;
        END IF;
    ELSIF name ~ '(^|\.)xn--' THEN
        error := unusual;
        RETURN;
    END IF;
    IF port IS NULL THEN
        host := name;
    ELSIF port !~ '^[1-9][0-9]{0,4}$' OR port::int > 65535 THEN
        error := pg_catalog.format('port ''%s'' is not a number from 1 to 65535 written without leading zeros',
                                   pg_catalog.left(port, 16));
    ELSIF (port = '443' AND scheme = 'https') OR (port = '80' AND scheme = 'http') THEN
        host := name;
    ELSE
        host := name || ':' || port;
    END IF;
END
$$;

-- One path segment of an object name (object-url's segment()): checked as written and, for
-- URLs (`decode`), after percent-decoding, so that %2e%2e is caught like '..'.
CREATE FUNCTION orphan_cleanup._url_segment(raw text, decode boolean, OUT segment text, OUT error text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    m text;
    bad text;
BEGIN
    IF raw IN ('.', '..') THEN
        error := 'has a ''.'' or ''..'' path segment';
        RETURN;
    END IF;
    segment := raw;
    IF decode THEN
        IF raw ~ '%(?![0-9A-Fa-f]{2})' THEN
            error := 'has a malformed percent-escape';
            RETURN;
        END IF;
        IF pg_catalog.strpos(raw, '%') > 0 THEN
            -- A %00 is read as U+0001 here: only its being a control character matters below.
            segment := orphan_cleanup._utf8(orphan_cleanup._percent_bytes(raw, '\x01'::bytea));
            IF segment IS NULL THEN
                error := 'object names are ASCII only; this one has non-ASCII characters';
                RETURN;
            END IF;
        END IF;
        IF segment IN ('.', '..') THEN
            error := 'has an encoded ''.'' or ''..'' path segment (%2e)';
            RETURN;
        END IF;
        IF pg_catalog.strpos(segment, '/') > 0 THEN
            error := 'has an encoded slash (%2F) inside a path segment';
            RETURN;
        END IF;
        -- A raw control character was refused before, so any here came from an escape: a byte
        -- below 0x20 or 0x7F, or U+0080-U+009F as %C2%80-%C2%9F. The first such escape is it.
        m := substring(raw FROM '(%[01][0-9A-Fa-f]|%7[Ff]|%[Cc]2%[89][0-9A-Fa-f])');
        IF m IS NOT NULL THEN
            error := pg_catalog.format('contains an encoded control character (%s, e.g. %%00)',
                orphan_cleanup._code_point(('x' || pg_catalog.lpad(pg_catalog.right(m, 2), 8, '0'))::bit(32)::int));
            RETURN;
        END IF;
        IF pg_catalog.strpos(segment, '\') > 0 THEN
            error := 'contains a backslash, which URL parsers silently turn into ''/''';
            RETURN;
        END IF;
        m := substring(raw FROM '%(3[0-9]|4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|2[DdEe]|5[Ff]|7[Ee])');
        IF m IS NOT NULL THEN
            error := pg_catalog.format('percent-encodes %s, a character no client ever encodes (a disguised name)',
                orphan_cleanup._char_debug(pg_catalog.chr(('x' || pg_catalog.lpad(m, 8, '0'))::bit(32)::int)));
            RETURN;
        END IF;
    END IF;
    IF segment ~ '[^\u0001-\u007f]' THEN
        error := 'object names are ASCII only; this one has non-ASCII characters';
        RETURN;
    END IF;
    IF segment ~ '^[\u0009-\u000d ]*$' THEN
        error := 'has a path segment of spaces only';
        RETURN;
    END IF;
    bad := substring(segment FROM '[^A-Za-z0-9_!.*''() &$=@;:+,?-]');
    IF bad IS NOT NULL THEN
        error := pg_catalog.format('character %s is not allowed in a storage object name',
                                   orphan_cleanup._char_debug(bad));
    END IF;
END
$$;

-- `(bucket, key)` from the path segments after the route (object-url's object_from_segments).
CREATE FUNCTION orphan_cleanup._url_object(segments text[], decode boolean, OUT bucket text, OUT key text, OUT error text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    n int := coalesce(pg_catalog.array_length(segments, 1), 0);
    s record;
BEGIN
    IF n = 0 OR segments[1] = '' THEN
        error := 'names no bucket';
        RETURN;
    END IF;
    IF n = 1 OR (n = 2 AND segments[2] = '') THEN
        error := 'names a bucket but no object key';
        RETURN;
    END IF;
    s := orphan_cleanup._url_segment(segments[1], decode);
    IF s.error IS NOT NULL THEN
        error := s.error;
        RETURN;
    END IF;
    bucket := s.segment;
    FOR i IN 2 .. n LOOP
        IF segments[i] = '' THEN
            error := CASE WHEN i = n THEN 'names a folder (ends with ''/''), not an object'
                          ELSE 'has an empty path segment (''//'')' END;
            bucket := NULL;
            RETURN;
        END IF;
        s := orphan_cleanup._url_segment(segments[i], decode);
        IF s.error IS NOT NULL THEN
            error := s.error;
            bucket := NULL;
            key := NULL;
            RETURN;
        END IF;
        key := CASE WHEN i = 2 THEN s.segment ELSE key || '/' || s.segment END;
    END LOOP;
    IF pg_catalog.octet_length(key) > 1024 THEN
        error := pg_catalog.format('object key is %s bytes long, longer than the 1024 bytes storage allows',
                                   pg_catalog.octet_length(key));
        bucket := NULL;
        key := NULL;
    END IF;
END
$$;

-- The canonical spelling of an object URL, the one nearly every job has (supabase-js's
-- getPublicUrl() and createSignedUrl() without a query): a plain host name or dotted-quad IPv4
-- address with an optional port (self-hosted and local projects: 127.0.0.1:54321,
-- storage:5000), route, bucket and key of unremarkable characters, no '%', '?', '#', ';', '..', final '.' or second route. For such a value the
-- strict reading is (host, bucket, key, form) as matched, and it is the only reading: the callers
-- answer it at once instead of running every rule (0.4 ms a value in PL/pgSQL, which every app
-- write of a job and every job a cycle reads paid). The differential test
-- (tests/tests/url_parsers.rs) holds these answers to the Rust parser's like all the others.
-- NULL for any other value, which the full rules then read.
CREATE FUNCTION orphan_cleanup._canonical_url(raw text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    scheme text;
    after text;
    host text;
    tail text;
    form text;
    bucket text;
BEGIN
    -- Matched without captures (7x faster in PostgreSQL's engine), then cut at its slashes.
    -- A name ending in '.' has a second reading (the URL at the end of a sentence).
    IF pg_catalog.octet_length(raw) > 1024 OR pg_catalog.right(raw, 1) = '.'
       OR raw !~ '^https?://(?:(?:[a-z0-9-]+\.)*[a-z][a-z0-9-]*|(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3})(?::[1-9][0-9]{0,4})?/storage/v1/object/(?:public|authenticated|sign)/[A-Za-z0-9_-][A-Za-z0-9_.-]*/[A-Za-z0-9_-][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$' THEN
        RETURN NULL;
    END IF;
    scheme := pg_catalog.split_part(raw, ':', 1);
    after := pg_catalog.substr(raw, pg_catalog.length(scheme) + 4);
    host := pg_catalog.split_part(after, '/', 1);
    tail := pg_catalog.substr(after, pg_catalog.length(host) + pg_catalog.length('/storage/v1/object/') + 1);
    form := pg_catalog.split_part(tail, '/', 1);
    bucket := pg_catalog.split_part(tail, '/', 2);
    tail := pg_catalog.substr(tail, pg_catalog.length(form) + pg_catalog.length(bucket) + 3);
    -- A port past 65535 is refused, and the scheme's own port is dropped, by the full rules.
    IF pg_catalog.strpos(host, ':') > 0
       AND (pg_catalog.split_part(host, ':', 2)::int > 65535
            OR pg_catalog.split_part(host, ':', 2) = CASE scheme WHEN 'https' THEN '443' ELSE '80' END) THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.strpos(host, 'xn--') > 0
       OR pg_catalog.strpos(orphan_cleanup._ascii_lower(bucket || '/' || tail), 'storage') > 0 THEN
        RETURN NULL;
    END IF;
    -- {scheme, host, form segment, bucket, key}
    RETURN ARRAY[scheme, host, form, bucket, tail];
END
$$;

-- The strict reading (object-url's parse()): the one object a stored output URL or bare
-- `bucket/key` names, accepted only when that needs no interpretation.
CREATE FUNCTION orphan_cleanup._parse_url(raw text, OUT host text, OUT bucket text, OUT object_path text, OUT form text, OUT error text)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    ws constant text := '[\u0009-\u000d \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]';
    c text;
    scheme text;
    after text;
    authority text;
    path text;
    segments text[];
    consumed int;
    a record;
    o record;
BEGIN
    IF raw = '' THEN
        error := 'empty value';
        RETURN;
    END IF;
    segments := orphan_cleanup._canonical_url(raw);
    IF segments IS NOT NULL THEN
        host := segments[2];
        bucket := segments[4];
        object_path := segments[5];
        form := CASE WHEN segments[3] = 'sign' THEN 'signed' ELSE segments[3] END;
        RETURN;
    END IF;
    IF pg_catalog.octet_length(raw) > 4096 THEN
        error := pg_catalog.format('value is %s bytes long, longer than the 4096 bytes a storage URL can be',
                                   pg_catalog.octet_length(raw));
        RETURN;
    END IF;
    c := substring(raw FROM '[\u0001-\u001f\u007f-\u009f]');
    IF c IS NOT NULL THEN
        error := pg_catalog.format('contains a control character (%s); a URL that was cut or pasted wrongly',
                                   orphan_cleanup._code_point(pg_catalog.ascii(c)));
        RETURN;
    END IF;
    IF pg_catalog.strpos(raw, '\') > 0 THEN
        error := 'contains a backslash, which URL parsers silently turn into ''/''';
        RETURN;
    END IF;
    IF raw ~ ('^' || ws) OR raw ~ (ws || '$') THEN
        error := 'contains whitespace outside the object key';
        RETURN;
    END IF;
    IF pg_catalog.left(raw, 1) = '/' THEN
        error := 'starts with ''/'': neither a full URL nor a bare bucket/key';
        RETURN;
    END IF;

    IF pg_catalog.strpos(pg_catalog.split_part(raw, '/', 1), ':') = 0 THEN
        -- A bare bucket/key, taken literally.
        o := orphan_cleanup._url_object(pg_catalog.string_to_array(raw, '/'), false);
        IF o.error IS NOT NULL THEN
            error := o.error;
        ELSE
            bucket := o.bucket;
            object_path := o.key;
            form := 'bare';
        END IF;
        RETURN;
    END IF;

    scheme := pg_catalog.split_part(raw, ':', 1);
    IF orphan_cleanup._ascii_lower(scheme) NOT IN ('http', 'https') THEN
        error := pg_catalog.format('scheme ''%s'' is not http or https', pg_catalog.left(scheme, 32));
        RETURN;
    END IF;
    IF raw ~ ws THEN
        error := 'contains whitespace outside the object key';
        RETURN;
    END IF;
    after := pg_catalog.substr(raw, pg_catalog.length(scheme) + 2);
    IF pg_catalog.left(after, 2) <> '//' THEN
        error := 'not a Supabase Storage object URL (expected /storage/v1/object/{public|authenticated|sign}/<bucket>/<key> or /storage/v1/render/image/...)';
        RETURN;
    END IF;
    after := pg_catalog.substr(after, 3);
    authority := substring(after FROM '^[^/?#]*');
    IF pg_catalog.strpos(authority, '@') > 0 THEN
        error := 'URL carries a user name or password';
        RETURN;
    END IF;
    a := orphan_cleanup._plain_authority(authority, orphan_cleanup._ascii_lower(scheme));
    IF a.error IS NOT NULL THEN
        error := a.error;
        RETURN;
    END IF;
    path := substring(pg_catalog.substr(after, pg_catalog.length(authority) + 1) FROM '^[^?#]*');
    IF pg_catalog.left(path, 1) = '/' THEN
        segments := pg_catalog.string_to_array(pg_catalog.substr(path, 2), '/');
        consumed := CASE
            WHEN segments[1:4] = '{storage,v1,object,public}' THEN 4
            WHEN segments[1:4] = '{storage,v1,object,authenticated}' THEN 4
            WHEN segments[1:4] = '{storage,v1,object,sign}' THEN 4
            WHEN segments[1:5] IN ('{storage,v1,render,image,public}', '{storage,v1,render,image,authenticated}',
                                   '{storage,v1,render,image,sign}') THEN 5
        END;
    END IF;
    IF consumed IS NULL OR pg_catalog.cardinality(segments) <= consumed THEN
        error := 'not a Supabase Storage object URL (expected /storage/v1/object/{public|authenticated|sign}/<bucket>/<key> or /storage/v1/render/image/...)';
        RETURN;
    END IF;
    o := orphan_cleanup._url_object(segments[consumed + 1:], true);
    IF o.error IS NOT NULL THEN
        error := o.error;
        RETURN;
    END IF;
    host := a.host;
    bucket := o.bucket;
    object_path := o.key;
    form := CASE WHEN consumed = 5 THEN 'render_image'
                 WHEN segments[4] = 'sign' THEN 'signed'
                 ELSE segments[4] END;
END
$$;

-- Parses a stored output URL into the object it names, without judging whether it may be
-- deleted. `error` says why a value names no single object.
CREATE FUNCTION orphan_cleanup.parse_output_url(url text)
RETURNS TABLE (host text, bucket text, object_path text, form text, error text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on
BEGIN ATOMIC
    SELECT p.host, p.bucket, p.object_path, p.form,
           CASE WHEN url IS NULL THEN 'output_url is NULL' ELSE p.error END
    FROM orphan_cleanup._parse_url(url) AS p;
END;

-- The lenient reading's path segments (object-url's normalize()) of a path already
-- percent-decoded (_decode_once: the caller decodes a path once for every reading of it), with
-- empty and '.' segments dropped and '..' resolved.
CREATE FUNCTION orphan_cleanup._normalized_segments(decoded text, keep_empty boolean) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    text_ text := decoded;
    part text;
    out_ text[] := '{}';
    top int := 0;
BEGIN
    IF keep_empty AND pg_catalog.left(text_, 1) IN ('/', '\') THEN
        text_ := pg_catalog.substr(text_, 2);
    END IF;
    -- A stack of segments with its top kept apart: '..' moves the top down in place (cutting
    -- the array copied it, and a path of thousands of segments took seconds: the eleventh review).
    FOREACH part IN ARRAY pg_catalog.regexp_split_to_array(text_, '[/\\]') LOOP
        IF part = '.' OR (part = '' AND NOT keep_empty) THEN
            CONTINUE;
        ELSIF part = '..' THEN
            top := greatest(top - 1, 0);
        ELSE
            top := top + 1;
            out_[top] := part;
        END IF;
    END LOOP;
    RETURN pg_catalog.array_remove(out_[1:top], '');
END
$$;

-- `bucket/key` of the object a URL names, or could reasonably name, or NULL (object-url's
-- protected_key). The one identity of an object for protection: where the strict parser
-- accepts a value both agree; where it refuses one, this still finds the object a user kept.
--
-- SECURITY DEFINER, unlike the extension's (which is C and calls nothing): the app's roles run it
-- whenever they write a job, to maintain the recommended index on it, and they have no USAGE on
-- this schema, so the helpers it calls must run as their owner. It parses text and reads no
-- table. The entry points (parse_output_url, check_output_url, object_key, redact_url) all pin
-- search_path, unlike the extension's C functions: the helpers' cached plans are kept per
-- search_path, and a session calling two entry points under two paths would re-plan them on
-- every call (3x slower). They also pin standard_conforming_strings: PL/pgSQL reads a function's
-- text with the caller's setting, and with it off the backslashes in these functions' literals
-- would not parse (an app session with it off could not write a job).
CREATE FUNCTION orphan_cleanup.object_key(url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS $$
DECLARE
    p record;
BEGIN
    p := orphan_cleanup._parse_url(url);
    IF p.error IS NULL THEN
        RETURN p.bucket || '/' || p.object_path;
    END IF;
    RETURN (orphan_cleanup._lenient_keys(url))[1];
END
$$;

-- Every `bucket/key` a URL could name, sorted (bytewise, as object-url sorts), or NULL when it
-- names none (object-url's protected_keys): the strict reading and the lenient ones, which a
-- saved job all protects. SECURITY DEFINER and pinned like object_key(): the app's roles run it
-- to maintain the recommended index on the jobs table.
CREATE FUNCTION orphan_cleanup.object_keys(url text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS $$
DECLARE
    stripped text := pg_catalog.translate(url, E'\t\n\r', '');
    keys text[] := orphan_cleanup._canonical_url(url);
    p record;
    t text;
BEGIN
    IF keys IS NOT NULL THEN
        RETURN ARRAY[keys[4] || '/' || keys[5]];
    END IF;
    -- The strict reading of the value, as written and without a browser's tabs and newlines;
    -- then the lenient readings of every text _texts_read() finds (none past its bound), each
    -- text once however many ways lead to it.
    keys := '{}';
    FOREACH t IN ARRAY ARRAY[url, stripped] LOOP
        p := orphan_cleanup._parse_url(t);
        IF p.error IS NULL THEN
            keys := keys || (p.bucket || '/' || p.object_path);
        END IF;
    END LOOP;
    FOR t IN SELECT DISTINCT r.t FROM pg_catalog.unnest((orphan_cleanup._texts_read(url)).texts) AS r(t) LOOP
        keys := keys || orphan_cleanup._lenient_keys(t);
    END LOOP;
    RETURN (SELECT pg_catalog.array_agg(d.k ORDER BY d.k)
            FROM (SELECT DISTINCT k COLLATE "C" AS k FROM pg_catalog.unnest(keys) AS k) AS d);
END
$$;

-- One layer of a value's JSON escapes of ASCII punctuation, space and control characters taken
-- off (object-url's unescape_json): '\/', '\\', '\"', '\n', '\r', '\t', '\b', '\f', and '\u00XX'
-- of punctuation or space ('\u002B', '\u0026'). Letters, digits and '%' stay as written.
CREATE FUNCTION orphan_cleanup._unescape_json(value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
BEGIN
    IF pg_catalog.strpos(value, '\') = 0 THEN
        RETURN value;
    END IF;
    -- One pass over the text, an escape or a stretch without any at a time (the tenth review:
    -- cutting the rest of the text after each backslash made a value with many take seconds).
    RETURN (SELECT pg_catalog.string_agg(orphan_cleanup._unescaped(t.m[1]), '' ORDER BY t.n)
            FROM pg_catalog.regexp_matches(value, '(\\u00[0-9A-Fa-f]{2}|\\.|\\|[^\\]+)', 'g') WITH ORDINALITY AS t(m, n));
END
$$;

-- One piece of _unescape_json()'s pass: a JSON escape it takes off, as the character it stands
-- for; anything else as it is.
CREATE FUNCTION orphan_cleanup._unescaped(piece text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    c int;
BEGIN
    IF pg_catalog.left(piece, 1) <> '\' OR pg_catalog.length(piece) = 1 THEN
        RETURN piece;
    ELSIF pg_catalog.length(piece) = 2 THEN
        RETURN CASE WHEN pg_catalog.substr(piece, 2, 1) IN ('/', '\', '"', 'n', 'r', 't', 'b', 'f')
                    THEN pg_catalog.translate(pg_catalog.substr(piece, 2, 1), 'nrtbf', E'\n\r\t\b\f')
                    ELSE piece END;
    END IF;
    c := ('x' || pg_catalog.substr(piece, 5, 2))::bit(8)::int;
    IF c = 32 OR (c BETWEEN 33 AND 126 AND pg_catalog.chr(c) !~ '[A-Za-z0-9%]') THEN
        RETURN pg_catalog.chr(c);
    END IF;
    RETURN piece;
END
$$;

-- The most bytes of text the lenient readings read for one value (object-url's MAX_READING).
CREATE FUNCTION orphan_cleanup._max_reading() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 32768;

-- The texts the lenient readings read as values (object-url's texts_read): each of the value's
-- layer texts, and the URLs embedded in each; and how many bytes that reads (each layer's length
-- and that of each distinct cut of each embedded URL), or NULL texts and -1 past _max_reading().
CREATE FUNCTION orphan_cleanup._texts_read(value text, OUT texts text[], OUT size integer)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    layer text;
    e record;
BEGIN
    texts := '{}';
    size := 0;
    FOREACH layer IN ARRAY (orphan_cleanup._layer_texts(value)).texts LOOP
        size := size + pg_catalog.octet_length(layer);
        IF size > orphan_cleanup._max_reading() THEN
            texts := NULL;
            size := -1;
            RETURN;
        END IF;
        e := orphan_cleanup._embedded_readings(layer, orphan_cleanup._max_reading() - size);
        IF e.texts IS NULL THEN
            texts := NULL;
            size := -1;
            RETURN;
        END IF;
        size := size + e.size;
        texts := texts || e.texts || layer;
    END LOOP;
END
$$;

-- How many bytes the lenient readings of a value read, or -1 past _max_reading() (when only its
-- strict reading is read): what _unread_url() holds against that bound (object-url's
-- reading_size).
CREATE FUNCTION orphan_cleanup._reading_size(url text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (orphan_cleanup._texts_read(url)).size;

-- The texts read as values, whose embedded URLs are read too (object-url's layer_texts): the
-- layers of the value as written and of the value without a browser's tabs and newlines, each
-- also without them, each once, in that order; and whether either is wrapped deeper than the
-- readings go.
CREATE FUNCTION orphan_cleanup._layer_texts(value text, OUT texts text[], OUT deeper boolean)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    v text;
    l record;
    layer text;
    t text;
BEGIN
    texts := '{}';
    deeper := false;
    FOREACH v IN ARRAY ARRAY[value, pg_catalog.translate(value, E'\t\n\r', '')] LOOP
        l := orphan_cleanup._layers(v);
        deeper := deeper OR l.deeper;
        FOREACH layer IN ARRAY l.layers LOOP
            FOREACH t IN ARRAY ARRAY[layer, pg_catalog.translate(layer, E'\t\n\r', '')] LOOP
                IF NOT t = ANY (texts) THEN
                    texts := texts || t;
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;
END
$$;

-- The layers of a value whose storage routes are read (object-url's layers): the value as
-- written, then, while taking off one more layer of JSON's escapes and of percent-encoding
-- changes it, the value with that layer taken off, 6 more at most; and whether it is wrapped
-- deeper still (_unread_url refuses such a value). Where a step takes off both, the value with
-- only the JSON escapes taken off is a layer too: a URL that only JSON reveals keeps its own %3F
-- or %20 there.
CREATE FUNCTION orphan_cleanup._layers(value text, OUT layers text[], OUT deeper boolean)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    last_ text := value;
    json_ text;
    next_ text;
    steps int := 0;
BEGIN
    layers := ARRAY[value];
    deeper := false;
    LOOP
        json_ := orphan_cleanup._unescape_json(last_);
        next_ := orphan_cleanup._decode_once(json_);
        EXIT WHEN next_ = last_;
        IF steps >= 6 THEN
            deeper := true;
            EXIT;
        END IF;
        IF json_ <> last_ AND json_ <> next_ THEN
            layers := layers || json_;
        END IF;
        layers := layers || next_;
        last_ := next_;
        steps := steps + 1;
    END LOOP;
END
$$;

-- Where _embedded_readings() starts a reading (object-url's MARKERS): a storage route's first
-- segment and a URL's scheme, as written and percent-encoded once, in ASCII lower case.
CREATE FUNCTION orphan_cleanup._markers() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY['storage/', 'storage%2f', 'http://', 'https://', 'http%3a%2f%2f', 'https%3a%2f%2f'];

-- How many markers a layer holds (object-url's routes_in). No marker overlaps another or itself,
-- so each is counted on its own.
CREATE FUNCTION orphan_cleanup._routes_in(layer text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (SELECT pg_catalog.sum((pg_catalog.length(l) - pg_catalog.length(pg_catalog.replace(l, m, ''))) / pg_catalog.length(m))::integer
        FROM orphan_cleanup._ascii_lower(layer) AS l, pg_catalog.unnest(orphan_cleanup._markers()) AS m);

-- The most markers (storage routes and URLs) any of a value's layer texts holds, or -1 when it
-- is wrapped deeper than the readings go (object-url's route_count): what _unread_url() holds
-- against the readings' limits.
CREATE FUNCTION orphan_cleanup._route_count(url text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    l record := orphan_cleanup._layer_texts(url);
BEGIN
    IF l.deeper THEN
        RETURN -1;
    END IF;
    RETURN (SELECT coalesce(pg_catalog.max(orphan_cleanup._routes_in(t)), 0) FROM pg_catalog.unnest(l.texts) AS t);
END
$$;
-- The texts of URLs embedded anywhere in a value, for _texts_read() to read as values
-- (object-url's embedded_readings): passed to an image proxy encoded once, inside markdown, in
-- text, or in a list. The ends are found in the value as written (an encoded %20, %26 or %3F in
-- a name is still part of it): each reading starts at a marker (_markers: a storage route, a
-- URL's scheme) and runs to the first hard stop (a quote, angle bracket, backquote, control
-- character, or one of {}[]^|: no URL or object name holds them unencoded); it is read in the cuts of that span (_cuts), each as it is, without one trailing
-- ')', ']' or quote, without all of them, without trailing punctuation too, and cut at its last
-- '@' when no '/' follows it (imgproxy's @webp); each of those as it is, decoded once, decoded
-- with '+' as a space, and with markdown's backslash escapes taken off. Every marker gets a pass
-- of its own. At most 16 markers of a value up to 64 KiB (past either, _unread_url refuses the
-- save). size is the sum of the lengths of each marker's distinct variants; past room, texts is
-- NULL.
CREATE FUNCTION orphan_cleanup._embedded_readings(value text, room integer, OUT texts text[], OUT size integer)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    lower_ text;
    pos int := 1;
    markers constant text[] := orphan_cleanup._markers();
    m text;
    f int;
    start_ int;
    route_len int;
    cut text;
    variant text;
    seen text[];
BEGIN
    texts := '{}';
    size := 0;
    IF pg_catalog.octet_length(value) > 65536 THEN
        RETURN;
    END IF;
    lower_ := orphan_cleanup._ascii_lower(value);
    FOR i IN 1 .. 16 LOOP
        start_ := NULL;
        FOREACH m IN ARRAY markers LOOP
            f := pg_catalog.strpos(pg_catalog.substr(lower_, pos), m);
            IF f > 0 AND (start_ IS NULL OR pos - 1 + f < start_) THEN
                start_ := pos - 1 + f;
                route_len := pg_catalog.length(m);
            END IF;
        END LOOP;
        EXIT WHEN start_ IS NULL;
        seen := '{}';
        FOREACH cut IN ARRAY orphan_cleanup._cuts(substring(pg_catalog.substr(value, start_) FROM '^[^]"<>`\t\n\r\x0b\x0c{}[^|]*')) LOOP
            FOREACH variant IN ARRAY ARRAY[cut,
                                           CASE WHEN pg_catalog.right(cut, 1) IN (')', ']', '''')
                                                THEN pg_catalog.left(cut, -1) ELSE cut END,
                                           pg_catalog.rtrim(cut, ')]'''),
                                           pg_catalog.rtrim(cut, ')]''.,;:!?'),
                                           coalesce(substring(cut FROM '^(.*)@[^/]*$'), cut)] LOOP
                -- Most values have one route and no wrapping: each variant is read once.
                CONTINUE WHEN variant = ANY (seen);
                seen := seen || variant;
                size := size + pg_catalog.octet_length(variant);
                IF size > room THEN
                    texts := NULL;
                    RETURN;
                END IF;
                texts := texts || variant || orphan_cleanup._decode_once(variant);
                -- In a query (an image proxy's ?url=), a form encoder writes a space as '+'.
                IF pg_catalog.strpos(variant, '+') > 0 THEN
                    texts := texts || orphan_cleanup._decode_once(pg_catalog.replace(variant, '+', '%20'));
                END IF;
                -- Markdown's backslash escapes (CommonMark: before ASCII punctuation; CSS: a space).
                IF pg_catalog.strpos(variant, '\') > 0 THEN
                    texts := texts || pg_catalog.regexp_replace(variant, '\\([ !-/:-@[-`{-~])', '\1', 'g');
                END IF;
            END LOOP;
        END LOOP;
        pos := start_ + route_len;
    END LOOP;
END
$$;

-- Where a URL embedded in text may end, in a span that runs to the first hard stop (object-url's
-- cuts): the whole span; cut at the first space, at the first '&', at the first of either; and
-- each of those cut at the first ',' or ')', at the first ')' alone, at the ')' that closes no
-- '(' before it (object-url's balanced_cut: the longest match of the expression below), and,
-- where it holds a backslash, at the first ',' or ')' that no backslash escapes (markdown).
CREATE FUNCTION orphan_cleanup._cuts(span text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    firsts constant text[] := ARRAY[span, substring(span FROM '^[^ ]*'), substring(span FROM '^[^&]*'),
                                    substring(span FROM '^[^& ]*')];
    cuts text[] := firsts;
    cut text;
BEGIN
    FOREACH cut IN ARRAY firsts LOOP
        cuts := cuts || substring(cut FROM '^[^,)]*') || substring(cut FROM '^[^)]*')
                     || substring(cut FROM '^(?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*');
        IF pg_catalog.strpos(cut, '\') > 0 THEN
            cuts := cuts || substring(cut FROM '^(?:[^,)\\]|\\.)*');
        END IF;
    END LOOP;
    RETURN cuts;
END
$$;

-- The lenient readings of a value, in order (object-url's lenient_keys): for URLs (and values
-- that contain a storage route) the object after the route, or, for a URL with no route, its path
-- as bucket/key; for bare values and s3://bucket/key, the value as a path, then without its query
-- or fragment. Each path is also read cut at a ';', and with '..' resolved over empty segments.
CREATE FUNCTION orphan_cleanup._lenient_keys(url text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    junk constant text := '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"''<>`]';
    space constant text := '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]';
    trimmed text := pg_catalog.regexp_replace(url, '^' || junk || '+|' || junk || '+$', '', 'g');
    kept text := pg_catalog.regexp_replace(url, '^' || space || '+|' || space || '+$', '', 'g');
    unwrapped text;
    keys text[];
BEGIN
    -- Also read with only the whitespace trimmed when that keeps a quote or bracket at an end:
    -- a quote (') is a character of object names, and a name ending in one must not lose it.
    IF kept = trimmed THEN
        RETURN orphan_cleanup._lenient_keys_of(trimmed);
    END IF;
    keys := orphan_cleanup._lenient_keys_of(trimmed) || orphan_cleanup._lenient_keys_of(kept);
    -- And with one wrapping pair taken off ("renders/it's'"), the rest kept.
    IF pg_catalog.length(kept) >= 2
       AND (pg_catalog.left(kept, 1), pg_catalog.right(kept, 1)) IN (('"', '"'), ('''', ''''), ('<', '>'), ('`', '`')) THEN
        unwrapped := pg_catalog.regexp_replace(pg_catalog.substr(kept, 2, pg_catalog.length(kept) - 2),
                                           '^' || space || '+|' || space || '+$', '', 'g');
        IF unwrapped <> trimmed AND unwrapped <> kept THEN
            keys := keys || orphan_cleanup._lenient_keys_of(unwrapped);
        END IF;
    END IF;
    RETURN keys;
END
$$;

-- _lenient_keys() of a value already trimmed.
CREATE FUNCTION orphan_cleanup._lenient_keys_of(value text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET standard_conforming_strings = on AS $$
DECLARE
    first text;
    scheme text;
    rest text;
    without_query text;
    is_url boolean := false;
    has_route boolean;
    paths text[];
    path text;
    p text;
    read_ text[];
    keep_empty boolean;
    keys text[] := '{}';
    k text;
    decoded text;
    segments text[];
BEGIN
    value := pg_catalog.replace(value, '\', '/');
    first := pg_catalog.split_part(value, '/', 1);
    IF first ~ '^.+:[0-9]+$' THEN
        -- host:port/...: a URL that lost its scheme, not a scheme named after the host.
        rest := orphan_cleanup._after_authority(value);
        is_url := true;
    ELSIF pg_catalog.strpos(first, ':') > 0 THEN
        scheme := orphan_cleanup._ascii_lower(pg_catalog.split_part(value, ':', 1));
        rest := pg_catalog.substr(value, pg_catalog.strpos(value, ':') + 1);
        IF scheme IN ('http', 'https') THEN
            rest := orphan_cleanup._after_authority(rest);
            is_url := true;
        ELSIF scheme = 's3' THEN
            rest := pg_catalog.ltrim(rest, '/');
        ELSE
            RETURN keys;
        END IF;
    ELSIF pg_catalog.left(value, 2) = '//' THEN
        rest := orphan_cleanup._after_authority(pg_catalog.substr(value, 3));
        is_url := true;
    ELSE
        rest := value;
    END IF;
    has_route := is_url OR pg_catalog.strpos(orphan_cleanup._ascii_lower(rest), 'storage/v1/') > 0;
    without_query := substring(rest FROM '^[^?#]*');
    IF has_route THEN
        -- A '?' in a name: the path read with what follows, when that is no query of parameters.
        IF without_query <> rest AND pg_catalog.strpos(pg_catalog.substr(rest, pg_catalog.length(without_query) + 1), '=') = 0 THEN
            paths := ARRAY[without_query, rest];
        ELSE
            paths := ARRAY[without_query];
        END IF;
    ELSIF without_query <> rest THEN
        paths := ARRAY[rest, without_query];
    ELSE
        paths := ARRAY[rest];
    END IF;
    IF pg_catalog.strpos(without_query, ';') > 0 THEN
        paths := paths || pg_catalog.split_part(without_query, ';', 1);
    END IF;
    FOREACH path IN ARRAY paths LOOP
        decoded := NULL;
        FOREACH keep_empty IN ARRAY ARRAY[false, true] LOOP
            -- '..' after an encoded slash goes up one segment as written in a browser: such a
            -- path is also read with its dots resolved so first.
            read_ := ARRAY[path];
            IF pg_catalog.octet_length(path) <= 65536 AND orphan_cleanup._ascii_lower(path) ~ '%(2f|5c)' THEN
                read_ := read_ || orphan_cleanup._dots_resolved(path, keep_empty);
            END IF;
            FOREACH p IN ARRAY read_ LOOP
                -- Decoded and split once for every route it is read with (and the path as
                -- written decoded once for both ways of counting empty segments); a path too
                -- long to read names nothing.
                segments := NULL;
                IF pg_catalog.octet_length(p) <= 65536 THEN
                    IF p = path AND decoded IS NULL THEN
                        decoded := orphan_cleanup._decode_once(path);
                    END IF;
                    segments := orphan_cleanup._normalized_segments(
                        CASE WHEN p = path THEN decoded ELSE orphan_cleanup._decode_once(p) END, keep_empty);
                END IF;
                IF NOT has_route THEN
                    keys := keys || orphan_cleanup._key_of_path(segments, 'none');
                    -- And a route that only resolving dot segments spells (storage/./v1/...);
                    -- none without 'storage' in the path, or an escape that could spell it.
                    IF pg_catalog.strpos(p, '%') > 0 OR pg_catalog.strpos(orphan_cleanup._ascii_lower(p), 'storage') > 0 THEN
                        keys := keys || orphan_cleanup._key_of_path(segments, 'gateway');
                    END IF;
                    CONTINUE;
                END IF;
                k := orphan_cleanup._key_of_path(segments, 'gateway');
                IF k IS NOT NULL THEN
                    keys := keys || k;
                ELSIF is_url THEN
                    -- A URL with no storage/v1: the storage server's own (self-hosted, behind no
                    -- gateway), and a CDN's path.
                    keys := keys || orphan_cleanup._key_of_path(segments, 'server')
                                 || orphan_cleanup._key_of_path(segments, 'none');
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;
    RETURN pg_catalog.array_remove(keys, NULL);
END
$$;

-- The path with its dot segments resolved over the segments as written, before any decoding, as
-- a browser resolves them (object-url's dots_resolved): '.' and '%2E' are dots, '..', '.%2E',
-- '%2E.' and '%2E%2E' (in any case) go up one; with keep_empty, an empty segment counts.
CREATE FUNCTION orphan_cleanup._dots_resolved(path text, keep_empty boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    part text;
    out_ text[] := '{}';
    top int := 0;
BEGIN
    IF keep_empty AND pg_catalog.left(path, 1) IN ('/', '\') THEN
        path := pg_catalog.substr(path, 2);
    END IF;
    -- A stack with its top kept apart, as in _normalized_segments.
    FOREACH part IN ARRAY pg_catalog.regexp_split_to_array(path, '[/\\]') LOOP
        CASE
            WHEN part = '' AND NOT keep_empty THEN NULL;
            WHEN orphan_cleanup._ascii_lower(part) IN ('.', '%2e') THEN NULL;
            WHEN orphan_cleanup._ascii_lower(part) IN ('..', '.%2e', '%2e.', '%2e%2e') THEN
                top := greatest(top - 1, 0);
            ELSE
                top := top + 1;
                out_[top] := part;
        END CASE;
    END LOOP;
    RETURN pg_catalog.array_to_string(out_[1:top], '/');
END
$$;

-- The object a path names, after the storage route when it has one (object-url's key_of_path),
-- from its segments (_normalized_segments; NULL for a path longer than 65,536 bytes, which is not
-- read); a key longer than any object name storage allows (1,024 bytes), or a bucket as long,
-- names none.
CREATE FUNCTION orphan_cleanup._key_of_path(segments text[], route_at text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    route text[];
    start int;
    skip int;
    n int := pg_catalog.cardinality(segments);
BEGIN
    IF route_at = 'gateway' THEN
        SELECT i INTO start FROM pg_catalog.generate_series(1, n - 1) AS i
        WHERE orphan_cleanup._ascii_lower(segments[i]) = 'storage'
          AND orphan_cleanup._ascii_lower(segments[i + 1]) = 'v1'
        ORDER BY i LIMIT 1;
        IF start IS NULL THEN
            RETURN NULL;
        END IF;
        start := start + 2;
    ELSIF route_at = 'server' THEN
        start := 1;
    END IF;
    IF start IS NOT NULL THEN
        route := ARRAY(SELECT orphan_cleanup._ascii_lower(s) FROM pg_catalog.unnest(segments[start:]) AS s);
        skip := CASE
            WHEN pg_catalog.cardinality(route) >= 5 AND route[1] = 'object' AND route[2] = 'info'
                 AND route[3] IN ('public', 'authenticated') THEN 3
            WHEN pg_catalog.cardinality(route) >= 5 AND route[1:3] = '{object,upload,sign}' THEN 3
            WHEN pg_catalog.cardinality(route) >= 4 AND route[1] = 'object'
                 AND route[2] IN ('public', 'authenticated', 'sign', 'info') THEN 2
            WHEN pg_catalog.cardinality(route) >= 3 AND route[1] = 'object' THEN 1
            WHEN pg_catalog.cardinality(route) >= 5 AND route[1:2] = '{render,image}'
                 AND route[3] IN ('public', 'authenticated', 'sign') THEN 3
            WHEN pg_catalog.cardinality(route) >= 3 AND route[1] = 's3' THEN 1
        END;
        IF skip IS NULL THEN
            RETURN NULL;
        END IF;
        segments := segments[start + skip:];
    END IF;
    IF pg_catalog.cardinality(segments) < 2
       OR pg_catalog.octet_length(segments[1]) > 1024
       OR pg_catalog.octet_length(pg_catalog.array_to_string(segments[2:], '/')) > 1024 THEN
        RETURN NULL;
    END IF;
    RETURN pg_catalog.array_to_string(segments, '/');
END
$$;

-- What follows a URL's authority, from the first '/', '?' or '#' on (after leading slashes).
CREATE FUNCTION orphan_cleanup._after_authority(rest text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN coalesce(substring(pg_catalog.ltrim(rest, '/') FROM '[/?#].*$'), '');

-- The URL with signed-URL tokens and other credentials replaced by REDACTED (object-url's
-- redact()).
CREATE FUNCTION orphan_cleanup.redact_url(url text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS $$
DECLARE
    base text;
    rest text;
    query text;
    fragment text;
    pairs text[];
BEGIN
    IF pg_catalog.strpos(url, '?') = 0 THEN
        RETURN url;
    END IF;
    base := pg_catalog.split_part(url, '?', 1);
    rest := pg_catalog.substr(url, pg_catalog.length(base) + 2);
    query := pg_catalog.split_part(rest, '#', 1);
    IF pg_catalog.strpos(rest, '#') > 0 THEN
        fragment := pg_catalog.substr(rest, pg_catalog.length(query) + 2);
    END IF;
    pairs := ARRAY(
        SELECT CASE WHEN pg_catalog.strpos(pair, '=') > 0
                         AND orphan_cleanup._ascii_lower(pg_catalog.split_part(pair, '=', 1))
                             IN ('token', 'apikey', 'access_token', 'signature', 'x-amz-signature', 'sig')
                    THEN pg_catalog.split_part(pair, '=', 1) || '=REDACTED'
                    ELSE pair END
        FROM pg_catalog.unnest(pg_catalog.string_to_array(query, '&')) WITH ORDINALITY AS q(pair, n)
        ORDER BY n);
    RETURN base || '?' || pg_catalog.array_to_string(pairs, '&')
        || coalesce('#' || fragment, '');
END
$$;

-- Why the allow-lists refuse an object, or NULL (object-url's Policy::check): `hosts` as
-- _plain_authority spells them; a host-less (bare) object needs no host.
CREATE FUNCTION orphan_cleanup._url_refusal(host text, bucket text, object_path text,
                                            buckets text[], prefixes text[], hosts text[])
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    p text;
BEGIN
    IF host IS NOT NULL AND pg_catalog.cardinality(hosts) = 0 THEN
        RETURN pg_catalog.format('host "%s" is not an allowed host of this project; the host allow-list is empty, so only bare bucket/key values are accepted', host);
    ELSIF host IS NOT NULL AND (host = ANY (hosts)) IS NOT TRUE THEN   -- a NULL entry matches nothing
        RETURN pg_catalog.format('host "%s" is not in the host allow-list (it may be another project''s)', host);
    ELSIF pg_catalog.cardinality(buckets) = 0 THEN
        RETURN pg_catalog.format('no bucket is allowed (the bucket allow-list is empty); add "%s" to it to allow deletes there', bucket);
    ELSIF (bucket = ANY (buckets)) IS NOT TRUE THEN
        RETURN pg_catalog.format('bucket "%s" is not in the bucket allow-list', bucket);
    ELSIF pg_catalog.cardinality(prefixes) > 0 THEN
        FOREACH p IN ARRAY prefixes LOOP
            IF pg_catalog.starts_with(object_path, p) THEN
                RETURN NULL;
            END IF;
        END LOOP;
        RETURN pg_catalog.format('key "%s" is outside the allowed prefixes', object_path);
    END IF;
    RETURN NULL;
END
$$;
