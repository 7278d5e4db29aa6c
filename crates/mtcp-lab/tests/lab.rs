//! The lab end to end (root only): a TCP echo from the client to a server, a 40 ms RTT, 30 %
//! loss, a 10 Mbit/s rate, a blackhole and its removal, the delay line's throughput, and that
//! nothing is left after `down`, after a panicking test body, and after a lab that was
//! abandoned without `down`. Tests run one at a time (they measure time).

use mtcp_lab::{Fault, Host, Impairment, Lab, LabOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The lock that serializes the tests, or `None` (after saying so loudly) when not root.
fn lab_test() -> Option<MutexGuard<'static, ()>> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "!!! NOT ROOT: lab tests NOT run !!!";
        eprintln!("{msg}");
        println!("{msg}");
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()))
}

fn opts(tag: &str, servers: u16, servers_link: Impairment) -> LabOptions {
    LabOptions {
        tag: tag.into(),
        servers,
        servers_link,
        ..Default::default()
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A TCP server inside `host`: `serve` runs for each accepted connection until `stop`.
struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(lab: &Lab, host: Host, port: u16, serve: fn(TcpStream)) -> TcpServer {
        let addr = sa(lab.addr(host), port);
        let l = lab
            .run_in(host, || TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            // Bounded by the test: it sets `stop`, or 60 s pass.
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || serve(c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TcpServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 4096];
    while let Ok(n) = c.read(&mut b) {
        if n == 0 || c.write_all(&b[..n]).is_err() {
            return;
        }
    }
}

/// Sends `SEND_BYTES` and closes.
const SEND_BYTES: usize = 2 << 20;
fn send_2mb(mut c: TcpStream) {
    let _ = c.set_write_timeout(Some(Duration::from_secs(20)));
    let _ = c.write_all(&vec![7u8; SEND_BYTES]);
}

/// Streams until the peer closes (bounded by a write timeout).
fn send_forever(mut c: TcpStream) {
    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
    let b = vec![1u8; 256 << 10];
    while c.write_all(&b).is_ok() {}
}

/// One TCP round trip from the client: connect (SYN → SYN/ACK), then echo a line.
fn echo_from_client(lab: &Lab, to: SocketAddr) -> std::io::Result<Vec<u8>> {
    lab.run_in(Host::Client, || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.write_all(b"hello lab\n")?;
        let mut got = vec![0u8; 10];
        c.read_exact(&mut got)?;
        Ok(got)
    })
    .unwrap()
}

/// Shortest TCP connect time from the client to `to` over `n` tries (the SYN → SYN/ACK
/// round trip; the kernel answers from the listen backlog, no accept needed).
fn connect_rtt(lab: &Lab, to: SocketAddr, n: usize) -> Duration {
    lab.run_in(Host::Client, || {
        (0..n)
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

/// A UDP echo inside `host` answering for `secs`; returns its address.
fn udp_echo(lab: &Lab, host: Host, port: u16, secs: u64) -> SocketAddr {
    let addr = sa(lab.addr(host), port);
    let s = lab.run_in(host, || UdpSocket::bind(addr)).unwrap().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut b = [0u8; 64];
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Ok((n, from)) = s.recv_from(&mut b) {
                let _ = s.send_to(&b[..n], from);
            }
        }
    });
    addr
}

/// Sends `n` numbered datagrams from the client (1 ms apart) and counts the echoes.
fn udp_answered(lab: &Lab, to: SocketAddr, n: u32) -> u32 {
    let s = lab
        .run_in(Host::Client, || UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for i in 0..n {
        s.send_to(&i.to_be_bytes(), to).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut seen = std::collections::HashSet::new();
    let mut b = [0u8; 64];
    while let Ok((4, _)) = s.recv_from(&mut b) {
        seen.insert(u32::from_be_bytes(b[..4].try_into().unwrap()));
    }
    seen.len() as u32
}

fn netns_of(tag: &str) -> Vec<String> {
    let prefix = format!("mtcp-{tag}-");
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit(')').next().and_then(|r| r.trim().chars().next()),
            Some('Z')
        )
    })
}

/// Nothing of lab `tag` is left: no namespace, no state, none of the `pids`, no link device in
/// the host's namespace.
fn assert_gone(tag: &str, pids: &[u32]) {
    assert_eq!(netns_of(tag), Vec::<String>::new(), "namespaces left");
    assert!(
        !mtcp_lab::lab_dir(tag).exists(),
        "state directory left: {}",
        mtcp_lab::lab_dir(tag).display()
    );
    for &p in pids {
        assert!(!alive(p), "process {p} left");
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for dev in ["mc0", "rc0", "ms1", "rs1", "ms2", "rs2"] {
        assert!(
            !links.contains(&format!(": {dev}:")) && !links.contains(&format!(": {dev}@")),
            "device {dev} in the host's namespace:\n{links}"
        );
    }
    assert_eq!(mtcp_lab::status(tag).unwrap().map(|s| s.tag), None);
}

#[test]
fn echo_between_client_and_server_and_between_servers() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts("tbasic", 2, Impairment::default())).unwrap();
    let _e1 = TcpServer::start(&lab, Host::Server(1), 7000, echo);
    let _e2 = TcpServer::start(&lab, Host::Server(2), 7000, echo);
    let s1 = sa(lab.addr(Host::Server(1)), 7000);
    assert_eq!(echo_from_client(&lab, s1).unwrap(), b"hello lab\n");
    // Server to server goes through the router too.
    let s2 = sa(lab.addr(Host::Server(2)), 7000);
    let got = lab
        .run_in(Host::Server(1), || {
            TcpStream::connect_timeout(&s2, Duration::from_secs(2)).is_ok()
        })
        .unwrap();
    assert!(got, "s1 → s2");
    // A command inside a namespace sees only the lab's addresses.
    let out = lab
        .command(Host::Client, "ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("198.18.0.2/24") && out.contains("mc0"),
        "{out}"
    );
    if std::process::Command::new("ping")
        .arg("-V")
        .output()
        .is_ok()
    {
        let st = lab
            .command(Host::Client, "ping")
            .args(["-c", "1", "-W", "2", "-q", "198.18.2.2"])
            .output()
            .unwrap();
        assert!(st.status.success(), "ping s2: {st:?}");
    }
    // Nothing reaches outside the lab.
    assert!(lab
        .run_in(Host::Client, || TcpStream::connect_timeout(
            &"127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(200)
        )
        .is_err())
        .unwrap());
    lab.down().unwrap();
    assert_gone("tbasic", &[]);
}

