//! `mtcp_repair::TcpState::decode` on arbitrary bytes: a moved connection's TCP state as it
//! crosses between processes. Decoding never panics; an accepted state passes the same checks
//! `restore` makes and round-trips through `encode` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtcp_repair::TcpState;

fuzz_target!(|data: &[u8]| {
    if let Ok(st) = TcpState::decode(data) {
        assert!(st.unsent as usize <= st.send_queue.len());
        assert!(st.send_queue.len() <= mtcp_repair::MAX_QUEUE);
        assert_eq!(st.local.is_ipv4(), st.remote.is_ipv4());
        assert_eq!(
            TcpState::decode(&st.encode()).expect("re-encoded state decodes"),
            st
        );
    }
});
