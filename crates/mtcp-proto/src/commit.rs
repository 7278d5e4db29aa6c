//! Eager mode: when the serving server tells its agent COMMITTED, and when the keepers of a
//! taken-over connection's previous epoch may forget it (decisions 43 and 48). One rule for
//! the runtime's two push paths, its takeover and the simulation.
//!
//! COMMITTED says that the backups hold a restart point: the agent may trim upstream before it
//! and forget its fallbacks. On a connection taken over at this server it waits until the agent
//! has spoken on the new session: until then a keeper may still have this server give the epoch
//! up, and the agent must be able to fall back to the previous one. The keepers are told once
//! the backups hold the new epoch *and* the agent has spoken (so it has the new epoch).

/// A restart point as `(out_off, in_off)`.
pub type Point = (u64, u64);

/// One connection's COMMITTED and confirmation state at its serving server.
///
/// [`Commit::default`] is a connection that started here (no keepers wait on it); a taken-over
/// one starts with [`Commit::taken_over`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Commit {
    committed: Option<Point>,
    heard: bool,
    confirm_due: bool,
    withheld: Option<Point>,
}

/// What to do after an event: send COMMITTED for `tell`, and tell the keepers they may forget
/// the previous epoch (`confirm`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct CommitStep {
    pub tell: Option<Point>,
    pub confirm: bool,
}

impl Commit {
    /// A connection taken over at this server; its backups already hold `protected` when the
    /// takeover pushed the restart point before answering. Its keepers wait to be told, and
    /// COMMITTED waits for the agent.
    pub fn taken_over(protected: Option<Point>) -> Commit {
        Commit {
            committed: protected,
            heard: false,
            confirm_due: true,
            withheld: protected,
        }
    }

    /// The newest restart point the backups hold (as far as this server knows).
    pub fn committed(&self) -> Option<Point> {
        self.committed
    }

    /// Whether the agent's first frame on the session is still awaited by a taken-over
    /// connection's gate (and its COMMITTED and confirmation with it).
    pub fn waits_for_agent(&self) -> bool {
        self.confirm_due && !self.heard
    }

    /// The backups stored `p`.
    pub fn stored(&mut self, p: Point) -> CommitStep {
        self.committed = Some(p);
        if self.waits_for_agent() {
            self.withheld = Some(p);
            return CommitStep::default();
        }
        CommitStep {
            tell: Some(p),
            confirm: self.take_confirm(),
        }
    }

    /// The agent spoke on the session: a withheld COMMITTED goes out, and the keepers are told
    /// if the backups hold the epoch.
    pub fn on_heard(&mut self) -> CommitStep {
        if self.heard {
            return CommitStep::default();
        }
        self.heard = true;
        CommitStep {
            tell: self.withheld.take(),
            confirm: self.take_confirm(),
        }
    }

    /// Push the newest restart point again, even if it is the one the backups hold (their
    /// copies would otherwise expire).
    pub fn push_again(&mut self) {
        self.committed = None;
    }

    /// The connection was let go: nobody is told anything any more.
    pub fn let_go(&mut self) {
        self.confirm_due = false;
        self.withheld = None;
    }

    fn take_confirm(&mut self) -> bool {
        let due = self.confirm_due && self.heard && self.committed.is_some();
        if due {
            self.confirm_due = false;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TELL_ONLY: fn(Point) -> CommitStep = |p| CommitStep {
        tell: Some(p),
        confirm: false,
    };

    #[test]
    fn a_connection_that_started_here_is_told_at_once_and_confirms_nothing() {
        let mut c = Commit::default();
        assert!(!c.waits_for_agent());
        assert_eq!(c.stored((10, 5)), TELL_ONLY((10, 5)));
        assert_eq!(c.on_heard(), CommitStep::default());
        assert_eq!(c.stored((20, 6)), TELL_ONLY((20, 6)));
        assert_eq!(c.committed(), Some((20, 6)));
    }

    #[test]
    fn a_taken_over_connection_withholds_committed_until_the_agent_speaks() {
        let mut c = Commit::taken_over(None);
        assert!(c.waits_for_agent());
        // Pushes land before the agent spoke: nothing goes out, the newest is kept.
        assert_eq!(c.stored((10, 5)), CommitStep::default());
        assert_eq!(c.stored((20, 6)), CommitStep::default());
        // The agent speaks: the newest COMMITTED, and the keepers may forget.
        let step = c.on_heard();
        assert_eq!(
            step,
            CommitStep {
                tell: Some((20, 6)),
                confirm: true
            }
        );
        assert!(!c.waits_for_agent());
        // Once only.
        assert_eq!(c.on_heard(), CommitStep::default());
        assert_eq!(c.stored((30, 7)), TELL_ONLY((30, 7)));
    }

    #[test]
    fn the_keepers_wait_for_both_the_agent_and_the_backups() {
        // The agent speaks first: no confirmation before the backups hold the epoch.
        let mut c = Commit::taken_over(None);
        assert_eq!(c.on_heard(), CommitStep::default());
        assert_eq!(
            c.stored((10, 5)),
            CommitStep {
                tell: Some((10, 5)),
                confirm: true
            }
        );
        assert_eq!(c.stored((20, 6)), TELL_ONLY((20, 6)));
        // A takeover that pushed first: the agent's first frame settles both.
        let mut c = Commit::taken_over(Some((10, 5)));
        assert_eq!(
            c.on_heard(),
            CommitStep {
                tell: Some((10, 5)),
                confirm: true
            }
        );
    }

    #[test]
    fn a_push_again_waits_for_the_next_store_to_confirm() {
        let mut c = Commit::taken_over(Some((10, 5)));
        c.push_again();
        assert_eq!(
            c.on_heard(),
            CommitStep {
                tell: Some((10, 5)),
                confirm: false
            }
        );
        assert_eq!(
            c.stored((10, 5)),
            CommitStep {
                tell: Some((10, 5)),
                confirm: true
            }
        );
    }

    #[test]
    fn a_connection_let_go_tells_nobody() {
        let mut c = Commit::taken_over(Some((10, 5)));
        c.let_go();
        assert!(!c.waits_for_agent());
        assert_eq!(c.on_heard(), CommitStep::default());
    }
}
