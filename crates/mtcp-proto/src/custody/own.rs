//! A keeper that is also the holder: it re-handed the state it kept to itself (a late re-attach
//! of a MIGRATE the agent had given up on, decision 52) and resumed, to nobody, one epoch up.
//! The agent, which had just read another holder's RESUMED, lost that holder to the re-hand
//! and comes back for the kept epoch: the keeper must hand its own newer copy out again rather
//! than refuse (`LateHandOut`, decision 64) — but only where that cannot lose it.

use super::{Custody, Fence, Gate};

/// Whether a keeper `me` asked for `epoch` while it holds the connection itself at
/// `serving` re-hands from its custody: the custody is of that epoch, held by `me` itself,
/// `serving` is the epoch it resumed at from it, the agent never spoke at that epoch here
/// (`gate`: its gate for `serving`), and the session its RESUMED went out on is gone
/// (`detached`: the agent had given that MIGRATE up). An attached one may be the agent's
/// holder whose RESUMED it read and has not answered yet; a late request must not take it
/// (the simulation found that, seed 3936223338). Otherwise the request is stale, as before.
pub fn rehands_own(
    custody: &Custody,
    me: &str,
    epoch: u64,
    serving: u64,
    gate: Option<Gate>,
    detached: bool,
) -> bool {
    custody.epoch == epoch
        && custody.holder == me
        && custody.label + 1 == serving
        && gate != Some(Gate::Heard)
        && detached
}

/// The keeper fences its own epoch at its backups *before* it gives its copy up (the order
/// is its to choose, being the holder): the re-hand goes on only if a fence landed and none
/// was refused; otherwise it keeps its copy and refuses, as before. Yielding first lost the
/// connection whenever the only backup was the crashed server (`UnfencedLetGo`).
pub fn prefenced(fences: &[Fence]) -> bool {
    !fences.iter().any(|f| matches!(f, Fence::Refused(_)))
        && fences.iter().any(|f| *f != Fence::Unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RefuseCode;

    #[test]
    fn only_its_own_unheard_successor_of_the_kept_epoch_is_handed_again() {
        let c = Custody {
            epoch: 1,
            holder: "s1".into(),
            label: 2,
        };
        assert!(rehands_own(&c, "s1", 1, 3, None, true));
        assert!(rehands_own(&c, "s1", 1, 3, Some(Gate::Answered), true));
        assert!(
            !rehands_own(&c, "s1", 1, 3, Some(Gate::Heard), true),
            "the agent's"
        );
        assert!(
            !rehands_own(&c, "s1", 1, 3, Some(Gate::Answered), false),
            "maybe the agent's"
        );
        assert!(!rehands_own(&c, "s2", 1, 3, None, true), "another holder");
        assert!(
            !rehands_own(&c, "s1", 2, 3, None, true),
            "another epoch asked"
        );
        assert!(
            !rehands_own(&c, "s1", 1, 4, None, true),
            "not the epoch it resumed at"
        );
    }

    #[test]
    fn the_prefence_must_land_somewhere_and_be_refused_nowhere() {
        use Fence::*;
        assert!(prefenced(&[Nothing]));
        assert!(prefenced(&[Unreachable, Record(5, 3)]));
        assert!(!prefenced(&[Unreachable]));
        assert!(!prefenced(&[]));
        assert!(!prefenced(&[Nothing, Refused(RefuseCode::StaleEpoch)]));
    }
}
