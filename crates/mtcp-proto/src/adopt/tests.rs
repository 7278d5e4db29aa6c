//! Who may hand a connection over on the fast path, and how its flow starts.

use super::*;

#[test]
fn only_local_processes_of_trusted_uids_open_fast_path_sessions() {
    assert!(admit_session(Some(0), 0).is_ok());
    assert!(admit_session(Some(1000), 1000).is_ok());
    assert!(admit_session(Some(0), 1000).is_ok());
    let e = admit_session(Some(65534), 0).unwrap_err();
    assert!(e.contains("uid 65534"), "{e}");
    let e = admit_session(None, 0).unwrap_err();
    assert!(e.contains("not come from a process on this host"), "{e}");
}

fn ok() -> Handover {
    Handover {
        local_admitted: true,
        listener_uid: Some(0),
        session_uid: 0,
        held: true,
        send_queue: 0,
        unsent: 0,
        recv_queue: 100,
    }
}

#[test]
fn a_handover_names_the_agents_own_listener_and_small_input_only() {
    assert!(admit_handover(&ok()).is_ok());
    let e = admit_handover(&Handover {
        local_admitted: false,
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("fast_path"), "{e}");
    let e = admit_handover(&Handover {
        listener_uid: None,
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("nothing listens"), "{e}");
    let e = admit_handover(&Handover {
        listener_uid: Some(7),
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("uid 7"), "{e}");
    let e = admit_handover(&Handover {
        send_queue: 10,
        unsent: 4,
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("never writes"), "{e}");
    // A connection the agent did not hold (a remote address of its choosing).
    let e = admit_handover(&Handover {
        held: false,
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("accepted"), "{e}");
    // Unsent output is dropped before the restore: allowed.
    assert!(admit_handover(&Handover {
        send_queue: 10,
        unsent: 10,
        ..ok()
    })
    .is_ok());
    assert!(admit_handover(&Handover {
        recv_queue: MAX_ADOPT_QUEUE,
        ..ok()
    })
    .is_ok());
    let e = admit_handover(&Handover {
        recv_queue: MAX_ADOPT_QUEUE + 1,
        ..ok()
    })
    .unwrap_err();
    assert!(e.contains("at most"), "{e}");
}

#[test]
fn a_handover_wrong_in_every_way_is_refused_for_the_first_rule_it_breaks() {
    let mut h = Handover {
        local_admitted: false,
        listener_uid: None,
        session_uid: 0,
        held: false,
        send_queue: 10,
        unsent: 0,
        recv_queue: MAX_ADOPT_QUEUE + 1,
    };
    let mut seen = Vec::new();
    let fixes: [fn(&mut Handover); 5] = [
        |h| h.local_admitted = true,
        |h| h.listener_uid = Some(0),
        |h| h.unsent = 10,
        |h| h.recv_queue = 0,
        |h| h.held = true,
    ];
    for fix in fixes {
        seen.push(admit_handover(&h).unwrap_err());
        fix(&mut h);
    }
    assert!(admit_handover(&h).is_ok());
    let want = [
        "fast_path",
        "nothing listens",
        "10 bytes of output sent",
        "bytes of input queued",
        "not one the session's agent held",
    ];
    for (e, w) in seen.iter().zip(want) {
        assert!(e.contains(w), "{e} (wanted {w})");
    }
}

fn handed(from: Hander) -> Handed {
    Handed {
        from,
        local: "127.0.0.1:7000".parse().unwrap(),
        remote: "127.0.0.1:40000".parse().unwrap(),
        listed: true,
        held: true,
    }
}

const AGENT: Hander = Hander::Agent { fast_path: true };

#[test]
fn a_handed_socket_is_awaited_only_from_a_fast_path_agent_or_an_origin() {
    assert_eq!(
        may_take_handed(Hander::Agent { fast_path: false }),
        Err(HandedRefusal::NotFastPath)
    );
    assert_eq!(may_take_handed(AGENT), Ok(()));
    assert_eq!(may_take_handed(Hander::Origin), Ok(()));
    assert_eq!(
        HandedRefusal::NotFastPath.to_string(),
        "a handed socket from a session that is not a fast-path agent's"
    );
}

#[test]
fn a_handed_socket_must_be_to_a_listed_address_and_from_an_agent_one_it_held() {
    assert_eq!(admit_handed(&handed(AGENT)), Ok(()));
    let h = handed(AGENT);
    let e = admit_handed(&Handed { listed: false, ..h }).unwrap_err();
    assert_eq!(e, HandedRefusal::NotListed { local: h.local });
    assert_eq!(
        e.to_string(),
        "a connection to 127.0.0.1:7000 is not one this cluster's fast path admits"
    );
    let e = admit_handed(&Handed { held: false, ..h }).unwrap_err();
    assert_eq!(
        e,
        HandedRefusal::NotHeld {
            local: h.local,
            remote: h.remote
        }
    );
    assert_eq!(
        e.to_string(),
        "the handed connection 127.0.0.1:40000 -> 127.0.0.1:7000 is not one the agent held when the session began"
    );
}

#[test]
fn an_origins_handed_socket_needs_only_a_listed_address() {
    let h = handed(Hander::Origin);
    assert_eq!(admit_handed(&Handed { held: false, ..h }), Ok(()));
    assert_eq!(
        admit_handed(&Handed {
            listed: false,
            held: false,
            ..h
        }),
        Err(HandedRefusal::NotListed { local: h.local })
    );
}

#[test]
fn a_handed_socket_wrong_in_every_way_is_refused_for_the_first_rule_it_breaks() {
    let mut h = Handed {
        from: Hander::Agent { fast_path: false },
        listed: false,
        held: false,
        ..handed(AGENT)
    };
    let want = [
        HandedRefusal::NotFastPath,
        HandedRefusal::NotListed { local: h.local },
        HandedRefusal::NotHeld {
            local: h.local,
            remote: h.remote,
        },
    ];
    let fixes: [fn(&mut Handed); 3] = [|h| h.from = AGENT, |h| h.listed = true, |h| h.held = true];
    for (fix, want) in fixes.into_iter().zip(want) {
        assert_eq!(admit_handed(&h), Err(want));
        fix(&mut h);
    }
    assert_eq!(admit_handed(&h), Ok(()));
}

#[test]
fn a_takeover_whose_handed_socket_is_late_is_an_internal_refusal() {
    let r = handed_late();
    assert_eq!(r.code, crate::wire::RefuseCode::Internal);
    assert_eq!(r.reason, "the origin's socket did not arrive within 1s");
}

#[test]
fn only_a_lifted_fence_or_a_handed_socket_restarts_the_flow_at_once() {
    assert_eq!(
        flow(Recreated::OriginRepaired { fence_lifted: true }),
        Flow::Lifted
    );
    // A fence that was not up here: output waits for the agent's KICK.
    assert_eq!(
        flow(Recreated::OriginRepaired {
            fence_lifted: false
        }),
        Flow::Fenced
    );
    assert_eq!(flow(Recreated::OriginHanded), Flow::Live);
    assert_eq!(flow(Recreated::AgentRepaired), Flow::Fenced);
    assert_eq!(flow(Recreated::AgentHanded), Flow::Waiting);
}
