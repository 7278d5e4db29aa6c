//! One session on the data port: its first message (HELLO, MIGRATE, ADOPT, WATCH, PROBE)
//! decides what it is; refusals; the names of messages for logs.

use crate::conn::Connection;
use crate::conn_state::{Accepted, PhaseEvent, Shared, Start};
use crate::framed::{self, ChannelError, FrameReader};
use crate::metrics::SessionKind;
use crate::movetrace::Role;
use crate::probe::{probe, set_pacing_rate};
use crate::registry::ServerInner;
use crate::session_io::{noisy_event_admitted, reader_loop, refuse, writer_loop};
use crate::stream::Stream;
use crate::takeover::{take_over, DirectSock};
use mtcp_proto::hello::{self, Adoption, Opening};
use mtcp_proto::wire::{self, Msg, RefuseCode};
use mtcp_proto::Cid;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Limit on the first message of a session, before the peer is known.
pub(crate) const SETUP_FRAME: usize = 64 << 10;
/// Limit on ADOPT (the client's connection, with what it had queued when the agent accepted
/// it): larger states are refused, and the agent resets that client connection.
pub(crate) const ADOPT_FRAME: usize = mtcp_proto::adopt::MAX_ADOPT_QUEUE + (64 << 10);
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Test hook `hold_resumed_once`: whether this server's first hold was had already (then
/// this takeover answers at once).
fn held_once(inner: &ServerInner) -> bool {
    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    inner.limits.hold_resumed_once && HELD.swap(true, Ordering::Relaxed)
}

