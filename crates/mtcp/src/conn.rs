//! A migratable connection as the application sees it (the per-connection state the runtime
//! keeps behind it is `conn_state`).
//!
//! The application reads and writes a [`Connection`] like a TCP stream. Behind it the runtime
//! logs the input consumed since the last snapshot and the output the agent may still need, so
//! that another server can restart the application from the snapshot and continue both streams
//! exactly where the client is.

use crate::conn_state::{Accepted, ConnState, Phase, PhaseEvent, Shared, TraceOut, MAX_WRITE};
use crate::framed::Out;
use crate::registry::ServerInner;
use bytes::Bytes;
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::Cid;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use crate::conn_state::{is_migrated, Start, StateError};

/// A connection accepted by [`crate::Server`]: read and write it like a TCP stream; export
/// restart points with [`Connection::set_state`]; protect sections that must not be split by a
/// migration with [`Connection::lock_state`].
pub struct Connection {
    pub(crate) shared: Arc<Shared>,
    pub(crate) server: Arc<ServerInner>,
    pub(crate) start: Start,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("cid", &self.shared.cid)
            .field("start", &self.start)
            .finish()
    }
}

impl Connection {
    /// The application's handle on a connection a session set up on `server`.
    pub(crate) fn new(a: Accepted, server: Arc<ServerInner>) -> Self {
        Connection {
            shared: a.shared,
            server,
            start: a.start,
        }
    }

    /// `get_state`: whether this connection is new here or migrated, with its snapshot.
    pub fn start(&self) -> &Start {
        &self.start
    }

    pub fn cid(&self) -> Cid {
        self.shared.cid
    }

    /// The connection's epoch on this server: 0 for a new connection, higher after each move.
    /// Of two servers that both believe they hold the connection, the higher epoch is current.
    pub fn epoch(&self) -> u64 {
        self.shared.lock().epoch
    }

    /// `set_state`: exports a restart point. `snapshot` must describe the application's state
    /// given exactly the bytes it has read from and written to this connection so far.
    pub fn set_state(&self, snapshot: impl Into<Bytes>) -> Result<(), StateError> {
        self.restart_point(snapshot.into(), false).map(|_| ())
    }

    /// A *barrier* restart point: a migration never restarts this connection before it (the
    /// client gets whatever output before it it lacks from the record's tail). Use it after an
    /// effect that must not happen twice — a database commit. Unlike [`Connection::set_state`]
    /// it fails with [`StateError::Replaying`] instead of being ignored while a restarted
    /// application still regenerates output the client already has.
    pub fn set_state_barrier(&self, snapshot: impl Into<Bytes>) -> Result<(), StateError> {
        match self.restart_point(snapshot.into(), true)? {
            true => Ok(()),
            false => Err(StateError::Replaying),
        }
    }

    /// Whether restart points can outlive this server: eager mode, where backups store them
    /// and another server may restart the connection without this one. In lazy mode a
    /// connection moves only with its server's help (which waits out `lock_state` sections)
    /// and dies with it, so a restart point between two steps of a locked section is never
    /// used.
    pub fn replicated(&self) -> bool {
        crate::eager::eager(&self.server)
    }

    /// [`Connection::set_state_barrier`], returning once the restart point survives this
    /// server's death: at once in lazy mode (nothing of a lazy connection survives its server),
    /// and in eager mode once every backup stores it — pushed at once, with the output the
    /// client still lacks before it. [`StateError::NotDurable`] when they did not within
    /// `origin_wait` × 20 (at least 1 s); the restart point is still taken here, as a barrier.
    pub async fn set_state_durable(&self, snapshot: impl Into<Bytes>) -> Result<(), StateError> {
        self.set_state_barrier(snapshot)?;
        if !crate::eager::eager(&self.server) {
            return Ok(());
        }
        let bound = (self.server.cluster.origin_wait * 20).max(std::time::Duration::from_secs(1));
        crate::eager::push_durable(&self.server, &self.shared, bound).await
    }

