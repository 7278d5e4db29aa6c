//! A run's plan: every choice drawn from the seed (files, requests, faults and where they hit).

use super::*;
use rand::rngs::StdRng;
use rand::Rng;

pub(super) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The RNG seed of run `run` (`u64::MAX`: the served files).
pub(super) fn run_seed(seed: u64, run: u64) -> u64 {
    splitmix64(seed ^ splitmix64(run))
}

/// One served file.
pub(super) struct Served {
    pub(super) name: String,
    pub(super) bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    Drain,
    /// This many manual migrations back to back (each right after the previous one resumed).
    Manual(u8),
    Kill,
    Stop,
    /// A manual move, then the new server is killed (or stopped) this many ms after it resumed.
    AfterMove {
        stop: bool,
        after_ms: u64,
    },
}

impl Fault {
    pub(super) fn name(self) -> &'static str {
        match self {
            Fault::Drain => "drain",
            Fault::Manual(_) => "manual",
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::AfterMove { stop: false, .. } => "move-then-kill",
            Fault::AfterMove { stop: true, .. } => "move-then-stop",
        }
    }
}

/// One request of a run and the bytes `[start, end)` of its file that must come back.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) file: usize,
    /// `Range` header value, if any.
    pub(super) range: Option<String>,
    pub(super) start: u64,
    pub(super) end: u64,
}

/// Everything a run does, drawn from its RNG before it starts.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) reqs: Vec<Req>,
    /// (downstream body byte offset of the run, fault), by offset.
    pub(super) faults: Vec<(u64, Fault)>,
    /// Kill every server at this offset (eager mode; then there are no other faults).
    pub(super) kill_all: Option<u64>,
    /// Client read rate (bytes/s), so faults land inside bodies; `None`: as fast as it goes.
    pub(super) rate: Option<u64>,
}

