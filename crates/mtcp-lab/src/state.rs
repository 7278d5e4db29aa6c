//! What a lab created, on disk (`/run/mtcp-lab/<tag>/state.json`), so that `down` from any
//! process (and after a crash) removes it, and `mtcp lab` commands share one lab. Changes are
//! made under an exclusive `flock` of the lab's directory.

use crate::error::{io_err, Error, Result};
use crate::ns::Host;
use crate::proc::ProcRef;
use crate::Impairment;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Root of every lab's state (tmpfs: gone after a reboot, like the namespaces).
pub const RUN_DIR: &str = "/run/mtcp-lab";

/// How a host's link to the router is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// A veth pair (no delay).
    Veth,
    /// Two TUN devices joined by a delay line.
    Tun,
}

/// One host's link to the router.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    pub host: Host,
    pub impair: Impairment,
    pub kind: LinkKind,
    /// The delay-line process of a TUN link run by a helper process (`None`: run by the
    /// lab's owner process, or no delay line).
    pub delay_line: Option<ProcRef>,
}

/// A process started inside the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcRecord {
    /// Number within the lab (1, 2, …).
    pub id: u64,
    pub host: Host,
    pub proc: ProcRef,
    pub argv: Vec<String>,
    /// Where its stdout and stderr go, if the lab chose.
    pub log: Option<PathBuf>,
    /// Sent SIGSTOP (and no SIGCONT since) through the lab.
    pub stopped: bool,
}

/// Everything a lab created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub tag: String,
    pub servers: u16,
    /// The process that runs the lab's delay lines in its own threads and tears the lab down
    /// when it ends (`None`: a lab made by `mtcp lab up`, which lives until `mtcp lab down`).
    pub owner: Option<ProcRef>,
    /// Namespaces, recorded before they are made.
    pub namespaces: Vec<String>,
    /// The nftables table (family inet) in the router's namespace.
    pub nft_table: String,
    /// Where logs of processes started in the lab go.
    pub log_dir: PathBuf,
    pub links: Vec<LinkState>,
    pub procs: Vec<ProcRecord>,
    pub next_id: u64,
}

/// The lab's directory.
pub fn lab_dir(tag: &str) -> PathBuf {
    Path::new(RUN_DIR).join(tag)
}

impl State {
    fn path(tag: &str) -> PathBuf {
        lab_dir(tag).join("state.json")
    }

    /// The lab's recorded state, if there is one.
    pub fn load(tag: &str) -> Result<Option<State>> {
        let p = State::path(tag);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::Invalid(format!(
                    "{} is damaged ({e}); `mtcp lab down --tag {tag}` removes the lab",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("read {}", p.display()))(e)),
        }
    }

    /// Writes the state (whole file replaced at once: readers never see half of it).
    pub fn save(&self) -> Result<()> {
        let dir = lab_dir(&self.tag);
        std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let tmp = dir.join("state.json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text).map_err(io_err(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, State::path(&self.tag)).map_err(io_err(format!(
            "write {}",
            State::path(&self.tag).display()
        )))
    }

    pub fn link(&self, host: Host) -> Option<&LinkState> {
        self.links.iter().find(|l| l.host == host)
    }

    pub fn link_mut(&mut self, host: Host) -> Option<&mut LinkState> {
        self.links.iter_mut().find(|l| l.host == host)
    }

    /// Every host: client, router, s1..sN.
    pub fn hosts(&self) -> Vec<Host> {
        let mut v = vec![Host::Client, Host::Router];
        v.extend((1..=self.servers).map(Host::Server));
        v
    }
}

/// An exclusive lock on a lab's directory (released when dropped).
pub struct DirLock(#[allow(dead_code)] OwnedFd);

/// Takes the lab's lock, waiting at most `limit` for another `mtcp lab` command to finish.
pub fn lock(tag: &str, limit: Duration) -> Result<DirLock> {
    let dir = lab_dir(tag);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(io_err(format!("open {}/lock", dir.display())))?;
    let fd = OwnedFd::from(f);
    let t0 = Instant::now();
    loop {
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(DirLock(fd));
        }
        if t0.elapsed() > limit {
            return Err(Error::Invalid(format!(
                "lab {tag:?} is busy (another `mtcp lab` command holds {}/lock for over {limit:?})",
                dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
