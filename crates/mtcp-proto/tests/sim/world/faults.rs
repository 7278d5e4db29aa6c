//! Faults beyond a clean crash: hangs (the agent's silence bound), racing destinations, and in
//! eager mode two faults at once, whose losses must be among the documented ones (decision
//! 48's list).

use super::*;
use mtcp_proto::trigger::{silence_bound, Rtt};
use mtcp_proto::wire::Migrate;
use std::time::Duration;

/// One step of simulated time.
const STEP: Duration = Duration::from_millis(10);
/// How long the agent retries a move whose candidates all failed (its `migrate_timeout`).
const RETRY_FOR: usize = 3000;

/// The two faults a run may be given (decision 48, "Two faults"); each may lose the
/// connection, never a byte nor an epoch's uniqueness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TwoFault {
    /// The serving server and its backup down at once.
    ServerAndBackup,
    /// The keeper of an unconfirmed move dies, and the holder with it.
    KeeperAndHolder,
    /// The serving server dies where no single copy is left (a fallback more than one
    /// unconfirmed move deep, a keeper gone or restarted empty).
    Unprotected,
    /// Not given: one crash, and a candidate the agent gave up on had resumed (to nobody)
    /// unconfirmed, its only backup the crashed server. Asked to yield it lets go, but it had
    /// answered RESUMED, so its successor must be fenced — at the crashed backup: refused
    /// (decision 48's rule), and the connection was lost. Since decision 66 the agent's word
    /// in the MIGRATE rules that epoch out; counted, and the eager tests fail on any.
    UnfencedLetGo,
    /// Not given: a hand-out for a MIGRATE the agent had given up on (a late re-attach at the
    /// keeper itself, or a remote destination, whose close the keeper had not seen yet)
    /// superseded the holder the agent had just read RESUMED from (decision 50, "left open";
    /// the keeper's own re-attach is checked since decision 52; a keeper holding its own
    /// such re-hand, detached, hands it out again since decision 64; a holder refuses to yield
    /// to a request for an older MIGRATE than its own since decision 66). Counted, and the
    /// eager tests fail on any.
    LateHandOut,
    /// Not given by a crash: lazy mode, a candidate the agent gave up on took the connection
    /// from the origin first (the origin forgot it: the racer's is the only copy), and the
    /// agent gave that server up again in every later round of the move, as it would after
    /// that many silences in a row. Counted; the lazy test fails on any other loss.
    SilentEveryRound,
}

impl World {
    fn crash(&mut self, s: usize) {
        let srv = &mut self.servers[s];
        srv.conn = None;
        srv.entry = None;
        srv.custody = None;
        srv.gates.clear();
        srv.served.clear();
        srv.heard.clear();
        srv.hung_until = None;
        srv.down_until = Some(self.now + 300);
        self.crashes += 1;
        self.trace(format!("crash of {}", SERVERS[s]));
    }

    fn quiet(&self) -> bool {
        self.servers
            .iter()
            .all(|s| s.down_until.is_none() && s.hung_until.is_none())
    }

    /// Crashes, hangs and (eager) two faults, drawn for this step; `Some` if the agent moved.
    pub(super) fn inject(&mut self) -> Result<Option<Result<(), String>>, String> {
        let serving = self.serving;
        if self.crash_at.is_some_and(|t| t <= self.now) {
            self.crash_at = None;
            if self.quiet() && self.recoverable() {
                self.crash(serving);
                self.link.up.clear();
                self.link.down.clear();
                return Ok(Some(self.move_connection(true)));
            }
        }
        let roll: f64 = self.rng.gen();
        if roll < 0.003 && self.quiet() && self.two_fault.is_none() {
            // A server hangs: the serving one mostly; it answers nobody until it wakes.
            let s = if self.rng.gen_bool(0.7) {
                serving
            } else {
                self.rng.gen_range(0..SERVERS.len())
            };
            let len = self.rng.gen_range(10..400);
            self.servers[s].hung_until = Some(self.now + len);
            self.hangs += 1;
            self.trace(format!("{} hangs for {len} steps", SERVERS[s]));
            return Ok(None);
        }
        if !self.eager || roll < 0.99 || !self.quiet() {
            return Ok(None);
        }
        let b = self.backups(serving)[0];
        let second = self.two_fault.is_none() && self.rng.gen_bool(0.15);
        if !second {
            if !self.recoverable() {
                return Ok(None);
            }
            // The serving server crashes, with whatever it held; it comes back empty later.
            self.crash(serving);
        } else {
            let kind = match self.rng.gen_range(0..3) {
                0 => TwoFault::ServerAndBackup,
                1 => TwoFault::KeeperAndHolder,
                _ => TwoFault::Unprotected,
            };
            let keeper = (0..SERVERS.len()).find(|&k| {
                k != serving
                    && self.servers[k]
                        .custody
                        .as_ref()
                        .is_some_and(|(c, _)| c.holder == SERVERS[serving])
            });
            match kind {
                TwoFault::ServerAndBackup => {
                    self.crash(serving);
                    self.crash(b);
                }
                TwoFault::KeeperAndHolder => {
                    let Some(k) = keeper else { return Ok(None) };
                    self.crash(k);
                    self.crash(serving);
                }
                _ => {
                    if self.recoverable() {
                        return Ok(None);
                    }
                    self.crash(serving);
                }
            }
            self.two_fault = Some(kind);
            self.trace(format!("two faults: {kind:?}"));
        }
        self.link.up.clear();
        self.link.down.clear();
        Ok(Some(self.move_connection(true)))
    }

