//! The M-TCP agent: the client host's side of Migratory TCP.
//!
//! In forward mode it listens on a local port; each connection an unmodified client program
//! makes there is relayed over an M-TCP session to a server of the service. The agent retains
//! upstream bytes until a snapshot covers them, counts and checksums downstream bytes, watches
//! the session, and moves it to another server when a trigger fires.

pub mod admin;
mod channel;
pub mod dialer;
mod direct;
pub mod metrics;
pub mod policy;
mod relay;
mod spare;
pub mod transparent;
mod watch;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub use mtcp_proto::agent::MoveCause;
pub(crate) use mtcp_proto::agent::MoveReason;
pub use policy::{PolicyConfig, RttPolicyConfig};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Servers of the service, tried in order for new connections.
    pub connect: Vec<String>,
    /// Most upstream bytes retained per connection; beyond it the agent stops reading from the
    /// client program (backpressure, never loss).
    pub max_retained: u64,
    /// Connect timeout for a server.
    pub connect_timeout: Duration,
    /// How long a destination may take to answer MIGRATE (it may wait on the origin's lock).
    pub migrate_timeout: Duration,
    /// Transparent mode: accepted connections were redirected by nftables; their original
    /// destination is read and sent in HELLO, and the agent's own connections carry
    /// [`transparent::MARK`] so the redirect lets them through.
    pub transparent: bool,
    /// Trigger policies (throughput floor, RTT); all off by default.
    pub policy: PolicyConfig,
    /// Kernel fast path: hand each client connection itself to the server instead of relaying
    /// it (needs root; servers on this host; lazy clusters). See `direct`.
    pub fast_path: bool,
    /// TLS to every server, trusting the cluster's CA (`--tls-ca`): for clusters with `[tls]`.
    pub tls: Option<mtcp::tls::ClientTls>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            connect: Vec::new(),
            max_retained: 64 << 20,
            connect_timeout: Duration::from_secs(2),
            // Longer than a destination's worst case: peer set-up, plus the origin waiting out a
            // lock_state section (10 s by default).
            migrate_timeout: Duration::from_secs(30),
            transparent: false,
            policy: PolicyConfig::default(),
            fast_path: false,
            tls: None,
        }
    }
}

/// One migration as the agent saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationEvent {
    /// Milliseconds since the agent started.
    pub at_ms: u64,
    pub from: String,
    pub to: Option<String>,
    pub reason: String,
    pub ok: bool,
    /// From the trigger to RESUMED, microseconds.
    pub resumed_us: Option<u64>,
    /// From the trigger to the first downstream byte after RESUMED, microseconds.
    pub first_byte_us: Option<u64>,
    /// Size of the state record the destination received.
    pub state_bytes: Option<u64>,
    /// Why candidates refused, if any did.
    pub refusals: Vec<String>,
    /// When the trigger fired, on the machine's monotonic clock (CLOCK_MONOTONIC, µs), so
    /// another process can relate it to its own events (a benchmark's kill).
    #[serde(default)]
    pub trigger_mono_us: Option<u64>,
    /// Whether the destination took the state from a backup's replica (origin unreachable).
    #[serde(default)]
    pub from_replica: bool,
    /// What triggered the move (`reason` says it in words).
    #[serde(default)]
    pub cause: Option<MoveCause>,
}

/// Now on CLOCK_MONOTONIC, in microseconds (the clock `std::time::Instant` uses on Linux).
pub fn mono_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Most migrations a connection's status keeps in its timeline.
pub const MAX_TIMELINE: usize = 1024;

impl ConnStatus {
    /// The connection is open (not ended, in order or not).
    pub fn is_live(&self) -> bool {
        self.state == "live"
    }

    /// The connection ended in order.
    pub fn is_closed(&self) -> bool {
        self.state == "closed"
    }

    /// Why the agent gave the connection up, if it did.
    pub fn aborted(&self) -> Option<&str> {
        self.state.strip_prefix("aborted: ")
    }

    /// A connection just opened (or handed over) on `server` at `epoch`.
    pub(crate) fn live(cid: String, server: String, epoch: u64, fast_path: bool) -> Self {
        ConnStatus {
            cid,
            server,
            epoch,
            migrations: 0,
            bytes_up: 0,
            bytes_down: 0,
            state: "live".into(),
            timeline: Vec::new(),
            timeline_dropped: 0,
            rtt_ms: Default::default(),
            fast_path,
            retained: 0,
        }
    }

