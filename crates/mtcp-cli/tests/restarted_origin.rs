//! Eager mode: the serving server is killed and restarted before the destination's FETCH
//! reaches it (here a test hook delays every takeover; in `lab_pg` it was loss on a 20 ms
//! link). The restarted server answers that it has no such connection; the destination takes
//! the connection from the replica at the dead server's backup, as for an unreachable origin.
//! Before, that answer ended the move and the connection (found by `lab_pg` at 5 % loss).
//! The download's SHA-256 is checked.

mod common;

use common::*;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::time::Duration;

#[test]
fn an_origin_restarted_empty_sends_the_destination_to_the_replica() {
    let dir = TempDir::new("restarted-origin");
    let delay = ["--delay-takeover-ms", "1500"].map(String::from).to_vec();
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: "eager".into(),
        server_args_for: vec![("s2".into(), delay.clone()), ("s3".into(), delay)],
        ..Default::default()
    };
    let mut lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    download_through(&dir, &mut lc, 32 << 20, 74, |lc| {
        lc.kill("s1").expect("kill s1");
        // Back before the delayed takeover FETCHes from it.
        std::thread::sleep(Duration::from_millis(300));
        lc.restart_server("s1").expect("restart s1");
    });
    let taker = format!("{}\n{}", log(&dir, "s2"), log(&dir, "s3"));
    assert!(
        taker.contains("has no connection") && taker.contains("taking the connection over from a replica"),
        "the restarted origin's answer did not send the destination to the replica: the case was not played"
    );
}
