//! Per-frame authentication of peer and admin channels.
//!
//! After the handshake (see [`crate::auth::ChannelContext`]) each side holds two
//! [`ChannelMac`]s, one per direction, keyed by [`crate::ClusterKey::channel_macs`]. Every frame
//! on the channel is then followed by a tag:
//!
//! ```text
//! [kind: u8][len: u32 BE][payload] [seq: u64 BE][HMAC-SHA256(dir key, "mtcp-frame-v1", dir, seq, frame): 32]
//! ```
//!
//! `seq` counts the frames of one direction from 0. The receiver checks the MAC before it looks
//! at the payload, then that `seq` is exactly the next one: a forged or altered frame, a frame
//! from another channel or direction, a replayed, reordered or dropped frame and a cut-off tag
//! are all refused, and the channel must then be closed. The session channel (agent ↔ server)
//! does not use this.

use crate::auth::{ChannelContext, Role};
pub use crate::wire::MacError;
use crate::wire::{Frame, FrameDecoder, Msg, WireError};
use crate::ClusterKey;
use bytes::{Buf, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// Length of the sequence number in a tag.
pub const SEQ_LEN: usize = 8;
/// Length of the MAC in a tag.
pub const MAC_LEN: usize = 32;
/// Length of the tag after every frame of an authenticated channel.
pub const TAG_LEN: usize = SEQ_LEN + MAC_LEN;

/// The direction of a channel a key and its frames belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    OpenerToAcceptor,
    AcceptorToOpener,
}

impl Direction {
    pub(crate) fn label(self) -> &'static [u8] {
        match self {
            Direction::OpenerToAcceptor => b"opener-to-acceptor",
            Direction::AcceptorToOpener => b"acceptor-to-opener",
        }
    }
}

/// One direction of an authenticated channel: its key and the next sequence number.
#[derive(Clone)]
pub struct ChannelMac {
    key: [u8; 32],
    dir: Direction,
    next_seq: u64,
}

