//! Every message and decision of the agent's core, without sockets.

use super::stream::{RelayStream, Resend, StreamStep, ACK_EVERY};
use super::*;
use crate::wire::Mode;
use bytes::Bytes;
use proptest::prelude::*;

fn server(id: &str) -> ServerInfo {
    ServerInfo {
        id: id.into(),
        data: format!("127.0.0.1:{}", 1000 + id.len()),
    }
}

fn servers(ids: &[&str]) -> Vec<ServerInfo> {
    ids.iter()
        .map(|id| ServerInfo {
            id: id.to_string(),
            data: format!("addr-{id}"),
        })
        .collect()
}

fn placement() -> Placement {
    Placement::welcomed(
        Welcome {
            server: "s1".into(),
            cid: Cid([7; 16]),
            epoch: 0,
            token: Token([1; 32]),
            // The serving server is listed at another address than the one reached: the one
            // reached wins.
            alternates: vec![server("s1"), server("s2"), server("s3")],
            mode: Mode::Lazy,
            heartbeat_ms: 0,
            idle_ms: 30_000,
        },
        "reached-s1",
    )
}

/// The serving placement at `epoch`, and a lineage that still holds epoch `kept` at s3 (the
/// unconfirmed epoch a move may fall back to).
fn moved_on(epoch: u64, kept: u64) -> (Placement, crate::custody::Lineage) {
    let mut p = placement();
    p.epoch = epoch;
    let mut lineage = crate::custody::Lineage::default();
    lineage.moved(crate::custody::Step {
        server: "s3".into(),
        epoch: kept,
        token: Token([kept as u8; 32]),
    });
    (p, lineage)
}

fn resumed(server: &str, epoch: u64, up_from: u64, restart_out: u64) -> Resumed {
    Resumed {
        server: server.into(),
        epoch,
        token: Token([epoch as u8; 32]),
        up_from,
        alternates: servers(&["s1", "s2", "s3"]),
        heartbeat_ms: 250,
        idle_ms: 30_000,
        state_bytes: 99,
        restart_out,
        from_replica: false,
    }
}

fn step() -> crate::custody::Step {
    crate::custody::Step {
        server: "s1".into(),
        epoch: 0,
        token: Token([0; 32]),
    }
}

fn ids(v: &[ServerInfo]) -> Vec<&str> {
    v.iter().map(|s| s.id.as_str()).collect()
}

#[test]
fn welcome_lists_the_serving_server_at_the_address_reached_and_a_nonzero_heartbeat() {
    let p = placement();
    assert_eq!(ids(&p.alternates), ["s2", "s3", "s1"]);
    assert_eq!(p.alternates[2].data, "reached-s1");
    assert_eq!(p.heartbeat, Duration::from_millis(1));
}

#[test]
fn candidates_try_the_named_server_then_the_others_then_the_serving_one() {
    let p = placement();
    assert_eq!(ids(&p.candidates(None).unwrap()), ["s2", "s3", "s1"]);
    assert_eq!(ids(&p.candidates(Some("s3")).unwrap()), ["s3", "s2", "s1"]);
    // Asking for the serving server re-attaches there first, and it is not tried twice.
    assert_eq!(ids(&p.candidates(Some("s1")).unwrap()), ["s1", "s2", "s3"]);
    assert_eq!(
        p.candidates(Some("s9")).unwrap_err(),
        MoveError::UnknownServer("s9".into())
    );
    assert!(p.check_target(Some("s2")).is_ok() && p.check_target(None).is_ok());
    assert!(p.check_target(Some("")).is_err());
}

#[test]
fn migrate_carries_the_placement_and_the_stream_position() {
    let p = placement();
    let m = p.migrate(StreamPos::unseen());
    assert_eq!((m.cid, m.epoch, m.token), (p.cid, 0, p.token));
    assert_eq!(m.origin, "s1");
    assert_eq!((m.down_recv, m.up_sent, m.up_base), (0, 0, 0));
    assert_eq!(m.down_sum, checksum(&[]));
    let mut s = RelayStream::new(false);
    s.on_upstream(Bytes::from_static(b"GET /"));
    assert_eq!(s.on_delivered(b"HTTP/1.1"), None);
    let m = p.migrate(s.position());
    assert_eq!((m.down_recv, m.up_sent, m.up_base), (8, 5, 0));
    assert_eq!(m.down_sum, checksum(b"HTTP/1.1"));
}

