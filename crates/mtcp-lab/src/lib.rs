//! The M-TCP network lab (root only): network namespaces for a client, a router and N servers,
//! each host linked to the router, with impairments per link — loss, rate, delay, blackhole —
//! and faults for the processes started inside (kill, stop, continue). Tests, benchmarks and
//! `mtcp lab` use it; everything it makes is recorded in `/run/mtcp-lab/<tag>/state.json` and
//! removed by [`down`], also after the lab's own process crashed.
//!
//! # Topology
//!
//! | host | namespace | address | link devices (host / router side) |
//! |---|---|---|---|
//! | client | `mtcp-<tag>-client` | 198.18.0.2/24 | `mc0` / `rc0` (router 198.18.0.1) |
//! | server i | `mtcp-<tag>-s<i>` | 198.18.i.2/24 | `ms<i>` / `rs<i>` (router 198.18.i.1) |
//! | router | `mtcp-<tag>-router` | 198.18.0.1, 198.18.i.1 | forwards (ip_forward=1, its namespace only) |
//!
//! A link is a veth pair, or, once it has a delay or loss, two TUN devices joined by a delay
//! line ([`delay`]). Every host's default route goes to the router. IPv6 is off inside the
//! lab. All addresses are in 198.18.0.0/15; nothing outside the lab's namespaces is touched.
//!
//! # Impairments: per host↔router link, in both directions
//!
//! * `delay_ms` — the **round-trip time the link adds**: each packet waits `delay_ms / 2` in
//!   each direction. The path client → s1 crosses the client's link and s1's, so its RTT is the
//!   sum of both links' `delay_ms`; `mtcp lab up --delay-ms D` (and [`LabOptions::servers_link`])
//!   sets every *server* link, so client ↔ server RTT = D and server ↔ server RTT = 2·D.
//!   Each direction of a delay line queues at most 32 MiB, and drops beyond.
//! * `loss_pct` — that percentage of packets dropped at random in each direction, by the delay
//!   line, packet by packet (an nftables rule would see 64 KiB GSO super-packets and drop them
//!   whole; the TUN devices only carry real packets).
//! * `rate_mbit` — each direction limited to that rate (tc `tbf` on both ends of the link, a
//!   50 ms queue).
//! * `blackhole` — every packet to and from the host dropped (nftables, table
//!   `inet mtcp_lab_<tag>` in the router's namespace).
//!
//! Delay lines of a lab made through [`Lab::up`] run as threads of the calling process (the lab
//! is torn down when the [`Lab`] is dropped, also while a test panics); those of `mtcp lab up`
//! run as one `mtcp lab delayline` process per link, placed in the router's namespace.
//!
//! # Use from tests and benchmarks
//!
//! ```no_run
//! use mtcp_lab::{Fault, Host, Impairment, Lab, LabOptions};
//! let lab = Lab::up(LabOptions {
//!     tag: "mytest".into(), // unique per test: tests run in parallel
//!     servers: 2,
//!     servers_link: Impairment { delay_ms: 40, ..Default::default() },
//!     ..Default::default()
//! })?;
//! let s1 = lab.spawn(Host::Server(1), &["mtcp", "server", "--cluster", "c.toml", "--id", "s1",
//!                                      "httpd", "--root", "www"])?; // killed at down
//! let url = format!("http://{}:8080/file", lab.addr(Host::Server(1)));
//! let out = lab.command(Host::Client, "curl").arg(&url).output()?; // runs in the client
//! let starved = Impairment { rate_mbit: Some(2.0), ..lab.impairment(Host::Server(1))? };
//! lab.impair(Host::Server(1), starved)?;
//! lab.fault(Host::Server(1), Fault::Stop)?; // or lab.stop(&s1), lab.kill(&s1)
//! let rtt = lab.run_in(Host::Client, || { /* sockets made here live in the client */ })?;
//! drop(lab); // = down: processes, delay lines, namespaces, state
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod delay;
mod error;
mod impair;
mod links;
mod net;
mod ns;
mod proc;
mod procs;
mod state;
mod status;

