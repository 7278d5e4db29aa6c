//! Transparent mode on one host: in a network namespace of its own (created with `unshare` for
//! this test's thread, gone with it), the agent intercepts `curl http://198.18.0.10/…` and
//! `wget` — no proxy, no flag — and their connections survive a `kill -9` of the serving server
//! with equal SHA-256. The agent's nftables table is removed when it exits (SIGTERM), and a
//! table left by a `kill -9`ed agent is replaced by the next agent on that port. Needs root.

mod common;

use common::*;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::process::{Command, Stdio};
use std::time::Duration;

const SERVICE: &str = "198.18.0.10:80";

fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tables() -> String {
    sh("nft", &["list", "tables"])
}

fn body() {
    // This thread (and every process and thread it starts) gets a network namespace of its
    // own; it disappears when they are all gone.
    // SAFETY: unshare(2) on the calling thread; nothing else shares its fs state here.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    sh("ip", &["link", "set", "lo", "up"]);
    sh("ip", &["addr", "add", "198.18.0.10/32", "dev", "lo"]);
    let dir = TempDir::new("transparent");
    let size: u64 = 48 << 20;
    let want = file(&dir, "f.bin", size, 21);
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: "eager".into(),
        agent_args: vec!["--transparent".into(), "--service".into(), SERVICE.into()],
        ..Default::default()
    };
    let mut lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    let port = lc.agent_listen.rsplit(':').next().unwrap().to_string();
    let table = format!("mtcp_agent_{port}");
    assert!(tables().contains(&table), "the agent installed no table");

    // Plain curl and wget to the service address: intercepted, then the serving server dies.
    let url = format!("http://{SERVICE}/f.bin");
    let (out_c, out_w) = (dir.path().join("c.bin"), dir.path().join("w.bin"));
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail", "--limit-rate", "20M", "-o"])
        .arg(&out_c)
        .arg(&url)
        .stdin(Stdio::null())
        .spawn()
        .expect("curl");
    let mut wget = Command::new("wget")
        .args(["-q", "--tries=1", "--limit-rate", "20M", "-O"])
        .arg(&out_w)
        .arg(&url)
        .stdin(Stdio::null())
        .spawn()
        .expect("wget");
    wait_for("both downloads under way", Duration::from_secs(30), || {
        len(&out_c).min(len(&out_w)) > size / 3
    });
    let s = serving(&lc);
    lc.kill(&s).expect("kill -9 the serving server");
    assert!(curl.wait().unwrap().success(), "curl failed");
    assert!(wget.wait().unwrap().success(), "wget failed");
    assert_eq!(
        mtcp_harness::local::sha256_file(&out_c).unwrap(),
        want,
        "curl's bytes"
    );
    assert_eq!(
        mtcp_harness::local::sha256_file(&out_w).unwrap(),
        want,
        "wget's bytes"
    );
    let moved = lc
        .status()
        .unwrap()
        .into_iter()
        .filter(|c| c.bytes_down > 0)
        .all(|c| c.migrations == 1);
    assert!(moved, "both connections moved once: {:?}", lc.status());
    let log = std::fs::read_to_string(dir.path().join("s2.log")).unwrap_or_default()
        + &std::fs::read_to_string(dir.path().join("s1.log")).unwrap_or_default();
    assert!(log.contains("new connection"), "no HELLO reached a server");

    // A crashed agent leaves its table; the next agent on the port replaces it, and removes it
    // when it exits.
    lc.kill("agent").unwrap();
    assert!(tables().contains(&table), "kill -9 cannot remove the table");
    let servers: Vec<String> = lc.servers.iter().map(|s| s.data.clone()).collect();
    let mut agent = Command::new(exe())
        .args(["agent", "--connect", &servers.join(","), "--listen"])
        .arg(&lc.agent_listen)
        .args(["--transparent", "--service", SERVICE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart the agent");
    wait_for("the new agent", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&lc.agent_listen).is_ok()
    });
    assert_eq!(
        tables().matches(&table).count(),
        1,
        "the stale table was not replaced"
    );
    let got = sh(
        "curl",
        &[
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &url,
        ],
    );
    assert_eq!(
        got.trim(),
        size.to_string(),
        "download through the new agent"
    );
    // SAFETY: kill(2) on the agent process this test started.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    let st = agent.wait().unwrap();
    assert!(st.success(), "agent exit on SIGTERM: {st}");
    assert!(
        !tables().contains(&table),
        "the agent left its table behind: {}",
        tables()
    );
}

#[test]
fn curl_and_wget_are_intercepted_and_survive_a_crash_and_the_table_is_cleaned() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: transparent mode (nftables, network namespaces) NOT tested !!!");
        return;
    }
    assert!(
        mtcp_harness::local::have("nft"),
        "nft is required (scripts/test.sh installs nftables)"
    );
    // A thread of its own: the namespace is the thread's (and its children's) only.
    let t = std::thread::spawn(body);
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}
