//! `mtcp_agent::admin::parse_request` on arbitrary strings: one line from the agent's admin
//! endpoint. Parsing never panics; an accepted request serializes back to JSON that parses to
//! the same request, and the line's trailing newline (or surrounding whitespace) changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp_agent::admin::parse_request;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let got = parse_request(line);
    // (Error messages carry a column, so only compare outcomes.)
    assert_eq!(
        parse_request(&format!(" {line}\n")).ok(),
        got.clone().ok(),
        "whitespace changes the request"
    );
    match got {
        Ok(req) => {
            let json = serde_json::to_string(&req).expect("a request serializes");
            assert_eq!(
                parse_request(&json),
                Ok(req),
                "request does not round-trip through {json}"
            );
        }
        Err(e) => assert!(e.starts_with("bad request"), "{e}"),
    }
});