    /// The agent's silence bound (`trigger::silence_bound`, 100 ms heartbeats) ran out on a
    /// server that stopped answering: it closes the session and moves. A server that is up
    /// beats (or sends data) every step.
    pub(super) fn silent(&mut self) -> bool {
        let serving = self.serving;
        let attached = self.servers[serving]
            .conn
            .as_ref()
            .is_some_and(|h| h.attached);
        if self.reachable(serving) || !attached {
            self.heard_at = self.now;
            return false;
        }
        let mut rtt = Rtt::default();
        rtt.sample(STEP * (2 * self.link.delay as u32).max(1));
        let bound = silence_bound(Duration::from_millis(100), &rtt);
        if (self.now - self.heard_at) as u128 * STEP.as_millis() <= bound.as_millis() {
            return false;
        }
        // What the hung server sees when it wakes: the agent closed the session.
        self.servers[serving].conn.as_mut().expect("held").attached = false;
        self.link.up.clear();
        self.link.down.clear();
        self.silences += 1;
        self.trace(format!("silence bound ran out on {}", SERVERS[serving]));
        true
    }

    /// No candidate took the connection. While a server is hung (or a crashed one may come
    /// back) the agent retries, as it does until its migrate timeout; after two faults the
    /// loss is counted; otherwise it is a failure of the run.
    pub(super) fn move_failed(
        &mut self,
        why: String,
        codes: Vec<RefuseCode>,
    ) -> Result<(), String> {
        self.trace(format!("move failed: {why}"));
        let waiting = self.servers.iter().any(|s| s.hung_until.is_some());
        let since = *self.stalled_since.get_or_insert(self.now);
        if waiting && self.now - since < RETRY_FOR {
            self.retry_at = Some(self.now + 20);
            self.stalls += 1;
            return Ok(());
        }
        let single = if self.unfenced {
            Some(TwoFault::UnfencedLetGo)
        } else if self.silent_every_round {
            Some(TwoFault::SilentEveryRound)
        } else {
            self.late_handout.then_some(TwoFault::LateHandOut)
        };
        if let Some(kind) = self.two_fault.or(single) {
            self.lost = Some((kind, codes));
            self.done = true;
            return Ok(());
        }
        Err(format!("no candidate took the connection: {why}"))
    }

    /// A candidate the agent gave up on (played as a `Busy` refusal) may still be taking `m`
    /// over: remembered as a possible racer.
    pub(super) fn gave_up_on(&mut self, m: &Migrate, cand: usize) {
        if self.attempts.len() >= 8 {
            self.attempts.remove(0);
        }
        self.attempts.push((m.clone(), cand));
    }

    /// Racing destinations: a candidate the agent gave up on goes on with its takeover of the
    /// MIGRATE it got, and resumes to nobody or is refused. `before`: it gets there just before
    /// `dest` (same MIGRATE, same move); after the move it runs a few steps later, before or
    /// after the agent spoke on the new session (any MIGRATE of this or an earlier move).
    pub(super) fn maybe_race(
        &mut self,
        m: &Migrate,
        dest: usize,
        before: bool,
    ) -> Result<(), String> {
        if self.racer.is_some() || !self.rng.gen_bool(self.knobs.race) {
            return Ok(());
        }
        let pick: Vec<_> = self
            .attempts
            .iter()
            .filter(|(a, c)| {
                *c != dest && (!before || (a.epoch, &a.origin) == (m.epoch, &m.origin))
            })
            .cloned()
            .collect();
        if pick.is_empty() {
            return Ok(());
        }
        let (stale, r) = pick[self.rng.gen_range(0..pick.len())].clone();
        self.races += 1;
        if before {
            return self.race(&stale, r);
        }
        let at = self.now + self.rng.gen_range(0..=2 * self.link.delay + 1);
        self.racer = Some((at, stale, r));
        Ok(())
    }

    /// Racer `r` serves MIGRATE `m`: it resumes to nobody, or is refused.
    pub(super) fn race(&mut self, m: &Migrate, r: usize) -> Result<(), String> {
        if !self.reachable(r) || self.done || self.servers[r].conn.is_some() {
            return Ok(());
        }
        self.trace(format!(
            "racer {} serves MIGRATE epoch {} origin {}",
            SERVERS[r], m.epoch, m.origin
        ));
        // Eager: a keeper sees that the one it would hand the connection to left — a remote
        // destination's peer channel closed (decision 50), or, for its own re-attach, the
        // agent's MIGRATE session closed (decision 52) — and refuses, mostly: the close may not
        // have arrived yet. Lazy: the origin hands the connection to the first FETCH with the
        // token, and forgets it; the agent's next MIGRATE to this racer brings it back
        // (decision 73).
        if self.eager && self.rng.gen_bool(0.8) {
            return Ok(());
        }
        self.racing = true;
        let f = self.fetch(m, r);
        self.racing = false;
        let f = match f {
            Ok(Ok(f)) => f,
            // A stale MIGRATE's position no longer fits what the origin has: refused.
            Ok(Err(_)) | Err(_) => return Ok(()),
        };
        let kept = f.claim_at.clone();
        match self.take_over(m, r, f, false) {
            Ok(Some(_)) => {
                // A keeper's own late re-attach now holds a newer epoch, to nobody: its answer
                // to the agent's next FETCH of the kept epoch is StaleEpoch (see `LateHandOut`).
                self.late_handout |= r == server_index(&m.origin);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(_) => {
                self.release(&kept, m.epoch, r);
                Ok(())
            }
        }
    }
}
