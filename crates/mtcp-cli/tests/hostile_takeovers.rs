//! Issue 14, a destination's takeovers and an origin's hand-overs: a destination runs at most
//! `--max-takeovers` at once and an origin `--max-handovers` (each may hold a state record of
//! up to `max_record`); the next MIGRATE or FETCH is refused `Busy` by name, and the agent's
//! connection stays served (here: re-attached to its origin) with every byte intact.

mod common;

use common::*;
use mtcp_agent::admin::{request, Request, Response};
use mtcp_harness::client::Client;
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_over_its_takeover_cap_refuses_busy_and_downloads_stay_intact() {
    let dir = TempDir::new("hostile-takeovers");
    let want = file(&dir, "f.bin", 16 << 20, 21);
    let lc: LocalCluster = tokio::task::block_in_place(|| {
        let opts = LocalOptions {
            servers: 2,
            root: dir.path().join("www"),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            // One at a time, and a MIGRATE over it waits only 300 ms for its turn.
            server_args: ["--max-takeovers", "1", "--takeover-wait-ms", "300"]
                .map(String::from)
                .to_vec(),
            // The origin answers FETCH 1.5 s late: the first takeover at s2 is still running
            // when the second MIGRATE arrives.
            server_args_for: vec![("s1".into(), vec!["--peer-delay-ms".into(), "1500".into()])],
            ..Default::default()
        };
        LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
    });
    two_moves_one_refused_busy(&lc, &want, "maximum of 1 connections").await;
}

/// The origin's side (issue 14): it hands over at most `--max-handovers` connections at once
/// (each frozen and encoded into a record of up to `max_record`); a FETCH over the cap is
/// refused `Busy` after a short wait and that connection stays served where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_over_its_handover_cap_refuses_busy_and_downloads_stay_intact() {
    let dir = TempDir::new("hostile-handovers");
    let want = file(&dir, "f.bin", 16 << 20, 22);
    let lc: LocalCluster = tokio::task::block_in_place(|| {
        let opts = LocalOptions {
            servers: 2,
            root: dir.path().join("www"),
            log: "info,mtcp=debug,mtcp_agent=debug".into(),
            // s1 hands over one connection at a time and holds each hand-over for 1.5 s; a
            // second FETCH waits 300 ms for its turn.
            server_args_for: vec![(
                "s1".into(),
                [
                    "--max-handovers",
                    "1",
                    "--handover-wait-ms",
                    "300",
                    "--hold-handover-ms",
                    "1500",
                ]
                .map(String::from)
                .to_vec(),
            )],
            ..Default::default()
        };
        LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
    });
    two_moves_one_refused_busy(&lc, &want, "handing over its maximum of 1").await;
}

/// Two downloads on s1, both asked to move to s2 at once: one moves, the other is refused
/// `Busy` with `refusal` among its reasons and stays on s1 (re-attached to its origin); it moves
/// once the first is done, and both downloads arrive intact.
async fn two_moves_one_refused_busy(lc: &LocalCluster, want: &str, refusal: &str) {
    // Two downloads, both on s1 (the agent tries servers in order).
    let mut dls = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&lc.agent_listen).await.unwrap();
        c.rate = Some(3 << 20);
        dls.push(tokio::spawn(async move {
            c.request("GET", "/f.bin", &[]).await
        }));
    }
    for _ in 0..500 {
        let st = lc.status_async().await.unwrap();
        if st
            .iter()
            .filter(|c| c.is_live() && c.bytes_down > 0 && c.server == "s1")
            .count()
            == 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Both asked to move to s2 at once: s2 takes one, refuses the other Busy; that one is
    // re-attached where it was.
    let r = request(
        &lc.agent_admin,
        &Request::Migrate {
            conn: None,
            to: Some("s2".into()),
        },
    )
    .await
    .unwrap();
    let Response::Migrated { results } = r else {
        panic!("{r:?}")
    };
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.iter().all(|r| r.ok), "{results:?}");
    let mut on: Vec<String> = results.iter().map(|r| r.detail.clone()).collect();
    on.sort();
    assert_eq!(on, ["s1", "s2"], "{results:?}");
    let st = lc.status_async().await.unwrap();
    let stayed = st
        .iter()
        .find(|c| c.is_live() && c.server == "s1")
        .expect("the refused connection is still live on s1");
    let ev = stayed.timeline.last().expect("its move");
    assert!(
        ev.refusals
            .iter()
            .any(|r| r.contains("Busy") && r.contains(refusal)),
        "{:?}",
        ev.refusals
    );

    // The cap is per moment: with the first one done, the other moves too.
    let moved = lc.migrate(Some(&stayed.cid), Some("s2")).await.unwrap();
    assert_eq!(moved[0].1, "s2");

    for dl in dls {
        assert_download_intact(dl, want).await;
    }
}
