//! The agent core's reading of every message a candidate or the serving server sends, and of
//! a move's failures: the branches the scenario tests in `tests.rs` do not reach.

use super::*;

#[test]
fn working_or_any_message_but_resumed_and_refused_is_an_unexpected_answer() {
    // The drivers skip WORKING before asking `answer`: one that reaches it is not an answer.
    for m in [
        Msg::Working,
        Msg::Heartbeat,
        Msg::Pong { t: 1 },
        Msg::Hint {
            reason: HintReason::Drain,
            target: None,
        },
        Msg::Snap {
            in_off: 0,
            out_off: 0,
        },
    ] {
        let name = m.name().to_string();
        let e = answer(m).unwrap_err();
        assert_eq!(e, MoveError::Unexpected(name.clone()));
        assert_eq!(e.to_string(), format!("unexpected answer {name}"));
        assert_eq!(e.refuse_code(), None);
    }
}

#[test]
fn every_refusal_code_is_kept_and_only_closed_means_nothing_to_move() {
    for code in RefuseCode::ALL {
        let e = answer(Msg::Refused {
            code,
            reason: "why".into(),
        })
        .unwrap_err();
        match code {
            RefuseCode::Closed => assert_eq!(e, MoveError::Closed("why".into())),
            _ => assert_eq!(
                e,
                MoveError::Refused {
                    code,
                    reason: "why".into()
                }
            ),
        }
        assert_eq!(e.refuse_code(), Some(code));
    }
}