    /// Takes a restart point; `Ok(false)` when it was ignored (replay still being checked).
    fn restart_point(&self, snapshot: Bytes, barrier: bool) -> Result<bool, StateError> {
        let max = self.server.limits.max_snapshot;
        if snapshot.len() > max {
            return Err(StateError::TooLarge {
                len: snapshot.len(),
                max,
            });
        }
        let mut st = self.shared.lock();
        st.ensure_live()?;
        let taken = if barrier {
            st.s.snapshot_barrier(snapshot)
        } else {
            st.s.snapshot(snapshot)
        };
        let Some((in_off, out_off)) = taken else {
            return Ok(false);
        };
        {
            // Lazy mode: stored here, so the snapshot is safe as soon as it is taken. Eager
            // mode: the agent also cuts its checksum ranges here; the snapshot becomes safe
            // once a backup holds it (COMMITTED).
            st.send(Out::Msg(Msg::Snap { in_off, out_off }));
            crate::eager::replicate_if_due(&self.server, &self.shared, &mut st);
        }
        Ok(true)
    }

    /// `lock_state`: starts a section that a migration will not split. Returns
    /// [`StateError::Migrated`] if the connection already moved; otherwise a guard whose drop is
    /// `unlock_state`. A migration requested meanwhile waits (bounded) for the guard to drop.
    pub async fn lock_state(&self) -> Result<StateGuard, StateError> {
        loop {
            let notified = self.shared.unlocked.notified();
            {
                let mut st = self.shared.lock();
                st.ensure_live()?;
                if !st.locked {
                    st.locked = true;
                    return Ok(StateGuard {
                        shared: self.shared.clone(),
                    });
                }
            }
            notified.await;
        }
    }

    /// Starts a *soft* section: a unit of work the application expects to finish soon, which
    /// a migration prefers not to split (decision 55). A migration requested meanwhile waits
    /// for the guard to drop for at most `Limits::soft_wait` (10 ms by default), then moves the
    /// connection anyway: the application restarts from its last restart point, as after any
    /// move, so a soft section needs no care beyond what restart points already take. Only a
    /// fast-path connection waits: a relaying agent stops forwarding the client's input when it
    /// moves a connection, so the section could not end meanwhile. Use it to
    /// make moves land on cheap boundaries (the PostgreSQL front-end holds one while a
    /// transaction is open); use [`Connection::lock_state`] where a split would be wrong.
    pub fn soft_lock(&self) -> Result<SoftGuard, StateError> {
        let mut st = self.shared.lock();
        st.ensure_live()?;
        st.soft += 1;
        Ok(SoftGuard {
            shared: self.shared.clone(),
        })
    }

    /// Whether this connection, restarted here by a move, is still regenerating output its
    /// client already has: the input being served was answered before (by the server it moved
    /// from). `false` once the regenerated output reached the client's position, and for a
    /// connection that did not move.
    pub fn replaying(&self) -> bool {
        self.shared.lock().s.replaying()
    }

    /// Bytes read and written so far (upstream, downstream offsets).
    pub fn offsets(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.s.in_off(), st.s.out_off())
    }

    fn close_by_app(&self) {
        let mut st = self.shared.lock();
        if *st.phase() != Phase::Live {
            return;
        }
        let down_total = st.s.out_off();
        // CLOSED is queued first: with nothing left to deliver the connection is closed at
        // once, and the writer flushes what is queued, then stops.
        st.send(Out::Msg(Msg::Closed { down_total }));
        let acked = st.s.acked();
        st.apply(PhaseEvent::AppDone {
            acked,
            out: down_total,
        });
        let done = *st.phase() == Phase::Closed;
        let epoch = st.epoch;
        drop(st);
        if done {
            crate::eager::closed_in_order(&self.server, self.shared.cid, epoch);
        }
    }
}

/// Held while a section must not be split by a migration; dropping it is `unlock_state`. The
/// connection stays usable (read, write, `set_state`) while the guard is held.
pub struct StateGuard {
    shared: Arc<Shared>,
}

impl StateGuard {
    /// Ends the section (same as dropping the guard).
    pub fn unlock(self) {}
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.shared.lock().locked = false;
        self.shared.unlocked.notify_waiters();
    }
}

/// Held while a soft section is open (see [`Connection::soft_lock`]); dropping it ends the
/// section.
pub struct SoftGuard {
    shared: Arc<Shared>,
}

