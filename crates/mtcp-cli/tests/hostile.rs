//! Wrong and old tokens, garbage and oversized messages on every port: each gets a clear refusal
//! or a closed connection, and the live connection (a download through the agent) and the
//! servers go on unaffected.

mod common;

use common::*;
use mtcp::framed::{self, FrameReader};
use mtcp::proto::stream::Refusal;
use mtcp::proto::wire::{self, Frame, Migrate, Msg, RefuseCode};
use mtcp::proto::{Cid, Token};
use mtcp_agent::admin::{Request, Response};
use mtcp_harness::client::Client;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and returns what the server answered before closing (bounded wait).
async fn poke(addr: &str, bytes: &[u8]) -> Vec<u8> {
    if addr.contains('/') {
        let s = tokio::net::UnixStream::connect(addr).await.unwrap();
        return poke_on(addr, s, bytes).await;
    }
    let s = TcpStream::connect(addr).await.unwrap();
    poke_on(addr, s, bytes).await
}

async fn poke_on<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    addr: &str,
    mut s: S,
    bytes: &[u8],
) -> Vec<u8> {
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(8), async {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&b[..n]),
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "{addr} kept a garbage connection open: {:?}",
        &bytes[..bytes.len().min(40)]
    );
    out
}

/// A MIGRATE on the data port of `addr`; returns the refusal.
async fn migrate_raw(addr: &str, m: Migrate) -> Refusal {
    let mut s = TcpStream::connect(addr).await.unwrap();
    framed::exchange_preamble(&mut s).await.unwrap();
    let (r, mut w) = s.into_split();
    framed::write_msg(&mut w, &Msg::Migrate(m)).await.unwrap();
    let mut r = FrameReader::new(r, 1 << 20);
    match r.next_msg(Duration::from_secs(10)).await.unwrap() {
        Msg::Refused { code, reason } => Refusal::new(code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A fast-path HELLO on the data port of `addr`, then (after WELCOME) `adopt` as the client's
/// connection; returns the refusal.
async fn hello_direct(addr: &str, adopt: Option<Vec<u8>>) -> Refusal {
    let (mut r, mut w) = fast_path_hello(addr).await;
    let mut m = r.next_msg(Duration::from_secs(10)).await.unwrap();
    if let Some(a) = adopt {
        assert!(matches!(m, Msg::Welcome(_)), "expected WELCOME, got {m:?}");
        framed::write_msg(&mut w, &Msg::Adopt(a)).await.unwrap();
        m = r.next_msg(Duration::from_secs(10)).await.unwrap();
    }
    let refusal = match m {
        Msg::Refused { code, reason } => Refusal::new(code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // And the session is closed.
    assert!(
        r.next_msg(Duration::from_secs(10)).await.is_err(),
        "session left open"
    );
    refusal
}

/// Fast-path input from a client that is not a real agent: a garbage connection state, and a
/// well-formed one for an address the cluster does not admit (the data port must not plant
/// arbitrary TCP connections on the host). Each is refused by name, the session closed, and the
/// server goes on serving. Needs no root: both are refused before any socket is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_refuses_garbage_and_unadmitted_connections() {
    let dir = TempDir::new("hostile-fast");
    let want = file(&dir, "f.bin", 1 << 20, 6);
    let lc = tokio::task::block_in_place(|| {
        let opts = mtcp_harness::local::LocalOptions {
            servers: 2,
            root: dir.path().join("www"),
            log: "info,mtcp=debug".into(),
            fast_path_listen: vec!["127.0.0.1:9".into()],
            ..Default::default()
        };
        mtcp_harness::local::LocalCluster::start(&exe(), dir.path(), &opts).expect("cluster")
    });
    let data = lc.servers[0].data.clone();
    let garbage: Vec<u8> = (0..3000).map(|i| (i * 31 % 253) as u8).collect();
    let Refusal { code, reason: why } = hello_direct(&data, Some(garbage)).await;
    assert_eq!(code, RefuseCode::Internal, "{why}");
    assert!(why.contains("TCP state"), "{why}");
    let planted = mtcp_repair::TcpState {
        local: "127.0.0.1:22".parse().unwrap(),
        remote: "127.0.0.1:40000".parse().unwrap(),
        send_seq: 1,
        recv_seq: 1,
        send_queue: vec![],
        unsent: 0,
        recv_queue: b"hello".to_vec(),
        mss: 1460,
        options: 0,
        snd_wscale: 0,
        rcv_wscale: 0,
        timestamp: 0,
        window: Default::default(),
    };
    let Refusal { code, reason: why } = hello_direct(&data, Some(planted.encode())).await;
    assert_eq!(code, RefuseCode::Internal, "{why}");
    assert!(
        why.contains("not one this cluster's fast path admits"),
        "{why}"
    );
    // A relayed connection is still served, every byte intact.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    let r = c.request("GET", "/f.bin", &[]).await.unwrap();
    assert_eq!((r.status, r.digest), (200, want));
}

fn frame_header(kind: u8, len: u32) -> Vec<u8> {
    let mut v = wire::preamble(mtcp::proto::PROTOCOL_VERSION).to_vec();
    v.push(kind);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_garbage_leave_live_connections_and_servers_unaffected() {
    let dir = TempDir::new("hostile");
    let size = 48u64 << 20;
    let want = file(&dir, "f.bin", size, 5);
    let lc = tokio::task::block_in_place(|| cluster(&dir, 3));
    let key = mtcp::Cluster::load(&lc.cluster_file).unwrap().key;
    let addr = |id: &str| lc.servers.iter().find(|s| s.id == id).unwrap().clone();

    // A live download, slow enough to be in flight during everything below.
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    c.rate = Some(8 << 20);
    let dl = tokio::spawn(async move { c.request("GET", "/f.bin", &[]).await });
    let mut live = None;
    for _ in 0..300 {
        live = lc
            .status_async()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.is_live() && c.bytes_down > 0);
        if live.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live = live.expect("download started");
    let cid: Cid = live.cid.parse().unwrap();
    let origin = live.server.clone();
    let other = if origin == "s1" { "s2" } else { "s1" };
    let base = Migrate {
        cid,
        epoch: live.epoch,
        token: Token(rand::random()),
        origin: origin.clone(),
        down_recv: 0,
        sum_from: 0,
        down_sum: mtcp::proto::sum::checksum(&[]),
        up_sent: live.bytes_up,
        up_base: 0,
        segs: vec![],
        holding: Default::default(),
    };

    // Wrong token: refused before anything of the connection is looked at, and the refusal
    // names nothing of it (no epoch, no position), whatever the MIGRATE claimed.
    let Refusal { code, reason: why } = migrate_raw(&addr(other).data, base.clone()).await;
    assert_eq!(code, RefuseCode::BadToken, "{why}");
    let probing = Migrate {
        epoch: 9,
        down_recv: 1 << 40,
        sum_from: 1 << 39,
        up_sent: 0,
        ..base.clone()
    };
    for to in [&origin, other] {
        let Refusal { code, reason: why } = migrate_raw(&addr(to).data, probing.clone()).await;
        assert_eq!(code, RefuseCode::BadToken, "{why}");
        assert!(
            !why.contains(&cid.to_string()) && !why.chars().any(|c| c.is_ascii_digit()),
            "a refusal to an unauthenticated MIGRATE names the connection or a number: {why}"
        );
    }

    // A mistyped target is refused without touching the live connection.
    match mtcp_agent::admin::request(
        &lc.agent_admin,
        &Request::Migrate {
            conn: None,
            to: Some("nope".into()),
        },
    )
    .await
    {
        Ok(Response::Migrated { results }) => {
            assert!(
                !results[0].ok && results[0].detail.contains("unknown server"),
                "{results:?}"
            )
        }
        other => panic!("{other:?}"),
    }

    // Move it once for real, so epoch 0's token is old; then present the old token.
    match mtcp_agent::admin::request(
        &lc.agent_admin,
        &Request::Migrate {
            conn: None,
            to: Some(other.into()),
        },
    )
    .await
    {
        Ok(Response::Migrated { results }) => assert!(results[0].ok, "{results:?}"),
        other => panic!("{other:?}"),
    }
    let old = Migrate {
        token: key.token(cid, 0),
        epoch: 0,
        origin: other.to_string(),
        ..base.clone()
    };
    let third = lc
        .servers
        .iter()
        .map(|s| s.id.clone())
        .find(|s| s != other && *s != origin)
        .unwrap();
    let Refusal { code, reason: why } = migrate_raw(&addr(&third).data, old).await;
    assert_eq!(code, RefuseCode::StaleEpoch, "{why}");
    // An old token does not tell where the connection is now.
    assert!(
        !why.contains("epoch 1") && why.contains("stale"),
        "a stale token's refusal reveals the current epoch: {why}"
    );
    // A valid token naming the wrong origin.
    let wrong_origin = Migrate {
        token: key.token(cid, 1),
        epoch: 1,
        origin: origin.clone(),
        ..base.clone()
    };
    let Refusal { code, reason: why } = migrate_raw(&addr(&third).data, wrong_origin).await;
    assert_eq!(code, RefuseCode::UnknownConnection, "{why}");

    // Garbage and oversized messages on every server port.
    let mut junk: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        (0..5000).map(|i| (i * 7919 % 251) as u8).collect(),
        frame_header(1, u32::MAX),
        frame_header(0, 64 << 20),
        frame_header(7, 3),
    ];
    let mut malformed = frame_header(1, 4);
    malformed.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    junk.push(malformed);
    let mut wrong_version = b"MTCP".to_vec();
    wrong_version.extend_from_slice(&999u16.to_be_bytes());
    junk.push(wrong_version);
    let mut forged_auth = wire::preamble(mtcp::proto::PROTOCOL_VERSION).to_vec();
    forged_auth.extend_from_slice(
        &Msg::PeerAuth {
            from: "s1".into(),
            to: "s2".into(),
            nonce: [0; 16],
            proof: [0; 32],
        }
        .to_frame(),
    );
    forged_auth.extend_from_slice(&Msg::AdminDrain.to_frame());
    junk.push(forged_auth);
    for s in &lc.servers {
        for port in [&s.data, &s.peer, &s.admin] {
            for j in &junk {
                let answer = poke(port, j).await;
                // Whatever it said, it must not have accepted a drain or handed out state.
                let mut buf = bytes::BytesMut::from(&answer[answer.len().min(6)..]);
                let dec = wire::FrameDecoder::new(1 << 20);
                while let Ok(Some(f)) = dec.decode(&mut buf) {
                    assert!(
                        !matches!(
                            f,
                            Frame::Msg(Msg::AdminStatusReply(_))
                                | Frame::Msg(Msg::State(_))
                                | Frame::Msg(Msg::Welcome(_))
                        ),
                        "{port} answered garbage with {f:?}"
                    );
                }
            }
        }
        // The version mismatch is named.
        let mut v = b"MTCP".to_vec();
        v.extend_from_slice(&999u16.to_be_bytes());
        let answer = poke(&s.data, &v).await;
        assert!(
            String::from_utf8_lossy(&answer).contains("version mismatch"),
            "{answer:?}"
        );
    }
    // A fast-path HELLO to a cluster that admits no fast-path agent is refused, by name.
    for s in &lc.servers {
        let Refusal { code, reason: why } = hello_direct(&s.data, None).await;
        assert_eq!(code, RefuseCode::Unauthenticated, "{why}");
        assert!(why.contains("fast_path"), "{why}");
    }
    // The agent's admin port: garbage lines get an error, an endless line gets closed.
    let a = poke(&lc.agent_admin, b"this is not json\n").await;
    assert!(
        String::from_utf8_lossy(&a).contains("bad request"),
        "{}",
        String::from_utf8_lossy(&a)
    );
    let _ = poke(&lc.agent_admin, &vec![b'x'; 100_000]).await;

    // No server was drained by a forged admin request: each still accepts new connections.
    for s in &lc.servers {
        let st = mtcp::peer::admin_request(&s.admin, &key, &s.id, Msg::AdminStatus)
            .await
            .unwrap();
        assert!(!st.draining, "{} was drained by garbage", s.id);
    }
    // The live download completes intact, having moved exactly once.
    let r = tokio::time::timeout(Duration::from_secs(60), dl)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.digest, want, "live connection corrupted");
    let st = lc.status_async().await.unwrap();
    let done = st.iter().find(|c| c.cid == live.cid).unwrap();
    assert_eq!(done.migrations, 1, "{done:?}");
    // And a new connection is served.
    let mut c2 = Client::connect(&lc.agent_listen).await.unwrap();
    let r2 = c2
        .request("GET", "/f.bin", &["Range: bytes=0-99999"])
        .await
        .unwrap();
    assert_eq!(r2.status, 206);
    assert_eq!(r2.body_len, 100_000);
}
