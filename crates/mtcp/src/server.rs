//! The server side of the runtime: the public `Server`, its listeners and background tasks, the
//! registry of connections (`ServerInner`: lookup, status, hints to every connection) and the
//! janitor that forgets connections whose agent is gone. A session on the data port is served
//! by `session.rs`; a MIGRATE's takeover is `takeover.rs`, the origin's side `origin.rs`.

use crate::accept::{self, Port};
use crate::config::{Cluster, ConfigError, Limits};
use crate::conn::Connection;
use crate::conn_state::{Phase, Shared};
use crate::peer;
use crate::probe::overload_loop;
use mtcp_proto::wire::{HintReason, RefuseCode, ServerStatus};
use mtcp_proto::Cid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    pub peer_pool: crate::peer_pool::PeerPool,
    /// Eager mode: replicas of other servers' connections held here.
    pub replicas: crate::replica::ReplicaStore,
    /// Eager mode: connections handed over alive, kept until their destination confirms.
    pub(crate) custody: crate::custody::CustodyStore,
    /// Eager mode: per taken-over (cid, epoch), RESUMED, the agent's first frame or a yield.
    pub(crate) gates: crate::gate::Gates,
    /// Connections that ended in order lately: epoch and when (see `closed_in_order`).
    pub closed: Mutex<HashMap<Cid, (u64, Instant)>>,
    pub(crate) accept_tx: mpsc::UnboundedSender<Connection>,
    /// The fast path's fences: an origin fences a connection's flow before it freezes it
    /// (created on first use; decision 54).
    fences: mtcp_repair::LazyFences,
}

impl ServerInner {
    /// The fast path's fences (the table is created on first use).
    pub(crate) fn fences(&self) -> Result<Arc<mtcp_repair::Fences>, String> {
        self.fences.get().map_err(|e| format!("fences: {e}"))
    }

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
            if *st.phase() == Phase::Live {
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
            if *st.phase() == Phase::Live && mtcp_proto::timing::rehint_due(st.hinted_at, now) {
                c.hint(&mut st, reason);
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
            peer_pool: crate::peer_pool::PeerPool::default(),
            replicas,
            custody,
            closed: Mutex::new(HashMap::new()),
            gates: Default::default(),
            accept_tx,
            fences: Default::default(),
        });
        if !inner.cluster.fast_path.is_empty() {
            // A fast-path cluster: the fence table is made now, not in a move's critical path
            // (creating it runs `nft`, tens of milliseconds).
            if let Err(e) = inner.fences() {
                tracing::warn!("the fast path cannot move connections away from here: {e}");
            }
        }
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

    /// Removes the fast path's fence table (the server is exiting).
    pub fn close(&self) {
        self.inner.fences.close();
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
                && *st.phase() == Phase::Live
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
pub(crate) fn sweep_detached(inner: &ServerInner, now: Instant) {
    use mtcp_proto::bounds::{detached_to_drop, Detached};
    let mut conns = Vec::new();
    let mut list = Vec::new();
    for c in inner.all() {
        let st = c.lock();
        let Some(t) = st.detached_at.filter(|_| st.direct.is_none()) else {
            continue;
        };
        if !matches!(st.phase(), Phase::Live | Phase::AppClosed) {
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
