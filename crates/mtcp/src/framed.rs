//! Framed I/O over tokio streams: the preamble exchange, reading frames with a size limit and
//! writing batches of frames with vectored writes. Peer and admin channels, once authenticated,
//! read and write every frame with a MAC ([`FrameReader::set_mac`], [`MacWriter`]; see
//! `mtcp_proto::channel`).

use bytes::{Bytes, BytesMut};
use mtcp_proto::channel::{self, ChannelMac};
use mtcp_proto::wire::{self, Msg, WireError, PREAMBLE_LEN};
use mtcp_proto::PROTOCOL_VERSION;
use std::io::{self, IoSlice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

mod reader;

pub use reader::{FrameReader, Piece};

/// Why a channel ended.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("slow sender: a frame still incomplete after {received} bytes in {secs:.0} s")]
    SlowSender { received: usize, secs: f64 },
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("authentication failed: {0}")]
    Auth(#[from] mtcp_proto::auth::AuthError),
}

/// Sends our preamble and checks the peer's: magic and version.
pub async fn exchange_preamble<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(), ChannelError> {
    send_preamble(s).await?;
    check_preamble(s).await
}

/// Sends our preamble alone (a server, before it reads the peer's with
/// [`FrameReader::preamble`]).
pub async fn send_preamble<S: AsyncWrite + Unpin>(s: &mut S) -> Result<(), ChannelError> {
    s.write_all(&wire::preamble(PROTOCOL_VERSION)).await?;
    s.flush().await?;
    Ok(())
}

/// Sends `first` in the same write as our preamble (saving a round trip); the peer's preamble
/// is read with [`FrameReader::preamble`].
pub async fn send_preamble_with<S: AsyncWrite + Unpin>(
    s: &mut S,
    first: &Msg,
) -> Result<(), ChannelError> {
    let mut out = wire::preamble(PROTOCOL_VERSION).to_vec();
    out.extend_from_slice(&first.to_frame());
    s.write_all(&out).await?;
    s.flush().await?;
    Ok(())
}

/// Opens a channel and sends `first` in the same write as our preamble (saving a round trip),
/// then checks the peer's preamble.
pub async fn open_with<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: &Msg,
) -> Result<(), ChannelError> {
    send_preamble_with(s, first).await?;
    check_preamble(s).await
}

/// Reads the peer's preamble: our magic and our version, or an error naming both versions.
async fn check_preamble<S: AsyncRead + Unpin>(s: &mut S) -> Result<(), ChannelError> {
    let mut p = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut p).await.map_err(eof_is_closed)?;
    ours(&p)
}

/// Whether preamble `p` is ours: our magic and our version, or an error naming both versions.
fn ours(p: &[u8; PREAMBLE_LEN]) -> Result<(), ChannelError> {
    let theirs = wire::parse_preamble(p)?;
    if theirs != PROTOCOL_VERSION {
        return Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        }
        .into());
    }
    Ok(())
}

fn eof_is_closed(e: io::Error) -> ChannelError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ChannelError::Closed
    } else {
        ChannelError::Io(e)
    }
}

/// The writing half of an authenticated peer or admin channel: every frame goes out followed by
/// its tag under the sending direction's [`ChannelMac`].
pub struct MacWriter<W> {
    w: W,
    mac: ChannelMac,
}

impl<W: AsyncWrite + Unpin> MacWriter<W> {
    pub fn new(w: W, mac: ChannelMac) -> Self {
        Self { w, mac }
    }

    /// Writes `m` as one frame and its tag, in one write.
    pub async fn write_msg(&mut self, m: &Msg) -> io::Result<()> {
        let b = self.seal(m);
        self.w.write_all(&b).await?;
        self.w.flush().await
    }

    /// `m` as one frame and its tag, consuming a sequence number, without writing it.
    pub fn seal(&mut self, m: &Msg) -> BytesMut {
        channel::seal_msg(&mut self.mac, m)
    }

