//! How one backup's answer to a fence is read: the one classifier of both fences an origin or a
//! keeper runs (the origin's own epoch when it hands a connection over, a holder's successor
//! epoch before it is superseded or passed over).

use super::Fence;
use crate::wire::RefuseCode;
use crate::StateRecord;

/// Reads one backup's answer to a fence: the claim was granted with the record it held at that
/// epoch (`Ok(Some(bytes))`, encoded) or with none (`Ok(None)`), or refused with a code.
/// Returns the [`Fence`] and the epoch label the answer's record carried (`None`: no record
/// read), which the fencer's handout must reach ([`super::Custody::supersede`]'s `floor`).
/// * A record that is only the start of the connection (a relabelled tombstone: nothing was
///   stored) counts as nothing, but its label still counts.
/// * A record that does not decode is `Refused(Internal)`: the label it may carry is unknown,
///   and handing the state out below it could give two holders one epoch.
/// * `OriginUnreachable` is a backup not reached; any other code a refusal.
pub fn read_fence(answer: Result<Option<&[u8]>, RefuseCode>) -> (Fence, Option<u64>) {
    match answer {
        Ok(None) => (Fence::Nothing, None),
        Ok(Some(bytes)) => match StateRecord::decode(bytes) {
            Ok(r) if is_start(&r) => (Fence::Nothing, Some(r.epoch)),
            Ok(r) => (Fence::Record(r.snap_out, r.snap_in), Some(r.epoch)),
            Err(_) => (Fence::Refused(RefuseCode::Internal), None),
        },
        Err(RefuseCode::OriginUnreachable) => (Fence::Unreachable, None),
        Err(code) => (Fence::Refused(code), None),
    }
}

/// The implicit restart point of a new connection (what a relabelled tombstone hands out).
fn is_start(r: &StateRecord) -> bool {
    r.snapshot.is_none()
        && (r.snap_out, r.snap_in) == (0, 0)
        && r.input.is_empty()
        && r.tail.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cid;

    fn record(epoch: u64, snap: (u64, u64), input: &[u8]) -> Vec<u8> {
        StateRecord {
            cid: Cid([1; 16]),
            epoch,
            snapshot: None,
            snap_in: snap.1,
            snap_out: snap.0,
            input: bytes::Bytes::copy_from_slice(input),
            up_fin: None,
            tail: bytes::Bytes::new(),
            checks: vec![],
        }
        .encode()
    }

    #[test]
    fn a_granted_claim_without_a_record_is_nothing() {
        assert_eq!(read_fence(Ok(None)), (Fence::Nothing, None));
    }

    #[test]
    fn a_stored_restart_point_is_read_with_its_label() {
        let b = record(6, (100, 40), b"");
        assert_eq!(read_fence(Ok(Some(&b))), (Fence::Record(100, 40), Some(6)));
        // Input to replay makes it more than a start, even at offset 0.
        let b = record(2, (0, 0), b"hi");
        assert_eq!(read_fence(Ok(Some(&b))), (Fence::Record(0, 0), Some(2)));
    }

    #[test]
    fn the_start_of_a_connection_is_nothing_but_its_label_counts() {
        let b = record(9, (0, 0), b"");
        assert_eq!(read_fence(Ok(Some(&b))), (Fence::Nothing, Some(9)));
    }

    #[test]
    fn a_record_that_does_not_decode_refuses_the_fence() {
        assert_eq!(
            read_fence(Ok(Some(b"garbage"))),
            (Fence::Refused(RefuseCode::Internal), None)
        );
        assert_eq!(
            read_fence(Ok(Some(&[]))),
            (Fence::Refused(RefuseCode::Internal), None)
        );
    }

    #[test]
    fn an_unreachable_backup_is_told_apart_from_a_refusal() {
        assert_eq!(
            read_fence(Err(RefuseCode::OriginUnreachable)),
            (Fence::Unreachable, None)
        );
        for code in [
            RefuseCode::StaleEpoch,
            RefuseCode::Busy,
            RefuseCode::Internal,
        ] {
            assert_eq!(read_fence(Err(code)), (Fence::Refused(code), None));
        }
    }
}
