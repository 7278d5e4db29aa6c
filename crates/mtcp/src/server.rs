//! The server side of the runtime: the public `Server`, its listeners and background tasks, the
//! registry of connections (`ServerInner`: lookup, status, hints to every connection) and the
//! janitor that forgets connections whose agent is gone. A session on the data port is served
//! by `session.rs`; a MIGRATE's takeover is `takeover.rs`, the origin's side `origin.rs`.

use crate::accept::{self, Port};
use crate::config::{Cluster, ConfigError, Limits};
use crate::conn::Connection;
use crate::conn_state::{Accepted, ConnState, Phase};
use crate::metrics::{self, CONNECTIONS, HANDOVERS, REPLICAS_HELD, REPLICA_BYTES, RETENTION_BYTES};
use crate::peer;
use crate::probe::overload_loop;
use crate::registry::{sweep_detached, ServerInner};
use ::metrics::{counter, gauge};
use mtcp_proto::wire::{RefuseCode, ServerStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

/// A server of an M-TCP cluster: accepts new and migrated connections.
pub struct Server {
    inner: Arc<ServerInner>,
    rx: mpsc::UnboundedReceiver<Accepted>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Connections set up but never accepted end as if their application had dropped them;
        // a session that finds the queue closed ends its own the same way.
        self.rx.close();
        while let Ok(a) = self.rx.try_recv() {
            drop(Connection::new(a, self.inner.clone()));
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
            drains: AtomicU64::new(0),
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
            handoff: Default::default(),
        });
        if !inner.cluster.fast_path.is_empty() && !inner.limits.local_handoff {
            // A fast-path cluster that moves with TCP_REPAIR: the fence table is made now, not
            // in a move's critical path (creating it runs `nft`, tens of milliseconds). With the
            // local hand-over it is made only if a move needs it (a destination on another
            // host): its chains would otherwise look at every packet of the host for nothing.
            if let Err(e) = inner.fences() {
                tracing::warn!("the fast path cannot move connections away from here: {e}");
            }
        }
        let mut tasks = vec![];
        if !inner.cluster.fast_path.is_empty() && inner.limits.local_handoff {
            // Servers on this host hand fast-path sockets over directly (decision 56).
            match inner.handoff.listen(&me.data) {
                Ok(t) => tasks.push(t),
                Err(e) => tracing::warn!(
                    "no local hand-over (`{}`): fast-path connections move here with TCP_REPAIR only: {e}",
                    crate::handoff::name(&me.data)
                ),
            }
        }
        tasks.extend([
            tokio::spawn(accept::accept_loop(data, inner.clone(), Port::Data)),
            tokio::spawn(accept::accept_loop(peer_l, inner.clone(), Port::Peer)),
            tokio::spawn(accept::accept_loop(admin, inner.clone(), Port::Admin)),
            tokio::spawn(janitor(Arc::downgrade(&inner))),
        ]);
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
        let a = self.rx.recv().await?;
        Some(Connection::new(a, self.inner.clone()))
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
    pub fn metrics(&self) -> ServerSampler {
        ServerSampler(Arc::downgrade(&self.inner))
    }

    /// Refuses new connections and hints every connection to move elsewhere, a window at a time
    /// (decision 61). Called from within the server's tokio runtime (it starts the pacing task).
    pub fn drain(&self) {
        self.inner.drain();
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

/// The states [`CONNECTIONS`] shows of a server's connections (besides `handing_over`).
const SERVER_STATES: [&str; 5] = ["live", "closing", "detached", "leaving", "ending"];

/// A connection's state: its index in [`SERVER_STATES`].
fn state_index(st: &ConnState) -> usize {
    if st.detached_at.is_some() {
        // Detached by an agent that said it moves the connection (`Msg::Leaving`): its
        // destination will fetch it, unlike a detached one, whose agent may be gone.
        return if st.leaving { 3 } else { 2 };
    }
    match st.phase() {
        Phase::Live => 0,
        Phase::AppClosed => 1,
        Phase::Migrated | Phase::Aborted(_) | Phase::Closed => 4,
    }
}

/// Publishes a server's levels; does nothing once the server is gone.
#[derive(Clone)]
pub struct ServerSampler(pub(crate) Weak<ServerInner>);

impl ServerSampler {
    /// Sets every gauge (and the counters kept as atomics) to what the server holds now: one
    /// short lock of each connection, as `mtcp drain`'s status does.
    pub fn sample(&self) {
        metrics::sample_bytes();
        metrics::sample_sessions();
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let mut by_state = [0usize; SERVER_STATES.len()];
        let mut kept = 0u64;
        for c in inner.all() {
            let st = c.lock();
            by_state[state_index(&st)] += 1;
            kept += st.s.kept_bytes();
        }
        for (name, n) in SERVER_STATES.iter().zip(by_state) {
            gauge!(CONNECTIONS, "state" => *name).set(n as f64);
        }
        let handing = inner.handing_over.load(Ordering::Relaxed);
        gauge!(CONNECTIONS, "state" => "handing_over").set(handing as f64);
        gauge!(RETENTION_BYTES).set(kept as f64);
        let (entries, bytes) = inner.replicas.usage();
        gauge!(REPLICAS_HELD).set(entries as f64);
        gauge!(REPLICA_BYTES).set(bytes as f64);
        counter!(HANDOVERS).absolute(inner.migrated_out.load(Ordering::Relaxed));
    }
}
