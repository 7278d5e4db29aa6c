//! `mtcp_repair::nfnl::acks` on arbitrary bytes: the kernel's replies to the fence's netlink
//! changes. Reading never panics, and every acknowledgement it returns was inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(acks) = mtcp_repair::nfnl::acks(data) {
        // Each ACK needs at least a header and an error code (20 bytes).
        assert!(acks.len() * 20 <= data.len());
        for a in acks {
            if let Some(t) = a.text {
                assert!(t.len() <= data.len() * 3);
            }
        }
    }
});