#[test]
fn a_move_asks_every_candidate_then_falls_back_to_an_unconfirmed_epoch() {
    let (p, lineage) = moved_on(7, 5);
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), Some("s3")).unwrap();
    let mut asked = Vec::new();
    while let Some(a) = plan.next(&lineage, &mut 0) {
        if a.cand.id == "s3" && a.migrate.epoch == 7 {
            assert_eq!(a.fell_back, None);
        }
        if let Some((left, keeper)) = &a.fell_back {
            assert_eq!((*left, keeper.epoch, keeper.server.as_str()), (7, 5, "s3"));
        }
        asked.push((a.cand.id.clone(), a.migrate.epoch, a.migrate.origin.clone()));
        // A failure that does not pass: one round.
        plan.refused(&a.cand, &MoveError::Channel("connection refused".into()));
    }
    let want: Vec<(String, u64, String)> = [
        ("s3", 7, "s1"),
        ("s2", 7, "s1"),
        ("s1", 7, "s1"),
        ("s3", 5, "s3"),
        ("s2", 5, "s3"),
        ("s1", 5, "s3"),
    ]
    .iter()
    .map(|(a, e, o)| (a.to_string(), *e, o.to_string()))
    .collect();
    assert_eq!(asked, want);
    assert_eq!(plan.refusals().len(), 7, "six refusals and the fall-back");
    assert!(plan.failure().contains("falling back to epoch 5 of s3"));
    // Without a lineage a move ends after one round; an unknown target never starts.
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let empty = crate::custody::Lineage::default();
    assert_eq!(std::iter::from_fn(|| plan.next(&empty, &mut 0)).count(), 3);
    assert_eq!(plan.failure(), "no server to move to");
    assert!(MovePlan::new(&p, StreamPos::unseen(), Some("s9")).is_err());
}

/// A round in which some candidate failed for a reason that may pass (a backup or origin not
/// reached in time, busy, silent) is tried again whole — from the current epoch, after a
/// growing pause — up to `MOVE_ROUNDS` rounds (decision 71); a round whose failures are all
/// final ends the move.
#[test]
fn a_move_whose_failures_may_pass_is_tried_again_from_its_epoch() {
    let (p, lineage) = moved_on(7, 5);
    let unreachable = MoveError::Refused {
        code: RefuseCode::OriginUnreachable,
        reason: "cannot fence".into(),
    };
    let dead = MoveError::Channel("connection refused".into());
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let mut seen = Vec::new();
    let mut n = 0;
    while let Some(a) = plan.next(&lineage, &mut n) {
        seen.push((a.migrate.epoch, a.again));
        // Only the serving server's keeper, asked at the dead epoch, cannot reach a backup.
        let e = match (a.cand.id.as_str(), a.migrate.epoch) {
            ("s1", 7) => &unreachable,
            _ => &dead,
        };
        plan.refused(&a.cand, e);
    }
    let rounds = MOVE_ROUNDS as usize;
    assert_eq!(
        seen.len(),
        6 * rounds,
        "three candidates at two epochs, each round"
    );
    assert_eq!(n, 6 * MOVE_ROUNDS as u64, "every MIGRATE numbered");
    for (r, round) in seen.chunks(6).enumerate() {
        let again = (r > 0).then(|| (r as u32 + 1, round_pause(r as u32 + 1)));
        assert_eq!(
            round[0],
            (7, again),
            "round {} starts at the current epoch",
            r + 1
        );
        assert!(round[1..3].iter().all(|a| *a == (7, None)));
        assert!(round[3..].iter().all(|a| *a == (5, None)));
    }
    assert_eq!(round_pause(2), crate::trigger::MIN_RTO);
    assert!(round_pause(3) > round_pause(2));
    assert!(plan.failure().contains("round 3 after"));
    // Every failure final (dead candidates, the epoch moved on): one round.
    let stale = MoveError::Refused {
        code: RefuseCode::StaleEpoch,
        reason: "moved on".into(),
    };
    for e in [&dead, &stale] {
        let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
        let mut k = 0;
        while let Some(a) = plan.next(&lineage, &mut 0) {
            plan.refused(&a.cand, e);
            k += 1;
        }
        assert_eq!(k, 6, "{e}");
    }
    // Which failures may pass.
    assert!(MoveError::Silent(Duration::from_millis(1)).may_pass());
    assert!(unreachable.may_pass());
    let busy = MoveError::Refused {
        code: RefuseCode::Busy,
        reason: String::new(),
    };
    assert!(busy.may_pass());
    for e in [dead, stale, MoveError::Closed(String::new())] {
        assert!(!e.may_pass(), "{e}");
    }
}

