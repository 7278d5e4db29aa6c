//! The server stream's decisions at their edges: the agent's claims a FETCH is refused for, a
//! destination still replaying, acknowledgements out of range, the restart points kept, and
//! the eager-mode records (replicable, durable, restarted, turned for a client).

use super::*;
use crate::offsets::Divergence;
use crate::record::Check;
use crate::sum::SumSeg;

fn cid() -> Cid {
    Cid([1; 16])
}

#[test]
fn a_checksum_range_starting_past_its_end_is_divergence() {
    let mut st = ServerStream::new();
    st.write(Bytes::from_static(b"hello"), NO_LIMIT).unwrap();
    let e = st.record(cid(), 0, 3, 4, checksum(&[])).unwrap_err();
    assert_eq!(
        e,
        Refusal::divergence("agent claims downstream [4, 3) but only 5 bytes were sent")
    );
}

#[test]
fn an_empty_range_compares_as_the_checksum_of_nothing() {
    let mut st = ServerStream::new();
    st.write(Bytes::from_static(b"hello"), NO_LIMIT).unwrap();
    assert_eq!(
        st.record(cid(), 0, 5, 5, checksum(&[]))
            .unwrap()
            .client_down(),
        5
    );
    assert_eq!(
        st.record(cid(), 0, 5, 5, checksum(b"o")).unwrap_err().code,
        RefuseCode::Divergence
    );
}

/// An origin that wrote "012345", took a snapshot there, and wrote "6789"; and the record for
/// a client holding all ten bytes.
fn origin_record() -> StateRecord {
    let mut st = ServerStream::new();
    st.write(Bytes::from_static(b"012345"), NO_LIMIT).unwrap();
    assert_eq!(st.snapshot(Bytes::from_static(b"S6")), Some((0, 6)));
    st.write(Bytes::from_static(b"6789"), NO_LIMIT).unwrap();
    let rec = st.record(cid(), 2, 10, 0, checksum(b"0123456789")).unwrap();
    assert_eq!((rec.snap_out, rec.client_down()), (6, 10));
    assert_eq!(
        rec.checks,
        [Check {
            end: 10,
            sum: checksum(b"6789")
        }]
    );
    rec
}

#[test]
fn a_replaying_destination_ignores_snapshots_until_the_clients_bytes_are_checked() {
    let (mut dest, tail) = ServerStream::restart(&origin_record());
    assert!(tail.is_empty());
    assert_eq!(dest.snapshot(Bytes::from_static(b"early")), None);
    assert_eq!(dest.snapshot_barrier(Bytes::from_static(b"early")), None);
    assert_eq!(dest.replicable(None), None);
    assert_eq!(dest.durable_record(cid(), 3), None);
    // Regenerated "67" is checked, not sent; "89X" completes the check and sends "X".
    assert_eq!(
        dest.write(Bytes::from_static(b"67"), NO_LIMIT).unwrap().0,
        Bytes::new()
    );
    assert_eq!(
        dest.log_write(Bytes::from_static(b"89X"), NO_LIMIT),
        Ok((2, false))
    );
    assert_eq!(dest.snapshot(Bytes::from_static(b"S11")), Some((0, 11)));
}

#[test]
fn a_regenerated_byte_that_differs_is_caught() {
    let (mut dest, _) = ServerStream::restart(&origin_record());
    assert_eq!(
        dest.write(Bytes::from_static(b"67x9"), NO_LIMIT),
        Err(Divergence { from: 6, to: 10 })
    );
}

#[test]
fn a_replaying_destination_hands_on_the_same_check_for_the_same_client_only() {
    let rec = origin_record();
    let (dest, _) = ServerStream::restart(&rec);
    // The agent's checksum restarted at its position (10) when it resumed here.
    let again = dest.record(cid(), 3, 10, 10, checksum(&[])).unwrap();
    assert_eq!(again.snapshot, rec.snapshot);
    assert_eq!(
        (again.snap_out, again.checks.clone(), again.epoch),
        (6, rec.checks.clone(), 3)
    );
    let e = dest.record(cid(), 3, 9, 9, checksum(&[])).unwrap_err();
    assert_eq!(e, Refusal::internal("client at 9 while replay expects 10"));
    // Past the client's position nothing was sent.
    assert_eq!(
        dest.record(cid(), 3, 11, 11, checksum(&[]))
            .unwrap_err()
            .code,
        RefuseCode::Divergence
    );
}

#[test]
fn acks_are_clamped_to_what_the_client_can_hold_and_never_go_back() {
    let mut st = ServerStream::new();
    st.write(Bytes::from_static(b"abcdef"), NO_LIMIT).unwrap();
    st.on_ack(100, 100);
    assert_eq!((st.acked(), st.unacked()), (6, 0));
    st.on_ack(2, 0);
    assert_eq!(st.acked(), 6);
    st.write(Bytes::from_static(b"gh"), NO_LIMIT).unwrap();
    assert_eq!(st.unacked(), 2);
    // A restarted destination accepts acknowledgements up to the client's position, which
    // its application has not regenerated yet.
    let (mut dest, _) = ServerStream::restart(&origin_record());
    assert_eq!((dest.out_off(), dest.acked()), (6, 10));
    dest.on_ack(12, 12);
    assert_eq!(dest.acked(), 10);
}

