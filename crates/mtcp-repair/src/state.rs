//! [`TcpState`]: what a frozen connection is, and its encoding between processes.

use crate::{RepairError, MAX_QUEUE};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Everything needed to recreate an established connection (`soccr`'s `libsoccr_sk_data`
/// plus the queues' bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `write_seq`: the sequence number after the last byte the application wrote.
    pub send_seq: u32,
    /// `rcv_nxt`: the sequence number after the last byte received.
    pub recv_seq: u32,
    /// Output not yet acknowledged by the peer, oldest first (`SIOCOUTQ` bytes).
    #[serde(with = "serde_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent (`SIOCOUTQNSD`).
    pub unsent: u32,
    /// Input received but not read by the application (`SIOCINQ` bytes).
    #[serde(with = "serde_bytes")]
    pub recv_queue: Vec<u8>,
    pub mss: u32,
    /// `tcpi_options` (timestamps, SACK, window scaling).
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// The connection's TCP timestamp clock (`TCP_TIMESTAMP`), if timestamps are on.
    pub timestamp: u32,
    pub window: Window,
}

/// Version of [`TcpState::encode`]'s format (its first byte).
pub const STATE_VERSION: u8 = 1;

impl TcpState {
    /// The state as bytes to carry to another process or host: a version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        // Sized for the queues up front: one copy of them, no reallocation.
        let mut out = Vec::with_capacity(self.send_queue.len() + self.recv_queue.len() + 128);
        out.push(STATE_VERSION);
        postcard::to_extend(self, out).expect("a TcpState always serializes")
    }

    /// [`TcpState::encode`]'s bytes for this state with a send queue of `len` bytes that `fill`
    /// appends where it belongs (this state's own send queue must be empty): the queue is
    /// written once, straight into the encoding.
    pub(crate) fn encode_around(
        &self,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), RepairError>,
    ) -> Result<Vec<u8>, RepairError> {
        debug_assert!(self.send_queue.is_empty());
        let ser = |e: postcard::Error| RepairError::Invalid(format!("encoding the state: {e}"));
        let mut out = Vec::with_capacity(len + self.recv_queue.len() + 128);
        out.push(STATE_VERSION);
        // The fields in declaration order, as postcard writes a struct; a byte string is its
        // length (a varint, as a `usize` is written) and its bytes.
        let mut out = postcard::to_extend(
            &(self.local, self.remote, self.send_seq, self.recv_seq, len),
            out,
        )
        .map_err(ser)?;
        let start = out.len();
        fill(&mut out)?;
        if out.len() != start + len {
            return Err(RepairError::Invalid(format!(
                "send queue of {} bytes, expected {len}",
                out.len() - start
            )));
        }
        postcard::to_extend(
            &(
                self.unsent,
                serde_bytes::Bytes::new(&self.recv_queue),
                self.mss,
                self.options,
                self.snd_wscale,
                self.rcv_wscale,
                self.timestamp,
                self.window,
            ),
            out,
        )
        .map_err(ser)
    }

    /// Reads a state [`TcpState::encode`] wrote, checking it as [`restore`](crate::restore()) would: an unknown
    /// version, trailing bytes, oversized queues or inconsistent fields are errors.
    pub fn decode(bytes: &[u8]) -> Result<TcpState, RepairError> {
        let Some((&v, body)) = bytes.split_first() else {
            return Err(RepairError::Invalid("empty TCP state".into()));
        };
        if v != STATE_VERSION {
            return Err(RepairError::Invalid(format!(
                "TCP state version {v}, this build reads {STATE_VERSION}"
            )));
        }
        if body.len() > 2 * MAX_QUEUE + 4096 {
            return Err(RepairError::Invalid("TCP state too large".into()));
        }
        let (st, rest): (TcpState, &[u8]) = postcard::take_from_bytes(body)
            .map_err(|e| RepairError::Invalid(format!("malformed TCP state: {e}")))?;
        if !rest.is_empty() {
            return Err(RepairError::Invalid(format!(
                "{} bytes after the TCP state",
                rest.len()
            )));
        }
        st.check()?;
        Ok(st)
    }

    /// What [`restore`](crate::restore()) requires of a state before it touches a socket.
    pub(crate) fn check(&self) -> Result<(), RepairError> {
        if self.send_queue.len() > MAX_QUEUE || self.recv_queue.len() > MAX_QUEUE {
            return Err(RepairError::Invalid(
                "queue larger than any socket buffer".into(),
            ));
        }
        if self.unsent as usize > self.send_queue.len() {
            return Err(RepairError::Invalid("more unsent bytes than queued".into()));
        }
        if self.local.is_ipv4() != self.remote.is_ipv4() {
            return Err(RepairError::Invalid(
                "local and remote address families differ".into(),
            ));
        }
        Ok(())
    }

    /// Forgets the output that was queued but never sent (the new socket's owner will
    /// regenerate it instead of carrying it); returns how many bytes that was. The sequence
    /// numbers stay consistent: the connection continues as if those bytes had never been
    /// written.
    pub fn drop_unsent(&mut self) -> usize {
        let n = (self.unsent as usize).min(self.send_queue.len());
        self.send_queue.truncate(self.send_queue.len() - n);
        self.send_seq = self.send_seq.wrapping_sub(n as u32);
        self.unsent = 0;
        n
    }

    /// The output queued but never sent, which the new socket's owner must write first.
    pub fn unsent_bytes(&self) -> &[u8] {
        let n = (self.unsent as usize).min(self.send_queue.len());
        &self.send_queue[self.send_queue.len() - n..]
    }
}

