//! The PostgreSQL front-end's decoders (`mtcp_pgfront::codec`) and SQL classifier
//! (`mtcp_pgfront::sql`) on arbitrary bytes.
//!
//! Input: `[limit selector][3 piece sizes][wire bytes...]` (see `mtcp_fuzz::split_input`).
//! The wire bytes go to `decode_startup`, then (after the startup packet, or from the start if
//! there is none) to `split_frame` in a loop, with `parse_front` and `parse_back` on every
//! frame; the same bytes fed in pieces must give the same frames and the same end. Nothing is
//! consumed on `Ok(None)` or an error, frames are cut where their length field says and are
//! within the limit, and messages the codec can encode re-encode to their exact bytes. The
//! whole input is also classified as SQL, both string-escaping modes, and read as a plain BEGIN
//! (`sql::plain_begin`: what it accepts the classifier sees as one BEGIN). Every backend frame is
//! also judged as the answer to a deferred BEGIN (`plan::begin::judge`): only the messages that
//! can end that answer end it. The frames are also offered as a batch that might run only a
//! plain BEGIN (`plan::begin::batch_begin`): an answer it makes is whole messages.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mtcp_pgfront::codec::{self, BackMsg, CodecError, Frame, FrontMsg, Startup};
use mtcp_pgfront::sql;

fuzz_target!(|data: &[u8]| {
    let (max, cuts, wire) = mtcp_fuzz::split_input(data);

    let mut buf = BytesMut::from(wire);
    match codec::decode_startup(&mut buf, max) {
        Ok(Some(s)) => check_startup(&s, wire, wire.len() - buf.len()),
        _ => assert_eq!(
            buf.len(),
            wire.len(),
            "a refused or incomplete startup consumed input"
        ),
    }
    let rest = &wire[wire.len() - buf.len()..];
    let (whole, whole_end) = frames(rest, max, &[rest.len().max(1)]);
    for f in &whole {
        check_frame(f, max);
    }
    // The frames as a batch that might run only a plain BEGIN: if they are taken for one, the
    // answer is whole messages ending with ReadyForQuery `T`.
    let known = |n: &[u8]| (n == b"b").then_some("BEGIN");
    if let Some((answer, tag)) = mtcp_pgfront::plan::begin::batch_begin(&whole, known) {
        assert!(tag == "BEGIN" || tag == "START TRANSACTION");
        assert!(answer.ends_with(&codec::ready_for_query(b'T')));
        let mut b = BytesMut::from(&answer[..]);
        while !b.is_empty() {
            let f = codec::split_frame(&mut b, max.max(64)).expect("answer frames");
            assert!(f.is_some(), "the answer ends with a cut message");
        }
    }
    assert_eq!(
        frames(rest, max, &cuts),
        (whole, whole_end),
        "result depends on read sizes"
    );

    for scs in [true, false] {
        let c = sql::classify_with(data, scs);
        assert!(c.statements <= data.len());
        assert!(c.first == sql::TxnControl::None || c.has_txn_control);
    }
    if let Some(tag) = sql::plain_begin(data) {
        assert!(tag == "BEGIN" || tag == "START TRANSACTION");
        for scs in [true, false] {
            let c = sql::classify_with(data, scs);
            assert_eq!(c.statements, 1, "a plain BEGIN that is not one statement");
            assert_eq!(
                c.first,
                sql::TxnControl::Begin,
                "a plain BEGIN that is not a BEGIN"
            );
        }
    }
});

