//! The per-connection state the runtime keeps behind a [`Connection`](crate::Connection): its
//! phase, byte streams and restart points, its session's queue, replication and fast-path
//! bookkeeping; shared between the application's handle, the session tasks and the server's
//! table. Also how a connection starts here and the errors of the state API.

use crate::config::ServerEntry;
use crate::framed::Out;
use bytes::Bytes;
use mtcp_proto::custody::Custody;
use mtcp_proto::stream::{Refusal, ServerStream};
use mtcp_proto::wire::{HintReason, Msg, RefuseCode};
use mtcp_proto::{Cid, StateRecord};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Instant;
use tokio::sync::{mpsc, Notify};

/// Largest piece one `poll_write` takes (keeps data frames and the output log's chunks sized).
pub(crate) const MAX_WRITE: usize = 256 << 10;

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

/// Whether an I/O error from a [`Connection`](crate::Connection) means "this connection migrated
/// away".
pub fn is_migrated(e: &io::Error) -> bool {
    e.get_ref().and_then(|i| i.downcast_ref::<StateError>()) == Some(&StateError::Migrated)
}

pub(crate) use mtcp_proto::phase::{Phase, PhaseEvent};

pub(crate) struct ConnState {
    pub epoch: u64,
    /// Changed only by [`ConnState::apply`].
    phase: Phase,
    /// The byte streams, restart points and acknowledgements (sans-IO).
    pub s: ServerStream,
    pub locked: bool,
    /// Soft sections open ([`Connection::soft_lock`](crate::Connection::soft_lock)).
    pub soft: u32,
    pub tx: Option<mpsc::UnboundedSender<Out>>,
    pub queued: u64,
    pub detached_at: Option<Instant>,
    /// The agent's MIGRATE this epoch was resumed for here (see
    /// [`mtcp_proto::takeover::reattaches_own`]).
    pub resumed_for: mtcp_proto::takeover::ResumedFor,
    /// Since when the app's writes wait for the agent to acknowledge output
    /// (`Limits::max_unacked`); cleared when an acknowledgement arrives.
    pub ack_wait: Option<Instant>,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
    /// Eager mode: what the backups hold.
    pub repl: Repl,
    /// When the connection arrived here (opened or migrated in): the overload policy hints the
    /// newest away first.
    pub arrived: Instant,
    /// Kernel fast path: the pump serving the client's own TCP connection (see
    /// [`crate::direct`]).
    pub direct: Option<crate::direct_state::DirectHandle>,
    /// Kernel fast path: what the application's own socket calls and the pump share.
    pub fast: crate::direct_state::FastOut,
    /// Input frames (data, its end) received from the agent: the session's writer compares it
    /// with its value at the last data it wrote to tell whether input awaits an answer.
    pub inputs: u64,
    /// When an acknowledgement last moved `s.acked()`: the agent had read data by then, and
    /// may expect more for a while (`mtcp_proto::trigger::beat_every`).
    pub acked_at: tokio::time::Instant,
    /// The session's writer sends no heartbeats (nobody waits, `mtcp_proto::trigger::beat_every`)
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
            resumed_for: Default::default(),
            ack_wait: None,
            read_waker: None,
            write_waker: None,
            repl: Default::default(),
            arrived: Instant::now(),
            trace_out: TraceOut::Off,
            direct: None,
            fast: Default::default(),
            inputs: 0,
            acked_at: long_ago(),
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

    /// Every phase change of a connection happens here, as [`Phase::on`] rules; true if `ev`
    /// changed the phase. Entering a final phase drops the session's queue (its writer stops
    /// after what is queued) and wakes every waiting call of the application, which then sees
    /// the phase.
    pub fn apply(&mut self, ev: PhaseEvent) -> bool {
        let Some(to) = self.phase.on(ev) else {
            return false;
        };
        self.phase = to;
        if !self.phase.serves() {
            self.tx = None;
            self.wake_all();
        }
        true
    }