    /// Appends `ev` to the timeline, dropping the oldest beyond [`MAX_TIMELINE`]; returns the
    /// event's absolute index (see [`ConnStatus::event_mut`]).
    pub(crate) fn record(&mut self, ev: MigrationEvent) -> u64 {
        self.timeline.push(ev);
        if self.timeline.len() > MAX_TIMELINE {
            let over = self.timeline.len() - MAX_TIMELINE;
            self.timeline.drain(..over);
            self.timeline_dropped += over as u64;
        }
        self.timeline_dropped + self.timeline.len() as u64 - 1
    }

    /// The event at absolute index `abs`, if still kept.
    pub(crate) fn event_mut(&mut self, abs: u64) -> Option<&mut MigrationEvent> {
        let i = abs.checked_sub(self.timeline_dropped)?;
        self.timeline.get_mut(usize::try_from(i).ok()?)
    }
}

/// What `mtcp status` shows of one connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnStatus {
    pub cid: String,
    pub server: String,
    pub epoch: u64,
    pub migrations: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `live`, `closed` (ended in order) or `aborted: <why>`; read it with
    /// [`ConnStatus::is_live`], [`ConnStatus::is_closed`] and [`ConnStatus::aborted`].
    pub state: String,
    /// The newest [`MAX_TIMELINE`] migrations (older ones are counted in `timeline_dropped`).
    pub timeline: Vec<MigrationEvent>,
    /// Migrations dropped from the front of `timeline`.
    #[serde(default)]
    pub timeline_dropped: u64,
    /// RTT policy: the smoothed RTT of each server of the service, ms (from probes).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rtt_ms: std::collections::BTreeMap<String, f64>,
    /// Kernel fast path: the server serves the client's connection itself; the bytes counts are
    /// the server's at its last restart point (SNAP), and the total at the end.
    #[serde(default)]
    pub fast_path: bool,
    /// Upstream bytes the agent keeps to replay after a move (not yet covered by a restart
    /// point the server announced, or in eager mode one a backup holds).
    #[serde(default)]
    pub retained: u64,
}

/// Why a requested move did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotMoved {
    /// The connection ended before it could move (its client closed): nothing to move, and
    /// not a failure of the move.
    #[error("connection ended")]
    Ended,
    /// The move failed; the connection stays where it was, or was lost (the text says).
    #[error("{0}")]
    Failed(String),
}

/// A requested move's outcome: the server the connection is on now, or why not.
pub type MoveOutcome = Result<String, NotMoved>;

/// A request to move a connection.
#[derive(Debug)]
pub(crate) struct MoveRequest {
    pub to: Option<String>,
    pub reason: MoveReason,
    pub done: Option<oneshot::Sender<MoveOutcome>>,
    /// When the request arrived: the trigger time migration latency is measured from.
    pub at: Instant,
}

pub(crate) struct ConnEntry {
    pub status: Arc<Mutex<ConnStatus>>,
    pub cmd: mpsc::UnboundedSender<MoveRequest>,
}

pub(crate) struct AgentInner {
    pub cfg: AgentConfig,
    /// How sessions, spares, watches and probes connect (socket mark, TLS).
    pub dialer: dialer::Dialer,
    pub started: Instant,
    pub conns: Mutex<HashMap<u64, ConnEntry>>,
    next: AtomicU64,
    /// Finished connections, newest last (bounded), so status can show completed transfers.
    pub finished: Mutex<Vec<ConnStatus>>,
    /// RTT policy: measures the RTT to every server (agent-wide).
    pub prober: Option<Arc<policy::Prober>>,
    /// Connections opened ahead of time to every known server (faster migrations).
    pub spares: Arc<spare::Spares>,
    /// Kernel fast path: this process's nftables fence table, opened on first use.
    fences: mtcp_repair::LazyFences,
    /// Relayed connections moving at once (see [`MAX_CONCURRENT_MOVES`]).
    pub moves: tokio::sync::Semaphore,
    /// Connections between a move's trigger and its outcome (waiting for a turn included).
    pub moving: std::sync::atomic::AtomicUsize,
    /// Client connections accepted and not yet ended (what the descriptor budget counts).
    live: AtomicUsize,
    /// Eager mode: one watch connection per server.
    pub watches: watch::Watches,
}

/// Counts a client connection as live until dropped (at the end of its task).
struct Live(Arc<AgentInner>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The soft limit on open files (after `mtcp agent` raised it), or `None` if unknown.
fn open_files_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    usize::try_from(lim.rlim_cur).ok()
}

