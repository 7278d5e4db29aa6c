//! Eager mode, the serving side's pushes of a connection's restart point to its backups: when a
//! newer restart point is pushed (spacing, and the wait after a failed push), and how a
//! destination protects a connection it took over before the agent hears RESUMED (overlapping
//! attempts within an RTT-derived bound; decisions 32 and 48). The runtime (`mtcp::eager`)
//! sends the pushes and arms the timers these rules ask for.

use crate::answers::NotStored;
use crate::custody::Custody;
use crate::timing::{answer_bound, protect_bound, UNMEASURED};
use crate::trigger::Rtt;
use crate::wire::RefuseCode;
use std::time::{Duration, Instant};

/// After a failed push, wait this long before trying again.
pub const RETRY: Duration = Duration::from_millis(250);

/// A newer restart point is pushed at once when it is this many output bytes past the one the
/// backups hold, otherwise [`PUSH_GAP`] after the last push. With snapshots every few KiB this
/// bounds the replication work without letting replicas lag.
pub const PUSH_BYTES: u64 = 1 << 20;
/// See [`PUSH_BYTES`].
pub const PUSH_GAP: Duration = Duration::from_millis(2);

/// Whether a push may start now: none is running, and the wait after a failed one is over.
pub fn may_push(busy: bool, retry_at: Option<Instant>, now: Instant) -> bool {
    !busy && retry_at.is_none_or(|t| now >= t)
}

/// When to push a restart point `ahead` output bytes past the one the backups hold, the last
/// push having started `since` ago (never: `None`): now (`None`), or after the returned wait.
pub fn push_after(since: Option<Duration>, ahead: u64) -> Option<Duration> {
    match since {
        Some(d) if d < PUSH_GAP && ahead < PUSH_BYTES => Some(PUSH_GAP - d),
        _ => None,
    }
}

/// At most this many pushes of a taken-over connection's new epoch run at once.
pub const MAX_OVERLAPPING: usize = 3;

/// Attempts that must find the backups down (their peer ports refusing connections; others may
/// have timed out on a lossy path meanwhile) before a takeover stops waiting for them and
/// resumes unconfirmed.
pub const DOWN_TRIES: u32 = 2;

/// After a failed attempt, the next one starts at most this much later.
pub const AFTER_FAILURE: Duration = Duration::from_millis(20);

/// Why a push of one restart point to every backup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushFailed {
    /// A backup says the connection moved on (it was taken over elsewhere): the server must
    /// let it go.
    pub fenced: bool,
    /// Every backup's reason, joined.
    pub why: String,
    /// Who took it over from a backup's replica (TAKEN), if a backup said so.
    pub taken: Option<Custody>,
    /// Every backup that failed refused the connection: their processes are not running.
    pub down: bool,
}

/// What a push came to, from the backups that did not store it (all must): stored when none
/// failed; otherwise fenced if any refused the epoch, down only if all of them are down.
pub fn outcome(failures: Vec<NotStored>) -> Result<(), PushFailed> {
    if failures.is_empty() {
        return Ok(());
    }
    Err(PushFailed {
        fenced: failures
            .iter()
            .any(|f| f.code == Some(RefuseCode::StaleEpoch)),
        down: failures.iter().all(|f| f.down),
        why: failures
            .iter()
            .map(|f| f.why.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        taken: failures.into_iter().find_map(|f| f.taken),
    })
}

impl PushFailed {
    /// A protecting destination's attempt that failed so.
    pub fn attempt(&self) -> Attempt {
        match self.fenced {
            true => Attempt::Fenced,
            false => Attempt::Failed { down: self.down },
        }
    }
}

/// A connection let go because its push was fenced, at `epoch`: the custody it keeps for the
/// destination that took it over from a backup's replica (decision 48) — only one named at its
/// own epoch (another epoch's custody is not this state's). `None`: it is forgotten.
pub fn keeps_for(taken: Option<Custody>, epoch: u64) -> Option<Custody> {
    taken.filter(|c| c.epoch == epoch)
}

/// What a protecting destination does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtectStep {
    /// Start another attempt (counted as running).
    Start,
    /// Wait for an attempt's result, at most this long.
    Wait(Duration),
    /// The bound ran out: resume unconfirmed.
    GiveUp,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Every backup stored the new epoch.
    Stored,
    /// A backup refused the epoch: another destination superseded this one.
    Fenced,
    /// It failed; `down` when every failing backup refused the connection (no process there).
    Failed { down: bool },
    /// It ended without an answer (its task failed).
    Lost,
}