#[test]
fn delay_40ms_rtt() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts(
        "tdelay",
        2,
        Impairment {
            delay_ms: 40,
            ..Default::default()
        },
    ))
    .unwrap();
    let _e = TcpServer::start(&lab, Host::Server(1), 7000, echo);
    let s1 = sa(lab.addr(Host::Server(1)), 7000);
    assert_eq!(echo_from_client(&lab, s1).unwrap(), b"hello lab\n");
    let rtt = connect_rtt(&lab, s1, 5);
    eprintln!("client → s1 TCP connect with --delay-ms 40: {rtt:?}");
    assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    assert!(rtt < Duration::from_millis(60), "{rtt:?}");
    // Server to server crosses two delayed links.
    let s2 = sa(lab.addr(Host::Server(2)), 7001);
    let _l = lab
        .run_in(Host::Server(2), || TcpListener::bind(s2))
        .unwrap()
        .unwrap();
    let rtt = lab
        .run_in(Host::Server(1), || {
            let t0 = Instant::now();
            TcpStream::connect_timeout(&s2, Duration::from_secs(2)).expect("s1 → s2");
            t0.elapsed()
        })
        .unwrap();
    assert!(
        rtt >= Duration::from_millis(80) && rtt < Duration::from_millis(110),
        "{rtt:?}"
    );
    // Changing the delay, and adding one to a veth link (the client's) at run time.
    lab.impair(
        Host::Server(1),
        Impairment {
            delay_ms: 10,
            ..Default::default()
        },
    )
    .unwrap();
    lab.impair(
        Host::Client,
        Impairment {
            delay_ms: 20,
            ..Default::default()
        },
    )
    .unwrap();
    let rtt = connect_rtt(&lab, s1, 3);
    eprintln!("after impair: client 20 ms + s1 10 ms: {rtt:?}");
    assert!(
        rtt >= Duration::from_millis(30) && rtt < Duration::from_millis(50),
        "{rtt:?}"
    );
}

