//! A session's two loops: the writer (data, snapshots, heartbeats, batched) and the reader
//! (upstream data, ACKs, control); refusing a session, and the budget of log lines for events
//! anyone can cause.

use crate::conn_state::{Phase, Shared};
use crate::framed::{self, FrameReader, Out};
use crate::registry::{sweep_detached, ServerInner};
use crate::stream::{ReadHalf, WriteHalf};
use mtcp_proto::session::{self, Detach, Then};
use mtcp_proto::trigger::{agent_silence, backlog_due};
use mtcp_proto::wire::{Msg, RefuseCode};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

pub(crate) async fn writer_loop(
    mut w: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    hb: Duration,
) {
    let mut pending: VecDeque<Out> = VecDeque::new();
    let mut reported: Option<Instant> = None;
    // One heartbeat timer, armed at "quiet since the last write + hb" and re-armed only when it
    // fires early: the hot path (one turn per batch) never touches the timer wheel. It beats
    // only where someone waits, as often as `trigger::beat_every` says; otherwise it parks until
    // input arrives.
    let mut last_write = tokio::time::Instant::now();
    // No data yet: a session beats once someone waits for it (see `conn_state::long_ago`).
    let mut last_data = crate::conn_state::long_ago();
    let mut inputs_at_data = 0u64;
    let mut parked = false;
    let quiet = tokio::time::sleep_until(last_write + hb);
    tokio::pin!(quiet);
    loop {
        if pending.is_empty() {
            tokio::select! {
                x = rx.recv() => match x {
                    Some(o) => pending.push_back(o),
                    None => break,
                },
                _ = shared.beat.notified(), if parked => {
                    parked = false;
                    quiet.as_mut().reset(tokio::time::Instant::now() + hb);
                    continue;
                }
                _ = &mut quiet, if !parked => {
                    let now = tokio::time::Instant::now();
                    // No beat is ever due sooner than `hb` after a write: an early fire (right
                    // after a batch) is re-armed without touching the connection's lock.
                    if now < last_write + hb {
                        quiet.as_mut().reset(last_write + hb);
                        continue;
                    }
                    let mut st = shared.lock();
                    let unanswered = st.inputs != inputs_at_data;
                    let fast = st.direct.is_some();
                    let unacked = st.s.unacked() > 0;
                    let since = now - last_data.max(st.acked_at);
                    let Some(every) = mtcp_proto::trigger::beat_every(unanswered, unacked, since, fast, hb) else {
                        // Nobody waits: no frames until input arrives (issue 13).
                        st.beat_parked = true;
                        parked = true;
                        continue;
                    };
                    drop(st);
                    let due = last_write + every;
                    if now < due {
                        quiet.as_mut().reset(due);
                        continue;
                    }
                    crate::metrics::heartbeat_sent(false);
                    pending.push_back(Out::Msg(Msg::Heartbeat));
                }
            }
        }
        while let Ok(o) = rx.try_recv() {
            pending.push_back(o);
        }
        let (batch, data) = next_batch(&mut pending);
        // BACKLOG: more waits behind this batch (the app is ahead of the socket), as
        // `trigger::backlog_due` rules; the agent anchors it at this point of the stream.
        let mut batch = batch;
        let inputs = if data > 0 {
            let st = shared.lock();
            if backlog_due(reported.map(|t| t.elapsed()), st.queued, data) {
                batch.insert(0, Out::Msg(Msg::Backlog { queued: st.queued }));
                reported = Some(Instant::now());
            }
            Some(st.inputs)
        } else {
            None
        };
        if let Err(e) = framed::write_frames(&mut w, &batch).await {
            tracing::debug!(cid = %shared.cid, "session write failed: {e}");
            return;
        }
        crate::metrics::add_down(data as usize);
        last_write = tokio::time::Instant::now();
        let mut st = shared.lock();
        if data > 0 && st.trace_out == crate::conn_state::TraceOut::Written {
            st.trace_out = crate::conn_state::TraceOut::Off;
            crate::movetrace::finish(
                crate::movetrace::Role::Destination,
                shared.cid,
                "first_new_byte_written",
            );
        }
        if let Some(n) = inputs {
            // Data answers the input received before it was taken for this batch.
            last_data = last_write;
            inputs_at_data = n;
        }
        if parked {
            // Anything written (a HINT, COMMITTED, …) restarts the timer as data does.
            parked = false;
            st.beat_parked = false;
            quiet.as_mut().reset(last_write + hb);
        }
        st.queued = st.queued.saturating_sub(data);
        if let Some(wk) = st.write_waker.take() {
            wk.wake();
        }
    }
    let _ = w.shutdown().await;
}

