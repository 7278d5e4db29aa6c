//! The applications `mtcp server` can run, one entry each: a subcommand with its options and
//! how to build the [`mtcp::App`] from them. Adding an application is one more entry in
//! [`registry`].

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, Command, FromArgMatches};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What every application may use of the server it runs in.
pub struct ServerContext {
    /// This server's id in the cluster file.
    pub id: String,
    /// Test hook: make the application's output differ per server (divergence tests).
    pub nondeterministic: bool,
}

/// One application of `mtcp server`.
pub struct AppEntry {
    /// Its subcommand, with its options.
    pub command: fn() -> Command,
    /// Builds it from the subcommand's matches (inside the server's runtime).
    pub build: fn(ArgMatches, ServerContext) -> Building,
}

/// An application being built.
pub type Building =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<dyn mtcp::App>>>>>;

/// Every application `mtcp server` knows.
pub fn registry() -> Vec<AppEntry> {
    vec![
        AppEntry {
            command: || {
                HttpdArgs::augment_args(Command::new("httpd").about("HTTP/1.1 file server"))
            },
            build: build_httpd,
        },
        AppEntry {
            command: || {
                PgfrontArgs::augment_args(
                    Command::new("pgfront")
                        .about("PostgreSQL front-end (clients speak the PostgreSQL protocol)"),
                )
            },
            build: build_pgfront,
        },
    ]
}

/// Looks up `name` in the registry and builds it.
pub async fn build(name: &str, m: ArgMatches, ctx: ServerContext) -> Result<Arc<dyn mtcp::App>> {
    for e in registry() {
        if (e.command)().get_name() == name {
            return (e.build)(m, ctx).await;
        }
    }
    bail!("no application named {name:?}")
}

#[derive(Args, Debug)]
struct HttpdArgs {
    /// Directory to serve.
    #[arg(long)]
    root: PathBuf,
    /// Body bytes between snapshots inside a response.
    #[arg(long, default_value_t = mtcp_httpd::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// Seconds a request head, once begun, has to arrive (then `408` and the connection
    /// closes); a keep-alive connection quiet between requests is not timed.
    #[arg(long, default_value_t = mtcp_httpd::DEFAULT_HEAD_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    head_timeout_secs: u64,
    /// Also serve the same files over plain TCP (no M-TCP) on this address, for baselines.
    #[arg(long)]
    plain: Option<String>,
}

fn build_httpd(m: ArgMatches, ctx: ServerContext) -> Building {
    Box::pin(async move { httpd(m, ctx) })
}

fn httpd(m: ArgMatches, ctx: ServerContext) -> Result<Arc<dyn mtcp::App>> {
    let a = HttpdArgs::from_arg_matches(&m)?;
    if !a.root.is_dir() {
        bail!("--root {} is not a directory", a.root.display());
    }
    let mut cfg = mtcp_httpd::Config::new(a.root);
    cfg.snapshot_every = a.snapshot_every;
    cfg.head_timeout = std::time::Duration::from_secs(a.head_timeout_secs);
    if ctx.nondeterministic {
        // Distinct per server id (s1, s2, … differ in their last byte), never 0.
        let k = 0x80 | (ctx.id.bytes().last().unwrap_or(0) & 0x7f);
        tracing::warn!("--nondeterministic: bodies are scrambled with key {k:#04x}");
        cfg.scramble = Some(k);
    }
    if let Some(p) = a.plain {
        let l = std::net::TcpListener::bind(&p)
            .with_context(|| format!("cannot listen on plain address {p}"))?;
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let cfg = cfg.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    let _ = mtcp_httpd::serve_with(mtcp_httpd::Plain(s), None, &cfg).await;
                });
            }
        });
    }
    Ok(Arc::new(mtcp_httpd::Httpd(cfg)))
}

// The help texts' `[:PASSWORD]` and `[:N]` are not doc links (clap shows the doc comments as
// written: escaping the brackets would show in `--help`).
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args, Debug)]
struct PgfrontArgs {
    /// The PostgreSQL server every session is forwarded to, and the database holding the fence
    /// registry: postgres://USER[:PASSWORD]@HOST:PORT/DB. Sessions log in as their client's user
    /// and database with this password.
    #[arg(long)]
    backend: String,
    /// Commit through PREPARE TRANSACTION / COMMIT PREPARED (a commit point that survives a
    /// crash; needs max_prepared_transactions > 0). `off`: the COMMIT runs under lock_state,
    /// which is enough for live moves.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    two_phase: String,
    /// Test hook: SIGKILL this server at a step of its N-th commit (STEP[:N], N = 1 if not
    /// given; steps: prepared, durable, committed, replied).
    #[arg(long, hide = true)]
    crash_at: Option<String>,
    /// Roll back a transaction the commit path prepared this many seconds ago for a session no
    /// front-end serves any more (its front-end died and no other took it over).
    #[arg(long, default_value_t = 60)]
    orphan_after_secs: u64,
    /// Most idle backend connections kept warm for the next sessions (sessions that end or
    /// move away give theirs back, reset; idle ones close after 30 s). 0: every session opens
    /// its own.
    #[arg(long, default_value_t = 16)]
    pool: usize,
    /// Answer a plain BEGIN at once and send it to PostgreSQL with the transaction's first
    /// statement (one round trip less per transaction). `off`: every BEGIN runs when it comes.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    defer_begin: String,
    /// A session that moved here waits at most this long for a lock while it replays the
    /// statements its client was already answered (its open transaction). Past it the replay
    /// cannot give the same answers, and the client's connection is closed: a transaction
    /// that could wait for that client forever (the client blocked on this very session)
    /// ends instead of hanging. 0: no bound.
    #[arg(long, default_value_t = 5000)]
    replay_lock_timeout_ms: u64,
    /// At start, keep trying to reach the database this long (a database restarting, a lossy
    /// path) before giving up; each failed attempt is logged.
    #[arg(long, default_value_t = 15)]
    connect_wait_secs: u64,
}

fn build_pgfront(m: ArgMatches, _ctx: ServerContext) -> Building {
    Box::pin(pgfront(m))
}

async fn pgfront(m: ArgMatches) -> Result<Arc<dyn mtcp::App>> {
    let a = PgfrontArgs::from_arg_matches(&m)?;
    let target =
        mtcp_pgfront::Target::parse(&a.backend).map_err(|e| anyhow::anyhow!("--backend {e}"))?;
    let crash_at = match a.crash_at.as_deref() {
        None => None,
        Some(s) => {
            let (step, n) = s.split_once(':').unwrap_or((s, "1"));
            let n: u64 = n
                .parse()
                .with_context(|| format!("--crash-at {s}: bad count"))?;
            Some((step.parse().map_err(|e: String| anyhow::anyhow!(e))?, n))
        }
    };
    let opts = mtcp_pgfront::Options {
        two_phase: a.two_phase == "on",
        crash_at,
        orphan_after: std::time::Duration::from_secs(a.orphan_after_secs),
        pool: a.pool,
        defer_begin: a.defer_begin == "on",
        replay_lock_timeout: Duration::from_millis(a.replay_lock_timeout_ms),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.connect_wait_secs);
    let mut pause = Duration::from_millis(200);
    loop {
        match mtcp_pgfront::Front::new(target.clone(), opts).await {
            Ok(front) => return Ok(front),
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(backend = %a.backend, "cannot reach the database yet ({e}); trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot reach the database at {} (tried for {} s)",
                    a.backend, a.connect_wait_secs
                )))
            }
        }
    }
}
