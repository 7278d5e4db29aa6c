//! `mtcp bench migration --breakdown`: where each move's time goes, from the timestamps the
//! agent, the destination and the origin write on the `mtcp_breakdown` log target
//! (`mtcp::movetrace`), joined by connection and epoch; and the loopback floor measured in the
//! same run (a TCP connect plus one 64-byte request/response, and one request/response on an
//! open connection), so each latency is also shown as a multiple of it.

use crate::stats::pct;
use anyhow::{Context, Result};
use mtcp::movetrace;
use serde::Serialize;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

mod segments;
use segments::*;

/// `RUST_LOG` of a cluster whose moves are traced.
pub const LOG: &str = "warn,mtcp_breakdown=trace";

#[derive(Serialize, Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub moves: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

/// The loopback floor: a TCP connect plus one 64-byte request/response, and one request/response
/// on an open connection, each after a pause (`PAUSE`) in which both sides sleep, as the
/// processes of a move do between moves. Client and echo server are threads pinned to
/// different CPUs, as a move's processes usually are: on a virtual machine a wake-up across
/// CPUs costs tens of microseconds more than one on the same CPU (`same_cpu_` figures).
#[derive(Serialize, Debug, Clone)]
pub struct Floor {
    pub connect_rr_us: f64,
    pub rr_us: f64,
    pub same_cpu_connect_rr_us: f64,
    pub same_cpu_rr_us: f64,
}

/// The pause before each sample of the floor.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

#[derive(Serialize, Debug, Clone)]
pub struct Breakdown {
    /// Moves whose three traces were all found.
    pub moves: usize,
    /// Of them, moves whose MIGRATE went out on a spare connection.
    pub on_spare: usize,
    pub segments: Vec<Segment>,
    /// Moves over the kernel fast path (the agent fenced the flow).
    pub fast_path: bool,
    /// How many of `segments` are on the critical path (the rest run beside it).
    pub critical: usize,
    /// Sum of the critical path's segment medians, µs.
    pub critical_sum_p50_us: f64,
    /// Trigger -> the move's end (the first resumed byte at the agent; on the fast path KICK
    /// written), and -> RESUMED, over the joined moves, p50 µs.
    pub total_p50_us: f64,
    pub total_p99_us: f64,
    pub resumed_p50_us: f64,
    pub floor: Floor,
}

/// The traces of one move: role -> steps.
type Move = HashMap<String, Vec<(String, u64)>>;

/// Reads every `*.log` in `dir` for trace lines and joins them by (connection, epoch).
fn moves(dir: &Path) -> Result<Vec<Move>> {
    let mut by: HashMap<(String, u64), Move> = HashMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_none_or(|x| x != "log") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for line in text.lines() {
            let line = mtcp_harness::local::strip_ansi(line);
            let Some(i) = line.find("mtcp_breakdown: ") else {
                continue;
            };
            if let Some(t) = movetrace::parse(&line[i + "mtcp_breakdown: ".len()..]) {
                by.entry((t.cid, t.epoch))
                    .or_default()
                    .insert(t.role, t.steps);
            }
        }
    }
    Ok(by
        .into_values()
        .filter(|m| {
            ["agent", "destination", "origin"]
                .iter()
                .all(|r| m.contains_key(*r))
        })
        .collect())
}

fn at(m: &Move, (role, step): Point) -> Option<u64> {
    let steps = m.get(role)?;
    match step.strip_suffix('*') {
        Some(prefix) => steps.iter().find(|(s, _)| s.starts_with(prefix)),
        None => steps.iter().find(|(s, _)| s == step),
    }
    .map(|(_, ns)| *ns)
}

/// Nanoseconds from `a` to `b` in move `m` (0 if `b` came first: stamps of two processes a few
/// hundred nanoseconds apart can land in either order).
fn span(m: &Move, a: Point, b: Point) -> Option<u64> {
    Some(at(m, b)?.saturating_sub(at(m, a)?))
}

fn us(sorted_ns: &[u64], p: f64) -> f64 {
    pct(sorted_ns, p) as f64 / 1e3
}

