//! The origin's side of a move: freezing a local connection (relayed or fast path) and taking its
//! state record for the destination that asked (`Fetch`).

use crate::conn_state::{PhaseEvent, Shared};
use crate::registry::ServerInner;
use mtcp_proto::freeze::{may_freeze, still_serves, Freeze};
use mtcp_proto::stream::Refusal;
use mtcp_proto::wire::RefuseCode;
use mtcp_proto::Cid;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a destination asks of the origin.
#[derive(Debug, Clone)]
pub(crate) struct Fetch {
    pub cid: Cid,
    pub epoch: u64,
    pub down_recv: u64,
    pub sum_from: u64,
    pub down_sum: u64,
    /// The agent's word in its MIGRATE (decision 66).
    pub holding: mtcp_proto::wire::Holding,
}

impl ServerInner {
    /// Freezes local connection `cid` at `epoch` and takes its state record, waiting (bounded)
    /// for a `lock_state` section to end, and for a soft one a little (decision 55). A fast-path connection also gives its TCP
    /// connection: its socket itself when destination `to` runs on this host (decision 56), or
    /// else an encoded `mtcp_repair::TcpState`.
    pub async fn freeze_local(self: &Arc<Self>, f: &Fetch, to: &str) -> Result<Frozen, Refusal> {
        let (cid, epoch) = (f.cid, f.epoch);
        let Some(shared) = self.get(&cid) else {
            let closed_at = self
                .closed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&cid)
                .map(|(e, _)| *e);
            return Err(mtcp_proto::freeze::absent(closed_at, epoch, cid, &self.id));
        };
        let asked = tokio::time::Instant::now();
        let waits = mtcp_proto::freeze::Waits {
            lock: self.limits.lock_timeout,
            soft: self.limits.soft_wait,
        };
        loop {
            let notified = shared.unlocked.notified();
            let mut direct = None;
            let wait;
            {
                let mut st = shared.lock();
                // Checked again on every turn: a wait may have let it move on or end.
                still_serves(st.epoch, st.phase(), epoch, cid)?;
                // A relaying agent has stopped forwarding input by now: a soft section could
                // not end (decision 55).
                let flows = st.direct.is_some();
                wait = match may_freeze(st.locked, st.soft, flows, asked.elapsed(), waits) {
                    Freeze::Now => None,
                    Freeze::Wait(d) => Some(d),
                    Freeze::Busy => {
                        return Err(Refusal::busy(format!(
                            "connection stayed locked longer than {:?}",
                            self.limits.lock_timeout
                        )))
                    }
                };
                if wait.is_none() && st.direct.is_some() {
                    // The pump must stop before the socket freezes; the section stays ours
                    // meanwhile, so the application cannot start one.
                    st.locked = true;
                    direct = st.direct.take();
                } else if wait.is_none() {
                    let rec = st.freeze(
                        cid,
                        f.down_recv,
                        f.sum_from,
                        f.down_sum,
                        self.limits.max_record,
                    )?;
                    drop(st);
                    self.moved_out(cid);
                    tracing::info!(
                        %cid,
                        epoch,
                        restart_at = rec.snap_out,
                        client_at = f.down_recv,
                        tail = rec.tail.len(),
                        "connection frozen and handed over"
                    );
                    return Ok(Frozen { rec, tcp: None });
                }
            }
            if let Some(h) = direct {
                let r = self.freeze_direct(&shared, h, cid, epoch, to).await;
                shared.lock().locked = false;
                shared.unlocked.notify_waiters();
                return r;
            }
            // A section ended, or the wait ran out: decide again.
            let _ = tokio::time::timeout(wait.unwrap_or_default(), notified).await;
        }
    }
}

pub(crate) use mtcp_proto::answers::{DirectTcp, Frozen};

