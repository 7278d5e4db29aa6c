//! Fencing a flow while no socket holds its connection.
//!
//! Between [`crate::Frozen::discard`] and [`crate::restore()`] the connection has no socket: a
//! packet from the peer then meets a listener or nothing and is answered with a reset, which
//! ends the peer's connection. A [`Fence`] drops the peer's packets of that one flow in the
//! meantime; the peer retransmits what it sent into the fence, and the new socket's window probe
//! ([`crate::window_probe`]) restarts the flow at once after the fence goes.
//!
//! It drops the flow's packets *to* the peer as well (an `output` chain). A socket in repair mode
//! still transmits queued output (when TCP small queues releases it, or a timer fires) unless its
//! send queue is selected, so bytes could leave after the freeze read which bytes were sent: the
//! state would call them unsent, the peer would have them, and the recreated socket's sequence
//! numbers would lag behind the peer's — a connection that stalls for good (seen about once in
//! five fast-path benchmark runs). Dropped at the fence, such bytes never reach the peer, and the
//! recreated socket sends them again.
//!
//! [`Fences`] is one nftables table per process (`mtcp_fence_<pid>`) with a set of fenced flows
//! and a rule dropping them, created with the `nft` tool once. Putting a fence up or down is one
//! set element added or deleted over netlink ([`crate::nfnl`]): two system calls, where a
//! change through a long-lived `nft -i` process cost ~0.66 ms and creating and deleting a table
//! per fence 10–30 ms (deleting a base chain waits for the kernel's RCU grace period). The table
//! goes when the [`Fences`] is dropped; tables of processes that died without dropping theirs are
//! removed by the next [`Fences::open`].

use crate::nfnl::{self, Netlink, Op};
use crate::RepairError;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Prefix of every fence table's name (`mtcp_fence_<pid>`, or `mtcp_fence_<pid>_<n>` for a
/// process's second and later tables).
pub const TABLE_PREFIX: &str = "mtcp_fence_";

/// Whether `table` is named like a fence table: the prefix, a pid, and maybe `_<n>`.
fn is_fence_table(table: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let rest = table.strip_prefix(TABLE_PREFIX).unwrap_or("");
    match rest.split_once('_') {
        Some((pid, n)) => digits(pid) && digits(n),
        None => digits(rest),
    }
}

fn err(msg: impl Into<String>) -> RepairError {
    RepairError::Invalid(msg.into())
}

/// Runs `nft` once with `args` (and `stdin`), for set-up and clean-up.
fn nft_once(args: &[&str], stdin: Option<&str>) -> Result<String, RepairError> {
    let mut c = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            err(format!(
                "cannot run nft (the fast path needs nftables and root): {e}"
            ))
        })?;
    if let (Some(mut i), Some(s)) = (c.stdin.take(), stdin) {
        i.write_all(s.as_bytes())
            .map_err(|e| err(format!("nft: {e}")))?;
    }
    let out = c.wait_with_output().map_err(|e| err(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The process's fence table and the netlink socket that edits it.
pub struct Fences {
    table: String,
    nl: Mutex<Netlink>,
}

impl Fences {
    /// Creates this process's fence table (removing those of dead processes first). Needs
    /// root and the `nft` tool.
    pub fn open() -> Result<Arc<Fences>, RepairError> {
        remove_stale_tables();
        // One table per process, named by its pid; a second `Fences` in the same process (an
        // agent and servers in one test) gets its own, `<pid>_<n>`, instead of replacing it.
        static OPENED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let table = match n {
            0 => format!("{TABLE_PREFIX}{}", std::process::id()),
            n => format!("{TABLE_PREFIX}{}_{n}", std::process::id()),
        };
        // Replaces a table of the same name (a process of the same pid that died).
        let _ = nft_once(&["delete", "table", "inet", &table], None);
        let rules = format!(
            "table inet {table} {{\n \
               set f4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }}\n \
               set f6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; }}\n \
               chain input {{\n  type filter hook input priority -10;\n  \
                 ip saddr . tcp sport . ip daddr . tcp dport @f4 drop\n  \
                 ip6 saddr . tcp sport . ip6 daddr . tcp dport @f6 drop\n \
               }}\n \
               chain output {{\n  type filter hook output priority -10;\n  \
                 ip daddr . tcp dport . ip saddr . tcp sport @f4 drop\n  \
                 ip6 daddr . tcp dport . ip6 saddr . tcp sport @f6 drop\n \
               }}\n}}\n"
        );
        let nl = Netlink::open().map_err(|e| err(format!("netlink (nftables): {e}")))?;
        nft_once(&["-f", "-"], Some(&rules))?;
        Ok(Arc::new(Fences {
            table,
            nl: Mutex::new(nl),
        }))
    }

    /// The nftables table holding the fences.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Drops the packets `remote` sends to `local` (one TCP flow) until the fence is dropped.
    pub fn fence(
        self: &Arc<Self>,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Fence, RepairError> {
        self.fence_for(local, remote, None)
    }

    /// As [`Fences::fence`], but the kernel also takes the fence down by itself after `ttl`:
    /// for a fence [`Fence::leave_up`] hands to another process, which lifts it with [`lift`]
    /// — if that process dies first, the flow is not cut off for good.
    pub fn fence_expiring(
        self: &Arc<Self>,
        local: SocketAddr,
        remote: SocketAddr,
        ttl: Duration,
    ) -> Result<Fence, RepairError> {
        self.fence_for(local, remote, Some(ttl.as_millis().max(1) as u64))
    }

    fn fence_for(
        self: &Arc<Self>,
        local: SocketAddr,
        remote: SocketAddr,
        timeout_ms: Option<u64>,
    ) -> Result<Fence, RepairError> {
        let Some(key) = nfnl::flow_key(local, remote) else {
            return Err(err(format!(
                "cannot fence {remote} -> {local}: mixed address families"
            )));
        };
        let set = set_for(local);
        let mut nl = self.nl.lock().unwrap_or_else(|p| p.into_inner());
        nl.change(Op::Add, &self.table, set, &key, timeout_ms)
            .map_err(|e| {
                err(format!(
                    "cannot fence {remote} -> {local} in {}: {e}",
                    self.table
                ))
            })?;
        drop(nl);
        Ok(Fence {
            fences: self.clone(),
            set,
            key,
            flow: format!("{remote} -> {local}"),
            armed: true,
        })
    }

    /// Deletes one element; returns once the kernel committed the change.
    fn delete(&self, set: &str, key: &[u8]) -> std::io::Result<()> {
        let mut nl = self.nl.lock().unwrap_or_else(|p| p.into_inner());
        nl.change(Op::Delete, &self.table, set, key, None)
    }
}

fn set_for(local: SocketAddr) -> &'static str {
    if local.is_ipv4() {
        "f4"
    } else {
        "f6"
    }
}

/// Takes down the fence of the flow `remote` → `local` that another process of this host put
/// up in its fence table `table` and left up ([`Fence::leave_up`]). `Ok(false)`: there was none
/// (it expired, or was never put up). Only tables named like a fence table are touched.
pub fn lift(table: &str, local: SocketAddr, remote: SocketAddr) -> Result<bool, RepairError> {
    if !is_fence_table(table) {
        return Err(err(format!("{table:?} is not a fence table's name")));
    }
    let Some(key) = nfnl::flow_key(local, remote) else {
        return Err(err(format!(
            "cannot lift a fence {remote} -> {local}: mixed address families"
        )));
    };
    // One socket for the process's lifts, opened on first use.
    static NL: Mutex<Option<Netlink>> = Mutex::new(None);
    let mut g = NL.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(Netlink::open().map_err(|e| err(format!("netlink (nftables): {e}")))?);
    }
    let nl = g.as_mut().expect("opened above");
    match nl.change(Op::Delete, table, set_for(local), &key, None) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err(format!(
            "cannot lift the fence {remote} -> {local} in {table}: {e}"
        ))),
    }
}

