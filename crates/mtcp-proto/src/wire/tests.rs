//! Tests of the wire format: frames, preambles and every message's encoding.

use super::*;
use crate::auth::{Cid, Token};
use proptest::prelude::*;

#[test]
fn refuse_codes_are_all_listed_in_wire_order_with_distinct_names() {
    for (i, c) in RefuseCode::ALL.iter().enumerate() {
        assert_eq!(postcard::to_stdvec(c).unwrap(), [i as u8], "{c:?}");
    }
    let past = [RefuseCode::ALL.len() as u8];
    assert!(postcard::from_bytes::<RefuseCode>(&past).is_err());
    let names: std::collections::BTreeSet<_> = RefuseCode::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), RefuseCode::ALL.len());
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    let cid = any::<[u8; 16]>().prop_map(Cid);
    let token = any::<[u8; 32]>().prop_map(Token);
    let server = (any::<String>(), any::<String>()).prop_map(|(id, data)| ServerInfo { id, data });
    prop_oneof![
        (any::<u32>(), proptest::option::of(any::<String>()))
            .prop_map(|(caps, orig_dst)| Msg::Hello { caps, orig_dst }),
        (
            cid.clone(),
            any::<u64>(),
            token.clone(),
            any::<String>(),
            any::<[u64; 4]>()
        )
            .prop_map(|(cid, epoch, token, origin, n)| Msg::Migrate(Migrate {
                cid,
                epoch,
                token,
                origin,
                down_recv: n[0],
                sum_from: n[1],
                down_sum: n[2],
                up_sent: n[3],
                up_base: n[0],
                segs: vec![SumSeg {
                    from: n[1],
                    end: n[2],
                    sum: n[3]
                }],
                holding: Holding {
                    attempt: n[2],
                    epochs: vec![n[0], n[3]],
                },
            })),
        (any::<u64>(), any::<u64>()).prop_map(|(down_recv, sum_from)| Msg::Ack {
            down_recv,
            sum_from
        }),
        any::<u64>().prop_map(|t| Msg::Ping { t }),
        any::<u64>().prop_map(|up_total| Msg::UpFin { up_total }),
        Just(Msg::Close),
        (
            any::<String>(),
            cid.clone(),
            any::<u64>(),
            token.clone(),
            proptest::collection::vec(server.clone(), 0..4),
            any::<u32>()
        )
            .prop_map(|(server, cid, epoch, token, alternates, heartbeat_ms)| {
                Msg::Welcome(Welcome {
                    server,
                    cid,
                    epoch,
                    token,
                    alternates,
                    mode: Mode::Lazy,
                    heartbeat_ms,
                    idle_ms: heartbeat_ms.wrapping_mul(300),
                })
            }),
        (
            any::<String>(),
            any::<u64>(),
            token,
            any::<u64>(),
            proptest::collection::vec(server, 0..4)
        )
            .prop_map(|(server, epoch, token, up_from, alternates)| Msg::Resumed(
                Resumed {
                    server,
                    epoch,
                    token,
                    up_from,
                    alternates,
                    heartbeat_ms: 100,
                    idle_ms: 30_000,
                    state_bytes: 7,
                    restart_out: up_from / 2,
                    from_replica: up_from % 2 == 0,
                }
            )),
        any::<String>().prop_map(|reason| Msg::Refused {
            code: RefuseCode::BadToken,
            reason
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(in_off, out_off)| Msg::Snap { in_off, out_off }),
        proptest::option::of(any::<String>()).prop_map(|target| Msg::Hint {
            reason: HintReason::Drain,
            target
        }),
        (cid.clone(), any::<[u64; 4]>()).prop_map(|(cid, n)| Msg::Fetch {
            cid,
            epoch: n[0],
            down_recv: n[1],
            sum_from: n[2],
            down_sum: n[3],
            holding: Holding {
                attempt: n[1],
                epochs: vec![n[0]],
            },
        }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::State),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Replicate),
        (cid.clone(), any::<[u64; 3]>()).prop_map(|(cid, n)| Msg::ReplicaStored {
            cid,
            epoch: n[0],
            out_off: n[1]
        }),
        (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::ClaimReplica {
            cid,
            epoch,
            holding: Holding {
                attempt: epoch / 2,
                epochs: vec![epoch, 1],
            },
        }),
        (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::DropReplica { cid, epoch }),
        (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::ReleaseClaim { cid, epoch }),
        (cid.clone(), any::<u64>(), "[a-z0-9]{0,8}").prop_map(|(cid, epoch, by)| Msg::FenceEpoch {
            cid,
            epoch,
            by,
            holding: Holding::default(),
        }),
        (cid.clone(), any::<[u64; 2]>()).prop_map(|(cid, n)| Msg::Yield {
            cid,
            epoch: n[0],
            attempt: n[1],
        }),
        (cid.clone(), any::<[u64; 2]>(), "[a-z0-9]{0,12}").prop_map(|(cid, n, by)| {
            Msg::Taken {
                cid,
                epoch: n[0],
                by,
                label: n[1],
            }
        }),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<[u8; 16]>()
        )
            .prop_map(|(record, nonce)| Msg::HandedState { record, nonce }),
        any::<[u8; 16]>().prop_map(|nonce| Msg::AdoptHanded { nonce }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(in_off, out_off)| Msg::Committed { in_off, out_off }),
        Just(Msg::Working),
        Just(Msg::Leaving),
        (cid.clone(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(cid, epoch, t)| Msg::Watch {
            cid,
            epoch,
            token: Token(t)
        }),
        (cid.clone(), any::<bool>()).prop_map(|(cid, d)| Msg::WatchHint {
            cid,
            reason: if d {
                HintReason::Drain
            } else {
                HintReason::Overload
            }
        }),
        (
            any::<String>(),
            any::<String>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(from, to, nonce, proof)| Msg::PeerAuth {
                from,
                to,
                nonce,
                proof
            }),
        any::<u64>().prop_map(|queued| Msg::Backlog { queued }),
        any::<u64>().prop_map(|t| Msg::Probe { t }),
        any::<u64>().prop_map(|t| Msg::ProbeReply { t }),
        any::<u64>().prop_map(|t| Msg::Pong { t }),
        Just(Msg::Heartbeat),
        any::<u64>().prop_map(|down_total| Msg::Closed { down_total }),
        any::<[u8; 16]>().prop_map(|nonce| Msg::PeerChallenge { nonce }),
        any::<[u8; 32]>().prop_map(|proof| Msg::PeerAccept { proof }),
        Just(Msg::AdminDrain),
        Just(Msg::AdminUndrain),
        Just(Msg::AdminStatus),
        (
            any::<String>(),
            any::<[u32; 4]>(),
            any::<bool>(),
            any::<[u64; 2]>()
        )
            .prop_map(|(id, n, draining, m)| Msg::AdminStatusReply(ServerStatus {
                id,
                connections: n[0],
                detached: n[1],
                draining,
                migrated_in: m[0],
                migrated_out: m[1],
                replicas_held: n[2],
                leaving: n[3],
            })),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Adopt),
        Just(Msg::Adopted),
        Just(Msg::Kick),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<String>()
        )
            .prop_map(|(record, tcp, fence)| Msg::DirectState { record, tcp, fence }),
    ]
}

