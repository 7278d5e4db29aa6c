//! Building the lab's hosts and links, and changing a link's impairments.

use crate::*;
use delay::{open_tun, DelayLine};
use error::io_err;
use ns::{check_tag, netns_path, open_netns, wrap_command};
use state::State;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

impl Lab {
    /// Loads the nftables `script` (one transaction, `nft -f -`) inside `host`'s namespace:
    /// a test's own filtering beside the lab's impairments. Its tables go with the namespace
    /// at `down`.
    pub fn nft(&self, host: Host, script: &str) -> Result<()> {
        self.check_host(host)?;
        self.tools.nft(&self.netns(host), script)
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

    /// Applies `f` to the state under the lab's lock and saves it (also when `f` fails half
    /// way, so that what was made is recorded). A handle from [`Lab::attach`] reads the state
    /// afresh first.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
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
    pub(crate) fn build(&self, inner: &mut Inner) -> Result<()> {
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
    pub(crate) fn configure_link(
        &self,
        inner: &mut Inner,
        host: Host,
        had_rate: bool,
    ) -> Result<()> {
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
    pub(crate) fn apply_rate(&self, inner: &Inner, host: Host, had_rate: bool) -> Result<()> {
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
    pub(crate) fn apply_nft(&self, inner: &Inner) -> Result<()> {
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
    pub(crate) fn start_delay_line(&self, inner: &mut Inner, host: Host) -> Result<()> {
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
    pub(crate) fn set_line(&self, inner: &mut Inner, host: Host) -> Result<bool> {
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

/// Starts `program ARGS… --tag T --host H` in the router's namespace and waits until it says
/// `ready` (its devices exist and it forwards).
pub(crate) fn spawn_delay_process(
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
