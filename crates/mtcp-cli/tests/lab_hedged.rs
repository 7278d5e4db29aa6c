//! Decision 71 on a real kernel: the lab's router drops every other SYN sent to the server,
//! so a plain `connect` loses its first SYN and waits for Linux's retransmission a second
//! later, while `mtcp::hedged::connect` (the agent's and the servers' connects) has its second
//! handshake answered after the hedge. Each accepted connection carries bytes back and forth,
//! compared by SHA-256. Needs root (network namespaces, nftables); the lab, its namespaces and
//! the nftables table in its router go with it.

use mtcp_lab::{Host, Lab, LabOptions};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const PORT: u16 = 7400;
const CONNECTS: usize = 4;
const HEDGE: Duration = Duration::from_millis(100);

/// Every other SYN toward the server, counted across all connections, is dropped.
fn drop_every_other_syn(lab: &Lab, to: std::net::Ipv4Addr) {
    let script = format!(
        "table inet mtcp_lab_hedge {{\n\tchain forward {{\n\t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tip daddr {to} tcp dport {PORT} tcp flags & (syn | ack) == syn numgen inc mod 2 == 0 drop\n\t}}\n}}\n"
    );
    lab.nft(Host::Router, &script)
        .unwrap_or_else(|e| panic!("{e}: {script}"));
}

/// Echoes whatever each accepted connection sends until it closes.
fn serve(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Sends 64 KiB of `seed`'s bytes on `s` and reads them back; whether both hashes match.
fn echoes(mut s: TcpStream, seed: u8) -> bool {
    let data: Vec<u8> = (0..64 << 10)
        .map(|i: u32| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).is_ok());
    let mut got = vec![0u8; data.len()];
    let read = s.read_exact(&mut got).is_ok();
    writer.join().unwrap() && read && Sha256::digest(&got) == Sha256::digest(&data)
}

#[test]
fn a_hedged_connect_does_not_wait_a_second_for_a_lost_syn() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "!!! NOT ROOT: lab tests (namespaces, nftables) NOT run !!!";
        eprintln!("{msg}");
        println!("{msg}");
        return;
    }
    let lab = Lab::up(LabOptions {
        tag: "hedge".into(),
        servers: 1,
        ..Default::default()
    })
    .expect("lab");
    let server = SocketAddr::from((Host::Server(1).addr(), PORT));
    let l = lab
        .run_in(Host::Server(1), move || TcpListener::bind(server))
        .expect("the server's namespace")
        .expect("listen");
    serve(l);
    drop_every_other_syn(&lab, Host::Server(1).addr());
    let (plain, hedged) = lab
        .run_in(Host::Client, move || {
            let mut plain = Vec::new();
            for k in 0..CONNECTS {
                let t = Instant::now();
                let s =
                    TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
                plain.push((t.elapsed(), echoes(s, k as u8)));
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut hedged = Vec::new();
            for k in 0..CONNECTS {
                let t = Instant::now();
                let (s, took) = rt
                    .block_on(mtcp::hedged::connect(&server.to_string(), HEDGE))
                    .expect("hedged connect");
                let s = s.into_std().unwrap();
                s.set_nonblocking(false).unwrap();
                hedged.push((t.elapsed(), took, echoes(s, 100 + k as u8)));
            }
            (plain, hedged)
        })
        .expect("the client's namespace");
    eprintln!("plain connects: {plain:?}");
    eprintln!("hedged connects (elapsed, the winner's own handshake, echoed): {hedged:?}");
    // The rule works: every plain connect lost its first SYN and waited for the kernel's
    // retransmission.
    for (t, ok) in &plain {
        assert!(*t >= Duration::from_millis(900), "plain connect in {t:?}");
        assert!(ok, "plain connection's bytes");
    }
    // Each hedged connect started a second handshake, and counted it
    // (`mtcp_connect_hedges_total`).
    assert!(
        mtcp::hedged::hedges() >= CONNECTS as u64,
        "hedges counted: {}",
        mtcp::hedged::hedges()
    );
    // A hedged connect is answered after the hedge, its own handshake a lab round trip.
    for (t, took, ok) in &hedged {
        assert!(
            *t >= HEDGE && *t < Duration::from_millis(600),
            "hedged in {t:?}"
        );
        assert!(
            *took < Duration::from_millis(300),
            "winner's handshake {took:?}"
        );
        assert!(ok, "hedged connection's bytes");
    }
}
