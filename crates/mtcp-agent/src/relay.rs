//! One client program's connection: relay it over an M-TCP session, and move the session when
//! a trigger fires.

use crate::dialer::Dialer;
use crate::metrics::{counted, Moving};
use crate::watch::{Watch, WatchEnd};
use crate::{AgentInner, ConnStatus, MigrationEvent, MoveCause, MoveReason, MoveRequest};
use bytes::BytesMut;
use mtcp::framed::{self, ChannelError, FrameReader, Out, Piece};
use mtcp::movetrace::{self, Role as TraceRole, Trace};
use mtcp::stream::{ReadHalf, Stream, WriteHalf};
use mtcp_proto::agent::stream::{RelayStream, StreamStep};
use mtcp_proto::agent::{self, Attempt, Control, MoveError, MovePlan, Placement};
use mtcp_proto::custody::Step;
use mtcp_proto::trigger::{Liveness, Rtt};
use mtcp_proto::wire::{self, Migrate, Mode, Msg, ServerInfo};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const SETUP_FRAME: usize = 64 << 10;
const PING_EVERY: Duration = Duration::from_secs(1);
/// Largest read from the client program.
const CLIENT_READ: usize = 128 << 10;
/// Smallest read from the client program: reads that fill it double the next one.
const CLIENT_READ_MIN: usize = 4 << 10;
/// Upstream reads smaller than this are copied out of the read buffer, so the small piece kept
/// in the retained log does not pin the buffer's whole allocation.
const COPY_BELOW: usize = 4 << 10;
/// Largest piece of downstream data read from the session and written to the client at once.
const DOWN_READ: usize = 256 << 10;

/// An open session with a server.
struct Session {
    reader: FrameReader<ReadHalf>,
    w: WriteHalf,
    /// Eager mode: the watch connection's end (the server process died).
    watch: Option<Watch>,
}

/// Eager mode: puts `conn`'s session with the server at `addr` on that server's watch
/// connection.
fn watch_for(inner: &AgentInner, conn: &Conn, addr: &str) -> Option<Watch> {
    conn.stream.eager().then(|| {
        inner.watches.watch(
            addr,
            conn.at.cid,
            conn.at.epoch,
            conn.at.token,
            inner.cfg.connect_timeout,
            conn.at.heartbeat,
            inner.dialer.clone(),
        )
    })
}

/// What the agent knows of the connection across sessions: the core's placement and stream
/// (`mtcp_proto::agent`), and what only the relay's I/O and the operator's status need.
struct Conn {
    id: u64,
    at: Placement,
    stream: RelayStream,
    status: Arc<Mutex<ConnStatus>>,
    /// The migration whose first resumed byte is awaited: (trigger time, its absolute index in
    /// the timeline, see `ConnStatus::record`).
    awaiting_first_byte: Option<(Instant, u64)>,
    /// The steps of the move under way, until its first resumed byte (`mtcp::movetrace`).
    trace: Option<Trace>,
    last_state_bytes: u64,
    last_from_replica: bool,
    /// Trigger policies (throughput floor, RTT).
    policy: crate::policy::ConnPolicy,
    /// Round trips to the servers (PING/PONG of every session): bounds the wait on a
    /// candidate during a move.
    rtt: Rtt,
}

enum End {
    /// Orderly end: everything delivered.
    Done,
    /// Move the session.
    Move {
        reason: MoveReason,
        to: Option<String>,
        done: Option<tokio::sync::oneshot::Sender<crate::MoveOutcome>>,
        /// When the trigger fired (a manual request may wait a little before the relay sees it).
        at: Option<Instant>,
    },
    /// Give up: the client program's connection is reset.
    Abort(String),
}

