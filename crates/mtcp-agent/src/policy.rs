//! The agent's trigger policies at work: the settings, an agent-wide prober that measures the
//! RTT to every server of the service, and the per-connection glue that feeds the sans-IO
//! `mtcp_proto::policy::ConnPolicy` the prober's samples and shows its smoothed RTTs (which
//! policy fires, and why, is the core's).

use crate::MoveReason;
use mtcp::framed::{self, FrameReader};
use mtcp::stream::{ReadHalf, WriteHalf};
pub use mtcp_proto::policy::FloorConfig;
use mtcp_proto::policy::{self, probe_answer, RttConfig};
use mtcp_proto::wire::{Msg, ServerInfo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How often a connection's policies are evaluated.
pub(crate) const POLICY_TICK: Duration = Duration::from_millis(100);
/// Least time between two probes of one server.
pub const MIN_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Most servers probed at once.
const MAX_PROBED: usize = 64;
/// A server no connection asked about for this long is no longer probed.
const PROBE_UNWANTED: Duration = Duration::from_secs(30);

/// Which trigger policies an agent runs (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Throughput floor: move when the session delivers less than the floor for the window
    /// while the server has data waiting (not counting time the agent waits on the client
    /// program).
    pub floor: Option<FloorConfig>,
    /// RTT: move to an alternate whose RTT has been better than the current server's by more
    /// than the margin for the hold time.
    pub rtt: Option<RttPolicyConfig>,
}

/// Settings of the RTT policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttPolicyConfig {
    pub margin: Duration,
    pub hold: Duration,
    /// Each server of the service is probed this often (at least [`MIN_PROBE_EVERY`]) on one
    /// kept-open probe connection to its data port.
    pub probe_every: Duration,
}

impl RttPolicyConfig {
    pub fn new(margin: Duration, hold: Duration, probe_every: Duration) -> Self {
        Self {
            margin,
            hold,
            probe_every: probe_every.max(MIN_PROBE_EVERY),
        }
    }
}

impl PolicyConfig {
    pub fn is_off(&self) -> bool {
        self.floor.is_none() && self.rtt.is_none()
    }
}

/// Measures the RTT to servers for every connection of the agent: one task per server probes
/// it every `probe_every` with `PROBE{t}` → `PROBE_REPLY{t}` on a connection kept open to its
/// data port (reopened after a failure), so an alternate is never disturbed by more than one
/// small message per interval, however many connections the agent relays.
pub(crate) struct Prober {
    every: Duration,
    connect_timeout: Duration,
    /// How probe connections are opened (socket mark, TLS).
    dialer: crate::dialer::Dialer,
    started: Instant,
    /// By data address.
    servers: Mutex<HashMap<String, Probed>>,
}

struct Probed {
    /// Newest sample: a sequence number and the RTT.
    latest: Option<(u64, Duration)>,
    /// When a connection last asked for it.
    wanted: Instant,
}

