//! The server's table of connections and what every part of the runtime shares ([`ServerInner`]):
//! lookup, status, a drain's pacing of its hints, the caps and stores, and the sweep that forgets
//! connections whose agent is gone.

use crate::config::{Cluster, Limits};
use crate::conn_state::{Accepted, Phase, PhaseEvent, Shared};
use mtcp_proto::custody::Verdict;
use mtcp_proto::custody::YieldAnswer;
use mtcp_proto::wire::{HintReason, ServerStatus};
use mtcp_proto::Cid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
pub(crate) struct ServerInner {
    pub id: String,
    pub cluster: Cluster,
    /// TLS on every port and to every peer, when the cluster file has `[tls]` (decision 45).
    pub tls: Option<crate::tls::ServerTls>,
    pub limits: Limits,
    pub conns: Mutex<HashMap<Cid, Arc<Shared>>>,
    pub draining: AtomicBool,
    /// Drains started: each one's pacer runs while it is the latest (`drain`).
    pub(crate) drains: AtomicU64,
    pub migrated_in: AtomicU64,
    pub migrated_out: AtomicU64,
    /// About how many detached connections that never carried data are kept (counted up at
    /// each such detach, set exactly by each sweep; see [`sweep_detached`]).
    pub(crate) empty_detached: std::sync::atomic::AtomicUsize,
    /// Sessions open on the data port (see [`crate::admission`]).
    pub(crate) sessions: crate::admission::Sessions,
    /// Connections being handed over on the peer port: frozen and forgotten here, but their
    /// state not yet acknowledged by the destination's kernel. Counted as connections, so a
    /// drain does not report "none left" while a state record is still on its way.
    pub handing_over: std::sync::atomic::AtomicU32,
    /// Takeovers running (`Limits::max_takeovers`).
    pub(crate) takeovers: crate::slots::Slots,
    /// Hand-overs (FETCHes served) running (`Limits::max_handovers`).
    pub(crate) handovers: crate::slots::Slots,
    pub peer_pool: crate::peer_pool::PeerPool,
    /// Eager mode: replicas of other servers' connections held here.
    pub replicas: crate::replica::ReplicaStore,
    /// Eager mode: connections handed over alive, kept until their destination confirms.
    pub(crate) custody: crate::custody::CustodyStore,
    /// Eager mode: per taken-over (cid, epoch), RESUMED, the agent's first frame or a yield.
    pub(crate) gates: crate::gate::Gates,
    /// Connections that ended in order lately: epoch and when (see `closed_in_order`).
    pub closed: Mutex<HashMap<Cid, (u64, Instant)>>,
    pub(crate) accept_tx: mpsc::UnboundedSender<Accepted>,
    /// The fast path's fences: an origin fences a connection's flow before it freezes it
    /// (created on first use; decision 54).
    pub(crate) fences: mtcp_repair::LazyFences,
    /// The fast path's local hand-over: sockets other servers on this host gave this one
    /// (decision 56).
    pub(crate) handoff: Arc<crate::handoff::Handoff>,
}

impl ServerInner {
    /// The fast path's fences (the table is created on first use).
    pub(crate) fn fences(&self) -> Result<Arc<mtcp_repair::Fences>, String> {
        self.fences.get().map_err(|e| format!("fences: {e}"))
    }

    /// Connection `cid` left for another server: forgotten here and counted.
    pub(crate) fn moved_out(&self, cid: Cid) {
        self.forget(cid);
        self.migrated_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn forget(&self, cid: Cid) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cid);
    }

    /// Forgets `c` if the table still holds it under its cid, and not a newer connection that
    /// took its place (a local re-attach builds a new one under the same cid).
    pub(crate) fn forget_same(&self, c: &Arc<Shared>) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conns.get(&c.cid).is_some_and(|held| Arc::ptr_eq(held, c)) {
            conns.remove(&c.cid);
        }
    }

    pub(crate) fn get(&self, cid: &Cid) -> Option<Arc<Shared>> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cid)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Shared>> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// This server as it introduces itself to an agent, in WELCOME and in RESUMED: its id, the
    /// other servers, its heartbeat and its bound on an agent's silence.
    pub(crate) fn destination(&self) -> mtcp_proto::takeover::Destination<'_> {
        mtcp_proto::takeover::Destination {
            id: &self.id,
            alternates: self.cluster.alternates(&self.id),
            heartbeat_ms: self.cluster.heartbeat.as_millis() as u32,
            idle_ms: self.limits.idle_ms(),
        }
    }

    pub fn status(&self) -> ServerStatus {
        let mut tally = mtcp_proto::admin::Tally::default();
        for c in self.all() {
            let st = c.lock();
            tally.add(
                st.repl.taken.is_some(),
                st.detached_at.is_some(),
                st.leaving,
            );
        }
        ServerStatus {
            id: self.id.clone(),
            connections: tally.connections(self.handing_over.load(Ordering::Relaxed)),
            detached: tally.detached,
            leaving: tally.leaving,
            draining: self.draining.load(Ordering::Relaxed),
            migrated_in: self.migrated_in.load(Ordering::Relaxed),
            migrated_out: self.migrated_out.load(Ordering::Relaxed),
            replicas_held: self.replicas.usage().0 as u32,
        }
    }

    /// Starts draining: refuses new connections and hints the connections here away, a window
    /// at a time ([`mtcp_proto::drain`], decision 61), until [`undrain`](Self::undrain).
    pub fn drain(self: &Arc<Self>) {
        if self.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        // A drain started again soon after an undrain gets its own pacer; the old one stops.
        let drain = self.drains.fetch_add(1, Ordering::Relaxed) + 1;
        let mut d = mtcp_proto::drain::Drain::new(mtcp_proto::drain::DRAIN_WINDOW);
        // The first window goes out before the drain request is answered.
        self.drain_pass(&mut d, Instant::now());
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(mtcp_proto::drain::DRAIN_EVERY).await;
                let Some(inner) = inner.upgrade() else { return };
                if !inner.draining.load(Ordering::Relaxed)
                    || inner.drains.load(Ordering::Relaxed) != drain
                {
                    return;
                }
                inner.drain_pass(&mut d, Instant::now());
            }
        });
    }

    /// Stops draining: new connections are taken again, no more hints.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::Relaxed);
    }

    fn drain_pass(&self, d: &mut mtcp_proto::drain::Drain<Cid>, now: Instant) {
        if d.refill_due(now) {
            let all: Vec<Cid> = self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect();
            d.refill(now, all);
        }
        // Only the few connections to hint are looked up twice: a map of every one seen here
        // cost more in the allocator than the pass itself.
        let hint = d.poll(now, |cid| {
            let Some(c) = self.get(cid) else {
                return mtcp_proto::drain::Here::Gone;
            };
            let st = c.lock();
            mtcp_proto::drain::here(
                st.phase(),
                st.repl.taken.is_some(),
                st.leaving,
                st.detached_at.is_some(),
                st.direct.is_some(),
            )
        });
        for cid in hint {
            if let Some(c) = self.get(&cid) {
                let mut st = c.lock();
                if st.phase().hintable() {
                    c.hint(&mut st, HintReason::Drain);
                }
            }
        }
    }
}

