//! A destination's decisions on a MIGRATE, without I/O (issue 11): whether to take it up at all,
//! whether the state record it got fits the agent's claims, which record it restarts from, and
//! the RESUMED it answers with. The runtime (`mtcp/src/takeover.rs`) does the waiting — the
//! takeover slot, the FETCH to the origin or a backup's replica, the claims — around these.

pub mod pick;
pub mod wait;

use crate::auth::Token;
use crate::record::StateRecord;
use crate::stream::{replica_for_client, Refusal};
use crate::sum::MAX_SEGS;
use crate::wire::{Migrate, RefuseCode, Resumed, ServerInfo};

/// The refusal of a token that does not match: it names nothing of the connection (a refusal
/// to an unauthenticated party echoes no positions or epochs, issue 14).
pub const BAD_TOKEN: &str = "the token does not match the connection and epoch named";

/// Whether server `me` takes up MIGRATE `m` at all: the token must match (checked by the caller
/// with the cluster key: `token_ok`), a draining server takes nothing, and the agent's checksum
/// ranges are bounded. Checked before anything is waited for or fetched.
pub fn admit(m: &Migrate, token_ok: bool, draining: bool, me: &str) -> Result<(), Refusal> {
    if !token_ok {
        return Err(Refusal::new(RefuseCode::BadToken, BAD_TOKEN));
    }
    if draining {
        return Err(Refusal::new(
            RefuseCode::Draining,
            format!("server {me} is draining"),
        ));
    }
    if m.segs.len() > MAX_SEGS {
        return Err(Refusal::too_large(format!(
            "{} checksum ranges (at most {MAX_SEGS})",
            m.segs.len()
        )));
    }
    if m.holding.epochs.len() > crate::custody::MAX_LINEAGE + 1 {
        return Err(Refusal::too_large(format!(
            "{} epochs held (at most {})",
            m.holding.epochs.len(),
            crate::custody::MAX_LINEAGE + 1
        )));
    }
    Ok(())
}

/// The origin MIGRATE `m` names, if it is a server of the cluster (`origin`, as the cluster
/// file has it): otherwise there is nothing to fetch the connection from. Checked once the
/// takeover has its slot.
pub fn check_origin<T>(m: &Migrate, origin: Option<T>) -> Result<T, Refusal> {
    match origin {
        Some(o) => Ok(o),
        None => Err(Refusal::unknown_connection(format!(
            "origin {:?} is not in the cluster",
            m.origin
        ))),
    }
}

/// What a connection restarted by a takeover was resumed for: the agent's MIGRATE number and
/// the epoch that MIGRATE moved it from (zeros for a new connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumedFor {
    pub attempt: u64,
    pub from: u64,
}

/// Lazy mode: whether a MIGRATE `m` (its token checked) is served by this server's own copy
/// of the connection — frozen here and restarted one epoch up, as for a MIGRATE to the serving
/// server — instead of by a FETCH from the origin it names. That is so when this server holds
/// the connection (`serves`, at `serving`) because it resumed it for an earlier MIGRATE of the
/// agent from `m`'s very epoch (`resumed`), and the agent never read that RESUMED: its word
/// holds `m.epoch` and not `serving` ([`Holding::rules_out`](crate::wire::Holding::rules_out)).
/// The agent gave up on this server (silent past its bound on a lossy path) while the takeover
/// went on; the origin forgot the connection once it handed it over, so every candidate was
/// refused and the connection lost (decision 73). In lazy mode the origin hands an epoch over
/// once, so this copy is the only one descended from `m.epoch`, however often it was re-attached
/// here for nobody. Eager mode keeps the origin's custody for this case, which makes such a
/// holder yield (decision 48).
pub fn reattaches_own(
    m: &Migrate,
    eager: bool,
    serving: u64,
    serves: bool,
    resumed: ResumedFor,
) -> bool {
    !eager
        && serves
        && resumed.from == m.epoch
        && serving > m.epoch
        && m.holding.epochs.contains(&m.epoch)
        && m.holding.rules_out(resumed.attempt, serving)
}

