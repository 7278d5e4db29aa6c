//! curl downloads ≥100 MiB through the agent while its one connection migrates three times: a
//! drain, a manual migration, and a reset of the session's TCP connection while the origin
//! process lives. The SHA-256 of what arrived must equal the file's.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Resets the server side of every established TCP connection on `port` (`ss -K`), so the agent
/// sees its session reset while the server process keeps running. Needs root.
fn reset_sessions(port: u16) -> Result<(), String> {
    let out = Command::new("ss")
        .args([
            "-K",
            "-t",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .map_err(|e| format!("ss: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // ss prints a header plus one line per destroyed socket.
    if !out.status.success() || text.lines().count() < 2 {
        return Err(format!(
            "ss -K destroyed nothing (status {}, output {text:?}, stderr {:?})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

#[test]
fn curl_download_survives_drain_manual_and_reset() {
    assert!(
        mtcp_cli::local::have("curl"),
        "curl is required for this test (scripts/test.sh installs it)"
    );
    let dir = TempDir::new("download");
    let size: u64 = 128 << 20;
    let want = file(&dir, "big.bin", size, 42);
    let lc = cluster(&dir, 3);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "big.bin", "40M", &out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = Instant::now();
    let mut step = 0;
    let root = is_root();
    let status = loop {
        if let Some(st) = curl.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "download took too long"
        );
        let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        if step == 0 && got > size / 5 {
            let s = serving(&lc);
            rt.block_on(mtcp_cli::demo::drain(&lc, &s)).expect("drain");
            step = 1;
        } else if step == 1 && got > size * 2 / 5 {
            let r = lc
                .mtcp(&["migrate", "--agent", &lc.agent_admin, "--all"])
                .expect("manual migration");
            assert!(r.contains("->"), "{r}");
            step = 2;
        } else if step == 2 && got > size * 3 / 5 {
            let s = serving(&lc);
            if root {
                reset_sessions(data_port(&lc, &s)).expect("reset the session");
            } else {
                eprintln!("!!! NOT ROOT: cannot reset the session with `ss -K`; this part of the test is NOT run !!!");
            }
            step = 3;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(
        step, 3,
        "the download finished before every migration was triggered"
    );
    let got = mtcp_cli::local::sha256_file(&out).unwrap();
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
