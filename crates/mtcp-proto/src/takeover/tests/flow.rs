//! A lazy move end to end through the sans-IO cores only: the agent's placement and relayed
//! stream, the origin's server stream, and the destination's admission, record check, restart
//! and RESUMED. Each step's message is handed across by hand.

use super::*;
use crate::agent::stream::RelayStream;
use crate::agent::{answer, MovePlan, Placement};
use crate::custody::{Lineage, Step};
use crate::stream::ServerStream;
use crate::wire::{Mode, Msg, Welcome};

const NO_LIMIT: u64 = u64::MAX;

fn welcomed() -> Placement {
    let s = |id: &str| ServerInfo {
        id: id.into(),
        data: format!("addr-{id}"),
    };
    Placement::welcomed(
        Welcome {
            server: "s1".into(),
            cid: Cid([3; 16]),
            epoch: 0,
            token: Token([1; 32]),
            alternates: vec![s("s1"), s("s2")],
            mode: Mode::Lazy,
            heartbeat_ms: 100,
            idle_ms: 30_000,
        },
        "addr-s1",
    )
}

/// The origin served request "GET a" with "resp-a" and took a snapshot after it; the agent
/// got all of it and sent `more` upstream, of which the origin received `received`.
fn before_the_move(more: &'static [u8], received: usize) -> (RelayStream, ServerStream) {
    let mut agent = RelayStream::new(false);
    let mut origin = ServerStream::new();
    agent.on_upstream(Bytes::from_static(b"GET a"));
    origin.receive(Bytes::from_static(b"GET a")).unwrap();
    assert_eq!(origin.read(&mut [0u8; 16]), Some(5));
    let (out, _) = origin
        .write(Bytes::from_static(b"resp-a"), NO_LIMIT)
        .unwrap();
    let (in_off, out_off) = origin.snapshot(Bytes::from_static(b"idle")).unwrap();
    assert_eq!(agent.on_delivered(&out), None);
    assert_eq!(
        agent.on_msg(Msg::Snap { in_off, out_off }, "s1"),
        crate::agent::stream::StreamStep::Continue
    );
    agent.on_upstream(Bytes::from_static(more));
    origin
        .receive(Bytes::copy_from_slice(&more[..received]))
        .unwrap();
    (agent, origin)
}

/// The move to s2: MIGRATE, the origin's record, the destination's checks and RESUMED, the
/// agent's resume. Returns the destination's stream, what the agent resends, and the agent's
/// placement.
fn move_to_s2(
    agent: &mut RelayStream,
    origin: &ServerStream,
) -> (ServerStream, Vec<u8>, Placement) {
    let mut at = welcomed();
    let mut plan = MovePlan::new(&at, agent.position(), Some("s2")).unwrap();
    let a = plan.next(&Lineage::default(), &mut 0).unwrap();
    assert_eq!(a.cand.id, "s2");
    let m = a.migrate;
    admit(&m, true, false, "s2").unwrap();
    let rec = origin
        .record(m.cid, m.epoch, m.down_recv, m.sum_from, m.down_sum)
        .unwrap();
    let (rec, from_replica) = restart_record(&m, rec, false, false).unwrap();
    assert!(!from_replica);
    let (dest, tail) = ServerStream::restart(&rec);
    assert!(
        tail.is_empty(),
        "the client has every byte before the restart point"
    );
    let dest_at = Destination {
        id: "s2",
        alternates: at.alternates.clone(),
        heartbeat_ms: 50,
        idle_ms: 30_000,
    };
    let r = resumed(&rec, dest_at, Token([2; 32]), 0, false);
    let r = answer(Msg::Resumed(r)).unwrap();
    let from = Step {
        server: at.server.clone(),
        epoch: at.epoch,
        token: at.token,
    };
    at.resumed(&r, "addr-s2");
    let resend = agent.resume(&r, from).unwrap();
    assert_eq!(resend.up_fin, None);
    (dest, resend.chunks.concat(), at)
}

#[test]
fn a_lazy_move_resends_what_the_origin_missed_and_the_destination_answers_it() {
    let (mut agent, origin) = before_the_move(b"GET b", 3);
    let (mut dest, resend, at) = move_to_s2(&mut agent, &origin);
    assert_eq!(
        (at.server.as_str(), at.epoch, at.token),
        ("s2", 1, Token([2; 32]))
    );
    assert_eq!(resend, b" b", "the origin had received \"GET\"");
    dest.receive(Bytes::from(resend)).unwrap();
    let mut req = [0u8; 16];
    assert_eq!(dest.read(&mut req), Some(5));
    assert_eq!(&req[..5], b"GET b");
    let (out, _) = dest.write(Bytes::from_static(b"resp-b"), NO_LIMIT).unwrap();
    assert_eq!(&out[..], b"resp-b");
}

#[test]
fn a_lazy_move_mid_answer_sends_the_client_only_the_rest() {
    let (mut agent, mut origin) = before_the_move(b"GET b", 5);
    // The origin answered; only "re" reached the client before the move.
    origin.read(&mut [0u8; 16]).unwrap();
    origin
        .write(Bytes::from_static(b"resp-b"), NO_LIMIT)
        .unwrap();
    agent.on_delivered(b"re");
    let (mut dest, resend, _) = move_to_s2(&mut agent, &origin);
    assert!(resend.is_empty(), "the origin had the whole request");
    // The restarted application reads the request again and regenerates the answer: the
    // client gets what it lacks, the two bytes it has are checked.
    let mut req = [0u8; 16];
    assert_eq!(dest.read(&mut req), Some(5));
    let (out, _) = dest.write(Bytes::from_static(b"resp-b"), NO_LIMIT).unwrap();
    assert_eq!(&out[..], b"sp-b");
    assert_eq!(agent.on_delivered(&out), None);
    assert_eq!(agent.down.received(), 12);
}

#[test]
fn a_lazy_move_whose_client_saw_other_bytes_is_refused_by_the_origin() {
    let (mut agent, mut origin) = before_the_move(b"GET b", 5);
    origin.read(&mut [0u8; 16]).unwrap();
    origin
        .write(Bytes::from_static(b"resp-b"), NO_LIMIT)
        .unwrap();
    agent.on_delivered(b"rX");
    let m = welcomed().migrate(agent.position());
    let e = origin
        .record(m.cid, m.epoch, m.down_recv, m.sum_from, m.down_sum)
        .unwrap_err();
    assert_eq!(e.code, RefuseCode::Divergence);
    // The agent reads the destination's REFUSED as a refusal with that code.
    assert_eq!(
        answer(Msg::from(e)).unwrap_err().refuse_code(),
        Some(RefuseCode::Divergence)
    );
}
