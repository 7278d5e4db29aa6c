//! A server connection's phase, and the one table of how it changes.
//!
//! Live → AppClosed (the application is done, the agent still reading) → Closed; a live or
//! closing connection may instead end as Migrated (frozen for a destination, or given up to a
//! keeper) or Aborted. The last three are final: nothing leaves them, so a late event (a CLOSE
//! racing a freeze, a sweep racing a re-attach) cannot turn a moved connection into a closed or
//! aborted one.

/// Where a server connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Live,
    /// The application is done; kept until the agent has every byte.
    AppClosed,
    Migrated,
    Aborted(String),
    Closed,
}

/// What can change a connection's phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseEvent {
    /// The application closed after `out` bytes of output, of which the agent acknowledged
    /// `acked`.
    AppDone { acked: u64, out: u64 },
    /// The agent acknowledged `acked` of `out` bytes.
    Acked { acked: u64, out: u64 },
    /// Fast path: the application's whole output is in the client's socket.
    OutputInKernel,
    /// The agent closed the connection (its client is gone).
    AgentClose,
    /// Frozen for a destination, or given up (a keeper or a backup fenced it).
    LetGo,
    /// Ended here for this reason.
    Abort(String),
}

impl Phase {
    /// Whether the connection still serves here (its application may run).
    pub fn serves(&self) -> bool {
        matches!(self, Phase::Live | Phase::AppClosed)
    }

    /// Whether a hint (drain, overload) may ask the agent to move the connection: only while
    /// live — a closing connection's application is done, and one that no longer serves here
    /// is not this server's to move.
    pub fn hintable(&self) -> bool {
        *self == Phase::Live
    }

    /// Whether an overloaded server may pick the connection to shed: hintable, and with its
    /// agent attached (a detached connection carries no traffic to shed, and its hint would
    /// reach nobody until the agent is back).
    pub fn sheddable(&self, detached: bool) -> bool {
        self.hintable() && !detached
    }

    /// The phase `ev` leads to, or `None` when it changes nothing.
    pub fn on(&self, ev: PhaseEvent) -> Option<Phase> {
        use PhaseEvent as E;
        match (self, ev) {
            (Phase::Live, E::AppDone { acked, out }) if acked >= out => Some(Phase::Closed),
            (Phase::Live, E::AppDone { .. }) => Some(Phase::AppClosed),
            (Phase::AppClosed, E::Acked { acked, out }) if acked >= out => Some(Phase::Closed),
            (Phase::AppClosed, E::OutputInKernel) => Some(Phase::Closed),
            (p, E::AgentClose) if p.serves() => Some(Phase::Closed),
            (p, E::LetGo) if p.serves() => Some(Phase::Migrated),
            (p, E::Abort(why)) if p.serves() => Some(Phase::Aborted(why)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PhaseEvent as E;

    fn finals() -> [Phase; 3] {
        [Phase::Migrated, Phase::Aborted("x".into()), Phase::Closed]
    }

    #[test]
    fn an_application_that_closes_with_everything_acknowledged_is_closed_at_once() {
        let p = Phase::Live;
        assert_eq!(p.on(E::AppDone { acked: 10, out: 10 }), Some(Phase::Closed));
        assert_eq!(p.on(E::AppDone { acked: 0, out: 0 }), Some(Phase::Closed));
        assert_eq!(
            p.on(E::AppDone { acked: 9, out: 10 }),
            Some(Phase::AppClosed)
        );
    }

    #[test]
    fn a_closing_connection_ends_with_the_last_acknowledgement_or_the_kernel() {
        let p = Phase::AppClosed;
        assert_eq!(p.on(E::Acked { acked: 9, out: 10 }), None);
        assert_eq!(p.on(E::Acked { acked: 10, out: 10 }), Some(Phase::Closed));
        assert_eq!(p.on(E::OutputInKernel), Some(Phase::Closed));
        // A live connection's acknowledgements and kernel progress close nothing.
        assert_eq!(Phase::Live.on(E::Acked { acked: 10, out: 10 }), None);
        assert_eq!(Phase::Live.on(E::OutputInKernel), None);
    }

    #[test]
    fn a_serving_connection_may_close_move_or_abort() {
        for p in [Phase::Live, Phase::AppClosed] {
            assert!(p.serves());
            assert_eq!(p.on(E::AgentClose), Some(Phase::Closed));
            assert_eq!(p.on(E::LetGo), Some(Phase::Migrated));
            assert_eq!(
                p.on(E::Abort("why".into())),
                Some(Phase::Aborted("why".into()))
            );
        }
        assert_eq!(Phase::AppClosed.on(E::AppDone { acked: 1, out: 1 }), None);
    }

    #[test]
    fn only_a_live_connection_is_hinted_and_only_an_attached_one_shed() {
        assert!(Phase::Live.hintable());
        assert!(Phase::Live.sheddable(false));
        assert!(!Phase::Live.sheddable(true));
        for p in [Phase::AppClosed].into_iter().chain(finals()) {
            assert!(!p.hintable(), "{p:?}");
            for detached in [false, true] {
                assert!(!p.sheddable(detached), "{p:?}");
            }
        }
    }

    #[test]
    fn nothing_leaves_a_final_phase() {
        let events = [
            E::AppDone { acked: 1, out: 1 },
            E::Acked { acked: 1, out: 1 },
            E::OutputInKernel,
            E::AgentClose,
            E::LetGo,
            E::Abort("late".into()),
        ];
        for p in finals() {
            assert!(!p.serves());
            for ev in events.clone() {
                assert_eq!(p.on(ev.clone()), None, "{p:?} on {ev:?}");
            }
        }
    }
}
