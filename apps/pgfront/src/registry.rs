//! The fence registry: which backend process serves which M-TCP connection, kept in the
//! database itself (`mtcp.backends`, in the `--backend` URL's database) over one control
//! connection per front-end.
//!
//! A front-end that restarts a session terminates every other backend registered for the
//! connection before it replays or finishes anything, so an origin that was only hung (or cut
//! off) and wakes up later has no backend left to commit with. Rows are matched with
//! `pg_stat_activity` on `(pid, backend_start)`, so a reused pid is never mistaken for one. The
//! same table routes CancelRequests: the key the client got is derived from its connection.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};

const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(7283001);
    CREATE SCHEMA IF NOT EXISTS mtcp;
    CREATE TABLE IF NOT EXISTS mtcp.backends (
        pid int PRIMARY KEY,
        backend_start timestamptz NOT NULL,
        cid text NOT NULL,
        epoch bigint NOT NULL,
        key_pid int NOT NULL,
        key_secret int NOT NULL
    );
    ALTER TABLE mtcp.backends ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS backends_cid ON mtcp.backends (cid);
";

/// Records backend `$1` for connection `$2` at epoch `$5`, its client holding key (`$3`, `$4`):
/// the text of [`REGISTER`] and of [`REGISTER_AND_FENCE`]'s second part.
macro_rules! upsert_backend {
    () => {
        "INSERT INTO mtcp.backends (pid, backend_start, cid, epoch, key_pid, key_secret)
        SELECT pid, backend_start, $2, $5, $3, $4 FROM pg_stat_get_activity($1)
        ON CONFLICT (pid) DO UPDATE SET backend_start = EXCLUDED.backend_start,
        cid = EXCLUDED.cid, epoch = EXCLUDED.epoch, key_pid = EXCLUDED.key_pid,
        key_secret = EXCLUDED.key_secret"
    };
}

/// Records backend `$1` for connection `$2` at epoch `$5`, its client holding key (`$3`, `$4`).
const REGISTER: &str = upsert_backend!();

/// [`REGISTER`], and deletes and terminates the rows of the connection's older epochs. The
/// victims' rows are deleted by the same statement that terminates them: a front-end giving a
/// backend back to its pool ([`RELEASE`]) deletes the row too, and only one of the two can.
/// (Data-modifying WITHs run once, in full, before the outer query: pg_terminate_backend only
/// sees this connection's rows.) Backends are looked up one by one with
/// `pg_stat_get_activity(pid)`, not in the `pg_stat_activity` view: it read every backend's
/// entry and joined two catalogs, ~0.3 ms of the database's CPU per move.
///
/// Unless `$6` (force), a victim not running a statement (`idle`, `idle in transaction`) is
/// spared and counted instead: its front-end, moved away from, is about to release it (see
/// [`Registry::register_and_fence`]).
const REGISTER_AND_FENCE: &str = concat!(
    "WITH victims AS (
    DELETE FROM mtcp.backends b
    WHERE b.cid = $2 AND b.epoch < $5 AND b.pid <> $1
    AND EXISTS (SELECT 1 FROM pg_stat_get_activity(b.pid) a
        WHERE a.backend_start = b.backend_start AND ($6 OR a.state = 'active'))
    RETURNING b.pid),
    spared AS (SELECT 1 FROM mtcp.backends b
    WHERE b.cid = $2 AND b.epoch < $5 AND b.pid <> $1
    AND EXISTS (SELECT 1 FROM pg_stat_get_activity(b.pid) a
        WHERE a.backend_start = b.backend_start AND NOT ($6 OR a.state = 'active'))),
    mine AS (",
    upsert_backend!(),
    "
    RETURNING 1)
    SELECT (SELECT count(*) FROM mine),
    ARRAY(SELECT pid FROM victims WHERE pg_terminate_backend(pid)),
    (SELECT count(*) FROM spared)"
);

/// How many live backends are still registered for connection `$1` at an epoch older than `$2`
/// (other than `$3`).
const PENDING: &str = "SELECT count(*) FROM mtcp.backends b
    WHERE b.cid = $1 AND b.epoch < $2 AND b.pid <> $3
    AND EXISTS (SELECT 1 FROM pg_stat_get_activity(b.pid) a
        WHERE a.backend_start = b.backend_start)";

/// Takes backend `$1` out of the registry if it still serves connection `$2`.
const RELEASE: &str = "DELETE FROM mtcp.backends WHERE pid = $1 AND cid = $2";

/// How many of the backends `$1` still run: one `pg_stat_get_activity(pid)` each, not the
/// `pg_stat_activity` view (its joins), polled while a fence waits.
const ALIVE: &str =
    "SELECT count(*) FROM unnest($1::int4[]) AS v(pid), LATERAL pg_stat_get_activity(v.pid) a";