#[test]
fn failures_without_a_refusal_have_no_code_and_say_what_failed() {
    let cases = [
        (
            MoveError::NotRetained {
                want: 3,
                start: 5,
                end: 9,
            },
            "server wants upstream from 3 but the agent retains [5, 9)",
        ),
        (
            MoveError::Silent(Duration::from_millis(1500)),
            "candidate silent for 1.5s (or no answer in time)",
        ),
        (
            MoveError::UnknownServer("s9".into()),
            "unknown server \"s9\"",
        ),
        (
            MoveError::Channel("connect: refused".into()),
            "connect: refused",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(e.refuse_code(), None, "{e:?}");
        assert_eq!(e.to_string(), text);
    }
}

#[test]
fn every_hint_reason_moves_with_its_own_text() {
    let p = placement();
    for (reason, text) in [
        (HintReason::Drain, "hint (drain)"),
        (HintReason::Overload, "hint (overload)"),
        (HintReason::Balance, "hint (balance)"),
    ] {
        assert_eq!(
            p.on_control(Msg::Hint {
                reason,
                target: None
            }),
            Control::Move(Hinted {
                reason,
                text: text.into(),
                to: None,
            })
        );
    }
}

#[test]
fn a_hint_toward_the_serving_server_keeps_its_target() {
    // The serving server is one of the known servers (a move there re-attaches in place).
    let p = placement();
    let Control::Move(h) = p.on_control(Msg::Hint {
        reason: HintReason::Balance,
        target: Some("s1".into()),
    }) else {
        panic!("a hint moves")
    };
    assert_eq!(h.to.as_deref(), Some("s1"));
}

#[test]
fn after_a_move_a_hint_target_is_checked_against_the_new_servers() {
    let mut p = placement();
    let mut r = resumed("s4", 1, 0, 0);
    r.alternates = servers(&["s4", "s5"]);
    p.resumed(&r, "reached-s4");
    let hint = |to: &str| {
        p.on_control(Msg::Hint {
            reason: HintReason::Drain,
            target: Some(to.into()),
        })
    };
    let Control::Move(h) = hint("s3") else {
        panic!("a hint moves")
    };
    assert_eq!(h.to, None, "s3 is no longer a known server");
    let Control::Move(h) = hint("s5") else {
        panic!("a hint moves")
    };
    assert_eq!(h.to.as_deref(), Some("s5"));
    assert_eq!(
        p.check_target(Some("s2")),
        Err(MoveError::UnknownServer("s2".into()))
    );
}

#[test]
fn a_refusal_from_the_serving_server_after_a_move_names_the_new_server() {
    let mut p = placement();
    p.resumed(&resumed("s2", 3, 0, 0), "reached-s2");
    assert_eq!(
        p.on_control(Msg::Refused {
            code: RefuseCode::Closed,
            reason: "gone".into(),
        }),
        Control::Refused {
            code: RefuseCode::Closed,
            why: "server s2 ended the connection (Closed): gone".into(),
        }
    );
}

#[test]
fn messages_the_session_does_not_carry_toward_the_agent_ask_nothing() {
    let p = placement();
    let r = resumed("s2", 1, 0, 0);
    for m in [
        Msg::Ack {
            down_recv: 1,
            sum_from: 0,
        },
        Msg::Ping { t: 9 },
        Msg::UpFin { up_total: 1 },
        Msg::Close,
        Msg::Leaving,
        Msg::Resumed(r.clone()),
        Msg::Migrate(p.migrate(StreamPos::unseen())),
        Msg::Adopted,
        Msg::ProbeReply { t: 5 },
    ] {
        assert_eq!(p.on_control(m.clone()), Control::Nothing, "{m:?}");
    }
}

#[test]
fn a_resumed_with_a_zero_heartbeat_still_beats_every_millisecond() {
    let mut p = placement();
    let mut r = resumed("s3", 2, 0, 0);
    r.heartbeat_ms = 0;
    p.resumed(&r, "reached-s3");
    assert_eq!(p.heartbeat, Duration::from_millis(1));
}

#[test]
fn known_servers_list_the_current_one_once_at_the_address_reached() {
    let mut listed = servers(&["a", "b", "a"]);
    listed[0].data = "elsewhere".into();
    let known = known_servers(listed, "a", "here");
    assert_eq!(ids(&known), ["b", "a"]);
    assert_eq!(known[1].data, "here");
    // A server not in its own list is added.
    let known = known_servers(servers(&["b"]), "c", "at-c");
    assert_eq!(ids(&known), ["b", "c"]);
}

#[test]
fn a_plan_keeps_the_codes_of_refused_answers_only_in_order() {
    let p = placement();
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let empty = crate::custody::Lineage::default();
    // Final failures (none may pass): one round.
    let failures = [
        MoveError::Refused {
            code: RefuseCode::Draining,
            reason: "draining".into(),
        },
        MoveError::Channel("connection refused".into()),
        MoveError::Refused {
            code: RefuseCode::StaleEpoch,
            reason: "old".into(),
        },
    ];
    for e in &failures {
        let a = plan.next(&empty, &mut 0).expect("three candidates");
        plan.refused(&a.cand, e);
    }
    assert!(plan.next(&empty, &mut 0).is_none());
    assert_eq!(
        plan.refuse_codes(),
        [RefuseCode::Draining, RefuseCode::StaleEpoch]
    );
    assert_eq!(
        plan.failure(),
        "s2: Draining: draining; s3: connection refused; s1: StaleEpoch: old"
    );
}

#[test]
fn a_closed_answer_ends_the_move_and_any_other_failure_tries_the_next() {
    let p = placement();
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), None).unwrap();
    let empty = crate::custody::Lineage::default();
    let a = plan.next(&empty, &mut 0).expect("a candidate");
    let busy = MoveError::Refused {
        code: RefuseCode::Busy,
        reason: "4 takeovers".into(),
    };
    assert_eq!(plan.failed(&a.cand, &busy), AfterFailure::TryNext);
    let a = plan.next(&empty, &mut 0).expect("a second candidate");
    assert_eq!(
        plan.failed(&a.cand, &MoveError::Closed("ended in order".into())),
        AfterFailure::Ended
    );
    // Only the refusal that passed the move on is noted.
    assert_eq!(plan.refuse_codes(), [RefuseCode::Busy]);
    assert_eq!(plan.refusals().len(), 1);
}