/// Drops the state of connections whose agent is gone, as `mtcp_proto::bounds` rules: after
/// `dead_session`, or soon and only so many when they never carried data. A fast-path
/// connection is served without its agent and ends with its client: it is not swept.
pub(crate) fn sweep_detached(inner: &ServerInner, now: Instant) {
    use mtcp_proto::bounds::{detached_to_drop, Detached};
    let mut conns = Vec::new();
    let mut list = Vec::new();
    for c in inner.all() {
        let st = c.lock();
        let Some(t) = st.detached_at.filter(|_| st.direct.is_none()) else {
            continue;
        };
        if !matches!(st.phase(), Phase::Live | Phase::AppClosed) {
            continue;
        }
        list.push(Detached {
            age: now.duration_since(t),
            carried_data: st.s.out_off() > 0 || st.s.up_recv() > 0,
        });
        drop(st);
        conns.push(c);
    }
    let gone = detached_to_drop(&list, inner.limits.dead_session);
    let mut empty = 0;
    for &i in &gone {
        let c = &conns[i];
        let mut st = c.lock();
        if !matches!(st.phase(), Phase::Live | Phase::AppClosed) {
            continue; // moved, re-attached or ended meanwhile
        }
        if list[i].carried_data {
            tracing::info!(target: "mtcp::server", cid = %c.cid, "agent gone for {:?}; dropping the connection's state", inner.limits.dead_session);
        } else {
            empty += 1;
        }
        st.abort("agent gone".into(), None);
        drop(st);
        inner.forget_same(c);
    }
    if empty > 0 {
        tracing::debug!(
            target: "mtcp::server",
            "dropped the state of {empty} detached connection(s) that never carried data"
        );
    }
    let kept_empty = list.iter().filter(|d| !d.carried_data).count() - empty;
    inner.empty_detached.store(kept_empty, Ordering::Relaxed);
}

impl ServerInner {
    /// About to answer RESUMED for `cid` at `epoch`, taken over for the agent's MIGRATE number
    /// `attempt`: false if a keeper had this server give that epoch up (another destination got
    /// the connection).
    pub(crate) fn may_answer(&self, cid: Cid, epoch: u64, attempt: u64) -> bool {
        self.gates.answer(cid, epoch, attempt) == Verdict::Go
    }

    /// A keeper asks this server to give up `epoch` of `cid`, for a request made under the
    /// agent's MIGRATE number `asker`: granted unless the agent has used the epoch (spoken on
    /// the session its RESUMED went out on) or the epoch was taken over for a later MIGRATE
    /// than the asker's (decision 66), and said apart when no RESUMED for it went out. A
    /// connection built for that epoch whose agent never spoke is let go: it never serves
    /// again.
    pub(crate) fn give_up(&self, cid: Cid, epoch: u64, asker: u64) -> YieldAnswer {
        let verdict = self.gates.yield_for(cid, epoch, asker);
        let answer = YieldAnswer::of(verdict);
        if verdict.is_none() {
            tracing::info!(target: "mtcp::gate", %cid, epoch, asker, "refusing to give up an epoch taken over for a later MIGRATE than the asker's");
        }
        let Some(shared) = self.get(&cid) else {
            return answer;
        };
        {
            let mut st = shared.lock();
            // The phase needs no check: `LetGo` changes nothing in a final phase.
            if !answer.lets_go(st.epoch, epoch) {
                return answer;
            }
            tracing::warn!(target: "mtcp::gate", %cid, epoch, "giving up an epoch whose RESUMED the agent never used (it had moved on); letting the connection go");
            st.apply(PhaseEvent::LetGo);
            st.repl.confirm = None;
            st.repl.commit.let_go();
        }
        self.forget(cid);
        answer
    }
}
