//! What a fast-path connection's state holds (see `direct`): the running pump's handle, the
//! output the application's own socket calls and the pump share, and a pump's parts (a
//! stopped pump resumes with them if a freeze fails).

use crate::framed::Out;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
/// Largest encoded TCP state accepted (both queues at their limit, plus the fields).
pub(crate) const MAX_TCP_STATE: usize = 2 * mtcp_repair::MAX_QUEUE + 4096;

/// A running pump, as the connection's state holds it.
pub(crate) struct DirectHandle {
    /// The client's socket, for the application's own reads and writes (used only under the
    /// connection's lock; the handle is taken out before the pump stops).
    pub sock: Arc<TcpStream>,
    /// Asks the pump to stop and hand the socket back (a migration).
    pub(crate) stop: Arc<Notify>,
    /// Asks the pump to send a window probe (the agent's fence is down).
    pub(crate) kick: Arc<Notify>,
    pub(crate) task: JoinHandle<Option<Pump>>,
}

impl DirectHandle {
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Stops the pump. `None`: it had already ended (the connection is over).
    pub async fn stop(self) -> Option<Pump> {
        let DirectHandle {
            sock, stop, task, ..
        } = self;
        drop(sock);
        stop.notify_one();
        task.await.ok().flatten()
    }
}

/// What the application's calls and the pump share about a fast-path connection's socket
/// (in the connection's state, under its lock).
#[derive(Default)]
pub(crate) struct FastOut {
    /// Downstream offset of the next byte handed to the socket.
    pub written: u64,
    /// `written` when the output log was last trimmed (see `direct`'s `TRIM_EVERY`).
    pub trimmed: u64,
    /// Output waits for KICK (see [`Queues::held`]): nothing is written inline meanwhile.
    pub held: bool,
    /// The application's read found the client's connection failed: the pump ends it.
    pub failed: Option<io::Error>,
    /// Wakes the pump for `failed`.
    pub pump_waker: Option<Waker>,
    /// When a SNAP was last passed on to the agent (see [`SNAP_EVERY`]).
    pub snap_sent: Option<Instant>,
}

impl FastOut {
    /// A socket that continues the downstream stream at `written`.
    pub fn at(written: u64) -> Self {
        FastOut {
            written,
            trimmed: written,
            ..Default::default()
        }
    }

    /// Whether a SNAP should go to the agent now (at most one per [`SNAP_EVERY`]).
    pub fn snap_due(&mut self) -> bool {
        let due = self.snap_sent.is_none_or(|t| t.elapsed() >= SNAP_EVERY);
        if due {
            self.snap_sent = Some(Instant::now());
        }
        due
    }
}

/// Moves bytes between a fast-path connection's state and the client's socket.
pub(crate) struct Pump {
    pub(crate) sock: Arc<TcpStream>,
    pub(crate) q: Queues,
}

/// A pump's state apart from its socket: what a stopped pump resumes with if a freeze fails
/// (see [`Pump::into_parts`]).
pub(crate) struct Queues {
    /// What the application queued (data, CLOSED) and control messages for the agent.
    pub(crate) rx: mpsc::UnboundedReceiver<Out>,
    pub(crate) rx_open: bool,
    /// Data and CLOSED, in order, behind `cur`.
    pub(crate) pending: VecDeque<Out>,
    pub(crate) cur: Option<Bytes>,
    /// Control messages to the agent (the session's writer).
    pub(crate) ctl: Option<mpsc::UnboundedSender<Out>>,
    pub(crate) eof: bool,
    /// Until when output waits for KICK. The agent fences the client's flow while the
    /// connection has no socket; output sent before the fence is down would be answered by ACKs
    /// the fence drops, and the sender would then stall until its retransmission timer (200 ms
    /// and more) — measured: a 512 MiB download at a third of its speed.
    pub(crate) held: Option<tokio::time::Instant>,
    /// The socket never stopped existing (handed over, or a failed freeze): KICK sends no
    /// window probe.
    pub(crate) live: bool,
}

/// The agent only shows SNAP's offsets in its status, so at most one per this interval is
/// passed on (the HTTP app snapshots every 256 KiB: thousands per second at full speed, and the
/// PostgreSQL front-end at every transaction; each is a wake-up of the agent, and since the
/// fast path's sessions carry no heartbeats, decision 69, SNAPs are all its traffic).
pub(crate) const SNAP_EVERY: Duration = Duration::from_secs(1);