/// At most this many relayed connections move at once. A drain hints every connection of a
/// server in one go: 9 000 simultaneous MIGRATEs overflowed the destinations' accept queues on
/// a 2-core machine, candidates timed out and connections were lost (issue 13); in batches of
/// 64 the same drain completes (in 15 s; with 512 at once it took 34 s, the destinations still
/// timing out).
pub const MAX_CONCURRENT_MOVES: usize = 64;

impl MigrationEvent {
    /// A move triggered at `t0` (an agent started at `started`), not yet successful.
    pub(crate) fn new(started: Instant, t0: Instant, from: String, reason: &MoveReason) -> Self {
        MigrationEvent {
            at_ms: t0.duration_since(started).as_millis() as u64,
            from,
            to: None,
            reason: reason.text.clone(),
            cause: Some(reason.cause),
            ok: false,
            resumed_us: None,
            first_byte_us: None,
            state_bytes: None,
            refusals: Vec::new(),
            trigger_mono_us: Some(mono_us().saturating_sub(t0.elapsed().as_micros() as u64)),
            from_replica: false,
        }
    }
}

impl AgentInner {
    /// Makes connection `id` visible to `status` and `migrate`.
    pub(crate) fn register(
        &self,
        id: u64,
        status: Arc<Mutex<ConnStatus>>,
        cmd: mpsc::UnboundedSender<MoveRequest>,
    ) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, ConnEntry { status, cmd });
    }

    /// Connection `id` ended (`Err`: why it was given up): its last status moves to the
    /// finished ones (the newest 64 are kept).
    pub(crate) fn retire(&self, id: u64, status: &Mutex<ConnStatus>, outcome: &Result<(), String>) {
        let final_status = {
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            st.state = match outcome {
                Ok(()) => "closed".into(),
                Err(e) => format!("aborted: {e}"),
            };
            st.clone()
        };
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let mut f = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        f.push(final_status);
        if f.len() > 64 {
            f.remove(0);
        }
    }

    /// The fast path's fences (the table is created on first use).
    pub(crate) fn fences(&self) -> Result<Arc<mtcp_repair::Fences>, String> {
        self.fences.get().map_err(|e| format!("fences: {e}"))
    }
}

