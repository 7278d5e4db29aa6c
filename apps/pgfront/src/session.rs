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
        };
        for p in s.state.prepared.iter().filter(|p| !p.from_sql) {
            s.stmts.insert(p.name.clone(), classify(&p.sql));
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
            self.front
                .pool
                .put(&self.state.startup, self.be, release)
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

    /// A session that moved here: fence the old backend, rebuild the session, finish a commit
    /// that was under way or roll back one that was not yet safe, then serve.
    async fn restart(&mut self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let key = self.cancel_key();
        let epoch = self.conn.epoch();
        let fenced = self
            .front
            .registry
            .register_and_fence(&self.cid, epoch, self.be.pid, key)
            .await?;
        let t1 = t0.elapsed();
        // Transactions an origin prepared and died (or hung) before their commit point was
        // durable: asked along with the restore, after the fence; rolled back below.
        let check = format!(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'mtcp:{}:%'",
            self.cid
        );
        let sets = self.restore(&check).await?;
        let prepared: Vec<String> = sets
            .last()
            .into_iter()
            .flatten()
            .filter_map(|r| r.first().cloned().flatten())
            .collect();
        tracing::debug!(cid = %self.cid, fenced, register_and_fence = ?t1, restore = ?(t0.elapsed() - t1), "session restarting here");
        match self.state.stage.clone() {
            Stage::Pinned { reason } => {
                return Err(SessionError::Fatal(
                    "57P01",
                    format!("terminating connection: the session moved to another server but cannot move ({reason})"),
                ));
            }
            Stage::Commit {
                gid,
                xid,
                reply,
                echo,
            } => {
                if let Some(gid) = &gid {
                    let q = format!("SELECT 1 FROM pg_prepared_xacts WHERE gid = '{gid}'");
                    if !self.be.simple(&q).await?.concat().is_empty() {
                        self.be.simple(&format!("COMMIT PREPARED '{gid}'")).await?;
                    }
                }
                let q = format!("SELECT pg_xact_status('{}'::xid8)", xid.replace('\'', ""));
                let status = self.be.simple(&q).await?.concat();
                let status = status.first().and_then(|r| r.first().cloned()).flatten();
                tracing::info!(cid = %self.cid, %xid, ?gid, ?status, "finishing a commit that was under way");
                match status.as_deref() {
                    Some("committed") if !reply.is_empty() => self.out.extend_from_slice(&reply),
                    Some("committed") => {
                        // Its COMMIT messages on an idle backend: the same answer, less the
                        // "no transaction in progress" warning.
                        self.be.send(&echo).await?;
                        let r = self.answer().await?.unwrap_or_else(|e| e);
                        self.out.extend_from_slice(&r);
                    }
                    Some("aborted") => self.out.extend_from_slice(&not_committed()),
                    _ => {
                        return Err(SessionError::Fatal(
                            "08007",
                            format!("the outcome of transaction {xid} is unknown"),
                        ))
                    }
                }
                self.state.txseq += 1;
                self.flush().await?;
                self.restart_point().await?;
            }
            Stage::Idle => {}
        }
        // Prepared by an origin that died before its commit point was durable — this point's
        // transaction, or (restarting from a Commit point whose Idle successor never reached
        // the backups) a later one: its client was told nothing, and it is replayed from the
        // input below. Its locks would block that replay for good.
        for gid in prepared
            .iter()
            .filter(|g| snapshot::left_over(g, &self.cid, self.state.txseq, epoch))
        {
            tracing::info!(cid = %self.cid, %gid, "rolling back a transaction prepared by a server that did not finish it");
            self.be
                .simple(&format!("ROLLBACK PREPARED '{gid}'"))
                .await?;
        }
        self.serve().await
    }

    /// Recreates the session's settings and prepared statements on the new backend, all sent
    /// at once; `last` is one more query sent along, whose rows come back as the last result
    /// set.
    async fn restore(&mut self, last: &str) -> Result<Vec<crate::backend::Rows>> {
        let mut sql = String::new();
        for (name, value) in &self.state.gucs {
            let (Some(n), Some(v)) = (literal(name), literal(value)) else {
                return Err(SessionError::Fatal(
                    "57P01",
                    format!("cannot restore setting {name}"),
                ));
            };
            sql += &format!("SELECT set_config({n}, {v}, false);");
        }
        let mut answers = 0;
        if !sql.is_empty() {
            self.be.send(&codec::query(&sql)).await?;
            answers += 1;
        }
        // Each SQL PREPARE in a query string of its own, after the settings (its
        // search_path): PostgreSQL records the whole query string as the statement's text,
        // which the next `refresh` reads back; sharing a string with the settings, it would
        // look like a PREPARE inside a multi-statement string and pin the session.
        let mut seen = std::collections::HashSet::new();
        for p in self.state.prepared.iter().filter(|p| p.from_sql) {
            if seen.insert(p.sql.clone()) {
                let q = codec::query(&String::from_utf8_lossy(&p.sql));
                self.be.send(&q).await?;
                answers += 1;
            }
        }
        for p in self.state.prepared.iter().filter(|p| !p.from_sql) {
            self.be
                .send(&codec::parse(&p.name, &p.sql, &p.types))
                .await?;
            self.be.send(&codec::sync()).await?;
            answers += 1;
        }
        self.be.send(&codec::query(last)).await?;
        Ok(self.be.collect(answers + 1).await?)
    }

    /// The main loop: one unit of client work at a time.
    async fn serve(&mut self) -> Result<()> {
        loop {
            let unit = self.next_unit().await?;
            if !matches!(unit, Unit::End) {
                self.at_rest = false;
            }
            match unit {
                Unit::End => return Ok(()),
                Unit::Query(f) => {
                    let FrontMsg::Query { sql } = codec::parse_front(&f)? else {
                        unreachable!("a Query unit holds a Query");
                    };
                    let c = classify(sql);
                    self.note(&c);
                    let mode = plan::decide(self.status, &[Some(&c)], self.points());
                    self.run_unit(mode, std::slice::from_ref(&f), c.copy == Some(true))
                        .await?;
                }
                Unit::Batch(frames) => {
                    let execs = self.batch_execs(&frames)?;
                    let copy_in = execs
                        .iter()
                        .any(|c| c.as_ref().is_some_and(|c| c.copy == Some(true)));
                    let refs: Vec<Option<&Classified>> = execs.iter().map(|c| c.as_ref()).collect();
                    let mode = plan::decide(self.status, &refs, self.points());
                    self.run_unit(mode, &frames, copy_in).await?;
                }
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

    /// Session-level effects a statement may have.
    fn note(&mut self, c: &Classified) {
        self.dirty |= c.session_change;
        self.notify |= c.notify;
        if c.pins_session && self.pinned.is_none() {
            self.pinned = Some(
                "temporary objects, LISTEN, session advisory locks or WITH HOLD cursors".into(),
            );
        }
    }

    /// The statements a batch executes, classified, and bookkeeping of its Parse/Bind/Close.
    fn batch_execs(&mut self, frames: &[Frame]) -> Result<Vec<Option<Classified>>> {
        let mut execs = Vec::new();
        for f in frames {
            match codec::parse_front(f)? {
                FrontMsg::Parse { name, sql, .. } => {
                    let c = classify(sql);
                    self.note(&c);
                    if name.is_empty() {
                        self.unnamed = Some(c);
                    } else {
                        self.dirty = true;
                        self.stmts.insert(name.to_vec(), c);
                    }
                }
                FrontMsg::Bind { portal, statement } => {
                    let c = if statement.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.stmts.get(statement).cloned()
                    };
                    self.portals.insert(portal.to_vec(), c);
                }
                FrontMsg::Execute { portal, .. } => {
                    execs.push(self.portals.get(portal).cloned().flatten());
                }
                FrontMsg::Close { kind: b'S', .. } => self.dirty = true,
                _ => {}
            }
        }
        Ok(execs)
    }

    /// Reads the client's next unit. Backend output that arrives meanwhile (notices,
    /// notifications, answers to a Flush) is passed on at once.
    async fn next_unit(&mut self) -> Result<Unit> {
        self.at_rest = true;
        let mut batch: Vec<Frame> = Vec::new();
        let mut held = 0usize;
        loop {
            while let Some(f) = codec::split_frame(&mut self.inbuf, self.front.max_message)? {
                match codec::parse_front(&f)? {
                    FrontMsg::Query { .. } if batch.is_empty() => return Ok(Unit::Query(f)),
                    FrontMsg::Query { .. } => {
                        return Err(SessionError::Fatal(
                            "08P01",
                            "Query message inside an unfinished extended-protocol batch".into(),
                        ))
                    }
                    FrontMsg::Terminate => return Ok(Unit::End),
                    FrontMsg::Sync => {
                        batch.push(f);
                        return Ok(Unit::Batch(batch));
                    }
                    FrontMsg::Flush => {
                        // The client waits for answers before its Sync: send what it has.
                        self.at_rest = false;
                        for m in batch.drain(..) {
                            self.be.send(&m.raw).await?;
                        }
                        self.be.send(&f.raw).await?;
                    }
                    FrontMsg::CopyData | FrontMsg::CopyDone | FrontMsg::CopyFail { .. } => {
                        // Outside COPY the server ignores these too.
                    }
                    FrontMsg::Other { tag } => {
                        return Err(SessionError::Fatal(
                            "08P01",
                            format!("unexpected message type {:?}", tag as char),
                        ))
                    }
                    _ => {
                        held += f.raw.len();
                        if held > MAX_BATCH {
                            return Err(SessionError::Fatal(
                                "54000",
                                format!("more than {MAX_BATCH} bytes of messages without a Sync"),
                            ));
                        }
                        batch.push(f);
                    }
                }
            }
            self.flush().await?;
            self.inbuf.reserve(8 << 10);
            tokio::select! {
                // The client first (no random pick): its input is what the loop waits for.
                biased;
                n = self.conn.read_buf(&mut self.inbuf) => {
                    if n? == 0 {
                        return Ok(Unit::End);
                    }
                }
                r = self.be.fill() => {
                    r?;
                    while let Some(f) = self.be.buffered_frame()? {
                        self.out.extend_from_slice(&f.raw);
                    }
                }
            }
        }
    }

    /// Runs one unit as `mode` says.
    async fn run_unit(&mut self, mode: Mode, frames: &[Frame], copy_in: bool) -> Result<()> {
        tracing::trace!(cid = %self.cid, ?mode, status = %(self.status as char), "unit");
        // Whether the restart point after the unit was already taken (inside a lock).
        let mut taken = false;
        match mode {
            Mode::Forward => {
                self.send_all(frames).await?;
                self.status = self.pump(false).await?;
                self.flush().await?;
            }
            Mode::Locked => {
                let guard = self.conn.lock_state().await?;
                self.send_all(frames).await?;
                self.status = self.pump(false).await?;
                self.flush().await?;
                if self.status == IDLE {
                    // It may have committed: never restart before this point.
                    self.state.txseq += 1;
                    self.restart_point().await?;
                    taken = true;
                }
                drop(guard);
            }
            Mode::Wrap => {
                self.be.send(&codec::query("BEGIN")).await?;
                self.send_all(frames).await?;
                // The check rides along unless COPY input must follow the statement.
                let check = "SELECT pg_current_xact_id_if_assigned()";
                if !copy_in {
                    self.be.send(&codec::query(check)).await?;
                }
                self.be.collect(1).await?;
                let status = self.pump(true).await?;
                let xid = if copy_in {
                    self.be.send(&codec::query(check)).await?;
                    self.be.collect(1).await
                } else {
                    self.be.collect(1).await
                };
                // The transaction id if it wrote anything (an error leaves none to read).
                let xid = xid
                    .ok()
                    .and_then(|sets| sets.concat().first().and_then(|r| r.first().cloned()))
                    .flatten();
                match xid {
                    Some(xid) if status == IN_TXN => {
                        // PostgreSQL commits a simple Query's implicit transaction before it
                        // sends the last statement's CommandComplete, so a commit that fails
                        // (a deferred constraint) is answered by the error alone: that
                        // CommandComplete waits for the commit, in the reply. What came before
                        // it goes out now, ahead of the commit's durable restart point.
                        let done = match frames.first() {
                            Some(f) if f.tag() == b'Q' => self.take_last_complete(),
                            _ => Vec::new(),
                        };
                        self.flush().await?;
                        self.commit(&[], Some(xid), done).await?;
                        taken = true;
                    }
                    _ => {
                        // Read-only or failed: ending it twice would change nothing.
                        let end = if status == IN_TXN {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        self.be.simple(end).await?;
                        self.out.extend_from_slice(&codec::ready_for_query(IDLE));
                        self.flush().await?;
                    }
                }
                self.status = IDLE;
            }
            Mode::Commit => {
                self.commit(frames, None, Vec::new()).await?;
                self.status = IDLE;
                taken = true;
            }
        }
        if self.status == IDLE && !taken {
            self.notify = false;
            self.restart_point().await?;
        }
        Ok(())
    }

    async fn send_all(&mut self, frames: &[Frame]) -> Result<()> {
        for f in frames {
            self.be.send(&f.raw).await?;
        }
        Ok(())
    }

    /// Passes the backend's answers to the client up to the next ReadyForQuery, feeding COPY
    /// input from the client when the backend asks for it. Returns the transaction status;
    /// with `hold`, that ReadyForQuery is not passed on.
    async fn pump(&mut self, hold: bool) -> Result<u8> {
        loop {
            let f = self.be.frame().await?;
            match codec::parse_back(&f)? {
                BackMsg::ReadyForQuery { status } => {
                    if !hold {
                        self.out.extend_from_slice(&f.raw);
                    }
                    return Ok(status);
                }
                BackMsg::CopyInResponse => {
                    self.out.extend_from_slice(&f.raw);
                    self.flush().await?;
                    self.copy_in().await?;
                }
                _ => {
                    self.out.extend_from_slice(&f.raw);
                    // With `hold`, a CommandComplete may be one `run_unit` withholds until its
                    // commit: it stays in `out` until another message follows it.
                    let withheld = hold && f.tag() == b'C';
                    if self.out.len() >= OUT_FLUSH && !withheld {
                        self.flush().await?;
                    }
                }
            }
        }
    }

    /// Feeds the client's COPY data to the backend until CopyDone or CopyFail.
    async fn copy_in(&mut self) -> Result<()> {
        loop {
            while let Some(f) = codec::split_frame(&mut self.inbuf, self.front.max_message)? {
                let done = matches!(
                    codec::parse_front(&f)?,
                    FrontMsg::CopyDone | FrontMsg::CopyFail { .. }
                );
                self.be.send(&f.raw).await?;
                if done {
                    return Ok(());
                }
            }
            self.inbuf.reserve(64 << 10);
            if self.conn.read_buf(&mut self.inbuf).await? == 0 {
                return Err(SessionError::Fatal(
                    "08P01",
                    "client went away during COPY".into(),
                ));
            }
        }
    }

    /// The commit path (seed Examples 2 and 3). Under `lock_state`, and before the transaction
    /// can commit, a durable restart point records its id (and, with two-phase commit, its
    /// gid): a restart from it learns from PostgreSQL whether it committed and tells the
    /// client exactly that. With two-phase commit: `PREPARE TRANSACTION`, durable point,
    /// `COMMIT PREPARED`; without: durable point, `COMMIT`. Then the reply and an Idle restart
    /// point. `client` are the client's COMMIT messages (none for a wrapped statement, whose
    /// reply is `done` — its withheld CommandComplete, if any — and ReadyForQuery, and whose
    /// id `xid` is known).
    async fn commit(&mut self, client: &[Frame], xid: Option<String>, done: Vec<u8>) -> Result<()> {
        let guard = match self.conn.lock_state().await {
            Ok(g) => g,
            Err(e) => {
                let _ = self.be.simple("ROLLBACK").await;
                return Err(e.into());
            }
        };
        let xid = match xid {
            Some(x) => x,
            None => {
                let sets = self
                    .be
                    .simple("SELECT pg_current_xact_id_if_assigned()")
                    .await?;
                match sets
                    .concat()
                    .first()
                    .and_then(|r| r.first().cloned())
                    .flatten()
                {
                    Some(x) => x,
                    None => {
                        // Read-only: committing it again after a move changes nothing.
                        self.send_all(client).await?;
                        self.status = self.pump(false).await?;
                        self.flush().await?;
                        self.state.txseq += 1;
                        self.restart_point().await?;
                        drop(guard);
                        return Ok(());
                    }
                }
            }
        };
        let wrapped = client.is_empty();
        // A wrapped statement's reply: its withheld CommandComplete (`done`), ReadyForQuery.
        let wrapped_reply = [&done[..], &codec::ready_for_query(IDLE)[..]].concat();
        let echo: Vec<u8> = client.iter().flat_map(|f| f.raw.iter().copied()).collect();
        let gid = self
            .rules()
            .prepare_allowed()
            .then(|| snapshot::gid(&self.cid, self.state.txseq, self.conn.epoch()));
        let reply = if let Some(gid) = &gid {
            self.be
                .send(&codec::query(&format!("PREPARE TRANSACTION '{gid}'")))
                .await?;
            self.send_all(client).await?;
            let prepared = self.answer().await?;
            let echoed = if wrapped {
                None
            } else {
                Some(self.answer().await?)
            };
            if let Err(err) = prepared {
                // Refused (a deferred constraint, a serialization failure, …): the transaction
                // is gone and the client hears why, as from its COMMIT.
                self.out.extend_from_slice(&err);
                self.out.extend_from_slice(&codec::ready_for_query(IDLE));
                self.flush().await?;
                self.state.txseq += 1;
                self.restart_point().await?;
                drop(guard);
                return Ok(());
            }
            match echoed {
                Some(r) => r.unwrap_or_else(|e| e).to_vec(),
                None => wrapped_reply,
            }
        } else if wrapped {
            wrapped_reply
        } else {
            // Known only once COMMIT ran; a restart regenerates it from `echo`.
            Vec::new()
        };
        let snap = self.snapshot(Stage::Commit {
            gid: gid.clone(),
            xid: xid.clone(),
            reply: reply.clone(),
            echo: if reply.is_empty() { echo } else { Vec::new() },
        });
        self.front.crash_point(CrashPoint::Prepared);
        if let Err(e) = self.conn.set_state_durable(snap).await {
            if !matches!(e, StateError::NotDurable(_)) {
                return Err(e.into());
            }
            // The point may be on some backup: whoever restarts from it asks PostgreSQL, which
            // will say "aborted" — and so does this server now.
            tracing::warn!(cid = %self.cid, "{e}; rolling the transaction back");
            match &gid {
                Some(g) => self.be.simple(&format!("ROLLBACK PREPARED '{g}'")).await?,
                None => self.be.simple("ROLLBACK").await?,
            };
            self.out.extend_from_slice(&not_committed());
            self.flush().await?;
            self.state.txseq += 1;
            self.restart_point().await?;
            drop(guard);
            return Ok(());
        }
        self.front.crash_point(CrashPoint::Durable);
        let reply = match &gid {
            Some(g) => {
                self.be.simple(&format!("COMMIT PREPARED '{g}'")).await?;
                reply
            }
            None if wrapped => {
                self.be.simple("COMMIT").await?;
                reply
            }
            None => {
                self.send_all(client).await?;
                self.answer().await?.unwrap_or_else(|e| e).to_vec()
            }
        };
        self.front.crash_point(CrashPoint::Committed);
        self.state.txseq += 1;
        self.out.extend_from_slice(&reply);
        self.flush().await?;
        self.front.crash_point(CrashPoint::Replied);
        self.restart_point().await?;
        drop(guard);
        Ok(())
    }

    /// The answer to one query/Sync already sent, up to its ReadyForQuery included, less
    /// "there is no transaction in progress" warnings: `Ok(bytes)`, or `Err(bytes)` holding the
    /// ErrorResponse when it failed.
    async fn answer(&mut self) -> Result<Result<Bytes, Bytes>> {
        let mut b = BytesMut::new();
        let mut err = None;
        loop {
            let f = self.be.frame().await?;
            match codec::parse_back(&f)? {
                BackMsg::NoticeResponse { fields }
                    if codec::field(&fields, b'C') == Some(b"25P01") => {}
                BackMsg::ErrorResponse { .. } => {
                    err.get_or_insert(f.raw.clone());
                    b.extend_from_slice(&f.raw);
                }
                BackMsg::ReadyForQuery { .. } => {
                    b.extend_from_slice(&f.raw);
                    return Ok(match err {
                        None => Ok(b.freeze()),
                        Some(e) => Err(e),
                    });
                }
                _ => b.extend_from_slice(&f.raw),
            }
        }
    }

    /// Takes the last message out of `out` if it is a CommandComplete (`out` holds whole
    /// backend messages); empty otherwise.
    fn take_last_complete(&mut self) -> Vec<u8> {
        let (mut at, mut last) = (0, None);
        while let Some(len) = self.out.get(at + 1..at + 5) {
            last = Some(at);
            at += 1 + u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        }
        match last {
            Some(l) if self.out[l] == b'C' && at == self.out.len() => {
                self.out.split_off(l).to_vec()
            }
            _ => Vec::new(),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            // The connection copies what it is given (into its output log), so `out` keeps its
            // buffer for the next answer.
            self.conn.write_all(&self.out).await?;
            self.out.clear();
            if self.out.capacity() > 2 * OUT_FLUSH {
                // A large answer (one big row) does not stay allocated.
                self.out = BytesMut::new();
            }
        }
        Ok(())
    }

    /// The snapshot of the session as it is now, at `stage`.
    fn snapshot(&mut self, stage: Stage) -> Vec<u8> {
        // Encoded in place (one per transaction): the session's own state with this stage and
        // the unread input, then its stage put back.
        let stage = std::mem::replace(&mut self.state.stage, stage);
        self.state.leftover.clear();
        self.state.leftover.extend_from_slice(&self.inbuf);
        let v = self.state.encode();
        self.state.stage = stage;
        v
    }

    /// A restart point at Idle (everything sent so far is answered): refreshes the settings and
    /// prepared statements first if they may have changed. A pinned session leaves a marker
    /// instead, so that a move ends it clearly.
    async fn restart_point(&mut self) -> Result<()> {
        if self.dirty {
            self.refresh().await?;
        }
        let stage = match &self.pinned {
            Some(reason) => Stage::Pinned {
                reason: reason.clone(),
            },
            None => Stage::Idle,
        };
        let snap = self.snapshot(stage);
        match self.conn.set_state_barrier(snap) {
            // Restarted here and still regenerating what the client already has (its position
            // lies past this point): the restart point this session came with stays the one
            // to use until that is checked, and a restart from it reaches this same point.
            Err(StateError::Replaying) => {
                tracing::debug!(cid = %self.cid, "restart point skipped while the replay is checked");
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Reads the session's settings and prepared statements back from the backend.
    async fn refresh(&mut self) -> Result<()> {
        let sets = self
            .be
            .simple(
                "SELECT name, setting FROM pg_settings WHERE source = 'session' ORDER BY name;
                 SELECT name, statement, from_sql, parameter_types::oid[]::text
                   FROM pg_prepared_statements ORDER BY prepare_time, name",
            )
            .await?;
        let get =
            |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        self.state.gucs = sets.first().map_or(Vec::new(), |rows| {
            rows.iter().map(|r| (get(r, 0), get(r, 1))).collect()
        });
        self.state.prepared = sets.get(1).map_or(Vec::new(), |rows| {
            rows.iter()
                .map(|r| Prepared {
                    name: get(r, 0).into_bytes(),
                    sql: get(r, 1).into_bytes(),
                    from_sql: get(r, 2) == "t",
                    types: get(r, 3)
                        .trim_matches(|c| c == '{' || c == '}')
                        .split(',')
                        .filter_map(|t| t.parse().ok())
                        .collect(),
                })
                .collect()
        });
        if self
            .state
            .prepared
            .iter()
            .any(|p| p.from_sql && classify(&p.sql).statements != 1)
            && self.pinned.is_none()
        {
            self.pinned = Some("a PREPARE inside a multi-statement query string".into());
        }
        self.dirty = false;
        Ok(())
    }
}

/// What a client whose COMMIT did not commit hears: a serialization failure (retryable), then
/// ReadyForQuery.
fn not_committed() -> Vec<u8> {
    let mut b = codec::error_response(
        "ERROR",
        "40001",
        "could not serialize access: the transaction was rolled back while its session moved between servers",
    )
    .to_vec();
    b.extend_from_slice(&codec::ready_for_query(IDLE));
    b
}