impl Plan {
    pub(super) fn draw(rng: &mut StdRng, files: &[Served], kinds: &[FaultArg]) -> Plan {
        // Per-connection faults, weighted; a stop costs the silence bound (~0.5 s): rarer.
        let weighted: Vec<(Fault, u32)> = kinds
            .iter()
            .filter_map(|k| match k {
                FaultArg::Drain => Some((Fault::Drain, 3)),
                FaultArg::Manual => Some((Fault::Manual(1), 3)),
                FaultArg::Kill => Some((Fault::Kill, 3)),
                FaultArg::Stop => Some((Fault::Stop, 1)),
                FaultArg::KillAll => None,
                FaultArg::AfterMove => Some((
                    Fault::AfterMove {
                        stop: false,
                        after_ms: 0,
                    },
                    3,
                )),
            })
            .collect();
        let kill_all_p = match (kinds.contains(&FaultArg::KillAll), weighted.is_empty()) {
            (false, _) => 0.0,
            (true, false) => KILL_ALL_P,
            (true, true) => 0.3,
        };
        let kill_all = rng.gen_bool(kill_all_p);
        let n = rng.gen_range(1..=4usize);
        let mut reqs = Vec::with_capacity(n);
        for i in 0..n {
            // A kill-all run starts with the largest file, so the kill lands inside a body.
            let file = if kill_all && i == 0 {
                (0..files.len())
                    .max_by_key(|&f| files[f].bytes.len())
                    .unwrap_or(0)
            } else {
                rng.gen_range(0..files.len())
            };
            let len = files[file].bytes.len() as u64;
            let req = if kill_all && i == 0 || rng.gen_bool(0.5) {
                Req {
                    file,
                    range: None,
                    start: 0,
                    end: len,
                }
            } else {
                match rng.gen_range(0..10) {
                    // bytes=a-b, sometimes with b past the end.
                    0..=5 => {
                        let a = rng.gen_range(0..len);
                        let b = if rng.gen_bool(0.1) {
                            rng.gen_range(len..len + 4096)
                        } else {
                            rng.gen_range(a..len)
                        };
                        Req {
                            file,
                            range: Some(format!("bytes={a}-{b}")),
                            start: a,
                            end: (b + 1).min(len),
                        }
                    }
                    // bytes=a-
                    6 | 7 => {
                        let a = rng.gen_range(0..len);
                        Req {
                            file,
                            range: Some(format!("bytes={a}-")),
                            start: a,
                            end: len,
                        }
                    }
                    // bytes=-n, sometimes more than the file.
                    _ => {
                        let s = rng.gen_range(1..=len + 1024);
                        Req {
                            file,
                            range: Some(format!("bytes=-{s}")),
                            start: len.saturating_sub(s),
                            end: len,
                        }
                    }
                }
            };
            reqs.push(req);
        }
        let total: u64 = reqs.iter().map(|r| r.end - r.start).sum();
        let rate = if kill_all {
            Some(16 << 20)
        } else if rng.gen_bool(0.6) {
            // Spread the run over 40–300 ms.
            let ms = rng.gen_range(40..=300u64);
            Some((total * 1000 / ms).max(4 << 20))
        } else {
            None
        };
        let mut faults = Vec::new();
        let mut kill_at = None;
        if kill_all {
            let first = reqs[0].end - reqs[0].start;
            kill_at = Some(rng.gen_range(0..(first / 4).max(1)));
        } else {
            let k = if weighted.is_empty() {
                0
            } else {
                rng.gen_range(0..=3)
            };
            let sum: u32 = weighted.iter().map(|w| w.1).sum();
            let mut stops = 0;
            for _ in 0..k {
                let mut x = rng.gen_range(0..sum);
                let f = weighted
                    .iter()
                    .find(|w| {
                        let hit = x < w.1;
                        x = x.saturating_sub(w.1);
                        hit
                    })
                    .map(|w| w.0)
                    .unwrap_or(Fault::Manual(1));
                // Now and then a burst: the next move starts right after the last resumed.
                let f = match f {
                    Fault::Manual(_) if rng.gen_bool(0.25) => Fault::Manual(rng.gen_range(2..=3)),
                    Fault::AfterMove { .. } => Fault::AfterMove {
                        stop: rng.gen_bool(0.3),
                        after_ms: rng.gen_range(0..=500),
                    },
                    f => f,
                };
                let at = rng.gen_range(0..total.max(1));
                // At most one stop a run.
                if matches!(f, Fault::Stop | Fault::AfterMove { stop: true, .. }) {
                    stops += 1;
                    if stops > 1 {
                        continue;
                    }
                }
                faults.push((at, f));
            }
            faults.sort_by_key(|&(o, _)| o);
        }
        Plan {
            reqs,
            faults,
            kill_all: kill_at,
            rate,
        }
    }

    pub(super) fn describe(&self, files: &[Served]) -> String {
        let mut s = String::new();
        for (i, r) in self.reqs.iter().enumerate() {
            let _ = write!(
                s,
                "{}GET /{}{} ({} B)",
                if i > 0 { ", " } else { "" },
                files[r.file].name,
                r.range
                    .as_deref()
                    .map(|v| format!(" Range: {v}"))
                    .unwrap_or_default(),
                r.end - r.start
            );
        }
        if let Some(o) = self.kill_all {
            let _ = write!(s, "; kill-all at {o} B");
        }
        for (o, f) in &self.faults {
            match f {
                Fault::Manual(n) if *n > 1 => {
                    let _ = write!(s, "; {n} manual back to back at {o} B");
                }
                Fault::AfterMove { after_ms, .. } => {
                    let _ = write!(s, "; {} ({after_ms} ms) at {o} B", f.name());
                }
                f => {
                    let _ = write!(s, "; {} at {o} B", f.name());
                }
            }
        }
        match self.rate {
            Some(r) => {
                let _ = write!(s, "; rate {:.1} MiB/s", r as f64 / (1 << 20) as f64);
            }
            None => s += "; unlimited rate",
        }
        s
    }
}
