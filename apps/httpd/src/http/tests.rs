//! Tests of request parsing, ranges, paths and response heads.

use super::*;
use proptest::prelude::*;

fn complete(buf: &[u8]) -> (usize, Request) {
    match parse(buf) {
        Parse::Complete { head_len, request } => (head_len, request),
        other => panic!("expected a complete request, got {other:?}"),
    }
}

#[test]
fn parses_a_simple_get() {
    let buf = b"GET /a/b.txt HTTP/1.1\r\nHost: x\r\n\r\nGET";
    let (n, r) = complete(buf);
    assert_eq!(n, buf.len() - 3);
    assert_eq!(r.method, Some(Method::Get));
    assert_eq!(r.path, Ok("a/b.txt".to_string()));
    assert_eq!(r.connection, Connection::Persistent);
    assert_eq!(r.range, None);
    assert_eq!(r.body_len, 0);
}

#[test]
fn connection_semantics() {
    let c = |s: &str| complete(s.as_bytes()).1.connection;
    assert_eq!(
        c("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"),
        Connection::Close
    );
    assert_eq!(
        c("GET / HTTP/1.1\r\nConnection: te, close\r\n\r\n"),
        Connection::Close
    );
    assert_eq!(c("GET / HTTP/1.0\r\n\r\n"), Connection::Close);
    assert_eq!(
        c("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        Connection::KeepAlive
    );
    assert_eq!(
        c("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"),
        Connection::Persistent
    );
}

#[test]
fn partial_and_fatal() {
    assert_eq!(parse(b""), Parse::Partial);
    assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parse::Partial);
    assert_eq!(
        parse(b"\x01\x02 garbage\r\n\r\n"),
        Parse::Fatal(Status::BadRequest)
    );
    assert_eq!(
        parse(b"GET / HTTP/2.0\r\n\r\n"),
        Parse::Fatal(Status::BadRequest)
    );
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.resize(MAX_HEAD + 10, b'a');
    assert_eq!(parse(&big), Parse::Fatal(Status::HeaderFieldsTooLarge));
    let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert_eq!(
        parse(req.as_bytes()),
        Parse::Fatal(Status::HeaderFieldsTooLarge)
    );
    let te = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(parse(te), Parse::Fatal(Status::NotImplemented));
    let cl = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    assert_eq!(parse(cl), Parse::Fatal(Status::BadRequest));
    assert_eq!(
        parse(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
        Parse::Fatal(Status::BadRequest)
    );
}

#[test]
fn body_length_and_methods() {
    let (_, r) = complete(b"POST /x HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
    assert_eq!(r.method, None);
    assert_eq!(r.body_len, 12);
    assert_eq!(
        complete(b"HEAD /x HTTP/1.1\r\n\r\n").1.method,
        Some(Method::Head)
    );
}

#[test]
fn targets() {
    let p = |t: &str| target_path(t);
    assert_eq!(p("/"), Ok(String::new()));
    assert_eq!(p("/a//./b?q=1#f"), Ok("a/b".into()));
    assert_eq!(p("/a%20b/%41"), Ok("a b/A".into()));
    assert_eq!(p("http://host:80/x/y"), Ok("x/y".into()));
    assert_eq!(p("/../etc/passwd"), Err(Status::BadRequest));
    assert_eq!(p("/a/%2e%2e/%2E%2E/x"), Err(Status::BadRequest));
    assert_eq!(p("/a/..%2fb"), Err(Status::BadRequest));
    assert_eq!(p("/a%00"), Err(Status::BadRequest));
    assert_eq!(p("/a%zz"), Err(Status::BadRequest));
    assert_eq!(p("/a%ff"), Err(Status::BadRequest));
    assert_eq!(p("*"), Err(Status::BadRequest));
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
    assert_eq!(complete(long.as_bytes()).1.path, Err(Status::UriTooLong));
}

#[test]
fn ranges() {
    assert_eq!(parse_range(b"bytes=0-9"), Some(RangeSpec::FromTo(0, 9)));
    assert_eq!(parse_range(b" Bytes = 5- "), Some(RangeSpec::From(5)));
    assert_eq!(parse_range(b"bytes=-7"), Some(RangeSpec::Suffix(7)));
    assert_eq!(parse_range(b"bytes=9-0"), None);
    assert_eq!(parse_range(b"bytes=0-1,3-4"), None);
    assert_eq!(parse_range(b"items=0-1"), None);
    assert_eq!(parse_range(b"bytes=-"), None);
    assert_eq!(parse_range(b"bytes=99999999999999999999999-"), None);
    assert_eq!(resolve_range(None, 10), Resolved::Full);
    let r = |s, len| resolve_range(parse_range(s), len);
    assert_eq!(r(b"bytes=2-4", 10), Resolved::Partial { start: 2, end: 5 });
    assert_eq!(
        r(b"bytes=2-400", 10),
        Resolved::Partial { start: 2, end: 10 }
    );
    assert_eq!(r(b"bytes=9-", 10), Resolved::Partial { start: 9, end: 10 });
    assert_eq!(r(b"bytes=10-", 10), Resolved::Unsatisfiable);
    assert_eq!(r(b"bytes=-3", 10), Resolved::Partial { start: 7, end: 10 });
    assert_eq!(r(b"bytes=-30", 10), Resolved::Partial { start: 0, end: 10 });
    assert_eq!(r(b"bytes=-0", 10), Resolved::Unsatisfiable);
    assert_eq!(r(b"bytes=0-", 0), Resolved::Unsatisfiable);
    assert_eq!(
        r(b"bytes=0-18446744073709551615", 10),
        Resolved::Partial { start: 0, end: 10 }
    );
}

#[test]
fn head_rendering_is_fixed() {
    let head = Head {
        status: Status::PartialContent,
        content_type: content_type("x/y.BIN"),
        content_length: 3,
        content_range: Some(ContentRange::Bytes {
            start: 2,
            end: 5,
            total: 10,
        }),
        connection: Connection::Close,
    };
    let mut out = Vec::new();
    head.render(&mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 206 Partial Content\r\nServer: mtcp-httpd\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 3\r\n\
         Accept-Ranges: bytes\r\nContent-Range: bytes 2-4/10\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(content_type("index.HTML"), "text/html; charset=utf-8");
    assert_eq!(content_type(".hidden"), "application/octet-stream");
}

proptest! {
    /// A resolved partial range always lies inside the file and is non-empty, and matches a
    /// direct reading of RFC 9110.
    #[test]
    fn resolved_ranges_are_inside_the_file(a in 0u64..200, b in 0u64..200, len in 0u64..150) {
        for spec in [RangeSpec::FromTo(a.min(b), a.max(b)), RangeSpec::From(a), RangeSpec::Suffix(a)] {
            match resolve_range(Some(spec), len) {
                Resolved::Partial { start, end } => {
                    prop_assert!(start < end && end <= len);
                    let expect = match spec {
                        RangeSpec::FromTo(x, y) => (x, (y + 1).min(len)),
                        RangeSpec::From(x) => (x, len),
                        RangeSpec::Suffix(n) => (len - n.min(len), len),
                    };
                    prop_assert_eq!((start, end), expect);
                }
                Resolved::Unsatisfiable => {
                    let unsat = match spec {
                        RangeSpec::FromTo(x, _) | RangeSpec::From(x) => x >= len,
                        RangeSpec::Suffix(n) => n == 0 || len == 0,
                    };
                    prop_assert!(unsat);
                }
                Resolved::Full => prop_assert!(false, "a range never resolves to Full"),
            }
        }
    }

    /// The parse outcome for any prefix-closed split is the same as for the whole input:
    /// a prefix either is Partial or gives the same answer as the full buffer.
    #[test]
    fn prefixes_never_contradict_the_whole(extra in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..200) {
        let mut buf = b"GET /f HTTP/1.1\r\nRange: bytes=1-2\r\n".to_vec();
        buf.extend_from_slice(&extra);
        buf.extend_from_slice(b"\r\n\r\n");
        let whole = parse(&buf);
        let cut = cut.min(buf.len());
        match parse(&buf[..cut]) {
            Parse::Partial => {}
            other => prop_assert_eq!(other, whole),
        }
    }

    #[test]
    fn normalized_paths_never_escape(s in "[a-z./%]{0,40}") {
        if let Some(p) = normalize_path(&s) {
            prop_assert!(!p.starts_with('/'));
            prop_assert!(p.is_empty() || p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
            prop_assert_eq!(normalize_path(&p), Some(p.clone()));
        }
    }
}
