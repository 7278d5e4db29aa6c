//! `mtcp_proto::wire::FrameDecoder::decode` on arbitrary bytes, fed whole and in arbitrary
//! pieces, under a small or a large frame limit. See `mtcp_fuzz::check_stream` for the checks.
//!
//! Input: `[limit selector][3 piece sizes][wire bytes...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (max, cuts, wire) = mtcp_fuzz::split_input(data);
    mtcp_fuzz::check_stream(max, wire, &cuts);
});
