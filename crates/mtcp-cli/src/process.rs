//! Process set-up of the `mtcp` command: the allocator, the open-files limit, and the error a
//! command ended by a signal returns.

/// A server's heap on transparent huge pages: when the process is killed, the kernel tears its
/// address space down *before* it closes its sockets (`do_exit`: `exit_mm`, then
/// `exit_files`), so every 4 KiB page of heap delays the FIN that tells agents the server is
/// gone. On 2 MiB pages that teardown is a few entries instead of thousands (decision 65).
/// glibc reads its tunables only at start, so a process started without `GLIBC_TUNABLES`
/// executes itself again — same PID, same arguments — with
/// `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. One started with `GLIBC_TUNABLES` set is left
/// alone: its owner tunes glibc (`glibc.malloc.hugetlb=0` opts out; glibc cuts the variable at
/// the first tunable's end once it has read it, so the rest cannot be read back and extended
/// here). Nor is anything done when the kernel has transparent huge pages off. Returns only
/// if it did not (or could not) execute itself again.
pub fn huge_heap() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        keep_name();
        return;
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    if thp.is_ok_and(|t| t.contains("[never]")) {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
        .exec();
    eprintln!("mtcp: could not re-execute with the heap on huge pages ({e}); going on without");
}

/// A process executed through `/proc/self/exe` is named `exe` (in `ps`, `top`, `pgrep`): the
/// re-executed server takes back the name it was started with, the file name of its `argv[0]`
/// (as the kernel would have set it, at most 15 bytes).
fn keep_name() {
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    if comm.trim_end() != "exe" {
        return;
    }
    let Some(arg0) = std::env::args_os().next() else {
        return;
    };
    let path = std::path::Path::new(&arg0);
    let Some(name) = path.file_name() else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    let mut buf = [0u8; 16];
    let n = name.as_bytes().len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

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
