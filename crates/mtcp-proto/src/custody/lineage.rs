//! The agent's side of custody: the epochs it moved away from whose destinations have not yet
//! confirmed their new epoch, and the tokens to fall back on them with.

use crate::auth::Token;

/// One epoch the agent can move the connection from: its server, and the token for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub server: String,
    pub epoch: u64,
    pub token: Token,
}

/// At most this many unconfirmed moves are remembered (each is a few dozen bytes; a chain of
/// moves none of whose destinations could reach a backup is a failing cluster).
pub const MAX_LINEAGE: usize = 8;

/// The agent's side: the epochs it moved away from whose destinations have not yet confirmed
/// (COMMITTED) that their backups hold the new epoch. Until then the agent keeps upstream from
/// the last restart point a backup confirmed (it trims on COMMITTED only), and if no candidate
/// can take the connection at its current epoch it retries from these, newest first: their
/// keepers fence the dead destination's epoch and hand the state again.
#[derive(Clone, Debug, Default)]
pub struct Lineage {
    steps: Vec<Step>,
}

impl Lineage {
    /// A move from `from` was answered RESUMED: remember it until confirmed. A move made from
    /// a fallback forgets the unconfirmed epochs after that fallback (they were abandoned).
    pub fn moved(&mut self, from: Step) {
        self.steps.retain(|s| s.epoch < from.epoch);
        self.steps.push(from);
        if self.steps.len() > MAX_LINEAGE {
            self.steps.remove(0);
        }
    }

    /// COMMITTED from the current server: its epoch is on its backups; nothing to fall back to.
    pub fn confirmed(&mut self) {
        self.steps.clear();
    }

    /// The newest epoch to fall back to, below `tried` (the epoch just tried everywhere).
    pub fn fallback(&self, tried: u64) -> Option<&Step> {
        self.steps.iter().rev().find(|s| s.epoch < tried)
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The epochs whose tokens the agent holds at `current`: that one and those it may fall
    /// back to (a MIGRATE's [`Holding::epochs`](crate::wire::Holding::epochs)).
    pub fn held(&self, current: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self.steps.iter().map(|s| s.epoch).collect();
        if !v.contains(&current) {
            v.push(current);
        }
        v
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn step(server: &str, epoch: u64) -> Step {
        Step {
            server: server.into(),
            epoch,
            token: Token([epoch as u8; 32]),
        }
    }

    #[test]
    fn the_agent_falls_back_newest_first_until_a_move_is_confirmed() {
        let mut l = Lineage::default();
        assert!(l.fallback(3).is_none());
        // s1@3 → s2 (4, unconfirmed) → s3 (5, unconfirmed).
        l.moved(step("s1", 3));
        l.moved(step("s2", 4));
        // Epoch 5 refused everywhere: fall back to s2@4, then s1@3.
        assert_eq!(l.fallback(5), Some(&step("s2", 4)));
        assert_eq!(l.fallback(4), Some(&step("s1", 3)));
        assert_eq!(l.fallback(3), None);
        // The move from s1@3 succeeded (resumed at 6): s2@4 was abandoned.
        l.moved(step("s1", 3));
        assert_eq!(l.fallback(6), Some(&step("s1", 3)));
        assert_eq!(l.fallback(3), None);
        l.confirmed();
        assert!(l.is_empty() && l.fallback(100).is_none());
        for e in 0..20 {
            l.moved(step("s", e));
        }
        assert_eq!(l.steps.len(), MAX_LINEAGE);
    }
}
