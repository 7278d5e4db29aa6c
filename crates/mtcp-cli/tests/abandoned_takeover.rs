//! Lazy mode (decision 73): a destination the agent gave up on — silent past the agent's
//! bound, as on a lossy path — finishes the takeover anyway and resumes to nobody. The origin
//! forgot the connection when it handed it over, so every other candidate is refused; the
//! agent's next round asks that destination again, which re-attaches its own copy. Before,
//! the connection was lost (found by `lab_pg` at 5 % loss). The download's SHA-256 is checked.

mod common;

use common::*;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::time::Duration;

#[test]
fn a_takeover_the_agent_gave_up_on_is_re_attached_by_the_next_round() {
    let dir = TempDir::new("abandoned-takeover");
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: "lazy".into(),
        // s2 finishes its first takeover but holds its RESUMED until the agent has left (given
        // up on it as silent), and writes it then, to nobody.
        server_args_for: vec![(
            "s2".into(),
            [
                "--hold-resumed-ms",
                "20000",
                "--hold-resumed-until-left",
                "--hold-resumed-once",
            ]
            .map(String::from)
            .to_vec(),
        )],
        ..Default::default()
    };
    let mut lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    download_through(&dir, &mut lc, 32 << 20, 73, |lc| {
        let mut mv = move_to(lc, "s2");
        assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
    });
    let s2 = log(&dir, "s2");
    assert!(
        s2.contains("test hook: the agent left"),
        "the agent did not give s2 up: the case was not played"
    );
    assert!(
        s2.contains("re-attaching it here"),
        "s2 did not re-attach its own copy"
    );
    assert!(log(&dir, "agent").contains("to=s2"), "not moved to s2");
}
