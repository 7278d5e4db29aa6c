//! The kernel fast path, agent side (DESIGN §6): the client program's TCP connection itself is
//! handed to the server, so no process relays its bytes.
//!
//! For each accepted connection the agent opens a session with `HELLO{caps: CAP_DIRECT}`,
//! fences the client's flow (an nftables rule, [`mtcp_repair::Fence`]), freezes the client's
//! socket with `TCP_REPAIR`, closes it silently and sends its state to the server (ADOPT). The
//! server recreates the connection and serves the client directly; the agent drops the fence
//! and sends KICK, and the server's window probe restarts the flow. The session then carries
//! control only. To migrate, the agent sends MIGRATE as usual; the origin fences the flow in its
//! own fence table, freezes the socket and sends its state and the table's name
//! (`DirectState` on the peer channel); the destination recreates the socket, lifts the fence
//! and sends the client a window probe; the agent then sends KICK as well (decision 54).
//!
//! The agent sees none of the bytes: its status shows the stream offsets of the server's last
//! restart point (SNAP) and, at the end, the total. Needs root on the client's host and on the
//! servers' (which must share it: the recreated socket binds the agent's listening address).
//! A client packet sent while fenced is dropped, and the client resends it after its
//! retransmission timeout (≥ 200 ms); ACKs dropped meanwhile are replaced by the window probe.

use crate::channel::{resumed, welcome};
use crate::metrics::{counted, Moving};
use crate::relay::reset;
use crate::{AgentInner, ConnStatus, MigrationEvent, MoveReason, MoveRequest};
use mtcp::framed::{self, FrameReader};
use mtcp::movetrace::{self, Role as TraceRole, Trace};
use mtcp::stream::{ReadHalf, WriteHalf};
use mtcp_proto::agent::{
    after_failed_move, on_closed, on_session_error, AfterFailedMove, AfterFailure, AfterFault,
    Closing, Control, MoveError, MovePlan, Placement, SessionFault, StreamPos,
};
use mtcp_proto::custody::Lineage;
use mtcp_proto::trigger::Rtt;
use mtcp_proto::wire::{self, Migrate, Msg, ServerInfo, CAP_DIRECT};
use mtcp_repair::TcpState;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

type Session = (FrameReader<ReadHalf>, WriteHalf);

/// What the agent knows of a fast-path connection: the core's placement (no stream: the agent
/// sees none of the bytes).
struct Conn {
    id: u64,
    at: Placement,
    status: Arc<Mutex<ConnStatus>>,
}

/// Why the control loop stopped.
enum End {
    Done,
    Move {
        reason: MoveReason,
        to: Option<String>,
        done: Option<tokio::sync::oneshot::Sender<crate::MoveOutcome>>,
        at: Instant,
        /// The session broke (otherwise a failed move leaves the connection where it is).
        broken: bool,
    },
    Abort(String),
}

pub(crate) async fn direct(inner: Arc<AgentInner>, id: u64, client: TcpStream) {
    let (local, peer) = match (client.local_addr(), client.peer_addr()) {
        (Ok(l), Ok(p)) => (l, p),
        _ => return,
    };
    let (mut session, mut conn) = match hand_over(&inner, id, client, local, peer).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(conn = id, "fast path: {e}");
            return;
        }
    };
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<MoveRequest>();
    // Visible to `status` and `migrate` before the server may answer the client (it holds its
    // output until KICK): a client that got an answer finds its connection listed.
    inner.register(id, conn.status.clone(), cmd_tx);
    if let Err(e) = framed::write_msg(&mut session.1, &Msg::Kick).await {
        tracing::warn!(conn = id, "KICK: {e}");
    }
    tracing::info!(conn = id, cid = %conn.at.cid, server = %conn.at.server, "fast path: the server serves the client's connection");
    let outcome = loop {
        match run(&mut conn, &mut session, &mut cmd_rx).await {
            End::Done => break Ok(()),
            End::Abort(why) => break Err(why),
            End::Move {
                reason,
                to,
                done,
                at,
                broken,
            } => {
                let _moving = Moving::new(&inner);
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
                        // Refused before any origin let go: the connection is still served where
                        // it was (its flow was fenced meanwhile, so kick it).
                        let stay = after_failed_move(!broken) == AfterFailedMove::Stay;
                        if stay && framed::write_msg(&mut session.1, &Msg::Kick).await.is_ok() {
                            tracing::warn!(conn = id, cid = %conn.at.cid, "not moved ({e}); still on {}", conn.at.server);
                            continue;
                        }
                        break Err(format!("migration failed: {e}"));
                    }
                }
            }
        }
    };
    inner.retire(id, &conn.status, &outcome);
    match outcome {
        Ok(()) => tracing::info!(conn = id, cid = %conn.at.cid, "connection closed in order"),
        Err(why) => tracing::error!(conn = id, cid = %conn.at.cid, "connection given up: {why}"),
    }
}

