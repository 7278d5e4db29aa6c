//! Issue 14, fast-path admission: a session that is not a local agent of a trusted uid cannot
//! hand a server a TCP connection (ADOPT), and a trusted one can hand over only a connection to
//! its own listening address that it held (no remote address of its choosing), with no output
//! sent and at most 4 MiB of input; nor can another user hand a server a socket through its
//! local hand-over socket (decision 56). Each planted
//! ADOPT is refused by name and nothing is planted, while a live download through a fast-path
//! agent (the client's connection itself served by the server) arrives byte-exact. Needs root
//! (TCP_REPAIR, nftables, and `setpriv` to run the probe as uid 65534); without it the test
//! says so loudly and checks nothing.

mod common;

use common::*;
use mtcp::framed;
use mtcp::proto::wire::Msg;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where nothing listens; listed under `fast_path` all the same.
const UNUSED_LISTED: &str = "127.0.0.1:9";
/// The client address every planted connection names.
const PLANTED_REMOTE: &str = "127.0.0.9:4444";

fn planted(local: &str, send: usize, recv: usize) -> mtcp_repair::TcpState {
    mtcp_repair::TcpState {
        local: local.parse().unwrap(),
        remote: PLANTED_REMOTE.parse().unwrap(),
        send_seq: 1000 + send as u32,
        recv_seq: 5000 + recv as u32,
        send_queue: vec![b's'; send],
        unsent: 0,
        recv_queue: vec![b'r'; recv],
        mss: 1460,
        options: 0,
        snd_wscale: 0,
        rcv_wscale: 0,
        timestamp: 0,
        window: mtcp_repair::Window {
            snd_wl1: 5000,
            snd_wnd: 65535,
            max_window: 65535,
            rcv_wnd: 65535,
            rcv_wup: 5000,
        },
    }
}

/// HELLO with the fast-path capability on `addr`, then (after a WELCOME) `adopt`; the answer
/// that ends the exchange, as text.
async fn try_adopt(addr: &str, adopt: &[u8]) -> String {
    try_adopt_msg(addr, Msg::Adopt(adopt.to_vec())).await
}

/// As [`try_adopt`], with any message in ADOPT's place.
async fn try_adopt_msg(addr: &str, adopt: Msg) -> String {
    let (mut r, mut w) = fast_path_hello(addr).await;
    let m = r.next_msg(Duration::from_secs(10)).await;
    let m = match m {
        Ok(Msg::Welcome(_)) => {
            if framed::write_msg(&mut w, &adopt).await.is_err() {
                return "closed before ADOPT".into();
            }
            r.next_msg(Duration::from_secs(10)).await
        }
        other => other,
    };
    match m {
        Ok(Msg::Refused { code, reason }) => format!("REFUSED {code:?}: {reason}"),
        Ok(other) => format!("ANSWERED {other:?}"),
        Err(e) => format!("ERROR {e}"),
    }
}

