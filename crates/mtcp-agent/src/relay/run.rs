//! The relay loop of one session: client bytes upstream, session bytes downstream, control
//! messages, heartbeats and the triggers that end the session.

use super::{Conn, End, Session};
use crate::watch::WatchEnd;
use crate::{AgentInner, MoveReason, MoveRequest};
use bytes::BytesMut;
use mtcp::framed::{self, Out, Piece};
use mtcp_proto::agent::stream::StreamStep;
use mtcp_proto::agent::{on_session_error, AfterFault, Control, SessionFault};
use mtcp_proto::trigger::{Liveness, PING_EVERY};
use mtcp_proto::wire::Msg;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Largest read from the client program.
const CLIENT_READ: usize = 128 << 10;
/// Smallest read from the client program: reads that fill it double the next one.
const CLIENT_READ_MIN: usize = 4 << 10;
/// Upstream reads smaller than this are copied out of the read buffer, so the small piece kept
/// in the retained log does not pin the buffer's whole allocation.
const COPY_BELOW: usize = 4 << 10;
/// Largest piece of downstream data read from the session and written to the client at once.
const DOWN_READ: usize = 256 << 10;
/// How soon after delivering data the agent acknowledges it when it acknowledged nothing for a
/// second (a small answer on a quiet connection): the server's beats while its data is
/// unacknowledged stop then (`trigger::beat_every`), rather than at the next tick.
const ACK_SOON: Duration = Duration::from_millis(50);

