//! `mtcp_proto::wire::parse_preamble` on the first 6 bytes, then (when the magic is right) the
//! frames after it, as every channel reads them.
//!
//! Input: `[6 preamble bytes][limit selector][3 piece sizes][wire bytes...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp_proto::wire::{parse_preamble, preamble, WireError, MAGIC, PREAMBLE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((p, rest)) = data.split_first_chunk::<PREAMBLE_LEN>() else {
        return;
    };
    match parse_preamble(p) {
        Ok(version) => {
            assert_eq!(p[..4], MAGIC);
            assert_eq!(&preamble(version), p, "preamble does not round-trip");
            let (max, cuts, wire) = mtcp_fuzz::split_input(rest);
            mtcp_fuzz::check_stream(max, wire, &cuts);
        }
        Err(e) => {
            assert_eq!(e, WireError::BadMagic);
            assert_ne!(p[..4], MAGIC, "right magic refused");
        }
    }
});