/// The probe run as another user: `setpriv` starts this test binary with this test selected.
#[test]
#[ignore = "run by a_planted_adopt_is_refused_and_nothing_is_planted as uid 65534"]
fn adopt_probe_child() {
    let (Ok(addr), Ok(local)) = (
        std::env::var("MTCP_PROBE_DATA"),
        std::env::var("MTCP_PROBE_LOCAL"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = rt.block_on(try_adopt(&addr, &planted(&local, 0, 100).encode()));
    println!("PROBE-ANSWER {a}");
}

/// Runs [`adopt_probe_child`] as uid 65534 (from a copy of this binary it may execute).
fn probe_as_nobody(dir: &std::path::Path, data: &str, local: &str) -> String {
    let bin = dir.join("probe-nobody");
    std::fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args([
            "--ignored",
            "--exact",
            "adopt_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MTCP_PROBE_DATA", data)
        .env("MTCP_PROBE_LOCAL", local)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    wait_child(&mut c, "the probe as uid 65534", Duration::from_secs(30));
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.split_once("PROBE-ANSWER ").map(|(_, a)| a.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "the probe printed no answer: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// As uid 65534, hands a socket (one end of a fresh pair) under a made-up nonce to the
/// hand-over socket of the server whose data address is `data`; what became of it, as text.
fn handoff_as_nobody(data: &str) -> String {
    const SEND: &str = "import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect('\\0' + sys.argv[1])
a, b = socket.socketpair()
s.settimeout(10)
try:
    # The server may have closed it already, before this is sent (it checks the sender first).
    socket.send_fds(s, [b'n' * 16], [a.fileno()])
    print('CLOSED' if s.recv(16) == b'' else 'ANSWERED')
except (ConnectionResetError, BrokenPipeError) as e:
    print('CLOSED (' + type(e).__name__ + ')')
";
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", SEND])
        .arg(format!("mtcp-handoff/{data}"))
        .stdin(Stdio::null())
        .output()
        .expect("setpriv python3");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A client program, killed (by PID) if the test ends before it does.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sockets of this namespace whose peer is [`PLANTED_REMOTE`] (`ss`), one per line.
fn planted_sockets() -> String {
    let out = Command::new("ss")
        .args(["-Htan", "dst", PLANTED_REMOTE])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_adopt_is_refused_and_nothing_is_planted() {
    if !is_root() {
        eprintln!(
            "!!! NOT ROOT: the fast path needs TCP_REPAIR and nftables, and the probe runs as \
             uid 65534 with setpriv; fast-path admission is NOT tested !!!"
        );
        return;
    }
    let dir = TempDir::new("hostile-adopt");
    let size: u64 = 32 << 20;
    let want = file(&dir, "big.bin", size, 44);
    let lc: LocalCluster = tokio::task::block_in_place(|| {
        let opts = LocalOptions {
            servers: 2,
            root: dir.path().join("www"),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            agent_args: vec!["--fast-path".into()],
            fast_path_listen: vec![UNUSED_LISTED.into()],
            ..Default::default()
        };
        LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
    });
    // A live download whose TCP connection the server itself serves.
    let out = dir.path().join("got.bin");
    let mut curl = Reaped(spawn_curl(&lc, "big.bin", "6M", &out));
    tokio::task::block_in_place(|| {
        wait_for("the download to start", Duration::from_secs(20), || {
            len(&out) > 0
        })
    });
    let data = lc.servers[0].data.clone();
    assert_eq!(
        planted_sockets(),
        "",
        "a socket to {PLANTED_REMOTE} before the test"
    );

    // Another local user: refused at HELLO, before any connection state exists.
    let a = tokio::task::block_in_place(|| probe_as_nobody(dir.path(), &data, &lc.agent_listen));
    assert!(a.starts_with("REFUSED Unauthenticated"), "{a}");
    assert!(a.contains("uid 65534"), "{a}");

    // Another local user at a server's hand-over socket (decision 56), which it can reach (an
    // abstract name has no permissions): its socket is refused unread, and logged.
    let a = tokio::task::block_in_place(|| handoff_as_nobody(&lc.servers[0].data));
    assert!(a.contains("CLOSED"), "{a}");
    let log = dir.path().join(format!("{}.log", lc.servers[0].id));
    tokio::task::block_in_place(|| {
        wait_for("the refusal in the log", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("hand-over refused: from uid 65534")
        })
    });

    // A trusted uid (this test runs as root), but a connection the agent could not hand over:
    // one to its listener that it never accepted (the remote address chosen), output it sent, input over the bound, an address nobody listens on, an unlisted address.
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "a client the agent never accepted",
            planted(&lc.agent_listen, 0, 10).encode(),
            "held when the session began",
        ),
        (
            "output sent",
            planted(&lc.agent_listen, 1000, 10).encode(),
            "never writes",
        ),
        (
            "input over 4 MiB",
            planted(&lc.agent_listen, 0, (4 << 20) + 1).encode(),
            "at most",
        ),
        (
            "no listener",
            planted(UNUSED_LISTED, 0, 10).encode(),
            "nothing listens",
        ),
        (
            "unlisted address",
            planted("127.0.0.1:22", 0, 10).encode(),
            "not one this cluster's fast path admits",
        ),
    ];
    for (what, state, why) in cases {
        let a = try_adopt(&data, &state).await;
        assert!(a.starts_with("REFUSED"), "{what}: {a}");
        assert!(a.contains(why), "{what}: {a}");
    }
    // A hand-over by socket (decision 56) naming a nonce under which nothing was handed.
    let a = try_adopt_msg(&data, Msg::AdoptHanded { nonce: [7; 16] }).await;
    assert!(a.starts_with("REFUSED"), "{a}");
    assert!(a.contains("did not arrive"), "{a}");

    // Larger than any ADOPT frame: the session is cut before the state is read.
    let a = try_adopt(&data, &planted(&lc.agent_listen, 0, 5 << 20).encode()).await;
    assert!(!a.starts_with("ANSWERED"), "{a}");

    // Nothing was planted: no socket to the named client, and the servers hold only the
    // download's connection.
    assert_eq!(planted_sockets(), "", "a planted connection exists");
    let mut conns = 0;
    for s in &lc.servers {
        let st = mtcp::peer::admin_request(&s.admin, &lc.key, &s.id, Msg::AdminStatus)
            .await
            .unwrap();
        conns += st.connections;
    }
    assert_eq!(conns, 1, "servers hold {conns} connections");

    let ok =
        tokio::task::block_in_place(|| wait_child(&mut curl.0, "curl", Duration::from_secs(60)));
    assert!(ok, "curl failed");
    assert_eq!(
        sha256(&std::fs::read(&out).unwrap()),
        want,
        "the fast-path download was corrupted"
    );
}