impl Drop for SoftGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.soft = st.soft.saturating_sub(1);
        if st.soft == 0 {
            drop(st);
            self.shared.unlocked.notify_waiters();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_by_app();
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        st.ensure_live()?;
        // Only as much of the application's buffer as there is input to copy is zeroed first.
        let unread = usize::try_from(st.s.unread()).unwrap_or(usize::MAX);
        match st
            .s
            .read(buf.initialize_unfilled_to(unread.min(buf.remaining())))
        {
            Some(0) => return Poll::Ready(Ok(())),
            Some(n) => {
                buf.advance(n);
                let relayed = st.direct.is_none();
                drop(st);
                if relayed {
                    // The session reader may be waiting for room (`Limits::max_unread`).
                    self.shared.consumed.notify_one();
                }
                return Poll::Ready(Ok(()));
            }
            None => {}
        }
        if let Some(sock) = st.direct.as_ref().map(|d| d.sock.clone()) {
            return crate::direct::read_inline(&mut st, &sock, cx, buf);
        }
        st.park_reader(cx);
        Poll::Pending
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        st.ensure_live()?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.queued >= self.server.limits.max_queued {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // A relayed session's output is kept until its agent acknowledges it. (On the fast path
        // the kernel's send buffer bounds it, and what it sent counts as acknowledged.)
        if st.direct.is_none() && st.s.unacked() >= self.server.limits.max_unacked {
            st.ack_wait.get_or_insert_with(std::time::Instant::now);
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = data.len().min(MAX_WRITE);
        let chunk = Bytes::copy_from_slice(&data[..n]);
        // A relayed session queues the logged bytes themselves; the fast path writes from
        // `data` and copies only what its socket did not take.
        let relayed = st.direct.is_none().then(|| chunk.clone());
        let max_log = self.server.limits.max_output_log;
        let (skip, over) = match st.s.log_write(chunk, max_log) {
            Ok(x) => x,
            Err(d) => {
                let reason = d.to_string();
                tracing::error!(cid = %self.shared.cid, "{reason}; aborting the connection");
                st.abort(reason.clone(), Some(RefuseCode::Divergence));
                drop(st);
                self.server.forget(self.shared.cid);
                return Poll::Ready(Err(StateError::Aborted(reason).into()));
            }
        };
        if over {
            tracing::warn!(
                cid = %self.shared.cid,
                "application wrote over {max_log} bytes since its last snapshot; connection not migratable until the next one"
            );
        }
        let unsent = &data[skip..n];
        if st.trace_out != TraceOut::Off {
            trace_write(&mut st, self.shared.cid, !unsent.is_empty());
        }
        if let Some(chunk) = relayed {
            if skip < n {
                st.send(Out::Data(chunk.slice(skip..)));
            }
            return Poll::Ready(Ok(n));
        }
        // On the fast path, with nothing queued before it and the agent's fence down, the
        // socket takes what it can at once.
        let mut rest = unsent;
        if let Some(sock) = st.direct.as_ref().map(|d| d.sock.clone()) {
            if st.queued == 0 && !st.fast.held && !rest.is_empty() {
                let took = crate::direct::write_inline(&mut st, &sock, rest);
                rest = &rest[took..];
            }
        }
        if !rest.is_empty() {
            st.send(Out::Data(Bytes::copy_from_slice(rest)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let st = self.shared.lock();
        st.ensure_live()?;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_by_app();
        Poll::Ready(Ok(()))
    }
}

/// The steps of a traced move (`st.trace_out`) an application's write passes: its first write
/// after the restart, and the first byte the client does not have yet.
fn trace_write(st: &mut ConnState, cid: Cid, sends: bool) {
    use crate::movetrace::{step, Role};
    if st.trace_out == TraceOut::AppWrite {
        step(Role::Destination, cid, "app_first_write");
        st.trace_out = TraceOut::NewByte;
    }
    if sends && st.trace_out == TraceOut::NewByte {
        if st.direct.is_some() {
            // The fast path writes the client's socket itself (inline or by its pump).
            crate::movetrace::finish(Role::Destination, cid, "first_new_byte_queued");
            st.trace_out = TraceOut::Off;
            return;
        }
        step(Role::Destination, cid, "first_new_byte_queued");
        st.trace_out = TraceOut::Written;
    }
}
