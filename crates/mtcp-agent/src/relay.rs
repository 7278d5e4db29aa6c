//! One client program's connection: relay it over an M-TCP session, and move the session when
//! a trigger fires.

mod migrate;
mod run;

use crate::channel::welcome;
use crate::metrics::{counted, Moving};
use crate::watch::Watch;
use crate::{AgentInner, ConnStatus, MoveReason, MoveRequest};
use migrate::migrate;
use mtcp::framed::{self, FrameReader};
use mtcp::movetrace::{self, Role as TraceRole, Trace};
use mtcp::stream::{ReadHalf, WriteHalf};
use mtcp_proto::agent::stream::RelayStream;
use mtcp_proto::agent::Placement;
use mtcp_proto::trigger::Rtt;
use mtcp_proto::wire::{self, Mode, Msg};
use run::run;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

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
                let moving = migrate(&inner, &mut conn, &reason, to.as_deref(), at);
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
                        // Its session was left with LEAVING before the MIGRATE: nothing to
                        // stay on (`agent::after_failed_move(false)`), so it is given up.
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

/// Closes `s` (a tokio or std socket) with a reset so the client program sees an error, not a
/// clean end.
pub(crate) fn reset<S: std::os::fd::AsFd>(s: S) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
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
