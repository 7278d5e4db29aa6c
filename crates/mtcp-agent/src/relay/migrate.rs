//! Moving a relayed connection: MIGRATE to the candidates in order until one resumes it, then
//! resend what the new server lacks on the new session.

use super::{watch_for, Conn, Session};
use crate::channel::{exchange_migrate, resumed};
use crate::{AgentInner, MigrationEvent, MoveReason};
use mtcp::framed::{self, Out};
use mtcp::movetrace;
use mtcp_proto::agent::{AfterFailure, Attempt, MoveError, MovePlan};
use mtcp_proto::custody::Step;
use mtcp_proto::wire::{self, Migrate, Msg, ServerInfo};
use std::sync::Arc;
use std::time::Instant;

/// Moves the connection: MIGRATE to candidates in order until one resumes it. `Ok(None)`: the
/// server had already ended the connection in order (every byte is here), nothing to move.
pub(super) async fn migrate(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    reason: &MoveReason,
    to: Option<&str>,
    t0: Instant,
) -> Result<Option<Session>, String> {
    let from = conn.at.server.clone();
    let mut plan =
        MovePlan::new(&conn.at, conn.stream.position(), to).map_err(|e| e.to_string())?;
    tracing::info!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, from = %from, "migrating: {reason}");
    while let Some(a) = plan.next(&conn.stream.lineage, &mut conn.at.migrates) {
        if let Some((left, fb)) = &a.fell_back {
            tracing::warn!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, epoch = left, "no server could take the connection at its epoch; retrying from epoch {} (unconfirmed move from {})", fb.epoch, fb.server);
        }
        if let Some((round, pause)) = a.again {
            tracing::warn!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, "no server took the connection, some for a reason that may pass; round {round} of the move in {pause:?}");
            ::metrics::counter!(mtcp::metrics::MOVE_ROUNDS).increment(1);
            tokio::time::sleep(pause).await;
        }
        if let Some(r) = attempt(inner, conn, &a, &from, reason, t0, &mut plan).await {
            return r;
        }
    }
    conn.status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(MigrationEvent {
            refusals: plan.refusals().to_vec(),
            ..MigrationEvent::new(inner.started, t0, from, reason)
        });
    Err(plan.failure())
}

/// One MIGRATE; `None`: refused (noted in `plan`), try the next.
async fn attempt(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    a: &Attempt,
    from: &str,
    reason: &MoveReason,
    t0: Instant,
    plan: &mut MovePlan,
) -> Option<Result<Option<Session>, String>> {
    let (cand, m) = (&a.cand, &a.migrate);
    if let Some(t) = conn.trace.as_mut() {
        t.set_epoch(m.epoch);
    }
    match try_resume(inner, conn, cand, m).await {
        Ok(s) => {
            let resumed_us = t0.elapsed().as_micros() as u64;
            let idx = {
                let mut st = conn.status.lock().unwrap_or_else(|p| p.into_inner());
                st.server = conn.at.server.clone();
                st.epoch = conn.at.epoch;
                st.migrations += 1;
                st.record(MigrationEvent {
                    to: Some(conn.at.server.clone()),
                    ok: true,
                    resumed_us: Some(resumed_us),
                    state_bytes: Some(conn.last_state_bytes),
                    refusals: plan.refusals().to_vec(),
                    from_replica: conn.last_from_replica,
                    ..MigrationEvent::new(inner.started, t0, from.to_string(), reason)
                })
            };
            conn.awaiting_first_byte = Some((t0, idx));
            tracing::info!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, from = %from, to = %conn.at.server, us = resumed_us, "migrated");
            Some(Ok(Some(s)))
        }
        Err(e) => match plan.failed(cand, &e) {
            AfterFailure::Ended => {
                tracing::info!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, "not moved: {e}");
                Some(Ok(None))
            }
            AfterFailure::TryNext => {
                tracing::warn!(target: "mtcp_agent::relay", conn = conn.id, server = %cand.id, "migration refused: {e}");
                None
            }
        },
    }
}

async fn try_resume(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    cand: &ServerInfo,
    m: &Migrate,
) -> Result<Session, MoveError> {
    // The candidate says WORKING every heartbeat until it answers: silence beyond an RTT-derived
    // bound means it is dead, hung or cut off, and the next candidate is tried (decisions 32, 62).
    let (mut reader, mut w, msg) = exchange_migrate(
        inner,
        cand,
        m,
        &conn.rtt,
        conn.at.heartbeat,
        &mut conn.trace,
    )
    .await?;
    movetrace::mark(&mut conn.trace, "resumed_rx");
    let r = resumed(msg)?;
    // Until the new server confirms, its keeper can hand the state out again (eager mode).
    let from = Step {
        server: m.origin.clone(),
        epoch: m.epoch,
        token: m.token,
    };
    // Checks the restart point first: a refused RESUMED changes nothing.
    let resend = conn.stream.resume(&r, from)?;
    reader.set_max_frame(wire::MAX_SESSION_FRAME);
    conn.at.resumed(&r, &cand.data);
    inner
        .spares
        .want(conn.at.alternates.iter().map(|a| a.data.as_str()));
    if r.from_replica {
        tracing::warn!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, server = %r.server, "origin unreachable: resumed from a replica at downstream offset {}", r.restart_out);
    }
    conn.last_state_bytes = r.state_bytes;
    conn.last_from_replica = r.from_replica;
    let mut items: Vec<Out> = Vec::with_capacity(resend.chunks.len() + 2);
    if resend.speak_first {
        // Speak at once on the new session (eager): until the destination hears the agent
        // there, a keeper may still have it give the epoch up (the agent might have moved on),
        // and it holds COMMITTED back (decision 48).
        let t = inner.started.elapsed().as_micros() as u64;
        items.push(Out::Msg(Msg::Ping { t }));
    }
    items.extend(resend.chunks.into_iter().map(Out::Data));
    if let Some(up_total) = resend.up_fin {
        items.push(Out::Msg(Msg::UpFin { up_total }));
    }
    framed::write_frames(&mut w, &items)
        .await
        .map_err(|e| MoveError::Channel(e.to_string()))?;
    movetrace::mark(&mut conn.trace, "resend_tx");
    let watch = watch_for(inner, conn, &cand.data);
    Ok(Session { reader, w, watch })
}