pub use impair::{DelayRunner, Impairment};
pub use links::serve_delay_line;
use procs::wait_child;
pub use status::{down, status, tags, DownReport, HostStatus, LabStatus, LinkStatus, ProcStatus};

pub use error::{Error, Result};
pub use ns::{netns_name, Host, MAX_SERVERS};
pub use proc::ProcRef;
pub use state::{lab_dir, LinkKind, RUN_DIR};

use delay::DelayLine;
use error::io_err;
use net::Tools;
use ns::check_tag;
use state::{LinkState, State};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

/// Longest wait for the lab's lock (another command changing the same lab).
const LOCK_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for a delay-line process to have made its devices.
const READY_WAIT: Duration = Duration::from_secs(10);

/// How to make a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Short unique name: 1 to 10 lowercase letters or digits.
    pub tag: String,
    /// Number of servers, s1..sN.
    pub servers: u16,
    /// Impairments of every server's link.
    pub servers_link: Impairment,
    /// Impairments of the client's link.
    pub client_link: Impairment,
    /// Where logs of processes started by [`Lab::spawn`] go (default: the lab's directory
    /// under /run/mtcp-lab, removed by `down`; a directory given here is kept).
    pub log_dir: Option<PathBuf>,
    pub delay_runner: DelayRunner,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            tag: "lab".into(),
            servers: 2,
            servers_link: Impairment::default(),
            client_link: Impairment::default(),
            log_dir: None,
            delay_runner: DelayRunner::InProcess,
        }
    }
}

/// A fault for the processes started in a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL (after SIGCONT), and forget them.
    Kill,
    /// SIGSTOP: the process hangs, its sockets stay open.
    Stop,
    /// SIGCONT.
    Cont,
}

/// A process started in the lab by [`Lab::spawn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabProc {
    /// Its number within the lab.
    pub id: u64,
    pub host: Host,
    pub pid: u32,
    /// Its stdout and stderr, if the lab chose where.
    pub log: Option<PathBuf>,
}

/// A running lab. Dropping a lab made by [`Lab::up`] tears it down ([`down`]); one found by
/// [`Lab::attach`] is left as it is.
pub struct Lab {
    tag: String,
    servers: u16,
    tools: Tools,
    runner: DelayRunner,
    /// Tear down on drop.
    owned: bool,
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    /// Processes we started and still may reap, by their lab id.
    children: HashMap<u64, Child>,
    /// In-process delay lines.
    delay_lines: HashMap<Host, DelayLine>,
}

fn check_root() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    Ok(())
}