/// A backend message judged as (part of) the answer to a deferred BEGIN.
fn check_judge(msg: &BackMsg<'_>) {
    use mtcp_pgfront::plan::begin::{judge, Sent, Step};
    for sent in [Sent::Extended, Sent::Query] {
        for tagged in [false, true] {
            match judge(msg, sent, "BEGIN", tagged) {
                Step::Done => assert!(
                    matches!(
                        (msg, sent),
                        (BackMsg::CommandComplete { tag: b"BEGIN" }, Sent::Extended)
                            | (BackMsg::ReadyForQuery { status: b'T' }, Sent::Query)
                    ),
                    "{msg:?} ended a deferred BEGIN's answer"
                ),
                Step::Failed { code, .. } => {
                    assert!(matches!(msg, BackMsg::ErrorResponse { .. }) && !code.is_empty())
                }
                Step::Next { .. } | Step::Pass | Step::Unexpected => {}
            }
        }
    }
}

/// Splits `wire`, fed in pieces whose sizes cycle through `cuts`, into frames; returns them and
/// how it ended: an error, or the number of bytes left over (an incomplete frame).
fn frames(wire: &[u8], max: usize, cuts: &[usize]) -> (Vec<Frame>, Result<usize, CodecError>) {
    let (mut buf, mut out, mut pos) = (BytesMut::new(), Vec::new(), 0);
    let mut cut = cuts.iter().copied().cycle();
    while pos < wire.len() {
        let n = cut.next().unwrap_or(1).clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        loop {
            let before = buf.len();
            match codec::split_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    assert_eq!(
                        before - buf.len(),
                        f.raw.len(),
                        "consumed not what it returned"
                    );
                    out.push(f);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed input");
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), before, "an error consumed input");
                    return (out, Err(e));
                }
            }
        }
    }
    (out, Ok(buf.len()))
}

/// An accepted startup packet took exactly its length and means what it says.
fn check_startup(s: &Startup, wire: &[u8], consumed: usize) {
    let len = i32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]);
    assert_eq!(
        len as usize, consumed,
        "startup packet not cut at its length"
    );
    if let Startup::Startup { minor, params } = s {
        assert!(s.param("user").is_some(), "startup without a user accepted");
        if *minor == 0 {
            let again = codec::startup_message(params);
            assert_eq!(&again[..], &wire[..consumed], "startup does not re-encode");
        }
    }
}

/// A frame is within the limit, holds its own length, and parses without panicking; the
/// messages there are encoders for re-encode to the same bytes.
fn check_frame(f: &Frame, max: usize) {
    assert!(
        f.raw.len() >= 5 && f.raw.len() <= max,
        "frame of {} bytes",
        f.raw.len()
    );
    let len = i32::from_be_bytes([f.raw[1], f.raw[2], f.raw[3], f.raw[4]]);
    assert_eq!(len as usize + 1, f.raw.len(), "frame not cut at its length");
    let again = match codec::parse_front(f) {
        Ok(FrontMsg::Query { sql }) => std::str::from_utf8(sql).ok().map(codec::query),
        Ok(FrontMsg::Parse { name, sql, types }) => Some(codec::parse(name, sql, &types)),
        Ok(FrontMsg::Sync) => Some(codec::sync()),
        _ => None,
    };
    if let Some(again) = again {
        assert_eq!(again, f.raw, "client message does not re-encode");
    }
    if let Ok(m) = codec::parse_back(f) {
        check_judge(&m);
    }
    let again = match codec::parse_back(f) {
        Ok(BackMsg::ParameterStatus { name, value }) => Some(codec::parameter_status(name, value)),
        Ok(BackMsg::BackendKeyData { pid, secret }) => Some(codec::backend_key_data(pid, secret)),
        Ok(BackMsg::ReadyForQuery { status }) => Some(codec::ready_for_query(status)),
        Ok(BackMsg::CommandComplete { tag }) => {
            std::str::from_utf8(tag).ok().map(codec::command_complete)
        }
        Ok(BackMsg::ParseComplete) => Some(codec::parse_complete()),
        Ok(BackMsg::NoData) => Some(codec::no_data()),
        Ok(BackMsg::Authentication { code: 0, data: [] }) => Some(codec::auth_ok()),
        _ => None,
    };
    if let Some(again) = again {
        assert_eq!(again, f.raw, "backend message does not re-encode");
    }
}
