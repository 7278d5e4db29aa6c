//! Fencing a flow while no socket holds its connection.
//!
//! Between [`crate::Frozen::discard`] and [`crate::restore`] the connection has no socket: a
//! packet from the peer then meets a listener or nothing and is answered with a reset, which
//! ends the peer's connection. A [`Fence`] drops the peer's packets of that one flow in the
//! meantime (an nftables table of its own, created by the `nft` tool and deleted when the fence
//! drops); the peer retransmits what it sent into the fence, and the new socket's window probe
//! ([`crate::window_probe`]) restarts the flow at once after the fence goes.

use crate::RepairError;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every fence table's name (tests check that none is left behind).
pub const TABLE_PREFIX: &str = "mtcp_fence_";

/// Drops the packets `remote` sends to `local` (one TCP flow) while it lives.
#[derive(Debug)]
pub struct Fence {
    table: String,
}

impl Fence {
    /// Puts the fence up. Needs root and the `nft` tool.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Result<Fence, RepairError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let table = format!(
            "{TABLE_PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (fam, l, r) = match (local, remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => {
                ("ip", l.ip().to_string(), r.ip().to_string())
            }
            (SocketAddr::V6(l), SocketAddr::V6(r)) => {
                ("ip6", l.ip().to_string(), r.ip().to_string())
            }
            _ => {
                return Err(RepairError::Invalid(format!(
                    "cannot fence {remote} -> {local}: mixed address families"
                )))
            }
        };
        // The input hook sees the peer's packets whether it is on this host (loopback packets
        // come back in through it) or not.
        let rules = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority -10;\n  \
             {fam} saddr {r} {fam} daddr {l} tcp sport {} tcp dport {} drop\n }}\n}}\n",
            remote.port(),
            local.port()
        );
        nft(&["-f", "-"], Some(&rules))?;
        Ok(Fence { table })
    }

    /// The nftables table holding the rule.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.table], None) {
            // Not silent: a fence left up would cut the flow off for good.
            eprintln!("mtcp: could not remove fence table {}: {e}", self.table);
        }
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<(), RepairError> {
    let mut c = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            RepairError::Invalid(format!(
                "cannot run nft (the fast path needs nftables and root): {e}"
            ))
        })?;
    if let (Some(mut i), Some(s)) = (c.stdin.take(), stdin) {
        i.write_all(s.as_bytes())
            .map_err(|e| RepairError::Invalid(format!("nft: {e}")))?;
    }
    let out = c
        .wait_with_output()
        .map_err(|e| RepairError::Invalid(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(RepairError::Invalid(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
