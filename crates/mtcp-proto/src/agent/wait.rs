//! The wait for a candidate's answer to MIGRATE (decisions 32, 62): the destination says
//! WORKING every heartbeat while its takeover runs, which only shows it is alive. Each message
//! restarts the gap allowed before the candidate counts as silent, but never the bound on the
//! whole wait.

use super::MoveError;
use crate::wire::Msg;
use std::time::{Duration, Instant};

/// What a message read while waiting for a candidate's answer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited {
    /// WORKING: the candidate is alive; keep waiting (the gap restarts).
    Skip,
    /// The answer itself, for [`super::answer`].
    Answer(Msg),
}

/// One wait for a candidate's answer: at most `silence` between two messages, and an answer
/// by `deadline` whatever came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CandidateWait {
    silence: Duration,
    deadline: Instant,
}

impl CandidateWait {
    /// A wait starting at `now`: gaps of at most `silence`, an answer within `total`.
    pub fn new(now: Instant, silence: Duration, total: Duration) -> Self {
        CandidateWait {
            silence,
            deadline: now + total,
        }
    }

    /// How long the next read may wait from `now`: the gap, cut at the deadline; `None` once
    /// the deadline has passed (the wait timed out).
    pub fn next_read(&self, now: Instant) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(now);
        (!left.is_zero()).then(|| self.silence.min(left))
    }

    /// A message read from the candidate: WORKING is skipped, anything else is its answer.
    pub fn on_msg(&self, msg: Msg) -> Waited {
        match msg {
            Msg::Working => Waited::Skip,
            m => Waited::Answer(m),
        }
    }

    /// A read timed out (a gap longer than `silence`, or the deadline): the candidate counts
    /// as silent, and the move tries the next one.
    pub fn timeout(&self) -> MoveError {
        MoveError::Silent(self.silence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{RefuseCode, Resumed};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn working_restarts_the_gap_but_not_the_bound_on_the_whole_wait() {
        let t0 = Instant::now();
        let w = CandidateWait::new(t0, 300 * MS, 1000 * MS);
        assert_eq!(w.next_read(t0), Some(300 * MS));
        // WORKING every 250 ms keeps the candidate alive: each read waits a whole gap again…
        for k in 1..=2 {
            assert_eq!(w.on_msg(Msg::Working), Waited::Skip);
            assert_eq!(w.next_read(t0 + k * 250 * MS), Some(300 * MS));
        }
        // …until the last gap is cut at the deadline, after which nothing more is read.
        assert_eq!(w.on_msg(Msg::Working), Waited::Skip);
        assert_eq!(w.next_read(t0 + 750 * MS), Some(250 * MS));
        assert_eq!(w.next_read(t0 + 1000 * MS), None);
        assert_eq!(w.next_read(t0 + 5000 * MS), None);
    }

    #[test]
    fn a_silent_candidate_is_named_silent_for_its_gap() {
        let w = CandidateWait::new(Instant::now(), 300 * MS, 1000 * MS);
        assert_eq!(w.timeout(), MoveError::Silent(300 * MS));
        assert_eq!(w.timeout().refuse_code(), None, "silence is no refusal");
    }

    #[test]
    fn any_message_but_working_is_the_answer_read_as_usual() {
        let w = CandidateWait::new(Instant::now(), 300 * MS, 1000 * MS);
        let refused = Msg::Refused {
            code: RefuseCode::Busy,
            reason: "later".into(),
        };
        assert_eq!(w.on_msg(refused.clone()), Waited::Answer(refused));
        let resumed = Msg::Resumed(Resumed {
            server: "s2".into(),
            epoch: 1,
            token: crate::Token([1; 32]),
            up_from: 0,
            alternates: Vec::new(),
            heartbeat_ms: 250,
            idle_ms: 30_000,
            state_bytes: 0,
            restart_out: 0,
            from_replica: false,
        });
        assert_eq!(w.on_msg(resumed.clone()), Waited::Answer(resumed));
        assert_eq!(w.on_msg(Msg::Heartbeat), Waited::Answer(Msg::Heartbeat));
    }
}
