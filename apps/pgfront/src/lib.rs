//! `mtcp-pgfront`: a PostgreSQL front-end on the M-TCP state API (the seed's Examples 2 and 3).
//!
//! Clients (psql, pgbench, any libpq program) speak the PostgreSQL protocol v3 to a server of
//! the cluster; each front-end forwards their sessions to one shared real PostgreSQL over
//! backend connections of its own, passing messages through unchanged except where it must
//! interpret them. When a session moves, the destination opens its own backend connection,
//! terminates the origin's (the fence), rebuilds the session and replays the client's input
//! since the last restart point.
//!
//! # Authentication
//! Terminated at the front-end: clients are accepted without a password (trust) and the
//! front-end logs in to PostgreSQL as the client's user with the `--backend` URL's password
//! (trust, cleartext, MD5 or SCRAM-SHA-256). SSL/GSS encryption requests are answered `N`.
//!
//! # Restart points
//! Only between transactions (the backend idle, every message answered): a restart replays an
//! open transaction from the Idle before its BEGIN, and the runtime's output check guarantees
//! the client never sees anything different from what it already got (a mismatch aborts its
//! connection). Every restart point is a *barrier*: a move never restarts before it, so nothing
//! committed is ever replayed.
//!
//! # The commit path
//! A COMMIT, and every autocommit statement (run inside a BEGIN the client does not see), ends
//! through two-phase commit under `lock_state`: `PREPARE TRANSACTION gid`, a durable restart
//! point holding the gid and the reply, `COMMIT PREPARED gid`, then the reply to the client.
//! A restart from that point commits the gid if it is still prepared and sends the reply; a
//! restart from the Idle before rolls back the gid if an origin prepared it without finishing.
//! With `--two-phase off` the COMMIT itself runs under the lock (enough for live moves).
//! See `docs/decisions.md` (decision 31) and `session`.

pub mod backend;
pub mod codec;
pub mod plan;
pub mod pool;
pub mod registry;
mod session;
pub mod snapshot;
pub mod sql;

use sha2::{Digest, Sha256};
use std::sync::Arc;

pub use backend::Target;
pub use registry::Registry;

/// A step of the commit path where a test may have the process die (`--crash-at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After PREPARE TRANSACTION, before the restart point is durable.
    Prepared,
    /// After the restart point is durable, before COMMIT PREPARED.
    Durable,
    /// After COMMIT PREPARED, before the client is told.
    Committed,
    /// After the reply was written, before the Idle restart point.
    Replied,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "prepared" => CrashPoint::Prepared,
            "durable" => CrashPoint::Durable,
            "committed" => CrashPoint::Committed,
            "replied" => CrashPoint::Replied,
            _ => {
                return Err(format!(
                    "unknown crash point {s:?} (prepared, durable, committed, replied)"
                ))
            }
        })
    }
}

/// The front-end: configuration plus the fence registry, shared by its sessions.
pub struct Front {
    pub target: Target,
    pub registry: Registry,
    /// Commit through PREPARE TRANSACTION / COMMIT PREPARED (crash-safe commit point).
    pub two_phase: bool,
    /// Answer a plain BEGIN at once and send it with the transaction's first statement
    /// (decision 68).
    pub defer_begin: bool,
    /// See [`Options::replay_lock_timeout`].
    pub replay_lock_timeout: std::time::Duration,
    /// Largest protocol message accepted.
    pub max_message: usize,
    /// Test hook: die (SIGKILL) at this step of the n-th commit path of the process.
    pub crash_at: Option<(CrashPoint, u64)>,
    /// Idle backends of sessions that ended or moved away, for the next ones.
    pub pool: pool::Pool,
    commits: std::sync::atomic::AtomicU64,
}

/// How a front-end runs (besides where its database is).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Commit through PREPARE TRANSACTION / COMMIT PREPARED (crash-safe commit point).
    pub two_phase: bool,
    /// Test hook: die (SIGKILL) at this step of the n-th commit path of the process.
    pub crash_at: Option<(CrashPoint, u64)>,
    /// A transaction the commit path prepared this long ago, for a connection no backend serves
    /// any more, is rolled back (see [`Registry::roll_back_orphans`]).
    pub orphan_after: std::time::Duration,
    /// Most idle backends kept warm (0: every session opens its own).
    pub pool: usize,
    /// Answer a plain BEGIN at once and send it with the transaction's first statement.
    pub defer_begin: bool,
    /// A session restarted here waits at most this long for a row or table lock while it
    /// replays what its client was already answered (decision 76).
    pub replay_lock_timeout: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            two_phase: true,
            crash_at: None,
            orphan_after: std::time::Duration::from_secs(60),
            pool: 16,
            defer_begin: true,
            replay_lock_timeout: std::time::Duration::from_secs(5),
        }
    }
}

impl Front {
    /// Connects the fence registry (creating its schema) and starts its sweeper.
    pub async fn new(target: Target, opts: Options) -> Result<Arc<Self>, registry::RegistryError> {
        let registry = Registry::connect(&target.url).await?;
        let front = Arc::new(Front {
            target,
            registry,
            two_phase: opts.two_phase,
            defer_begin: opts.defer_begin,
            replay_lock_timeout: opts.replay_lock_timeout,
            max_message: codec::MAX_MESSAGE,
            crash_at: opts.crash_at,
            pool: pool::Pool::new(opts.pool),
            commits: Default::default(),
        });
        let weak = Arc::downgrade(&front);
        let orphan_after = opts.orphan_after;
        tokio::spawn(async move {
            for tick in 0u64.. {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(f) = weak.upgrade() else { return };
                f.pool.expire();
                if let Err(e) = f.registry.sweep().await {
                    tracing::debug!("{e}");
                }
                if tick % 5 == 4 {
                    if let Err(e) = f.registry.roll_back_orphans(orphan_after).await {
                        tracing::debug!("{e}");
                    }
                }
            }
        });
        Ok(front)
    }

    fn crash_point(&self, p: CrashPoint) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some((at, nth)) = self.crash_at else {
            return;
        };
        if p == CrashPoint::Prepared {
            self.commits.fetch_add(1, Relaxed);
        }
        if at == p && self.commits.load(Relaxed) == nth {
            tracing::warn!("--crash-at {p:?}: killing this server");
            // SAFETY: getpid and kill have no preconditions; SIGKILL ends the process at once.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

impl mtcp::App for Front {
    fn name(&self) -> &str {
        "pgfront"
    }

    fn serve(self: Arc<Self>, conn: mtcp::Connection) -> mtcp::app::Serving {
        Box::pin(session::run(self, conn))
    }
}

/// The cancel key a client of connection `cid` gets (BackendKeyData): the same at every
/// front-end, and not guessable without the connection id.
pub fn cancel_key(cid: &str) -> (i32, i32) {
    let h = Sha256::new()
        .chain_update(b"mtcp-pgfront cancel key\0")
        .chain_update(cid.as_bytes())
        .finalize();
    let pid = (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x3fff_ffff) as i32 | 1;
    let secret = i32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    (pid, secret)
}
