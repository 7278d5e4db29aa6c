//! Lazy mode (decision 73): a destination the agent gave up on — silent past the agent's
//! bound, as on a lossy path — finishes the takeover anyway and resumes to nobody. The origin
//! forgot the connection when it handed it over, so every other candidate is refused; the
//! agent's next round asks that destination again, which re-attaches its own copy. Before,
//! the connection was lost (found by `lab_pg` at 5 % loss). The download's SHA-256 is checked.

mod common;

use common::*;
use mtcp_harness::local::{strip_ansi, LocalCluster, LocalOptions};
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZE: u64 = 32 << 20;

fn log(dir: &TempDir, name: &str) -> String {
    let raw = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
    raw.lines().map(strip_ansi).collect::<Vec<_>>().join("\n")
}

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
    let lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    let want = file(&dir, "big.bin", SIZE, 73);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "big.bin", "4M", &out);
    wait_for("download progress", Duration::from_secs(60), || {
        len(&out) > SIZE / 4
    });
    assert_eq!(serving(&lc), "s1", "the download starts on s1");
    let mut mv = Command::new(&lc.exe)
        .args(["migrate", "--agent", &lc.agent_admin, "--all", "--to", "s2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mtcp migrate");
    assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
    let ok = wait_child(&mut curl, "curl", Duration::from_secs(90));
    let agent = log(&dir, "agent");
    let tail: Vec<&str> = agent.lines().rev().take(30).collect();
    assert!(
        ok,
        "curl failed\n--- agent log tail (newest first):\n{tail:#?}"
    );
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "the bytes differ"
    );
    let s2 = log(&dir, "s2");
    assert!(
        s2.contains("test hook: the agent left"),
        "the agent did not give s2 up: the case was not played"
    );
    assert!(
        s2.contains("re-attaching it here"),
        "s2 did not re-attach its own copy"
    );
    assert!(agent.contains("to=s2"), "not moved to s2");
}