/// The refusal of a takeover that a keeper superseded before its RESUMED went out (the agent
/// had given up on this destination; another one has the connection one epoch up).
pub fn superseded() -> Refusal {
    Refusal::stale_epoch("the connection went to another server meanwhile")
}

/// The record to restart from, given the one fetched. A record labelled past the MIGRATE's
/// epoch without claims came from a keeper's custody (decision 43): like a replica, it is a
/// restart point, turned into one for the client's position now. Returns it and whether it is
/// a replica's (`claimed`: taken from a backup's replica; `direct`: a fast-path connection, see
/// [`check_record`]).
pub fn restart_record(
    m: &Migrate,
    rec: StateRecord,
    claimed: bool,
    direct: bool,
) -> Result<(StateRecord, bool), Refusal> {
    let rehanded = !claimed && rec.epoch > m.epoch;
    let rec = match rehanded {
        true => replica_for_client(rec, m.down_recv, &m.ranges(), m.up_base)?,
        false => rec,
    };
    check_record(m, &rec, direct)?;
    Ok((rec, claimed || rehanded))
}

/// The record a destination got must be for this connection and the client's position
/// (`direct`: a fast-path connection, whose position is the origin's own — the agent sees no
/// bytes).
pub fn check_record(m: &Migrate, rec: &StateRecord, direct: bool) -> Result<(), Refusal> {
    if rec.cid != m.cid {
        return Err(Refusal::internal(
            "origin sent the record of another connection",
        ));
    }
    if rec.epoch < m.epoch {
        return Err(Refusal::internal(format!(
            "origin sent the record of epoch {} for a move from epoch {}",
            rec.epoch, m.epoch
        )));
    }
    if !direct && m.up_sent < rec.up_recv() {
        return Err(Refusal::new(
            RefuseCode::Malformed,
            format!(
                "agent says it sent {} upstream bytes but the origin received {}",
                m.up_sent,
                rec.up_recv()
            ),
        ));
    }
    if !direct && rec.client_down() != m.down_recv {
        return Err(Refusal::internal(
            "origin's record is for another downstream position",
        ));
    }
    Ok(())
}

/// Who answers RESUMED and how the agent reaches the cluster from there.
#[derive(Debug, Clone)]
pub struct Destination<'a> {
    pub id: &'a str,
    pub alternates: Vec<ServerInfo>,
    pub heartbeat_ms: u32,
    /// The server's bound on an agent's silence ([`Resumed::idle_ms`]).
    pub idle_ms: u32,
}

/// The epoch a connection restarted from `rec` runs at: one past the record's label (the
/// MIGRATE's epoch + 1, or more when a silent holder was superseded and its epoch fenced).
pub fn next_epoch(rec: &StateRecord) -> u64 {
    rec.epoch + 1
}