pub(crate) async fn relay(
    inner: Arc<AgentInner>,
    id: u64,
    client: TcpStream,
    orig_dst: Option<String>,
) {
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<MoveRequest>();
    let (mut session, mut conn) = match open(&inner, id, orig_dst).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(
                conn = id,
                "cannot open a session with any server: {e}; closing the client connection"
            );
            reset(client);
            return;
        }
    };
    inner.register(id, conn.status.clone(), cmd_tx);
    tracing::info!(conn = id, cid = %conn.at.cid, server = %conn.at.server, "session open");
    let (mut cr, mut cw) = client.into_split();
    // Downstream double buffer, kept across sessions: one piece is written to the client
    // program while the next is read from the session, and neither blocks the relay loop, so a
    // trigger is seen at once. Allocated when data comes (`next_piece`), released when the
    // connection is idle (`run`).
    let mut bufs = [Vec::new(), Vec::new()];
    let outcome = loop {
        let end = run(
            &inner,
            &mut conn,
            &mut session,
            &mut cr,
            &mut cw,
            &mut cmd_rx,
            &mut bufs,
        )
        .await;
        match end {
            End::Done => break Ok(()),
            End::Abort(why) => break Err(why),
            End::Move {
                reason,
                to,
                done,
                at,
            } => {
                // Closing the old session frees what it still had queued (megabytes of
                // downstream data the origin had sent ahead) and resets it: work that need not
                // delay MIGRATE. It runs once this task waits for the destination's answer.
                // An idle session is closed here and now: thousands of connections moving at
                // once (a drain) would otherwise each hold a third descriptor — the new
                // session's — before any deferred close ran, and run out (issue 13: 9 000
                // connections under a 20 000 open-files limit).
                // Waits its turn among the moves under way (MAX_CONCURRENT_MOVES).
                let at = at.unwrap_or_else(Instant::now);
                conn.trace =
                    Trace::start_at(TraceRole::Agent, conn.at.cid, conn.at.epoch, "trigger", at);
                movetrace::mark(&mut conn.trace, "seen");
                let _moving = Moving::new(&inner);
                let _turn = inner.moves.acquire().await;
                movetrace::mark(&mut conn.trace, "turn");
                // Tell the server why the session ends, so that until a destination fetches
                // the state it counts the connection as moving, not as kept for a dead agent
                // (a drain's summary). Bounded: the session may be broken or stuck.
                let _ = tokio::time::timeout(
                    LEAVING_WRITE,
                    framed::write_msg(&mut session.w, &Msg::Leaving),
                )
                .await;
                movetrace::mark(&mut conn.trace, "leaving_tx");
                if queued_bytes(&session) < CLOSE_INLINE_BELOW {
                    drop(session);
                } else {
                    tokio::spawn(async move { drop(session) });
                }
                movetrace::mark(&mut conn.trace, "old_closed");
                let moving = migrate(&inner, &mut conn, &reason.text, to.as_deref(), at);
                match counted(reason.cause, at, moving).await {
                    Ok(Some(s)) => {
                        session = s;
                        if let Some(d) = done {
                            let _ = d.send(Ok(conn.at.server.clone()));
                        }
                    }
                    Ok(None) => {
                        if let Some(d) = done {
                            let _ = d.send(Err(crate::NotMoved::Ended));
                        }
                        break Ok(());
                    }
                    Err(e) => {
                        if let Some(d) = done {
                            let _ = d.send(Err(crate::NotMoved::Failed(e.clone())));
                        }
                        break Err(format!("migration failed: {e}"));
                    }
                }
            }
        }
    };
    conn.status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .bytes_down = conn.stream.down.received();
    inner.retire(id, &conn.status, &outcome);
    match outcome {
        Ok(()) => {
            tracing::info!(conn = id, cid = %conn.at.cid, "connection closed in order");
            let _ = cw.shutdown().await;
        }
        Err(why) => {
            tracing::error!(conn = id, cid = %conn.at.cid, "closing the client connection: {why}");
            if let Ok(c) = cr.reunite(cw) {
                reset(c);
            }
        }
    }
}

/// How long a move waits to write LEAVING on the session it leaves.
const LEAVING_WRITE: Duration = Duration::from_millis(20);

/// A session with less than this in its socket's receive queue is closed at once when it moves.
const CLOSE_INLINE_BELOW: usize = 256 << 10;