#[test]
fn loss_30pct_drops_some() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts("tloss", 1, Impairment::default())).unwrap();
    let to = udp_echo(&lab, Host::Server(1), 9000, 10);
    let clean = udp_answered(&lab, to, 200);
    assert_eq!(clean, 200, "no loss without impairment");
    lab.impair(
        Host::Server(1),
        Impairment {
            loss_pct: 30.0,
            ..Default::default()
        },
    )
    .unwrap();
    // Each echo crosses the link twice: about 0.7² = 49 % come back.
    let got = udp_answered(&lab, to, 200);
    eprintln!("30 % loss each way: {got} of 200 echoes");
    assert!((60..=140).contains(&got), "{got} of 200");
}

#[test]
fn rate_10mbit_limits_a_transfer() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts(
        "trate",
        1,
        Impairment {
            rate_mbit: Some(10.0),
            ..Default::default()
        },
    ))
    .unwrap();
    let _s = TcpServer::start(&lab, Host::Server(1), 7000, send_2mb);
    let to = sa(lab.addr(Host::Server(1)), 7000);
    let (n, took) = lab
        .run_in(Host::Client, || {
            let t0 = Instant::now();
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut n = 0;
            let mut b = vec![0u8; 64 << 10];
            while let Ok(k) = c.read(&mut b) {
                if k == 0 {
                    break;
                }
                n += k;
            }
            (n, t0.elapsed())
        })
        .unwrap();
    eprintln!(
        "2 MiB at 10 Mbit/s: {took:?} ({:.1} Mbit/s)",
        n as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    assert_eq!(n, SEND_BYTES);
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[test]
fn blackhole_and_clear() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts("tblack", 2, Impairment::default())).unwrap();
    let _e = TcpServer::start(&lab, Host::Server(1), 7000, echo);
    let s1 = sa(lab.addr(Host::Server(1)), 7000);
    let u1 = udp_echo(&lab, Host::Server(1), 9000, 10);
    assert!(echo_from_client(&lab, s1).is_ok());
    let hole = Impairment {
        blackhole: true,
        ..Default::default()
    };
    lab.impair(Host::Server(1), hole).unwrap();
    assert_eq!(lab.impairment(Host::Server(1)).unwrap(), hole);
    let r = lab
        .run_in(Host::Client, || {
            TcpStream::connect_timeout(&s1, Duration::from_millis(300))
        })
        .unwrap();
    assert!(r.is_err(), "connect through a blackhole");
    assert_eq!(udp_answered(&lab, u1, 20), 0);
    let nft = lab
        .command(Host::Router, "nft")
        .args(["list", "table", "inet", "mtcp_lab_tblack"])
        .output()
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(nft.contains("iifname \"rs1\" drop"), "{nft}");
    assert!(nft.contains("oifname \"rs1\" drop"), "{nft}");
    // s2 is not affected.
    let _e2 = TcpServer::start(&lab, Host::Server(2), 7000, echo);
    assert!(echo_from_client(&lab, sa(lab.addr(Host::Server(2)), 7000)).is_ok());
    lab.impair(Host::Server(1), Impairment::default()).unwrap();
    assert_eq!(echo_from_client(&lab, s1).unwrap(), b"hello lab\n");
    assert_eq!(udp_answered(&lab, u1, 20), 20);
}