/// The RESUMED for a connection restarted here from `rec`, with the token for its new epoch
/// (`token`, made by the caller with the cluster key for [`next_epoch`]).
pub fn resumed(
    rec: &StateRecord,
    at: Destination<'_>,
    token: Token,
    state_bytes: u64,
    from_replica: bool,
) -> Resumed {
    Resumed {
        server: at.id.to_string(),
        epoch: next_epoch(rec),
        token,
        up_from: rec.up_recv(),
        alternates: at.alternates,
        heartbeat_ms: at.heartbeat_ms,
        idle_ms: at.idle_ms,
        state_bytes,
        restart_out: rec.snap_out,
        from_replica,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Cid;
    use crate::sum::{checksum, SumSeg};
    use bytes::Bytes;

    mod flow;

    /// A lazy destination the agent gave up on, which finished the takeover anyway, serves the
    /// agent's next MIGRATE from that same epoch with its own copy; nothing else does.
    #[test]
    fn a_takeover_the_agent_gave_up_on_serves_its_next_migrate_from_that_epoch() {
        let mut m = migrate(7, 0, 0);
        m.holding = crate::wire::Holding {
            attempt: 5,
            epochs: vec![7],
        };
        let r = |attempt, from| ResumedFor { attempt, from };
        assert!(reattaches_own(&m, false, 8, true, r(4, 7)));
        assert!(
            reattaches_own(&m, false, 9, true, r(4, 7)),
            "re-attached here before, for nobody too"
        );
        assert!(
            !reattaches_own(&m, true, 8, true, r(4, 7)),
            "eager: the custody's yield"
        );
        assert!(
            !reattaches_own(&m, false, 8, false, r(4, 7)),
            "no longer served here"
        );
        assert!(
            !reattaches_own(&m, false, 8, true, r(4, 6)),
            "not taken from this epoch"
        );
        assert!(
            !reattaches_own(&m, false, 7, true, r(4, 7)),
            "the epoch asked for itself"
        );
        assert!(
            !reattaches_own(&m, false, 8, true, r(5, 7)),
            "resumed for this MIGRATE"
        );
        assert!(
            !reattaches_own(&m, false, 8, true, r(6, 7)),
            "resumed for a later one"
        );
        assert!(
            !reattaches_own(&m, false, 8, true, r(0, 0)),
            "a new connection"
        );
        m.holding.epochs = vec![7, 8];
        assert!(
            !reattaches_own(&m, false, 8, true, r(4, 7)),
            "the agent read that RESUMED"
        );
        m.holding.epochs = vec![6];
        assert!(
            !reattaches_own(&m, false, 8, true, r(4, 7)),
            "a word not for this epoch"
        );
        m.holding = crate::wire::Holding::default();
        assert!(
            !reattaches_own(&m, false, 8, true, r(4, 7)),
            "a word that says nothing"
        );
    }

    fn migrate(epoch: u64, down_recv: u64, up_sent: u64) -> Migrate {
        Migrate {
            cid: Cid([3; 16]),
            epoch,
            token: Token([0; 32]),
            origin: "s1".into(),
            down_recv,
            sum_from: 0,
            down_sum: 0,
            up_sent,
            up_base: 0,
            segs: Vec::new(),
            holding: Default::default(),
        }
    }

    fn record(epoch: u64, snap_in: u64, input: &'static [u8], snap_out: u64) -> StateRecord {
        StateRecord {
            cid: Cid([3; 16]),
            epoch,
            snapshot: Some(Bytes::from_static(b"state")),
            snap_in,
            snap_out,
            input: Bytes::from_static(input),
            up_fin: None,
            tail: Bytes::new(),
            checks: Vec::new(),
        }
    }

    #[test]
    fn an_origin_outside_the_cluster_has_nothing_to_fetch_and_a_superseded_takeover_is_stale() {
        let mut m = migrate(1, 0, 0);
        m.origin = "s9".into();
        assert_eq!(check_origin(&m, Some(3)), Ok(3));
        let r = check_origin(&m, None::<u8>).unwrap_err();
        assert_eq!(r.code, RefuseCode::UnknownConnection);
        assert_eq!(r.reason, "origin \"s9\" is not in the cluster");
        assert_eq!(superseded().code, RefuseCode::StaleEpoch);
    }

    #[test]
    fn a_migrate_is_refused_for_its_token_a_drain_or_too_many_ranges_or_epochs_in_that_order() {
        let m = migrate(4, 0, 0);
        assert_eq!(
            admit(&m, false, true, "s2").unwrap_err().code,
            RefuseCode::BadToken
        );
        assert_eq!(admit(&m, false, false, "s2").unwrap_err().reason, BAD_TOKEN);
        assert_eq!(
            admit(&m, true, true, "s2").unwrap_err(),
            Refusal::new(RefuseCode::Draining, "server s2 is draining")
        );
        let mut many = m.clone();
        many.segs = vec![
            SumSeg {
                from: 0,
                end: 0,
                sum: 0
            };
            MAX_SEGS + 1
        ];
        assert_eq!(
            admit(&many, true, false, "s2").unwrap_err().code,
            RefuseCode::TooLarge
        );
        many.segs.pop();
        assert!(admit(&many, true, false, "s2").is_ok());
        // The agent's word holds at most its current epoch and a full lineage (decision 66).
        let mut word = m.clone();
        word.holding.epochs = (0..=crate::custody::MAX_LINEAGE as u64 + 1).collect();
        assert_eq!(
            admit(&word, true, false, "s2").unwrap_err().code,
            RefuseCode::TooLarge
        );
        word.holding.epochs.pop();
        assert!(admit(&word, true, false, "s2").is_ok());
    }

    #[test]
    fn a_record_must_be_the_connections_at_the_clients_position() {
        let rec = record(4, 10, b"abc", 20);
        assert!(check_record(&migrate(4, 20, 13), &rec, false).is_ok());
        // Another connection, or an older epoch.
        let mut other = rec.clone();
        other.cid = Cid([4; 16]);
        assert_eq!(
            check_record(&migrate(4, 20, 13), &other, false)
                .unwrap_err()
                .code,
            RefuseCode::Internal
        );
        assert!(check_record(&migrate(5, 20, 13), &rec, false).is_err());
        // The origin received more than the agent says it sent.
        assert_eq!(
            check_record(&migrate(4, 20, 12), &rec, false)
                .unwrap_err()
                .code,
            RefuseCode::Malformed
        );
        // Another downstream position.
        assert!(check_record(&migrate(4, 21, 13), &rec, false).is_err());
        // The fast path: the positions are the origin's own.
        assert!(check_record(&migrate(4, 0, 0), &rec, true).is_ok());
    }

    #[test]
    fn a_keepers_record_past_the_epoch_restarts_as_a_replica_for_the_client() {
        // The keeper hands out epoch 6's restart point for a MIGRATE at epoch 5.
        let mut m = migrate(5, 23, 10);
        m.sum_from = 20;
        m.down_sum = checksum(b"xyz");
        let rec = record(6, 10, b"abc", 20);
        let (r, from_replica) = restart_record(&m, rec.clone(), false, false).unwrap();
        assert!(from_replica);
        assert!(
            r.input.is_empty(),
            "a replica restart is resent upstream by the agent"
        );
        assert_eq!(r.client_down(), 23);
        assert_eq!(r.checks.len(), 1);
        // At its own epoch a record is taken as it is (and must fit).
        let plain = record(5, 10, b"", 23);
        let (r, from_replica) =
            restart_record(&migrate(5, 23, 10), plain.clone(), false, false).unwrap();
        assert_eq!((r, from_replica), (plain, false));
        // A claimed replica counts as one, and a record that does not fit is refused.
        assert!(
            restart_record(&migrate(5, 23, 10), record(5, 10, b"", 23), true, false)
                .unwrap()
                .1
        );
        assert!(restart_record(&migrate(5, 22, 10), record(5, 10, b"", 23), false, false).is_err());
    }

    #[test]
    fn a_record_of_an_older_epoch_or_another_position_is_an_internal_refusal() {
        let rec = record(4, 10, b"abc", 20);
        assert_eq!(
            check_record(&migrate(5, 20, 13), &rec, false),
            Err(Refusal::internal(
                "origin sent the record of epoch 4 for a move from epoch 5"
            ))
        );
        let other = StateRecord {
            cid: Cid([4; 16]),
            ..rec.clone()
        };
        assert_eq!(
            check_record(&migrate(4, 20, 13), &other, false),
            Err(Refusal::internal(
                "origin sent the record of another connection"
            ))
        );
        assert_eq!(
            check_record(&migrate(4, 21, 13), &rec, false),
            Err(Refusal::internal(
                "origin's record is for another downstream position"
            ))
        );
        assert_eq!(
            check_record(&migrate(4, 20, 12), &rec, false)
                .unwrap_err()
                .reason,
            "agent says it sent 12 upstream bytes but the origin received 13"
        );
        // A newer label is the keeper's (decision 43), and more sent than received is in flight.
        assert!(check_record(&migrate(3, 20, 99), &rec, false).is_ok());
    }

    #[test]
    fn the_fast_path_still_checks_the_connection_and_epoch() {
        let mut other = record(4, 10, b"abc", 20);
        other.cid = Cid([9; 16]);
        assert_eq!(
            check_record(&migrate(4, 0, 0), &other, true)
                .unwrap_err()
                .code,
            RefuseCode::Internal
        );
        assert!(check_record(&migrate(5, 0, 0), &record(4, 10, b"", 20), true).is_err());
    }

    #[test]
    fn a_keepers_record_the_client_cannot_continue_from_is_divergence() {
        // The agent no longer retains upstream from the record's restart point.
        let mut m = migrate(5, 20, 30);
        m.up_base = 11;
        m.sum_from = 20;
        m.down_sum = checksum(&[]);
        let e = restart_record(&m, record(6, 10, b"", 20), false, false).unwrap_err();
        assert_eq!(e.code, RefuseCode::Divergence);
        assert!(
            e.reason.contains("no longer retains upstream from 10"),
            "{e}"
        );
        // The client is behind the restart point and the record holds no tail to reach it.
        let m = migrate(5, 15, 30);
        let e = restart_record(&m, record(6, 10, b"", 20), false, false).unwrap_err();
        assert_eq!(e.code, RefuseCode::Divergence);
        // The client is past it, but the agent has no checksum range from it.
        let mut m = migrate(5, 25, 30);
        m.sum_from = 22;
        let e = restart_record(&m, record(6, 10, b"", 20), false, false).unwrap_err();
        assert_eq!(e.code, RefuseCode::Divergence);
    }

    #[test]
    fn a_keepers_record_for_a_client_behind_it_sends_the_missing_tail() {
        let mut rec = record(6, 10, b"", 20);
        rec.tail = Bytes::from_static(b"0123456789");
        let (r, from_replica) = restart_record(&migrate(5, 14, 10), rec, false, false).unwrap();
        assert!(from_replica);
        assert_eq!(&r.tail[..], b"456789");
        assert!(r.checks.is_empty());
        assert_eq!(r.client_down(), 14);
    }

    #[test]
    fn a_claimed_replica_is_taken_as_it_is_whatever_its_label() {
        // A replica the destination claimed was already turned for the client's position.
        let rec = record(7, 10, b"abc", 20);
        let (r, from_replica) =
            restart_record(&migrate(5, 20, 13), rec.clone(), true, false).unwrap();
        assert_eq!(r, rec, "the input the record carries is kept");
        assert!(from_replica);
    }

    #[test]
    fn resumed_hands_the_agent_the_new_token_servers_and_heartbeat() {
        let alts = vec![ServerInfo {
            id: "s1".into(),
            data: "a:1".into(),
        }];
        let at = Destination {
            id: "s2",
            alternates: alts.clone(),
            heartbeat_ms: 250,
            idle_ms: 30_000,
        };
        let r = resumed(&record(0, 0, b"", 0), at, Token([9; 32]), 0, false);
        assert_eq!((r.epoch, r.token, r.up_from), (1, Token([9; 32]), 0));
        assert_eq!((r.alternates, r.heartbeat_ms), (alts, 250));
        assert!(!r.from_replica);
        assert_eq!(next_epoch(&record(41, 0, b"", 0)), 42);
    }

    #[test]
    fn resumed_runs_one_epoch_past_the_record_from_its_restart_point() {
        let rec = record(6, 10, b"abc", 20);
        let at = Destination {
            id: "s3",
            alternates: vec![],
            heartbeat_ms: 100,
            idle_ms: 30_000,
        };
        let r = resumed(&rec, at, Token([7; 32]), 99, true);
        assert_eq!((r.epoch, r.up_from, r.restart_out), (7, 13, 20));
        assert_eq!(
            (r.server.as_str(), r.state_bytes, r.from_replica),
            ("s3", 99, true)
        );
    }
}