/// How long an origin's fence stays up if no destination lifts it (the destination died): then
/// the kernel takes it down, and the client's next packet meets no socket and is reset, which
/// ends its connection with an error instead of a hang.
const FENCE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl ServerInner {
    /// Freezes a fast-path connection: stops its pump, freezes the client's socket, and builds
    /// the record for the downstream position "everything handed to the kernel" (the socket's
    /// queues move with it). On failure the pump goes on serving.
    async fn freeze_direct(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        h: crate::direct_state::DirectHandle,
        cid: Cid,
        epoch: u64,
        to: &str,
    ) -> Result<Frozen, Refusal> {
        use crate::movetrace::{step, Role};
        step(Role::Origin, cid, "pump_stop");
        let Some(pump) = h.stop().await else {
            return Err(Refusal::new(
                RefuseCode::Closed,
                format!("connection {cid} ended; nothing to move"),
            ));
        };
        let written = shared.lock().fast.written;
        let Some((sock, restart)) = pump.into_parts() else {
            return Err(Refusal::internal(format!(
                "connection {cid}: its socket is still in use"
            )));
        };
        let std = sock
            .into_std()
            .map_err(|e| Refusal::internal(format!("socket: {e}")))?;
        step(Role::Origin, cid, "pump_stopped");
        let (std, restart) = match self.hand_off(shared, (std, restart), cid, written, to) {
            Ok(r) => return r,
            Err(back) => back,
        };
        // The client's flow is fenced from just before the freeze until the destination
        // recreated the connection (decision 54): a packet the frozen socket took after its
        // queues were read would be lost, and one meeting no socket would reset the client. Not
        // earlier: while the pump stops the client's ACKs still arrive, so only what is in flight
        // at this instant stays in the send queue and crosses in the state.
        let fence = match (std.local_addr(), std.peer_addr()) {
            (Ok(local), Ok(remote)) => self.fences().and_then(|f| {
                f.fence_expiring(local, remote, FENCE_TTL)
                    .map_err(|e| e.to_string())
            }),
            (Err(e), _) | (_, Err(e)) => Err(format!("its socket has no peer: {e}")),
        };
        let fence = match fence {
            Ok(f) => f,
            Err(e) => {
                restart.resume(std, shared, self);
                return Err(Refusal::internal(format!("cannot fence {cid}'s flow: {e}")));
            }
        };
        step(Role::Origin, cid, "fenced");
        // Output the kernel never sent is not carried (nor read out of the socket): the
        // destination's application regenerates it from the snapshot (it is checked like the
        // rest), so the state holds only what is on the wire and unread input.
        let frozen = match mtcp_repair::try_freeze_encoded(std, &mut |s| step(Role::Origin, cid, s))
        {
            Ok(f) => f,
            Err((e, std)) => {
                restart.resume(std, shared, self);
                // A closing connection ends here (`Closed`); anything else is `Busy`:
                // `freeze::failure_code`.
                let code = mtcp_proto::freeze::failure_code(match e {
                    mtcp_repair::RepairError::State(s) => Some(s),
                    _ => None,
                });
                return Err(Refusal::new(
                    code,
                    format!("cannot freeze the client's connection: {e}"),
                ));
            }
        };
        let unsent = frozen.dropped as u64;
        let written = written - unsent.min(written);
        let mut st = shared.lock();
        let sum = mtcp_proto::sum::checksum(&[]);
        match st.freeze(cid, written, written, sum, self.limits.max_record) {
            Ok(rec) => {
                drop(st);
                self.moved_out(cid);
                // Nothing is sent to the client: its flow is fenced.
                step(Role::Origin, cid, "record_built");
                let tcp = frozen.discard();
                step(Role::Origin, cid, "discarded");
                let fence = fence.leave_up();
                tracing::info!(
                    %cid,
                    epoch,
                    restart_at = rec.snap_out,
                    written,
                    unsent,
                    tcp_state = tcp.len(),
                    "fast-path connection frozen and handed over"
                );
                Ok(Frozen {
                    rec,
                    tcp: Some(DirectTcp::Repaired { tcp, fence }),
                })
            }
            Err(e) => {
                drop(st);
                match frozen.thaw() {
                    Ok(std) => restart.resume(std, shared, self),
                    Err(t) => tracing::error!(%cid, "cannot thaw the client's connection: {t}"),
                }
                Err(e)
            }
        }
    }
}

impl ServerInner {
    /// Hands a stopped fast-path connection's socket itself to destination `to` when that
    /// server runs on this host (decision 56): the record is for everything written (the
    /// socket's queues stay in the kernel), and nothing is fenced or frozen. `Err` gives the
    /// socket back when there is no local hand-over to `to`: the caller freezes it with
    /// `TCP_REPAIR` instead.
    #[allow(clippy::type_complexity)]
    fn hand_off(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        (std, restart): (std::net::TcpStream, crate::direct_state::Queues),
        cid: Cid,
        written: u64,
        to: &str,
    ) -> Result<Result<Frozen, Refusal>, (std::net::TcpStream, crate::direct_state::Queues)> {
        use std::os::fd::AsFd;
        if !self.handoff.listening.load(Ordering::Relaxed) {
            return Err((std, restart));
        }
        let Some(data) = self.cluster.server(to).map(|s| s.data.clone()) else {
            return Err((std, restart));
        };
        let u = match crate::handoff::connect(&data, crate::handoff::own_uid()) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%cid, to, "no local hand-over, freezing with TCP_REPAIR: {e}");
                return Err((std, restart));
            }
        };
        use crate::movetrace::{step, Role};
        step(Role::Origin, cid, "handoff_connected");
        let nonce = crate::handoff::new_nonce();
        let mut st = shared.lock();
        let sum = mtcp_proto::sum::checksum(&[]);
        let rec = match st.record(cid, written, written, sum, self.limits.max_record) {
            Ok(rec) => rec,
            Err(e) => {
                drop(st);
                restart.resume(std, shared, self);
                return Ok(Err(e));
            }
        };
        step(Role::Origin, cid, "record_built");
        // Under the connection's lock: nothing changes it between its record and the move.
        if let Err(e) = crate::handoff::give(&u, &nonce, std.as_fd()) {
            drop(st);
            tracing::warn!(%cid, to, "local hand-over failed, freezing with TCP_REPAIR: {e}");
            return Err((std, restart));
        }
        st.apply(PhaseEvent::LetGo);
        drop(st);
        // Our descriptor only: the socket lives on in the destination's.
        drop(std);
        self.moved_out(cid);
        step(Role::Origin, cid, "handed");
        tracing::info!(
            %cid,
            epoch = rec.epoch,
            restart_at = rec.snap_out,
            written,
            to,
            "fast-path connection handed over (its socket, on this host)"
        );
        Ok(Ok(Frozen {
            rec,
            tcp: Some(DirectTcp::Handed { nonce }),
        }))
    }
}