/// The breakdown of the traced moves in `dir`'s logs.
pub fn analyse(dir: &Path, floor: Floor) -> Result<Breakdown> {
    let ms = moves(dir)?;
    let handed = ms.iter().any(|m| at(m, ("origin", "handed")).is_some());
    let fast_path = handed || ms.iter().any(|m| at(m, ("origin", "fenced")).is_some());
    let (list, critical, end) = if handed {
        (
            HANDED_SEGMENTS,
            HANDED_CRITICAL,
            ("destination", "resumed_ready"),
        )
    } else if fast_path {
        (
            FAST_SEGMENTS,
            FAST_CRITICAL,
            ("destination", "resumed_ready"),
        )
    } else {
        (SEGMENTS, CRITICAL, ("agent", "first_byte_rx"))
    };
    let mut segments = Vec::new();
    let inside: &[_] = if fast_path && !handed {
        FREEZE_SEGMENTS
    } else {
        &[]
    };
    for (name, a, b) in list.iter().chain(inside) {
        let mut v: Vec<u64> = ms.iter().filter_map(|m| span(m, *a, *b)).collect();
        v.sort_unstable();
        segments.push(Segment {
            name: name.to_string(),
            moves: v.len(),
            p50_us: us(&v, 0.5),
            p90_us: us(&v, 0.9),
            p99_us: us(&v, 0.99),
        });
    }
    let total = |to: Point| {
        let mut v: Vec<u64> = ms
            .iter()
            .filter_map(|m| span(m, ("agent", "trigger"), to))
            .collect();
        v.sort_unstable();
        v
    };
    let first = total(end);
    let resumed = total(("agent", "resumed_rx"));
    Ok(Breakdown {
        moves: ms.len(),
        on_spare: ms
            .iter()
            .filter(|m| at(m, ("agent", "migrate_tx_spare")).is_some())
            .count(),
        fast_path,
        critical,
        critical_sum_p50_us: segments[..critical].iter().map(|s| s.p50_us).sum(),
        segments,
        total_p50_us: us(&first, 0.5),
        total_p99_us: us(&first, 0.99),
        resumed_p50_us: us(&resumed, 0.5),
        floor,
    })
}

/// Pins the calling thread to CPU `cpu` (best effort: unpinned if that fails).
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only read
    // and write the set they are given; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Median connect + request/response and request/response, µs, with the client on CPU 0 and the
