//! The commands that build a lab: `ip` (namespaces, links, addresses, routes), `tc` (rate) and
//! `nft` (loss, blackhole), each run with a time limit, inside the lab's namespaces only.

use crate::error::{io_err, Error, Result};
use crate::ns::{wrap_command, Host};
use crate::Impairment;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest any one `ip`/`tc`/`nft` command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(15);

/// Where the lab's external tools are.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    ip: PathBuf,
    tc: PathBuf,
    nft: PathBuf,
}

/// `name` in `$PATH` or the usual system directories (root's tools live in sbin, which a
/// user's `$PATH` may lack).
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Tools {
    pub(crate) fn find() -> Result<Tools> {
        let get = |tool: &'static str, package: &'static str| {
            which(tool).ok_or(Error::MissingTool { tool, package })
        };
        Ok(Tools {
            ip: get("ip", "iproute2")?,
            tc: get("tc", "iproute2")?,
            nft: get("nft", "nftables")?,
        })
    }

    /// Only `ip` (enough to remove namespaces).
    pub(crate) fn find_ip() -> Result<Tools> {
        let ip = which("ip").ok_or(Error::MissingTool {
            tool: "ip",
            package: "iproute2",
        })?;
        Ok(Tools {
            ip,
            tc: PathBuf::from("tc"),
            nft: PathBuf::from("nft"),
        })
    }

    /// `ip ARGS` in the host's namespace (only for `ip netns add|del`).
    pub(crate) fn ip_host(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.ip);
        c.args(args);
        run(c, None, &format!("ip {}", args.join(" ")))
    }

    /// `ip -batch -` inside namespace `ns`, one command per line.
    pub(crate) fn ip_batch(&self, ns: &str, lines: &[String]) -> Result<()> {
        let mut c = Command::new(&self.ip);
        c.args(["-batch", "-"]);
        wrap_command(&mut c, ns);
        let script = lines.join("\n") + "\n";
        run(
            c,
            Some(&script),
            &format!("ip in {ns}: {}", lines.join("; ")),
        )
        .map(drop)
    }

    /// `ip ARGS` inside namespace `ns`.
    pub(crate) fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.ip);
        c.args(args);
        wrap_command(&mut c, ns);
        run(c, None, &format!("ip {} (in {ns})", args.join(" ")))
    }

    /// `tc ARGS` inside namespace `ns`.
    pub(crate) fn tc(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.tc);
        c.args(args);
        wrap_command(&mut c, ns);
        run(c, None, &format!("tc {} (in {ns})", args.join(" ")))
    }

    /// `nft -f -` with `script`, inside namespace `ns` (one transaction).
    pub(crate) fn nft(&self, ns: &str, script: &str) -> Result<()> {
        let mut c = Command::new(&self.nft);
        c.args(["-f", "-"]);
        wrap_command(&mut c, ns);
        run(c, Some(script), &format!("nft (in {ns})")).map(drop)
    }
}

/// Runs `c` (stdin `input`), waits at most [`COMMAND_LIMIT`], returns its stdout; a failure
/// says what was being done and the command's own message.
fn run(mut c: Command, input: Option<&str>, what: &str) -> Result<String> {
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(io_err(what))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A command that exits early closes its stdin: its exit status says why.
        let _ = stdin.write_all(text.as_bytes());
    }
    // Output is small (these commands print a line or two): read it after the exit.
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait().map_err(io_err(what))? {
            Some(s) => break s,
            None if t0.elapsed() > COMMAND_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Command {
                    what: what.to_string(),
                    detail: format!("no answer after {COMMAND_LIMIT:?}"),
                });
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        let msg = err.trim();
        return Err(Error::Command {
            what: what.to_string(),
            detail: if msg.is_empty() {
                status.to_string()
            } else {
                msg.replace('\n', " / ")
            },
        });
    }
    Ok(out)
}

/// The lab's nftables table (in the router's namespace).
pub(crate) fn nft_table(tag: &str) -> String {
    format!("mtcp_lab_{tag}")
}

/// The whole lab table, replacing any previous version in one transaction: for each
/// blackholed host, every packet entering the router from its link (prerouting, `iifname`)
/// and leaving the router to it (postrouting, `oifname`) is dropped. (Loss is the delay
/// line's: see [`crate::delay`].)
pub(crate) fn nft_ruleset(table: &str, links: &[(Host, Impairment)]) -> String {
    let mut pre = String::new();
    let mut post = String::new();
    for (h, _) in links.iter().filter(|(_, imp)| imp.blackhole) {
        let dev = h.router_dev();
        pre += &format!("\t\tiifname \"{dev}\" drop\n");
        post += &format!("\t\toifname \"{dev}\" drop\n");
    }
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tchain pre {{\n\t\ttype filter hook prerouting priority -300; policy accept;\n{pre}\t}}\n\
         \tchain post {{\n\t\ttype filter hook postrouting priority 300; policy accept;\n{post}\t}}\n}}\n"
    )
}

/// `tc` arguments that limit `dev`'s egress to `mbit` Mbit/s: a token bucket whose burst is
/// 5 ms of traffic (at least 4 full frames) and whose queue holds 50 ms.
pub(crate) fn tbf_args(dev: &str, mbit: f64) -> Vec<String> {
    let kbit = (mbit * 1000.0).round().max(8.0) as u64;
    let burst = (kbit * 1000 / 8 / 200).max(4 * 1514);
    [
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{kbit}kbit"),
        "burst",
        &burst.to_string(),
        "latency",
        "50ms",
    ]
    .map(String::from)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_per_link() {
        let links = [
            (Host::Client, Impairment::default()),
            (
                Host::Server(1),
                Impairment {
                    loss_pct: 30.0,
                    ..Default::default()
                },
            ),
            (
                Host::Server(2),
                Impairment {
                    loss_pct: 12.345,
                    blackhole: true,
                    ..Default::default()
                },
            ),
        ];
        let r = nft_ruleset("mtcp_lab_t", &links);
        assert!(r.starts_with("table inet mtcp_lab_t\ndelete table inet mtcp_lab_t\n"));
        assert!(
            r.contains("iifname \"rs2\" drop"),
            "blackhole drops everything"
        );
        assert!(r.contains("oifname \"rs2\" drop"));
        assert!(!r.contains("rc0"), "an unimpaired link has no rule");
        assert!(!r.contains("rs1"), "loss is the delay line's");
    }

    #[test]
    fn tbf_parameters() {
        let a = tbf_args("rs1", 10.0).join(" ");
        assert_eq!(
            a,
            "qdisc replace dev rs1 root tbf rate 10000kbit burst 6250 latency 50ms"
        );
        let a = tbf_args("rs1", 0.1).join(" ");
        assert!(a.contains("rate 100kbit burst 6056 "), "{a}");
    }
}