/// Each MIGRATE carries its number among the connection's MIGRATEs, counted across moves, and
/// the epochs whose tokens the agent holds: its current one and those it may fall back to —
/// the current one too while it falls back (decision 66).
#[test]
fn each_migrate_carries_its_number_and_the_epochs_the_agent_holds() {
    let (mut p, lineage) = moved_on(5, 4);
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let holding = |attempt, epochs: &[u64]| Holding {
        attempt,
        epochs: epochs.to_vec(),
    };
    for n in 1..=3 {
        let a = plan.next(&lineage, &mut p.migrates).unwrap();
        assert_eq!(
            (a.migrate.epoch, a.migrate.holding),
            (5, holding(n, &[4, 5]))
        );
    }
    // Every candidate refused epoch 5: the fall-back to epoch 4 still holds 5.
    let a = plan.next(&lineage, &mut p.migrates).unwrap();
    assert_eq!(
        (a.migrate.epoch, a.migrate.holding),
        (4, holding(4, &[4, 5]))
    );
    // The next move goes on counting; with no fall-back left only the current epoch is held.
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let none = crate::custody::Lineage::default();
    let a = plan.next(&none, &mut p.migrates).unwrap();
    assert_eq!(a.migrate.holding, holding(5, &[5]));
    assert_eq!(p.migrates, 5);
}

#[test]
fn answers_read_as_resumed_or_a_typed_refusal() {
    let r = resumed("s2", 1, 0, 0);
    assert_eq!(answer(Msg::Resumed(r.clone())), Ok(r));
    let closed = answer(Msg::Refused {
        code: RefuseCode::Closed,
        reason: "done".into(),
    })
    .unwrap_err();
    assert_eq!(closed, MoveError::Closed("done".into()));
    assert_eq!(closed.refuse_code(), Some(RefuseCode::Closed));
    let stale = answer(Msg::Refused {
        code: RefuseCode::StaleEpoch,
        reason: "old".into(),
    })
    .unwrap_err();
    assert_eq!(stale.refuse_code(), Some(RefuseCode::StaleEpoch));
    assert_eq!(stale.to_string(), "StaleEpoch: old");
    let odd = answer(Msg::Heartbeat).unwrap_err();
    assert!(matches!(odd, MoveError::Unexpected(_)) && odd.refuse_code().is_none());
}

#[test]
fn resumed_moves_the_placement_to_the_destination() {
    let mut p = placement();
    p.resumed(&resumed("s3", 4, 0, 0), "reached-s3");
    assert_eq!((p.server.as_str(), p.epoch), ("s3", 4));
    assert_eq!(p.token, Token([4; 32]));
    assert_eq!(p.heartbeat, Duration::from_millis(250));
    assert_eq!(ids(&p.alternates), ["s1", "s2", "s3"]);
    assert_eq!(p.alternates[2].data, "reached-s3");
    assert_eq!(ids(&p.candidates(None).unwrap()), ["s1", "s2", "s3"]);
}

#[test]
fn a_hint_reads_the_same_for_both_drivers_and_drops_an_unknown_target() {
    let p = placement();
    let hint = |target: Option<&str>| {
        p.on_control(Msg::Hint {
            reason: HintReason::Drain,
            target: target.map(String::from),
        })
    };
    let Control::Move(h) = hint(Some("s3")) else {
        panic!("a hint moves")
    };
    assert_eq!(h.text, "hint (drain)");
    assert_eq!(h.to.as_deref(), Some("s3"));
    let Control::Move(h) = hint(Some("elsewhere")) else {
        panic!("a hint moves")
    };
    assert_eq!(h.to, None);
}