/// Bytes in the session socket's receive queue (`FIONREAD`); `usize::MAX` if unknown.
fn queued_bytes(s: &Session) -> usize {
    use std::os::fd::AsRawFd;
    let fd = s.w.as_raw_fd();
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on a socket we own writes one int to the pointer given.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } == 0 {
        n.max(0) as usize
    } else {
        usize::MAX
    }
}

/// Closes `s` with a reset so the client program sees an error, not a clean end.
pub(crate) fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Connects to a server and sends `first` (HELLO, MIGRATE or WATCH) with the preamble.
pub(crate) async fn connect(
    addr: &str,
    limit: Duration,
    first: &Msg,
    dialer: &Dialer,
) -> Result<(FrameReader<ReadHalf>, WriteHalf), ChannelError> {
    let s = tokio::time::timeout(limit, dialer.dial(addr))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    open_on(s, limit, first).await
}

/// Sends the preamble and `first` on an established connection.
async fn open_on(
    mut s: Stream,
    limit: Duration,
    first: &Msg,
) -> Result<(FrameReader<ReadHalf>, WriteHalf), ChannelError> {
    tokio::time::timeout(limit, framed::open_with(&mut s, first))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, w) = s.into_split();
    Ok((FrameReader::new(r, SETUP_FRAME), w))
}

/// HELLO to the configured servers in order.
/// A session opened with HELLO: the server's address, the channel and its WELCOME.
pub(crate) type Welcomed = (
    String,
    FrameReader<ReadHalf>,
    WriteHalf,
    mtcp_proto::wire::Welcome,
);

/// Sends `hello` to the configured servers in order until one answers WELCOME; the error names
/// why each refused or failed.
pub(crate) async fn welcome(inner: &AgentInner, hello: &Msg) -> Result<Welcomed, String> {
    let mut errs = Vec::new();
    for addr in &inner.cfg.connect {
        let r = async {
            let (mut reader, w) =
                connect(addr, inner.cfg.connect_timeout, hello, &inner.dialer).await?;
            match reader.next_msg(inner.cfg.connect_timeout).await? {
                Msg::Welcome(wl) => Ok((reader, w, wl)),
                Msg::Refused { code, reason } => {
                    mtcp::metrics::refused(code);
                    Err(ChannelError::Unexpected(format!(
                        "refused ({code:?}): {reason}"
                    )))
                }
                other => Err(ChannelError::Unexpected(format!("{other:?}"))),
            }
        }
        .await;
        match r {
            Ok((reader, w, wl)) => return Ok((addr.clone(), reader, w, wl)),
            Err(e) => {
                tracing::warn!(server = %addr, "cannot open a session: {e}");
                errs.push(format!("{addr}: {e}"));
            }
        }
    }
    Err(errs.join("; "))
}

async fn open(
    inner: &Arc<AgentInner>,
    id: u64,
    orig_dst: Option<String>,
) -> Result<(Session, Conn), String> {
    let hello = Msg::Hello { caps: 0, orig_dst };
    let (addr, mut reader, w, wl) = welcome(inner, &hello).await?;
    let addr = &addr;
    reader.set_max_frame(wire::MAX_SESSION_FRAME);
    let eager = wl.mode == Mode::Eager;
    let status = Arc::new(Mutex::new(ConnStatus::live(
        wl.cid.to_string(),
        wl.server.clone(),
        wl.epoch,
        false,
    )));
    let at = Placement::welcomed(wl, addr);
    inner
        .spares
        .want(at.alternates.iter().map(|a| a.data.as_str()));
    let conn = Conn {
        id,
        at,
        stream: RelayStream::new(eager),
        status,
        awaiting_first_byte: None,
        trace: None,
        last_state_bytes: 0,
        last_from_replica: false,
        policy: crate::policy::ConnPolicy::new(&inner.cfg.policy),
        rtt: Rtt::default(),
    };
    let watch = watch_for(inner, &conn, addr);
    Ok((Session { reader, w, watch }, conn))
}