impl fmt::Debug for ChannelMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelMac")
            .field("dir", &self.dir)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl ChannelMac {
    /// A direction starting at sequence number 0 (keys come from
    /// [`crate::ClusterKey::channel_macs`]).
    pub fn new(key: [u8; 32], dir: Direction) -> Self {
        Self {
            key,
            dir,
            next_seq: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn key(&self) -> [u8; 32] {
        self.key
    }

    pub fn direction(&self) -> Direction {
        self.dir
    }

    /// The sequence number of the next frame sealed or opened.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn hmac(&self, seq: u64) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in [
            b"mtcp-frame-v1".as_slice(),
            self.dir.label(),
            &seq.to_be_bytes(),
        ] {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The tag for `frame` (the whole frame: header and payload), consuming a sequence number.
    pub fn seal(&mut self, frame: &[u8]) -> [u8; TAG_LEN] {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut m = self.hmac(seq);
        m.update(&(frame.len() as u32).to_be_bytes());
        m.update(frame);
        let mut tag = [0u8; TAG_LEN];
        tag[..SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
        tag[SEQ_LEN..].copy_from_slice(&m.finalize().into_bytes());
        tag
    }

    /// Checks `tag` for `frame`: the MAC first (in constant time), then that its sequence
    /// number is the next one. Only an accepted frame consumes a sequence number.
    pub fn open(&mut self, frame: &[u8], tag: &[u8]) -> Result<(), MacError> {
        let expected = self.next_seq;
        let Some((seq, mac)) = tag.split_first_chunk::<SEQ_LEN>() else {
            return Err(MacError::Truncated { have: tag.len() });
        };
        if mac.len() != MAC_LEN {
            return Err(MacError::Truncated { have: tag.len() });
        }
        let seq = u64::from_be_bytes(*seq);
        let mut m = self.hmac(seq);
        m.update(&(frame.len() as u32).to_be_bytes());
        m.update(frame);
        if m.verify_slice(mac).is_err() {
            return Err(MacError::BadMac { expected });
        }
        match seq.cmp(&expected) {
            std::cmp::Ordering::Less => Err(MacError::Replayed { seq, expected }),
            std::cmp::Ordering::Greater => Err(MacError::OutOfOrder { seq, expected }),
            std::cmp::Ordering::Equal => {
                self.next_seq += 1;
                Ok(())
            }
        }
    }
}

/// `m` as one frame followed by its tag, ready to write.
pub fn seal_msg(mac: &mut ChannelMac, m: &Msg) -> BytesMut {
    let mut out = BytesMut::new();
    m.encode(&mut out);
    let tag = mac.seal(&out);
    out.extend_from_slice(&tag);
    out
}

/// Takes one complete frame and its tag off the front of `buf`, or returns `Ok(None)` if more
/// bytes are needed (nothing is consumed then). The frame's bytes are decoded only once its
/// tag has been checked. On error the channel must be closed.
pub fn decode_sealed(
    dec: &FrameDecoder,
    mac: &mut ChannelMac,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, WireError> {
    let Some(frame_len) = dec.frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < frame_len + TAG_LEN {
        buf.reserve(frame_len + TAG_LEN - buf.len());
        return Ok(None);
    }
    mac.open(&buf[..frame_len], &buf[frame_len..frame_len + TAG_LEN])?;
    let mut frame = buf.split_to(frame_len);
    buf.advance(TAG_LEN);
    match dec.decode(&mut frame)? {
        Some(f) if frame.is_empty() => Ok(Some(f)),
        _ => unreachable!("frame_len measured one whole frame"),
    }
}

impl ClusterKey {
    /// The per-channel MAC states of one side of an authenticated channel: `(send, receive)`.
    /// Each direction has its own key, derived from the cluster key and the whole channel
    /// context (both ids, the port kind, both nonces) with a direction label, so frames of one
    /// direction can be neither reflected into the other nor moved to another channel.
    pub fn channel_macs(&self, ctx: &ChannelContext<'_>, me: Role) -> (ChannelMac, ChannelMac) {
        let key = |dir: Direction| {
            let mut parts = ctx.parts(b"mtcp-channel-key-v1");
            parts.push(dir.label());
            self.mac(&parts)
        };
        let (send, recv) = match me {
            Role::Opener => (Direction::OpenerToAcceptor, Direction::AcceptorToOpener),
            Role::Acceptor => (Direction::AcceptorToOpener, Direction::OpenerToAcceptor),
        };
        (
            ChannelMac::new(key(send), send),
            ChannelMac::new(key(recv), recv),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ChannelContext, PortKind, Role};
    use crate::ClusterKey;

    fn pair() -> (ChannelMac, ChannelMac) {
        let k = ClusterKey::from_bytes([5; 32]);
        let ctx = ChannelContext {
            kind: PortKind::Peer,
            opener: "s1",
            acceptor: "s2",
            acceptor_nonce: [1; 16],
            opener_nonce: [2; 16],
        };
        let (send, _) = k.channel_macs(&ctx, Role::Opener);
        let (_, recv) = k.channel_macs(&ctx, Role::Acceptor);
        (send, recv)
    }

    fn frame(m: &Msg) -> Vec<u8> {
        m.to_frame().to_vec()
    }

    #[test]
    fn sealed_frames_open_in_order() {
        let (mut s, mut r) = pair();
        for t in 0..5 {
            let f = frame(&Msg::Ping { t });
            let tag = s.seal(&f);
            assert_eq!(r.open(&f, &tag), Ok(()));
        }
        assert_eq!((s.next_seq(), r.next_seq()), (5, 5));
    }

    #[test]
    fn altered_frames_and_tags_are_refused() {
        let (mut s, mut r) = pair();
        let f = frame(&Msg::Fetch {
            cid: crate::Cid([3; 16]),
            epoch: 1,
            down_recv: 2,
            sum_from: 0,
            down_sum: 4,
            holding: Default::default(),
        });
        let tag = s.seal(&f);
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x40;
            assert_eq!(r.open(&g, &tag), Err(MacError::BadMac { expected: 0 }));
        }
        for i in 0..TAG_LEN {
            let mut t = tag;
            t[i] ^= 1;
            assert_eq!(r.open(&f, &t), Err(MacError::BadMac { expected: 0 }));
        }
        // A frame with no valid tag at all (an injected one).
        assert_eq!(
            r.open(&f, &[0; TAG_LEN]),
            Err(MacError::BadMac { expected: 0 })
        );
        // Refusals consume nothing: the genuine frame still opens.
        assert_eq!(r.open(&f, &tag), Ok(()));
    }

    #[test]
    fn truncated_tags_are_refused() {
        let (mut s, mut r) = pair();
        let f = frame(&Msg::AdminDrain);
        let tag = s.seal(&f);
        for n in 0..TAG_LEN {
            assert_eq!(r.open(&f, &tag[..n]), Err(MacError::Truncated { have: n }));
        }
    }

    #[test]
    fn replayed_and_reordered_frames_are_refused() {
        let (mut s, mut r) = pair();
        let f0 = frame(&Msg::Ping { t: 0 });
        let f1 = frame(&Msg::Ping { t: 1 });
        let t0 = s.seal(&f0);
        let t1 = s.seal(&f1);
        // The second before the first.
        assert_eq!(
            r.open(&f1, &t1),
            Err(MacError::OutOfOrder {
                seq: 1,
                expected: 0
            })
        );
        assert_eq!(r.open(&f0, &t0), Ok(()));
        // The first again.
        assert_eq!(
            r.open(&f0, &t0),
            Err(MacError::Replayed {
                seq: 0,
                expected: 1
            })
        );
        assert_eq!(r.open(&f1, &t1), Ok(()));
    }

    #[test]
    fn frames_do_not_cross_directions_or_channels() {
        let k = ClusterKey::from_bytes([5; 32]);
        let ctx = ChannelContext {
            kind: PortKind::Admin,
            opener: "admin",
            acceptor: "s2",
            acceptor_nonce: [1; 16],
            opener_nonce: [2; 16],
        };
        let (mut o_send, mut o_recv) = k.channel_macs(&ctx, Role::Opener);
        let f = frame(&Msg::AdminDrain);
        let tag = o_send.seal(&f);
        // Reflected back to the opener.
        assert_eq!(o_recv.open(&f, &tag), Err(MacError::BadMac { expected: 0 }));
        // Moved to another channel (other nonce).
        let other = ChannelContext {
            acceptor_nonce: [7; 16],
            ..ctx
        };
        let (_, mut r2) = k.channel_macs(&other, Role::Acceptor);
        assert_eq!(r2.open(&f, &tag), Err(MacError::BadMac { expected: 0 }));
        let (_, mut r) = k.channel_macs(&ctx, Role::Acceptor);
        assert_eq!(r.open(&f, &tag), Ok(()));
    }

    #[test]
    fn decode_sealed_takes_whole_frames_in_any_split() {
        let (mut s, mut r) = pair();
        let msgs: Vec<Msg> = (0..6)
            .map(|i| {
                if i % 2 == 0 {
                    Msg::Ping { t: i }
                } else {
                    Msg::Replicate(vec![i as u8; 300 * i as usize])
                }
            })
            .collect();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&seal_msg(&mut s, m));
        }
        let dec = FrameDecoder::new(1 << 20);
        for cut in [1, 7, 40, 4096] {
            let mut r = r.clone();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for c in wire.chunks(cut) {
                buf.extend_from_slice(c);
                while let Some(f) = decode_sealed(&dec, &mut r, &mut buf).unwrap() {
                    out.push(f);
                }
            }
            assert!(buf.is_empty());
            let want: Vec<Frame> = msgs.iter().cloned().map(Frame::Msg).collect();
            assert_eq!(out, want, "cut {cut}");
        }
        // An unsealed frame in the stream is refused, and never decoded.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&seal_msg(&mut s, &Msg::Ping { t: 9 }));
        let mut junk = Msg::AdminDrain.to_frame().to_vec();
        junk.extend_from_slice(&[0; TAG_LEN]);
        buf.extend_from_slice(&junk);
        let mut r2 = r.clone();
        r2.next_seq = 6;
        assert!(matches!(
            decode_sealed(&dec, &mut r2, &mut buf),
            Ok(Some(Frame::Msg(Msg::Ping { t: 9 })))
        ));
        assert_eq!(
            decode_sealed(&dec, &mut r2, &mut buf),
            Err(WireError::Mac(MacError::BadMac { expected: 7 }))
        );
        // Oversized frames are refused before anything is buffered.
        let mut buf = BytesMut::from(&crate::wire::data_header(2 << 20)[..]);
        assert!(matches!(
            decode_sealed(&dec, &mut r, &mut buf),
            Err(WireError::TooLarge { .. })
        ));
    }
}