/// How protecting ended, once an attempt's result decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// The backups hold the new epoch.
    Stored,
    /// Superseded: the destination must not resume.
    Fenced,
    /// The backups are down: resume unconfirmed now rather than wait out the bound.
    Down,
}

/// A destination protecting a taken-over connection: attempts to store the new epoch on its
/// backups, each bounded by the measured round trip to the slowest backup, overlapping instead
/// of replacing each other (an attempt may outlive its bound on a lossy path — a lost SYN is
/// retransmitted after 1 s), for up to [`protect_bound`]. The first attempt to succeed wins.
#[derive(Debug)]
pub struct Protect {
    t0: Instant,
    bound: Duration,
    attempt: Duration,
    next_try: Instant,
    running: usize,
    tries: u32,
    found_down: u32,
}

impl Protect {
    /// Protecting starts at `now`, towards backups the slowest of which has round trip `slowest`.
    pub fn new(now: Instant, slowest: &Rtt) -> Self {
        Protect {
            t0: now,
            bound: protect_bound(slowest),
            attempt: (answer_bound(slowest) * 2).max(UNMEASURED),
            next_try: now,
            running: 0,
            tries: 0,
            found_down: 0,
        }
    }

    /// The longest protecting may take.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Attempts started so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> ProtectStep {
        let left = self
            .bound
            .saturating_sub(now.saturating_duration_since(self.t0));
        if left.is_zero() {
            return ProtectStep::GiveUp;
        }
        let room = self.running < MAX_OVERLAPPING;
        if room && now >= self.next_try {
            self.tries += 1;
            self.running += 1;
            self.next_try = now + self.attempt;
            return ProtectStep::Start;
        }
        ProtectStep::Wait(if room {
            self.next_try.saturating_duration_since(now).min(left)
        } else {
            left
        })
    }

    /// An attempt ended at `now`; `Some` when that decides how protecting ends.
    pub fn on_attempt(&mut self, now: Instant, a: Attempt) -> Option<Protected> {
        self.running = self.running.saturating_sub(1);
        match a {
            Attempt::Stored => Some(Protected::Stored),
            Attempt::Fenced => Some(Protected::Fenced),
            Attempt::Failed { down } => {
                self.found_down += u32::from(down);
                if self.found_down >= DOWN_TRIES {
                    return Some(Protected::Down);
                }
                self.next_try = self.next_try.min(now + AFTER_FAILURE);
                None
            }
            Attempt::Lost => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A measured loopback path: each attempt's bound is then `UNMEASURED` (1.2 s, more than
    /// two answer bounds of 401 ms) and the whole bound `PROTECT_MIN` (3 s).
    fn lan() -> Rtt {
        let mut r = Rtt::default();
        r.sample(Duration::from_millis(1));
        r
    }

    #[test]
    fn a_push_waits_for_the_running_one_and_for_the_retry_time() {
        let t = Instant::now();
        assert!(may_push(false, None, t));
        assert!(!may_push(true, None, t));
        assert!(!may_push(false, Some(t + RETRY), t));
        assert!(may_push(false, Some(t + RETRY), t + RETRY));
    }

    #[test]
    fn pushes_are_spaced_unless_far_behind() {
        assert_eq!(push_after(None, 10), None);
        assert_eq!(
            push_after(Some(Duration::from_millis(1)), 10),
            Some(PUSH_GAP - Duration::from_millis(1))
        );
        assert_eq!(push_after(Some(Duration::from_millis(1)), PUSH_BYTES), None);
        assert_eq!(push_after(Some(PUSH_GAP), 10), None);
    }

    #[test]
    fn attempts_overlap_up_to_three_each_after_the_last_ones_bound() {
        let t0 = Instant::now();
        let mut p = Protect::new(t0, &lan());
        assert_eq!(
            (p.attempt, p.bound()),
            (UNMEASURED, crate::timing::PROTECT_MIN)
        );
        assert_eq!(p.poll(t0), ProtectStep::Start);
        assert_eq!(p.poll(t0), ProtectStep::Wait(UNMEASURED));
        assert_eq!(p.poll(t0 + UNMEASURED), ProtectStep::Start);
        assert_eq!(p.poll(t0 + 2 * UNMEASURED), ProtectStep::Start);
        // Three running: wait for a result until the bound.
        let t = t0 + 2 * UNMEASURED;
        assert_eq!(p.poll(t), ProtectStep::Wait(p.bound() - 2 * UNMEASURED));
        assert_eq!(p.tries(), 3);
        assert_eq!(p.poll(t0 + p.bound()), ProtectStep::GiveUp);
    }

    #[test]
    fn a_failure_brings_the_next_attempt_forward_and_two_downs_give_up() {
        let t0 = Instant::now();
        let mut p = Protect::new(t0, &lan());
        assert_eq!(p.poll(t0), ProtectStep::Start);
        let t = t0 + Duration::from_millis(5);
        assert_eq!(p.on_attempt(t, Attempt::Failed { down: false }), None);
        assert_eq!(p.poll(t), ProtectStep::Wait(AFTER_FAILURE));
        assert_eq!(p.poll(t + AFTER_FAILURE), ProtectStep::Start);
        assert_eq!(p.on_attempt(t, Attempt::Failed { down: true }), None);
        assert_eq!(p.poll(t + 2 * AFTER_FAILURE), ProtectStep::Start);
        assert_eq!(
            p.on_attempt(t, Attempt::Failed { down: true }),
            Some(Protected::Down)
        );
    }

    #[test]
    fn the_first_stored_or_fenced_answer_ends_it_and_a_lost_task_changes_nothing() {
        let t0 = Instant::now();
        let mut p = Protect::new(t0, &lan());
        assert_eq!(p.poll(t0), ProtectStep::Start);
        assert_eq!(p.on_attempt(t0, Attempt::Lost), None);
        assert_eq!(p.poll(t0), ProtectStep::Wait(UNMEASURED));
        assert_eq!(p.poll(t0 + UNMEASURED), ProtectStep::Start);
        assert_eq!(p.on_attempt(t0, Attempt::Stored), Some(Protected::Stored));
        let mut p = Protect::new(t0, &lan());
        assert_eq!(p.poll(t0), ProtectStep::Start);
        assert_eq!(p.on_attempt(t0, Attempt::Fenced), Some(Protected::Fenced));
    }

    fn failed(code: Option<RefuseCode>, why: &str, down: bool) -> NotStored {
        NotStored {
            code,
            why: why.into(),
            taken: None,
            down,
        }
    }

    #[test]
    fn a_push_is_stored_only_when_no_backup_failed() {
        assert_eq!(outcome(vec![]), Ok(()));
        let e = outcome(vec![failed(Some(RefuseCode::Internal), "s3: full", false)]).unwrap_err();
        assert!(!e.fenced && !e.down);
        assert_eq!(e.attempt(), Attempt::Failed { down: false });
    }

    #[test]
    fn one_backup_refusing_the_epoch_fences_and_names_the_taker_it_knows() {
        let taker = Custody {
            epoch: 4,
            holder: "s2".into(),
            label: 4,
        };
        let e = outcome(vec![
            failed(None, "s3: timed out", false),
            NotStored {
                taken: Some(taker.clone()),
                ..failed(Some(RefuseCode::StaleEpoch), "s4: taken over by s2", false)
            },
        ])
        .unwrap_err();
        assert!(e.fenced && !e.down);
        assert_eq!(e.taken, Some(taker));
        assert_eq!(e.why, "s3: timed out; s4: taken over by s2");
        assert_eq!(e.attempt(), Attempt::Fenced);
    }

    #[test]
    fn backups_count_as_down_only_when_every_failing_one_is() {
        let both = outcome(vec![failed(None, "a", true), failed(None, "b", true)]).unwrap_err();
        assert_eq!(both.attempt(), Attempt::Failed { down: true });
        let one = outcome(vec![failed(None, "a", true), failed(None, "b", false)]).unwrap_err();
        assert_eq!(one.attempt(), Attempt::Failed { down: false });
    }

    #[test]
    fn a_fenced_connection_keeps_a_custody_only_for_its_own_epoch() {
        let c = Custody {
            epoch: 4,
            holder: "s2".into(),
            label: 4,
        };
        assert_eq!(keeps_for(Some(c.clone()), 4), Some(c.clone()));
        assert_eq!(keeps_for(Some(c), 5), None);
        assert_eq!(keeps_for(None, 4), None);
    }
}
