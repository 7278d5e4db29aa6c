//! The cluster file (TOML) and per-server settings.
//!
//! ```toml
//! key = "<64 hex chars>"        # or key_file = "path"
//! mode = "lazy"               # or "eager": snapshots are replicated (crash survival)
//! # replicas = 1                # eager: backups per connection (the next servers in this file)
//! # origin_wait_ms = 100        # eager: wait this long for the origin before using a replica
//! [[server]]
//! id = "s1"
//! data = "127.0.0.1:7001"       # agents connect here
//! peer = "127.0.0.1:7101"       # server-to-server state transfer
//! admin = "127.0.0.1:7201"      # drain / status
//! # [tls]                       # optional: TLS 1.3 on every port (decision 45; `mtcp cert`)
//! # ca = "tls/ca.crt"           # the cluster CA; agents get it as --tls-ca
//! # cert = "tls/{id}.crt"       # each server's certificate and key ({id}: the server's id)
//! # key = "tls/{id}.key"
//! ```

use mtcp_proto::wire::{Mode, ServerInfo};
use mtcp_proto::ClusterKey;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// Why a cluster file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("server id {id:?} is not in cluster file {path} (known: {known})")]
    UnknownServer {
        path: String,
        id: String,
        known: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    key: Option<String>,
    key_file: Option<String>,
    #[serde(default = "default_mode")]
    mode: String,
    heartbeat_ms: Option<u32>,
    replicas: Option<u32>,
    origin_wait_ms: Option<u32>,
    #[serde(default)]
    fast_path: Vec<String>,
    #[serde(default)]
    server: Vec<RawServer>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: String,
    cert: String,
    key: String,
}

/// The `[tls]` section: where the cluster CA and each server's certificate and key are.
/// Relative paths are anchored at the cluster file's directory; `{id}` in `cert` and `key` is
/// replaced by a server's id. Only paths: the files are read when a server starts
/// (`crate::tls::ServerTls::load`), so parsing stays free of I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub cert: String,
    pub key: String,
}

impl TlsFiles {
    /// Server `id`'s certificate file.
    pub fn cert_for(&self, id: &str) -> std::path::PathBuf {
        self.cert.replace("{id}", id).into()
    }

    /// Server `id`'s private key file.
    pub fn key_for(&self, id: &str) -> std::path::PathBuf {
        self.key.replace("{id}", id).into()
    }
}

fn default_mode() -> String {
    "lazy".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    id: String,
    data: String,
    peer: String,
    admin: String,
}

/// Reads a key file, refusing anything larger than a key with some whitespace could be.
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(1024)
        .read_to_string(&mut s)?;
    if s.len() >= 1024 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "key file is larger than 1 KiB",
        ));
    }
    Ok(s)
}

/// One server of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub id: String,
    pub data: String,
    pub peer: String,
    pub admin: String,
}

/// A parsed, validated cluster file.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub key: ClusterKey,
    pub mode: Mode,
    pub heartbeat: Duration,
    /// Eager mode: how many backups hold each connection's newest snapshot.
    pub replicas: usize,
    /// Eager mode: how long a destination waits for the origin to answer before it takes the
    /// connection over from a replica.
    pub origin_wait: Duration,
    pub servers: Vec<ServerEntry>,
    /// Kernel fast path: where fast-path agents listen (`ip:port`). A server recreates a
    /// client's connection only if it was made to one of these addresses; with none, the fast
    /// path is off (a data port must not be a way to plant arbitrary TCP connections on the
    /// host).
    pub fast_path: Vec<std::net::SocketAddr>,
    /// TLS on every port, when the file has a `[tls]` section.
    pub tls: Option<TlsFiles>,
}

