//! Eager mode, destination side: per taken-over (cid, epoch), whether RESUMED went out, the
//! agent has spoken on that session, or a keeper had this server give the epoch up
//! (`mtcp_proto::custody::Gate`, decisions 43 and 48). The pure rule lives there; this holds
//! the gates under one lock (a keeper's YIELD and the agent's first frame race from different
//! tasks) and lets go of a connection given up after its RESUMED.

use mtcp_proto::custody::{Gate, GateEvent, Verdict};
use mtcp_proto::Cid;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A holder's answer to a keeper's YIELD
/// ([`ServerInner::give_up`](crate::registry::ServerInner::give_up)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum YieldAnswer {
    /// Given up before any RESUMED for the epoch went out from here: no agent holds its token.
    Unanswered,
    /// Given up after RESUMED went out (the connection built for it is let go): the agent
    /// never spoke on that session, but may hold the epoch's token.
    LetGo,
    /// Refused: the agent uses the epoch.
    Refused,
}

/// A gate and when it was made (forgotten after `replica_ttl`).
type Slot = (Option<Gate>, Instant);

#[derive(Default)]
pub(crate) struct Gates(Mutex<HashMap<(Cid, u64), Slot>>);

impl Gates {
    pub(crate) fn settle(&self, cid: Cid, epoch: u64, event: GateEvent) -> Verdict {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = g.entry((cid, epoch)).or_insert((None, Instant::now()));
        Gate::settle(slot, event)
    }

    /// The gate of (`cid`, `epoch`) as it stands, settling nothing.
    pub(crate) fn peek(&self, cid: Cid, epoch: u64) -> Option<Gate> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(cid, epoch)).and_then(|(gate, _)| *gate)
    }

    /// Forgets gates older than `ttl` (a keeper keeps what it could ask about that long).
    pub(crate) fn expire(&self, now: Instant, ttl: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, t)| now.duration_since(*t) < ttl);
    }
}
