use super::*;
use crate::Cid;
use bytes::Bytes;

fn rec() -> StateRecord {
    StateRecord {
        cid: Cid([4; 16]),
        epoch: 3,
        snapshot: Some(Bytes::from_static(b"snap")),
        snap_in: 10,
        snap_out: 20,
        input: Bytes::from_static(b"in"),
        up_fin: None,
        tail: Bytes::new(),
        checks: vec![],
    }
}

#[test]
fn every_state_answer_reads_back_with_its_tcp_side_and_its_size() {
    let b = rec().encode();
    for tcp in [
        None,
        Some(DirectTcp::Repaired {
            tcp: vec![9; 30],
            fence: "mtcp_fence_1".into(),
        }),
        Some(DirectTcp::Handed { nonce: [5; 16] }),
    ] {
        let m = state_msg(b.clone(), tcp.clone());
        let (f, n) = read_state("s1", m, 1 << 20).unwrap();
        assert_eq!(f.rec, rec());
        assert_eq!(n as usize, b.len() + tcp.as_ref().map_or(0, DirectTcp::len));
        assert_eq!(f.tcp, tcp);
    }
}

#[test]
fn an_oversized_record_is_refused_before_it_is_decoded() {
    for m in [
        Msg::State(vec![0xff; 101]),
        Msg::DirectState {
            record: vec![0xff; 101],
            tcp: vec![],
            fence: String::new(),
        },
        Msg::HandedState {
            record: vec![0xff; 101],
            nonce: [0; 16],
        },
    ] {
        let e = read_state("s1", m, 100).unwrap_err();
        assert_eq!(e.code, RefuseCode::TooLarge, "{e}");
        assert!(e.reason.starts_with("origin s1: "), "{e}");
    }
    // At the bound it is decoded: garbage is then an internal error, not a panic.
    let e = read_state("s1", Msg::State(vec![0xff; 100]), 100).unwrap_err();
    assert_eq!(e.code, RefuseCode::Internal, "{e}");
}

#[test]
fn an_origin_s_refusal_keeps_its_code_and_anything_else_is_internal() {
    let e = read_state(
        "s1",
        Msg::Refused {
            code: RefuseCode::Busy,
            reason: "locked".into(),
        },
        100,
    )
    .unwrap_err();
    assert_eq!(e, Refusal::busy("origin s1: locked"));
    let e = read_state("s1", Msg::Pong { t: 0 }, 100).unwrap_err();
    assert_eq!(e, Refusal::internal("origin s1 answered Pong"));
}

#[test]
fn a_replica_is_stored_refused_or_taken_over_with_the_taker_named() {
    let cid = Cid([1; 16]);
    assert_eq!(
        read_replicated(
            "s3",
            Msg::ReplicaStored {
                cid,
                epoch: 2,
                out_off: 0
            }
        ),
        Ok(())
    );
    let e = read_replicated(
        "s3",
        Msg::Taken {
            cid,
            epoch: 2,
            by: "s2".into(),
            label: 4,
        },
    )
    .unwrap_err();
    assert_eq!(e.code, Some(RefuseCode::StaleEpoch));
    assert_eq!(
        e.taken,
        Some(Custody {
            epoch: 2,
            holder: "s2".into(),
            label: 4
        })
    );
    assert!(e.why.contains("taken over by s2"), "{}", e.why);
    let e = read_replicated(
        "s3",
        Msg::Refused {
            code: RefuseCode::StaleEpoch,
            reason: "fenced".into(),
        },
    )
    .unwrap_err();
    assert_eq!((e.code, e.taken), (Some(RefuseCode::StaleEpoch), None));
    assert_eq!(e.why, "s3 refused (StaleEpoch): fenced");
    let e = read_replicated("s3", Msg::Kick).unwrap_err();
    assert_eq!((e.code, e.why.as_str()), (None, "s3 answered Kick"));
}

#[test]
fn a_claim_hands_over_a_replica_or_nothing_or_is_refused() {
    assert_eq!(read_claimed("s3", Msg::State(vec![])), Ok(None));
    assert_eq!(
        read_claimed("s3", Msg::State(vec![1, 2])),
        Ok(Some(vec![1, 2]))
    );
    let e = read_claimed(
        "s3",
        Msg::Refused {
            code: RefuseCode::StaleEpoch,
            reason: "claimed".into(),
        },
    )
    .unwrap_err();
    assert_eq!(e, Refusal::stale_epoch("backup s3: claimed"));
    let e = read_claimed("s3", Msg::Leaving).unwrap_err();
    assert_eq!(e, Refusal::internal("backup s3 answered Leaving"));
}

#[test]
fn a_release_is_acknowledged_only_by_replica_stored() {
    let ok = Msg::ReplicaStored {
        cid: Cid([1; 16]),
        epoch: 2,
        out_off: 0,
    };
    assert_eq!(read_released(&ok), Ok(()));
    assert_eq!(read_released(&Msg::State(vec![])), Err("State"));
}
