//! Adding and deleting one element of an nftables set over netlink (`NETLINK_NETFILTER`),
//! without the `nft` tool: what puts a [`crate::Fence`] up and takes it down.
//!
//! Each change is one batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_NEWSETELEM` or
//! `NFT_MSG_DELSETELEM` with `NLM_F_ACK`, `NFNL_MSG_BATCH_END`) in one `send`, and the kernel's
//! acknowledgement in one `recv`: it arrives after the batch's transaction committed, so when
//! [`Netlink::change`] returns `Ok` the set holds (or no longer holds) the element. A change
//! through the long-lived `nft -i` process this replaces cost ~0.66 ms (the tool parses the
//! command, refreshes its cache and lists the set to confirm); this is two system calls.
//!
//! The encoding ([`encode_change`]) and the reading of replies ([`acks`]) are plain functions of
//! bytes, tested here and fuzzed (`fuzz/fuzz_targets/netlink_acks.rs`); the socket only moves
//! them. The set's key is a concatenation (`ipv4_addr . inet_service . ipv4_addr .
//! inet_service`, or the IPv6 one): each field in network order, padded to 4 bytes (nftables'
//! register size), so 16 bytes for IPv4 and 40 for IPv6.

use crate::netlink::{self, u16_at, u32_at, NLMSG_HDRLEN};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

// nf_tables.h attribute numbers (stable kernel ABI, not in the libc crate).
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
/// `NLMSGERR_ATTR_MSG`: the kernel's text for an error (extended ACK).
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Longest reply read at once; an ACK is 36 bytes, an error with its request and text < 1 KiB.
const RECV_BUF: usize = 8 << 10;
/// Replies read for one change before it counts as lost (stale replies of timed-out changes).
const MAX_REPLIES: usize = 16;
/// How long the kernel may take to answer (it answers in microseconds; this bounds a bug).
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// Add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// The key of one flow in a fence set: `saddr . sport . daddr . dport` of the packets dropped
/// (from `remote` to `local`). `None` for mixed address families.
pub fn flow_key(local: SocketAddr, remote: SocketAddr) -> Option<Vec<u8>> {
    let mut k = Vec::with_capacity(40);
    for a in [remote, local] {
        match a.ip() {
            IpAddr::V4(ip) => k.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => k.extend_from_slice(&ip.octets()),
        }
        k.extend_from_slice(&a.port().to_be_bytes());
        k.extend_from_slice(&[0, 0]);
    }
    (local.is_ipv4() == remote.is_ipv4()).then_some(k)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends an attribute; `body` writes its payload. Returns nothing: lengths are patched in.
fn attr(buf: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    body(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    buf.resize(align4(buf.len()), 0);
}

fn cstr(buf: &mut Vec<u8>, kind: u16, s: &str) {
    attr(buf, kind, |b| {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    });
}

/// Appends one netlink message with an `nfgenmsg` header; `body` writes its attributes.
fn message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(libc::NFNETLINK_V0 as u8);
    buf.extend_from_slice(&res_id.to_be_bytes());
    body(buf);
    buf.resize(align4(buf.len()), 0);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// The batch that adds `key` to (or deletes it from) `set` of the `inet` table `table`: begin
/// (sequence `seq`), the change (`seq + 1`, the one acknowledged), end (`seq + 2`). An element
/// added with `timeout_ms` is removed by the kernel after that long (the set needs
/// `flags timeout`).
pub fn encode_change(
    op: Op,
    table: &str,
    set: &str,
    key: &[u8],
    timeout_ms: Option<u64>,
    seq: u32,
) -> Vec<u8> {
    let nested = libc::NLA_F_NESTED as u16;
    let subsys = libc::NFNL_SUBSYS_NFTABLES as u16;
    let mut b = Vec::with_capacity(160);
    let req = libc::NLM_F_REQUEST as u16;
    message(
        &mut b,
        libc::NFNL_MSG_BATCH_BEGIN as u16,
        req,
        seq,
        libc::AF_UNSPEC as u8,
        subsys,
        |_| {},
    );
    let (kind, flags) = match op {
        Op::Add => (libc::NFT_MSG_NEWSETELEM, req | (libc::NLM_F_CREATE as u16)),
        Op::Delete => (libc::NFT_MSG_DELSETELEM, req),
    };
    message(
        &mut b,
        (subsys << 8) | kind as u16,
        flags | libc::NLM_F_ACK as u16,
        seq.wrapping_add(1),
        libc::NFPROTO_INET as u8,
        0,
        |b| {
            cstr(b, NFTA_SET_ELEM_LIST_TABLE, table);
            cstr(b, NFTA_SET_ELEM_LIST_SET, set);
            attr(b, NFTA_SET_ELEM_LIST_ELEMENTS | nested, |b| {
                attr(b, NFTA_LIST_ELEM | nested, |b| {
                    attr(b, NFTA_SET_ELEM_KEY | nested, |b| {
                        attr(b, NFTA_DATA_VALUE, |b| b.extend_from_slice(key))
                    });
                    if let (Op::Add, Some(ms)) = (op, timeout_ms) {
                        attr(b, NFTA_SET_ELEM_TIMEOUT, |b| {
                            b.extend_from_slice(&ms.to_be_bytes())
                        });
                    }
                })
            });
        },
    );
    message(
        &mut b,
        libc::NFNL_MSG_BATCH_END as u16,
        req,
        seq.wrapping_add(2),
        libc::AF_UNSPEC as u8,
        subsys,
        |_| {},
    );
    b
}

/// One acknowledgement or error (`NLMSG_ERROR`) read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The sequence number of the message it answers.
    pub seq: u32,
    /// 0, or the negated errno.
    pub error: i32,
    /// The kernel's text for the error (extended ACK), if it gave one.
    pub text: Option<String>,
}

/// Reads the `NLMSG_ERROR` messages (ACKs and errors) of one datagram from the kernel; other
/// messages are skipped. A malformed datagram is an error, never a panic.
pub fn acks(buf: &[u8]) -> Result<Vec<Ack>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let len = u32_at(buf, at).ok_or("truncated netlink header")? as usize;
        if len < NLMSG_HDRLEN || len > buf.len() - at {
            return Err(format!(
                "netlink message length {len} at offset {at} of {}",
                buf.len()
            ));
        }
        let msg = &buf[at..at + len];
        let kind = u16_at(msg, 4).ok_or("truncated")?;
        let flags = u16_at(msg, 6).ok_or("truncated")?;
        let seq = u32_at(msg, 8).ok_or("truncated")?;
        if kind == libc::NLMSG_ERROR as u16 {
            let error =
                u32_at(msg, NLMSG_HDRLEN).ok_or("netlink error message without its code")? as i32;
            // After the code: the request's header, and its payload unless capped or an ACK.
            let req_len = u32_at(msg, NLMSG_HDRLEN + 4).unwrap_or(0) as usize;
            let capped = flags & libc::NLM_F_CAPPED as u16 != 0 || error == 0;
            let skip = if capped {
                NLMSG_HDRLEN
            } else {
                align4(req_len.max(NLMSG_HDRLEN))
            };
            let mut text = None;
            if flags & libc::NLM_F_ACK_TLVS as u16 != 0 {
                let tlvs = msg.get(NLMSG_HDRLEN + 4 + skip..).unwrap_or(&[]);
                text = ack_text(tlvs);
            }
            out.push(Ack { seq, error, text });
        }
        at += align4(len);
    }
    Ok(out)
}

