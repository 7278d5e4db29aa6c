//! One client session: the client's messages in, the backend's answers out, restart points at
//! Idle, the commit path, and the restart of a session that moved here.
//!
//! The loop reads one unit of client work at a time — a simple Query, or extended-protocol
//! messages up to their Sync — runs it on the backend as [`plan::decide`] says, and passes the
//! answers through unchanged. A unit is forwarded only once the previous one is answered, so
//! whenever the backend is idle every byte the client sent is either answered or still in
//! `inbuf` (which the snapshot carries).

use crate::backend::{literal, Backend, BackendError};
use crate::codec::{self, BackMsg, CodecError, Frame, FrontMsg, Startup};
use crate::plan::{self, CommitRules, Mode, IDLE, IN_TXN};
use crate::snapshot::{self, Prepared, Snapshot, Stage};
use crate::sql::{classify, Classified};
use crate::{CrashPoint, Front};
use bytes::{Bytes, BytesMut};
use mtcp::{Connection, Start, StateError};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod begin;
mod commit;
mod exchange;
mod input;
mod restart;

/// Output buffered before it is written to the client.
const OUT_FLUSH: usize = 64 << 10;
/// Most bytes of extended-protocol messages held before their Sync.
const MAX_BATCH: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client connection: closed, migrated away, aborted.
    #[error("client: {0}")]
    Client(#[from] io::Error),
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("invalid message from the client: {0}")]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// Something the client must be told with a FATAL error (SQLSTATE, message).
    #[error("{1}")]
    Fatal(&'static str, String),
}

impl SessionError {
    /// Whether this ends the session because it moved to another server.
    pub fn migrated(&self) -> bool {
        match self {
            SessionError::Client(e) => mtcp::is_migrated(e),
            SessionError::State(e) => *e == StateError::Migrated,
            _ => false,
        }
    }
}

type Result<T, E = SessionError> = std::result::Result<T, E>;

/// What the client's next unit of work is.
enum Unit {
    Query(Frame),
    /// Extended-protocol messages ending with Sync.
    Batch(Vec<Frame>),
    End,
}

pub struct Session {
    conn: Connection,
    front: Arc<Front>,
    be: Backend,
    cid: String,
    inbuf: BytesMut,
    out: BytesMut,
    /// The backend's transaction status as the client knows it.
    status: u8,
    /// Startup parameters, transaction count, settings and prepared statements.
    state: Snapshot,
    /// Classification of the named statements, for their Executes.
    stmts: HashMap<Vec<u8>, Classified>,
    unnamed: Option<Classified>,
    portals: HashMap<Vec<u8>, Option<Classified>>,
    /// Settings or prepared statements may have changed since the last snapshot.
    dirty: bool,
    /// Why the session cannot move, once it cannot.
    pinned: Option<String>,
    /// The open transaction mentioned NOTIFY.
    notify: bool,
    /// The backend has answered everything it was sent: the session waits for its client's
    /// next unit (the backend can go back to the pool if the session ends now).
    at_rest: bool,
    /// Held while a unit runs or a transaction is open: a move waits a little for the
    /// transaction's end (decision 55) rather than replay it on a new backend.
    soft: Option<mtcp::SoftGuard>,
    /// A plain BEGIN already answered, sent with the next unit (see [`begin`]).
    begin: Option<begin::Deferred>,
    /// Named statements that are a plain BEGIN, with its tag.
    begin_stmts: HashMap<Vec<u8>, &'static str>,
    /// Set while the backend's `lock_timeout` is the replay's bound (decision 76, see
    /// [`restart`]).
    replay_locks: Option<restart::ReplayBound>,
}

/// Runs one connection of the front-end to its end.
pub async fn run(front: Arc<Front>, mut conn: Connection) -> io::Result<()> {
    let r = match conn.start().clone() {
        Start::New => match accept(&front, &mut conn).await {
            Ok(Some(s)) => serve(front.clone(), conn, s).await,
            Ok(None) => Ok(()),
            Err(e) => fail(&mut conn, e).await,
        },
        Start::Migrated(b) => match Snapshot::decode(&b) {
            Ok(snap) => serve_restart(front.clone(), conn, snap).await,
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        },
    };
    r
}