    /// Ends the connection here for `reason`, unless it already ended: the agent hears REFUSED
    /// with `refusal` when one is given, the session's writer stops, and the application's
    /// pending calls wake to the error. The caller then forgets the connection
    /// (`ServerInner::forget`).
    pub fn abort(&mut self, reason: String, refusal: Option<RefuseCode>) {
        if !self.phase.serves() {
            return;
        }
        if let Some(code) = refusal {
            crate::metrics::refused(code);
            self.send(Out::Msg(Msg::Refused {
                code,
                reason: reason.clone(),
            }));
        }
        self.apply(PhaseEvent::Abort(reason));
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
    ) -> Result<StateRecord, Refusal> {
        let rec = self.record(cid, down_recv, sum_from, down_sum, max_record)?;
        self.apply(PhaseEvent::LetGo);
        Ok(rec)
    }

    /// The record [`freeze`](Self::freeze) takes, with the connection left as it is.
    pub fn record(
        &self,
        cid: Cid,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
        max_record: usize,
    ) -> Result<StateRecord, Refusal> {
        let rec = self
            .s
            .record(cid, self.epoch, down_recv, sum_from, down_sum)?;
        let len = rec.encoded_len_bound();
        if let Err(e) = mtcp_proto::bounds::record_fits(len, max_record) {
            return Err(Refusal::too_large(format!(
                "the connection's state record is too large to move: {e}"
            )));
        }
        Ok(rec)
    }
}

/// A connection set up by a session, on its way to the application
/// ([`Server::accept`](crate::Server::accept) makes the [`Connection`](crate::Connection)).
pub(crate) struct Accepted {
    pub shared: Arc<Shared>,
    pub start: Start,
}

/// Shared between the application's [`Connection`](crate::Connection), the session tasks and the
/// server's table.
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
        crate::metrics::hinted(reason);
        if let Some(tx) = &*self.watch.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(Msg::WatchHint {
                cid: self.cid,
                reason,
            });
        }
    }
}

/// Replication bookkeeping of one connection at its server.
#[derive(Debug, Default)]
pub(crate) struct Repl {
    /// What the backups hold, and when the agent is told so and the keepers may forget
    /// (`mtcp_proto::commit`).
    pub commit: mtcp_proto::commit::Commit,
    pub busy: bool,
    pub retry_at: Option<Instant>,
    /// A deferred push is scheduled (see `eager`'s `PUSH_GAP`).
    pub deferred: bool,
    /// When the backups were last updated (refreshed well within their TTL).
    pub at: Option<Instant>,
    /// A taken-over connection's keepers, told they may forget the previous epoch when
    /// `commit` says so (decision 43).
    pub confirm: Option<Confirm>,
    /// Fenced: a destination took the connection over from a backup's replica of this epoch
    /// (the custody it would hand out, and since when). The connection is let go but its stream
    /// is kept for a while, so that this server can act as that destination's keeper
    /// (`eager::handover`'s `adopt_taken`, decision 48).
    pub taken: Option<(Custody, Instant)>,
}

/// Where a destination confirms, once its backups hold its new epoch, that the keepers of the
/// state it took may forget it: the origin it fetched from and the backups it claimed at.
#[derive(Debug, Default)]
pub(crate) struct Confirm {
    pub cid: Option<mtcp_proto::Cid>,
    /// The epoch the agent's MIGRATE named (the keepers' custody epoch).
    pub epoch: u64,
    pub to: Vec<ServerEntry>,
}

/// A time far enough back that a session starting now has had no data for any
/// [`mtcp_proto::trigger::linger`] (a minute; the heartbeat is at most 10 s): a new or moved
/// connection's session beats only once someone waits (input, unacknowledged or fresh data).
/// The agent's session starts expecting nothing too (`Liveness::new`), so the two seconds of
/// beats every session used to send from its start cost a drain of 9 000 idle connections ~20
/// frames per move each way for nothing.
pub(crate) fn long_ago() -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_sub(std::time::Duration::from_secs(60))
        .unwrap_or(now)
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
        let Refusal { code, reason: why } = st.freeze(cid, 0, 0, sum, 1 << 20).unwrap_err();
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
