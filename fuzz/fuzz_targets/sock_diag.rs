//! `mtcp_repair::sockdiag::parse` on arbitrary bytes: the kernel's replies to a socket-table dump.
//! Reading never panics, and every socket it returns had a whole message in the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((rows, _done)) = mtcp_repair::sockdiag::parse(data, 1) {
        // A netlink header (16 bytes) and an inet_diag_msg (72) per socket.
        assert!(rows.len() * 88 <= data.len());
    }
});