/// The wire index of every `Msg` variant, read off the decoder: a message body of all zeros
/// decodes as the variant it names for every index in use (zero is a valid value of every field),
/// and the first index past the last variant does not decode. `Msg` has fewer than 128
/// variants, so the index is the body's first byte.
fn every_variant() -> Vec<Msg> {
    let mut all = Vec::new();
    for i in 0u8..128 {
        let mut body = vec![0u8; 128];
        body[0] = i;
        match postcard::from_bytes::<Msg>(&body) {
            Ok(m) => all.push(m),
            Err(_) => break,
        }
    }
    all
}

#[test]
fn the_generator_makes_every_message_of_the_wire() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let all = every_variant();
    // Every index below the count decodes (no gap hides a variant from the count) and the one
    // past it does not: the count is `Msg`'s.
    assert!(all.len() >= 45, "only {} variants decode", all.len());
    for (i, m) in all.iter().enumerate() {
        assert_eq!(
            postcard::to_stdvec(m).unwrap()[0] as usize,
            i,
            "{}",
            m.name()
        );
    }
    let mut runner = TestRunner::deterministic();
    let strategy = arb_msg();
    let mut seen = vec![false; all.len()];
    for _ in 0..20_000 {
        let m = strategy.new_tree(&mut runner).unwrap().current();
        seen[postcard::to_stdvec(&m).unwrap()[0] as usize] = true;
    }
    let missing: Vec<&str> = all
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|(m, _)| m.name())
        .collect();
    assert!(missing.is_empty(), "arb_msg never makes {missing:?}");
}

proptest! {
    #[test]
    fn messages_round_trip_in_any_split(msgs in proptest::collection::vec(arb_msg(), 1..8),
                                        data in proptest::collection::vec(any::<u8>(), 0..2000),
                                        cut in 1usize..64) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut wire);
            wire.extend_from_slice(&data_header(data.len()));
            wire.extend_from_slice(&data);
        }
        // Feed the decoder in pieces of `cut` bytes: frames must come out whole and in order.
        let dec = FrameDecoder::new(MAX_SESSION_FRAME);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(cut) {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        let mut expect = Vec::new();
        for m in msgs {
            expect.push(Frame::Msg(m));
            expect.push(Frame::Data(Bytes::from(data.clone())));
        }
        prop_assert_eq!(out, expect);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dec = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
    }
}

#[test]
fn oversized_and_unknown_frames_are_rejected() {
    let dec = FrameDecoder::new(100);
    let mut b = BytesMut::from(&data_header(101)[..]);
    assert_eq!(
        dec.decode(&mut b),
        Err(WireError::TooLarge { len: 101, max: 100 })
    );
    let mut b = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
    assert_eq!(dec.decode(&mut b), Err(WireError::UnknownKind(9)));
    let mut b = BytesMut::from(&[KIND_MSG, 0, 0, 0, 2, 0xff, 0xff][..]);
    assert!(matches!(dec.decode(&mut b), Err(WireError::Malformed(_))));
}

proptest! {
    /// A message's name is its variant's, for every message (logs and errors name it so).
    #[test]
    fn a_message_is_named_by_its_variant(m in arb_msg()) {
        let debug = format!("{m:?}");
        let variant = debug.split(|c: char| !c.is_alphanumeric()).next().unwrap();
        prop_assert_eq!(m.name(), variant);
    }
}

#[test]
fn preamble_checks_magic() {
    assert_eq!(parse_preamble(&preamble(7)), Ok(7));
    assert_eq!(parse_preamble(b"GET / "), Err(WireError::BadMagic));
}
