//! The server side of the runtime: the data port where agents open and migrate sessions, the
//! session tasks that move frames between a socket and a connection's state, and the janitor
//! that forgets connections whose agent is gone.

use crate::accept::{self, Port};
use crate::config::{Cluster, ConfigError, Limits};
use crate::conn::{Connection, Phase, Shared, Start};
use crate::eager::Confirm;
use crate::framed::{self, ChannelError, FrameReader, Out};
use crate::metrics::SessionKind;
use crate::peer;
use crate::stream::{ReadHalf, Stream, WriteHalf};
use mtcp_proto::wire::{
    self, Frame, HintReason, Migrate, Msg, RefuseCode, Resumed, ServerStatus, Welcome,
};
use mtcp_proto::{Cid, StateRecord};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What a destination asks of the origin.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fetch {
    pub cid: Cid,
    pub epoch: u64,
    pub down_recv: u64,
    pub sum_from: u64,
    pub down_sum: u64,
}

/// The refusal of a token that does not match: it names nothing of the connection (a
/// refusal to an unauthenticated party echoes no positions or epochs, issue 14).
pub(crate) const BAD_TOKEN: &str = "the token does not match the connection and epoch named";

/// Limit on the first message of a session, before the peer is known.
const SETUP_FRAME: usize = 64 << 10;
/// Limit on ADOPT (the client's connection, with what it had queued when the agent accepted
/// it): larger states are refused, and the agent resets that client connection.
const ADOPT_FRAME: usize = mtcp_proto::adopt::MAX_ADOPT_QUEUE + (64 << 10);
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two BACKLOG reports of a session.
const BACKLOG_EVERY: Duration = Duration::from_millis(200);
/// How often the overload policy looks at the connections.
const OVERLOAD_EVERY: Duration = Duration::from_millis(100);
/// Probe connections: closed after this long without a probe, or when probes come faster than
/// one per `PROBE_MIN_GAP`; at most `MAX_PROBE_CONNS` at once per process.
const PROBE_IDLE: Duration = Duration::from_secs(10);
const PROBE_MIN_GAP: Duration = Duration::from_millis(250);
const MAX_PROBE_CONNS: usize = 4096;
static PROBE_CONNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// How long a connection that ended in order is remembered (see `closed_in_order`).
const CLOSED_MEMORY: Duration = Duration::from_secs(60);

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} address {addr}: {err}")]
    Listen {
        what: &'static str,
        addr: String,
        err: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

pub(crate) struct ServerInner {
    pub id: String,
    pub cluster: Cluster,
    /// TLS on every port and to every peer, when the cluster file has `[tls]` (decision 45).
    pub tls: Option<crate::tls::ServerTls>,
    pub limits: Limits,
    pub conns: Mutex<HashMap<Cid, Arc<Shared>>>,
    pub draining: AtomicBool,
    pub migrated_in: AtomicU64,
    pub migrated_out: AtomicU64,
    /// About how many detached connections that never carried data are kept (counted up at
    /// each such detach, set exactly by each sweep; see [`sweep_detached`]).
    pub(crate) empty_detached: std::sync::atomic::AtomicUsize,
    /// Sessions open on the data port (see [`crate::admission`]).
    pub(crate) sessions: crate::admission::Sessions,
    /// Connections being handed over on the peer port: frozen and forgotten here, but their
    /// state not yet acknowledged by the destination's kernel. Counted as connections, so a
    /// drain does not report "none left" while a state record is still on its way.
    pub handing_over: std::sync::atomic::AtomicU32,
    /// Takeovers running (`Limits::max_takeovers`).
    pub(crate) takeovers: crate::slots::Slots,
    /// Hand-overs (FETCHes served) running (`Limits::max_handovers`).
    pub(crate) handovers: crate::slots::Slots,
    pub peer_pool: peer::PeerPool,
    /// Eager mode: replicas of other servers' connections held here.
    pub replicas: crate::replica::ReplicaStore,
    /// Eager mode: connections handed over alive, kept until their destination confirms.
    pub(crate) custody: crate::custody::CustodyStore,
    /// Eager mode: per taken-over (cid, epoch), RESUMED, the agent's first frame or a yield.
    pub(crate) gates: crate::gate::Gates,
    /// Connections that ended in order lately: epoch and when (see `closed_in_order`).
    pub closed: Mutex<HashMap<Cid, (u64, Instant)>>,
    accept_tx: mpsc::UnboundedSender<Connection>,
}

impl ServerInner {
    pub fn forget(&self, cid: Cid) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cid);
    }

    /// The connection ended in order at `epoch`: forget it, but remember for a while that it
    /// did, so a migration the agent requests just before it sees the end is answered `Closed`
    /// (the agent has every byte) rather than "unknown connection".
    pub fn closed_in_order(self: &Arc<Self>, cid: Cid, epoch: u64) {
        self.forget(cid);
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid, (epoch, Instant::now()));
        crate::eager::closed(self, cid, epoch);
    }

    pub(crate) fn get(&self, cid: &Cid) -> Option<Arc<Shared>> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cid)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Shared>> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn status(&self) -> ServerStatus {
        let mut conns = self.all();
        // A fenced connection kept only as its taker's keeper is not served here.
        conns.retain(|c| c.lock().repl.taken.is_none());
        let (mut detached, mut leaving) = (0u32, 0u32);
        for c in &conns {
            let st = c.lock();
            if st.detached_at.is_some() {
                if st.leaving {
                    leaving += 1;
                } else {
                    detached += 1;
                }
            }
        }
        ServerStatus {
            id: self.id.clone(),
            connections: conns.len() as u32 - detached - leaving
                + self.handing_over.load(Ordering::Relaxed),
            detached,
            leaving,
            draining: self.draining.load(Ordering::Relaxed),
            migrated_in: self.migrated_in.load(Ordering::Relaxed),
            migrated_out: self.migrated_out.load(Ordering::Relaxed),
            replicas_held: self.replicas.usage().0 as u32,
        }
    }

    /// Hints every live connection away (drain).
    pub fn hint_all(&self, reason: HintReason) {
        for c in self.all() {
            let mut st = c.lock();
            if st.phase == Phase::Live {
                c.hint(&mut st, reason);
            }
        }
    }

    /// Hints again the live connections not hinted for [`mtcp_proto::timing::REHINT_EVERY`]
    /// (a draining server, on each status request: a hint can be lost with a session that
    /// breaks).
    pub fn rehint_all(&self, reason: HintReason) {
        let now = Instant::now();
        for c in self.all() {
            let mut st = c.lock();
            if st.phase == Phase::Live && mtcp_proto::timing::rehint_due(st.hinted_at, now) {
                c.hint(&mut st, reason);
            }
        }
    }

    /// Freezes local connection `cid` at `epoch` and takes its state record, waiting (bounded)
    /// for a `lock_state` section to end. A fast-path connection also gives its TCP
    /// connection (an encoded `mtcp_repair::TcpState`).
    pub async fn freeze_local(self: &Arc<Self>, f: &Fetch) -> Result<Frozen, (RefuseCode, String)> {
        let (cid, epoch) = (f.cid, f.epoch);
        let Some(shared) = self.get(&cid) else {
            let ended = self
                .closed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&cid)
                .is_some_and(|(e, _)| *e == epoch);
            return Err(if ended {
                (
                    RefuseCode::Closed,
                    format!("connection {cid} ended in order; the client has every byte"),
                )
            } else {
                (
                    RefuseCode::UnknownConnection,
                    format!("server {} has no connection {cid}", self.id),
                )
            });
        };
        let deadline = tokio::time::Instant::now() + self.limits.lock_timeout;
        loop {
            let notified = shared.unlocked.notified();
            let mut direct = None;
            {
                let mut st = shared.lock();
                if st.epoch != epoch {
                    return Err((
                        RefuseCode::StaleEpoch,
                        // Not the current epoch: whoever holds an old token learns nothing
                        // of where the connection is now (issue 14).
                        format!(
                            "connection {cid} has moved on since epoch {epoch}: the token is stale"
                        ),
                    ));
                }
                if !matches!(st.phase, Phase::Live | Phase::AppClosed) {
                    return Err((
                        RefuseCode::UnknownConnection,
                        format!("connection {cid} is no longer served here"),
                    ));
                }
                if !st.locked && st.direct.is_some() {
                    // The pump must stop before the socket freezes; the section stays ours
                    // meanwhile, so the application cannot start one.
                    st.locked = true;
                    direct = st.direct.take();
                } else if !st.locked {
                    let rec = st.freeze(
                        cid,
                        f.down_recv,
                        f.sum_from,
                        f.down_sum,
                        self.limits.max_record,
                    )?;
                    drop(st);
                    self.forget(cid);
                    self.migrated_out.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        %cid,
                        epoch,
                        restart_at = rec.snap_out,
                        client_at = f.down_recv,
                        tail = rec.tail.len(),
                        "connection frozen and handed over"
                    );
                    return Ok(Frozen { rec, tcp: None });
                }
            }
            if let Some(h) = direct {
                let r = self.freeze_direct(&shared, h, cid, epoch).await;
                shared.lock().locked = false;
                shared.unlocked.notify_waiters();
                return r;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err((
                    RefuseCode::Busy,
                    format!(
                        "connection stayed locked longer than {:?}",
                        self.limits.lock_timeout
                    ),
                ));
            }
        }
    }
}

