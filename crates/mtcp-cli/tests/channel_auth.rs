//! Peer and admin channels against an attacker without the cluster key (issue 14): a handshake
//! relayed from a server that dials a member that is down is refused on every other port, and
//! a frame injected, altered, replayed, reordered or cut off inside an authenticated channel
//! ends that channel. Meanwhile a curl download through the agent goes on and arrives
//! byte-exact, never moved.

mod common;

use common::*;
use mtcp::framed::{self, FrameReader};
use mtcp::proto::wire::{Msg, RefuseCode};
use mtcp::proto::{ChannelContext, Cid, ClusterKey, PortKind};
use mtcp_harness::local::{strip_ansi, LocalCluster, LocalOptions};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const AUTH_FRAME: usize = 4 << 10;

/// Waits (bounded) until `id`'s log holds `what`; returns the line.
async fn log_line(dir: &Path, id: &str, what: &str) -> String {
    let path = dir.join(format!("{id}.log"));
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(l) = text.lines().map(strip_ansi).find(|l| l.contains(what)) {
            return l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{id}'s log never said {what:?}; see {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many lines of `id`'s log hold `what`.
fn log_count(dir: &Path, id: &str, what: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{id}.log")))
        .unwrap_or_default()
        .lines()
        .filter(|l| strip_ansi(l).contains(what))
        .count()
}

/// Reads what the other side sends until it closes (bounded): every message, and whether the
/// channel ended (closed or reset) rather than timed out.
async fn drain_until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut FrameReader<R>) -> Vec<Msg> {
    let mut got = Vec::new();
    loop {
        match r.next_msg(Duration::from_secs(10)).await {
            Ok(m) => got.push(m),
            Err(mtcp::framed::ChannelError::Timeout) => {
                panic!("the channel was left open after {got:?}")
            }
            Err(_) => return got,
        }
    }
}

/// The agent's only live connection, once bytes flow: (cid, server).
async fn live_conn(lc: &LocalCluster) -> (Cid, String) {
    let t0 = Instant::now();
    loop {
        if let Some(c) = lc
            .status_async()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.is_live() && c.bytes_down > 0)
        {
            return (c.cid.parse().unwrap(), c.server);
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no live download");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One relay attempt by a listener on the peer address of a member that is down: takes the
/// next channel a live server opens to that address, fetches a challenge from `target` (a port
/// of kind `kind` of server `target_id`), hands it to the dialling server as its own, and
/// forwards the dialler's proof to `target` — with its target id as it came, or rewritten to
/// `target_id` when `rewrite`. Then asks for what the relay was after (a FETCH of `cid` on a
/// peer port, a drain on an admin port). Returns the target's refusal reason.
#[allow(clippy::too_many_arguments)]
async fn relay(
    probe: &TcpListener,
    key: &ClusterKey,
    down_id: &str,
    target: &str,
    target_id: &str,
    kind: PortKind,
    rewrite: bool,
    cid: Cid,
) -> String {
    let (mut victim, from) = tokio::time::timeout(Duration::from_secs(15), probe.accept())
        .await
        .expect("no server dialled the down member's peer address")
        .unwrap();
    framed::exchange_preamble(&mut victim).await.unwrap();
    let (vr, mut vw) = victim.into_split();
    let mut vr = FrameReader::new(vr, AUTH_FRAME);

    let mut t = TcpStream::connect(target).await.unwrap();
    framed::exchange_preamble(&mut t).await.unwrap();
    let (tr, mut tw) = t.into_split();
    let mut tr = FrameReader::new(tr, 1 << 20);
    let Msg::PeerChallenge { nonce: challenge } =
        tr.next_msg(Duration::from_secs(5)).await.unwrap()
    else {
        panic!("{target} sent no challenge");
    };
    // The target's challenge, passed off to the dialling server as the down member's own.
    framed::write_msg(&mut vw, &Msg::PeerChallenge { nonce: challenge })
        .await
        .unwrap();
    let Msg::PeerAuth {
        from: opener,
        to,
        nonce,
        proof,
    } = vr.next_msg(Duration::from_secs(5)).await.unwrap()
    else {
        panic!("the dialling server ({from}) sent no PEERAUTH");
    };
    // A genuine proof over the target's challenge: only what it is bound to can stop the relay.
    assert_eq!(
        (opener.as_str(), to.as_str()),
        ("s2", down_id),
        "s2 dials its backup, the down member"
    );
    let meant = ChannelContext {
        kind: PortKind::Peer,
        opener: &opener,
        acceptor: &to,
        acceptor_nonce: challenge,
        opener_nonce: nonce,
    };
    assert!(
        key.check_peer_proof(&meant, &proof),
        "the relayed proof is not genuine; the test proves nothing"
    );
    let forwarded = Msg::PeerAuth {
        from: opener.clone(),
        to: if rewrite { target_id.to_string() } else { to },
        nonce,
        proof,
    };
    framed::write_msg(&mut tw, &forwarded).await.unwrap();
    // What the relay came for, sent at once (with no tag: it has no key).
    let ask = match kind {
        PortKind::Peer => Msg::Fetch {
            cid,
            epoch: 0,
            down_recv: 0,
            sum_from: 0,
            down_sum: mtcp::proto::sum::checksum(&[]),
            holding: Default::default(),
        },
        PortKind::Admin => Msg::AdminDrain,
    };
    let _ = framed::write_msg(&mut tw, &ask).await;
    let got = drain_until_closed(&mut tr).await;
    drop(vw);
    match got.as_slice() {
        [Msg::Refused {
            code: RefuseCode::Unauthenticated,
            reason,
        }] => reason.clone(),
        other => panic!(
            "{target} ({kind} port of {target_id}) answered a relayed handshake with {other:?}"
        ),
    }
}

/// A member that is down, s3, is listed in the cluster file; s2 (eager mode) redials its backup
/// s3 every second. A probe binds s3's peer address and relays each of s2's handshakes to s1's
/// peer and admin ports and to s2's own admin port. Every one is refused by name, nothing is
/// handed out or drained, and a live download through s1 arrives byte-exact and unmoved.
#[test]
fn relayed_handshakes_are_refused_on_peer_and_admin_ports() {
    let dir = TempDir::new("relay");
    let size = 64u64 << 20;
    let want = file(&dir, "f.bin", size, 21);
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: "eager".into(),
        absent: vec!["s3".into()],
        ..Default::default()
    };
    let lc = LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster");
    let key = lc.key.clone();
    let addr = |id: &str| lc.servers.iter().find(|s| s.id == id).unwrap().clone();
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "f.bin", "4M", &out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cid, origin) = rt.block_on(live_conn(&lc));
    assert_eq!(origin, "s1", "the agent tries s1 first");
    rt.block_on(async {
        let probe = TcpListener::bind(&addr("s3").peer).await.unwrap();
        let s1 = addr("s1");
        let s2 = addr("s2");
        let cases = [
            (
                &s1.peer,
                "s1",
                PortKind::Peer,
                false,
                "meant to reach server \"s3\"",
            ),
            (&s1.peer, "s1", PortKind::Peer, true, "does not verify"),
            (
                &s1.admin,
                "s1",
                PortKind::Admin,
                false,
                "meant to reach server \"s3\"",
            ),
            (&s1.admin, "s1", PortKind::Admin, true, "does not verify"),
            (&s2.admin, "s2", PortKind::Admin, true, "does not verify"),
        ];
        for (target, id, kind, rewrite, why) in cases {
            let reason = relay(&probe, &key, "s3", target, id, kind, rewrite, cid).await;
            assert!(reason.contains(why), "{target}: {reason}");
            log_line(
                dir.path(),
                id,
                &format!("{kind} port: authentication failed"),
            )
            .await;
        }
    });
    assert_eq!(
        log_count(dir.path(), "s1", "peer port: authentication failed"),
        2
    );
    assert_eq!(
        log_count(dir.path(), "s1", "admin port: authentication failed"),
        2
    );
    // The download was live throughout, and nothing was handed over or drained.
    assert!(
        curl.try_wait().unwrap().is_none() && len(&out) < size,
        "the download ended before the relays did; the test proves nothing about a live one"
    );
    for id in ["s1", "s2"] {
        let st = rt
            .block_on(mtcp::peer::admin_request(
                &addr(id).admin,
                &key,
                id,
                Msg::AdminStatus,
            ))
            .unwrap();
        assert!(!st.draining, "{id} was drained through a relay: {st:?}");
        assert_eq!(st.migrated_out, 0, "{id} handed a connection out: {st:?}");
    }
    assert_eq!(log_count(dir.path(), "s1", "draining: hinting"), 0);
    assert!(
        wait_child(&mut curl, "curl", Duration::from_secs(60)),
        "curl failed"
    );
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "download corrupted"
    );
    let st = lc.status().unwrap();
    let done = st.iter().find(|c| c.cid == cid.to_string()).unwrap();
    assert_eq!(
        (done.migrations, done.server.as_str()),
        (0, "s1"),
        "{done:?}"
    );
}