impl Lab {
    /// Makes a lab: first removes a stale lab of the same tag (refused if a live process other
    /// than this one owns it), then the namespaces, links, routes and impairments. On an error
    /// everything made so far is removed.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        check_root()?;
        check_tag(&opts.tag)?;
        let tools = Tools::find()?;
        if !(1..=MAX_SERVERS).contains(&opts.servers) {
            return Err(Error::Invalid(format!(
                "--servers {} is not within 1..={MAX_SERVERS}",
                opts.servers
            )));
        }
        opts.servers_link.check()?;
        opts.client_link.check()?;
        let tag = opts.tag.clone();
        if let Some(st) = State::load(&tag).ok().flatten() {
            if let Some(o) = st.owner {
                if o.alive() && o.pid != std::process::id() {
                    return Err(Error::InUse { tag, pid: o.pid });
                }
            }
        }
        down(&tag)?;
        let owner = match opts.delay_runner {
            DelayRunner::InProcess => Some(ProcRef::me()),
            DelayRunner::Process { .. } => None,
        };
        let mut state = State {
            tag: tag.clone(),
            servers: opts.servers,
            owner,
            namespaces: Vec::new(),
            nft_table: net::nft_table(&tag),
            log_dir: opts.log_dir.clone().unwrap_or_else(|| lab_dir(&tag)),
            links: Vec::new(),
            procs: Vec::new(),
            next_id: 0,
        };
        state.namespaces = state.hosts().iter().map(|&h| netns_name(&tag, h)).collect();
        state.links = state
            .hosts()
            .into_iter()
            .filter(|&h| h != Host::Router)
            .map(|host| LinkState {
                host,
                impair: if host == Host::Client {
                    opts.client_link
                } else {
                    opts.servers_link
                },
                kind: LinkKind::Veth,
                delay_line: None,
            })
            .collect();
        {
            let _lock = state::lock(&tag, LOCK_WAIT)?;
            // Recorded before anything is made, so a crash half-way is still cleaned up.
            state.save()?;
        }
        std::fs::create_dir_all(&state.log_dir)
            .map_err(io_err(format!("create {}", state.log_dir.display())))?;
        let lab = Lab {
            tag,
            servers: opts.servers,
            tools,
            runner: opts.delay_runner,
            owned: true,
            inner: Mutex::new(Inner {
                state,
                children: HashMap::new(),
                delay_lines: HashMap::new(),
            }),
        };
        // On an error `lab` is dropped here, which removes what was made.
        lab.update(|inner| lab.build(inner))?;
        Ok(lab)
    }

    /// The lab `tag` made earlier by `mtcp lab up` (another process), to change or use it.
    /// Dropping the handle leaves the lab running.
    pub fn attach(tag: &str) -> Result<Lab> {
        check_root()?;
        check_tag(tag)?;
        let tools = Tools::find()?;
        let state = State::load(tag)?.ok_or_else(|| Error::NoLab(tag.to_string()))?;
        Ok(Lab {
            tag: tag.to_string(),
            servers: state.servers,
            tools,
            runner: DelayRunner::InProcess,
            owned: false,
            inner: Mutex::new(Inner {
                state,
                children: HashMap::new(),
                delay_lines: HashMap::new(),
            }),
        })
    }

    /// Sets who runs delay lines added from now on through this handle (for `mtcp lab
    /// impair` on a lab made by `mtcp lab up`).
    pub fn set_delay_runner(&mut self, r: DelayRunner) {
        self.runner = r;
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn servers(&self) -> u16 {
        self.servers
    }

    /// client, router, s1..sN.
    pub fn hosts(&self) -> Vec<Host> {
        let mut v = vec![Host::Client, Host::Router];
        v.extend((1..=self.servers).map(Host::Server));
        v
    }

    /// The servers, s1..sN.
    pub fn server_hosts(&self) -> Vec<Host> {
        (1..=self.servers).map(Host::Server).collect()
    }

    /// The host's address (the router's on the client link for [`Host::Router`]).
    pub fn addr(&self, host: Host) -> Ipv4Addr {
        host.addr()
    }

    /// The host's network namespace.
    pub fn netns(&self, host: Host) -> String {
        netns_name(&self.tag, host)
    }

    /// Where logs of spawned processes go.
    pub fn log_dir(&self) -> PathBuf {
        self.lock().state.log_dir.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_host(&self, host: Host) -> Result<()> {
        match host {
            Host::Server(i) if !(1..=self.servers).contains(&i) => {
                Err(Error::UnknownHost(host.name()))
            }
            _ => Ok(()),
        }
    }

    /// Leaves the lab running (its state stays in /run/mtcp-lab for `mtcp lab …` and
    /// [`down`]). Delay lines run by this process ([`DelayRunner::InProcess`]) stop here: their
    /// links go dark until `down`.
    pub fn detach(mut self) {
        self.owned = false;
    }

    /// Tears the lab down now (what dropping it does), with the outcome.
    pub fn down(mut self) -> Result<DownReport> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<DownReport> {
        self.owned = false;
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for c in inner.children.values_mut() {
            let _ = c.kill();
        }
        for (_, mut c) in inner.children.drain() {
            wait_child(&mut c, KILL_WAIT);
        }
        // Closing the TUN fds removes the devices before their namespaces go.
        for (_, dl) in inner.delay_lines.drain() {
            dl.stop();
        }
        down(&self.tag)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.teardown() {
                eprintln!("mtcp-lab: removing lab {:?}: {e}", self.tag);
            }
        }
    }
}