/// Forgets backend `$1` (its session ended).
const UNREGISTER: &str = "DELETE FROM mtcp.backends WHERE pid = $1";

/// Deletes rows of backends that no longer run.
const SWEEP: &str = "DELETE FROM mtcp.backends b WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a
    WHERE a.pid = b.pid AND a.backend_start = b.backend_start)";

/// A control connection and its statements, prepared once (a statement given as a string
/// costs tokio-postgres a round trip to prepare it, every time, and PostgreSQL its parse
/// analysis: measured, ~1.4 ms of the database's CPU per move while a fence polled with one).
struct Control {
    client: Client,
    register: Statement,
    register_and_fence: Statement,
    pending: Statement,
    release: Statement,
    alive: Statement,
    unregister: Statement,
    sweep: Statement,
}

impl std::ops::Deref for Control {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// How long a fence waits for each backend it terminates to exit.
pub const FENCE_WAIT: Duration = Duration::from_secs(5);

/// How long a fence waits for an idle backend's front-end to release it before terminating it
/// (a new backend costs the database a process start and its catalog caches).
pub const RELEASE_GRACE: Duration = Duration::from_millis(10);

/// Control connections of one front-end: the registry's statements of concurrent sessions (a
/// `migrate --all` restarts many at once) run side by side instead of queueing on one.
const CONTROL_CONNECTIONS: usize = 3;

pub struct Registry {
    url: String,
    clients: Vec<Mutex<Option<Arc<Control>>>>,
    next: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("fence registry: {0}")]
pub struct RegistryError(String);

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        let msg = match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            None => e.to_string(),
        };
        RegistryError(msg)
    }
}