/// Opens an authenticated channel to `id`'s `kind` port as `from`, with the real key.
/// A channel that works: a sealed PING is answered.
async fn ping(ch: &mut mtcp::peer::Channel, t: u64) {
    ch.1.write_msg(&Msg::Ping { t }).await.unwrap();
    assert_eq!(
        ch.0.next_msg(Duration::from_secs(5)).await.unwrap(),
        Msg::Pong { t }
    );
}

/// Frames injected or tampered with inside authenticated channels (opened with the real key,
/// as an on-path attacker finds them after the handshake): a FETCH of the live connection with
/// no valid MAC, a sealed FETCH with one byte flipped, a replayed and a reordered PING, a cut-off
/// tag, and a DRAIN with no valid MAC on the admin port. Each ends its channel with no answer,
/// the server logs why, and the live download stays where it is and arrives byte-exact.
#[test]
fn frames_injected_into_authenticated_channels_are_refused() {
    let dir = TempDir::new("inject");
    let size = 64u64 << 20;
    let want = file(&dir, "f.bin", size, 22);
    let lc = cluster(&dir, 3);
    let out = dir.path().join("got.bin");
    let mut curl = spawn_curl(&lc, "f.bin", "4M", &out);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cid, origin) = rt.block_on(live_conn(&lc));
    let other = if origin == "s1" { "s2" } else { "s1" };
    let d = dir.path();
    rt.block_on(async {
        let fetch = Msg::Fetch {
            cid,
            epoch: 0,
            down_recv: 0,
            sum_from: 0,
            down_sum: mtcp::proto::sum::checksum(&[]),
            holding: Default::default(),
        };
        // 1. A FETCH of the live connection, injected with a made-up tag.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        ping(&mut ch, 1).await;
        let mut forged = fetch.to_frame().to_vec();
        forged.extend_from_slice(&[0x5a; mtcp::proto::channel::TAG_LEN]);
        ch.1.write_raw(&forged).await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(d, &origin, "frame 1 fails its MAC").await;

        // 2. A sealed FETCH with one byte of its payload altered.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        let mut sealed = ch.1.seal(&fetch).to_vec();
        sealed[8] ^= 0x01;
        ch.1.write_raw(&sealed).await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(d, &origin, "frame 0 fails its MAC").await;

        // 3. A sealed PING replayed.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        let p = ch.1.seal(&Msg::Ping { t: 3 });
        ch.1.write_raw(&p).await.unwrap();
        assert_eq!(
            ch.0.next_msg(Duration::from_secs(5)).await.unwrap(),
            Msg::Pong { t: 3 }
        );
        ch.1.write_raw(&p).await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(
            d,
            &origin,
            "replayed frame: sequence number 0 again (expected 1)",
        )
        .await;

        // 4. Two sealed PINGs, the second first.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        let p1 = ch.1.seal(&Msg::Ping { t: 41 });
        let p2 = ch.1.seal(&Msg::Ping { t: 42 });
        ch.1.write_raw(&p2).await.unwrap();
        ch.1.write_raw(&p1).await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(
            d,
            &origin,
            "reordered or dropped frame: sequence number 1, expected 0",
        )
        .await;

        // 5. A sealed PING whose tag is cut off, then the end of the stream.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        ping(&mut ch, 5).await;
        let p = ch.1.seal(&Msg::Ping { t: 6 });
        ch.1.write_raw(&p[..p.len() - 5]).await.unwrap();
        ch.1.get_mut().shutdown().await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(d, &origin, "truncated frame or frame MAC").await;

        // 6. A DRAIN on the admin port with a made-up tag.
        let mut ch = open(&lc, &origin, PortKind::Admin, "admin").await;
        let mut forged = Msg::AdminDrain.to_frame().to_vec();
        forged.extend_from_slice(&[0; mtcp::proto::channel::TAG_LEN]);
        ch.1.write_raw(&forged).await.unwrap();
        assert_eq!(drain_until_closed(&mut ch.0).await, vec![]);
        log_line(d, &origin, "admin port: frame authentication failed").await;

        // A genuine channel still works, and nothing was handed over or drained.
        let mut ch = open(&lc, &origin, PortKind::Peer, other).await;
        ping(&mut ch, 7).await;
        let st = mtcp::peer::admin_request(
            lc.admin_of(&origin).unwrap(),
            &lc.key,
            &origin,
            Msg::AdminStatus,
        )
        .await
        .unwrap();
        assert!(!st.draining, "drained by an injected frame: {st:?}");
        assert_eq!(
            st.migrated_out, 0,
            "handed out by an injected FETCH: {st:?}"
        );
    });
    assert_eq!(
        log_count(d, &origin, "peer port: frame authentication failed"),
        5
    );
    assert!(
        curl.try_wait().unwrap().is_none() && len(&out) < size,
        "the download ended before the injections did; the test proves nothing about a live one"
    );
    assert!(
        wait_child(&mut curl, "curl", Duration::from_secs(60)),
        "curl failed"
    );
    assert_eq!(
        mtcp_harness::local::sha256_file(&out).unwrap(),
        want,
        "download corrupted"
    );
    let st = lc.status().unwrap();
    let done = st.iter().find(|c| c.cid == cid.to_string()).unwrap();
    assert_eq!((done.migrations, &done.server), (0, &origin), "{done:?}");
}

