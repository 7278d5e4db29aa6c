//! The agent's per-connection core, without I/O (issue 11): what the agent knows of one client
//! connection across its sessions, and the decisions both of its drivers — the relay
//! (`mtcp-agent/src/relay.rs`) and the kernel fast path (`direct.rs`) — take on the same input:
//! - which servers a move tries, in which order ([`Placement::candidates`]);
//! - the MIGRATE it sends ([`Placement::migrate`]; the fast path's agent sees no bytes:
//!   [`StreamPos::unseen`]), and a move's attempts in order, falling back to an unconfirmed
//!   earlier epoch when nobody can take the current one ([`MovePlan`]);
//! - how long a candidate may take to answer MIGRATE, WORKING aside ([`CandidateWait`]);
//! - how a candidate's answer reads ([`answer`]) and what RESUMED changes
//!   ([`Placement::resumed`], and for the relayed stream [`stream::RelayStream::resume`]);
//! - what a control message from the serving server asks ([`Placement::on_control`]: one reading
//!   of HINT and of a refusal for both drivers);
//! - how a session ends: the server's CLOSED ([`on_closed`]), and a session that stops without
//!   one — silent, broken, or its server's watch connection gone — moves the connection or had
//!   ended in order ([`on_session_error`]);
//! - what the eager watch connection says ([`watch_opening`], [`watch_msg`]);
//! - (relay) the upstream bytes it retains and the downstream it acknowledges
//!   ([`stream::RelayStream`]).
//!
//! Drivers feed it messages and bytes, carry out what it returns, and keep the sockets, the
//! timers and the status shown to operators. Errors are typed ([`MoveError`]).

mod ending;
mod reason;
pub mod stream;
mod wait;
mod watch;

pub use ending::{
    after_failed_move, on_closed, on_session_error, AfterFailedMove, AfterFault, Closing,
    ReadFault, SessionFault,
};
pub use reason::{MoveCause, MoveReason};
pub use wait::{CandidateWait, Waited};
pub use watch::{watch_msg, watch_opening, watch_silence, WatchGone, WatchOpening, WatchStep};

use crate::custody::{Lineage, Step};
use crate::sum::{checksum, SumSeg};
use crate::wire::{HintReason, Holding, Migrate, Msg, RefuseCode, Resumed, ServerInfo, Welcome};
use crate::{Cid, Token};
use std::time::Duration;

/// Why a move could not be made with one candidate (or at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    /// The server had already ended the connection in order (every byte was delivered):
    /// nothing to move.
    #[error("Closed: {0}")]
    Closed(String),
    /// The candidate refused MIGRATE.
    #[error("{code:?}: {reason}")]
    Refused { code: RefuseCode, reason: String },
    /// The candidate answered something other than RESUMED or REFUSED.
    #[error("unexpected answer {0}")]
    Unexpected(String),
    /// RESUMED asks for upstream bytes the agent no longer (or never) had.
    #[error("server wants upstream from {want} but the agent retains [{start}, {end})")]
    NotRetained { want: u64, start: u64, end: u64 },
    /// The candidate said nothing (not even WORKING) for this long, or not RESUMED in time.
    #[error("candidate silent for {0:?} (or no answer in time)")]
    Silent(Duration),
    /// A move named a server the connection does not know.
    #[error("unknown server {0:?}")]
    UnknownServer(String),
    /// The channel to the candidate failed (connect, write, read).
    #[error("{0}")]
    Channel(String),
}