impl Cluster {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: p.clone(),
            err,
        })?;
        Self::parse(&text, path)
    }

    /// Parses cluster-file text; `path` names the file in errors and anchors `key_file`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let invalid = |msg: String| ConfigError::Invalid {
            path: p.clone(),
            msg,
        };
        let raw: RawCluster = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let key_text = match (raw.key, raw.key_file) {
            (Some(k), None) => k,
            (None, Some(f)) => {
                let f = path.parent().unwrap_or(Path::new(".")).join(f);
                read_small(&f).map_err(|err| ConfigError::Read {
                    path: f.display().to_string(),
                    err,
                })?
            }
            (Some(_), Some(_)) => {
                return Err(invalid("give either `key` or `key_file`, not both".into()))
            }
            (None, None) => {
                return Err(invalid(
                    "missing `key` (64 hex characters) or `key_file`".into(),
                ))
            }
        };
        let key = ClusterKey::from_hex(&key_text).map_err(|e| invalid(e.to_string()))?;
        let mode = match raw.mode.as_str() {
            "lazy" => Mode::Lazy,
            "eager" => Mode::Eager,
            m => {
                return Err(invalid(format!(
                    "unknown mode {m:?} (expected \"lazy\" or \"eager\")"
                )))
            }
        };
        if raw.server.is_empty() {
            return Err(invalid("no [[server]] entries".into()));
        }
        let mut servers = Vec::new();
        for s in raw.server {
            for (what, addr) in [("data", &s.data), ("peer", &s.peer), ("admin", &s.admin)] {
                if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                    return Err(invalid(format!(
                        "server {:?}: {what} address {addr:?} is not host:port",
                        s.id
                    )));
                }
            }
            if s.id.is_empty() || s.id.len() > 64 {
                return Err(invalid("server ids must be 1 to 64 characters".into()));
            }
            if servers.iter().any(|e: &ServerEntry| e.id == s.id) {
                return Err(invalid(format!("server id {:?} appears twice", s.id)));
            }
            servers.push(ServerEntry {
                id: s.id,
                data: s.data,
                peer: s.peer,
                admin: s.admin,
            });
        }
        let heartbeat =
            Duration::from_millis(raw.heartbeat_ms.unwrap_or(100).clamp(10, 10_000) as u64);
        let replicas = raw.replicas.unwrap_or(1) as usize;
        if mode == Mode::Lazy && raw.replicas.is_some() {
            return Err(invalid(
                "`replicas` is for mode = \"eager\" (lazy mode keeps no replicas)".into(),
            ));
        }
        if mode == Mode::Eager && (replicas == 0 || replicas >= servers.len()) {
            return Err(invalid(format!(
                "eager mode needs 1 <= replicas < number of servers ({}), got {replicas}",
                servers.len()
            )));
        }
        let origin_wait =
            Duration::from_millis(raw.origin_wait_ms.unwrap_or(100).clamp(1, 60_000) as u64);
        let mut fast_path = Vec::new();
        for a in &raw.fast_path {
            fast_path.push(a.parse().map_err(|_| {
                invalid(format!(
                    "fast_path: {a:?} is not ip:port (a fast-path agent's --listen address)"
                ))
            })?);
        }
        if mode == Mode::Eager && !fast_path.is_empty() {
            return Err(invalid(
                "`fast_path` is for mode = \"lazy\" (eager mode replicates relayed connections)"
                    .into(),
            ));
        }
        let anchor = |f: &str| -> std::path::PathBuf {
            let f = Path::new(f);
            if f.is_absolute() {
                f.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(f)
            }
        };
        let tls = match raw.tls {
            Some(t) if t.ca.is_empty() || t.cert.is_empty() || t.key.is_empty() => {
                return Err(invalid(
                    "[tls]: `ca`, `cert` and `key` must all name files".into(),
                ))
            }
            Some(t) => {
                if servers.len() > 1 && !(t.cert.contains("{id}") && t.key.contains("{id}")) {
                    return Err(invalid(
                        "[tls]: with several servers, `cert` and `key` must contain {id} (each server has its own certificate)".into(),
                    ));
                }
                Some(TlsFiles {
                    ca: anchor(&t.ca),
                    cert: anchor(&t.cert).display().to_string(),
                    key: anchor(&t.key).display().to_string(),
                })
            }
            None => None,
        };
        Ok(Self {
            tls,
            fast_path,
            key,
            mode,
            heartbeat,
            replicas,
            origin_wait,
            servers,
        })
    }

    pub fn server(&self, id: &str) -> Option<&ServerEntry> {
        self.servers.iter().find(|s| s.id == id)
    }

    /// The entry for `id`, or an error naming the known ids.
    pub fn require(&self, id: &str, path: &str) -> Result<&ServerEntry, ConfigError> {
        self.server(id).ok_or_else(|| ConfigError::UnknownServer {
            path: path.into(),
            id: id.into(),
            known: self
                .servers
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The servers after `id` in the file's order, wrapping around (`id` itself excluded).
    fn after<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a ServerEntry> + 'a {
        let i = self
            .servers
            .iter()
            .position(|s| s.id == id)
            .map_or(0, |i| i + 1);
        let n = self.servers.len();
        (0..n)
            .map(move |k| &self.servers[(i + k) % n])
            .filter(move |s| s.id != id)
    }

    /// Every server but `id`, as the agent sees them: those after `id` in the file's order
    /// first (wrapping around), so an agent's first choice is `id`'s first backup.
    pub fn alternates(&self, id: &str) -> Vec<ServerInfo> {
        self.after(id)
            .map(|s| ServerInfo {
                id: s.id.clone(),
                data: s.data.clone(),
            })
            .collect()
    }

    /// Eager mode: the servers holding replicas of `id`'s connections (the next `replicas`
    /// servers after it). Empty in lazy mode.
    pub fn backups(&self, id: &str) -> Vec<ServerEntry> {
        if self.mode != Mode::Eager {
            return Vec::new();
        }
        self.after(id).take(self.replicas).cloned().collect()
    }
}

/// Resource limits of a server. Defaults suit the HTTP app and the tests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest snapshot `set_state` accepts.
    pub max_snapshot: usize,
    /// Output kept since the snapshot beyond which a connection stops being migratable.
    pub max_output_log: u64,
    /// Upstream bytes received but not yet read by the app before the server stops reading.
    pub max_unread: u64,
    /// Downstream bytes queued for the session socket before the app's writes wait.
    pub max_queued: u64,
    /// Downstream bytes sent to a relayed session but not acknowledged by its agent before the
    /// app's writes wait: what one client can make its server keep, whatever it does (an agent
    /// acknowledges every MiB it receives). It must exceed what an honest agent whose client
    /// reads slowly leaves unacknowledged before TCP's flow control stops the server:
    /// `max_queued` plus the kernels' socket buffers (here `tcp_wmem` 4 MiB + `tcp_rmem` 32 MiB
    /// at most), or a paused client would be taken for a hostile one after `ack_timeout`.
    pub max_unacked: u64,
    /// How long the app's writes may wait on [`Limits::max_unacked`] with the agent attached but
    /// acknowledging nothing before the connection is aborted.
    pub ack_timeout: Duration,
    /// A relayed session from which nothing arrives for this long is closed (its agent, told
    /// this bound in WELCOME and RESUMED, pings three times as often, at most every second:
    /// `mtcp_proto::trigger::ping_every`); the connection's state is then kept as for any
    /// detached session.
    pub session_idle: Duration,
    /// Most sessions open on the data port at once (the newest over it is refused `Busy`).
    pub max_sessions: usize,
    /// Most of them from one source address.
    pub max_sessions_per_source: usize,
    /// How long a migration waits for a `lock_state` section to end.
    pub lock_timeout: Duration,
    /// How long a migration waits for a soft section ([`crate::Connection::soft_lock`]) to end
    /// before it splits it (decision 55).
    pub soft_wait: Duration,
    /// Fast path: hand sockets to and take them from processes on this host (decision 56);
    /// off: moves to and from this server freeze them with `TCP_REPAIR`, as across hosts.
    pub local_handoff: bool,
    /// How long state is kept for a connection whose agent went away.
    pub dead_session: Duration,
    /// How long a destination waits for the origin's state.
    pub fetch_timeout: Duration,
    /// Largest state record accepted over the peer channel, and built by an origin (a larger one
    /// is refused `TooLarge` and the connection stays where it is). Lazy records carry the
    /// snapshot (≤ `max_snapshot`) and unread input (≤ `max_unread`) plus input since the
    /// snapshot; replicas' tails are at most 4 MiB.
    pub max_record: usize,
    /// Most takeovers (MIGRATEs being served: fetching and installing a record) at once; the
    /// next is refused `Busy`.
    pub max_takeovers: usize,
    /// How long a MIGRATE over `max_takeovers` waits for a takeover to end before it is
    /// refused.
    pub takeover_wait: Duration,
    /// Most hand-overs (FETCHes served: a connection frozen and its record built) at once at an
    /// origin; the next waits up to `handover_wait`, then is refused `Busy`.
    pub max_handovers: usize,
    pub handover_wait: Duration,
    /// Eager mode: memory for replicas of other servers' connections.
    pub max_replica_bytes: usize,
    /// Eager mode: a replica not refreshed for this long is forgotten (origins refresh theirs
    /// well within it).
    pub replica_ttl: Duration,
    /// Overload: with more live connections than this, the newest are hinted away
    /// (`HINT{Overload}`, paced; see `mtcp_proto::policy::OverloadPolicy`). `None`: no limit.
    pub max_connections: Option<usize>,
    /// Test hook: caps each session socket's send rate (bytes/s, `SO_MAX_PACING_RATE`), which
    /// emulates a slow link on loopback: output queues up behind it as it would behind a real
    /// one.
    pub pacing_rate: Option<u64>,
    /// Test hook: RTT probes are answered this much later (emulates a distant server).
    pub probe_delay: Duration,
    /// Test hook: every message this server writes on a peer channel (requests and answers)
    /// waits this long first — half a round trip between servers on loopback.
    pub peer_delay: Duration,
    /// Test hook: the probability (0–1) that such a message waits another 200 ms, as a lost
    /// segment does for TCP's retransmission timeout.
    pub peer_loss: f64,
    /// Test hook: a destination waits this long, silent to the agent, between a finished
    /// takeover and its RESUMED (the moment a kill -9 of the destination tests, issue 15).
    pub hold_resumed: Duration,
    /// Test hook: `hold_resumed` ends early once the agent has given up on this candidate
    /// (closed the MIGRATE's connection), so RESUMED goes out just after the agent left,
    /// whatever the agent's silence bound (it follows the agent's RTT estimate, which a
    /// rate-limited download's queue inflates to seconds).
    pub hold_resumed_until_left: bool,
    /// Test hook: `hold_resumed` holds this server's first takeover only.
    pub hold_resumed_once: bool,
    /// Test hook: an origin holds each hand-over's slot this long before freezing the
    /// connection (so that a test can fill `max_handovers`).
    pub hold_handover: Duration,
    /// Test hook: this server's pushes to its backups fail as if the backups were unreachable
    /// from it (and from it only).
    pub drop_pushes: bool,
    /// Test hook: a destination waits this long (answering WORKING) before it starts a
    /// takeover, so a candidate the agent gave up on can finish first (issue 15).
    pub delay_takeover: Duration,
    /// Test hook: this server's RELEASECLAIMs are not sent, as if every one were lost.
    pub drop_releases: bool,
}