/// A running agent.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<AgentInner>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Self {
        let dialer = dialer::Dialer {
            mark: cfg.transparent,
            tls: cfg.tls.clone(),
            paths: Default::default(),
        };
        let prober = cfg.policy.rtt.map(|r| {
            Arc::new(policy::Prober::new(
                r.probe_every,
                cfg.connect_timeout,
                dialer.clone(),
            ))
        });
        Agent {
            inner: Arc::new(AgentInner {
                prober,
                dialer,
                cfg,
                started: Instant::now(),
                conns: Mutex::new(HashMap::new()),
                next: AtomicU64::new(1),
                finished: Mutex::new(Vec::new()),
                spares: Arc::new(spare::Spares::default()),
                fences: Default::default(),
                moves: tokio::sync::Semaphore::new(MAX_CONCURRENT_MOVES),
                watches: Default::default(),
                live: AtomicUsize::new(0),
                moving: Default::default(),
            }),
        }
    }

    /// Relays every connection accepted on `listener` (forward mode, or transparent mode when
    /// configured). Runs until dropped.
    pub async fn serve(&self, listener: TcpListener) {
        let spares = &self.inner.spares;
        spares.want(self.inner.cfg.connect.iter().map(String::as_str));
        tokio::spawn(spare::Spares::keep(
            Arc::downgrade(spares),
            self.inner.dialer.clone(),
        ));
        // Each relayed connection holds its client socket and a session; a fast-path one only
        // its session. What is kept aside covers the rest and a second session per move.
        let per_conn = if self.inner.cfg.fast_path { 1 } else { 2 };
        let reserve = mtcp_proto::bounds::AGENT_FD_BASE + MAX_CONCURRENT_MOVES;
        let limit = open_files_limit();
        let mut refusals = mtcp_proto::bounds::LogBudget::new(Duration::from_secs(1), 5);
        loop {
            match listener.accept().await {
                Ok((client, from)) => {
                    let live = self.inner.live.load(Ordering::Relaxed);
                    if let Some(limit) = limit.filter(|&l| {
                        !mtcp_proto::bounds::admits_connection(live, per_conn, reserve, l)
                    }) {
                        if let Some(suppressed) = refusals.admit(Instant::now()) {
                            tracing::warn!(
                                client = %from,
                                live,
                                limit,
                                suppressed,
                                "refusing a new client: the open-files limit ({limit}) leaves no room for another connection ({live} open, {per_conn} descriptor(s) each, {reserve} kept for moves and the agent itself)"
                            );
                        }
                        drop(client);
                        continue;
                    }
                    self.inner.live.fetch_add(1, Ordering::Relaxed);
                    let live = Live(self.inner.clone());
                    let _ = client.set_nodelay(true);
                    let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
                    let orig_dst = if self.inner.cfg.transparent {
                        transparent::original_dst(&client).map(|a| a.to_string())
                    } else {
                        None
                    };
                    let inner = self.inner.clone();
                    if self.inner.cfg.fast_path {
                        tokio::spawn(async move {
                            direct::direct(inner, id, client).await;
                            drop(live);
                        });
                    } else {
                        tokio::spawn(async move {
                            relay::relay(inner, id, client, orig_dst).await;
                            drop(live);
                        });
                    }
                }
                Err(e) => {
                    // Out of descriptors (or another transient failure): the client waits in
                    // the listen queue until one is free.
                    if let Some(suppressed) = refusals.admit(Instant::now()) {
                        tracing::warn!(suppressed, "accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Removes the fast path's fence table (the agent is exiting). Fences still held by
    /// connections keep it until they drop.
    pub fn close(&self) {
        self.inner.fences.close();
    }

    /// What publishes this agent's levels to the metrics endpoint (holds no reference that
    /// keeps the agent alive).
    pub fn metrics(&self) -> crate::metrics::AgentSampler {
        crate::metrics::AgentSampler(Arc::downgrade(&self.inner))
    }

    /// How many connections are live.
    pub fn live_count(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Every live connection, then recently finished ones.
    pub fn status(&self) -> Vec<ConnStatus> {
        let mut v: Vec<ConnStatus> = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        v.extend(
            self.inner
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        v
    }

    /// Moves connection `cid` (or every live one when `None`) and waits for the outcome of each.
    pub async fn migrate(
        &self,
        cid: Option<&str>,
        to: Option<String>,
    ) -> Vec<(String, MoveOutcome)> {
        let mut waits = Vec::new();
        {
            let conns = self.inner.conns.lock().unwrap_or_else(|p| p.into_inner());
            for e in conns.values() {
                let c = e
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .cid
                    .clone();
                if cid.is_some_and(|x| x != c) {
                    continue;
                }
                let (tx, rx) = oneshot::channel();
                let req = MoveRequest {
                    to: to.clone(),
                    reason: MoveReason::new(MoveCause::Manual, "manual"),
                    done: Some(tx),
                    at: Instant::now(),
                };
                if e.cmd.send(req).is_ok() {
                    waits.push((c, rx));
                }
            }
        }
        let mut out = Vec::new();
        for (c, rx) in waits {
            let r = match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(NotMoved::Ended),
                Err(_) => Err(NotMoved::Failed("timed out".into())),
            };
            out.push((c, r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_keeps_the_newest_events_and_counts_the_rest() {
        let t0 = std::time::Instant::now();
        let mut st = ConnStatus::live(String::new(), String::new(), 0, false);
        let mut last = 0;
        for i in 0..MAX_TIMELINE + 10 {
            last = st.record(MigrationEvent::new(
                t0,
                t0,
                format!("s{i}"),
                &MoveReason::new(MoveCause::Manual, "manual"),
            ));
            assert_eq!(last, i as u64);
        }
        assert_eq!(st.timeline.len(), MAX_TIMELINE);
        assert_eq!(st.timeline_dropped, 10);
        assert_eq!(st.timeline[0].from, "s10");
        // Absolute indices still find the newest event, and not a dropped one.
        assert_eq!(
            st.event_mut(last).map(|e| e.from.clone()),
            Some(format!("s{}", MAX_TIMELINE + 9))
        );
        assert!(st.event_mut(3).is_none());
    }

    #[test]
    fn a_status_says_whether_its_connection_is_live_closed_or_aborted_and_why() {
        let mut st = ConnStatus::live("c".into(), "s1".into(), 1, false);
        assert!(st.is_live() && !st.is_closed() && st.aborted().is_none());
        st.state = "closed".into();
        assert!(!st.is_live() && st.is_closed() && st.aborted().is_none());
        st.state = "aborted: migration failed: no server to move to".into();
        assert!(!st.is_live() && !st.is_closed());
        assert_eq!(st.aborted(), Some("migration failed: no server to move to"));
    }
}