/// A frozen connection: its state record and, for a fast-path connection, its TCP connection
/// (an encoded `mtcp_repair::TcpState`).
pub(crate) struct Frozen {
    pub rec: StateRecord,
    pub tcp: Option<Vec<u8>>,
}

impl ServerInner {
    /// Freezes a fast-path connection: stops its pump, freezes the client's socket, and builds
    /// the record for the downstream position "everything handed to the kernel" (the socket's
    /// queues move with it). On failure the pump goes on serving.
    async fn freeze_direct(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        h: crate::direct::DirectHandle,
        cid: Cid,
        epoch: u64,
    ) -> Result<Frozen, (RefuseCode, String)> {
        let Some(pump) = h.stop().await else {
            return Err((
                RefuseCode::Closed,
                format!("connection {cid} ended; nothing to move"),
            ));
        };
        let written = shared.lock().fast.written;
        let Some((sock, restart)) = pump.into_parts() else {
            return Err((
                RefuseCode::Internal,
                format!("connection {cid}: its socket is still in use"),
            ));
        };
        let std = sock
            .into_std()
            .map_err(|e| (RefuseCode::Internal, format!("socket: {e}")))?;
        let frozen = match mtcp_repair::try_freeze(std) {
            Ok(f) => f,
            Err((e, std)) => {
                restart.resume(std, shared, self);
                return Err((
                    RefuseCode::Busy,
                    format!("cannot freeze the client's connection: {e}"),
                ));
            }
        };
        // Output the kernel never sent is not carried: the destination's application
        // regenerates it from the snapshot (it is checked like the rest), so the state holds
        // only what is on the wire and unread input.
        let unsent = frozen.state.unsent_bytes().len() as u64;
        let written = written - unsent.min(written);
        let mut st = shared.lock();
        let sum = mtcp_proto::sum::checksum(&[]);
        match st.freeze(cid, written, written, sum, self.limits.max_record) {
            Ok(rec) => {
                drop(st);
                self.forget(cid);
                self.migrated_out.fetch_add(1, Ordering::Relaxed);
                // Nothing is sent to the client: the agent fenced its flow.
                let mut tcp_state = frozen.discard();
                tcp_state.drop_unsent();
                let tcp = tcp_state.encode();
                tracing::info!(
                    %cid,
                    epoch,
                    restart_at = rec.snap_out,
                    written,
                    unsent,
                    tcp_state = tcp.len(),
                    "fast-path connection frozen and handed over"
                );
                Ok(Frozen {
                    rec,
                    tcp: Some(tcp),
                })
            }
            Err(e) => {
                drop(st);
                match frozen.thaw() {
                    Ok(std) => restart.resume(std, shared, self),
                    Err(t) => tracing::error!(%cid, "cannot thaw the client's connection: {t}"),
                }
                Err(e)
            }
        }
    }
}