/// Most data bytes in one batch written to the session socket.
const BATCH_BYTES: u64 = 1 << 20;
/// Most items in one batch.
const BATCH_ITEMS: usize = 64;

/// Takes the next batch to write from `pending` (everything queued for the session, in order),
/// and the data bytes in it. A HINT is position-free, so it jumps ahead of queued data: a
/// drain or an overload hint reaches the agent after at most one batch, not after everything
/// the application has queued (up to `max_queued`). Every other item keeps its order.
fn next_batch(pending: &mut VecDeque<Out>) -> (Vec<Out>, u64) {
    let mut batch = Vec::with_capacity(BATCH_ITEMS.min(pending.len()));
    if let Some(i) = pending
        .iter()
        .position(|o| matches!(o, Out::Msg(Msg::Hint { .. })))
    {
        if let Some(h) = pending.remove(i) {
            batch.push(h);
        }
    }
    let mut data = 0u64;
    while data < BATCH_BYTES && batch.len() < BATCH_ITEMS {
        let Some(o) = pending.pop_front() else { break };
        if let Out::Data(d) = &o {
            data += d.len() as u64;
        }
        batch.push(o);
    }
    (batch, data)
}

/// Returns whether the session ended in order (the writer should flush) rather than broke.
pub(crate) async fn reader_loop(
    mut reader: FrameReader<ReadHalf>,
    shared: &Arc<Shared>,
    inner: &Arc<ServerInner>,
) -> bool {
    let why = loop {
        // Upstream backpressure: stop reading while the application is behind.
        let behind = || {
            let st = shared.lock();
            *st.phase() == Phase::Live && st.s.unread() >= inner.limits.max_unread
        };
        while behind() {
            // Made only when needed (not once per frame); a read in between leaves a permit.
            let consumed = shared.consumed.notified();
            if !behind() {
                break;
            }
            consumed.await;
        }
        // When the agent counts as gone: `trigger::agent_silence`.
        let fast_path = shared.lock().direct.is_some();
        let next = match agent_silence(fast_path, inner.limits.session_idle) {
            Some(idle) => tokio::time::timeout(idle, reader.next()).await,
            None => Ok(reader.next().await),
        };
        let f = match next {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => break e.to_string(),
            Err(_) => {
                break format!(
                    "nothing from the agent for {:?} (a relaying agent pings at least three times as often)",
                    inner.limits.session_idle
                )
            }
        };
        let mut st = shared.lock();
        if let Some(in_order) = session::ended(st.phase()) {
            return in_order;
        }
        if !crate::eager::agent_heard(inner, shared.cid, &mut st) {
            return false;
        }
        let live = *st.phase() == Phase::Live;
        let r = session::on_frame(live, &mut st.s, f, inner.limits.max_unacked);
        if r.up_bytes > 0 {
            crate::metrics::add_up(r.up_bytes);
        }
        if r.heard {
            st.on_input(&shared.beat);
        }
        if r.wake_reader {
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
        if r.acked {
            st.ack_wait = None;
            st.acked_at = tokio::time::Instant::now();
        }
        if r.wake_writer {
            if let Some(w) = st.write_waker.take() {
                w.wake();
            }
        }
        if let Some(m) = r.reply {
            st.send(Out::Msg(m));
        }
        if r.kick {
            if let Some(d) = &st.direct {
                d.kick();
            }
        }
        match r.then {
            Then::Read => {}
            Then::Apply { event, ends } => {
                if st.apply(event) {
                    let epoch = st.epoch;
                    drop(st);
                    crate::eager::closed_in_order(inner, shared.cid, epoch);
                    return true;
                }
                if ends {
                    return true;
                }
            }
            Then::Detach(d) => {
                if d == Detach::Leaving {
                    st.leaving = true;
                }
                break d.to_string();
            }
        }
        if r.replicate {
            crate::eager::replicate_if_due(inner, shared, &mut st);
        }
    };
    let mut st = shared.lock();
    if matches!(st.phase(), Phase::Live | Phase::AppClosed) {
        tracing::debug!(cid = %shared.cid, "session detached: {why}");
        st.detached_at = Some(Instant::now());
        let empty = st.s.out_off() == 0 && st.s.up_recv() == 0;
        drop(st);
        // A flood of sessions that open and leave without a byte is swept as it comes, not
        // only by the janitor each second: at twice the cap, so a sweep (a pass over all
        // connections) is paid once per cap's worth of such sessions.
        if empty
            && inner.empty_detached.fetch_add(1, Ordering::Relaxed)
                >= 2 * mtcp_proto::bounds::MAX_EMPTY_DETACHED
        {
            sweep_detached(inner, Instant::now());
        }
    }
    false
}

/// Whether to log an event anyone can cause (a refused session, garbage on a port), at most 20
/// lines a second: `Some(n)` with the number of such lines suppressed since the last one.
pub(crate) fn noisy_event_admitted() -> Option<u64> {
    use mtcp_proto::bounds::LogBudget;
    static BUDGET: Mutex<LogBudget> = Mutex::new(LogBudget::new(Duration::from_secs(1), 20));
    BUDGET
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(Instant::now())
}

pub(crate) async fn refuse(w: &mut WriteHalf, code: RefuseCode, reason: String) {
    crate::metrics::refused(code);
    if let Some(suppressed) = noisy_event_admitted() {
        tracing::info!(target: "mtcp::session", ?code, suppressed, "refusing session: {reason}");
    }
    let _ = framed::write_msg(w, &Msg::Refused { code, reason }).await;
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mtcp_proto::wire::HintReason;

    fn data(n: usize) -> Out {
        Out::Data(Bytes::from(vec![7u8; n]))
    }

    fn hint() -> Out {
        Out::Msg(Msg::Hint {
            reason: HintReason::Drain,
            target: None,
        })
    }

    #[test]
    fn a_hint_jumps_queued_data_and_everything_else_keeps_its_order() {
        let mut q: VecDeque<Out> = VecDeque::new();
        for _ in 0..16 {
            q.push_back(data(256 << 10));
            q.push_back(Out::Msg(Msg::Heartbeat));
        }
        q.push_back(hint());
        let (b, n) = next_batch(&mut q);
        assert!(matches!(b[0], Out::Msg(Msg::Hint { .. })), "hint first");
        assert_eq!(n, BATCH_BYTES, "then one batch of data");
        // The rest comes out in its original order, without the hint.
        let mut kinds = Vec::new();
        for o in b.iter().skip(1) {
            kinds.push(matches!(o, Out::Data(_)));
        }
        while !q.is_empty() {
            let (b, _) = next_batch(&mut q);
            assert!(b.iter().all(|o| !matches!(o, Out::Msg(Msg::Hint { .. }))));
            kinds.extend(b.iter().map(|o| matches!(o, Out::Data(_))));
        }
        let want: Vec<bool> = (0..32).map(|i| i % 2 == 0).collect();
        assert_eq!(kinds, want);
    }

    #[test]
    fn batches_are_bounded_in_bytes_and_items() {
        let mut q: VecDeque<Out> = (0..200).map(|_| Out::Msg(Msg::Heartbeat)).collect();
        let (b, n) = next_batch(&mut q);
        assert_eq!((b.len(), n), (BATCH_ITEMS, 0));
        let mut q: VecDeque<Out> = (0..8).map(|_| data(512 << 10)).collect();
        let (b, n) = next_batch(&mut q);
        assert_eq!((b.len(), n), (2, 1 << 20));
        assert_eq!(q.len(), 6);
    }
}