/// The `NLMSGERR_ATTR_MSG` attribute of an extended ACK's attributes, if present and sound.
fn ack_text(mut tlvs: &[u8]) -> Option<String> {
    while tlvs.len() >= 4 {
        let len = u16_at(tlvs, 0)? as usize;
        let kind = u16_at(tlvs, 2)? & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let v = &tlvs[4..len];
            let v = v.split(|&c| c == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        tlvs = tlvs.get(align4(len)..)?;
    }
    None
}

/// A `NETLINK_NETFILTER` socket and its next sequence number.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens the socket (needs CAP_NET_ADMIN for changes, not for opening).
    pub fn open() -> io::Result<Netlink> {
        let fd = netlink::open(libc::SOCK_RAW, libc::NETLINK_NETFILTER, RECV_TIMEOUT)?;
        let on: libc::c_int = 1;
        // SAFETY: a valid pointer to an int of the size given. Extended ACKs are best effort
        // (their text only improves error messages).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_EXT_ACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Netlink {
            fd,
            seq: seed,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Adds `key` to `set` of the `inet` table `table` (for `timeout_ms` if given), or deletes
    /// it; returns once the kernel committed the change (or refused it: the error names the
    /// kernel's reason).
    pub fn change(
        &mut self,
        op: Op,
        table: &str,
        set: &str,
        key: &[u8],
        timeout_ms: Option<u64>,
    ) -> io::Result<()> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(3);
        let msg = encode_change(op, table, set, key, timeout_ms, seq);
        let want = seq.wrapping_add(1);
        netlink::send(&self.fd, &msg)?;
        for _ in 0..MAX_REPLIES {
            let n = netlink::recv(&self.fd, &mut self.buf).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("no answer from the kernel's nftables: {e}"),
                )
            })?;
            let replies =
                acks(&self.buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Replies to other sequence numbers belong to changes that timed out: skipped.
            if let Some(a) = replies.into_iter().find(|a| a.seq == want) {
                if a.error == 0 {
                    return Ok(());
                }
                let e = io::Error::from_raw_os_error(-a.error);
                return Err(match a.text {
                    Some(t) => io::Error::new(e.kind(), format!("{e}: {t}")),
                    None => e,
                });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's nftables sent replies to other requests only",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_key_is_each_field_padded_to_four_bytes() {
        let k = flow_key(
            "127.0.0.1:17500".parse().unwrap(),
            "10.0.0.2:40000".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            k,
            [10, 0, 0, 2, 0x9c, 0x40, 0, 0, 127, 0, 0, 1, 0x44, 0x5c, 0, 0]
        );
        let k6 = flow_key("[::1]:1".parse().unwrap(), "[::2]:2".parse().unwrap()).unwrap();
        assert_eq!(k6.len(), 40);
        assert_eq!(&k6[16..20], &[0, 2, 0, 0]);
        assert!(flow_key("[::1]:1".parse().unwrap(), "1.2.3.4:5".parse().unwrap()).is_none());
    }

    #[test]
    fn a_change_is_three_messages_and_only_the_middle_one_asks_for_an_ack() {
        let b = encode_change(Op::Delete, "mtcp_fence_7", "f4", &[1; 16], Some(5), 100);
        let mut at = 0;
        let mut seen = Vec::new();
        while at < b.len() {
            let len = u32_at(&b, at).unwrap() as usize;
            assert_eq!(len % 4, 0);
            let kind = u16_at(&b, at + 4).unwrap();
            let flags = u16_at(&b, at + 6).unwrap();
            let seq = u32_at(&b, at + 8).unwrap();
            seen.push((kind, flags & libc::NLM_F_ACK as u16 != 0, seq));
            at += len;
        }
        assert_eq!(at, b.len());
        let del = (10u16 << 8) | libc::NFT_MSG_DELSETELEM as u16;
        assert_eq!(
            seen,
            [
                (libc::NFNL_MSG_BATCH_BEGIN as u16, false, 100),
                (del, true, 101),
                (libc::NFNL_MSG_BATCH_END as u16, false, 102)
            ]
        );
        // The key is in there, as the innermost attribute's value.
        assert!(b
            .windows(20)
            .any(|w| w[..4] == [20, 0, 1, 0] && w[4..] == [1; 16]));
    }

    fn error_msg(seq: u32, error: i32, flags: u16, extra: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = (NLMSG_HDRLEN + 4 + NLMSG_HDRLEN + extra.len()) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        m.extend_from_slice(&[0; NLMSG_HDRLEN - 4]);
        m.extend_from_slice(extra);
        m
    }

    #[test]
    fn acks_and_errors_with_their_text_are_read() {
        let mut d = error_msg(5, 0, libc::NLM_F_CAPPED as u16, &[]);
        let mut tlv = Vec::new();
        cstr(&mut tlv, NLMSGERR_ATTR_MSG, "no such set");
        d.extend(error_msg(
            6,
            -libc::ENOENT,
            (libc::NLM_F_CAPPED | libc::NLM_F_ACK_TLVS) as u16,
            &tlv,
        ));
        let a = acks(&d).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].seq, a[0].error, a[0].text.as_deref()), (5, 0, None));
        assert_eq!(
            (a[1].seq, a[1].error, a[1].text.as_deref()),
            (6, -libc::ENOENT, Some("no such set"))
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let d = error_msg(5, 0, 0, &[]);
        assert!(acks(&d[..10]).is_err());
        let mut long = d.clone();
        long[0] = 200;
        assert!(acks(&long).is_err());
        let mut short = d.clone();
        short[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(acks(&short).is_err());
        // An error message cut after its header: no code.
        let mut cut = d[..NLMSG_HDRLEN].to_vec();
        cut[0..4].copy_from_slice(&(NLMSG_HDRLEN as u32).to_ne_bytes());
        assert!(acks(&cut).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_read_without_panic(d in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = acks(&d);
        }
    }
}