impl Prober {
    pub fn new(every: Duration, connect_timeout: Duration, dialer: crate::dialer::Dialer) -> Self {
        Self {
            every: every.max(MIN_PROBE_EVERY),
            connect_timeout,
            dialer,
            started: Instant::now(),
            servers: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Probed>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts probing the servers at `addrs` that are not probed yet.
    pub fn want<'a>(self: &Arc<Self>, addrs: impl IntoIterator<Item = &'a str>) {
        let now = Instant::now();
        let mut t = self.table();
        for a in addrs {
            if let Some(p) = t.get_mut(a) {
                p.wanted = now;
                continue;
            }
            if t.len() >= MAX_PROBED {
                tracing::warn!(
                    server = a,
                    "not probing: {MAX_PROBED} servers probed already"
                );
                continue;
            }
            t.insert(
                a.to_string(),
                Probed {
                    latest: None,
                    wanted: now,
                },
            );
            tokio::spawn(probe_loop(Arc::downgrade(self), a.to_string()));
        }
    }

    /// The newest sample of the server at `addr`.
    pub fn latest(&self, addr: &str) -> Option<(u64, Duration)> {
        let mut t = self.table();
        let p = t.get_mut(addr)?;
        p.wanted = Instant::now();
        p.latest
    }
}

type ProbeConn = (FrameReader<ReadHalf>, WriteHalf);

async fn probe_loop(p: Weak<Prober>, addr: String) {
    let Some(every) = p.upgrade().map(|p| p.every) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<ProbeConn> = None;
    let mut seq = 0u64;
    loop {
        tick.tick().await;
        let Some(p) = p.upgrade() else { return };
        {
            let mut t = p.table();
            if t.get(&addr)
                .is_none_or(|e| e.wanted.elapsed() > PROBE_UNWANTED)
            {
                t.remove(&addr);
                tracing::debug!(server = %addr, "no longer probed");
                return;
            }
        }
        let t = p.started.elapsed().as_micros() as u64;
        let limit = p.every;
        match tokio::time::timeout(limit, probe_once(&p, &addr, &mut conn, t)).await {
            Ok(Ok(rtt)) => {
                seq += 1;
                if let Some(e) = p.table().get_mut(&addr) {
                    e.latest = Some((seq, rtt));
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(server = %addr, "probe failed: {e}");
                conn = None;
            }
            Err(_) => {
                tracing::debug!(server = %addr, "probe unanswered within {limit:?}");
                conn = None;
            }
        }
    }
}

/// One probe; opens the probe connection if there is none. The RTT counts from the probe's
/// write, not the TCP handshake.
async fn probe_once(
    p: &Prober,
    addr: &str,
    conn: &mut Option<ProbeConn>,
    t: u64,
) -> Result<Duration, String> {
    let m = Msg::Probe { t };
    let t0;
    match conn {
        Some((_, w)) => {
            t0 = Instant::now();
            framed::write_msg(w, &m).await.map_err(|e| e.to_string())?;
        }
        None => {
            let mut s = tokio::time::timeout(p.connect_timeout, p.dialer.dial(addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            t0 = Instant::now();
            framed::open_with(&mut s, &m)
                .await
                .map_err(|e| e.to_string())?;
            let (r, w) = s.into_split();
            *conn = Some((FrameReader::new(r, 4096), w));
        }
    }
    let (r, _) = conn.as_mut().expect("set above");
    let answer = r.next().await.map_err(|e| e.to_string())?;
    let rtt = match &answer {
        mtcp_proto::Frame::Msg(m) => probe_answer(t, t0, Instant::now(), m),
        mtcp_proto::Frame::Data(_) => None,
    };
    rtt.ok_or_else(|| format!("unexpected answer {answer:?}"))
}

/// One connection's policies: the core's [`policy::ConnPolicy`] decides; this feeds it the
/// prober's samples, has every known server probed, and shows the smoothed RTTs.
pub(crate) struct ConnPolicy {
    core: policy::ConnPolicy,
}

impl ConnPolicy {
    pub fn new(cfg: &PolicyConfig) -> Self {
        let rtt = cfg
            .rtt
            .map(|r| RttConfig::new(r.margin, r.hold, r.probe_every));
        Self {
            core: policy::ConnPolicy::new(cfg.floor, rtt),
        }
    }

    /// Whether any policy runs (the relay ticks only then).
    pub fn active(&self) -> bool {
        self.core.active()
    }

    /// A new session with `current` (opened or moved): the evidence starts afresh, and every
    /// server the agent knows is probed.
    pub fn new_session(
        &mut self,
        prober: Option<&Arc<Prober>>,
        current: &str,
        known: &[ServerInfo],
    ) {
        self.core.new_session(current, known);
        if let (true, Some(p)) = (self.core.probes(), prober) {
            p.want(known.iter().map(|s| s.data.as_str()));
        }
    }

    /// BACKLOG{queued} read when `arrived` downstream bytes had arrived.
    pub fn on_backlog(&mut self, arrived: u64, queued: u64) {
        self.core.on_backlog(arrived, queued);
    }

    /// The agent is blocked on the client program right now.
    pub fn client_blocked(&mut self) {
        self.core.client_blocked();
    }

    /// Evaluates the policies: `delivered` bytes went to the client program, `arrived` came
    /// from the session, `blocked` whether the agent waits on the client program now. Returns
    /// the reason and target of a move when one fires.
    #[allow(clippy::too_many_arguments)]
    pub fn tick(
        &mut self,
        now: Instant,
        prober: Option<&Arc<Prober>>,
        delivered: u64,
        arrived: u64,
        blocked: bool,
        known: &[ServerInfo],
        status: &Mutex<crate::ConnStatus>,
    ) -> Option<(MoveReason, Option<String>)> {
        let latest = prober.map(|p| move |addr: &str| p.latest(addr));
        let tick = self
            .core
            .tick(now, delivered, arrived, blocked, known, latest);
        if let Some((s, evidence)) = tick.floor {
            tracing::trace!(?s, ?evidence, "floor sample");
        }
        if let Some(srtts) = tick.srtts {
            status.lock().unwrap_or_else(|p| p.into_inner()).rtt_ms = srtts;
        }
        tick.fired.map(|m| (m.reason, m.to))
    }
}
