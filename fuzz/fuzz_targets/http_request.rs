//! The HTTP request parser of `mtcp-httpd` (`http::parse`) and its `Range` parser
//! (`http::parse_range`), on arbitrary bytes from the client.
//!
//! `parse`: never panics; the outcome never depends on how the input was split into reads (a
//! prefix is `Partial` or gives the whole input's answer); a complete head is self-contained,
//! at most `MAX_HEAD` bytes, and its path is normalized and cannot escape the root.
//! `parse_range` (the whole input taken as a header value): a range it returns is well formed,
//! reads back from its canonical spelling, and resolves inside any file.
//!
//! Input: `[cut byte][request bytes...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp_httpd::fuzzing::{
    normalize_path, parse, parse_range, resolve_range, Parse, RangeSpec, Resolved,
};
use mtcp_httpd::{MAX_HEAD, MAX_TARGET};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, buf)) = data.split_first() else {
        return;
    };
    check_parse(buf, cut);
    check_range(buf);
});

fn check_parse(buf: &[u8], cut: u8) {
    let whole = parse(buf);
    // Any prefix, and in particular one cut at a fraction of the input.
    let cut = buf.len() * cut as usize / 255;
    match parse(&buf[..cut]) {
        Parse::Partial => {}
        other => assert_eq!(other, whole, "prefix of {cut} bytes decides differently"),
    }
    match &whole {
        Parse::Partial => assert!(
            buf.len() < MAX_HEAD,
            "Partial with a full head's worth buffered"
        ),
        Parse::Fatal(_) => {}
        Parse::Complete { head_len, request } => {
            assert!(
                *head_len > 0 && *head_len <= buf.len().min(MAX_HEAD),
                "head_len {head_len}"
            );
            assert_eq!(buf[head_len - 1], b'\n', "head does not end a line");
            assert_eq!(
                parse(&buf[..*head_len]),
                whole,
                "the head alone parses differently"
            );
            if let Ok(p) = &request.path {
                assert!(p.len() <= MAX_TARGET, "path of {} bytes", p.len());
                assert!(!p.starts_with('/') && !p.contains('\0'), "path {p:?}");
                assert!(
                    p.split('/').all(|s| s != ".." && s != "."),
                    "path {p:?} not normalized"
                );
                assert_eq!(normalize_path(p).as_deref(), Some(p.as_str()));
            }
            if let Some(RangeSpec::FromTo(a, b)) = request.range {
                assert!(a <= b);
            }
        }
    }
}

fn check_range(value: &[u8]) {
    let Some(spec) = parse_range(value) else {
        return;
    };
    let canonical = match spec {
        RangeSpec::FromTo(a, b) => {
            assert!(a <= b, "{spec:?}");
            format!("bytes={a}-{b}")
        }
        RangeSpec::From(a) => format!("bytes={a}-"),
        RangeSpec::Suffix(n) => format!("bytes=-{n}"),
    };
    assert_eq!(
        parse_range(canonical.as_bytes()),
        Some(spec),
        "{canonical} reads back differently"
    );
    for len in [0, 1, 2, 10, value.len() as u64, u64::MAX - 1, u64::MAX] {
        match resolve_range(Some(spec), len) {
            Resolved::Partial { start, end } => {
                assert!(
                    start < end && end <= len,
                    "{spec:?} of {len} bytes resolved to {start}..{end}"
                )
            }
            Resolved::Unsatisfiable => {}
            Resolved::Full => panic!("a range resolved to the whole file"),
        }
    }
}
