//! Processes by PID, safely: a PID is recorded with its start time, so a signal never reaches
//! a later process that reused the number; killing waits (bounded) until the process is gone.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A process: its PID and its start time (clock ticks after boot, from `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub start: u64,
}

/// Scheduler state letter and start time of `pid`, if it exists.
fn stat(pid: u32) -> Option<(u8, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.bytes().next()?;
    // Field 3 is the state; the start time is field 22, i.e. 19 further on.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ProcRef {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<ProcRef> {
        stat(pid).map(|(_, start)| ProcRef { pid, start })
    }

    /// This process.
    pub fn me() -> ProcRef {
        ProcRef::of(std::process::id()).expect("/proc/self/stat")
    }

    /// Whether this very process still runs (exists, same start time, not a zombie).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((st, start)) if start == self.start && st != b'Z' && st != b'X')
    }

    /// Whether it is stopped (SIGSTOP).
    pub fn stopped(&self) -> bool {
        matches!(stat(self.pid), Some((b'T', start)) if start == self.start)
    }

    /// Sends `sig` if this very process still runs; whether it was sent.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        if !self.alive() {
            return false;
        }
        // SAFETY: plain syscall; the start time check above makes PID reuse harmless.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) == 0 }
    }
}

/// SIGCONT (a stopped process would not die before it runs again) and SIGKILL to each, then
/// waits up to `limit` until all are gone (reaping the ones that are our children). Returns
/// the ones still there.
pub fn kill_all(procs: &[ProcRef], limit: Duration) -> Vec<ProcRef> {
    for p in procs {
        p.signal(libc::SIGCONT);
        p.signal(libc::SIGKILL);
    }
    let t0 = Instant::now();
    loop {
        let left: Vec<ProcRef> = procs
            .iter()
            .copied()
            .filter(|p| {
                // SAFETY: reaps `pid` only if it is our exited child; ECHILD otherwise.
                unsafe { libc::waitpid(p.pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
                p.alive()
            })
            .collect();
        if left.is_empty() || t0.elapsed() >= limit {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes whose network namespace is the one bound at `ns_path` (by the namespace's inode;
/// a process that only has a thread there is not counted).
pub fn in_netns(ns_path: &std::path::Path) -> Vec<ProcRef> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(ns_path) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .filter_map(ProcRef::of)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process() {
        let me = ProcRef::me();
        assert!(me.alive());
        assert!(!me.stopped());
        let other = ProcRef {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(
            !other.alive(),
            "a different start time is a different process"
        );
        assert!(!other.signal(0));
    }

    #[test]
    fn kill_a_child() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let p = ProcRef::of(c.id()).unwrap();
        assert!(p.alive());
        assert!(p.signal(libc::SIGSTOP));
        let t0 = Instant::now();
        while !p.stopped() && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(p.stopped());
        assert!(kill_all(&[p], Duration::from_secs(5)).is_empty());
        assert!(!p.alive());
        // Already reaped by kill_all.
        assert!(c.try_wait().is_err() || c.try_wait().unwrap().is_some());
    }
}
