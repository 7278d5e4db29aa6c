//! CPU time per transaction of every process on a path, from `/proc`.

use super::*;

/// The processes whose CPU time a run is charged with.
pub(super) struct Probe<'a> {
    pub(super) postmaster: u32,
    pub(super) bouncer: Option<u32>,
    pub(super) cluster: Option<&'a LocalCluster>,
}

impl Probe<'_> {
    /// CPU seconds so far: pgbench (this process's waited-for children), PostgreSQL,
    /// PgBouncer, agent, front-ends.
    pub(super) fn sample(&self) -> [f64; 5] {
        let servers = |lc: &LocalCluster| -> f64 {
            (lc.servers.iter())
                .filter_map(|s| lc.pid(&s.id))
                .map(|pid| proc_cpu(pid, false).unwrap_or(0.0))
                .sum()
        };
        [
            children_cpu(),
            postgres_cpu(self.postmaster),
            self.bouncer
                .and_then(|pid| proc_cpu(pid, false))
                .unwrap_or(0.0),
            (self.cluster)
                .and_then(|lc| proc_cpu(lc.pid("agent")?, false))
                .unwrap_or(0.0),
            self.cluster.map_or(0.0, servers),
        ]
    }
}

/// CPU seconds of process `pid` (with its waited-for children's when `children`), from
/// `/proc/PID/stat`.
pub(super) fn proc_cpu(pid: u32, children: bool) -> Option<f64> {
    let (_, f) = proc_stat(pid)?;
    let field = |i: usize| f.get(i)?.parse::<f64>().ok();
    // After the command: f[0] is field 3 (state); utime, stime, cutime, cstime are 14..=17.
    let mut ticks = field(11)? + field(12)?;
    if children {
        ticks += field(13)? + field(14)?;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// The parent PID and the fields after the command name of `/proc/PID/stat`.
pub(super) fn proc_stat(pid: u32) -> Option<(u32, Vec<String>)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<String> = s[s.rfind(')')? + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Some((f.get(1)?.parse().ok()?, f))
}

/// CPU seconds of a PostgreSQL server: the postmaster with the backends it reaped, and every
/// backend still running.
pub(super) fn postgres_cpu(postmaster: u32) -> f64 {
    let mut total = proc_cpu(postmaster, true).unwrap_or(0.0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if proc_stat(pid).is_some_and(|(ppid, _)| ppid == postmaster) {
            total += proc_cpu(pid, true).unwrap_or(0.0);
        }
    }
    total
}

/// The machine's busy CPU seconds so far (every CPU: user, nice, system, irq, softirq, steal)
/// and all its CPU seconds (busy or idle), from `/proc/stat`.
pub(super) fn machine_cpu() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    if f.len() < 8 {
        return None;
    }
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    let all = busy + f[3] + f[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (busy / hz as f64, all / hz as f64))
}

/// CPU seconds of every waited-for child of this process so far (pgbench).
pub(super) fn children_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A configuration's CPU µs per transaction over its runs.
pub(super) fn cpu_per_txn(c: Config, runs: &[Run]) -> CpuPerTxn {
    let txns = runs.iter().map(|r| r.transactions).sum::<u64>().max(1) as f64;
    let per = |k: usize| runs.iter().map(|r| r.cpu[k]).sum::<f64>() * 1e6 / txns;
    let agent = !matches!(c, Config::Direct | Config::Bouncer);
    let out = CpuPerTxn {
        pgbench: per(0),
        postgres: per(1),
        pgbouncer: (c == Config::Bouncer).then(|| per(2)),
        agent: agent.then(|| per(3)),
        front_ends: agent.then(|| per(4)),
        total: 0.0,
    };
    CpuPerTxn {
        total: out.pgbench
            + out.postgres
            + out.pgbouncer.unwrap_or(0.0)
            + out.agent.unwrap_or(0.0)
            + out.front_ends.unwrap_or(0.0),
        ..out
    }
}
