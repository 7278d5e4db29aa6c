use super::*;

const KEY: [u8; 32] = [7; 32];

fn acceptor(me: &str, kind: PortKind) -> Acceptor<'_> {
    Acceptor {
        kind,
        me,
        nonce: [1; 16],
    }
}

fn opener<'a>(to: &'a str, kind: PortKind) -> Opener<'a> {
    Opener {
        kind,
        from: "s1",
        to,
        addr: "127.0.0.1:7001",
        nonce: [2; 16],
    }
}

/// Runs the opener's proof to the acceptor: what the acceptor makes of it, and the challenge.
fn prove(
    o: &Opener<'_>,
    okey: &ClusterKey,
    a: &Acceptor<'_>,
    akey: &ClusterKey,
) -> ([u8; 16], Result<Admitted, HandshakeError>) {
    let (challenge, auth) = o.on_challenge(okey, a.challenge()).unwrap();
    (challenge, a.on_auth(akey, auth))
}

#[test]
fn a_full_handshake_gives_both_sides_each_other_s_frame_keys() {
    let key = ClusterKey::from_bytes(KEY);
    let (a, o) = (acceptor("s2", PortKind::Peer), opener("s2", PortKind::Peer));
    let (challenge, admitted) = prove(&o, &key, &a, &key);
    let mut admitted = admitted.unwrap();
    assert_eq!(admitted.from, "s1");
    let mut keys = o.on_accept(&key, challenge, admitted.accept).unwrap();
    let tag = keys.send.seal(b"opener to acceptor");
    admitted
        .keys
        .recv
        .open(b"opener to acceptor", &tag)
        .unwrap();
    let tag = admitted.keys.send.seal(b"acceptor to opener");
    keys.recv.open(b"acceptor to opener", &tag).unwrap();
    // Each direction has its own key: a frame sent one way does not open the other way.
    let tag = keys.send.seal(b"x");
    assert!(keys.recv.open(b"x", &tag).is_err());
}

#[test]
fn another_cluster_key_is_refused_and_the_opener_reads_why() {
    let (a, o) = (acceptor("s2", PortKind::Peer), opener("s2", PortKind::Peer));
    let (ours, theirs) = (ClusterKey::from_bytes(KEY), ClusterKey::from_bytes([8; 32]));
    let (challenge, r) = prove(&o, &theirs, &a, &ours);
    let e = r.unwrap_err();
    assert_eq!(e, HandshakeError::Auth(AuthError::BadProof));
    let reply = e.reply().expect("a refusal is sent");
    let Msg::Refused { code, .. } = &reply else {
        panic!("{reply:?}")
    };
    assert_eq!(*code, RefuseCode::Unauthenticated);
    let e = o.on_accept(&theirs, challenge, reply).unwrap_err();
    assert!(
        matches!(&e, HandshakeError::Refused(r) if r.contains("does not verify")),
        "{e}"
    );
}

#[test]
fn a_proof_made_for_another_server_or_port_is_refused_as_relayed() {
    let key = ClusterKey::from_bytes(KEY);
    let a = acceptor("s2", PortKind::Peer);
    let (_, r) = prove(&opener("s3", PortKind::Peer), &key, &a, &key);
    assert!(matches!(
        r.unwrap_err(),
        HandshakeError::Auth(AuthError::WrongServer { .. })
    ));
    let (_, r) = prove(&opener("s2", PortKind::Admin), &key, &a, &key);
    assert!(matches!(
        r.unwrap_err(),
        HandshakeError::Auth(AuthError::WrongKind { .. })
    ));
}

#[test]
fn an_acceptor_that_cannot_prove_the_key_is_named() {
    let key = ClusterKey::from_bytes(KEY);
    let o = opener("s2", PortKind::Admin);
    let bad = Msg::PeerAccept { proof: [0; 32] };
    let e = o.on_accept(&key, [1; 16], bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "127.0.0.1:7001 failed to prove the cluster key as the admin port of s2"
    );
}

#[test]
fn messages_out_of_place_end_the_handshake_without_an_answer() {
    let key = ClusterKey::from_bytes(KEY);
    let a = acceptor("s2", PortKind::Peer);
    let e = a.on_auth(&key, Msg::Ping { t: 0 }).unwrap_err();
    assert_eq!(e.to_string(), "expected authentication, got Ping");
    assert!(e.reply().is_none());
    let o = opener("s2", PortKind::Peer);
    let e = o.on_challenge(&key, Msg::Pong { t: 0 }).unwrap_err();
    assert_eq!(e.to_string(), "expected a challenge, got Pong");
    let refused = Msg::Refused {
        code: RefuseCode::Unauthenticated,
        reason: "this port requires TLS".into(),
    };
    let e = o.on_challenge(&key, refused).unwrap_err();
    assert_eq!(e.to_string(), "refused: this port requires TLS");
    let e = o.on_accept(&key, [1; 16], Msg::Kick).unwrap_err();
    assert_eq!(e.to_string(), "expected acceptance, got Kick");
}
