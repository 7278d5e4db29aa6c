//! The kernel's TCP socket tables read over netlink (`NETLINK_SOCK_DIAG`, what `ss` reads)
//! instead of `/proc/net/tcp`: the fast path's check of who owns a socket, at every connection
//! it opens (`mtcp`'s `sockowner`).
//!
//! Reading `/proc/net/tcp` takes the lock of every bucket of the established-connection hash
//! table, empty or not: ~4.5 ms per read on this machine's 262 144 buckets, twice (IPv4 and
//! IPv6), in the agent and again in the server for every fast-path connection. A dump over
//! netlink asks for the states it needs (listeners only walk the small listening table) and the
//! kernel skips empty buckets without locking them.
//!
//! The request ([`request`]) and the reading of the replies ([`parse`]) are plain functions of
//! bytes, tested here and fuzzed (`fuzz/fuzz_targets/sock_diag.rs`); [`dump`] only moves them,
//! on a socket whose every wait for the kernel ends after [`DUMP_TIMEOUT`].

use crate::netlink::{self, u16_at, u32_at, NLMSG_HDRLEN as HDR};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// One row of a socket table: a TCP socket's addresses, state (`TCP_*`) and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub uid: u32,
}

/// `sock_diag.h`'s request type (not in the libc crate).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
/// How long one `recv` of a dump waits for the kernel (it answers in microseconds; this bounds
/// a bug, and the callers then read `/proc`).
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(2);
/// `struct inet_diag_req_v2`.
const REQ: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, the 48-byte `inet_diag_sockid`,
/// expires, rqueue, wqueue, uid, inode.
const MSG: usize = 72;

/// `TCPF_LISTEN`: only listening sockets.
pub const LISTENING: u32 = 1 << 10;
/// Every TCP state but `LISTEN`.
pub const CONNECTED: u32 = 0xFFF & !LISTENING;

/// A dump request for the TCP sockets of `family` (`AF_INET`/`AF_INET6`) in `states` (a mask of
/// `1 << TCP_*`), numbered `seq`.
pub fn request(family: u8, states: u32, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(HDR + REQ);
    b.extend_from_slice(&((HDR + REQ) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed sockid (48 bytes).
    b.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    b.resize(HDR + REQ, 0);
    b
}

/// An address of an `inet_diag_sockid`: the port in network order, the address as 16 bytes of
/// which IPv4 uses the first 4; a v4-mapped IPv6 address is the IPv4 one.
fn addr(family: u8, ip: &[u8], port: [u8; 2]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(port);
    let ip = match family as libc::c_int {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(..4)?).ok()?)),
        libc::AF_INET6 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(..16)?).ok()?);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One `inet_diag_msg`.
fn row(m: &[u8]) -> Option<Row> {
    let m = m.get(..MSG)?;
    let (family, state) = (m[0], m[1]);
    // The sockid at 4: sport, dport, src (16), dst (16), interface, cookie.
    let local = addr(family, &m[8..24], [m[4], m[5]])?;
    let remote = addr(family, &m[24..40], [m[6], m[7]])?;
    Some(Row {
        local,
        remote,
        state,
        uid: u32_at(m, 64)?,
    })
}

/// The sockets in one `recv`'s worth of replies to request `seq`, and whether the dump ended
/// (`NLMSG_DONE`). An error reply, a reply to another request, or a malformed message is an
/// error.
pub fn parse(buf: &[u8], seq: u32) -> Result<(Vec<Row>, bool), String> {
    let mut rows = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let len = u32_at(buf, at).ok_or("truncated header")? as usize;
        let kind = u16_at(buf, at + 4).ok_or("truncated header")?;
        let got = u32_at(buf, at + 8).ok_or("truncated header")?;
        if len < HDR || at + len > buf.len() {
            return Err(format!("message length {len} at {at} of {}", buf.len()));
        }
        if got != seq {
            return Err(format!("reply to request {got}, not {seq}"));
        }
        let body = &buf[at + HDR..at + len];
        match kind {
            NLMSG_DONE => return Ok((rows, true)),
            NLMSG_ERROR => {
                // A negative errno; anything else (i32::MIN has no negation) is named as is.
                let code = u32_at(body, 0).map_or(0, |c| c as i32);
                return Err(match code.checked_neg() {
                    Some(errno) if errno > 0 => {
                        format!("sock_diag: {}", io::Error::from_raw_os_error(errno))
                    }
                    _ => format!("sock_diag: error reply with code {code}"),
                });
            }
            SOCK_DIAG_BY_FAMILY => rows.push(row(body).ok_or("malformed inet_diag_msg")?),
            k => return Err(format!("unexpected message type {k}")),
        }
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    Ok((rows, false))
}

