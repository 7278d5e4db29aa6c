//! Eager mode (issue 15, decision 43): a move is safe even when its destination dies before its
//! own backups hold the new epoch. The state stays with its keeper (here the origin, which
//! handed it over alive), and the next candidate gets it once the dead destination's epoch is
//! fenced. Each test kills the destination at the precise moment with a test hook and compares
//! the download's SHA-256.

mod common;

use common::*;
use mtcp::proto::wire::{Msg, RefuseCode};
use mtcp_harness::local::{LocalCluster, LocalOptions};
use std::process::Child;
use std::time::Duration;

const SIZE: u64 = 48 << 20;

/// Three eager servers; `hook` are extra arguments for `s2` (the move's destination).
fn start(dir: &TempDir, hook: &[&str]) -> LocalCluster {
    start_with(dir, &[("s2", hook)])
}

/// Three eager servers, with extra arguments per server.
fn start_with(dir: &TempDir, hooks: &[(&str, &[&str])]) -> LocalCluster {
    let opts = LocalOptions {
        servers: 3,
        root: dir.path().join("www"),
        log: "info,mtcp=debug,mtcp_agent=debug".into(),
        mode: "eager".into(),
        server_args_for: hooks
            .iter()
            .map(|(id, a)| (id.to_string(), a.iter().map(|s| s.to_string()).collect()))
            .collect(),
        ..Default::default()
    };
    LocalCluster::start(&exe(), dir.path(), &opts).expect("start local cluster")
}

/// `mtcp migrate --all --to s2`, in the background (it returns once the move is over).
fn move_to_s2(lc: &LocalCluster) -> Child {
    move_to(lc, "s2")
}

/// The destination took the connection over (and stored it on its backup) but is killed
/// before its RESUMED reaches the agent: the agent retries the old epoch at the next
/// candidate, whose FETCH finds the origin's custody; the origin fences s2's epoch and hands
/// the connection out again. Before decision 43 the origin had forgotten the connection
/// (`UnknownConnection`) and the download was reset.
#[test]
fn a_destination_killed_before_its_resumed_reaches_the_agent_loses_nothing() {
    let dir = TempDir::new("custody-resumed");
    let mut lc = start(&dir, &["--hold-resumed-ms", "5000"]);
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        let mut mv = move_to_s2(lc);
        wait_for("s2 to finish its takeover", Duration::from_secs(20), || {
            log(&dir, "s2").contains("test hook: holding RESUMED")
        });
        lc.kill("s2").expect("kill -9 s2");
        assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
    });
    let s1 = log(&dir, "s1");
    assert!(
        s1.contains("connection handed over again from custody"),
        "the origin did not hand the connection out again"
    );
}

/// The destination cannot reach its backup (its pushes fail), so after the protection bound it
/// resumes unconfirmed; the agent keeps upstream from the last confirmed point, the origin
/// keeps the state. The destination is then killed: nobody can take the connection at its
/// epoch (no backup holds it), so the agent falls back to the epoch before, and the origin
/// fences s2's epoch and hands the connection out again. Before decision 43 the move had
/// resumed "unprotected" and the kill lost the connection (`Divergence`).
#[test]
fn a_destination_that_resumed_unconfirmed_and_dies_loses_nothing() {
    let dir = TempDir::new("custody-unconfirmed");
    let mut lc = start(&dir, &["--drop-pushes"]);
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        let mut mv = move_to_s2(lc);
        assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
        assert_eq!(serving(lc), "s2", "moved to s2, unconfirmed");
        assert!(log(&dir, "s2").contains("resuming unconfirmed"));
        std::thread::sleep(Duration::from_millis(300));
        lc.kill("s2").expect("kill -9 s2");
    });
    let agent = log(&dir, "agent");
    assert!(
        agent.contains("retrying from epoch"),
        "the agent did not fall back"
    );
    assert!(log(&dir, "s1").contains("connection handed over again from custody"));
}

/// The origin dies; the agent's first candidate (s2, the origin's backup) claims the replica,
/// takes the connection over and stores it on its own backup, then stays silent (the hook): the
/// agent gives up on it, its claim standing. The next candidate's claim finds the replica held
/// by s2; s2 is asked to give its epoch up (it has not answered the agent, so it does: it never
/// sends that RESUMED), the epoch is fenced at s2's backup, and the connection goes to s3 one
/// epoch up.
/// Before decision 43 the standing claim refused s3 (`StaleEpoch … claimed by s2`) and the
/// download was reset.
#[test]
fn a_silent_candidate_whose_claim_stands_does_not_block_the_next() {
    let dir = TempDir::new("custody-silent");
    // Held far longer than the agent's silence bound toward a candidate (~0.5 s here: it follows
    // the handshakes to the candidate, decision 62). When it followed the session's PONGs, which
    // wait behind this rate-limited download's queued data, the agent once waited out a 15 s
    // hold on a fresh CI machine.
    let mut lc = start(&dir, &["--hold-resumed-ms", "15000"]);
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        lc.kill("s1").expect("kill -9 s1");
    });
    // s2 decides what to do with its held RESUMED when the hold ends.
    wait_for("s2's hold to end", Duration::from_secs(30), || {
        let s2 = log(&dir, "s2");
        s2.contains("superseded before RESUMED went out") || s2.contains("migrated here")
    });
    let s2 = log(&dir, "s2");
    assert!(
        s2.contains("replica held by a destination that has not confirmed"),
        "s2's claim was not superseded"
    );
    assert!(
        s2.contains("superseded before RESUMED went out"),
        "s2 answered the agent after being superseded"
    );
    let agent = log(&dir, "agent");
    assert!(agent.contains("to=s3"), "not moved to s3");
}

