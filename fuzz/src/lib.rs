//! Checks shared by the fuzz targets in `fuzz_targets/`.

use bytes::BytesMut;
use mtcp_proto::wire::{
    data_header, Frame, FrameDecoder, WireError, HEADER_LEN, MAX_SESSION_FRAME,
};

/// Frame size limits the runtime uses: peer-channel authentication (4 KiB), setup and admin
/// channels (64 KiB), session channels (1 MiB), plus a tiny one so short inputs reach the
/// "too large" path.
pub const LIMITS: [usize; 4] = [64, 4 << 10, 64 << 10, MAX_SESSION_FRAME];

/// How a decoding run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Input exhausted with this many bytes left over (an incomplete frame).
    NeedMore(usize),
    Error(WireError),
}

/// Decodes `wire` twice with a decoder limited to `max_frame`: once handed over whole, once fed
/// in pieces whose sizes cycle through `cuts` (each at least 1). Both runs must yield the same
/// frames and end the same way, every frame must respect the limit and survive a re-encode,
/// and bytes left over must be an incomplete frame.
pub fn check_stream(max_frame: usize, wire: &[u8], cuts: &[usize]) {
    let dec = FrameDecoder::new(max_frame);

    // Whole input at once.
    let mut buf = BytesMut::from(wire);
    let mut whole = Vec::new();
    let whole_end = loop {
        let before = buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(f)) => {
                check_frame(&f, max_frame, before - buf.len());
                whole.push(f);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                check_incomplete(&buf, max_frame);
                break End::NeedMore(buf.len());
            }
            Err(e) => break End::Error(e),
        }
    };

    // The same bytes in pieces, as reads from a socket would bring them.
    let mut buf = BytesMut::new();
    let mut pieces = Vec::new();
    let mut pos = 0;
    let mut cut = cuts.iter().copied().cycle();
    let mut piece_end = None;
    'feed: while pos < wire.len() {
        let n = cut.next().unwrap_or(wire.len()).clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => pieces.push(f),
                Ok(None) => break,
                Err(e) => {
                    piece_end = Some(End::Error(e));
                    break 'feed;
                }
            }
        }
    }
    let piece_end = piece_end.unwrap_or(End::NeedMore(buf.len()));

    assert_eq!(pieces, whole, "frames depend on how the input was split");
    assert_eq!(
        piece_end, whole_end,
        "outcome depends on how the input was split"
    );
}

/// A decoded frame respects the limit and re-encodes to something that decodes to itself.
fn check_frame(f: &Frame, max_frame: usize, consumed: usize) {
    let mut again = BytesMut::new();
    match f {
        Frame::Data(b) => {
            assert!(
                b.len() <= max_frame,
                "data frame of {} bytes over the limit {max_frame}",
                b.len()
            );
            assert_eq!(consumed, HEADER_LEN + b.len());
            again.extend_from_slice(&data_header(b.len()));
            again.extend_from_slice(b);
        }
        Frame::Msg(m) => {
            m.encode(&mut again);
            // The encoder's output is never longer than an encoding the decoder accepted, so a
            // message that came in under a limit can be sent on under the same limit.
            assert!(
                again.len() <= consumed,
                "re-encoding {m:?} takes {} bytes, the input frame {consumed}",
                again.len()
            );
        }
    }
    let back = FrameDecoder::new(max_frame)
        .decode(&mut again)
        .unwrap_or_else(|e| panic!("re-encoded {f:?} does not decode: {e}"));
    assert_eq!(back.as_ref(), Some(f), "frame does not survive a re-encode");
    assert!(
        again.is_empty(),
        "re-encoded frame left {} bytes",
        again.len()
    );
}

/// What `Ok(None)` leaves behind is the start of a valid frame that is still incomplete.
fn check_incomplete(buf: &[u8], max_frame: usize) {
    if buf.len() < HEADER_LEN {
        return;
    }
    assert!(buf[0] <= 1, "unknown kind {} left undecoded", buf[0]);
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    assert!(
        len <= max_frame,
        "over-limit frame ({len} > {max_frame}) left undecoded"
    );
    assert!(
        buf.len() < HEADER_LEN + len,
        "complete frame left undecoded"
    );
}

/// Splits a fuzz input into a limit (first byte), piece sizes (next three bytes, 1 to 256)
/// and the wire bytes (the rest).
pub fn split_input(data: &[u8]) -> (usize, [usize; 3], &[u8]) {
    if data.len() < 4 {
        return (LIMITS[0], [1, 1, 1], data);
    }
    let max = LIMITS[data[0] as usize % LIMITS.len()];
    let cuts = [
        data[1] as usize + 1,
        data[2] as usize + 1,
        data[3] as usize + 1,
    ];
    (max, cuts, &data[4..])
}
