//! Who owns a TCP socket of this network namespace, from the kernel's socket tables (over
//! netlink, [`mtcp_repair::sockdiag`]; `/proc/net/tcp` and `tcp6` where that fails): the fast path's
//! stand-in for `SO_PEERCRED`, which Unix sockets have and TCP does not (see
//! `mtcp_proto::adopt`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `TCP_LISTEN` in the tables' `st` column.
const LISTEN: u8 = 0x0A;

pub(crate) use mtcp_repair::sockdiag::Row;

/// An address as the tables print it: the IP's 32-bit words in hex, each in the host's byte
/// order, then `:` and the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = Ipv6Addr::from(b);
            // A v4-mapped address is the IPv4 one.
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The rows of one table's text (the header and malformed lines are skipped).
pub(crate) fn parse_table(text: &str) -> Vec<Row> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Row {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
            })
        })
        .collect()
}

/// The sockets in `states` (a [`mtcp_repair::sockdiag`] mask). Over netlink; if that fails, from
/// `/proc`, which lists every state and costs a lock per hash bucket (milliseconds).
fn rows(states: u32) -> Vec<Row> {
    match mtcp_repair::sockdiag::tables(states) {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!("sock_diag: {e}; reading /proc/net/tcp instead");
            ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .flat_map(|t| parse_table(&t))
                .collect()
        }
    }
}

/// The last table of connected sockets: when its dump began, and its rows.
static CONNECTED_DUMP: Mutex<Option<(Instant, Arc<Vec<Row>>)>> = Mutex::new(None);

/// The connected sockets as of a moment after `since`: the rows of a dump that began after it.
/// Callers that asked before a dump began share it, so a burst of sessions opening costs one
/// dump per dump's duration rather than one each (a dump lists every connection on the host).
fn connected_since(since: Instant) -> Arc<Vec<Row>> {
    let mut last = CONNECTED_DUMP.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((began, rows)) = last.as_ref() {
        if *began >= since {
            return rows.clone();
        }
    }
    let began = Instant::now();
    let fresh = Arc::new(rows(mtcp_repair::sockdiag::CONNECTED));
    *last = Some((began, fresh.clone()));
    fresh
}

/// A fast-path session's view of the socket tables when it begins (at a moment after `since`,
/// when its HELLO arrived): the owner of its other end (at `local`, connected to `remote`), and
/// the connections that owner holds on the addresses in `listed` — the only ones it may hand
/// over (its clients' connections, accepted by then).
pub(crate) fn session_view(
    since: Instant,
    local: SocketAddr,
    remote: SocketAddr,
    listed: &[SocketAddr],
) -> (Option<u32>, Vec<(SocketAddr, SocketAddr)>) {
    let rows = connected_since(since);
    let Some(owner) = owner_in(&rows, local, remote) else {
        return (None, Vec::new());
    };
    (Some(owner), held_in(&rows, owner, listed))
}

/// The connections (local, remote) of `uid`'s sockets on the addresses in `listed`.
fn held_in(rows: &[Row], uid: u32, listed: &[SocketAddr]) -> Vec<(SocketAddr, SocketAddr)> {
    let listed: Vec<SocketAddr> = listed.iter().map(|&a| norm(a)).collect();
    rows.iter()
        .filter(|r| r.state != LISTEN && r.uid == uid && listed.contains(&r.local))
        .map(|r| (r.local, r.remote))
        .collect()
}

/// An address as the tables show it: a v4-mapped IPv6 address is the IPv4 one.
pub(crate) fn norm(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        _ => a,
    }
}

/// Owner of the socket listening on `addr` (or on the wildcard address of its port).
pub(crate) fn listener_owner(addr: SocketAddr) -> Option<u32> {
    listener_in(&rows(mtcp_repair::sockdiag::LISTENING), addr)
}

fn owner_in(rows: &[Row], local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (norm(local), norm(remote));
    rows.iter()
        .find(|r| r.state != LISTEN && r.local == local && r.remote == remote)
        .map(|r| r.uid)
}

fn listener_in(rows: &[Row], addr: SocketAddr) -> Option<u32> {
    rows.iter()
        .filter(|r| r.state == LISTEN && r.local.port() == addr.port())
        .find(|r| r.local.ip() == addr.ip() || r.local.ip().is_unspecified())
        .map(|r| r.uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as a little-endian kernel prints them.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1B59 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D431 0100007F:1B58 01 00000000:00000000 00:00000000 00000000 65534        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1003 1 0000000000000000 100 0 0 10 0
   3: garbage
";

    #[test]
    fn tables_name_each_sockets_owner() {
        if cfg!(target_endian = "big") {
            return;
        }
        let rows = parse_table(TCP);
        assert_eq!(rows.len(), 3);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            owner_in(&rows, a("127.0.0.1:54321"), a("127.0.0.1:7000")),
            Some(65534)
        );
        assert_eq!(
            owner_in(&rows, a("127.0.0.1:54321"), a("127.0.0.1:7001")),
            None
        );
        assert_eq!(listener_in(&rows, a("127.0.0.1:7001")), Some(0));
        assert_eq!(listener_in(&rows, a("127.0.0.9:8080")), Some(1000));
        assert_eq!(listener_in(&rows, a("127.0.0.1:7002")), None);
        // Only uid 65534's connections on the listed address.
        assert_eq!(
            held_in(&rows, 65534, &[a("127.0.0.1:54321")]),
            vec![(a("127.0.0.1:54321"), a("127.0.0.1:7000"))]
        );
        assert!(held_in(&rows, 0, &[a("127.0.0.1:54321")]).is_empty());
        assert!(held_in(&rows, 65534, &[a("127.0.0.1:7001")]).is_empty());
        // v4-mapped in tcp6.
        let v6 = parse_addr("0000000000000000FFFF00000100007F:1B59").unwrap();
        assert_eq!(v6, a("127.0.0.1:7001"));
    }

    #[test]
    fn this_processs_own_sockets_are_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(listener_owner(l.local_addr().unwrap()), Some(me));
        // The client end's owner, and the accepted connection on the listed address.
        let (owner, held) = session_view(
            Instant::now(),
            c.local_addr().unwrap(),
            c.peer_addr().unwrap(),
            &[l.local_addr().unwrap()],
        );
        assert_eq!(owner, Some(me));
        assert!(
            held.contains(&(
                accepted.local_addr().unwrap(),
                accepted.peer_addr().unwrap()
            )),
            "{held:?}"
        );
        // A view asked after that dump began never comes from it: a connection opened since
        // is in it.
        let asked = Instant::now();
        let c2 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted2, _) = l.accept().unwrap();
        let (_, held) = session_view(
            Instant::now(),
            c2.local_addr().unwrap(),
            c2.peer_addr().unwrap(),
            &[l.local_addr().unwrap()],
        );
        assert!(held.contains(&(
            accepted2.local_addr().unwrap(),
            accepted2.peer_addr().unwrap()
        )));
        // One asked before the last dump began shares it.
        assert!(Arc::ptr_eq(
            &connected_since(asked),
            &connected_since(asked)
        ));
    }
}