/// Relays until the session ends or must move.
async fn run(
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
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    Ok(WatchEnd::Gone(why)) => return session_broke(conn, &why),
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
                tracing::debug!(conn = conn.id, waited_us = req.at.elapsed().as_micros() as u64, "move request seen");
                if let Some(t) = req.to.as_deref().filter(|t| !conn.at.alternates.iter().any(|a| a.id == *t)) {
                    // Refuse before touching the session: a typo must not break a live connection.
                    if let Some(d) = req.done {
                        let _ = d.send(Err(crate::NotMoved::Failed(format!("unknown server {t:?}"))));
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
                    tracing::info!(conn = conn.id, cid = %conn.at.cid, "{reason}");
                    return End::Move { reason, to, done: None, at: None };
                }
            }
            _ = ping.tick() => {
                // Idle for a whole tick: give the buffers back (issue 13, memory per idle
                // connection). A busy connection keeps them.
                let moved = conn.stream.down.received() + conn.stream.retained.end();
                if moved == moved_at_tick && pend.is_empty() && ready.is_none() {
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
                // is expected: `trigger::beat_due`).
                if let Some(ack) = conn.stream.on_tick() {
                    if framed::write_msg(&mut s.w, &ack).await.is_err() {
                        return session_broke(conn, "write failed");
                    }
                }
                moved_at_tick = moved;
                let t = inner.started.elapsed().as_micros() as u64;
                if framed::write_msg(&mut s.w, &Msg::Ping { t }).await.is_err() {
                    return session_broke(conn, "write failed");
                }
            }
            w = cw.write(&wbuf[pend.clone()]), if !pend.is_empty() => match w {
                Ok(k) if k > 0 => {
                    let d = &wbuf[pend.start..pend.start + k];
                    if let Err(e) = on_delivered(conn, s, d, &mut live).await {
                        return e;
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
                let n = cr.try_read_buf(&mut buf)?;
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
                        return session_broke(conn, "write failed");
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
                        return session_broke(conn, "write failed");
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
                        if let Some(t) = conn.stream.closed_at() {
                            if conn.stream.down.received() + pend.len() as u64 + ready.unwrap_or(0) as u64 >= t {
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
                        return session_broke(conn, &e.to_string());
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
                let reason = MoveReason::new(MoveCause::Silence, format!("server silent for {:?}", live.bound()));
                return End::Move { reason, to: None, done: None, at: None };
            }
        }
    }
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
            return Err(session_broke(conn, "write failed"));
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
                        return Some(session_broke(conn, "write failed"));
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

/// The session's TCP connection failed without an M-TCP close: move it.
fn session_broke(conn: &Conn, why: &str) -> End {
    let reason = MoveReason::new(
        MoveCause::SessionBroke,
        format!("session with {} broke: {why}", conn.at.server),
    );
    tracing::info!(conn = conn.id, cid = %conn.at.cid, "{reason}");
    End::Move {
        reason,
        to: None,
        done: None,
        at: None,
    }
}

/// Moves the connection: MIGRATE to candidates in order until one resumes it. `Ok(None)`: the
/// server had already ended the connection in order (every byte is here), nothing to move.
async fn migrate(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    reason: &str,
    to: Option<&str>,
    t0: Instant,
) -> Result<Option<Session>, String> {
    let from = conn.at.server.clone();
    let mut plan =
        MovePlan::new(&conn.at, conn.stream.position(), to).map_err(|e| e.to_string())?;
    tracing::info!(conn = conn.id, cid = %conn.at.cid, from = %from, "migrating: {reason}");
    while let Some(a) = plan.next(&conn.stream.lineage) {
        if let Some((left, fb)) = &a.fell_back {
            tracing::warn!(conn = conn.id, cid = %conn.at.cid, epoch = left, "no server could take the connection at its epoch; retrying from epoch {} (unconfirmed move from {})", fb.epoch, fb.server);
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
    reason: &str,
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
            tracing::info!(conn = conn.id, cid = %conn.at.cid, from = %from, to = %conn.at.server, us = resumed_us, "migrated");
            Some(Ok(Some(s)))
        }
        Err(e @ MoveError::Closed(_)) => {
            tracing::info!(conn = conn.id, cid = %conn.at.cid, "not moved: {e}");
            Some(Ok(None))
        }
        Err(e) => {
            tracing::warn!(conn = conn.id, server = %cand.id, "migration refused: {e}");
            plan.refused(cand, &e);
            None
        }
    }
}

/// Reads a candidate's answer to MIGRATE. WORKING (sent every heartbeat while the
/// takeover runs) only shows the candidate is alive; silence longer than `silence`, or no
/// answer within `total`, is a timeout.
pub(crate) async fn answer_to_migrate(
    reader: &mut FrameReader<ReadHalf>,
    silence: Duration,
    total: Duration,
) -> Result<Msg, ChannelError> {
    let deadline = Instant::now() + total;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout);
        }
        match reader.next_msg(silence.min(left)).await? {
            Msg::Working => continue,
            m => return Ok(m),
        }
    }
}

/// How a failed wait for a candidate's answer is reported.
pub(crate) fn silent(e: ChannelError, silence: Duration) -> MoveError {
    match e {
        ChannelError::Timeout => MoveError::Silent(silence),
        e => MoveError::Channel(e.to_string()),
    }
}

/// A destination's answer to MIGRATE, read by the core; refusals are counted.
pub(crate) fn resumed(msg: Msg) -> Result<mtcp_proto::wire::Resumed, MoveError> {
    agent::answer(msg).inspect_err(|e| {
        if let Some(code) = e.refuse_code() {
            mtcp::metrics::refused(code);
        }
    })
}

/// Sends MIGRATE to `cand` and reads its answer: on a spare connection if a fresh one is kept
/// (it saves the TCP handshake: MIGRATE leaves at once), else on a new connection. A spare the
/// server closed meanwhile fails before the server saw MIGRATE, so a fresh connection is safe
/// then. Both agents (relay and fast path) move through this.
pub(crate) async fn exchange_migrate(
    inner: &Arc<AgentInner>,
    cand: &ServerInfo,
    m: &Migrate,
    silence: Duration,
    trace: &mut Option<Trace>,
) -> Result<(FrameReader<ReadHalf>, WriteHalf, Msg), MoveError> {
    let first = Msg::Migrate(m.clone());
    if let Some(s) = inner.spares.take(&cand.data) {
        if let Ok((mut reader, w)) = open_on(s, inner.cfg.connect_timeout, &first).await {
            movetrace::mark(trace, "migrate_tx_spare");
            match answer_to_migrate(&mut reader, silence, inner.cfg.migrate_timeout).await {
                Ok(m) => return Ok((reader, w, m)),
                Err(ChannelError::Closed | ChannelError::Io(_)) => {}
                Err(e) => return Err(silent(e, silence)),
            }
        }
    }
    let (mut reader, w) = connect(&cand.data, inner.cfg.connect_timeout, &first, &inner.dialer)
        .await
        .map_err(|e| MoveError::Channel(e.to_string()))?;
    movetrace::mark(trace, "migrate_tx_connect");
    let m = answer_to_migrate(&mut reader, silence, inner.cfg.migrate_timeout)
        .await
        .map_err(|e| silent(e, silence))?;
    Ok((reader, w, m))
}

async fn try_resume(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    cand: &ServerInfo,
    m: &Migrate,
) -> Result<Session, MoveError> {
    // The candidate says WORKING every heartbeat until it answers: silence beyond an RTT-derived
    // bound means it is dead, hung or cut off, and the next candidate is tried (decision 32).
    let silence = mtcp_proto::timing::candidate_silence(&conn.rtt, conn.at.heartbeat);
    let (mut reader, mut w, msg) =
        exchange_migrate(inner, cand, m, silence, &mut conn.trace).await?;
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
        tracing::warn!(conn = conn.id, cid = %conn.at.cid, server = %r.server, "origin unreachable: resumed from a replica at downstream offset {}", r.restart_out);
    }
    conn.last_state_bytes = r.state_bytes;
    conn.last_from_replica = r.from_replica;
    let mut items: Vec<Out> = Vec::with_capacity(resend.chunks.len() + 2);
    if conn.stream.eager() {
        // Speak at once on the new session: until the destination hears the agent there, a
        // keeper may still have it give the epoch up (the agent might have moved on), and it
        // holds COMMITTED back (decision 48).
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
