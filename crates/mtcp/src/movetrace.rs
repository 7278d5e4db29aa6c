//! Where a move's time goes: timestamps at the steps of one move, in every process it touches
//! (the agent, the destination, the origin), for `mtcp bench migration --breakdown`.
//!
//! Each process marks the steps it sees with the system-wide monotonic clock
//! (`CLOCK_MONOTONIC`, the same clock in every process of the machine, so stamps taken in
//! different processes on one host compare directly) and, at its last step, writes one log
//! line on the target [`TARGET`]:
//!
//! ```text
//! <role> <cid> <epoch> <step>=<ns>,<step>=<ns>,…
//! ```
//!
//! where `epoch` is the MIGRATE's epoch (the one the move leaves), so the three processes'
//! lines of one move share `cid` and `epoch`. Nothing is kept or written unless that target is
//! enabled at the trace level (`RUST_LOG=…,mtcp_breakdown=trace`; a plain `info` leaves it off): the checks cost one relaxed
//! atomic load per step otherwise.
//!
//! The server side keeps its open traces in a small map keyed by connection and role, so that
//! code far apart on the move's path (the session that read MIGRATE, the peer channel that
//! sent FETCH, the session that wrote the first byte) marks steps without passing a value
//! along. A trace left unfinished (a refused move) is dropped when the map is full.

use mtcp_proto::Cid;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

/// The log target of the trace lines.
pub const TARGET: &str = "mtcp_breakdown";

/// Most unfinished traces a process keeps (older ones are dropped).
const MAX_OPEN: usize = 4096;

/// Which side of a move a trace is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Destination,
    Origin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Destination => "destination",
            Role::Origin => "origin",
        }
    }
}

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given; CLOCK_MONOTONIC exists on
    // every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// 0: not checked yet, 1: off, 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether traces are kept (the log target is enabled), checked once per process.
pub fn enabled() -> bool {
    match ENABLED.load(Relaxed) {
        0 => {
            let on = tracing::enabled!(target: TARGET, tracing::Level::TRACE);
            ENABLED.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
        v => v == 2,
    }
}

/// The steps of one move seen by one process.
#[derive(Debug, Clone)]
pub struct Trace {
    role: Role,
    cid: Cid,
    epoch: u64,
    steps: Vec<(&'static str, u64)>,
}

impl Trace {
    /// A trace whose first step is `step`, now; `None` when tracing is off.
    pub fn start(role: Role, cid: Cid, epoch: u64, step: &'static str) -> Option<Trace> {
        enabled().then(|| Trace {
            role,
            cid,
            epoch,
            steps: vec![(step, now_ns())],
        })
    }

    /// A trace whose first step `step` happened at `at` (earlier, on this process's clock);
    /// `None` when tracing is off.
    pub fn start_at(
        role: Role,
        cid: Cid,
        epoch: u64,
        step: &'static str,
        at: std::time::Instant,
    ) -> Option<Trace> {
        enabled().then(|| Trace {
            role,
            cid,
            epoch,
            steps: vec![(
                step,
                now_ns().saturating_sub(at.elapsed().as_nanos() as u64),
            )],
        })
    }

    /// The MIGRATE's epoch the trace is joined by.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Marks `step`, now.
    pub fn mark(&mut self, step: &'static str) {
        self.steps.push((step, now_ns()));
    }

    /// The log line's text (after the target).
    pub fn line(&self) -> String {
        let mut s = format!("{} {} {} ", self.role.name(), self.cid, self.epoch);
        for (i, (name, ns)) in self.steps.iter().enumerate() {
            let _ = write!(s, "{}{name}={ns}", if i == 0 { "" } else { "," });
        }
        s
    }

    /// Writes the trace's line.
    pub fn emit(&self) {
        tracing::trace!(target: TARGET, "{}", self.line());
    }
}

/// A step of a trace that may be off: `mark(&mut t, "x")`.
pub fn mark(t: &mut Option<Trace>, step: &'static str) {
    if let Some(t) = t {
        t.mark(step);
    }
}

static OPEN: Mutex<Option<HashMap<(Cid, Role), Trace>>> = Mutex::new(None);

/// Starts (or restarts) the open trace of `cid`'s move in `role` with `step`.
pub fn open(role: Role, cid: Cid, epoch: u64, step: &'static str) {
    let Some(t) = Trace::start(role, cid, epoch, step) else {
        return;
    };
    let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    if map.len() >= MAX_OPEN {
        map.clear();
    }
    map.insert((cid, role), t);
}

/// Marks `step` on the open trace of `cid` in `role`, if there is one.
pub fn step(role: Role, cid: Cid, step: &'static str) {
    if !enabled() {
        return;
    }
    let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = g.as_mut().and_then(|m| m.get_mut(&(cid, role))) {
        t.mark(step);
    }
}

/// Marks `step` as the last of the open trace of `cid` in `role` and writes it.
pub fn finish(role: Role, cid: Cid, step: &'static str) {
    if !enabled() {
        return;
    }
    let t = {
        let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().and_then(|m| m.remove(&(cid, role)))
    };
    if let Some(mut t) = t {
        t.mark(step);
        t.emit();
    }
}

/// One parsed trace line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub role: String,
    pub cid: String,
    pub epoch: u64,
    pub steps: Vec<(String, u64)>,
}

/// Parses the text after `mtcp_breakdown: ` in a log line ([`Trace::line`]'s form).
pub fn parse(text: &str) -> Option<Parsed> {
    let mut it = text.split_whitespace();
    let role = it.next()?.to_string();
    let cid = it.next()?.to_string();
    let epoch = it.next()?.parse().ok()?;
    let steps = it
        .next()?
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Parsed {
        role,
        cid,
        epoch,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_line_parses_back() {
        let mut t = Trace {
            role: Role::Destination,
            cid: Cid([7; 16]),
            epoch: 3,
            steps: vec![("migrate_rx", 10)],
        };
        t.steps.push(("resumed_tx", 25));
        let p = parse(&t.line()).expect("parses");
        assert_eq!(p.role, "destination");
        assert_eq!(p.cid, Cid([7; 16]).to_string());
        assert_eq!(p.epoch, 3);
        assert_eq!(
            p.steps,
            vec![
                ("migrate_rx".to_string(), 10),
                ("resumed_tx".to_string(), 25)
            ]
        );
        assert!(parse("destination abc notanumber x=1").is_none());
        assert!(parse("agent abc 1 x=1,y").is_none());
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a && a > 0);
    }
}