/// Opens a session and hands the client's connection to its server, which holds its output
/// until the caller sends KICK (once the connection is registered).
async fn hand_over(
    inner: &Arc<AgentInner>,
    id: u64,
    client: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<(Session, Conn), String> {
    let hello = Msg::Hello {
        caps: CAP_DIRECT,
        orig_dst: None,
    };
    let (addr, mut reader, mut w, wl) = match welcome(inner, &hello).await {
        Ok(x) => x,
        Err(e) => {
            reset(client);
            return Err(format!(
                "cannot open a session with any server: {e}; closing the client connection"
            ));
        }
    };
    let std = match client.into_std() {
        Ok(s) => s,
        Err(e) => return Err(format!("client socket: {e}")),
    };
    // On one host the socket itself goes to the server (decision 56); otherwise it is fenced,
    // frozen and recreated there.
    let (adopt, kept) = match hand_socket(&addr, &std).await {
        Some(nonce) => (Msg::AdoptHanded { nonce }, Kept::Socket(std)),
        None => {
            let fence = match inner
                .fences()
                .and_then(|f| f.fence(local, peer).map_err(|e| e.to_string()))
            {
                Ok(f) => f,
                Err(e) => {
                    reset(std);
                    return Err(format!("cannot fence the client's flow: {e}"));
                }
            };
            let frozen = match mtcp_repair::try_freeze(std) {
                Ok(f) => f,
                Err((e, std)) => {
                    drop(fence);
                    reset(std);
                    return Err(format!("cannot freeze the client's connection: {e}"));
                }
            };
            // The server's socket can only take the address pair once this one is gone.
            let state = frozen.discard();
            let adopt = Msg::Adopt(state.encode());
            (adopt, Kept::State(Box::new((state, fence))))
        }
    };
    let answer = match framed::write_msg(&mut w, &adopt).await {
        Ok(()) => match reader.next_msg(inner.cfg.connect_timeout).await {
            Ok(m) => mtcp_proto::agent::adopt_answer(m).map_err(|e| {
                if let Some(code) = e.refuse_code() {
                    mtcp::metrics::refused(code);
                }
                e.to_string()
            }),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = answer {
        match kept {
            Kept::Socket(s) => reset(s),
            Kept::State(kept) => {
                let (state, fence) = *kept;
                give_back(&state);
                drop(fence);
            }
        }
        return Err(format!(
            "server {} did not take the client's connection: {why}; closing it",
            wl.server
        ));
    }
    // Handed: the server's descriptor holds the socket now; ours goes (no FIN: the socket
    // lives on). Frozen: the fence comes down.
    drop(kept);
    reader.set_max_frame(wire::MAX_SESSION_FRAME);
    let status = Arc::new(Mutex::new(ConnStatus::live(
        wl.cid.to_string(),
        wl.server.clone(),
        wl.epoch,
        true,
    )));
    let at = Placement::welcomed(wl, &addr);
    // MIGRATE leaves on a spare connection when there is one (as on the relay).
    inner
        .spares
        .want(at.alternates.iter().map(|a| a.data.as_str()));
    let conn = Conn { id, at, status };
    Ok(((reader, w), conn))
}

/// What the agent keeps of the client's connection until the server took it.
enum Kept {
    /// Handed over (decision 56): our own descriptor.
    Socket(std::net::TcpStream),
    /// Frozen and discarded: its state, to reset it if the server refuses, and its fence.
    State(Box<(TcpState, mtcp_repair::Fence)>),
}

/// Hands the client's socket to the server at data address `addr` over its local hand-over
/// listener, if it has one on this host run by the uid that listens on `addr` (decision 56);
/// the nonce to name it by in ADOPTHANDED. `None`: no such listener (another host,
/// `--no-local-handoff`), and nothing was sent.
async fn hand_socket(addr: &str, sock: &std::net::TcpStream) -> Option<mtcp::handoff::Nonce> {
    let fd = sock.try_clone().ok()?;
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let owner = mtcp::handoff::listener_uid(&addr)?;
        let u = match mtcp::handoff::connect(&addr, owner) {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(server = %addr, "no local hand-over, freezing the connection: {e}");
                return None;
            }
        };
        let nonce = mtcp::handoff::new_nonce();
        match mtcp::handoff::give(&u, &nonce, std::os::fd::AsFd::as_fd(&fd)) {
            Ok(()) => Some(nonce),
            Err(e) => {
                tracing::warn!(server = %addr, "local hand-over failed, freezing the connection: {e}");
                None
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// A hand-over failed after our socket was discarded: recreate the connection here (still
/// fenced) and reset it, so the client program sees an error instead of a silent hang.
fn give_back(state: &TcpState) {
    match mtcp_repair::restore(state) {
        Ok(s) => {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        Err(e) => tracing::error!("cannot recreate the client's connection to reset it: {e}"),
    }
}

/// Watches the session until the connection ends or must move.
async fn run(
    conn: &mut Conn,
    s: &mut Session,
    cmd: &mut mpsc::UnboundedReceiver<MoveRequest>,
) -> End {
    // A fast-path server does not beat (`trigger::beat_every`, decision 69) and no pings run
    // here: the session is quiet for as long as nothing moves. Its end (EOF, reset) is the
    // server's. A hung server keeps its client's connection, which no other server could take
    // without it, so its silence is no reason to act.
    let unbounded = Duration::MAX;
    loop {
        tokio::select! {
            biased;
            Some(req) = cmd.recv() => {
                if let Err(e) = conn.at.check_target(req.to.as_deref()) {
                    if let Some(d) = req.done {
                        let _ = d.send(Err(crate::NotMoved::Failed(e.to_string())));
                    }
                    continue;
                }
                return End::Move { reason: req.reason, to: req.to, done: req.done, at: req.at, broken: false };
            }
            m = s.0.next_msg(unbounded) => match m.map(|m| conn.at.on_control(m)) {
                Ok(Control::Move(h)) => {
                    return End::Move {
                        reason: MoveReason::new(h.reason.into(), h.text),
                        to: h.to,
                        done: None,
                        at: Instant::now(),
                        broken: false,
                    };
                }
                Ok(Control::Stream(Msg::Snap { in_off, out_off })) => {
                    let mut st = conn.status.lock().unwrap_or_else(|p| p.into_inner());
                    st.bytes_up = in_off;
                    st.bytes_down = out_off;
                }
                Ok(Control::Stream(Msg::Closed { down_total })) => {
                    conn.status.lock().unwrap_or_else(|p| p.into_inner()).bytes_down = down_total;
                    // The agent sees none of the bytes: the kernel's socket carried them all.
                    if on_closed(down_total, None) == Closing::Done {
                        return End::Done;
                    }
                }
                Ok(Control::Refused { code, why }) => {
                    mtcp::metrics::refused(code);
                    return End::Abort(why);
                }
                Ok(Control::Nothing | Control::Pong(_) | Control::Stream(_)) => {}
                Err(e) => {
                    // No close is passed: the fast path ended at CLOSED itself.
                    let fault = SessionFault::read(crate::channel::fault(e), unbounded);
                    match on_session_error(&conn.at.server, fault, None, 0) {
                        AfterFault::Move(reason) => {
                            tracing::info!(conn = conn.id, cid = %conn.at.cid, "{reason}");
                            return End::Move { reason, to: None, done: None, at: Instant::now(), broken: true };
                        }
                        AfterFault::Done => return End::Done,
                    }
                }
            },
        }
    }
}

/// Moves the connection: fence, MIGRATE to candidates in order, unfence, kick.
async fn migrate(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    reason: &MoveReason,
    to: Option<&str>,
    t0: Instant,
) -> Result<Option<Session>, String> {
    let from = conn.at.server.clone();
    let mut plan = MovePlan::new(&conn.at, StreamPos::unseen(), to).map_err(|e| e.to_string())?;
    tracing::info!(conn = conn.id, cid = %conn.at.cid, from = %from, "migrating (fast path): {reason}");
    let mut trace = Trace::start_at(TraceRole::Agent, conn.at.cid, conn.at.epoch, "trigger", t0);
    // No fence here: the origin fences the flow just before it freezes the socket, and the
    // destination lifts it once the socket is recreated (decision 54).
    let mut state_bytes = None;
    let mut resumed = None;
    // The fast path's agent tracks no unconfirmed moves (no COMMITTED reaches it): no fallback
    // to an earlier epoch within a round.
    let no_lineage = Lineage::default();
    while let Some(a) = plan.next(&no_lineage, &mut conn.at.migrates) {
        let cand = &a.cand;
        if let Some((round, pause)) = a.again {
            tracing::warn!(conn = conn.id, cid = %conn.at.cid, "no server took the connection, some for a reason that may pass; round {round} of the move in {pause:?}");
            ::metrics::counter!(mtcp::metrics::MOVE_ROUNDS).increment(1);
            tokio::time::sleep(pause).await;
        }
        if let Some(t) = trace.as_mut() {
            t.set_epoch(a.migrate.epoch);
        }
        match try_resume(inner, conn, cand, &a.migrate, &mut trace).await {
            Ok((s, n)) => {
                state_bytes = Some(n);
                resumed = Some(s);
                break;
            }
            Err(e) => match plan.failed(cand, &e) {
                AfterFailure::Ended => {
                    tracing::info!(conn = conn.id, cid = %conn.at.cid, "not moved: {e}");
                    return Ok(None);
                }
                AfterFailure::TryNext => {
                    tracing::warn!(conn = conn.id, server = %cand.id, "migration refused: {e}");
                }
            },
        }
    }
    let ok = resumed.is_some();
    let resumed_us = t0.elapsed().as_micros() as u64;
    {
        let mut st = conn.status.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            st.server = conn.at.server.clone();
            st.epoch = conn.at.epoch;
            st.migrations += 1;
        }
        st.record(MigrationEvent {
            to: ok.then(|| conn.at.server.clone()),
            ok,
            resumed_us: ok.then_some(resumed_us),
            state_bytes,
            refusals: plan.refusals().to_vec(),
            ..MigrationEvent::new(inner.started, t0, from.clone(), reason)
        });
    }
    match resumed {
        Some(mut s) => {
            if let Err(e) = framed::write_msg(&mut s.1, &Msg::Kick).await {
                tracing::warn!(conn = conn.id, "KICK: {e}");
            }
            if let Some(mut t) = trace {
                t.mark("kick_tx");
                t.emit();
            }
            tracing::info!(conn = conn.id, cid = %conn.at.cid, from = %from, to = %conn.at.server, us = resumed_us, "migrated (fast path)");
            Ok(Some(s))
        }
        None => Err(plan.failure()),
    }
}

async fn try_resume(
    inner: &Arc<AgentInner>,
    conn: &mut Conn,
    cand: &ServerInfo,
    m: &Migrate,
    trace: &mut Option<Trace>,
) -> Result<(Session, u64), MoveError> {
    // No session RTT is measured on the fast path (no pings): the candidate's handshakes, else
    // the silence bound of an unmeasured path.
    let (mut reader, w, msg) =
        crate::channel::exchange_migrate(inner, cand, m, &Rtt::default(), conn.at.heartbeat, trace)
            .await?;
    movetrace::mark(trace, "resumed_rx");
    let r = resumed(msg)?;
    reader.set_max_frame(wire::MAX_SESSION_FRAME);
    conn.at.resumed(&r, &cand.data);
    inner
        .spares
        .want(conn.at.alternates.iter().map(|a| a.data.as_str()));
    Ok(((reader, w), r.state_bytes))
}