impl Limits {
    /// [`Limits::session_idle`] as WELCOME and RESUMED carry it (milliseconds, at least 1).
    pub fn idle_ms(&self) -> u32 {
        self.session_idle.as_millis().clamp(1, u32::MAX as u128) as u32
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_snapshot: 1 << 20,
            max_output_log: 256 << 20,
            max_unread: 4 << 20,
            max_queued: 4 << 20,
            max_unacked: 64 << 20,
            ack_timeout: Duration::from_secs(30),
            session_idle: Duration::from_secs(30),
            max_sessions: 32_768,
            max_sessions_per_source: 32_768,
            lock_timeout: Duration::from_secs(10),
            soft_wait: Duration::from_millis(10),
            local_handoff: true,
            dead_session: Duration::from_secs(120),
            fetch_timeout: Duration::from_secs(3),
            max_record: 64 << 20,
            max_takeovers: mtcp_proto::bounds::MAX_TAKEOVERS,
            // A FETCH's own bound (fetch_timeout + lock_timeout): one slot frees in that time.
            takeover_wait: Duration::from_secs(13),
            max_handovers: mtcp_proto::bounds::MAX_HANDOVERS,
            // With a lock_state wait (lock_timeout) after it, still within a destination's
            // wait for the answer (fetch_timeout + lock_timeout).
            handover_wait: Duration::from_secs(2),
            max_replica_bytes: 256 << 20,
            replica_ttl: Duration::from_secs(600),
            max_connections: None,
            pacing_rate: None,
            probe_delay: Duration::ZERO,
            peer_delay: Duration::ZERO,
            peer_loss: 0.0,
            hold_resumed: Duration::ZERO,
            hold_resumed_until_left: false,
            hold_resumed_once: false,
            hold_handover: Duration::ZERO,
            drop_pushes: false,
            delay_takeover: Duration::ZERO,
            drop_releases: false,
        }
    }
}

#[cfg(test)]
mod tests;