/// Relays until the session ends or must move.
pub(super) async fn run(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    s: &mut Session,
    cr: &mut tokio::net::tcp::OwnedReadHalf,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
    cmd: &mut mpsc::UnboundedReceiver<MoveRequest>,
    bufs: &mut [Vec<u8>; 2],
) -> End {
    // Upstream read buffer: allocated once the client program's socket is readable, sized to
    // its reads, released when idle.
    let mut buf = BytesMut::new();
    let mut up_want = CLIENT_READ_MIN;
    // Bytes moved either way at the last ping tick: none since means idle.
    let mut moved_at_tick = u64::MAX;
    let mut live = Liveness::new(Instant::now(), conn.at.heartbeat);
    if !conn.stream.retained.is_empty() {
        // Resent on this session after a move: input the new server may still have to answer.
        live.on_data_sent(Instant::now());
    }
    // The tick: it acknowledges, pings and gives idle buffers back. A session after a move
    // pings at once (the new server hears from the agent at once: decision 48); then every
    // second while bytes move, and only as often as the server's bound on an agent's silence
    // asks while none do (`trigger::ping_every`; issue 13). A new connection's session has its
    // first tick a second in, or when its first data is acknowledged (`ACK_SOON`).
    let now = tokio::time::Instant::now();
    let ping = tokio::time::sleep_until(match conn.at.epoch {
        0 => now + PING_EVERY,
        _ => now,
    });
    tokio::pin!(ping);
    let mut slow_tick = false;
    let mut last_ping: Option<tokio::time::Instant> = None;
    let mut last_ack = now.checked_sub(PING_EVERY).unwrap_or(now);
    let mut flip = false;
    // `pend`: the part of the write buffer not yet taken by the client; `ready`: bytes read
    // into the other buffer, waiting their turn.
    let mut pend = 0..0;
    let mut ready: Option<usize> = None;
    conn.policy
        .new_session(inner.prober.as_ref(), &conn.at.server, &conn.at.alternates);
    // One timer for the silence bound, armed at a deadline that only moves forward: when it fires
    // early (bytes arrived since it was armed) it is re-armed, so the hot path never touches the
    // timer wheel.
    let silence = tokio::time::sleep_until(silence_due(&live));
    tokio::pin!(silence);
    let mut policy_tick = tokio::time::interval(crate::policy::POLICY_TICK);
    policy_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if slow_tick && moved(conn) != moved_at_tick {
            // Bytes move again: the next tick acknowledges them within a second.
            slow_tick = false;
            let soon = tokio::time::Instant::now() + PING_EVERY;
            if ping.deadline() > soon {
                ping.as_mut().reset(soon);
            }
        }
        if ready.is_some() {
            // Blocked on the client program: the throughput floor does not count this time.
            conn.policy.client_blocked();
        }
        // The bound itself can shrink (a smaller RTT), and a request arms it: never fire later
        // than the live deadline.
        let due = silence_due(&live);
        if due < silence.deadline() {
            silence.as_mut().reset(due);
        }
        let [b0, b1] = &mut *bufs;
        let (rbuf, wbuf) = if flip { (b0, &*b1) } else { (b1, &*b0) };
        let can_read =
            !conn.stream.client_eof() && conn.stream.retained.len() < inner.cfg.max_retained;
        tokio::select! {
            // A fixed order: control first (cheap to poll, and never starved by a busy data
            // path), then delivery before reading more, so bytes just read are written while
            // still in this core's cache; upstream before downstream reads.
            biased;
            why = async { (&mut s.watch.as_mut().expect("checked").ended).await }, if s.watch.is_some() => {
                match why {
                    Ok(WatchEnd::Gone(why)) => return broke(conn, SessionFault::Watch(why)),
                    Ok(WatchEnd::Hint(m)) => {
                        if let Some(end) = on_msg(inner, conn, s, m, &mut live).await {
                            return end;
                        }
                        s.watch = None;
                    }
                    Err(_) => s.watch = None,
                }
            }
            Some(req) = cmd.recv() => {
                tracing::debug!(target: "mtcp_agent::relay", conn = conn.id, waited_us = req.at.elapsed().as_micros() as u64, "move request seen");
                if let Err(e) = conn.at.check_target(req.to.as_deref()) {
                    // Refuse before touching the session: a typo must not break a live connection.
                    if let Some(d) = req.done {
                        let _ = d.send(Err(crate::NotMoved::Failed(e.to_string())));
                    }
                    continue;
                }
                return End::Move { reason: req.reason, to: req.to, done: req.done, at: Some(req.at) };
            }
            _ = policy_tick.tick(), if conn.policy.active() => {
                let arrived = conn.stream.down.received() + (pend.len() + ready.unwrap_or(0)) as u64;
                let fired = conn.policy.tick(
                    Instant::now(),
                    inner.prober.as_ref(),
                    conn.stream.down.received(),
                    arrived,
                    ready.is_some(),
                    &conn.at.alternates,
                    &conn.status,
                );
                if let Some((reason, to)) = fired {
                    tracing::info!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, "{reason}");
                    return End::Move { reason, to, done: None, at: None };
                }
            }
            _ = &mut ping => {
                // Idle for a whole tick: give the buffers back (issue 13, memory per idle
                // connection). A busy connection keeps them.
                let now = tokio::time::Instant::now();
                let moved = moved(conn);
                slow_tick = moved == moved_at_tick && pend.is_empty() && ready.is_none();
                let every = if slow_tick { conn.at.idle_ping } else { PING_EVERY };
                let ping_due = last_ping.is_none_or(|t| now >= t + every);
                if ping_due {
                    last_ping = Some(now);
                }
                let next = match (slow_tick, last_ping) {
                    (true, Some(t)) => t + every,
                    _ => now + PING_EVERY,
                };
                ping.as_mut().reset(next.max(now + ACK_SOON));
                if slow_tick {
                    bufs[0] = Vec::new();
                    bufs[1] = Vec::new();
                    // Empty already; its position must not outlive the buffer (the write
                    // branch's slice is taken even while the branch is disabled).
                    pend = 0..0;
                    buf = BytesMut::new();
                    up_want = CLIENT_READ_MIN;
                }
                // Acknowledge what arrived since the last ACK, at most once a tick: the server
                // drops its copy now rather than after ACK_EVERY more bytes that may never come,
                // and learns that the agent read it (it beats on for a while after, in case more
                // is expected: `trigger::beat_every`).
                let mut items = Vec::new();
                if let Some(ack) = conn.stream.on_tick() {
                    items.push(Out::Msg(ack));
                    last_ack = now;
                }
                moved_at_tick = moved;
                if ping_due {
                    let t = inner.started.elapsed().as_micros() as u64;
                    items.push(Out::Msg(Msg::Ping { t }));
                }
                if !items.is_empty() && framed::write_frames(&mut s.w, &items).await.is_err() {
                    return broke(conn, SessionFault::Write);
                }
            }
            w = cw.write(&wbuf[pend.clone()]), if !pend.is_empty() => match w {
                Ok(k) if k > 0 => {
                    let d = &wbuf[pend.start..pend.start + k];
                    if let Err(e) = on_delivered(conn, s, d, &mut live).await {
                        return e;
                    }
                    if conn.stream.unacked() && last_ack.elapsed() >= PING_EVERY {
                        // A quiet connection's answer: acknowledged soon, not at the next tick.
                        let soon = tokio::time::Instant::now() + ACK_SOON;
                        if ping.deadline() > soon {
                            ping.as_mut().reset(soon);
                        }
                    }
                    pend.start += k;
                    if pend.is_empty() {
                        if let Some(n) = ready.take() {
                            flip = !flip;
                            pend = 0..n;
                        } else if conn.stream.complete() {
                            return End::Done;
                        }
                    }
                }
                _ => {
                    // The client program is gone; end the session in order.
                    let _ = framed::write_msg(&mut s.w, &Msg::Close).await;
                    return End::Abort("client program closed its connection".into());
                }
            },
            r = cr.readable(), if can_read => match r.and_then(|()| {
                if buf.capacity() - buf.len() < up_want / 2 {
                    buf.reserve(up_want);
                }
                let spare = buf.capacity() - buf.len();
                // A short read clears the readiness: no `recv` that finds nothing after each request.
                let n = mtcp::sockread::try_read_buf(cr.as_ref(), &mut buf)?;
                if n >= spare {
                    up_want = (up_want * 2).min(CLIENT_READ);
                }
                Ok(n)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(0) | Err(_) => {
                    // A reset from the client program is treated like its orderly end of input:
                    // the server application decides what to do with it.
                    let fin = conn.stream.on_client_eof();
                    if framed::write_msg(&mut s.w, &fin).await.is_err() {
                        return broke(conn, SessionFault::Write);
                    }
                    live.on_data_sent(Instant::now());
                }
                Ok(n) => {
                    let chunk = if n < COPY_BELOW {
                        let c = bytes::Bytes::copy_from_slice(&buf);
                        buf.clear();
                        c
                    } else {
                        buf.split().freeze()
                    };
                    conn.stream.on_upstream(chunk.clone());
                    if framed::write_frames(&mut s.w, &[Out::Data(chunk)]).await.is_err() {
                        return broke(conn, SessionFault::Write);
                    }
                    live.on_data_sent(Instant::now());
                    mtcp::metrics::add_up(n);
                    show_upstream(conn);
                }
            },
            f = s.reader.next_piece(rbuf, DOWN_READ), if ready.is_none() => {
                let now = Instant::now();
                live.on_receive(now);
                match f {
                    Ok(Piece::Data(n)) => {
                        live.on_data_received(now);
                        let arrived = conn.stream.down.received() + pend.len() as u64 + n as u64;
                        if let Err(e) = on_arrival(conn, arrived) {
                            return e;
                        }
                        if pend.is_empty() {
                            flip = !flip;
                            pend = 0..n;
                        } else {
                            ready = Some(n);
                        }
                    }
                    Ok(Piece::Msg(Msg::Backlog { queued })) => {
                        conn.policy.on_backlog(conn.stream.down.received() + pend.len() as u64, queued);
                    }
                    Ok(Piece::Msg(m)) => {
                        if let Some(end) = on_msg(inner, conn, s, m, &mut live).await {
                            return end;
                        }
                    }
                    Err(e) => {
                        let arrived = conn.stream.down.received() + pend.len() as u64 + ready.unwrap_or(0) as u64;
                        let fault = SessionFault::Read(e.to_string());
                        match on_session_error(&conn.at.server, fault, conn.stream.closed_at(), arrived) {
                            AfterFault::Move(reason) => return moves(conn, reason),
                            AfterFault::Done => {
                                // Everything arrived; deliver it before ending.
                                if let Err(e) = cw.write_all(&wbuf[pend.clone()]).await {
                                    return End::Abort(format!("client program closed its connection: {e}"));
                                }
                                conn.stream.down.on_data(&wbuf[pend.clone()]);
                                mtcp::metrics::add_down(pend.len());
                                if let Some(n) = ready {
                                    if cw.write_all(&rbuf[..n]).await.is_err() {
                                        return End::Abort("client program closed its connection".into());
                                    }
                                    conn.stream.down.on_data(&rbuf[..n]);
                                    mtcp::metrics::add_down(n);
                                }
                                return End::Done;
                            }
                        }
                    }
                }
            },
            // Silence counts only while the agent is ready to read from the server: time spent
            // waiting for a slow client program to take bytes is not the server's silence.
            _ = &mut silence, if ready.is_none() => {
                if !live.expired(Instant::now()) {
                    silence.as_mut().reset(silence_due(&live));
                    continue;
                }
                let silent = SessionFault::Silent(live.bound());
                return match on_session_error(&conn.at.server, silent, None, 0) {
                    AfterFault::Move(reason) => End::Move { reason, to: None, done: None, at: None },
                    AfterFault::Done => End::Done,
                };
            }
        }
    }
}