/// `struct tcp_repair_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore;
    use proptest::prelude::*;

    /// An IPv4 state with empty queues, for the tests to vary.
    fn small_state() -> TcpState {
        TcpState {
            local: addr(false, 1),
            remote: addr(false, 2),
            send_seq: 0,
            recv_seq: 0,
            send_queue: Vec::new(),
            unsent: 0,
            recv_queue: Vec::new(),
            mss: 1460,
            options: 0,
            snd_wscale: 0,
            rcv_wscale: 0,
            timestamp: 0,
            window: Window::default(),
        }
    }

    fn addr(v6: bool, port: u16) -> SocketAddr {
        if v6 {
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port))
        } else {
            SocketAddr::from(([127, 0, 0, 1], port))
        }
    }

    prop_compose! {
        fn states()(
            v6 in any::<bool>(),
            ports in any::<(u16, u16)>(),
            seqs in any::<(u32, u32)>(),
            send_queue in proptest::collection::vec(any::<u8>(), 0..2000),
            unsent_frac in 0.0f64..=1.0,
            recv_queue in proptest::collection::vec(any::<u8>(), 0..2000),
            mss in any::<u32>(),
            options in any::<u8>(),
            scales in (0u8..15, 0u8..15),
            timestamp in any::<u32>(),
            w in any::<[u32; 5]>(),
        ) -> TcpState {
            let unsent = (send_queue.len() as f64 * unsent_frac) as u32;
            TcpState {
                local: addr(v6, ports.0),
                remote: addr(v6, ports.1),
                send_seq: seqs.0,
                recv_seq: seqs.1,
                send_queue,
                unsent,
                recv_queue,
                mss,
                options,
                snd_wscale: scales.0,
                rcv_wscale: scales.1,
                timestamp,
                window: Window { snd_wl1: w[0], snd_wnd: w[1], max_window: w[2], rcv_wnd: w[3], rcv_wup: w[4] },
            }
        }
    }

    proptest! {
        #[test]
        fn states_round_trip(st in states()) {
            let b = st.encode();
            prop_assert_eq!(TcpState::decode(&b).unwrap(), st.clone());
            prop_assert_eq!(st.unsent_bytes().len(), st.unsent as usize);
        }

        #[test]
        fn a_state_encoded_around_its_send_queue_is_the_plain_encoding(st in states()) {
            let mut st = st;
            st.drop_unsent();
            let q = std::mem::take(&mut st.send_queue);
            let b = st
                .encode_around(q.len(), |out| {
                    out.extend_from_slice(&q);
                    Ok(())
                })
                .unwrap();
            st.send_queue = q;
            prop_assert_eq!(b, st.encode());
        }

        #[test]
        fn damaged_states_are_errors_not_panics(st in states(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
            let b = st.encode();
            let _ = TcpState::decode(&b[..cut.index(b.len())]);
            let mut d = b.clone();
            let i = flip.0.index(d.len());
            d[i] ^= flip.1 | 1;
            if let Ok(got) = TcpState::decode(&d) {
                prop_assert!(got.check().is_ok());
            }
        }
    }

    #[test]
    fn wrong_version_trailing_bytes_and_inconsistent_fields_are_refused() {
        let st = TcpState {
            send_queue: vec![1, 2, 3],
            unsent: 1,
            ..small_state()
        };
        let mut b = st.encode();
        b[0] = 9;
        assert!(TcpState::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let mut b = st.encode();
        b.push(0);
        assert!(TcpState::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("after the TCP state"));
        let bad = TcpState {
            unsent: 4,
            ..st.clone()
        };
        // Refused by `decode` and, before any socket call, by `restore`.
        assert!(TcpState::decode(&bad.encode()).is_err());
        assert!(matches!(restore(&bad), Err(RepairError::Invalid(_))));
        let mixed = TcpState {
            remote: addr(true, 2),
            ..st
        };
        assert!(TcpState::decode(&mixed.encode()).is_err());
        assert!(matches!(restore(&mixed), Err(RepairError::Invalid(_))));
        assert!(TcpState::decode(&[]).is_err());
    }

    #[test]
    fn a_send_queue_filled_short_or_long_is_an_error() {
        let st = TcpState {
            recv_queue: vec![5; 3],
            ..small_state()
        };
        for n in [3, 5] {
            let r = st.encode_around(4, |out| {
                out.extend(std::iter::repeat_n(1, n));
                Ok(())
            });
            assert!(matches!(r, Err(RepairError::Invalid(_))), "{n} bytes");
        }
    }
}
