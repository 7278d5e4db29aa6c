//! `mtcp lab` from the command line (root only): up with delay-line processes, exec, a delay
//! changed at run time, faults for detached processes, status, and a `down` that leaves no
//! namespace, delay-line process or detached process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TAG: &str = "tcli";

fn mtcp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtcp"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mtcp")
}

/// `mtcp ARGS`, which must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let o = mtcp(args);
    assert!(
        o.status.success(),
        "mtcp {}: {}\n{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
}

fn state() -> serde_json::Value {
    let p = mtcp_lab::lab_dir(TAG).join("state.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Removes the lab even when an assertion fails.
struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        let _ = mtcp_lab::down(TAG);
    }
}

/// Shortest of 3 TCP connects from the client to `to`, measured inside the client's
/// namespace (the lab handle only opens it; the lab is the CLI's).
fn connect_rtt(lab: &mtcp_lab::Lab, to: SocketAddr) -> Duration {
    lab.run_in(mtcp_lab::Host::Client, || {
        (0..3)
            .map(|_| {
                let t0 = Instant::now();
                TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
                t0.elapsed()
            })
            .min()
            .unwrap()
    })
    .unwrap()
}

#[test]
fn lab_from_the_command_line() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "!!! NOT ROOT: lab tests NOT run !!!";
        eprintln!("{msg}");
        println!("{msg}");
        return;
    }
    let _down = Down;
    let out = ok(&[
        "lab",
        "up",
        "--servers",
        "2",
        "--tag",
        TAG,
        "--delay-ms",
        "20",
    ]);
    assert!(out.contains("mtcp-tcli-s2"), "{out}");
    let st = state();
    let lines: Vec<u32> = st["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["delay_line"]["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert_eq!(lines.len(), 2, "a delay-line process per server link: {st}");
    assert!(lines.iter().all(|&p| alive(p)));

    let addrs = ok(&[
        "lab", "exec", "--tag", TAG, "client", "--", "ip", "-4", "-o", "addr",
    ]);
    assert!(addrs.contains("198.18.0.2/24"), "{addrs}");
    let o = mtcp(&[
        "lab", "exec", "--tag", TAG, "s1", "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "exec passes the exit code on");

    // The delay: measured from this process inside the lab's namespaces.
    let lab = mtcp_lab::Lab::attach(TAG).unwrap();
    let to = SocketAddr::from((lab.addr(mtcp_lab::Host::Server(1)), 7000));
    let _l = lab
        .run_in(mtcp_lab::Host::Server(1), || TcpListener::bind(to))
        .unwrap()
        .unwrap();
    let rtt = connect_rtt(&lab, to);
    assert!(
        rtt >= Duration::from_millis(20) && rtt < Duration::from_millis(35),
        "{rtt:?}"
    );
    ok(&["lab", "impair", "--tag", TAG, "s1", "--delay-ms", "50"]);
    let t0 = Instant::now();
    let rtt = loop {
        let r = connect_rtt(&lab, to);
        if r >= Duration::from_millis(50) || t0.elapsed() > Duration::from_secs(2) {
            break r;
        }
    };
    assert!(
        rtt >= Duration::from_millis(50) && rtt < Duration::from_millis(70),
        "{rtt:?}"
    );

    // Faults act on processes started with exec --detach.
    let out = ok(&[
        "lab", "exec", "--tag", TAG, "s2", "--detach", "--", "sleep", "600",
    ]);
    assert!(out.contains("pid"), "{out}");
    let out = ok(&[
        "lab", "exec", "--tag", TAG, "client", "--detach", "--", "sleep", "600",
    ]);
    assert!(out.contains("pid"), "{out}");
    let pids: Vec<u32> = state()["procs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["proc"]["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(pids.len(), 2);
    ok(&["lab", "impair", "--tag", TAG, "s2", "--stop"]);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pids[0])).unwrap();
    assert!(stat.contains(") T "), "{stat}");
    let status = ok(&["lab", "status", "--tag", TAG]);
    assert!(status.contains("STOPPED"), "{status}");
    ok(&["lab", "impair", "--tag", TAG, "s2", "--kill"]);
    assert!(!alive(pids[0]));
    let o = mtcp(&["lab", "impair", "--tag", TAG, "s2", "--kill"]);
    assert!(!o.status.success(), "nothing left to kill in s2");

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["lab", "status", "--tag", TAG, "--json"])).unwrap();
    assert_eq!(json[0]["hosts"].as_array().unwrap().len(), 4);

    let out = ok(&["lab", "down", "--tag", TAG]);
    assert!(out.contains("4 namespace(s)"), "{out}");
    for p in lines.iter().chain(&pids) {
        assert!(!alive(*p), "process {p} left after down");
    }
    assert!(!std::fs::read_dir("/run/netns")
        .map(|rd| rd
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("mtcp-tcli-")))
        .unwrap_or(false));
    assert!(!mtcp_lab::lab_dir(TAG).exists());
    let out = ok(&["lab", "status", "--tag", TAG]);
    assert!(out.contains("no lab"), "{out}");
}