/// Bytes moved either way so far: a tick that sees the same count as the last saw an idle
/// connection.
fn moved(conn: &Conn) -> u64 {
    conn.stream.down.received() + conn.stream.retained.end()
}

/// When the silence timer is due: the liveness deadline, or far away while the agent expects
/// nothing from the server (an idle connection; a request re-arms it at the loop's top).
fn silence_due(live: &Liveness) -> tokio::time::Instant {
    live.deadline()
        .map(tokio::time::Instant::from_std)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600))
}

/// The status shows the upstream bytes sent and those retained for a replay.
fn show_upstream(conn: &Conn) {
    let mut st = conn.status.lock().unwrap_or_else(|p| p.into_inner());
    st.bytes_up = conn.stream.retained.end();
    st.retained = conn.stream.retained.len();
}

/// Downstream data arrived from the session (`arrived`: the stream offset it reaches).
fn on_arrival(conn: &mut Conn, arrived: u64) -> Result<(), End> {
    if let Some((t0, idx)) = conn.awaiting_first_byte.take() {
        if let Some(mut t) = conn.trace.take() {
            t.mark("first_byte_rx");
            t.emit();
        }
        let us = t0.elapsed().as_micros() as u64;
        let mut st = conn.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ev) = st.event_mut(idx) {
            ev.first_byte_us = Some(us);
        }
    }
    conn.stream.on_arrival(arrived).map_err(End::Abort)
}

