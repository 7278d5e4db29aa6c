//! Well-known user-space TCP relays that `mtcp bench throughput` times beside the agent, in the
//! same run: socat and HAProxy (TCP mode), each with its best settings for a bulk download
//! (socat with 256 KiB transfer blocks; HAProxy with `splice-auto`, so the kernel moves the
//! bytes between the two sockets without copying them to user space).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a relay may take to start listening.
const START: Duration = Duration::from_secs(10);

/// A relay process listening on loopback and forwarding every connection to one address.
/// Stopped (by its PID) when dropped.
pub struct Relay {
    pub name: &'static str,
    pub listen: String,
    child: Child,
}

/// Where `prog` is: on `PATH`, or in `/usr/sbin` (HAProxy's place on Debian, not on every
/// user's `PATH`).
pub fn find(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

impl Relay {
    /// `socat` forwarding to `to`, a child process per connection (`fork`), 256 KiB blocks.
    pub fn socat(to: &str) -> Result<Relay> {
        let bin = find("socat").context("socat is not installed")?;
        let port = mtcp_harness::local::free_port();
        let mut c = Command::new(bin);
        c.args([
            "-b",
            "262144",
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"),
            &format!("TCP:{to},nodelay"),
        ]);
        Relay::start("socat", port, c)
    }

    /// HAProxy in TCP mode forwarding to `to`, with `splice-auto`; its configuration goes in
    /// `dir`.
    pub fn haproxy(to: &str, dir: &Path) -> Result<Relay> {
        let bin = find("haproxy").context("HAProxy is not installed")?;
        let port = mtcp_harness::local::free_port();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 64\n  tune.bufsize 262144\n\
                 defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
                 frontend bench\n  bind 127.0.0.1:{port}\n  default_backend plain\n\
                 backend plain\n  server plain {to}\n"
            ),
        )?;
        // `-db`: in the foreground, so the child is the process that relays.
        let mut c = Command::new(bin);
        c.arg("-db").arg("-f").arg(&cfg);
        Relay::start("haproxy", port, c)
    }

    /// Runs `c` (its output discarded) and waits until it accepts connections on `port`.
    fn start(name: &'static str, port: u16, mut c: Command) -> Result<Relay> {
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut r = Relay {
            name,
            listen: format!("127.0.0.1:{port}"),
            child,
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&r.listen).is_err() {
            if let Some(st) = r.child.try_wait()? {
                bail!("{name} exited before it listened ({st})");
            }
            if t0.elapsed() > START {
                bail!("{name} did not listen on {} within {START:?}", r.listen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 2 s) until the relay has no child process left, so that a finished
    /// connection's CPU time is in [`Relay::cpu_secs`] before the next path runs.
    pub fn settle(&self) {
        let path = format!("/proc/{0}/task/{0}/children", self.pid());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            match std::fs::read_to_string(&path) {
                Ok(c) if !c.trim().is_empty() => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
    }

    /// CPU seconds (user + system) of the relay and of its children that ended (socat's
    /// per-connection processes), from `/proc/PID/stat`.
    pub fn cpu_secs(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
        // f[0] is field 3; utime, stime, cutime, cstime are fields 14 to 17.
        let ticks: f64 = (11..15)
            .map(|i| f.get(i)?.parse::<f64>().ok())
            .sum::<Option<f64>>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks / hz as f64)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
