//! The agent's word in its MIGRATEs (decision 66): which MIGRATE of the connection it is, and
//! the epochs whose tokens the agent still holds ([`Holding`]). The agent sends one MIGRATE at
//! a time and never takes an epoch up again once it dropped it, so a keeper or a backup that
//! asks a holder to give its epoch up for a request made under that word can tell a holder the
//! agent abandoned (no fence needed: [`Holding::rules_out`]) and a request the agent itself
//! abandoned (the holder refuses: [`Holding::stale_for`]).

use crate::wire::Holding;

impl Holding {
    /// Whether the agent that sent this word can never use `epoch`, at which a holder resumed
    /// for the agent's MIGRATE number `attempt` and then gave it up after its RESUMED went out
    /// ([`Verdict::LetGo`](super::Verdict::LetGo)): that MIGRATE came before this one (so it had ended: answered or
    /// given up) and the agent does not hold `epoch`'s token now (never read that RESUMED, or
    /// dropped the epoch for good). Such a holder is then as one that gave its epoch up before
    /// answering: no fence of its epoch is needed (`Custody::supersede`'s `unanswered`,
    /// [`GaveUp::Unanswered`](super::GaveUp::Unanswered)) — which is what saves the connection when that holder's only
    /// backup is the crashed server (`UnfencedLetGo`, decision 66). A word of 0 (one that
    /// says nothing) or a holder whose MIGRATE is not known rules nothing out.
    pub fn rules_out(&self, attempt: u64, epoch: u64) -> bool {
        self.attempt > 0 && attempt > 0 && attempt < self.attempt && !self.epochs.contains(&epoch)
    }

    /// Whether a holder that resumed for the agent's MIGRATE number `attempt` refuses to give
    /// its epoch up (YIELD) to a request made for this word: the agent sent that MIGRATE
    /// *after* this one, which it had given up on by then — the request serves a move the
    /// agent abandoned, and the holder may well be the one whose RESUMED it read. (A yield
    /// granted first and then not fenced lost the agent's holder: `UnfencedLetGo`, decision
    /// 66.) A word of 0 or a holder whose attempt is not known refuses nothing.
    pub fn stale_for(&self, attempt: u64) -> bool {
        self.attempt > 0 && attempt > self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(attempt: u64, epochs: &[u64]) -> Holding {
        Holding {
            attempt,
            epochs: epochs.to_vec(),
        }
    }

    #[test]
    fn only_an_earlier_migrates_epoch_the_agent_does_not_hold_is_ruled_out() {
        // MIGRATE number 5, holding epochs 3 (current) and 2 (a fallback).
        let w = word(5, &[3, 2]);
        assert!(w.rules_out(4, 4), "an earlier MIGRATE's epoch, not held");
        assert!(w.rules_out(1, 7));
        assert!(!w.rules_out(4, 3), "held: the agent may use it");
        assert!(!w.rules_out(5, 4), "this very MIGRATE");
        assert!(
            !w.rules_out(6, 4),
            "a later MIGRATE: the agent may have read it"
        );
        assert!(!w.rules_out(0, 4), "the holder's MIGRATE is not known");
        assert!(!word(0, &[]).rules_out(1, 4), "a word that says nothing");
    }

    #[test]
    fn a_holder_refuses_to_yield_only_to_a_request_for_an_older_migrate() {
        let w = word(5, &[3]);
        assert!(w.stale_for(6), "the holder resumed for a later MIGRATE");
        assert!(!w.stale_for(5));
        assert!(!w.stale_for(4));
        assert!(!w.stale_for(0), "not known");
        assert!(!word(0, &[]).stale_for(9), "a word that says nothing");
    }
}