/// Downstream bytes `d` were delivered to the client program: count, checksum, acknowledge.
async fn on_delivered(
    conn: &mut Conn,
    s: &mut Session,
    d: &[u8],
    live: &mut Liveness,
) -> Result<(), End> {
    mtcp::metrics::add_down(d.len());
    // Time spent waiting on the client program is not the server's silence.
    live.on_receive(Instant::now());
    if let Some(ack) = conn.stream.on_delivered(d) {
        if framed::write_msg(&mut s.w, &ack).await.is_err() && !conn.stream.complete() {
            return Err(broke(conn, SessionFault::Write));
        }
    }
    // The status follows every delivery (an uncontended lock), not only the ACKs.
    conn.status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .bytes_down = conn.stream.down.received();
    Ok(())
}

/// A control message on the session, read by the core; `Some` ends the session.
async fn on_msg(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    s: &mut Session,
    m: Msg,
    live: &mut Liveness,
) -> Option<End> {
    match conn.at.on_control(m) {
        Control::Nothing => {}
        Control::Pong(t) => {
            let now = inner.started.elapsed().as_micros() as u64;
            let r = Duration::from_micros(now.saturating_sub(t));
            live.rtt.sample(r);
            conn.rtt.sample(r);
        }
        Control::Move(h) => {
            return Some(End::Move {
                reason: MoveReason::new(h.reason.into(), h.text),
                to: h.to,
                done: None,
                at: None,
            });
        }
        Control::Refused { code, why } => {
            mtcp::metrics::refused(code);
            return Some(End::Abort(why));
        }
        Control::Stream(m) => {
            let retained_from = conn.stream.retained.start();
            let step = conn.stream.on_msg(m, &conn.at.server);
            if conn.stream.retained.start() != retained_from {
                show_upstream(conn);
            }
            match step {
                StreamStep::Continue => {}
                StreamStep::Send(ack) => {
                    if framed::write_msg(&mut s.w, &ack).await.is_err() {
                        return Some(broke(conn, SessionFault::Write));
                    }
                }
                StreamStep::Finish(ack) => {
                    // Everything was delivered: acknowledge so the server forgets the
                    // connection.
                    let _ = framed::write_msg(&mut s.w, &ack).await;
                    return Some(End::Done);
                }
                StreamStep::Abort(why) => return Some(End::Abort(why)),
            }
        }
    }
    None
}

/// The session stopped carrying the connection without an M-TCP close (`fault`): the core's
/// rule says it moves (a write or the watch connection failing never ends it in order).
fn broke(conn: &Conn, fault: SessionFault) -> End {
    let closed = conn.stream.closed_at();
    match on_session_error(&conn.at.server, fault, closed, conn.stream.down.received()) {
        AfterFault::Move(reason) => moves(conn, reason),
        AfterFault::Done => End::Done,
    }
}

/// The session broke: move the connection, saying why.
fn moves(conn: &Conn, reason: MoveReason) -> End {
    tracing::info!(target: "mtcp_agent::relay", conn = conn.id, cid = %conn.at.cid, "{reason}");
    End::Move {
        reason,
        to: None,
        done: None,
        at: None,
    }
}