impl MoveError {
    /// Whether the same MIGRATE might succeed if asked again a moment later: the candidate
    /// could not reach the origin or a backup in time (`OriginUnreachable`), was busy, or was
    /// silent (hung, or its path lost what it sent). Not a refused or broken channel (a dead
    /// candidate stays dead), and not an answer about the connection itself (its epoch moved
    /// on, a bad token, divergence): asking again would get the same answer.
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            MoveError::Silent(_)
                | MoveError::Refused {
                    code: RefuseCode::OriginUnreachable | RefuseCode::Busy,
                    ..
                }
        )
    }

    /// The refusal code a candidate sent, for the refusal counters.
    pub fn refuse_code(&self) -> Option<RefuseCode> {
        match self {
            MoveError::Closed(_) => Some(RefuseCode::Closed),
            MoveError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A candidate's answer to MIGRATE (WORKING already skipped): RESUMED, or why not.
pub fn answer(msg: Msg) -> Result<Resumed, MoveError> {
    match msg {
        Msg::Resumed(r) => Ok(r),
        Msg::Refused {
            code: RefuseCode::Closed,
            reason,
        } => Err(MoveError::Closed(reason)),
        Msg::Refused { code, reason } => Err(MoveError::Refused { code, reason }),
        other => Err(MoveError::Unexpected(other.name().to_string())),
    }
}

/// Why a session's opening (HELLO → WELCOME, ADOPT → ADOPTED) was not answered as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("refused ({code:?}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("{0} instead of the answer")]
    Unexpected(&'static str),
}

impl OpenError {
    /// The server's refusal code, if it refused.
    pub fn refuse_code(&self) -> Option<RefuseCode> {
        match self {
            OpenError::Refused { code, .. } => Some(*code),
            OpenError::Unexpected(_) => None,
        }
    }
}

fn open_error(msg: Msg) -> OpenError {
    match msg {
        Msg::Refused { code, reason } => OpenError::Refused { code, reason },
        other => OpenError::Unexpected(other.name()),
    }
}

/// A server's answer to HELLO: WELCOME, or why not.
pub fn welcome_answer(msg: Msg) -> Result<Welcome, OpenError> {
    match msg {
        Msg::Welcome(w) => Ok(w),
        other => Err(open_error(other)),
    }
}

/// A server's answer to ADOPT (a fast-path connection handed to it): ADOPTED, or why not.
pub fn adopt_answer(msg: Msg) -> Result<(), OpenError> {
    match msg {
        Msg::Adopted => Ok(()),
        other => Err(open_error(other)),
    }
}

/// Where the stream stands, as a MIGRATE tells the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPos {
    pub down_recv: u64,
    pub sum_from: u64,
    pub down_sum: u64,
    pub up_sent: u64,
    pub up_base: u64,
    pub segs: Vec<SumSeg>,
}

impl StreamPos {
    /// The fast path: the agent sees none of the bytes (the kernel's socket carries them from
    /// server to server), so it claims none; the destination takes the stream from the
    /// origin's socket state.
    pub fn unseen() -> Self {
        StreamPos {
            down_recv: 0,
            sum_from: 0,
            down_sum: checksum(&[]),
            up_sent: 0,
            up_base: 0,
            segs: Vec::new(),
        }
    }
}

/// A server's HINT, read the same way by both drivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hinted {
    pub reason: HintReason,
    /// The sentence the log and the timeline show.
    pub text: String,
    /// The suggested destination, if the connection knows it (an unknown one is dropped: the
    /// move then tries every server in order rather than failing).
    pub to: Option<String>,
}

/// What a control message from the serving server asks of a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A sign of life and nothing else (HEARTBEAT, or a message this connection ignores).
    Nothing,
    /// Move the connection.
    Move(Hinted),
    /// The server refused to go on with the connection: the client program's connection is
    /// reset, saying `why`.
    Refused { code: RefuseCode, why: String },
    /// An answer to the agent's PING sent at `t` (microseconds on the agent's clock).
    Pong(u64),
    /// A stream message (SNAP, COMMITTED, CLOSED, BACKLOG) for the driver's stream.
    Stream(Msg),
}

/// Which server holds the connection and with what credentials, and which others may take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub cid: Cid,
    pub epoch: u64,
    pub token: Token,
    /// The serving server's id.
    pub server: String,
    /// Every server the connection may move to, the serving one included
    /// ([`known_servers`]).
    pub alternates: Vec<ServerInfo>,
    /// The serving server's heartbeat interval.
    pub heartbeat: Duration,
    /// How often a relaying agent pings the serving server while the connection is idle
    /// ([`crate::trigger::ping_every`]).
    pub idle_ping: Duration,
    /// The connection's MIGRATEs so far ([`MovePlan::next`] numbers each, decision 66).
    pub migrates: u64,
}

impl Placement {
    /// A session opened with HELLO at `addr` was answered WELCOME.
    pub fn welcomed(wl: Welcome, addr: &str) -> Self {
        Placement {
            alternates: known_servers(wl.alternates, &wl.server, addr),
            cid: wl.cid,
            epoch: wl.epoch,
            token: wl.token,
            server: wl.server,
            heartbeat: heartbeat(wl.heartbeat_ms),
            idle_ping: crate::trigger::ping_every(wl.idle_ms),
            migrates: 0,
        }
    }