/// A fence made for a server the cluster does not have (FENCEEPOCH's `by`, decision 63) is
/// refused by name, on an authenticated peer channel that stays usable; one made for a member
/// is answered (nothing held for an unknown connection: an empty STATE).
#[test]
fn a_fence_for_a_server_not_in_the_cluster_is_refused() {
    let dir = TempDir::new("fence-by");
    let lc = cluster_mode(&dir, 3, None, &[], "eager");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut ch = open(&lc, "s1", PortKind::Peer, "s2").await;
        let cid = Cid([9; 16]);
        let fence = |by: &str| Msg::FenceEpoch {
            cid,
            epoch: 4,
            by: by.into(),
            holding: Default::default(),
        };
        ch.1.write_msg(&fence("s9")).await.unwrap();
        match ch.0.next_msg(Duration::from_secs(5)).await.unwrap() {
            Msg::Refused { code, reason } => {
                assert_eq!(code, RefuseCode::Internal);
                assert!(reason.contains("not a server of the cluster"), "{reason}");
            }
            other => panic!("answered {}", other.name()),
        }
        ping(&mut ch, 7).await;
        ch.1.write_msg(&fence("s3")).await.unwrap();
        assert_eq!(
            ch.0.next_msg(Duration::from_secs(5)).await.unwrap(),
            Msg::State(Vec::new())
        );
    });
}
