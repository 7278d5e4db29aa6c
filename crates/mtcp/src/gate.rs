//! Eager mode, destination side: per taken-over (cid, epoch), whether RESUMED went out, the
//! agent has spoken on that session, or a keeper had this server give the epoch up
//! (`mtcp_proto::custody::Gate`, decisions 43 and 48). The pure rule lives there; this holds
//! the gates under one lock (a keeper's YIELD and the agent's first frame race from different
//! tasks) and lets go of a connection given up after its RESUMED.

use mtcp_proto::custody::{Gate, GateEvent, Verdict};
use mtcp_proto::wire::Holding;
use mtcp_proto::Cid;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A gate, when it was made (forgotten after `replica_ttl`), and the agent's MIGRATE number the
/// epoch was taken over for (0 until RESUMED is about to go out).
type Slot = (Option<Gate>, Instant, u64);

#[derive(Default)]
pub(crate) struct Gates(Mutex<HashMap<(Cid, u64), Slot>>);

impl Gates {
    pub(crate) fn settle(&self, cid: Cid, epoch: u64, event: GateEvent) -> Verdict {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _, _) = g.entry((cid, epoch)).or_insert((None, Instant::now(), 0));
        Gate::settle(slot, event)
    }

    /// RESUMED for (`cid`, `epoch`), taken over for the agent's MIGRATE number `attempt`, is
    /// about to go out: the gate's verdict, and the number noted for later YIELDs.
    pub(crate) fn answer(&self, cid: Cid, epoch: u64, attempt: u64) -> Verdict {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _, served) = g.entry((cid, epoch)).or_insert((None, Instant::now(), 0));
        let v = Gate::settle(slot, GateEvent::Answer);
        if v == Verdict::Go {
            *served = attempt;
        }
        v
    }

    /// A YIELD of (`cid`, `epoch`) for a request under the agent's MIGRATE number `asker`:
    /// `None` if the epoch was taken over for a later MIGRATE (`Holding::stale_for`: refused,
    /// the gate untouched), else the gate's verdict and the MIGRATE number it was taken over
    /// for — under one lock with the agent's first frame and RESUMED.
    pub(crate) fn yield_for(&self, cid: Cid, epoch: u64, asker: u64) -> Option<(Verdict, u64)> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _, served) = g.entry((cid, epoch)).or_insert((None, Instant::now(), 0));
        let word = Holding {
            attempt: asker,
            epochs: Vec::new(),
        };
        if word.stale_for(*served) {
            return None;
        }
        Some((Gate::settle(slot, GateEvent::Yield), *served))
    }

    /// The agent's MIGRATE number (`cid`, `epoch`) was answered for (0: not known).
    pub(crate) fn served(&self, cid: Cid, epoch: u64) -> u64 {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(cid, epoch)).map_or(0, |(_, _, a)| *a)
    }

    /// The gate of (`cid`, `epoch`) as it stands, settling nothing.
    pub(crate) fn peek(&self, cid: Cid, epoch: u64) -> Option<Gate> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(cid, epoch)).and_then(|(gate, _, _)| *gate)
    }

    /// Forgets gates older than `ttl` (a keeper keeps what it could ask about that long).
    pub(crate) fn expire(&self, now: Instant, ttl: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, t, _)| now.duration_since(*t) < ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder notes the MIGRATE it answered for, refuses a YIELD made for an older one (its
    /// gate untouched: the agent may still speak), grants one for a newer one with that
    /// number, which the STATE answer carries (decision 66).
    #[test]
    fn a_yield_for_an_older_migrate_is_refused_and_a_granted_one_names_the_holders() {
        let g = Gates::default();
        let cid = Cid([1; 16]);
        assert_eq!(g.answer(cid, 4, 7), Verdict::Go);
        assert_eq!((g.served(cid, 4), g.served(cid, 3)), (7, 0));
        assert_eq!(
            g.yield_for(cid, 4, 6),
            None,
            "asked for MIGRATE 6, resumed for 7"
        );
        assert_eq!(g.peek(cid, 4), Some(Gate::Answered));
        assert_eq!(g.yield_for(cid, 4, 8), Some((Verdict::LetGo, 7)));
        assert_eq!(g.settle(cid, 4, GateEvent::Hear), Verdict::Refuse);
        // A word that says nothing refuses nothing; a yield before RESUMED knows no number.
        assert_eq!(g.answer(cid, 5, 9), Verdict::Go);
        assert_eq!(g.yield_for(cid, 5, 0), Some((Verdict::LetGo, 9)));
        assert_eq!(g.yield_for(cid, 6, 3), Some((Verdict::Go, 0)));
        assert_eq!(
            g.answer(cid, 6, 9),
            Verdict::Refuse,
            "given up before answering"
        );
    }
}
