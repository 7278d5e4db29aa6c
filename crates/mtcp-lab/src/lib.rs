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
mod net;
mod ns;
mod proc;
mod state;

pub use error::{Error, Result};
pub use ns::{netns_name, Host, MAX_SERVERS};
pub use proc::ProcRef;
pub use state::{lab_dir, LinkKind, RUN_DIR};

use delay::{open_tun, DelayLine};
use error::io_err;
use net::Tools;
use ns::{check_tag, netns_path, open_netns, wrap_command};
use serde::{Deserialize, Serialize};
use state::{LinkState, ProcRecord, State};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest wait for the lab's lock (another command changing the same lab).
const LOCK_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for a delay-line process to have made its devices.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Impairments of one host↔router link (see the crate docs for their exact meaning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Impairment {
    /// Round-trip time the link adds, ms (half of it in each direction).
    pub delay_ms: u32,
    /// Packets dropped in each direction, percent (0–100, resolution 0.01).
    pub loss_pct: f64,
    /// Rate limit of each direction, Mbit/s (`None`: unlimited).
    pub rate_mbit: Option<f64>,
    /// Drop every packet to and from the host.
    pub blackhole: bool,
}

impl Impairment {
    /// Whether the link needs a delay line (delay or loss).
    pub fn needs_line(&self) -> bool {
        self.delay_ms > 0 || self.loss_pct > 0.0
    }

    /// Checks the values are usable.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return Err(Error::Invalid(format!(
                "loss {} % is not within 0..=100",
                self.loss_pct
            )));
        }
        if let Some(r) = self.rate_mbit {
            if !(0.008..=100_000.0).contains(&r) {
                return Err(Error::Invalid(format!(
                    "rate {r} Mbit/s is not within 0.008..=100000"
                )));
            }
        }
        if self.delay_ms > 60_000 {
            return Err(Error::Invalid(format!(
                "delay {} ms is over 60000",
                self.delay_ms
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.blackhole {
            parts.push("BLACKHOLE".to_string());
        }
        if self.delay_ms > 0 {
            parts.push(format!("delay {} ms RTT", self.delay_ms));
        }
        if self.loss_pct > 0.0 {
            parts.push(format!("loss {} %", self.loss_pct));
        }
        if let Some(r) = self.rate_mbit {
            parts.push(format!("rate {r} Mbit/s"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Who runs the delay lines of TUN links.
#[derive(Debug, Clone, Default)]
pub enum DelayRunner {
    /// Threads of the process that holds the [`Lab`] (tests, benchmarks).
    #[default]
    InProcess,
    /// One process per link: `program ARGS… --tag T --host H`, which must call
    /// [`serve_delay_line`] (e.g. `mtcp lab delayline`); used by `mtcp lab up`, whose process
    /// exits while the lab lives on.
    Process { program: PathBuf, args: Vec<String> },
}

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

    /// A command that runs `program` inside `host`'s network namespace (untracked: the caller
    /// waits for it; see [`Lab::spawn`] for processes the lab kills at `down`).
    pub fn command(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        wrap_command(&mut c, &self.netns(host));
        c
    }

    /// Runs `f` on a thread inside `host`'s network namespace. Sockets made there belong to
    /// that namespace and can be used from any thread afterwards.
    pub fn run_in<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.check_host(host)?;
        ns::run_in_netns(&self.netns(host), f)
    }

    /// Starts `argv` inside `host` (own process group, stdin closed, stdout and stderr to
    /// `<log dir>/<host>-<program>-<id>.log`); the lab kills it (by PID) at `down`.
    pub fn spawn<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> Result<LabProc> {
        let Some((prog, args)) = argv.split_first() else {
            return Err(Error::Invalid("an empty command".into()));
        };
        let mut cmd = Command::new(prog);
        cmd.args(args);
        let base = Path::new(prog)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.spawn_inner(host, cmd, Some(base))
    }

    /// Starts `cmd` (stdio as the caller set it) inside `host`, tracked like [`Lab::spawn`].
    pub fn spawn_command(&self, host: Host, cmd: Command) -> Result<LabProc> {
        self.spawn_inner(host, cmd, None)
    }

    fn spawn_inner(&self, host: Host, mut cmd: Command, log_as: Option<String>) -> Result<LabProc> {
        self.check_host(host)?;
        wrap_command(&mut cmd, &self.netns(host));
        cmd.process_group(0);
        let mut argv = vec![cmd.get_program().to_string_lossy().into_owned()];
        argv.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        self.update(|inner| {
            let id = inner.state.next_id + 1;
            let mut log = None;
            if let Some(base) = log_as {
                let p = inner.state.log_dir.join(format!("{host}-{base}-{id}.log"));
                let f =
                    std::fs::File::create(&p).map_err(io_err(format!("create {}", p.display())))?;
                cmd.stdin(Stdio::null())
                    .stdout(f.try_clone().map_err(io_err("dup a log file"))?)
                    .stderr(f);
                log = Some(p);
            }
            let child = cmd
                .spawn()
                .map_err(io_err(format!("start {} in {host}", argv[0])))?;
            let pid = child.id();
            let proc = ProcRef::of(pid).unwrap_or(ProcRef { pid, start: 0 });
            inner.state.next_id = id;
            inner.state.procs.push(ProcRecord {
                id,
                host,
                proc,
                argv,
                log: log.clone(),
                stopped: false,
            });
            if self.owned {
                inner.children.insert(id, child);
            }
            Ok(LabProc { id, host, pid, log })
        })
    }

    /// Processes started in the lab and not killed through it (some may have exited).
    pub fn processes(&self) -> Vec<LabProc> {
        self.lock()
            .state
            .procs
            .iter()
            .map(|r| LabProc {
                id: r.id,
                host: r.host,
                pid: r.proc.pid,
                log: r.log.clone(),
            })
            .collect()
    }

    /// SIGKILLs a process started in the lab and waits (bounded) until it is gone.
    pub fn kill(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Kill).map(drop)
    }

    /// SIGSTOPs a process started in the lab.
    pub fn stop(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Stop).map(drop)
    }

    /// SIGCONTs a process started in the lab.
    pub fn cont(&self, p: &LabProc) -> Result<()> {
        self.signal_procs(|r| r.id == p.id, Fault::Cont).map(drop)
    }

    /// Applies `fault` to every process started in `host`; returns how many.
    pub fn fault(&self, host: Host, fault: Fault) -> Result<usize> {
        self.check_host(host)?;
        self.signal_procs(|r| r.host == host, fault)
            .map_err(|e| match e {
                Error::Invalid(_) => Error::Invalid(format!(
                    "no process was started in {host} through the lab (`mtcp lab exec --detach`)"
                )),
                e => e,
            })
    }

    fn signal_procs(&self, which: impl Fn(&ProcRecord) -> bool, fault: Fault) -> Result<usize> {
        self.update(|inner| {
            let ids: Vec<u64> = inner
                .state
                .procs
                .iter()
                .filter(|r| which(r))
                .map(|r| r.id)
                .collect();
            if ids.is_empty() {
                return Err(Error::Invalid("no such process in the lab".into()));
            }
            match fault {
                Fault::Kill => {
                    let mut refs = Vec::new();
                    for id in &ids {
                        if let Some(mut c) = inner.children.remove(id) {
                            let _ = c.kill();
                            wait_child(&mut c, KILL_WAIT);
                        }
                        if let Some(r) = inner.state.procs.iter().find(|r| r.id == *id) {
                            refs.push(r.proc);
                        }
                    }
                    let left = proc::kill_all(&refs, KILL_WAIT);
                    inner.state.procs.retain(|r| !ids.contains(&r.id));
                    if !left.is_empty() {
                        return Err(Error::Invalid(format!(
                            "processes {:?} survived SIGKILL for {KILL_WAIT:?}",
                            left.iter().map(|p| p.pid).collect::<Vec<_>>()
                        )));
                    }
                }
                Fault::Stop | Fault::Cont => {
                    let stop = fault == Fault::Stop;
                    for r in inner.state.procs.iter_mut().filter(|r| ids.contains(&r.id)) {
                        if !r
                            .proc
                            .signal(if stop { libc::SIGSTOP } else { libc::SIGCONT })
                        {
                            return Err(Error::Invalid(format!(
                                "process {} (pid {}) in {} has exited",
                                r.id, r.proc.pid, r.host
                            )));
                        }
                        r.stopped = stop;
                    }
                }
            }
            Ok(ids.len())
        })
    }

    /// Waits up to `limit` for a process this handle started to exit; its status, or `None`
    /// if it still runs.
    pub fn wait(&self, p: &LabProc, limit: Duration) -> Result<Option<ExitStatus>> {
        let t0 = Instant::now();
        loop {
            {
                let mut inner = self.lock();
                let c = inner.children.get_mut(&p.id).ok_or_else(|| {
                    Error::Invalid(format!(
                        "process {} is not a child of this lab handle",
                        p.id
                    ))
                })?;
                if let Some(s) = c.try_wait().map_err(io_err("wait for a lab process"))? {
                    return Ok(Some(s));
                }
            }
            if t0.elapsed() >= limit {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The impairments of `host`'s link.
    pub fn impairment(&self, host: Host) -> Result<Impairment> {
        self.lock()
            .state
            .link(host)
            .map(|l| l.impair)
            .ok_or_else(|| Error::UnknownHost(host.name()))
    }

    /// Sets every impairment of `host`'s link at once (see the crate docs). A first delay or
    /// loss on a veth link replaces it by a delay line (connections crossing it lose the
    /// packets in flight; they survive). A delay line stays once made (with no delay and no
    /// loss it just forwards).
    pub fn impair(&self, host: Host, imp: Impairment) -> Result<()> {
        imp.check()?;
        if host == Host::Router {
            return Err(Error::Invalid(
                "the router has no link of its own: impair client or s1..sN".into(),
            ));
        }
        self.check_host(host)?;
        self.update(|inner| {
            let link = inner
                .state
                .link_mut(host)
                .ok_or_else(|| Error::UnknownHost(host.name()))?;
            let old = link.impair;
            link.impair = imp;
            let kind = link.kind;
            let mut rate_done = false;
            match kind {
                LinkKind::Veth if imp.needs_line() => {
                    self.tools.ip(
                        &self.netns(Host::Router),
                        &["link", "del", &host.router_dev()],
                    )?;
                    if let Some(l) = inner.state.link_mut(host) {
                        l.kind = LinkKind::Tun;
                    }
                    self.start_delay_line(inner, host)?;
                    self.configure_link(inner, host, false)?;
                    rate_done = true;
                }
                LinkKind::Tun if (imp.delay_ms, imp.loss_pct) != (old.delay_ms, old.loss_pct) => {
                    rate_done = self.set_line(inner, host)?
                }
                LinkKind::Tun => {}
                LinkKind::Veth => {}
            }
            if !rate_done && imp.rate_mbit != old.rate_mbit {
                self.apply_rate(inner, host, old.rate_mbit.is_some())?;
            }
            if imp.blackhole != old.blackhole {
                self.apply_nft(inner)?;
            }
            Ok(())
        })
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

    /// Applies `f` to the state under the lab's lock and saves it (also when `f` fails half
    /// way, so that what was made is recorded). A handle from [`Lab::attach`] reads the state
    /// afresh first.
    fn update<R>(&self, f: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
        let mut inner = self.lock();
        let _lock = state::lock(&self.tag, LOCK_WAIT)?;
        if !self.owned {
            let st = State::load(&self.tag)?.ok_or_else(|| Error::NoLab(self.tag.clone()))?;
            if let Some(o) = st.owner {
                return Err(if o.alive() {
                    Error::InUse {
                        tag: self.tag.clone(),
                        pid: o.pid,
                    }
                } else {
                    Error::Invalid(format!(
                        "lab {:?} belonged to process {}, which is gone: `mtcp lab down --tag {}`",
                        self.tag, o.pid, self.tag
                    ))
                });
            }
            inner.state = st;
        }
        let r = f(&mut inner);
        let saved = inner.state.save();
        let r = r?;
        saved?;
        Ok(r)
    }

    /// Namespaces, loopback, forwarding, the nftables table, every link.
    fn build(&self, inner: &mut Inner) -> Result<()> {
        for host in inner.state.hosts() {
            let ns = self.netns(host);
            self.tools.ip_host(&["netns", "add", &ns])?;
            let router = host == Host::Router;
            ns::run_in_netns(&ns, || -> std::io::Result<()> {
                // No IPv6 inside: only the lab's IPv4 traffic crosses the links.
                let _ = ns::write_sysctl("net/ipv6/conf/all/disable_ipv6", "1");
                let _ = ns::write_sysctl("net/ipv6/conf/default/disable_ipv6", "1");
                if router {
                    ns::write_sysctl("net/ipv4/ip_forward", "1")?;
                }
                Ok(())
            })?
            .map_err(io_err(format!("set sysctls in {ns}")))?;
            self.tools.ip(&ns, &["link", "set", "lo", "up"])?;
        }
        self.apply_nft(inner)?;
        let hosts: Vec<Host> = inner.state.links.iter().map(|l| l.host).collect();
        for host in hosts {
            let line = inner
                .state
                .link(host)
                .is_some_and(|l| l.impair.needs_line());
            if line {
                if let Some(l) = inner.state.link_mut(host) {
                    l.kind = LinkKind::Tun;
                }
                self.start_delay_line(inner, host)?;
            } else {
                self.tools.ip(
                    &self.netns(Host::Router),
                    &[
                        "link",
                        "add",
                        &host.router_dev(),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &host.host_dev(),
                        "netns",
                        &self.netns(host),
                    ],
                )?;
            }
            self.configure_link(inner, host, false)?;
        }
        Ok(())
    }

    /// Addresses, state, route and rate of `host`'s link (its devices exist).
    fn configure_link(&self, inner: &mut Inner, host: Host, had_rate: bool) -> Result<()> {
        let tun = inner
            .state
            .link(host)
            .is_some_and(|l| l.kind == LinkKind::Tun);
        let extra = if tun { " txqueuelen 1000" } else { "" };
        let (rdev, hdev) = (host.router_dev(), host.host_dev());
        self.tools.ip_batch(
            &self.netns(Host::Router),
            &[
                format!("addr replace {}/24 dev {rdev}", host.gateway()),
                format!("link set dev {rdev}{extra} up"),
            ],
        )?;
        self.tools.ip_batch(
            &self.netns(host),
            &[
                format!("addr replace {}/24 dev {hdev}", host.addr()),
                format!("link set dev {hdev}{extra} up"),
                format!("route replace default via {} dev {hdev}", host.gateway()),
            ],
        )?;
        self.apply_rate(inner, host, had_rate)
    }

    /// tc on both ends of `host`'s link: the link's rate, or no qdisc of ours.
    fn apply_rate(&self, inner: &Inner, host: Host, had_rate: bool) -> Result<()> {
        let rate = inner.state.link(host).and_then(|l| l.impair.rate_mbit);
        for (ns, dev) in [
            (self.netns(Host::Router), host.router_dev()),
            (self.netns(host), host.host_dev()),
        ] {
            match rate {
                Some(m) => {
                    let args = net::tbf_args(&dev, m);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    self.tools.tc(&ns, &args)?;
                }
                None if had_rate => {
                    // Fails harmlessly when the device has only its default qdisc.
                    let _ = self.tools.tc(&ns, &["qdisc", "del", "dev", &dev, "root"]);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The lab's nftables table from the links' blackhole settings.
    fn apply_nft(&self, inner: &Inner) -> Result<()> {
        let links: Vec<(Host, Impairment)> = inner
            .state
            .links
            .iter()
            .map(|l| (l.host, l.impair))
            .collect();
        let script = net::nft_ruleset(&inner.state.nft_table, &links);
        self.tools.nft(&self.netns(Host::Router), &script)
    }

    /// Makes `host`'s two TUN devices and the delay line between them.
    fn start_delay_line(&self, inner: &mut Inner, host: Host) -> Result<()> {
        let imp = inner.state.link(host).map(|l| l.impair).unwrap_or_default();
        match &self.runner {
            DelayRunner::InProcess => {
                if !self.owned {
                    return Err(Error::Invalid(
                        "a lab from `mtcp lab up` runs its delay lines as processes".into(),
                    ));
                }
                let r = open_netns(&self.netns(Host::Router))?;
                let h = open_netns(&self.netns(host))?;
                let a = open_tun(&r, &host.router_dev())?;
                let b = open_tun(&h, &host.host_dev())?;
                let dl = DelayLine::start(&host.name(), a, b, imp.delay_ms, imp.loss_pct)?;
                inner.delay_lines.insert(host, dl);
            }
            DelayRunner::Process { program, args } => {
                // The delay-line process reads its delay and loss from the saved state.
                inner.state.save()?;
                let log = lab_dir(&self.tag).join(format!("delayline-{host}.log"));
                let p = spawn_delay_process(program, args, &self.tag, host, &log)?;
                if let Some(l) = inner.state.link_mut(host) {
                    l.delay_line = Some(p);
                }
            }
        }
        Ok(())
    }

    /// Applies a changed delay or loss to a TUN link; whether the link was rebuilt (rate
    /// included).
    fn set_line(&self, inner: &mut Inner, host: Host) -> Result<bool> {
        let imp = inner.state.link(host).map(|l| l.impair).unwrap_or_default();
        if let Some(dl) = inner.delay_lines.get(&host) {
            dl.set(imp.delay_ms, imp.loss_pct);
            return Ok(false);
        }
        match inner.state.link(host).and_then(|l| l.delay_line) {
            Some(p) if p.alive() => {
                // It reads the new values from the state on SIGHUP.
                inner.state.save()?;
                p.signal(libc::SIGHUP);
                Ok(false)
            }
            _ if matches!(self.runner, DelayRunner::Process { .. }) => {
                // Its delay line is gone (and the devices with it): make them again.
                self.start_delay_line(inner, host)?;
                self.configure_link(inner, host, false)?;
                Ok(true)
            }
            _ => Err(Error::Invalid(format!(
                "the delay line of {host} is not running; `mtcp lab down --tag {}` and up again",
                self.tag
            ))),
        }
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

/// Waits up to `limit` for a child to be reaped.
fn wait_child(c: &mut Child, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts `program ARGS… --tag T --host H` in the router's namespace and waits until it says
/// `ready` (its devices exist and it forwards).
fn spawn_delay_process(
    program: &Path,
    args: &[String],
    tag: &str,
    host: Host,
    log: &Path,
) -> Result<ProcRef> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("open {}", log.display())))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .args(["--tag", tag, "--host", &host.name()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .process_group(0);
    wrap_command(&mut cmd, &netns_name(tag, Host::Router));
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("start {}", program.display())))?;
    let out = child.stdout.take().expect("piped stdout");
    let mut got = Vec::new();
    let t0 = Instant::now();
    let failed = loop {
        if got.windows(6).any(|w| w == b"ready\n") {
            break None;
        }
        if let Ok(Some(s)) = child.try_wait() {
            break Some(format!("exited ({s})"));
        }
        if t0.elapsed() > READY_WAIT {
            break Some(format!("not ready after {READY_WAIT:?}"));
        }
        let mut pfd = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
            let mut b = [0u8; 256];
            // SAFETY: reads into a buffer we own.
            let n = unsafe { libc::read(out.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            if n > 0 {
                got.extend_from_slice(&b[..n as usize]);
            } else if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    if let Some(why) = failed {
        let _ = child.kill();
        wait_child(&mut child, KILL_WAIT);
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail = text.lines().last().unwrap_or("").to_string();
        return Err(Error::Command {
            what: format!("delay line for {host}"),
            detail: format!("{why}: {tail} (log {})", log.display()),
        });
    }
    let pid = child.id();
    ProcRef::of(pid).ok_or_else(|| Error::Invalid(format!("delay line {pid} vanished")))
}

/// What [`down`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownReport {
    /// Namespaces removed.
    pub namespaces: Vec<String>,
    /// PIDs killed.
    pub killed: Vec<u32>,
}

/// Removes lab `tag`: kills the processes it recorded and every process inside its
/// namespaces (SIGCONT, SIGKILL, by PID), deletes its nftables table and every namespace it
/// recorded or named `mtcp-<tag>-*` (their devices go with them), and its directory. Works
/// without a state file (after a crash) and on a lab that is already gone.
pub fn down(tag: &str) -> Result<DownReport> {
    check_root()?;
    check_tag(tag)?;
    // A command stuck with the lock must not keep the lab alive: go on without it.
    let _lock = state::lock(tag, LOCK_WAIT).ok();
    let st = State::load(tag).ok().flatten();
    let mut procs: Vec<ProcRef> = Vec::new();
    let mut names: BTreeSet<String> = ns::list_netns()
        .into_iter()
        .filter(|n| ns::host_of_netns(tag, n).is_some())
        .collect();
    if let Some(st) = &st {
        procs.extend(st.procs.iter().map(|r| r.proc));
        procs.extend(st.links.iter().filter_map(|l| l.delay_line));
        names.extend(st.namespaces.iter().cloned());
    }
    names.retain(|n| netns_path(n).exists());
    for n in &names {
        procs.extend(proc::in_netns(&netns_path(n)));
    }
    procs.retain(|p| p.alive() && p.pid != std::process::id());
    procs.sort_by_key(|p| p.pid);
    procs.dedup();
    let mut report = DownReport {
        killed: procs.iter().map(|p| p.pid).collect(),
        ..Default::default()
    };
    let left = proc::kill_all(&procs, KILL_WAIT);
    let mut errors: Vec<String> = left
        .iter()
        .map(|p| format!("process {} survived SIGKILL", p.pid))
        .collect();
    let router = netns_name(tag, Host::Router);
    if names.contains(&router) {
        if let Ok(t) = Tools::find() {
            // Also goes with the namespace; deleted first so that nothing is left if the
            // namespace outlives this command (a process we could not kill holds it).
            let _ = t.nft(
                &router,
                &format!("delete table inet {}", net::nft_table(tag)),
            );
        }
    }
    let ip = Tools::find_ip();
    for n in &names {
        match ip
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|t| t.ip_host(&["netns", "del", n]).map_err(|e| e.to_string()))
        {
            Ok(_) => report.namespaces.push(n.clone()),
            Err(e) => errors.push(e),
        }
    }
    let dir = lab_dir(tag);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(Error::Invalid(format!(
            "lab {tag:?} not fully removed: {}",
            errors.join("; ")
        )))
    }
}

/// Tags of every lab that has a state directory or a namespace.
pub fn tags() -> Vec<String> {
    let mut t: BTreeSet<String> = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(RUN_DIR) {
        t.extend(rd.filter_map(|e| e.ok()?.file_name().into_string().ok()));
    }
    for n in ns::list_netns() {
        if let Some((tag, host)) = n.strip_prefix("mtcp-").and_then(|r| r.split_once('-')) {
            if check_tag(tag).is_ok() && host.parse::<Host>().is_ok() {
                t.insert(tag.to_string());
            }
        }
    }
    t.retain(|s| check_tag(s).is_ok());
    t.into_iter().collect()
}

/// What a lab has, for `mtcp lab status`.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub tag: String,
    /// False: namespaces named like the lab's but no state (left by a crash; `down` removes
    /// them).
    pub recorded: bool,
    pub servers: u16,
    pub owner_pid: Option<u32>,
    pub owner_alive: bool,
    pub nft_table: String,
    pub hosts: Vec<HostStatus>,
    pub procs: Vec<ProcStatus>,
    /// Namespaces of the lab's pattern that exist (recorded or not).
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub host: Host,
    pub addr: Ipv4Addr,
    pub netns: String,
    pub netns_exists: bool,
    /// `None` for the router.
    pub link: Option<LinkStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub kind: LinkKind,
    pub host_dev: String,
    pub router_dev: String,
    pub impair: Impairment,
    pub delay_line_pid: Option<u32>,
    pub delay_line_alive: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcStatus {
    pub id: u64,
    pub host: Host,
    pub pid: u32,
    pub alive: bool,
    pub stopped: bool,
    pub argv: Vec<String>,
    pub log: Option<PathBuf>,
}

/// The status of lab `tag`, if anything of it exists.
pub fn status(tag: &str) -> Result<Option<LabStatus>> {
    check_tag(tag)?;
    let namespaces: Vec<String> = ns::list_netns()
        .into_iter()
        .filter(|n| ns::host_of_netns(tag, n).is_some())
        .collect();
    let Some(st) = State::load(tag)? else {
        if namespaces.is_empty() {
            return Ok(None);
        }
        return Ok(Some(LabStatus {
            tag: tag.to_string(),
            recorded: false,
            servers: 0,
            owner_pid: None,
            owner_alive: false,
            nft_table: net::nft_table(tag),
            hosts: Vec::new(),
            procs: Vec::new(),
            namespaces,
        }));
    };
    let hosts = st
        .hosts()
        .into_iter()
        .map(|h| {
            let netns = netns_name(tag, h);
            HostStatus {
                host: h,
                addr: h.addr(),
                netns_exists: netns_path(&netns).exists(),
                netns,
                link: st.link(h).map(|l| {
                    let in_process = l.kind == LinkKind::Tun && l.delay_line.is_none();
                    LinkStatus {
                        kind: l.kind,
                        host_dev: h.host_dev(),
                        router_dev: h.router_dev(),
                        impair: l.impair,
                        delay_line_pid: l
                            .delay_line
                            .map(|p| p.pid)
                            .or(st.owner.filter(|_| in_process).map(|o| o.pid)),
                        delay_line_alive: l.delay_line.is_some_and(|p| p.alive())
                            || (in_process && st.owner.is_some_and(|o| o.alive())),
                    }
                }),
            }
        })
        .collect();
    let procs = st
        .procs
        .iter()
        .map(|r| ProcStatus {
            id: r.id,
            host: r.host,
            pid: r.proc.pid,
            alive: r.proc.alive(),
            stopped: r.proc.stopped(),
            argv: r.argv.clone(),
            log: r.log.clone(),
        })
        .collect();
    Ok(Some(LabStatus {
        tag: tag.to_string(),
        recorded: true,
        servers: st.servers,
        owner_pid: st.owner.map(|o| o.pid),
        owner_alive: st.owner.is_some_and(|o| o.alive()),
        nft_table: st.nft_table.clone(),
        hosts,
        procs,
        namespaces,
    }))
}

static SIGHUP_SEEN: AtomicBool = AtomicBool::new(false);
static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        SIGHUP_SEEN.store(true, Ordering::SeqCst);
    } else {
        SIGTERM_SEEN.store(true, Ordering::SeqCst);
    }
}

/// The body of a delay-line process (`mtcp lab delayline --tag T --host H`): makes `host`'s
/// two TUN devices, prints `ready`, forwards with the delay and loss recorded in the lab's
/// state (read again on SIGHUP) until SIGTERM/SIGINT or until the lab's router namespace is
/// gone.
pub fn serve_delay_line(tag: &str, host: Host) -> Result<()> {
    check_root()?;
    check_tag(tag)?;
    for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to atomics (async-signal-safe).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let link = |st: &State| st.link(host).map(|l| l.impair);
    let st = State::load(tag)?.ok_or_else(|| Error::NoLab(tag.to_string()))?;
    let imp = link(&st).ok_or_else(|| Error::UnknownHost(host.name()))?;
    let a = open_tun(
        &open_netns(&netns_name(tag, Host::Router))?,
        &host.router_dev(),
    )?;
    let b = open_tun(&open_netns(&netns_name(tag, host))?, &host.host_dev())?;
    let dl = DelayLine::start(&host.name(), a, b, imp.delay_ms, imp.loss_pct)?;
    {
        use std::io::Write;
        let mut o = std::io::stdout();
        writeln!(o, "ready")
            .and_then(|_| o.flush())
            .map_err(io_err("tell the lab the delay line is ready"))?;
    }
    tracing::info!(%tag, %host, rtt_ms = imp.delay_ms, loss_pct = imp.loss_pct, "delay line running");
    let router = netns_path(&netns_name(tag, Host::Router));
    let mut checked = Instant::now();
    while !SIGTERM_SEEN.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
        if SIGHUP_SEEN.swap(false, Ordering::SeqCst) {
            if let Some(i) = State::load(tag).ok().flatten().as_ref().and_then(link) {
                dl.set(i.delay_ms, i.loss_pct);
                tracing::info!(%host, rtt_ms = i.delay_ms, loss_pct = i.loss_pct, "changed");
            }
        }
        if checked.elapsed() > Duration::from_secs(1) {
            checked = Instant::now();
            if !router.exists() {
                tracing::warn!("the lab's router namespace is gone; stopping");
                break;
            }
        }
    }
    let [up, down] = dl.stop();
    tracing::info!(?up, ?down, "delay line stopped");
    Ok(())
}
