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
use mtcp_proto::offsets::{ByteLog, ReplayVerifier};
use mtcp_proto::sum::checksum;
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::{Cid, StateRecord};
use std::collections::VecDeque;
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
}

impl From<StateError> for io::Error {
    fn from(e: StateError) -> io::Error {
        let kind = match e {
            StateError::Migrated => io::ErrorKind::ConnectionAborted,
            StateError::Closed => io::ErrorKind::BrokenPipe,
            StateError::Aborted(_) => io::ErrorKind::ConnectionReset,
            StateError::TooLarge { .. } => io::ErrorKind::InvalidInput,
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

/// One restart point.
#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub state: Option<Bytes>,
    pub in_off: u64,
    pub out_off: u64,
}

/// Most restart points kept per connection.
const MAX_SNAPS: usize = 512;

pub(crate) struct ConnState {
    pub epoch: u64,
    pub phase: Phase,
    /// Upstream `[snap_in, up_recv)`: the input log, then unread input.
    pub input: ByteLog,
    pub in_off: u64,
    pub up_fin: Option<u64>,
    /// Downstream `[out_start, out_off)`.
    pub out: ByteLog,
    pub acked: u64,
    pub agent_sum_from: u64,
    /// Highest downstream offset the agent may report (the client's position at resume).
    pub down_high: u64,
    pub migratable: bool,
    pub verifier: Option<ReplayVerifier>,
    /// Restart points, oldest first; never empty (a new connection starts with the implicit
    /// empty one at offsets 0). Older ones are kept while the client has not yet received
    /// everything up to a newer one, so a restart needs no output the client lacks.
    pub snaps: VecDeque<Snap>,
    pub locked: bool,
    pub tx: Option<mpsc::UnboundedSender<Out>>,
    pub queued: u64,
    pub detached_at: Option<Instant>,
    pub read_waker: Option<Waker>,
    pub write_waker: Option<Waker>,
    pub migrations: u64,
}

impl ConnState {
    /// A live connection restarting at `start`, with `input` from `start.in_off`, `out` ending at
    /// `start.out_off`, and a client holding `down` downstream bytes.
    fn at(
        epoch: u64,
        start: Snap,
        input: ByteLog,
        out: ByteLog,
        down: u64,
        tx: mpsc::UnboundedSender<Out>,
    ) -> Self {
        ConnState {
            epoch,
            phase: Phase::Live,
            in_off: start.in_off,
            input,
            up_fin: None,
            out,
            acked: down,
            agent_sum_from: down,
            down_high: down,
            migratable: true,
            verifier: None,
            snaps: VecDeque::from([start]),
            locked: false,
            tx: Some(tx),
            queued: 0,
            detached_at: None,
            read_waker: None,
            write_waker: None,
            migrations: 0,
        }
    }

    pub fn out_off(&self) -> u64 {
        self.out.end()
    }

    fn ensure_live(&self) -> Result<(), StateError> {
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
            m => {
                if let Some(tx) = &self.tx {
                    let _ = tx.send(m);
                }
            }
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

    /// Forgets restart points, input and output no restart can need any more.
    pub fn trim(&mut self) {
        while self.snaps.len() >= 2 && self.snaps[1].out_off <= self.acked {
            self.snaps.pop_front();
        }
        let first = &self.snaps[0];
        let (in_keep, out_keep) = (
            first.in_off,
            self.acked.min(self.agent_sum_from).min(first.out_off),
        );
        self.input.trim_to(in_keep);
        if self.migratable {
            self.out.trim_to(out_keep);
        }
    }

    /// The agent reported downstream progress.
    pub fn on_ack(&mut self, down_recv: u64, sum_from: u64) {
        let high = self.out_off().max(self.down_high);
        self.acked = self.acked.max(down_recv.min(high));
        self.agent_sum_from = self.agent_sum_from.max(sum_from.min(self.acked));
        self.trim();
    }

    /// Builds the state record for a client holding `down_recv` downstream bytes whose checksum
    /// from `sum_from` is `down_sum`, then freezes the connection: the application sees
    /// [`StateError::Migrated`] from its next call.
    pub fn freeze(
        &mut self,
        cid: Cid,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
    ) -> Result<StateRecord, (RefuseCode, String)> {
        let rec = self.record(cid, down_recv, sum_from, down_sum)?;
        self.phase = Phase::Migrated;
        self.tx = None;
        self.wake_all();
        Ok(rec)
    }

    fn record(
        &self,
        cid: Cid,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
    ) -> Result<StateRecord, (RefuseCode, String)> {
        let internal = |e: mtcp_proto::offsets::OffsetError| {
            (RefuseCode::Internal, format!("output log: {e}"))
        };
        let high = self.out_off().max(self.down_high);
        if down_recv > high || sum_from > down_recv {
            return Err((
                RefuseCode::Divergence,
                format!("agent claims downstream [{sum_from}, {down_recv}) but only {high} bytes were sent"),
            ));
        }
        // The client must hold exactly what was sent: compare the agent's checksum.
        let ours = if sum_from == down_recv {
            checksum(&[])
        } else {
            checksum(&self.out.copy_range(sum_from, down_recv).map_err(internal)?)
        };
        if ours != down_sum {
            return Err((
                RefuseCode::Divergence,
                format!("the client received different bytes in [{sum_from}, {down_recv}) than this server sent"),
            ));
        }
        let base = |s: &Snap,
                    tail: Bytes,
                    check_end: u64,
                    check_sum: u64|
         -> Result<StateRecord, (RefuseCode, String)> {
            Ok(StateRecord {
                cid,
                epoch: self.epoch,
                snapshot: s.state.clone(),
                snap_in: s.in_off,
                snap_out: s.out_off,
                input: self
                    .input
                    .copy_range(s.in_off, self.input.end())
                    .map_err(internal)?,
                up_fin: self.up_fin,
                tail,
                check_end,
                check_sum,
            })
        };
        if let Some(v) = &self.verifier {
            // Still replaying what the client had at the last move: hand the same check on.
            let (from, end, sum) = v.expected();
            if down_recv != end {
                return Err((
                    RefuseCode::Internal,
                    format!("client at {down_recv} while replay expects {end}"),
                ));
            }
            let s = self
                .snaps
                .iter()
                .find(|s| s.out_off == from)
                .unwrap_or(&self.snaps[0]);
            return base(s, Bytes::new(), end, sum);
        }
        // The newest restart point the client has everything up to, else the oldest one.
        let s = self
            .snaps
            .iter()
            .rev()
            .find(|s| s.out_off <= down_recv)
            .unwrap_or(&self.snaps[0]);
        if down_recv < s.out_off {
            let tail = self
                .out
                .copy_range(down_recv, s.out_off)
                .map_err(internal)?;
            base(s, tail, s.out_off, checksum(&[]))
        } else {
            let sum = checksum(
                &self
                    .out
                    .copy_range(s.out_off, down_recv)
                    .map_err(internal)?,
            );
            base(s, Bytes::new(), down_recv, sum)
        }
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
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// State for a brand-new connection.
    pub fn new_conn(cid: Cid, tx: mpsc::UnboundedSender<Out>) -> Arc<Self> {
        let start = Snap {
            state: None,
            in_off: 0,
            out_off: 0,
        };
        Self::with_state(
            cid,
            ConnState::at(0, start, ByteLog::new(0), ByteLog::new(0), 0, tx),
        )
    }

    /// State for a connection restarting from `rec` at `epoch`.
    pub fn from_record(rec: StateRecord, epoch: u64, tx: mpsc::UnboundedSender<Out>) -> Arc<Self> {
        let down = rec.client_down();
        let verifier = ReplayVerifier::new(rec.snap_out, rec.check_end, rec.check_sum);
        let mut out = ByteLog::new(rec.snap_out - rec.tail.len() as u64);
        out.push(rec.tail.clone());
        let mut input = ByteLog::new(rec.snap_in);
        input.push(rec.input.clone());
        let start = Snap {
            state: rec.snapshot.clone(),
            in_off: rec.snap_in,
            out_off: rec.snap_out,
        };
        let mut st = ConnState::at(epoch, start, input, out, down, tx);
        st.up_fin = rec.up_fin;
        st.verifier = (!verifier.done()).then_some(verifier);
        if !rec.tail.is_empty() {
            st.send(Out::Data(rec.tail.clone()));
        }
        Self::with_state(rec.cid, st)
    }

    fn with_state(cid: Cid, st: ConnState) -> Arc<Self> {
        Arc::new(Self {
            cid,
            st: Mutex::new(st),
            unlocked: Notify::new(),
            consumed: Notify::new(),
        })
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

    /// `set_state`: exports a restart point. `snapshot` must describe the application's state
    /// given exactly the bytes it has read from and written to this connection so far.
    pub fn set_state(&self, snapshot: impl Into<Bytes>) -> Result<(), StateError> {
        let snapshot = snapshot.into();
        let max = self.server.limits.max_snapshot;
        if snapshot.len() > max {
            return Err(StateError::TooLarge {
                len: snapshot.len(),
                max,
            });
        }
        let mut st = self.shared.lock();
        st.ensure_live()?;
        if st.verifier.is_some() {
            // Still regenerating output the client already has: the restart point this
            // connection came with stays the one to use until that output is checked.
            return Ok(());
        }
        let (in_off, out_off) = (st.in_off, st.out_off());
        if !st.migratable {
            // The output log no longer reaches the older restart points: only this one is valid.
            st.snaps.clear();
        } else if st.snaps.len() >= MAX_SNAPS {
            st.snaps.pop_front();
        }
        st.snaps.push_back(Snap {
            state: Some(snapshot),
            in_off,
            out_off,
        });
        st.migratable = true;
        st.trim();
        // Lazy mode: stored here, so the snapshot is safe as soon as it is taken.
        st.send(Out::Msg(Msg::Snap { in_off, out_off }));
        Ok(())
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

    /// Bytes read and written so far (upstream, downstream offsets).
    pub fn offsets(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.in_off, st.out_off())
    }

    fn close_by_app(&self) {
        let mut st = self.shared.lock();
        if st.phase != Phase::Live {
            return;
        }
        let down_total = st.out_off();
        st.phase = Phase::AppClosed;
        st.send(Out::Msg(Msg::Closed { down_total }));
        let done = st.acked >= down_total;
        if done {
            // Nothing left to deliver: end the session (the writer flushes CLOSED, then stops).
            st.phase = Phase::Closed;
            st.tx = None;
        }
        drop(st);
        if done {
            self.server.forget(self.shared.cid);
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
        let off = st.in_off;
        let n = st.input.read_at(off, buf.initialize_unfilled());
        if n > 0 {
            buf.advance(n);
            st.in_off += n as u64;
            drop(st);
            self.shared.consumed.notify_one();
            return Poll::Ready(Ok(()));
        }
        if st.up_fin == Some(off) {
            return Poll::Ready(Ok(()));
        }
        st.read_waker = Some(cx.waker().clone());
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
        let n = data.len().min(MAX_WRITE);
        let chunk = Bytes::copy_from_slice(&data[..n]);
        let to_send = match st.verifier.as_mut() {
            None => chunk.clone(),
            Some(v) => match v.on_write(chunk.clone()) {
                Ok(s) => s,
                Err(d) => {
                    let reason = d.to_string();
                    tracing::error!(cid = %self.shared.cid, "{reason}; aborting the connection");
                    st.phase = Phase::Aborted(reason.clone());
                    st.send(Out::Msg(Msg::Refused {
                        code: RefuseCode::Divergence,
                        reason: reason.clone(),
                    }));
                    st.tx = None;
                    drop(st);
                    self.server.forget(self.shared.cid);
                    return Poll::Ready(Err(StateError::Aborted(reason).into()));
                }
            },
        };
        if st.verifier.as_ref().is_some_and(|v| v.done()) {
            st.verifier = None;
        }
        st.out.push(chunk);
        if st.out.len() > self.server.limits.max_output_log && st.migratable {
            tracing::warn!(
                cid = %self.shared.cid,
                "application wrote over {} bytes since its last snapshot; connection not migratable until the next one",
                self.server.limits.max_output_log
            );
            st.migratable = false;
        }
        if !st.migratable {
            let acked = st.acked;
            st.out.trim_to(acked);
            let keep = st.snaps.len() - 1;
            st.snaps.drain(..keep);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mtcp_proto::sum::checksum;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the snapshots, acknowledgements and client position, the record an origin
        /// builds lets a deterministic application restarted elsewhere continue the client's
        /// stream exactly: tail first, then regenerated bytes past what the client has, the
        /// regenerated bytes it already has checked.
        #[test]
        fn record_and_replay_continue_the_stream_exactly(
            len in 1usize..20_000,
            chunk in 1usize..3000,
            snaps in proptest::collection::btree_set(1usize..20_000, 0..12),
            acks in proptest::collection::btree_set(1usize..20_000, 0..6),
            recv in 0usize..20_000,
            rchunk in 1usize..3000,
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let (tx, _rx) = mpsc::unbounded_channel();
            let shared = Shared::new_conn(Cid([1; 16]), tx);
            let mut st = shared.lock();
            // The agent's checksum restarts at the newest snapshot it has all bytes up to.
            let agent_sum_from = |d: usize| snaps.iter().copied().filter(|&s| s <= d && s < len).max().unwrap_or(0) as u64;
            let recv = recv % (len + 1);
            let mut pos = 0;
            let mut taken = 0;
            while pos < len {
                // Writes end at snapshot points, as in a real application.
                let next_snap = snaps.range(pos + 1..).next().copied().unwrap_or(usize::MAX);
                let e = (pos + chunk).min(len).min(next_snap);
                st.out.push(Bytes::copy_from_slice(&data[pos..e]));
                pos = e;
                if snaps.contains(&pos) && pos < len {
                    st.snaps.push_back(Snap { state: Some(Bytes::from(pos.to_string())), in_off: 0, out_off: pos as u64 });
                    st.trim();
                    taken += 1;
                }
                for &a in acks.range(..=pos.min(recv)) {
                    st.on_ack(a as u64, agent_sum_from(a));
                }
            }
            prop_assert_eq!(taken, snaps.iter().filter(|&&s| s < len).count());
            let sf = agent_sum_from(recv).min(recv as u64);
            let rec = st.record(Cid([1; 16]), recv as u64, sf, checksum(&data[sf as usize..recv])).unwrap();
            // The destination: the client has `recv` bytes; restart at the snapshot.
            let restart = match &rec.snapshot {
                None => 0,
                Some(b) => std::str::from_utf8(b).unwrap().parse::<usize>().unwrap(),
            };
            prop_assert_eq!(restart as u64, rec.snap_out);
            prop_assert_eq!(rec.client_down(), recv as u64);
            let mut client = data[..recv].to_vec();
            client.extend_from_slice(&rec.tail);
            let mut v = ReplayVerifier::new(rec.snap_out, rec.check_end, rec.check_sum);
            let mut p = restart;
            while p < len {
                let e = (p + rchunk).min(len);
                client.extend_from_slice(&v.on_write(Bytes::copy_from_slice(&data[p..e])).unwrap());
                p = e;
            }
            prop_assert_eq!(client, data);
        }
    }

    #[test]
    fn a_wrong_client_checksum_is_refused() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let shared = Shared::new_conn(Cid([1; 16]), tx);
        let mut st = shared.lock();
        st.out.push(Bytes::from_static(b"hello world"));
        let e = st
            .record(Cid([1; 16]), 11, 0, checksum(b"hello_world"))
            .unwrap_err();
        assert_eq!(e.0, RefuseCode::Divergence);
        assert!(
            st.record(Cid([1; 16]), 12, 0, 0).is_err(),
            "client ahead of what was sent"
        );
        assert!(st
            .record(Cid([1; 16]), 11, 0, checksum(b"hello world"))
            .is_ok());
    }
}
