//! Fencing a flow while no socket holds its connection.
//!
//! Between [`crate::Frozen::discard`] and [`crate::restore`] the connection has no socket: a
//! packet from the peer then meets a listener or nothing and is answered with a reset, which
//! ends the peer's connection. A [`Fence`] drops the peer's packets of that one flow in the
//! meantime; the peer retransmits what it sent into the fence, and the new socket's window probe
//! ([`crate::window_probe`]) restarts the flow at once after the fence goes.
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

/// Prefix of every fence table's name (`mtcp_fence_<pid>`).
pub const TABLE_PREFIX: &str = "mtcp_fence_";

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
        let table = format!("{TABLE_PREFIX}{}", std::process::id());
        // Replaces a table of the same name (a process of the same pid that died).
        let _ = nft_once(&["delete", "table", "inet", &table], None);
        let rules = format!(
            "table inet {table} {{\n \
               set f4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}\n \
               set f6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}\n \
               chain input {{\n  type filter hook input priority -10;\n  \
                 ip saddr . tcp sport . ip daddr . tcp dport @f4 drop\n  \
                 ip6 saddr . tcp sport . ip6 daddr . tcp dport @f6 drop\n \
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
        let Some(key) = nfnl::flow_key(local, remote) else {
            return Err(err(format!(
                "cannot fence {remote} -> {local}: mixed address families"
            )));
        };
        let set = if local.is_ipv4() { "f4" } else { "f6" };
        self.edit(Op::Add, set, &key).map_err(|e| {
            err(format!(
                "cannot fence {remote} -> {local} in {}: {e}",
                self.table
            ))
        })?;
        Ok(Fence {
            fences: self.clone(),
            set,
            key,
            flow: format!("{remote} -> {local}"),
        })
    }

    /// Adds or deletes one element; returns once the kernel committed the change.
    fn edit(&self, op: Op, set: &str, key: &[u8]) -> std::io::Result<()> {
        let mut nl = self.nl.lock().unwrap_or_else(|p| p.into_inner());
        nl.change(op, &self.table, set, key)
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
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({} in {})", self.flow, self.fences.table)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        // Not silent: a fence left up would cut the flow off for good.
        if let Err(e) = self.fences.edit(Op::Delete, self.set, &self.key) {
            eprintln!("mtcp: could not take fence {} down: {e}", self.flow);
        }
    }
}
