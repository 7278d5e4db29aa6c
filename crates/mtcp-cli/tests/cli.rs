//! The `mtcp` command: the demo runs to success, and errors a user can act on are one clear line
//! with a non-zero exit.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(exe())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `mtcp server` that must fail; returns its error line.
fn server_fails(cluster: &str, id: &str, root: &str) -> String {
    let (ok, e) = run(&[
        "server",
        "--cluster",
        cluster,
        "--id",
        id,
        "httpd",
        "--root",
        root,
    ]);
    assert!(!ok, "mtcp server should have failed: {e}");
    error_line(&e)
}

/// The last line of stderr (the error line; logs may come before it).
fn error_line(stderr: &str) -> String {
    stderr.lines().last().unwrap_or_default().to_string()
}

#[test]
fn demo_exits_zero() {
    let out = Command::new(exe())
        .args(["demo", "--quiet"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("OK: every byte matched"), "{so}");
    assert!(
        so.contains("reason: hint (drain)") && so.contains("reason: manual"),
        "{so}"
    );
}

#[test]
fn configuration_errors_are_one_clear_line() {
    let dir = TempDir::new("cli");
    let www = dir.path().join("www");
    let root = www.to_str().unwrap();
    let e = server_fails("/nonexistent/c.toml", "s1", root);
    assert!(
        e.starts_with("mtcp: error: cannot read /nonexistent/c.toml"),
        "{e}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "key = \"1234\"\n[[server]]\nid=\"s1\"\ndata=\"127.0.0.1:1\"\npeer=\"127.0.0.1:2\"\nadmin=\"127.0.0.1:3\"\n").unwrap();
    let e = server_fails(bad.to_str().unwrap(), "s1", root);
    assert!(e.contains("64 hex characters"), "{e}");

    let (cluster, servers) =
        mtcp_harness::local::write_cluster(dir.path(), 2, "lazy", None).unwrap();
    let c = cluster.to_str().unwrap();
    let e = server_fails(c, "s9", root);
    assert!(e.contains("server id \"s9\" is not in cluster file"), "{e}");

    // Port in use.
    let hold = std::net::TcpListener::bind(&servers[0].data).unwrap();
    let e = server_fails(c, "s1", root);
    let line = e.clone();
    assert!(
        line.contains("cannot listen on data address") && line.contains("in use"),
        "{e}"
    );
    drop(hold);

    // Nothing listens: the agent admin and the server admin.
    let closed = format!("127.0.0.1:{}", mtcp_harness::local::free_port());
    let (ok, e) = run(&["status", "--agent", &closed]);
    assert!(!ok);
    assert!(error_line(&e).contains("refused"), "{e}");
    let (ok, e) = run(&["drain", "--cluster", c, "--id", "s1"]);
    assert!(!ok);
    assert!(error_line(&e).contains("admin"), "{e}");
}

#[test]
fn wrong_key_is_refused_and_unreachable_service_closes_the_client() {
    let dir = TempDir::new("cli-key");
    file(&dir, "x.bin", 1000, 1);
    let lc = cluster(&dir, 1);
    // The same cluster with another key: drain must be refused, naming the key.
    let text = std::fs::read_to_string(&lc.cluster_file).unwrap();
    let other = dir.path().join("other.toml");
    let line = text.lines().find(|l| l.starts_with("key")).unwrap();
    std::fs::write(
        &other,
        text.replace(line, &format!("key = \"{}\"", "ab".repeat(32))),
    )
    .unwrap();
    let (ok, e) = run(&["drain", "--cluster", other.to_str().unwrap(), "--id", "s1"]);
    assert!(!ok);
    assert!(error_line(&e).contains("wrong cluster key"), "{e}");

    // An agent whose service is unreachable closes the client program's connection and says why.
    let listen = format!("127.0.0.1:{}", mtcp_harness::local::free_port());
    let dead = format!("127.0.0.1:{}", mtcp_harness::local::free_port());
    let log = std::fs::File::create(dir.path().join("lonely-agent.log")).unwrap();
    let mut agent = Command::new(exe())
        .args(["agent", "--connect", &dead, "--listen", &listen])
        .stderr(log)
        .spawn()
        .unwrap();
    mtcp_harness::local::wait_listening(&listen, Duration::from_secs(10)).unwrap();
    let mut s = std::net::TcpStream::connect(&listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    let r = s.read(&mut b);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "client connection was not closed: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let _ = agent.kill();
    let _ = agent.wait();
    let logged = std::fs::read_to_string(dir.path().join("lonely-agent.log")).unwrap();
    assert!(
        logged.contains("cannot open a session with any server"),
        "{logged}"
    );
}

/// A server puts its heap on transparent huge pages (decision 65): started without
/// `GLIBC_TUNABLES`, it executes itself again — same PID, same arguments — with
/// `glibc.malloc.hugetlb=1`, under the name it was started with; one started with
/// `GLIBC_TUNABLES` set (here the opt-out) is left as it is.
#[test]
fn a_server_puts_its_heap_on_huge_pages_unless_told_not_to() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!(
            "!!! a_server_puts_its_heap_on_huge_pages_unless_told_not_to NOT TESTED: \
             transparent huge pages are off on this machine ({thp:?}), so servers do not ask \
             for them"
        );
        return;
    }
    let dir = TempDir::new("huge-heap");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    for (given, want) in [
        (None, "glibc.malloc.hugetlb=1"),
        (Some("glibc.malloc.hugetlb=0"), "glibc.malloc.hugetlb=0"),
    ] {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let cluster = dir.path().join("c.toml");
        std::fs::write(
            &cluster,
            format!(
                "key = \"{}\"\n[[server]]\nid = \"s1\"\ndata = \"127.0.0.1:{}\"\npeer = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n",
                "cd".repeat(32),
                ports[0],
                ports[1],
                ports[2]
            ),
        )
        .unwrap();
        let args = [
            "server",
            "--cluster",
            cluster.to_str().unwrap(),
            "--id",
            "s1",
            "httpd",
            "--root",
            root.to_str().unwrap(),
        ];
        let mut cmd = Command::new(exe());
        match given {
            Some(v) => cmd.env("GLIBC_TUNABLES", v),
            None => cmd.env_remove("GLIBC_TUNABLES"),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let listening = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok()
        });
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        assert!(listening, "the server (pid {pid}) never listened");
        let tunables: Vec<String> = environ
            .split(|&b| b == 0)
            .filter_map(|v| v.strip_prefix(b"GLIBC_TUNABLES="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert_eq!(tunables, [want], "GLIBC_TUNABLES of the server's process");
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .skip(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(argv, args, "the server's arguments");
        // Not `exe` (from `/proc/self/exe`): the name `ps` and `pgrep` show.
        let name = exe().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            comm.trim_end(),
            &name[..name.len().min(15)],
            "the server's name"
        );
    }
}