/// A server of an M-TCP cluster: accepts new and migrated connections.
pub struct Server {
    inner: Arc<ServerInner>,
    rx: mpsc::UnboundedReceiver<Connection>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Server {
    /// Listens on the data, peer and admin addresses of server `id` of `cluster`.
    pub async fn bind(cluster: Cluster, id: &str, limits: Limits) -> Result<Server, BindError> {
        let me = cluster.require(id, "cluster file")?.clone();
        // Certificate problems are found here, at start, not at the first handshake.
        let tls = match &cluster.tls {
            Some(files) => Some(crate::tls::ServerTls::load(
                files,
                id,
                &[&me.data, &me.peer, &me.admin],
            )?),
            None => None,
        };
        let listen = |what: &'static str, addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|err| BindError::Listen { what, addr, err })
        };
        let data = listen("data", me.data.clone()).await?;
        let peer_l = listen("peer", me.peer.clone()).await?;
        let admin = listen("admin", me.admin.clone()).await?;
        let (accept_tx, rx) = mpsc::unbounded_channel();
        let replicas =
            crate::replica::ReplicaStore::new(limits.max_replica_bytes, limits.replica_ttl);
        // Handed-over state is bounded like the replicas held for others.
        let custody =
            crate::custody::CustodyStore::new(limits.max_replica_bytes, limits.replica_ttl);
        let inner = Arc::new(ServerInner {
            id: id.to_string(),
            cluster,
            tls,
            limits,
            conns: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            migrated_in: AtomicU64::new(0),
            migrated_out: AtomicU64::new(0),
            empty_detached: Default::default(),
            sessions: Default::default(),
            takeovers: Default::default(),
            handovers: Default::default(),
            handing_over: std::sync::atomic::AtomicU32::new(0),
            peer_pool: peer::PeerPool::default(),
            replicas,
            custody,
            closed: Mutex::new(HashMap::new()),
            gates: Default::default(),
            accept_tx,
        });
        let mut tasks = vec![
            tokio::spawn(accept::accept_loop(data, inner.clone(), Port::Data)),
            tokio::spawn(accept::accept_loop(peer_l, inner.clone(), Port::Peer)),
            tokio::spawn(accept::accept_loop(admin, inner.clone(), Port::Admin)),
            tokio::spawn(janitor(Arc::downgrade(&inner))),
        ];
        for b in inner.cluster.backups(&inner.id) {
            tasks.push(tokio::spawn(peer::keep_warm(Arc::downgrade(&inner), b)));
        }
        if let Some(max) = inner.limits.max_connections {
            tasks.push(tokio::spawn(overload_loop(Arc::downgrade(&inner), max)));
        }
        tracing::info!(id, data = %me.data, peer = %me.peer, admin = %me.admin, "server listening");
        Ok(Server { inner, rx, tasks })
    }

    /// The next connection, new or migrated here.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.rx.recv().await
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn status(&self) -> ServerStatus {
        self.inner.status()
    }

    /// What publishes this server's levels to the metrics endpoint (holds no reference that
    /// keeps the server alive).
    pub fn metrics(&self) -> crate::metrics::ServerSampler {
        crate::metrics::ServerSampler(Arc::downgrade(&self.inner))
    }

    /// Refuses new connections and hints every connection to move elsewhere.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.inner.hint_all(HintReason::Drain);
    }
}

async fn janitor(inner: std::sync::Weak<ServerInner>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        inner
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, t)| now.duration_since(*t) < CLOSED_MEMORY);
        inner.custody.expire(now);
        inner.gates.expire(now, inner.limits.replica_ttl);
        let gone = inner.replicas.expire(now);
        if gone > 0 {
            tracing::info!(
                "forgot {gone} replicas not refreshed for {:?}",
                inner.limits.replica_ttl
            );
        }
        for c in inner.all() {
            crate::eager::tend(&inner, &c, now);
            let mut st = c.lock();
            // An attached agent that acknowledges nothing while the app waits on it: the
            // connection goes, not the server's memory. (A detached one is waited for below.)
            if st.detached_at.is_none()
                && st.phase == Phase::Live
                && st
                    .ack_wait
                    .is_some_and(|t| now.duration_since(t) > inner.limits.ack_timeout)
            {
                let reason = format!(
                    "the agent acknowledged none of {} bytes of output for {:?}",
                    st.s.unacked(),
                    inner.limits.ack_timeout
                );
                tracing::warn!(cid = %c.cid, "{reason}; aborting the connection");
                st.abort(reason, Some(RefuseCode::TooLarge));
                drop(st);
                inner.forget(c.cid);
                continue;
            }
        }
        sweep_detached(&inner, now);
    }
}

/// Drops the state of connections whose agent is gone, as `mtcp_proto::bounds` rules: after
/// `dead_session`, or soon and only so many when they never carried data. A fast-path
/// connection is served without its agent and ends with its client: it is not swept.
fn sweep_detached(inner: &ServerInner, now: Instant) {
    use mtcp_proto::bounds::{detached_to_drop, Detached};
    let mut conns = Vec::new();
    let mut list = Vec::new();
    for c in inner.all() {
        let st = c.lock();
        let Some(t) = st.detached_at.filter(|_| st.direct.is_none()) else {
            continue;
        };
        if !matches!(st.phase, Phase::Live | Phase::AppClosed) {
            continue;
        }
        list.push(Detached {
            age: now.duration_since(t),
            carried_data: st.s.out_off() > 0 || st.s.up_recv() > 0,
        });
        drop(st);
        conns.push(c);
    }
    let gone = detached_to_drop(&list, inner.limits.dead_session);
    let mut empty = 0;
    for &i in &gone {
        let c = &conns[i];
        let mut st = c.lock();
        if st.detached_at.is_none() {
            continue; // its agent came back meanwhile
        }
        if list[i].carried_data {
            tracing::info!(cid = %c.cid, "agent gone for {:?}; dropping the connection's state", inner.limits.dead_session);
        } else {
            empty += 1;
        }
        st.abort("agent gone".into(), None);
        drop(st);
        inner.forget(c.cid);
    }
    if empty > 0 {
        tracing::debug!(
            "dropped the state of {empty} detached connection(s) that never carried data"
        );
    }
    let kept_empty = list.iter().filter(|d| !d.carried_data).count() - empty;
    inner.empty_detached.store(kept_empty, Ordering::Relaxed);
}

/// Whether to log an event anyone can cause (a refused session, garbage on a port), at most 20
/// lines a second: `Some(n)` with the number of such lines suppressed since the last one.
pub(crate) fn noisy_event_admitted() -> Option<u64> {
    use mtcp_proto::bounds::LogBudget;
    static BUDGET: Mutex<LogBudget> = Mutex::new(LogBudget::new(Duration::from_secs(1), 20));
    BUDGET
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(Instant::now())
}

pub(crate) async fn refuse(w: &mut WriteHalf, code: RefuseCode, reason: String) {
    crate::metrics::refused(code);
    if let Some(suppressed) = noisy_event_admitted() {
        tracing::info!(?code, suppressed, "refusing session: {reason}");
    }
    let _ = framed::write_msg(w, &Msg::Refused { code, reason }).await;
    let _ = w.shutdown().await;
}

