//! `Fences` on real nftables: a fence put up over netlink drops exactly its flow's packets, both
//! ways (the client's bytes to the server stop arriving and the server's to the client do not
//! leave, another flow's do), taking it down lets the
//! retransmission through, and the bytes arrive whole. Errors name the kernel's reason. Needs
//! root (CAP_NET_ADMIN, nftables); without it the test says so loudly and checks only that
//! opening the fences is refused with a clear error.

use mtcp_repair::Fences;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    (c, s)
}

/// Reads exactly `n` bytes within `within`, or fewer if they do not come.
fn read_for(s: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < n && Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    got
}

#[test]
fn a_fence_drops_its_flow_only_until_it_is_taken_down() {
    if !is_root() {
        eprintln!("!!! NOT RUN: fences need root (CAP_NET_ADMIN and nftables); checking only the refusal !!!");
        let e = Fences::open()
            .err()
            .expect("opening fences without root must fail");
        assert!(!e.to_string().is_empty());
        return;
    }
    let fences = Fences::open().expect("fences (root, nftables installed)");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut c1, mut s1) = pair(&l);
    let (mut c2, mut s2) = pair(&l);
    let fence = fences
        .fence(s1.local_addr().unwrap(), c1.local_addr().unwrap())
        .expect("fence up");
    let msg: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    c1.write_all(&msg).unwrap();
    c2.write_all(&msg).unwrap();
    assert_eq!(
        read_for(&mut s2, msg.len(), Duration::from_secs(5)),
        msg,
        "another flow passes the fence"
    );
    assert!(
        read_for(&mut s1, 1, Duration::from_millis(400)).is_empty(),
        "the fenced flow's bytes must not arrive"
    );
    // Both ways: what the server's socket sends meanwhile does not reach the client either.
    c1.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s1.write_all(b"back").unwrap();
    assert!(
        read_for(&mut c1, 1, Duration::from_millis(400)).is_empty(),
        "the fenced flow's bytes to the peer must not leave"
    );
    drop(fence);
    // The client's retransmission goes through now (its RTO has backed off to ≤ 1.6 s).
    assert_eq!(
        read_for(&mut s1, msg.len(), Duration::from_secs(10)),
        msg,
        "the flow's bytes arrive whole once the fence is down"
    );
    assert_eq!(read_for(&mut c1, 4, Duration::from_secs(10)), b"back");
    // Again, on the same flow: a second fence after the first went down.
    let again = fences
        .fence(s1.local_addr().unwrap(), c1.local_addr().unwrap())
        .expect("second fence up");
    drop(again);
    c1.write_all(b"after").unwrap();
    assert_eq!(read_for(&mut s1, 5, Duration::from_secs(5)), b"after");
    // A fence left up for another process: lifted by name, as a destination does.
    let table = fences
        .fence_expiring(
            s1.local_addr().unwrap(),
            c1.local_addr().unwrap(),
            Duration::from_secs(30),
        )
        .expect("expiring fence up")
        .leave_up();
    c1.write_all(b"lifted").unwrap();
    assert!(
        read_for(&mut s1, 1, Duration::from_millis(400)).is_empty(),
        "a fence left up still drops the flow"
    );
    assert!(
        mtcp_repair::lift(&table, s1.local_addr().unwrap(), c1.local_addr().unwrap()).unwrap(),
        "the fence was up and is lifted"
    );
    assert_eq!(read_for(&mut s1, 6, Duration::from_secs(10)), b"lifted");
    assert!(
        !mtcp_repair::lift(&table, s1.local_addr().unwrap(), c1.local_addr().unwrap()).unwrap(),
        "lifting a fence that is not up says so"
    );
    assert!(
        mtcp_repair::lift("filter", s1.local_addr().unwrap(), c1.local_addr().unwrap()).is_err()
    );
    // Left up and never lifted (its lifter died): the kernel takes it down after its timeout.
    let _ = fences
        .fence_expiring(
            s1.local_addr().unwrap(),
            c1.local_addr().unwrap(),
            Duration::from_millis(300),
        )
        .expect("short fence up")
        .leave_up();
    c1.write_all(b"expired").unwrap();
    assert_eq!(read_for(&mut s1, 7, Duration::from_secs(10)), b"expired");
    // (One `Fences` per process: its table is named by the pid, so this test holds the only one.)
    let e = fences
        .fence("127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("mixed address families"), "{e}");
}

#[test]
fn a_change_the_kernel_refuses_names_its_reason() {
    if !is_root() {
        eprintln!("!!! NOT RUN: netlink changes to nftables need root !!!");
        return;
    }
    let mut nl = mtcp_repair::nfnl::Netlink::open().unwrap();
    let e = nl
        .change(
            mtcp_repair::nfnl::Op::Add,
            "mtcp_no_such_table_for_test",
            "f4",
            &[0; 16],
            None,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    eprintln!("the kernel said: {e}");
}