impl Drop for Fences {
    fn drop(&mut self) {
        if let Err(e) = nft_once(&["delete", "table", "inet", &self.table], None) {
            eprintln!("mtcp: could not remove fence table {}: {e}", self.table);
        }
    }
}

/// Removes the fence tables of processes that no longer exist.
fn remove_stale_tables() {
    let Ok(list) = nft_once(&["list", "tables"], None) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name.trim().strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let pid = pid.split('_').next().unwrap_or_default();
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nft_once(&["delete", "table", "inet", name.trim()], None);
        }
    }
}

/// One fenced flow (see [`Fences::fence`]); dropping it lets the flow's packets through again.
pub struct Fence {
    fences: Arc<Fences>,
    set: &'static str,
    key: Vec<u8>,
    flow: String,
    /// Whether dropping it takes the fence down (see [`Fence::leave_up`]).
    armed: bool,
}

impl Fence {
    /// Leaves the fence up for another process to [`lift`] (or for its timeout, if it was put
    /// up with [`Fences::fence_expiring`]); returns the table that holds it.
    pub fn leave_up(mut self) -> String {
        self.armed = false;
        self.fences.table.clone()
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({} in {})", self.flow, self.fences.table)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Not silent: a fence left up would cut the flow off for good.
        if let Err(e) = self.fences.delete(self.set, &self.key) {
            eprintln!("mtcp: could not take fence {} down: {e}", self.flow);
        }
    }
}

/// A process's [`Fences`], opened on first use and closed when the process exits: what an agent
/// and a server each hold.
#[derive(Default)]
pub struct LazyFences(Mutex<Option<Arc<Fences>>>);

impl LazyFences {
    /// The fences, creating the table on first use.
    pub fn get(&self) -> Result<Arc<Fences>, RepairError> {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = &*f {
            return Ok(x.clone());
        }
        let x = Fences::open()?;
        *f = Some(x.clone());
        Ok(x)
    }

    /// Lets the table go (the process is exiting); fences still held keep it until they drop.
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::is_fence_table;

    #[test]
    fn fence_table_names() {
        assert!(is_fence_table("mtcp_fence_4242"));
        assert!(is_fence_table("mtcp_fence_4242_3"));
        for bad in [
            "mtcp_fence_",
            "mtcp_fence_42_",
            "mtcp_fence__3",
            "mtcp_fence_4x",
            "mtcp_fence_1_2_3",
            "mtcp_fence_12345678901",
            "filter",
            "nat",
        ] {
            assert!(!is_fence_table(bad), "{bad}");
        }
    }
}
