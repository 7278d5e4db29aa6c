//! A migratable connection as the application sees it, and the per-connection state the runtime
//! keeps behind it.
//!
//! The application reads and writes a [`Connection`] like a TCP stream. Behind it the runtime
//! logs the input consumed since the last snapshot and the output the agent may still need, so
//! that another server can restart the application from the snapshot and continue both streams
//! exactly where the client is.

use crate::framed::Out;
use crate::server::ServerInner;
use bytes::Bytes;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::{HintReason, Msg, RefuseCode};
use mtcp_proto::{Cid, StateRecord};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};

/// Largest piece one `poll_write` takes (keeps data frames and the output log's chunks sized).
const MAX_WRITE: usize = 256 << 10;

/// How a connection starts on this server: `get_state` of the original API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new connection from a client.
    New,
    /// A connection that migrated here; restart the application from this snapshot.
    Migrated(Bytes),
}

/// Errors of the state API.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The connection moved to another server; this server's application must let it go.
    #[error("connection migrated to another server")]
    Migrated,
    #[error("connection closed")]
    Closed,
    #[error("connection aborted: {0}")]
    Aborted(String),
    #[error("snapshot of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// A restarted application is still regenerating output the client already has; its
    /// restart point (the one it was restarted from) stays the one to use until that is checked.
    #[error("restart point refused: the application is still regenerating output the client already has")]
    Replaying,
    /// The restart point could not be made durable (eager mode: the backups did not store it).
    #[error("restart point not durable: {0}")]
    NotDurable(String),
}