/// The TCP sockets of `family` in `states`, from the kernel.
pub fn dump(family: u8, states: u32) -> io::Result<Vec<Row>> {
    let fd = netlink::open(libc::SOCK_DGRAM, libc::NETLINK_SOCK_DIAG, DUMP_TIMEOUT)?;
    let seq = 1;
    netlink::send(&fd, &request(family, states, seq))?;
    let mut rows = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = netlink::recv(&fd, &mut buf)
            .map_err(|e| io::Error::new(e.kind(), format!("sock_diag: {e}")))?;
        if n == 0 {
            return Err(io::Error::other(
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
        let (more, done) = parse(&buf[..n], seq).map_err(io::Error::other)?;
        rows.extend(more);
        if done {
            return Ok(rows);
        }
    }
}

/// The TCP sockets in `states`, IPv4 and IPv6.
pub fn tables(states: u32) -> io::Result<Vec<Row>> {
    let mut rows = dump(libc::AF_INET as u8, states)?;
    rows.extend(dump(libc::AF_INET6 as u8, states)?);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, kind: u16, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b
    }

    fn diag(family: u8, state: u8, local: SocketAddr, remote: SocketAddr, uid: u32) -> Vec<u8> {
        let mut m = vec![family, state, 0, 0];
        m.extend_from_slice(&local.port().to_be_bytes());
        m.extend_from_slice(&remote.port().to_be_bytes());
        for a in [local, remote] {
            let mut ip = [0u8; 16];
            match a.ip() {
                IpAddr::V4(v4) => ip[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => ip.copy_from_slice(&v6.octets()),
            }
            m.extend_from_slice(&ip);
        }
        m.extend_from_slice(&[0; 12]); // interface, cookie
        m.extend_from_slice(&[0; 12]); // expires, rqueue, wqueue
        m.extend_from_slice(&uid.to_ne_bytes());
        m.extend_from_slice(&[0; 4]); // inode
        assert_eq!(m.len(), MSG);
        m
    }

    #[test]
    fn a_request_is_a_dump_of_tcp_sockets_in_the_states_asked() {
        let r = request(libc::AF_INET6 as u8, LISTENING, 7);
        assert_eq!(r.len(), HDR + REQ);
        assert_eq!(u32_at(&r, 0), Some((HDR + REQ) as u32));
        assert_eq!(u16_at(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u16_at(&r, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(&r[HDR..HDR + 4], &[libc::AF_INET6 as u8, 6, 0, 0]);
        assert_eq!(u32_at(&r, HDR + 4), Some(1 << 10));
        assert!(r[HDR + 8..].iter().all(|&b| b == 0));
    }

    #[test]
    fn replies_name_each_sockets_addresses_state_and_owner() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut buf = msg(
            3,
            SOCK_DIAG_BY_FAMILY,
            &diag(2, 10, a("127.0.0.1:7000"), a("0.0.0.0:0"), 1000),
        );
        buf.extend(msg(
            3,
            SOCK_DIAG_BY_FAMILY,
            &diag(10, 1, a("[::ffff:127.0.0.1]:7000"), a("[::1]:40000"), 0),
        ));
        let (rows, done) = parse(&buf, 3).unwrap();
        assert!(!done);
        assert_eq!(
            rows,
            vec![
                Row {
                    local: a("127.0.0.1:7000"),
                    remote: a("0.0.0.0:0"),
                    state: 10,
                    uid: 1000
                },
                Row {
                    local: a("127.0.0.1:7000"),
                    remote: a("[::1]:40000"),
                    state: 1,
                    uid: 0
                },
            ]
        );
        buf.extend(msg(3, NLMSG_DONE, &0i32.to_ne_bytes()));
        assert_eq!(parse(&buf, 3).unwrap(), (rows, true));
    }

    #[test]
    fn errors_other_requests_and_malformed_replies_are_errors() {
        let err = msg(3, NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert!(parse(&err, 3).unwrap_err().contains("sock_diag"));
        // Found by the fuzzer: an error code with no negation.
        let odd = msg(3, NLMSG_ERROR, &i32::MIN.to_ne_bytes());
        assert!(parse(&odd, 3).unwrap_err().contains(&i32::MIN.to_string()));
        let done = msg(4, NLMSG_DONE, &[0; 4]);
        assert!(parse(&done, 3).unwrap_err().contains("request 4"));
        let short = msg(3, SOCK_DIAG_BY_FAMILY, &[2, 1, 0]);
        assert!(parse(&short, 3).is_err());
        let mut long = msg(3, NLMSG_DONE, &[0; 4]);
        long[0] = 200;
        assert!(parse(&long, 3).is_err());
        assert!(parse(&[1, 2, 3], 3).is_err());
        assert_eq!(parse(&[], 3).unwrap(), (Vec::new(), false));
    }

    #[test]
    fn the_kernel_lists_a_listener_of_ours() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(at).unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let listening = tables(LISTENING).unwrap();
        assert!(
            listening.iter().any(|r| r.local == at && r.uid == me),
            "{listening:?}"
        );
        let connected = tables(CONNECTED).unwrap();
        let mine = c.local_addr().unwrap();
        assert!(
            connected
                .iter()
                .any(|r| r.local == mine && r.remote == at && r.uid == me && r.state == 1),
            "{connected:?}"
        );
        assert!(connected.iter().all(|r| r.state != 10));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_panic(d in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            if let Ok((rows, _)) = parse(&d, 0) {
                proptest::prop_assert!(rows.len() * (HDR + MSG) <= d.len());
            }
        }
    }
}