#[test]
fn a_move_falls_back_one_unconfirmed_epoch_at_a_time_newest_first() {
    let mut p = placement();
    p.epoch = 9;
    let mut lineage = crate::custody::Lineage::default();
    for (server, epoch) in [("s2", 4), ("s3", 7)] {
        lineage.moved(crate::custody::Step {
            server: server.into(),
            epoch,
            token: Token([epoch as u8; 32]),
        });
    }
    let mut s = RelayStream::new(true);
    s.on_upstream(Bytes::from_static(b"abc"));
    s.on_delivered(b"xy");
    let pos = s.position();
    let mut plan = MovePlan::new(&p, pos.clone(), None).unwrap();
    let mut rounds = Vec::new();
    while let Some(a) = plan.next(&lineage, &mut 0) {
        let m = &a.migrate;
        // Every attempt claims the same stream position; only the credentials change.
        assert_eq!(
            (m.down_recv, m.up_sent, m.down_sum),
            (pos.down_recv, pos.up_sent, pos.down_sum)
        );
        let token = match m.epoch {
            9 => p.token,
            e => Token([e as u8; 32]),
        };
        assert_eq!(m.token, token);
        let fb = a.fell_back.as_ref().map(|(left, k)| (*left, k.epoch));
        rounds.push((m.epoch, m.origin.clone(), fb));
        // Final failures: one round (a failure that may pass repeats it, decision 71).
        plan.refused(&a.cand, &MoveError::Channel("connection refused".into()));
    }
    let e = |epoch: u64, origin: &str, fb: Option<(u64, u64)>| (epoch, origin.to_string(), fb);
    assert_eq!(
        rounds,
        [
            e(9, "s1", None),
            e(9, "s1", None),
            e(9, "s1", None),
            e(7, "s3", Some((9, 7))),
            e(7, "s3", None),
            e(7, "s3", None),
            e(4, "s2", Some((7, 4))),
            e(4, "s2", None),
            e(4, "s2", None),
        ]
    );
    assert_eq!(plan.refusals().len(), 9 + 2);
}

#[test]
fn a_fallback_asks_with_the_keepers_token() {
    let mut p = placement();
    p.epoch = 2;
    let mut lineage = crate::custody::Lineage::default();
    lineage.moved(crate::custody::Step {
        server: "s3".into(),
        epoch: 1,
        token: Token([0xab; 32]),
    });
    let mut plan = MovePlan::new(&p, StreamPos::unseen(), Some("s2")).unwrap();
    for _ in 0..3 {
        let a = plan.next(&lineage, &mut 0).unwrap();
        assert_eq!(a.migrate.token, p.token);
    }
    let a = plan.next(&lineage, &mut 0).unwrap();
    assert_eq!((a.cand.id.as_str(), a.migrate.epoch), ("s2", 1));
    assert_eq!(a.migrate.token, Token([0xab; 32]));
    assert_eq!(a.migrate.cid, p.cid);
}

#[test]
fn a_session_opens_only_on_its_own_answer() {
    let refused = || Msg::Refused {
        code: RefuseCode::Busy,
        reason: "too many sessions".into(),
    };
    let e = welcome_answer(refused()).unwrap_err();
    assert_eq!(e.refuse_code(), Some(RefuseCode::Busy));
    assert_eq!(e.to_string(), "refused (Busy): too many sessions");
    let e = welcome_answer(Msg::Adopted).unwrap_err();
    assert_eq!(e, OpenError::Unexpected("Adopted"));
    assert_eq!(e.to_string(), "Adopted instead of the answer");
    assert_eq!(e.refuse_code(), None);
    assert_eq!(adopt_answer(Msg::Adopted), Ok(()));
    assert_eq!(
        adopt_answer(refused()).unwrap_err().refuse_code(),
        Some(RefuseCode::Busy)
    );
    assert_eq!(
        adopt_answer(Msg::Heartbeat),
        Err(OpenError::Unexpected("Heartbeat"))
    );
}