impl From<StateError> for io::Error {
    fn from(e: StateError) -> io::Error {
        let kind = match e {
            StateError::Migrated => io::ErrorKind::ConnectionAborted,
            StateError::Closed => io::ErrorKind::BrokenPipe,
            StateError::Aborted(_) => io::ErrorKind::ConnectionReset,
            StateError::TooLarge { .. } => io::ErrorKind::InvalidInput,
            StateError::Replaying | StateError::NotDurable(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Whether an I/O error from a [`Connection`] means "this connection migrated away".
pub fn is_migrated(e: &io::Error) -> bool {
    e.get_ref().and_then(|i| i.downcast_ref::<StateError>()) == Some(&StateError::Migrated)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    Live,
    /// The application is done; kept until the agent has every byte.
    AppClosed,
    Migrated,
    Aborted(String),
    Closed,
}

pub(crate) struct ConnState {
    pub epoch: u64,
    /// Changed only by [`ConnState::enter`].
    phase: Phase,
    /// The byte streams, restart points and acknowledgements (sans-IO).
    pub s: ServerStream,
    pub locked: bool,
    /// Soft sections open ([`Connection::soft_lock`]).
    pub soft: u32,
    pub tx: Option<mpsc::UnboundedSender<Out>>,
    pub queued: u64,
    pub detached_at: Option<Instant>,
    /// Since when the app's writes wait for the agent to acknowledge output
    /// (`Limits::max_unacked`); cleared when an acknowledgement arrives.
    pub ack_wait: Option<Instant>,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
    /// Eager mode: what the backups hold.
    pub repl: crate::eager::Repl,
    /// When the connection arrived here (opened or migrated in): the overload policy hints the
    /// newest away first.
    pub arrived: Instant,
    /// Kernel fast path: the pump serving the client's own TCP connection (see
    /// [`crate::direct`]).
    pub direct: Option<crate::direct::DirectHandle>,
    /// Kernel fast path: what the application's own socket calls and the pump share.
    pub fast: crate::direct::FastOut,
    /// When the connection was last hinted away (a drain repeats hints at most this often).
    pub hinted_at: Option<Instant>,
    /// Input frames (data, its end) received from the agent: the session's writer compares it
    /// with its value at the last data it wrote to tell whether input awaits an answer.
    pub inputs: u64,
    /// When an acknowledgement last moved `s.acked()`: the agent had read data by then, and
    /// may expect more for a while (`mtcp_proto::trigger::beat_due`).
    pub acked_at: tokio::time::Instant,
    /// The session's writer sends no heartbeats (nobody waits, `mtcp_proto::trigger::beat_due`)
    /// and waits for [`Shared::beat`] instead of its timer.
    pub beat_parked: bool,
    /// The agent closed the session to move the connection (`Msg::Leaving`): detached, but
    /// not for a dead agent.
    pub leaving: bool,
    /// What a move's trace here waits for on the output side (see [`crate::movetrace`]).
    pub trace_out: TraceOut,
}

/// The output steps a destination's move trace waits for, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TraceOut {
    /// No trace.
    #[default]
    Off,
    /// The application's first write after the restart.
    AppWrite,
    /// The first byte past what the client already has.
    NewByte,
    /// The session's writer writing it (`session_io::writer_loop`).
    Written,
}

impl ConnState {
    fn new(epoch: u64, s: ServerStream, tx: mpsc::UnboundedSender<Out>) -> Self {
        ConnState {
            epoch,
            phase: Phase::Live,
            s,
            locked: false,
            soft: 0,
            tx: Some(tx),
            queued: 0,
            detached_at: None,
            ack_wait: None,
            read_waker: None,
            write_waker: None,
            repl: Default::default(),
            arrived: Instant::now(),
            trace_out: TraceOut::Off,
            direct: None,
            fast: Default::default(),
            hinted_at: None,
            inputs: 0,
            acked_at: tokio::time::Instant::now(),
            beat_parked: false,
            leaving: false,
        }
    }

    /// Input arrived from the agent: a parked heartbeat timer runs again.
    pub fn on_input(&mut self, beat: &Notify) {
        self.inputs += 1;
        if self.beat_parked {
            self.beat_parked = false;
            beat.notify_one();
        }
    }

    pub(crate) fn ensure_live(&self) -> Result<(), StateError> {
        match &self.phase {
            Phase::Live => Ok(()),
            Phase::Migrated => Err(StateError::Migrated),
            Phase::Aborted(r) => Err(StateError::Aborted(r.clone())),
            Phase::AppClosed | Phase::Closed => Err(StateError::Closed),
        }
    }

    /// Queues `o` for the session socket; data is cut into frames of at most [`MAX_WRITE`].
    pub fn send(&mut self, o: Out) {
        match o {
            Out::Data(mut d) => {
                self.queued += d.len() as u64;
                while !d.is_empty() {
                    let piece = d.split_to(d.len().min(MAX_WRITE));
                    if let Some(tx) = &self.tx {
                        let _ = tx.send(Out::Data(piece));
                    }
                }
            }
            // A fast-path agent only shows SNAP's offsets in its status, so at most one per
            // interval goes to it (the HTTP app snapshots every 256 KiB, thousands per second at
            // full speed; a database front-end at every transaction).
            Out::Msg(Msg::Snap { .. }) if self.direct.is_some() && !self.fast.snap_due() => {}
            m => {
                if let Some(tx) = &self.tx {
                    let _ = tx.send(m);
                }
            }
        }
    }

    /// The connection's phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Every phase change of a connection happens here. Live → AppClosed (the application is
    /// done, the agent still reading) → Closed; a live or closing connection may instead end
    /// as Migrated (frozen for a destination, or given up to a keeper) or Aborted. Entering a
    /// final phase drops the session's queue (its writer stops) and wakes every waiting call
    /// of the application, which then sees the phase.
    pub fn enter(&mut self, to: Phase) {
        let done = !matches!(to, Phase::Live | Phase::AppClosed);
        self.phase = to;
        if done {
            self.tx = None;
            self.wake_all();
        }
    }

    /// Ends the connection here for `reason`: the agent hears REFUSED with `refusal` when one is
    /// given, the session's writer stops, and the application's pending calls wake to the error.
    /// The caller then forgets the connection (`ServerInner::forget`).
    pub fn abort(&mut self, reason: String, refusal: Option<RefuseCode>) {
        if let Some(code) = refusal {
            crate::metrics::refused(code);
            self.send(Out::Msg(Msg::Refused {
                code,
                reason: reason.clone(),
            }));
        }
        self.enter(Phase::Aborted(reason));
    }

    /// The application's read waits: it is woken when input arrives or the connection ends.
    pub fn park_reader(&mut self, cx: &Context<'_>) {
        if !self
            .read_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.read_waker = Some(cx.waker().clone());
        }
    }

    pub fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Builds the state record for a client holding `down_recv` downstream bytes whose checksum
    /// from `sum_from` is `down_sum`, then freezes the connection: the application sees
    /// [`StateError::Migrated`] from its next call.
    ///
    /// A record over `max_record` bytes is refused (`TooLarge`) and the connection stays live
    /// here: the destination would refuse the frame, and the origin must not build one a client
    /// can make arbitrarily large.
    pub fn freeze(
        &mut self,
        cid: Cid,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
        max_record: usize,
    ) -> Result<StateRecord, (RefuseCode, String)> {
        let rec = self
            .s
            .record(cid, self.epoch, down_recv, sum_from, down_sum)?;
        let len = rec.encoded_len_bound();
        if let Err(e) = mtcp_proto::bounds::record_fits(len, max_record) {
            return Err((
                RefuseCode::TooLarge,
                format!("the connection's state record is too large to move: {e}"),
            ));
        }
        self.enter(Phase::Migrated);
        Ok(rec)
    }
}

/// Shared between the application's [`Connection`], the session tasks and the server's table.
pub(crate) struct Shared {
    pub cid: Cid,
    pub st: Mutex<ConnState>,
    /// Signalled when a `lock_state` section ends.
    pub unlocked: Notify,
    /// Signalled when the application consumed input (the session reader may read more).
    pub consumed: Notify,
    /// Eager mode: where HINTs for this connection also go (`WatchHint` on the agent's watch
    /// connection with this server, which is never queued behind data; see [`Shared::hint`]).
    pub watch: Mutex<Option<mpsc::UnboundedSender<Msg>>>,
    /// Signalled when input arrives while the writer's heartbeats are parked.
    pub beat: Notify,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// State for a brand-new connection.
    pub fn new_conn(cid: Cid, tx: mpsc::UnboundedSender<Out>) -> Arc<Self> {
        Self::with_state(cid, ConnState::new(0, ServerStream::new(), tx))
    }

    /// State for a connection restarting from `rec` at `epoch`.
    pub fn from_record(rec: StateRecord, epoch: u64, tx: mpsc::UnboundedSender<Out>) -> Arc<Self> {
        let (stream, tail) = ServerStream::restart(&rec);
        let mut st = ConnState::new(epoch, stream, tx);
        if !tail.is_empty() {
            st.send(Out::Data(tail));
        }
        Self::with_state(rec.cid, st)
    }

    fn with_state(cid: Cid, st: ConnState) -> Arc<Self> {
        Arc::new(Self {
            cid,
            st: Mutex::new(st),
            unlocked: Notify::new(),
            consumed: Notify::new(),
            watch: Mutex::new(None),
            beat: Notify::new(),
        })
    }

    /// Sends a HINT (which has no stream position) on the session, ahead of queued data, and
    /// on the connection's watch connection if it has one: that one carries no data, so the
    /// HINT does not wait behind the session socket's buffers either. The caller holds `st`.
    pub fn hint(&self, st: &mut ConnState, reason: HintReason) {
        let m = Msg::Hint {
            reason,
            target: None,
        };
        st.send(Out::Msg(m));
        st.hinted_at = Some(Instant::now());
        crate::metrics::hinted(reason);
        if let Some(tx) = &*self.watch.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(Msg::WatchHint {
                cid: self.cid,
                reason,
            });
        }
    }
}

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
        st.enter(Phase::AppClosed);
        st.send(Out::Msg(Msg::Closed { down_total }));
        let done = st.s.acked() >= down_total;
        if done {
            // Nothing left to deliver: end the session (the writer flushes CLOSED, then stops).
            st.enter(Phase::Closed);
        }
        let epoch = st.epoch;
        drop(st);
        if done {
            self.server.closed_in_order(self.shared.cid, epoch);
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
        let max_log = self.server.limits.max_output_log;
        let (to_send, over) = match st.s.write(chunk, max_log) {
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
        if st.trace_out != TraceOut::Off {
            trace_write(&mut st, self.shared.cid, !to_send.is_empty());
        }
        // On the fast path, with nothing queued before it and the agent's fence down, the
        // socket takes what it can at once.
        let to_send = match st.direct.as_ref().map(|d| d.sock.clone()) {
            Some(sock) if st.queued == 0 && !st.fast.held && !to_send.is_empty() => {
                crate::direct::write_inline(&mut st, &sock, to_send)
            }
            _ => to_send,
        };
        if !to_send.is_empty() {
            st.send(Out::Data(to_send));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_over_the_limit_is_refused_and_the_connection_stays_live() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut st = ConnState::new(0, ServerStream::new(), tx);
        // 3 MiB of input the application has not read: it travels in the record.
        st.s.receive(Bytes::from(vec![7u8; 3 << 20])).unwrap();
        let cid = Cid([1; 16]);
        let sum = mtcp_proto::sum::checksum(&[]);
        let (code, why) = st.freeze(cid, 0, 0, sum, 1 << 20).unwrap_err();
        assert_eq!(code, RefuseCode::TooLarge, "{why}");
        assert!(why.contains("over the 1048576-byte limit"), "{why}");
        assert_eq!(
            *st.phase(),
            Phase::Live,
            "a refused freeze must leave it served"
        );
        let rec = st.freeze(cid, 0, 0, sum, 8 << 20).unwrap();
        assert_eq!(rec.input.len(), 3 << 20);
        assert!(rec.encode().len() <= rec.encoded_len_bound());
        assert_eq!(*st.phase(), Phase::Migrated);
    }
}
