//! curl downloads ≥100 MiB through the agent while its one connection migrates three times: a
//! drain, a manual migration, and a reset of the session's TCP connection while the origin
//! process lives. The SHA-256 of what arrived must equal the file's.

mod common;

use common::*;

#[test]
fn curl_download_survives_drain_manual_and_reset() {
    assert!(
        mtcp_harness::local::have("curl"),
        "curl is required for this test (scripts/test.sh installs it)"
    );
    let dir = TempDir::new("download");
    let size: u64 = 128 << 20;
    let want = file(&dir, "big.bin", size, 42);
    let lc = cluster(&dir, 3);
    let out = dir.path().join("got.bin");
    let root = is_root();
    let (status, step) = download_with_moves(&lc, "big.bin", size, "40M", &out, root);
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(
        step, 3,
        "the download finished before every migration was triggered"
    );
    let got = mtcp_harness::local::sha256_file(&out).unwrap();
    assert_eq!(got, want, "downloaded bytes differ from the file");
    let conns = lc.status().unwrap();
    let events: Vec<_> = conns
        .iter()
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .collect();
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("drain")), "{reasons:?}");
    assert!(reasons.contains(&"manual"), "{reasons:?}");
    if root {
        assert!(
            reasons.iter().any(|r| r.contains("session with")),
            "{reasons:?}"
        );
        assert!(events.len() >= 3, "{reasons:?}");
    }
}