/// Serves a data-port session; `admitted` is its place under the session caps, taken at
/// accept (or why it is over one).
pub(crate) async fn handle_session(
    inner: Arc<ServerInner>,
    s: Stream,
    admitted: Result<crate::admission::Slot, String>,
) {
    let mut gauge = crate::metrics::SessionGauge::new();
    let peer_addr = s
        .tcp()
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let ends = (s.tcp().local_addr().ok(), s.tcp().peer_addr().ok());
    // Held for the session's life: counts it against the caps.
    let (_slot, over) = match admitted {
        Ok(slot) => (Some(slot), None),
        Err(why) => (None, Some(why)),
    };
    if let Some(rate) = inner.limits.pacing_rate {
        set_pacing_rate(s.tcp(), rate);
    }
    let mut s = s;
    match tokio::time::timeout(SETUP_TIMEOUT, framed::exchange_preamble(&mut s)).await {
        Ok(Ok(())) => {}
        Ok(Err(ChannelError::Wire(e @ wire::WireError::Version { .. }))) => {
            let (_, mut w) = s.into_split();
            refuse(&mut w, RefuseCode::VersionMismatch, e.to_string()).await;
            return;
        }
        // An agent's unused spare connection, closed before it carried anything.
        Ok(Err(ChannelError::Closed)) => {
            tracing::debug!(peer = %peer_addr, "data port: closed before the preamble");
            return;
        }
        Ok(Err(e)) => {
            if let Some(suppressed) = noisy_event_admitted() {
                tracing::info!(peer = %peer_addr, suppressed, "data port: {e}; closing");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = noisy_event_admitted() {
                tracing::info!(peer = %peer_addr, suppressed, "data port: no preamble within {SETUP_TIMEOUT:?}; closing");
            }
            return;
        }
    }
    let (r, mut w) = s.into_split();
    if let Some(why) = over {
        refuse(&mut w, RefuseCode::Busy, why).await;
        return;
    }
    let mut reader = FrameReader::new(r, SETUP_FRAME);
    let first = match reader.next_msg(SETUP_TIMEOUT).await {
        Ok(m) => m,
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
        Msg::Hello { caps, .. } => {
            gauge.set(SessionKind::Connection);
            let direct = caps & wire::CAP_DIRECT != 0;
            if direct && inner.cluster.fast_path.is_empty() {
                refuse(
                    &mut w,
                    RefuseCode::Unauthenticated,
                    "this cluster admits no fast-path agents (list the agent's --listen address under `fast_path` in the cluster file)".into(),
                )
                .await;
                return;
            }
            // Fast path: only a local agent of a trusted uid may hand connections over; its
            // end of this session is in this host's socket table (decision 39).
            // What it may hand over are the connections it holds on its listed addresses now,
            // while the client's connection is still its own (it freezes it after WELCOME).
            let agent = if direct {
                let listed = inner.cluster.fast_path.clone();
                let (owner, held) = match ends {
                    (Some(local), Some(peer)) => tokio::task::spawn_blocking(move || {
                        crate::sockowner::session_view(peer, local, &listed)
                    })
                    .await
                    .unwrap_or_default(),
                    _ => (None, Vec::new()),
                };
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if let Err(why) = mtcp_proto::adopt::admit_session(owner, me) {
                    refuse(&mut w, RefuseCode::Unauthenticated, why).await;
                    return;
                }
                owner.map(|uid| crate::direct::Adopter { uid, held })
            } else {
                None
            };
            if inner.draining.load(Ordering::Relaxed) {
                refuse(
                    &mut w,
                    RefuseCode::Draining,
                    format!("server {} is draining", inner.id),
                )
                .await;
                return;
            }
            let cid = Cid(rand::random());
            let shared = Shared::new_conn(cid, tx);
            let welcome = Welcome {
                server: inner.id.clone(),
                cid,
                epoch: 0,
                token: inner.cluster.key.token(cid, 0),
                alternates: inner.cluster.alternates(&inner.id),
                mode: inner.cluster.mode,
                heartbeat_ms: inner.cluster.heartbeat.as_millis() as u32,
            };
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
                let tcp = match reader.next_msg(SETUP_TIMEOUT).await {
                    Ok(Msg::Adopt(tcp)) => tcp,
                    Ok(other) => {
                        let why = format!("expected ADOPT, got {}", msg_name(&other));
                        refuse(&mut w, RefuseCode::Malformed, why).await;
                        return;
                    }
                    Err(e) => {
                        tracing::info!(%cid, "fast path: no client connection: {e}");
                        return;
                    }
                };
                match Box::pin(crate::direct::adopt(
                    tcp,
                    &inner.cluster.fast_path,
                    agent.as_ref(),
                ))
                .await
                {
                    Ok(sock) => {
                        let d = DirectSock { sock, written: 0 };
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
        Msg::Migrate(m) => {
            gauge.set(SessionKind::Connection);
            let started = Instant::now();
            // WORKING every heartbeat until the answer: the agent gives up on a
            // silent candidate after an RTT-derived bound (decision 32), while a takeover may
            // take longer (an origin's lock_state section, protecting the connection on this
            // server's backups). The takeover itself is never cancelled: past the origin's
            // hand-over it is the only copy of the connection.
            let outcome = {
                // Boxed, as the other setup paths: the session's task then holds only what a
                // live session needs (issue 13: memory per idle connection).
                let mut fut = Box::pin(take_over(&inner, &m, tx));
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
            if outcome.is_ok() && !inner.limits.hold_resumed.is_zero() {
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
                        && !inner.may_answer(m.cid, shared.lock().epoch) =>
                {
                    // A keeper superseded this takeover (the agent gave up on us): another
                    // destination has the connection one epoch up.
                    tracing::warn!(cid = %m.cid, "superseded before RESUMED went out; letting the connection go");
                    {
                        let mut st = shared.lock();
                        st.phase = Phase::Migrated;
                        st.tx = None;
                        st.wake_all();
                    }
                    inner.forget(m.cid);
                    Err((
                        RefuseCode::StaleEpoch,
                        "the connection went to another server meanwhile".to_string(),
                    ))
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
                    if framed::write_msg(&mut w, &Msg::Resumed(resumed))
                        .await
                        .is_err()
                    {
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
                Err((code, reason)) => {
                    crate::metrics::took_over(None);
                    refuse(&mut w, code, reason).await;
                    return;
                }
            }
        }
        Msg::Watch { cid, epoch, token } => {
            gauge.set(SessionKind::Watch);
            Box::pin(crate::watch::serve(&inner, reader, w, cid, epoch, token)).await;
            return;
        }
        Msg::Probe { t } => {
            gauge.set(SessionKind::Probe);
            Box::pin(probe(&inner, reader, w, t)).await;
            return;
        }
        other => {
            refuse(
                &mut w,
                RefuseCode::Malformed,
                format!(
                    "expected HELLO, MIGRATE, WATCH or PROBE, got {}",
                    msg_name(&other)
                ),
            )
            .await;
            return;
        }
    };
    let conn = Connection {
        shared: shared.clone(),
        server: inner.clone(),
        start,
    };
    if inner.accept_tx.send(conn).is_err() {
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

/// Test hook (`Limits::pacing_rate`): caps the socket's send rate at `rate` bytes per second.
fn set_pacing_rate(s: &TcpStream, rate: u64) {
    use std::os::fd::AsRawFd;
    let v: libc::c_ulong = rate as libc::c_ulong;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live value of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            &v as *const libc::c_ulong as *const libc::c_void,
            std::mem::size_of::<libc::c_ulong>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::warn!("SO_MAX_PACING_RATE: {}", std::io::Error::last_os_error());
    }
}

/// A probe connection: answers each `PROBE{t}` with `PROBE_REPLY{t}` (after
/// `Limits::probe_delay`, a test hook), until the agent closes it, stays quiet for
/// `PROBE_IDLE`, probes faster than one per `PROBE_MIN_GAP`, or sends anything else.
async fn probe(
    inner: &Arc<ServerInner>,
    mut reader: FrameReader<ReadHalf>,
    mut w: WriteHalf,
    mut t: u64,
) {
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            PROBE_CONNS.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _slot = Slot;
    if PROBE_CONNS.fetch_add(1, Ordering::Relaxed) >= MAX_PROBE_CONNS {
        refuse(
            &mut w,
            RefuseCode::Busy,
            "too many probe connections".into(),
        )
        .await;
        return;
    }
    tracing::debug!(server = %inner.id, "probe connection");
    loop {
        let at = Instant::now();
        if !inner.limits.probe_delay.is_zero() {
            tokio::time::sleep(inner.limits.probe_delay).await;
        }
        if framed::write_msg(&mut w, &Msg::ProbeReply { t })
            .await
            .is_err()
        {
            return;
        }
        match reader.next_msg(PROBE_IDLE).await {
            Ok(Msg::Probe { t: next }) if at.elapsed() >= PROBE_MIN_GAP => t = next,
            _ => return,
        }
    }
}

/// Overload: while more than `max` connections with an agent are live here, hints the newest
/// away (`HINT{Overload}`), paced by [`OverloadPolicy`]. Idle while draining (every connection
/// is hinted then anyway).
async fn overload_loop(inner: std::sync::Weak<ServerInner>, max: usize) {
    use mtcp_proto::policy::{LiveConn, OverloadConfig, OverloadPolicy};
    let mut policy = OverloadPolicy::new(OverloadConfig::new(max));
    let mut tick = tokio::time::interval(OVERLOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.draining.load(Ordering::Relaxed) {
            continue;
        }
        let conns = inner.all();
        let live: Vec<LiveConn<Cid>> = conns
            .iter()
            .filter_map(|c| {
                let st = c.lock();
                (st.phase == Phase::Live && st.detached_at.is_none()).then_some(LiveConn {
                    key: c.cid,
                    arrived: st.arrived,
                })
            })
            .collect();
        for cid in policy.poll(Instant::now(), &live) {
            let Some(c) = conns.iter().find(|c| c.cid == cid) else {
                continue;
            };
            let mut st = c.lock();
            if st.phase == Phase::Live {
                tracing::info!(%cid, live = live.len(), max, "overloaded: hinting the connection away");
                c.hint(&mut st, HintReason::Overload);
            }
        }
    }
}

/// MIGRATE: check the token, get the state record from the origin, restart here.
async fn take_over(
    inner: &Arc<ServerInner>,
    m: &Migrate,
    tx: mpsc::UnboundedSender<Out>,
) -> Result<(Arc<Shared>, Start, Resumed, Option<DirectSock>), (RefuseCode, String)> {
    if !inner.cluster.key.check_token(m.cid, m.epoch, &m.token) {
        return Err((RefuseCode::BadToken, BAD_TOKEN.into()));
    }
    crate::eager::test_delay(inner).await;
    if inner.draining.load(Ordering::Relaxed) {
        return Err((
            RefuseCode::Draining,
            format!("server {} is draining", inner.id),
        ));
    }
    // Counted from here to the end of the takeover, refused or not.
    // (A drain moves every connection at once: the MIGRATEs over the cap wait their turn,
    // answered WORKING meanwhile, instead of failing.)
    let _slot = inner
        .takeovers
        .take(
            inner.limits.max_takeovers,
            inner.limits.takeover_wait,
            mtcp_proto::bounds::admit_takeover,
        )
        .await
        .map_err(|why| (RefuseCode::Busy, format!("server {}: {why}", inner.id)))?;
    let origin = inner
        .cluster
        .server(&m.origin)
        .ok_or((
            RefuseCode::UnknownConnection,
            format!("origin {:?} is not in the cluster", m.origin),
        ))?
        .clone();
    let f = Fetch {
        cid: m.cid,
        epoch: m.epoch,
        down_recv: m.down_recv,
        sum_from: m.sum_from,
        down_sum: m.down_sum,
    };
    if m.segs.len() > mtcp_proto::sum::MAX_SEGS {
        return Err((
            RefuseCode::TooLarge,
            format!(
                "{} checksum ranges (at most {})",
                m.segs.len(),
                mtcp_proto::sum::MAX_SEGS
            ),
        ));
    }
    let (rec, tcp, state_bytes, claims) = fetch_or_replica(inner, &origin, m, &f).await?;
    // A record labelled past the MIGRATE's epoch came from a keeper's custody (decision 43):
    // a restart point, as from a replica, for the client's position now.
    let rehanded = claims.is_none() && rec.epoch > m.epoch;
    let rec = if rehanded {
        mtcp_proto::stream::replica_for_client(rec, m.down_recv, &m.ranges(), m.up_base)?
    } else {
        rec
    };
    let from_replica = claims.is_some() || rehanded;
    if let Err(e) = check_record(m, &rec, tcp.is_some()) {
        // A record that does not fit withdraws the claims made for it.
        if let Some(c) = claims {
            tracing::warn!(cid = %m.cid, "takeover refused after claiming ({:?}: {}); releasing the claims", e.0, e.1);
            c.release(inner).await;
        }
        return Err(e);
    }
    let keepers = Confirm {
        cid: Some(m.cid),
        epoch: m.epoch,
        to: match &claims {
            Some(c) => c.at.clone(),
            None => vec![origin.clone()],
        },
    };
    let r = take_over_checked(inner, m, rec, tcp, state_bytes, from_replica, tx, keepers).await;
    if r.is_err() {
        if let Some(c) = claims {
            c.release(inner).await;
        }
    }
    r
}

/// The state record of the connection for the MIGRATE `m`: from the origin, or in eager mode,
/// when the origin does not answer within `origin_wait`, from a replica at its backups (with
/// the claims made there). The FETCH sent to a silent origin is not given up on: the origin
/// may have frozen the connection, fenced its backups and sent the state with a segment lost
/// on the way — the connection then exists only in that answer. So when the replica cannot
/// be had, the destination keeps reading the origin's answer
/// ([`mtcp_proto::timing::origin_grace`]).
async fn fetch_or_replica(
    inner: &Arc<ServerInner>,
    origin: &crate::config::ServerEntry,
    m: &Migrate,
    f: &Fetch,
) -> Result<
    (
        StateRecord,
        Option<Vec<u8>>,
        u64,
        Option<crate::eager::Claims>,
    ),
    (RefuseCode, String),
> {
    if origin.id == inner.id {
        // Local re-attach: nothing crosses the network; the size is what it would have been.
        let fr = crate::eager::hand_over(inner, f, &inner.id).await?;
        let size = (fr.rec.encode().len() + fr.tcp.as_ref().map_or(0, Vec::len)) as u64;
        return Ok((fr.rec, fr.tcp, size, None));
    }
    let answered = AtomicBool::new(false);
    let fetch = peer::fetch(inner, origin, f, &answered);
    if !crate::eager::eager(inner) {
        let (fr, n) = fetch.await?;
        return Ok((fr.rec, fr.tcp, n, None));
    }
    tokio::pin!(fetch);
    let first = mtcp_proto::timing::origin_wait(
        inner.cluster.origin_wait,
        &inner.peer_pool.rtt(&origin.id),
    );
    let (why, pending) = match tokio::time::timeout(first, &mut fetch).await {
        Ok(Ok((fr, n))) => return Ok((fr.rec, fr.tcp, n, None)),
        Ok(Err((RefuseCode::OriginUnreachable, why))) => (why, false),
        Ok(Err(e)) => return Err(e),
        Err(_) if answered.load(Ordering::Relaxed) => {
            // WORKING came in time: the origin is alive (a lock_state section may delay it).
            let (fr, n) = fetch.await?;
            return Ok((fr.rec, fr.tcp, n, None));
        }
        Err(_) => (
            format!(
                "origin {} ({}): no answer within {first:?}",
                origin.id, origin.peer
            ),
            true,
        ),
    };
    tracing::warn!(cid = %m.cid, "{why}; taking the connection over from a replica");
    let e = match crate::eager::take_from_replica(inner, origin, m).await {
        Ok((rec, n, claims)) => return Ok((rec, None, n, Some(claims))),
        Err(e) if pending => e,
        Err(e) => return Err(e),
    };
    let grace = mtcp_proto::timing::origin_grace(
        answered.load(Ordering::Relaxed),
        e.0,
        &inner.peer_pool.rtt(&origin.id),
        peer::fetch_bound(inner),
    );
    tracing::warn!(cid = %m.cid, "takeover from a replica failed ({:?}: {}); waiting up to {grace:?} more for origin {}'s answer", e.0, e.1, origin.id);
    match tokio::time::timeout(grace, fetch).await {
        Ok(Ok((fr, n))) => {
            tracing::info!(cid = %m.cid, "origin {} answered after all", origin.id);
            Ok((fr.rec, fr.tcp, n, None))
        }
        Ok(Err(o)) => Err((e.0, format!("{}; origin {}: {}", e.1, origin.id, o.1))),
        Err(_) => Err(e),
    }
}

/// The record a destination got must be for this connection and the client's position.
fn check_record(
    m: &Migrate,
    rec: &mtcp_proto::StateRecord,
    direct: bool,
) -> Result<(), (RefuseCode, String)> {
    if rec.cid != m.cid || rec.epoch < m.epoch {
        return Err((
            RefuseCode::Internal,
            "origin sent the record of another connection".into(),
        ));
    }
    // A fast-path connection's position is the origin's own: the agent sees no bytes.
    if !direct && m.up_sent < rec.up_recv() {
        return Err((
            RefuseCode::Malformed,
            format!(
                "agent says it sent {} upstream bytes but the origin received {}",
                m.up_sent,
                rec.up_recv()
            ),
        ));
    }
    if !direct && rec.client_down() != m.down_recv {
        return Err((
            RefuseCode::Internal,
            "origin's record is for another downstream position".into(),
        ));
    }
    Ok(())
}

/// The rest of a takeover, once the record is known to fit: restart the connection here.
#[allow(clippy::too_many_arguments)]
async fn take_over_checked(
    inner: &Arc<ServerInner>,
    m: &Migrate,
    rec: mtcp_proto::StateRecord,
    tcp: Option<Vec<u8>>,
    state_bytes: u64,
    from_replica: bool,
    tx: mpsc::UnboundedSender<Out>,
    keepers: Confirm,
) -> Result<(Arc<Shared>, Start, Resumed, Option<DirectSock>), (RefuseCode, String)> {
    // One past the record's label: the MIGRATE's epoch + 1, or more when a silent holder was
    // superseded (its epoch is fenced).
    let epoch = rec.epoch + 1;
    let up_from = rec.up_recv();
    let restart_out = rec.snap_out;
    let start = rec
        .snapshot
        .clone()
        .map(Start::Migrated)
        .unwrap_or(Start::New);
    let sock = match tcp {
        Some(tcp) => {
            let sock = crate::direct::adopt(tcp, &inner.cluster.fast_path, None)
                .await
                .map_err(|e| {
                    tracing::error!(cid = %m.cid, "fast-path connection lost: {e}");
                    (RefuseCode::Internal, e)
                })?;
            Some(DirectSock {
                sock,
                written: rec.client_down(),
            })
        }
        None => None,
    };
    let protected = crate::eager::protect_takeover(inner, &rec, epoch).await?;
    let shared = Shared::from_record(rec, epoch, tx);
    if crate::eager::eager(inner) {
        let mut st = shared.lock();
        if let Some((out_off, in_off)) = protected {
            st.repl.committed = Some((out_off, in_off));
            st.repl.at = Some(Instant::now());
        }
        // Told once the backups hold the epoch and the agent has it (`eager::agent_heard`).
        st.repl.confirm = Some(keepers);
        if let Some(key) = protected {
            // Held back until the agent speaks on the new session (decision 48).
            crate::eager::tell_committed(&mut st, key);
        }
    }
    inner
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(m.cid, shared.clone());
    let resumed = Resumed {
        server: inner.id.clone(),
        epoch,
        token: inner.cluster.key.token(m.cid, epoch),
        up_from,
        alternates: inner.cluster.alternates(&inner.id),
        heartbeat_ms: inner.cluster.heartbeat.as_millis() as u32,
        state_bytes,
        restart_out,
        from_replica,
    };
    Ok((shared, start, resumed, sock))
}

/// A fast-path connection's socket, recreated here, before its pump runs.
pub(crate) struct DirectSock {
    sock: TcpStream,
    /// Downstream offset the socket continues at.
    written: u64,
}

impl DirectSock {
    /// Starts the pump; the session's writer then carries what the pump passes on (`ctl_rx`).
    fn start(
        self,
        rx: mpsc::UnboundedReceiver<Out>,
        shared: &Arc<Shared>,
        inner: &Arc<ServerInner>,
    ) -> mpsc::UnboundedReceiver<Out> {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        shared.lock().fast = crate::direct::FastOut::at(self.written);
        crate::direct::Pump::new(self.sock, rx, ctl_tx).start(shared, inner);
        ctl_rx
    }
}

pub(crate) fn msg_name(m: &Msg) -> String {
    let s = format!("{m:?}");
    s.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

async fn writer_loop(
    mut w: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    hb: Duration,
) {
    let mut pending: VecDeque<Out> = VecDeque::new();
    let mut reported: Option<Instant> = None;
    // One heartbeat timer, armed at "quiet since the last write + hb" and re-armed only when it
    // fires early: the hot path (one turn per batch) never touches the timer wheel. It beats
    // only where someone waits (`trigger::beat_due`); otherwise it parks until input arrives.
    let mut last_write = tokio::time::Instant::now();
    let mut last_data = last_write;
    let mut inputs_at_data = 0u64;
    let mut parked = false;
    let quiet = tokio::time::sleep_until(last_write + hb);
    tokio::pin!(quiet);
    loop {
        if pending.is_empty() {
            tokio::select! {
                x = rx.recv() => match x {
                    Some(o) => pending.push_back(o),
                    None => break,
                },
                _ = shared.beat.notified(), if parked => {
                    parked = false;
                    quiet.as_mut().reset(tokio::time::Instant::now() + hb);
                    continue;
                }
                _ = &mut quiet, if !parked => {
                    let now = tokio::time::Instant::now();
                    let due = last_write + hb;
                    if now < due {
                        quiet.as_mut().reset(due);
                        continue;
                    }
                    let mut st = shared.lock();
                    let unanswered = st.inputs != inputs_at_data;
                    let fast = st.direct.is_some();
                    let unacked = st.s.unacked() > 0;
                    let since = now - last_data.max(st.acked_at);
                    if !mtcp_proto::trigger::beat_due(unanswered, unacked, since, fast) {
                        // Nobody waits: no frames until input arrives (issue 13).
                        st.beat_parked = true;
                        parked = true;
                        continue;
                    }
                    drop(st);
                    crate::metrics::heartbeat_sent(false);
                    pending.push_back(Out::Msg(Msg::Heartbeat));
                }
            }
        }
        while let Ok(o) = rx.try_recv() {
            pending.push_back(o);
        }
        let (batch, data) = next_batch(&mut pending);
        // BACKLOG: more waits behind this batch (the app is ahead of the socket). At most every
        // BACKLOG_EVERY; the agent anchors it at this point of the stream.
        let mut batch = batch;
        let inputs = if data > 0 {
            let st = shared.lock();
            if reported.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) && st.queued > data {
                batch.insert(0, Out::Msg(Msg::Backlog { queued: st.queued }));
                reported = Some(Instant::now());
            }
            Some(st.inputs)
        } else {
            None
        };
        if let Err(e) = framed::write_frames(&mut w, &batch).await {
            tracing::debug!(cid = %shared.cid, "session write failed: {e}");
            return;
        }
        crate::metrics::add_down(data as usize);
        last_write = tokio::time::Instant::now();
        let mut st = shared.lock();
        if let Some(n) = inputs {
            // Data answers the input received before it was taken for this batch.
            last_data = last_write;
            inputs_at_data = n;
        }
        if parked {
            // Anything written (a HINT, COMMITTED, …) restarts the timer as data does.
            parked = false;
            st.beat_parked = false;
            quiet.as_mut().reset(last_write + hb);
        }
        st.queued = st.queued.saturating_sub(data);
        if let Some(wk) = st.write_waker.take() {
            wk.wake();
        }
    }
    let _ = w.shutdown().await;
}

/// Most data bytes in one batch written to the session socket.
const BATCH_BYTES: u64 = 1 << 20;
/// Most items in one batch.
const BATCH_ITEMS: usize = 64;

/// Takes the next batch to write from `pending` (everything queued for the session, in order),
/// and the data bytes in it. A HINT is position-free, so it jumps ahead of queued data: a
/// drain or an overload hint reaches the agent after at most one batch, not after everything
/// the application has queued (up to `max_queued`). Every other item keeps its order.
fn next_batch(pending: &mut VecDeque<Out>) -> (Vec<Out>, u64) {
    let mut batch = Vec::with_capacity(BATCH_ITEMS.min(pending.len()));
    if let Some(i) = pending
        .iter()
        .position(|o| matches!(o, Out::Msg(Msg::Hint { .. })))
    {
        if let Some(h) = pending.remove(i) {
            batch.push(h);
        }
    }
    let mut data = 0u64;
    while data < BATCH_BYTES && batch.len() < BATCH_ITEMS {
        let Some(o) = pending.pop_front() else { break };
        if let Out::Data(d) = &o {
            data += d.len() as u64;
        }
        batch.push(o);
    }
    (batch, data)
}

/// Returns whether the session ended in order (the writer should flush) rather than broke.
async fn reader_loop(
    mut reader: FrameReader<ReadHalf>,
    shared: &Arc<Shared>,
    inner: &Arc<ServerInner>,
) -> bool {
    let why = loop {
        // Upstream backpressure: stop reading while the application is behind.
        let behind = || {
            let st = shared.lock();
            st.phase == Phase::Live && st.s.unread() >= inner.limits.max_unread
        };
        while behind() {
            // Made only when needed (not once per frame); a read in between leaves a permit.
            let consumed = shared.consumed.notified();
            if !behind() {
                break;
            }
            consumed.await;
        }
        // A relaying agent pings every second: a session silent for `session_idle` has no
        // agent behind it (a fast-path agent's session is a quiet control channel).
        let relayed = shared.lock().direct.is_none();
        let next = if relayed {
            tokio::time::timeout(inner.limits.session_idle, reader.next()).await
        } else {
            Ok(reader.next().await)
        };
        let f = match next {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => break e.to_string(),
            Err(_) => {
                break format!(
                    "nothing from the agent for {:?} (a relaying agent pings every second)",
                    inner.limits.session_idle
                )
            }
        };
        let mut st = shared.lock();
        if matches!(
            st.phase,
            Phase::Migrated | Phase::Aborted(_) | Phase::Closed
        ) {
            return st.phase != Phase::Migrated;
        }
        if !crate::eager::agent_heard(inner, shared.cid, &mut st) {
            return false;
        }
        match f {
            Frame::Data(b) => {
                crate::metrics::add_up(b.len());
                // Once the application is done, late input is dropped.
                if st.phase == Phase::Live {
                    st.on_input(&shared.beat);
                    if let Err(why) = st.s.receive(b) {
                        break why.into();
                    }
                    if let Some(w) = st.read_waker.take() {
                        w.wake();
                    }
                }
            }
            Frame::Msg(Msg::Ack {
                down_recv,
                sum_from,
            }) => {
                let before = st.s.acked();
                st.s.on_ack(down_recv, sum_from);
                if st.s.acked() > before {
                    st.ack_wait = None;
                    st.acked_at = tokio::time::Instant::now();
                    if st.s.unacked() < inner.limits.max_unacked {
                        if let Some(w) = st.write_waker.take() {
                            w.wake();
                        }
                    }
                }
                if st.phase == Phase::AppClosed && st.s.acked() >= st.s.out_off() {
                    st.phase = Phase::Closed;
                    st.tx = None;
                    let epoch = st.epoch;
                    drop(st);
                    inner.closed_in_order(shared.cid, epoch);
                    return true;
                }
                crate::eager::replicate_if_due(inner, shared, &mut st);
            }
            Frame::Msg(Msg::Ping { t }) => st.send(Out::Msg(Msg::Pong { t })),
            Frame::Msg(Msg::Kick) => {
                if let Some(d) = &st.direct {
                    d.kick();
                }
            }
            Frame::Msg(Msg::UpFin { up_total }) => {
                st.on_input(&shared.beat);
                if let Err(why) = st.s.finish_input(up_total) {
                    break why;
                }
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
            }
            Frame::Msg(Msg::Leaving) => {
                st.leaving = true;
                break "the agent moves the connection elsewhere".into();
            }
            Frame::Msg(Msg::Close) => {
                st.phase = Phase::Closed;
                st.tx = None;
                st.wake_all();
                let epoch = st.epoch;
                drop(st);
                inner.closed_in_order(shared.cid, epoch);
                return true;
            }
            Frame::Msg(other) => break format!("unexpected {} in a session", msg_name(&other)),
        }
    };
    let mut st = shared.lock();
    if matches!(st.phase, Phase::Live | Phase::AppClosed) {
        tracing::debug!(cid = %shared.cid, "session detached: {why}");
        st.detached_at = Some(Instant::now());
        let empty = st.s.out_off() == 0 && st.s.up_recv() == 0;
        drop(st);
        // A flood of sessions that open and leave without a byte is swept as it comes, not
        // only by the janitor each second: at twice the cap, so a sweep (a pass over all
        // connections) is paid once per cap's worth of such sessions.
        if empty
            && inner.empty_detached.fetch_add(1, Ordering::Relaxed)
                >= 2 * mtcp_proto::bounds::MAX_EMPTY_DETACHED
        {
            sweep_detached(inner, Instant::now());
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn data(n: usize) -> Out {
        Out::Data(Bytes::from(vec![7u8; n]))
    }

    fn hint() -> Out {
        Out::Msg(Msg::Hint {
            reason: HintReason::Drain,
            target: None,
        })
    }

    #[test]
    fn a_hint_jumps_queued_data_and_everything_else_keeps_its_order() {
        let mut q: VecDeque<Out> = VecDeque::new();
        for _ in 0..16 {
            q.push_back(data(256 << 10));
            q.push_back(Out::Msg(Msg::Heartbeat));
        }
        q.push_back(hint());
        let (b, n) = next_batch(&mut q);
        assert!(matches!(b[0], Out::Msg(Msg::Hint { .. })), "hint first");
        assert_eq!(n, BATCH_BYTES, "then one batch of data");
        // The rest comes out in its original order, without the hint.
        let mut kinds = Vec::new();
        for o in b.iter().skip(1) {
            kinds.push(matches!(o, Out::Data(_)));
        }
        while !q.is_empty() {
            let (b, _) = next_batch(&mut q);
            assert!(b.iter().all(|o| !matches!(o, Out::Msg(Msg::Hint { .. }))));
            kinds.extend(b.iter().map(|o| matches!(o, Out::Data(_))));
        }
        let want: Vec<bool> = (0..32).map(|i| i % 2 == 0).collect();
        assert_eq!(kinds, want);
    }

    #[test]
    fn batches_are_bounded_in_bytes_and_items() {
        let mut q: VecDeque<Out> = (0..200).map(|_| Out::Msg(Msg::Heartbeat)).collect();
        let (b, n) = next_batch(&mut q);
        assert_eq!((b.len(), n), (BATCH_ITEMS, 0));
        let mut q: VecDeque<Out> = (0..8).map(|_| data(512 << 10)).collect();
        let (b, n) = next_batch(&mut q);
        assert_eq!((b.len(), n), (2, 1 << 20));
        assert_eq!(q.len(), 6);
    }
}