    /// Whether a move may be asked toward `to`: an unknown server is refused before the live
    /// session is touched (a typo must not break a connection).
    pub fn check_target(&self, to: Option<&str>) -> Result<(), MoveError> {
        match to {
            Some(t) if !self.alternates.iter().any(|a| a.id == t) => {
                Err(MoveError::UnknownServer(t.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Where to move, in order: the requested server, then the alternates in order, then the
    /// serving server itself (which re-attaches the connection where it is when the origin is
    /// alive and reachable).
    pub fn candidates(&self, to: Option<&str>) -> Result<Vec<ServerInfo>, MoveError> {
        self.check_target(to)?;
        let named = |t: &str| self.alternates.iter().find(|a| a.id == t);
        let order = to
            .and_then(named)
            .into_iter()
            .chain(self.alternates.iter().filter(|a| a.id != self.server))
            .chain(named(&self.server));
        let mut cands: Vec<ServerInfo> = Vec::new();
        for a in order {
            if !cands.iter().any(|c| c.id == a.id) {
                cands.push(a.clone());
            }
        }
        Ok(cands)
    }

    /// The MIGRATE for this placement and stream position.
    pub fn migrate(&self, pos: StreamPos) -> Migrate {
        Migrate {
            cid: self.cid,
            epoch: self.epoch,
            token: self.token,
            origin: self.server.clone(),
            down_recv: pos.down_recv,
            sum_from: pos.sum_from,
            down_sum: pos.down_sum,
            up_sent: pos.up_sent,
            up_base: pos.up_base,
            segs: pos.segs,
            holding: Holding::default(),
        }
    }

    /// The candidate at `addr` resumed the connection: it is the serving server now, at its
    /// epoch, with its token and its list of servers.
    pub fn resumed(&mut self, r: &Resumed, addr: &str) {
        self.alternates = known_servers(r.alternates.clone(), &r.server, addr);
        self.epoch = r.epoch;
        self.token = r.token;
        self.server = r.server.clone();
        self.heartbeat = heartbeat(r.heartbeat_ms);
        self.idle_ping = crate::trigger::ping_every(r.idle_ms);
    }

    /// What a control message from the serving server asks.
    pub fn on_control(&self, m: Msg) -> Control {
        match m {
            Msg::Hint { reason, target } => Control::Move(Hinted {
                reason,
                text: format!("hint ({reason:?})").to_lowercase(),
                to: target.filter(|t| self.alternates.iter().any(|a| a.id == *t)),
            }),
            Msg::Refused { code, reason } => Control::Refused {
                code,
                why: format!(
                    "server {} ended the connection ({code:?}): {reason}",
                    self.server
                ),
            },
            Msg::Pong { t } => Control::Pong(t),
            m @ (Msg::Snap { .. }
            | Msg::Committed { .. }
            | Msg::Closed { .. }
            | Msg::Backlog { .. }) => Control::Stream(m),
            _ => Control::Nothing,
        }
    }
}

/// What a failed MIGRATE leaves the move with ([`MovePlan::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// The connection had already ended in order: nothing to move.
    Ended,
    /// The candidate did not take it (noted in the plan): try the next.
    TryNext,
}

/// One move: the candidates in order, each asked with the same MIGRATE, then — when nobody could
/// take the connection at its epoch — the same candidates again from an unconfirmed earlier
/// epoch (eager mode, decision 43): a destination that died before its backups held its epoch
/// left the connection with its keeper, which fences the dead epoch and hands the state out
/// again. When all of that failed and some failure may pass ([`MoveError::may_pass`]: an
/// origin or backup not reached in time, a busy or silent candidate), the whole round is
/// tried again after a pause, up to [`MOVE_ROUNDS`] rounds (decision 71): on a lossy path a
/// round's peers were alive but one lost segment away. Refusals are collected for the timeline
/// and the error.
#[derive(Debug, Clone)]
pub struct MovePlan {
    cands: Vec<ServerInfo>,
    next: usize,
    /// The agent's epoch when the move began (it holds its token throughout the move).
    current: u64,
    /// The MIGRATE each round starts from (the current epoch).
    start: Migrate,
    migrate: Migrate,
    refusals: Vec<String>,
    /// The codes of the candidates' REFUSED answers, in order.
    codes: Vec<RefuseCode>,
    /// Rounds begun, the one under way included.
    round: u32,
    /// Whether a failure of this round may pass if the round is tried again.
    passing: bool,
}

/// Rounds a move is tried at most ([`MovePlan`]).
pub const MOVE_ROUNDS: u32 = 3;

/// The pause before round `round` (2, 3, …) of a move: a retransmission timeout per round
/// already failed, so a lost segment or SYN of the last round has landed or been given up.
pub fn round_pause(round: u32) -> Duration {
    crate::trigger::MIN_RTO * round.saturating_sub(1)
}

/// The next MIGRATE of a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub cand: ServerInfo,
    pub migrate: Migrate,
    /// Set on the first attempt from an earlier epoch: the epoch left, and the keeper asked.
    pub fell_back: Option<(u64, Step)>,
    /// Set on the first attempt of a round after the first: its number, and how long the
    /// driver pauses before this MIGRATE ([`round_pause`]).
    pub again: Option<(u32, Duration)>,
}

impl MovePlan {
    /// A move of the connection at `at`, whose stream stands at `pos`, toward `to` if named.
    pub fn new(at: &Placement, pos: StreamPos, to: Option<&str>) -> Result<Self, MoveError> {
        let migrate = at.migrate(pos);
        Ok(MovePlan {
            cands: at.candidates(to)?,
            next: 0,
            current: at.epoch,
            start: migrate.clone(),
            migrate,
            refusals: Vec::new(),
            codes: Vec::new(),
            round: 1,
            passing: false,
        })
    }

    /// The next candidate to ask, or `None` once every candidate was asked at every epoch
    /// `lineage` still offers. `attempts` counts the connection's MIGRATEs (the agent's, one at
    /// a time): each one carries its number and the epochs the agent holds (decision 66).
    pub fn next(&mut self, lineage: &Lineage, attempts: &mut u64) -> Option<Attempt> {
        let (mut fell_back, mut again) = (None, None);
        if self.cands.is_empty() {
            return None;
        }
        if self.next == self.cands.len() {
            match lineage.fallback(self.migrate.epoch) {
                Some(fb) => {
                    self.refusals.push(format!(
                        "falling back to epoch {} of {}",
                        fb.epoch, fb.server
                    ));
                    fell_back = Some((self.migrate.epoch, fb.clone()));
                    self.migrate.epoch = fb.epoch;
                    self.migrate.token = fb.token;
                    self.migrate.origin = fb.server.clone();
                }
                None if self.passing && self.round < MOVE_ROUNDS => {
                    self.round += 1;
                    self.passing = false;
                    let pause = round_pause(self.round);
                    self.refusals
                        .push(format!("round {} after {pause:?}", self.round));
                    again = Some((self.round, pause));
                    self.migrate = self.start.clone();
                }
                None => return None,
            }
            self.next = 0;
        }
        let cand = self.cands.get(self.next)?.clone();
        self.next += 1;
        *attempts += 1;
        let mut migrate = self.migrate.clone();
        migrate.holding = Holding {
            attempt: *attempts,
            epochs: lineage.held(self.current),
        };
        Some(Attempt {
            cand,
            migrate,
            fell_back,
            again,
        })
    }

    /// `cand` failed with `e`: the one rule of both agent drivers. A candidate that answers
    /// CLOSED ends the move (the connection had ended in order, every byte delivered: nothing
    /// to move); any other failure is noted and the next candidate is tried.
    pub fn failed(&mut self, cand: &ServerInfo, e: &MoveError) -> AfterFailure {
        if matches!(e, MoveError::Closed(_)) {
            return AfterFailure::Ended;
        }
        self.refused(cand, e);
        AfterFailure::TryNext
    }

    /// `cand` did not take the connection.
    pub fn refused(&mut self, cand: &ServerInfo, e: &MoveError) {
        self.refusals.push(format!("{}: {e}", cand.id));
        self.passing |= e.may_pass();
        if let MoveError::Refused { code, .. } = e {
            self.codes.push(*code);
        }
    }

    /// The codes of the REFUSED answers so far, in order (other failures have none).
    pub fn refuse_codes(&self) -> &[RefuseCode] {
        &self.codes
    }

    /// What every candidate answered so far.
    pub fn refusals(&self) -> &[String] {
        &self.refusals
    }

    /// Why the move failed, once [`MovePlan::next`] returned `None`.
    pub fn failure(&self) -> String {
        match self.refusals.is_empty() {
            true => "no server to move to".into(),
            false => self.refusals.join("; "),
        }
    }
}

/// A server's heartbeat interval in milliseconds, as a duration (never zero).
fn heartbeat(ms: u32) -> Duration {
    Duration::from_millis(ms.max(1) as u64)
}

/// Every server the agent knows: the alternates a server listed, plus that server itself at
/// the address the agent reached it (kept so the connection can re-attach to it).
pub fn known_servers(
    mut alternates: Vec<ServerInfo>,
    current: &str,
    current_addr: &str,
) -> Vec<ServerInfo> {
    alternates.retain(|a| a.id != current);
    alternates.push(ServerInfo {
        id: current.to_string(),
        data: current_addr.to_string(),
    });
    alternates
}

#[cfg(test)]
mod tests;