/// A brand-new client: SSL refusal, CancelRequest or startup. `None`: nothing more to do.
async fn accept(
    front: &Front,
    conn: &mut Connection,
) -> Result<Option<(Vec<(String, String)>, BytesMut)>> {
    let mut inbuf = BytesMut::with_capacity(1024);
    loop {
        let Some(s) = codec::decode_startup(&mut inbuf, codec::MAX_STARTUP)? else {
            if conn.read_buf(&mut inbuf).await? == 0 {
                return Ok(None);
            }
            continue;
        };
        match s {
            Startup::SslRequest | Startup::GssEncRequest => {
                conn.write_all(codec::REFUSE_ENCRYPTION).await?;
            }
            Startup::Cancel { pid, secret } => {
                match front.registry.cancel((pid, secret)).await {
                    Ok(found) => tracing::debug!(found, "cancel request"),
                    Err(e) => tracing::warn!("cancel request: {e}"),
                }
                return Ok(None);
            }
            Startup::Startup { params, .. } => {
                if params.iter().any(|(k, _)| k == "replication") {
                    return Err(SessionError::Fatal(
                        "08P01",
                        "replication connections are not supported by the M-TCP front-end".into(),
                    ));
                }
                return Ok(Some((params, inbuf)));
            }
        }
    }
}

/// Tells the client why its session ends (unless it moved away), then ends it.
async fn fail(conn: &mut Connection, e: SessionError) -> io::Result<()> {
    if e.migrated() {
        return Err(StateError::Migrated.into());
    }
    let (code, msg) = match &e {
        SessionError::Fatal(c, m) => (*c, m.clone()),
        SessionError::Codec(_) => ("08P01", e.to_string()),
        SessionError::Backend(BackendError::Refused(f)) => {
            let _ = conn.write_all(&f.raw).await;
            return Err(io::Error::other(e.to_string()));
        }
        SessionError::Client(_) | SessionError::State(_) => {
            return Err(io::Error::other(e.to_string()))
        }
        _ => ("57P01", format!("terminating connection: {e}")),
    };
    let _ = conn
        .write_all(&codec::error_response("FATAL", code, &msg))
        .await;
    Err(io::Error::other(msg))
}

async fn serve(
    front: Arc<Front>,
    mut conn: Connection,
    (params, inbuf): (Vec<(String, String)>, BytesMut),
) -> io::Result<()> {
    let be = match backend(&front, &params).await {
        Ok(be) => be,
        Err(e) => return fail(&mut conn, e.into()).await,
    };
    let state = Snapshot {
        stage: Stage::Idle,
        startup: params,
        txseq: 0,
        gucs: Vec::new(),
        prepared: Vec::new(),
        leftover: Vec::new(),
    };
    let mut s = Session::new(front, conn, be, state, inbuf);
    let r = s.greet().await;
    s.finish(r).await
}

async fn serve_restart(front: Arc<Front>, mut conn: Connection, snap: Snapshot) -> io::Result<()> {
    let t0 = std::time::Instant::now();
    let be = match backend(&front, &snap.startup).await {
        Ok(be) => be,
        Err(e) => return fail(&mut conn, e.into()).await,
    };
    tracing::debug!(connect = ?t0.elapsed(), "backend connected");
    let inbuf = BytesMut::from(&snap.leftover[..]);
    let mut s = Session::new(front, conn, be, snap, inbuf);
    let r = s.restart().await;
    s.finish(r).await
}

/// A backend for a session opened with `params`: a warm one from the pool, or a new one.
async fn backend(
    front: &Front,
    params: &[(String, String)],
) -> Result<Backend, crate::backend::BackendError> {
    match front.pool.take(params) {
        Some(be) => Ok(be),
        None => Backend::connect(&front.target, params, front.max_message).await,
    }
}

impl Session {
    fn new(
        front: Arc<Front>,
        conn: Connection,
        be: Backend,
        state: Snapshot,
        inbuf: BytesMut,
    ) -> Self {
        let cid = conn.cid().to_string();
        let mut s = Session {
            conn,
            front,
            be,
            cid,
            inbuf,
            out: BytesMut::new(),
            status: IDLE,
            state,
            stmts: HashMap::new(),
            unnamed: None,
            portals: HashMap::new(),
            dirty: false,
            pinned: None,
            notify: false,
            at_rest: false,
            soft: None,
            begin: None,
            begin_stmts: HashMap::new(),
            replay_locks: None,
        };
        for p in s.state.prepared.iter().filter(|p| !p.from_sql) {
            s.stmts.insert(p.name.clone(), classify(&p.sql));
            if let Some(tag) = crate::sql::plain_begin(&p.sql) {
                s.begin_stmts.insert(p.name.clone(), tag);
            }
        }
        s
    }

