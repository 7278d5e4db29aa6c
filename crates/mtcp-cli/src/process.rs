//! Process set-up of the `mtcp` command: the allocator, the open-files limit, and the error a
//! command ended by a signal returns.

/// Big, short-lived buffers (output chunks, frames) would otherwise go back to the kernel and be
/// faulted in again on every use: keep them in the heap.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// A demo, benchmark or chaos run ended by SIGINT or SIGTERM.
#[derive(Debug)]
pub struct Interrupted(pub &'static str);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by {}; the processes, clusters and files it started were cleaned up",
            self.0
        )
    }
}

impl std::error::Error for Interrupted {}

/// Servers and agents hold a descriptor or more per connection: the soft limit on open files is
/// raised to the hard one at start (as far as the process may), and the result logged.
pub fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            target: "mtcp",
            "cannot read the open files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        tracing::info!(target: "mtcp", limit = lim.rlim_cur, "open files limit");
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(
            target: "mtcp",
            limit = old,
            "cannot raise the open files limit to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    } else {
        tracing::info!(target: "mtcp", from = old, to = lim.rlim_cur, "open files limit raised");
    }
}