impl Registry {
    /// Connects and creates the schema if needed.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        let r = Registry {
            url: url.to_string(),
            clients: (0..CONTROL_CONNECTIONS).map(|_| Mutex::new(None)).collect(),
            next: Default::default(),
        };
        r.client().await?;
        Ok(r)
    }

    /// A control connection (the next in turn), reconnected if it was lost.
    async fn client(&self) -> Result<Arc<Control>, RegistryError> {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.next.fetch_add(1, Relaxed) % self.clients.len();
        let mut c = self.clients[i].lock().await;
        if let Some(c) = c.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!("fence registry connection: {e}");
            }
        });
        // Generic plans for the registry's statements: their shape never depends on the
        // values, and a custom plan (PostgreSQL's default for a statement's first executions,
        // and then whenever it estimates one cheaper) planned each execution again — measured
        // with pg_stat_statements, as much planning as execution.
        client
            .batch_execute(&format!(
                "SET plan_cache_mode = force_generic_plan; BEGIN; {SCHEMA} COMMIT;"
            ))
            .await?;
        let control = Arc::new(Control {
            register: client.prepare(REGISTER).await?,
            register_and_fence: client.prepare(REGISTER_AND_FENCE).await?,
            pending: client.prepare(PENDING).await?,
            release: client.prepare(RELEASE).await?,
            alive: client.prepare(ALIVE).await?,
            unregister: client.prepare(UNREGISTER).await?,
            sweep: client.prepare(SWEEP).await?,
            client,
        });
        *c = Some(control.clone());
        Ok(control)
    }

    /// Records that backend `pid` serves connection `cid` at `epoch` (its client holds `key`).
    pub async fn register(
        &self,
        cid: &str,
        epoch: u64,
        pid: i32,
        key: (i32, i32),
    ) -> Result<(), RegistryError> {
        let c = self.client().await?;
        let n = c
            .execute(&c.register, &[&pid, &cid, &key.0, &key.1, &(epoch as i64)])
            .await?;
        if n != 1 {
            return Err(RegistryError(format!("backend {pid} is not running")));
        }
        Ok(())
    }

    /// Records that backend `pid` now serves connection `cid` at `epoch` (as [`register`]),
    /// and terminates every live backend registered for `cid` at an older epoch (a server that
    /// restarted the connection later is newer and keeps its backend) — one statement — then
    /// waits until each is gone (its transaction ended: a backend leaves `pg_stat_activity`
    /// only after it aborted); returns how many there were. Fails if one is still there after
    /// [`FENCE_WAIT`]. (`pg_terminate_backend`'s own wait sleeps in 100 ms steps.)
    ///
    /// [`register`]: Registry::register
    pub async fn register_and_fence(
        &self,
        cid: &str,
        epoch: u64,
        pid: i32,
        key: (i32, i32),
    ) -> Result<u32, RegistryError> {
        let c = self.client().await?;
        let fence = |force: bool| {
            let c = c.clone();
            async move {
                let row = c
                    .query_one(
                        &c.register_and_fence,
                        &[&pid, &cid, &key.0, &key.1, &(epoch as i64), &force],
                    )
                    .await?;
                if row.get::<_, i64>(0) != 1 {
                    return Err(RegistryError(format!("backend {pid} is not running")));
                }
                Ok::<_, RegistryError>((row.get::<_, Vec<i32>>(1), row.get::<_, i64>(2)))
            }
        };
        let (mut pids, spared) = fence(false).await?;
        if spared > 0 {
            // An idle backend of an older epoch: its front-end, which this connection just
            // left, releases it in a moment. Until then, or RELEASE_GRACE, this session does
            // not start; then whatever is still registered is terminated as before.
            // (Released in time: nothing is left to fence, as when none was found at first.)
            let t0 = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let left: i64 = c
                    .query_one(&c.pending, &[&cid, &(epoch as i64), &pid])
                    .await?
                    .get(0);
                if left == 0 {
                    break;
                }
                if t0.elapsed() >= RELEASE_GRACE {
                    pids.extend(fence(true).await?.0);
                    break;
                }
            }
        }
        if pids.is_empty() {
            return Ok(0);
        }
        let t0 = std::time::Instant::now();
        let mut pause = Duration::from_micros(500);
        loop {
            let left: i64 = c.query_one(&c.alive, &[&pids]).await?.get(0);
            if left == 0 {
                return Ok(pids.len() as u32);
            }
            if t0.elapsed() > FENCE_WAIT {
                return Err(RegistryError(format!(
                    "a backend of this connection ({pids:?}) did not exit within {FENCE_WAIT:?}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Takes backend `pid` out of the registry for its pool, if it still serves `cid` there:
    /// `true` means no fence terminated it or can any more (see [`crate::pool`]).
    pub async fn release(&self, pid: i32, cid: &str) -> bool {
        let r = match self.client().await {
            Ok(c) => c
                .execute(&c.release, &[&pid, &cid])
                .await
                .map_err(RegistryError::from),
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => n == 1,
            Err(e) => {
                tracing::debug!("cannot release backend {pid}: {e}");
                false
            }
        }
    }

    /// Forgets backend `pid` (its session ended).
    pub async fn unregister(&self, pid: i32) {
        let r = match self.client().await {
            Ok(c) => c
                .execute(&c.unregister, &[&pid])
                .await
                .map_err(RegistryError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::debug!("cannot unregister backend {pid}: {e}");
        }
    }

    /// Cancels what the backend of the connection whose client holds `key` is running.
    pub async fn cancel(&self, key: (i32, i32)) -> Result<bool, RegistryError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT pg_cancel_backend(b.pid) FROM mtcp.backends b
                 JOIN pg_stat_activity a ON a.pid = b.pid AND a.backend_start = b.backend_start
                 WHERE b.key_pid = $1 AND b.key_secret = $2",
                &[&key.0, &key.1],
            )
            .await?;
        Ok(rows.iter().any(|r| r.get::<_, bool>(0)))
    }

    /// Deletes rows of backends that no longer run.
    pub async fn sweep(&self) -> Result<u64, RegistryError> {
        let c = self.client().await?;
        Ok(c.execute(&c.sweep, &[]).await?)
    }

    /// Rolls back transactions the commit path prepared (`mtcp:…` gids) longer than `age` ago
    /// for a connection that no live backend serves any more: its front-end died and no other
    /// restarted the session (a restart resolves its own). A session restarted even later
    /// from its durable Commit point finds the transaction aborted and tells its client so.
    /// Returns how many it rolled back.
    pub async fn roll_back_orphans(&self, age: Duration) -> Result<u32, RegistryError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT p.gid, p.database FROM pg_prepared_xacts p
                 WHERE p.gid LIKE 'mtcp:%' AND p.prepared < now() - make_interval(secs => $1)
                   AND NOT EXISTS (SELECT 1 FROM mtcp.backends b JOIN pg_stat_activity a
                     ON a.pid = b.pid AND a.backend_start = b.backend_start
                     WHERE b.cid = split_part(p.gid, ':', 2))",
                &[&age.as_secs_f64()],
            )
            .await?;
        let mut n = 0;
        for r in rows {
            let (gid, db): (String, String) = (r.get(0), r.get(1));
            // ROLLBACK PREPARED runs in the transaction's own database.
            let mut cfg: tokio_postgres::Config = self
                .url
                .parse()
                .map_err(|e: tokio_postgres::Error| RegistryError(e.to_string()))?;
            cfg.dbname(&db);
            let (other, conn) = cfg.connect(NoTls).await?;
            let task = tokio::spawn(conn);
            let q = format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"));
            match other.batch_execute(&q).await {
                Ok(()) => {
                    tracing::warn!(%gid, %db, "rolled back a transaction left prepared by a front-end that died");
                    n += 1;
                }
                Err(e) => tracing::debug!(%gid, "orphan roll-back: {e}"),
            }
            drop(other);
            let _ = task.await;
        }
        Ok(n)
    }
}