#[test]
fn control_messages_map_to_one_action_each() {
    let p = placement();
    let abort = p.on_control(Msg::Refused {
        code: RefuseCode::TooLarge,
        reason: "too much".into(),
    });
    assert_eq!(
        abort,
        Control::Refused {
            code: RefuseCode::TooLarge,
            why: "server s1 ended the connection (TooLarge): too much".into()
        }
    );
    assert_eq!(p.on_control(Msg::Pong { t: 42 }), Control::Pong(42));
    assert_eq!(p.on_control(Msg::Heartbeat), Control::Nothing);
    assert_eq!(p.on_control(Msg::Working), Control::Nothing);
    for m in [
        Msg::Snap {
            in_off: 1,
            out_off: 2,
        },
        Msg::Committed {
            in_off: 1,
            out_off: 2,
        },
        Msg::Closed { down_total: 3 },
        Msg::Backlog { queued: 4 },
    ] {
        assert_eq!(p.on_control(m.clone()), Control::Stream(m));
    }
}

#[test]
fn lazy_snap_trims_upstream_and_eager_waits_for_committed() {
    for eager in [false, true] {
        let mut s = RelayStream::new(eager);
        s.on_upstream(Bytes::from_static(b"abcdef"));
        let step = s.on_msg(
            Msg::Snap {
                in_off: 4,
                out_off: 0,
            },
            "s1",
        );
        // At out_off 0 the client is at the snapshot: eager acknowledges at once.
        let ack = Msg::Ack {
            down_recv: 0,
            sum_from: 0,
        };
        match eager {
            false => {
                assert_eq!(step, StreamStep::Continue);
                assert_eq!(s.retained.start(), 4);
            }
            true => {
                assert_eq!(step, StreamStep::Send(ack));
                assert_eq!(s.retained.start(), 0);
            }
        }
        let committed = Msg::Committed {
            in_off: 5,
            out_off: 0,
        };
        assert_eq!(s.on_msg(committed, "s1"), StreamStep::Continue);
        assert_eq!(s.retained.start(), if eager { 5 } else { 4 });
    }
}

#[test]
fn an_eager_resume_keeps_the_epoch_moved_from_until_committed() {
    for eager in [false, true] {
        let mut s = RelayStream::new(eager);
        let r = s.resume(&resumed("s2", 1, 0, 0), step()).unwrap();
        assert_eq!(s.lineage.fallback(1).is_some(), eager);
        // Eager: the agent speaks at once on the new session, so the destination hears it
        // before a keeper could have it give the epoch up (decision 48).
        assert_eq!(r.speak_first, eager);
    }
}

#[test]
fn committed_confirms_the_lineage() {
    let mut s = RelayStream::new(true);
    s.lineage.moved(crate::custody::Step {
        server: "s1".into(),
        epoch: 3,
        token: Token([0; 32]),
    });
    assert!(!s.lineage.is_empty());
    let committed = Msg::Committed {
        in_off: 0,
        out_off: 0,
    };
    s.on_msg(committed, "s2");
    assert!(s.lineage.is_empty());
}

#[test]
fn closed_finishes_now_later_or_never_behind_what_was_delivered() {
    let mut s = RelayStream::new(false);
    assert_eq!(s.on_delivered(b"0123"), None);
    // Behind what the client already has: abort.
    assert!(matches!(
        s.on_msg(Msg::Closed { down_total: 3 }, "s1"),
        StreamStep::Abort(e) if e.contains("closed the stream at 3 but 4 bytes")
    ));
    // Ahead: wait for the rest, refuse anything past it, acknowledge the last byte.
    assert_eq!(
        s.on_msg(Msg::Closed { down_total: 6 }, "s1"),
        StreamStep::Continue
    );
    assert_eq!(s.closed_at(), Some(6));
    assert!(s.on_arrival(6).is_ok());
    assert!(s.on_arrival(7).is_err());
    assert!(!s.complete());
    assert_eq!(
        s.on_delivered(b"45"),
        Some(Msg::Ack {
            down_recv: 6,
            sum_from: 0
        })
    );
    assert!(s.complete());
    // Exactly at the position: finish at once with the last ACK.
    let mut s = RelayStream::new(false);
    s.on_delivered(b"01");
    assert_eq!(
        s.on_msg(Msg::Closed { down_total: 2 }, "s1"),
        StreamStep::Finish(Msg::Ack {
            down_recv: 2,
            sum_from: 0
        })
    );
}

