//! Fencing a flow while no socket holds its connection.
//!
//! Between [`crate::Frozen::discard`] and [`crate::restore`] the connection has no socket: a
//! packet from the peer then meets a listener or nothing and is answered with a reset, which
//! ends the peer's connection. A [`Fence`] drops the peer's packets of that one flow in the
//! meantime; the peer retransmits what it sent into the fence, and the new socket's window probe
//! ([`crate::window_probe`]) restarts the flow at once after the fence goes.
//!
//! [`Fences`] is one nftables table per process (`mtcp_fence_<pid>`) with a set of fenced flows
//! and a rule dropping them, driven through one long-lived `nft -i` process: putting a fence up
//! or down is one set element added or deleted, about 0.4 ms, where creating and deleting a
//! table per fence took 10–30 ms (deleting a base chain waits for the kernel's RCU grace
//! period). The table goes when the [`Fences`] is dropped; tables of processes that died
//! without dropping theirs are removed by the next [`Fences::open`].

use crate::RepairError;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Prefix of every fence table's name (`mtcp_fence_<pid>`).
pub const TABLE_PREFIX: &str = "mtcp_fence_";
/// Most output one `list set` may produce before it counts as an error (bounded reads).
const MAX_LISTING: usize = 1 << 20;

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

/// The process's fence table and the `nft -i` process that edits it.
pub struct Fences {
    table: String,
    nft: Mutex<Nft>,
}

struct Nft {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
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
        nft_once(&["-f", "-"], Some(&rules))?;
        let mut child = Command::new("nft")
            .args(["-nn", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err(format!("cannot run nft -i: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(err("nft -i: no pipes"));
        };
        Ok(Arc::new(Fences {
            table,
            nft: Mutex::new(Nft {
                child,
                stdin,
                stdout,
            }),
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
        let (set, elem) = match (local, remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => (
                "f4",
                format!("{} . {} . {} . {}", r.ip(), r.port(), l.ip(), l.port()),
            ),
            (SocketAddr::V6(l), SocketAddr::V6(r)) => (
                "f6",
                format!("{} . {} . {} . {}", r.ip(), r.port(), l.ip(), l.port()),
            ),
            _ => {
                return Err(err(format!(
                    "cannot fence {remote} -> {local}: mixed address families"
                )))
            }
        };
        let listing = self.edit("add", set, &elem)?;
        if !has_elem(&listing, &elem) {
            return Err(err(format!(
                "nft did not add {elem} to {}: {}",
                self.table,
                listing.trim()
            )));
        }
        Ok(Fence {
            fences: self.clone(),
            set,
            elem,
        })
    }

    /// `add` or `delete` one element, then lists the set: the listing comes only after the
    /// change is made (nft -i runs commands in order), and shows whether it was.
    fn edit(&self, op: &str, set: &str, elem: &str) -> Result<String, RepairError> {
        let mut nft = self.nft.lock().unwrap_or_else(|p| p.into_inner());
        let t = &self.table;
        let cmds = format!("{op} element inet {t} {set} {{ {elem} }}\nlist set inet {t} {set}\n");
        nft.stdin
            .write_all(cmds.as_bytes())
            .and_then(|()| nft.stdin.flush())
            .map_err(|e| err(format!("nft -i: {e}")))?;
        // The listing ends with the set's and the table's closing braces.
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"}\n}\n") {
            let n = nft
                .stdout
                .read(&mut buf)
                .map_err(|e| err(format!("nft -i: {e}")))?;
            if n == 0 || out.len() > MAX_LISTING {
                return Err(err("nft -i ended or answered too much"));
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Drop for Fences {
    fn drop(&mut self) {
        let nft = self.nft.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = nft.child.kill();
        let _ = nft.child.wait();
        if let Err(e) = nft_once(&["delete", "table", "inet", &self.table], None) {
            eprintln!("mtcp: could not remove fence table {}: {e}", self.table);
        }
    }
}

/// Whether a `list set` output holds element `elem` (compared whole, not as a substring).
fn has_elem(listing: &str, elem: &str) -> bool {
    let Some(start) = listing.find("elements = {") else {
        return false;
    };
    let rest = &listing[start + "elements = {".len()..];
    let body = rest.split('}').next().unwrap_or("");
    body.split(',')
        .any(|e| e.split_whitespace().eq(elem.split_whitespace()))
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
    elem: String,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fence({} in {})", self.elem, self.fences.table)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        match self.fences.edit("delete", self.set, &self.elem) {
            Ok(l) if !has_elem(&l, &self.elem) => {}
            // Not silent: a fence left up would cut the flow off for good.
            Ok(l) => eprintln!("mtcp: fence {} is still up: {}", self.elem, l.trim()),
            Err(e) => eprintln!("mtcp: could not take fence {} down: {e}", self.elem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::has_elem;

    #[test]
    fn elements_are_compared_whole() {
        let l = "table inet t {\n\tset f4 {\n\t\ttype x\n\t\telements = { 127.0.0.1 . 40000 . 127.0.0.1 . 17500,\n\t\t\t     10.0.0.1 . 1 . 10.0.0.2 . 2 }\n\t}\n}\n";
        assert!(has_elem(l, "127.0.0.1 . 40000 . 127.0.0.1 . 17500"));
        assert!(has_elem(l, "10.0.0.1 . 1 . 10.0.0.2 . 2"));
        assert!(!has_elem(l, "127.0.0.1 . 40000 . 127.0.0.1 . 1750"));
        assert!(!has_elem(l, "27.0.0.1 . 40000 . 127.0.0.1 . 17500"));
        assert!(!has_elem(
            "table inet t {\n\tset f4 {\n\t}\n}\n",
            "1 . 2 . 3 . 4"
        ));
    }
}
