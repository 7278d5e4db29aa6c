//! Wire format shared by the session (agent ↔ server), peer (server ↔ server) and admin channels.
//!
//! Every connection starts with a 6-byte preamble from each side: `MTCP` and the protocol
//! version (u16, big endian). Then frames: `[kind: u8][len: u32 BE][payload]`. Kind 0 is stream
//! data (payload = raw bytes, no copy on decode); kind 1 is a control message encoded with
//! postcard. Frame sizes are limited by the decoder, so a peer can never make us buffer more
//! than one frame's worth.

mod msg;

pub use crate::sum::SumSeg;
use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use msg::{
    HintReason, Holding, Migrate, Mode, Msg, RefuseCode, Resumed, ServerInfo, ServerStatus,
    Welcome, CAP_DIRECT,
};

/// Magic bytes every M-TCP connection starts with.
pub const MAGIC: [u8; 4] = *b"MTCP";
/// Length of the preamble: magic + version.
pub const PREAMBLE_LEN: usize = 6;
/// Length of a frame header.
pub const HEADER_LEN: usize = 5;
/// Default maximum frame payload on session channels (data frames are cut to this).
pub const MAX_SESSION_FRAME: usize = 1 << 20;

const KIND_DATA: u8 = 0;
const KIND_MSG: u8 = 1;

/// The preamble to send for `version`.
pub fn preamble(version: u16) -> [u8; PREAMBLE_LEN] {
    let v = version.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
}

/// Parses a peer's preamble and returns its protocol version.
pub fn parse_preamble(b: &[u8; PREAMBLE_LEN]) -> Result<u16, WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    Ok(u16::from_be_bytes([b[4], b[5]]))
}

/// Errors decoding bytes from the network. Each one ends the channel it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an M-TCP peer (bad magic bytes)")]
    BadMagic,
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A frame of a peer or admin channel failed its per-frame authentication.
    #[error("frame authentication failed: {0}")]
    Mac(#[from] MacError),
}

/// Why a frame of an authenticated channel was refused. Each one ends the channel.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("truncated frame or frame MAC: the channel ended {have} bytes into it")]
    Truncated { have: usize },
    #[error("frame {expected} fails its MAC: forged, altered, or from another channel")]
    BadMac { expected: u64 },
    #[error("replayed frame: sequence number {seq} again (expected {expected})")]
    Replayed { seq: u64, expected: u64 },
    #[error("reordered or dropped frame: sequence number {seq}, expected {expected}")]
    OutOfOrder { seq: u64, expected: u64 },
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Bytes),
    Msg(Msg),
}

impl Msg {
    /// Appends this message as a frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let body = postcard::to_stdvec(self).expect("postcard encodes to a Vec without failing");
        out.reserve(HEADER_LEN + body.len());
        out.put_u8(KIND_MSG);
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
    }

    /// This message as one frame.
    pub fn to_frame(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// The header of a data frame carrying `len` bytes.
pub fn data_header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [KIND_DATA, l[0], l[1], l[2], l[3]]
}

/// If `buf` starts with the header of a data frame, its payload length.
pub fn data_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() >= HEADER_LEN && buf[0] == KIND_DATA {
        Some(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize)
    } else {
        None
    }
}

/// Incremental frame decoder with a size limit.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// If `buf` starts with a complete frame header, the length of the whole frame (header and
    /// payload), which may not all be there yet. Refuses unknown kinds and frames over the
    /// limit. Consumes nothing.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buf[0];
        if kind != KIND_DATA && kind != KIND_MSG {
            return Err(WireError::UnknownKind(kind));
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Takes one complete frame off the front of `buf`, or returns `Ok(None)` if more bytes are
    /// needed. On error the channel must be closed: the stream can't be resynchronised.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let kind = buf[0];
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(total - HEADER_LEN);
        match kind {
            KIND_DATA => Ok(Some(Frame::Data(payload.freeze()))),
            _ => match postcard::take_from_bytes::<Msg>(&payload) {
                Ok((m, [])) => Ok(Some(Frame::Msg(m))),
                Ok((_, rest)) => Err(WireError::Malformed(format!(
                    "{} stray bytes after the message",
                    rest.len()
                ))),
                Err(e) => Err(WireError::Malformed(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests;
