//! `mtcp_proto::channel::decode_sealed` (frames of an authenticated peer or admin channel, each
//! followed by its tag) on arbitrary bytes and on genuine sealed streams with one change made.
//!
//! Input: `[limit selector][3 piece sizes][op][position: u16 BE][wire bytes...]`.
//!
//! * The wire bytes as they are (no valid tag): no panic, nothing consumed on `Ok(None)` or an
//!   error, the same end whole and in pieces, and never a frame (a tag cannot be guessed).
//! * The frames the plain decoder finds in the wire bytes, re-encoded and sealed: decoded
//!   whole and in pieces to exactly those frames, nothing left over.
//! * That sealed stream with one change (`op`): a bit flipped or the stream cut at `position`
//!   gives exactly the frames before the one touched, then an error or a wait for more; a
//!   frame appended again is refused as replayed; two neighbours swapped are refused as out
//!   of order after the frames before them.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use mtcp_proto::channel::{decode_sealed, ChannelMac, MacError, TAG_LEN};
use mtcp_proto::wire::{data_header, Frame, FrameDecoder, WireError};
use mtcp_proto::{ChannelContext, ClusterKey, PortKind, Role};

#[derive(Debug, PartialEq, Eq)]
enum End {
    NeedMore,
    Error(WireError),
}

fn macs() -> (ChannelMac, ChannelMac) {
    let k = ClusterKey::from_bytes([0x42; 32]);
    let ctx = ChannelContext {
        kind: PortKind::Peer,
        opener: "s1",
        acceptor: "s2",
        acceptor_nonce: [1; 16],
        opener_nonce: [2; 16],
    };
    (
        k.channel_macs(&ctx, Role::Opener).0,
        k.channel_macs(&ctx, Role::Acceptor).1,
    )
}

/// Decodes `wire` with a fresh receiving MAC, fed in pieces cycling through `cuts`.
fn run(max: usize, wire: &[u8], cuts: &[usize]) -> (Vec<Frame>, End) {
    let dec = FrameDecoder::new(max);
    let (_, mut mac) = macs();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cut = cuts.iter().copied().cycle();
    while pos < wire.len() {
        let n = cut.next().unwrap_or(wire.len()).clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        loop {
            let before = buf.len();
            let seq = mac.next_seq();
            match decode_sealed(&dec, &mut mac, &mut buf) {
                Ok(Some(f)) => {
                    assert_eq!(
                        mac.next_seq(),
                        seq + 1,
                        "a frame consumed no sequence number"
                    );
                    out.push(f);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed input");
                    assert_eq!(mac.next_seq(), seq);
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), before, "an error consumed input");
                    assert_eq!(mac.next_seq(), seq, "a refused frame consumed a number");
                    return (out, End::Error(e));
                }
            }
        }
    }
    (out, End::NeedMore)
}

/// `run` whole and in pieces; both must agree.
fn both(max: usize, wire: &[u8], cuts: &[usize]) -> (Vec<Frame>, End) {
    let whole = run(max, wire, &[wire.len().max(1)]);
    let pieces = run(max, wire, cuts);
    assert_eq!(pieces, whole, "the result depends on read sizes");
    whole
}

fn encode(f: &Frame) -> Vec<u8> {
    match f {
        Frame::Msg(m) => m.to_frame().to_vec(),
        Frame::Data(d) => {
            let mut v = data_header(d.len()).to_vec();
            v.extend_from_slice(d);
            v
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (max, cuts, rest) = mtcp_fuzz::split_input(data);
    let (op, position, wire) = match rest {
        [op, a, b, wire @ ..] => (*op, u16::from_be_bytes([*a, *b]) as usize, wire),
        _ => (0, 0, rest),
    };

    // Raw bytes: a tag cannot be guessed, so no frame ever comes out.
    let (got, _) = both(max, wire, &cuts);
    assert!(got.is_empty(), "unsealed bytes decoded to {got:?}");

    // The frames in the input, sealed as a sender would.
    let dec = FrameDecoder::new(max);
    let mut buf = BytesMut::from(wire);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        frames.push(f);
    }
    let (mut send, _) = macs();
    let mut sealed = Vec::new(); // each frame's bytes with its tag
    for f in &frames {
        let mut b = encode(f);
        let tag = send.seal(&b);
        b.put_slice(&tag);
        sealed.push(b);
    }
    let stream: Vec<u8> = sealed.concat();
    let (got, end) = both(max, &stream, &cuts);
    assert_eq!(got, frames, "a sealed stream did not decode to its frames");
    assert_eq!(end, End::NeedMore);
    if stream.is_empty() {
        return;
    }
    // Where each sealed frame starts.
    let starts: Vec<usize> = sealed
        .iter()
        .scan(0, |at, b| {
            let s = *at;
            *at += b.len();
            Some(s)
        })
        .collect();
    let frame_at = |byte: usize| starts.iter().rposition(|&s| s <= byte).unwrap();
    let n = frames.len();
    match op % 4 {
        0 => {
            // One bit flipped: the frames before it, then no further frame.
            let at = position % stream.len();
            let mut s = stream.clone();
            s[at] ^= 1 << (op / 4 % 8);
            let i = frame_at(at);
            let (got, end) = both(max, &s, &cuts);
            assert_eq!(
                got,
                frames[..i],
                "a flipped bit in frame {i} went unnoticed"
            );
            if at - starts[i] >= sealed[i].len() - TAG_LEN {
                // In the tag (its sequence number or its MAC).
                assert_eq!(
                    end,
                    End::Error(WireError::Mac(MacError::BadMac { expected: i as u64 }))
                );
            }
        }
        1 => {
            // Cut short: the whole frames before the cut, then a wait for more.
            let at = position % stream.len();
            let i = frame_at(at);
            let (got, end) = both(max, &stream[..at], &cuts);
            assert_eq!(got, frames[..i]);
            assert_eq!(end, End::NeedMore);
        }
        2 => {
            // A frame sent again.
            let k = position % n;
            let mut s = stream.clone();
            s.extend_from_slice(&sealed[k]);
            let (got, end) = both(max, &s, &cuts);
            assert_eq!(got, frames);
            assert_eq!(
                end,
                End::Error(WireError::Mac(MacError::Replayed {
                    seq: k as u64,
                    expected: n as u64
                }))
            );
        }
        _ => {
            // Two neighbours swapped.
            if n < 2 {
                return;
            }
            let k = position % (n - 1);
            let mut order = sealed.clone();
            order.swap(k, k + 1);
            let (got, end) = both(max, &order.concat(), &cuts);
            assert_eq!(got, frames[..k]);
            assert_eq!(
                end,
                End::Error(WireError::Mac(MacError::OutOfOrder {
                    seq: k as u64 + 1,
                    expected: k as u64
                }))
            );
        }
    }
});