#[test]
fn at_most_max_snaps_restart_points_are_kept_oldest_dropped_first() {
    let mut st = ServerStream::new();
    for i in 0..MAX_SNAPS + 3 {
        st.write(Bytes::from_static(b"x"), NO_LIMIT).unwrap();
        st.snapshot(Bytes::from(i.to_string())).unwrap();
    }
    let pts = st.restart_points();
    assert_eq!(pts.len(), MAX_SNAPS);
    // The implicit point at 0 and the snapshots at 1 to 3 are gone.
    assert_eq!(pts[0].out_off, 4);
    assert_eq!(pts.back().unwrap().out_off, MAX_SNAPS as u64 + 3);
}

#[test]
fn the_replicable_point_is_the_newest_acknowledged_snapshot_not_yet_sent() {
    let mut st = ServerStream::new();
    assert_eq!(
        st.replicable(None),
        None,
        "the implicit point is not worth it"
    );
    st.write(Bytes::from_static(b"ab"), NO_LIMIT).unwrap();
    st.snapshot(Bytes::from_static(b"s2"));
    assert_eq!(st.replicable(None), None, "the agent lacks bytes before it");
    st.on_ack(2, 2);
    assert_eq!(st.replicable(None).map(|s| s.out_off), Some(2));
    assert_eq!(st.replicable(Some((2, 0))), None, "already replicated");
    st.write(Bytes::from_static(b"cd"), NO_LIMIT).unwrap();
    st.snapshot(Bytes::from_static(b"s4"));
    st.on_ack(3, 2);
    assert_eq!(st.replicable(Some((2, 0))), None);
    st.on_ack(4, 4);
    assert_eq!(
        st.replicable(Some((2, 0))).and_then(|s| s.state.clone()),
        Some(Bytes::from_static(b"s4"))
    );
    // Over the log limit: nothing is replicable until the next snapshot.
    st.write(Bytes::from(vec![0u8; 100]), 50).unwrap();
    assert_eq!(st.replicable(None), None);
    assert_eq!(st.durable_record(cid(), 0), None);
}

#[test]
fn a_durable_record_carries_the_output_the_agent_lacks_as_its_tail() {
    let mut st = ServerStream::new();
    st.receive(Bytes::from_static(b"in")).unwrap();
    st.read(&mut [0u8; 2]);
    st.write(Bytes::from_static(b"hello"), NO_LIMIT).unwrap();
    st.snapshot(Bytes::from_static(b"S"));
    st.on_ack(2, 0);
    let r = st.durable_record(cid(), 4).unwrap();
    assert_eq!((r.epoch, r.snap_in, r.snap_out), (4, 2, 5));
    assert_eq!(&r.tail[..], b"llo");
    assert!(r.input.is_empty() && r.checks.is_empty() && r.up_fin.is_none());
    assert_eq!(r.client_down(), 2);
}

#[test]
fn a_restarted_replica_keeps_the_restart_point_and_tail_and_drops_the_input() {
    let rec = StateRecord {
        cid: cid(),
        epoch: 3,
        snapshot: Some(Bytes::from_static(b"S")),
        snap_in: 7,
        snap_out: 20,
        input: Bytes::from_static(b"unread"),
        up_fin: Some(13),
        tail: Bytes::from_static(b"xyz"),
        checks: vec![],
    };
    let r = ServerStream::restarted_replica(&rec, 4);
    assert_eq!((r.epoch, r.snap_in, r.snap_out), (4, 7, 20));
    assert_eq!((&r.tail[..], r.snapshot), (&b"xyz"[..], rec.snapshot));
    assert!(r.input.is_empty() && r.up_fin.is_none());
}

#[test]
fn a_replica_for_a_client_at_its_restart_point_needs_no_check_and_no_tail() {
    let mut rec = ServerStream::replica_record(
        cid(),
        5,
        &Snap {
            state: Some(Bytes::from_static(b"S")),
            in_off: 3,
            out_off: 8,
        },
    );
    rec.tail = Bytes::from_static(b"5678");
    let at = replica_for_client(rec.clone(), 8, &[], 3).unwrap();
    assert!(at.tail.is_empty() && at.checks.is_empty());
    assert_eq!(at.client_down(), 8);
    // Inside the tail: the part the client lacks.
    let inside = replica_for_client(rec.clone(), 6, &[], 0).unwrap();
    assert_eq!(&inside.tail[..], b"78");
    // Past it: checked from the agent's ranges, which must start at the restart point.
    let ranges = [SumSeg {
        from: 8,
        end: 9,
        sum: checksum(b"9"),
    }];
    let past = replica_for_client(rec.clone(), 9, &ranges, 0).unwrap();
    assert_eq!(
        past.checks,
        [Check {
            end: 9,
            sum: checksum(b"9")
        }]
    );
    assert_eq!(
        replica_for_client(rec, 10, &ranges, 0).unwrap_err().code,
        RefuseCode::Divergence,
        "no range reaches the client's position"
    );
}
