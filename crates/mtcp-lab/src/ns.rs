//! Hosts of a lab: their names, namespaces, addresses and device names, and running code or a
//! command inside a host's network namespace (`setns` on a thread of our own, or in a child
//! before `exec`).

use crate::error::{io_err, Error, Result};
use std::ffi::CString;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;

/// Most servers a lab has (server `i` gets 198.18.i.0/24).
pub const MAX_SERVERS: u16 = 200;

/// Where `ip netns` keeps its named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// A host of the lab: the client, the router between everyone, or server `i` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Client,
    Router,
    Server(u16),
}

impl Host {
    /// `client`, `router`, `s1`, …
    pub fn name(self) -> String {
        self.to_string()
    }

    /// The third octet of the host's subnet (the router's side of the link is `.1`).
    fn octet(self) -> u8 {
        match self {
            Host::Client | Host::Router => 0,
            Host::Server(i) => i.min(255) as u8,
        }
    }

    /// The host's address: 198.18.0.2 (client), 198.18.i.2 (server i), 198.18.0.1 (router,
    /// its address on the client's link).
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Host::Router => Ipv4Addr::new(198, 18, 0, 1),
            h => Ipv4Addr::new(198, 18, h.octet(), 2),
        }
    }

    /// The router's address on this host's link (the host's default gateway).
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet(), 1)
    }

    /// The link's device inside the host: `mc0` (client), `ms<i>` (server i).
    pub fn host_dev(self) -> String {
        match self {
            Host::Server(i) => format!("ms{i}"),
            _ => "mc0".into(),
        }
    }

    /// The link's device inside the router: `rc0` (client's link), `rs<i>` (server i's).
    pub fn router_dev(self) -> String {
        match self {
            Host::Server(i) => format!("rs{i}"),
            _ => "rc0".into(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Client => f.write_str("client"),
            Host::Router => f.write_str("router"),
            Host::Server(i) => write!(f, "s{i}"),
        }
    }
}

impl FromStr for Host {
    type Err = Error;
    fn from_str(s: &str) -> Result<Host> {
        match s {
            "client" => Ok(Host::Client),
            "router" => Ok(Host::Router),
            _ => s
                .strip_prefix('s')
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u16>().ok())
                .filter(|i| (1..=MAX_SERVERS).contains(i))
                .map(Host::Server)
                .ok_or_else(|| Error::UnknownHost(s.to_string())),
        }
    }
}

impl From<Host> for String {
    fn from(h: Host) -> String {
        h.to_string()
    }
}

impl TryFrom<String> for Host {
    type Error = Error;
    fn try_from(s: String) -> Result<Host> {
        s.parse()
    }
}

impl serde::Serialize for Host {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Host {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Host, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a lab tag: 1 to 10 lowercase letters or digits (it becomes part of namespace and
/// nftables table names, and `mtcp-<tag>-` must not be a prefix of another lab's names).
pub fn check_tag(tag: &str) -> Result<()> {
    if (1..=10).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(Error::BadTag(tag.to_string()))
    }
}

/// The network namespace of `host` in lab `tag`: `mtcp-<tag>-<host>`.
pub fn netns_name(tag: &str, host: Host) -> String {
    format!("mtcp-{tag}-{host}")
}

/// If `name` is a namespace of lab `tag` (`mtcp-<tag>-client|router|s<i>`), its host.
pub(crate) fn host_of_netns(tag: &str, name: &str) -> Option<Host> {
    name.strip_prefix(&format!("mtcp-{tag}-"))?.parse().ok()
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Every namespace name under /run/netns.
pub(crate) fn list_netns() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Opens a named network namespace (the handle `setns` takes).
pub(crate) fn open_netns(name: &str) -> Result<OwnedFd> {
    let path = netns_path(name);
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in a netns path");
    // SAFETY: a valid C string; the returned fd is owned by the OwnedFd below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_err(format!("open network namespace {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just opened and is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the calling thread into the network namespace `fd`.
pub(crate) fn enter(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid fd; only this thread's namespace changes.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `name` and returns its result. Sockets
/// `f` creates belong to that namespace and keep working from any thread afterwards.
pub(crate) fn run_in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let fd = open_netns(name)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&fd).map_err(io_err(format!("enter network namespace {name}")))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Makes `cmd` run inside network namespace `name`: the child opens the namespace and calls
/// `setns` between fork and exec (both async-signal-safe), so nothing stays open in the parent.
pub(crate) fn wrap_command(cmd: &mut Command, name: &str) {
    let path = CString::new(netns_path(name).as_os_str().as_encoded_bytes())
        .expect("no NUL in a netns path");
    // SAFETY: the closure only makes the open/setns/close syscalls (async-signal-safe) on a
    // C string allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            if r != 0 {
                return Err(e);
            }
            Ok(())
        });
    }
}

/// Writes a sysctl of the calling thread's network namespace (`net/ipv4/ip_forward`, …).
pub(crate) fn write_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_round_trip() {
        for h in [
            Host::Client,
            Host::Router,
            Host::Server(1),
            Host::Server(200),
        ] {
            assert_eq!(h.name().parse::<Host>().unwrap(), h);
        }
        for bad in ["", "s", "s0", "s201", "s-1", "S1", "server1", "s1x", "s+1"] {
            assert!(bad.parse::<Host>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn addresses_and_devices() {
        assert_eq!(Host::Client.addr(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(Host::Client.gateway(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(Host::Router.addr(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(Host::Server(7).addr(), Ipv4Addr::new(198, 18, 7, 2));
        assert_eq!(Host::Server(7).gateway(), Ipv4Addr::new(198, 18, 7, 1));
        assert_eq!(Host::Server(200).router_dev(), "rs200");
        assert_eq!(Host::Client.host_dev(), "mc0");
        for h in [Host::Client, Host::Server(1), Host::Server(200)] {
            let a = h.addr().octets();
            assert!(a[0] == 198 && (a[1] & 0xfe) == 18, "inside 198.18.0.0/15");
            assert!(h.router_dev().len() <= 15 && h.host_dev().len() <= 15);
        }
    }

    #[test]
    fn tags_and_namespace_names() {
        assert!(check_tag("lab").is_ok());
        assert!(check_tag("a1b2c3d4e5").is_ok());
        for bad in ["", "Lab", "a-b", "a_b", "abcdefghijk", "x y"] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
        assert_eq!(netns_name("lab", Host::Server(3)), "mtcp-lab-s3");
        assert_eq!(host_of_netns("lab", "mtcp-lab-s3"), Some(Host::Server(3)));
        assert_eq!(host_of_netns("lab", "mtcp-lab-router"), Some(Host::Router));
        assert_eq!(host_of_netns("lab", "mtcp-lab2-s3"), None);
        assert_eq!(host_of_netns("lab", "mtcp-lab-s3x"), None);
        assert_eq!(host_of_netns("la", "mtcp-lab-client"), None);
    }
}
