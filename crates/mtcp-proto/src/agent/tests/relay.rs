//! The relayed stream's answers to each stream message and to RESUMED, branch by branch: what
//! the scenario tests in `tests.rs` leave out.

use super::*;
use crate::sum::SumSeg;

fn snap(in_off: u64, out_off: u64) -> Msg {
    Msg::Snap { in_off, out_off }
}

fn committed(in_off: u64, out_off: u64) -> Msg {
    Msg::Committed { in_off, out_off }
}

#[test]
fn backlog_and_control_messages_change_nothing_in_the_stream() {
    for eager in [false, true] {
        let mut s = RelayStream::new(eager);
        s.on_upstream(Bytes::from_static(b"abc"));
        s.on_delivered(b"xyz");
        let before = s.position();
        for m in [
            Msg::Backlog { queued: 1 << 20 },
            Msg::Heartbeat,
            Msg::Pong { t: 3 },
            Msg::Working,
        ] {
            assert_eq!(s.on_msg(m, "s1"), StreamStep::Continue);
        }
        assert_eq!(s.position(), before);
        assert_eq!(s.closed_at(), None);
    }
}

#[test]
fn a_lazy_stream_ignores_committed_entirely() {
    let mut s = RelayStream::new(false);
    s.on_upstream(Bytes::from_static(b"abcdef"));
    s.lineage.moved(step());
    assert_eq!(s.on_msg(committed(6, 0), "s1"), StreamStep::Continue);
    assert_eq!(s.retained.start(), 0, "lazy trims on SNAP only");
    assert!(!s.lineage.is_empty(), "lazy keeps no fallbacks to confirm");
}

#[test]
fn an_eager_snapshot_the_client_already_passed_is_not_acknowledged() {
    let mut s = RelayStream::new(true);
    s.on_upstream(Bytes::from_static(b"q"));
    assert_eq!(s.on_delivered(b"0123456789"), None);
    // The sum already reaches past 4: no new range, no ACK, nothing trimmed.
    assert_eq!(s.on_msg(snap(1, 4), "s1"), StreamStep::Continue);
    let pos = s.position();
    assert_eq!((pos.sum_from, pos.down_recv, pos.up_base), (0, 10, 0));
    assert!(pos.segs.is_empty());
    assert_eq!(pos.down_sum, checksum(b"0123456789"));
}

#[test]
fn a_lazy_snapshot_trims_upstream_and_restarts_the_checksum_without_an_ack() {
    let mut s = RelayStream::new(false);
    s.on_upstream(Bytes::from_static(b"abcd"));
    s.on_delivered(b"0123");
    assert_eq!(s.on_msg(snap(2, 4), "s1"), StreamStep::Continue);
    let pos = s.position();
    assert_eq!((pos.up_base, pos.up_sent), (2, 4));
    assert_eq!((pos.sum_from, pos.down_recv), (4, 4));
    assert_eq!(pos.down_sum, checksum(&[]));
    assert!(pos.segs.is_empty(), "lazy keeps no finished ranges");
}

/// An eager stream that saw a snapshot at downstream 4 and delivered "abcdef".
fn eager_past_a_snapshot() -> RelayStream {
    let mut s = RelayStream::new(true);
    s.on_upstream(Bytes::from_static(b"up"));
    assert_eq!(s.on_msg(snap(0, 4), "s1"), StreamStep::Continue);
    assert_eq!(
        s.on_delivered(b"abcdef"),
        Some(Msg::Ack {
            down_recv: 6,
            sum_from: 4
        })
    );
    s
}

fn seg(from: u64, end: u64, bytes: &[u8]) -> SumSeg {
    SumSeg {
        from,
        end,
        sum: checksum(bytes),
    }
}

#[test]
fn an_eager_migrate_carries_the_finished_ranges_and_the_live_one() {
    let s = eager_past_a_snapshot();
    let m = placement().migrate(s.position());
    assert_eq!(m.segs, [seg(0, 4, b"abcd")]);
    assert_eq!(m.ranges(), [seg(0, 4, b"abcd"), seg(4, 6, b"ef")]);
}