/// echo server on `server_cpu`; 100 samples of each after 20 not counted.
fn floor_on(server_cpu: usize) -> Result<(f64, f64)> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding the floor's echo server")?;
    let addr = l.local_addr()?;
    const N: usize = 120;
    let server = std::thread::spawn(move || {
        pin(server_cpu);
        // One connection per connect sample, then the open one.
        for _ in 0..=N {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 64];
            while s.read_exact(&mut b).is_ok() {
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        }
    });
    let r = std::thread::spawn(move || -> Result<(f64, f64)> {
        pin(0);
        let rr = |s: &mut TcpStream| -> Result<()> {
            let mut b = [7u8; 64];
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            Ok(())
        };
        let (mut connect, mut open) = (Vec::new(), Vec::new());
        for i in 0..N {
            std::thread::sleep(PAUSE);
            let t = Instant::now();
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            rr(&mut s)?;
            if i >= 20 {
                connect.push(t.elapsed().as_nanos() as u64);
            }
        }
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        for i in 0..N {
            std::thread::sleep(PAUSE);
            let t = Instant::now();
            rr(&mut s)?;
            if i >= 20 {
                open.push(t.elapsed().as_nanos() as u64);
            }
        }
        connect.sort_unstable();
        open.sort_unstable();
        Ok((us(&connect, 0.5), us(&open, 0.5)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the floor's client thread panicked"))?;
    let _ = server.join();
    r
}

/// Measures the loopback floor (see [`Floor`]).
pub fn floor() -> Result<Floor> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (same_cpu_connect_rr_us, same_cpu_rr_us) = floor_on(0)?;
    let (connect_rr_us, rr_us) = if cpus > 1 {
        floor_on(1)?
    } else {
        (same_cpu_connect_rr_us, same_cpu_rr_us)
    };
    Ok(Floor {
        connect_rr_us,
        rr_us,
        same_cpu_connect_rr_us,
        same_cpu_rr_us,
    })
}

/// Prints the breakdown as a table.
pub fn print(b: &Breakdown) {
    let f = &b.floor;
    println!(
        "  where a move's time goes ({} moves traced in all three processes, {} on a spare connection), µs:",
        b.moves, b.on_spare
    );
    println!(
        "    {:<66} {:>8} {:>8} {:>8} {:>7}",
        "segment", "p50", "p90", "p99", "x rr"
    );
    for (i, s) in b.segments.iter().enumerate() {
        if i == b.critical {
            println!(
                "    {:<66} {:>8.1}",
                "sum of the p50s above", b.critical_sum_p50_us
            );
        }
        println!(
            "    {:<66} {:>8.1} {:>8.1} {:>8.1} {:>7.2}",
            s.name,
            s.p50_us,
            s.p90_us,
            s.p99_us,
            s.p50_us / f.rr_us.max(0.001)
        );
    }
    println!(
        "  loopback floor, same run ({PAUSE:?} pauses, threads on two CPUs): connect + 64-byte request/response p50 {:.1} µs, request/response on an open connection p50 {:.1} µs (on one CPU: {:.1} and {:.1} µs)",
        f.connect_rr_us, f.rr_us, f.same_cpu_connect_rr_us, f.same_cpu_rr_us
    );
    let end = if b.fast_path {
        "the destination's pump (fast path: the client's flow restarts)"
    } else {
        "first resumed byte"
    };
    println!(
        "  trigger -> {end} p50 {:.1} µs = {:.1} x connect+rr = {:.1} x rr (p99 {:.1} µs); trigger -> RESUMED p50 {:.1} µs = {:.1} x rr",
        b.total_p50_us,
        b.total_p50_us / f.connect_rr_us.max(0.001),
        b.total_p50_us / f.rr_us.max(0.001),
        b.total_p99_us,
        b.resumed_p50_us,
        b.resumed_p50_us / f.rr_us.max(0.001)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A floor of 1 µs everywhere: the "x rr" column equals the p50.
    const UNIT_FLOOR: Floor = Floor {
        connect_rr_us: 1.0,
        rr_us: 1.0,
        same_cpu_connect_rr_us: 1.0,
        same_cpu_rr_us: 1.0,
    };

    /// A fresh directory holding the agent's, a destination's and an origin's log text.
    fn logs(name: &str, agent: &str, destination: &str, origin: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mtcp-breakdown-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in [
            ("agent.log", agent),
            ("s2.log", destination),
            ("s1.log", origin),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn traces_of_one_move_join_into_segments() {
        let cid = "ab".repeat(16);
        let dir = logs(
            "join",
            &format!("x INFO mtcp_breakdown: agent {cid} 4 trigger=1000,seen=1100,turn=1200,leaving_tx=1300,old_closed=1400,migrate_tx_spare=3000,resumed_rx=9000,resend_tx=9500,first_byte_rx=15000\n"),
            &format!("\x1b[32m INFO\x1b[0m mtcp_breakdown: destination {cid} 4 migrate_rx=3500,admitted=3600,slot=3700,fetch_call=3800,state_rx=7000,record_checked=7200,restarted=7400,resumed_ready=7500,resumed_tx=8000,app_first_write=10000,first_new_byte_queued=14000,first_new_byte_written=14500\nnoise\n"),
            &format!("mtcp_breakdown: origin {cid} 4 fetch_rx=4000,working_tx=4200,slot=4300,frozen=5000,encoded=5500,state_tx=6000\n"),
        );
        let b = analyse(
            &dir,
            Floor {
                connect_rr_us: 2.0,
                rr_us: 1.0,
                same_cpu_connect_rr_us: 2.0,
                same_cpu_rr_us: 1.0,
            },
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((b.moves, b.on_spare), (1, 1));
        let seg = |n: &str| b.segments.iter().find(|s| s.name.starts_with(n)).unwrap();
        assert_eq!(seg("agent: trigger").p50_us, 0.1);
        assert_eq!(seg("agent: -> MIGRATE").p50_us, 1.6);
        assert_eq!(seg("wire: FETCH").p50_us, 0.2);
        assert_eq!(seg("wire: first new byte").p50_us, 0.5);
        assert_eq!(b.total_p50_us, 14.0);
        assert_eq!(b.resumed_p50_us, 8.0);
        // The critical path's segments add up to the whole move.
        assert!((b.critical_sum_p50_us - b.total_p50_us).abs() < 1e-9);
    }

    #[test]
    fn a_fast_path_move_ends_with_the_destinations_window_probe() {
        let cid = "cd".repeat(16);
        let dir = logs(
            "fast",
            &format!("TRACE mtcp_breakdown: agent {cid} 0 trigger=0,migrate_tx_connect=600,resumed_rx=2000,kick_tx=2400\n"),
            &format!("TRACE mtcp_breakdown: destination {cid} 0 migrate_rx=700,admitted=710,slot=720,fetch_call=800,state_rx=1500,record_checked=1550,restored=1700,lifted=1750,restarted=1800,resumed_ready=1850,resumed_tx=1900,app_first_write=2500,first_new_byte_queued=2600\n"),
            &format!("TRACE mtcp_breakdown: origin {cid} 0 fetch_rx=900,working_tx=950,slot=1000,pump_stop=1010,pump_saw_stop=1030,pump_stopped=1040,fenced=1050,repair_on=1055,info_read=1060,recv_queue_read=1070,send_queue_read=1170,record_built=1200,discarded=1280,frozen=1300,encoded=1350,state_tx=1400\n"),
        );
        let b = analyse(&dir, UNIT_FLOOR).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(b.fast_path);
        assert_eq!(b.critical, FAST_CRITICAL);
        assert_eq!(b.total_p50_us, 1.85);
        assert!((b.critical_sum_p50_us - b.total_p50_us).abs() < 1e-9);
        let seg = |n: &str| b.segments.iter().find(|s| s.name.starts_with(n)).unwrap();
        assert_eq!(seg("origin: stop the pump, fence the flow").p50_us, 0.05);
        assert_eq!(seg("origin: freeze").p50_us, 0.25);
        assert_eq!(seg("destination: lift the origin's fence").p50_us, 0.05);
        assert_eq!(seg("beside it: agent: KICK written").p50_us, 0.4);
        // The steps inside the pump stop, fence and freeze follow the segments, off the
        // critical path.
        assert_eq!(
            b.segments.len(),
            FAST_SEGMENTS.len() + FREEZE_SEGMENTS.len()
        );
        assert_eq!(seg("  freeze: -> the pump task sees").p50_us, 0.02);
        assert_eq!(seg("  freeze: fence the flow").p50_us, 0.01);
        assert_eq!(seg("  freeze: the send queue peeked").p50_us, 0.1);
        let inside: f64 = b.segments[FAST_SEGMENTS.len()..]
            .iter()
            .map(|s| s.p50_us)
            .sum();
        assert!(
            (inside - 0.3).abs() < 1e-9,
            "the steps add up to the pump stop, fence and freeze"
        );
    }

    #[test]
    fn a_handed_over_move_is_split_at_the_origins_hand_over() {
        let cid = "ef".repeat(16);
        let dir = logs(
            "handed",
            &format!("TRACE mtcp_breakdown: agent {cid} 0 trigger=0,migrate_tx_connect=600,resumed_rx=2000,kick_tx=2400\n"),
            &format!("TRACE mtcp_breakdown: destination {cid} 0 migrate_rx=700,admitted=710,slot=720,fetch_call=800,state_rx=1500,record_checked=1550,restored=1600,restarted=1700,resumed_ready=1750,resumed_tx=1900,app_first_write=2500,first_new_byte_queued=2600\n"),
            &format!("TRACE mtcp_breakdown: origin {cid} 0 fetch_rx=900,working_tx=950,slot=1000,pump_stop=1010,pump_saw_stop=1030,pump_stopped=1040,handoff_connected=1060,record_built=1100,handed=1130,frozen=1140,encoded=1200,state_tx=1400\n"),
        );
        let b = analyse(&dir, UNIT_FLOOR).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(b.fast_path);
        assert_eq!(b.critical, HANDED_CRITICAL);
        assert_eq!(b.segments.len(), HANDED_SEGMENTS.len());
        assert_eq!(b.total_p50_us, 1.75);
        assert!((b.critical_sum_p50_us - b.total_p50_us).abs() < 1e-9);
        let seg = |n: &str| b.segments.iter().find(|s| s.name.starts_with(n)).unwrap();
        assert_eq!(seg("origin: connect to the destination").p50_us, 0.02);
        assert_eq!(seg("origin: send the socket").p50_us, 0.03);
        assert_eq!(seg("destination: take the handed socket").p50_us, 0.05);
    }

    #[test]
    fn the_floor_is_measured() {
        let f = floor().unwrap();
        assert!(f.rr_us > 0.0 && f.connect_rr_us > f.rr_us * 0.5);
    }
}
