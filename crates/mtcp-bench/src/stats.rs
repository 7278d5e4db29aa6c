//! What every benchmark measures with: medians and percentiles, CPU seconds of a process, a
//! timed curl download.

use anyhow::{bail, Context, Result};

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// The `p`-quantile (0..=1) of `sorted`, nearest rank; 0 when empty.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU seconds (user + system) used so far by process `pid` (or thread: `/proc/PID/task/TID`),
/// from its `stat` file.
pub fn cpu_secs(stat: &str) -> Option<f64> {
    let s = std::fs::read_to_string(stat).ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    // f[0] is field 3 (state); utime and stime are fields 14 and 15.
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// curl arguments for a timed download to nowhere (see [`curl_secs`]).
pub const CURL_TIMED: [&str; 5] = [
    "-s",
    "-o",
    "/dev/null",
    "-w",
    "%{http_code} %{size_download} %{time_total}",
];

/// The seconds a [`CURL_TIMED`] download of `size` bytes from `what` took, from curl's output;
/// an error unless it was a complete 200 response.
pub fn curl_secs(stdout: &[u8], size: u64, what: &str) -> Result<f64> {
    let text = String::from_utf8_lossy(stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    match f[..] {
        [code, n, t] if code == "200" && n.parse::<u64>().ok() == Some(size) => {
            t.parse().context("curl time")
        }
        _ => bail!("curl download from {what} came back wrong: {text}"),
    }
}
