//! Running programs (as `postgres` when root), temporary directories, free ports, PID files.

use crate::{process_alive, HOST};
use anyhow::{bail, Context, Result};
use std::ffi::{CStr, CString};
use std::fs::{self, Permissions};
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub(crate) struct RunAs {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

/// Who runs the server programs: `None` for the current user; as root, Debian's `postgres`.
pub(crate) fn run_as() -> Result<Option<RunAs>, String> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut res = std::ptr::null_mut();
    let (b, n) = (buf.as_mut_ptr(), buf.len());
    if unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, b, n, &mut res) } != 0 || res.is_null() {
        return Err(
            "running as root (PostgreSQL refuses root) and there is no `postgres` user to \
                    run it as: install the Debian package postgresql-15, which creates it"
                .into(),
        );
    }
    if pw.pw_uid == 0 {
        return Err("the `postgres` user has uid 0, and PostgreSQL refuses to run as root".into());
    }
    let home = unsafe { CStr::from_ptr(pw.pw_dir) }
        .to_string_lossy()
        .into_owned()
        .into();
    Ok(Some(RunAs {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        home,
    }))
}

/// A command with a clean libpq environment, run in `cwd`, as `who` if given.
pub(crate) fn command(prog: &Path, who: Option<&RunAs>, cwd: &Path) -> Command {
    let mut c = Command::new(prog);
    c.current_dir(cwd).stdin(Stdio::null());
    for var in "PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGOPTIONS PGSERVICE PGDATA".split(' ') {
        c.env_remove(var);
    }
    c.env("PGCONNECT_TIMEOUT", "10").env("PGSSLMODE", "disable");
    if let Some(u) = who {
        c.uid(u.uid).gid(u.gid).env("HOME", &u.home); // std drops supplementary groups too
    }
    c
}

/// Runs a command to completion; an error (with its stderr) unless it exits 0.
pub(crate) fn run(c: &mut Command, what: &str) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("{what} failed ({}): {}", out.status, stderr.trim());
    }
    Ok(out)
}

/// A new private directory (mode 0700, owned by `owner` if given): under /tmp as root (the
/// `postgres` user must reach it), else under the temp dir if its path is short enough for unix
/// socket paths (~107 bytes).
pub(crate) fn make_temp_dir(prefix: &str, owner: Option<&RunAs>) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    let base = if owner.is_none() && tmp.as_os_str().len() <= 60 {
        tmp
    } else {
        "/tmp".into()
    };
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{prefix}-{}-{n}-{nanos:x}", std::process::id()));
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            r => r.with_context(|| format!("creating {}", dir.display()))?,
        }
        let set_up = fs::set_permissions(&dir, Permissions::from_mode(0o700))
            .and_then(|()| owner.map_or(Ok(()), |u| chown(&dir, Some(u.uid), Some(u.gid))));
        if let Err(e) = set_up {
            let _ = fs::remove_dir(&dir);
            return Err(e).with_context(|| format!("setting up {}", dir.display()));
        }
        return Ok(dir);
    }
}

/// Removes a directory tree; retried briefly, as dying server processes may still write in it.
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    for tries_left in (0..5).rev() {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if tries_left == 0 => {
                return Err(e).context(format!("removing {}", dir.display()))
            }
            Err(_) => sleep(Duration::from_millis(100)),
            Ok(()) => return Ok(()),
        }
    }
    unreachable!()
}

/// A port that was free on 127.0.0.1 a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind((HOST, 0)).context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// The postmaster's PID and the id of its SysV shared memory segment (line 7: "key id").
pub(crate) fn read_pidfile(data: &Path) -> Option<(u32, Option<i32>)> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    Some((
        pid,
        lines
            .nth(5)
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok()),
    ))
}

/// Whether `pid`'s command line names `data` (guards the SIGKILL against a reused PID).
pub(crate) fn is_postmaster_of(pid: u32, data: &Path) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let data = data.as_os_str().as_encoded_bytes();
    !data.is_empty() && cmdline.windows(data.len()).any(|w| w == data)
}

pub(crate) fn wait_dead(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while process_alive(pid) && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
}

pub(crate) fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