    /// Ends the session: the client is told why if it must be, the backend goes.
    async fn finish(mut self, r: Result<()>) -> io::Result<()> {
        let migrated = r.as_ref().is_err_and(|e| e.migrated());
        if (r.is_ok() || migrated) && self.at_rest && self.pinned.is_none() {
            // Reset, out of the registry (unless a fence got it first), into the pool.
            let (front, pid, cid) = (self.front.clone(), self.be.pid, self.cid.clone());
            let release = async move { front.registry.release(pid, &cid).await };
            // Moved away between transactions: nothing to roll back, so out of the registry
            // first — the destination's fence, a moment away, then leaves this backend alone
            // instead of terminating it (a new backend costs the database a process start).
            let first = migrated && self.status == IDLE;
            self.front
                .pool
                .put(&self.state.startup, self.be, release, first)
                .await;
        } else {
            let _ = self.be.send(&codec::terminate()).await;
            if !migrated {
                // A moved session's backend stays registered until it is gone (the
                // destination fences it); the sweep forgets it then.
                self.front.registry.unregister(self.be.pid).await;
            }
        }
        match r {
            Ok(()) => Ok(()),
            Err(e) => fail(&mut self.conn, e).await,
        }
    }

    /// The cancel key the client gets: a keyed function of the connection, so every front-end
    /// regenerates the same one.
    fn cancel_key(&self) -> (i32, i32) {
        crate::cancel_key(&self.cid)
    }

    /// A new session: register the backend, answer the startup, first restart point, serve.
    async fn greet(&mut self) -> Result<()> {
        let key = self.cancel_key();
        self.front
            .registry
            .register(&self.cid, self.conn.epoch(), self.be.pid, key)
            .await?;
        self.out.extend_from_slice(&codec::auth_ok());
        for p in &self.be.startup_params {
            self.out.extend_from_slice(&p.raw);
        }
        self.out
            .extend_from_slice(&codec::backend_key_data(key.0, key.1));
        self.out.extend_from_slice(&codec::ready_for_query(IDLE));
        self.flush().await?;
        self.restart_point().await?;
        self.serve().await
    }

    /// The main loop: one unit of client work at a time.
    async fn serve(&mut self) -> Result<()> {
        loop {
            let unit = self.next_unit().await?;
            self.end_replay_bound().await?;
            if !matches!(unit, Unit::End) {
                self.at_rest = false;
                if self.soft.is_none() {
                    self.soft = Some(self.conn.soft_lock()?);
                }
            }
            match unit {
                Unit::End => return Ok(()),
                Unit::Query(f) => {
                    let FrontMsg::Query { sql } = codec::parse_front(&f)? else {
                        unreachable!("a Query unit holds a Query");
                    };
                    if self.status == IDLE && self.front.defer_begin {
                        if let Some((answer, tag)) = plan::begin::query_begin(sql) {
                            self.defer_begin(vec![f], &answer, tag);
                            continue;
                        }
                    }
                    let c = classify(sql);
                    self.note(&c);
                    let mode = plan::decide(self.status, &[Some(&c)], self.points());
                    self.run_unit(mode, std::slice::from_ref(&f), c.copy == Some(true))
                        .await?;
                }
                Unit::Batch(frames) => {
                    let execs = self.batch_execs(&frames)?;
                    if self.status == IDLE && self.front.defer_begin {
                        let named = |n: &[u8]| self.begin_stmts.get(n).copied();
                        if let Some((answer, tag)) = plan::begin::batch_begin(&frames, named) {
                            self.defer_begin(frames, &answer, tag);
                            continue;
                        }
                    }
                    let copy_in = execs
                        .iter()
                        .any(|c| c.as_ref().is_some_and(|c| c.copy == Some(true)));
                    let refs: Vec<Option<&Classified>> = execs.iter().map(|c| c.as_ref()).collect();
                    let mode = plan::decide(self.status, &refs, self.points());
                    self.run_unit(mode, &frames, copy_in).await?;
                }
            }
            if self.status == IDLE {
                self.soft = None;
            }
        }
    }

    /// Whether commits need a durable commit point (see [`plan::decide`]).
    fn points(&self) -> bool {
        self.front.two_phase || self.conn.replicated()
    }

    fn rules(&self) -> CommitRules {
        CommitRules {
            two_phase: self.front.two_phase,
            pinned: self.pinned.is_some(),
            notify: self.notify,
        }
    }
}