/// Serves a data-port session from `peer_addr`; `admitted` is its place under the session
/// caps, taken at accept (or why it is over one).
pub(crate) async fn handle_session(
    inner: Arc<ServerInner>,
    s: Stream,
    peer_addr: std::net::SocketAddr,
    admitted: Result<crate::admission::Slot, String>,
) {
    let mut gauge = crate::metrics::SessionGauge::new();
    let local_addr = s.tcp().local_addr().ok();
    // Held for the session's life: counts it against the caps.
    let (_slot, over) = match admitted {
        Ok(slot) => (Some(slot), None),
        Err(why) => (None, Some(why)),
    };
    if let Some(rate) = inner.limits.pacing_rate {
        set_pacing_rate(s.tcp(), rate);
    }
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, SETUP_FRAME);
    // The agent's preamble comes with its first message: one read takes both.
    let setup = async {
        framed::send_preamble(&mut w).await?;
        reader.preamble(SETUP_TIMEOUT).await
    };
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(())) => {}
        Ok(Err(ChannelError::Wire(e @ wire::WireError::Version { .. }))) => {
            refuse(&mut w, RefuseCode::VersionMismatch, e.to_string()).await;
            return;
        }
        // An agent's unused spare connection, closed before it carried anything.
        Ok(Err(ChannelError::Closed)) => {
            tracing::debug!(peer = %peer_addr, "data port: closed before the preamble");
            return;
        }
        Ok(Err(ChannelError::Timeout)) | Err(_) => {
            if let Some(suppressed) = noisy_event_admitted() {
                tracing::info!(peer = %peer_addr, suppressed, "data port: no preamble within {SETUP_TIMEOUT:?}; closing");
            }
            return;
        }
        Ok(Err(e)) => {
            if let Some(suppressed) = noisy_event_admitted() {
                tracing::info!(peer = %peer_addr, suppressed, "data port: {e}; closing");
            }
            return;
        }
    }
    if let Some(why) = over {
        refuse(&mut w, RefuseCode::Busy, why).await;
        return;
    }
    let first = match reader.next_msg(SETUP_TIMEOUT).await.map(hello::opening) {
        Ok(Ok(o)) => o,
        Ok(Err(r)) => {
            refuse(&mut w, r.code, r.reason).await;
            return;
        }
        Err(e) => {
            refuse(
                &mut w,
                RefuseCode::Malformed,
                format!("bad session setup: {e}"),
            )
            .await;
            return;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // What the session's writer sends: the connection's queue, or for a fast-path connection
    // what its pump passes on.
    let mut rx = Some(rx);
    let (shared, start) = match first {
        Opening::Hello { fast_path: direct } => {
            gauge.set(SessionKind::Connection);
            let listed = !inner.cluster.fast_path.is_empty();
            // Fast path: only a local agent of a trusted uid may hand connections over; its
            // end of this session is in this host's socket table (decision 39).
            // What it may hand over are the connections it holds on its listed addresses now,
            // while the client's connection is still its own (it freezes it after WELCOME).
            let (owner, held) = if mtcp_proto::hello::Hello::needs_owner(direct, listed) {
                let listed = inner.cluster.fast_path.clone();
                let since = std::time::Instant::now();
                match local_addr {
                    Some(local) => tokio::task::spawn_blocking(move || {
                        crate::sockowner::session_view(since, peer_addr, local, &listed)
                    })
                    .await
                    .unwrap_or_default(),
                    None => (None, Vec::new()),
                }
            } else {
                (None, Vec::new())
            };
            let hello = mtcp_proto::hello::Hello {
                fast_path: direct,
                fast_path_listed: listed,
                session_uid: owner,
                // SAFETY: geteuid has no preconditions.
                server_uid: unsafe { libc::geteuid() },
                draining: inner.draining.load(Ordering::Relaxed),
            };
            if let Err(r) = mtcp_proto::hello::admit_hello(&hello, &inner.id) {
                refuse(&mut w, r.code, r.reason).await;
                return;
            }
            // Only a fast-path agent's owner was looked up.
            let agent = owner.map(|uid| crate::direct::Adopter { uid, held });
            let cid = Cid(rand::random());
            let shared = Shared::new_conn(cid, tx);
            let token = inner.cluster.key.token(cid, 0);
            let welcome = hello::welcome(inner.destination(), cid, token, inner.cluster.mode);
            if framed::write_msg(&mut w, &Msg::Welcome(welcome))
                .await
                .is_err()
            {
                return;
            }
            if direct {
                // The client's connection itself comes next: its queues are what the agent's
                // socket had received and not sent, bounded by ADOPT_FRAME.
                reader.set_max_frame(ADOPT_FRAME);
                let handed = match reader.next_msg(SETUP_TIMEOUT).await.map(hello::adoption) {
                    Ok(Ok(Adoption::Repaired(tcp))) => Err(tcp),
                    Ok(Ok(Adoption::Handed(nonce))) => Ok(nonce),
                    Ok(Err(r)) => {
                        refuse(&mut w, r.code, r.reason).await;
                        return;
                    }
                    Err(e) => {
                        tracing::info!(%cid, "fast path: no client connection: {e}");
                        return;
                    }
                };
                use mtcp_proto::adopt::{flow, Recreated};
                // On one host the agent hands the socket itself over (decision 56): nothing was
                // fenced, but output still waits for KICK (the agent lists the connection first).
                let (adopted, flow) = match handed {
                    Ok(nonce) => (
                        crate::handed::adopt_from_agent(&inner, &nonce, agent.as_ref()).await,
                        flow(Recreated::AgentHanded),
                    ),
                    Err(tcp) => (
                        Box::pin(crate::direct::adopt(
                            tcp,
                            &inner.cluster.fast_path,
                            agent.as_ref(),
                        ))
                        .await,
                        flow(Recreated::AgentRepaired),
                    ),
                };
                match adopted {
                    Ok(sock) => {
                        let d = DirectSock {
                            sock,
                            written: 0,
                            flow,
                        };
                        rx = rx.take().map(|rx| d.start(rx, &shared, &inner));
                    }
                    Err(e) => {
                        refuse(&mut w, RefuseCode::Internal, e).await;
                        return;
                    }
                }
                if framed::write_msg(&mut w, &Msg::Adopted).await.is_err() {
                    return;
                }
            }
            inner
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(cid, shared.clone());
            tracing::debug!(%cid, peer = %peer_addr, "new connection");
            (shared, Start::New)
        }
        Opening::Migrate(m) => {
            gauge.set(SessionKind::Connection);
            let started = Instant::now();
            crate::movetrace::open(Role::Destination, m.cid, m.epoch, "migrate_rx");
            // WORKING every heartbeat until the answer: the agent gives up on a
            // silent candidate after an RTT-derived bound (decision 32), while a takeover may
            // take longer (an origin's lock_state section, protecting the connection on this
            // server's backups). The takeover itself is never cancelled: past the origin's
            // hand-over it is the only copy of the connection.
            let outcome = {
                // Boxed, as the other setup paths: the session's task then holds only what a
                // live session needs (issue 13: memory per idle connection).
                // The agent waits on this session for the answer; it closes the session when
                // it gives up on this candidate (a re-attach here must then not hand out).
                let agent = std::os::fd::AsRawFd::as_raw_fd(&w);
                let mut fut = Box::pin(take_over(&inner, &m, tx, agent));
                // The first after one beat: a quick answer (a refusal, a move from a live
                // origin) needs none.
                let hb = inner.cluster.heartbeat;
                let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut agent_there = true;
                loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        _ = beat.tick(), if agent_there => {
                            agent_there = framed::write_msg(&mut w, &Msg::Working).await.is_ok();
                        }
                    }
                }
            };
            if outcome.is_ok() && !inner.limits.hold_resumed.is_zero() && !held_once(&inner) {
                // Test hook: the moment between a finished takeover and RESUMED (a kill -9
                // here), silent to the agent (no WORKING: it gives up on this candidate).
                tracing::info!(cid = %m.cid, "test hook: holding RESUMED for {:?}", inner.limits.hold_resumed);
                let hold = tokio::time::sleep(inner.limits.hold_resumed);
                if inner.limits.hold_resumed_until_left {
                    // The agent sends nothing on a MIGRATE's connection before the answer: what
                    // ends this read is the agent leaving (giving up on this candidate).
                    tokio::select! {
                        _ = hold => {}
                        r = reader.next() => {
                            tracing::info!(cid = %m.cid, "test hook: the agent left ({:?}); RESUMED goes out now", r.err());
                        }
                    }
                } else {
                    hold.await;
                }
            }
            let outcome = match outcome {
                Ok((shared, ..))
                    if crate::eager::eager(&inner)
                        && !inner.may_answer(m.cid, shared.lock().epoch, m.holding.attempt) =>
                {
                    // A keeper superseded this takeover (the agent gave up on us): another
                    // destination has the connection one epoch up.
                    tracing::warn!(cid = %m.cid, "superseded before RESUMED went out; letting the connection go");
                    {
                        let mut st = shared.lock();
                        st.apply(PhaseEvent::LetGo);
                    }
                    inner.forget(m.cid);
                    Err(mtcp_proto::takeover::superseded())
                }
                o => o,
            };
            match outcome {
                Ok((shared, start, resumed, sock)) => {
                    let resumed_from_replica = resumed.from_replica;
                    // A fast-path agent's session is quiet: its RESUMED settles the epoch.
                    let quiet = sock.is_some();
                    if let Some(d) = sock {
                        rx = rx.take().map(|rx| d.start(rx, &shared, &inner));
                    }
                    shared.lock().resumed_for = mtcp_proto::takeover::ResumedFor {
                        attempt: m.holding.attempt,
                        from: m.epoch,
                    };
                    crate::movetrace::step(Role::Destination, m.cid, "resumed_ready");
                    let sent = framed::write_msg(&mut w, &Msg::Resumed(resumed)).await;
                    if sent.is_ok() && crate::movetrace::enabled() {
                        crate::movetrace::step(Role::Destination, m.cid, "resumed_tx");
                        shared.lock().trace_out = crate::conn_state::TraceOut::AppWrite;
                    }
                    if sent.is_err() {
                        // The agent will try elsewhere; the state stays here until it comes back
                        // or the janitor drops it.
                        shared.lock().detached_at = Some(Instant::now());
                    } else if quiet {
                        crate::eager::agent_heard(&inner, m.cid, &mut shared.lock());
                    }
                    inner.migrated_in.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::took_over(Some((resumed_from_replica, started.elapsed())));
                    tracing::info!(cid = %m.cid, from = %m.origin, took = ?started.elapsed(), "connection migrated here");
                    (shared, start)
                }
                Err(r) => {
                    crate::metrics::took_over(None);
                    refuse(&mut w, r.code, r.reason).await;
                    return;
                }
            }
        }
        Opening::Watch { cid, epoch, token } => {
            gauge.set(SessionKind::Watch);
            Box::pin(crate::watch::serve(&inner, reader, w, cid, epoch, token)).await;
            return;
        }
        Opening::Probe { t } => {
            gauge.set(SessionKind::Probe);
            Box::pin(probe(&inner, reader, w, t)).await;
            return;
        }
    };
    let accepted = Accepted {
        shared: shared.clone(),
        start,
    };
    if let Err(e) = inner.accept_tx.send(accepted) {
        // The server is gone: the connection ends as if its application had dropped it.
        drop(Connection::new(e.0, inner.clone()));
        return;
    }
    let (buf_r, buf) = reader.into_inner();
    let reader = FrameReader::from_parts(buf_r, buf, wire::MAX_SESSION_FRAME);
    let Some(rx) = rx else { return };
    let writer = tokio::spawn(writer_loop(w, rx, shared.clone(), inner.cluster.heartbeat));
    if reader_loop(reader, &shared, &inner).await {
        // Orderly end: let the writer flush what is queued (it ends when the queue closes).
        if tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .is_err()
        {
            tracing::debug!(cid = %shared.cid, "session writer did not finish in time");
        }
    } else {
        writer.abort();
    }
}