#[test]
fn acks_come_every_mebibyte_on_each_tick_and_at_an_eager_snapshot() {
    let mut s = RelayStream::new(false);
    let big = vec![7u8; (ACK_EVERY - 1) as usize];
    assert_eq!(s.on_delivered(&big), None);
    assert!(
        matches!(s.on_delivered(b"x"), Some(Msg::Ack { down_recv, .. }) if down_recv == ACK_EVERY)
    );
    assert_eq!(s.on_tick(), None, "nothing new since the last ACK");
    s.on_delivered(b"y");
    assert!(matches!(s.on_tick(), Some(Msg::Ack { down_recv, .. }) if down_recv == ACK_EVERY + 1));
    // Eager: a snapshot announced ahead is acknowledged when the client reaches it.
    let mut s = RelayStream::new(true);
    let snap = Msg::Snap {
        in_off: 0,
        out_off: 3,
    };
    assert_eq!(s.on_msg(snap, "s1"), StreamStep::Continue);
    assert_eq!(s.on_delivered(b"ab"), None);
    assert!(matches!(
        s.on_delivered(b"cd"),
        Some(Msg::Ack { down_recv: 4, .. })
    ));
}

#[test]
fn resume_resends_from_the_restart_point_or_refuses_one_not_retained() {
    let mut s = RelayStream::new(false);
    s.on_upstream(Bytes::from_static(b"abc"));
    s.on_upstream(Bytes::from_static(b"def"));
    s.on_msg(
        Msg::Snap {
            in_off: 2,
            out_off: 0,
        },
        "s1",
    );
    assert_eq!(
        s.resume(&resumed("s2", 1, 1, 0), step()).unwrap_err(),
        MoveError::NotRetained {
            want: 1,
            start: 2,
            end: 6
        }
    );
    assert!(s.resume(&resumed("s2", 1, 7, 0), step()).is_err());
    s.on_delivered(b"0123");
    let Resend {
        chunks,
        up_fin,
        speak_first,
    } = s.resume(&resumed("s2", 1, 3, 0), step()).unwrap();
    assert_eq!(chunks.concat(), b"def");
    assert_eq!(up_fin, None);
    assert!(!speak_first, "a lazy agent waits for its own data or tick");
    // Lazy: the destination checked up to here; the checksum restarts at the position.
    assert_eq!(s.down.sum_from(), 4);
    assert_eq!(s.down.received(), 4);
    assert_eq!(
        s.on_client_eof(),
        Msg::UpFin { up_total: 6 },
        "the end of upstream is where the bytes end"
    );
    let again = s.resume(&resumed("s3", 2, 6, 0), step()).unwrap();
    assert!(again.chunks.concat().is_empty());
    assert_eq!(again.up_fin, Some(6));
}

proptest! {
    /// Whatever the chunking and the restart points announced, a resume from any retained
    /// offset resends exactly the bytes the client program sent from there.
    #[test]
    fn resume_resends_exactly_the_bytes_sent(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 1..20),
        snaps in proptest::collection::vec(0u64..800, 0..6),
        pick in any::<proptest::sample::Index>(),
        eager in any::<bool>(),
    ) {
        let mut s = RelayStream::new(eager);
        let mut sent = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            s.on_upstream(Bytes::copy_from_slice(c));
            sent.extend_from_slice(c);
            if let Some(&at) = snaps.get(i) {
                let in_off = at.min(sent.len() as u64).max(s.retained.start());
                let m = if eager {
                    Msg::Committed { in_off, out_off: 0 }
                } else {
                    Msg::Snap { in_off, out_off: 0 }
                };
                s.on_msg(m, "s1");
            }
        }
        let (start, end) = (s.retained.start(), s.retained.end());
        prop_assert_eq!(end, sent.len() as u64);
        let from = start + pick.index((end - start + 1) as usize) as u64;
        let r = s.resume(&resumed("s2", 1, from, 0), step()).unwrap();
        prop_assert_eq!(r.chunks.concat(), sent[from as usize..].to_vec());
    }
}

mod messages;
mod relay;
