//! One keep-alive connection through the agent serves many requests while it migrates between
//! requests, inside response bodies and inside a request's header bytes; every body is checked.

mod common;

use common::*;
use mtcp_agent::admin::{Request, Response};
use mtcp_harness::client::Client;
use std::time::Duration;

async fn migrate(admin: &str) -> String {
    match mtcp_agent::admin::request(
        admin,
        &Request::Migrate {
            conn: None,
            to: None,
        },
    )
    .await
    {
        Ok(Response::Migrated { results }) if results.len() == 1 && results[0].ok => {
            results[0].detail.clone()
        }
        other => panic!("migration failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_migrates_between_inside_and_within_requests() {
    keep_alive(false).await;
}

/// The same over the kernel fast path (`mtcp agent --fast-path`): the client's connection
/// itself moves. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_keep_alive_connection_migrates_between_inside_and_within_requests() {
    if !is_root() {
        eprintln!("!!! NOT ROOT: the kernel fast path needs TCP_REPAIR and nftables; this test is NOT run !!!");
        return;
    }
    keep_alive(true).await;
}

async fn keep_alive(fast_path: bool) {
    let dir = TempDir::new(if fast_path {
        "keepalive-fast"
    } else {
        "keepalive"
    });
    file(&dir, "a.bin", 6 << 20, 1);
    file(&dir, "b.bin", 300_000, 2);
    let a_bytes = std::fs::read(dir.path().join("www/a.bin")).unwrap();
    let b_bytes = std::fs::read(dir.path().join("www/b.bin")).unwrap();
    let lc = tokio::task::block_in_place(|| {
        let opts = mtcp_harness::local::LocalOptions {
            servers: 3,
            root: dir.path().join("www"),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            snapshot_every: Some(256 << 10),
            agent_args: if fast_path {
                vec!["--fast-path".into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        mtcp_harness::local::LocalCluster::start(&exe(), dir.path(), &opts)
            .expect("start local cluster")
    });
    let admin = lc.agent_admin.clone();
    let mut c = Client::connect(&lc.agent_listen).await.unwrap();
    // The agent opens its session right after accepting; wait for it.
    for _ in 0..200 {
        if lc.status_async().await.unwrap().iter().any(|c| c.is_live()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The CLI: `mtcp status --json` names the connection, `mtcp migrate --conn CID --to ID`
    // moves exactly it.
    let json =
        tokio::task::block_in_place(|| lc.mtcp(&["status", "--agent", &admin, "--json"])).unwrap();
    let st: Vec<mtcp_agent::ConnStatus> = serde_json::from_str(&json).unwrap();
    let live = st.iter().find(|c| c.is_live()).unwrap();
    let to = if live.server == "s2" { "s3" } else { "s2" };
    let out = tokio::task::block_in_place(|| {
        lc.mtcp(&[
            "migrate", "--agent", &admin, "--conn", &live.cid, "--to", to,
        ])
    })
    .unwrap();
    assert_eq!(out.trim(), format!("{} -> {to}", live.cid));
    let table = tokio::task::block_in_place(|| lc.mtcp(&["status", "--agent", &admin])).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&live.cid) && l.contains(to)),
        "{table}"
    );
    let mut moves = 1;
    let mut served = 0;
    for i in 0..24 {
        // What to ask for, and the bytes that must come back.
        let (path, range, want): (&str, Option<(usize, usize)>, &[u8]) = match i % 4 {
            0 => ("/a.bin", None, &a_bytes),
            1 => ("/b.bin", Some((1000, 250_000)), &b_bytes[1000..=250_000]),
            2 => ("/b.bin", None, &b_bytes),
            _ => (
                "/a.bin",
                Some((3 << 20, (5 << 20) - 1)),
                &a_bytes[3 << 20..5 << 20],
            ),
        };
        let range_hdr = range.map(|(s, e)| format!("Range: bytes={s}-{e}"));
        let extra: Vec<&str> = range_hdr.iter().map(|s| s.as_str()).collect();
        let resp = match i % 3 {
            // Between requests.
            0 => {
                migrate(&admin).await;
                moves += 1;
                c.request("GET", path, &extra).await.unwrap()
            }
            // Inside the body: a slow reader, and a migration while the body is in flight.
            1 => {
                c.rate = Some(64 << 20);
                let admin2 = admin.clone();
                let mover = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    migrate(&admin2).await
                });
                let r = c.request("GET", path, &extra).await.unwrap();
                c.rate = None;
                mover.await.unwrap();
                moves += 1;
                r
            }
            // Inside the request's header bytes.
            _ => {
                let mut req = format!("GET {path} HTTP/1.1\r\nHost: mtcp\r\n");
                if let Some(h) = &range_hdr {
                    req += h;
                    req += "\r\n";
                }
                req += "\r\n";
                let cut = req.len() / 2;
                c.send_raw(&req.as_bytes()[..cut]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                migrate(&admin).await;
                moves += 1;
                c.send_raw(&req.as_bytes()[cut..]).await.unwrap();
                c.read_response(false).await.unwrap()
            }
        };
        let code = if range.is_some() { 206 } else { 200 };
        assert_eq!(resp.status, code, "request {i} ({path} {range:?})");
        assert_eq!(resp.body_len, want.len() as u64, "request {i}");
        assert_eq!(resp.digest, sha256(want), "request {i}: body differs");
        served += 1;
    }
    assert!(served >= 20);
    let st = lc.status_async().await.unwrap();
    let live = st
        .iter()
        .find(|c| c.is_live())
        .expect("the connection is still open");
    assert_eq!(
        live.migrations, moves,
        "every migration moved the one connection"
    );
    assert!(moves >= 20, "{moves}");
    assert!(live.timeline.iter().all(|e| e.ok));
    assert_eq!(live.fast_path, fast_path);
}

/// `mtcp drain` of the server holding the most of 120 idle keep-alive connections: its summary
/// counts exactly the connections that were there as moved (none ended, none kept for a dead
/// agent), and every connection then answers another request with the right bytes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_summary_counts_what_moved() {
    const CONNS: usize = 120;
    let dir = TempDir::new("drain-summary");
    file(&dir, "b.bin", 20_000, 3);
    let b_bytes = std::fs::read(dir.path().join("www/b.bin")).unwrap();
    let lc = tokio::task::block_in_place(|| cluster(&dir, 3));
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let mut c = Client::connect(&lc.agent_listen).await.unwrap();
        let r = c.request("GET", "/b.bin", &[]).await.unwrap();
        assert_eq!(r.digest, sha256(&b_bytes), "body differs");
        clients.push(c);
    }
    let st = lc.status_async().await.unwrap();
    let live: Vec<_> = st.iter().filter(|c| c.is_live()).collect();
    assert_eq!(live.len(), CONNS, "{st:?}");
    let mut per: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in &live {
        *per.entry(c.server.as_str()).or_default() += 1;
    }
    let (busiest, held) = per
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, n)| (s.to_string(), *n))
        .unwrap();
    let cluster_file = lc.cluster_file.display().to_string();
    let out = tokio::task::block_in_place(|| {
        lc.mtcp(&["drain", "--cluster", &cluster_file, "--id", &busiest])
    })
    .unwrap();
    assert!(
        out.contains(&format!(
            ": {held} connection(s) moved, 0 ended there meanwhile, 0 whose agent is gone"
        )),
        "{busiest} held {held} of {per:?}; drain said: {out}"
    );
    for c in &mut clients {
        let r = c.request("GET", "/b.bin", &[]).await.unwrap();
        assert_eq!(r.digest, sha256(&b_bytes), "body differs");
    }
    let st = lc.status_async().await.unwrap();
    let live: Vec<_> = st.iter().filter(|c| c.is_live()).collect();
    assert_eq!(live.len(), CONNS);
    let left = live.iter().filter(|c| c.server == busiest).count();
    assert_eq!(left, 0, "live connections still on the drained {busiest}");
}