#[test]
fn faults_and_down_leave_nothing() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts(
        "tdown",
        2,
        Impairment {
            delay_ms: 10,
            loss_pct: 1.0,
            rate_mbit: Some(100.0),
            blackhole: false,
        },
    ))
    .unwrap();
    let a = lab.spawn(Host::Server(1), &["sleep", "600"]).unwrap();
    let b = lab.spawn(Host::Server(2), &["sleep", "600"]).unwrap();
    let c = lab.spawn(Host::Client, &["sleep", "600"]).unwrap();
    assert!(a.log.as_ref().unwrap().exists());
    assert_eq!(lab.fault(Host::Server(2), Fault::Stop).unwrap(), 1);
    let t0 = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/stat", b.pid))
        .unwrap()
        .contains(") T ")
    {
        assert!(t0.elapsed() < Duration::from_secs(2), "s2 not stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    lab.fault(Host::Server(2), Fault::Cont).unwrap();
    lab.stop(&b).unwrap();
    lab.kill(&a).unwrap();
    assert!(!alive(a.pid));
    assert!(
        lab.fault(Host::Server(1), Fault::Kill).is_err(),
        "nothing left in s1"
    );
    assert_eq!(lab.processes().len(), 2);
    // An untracked process inside a namespace is killed by `down` too.
    let mut stray = lab
        .command(Host::Router, "sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let status = mtcp_lab::status("tdown").unwrap().unwrap();
    assert_eq!(status.hosts.len(), 4);
    assert!(status.hosts.iter().all(|h| h.netns_exists));
    let report = lab.down().unwrap();
    assert_eq!(report.namespaces.len(), 4, "{report:?}");
    let _ = stray.wait();
    assert_gone("tdown", &[a.pid, b.pid, c.pid, stray.id()]);
}

#[test]
fn a_panicking_test_leaves_nothing() {
    let Some(_serial) = lab_test() else { return };
    let pids = Arc::new(Mutex::new(Vec::new()));
    let p = pids.clone();
    let r = std::panic::catch_unwind(move || {
        let lab = Lab::up(opts(
            "tpanic",
            2,
            Impairment {
                delay_ms: 20,
                ..Default::default()
            },
        ))
        .unwrap();
        let s = lab.spawn(Host::Server(1), &["sleep", "600"]).unwrap();
        lab.stop(&s).unwrap();
        p.lock().unwrap().push(s.pid);
        panic!("a deliberate failure inside a lab test");
    });
    assert!(r.is_err());
    assert_gone("tpanic", &pids.lock().unwrap());
}

#[test]
fn an_abandoned_lab_is_cleaned_by_down_and_by_up() {
    let Some(_serial) = lab_test() else { return };
    // As if the lab's process had died without `down`: namespaces and processes stay.
    let lab = Lab::up(opts("tstale", 2, Impairment::default())).unwrap();
    let s = lab.spawn(Host::Server(1), &["sleep", "600"]).unwrap();
    lab.detach();
    assert_eq!(netns_of("tstale").len(), 4);
    // `up` of the same tag removes the stale lab first.
    let lab = Lab::up(opts("tstale", 1, Impairment::default())).unwrap();
    assert!(!alive(s.pid), "the stale lab's process");
    assert_eq!(netns_of("tstale").len(), 3);
    let s = lab.spawn(Host::Server(1), &["sleep", "600"]).unwrap();
    lab.detach();
    // The state file lost too (a crash before it was written): `down` finds the namespaces.
    std::fs::remove_file(mtcp_lab::lab_dir("tstale").join("state.json")).unwrap();
    assert!(!mtcp_lab::status("tstale").unwrap().unwrap().recorded);
    let report = mtcp_lab::down("tstale").unwrap();
    assert_eq!(report.namespaces.len(), 3, "{report:?}");
    assert_gone("tstale", &[s.pid]);
    // Down of a lab that does not exist is fine.
    mtcp_lab::down("tstale").unwrap();
}

#[test]
fn delay_line_throughput() {
    let Some(_serial) = lab_test() else { return };
    let lab = Lab::up(opts(
        "tthru",
        1,
        Impairment {
            delay_ms: 20,
            ..Default::default()
        },
    ))
    .unwrap();
    let _s = TcpServer::start(&lab, Host::Server(1), 7000, send_forever);
    let to = sa(lab.addr(Host::Server(1)), 7000);
    let rtt = connect_rtt(&lab, to, 3);
    let (n, took) = lab
        .run_in(Host::Client, || {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = vec![0u8; 256 << 10];
            // Past slow start, then measure 2 s.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_millis(700) {
                assert!(c.read(&mut b).unwrap() > 0);
            }
            let t1 = Instant::now();
            let mut n = 0usize;
            while t1.elapsed() < Duration::from_secs(2) {
                n += c.read(&mut b).unwrap();
            }
            (n, t1.elapsed())
        })
        .unwrap();
    let mbit = n as f64 * 8.0 / took.as_secs_f64() / 1e6;
    eprintln!("one TCP stream through a 20 ms delay line (connect RTT {rtt:?}): {mbit:.0} Mbit/s");
    assert!(
        rtt >= Duration::from_millis(20) && rtt < Duration::from_millis(35),
        "{rtt:?}"
    );
    assert!(mbit > 400.0, "{mbit:.0} Mbit/s");
}