#[test]
fn committed_forgets_the_ranges_and_upstream_before_the_confirmed_point() {
    let mut s = eager_past_a_snapshot();
    s.lineage.moved(step());
    assert_eq!(s.on_msg(committed(1, 4), "s2"), StreamStep::Continue);
    let pos = s.position();
    assert!(pos.segs.is_empty(), "the range before 4 is not needed");
    assert_eq!((pos.sum_from, pos.up_base), (4, 1));
    assert!(s.lineage.is_empty());
    // A COMMITTED at a point no range starts at keeps everything.
    let mut s = eager_past_a_snapshot();
    s.on_msg(committed(0, 2), "s2");
    assert_eq!(s.position().segs, [seg(0, 4, b"abcd")]);
}

#[test]
fn an_eager_resume_restarts_the_live_range_at_the_client_and_keeps_from_the_restart_point() {
    // The destination restarted from the snapshot at 4: ranges from 4 on are kept.
    let mut s = eager_past_a_snapshot();
    let r = s.resume(&resumed("s2", 1, 0, 4), step()).unwrap();
    assert_eq!(r.chunks.concat(), b"up");
    let pos = s.position();
    assert_eq!((pos.sum_from, pos.down_recv), (6, 6));
    assert_eq!(pos.down_sum, checksum(&[]));
    assert_eq!(pos.segs, [seg(4, 6, b"ef")]);
    // From the connection's start: everything is kept.
    let mut s = eager_past_a_snapshot();
    s.resume(&resumed("s2", 1, 0, 0), step()).unwrap();
    assert_eq!(s.position().segs, [seg(0, 4, b"abcd"), seg(4, 6, b"ef")]);
}

#[test]
fn a_resume_that_cannot_be_served_changes_nothing() {
    for eager in [false, true] {
        let mut s = RelayStream::new(eager);
        s.on_upstream(Bytes::from_static(b"abcdef"));
        s.on_msg(committed(2, 0), "s1");
        s.on_msg(snap(2, 0), "s1");
        s.on_delivered(b"012");
        let before = s.position();
        for up_from in [1, 7] {
            assert!(matches!(
                s.resume(&resumed("s2", 1, up_from, 0), step()),
                Err(MoveError::NotRetained { want, start: 2, end: 6 }) if want == up_from
            ));
        }
        assert_eq!(s.position(), before);
        assert!(s.lineage.is_empty(), "no fallback for a move not made");
    }
}

#[test]
fn a_resume_at_either_end_of_what_is_retained_is_served() {
    let mut s = RelayStream::new(false);
    s.on_upstream(Bytes::from_static(b"abc"));
    s.on_msg(snap(1, 0), "s1");
    assert_eq!(
        s.resume(&resumed("s2", 1, 1, 0), step())
            .unwrap()
            .chunks
            .concat(),
        b"bc"
    );
    assert!(s
        .resume(&resumed("s3", 2, 3, 0), step())
        .unwrap()
        .chunks
        .is_empty());
}

#[test]
fn data_past_a_close_at_the_clients_position_is_refused() {
    let mut s = RelayStream::new(false);
    s.on_delivered(b"ab");
    assert!(matches!(
        s.on_msg(Msg::Closed { down_total: 2 }, "s1"),
        StreamStep::Finish(_)
    ));
    assert!(s.complete());
    assert_eq!(s.on_arrival(2), Ok(()));
    assert_eq!(
        s.on_arrival(3),
        Err("server sent data past its close".into())
    );
    // Nothing new to acknowledge after the last ACK.
    assert_eq!(s.on_tick(), None);
}

#[test]
fn an_abort_names_the_server_that_closed_short() {
    let mut s = RelayStream::new(true);
    s.on_delivered(b"0123456789");
    assert_eq!(
        s.on_msg(Msg::Closed { down_total: 4 }, "s7"),
        StreamStep::Abort(
            "server s7 closed the stream at 4 but 10 bytes were already delivered".into()
        )
    );
    assert_eq!(s.closed_at(), None, "a refused close is not recorded");
}

#[test]
fn the_client_ending_its_input_is_remembered_for_every_later_session() {
    let mut s = RelayStream::new(false);
    assert!(!s.client_eof());
    s.on_upstream(Bytes::from_static(b"last"));
    assert_eq!(s.on_client_eof(), Msg::UpFin { up_total: 4 });
    assert!(s.client_eof());
    assert_eq!(
        s.resume(&resumed("s2", 1, 0, 0), step()).unwrap(),
        Resend {
            chunks: vec![Bytes::from_static(b"last")],
            up_fin: Some(4),
            speak_first: false,
        }
    );
    assert!(!RelayStream::new(false).eager() && RelayStream::new(true).eager());
}
