//! Reading frames off a stream: whole frames, or data payloads straight into the caller's
//! buffer, with a buffer sized to the traffic and the per-frame MAC of authenticated channels.

use super::ChannelError;
use bytes::{Buf, BytesMut};
use mtcp_proto::channel::{self, ChannelMac, MacError};
use mtcp_proto::wire::{self, Frame, FrameDecoder, Msg, WireError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Smallest read (and what an idle reader holds): a few control messages or a small request fit.
pub(super) const MIN_READ: usize = 512;
/// Largest read [`FrameReader::next`] asks for at once.
const MAX_READ: usize = 256 << 10;
/// Smallest buffer [`FrameReader::next_piece`] grows its `out` to.
pub(super) const MIN_PIECE_OUT: usize = 4 << 10;
/// Largest read between frames in [`FrameReader::next_piece`] (payloads go straight to `out`).
const MAX_PIECE_READ: usize = 16 << 10;

/// Reads frames off a stream.
///
/// Its buffer is sized to the traffic: a read that fills the room it was given doubles the next
/// one (up to 256 KiB), a read of less than a quarter of it shrinks it to about twice what
/// came (at least 512 bytes), and once the buffer is
/// empty a larger allocation is swapped for a small one. An idle connection holds 512 bytes here,
/// not the 256 KiB reserved up front before (issue 13: ≈ 230 KiB per idle relayed connection).
pub struct FrameReader<R> {
    r: R,
    buf: BytesMut,
    /// How much the next read asks for (see the type's doc).
    want: usize,
    dec: FrameDecoder,
    /// Payload bytes of the current data frame not yet returned by [`FrameReader::next_piece`].
    data_left: usize,
    /// When the first bytes of the frame [`FrameReader::next`] is assembling arrived (see
    /// [`mtcp_proto::timing::frame_deadline`]).
    partial_since: Option<std::time::Instant>,
    /// Set on authenticated peer and admin channels: every frame must carry a valid tag.
    mac: Option<ChannelMac>,
}

/// A piece of the frame stream (see [`FrameReader::next_piece`]).
#[derive(Debug)]
pub enum Piece {
    Msg(Msg),
    /// This many bytes of data-frame payload were copied into the caller's buffer.
    Data(usize),
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R, max_frame: usize) -> Self {
        Self {
            r,
            buf: BytesMut::new(),
            want: MIN_READ,
            dec: FrameDecoder::new(max_frame),
            data_left: 0,
            partial_since: None,
            mac: None,
        }
    }

    /// From now on every frame must be followed by a valid tag under `mac` (the receiving
    /// direction of an authenticated channel); a frame without one ends the channel with
    /// [`WireError::Mac`].
    pub fn set_mac(&mut self, mac: ChannelMac) {
        self.mac = Some(mac);
    }

    /// The next frame; `Err(Closed)` on end of stream. A frame once begun must arrive at a
    /// minimum pace ([`mtcp_proto::timing::frame_deadline`]), or `Err(SlowSender)`: a peer
    /// cannot park a large partial frame here for ever.
    pub async fn next(&mut self) -> Result<Frame, ChannelError> {
        loop {
            let got = match &mut self.mac {
                Some(mac) => channel::decode_sealed(&self.dec, mac, &mut self.buf)?,
                None => self.dec.decode(&mut self.buf)?,
            };
            if let Some(f) = got {
                self.partial_since = None;
                return Ok(f);
            }
            let spare = self.make_room(MAX_READ);
            let n = if self.buf.is_empty() {
                self.partial_since = None;
                let n = self.r.read_buf(&mut self.buf).await?;
                self.adapt(n, spare, MAX_READ);
                n
            } else {
                let since = *self
                    .partial_since
                    .get_or_insert_with(std::time::Instant::now);
                let deadline = since + mtcp_proto::timing::frame_deadline(self.buf.len());
                match tokio::time::timeout_at(deadline.into(), self.r.read_buf(&mut self.buf)).await
                {
                    Ok(r) => {
                        let n = r?;
                        self.adapt(n, spare, MAX_READ);
                        n
                    }
                    Err(_) => {
                        return Err(ChannelError::SlowSender {
                            received: self.buf.len(),
                            secs: since.elapsed().as_secs_f64(),
                        })
                    }
                }
            };
            if n == 0 {
                if self.mac.is_some() && !self.buf.is_empty() {
                    // Cut off inside a frame or its tag: say so rather than "closed".
                    return Err(WireError::Mac(MacError::Truncated {
                        have: self.buf.len(),
                    })
                    .into());
                }
                return Err(ChannelError::Closed);
            }
        }
    }

    /// Like [`FrameReader::next`], but data payloads come out in pieces copied into `out`, and
    /// large payloads are read from the socket straight into `out`: no frame is buffered
    /// whole, nothing is compacted. Don't mix with `next` in the middle of a data frame.
    ///
    /// `out` is grown only when a data payload arrives, to the payload's size rounded up to a
    /// power of two (at least 4 KiB, at most `max`): waiting for the next frame touches it
    /// not, and a connection carrying small responses never holds large buffers.
    pub async fn next_piece(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Piece, ChannelError> {
        if self.mac.is_some() {
            // Authenticated channels carry control messages only, each checked whole.
            return Err(ChannelError::Unexpected(
                "data pieces on an authenticated channel".into(),
            ));
        }
        loop {
            if self.data_left > 0 {
                let size = self
                    .data_left
                    .next_power_of_two()
                    .clamp(MIN_PIECE_OUT.min(max), max.max(1));
                if out.len() < size {
                    out.resize(size, 0);
                }
                if !self.buf.is_empty() {
                    let n = self.data_left.min(self.buf.len()).min(out.len());
                    out[..n].copy_from_slice(&self.buf[..n]);
                    self.buf.advance(n);
                    self.data_left -= n;
                    return Ok(Piece::Data(n));
                }
                let want = self.data_left.min(out.len());
                let n = self.r.read(&mut out[..want]).await?;
                if n == 0 {
                    return Err(ChannelError::Closed);
                }
                self.data_left -= n;
                return Ok(Piece::Data(n));
            }
            if let Some(len) = wire::data_frame_len(&self.buf) {
                if len > self.dec.max_frame() {
                    return Err(WireError::TooLarge {
                        len,
                        max: self.dec.max_frame(),
                    }
                    .into());
                }
                self.buf.advance(wire::HEADER_LEN);
                self.data_left = len;
                continue;
            }
            if let Some(f) = self.dec.decode(&mut self.buf)? {
                match f {
                    Frame::Msg(m) => return Ok(Piece::Msg(m)),
                    // Data frames are taken apart above before the decoder sees them.
                    Frame::Data(_) => unreachable!("data frames are handled by next_piece"),
                }
            }
            // Between frames, read little: payloads are better read straight into `out`.
            let spare = self.make_room(MAX_PIECE_READ).min(MAX_PIECE_READ);
            let mut lim = (&mut self.r).take(spare as u64);
            let n = lim.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ChannelError::Closed);
            }
            self.adapt(n, spare, MAX_PIECE_READ);
        }
    }

    /// Makes room for the next read of about `want` bytes (at most `max`); returns the room.
    /// An empty buffer much larger than that is swapped for a small one, so memory a burst
    /// needed goes back once the stream is quiet.
    fn make_room(&mut self, max: usize) -> usize {
        let want = self.want.min(max);
        if self.buf.is_empty() && self.buf.capacity() > 2 * want {
            self.buf = BytesMut::with_capacity(want);
        } else if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want);
        }
        self.buf.capacity() - self.buf.len()
    }

    /// Sizes the next read after one of `n` bytes into `spare` bytes of room.
    fn adapt(&mut self, n: usize, spare: usize, max: usize) {
        if n >= spare {
            self.want = (self.want * 2).min(max);
        } else if n < self.want / 4 {
            // Down to about twice what came: a quiet stream (heartbeats) drops to the minimum
            // at once, a reader that outpaces a busy sender settles where its reads land.
            self.want = (n * 2)
                .next_power_of_two()
                .clamp(MIN_READ, (self.want / 2).max(MIN_READ));
        }
    }

    /// Bytes allocated for the reader's buffer (tests of idle memory).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next frame, which must be a control message, within `limit`.
    pub async fn next_msg(&mut self, limit: Duration) -> Result<Msg, ChannelError> {
        match tokio::time::timeout(limit, self.next()).await {
            Err(_) => Err(ChannelError::Timeout),
            Ok(Ok(Frame::Msg(m))) => Ok(m),
            Ok(Ok(Frame::Data(_))) => {
                Err(ChannelError::Unexpected("data frame before setup".into()))
            }
            Ok(Err(e)) => Err(e),
        }
    }

    /// Reads and checks the peer's preamble (magic and version) through this reader's buffer,
    /// within `limit`: what the peer sent with it (its first message) stays buffered for
    /// [`next`](Self::next), so a preamble and the frame written with it cost one read, not an
    /// exact six-byte read and then another (and a read that finds nothing: a read that fills
    /// its buffer leaves the socket marked readable).
    pub async fn preamble(&mut self, limit: Duration) -> Result<(), ChannelError> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.buf.len() < wire::PREAMBLE_LEN {
            self.make_room(MIN_READ);
            let n = tokio::time::timeout_at(deadline, self.r.read_buf(&mut self.buf))
                .await
                .map_err(|_| ChannelError::Timeout)??;
            if n == 0 {
                return Err(ChannelError::Closed);
            }
        }
        let mut p = [0u8; wire::PREAMBLE_LEN];
        p.copy_from_slice(&self.buf[..wire::PREAMBLE_LEN]);
        self.buf.advance(wire::PREAMBLE_LEN);
        super::ours(&p)
    }

    /// Changes the frame size limit (raised once a peer is authenticated).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.dec = FrameDecoder::new(max_frame);
    }

    /// The stream underneath (bytes it delivered may sit in the reader's buffer).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    pub fn into_inner(self) -> (R, BytesMut) {
        (self.r, self.buf)
    }

    pub fn from_parts(r: R, buf: BytesMut, max_frame: usize) -> Self {
        Self {
            r,
            buf,
            want: MIN_READ,
            dec: FrameDecoder::new(max_frame),
            data_left: 0,
            partial_since: None,
            mac: None,
        }
    }
}