/// The agent gives up on s2 (silent: the hook holds its RESUMED until the agent has left, at
/// most 20 s) and tries s3, which is slow to start (its hook); meanwhile s2 writes its RESUMED
/// to the session the agent left. When
/// s3's FETCH finds the origin's custody, s2 is asked to give its epoch up: the agent never
/// spoke on that session, so s2 does and lets the connection go (decision 48), and s3 gets it.
/// Before, s2 refused ("already answered the agent"), every candidate was refused for the old
/// epoch and the download was reset.
#[test]
fn a_holder_whose_resumed_the_agent_never_used_yields_it() {
    let dir = TempDir::new("custody-unused-resumed");
    let mut lc = start_with(
        &dir,
        &[
            // The agent gives up on a silent candidate after one heartbeat plus srtt + 2 × RTO
            // of its path to it (its handshakes there, decision 62): ~0.5 s here. When it
            // followed the session's PONGs, which wait behind this rate-limited download's
            // queued data, it grew past a fixed 3 s hold in 2 of 5 runs. So s2 holds until the
            // agent has left, whatever the bound, and writes RESUMED then (s3 starts 4.5 s after
            // the agent came to it, well after that).
            (
                "s2",
                &["--hold-resumed-ms", "20000", "--hold-resumed-until-left"],
            ),
            ("s3", &["--delay-takeover-ms", "4500"]),
        ],
    );
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        let mut mv = move_to_s2(lc);
        assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
    });
    let s2 = log(&dir, "s2");
    assert!(
        s2.contains("giving up an epoch whose RESUMED the agent never used"),
        "s2 did not give its unused epoch up"
    );
    let s1 = log(&dir, "s1");
    assert!(s1.contains("connection handed over again from custody"));
    // s3's MIGRATE (the agent's second) says the agent holds only epoch 0, and s2 took epoch
    // 1 over for the first: no agent will use epoch 1 (decision 66).
    assert!(
        s1.contains("the holder let go of an epoch the agent's word rules out"),
        "the keeper did not read the agent's word"
    );
    assert!(log(&dir, "agent").contains("to=s3"), "not moved to s3");
}

/// The agent's word (decision 66): s3 took the connection over for the agent's second MIGRATE.
/// A YIELD of s3's epoch made for the first — what a destination still serving a MIGRATE the
/// agent had given up on would send — is refused by that rule (s3's log says which), and the
/// download goes on from s3, byte-exact.
#[test]
fn a_yield_for_a_migrate_the_agent_abandoned_is_refused() {
    let dir = TempDir::new("custody-stale-yield");
    let mut lc = start_with(&dir, &[]);
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        for id in ["s2", "s3"] {
            let mut mv = move_to(lc, id);
            assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
        }
        let st = lc.status().unwrap();
        let c = st.iter().find(|c| c.is_live()).expect("the download");
        assert_eq!((c.server.as_str(), c.migrations), ("s3", 2), "{c:?}");
        let cid: mtcp::proto::Cid = c.cid.parse().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let answer = rt.block_on(async {
            let (mut r, mut w) = open(lc, "s3", mtcp::proto::PortKind::Peer, "s1").await;
            let y = Msg::Yield {
                cid,
                epoch: c.epoch,
                attempt: 1,
            };
            w.write_msg(&y).await.unwrap();
            r.next_msg(Duration::from_secs(5)).await.unwrap()
        });
        assert!(
            matches!(
                answer,
                Msg::Refused {
                    code: RefuseCode::StaleEpoch,
                    ..
                }
            ),
            "answered {answer:?}"
        );
    });
    assert_eq!(
        log(&dir, "s3")
            .matches("refusing to give up an epoch taken over for a later MIGRATE")
            .count(),
        1
    );
}

/// s2 resumes unconfirmed (its pushes fail) and is killed. Every candidate for s2's epoch
/// fails to restart from offset 0 (nothing of that epoch is on any backup), and — the hook —
/// their RELEASECLAIMs are lost, so the claims stand at s2's backup s3. The agent falls back to
/// the epoch before; the origin's fence of s2's epoch at s3 finds it claimed by a candidate
/// that failed: asked, that candidate gives its successor epoch up, the claim passes to the
/// origin one epoch up, and the connection goes out again past it (decision 48). Before, the
/// fence was refused ("already taken over") and the download was reset.
#[test]
fn a_failed_takeover_whose_release_is_lost_does_not_block_the_fence() {
    let dir = TempDir::new("custody-lost-release");
    let mut lc = start_with(
        &dir,
        &[
            ("s1", &["--drop-releases"]),
            ("s2", &["--drop-pushes"]),
            ("s3", &["--drop-releases"]),
        ],
    );
    download_through(&dir, &mut lc, SIZE, 15, |lc| {
        let mut mv = move_to_s2(lc);
        assert!(wait_child(&mut mv, "mtcp migrate", Duration::from_secs(30)));
        assert_eq!(serving(lc), "s2", "moved to s2, unconfirmed");
        std::thread::sleep(Duration::from_millis(300));
        lc.kill("s2").expect("kill -9 s2");
    });
    let (s1, s3) = (log(&dir, "s1"), log(&dir, "s3"));
    assert!(
        s1.contains("the claims' releases are dropped")
            || s3.contains("the claims' releases are dropped"),
        "no takeover failed with its release lost"
    );
    assert!(
        s3.contains("passing the claim over") || s1.contains("passing the claim over"),
        "the fence did not pass a failed candidate's claim over"
    );
    assert!(log(&dir, "agent").contains("retrying from epoch"));
    assert!(s1.contains("connection handed over again from custody"));
}