    /// Writes bytes as they are, with no tag (tests of the receiver's checks: injected,
    /// replayed, reordered or cut-off frames).
    pub async fn write_raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b).await?;
        self.w.flush().await
    }

    pub fn get_ref(&self) -> &W {
        &self.w
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// One item to write: a control message or stream data.
#[derive(Debug, Clone)]
pub enum Out {
    Msg(Msg),
    Data(Bytes),
}

/// Writes `items` as frames with as few syscalls as possible.
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, items: &[Out]) -> io::Result<()> {
    // Headers and small control messages are laid out in one buffer; data payloads are
    // referenced in place.
    let mut small = BytesMut::new();
    let mut spans: Vec<(bool, usize, usize)> = Vec::with_capacity(items.len() * 2); // (is_small, idx/start, len)
    for (i, it) in items.iter().enumerate() {
        match it {
            Out::Msg(m) => {
                let s = small.len();
                m.encode(&mut small);
                spans.push((true, s, small.len() - s));
            }
            Out::Data(d) => {
                let s = small.len();
                small.extend_from_slice(&wire::data_header(d.len()));
                spans.push((true, s, wire::HEADER_LEN));
                spans.push((false, i, d.len()));
            }
        }
    }
    let slices: Vec<&[u8]> = spans
        .iter()
        .map(|&(is_small, a, l)| {
            if is_small {
                &small[a..a + l]
            } else {
                match &items[a] {
                    Out::Data(d) => &d[..],
                    Out::Msg(_) => unreachable!("data span points at a data item"),
                }
            }
        })
        .collect();
    write_all_vectored(w, &slices).await?;
    // A TLS stream may hold encrypted bytes until flushed; on TCP this is a no-op.
    w.flush().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, slices: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < slices.len() {
        let mut io: Vec<IoSlice<'_>> = Vec::with_capacity((slices.len() - idx).min(64));
        io.push(IoSlice::new(&slices[idx][off..]));
        for s in slices[idx + 1..].iter().take(63) {
            io.push(IoSlice::new(s));
        }
        let mut n = w.write_vectored(&io).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while idx < slices.len() && n >= slices[idx].len() - off {
            n -= slices[idx].len() - off;
            idx += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

/// Writes one control message.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> io::Result<()> {
    w.write_all(&m.to_frame()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::reader::{MIN_PIECE_OUT, MIN_READ};
    use super::*;
    use mtcp_proto::channel::MacError;
    use mtcp_proto::wire::Frame;
    use std::time::Duration;

    #[tokio::test]
    async fn frames_written_in_batches_read_back_in_order() {
        let (mut a, b) = tokio::io::duplex(1000);
        let items: Vec<Out> = (0..50)
            .map(|i| {
                if i % 3 == 0 {
                    Out::Msg(Msg::Ping { t: i })
                } else {
                    Out::Data(Bytes::from(vec![i as u8; i as usize * 37]))
                }
            })
            .collect();
        let expect = items.clone();
        let w = tokio::spawn(async move { write_frames(&mut a, &items).await.unwrap() });
        let mut r = FrameReader::new(b, 1 << 20);
        for it in expect {
            let f = r.next().await.unwrap();
            match (it, f) {
                (Out::Msg(m), Frame::Msg(g)) => assert_eq!(m, g),
                (Out::Data(d), Frame::Data(g)) => assert_eq!(d, g),
                (x, y) => panic!("{x:?} vs {y:?}"),
            }
        }
        w.await.unwrap();
    }

    #[tokio::test]
    async fn the_buffer_grows_for_a_large_frame_and_shrinks_once_quiet() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, 4 << 20);
        assert_eq!(
            r.buffer_capacity(),
            0,
            "nothing allocated before data comes"
        );
        let big = Bytes::from((0..3 << 20).map(|i| i as u8).collect::<Vec<u8>>());
        let sent = big.clone();
        let w = tokio::spawn(async move {
            write_frames(&mut a, &[Out::Data(big)]).await.unwrap();
            a
        });
        match r.next().await.unwrap() {
            Frame::Data(d) => assert_eq!(d, sent),
            other => panic!("{other:?}"),
        }
        let mut a = w.await.unwrap();
        for t in 0..3 {
            write_msg(&mut a, &Msg::Ping { t }).await.unwrap();
            assert_eq!(
                r.next_msg(Duration::from_secs(1)).await.unwrap(),
                Msg::Ping { t }
            );
        }
        assert!(
            r.buffer_capacity() <= MIN_READ,
            "idle reader holds {} bytes",
            r.buffer_capacity()
        );
    }

    #[tokio::test]
    async fn pieces_grow_the_output_buffer_only_for_data() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(b, 4 << 20);
        let mut out = Vec::new();
        write_msg(&mut a, &Msg::Ping { t: 1 }).await.unwrap();
        assert!(matches!(
            r.next_piece(&mut out, 256 << 10).await.unwrap(),
            Piece::Msg(Msg::Ping { t: 1 })
        ));
        assert!(out.is_empty(), "a control message needs no output buffer");
        let small = Bytes::from_static(b"hello");
        let large = Bytes::from(vec![9u8; 300 << 10]);
        let items = [Out::Data(small.clone()), Out::Data(large.clone())];
        let w = tokio::spawn(async move { write_frames(&mut a, &items).await.unwrap() });
        let Piece::Data(n) = r.next_piece(&mut out, 256 << 10).await.unwrap() else {
            panic!("expected data");
        };
        assert_eq!(&out[..n], &small[..]);
        assert_eq!(
            out.len(),
            MIN_PIECE_OUT,
            "a small payload gets a small buffer"
        );
        let mut got = Vec::new();
        while got.len() < large.len() {
            let Piece::Data(n) = r.next_piece(&mut out, 256 << 10).await.unwrap() else {
                panic!("expected data");
            };
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, large);
        assert_eq!(out.len(), 256 << 10, "grown to the cap, not past it");
        w.await.unwrap();
    }

    fn macs() -> (ChannelMac, ChannelMac) {
        use mtcp_proto::{ChannelContext, ClusterKey, PortKind, Role};
        let k = ClusterKey::from_bytes([3; 32]);
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

    #[tokio::test]
    async fn maced_frames_pass_and_unmaced_ones_end_the_channel() {
        let (send, recv) = macs();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = MacWriter::new(a, send);
        let mut r = FrameReader::new(b, 1 << 20);
        r.set_mac(recv);
        w.write_msg(&Msg::Ping { t: 1 }).await.unwrap();
        w.write_msg(&Msg::State(vec![7; 5000])).await.unwrap();
        assert_eq!(
            r.next_msg(Duration::from_secs(1)).await.unwrap(),
            Msg::Ping { t: 1 }
        );
        assert_eq!(
            r.next_msg(Duration::from_secs(1)).await.unwrap(),
            Msg::State(vec![7; 5000])
        );
        // A frame written without a tag (the next frame's bytes are read as its tag).
        w.write_raw(&Msg::AdminDrain.to_frame()).await.unwrap();
        w.write_raw(&[0; channel::TAG_LEN]).await.unwrap();
        let e = r.next_msg(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(
                e,
                ChannelError::Wire(WireError::Mac(MacError::BadMac { expected: 2 }))
            ),
            "{e}"
        );
        assert!(e.to_string().contains("fails its MAC"), "{e}");
    }

    #[tokio::test]
    async fn a_cut_off_tag_is_named() {
        let (send, recv) = macs();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = MacWriter::new(a, send);
        let mut r = FrameReader::new(b, 1 << 20);
        r.set_mac(recv);
        let sealed = w.seal(&Msg::Ping { t: 5 });
        w.write_raw(&sealed[..sealed.len() - 3]).await.unwrap();
        drop(w);
        let e = r.next_msg(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(
                e,
                ChannelError::Wire(WireError::Mac(MacError::Truncated { .. }))
            ),
            "{e}"
        );
    }

    /// A preamble of the next protocol version (so never ours).
    fn other_version() -> [u8; PREAMBLE_LEN] {
        wire::preamble(mtcp_proto::PROTOCOL_VERSION + 1)
    }

    #[tokio::test]
    async fn preamble_mismatch_is_reported() {
        let (mut a, mut b) = tokio::io::duplex(100);
        tokio::spawn(async move {
            b.write_all(&other_version()).await.unwrap();
            let mut x = [0u8; 6];
            let _ = b.read_exact(&mut x).await;
        });
        let e = exchange_preamble(&mut a).await.unwrap_err();
        assert!(e.to_string().contains("version mismatch"), "{e}");
    }

    #[tokio::test]
    async fn a_preamble_and_the_frame_sent_with_it_are_read_through_one_buffer() {
        let (a, mut b) = tokio::io::duplex(4096);
        send_preamble_with(&mut b, &Msg::Working).await.unwrap();
        let mut r = FrameReader::new(a, 1 << 16);
        r.preamble(Duration::from_secs(1)).await.unwrap();
        let m = r.next_msg(Duration::from_secs(1)).await.unwrap();
        assert!(matches!(m, Msg::Working), "{m:?}");
    }

    #[tokio::test]
    async fn a_bad_preamble_a_wrong_version_an_early_close_and_silence_are_named() {
        async fn read(sent: &[u8], close: bool) -> ChannelError {
            let (a, mut b) = tokio::io::duplex(4096);
            b.write_all(sent).await.unwrap();
            let _keep = if close {
                drop(b);
                None
            } else {
                Some(b)
            };
            let mut r = FrameReader::new(a, 1 << 16);
            r.preamble(Duration::from_millis(50)).await.unwrap_err()
        }
        let e = read(b"GET / HTTP/1.1\r\n", false).await;
        assert!(matches!(e, ChannelError::Wire(WireError::BadMagic)), "{e}");
        let e = read(&other_version(), false).await;
        assert!(e.to_string().contains("version mismatch"), "{e}");
        let e = read(b"MTC", true).await;
        assert!(matches!(e, ChannelError::Closed), "{e}");
        let e = read(b"MTC", false).await;
        assert!(matches!(e, ChannelError::Timeout), "{e}");
    }
}
