//! `mtcp_proto::StateRecord::decode`, the record a destination receives from the origin over
//! the peer channel.
//!
//! Every input is used twice:
//! 1. as raw record bytes: decoding never panics, and a decoded record re-encodes (no longer
//!    than the input) to bytes that decode to the same record, with sane derived offsets;
//! 2. as the source of an arbitrary `StateRecord` value (half the time fixed up to be
//!    consistent): `decode(encode(r))` is `Ok(r)` for a consistent record and otherwise an
//!    `Inconsistent` error, never a postcard or version error.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use mtcp_proto::record::RecordError;
use mtcp_proto::{Cid, StateRecord, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    raw(data);
    if let Ok(r) = built(&mut Unstructured::new(data)) {
        structured(r);
    }
});

fn raw(data: &[u8]) {
    match StateRecord::decode(data) {
        Ok(r) => {
            assert_eq!(data[..2], PROTOCOL_VERSION.to_be_bytes());
            let enc = r.encode();
            assert!(
                enc.len() <= data.len(),
                "re-encoding is longer than the input"
            );
            assert_eq!(
                StateRecord::decode(&enc).as_ref(),
                Ok(&r),
                "record does not round-trip"
            );
            check_offsets(&r);
        }
        Err(e) => {
            if data.len() >= 2 && data[..2] != PROTOCOL_VERSION.to_be_bytes() {
                assert!(matches!(e, RecordError::Version { .. }), "{e:?}");
            }
            assert!(!e.to_string().is_empty());
        }
    }
}

fn structured(r: (StateRecord, bool)) {
    let (r, consistent) = r;
    match StateRecord::decode(&r.encode()) {
        Ok(back) => {
            assert_eq!(back, r, "record does not round-trip");
            check_offsets(&back);
        }
        Err(RecordError::Inconsistent(why)) if !consistent => {
            let _ = why;
        }
        Err(e) => panic!("encoded record {r:?} (consistent: {consistent}) fails to decode: {e:?}"),
    }
}

/// The offsets a destination derives from an accepted record.
fn check_offsets(r: &StateRecord) {
    assert!(r.up_recv() >= r.snap_in);
    assert!(r.client_down() <= r.check_end());
    assert!(r.check_end() >= r.snap_out);
    assert!(r.checks.windows(2).all(|w| w[0].end < w[1].end));
    assert!(r.tail.len() as u64 <= r.snap_out);
    if let Some(fin) = r.up_fin {
        assert_eq!(fin, r.up_recv());
    }
}

fn built(u: &mut Unstructured<'_>) -> Result<(StateRecord, bool)> {
    let consistent: bool = u.arbitrary()?;
    let cid = Cid(u.arbitrary()?);
    let epoch: u64 = u.arbitrary()?;
    let snapshot: Option<Vec<u8>> = u.arbitrary()?;
    let mut snap_in: u64 = u.arbitrary()?;
    let mut snap_out: u64 = u.arbitrary()?;
    let input: Vec<u8> = u.arbitrary()?;
    let mut up_fin: Option<u64> = u.arbitrary()?;
    let tail: Vec<u8> = u.arbitrary()?;
    let mut ends: Vec<u64> = u.arbitrary()?;
    let check_sum: u64 = u.arbitrary()?;
    if consistent {
        snap_in = snap_in.min(u64::MAX - input.len() as u64);
        snap_out = snap_out.max(tail.len() as u64);
        if tail.is_empty() {
            let mut at = snap_out;
            ends.truncate(64);
            for e in ends.iter_mut() {
                at = at.saturating_add(1 + *e % (1 << 32));
                *e = at;
            }
            ends.dedup();
            ends.retain(|&e| e > snap_out);
        } else {
            ends.clear();
        }
        up_fin = up_fin.map(|_| snap_in + input.len() as u64);
    }
    let r = StateRecord {
        cid,
        epoch,
        snapshot: snapshot.map(Bytes::from),
        snap_in,
        snap_out,
        input: Bytes::from(input),
        up_fin,
        tail: Bytes::from(tail),
        checks: ends
            .iter()
            .map(|&end| mtcp_proto::record::Check {
                end,
                sum: check_sum,
            })
            .collect(),
    };
    Ok((r, consistent))
}
