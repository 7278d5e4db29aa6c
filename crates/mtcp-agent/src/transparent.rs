//! Transparent mode: an nftables table of the agent's own, in the client host's network
//! namespace, redirects connections to the service addresses to the agent's listener; the
//! agent reads each connection's original destination (`SO_ORIGINAL_DST`). Client programs need
//! no proxy setting: `curl http://SERVICE/file` just works, and migrates.
//!
//! The table is named after the listening port (`mtcp_agent_<port>`), so a table left by an
//! agent that crashed is found and replaced when an agent starts on that port again. The agent's
//! own connections to the servers carry a socket mark ([`MARK`]) the table lets through, so
//! service addresses may also be server addresses.

use std::io::Write;
use std::net::SocketAddrV4;
use std::process::{Command, Stdio};

/// Socket mark on the agent's own outgoing connections ("mtcp").
pub const MARK: u32 = 0x6d74_6370;

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("transparent mode needs the `nft` command (Debian package `nftables`): {0}")]
    NoNft(std::io::Error),
    #[error("nft refused the agent's table {table}: {msg} (transparent mode needs root / CAP_NET_ADMIN)")]
    Nft { table: String, msg: String },
    #[error("transparent mode needs at least one --service IP:PORT")]
    NoService,
}

/// The installed table; dropping it removes the table.
#[derive(Debug)]
pub struct Interception {
    table: String,
}

fn nft(script: &str) -> Result<(), (bool, String)> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| (true, e.to_string()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| (false, e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| (false, e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err((
            false,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " "),
        ))
    }
}

/// The table name for an agent listening on `port`.
pub fn table_name(port: u16) -> String {
    format!("mtcp_agent_{port}")
}

/// The nftables script that (re)creates the table.
pub fn script(port: u16, services: &[SocketAddrV4]) -> String {
    let table = table_name(port);
    let mut s = format!(
        "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    meta mark {MARK:#x} return\n"
    );
    for svc in services {
        s += &format!(
            "    ip daddr {} tcp dport {} redirect to :{port}\n",
            svc.ip(),
            svc.port()
        );
    }
    s += "  }\n}\n";
    s
}

impl Interception {
    /// Installs the table redirecting `services` to local port `port`, replacing a stale one.
    pub fn install(port: u16, services: &[SocketAddrV4]) -> Result<Self, InterceptError> {
        if services.is_empty() {
            return Err(InterceptError::NoService);
        }
        let table = table_name(port);
        match nft(&script(port, services)) {
            Ok(()) => {}
            Err((true, e)) => {
                return Err(InterceptError::NoNft(std::io::Error::other(e)));
            }
            Err((false, msg)) => return Err(InterceptError::Nft { table, msg }),
        }
        tracing::info!(%table, services = ?services, "transparent interception installed");
        Ok(Self { table })
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for Interception {
    fn drop(&mut self) {
        match nft(&format!("delete table ip {}\n", self.table)) {
            Ok(()) => tracing::info!(table = %self.table, "transparent interception removed"),
            Err((_, e)) => tracing::warn!(table = %self.table, "cannot remove the nft table: {e}"),
        }
    }
}

/// The original destination of a redirected connection.
pub fn original_dst(s: &tokio::net::TcpStream) -> Option<std::net::SocketAddr> {
    socket2::SockRef::from(s)
        .original_dst_v4()
        .ok()
        .and_then(|a| a.as_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_a_stale_table_and_lets_the_agent_through() {
        let s = script(15001, &["198.18.1.2:80".parse().unwrap()]);
        // Creating then deleting first makes the script work whether or not a table exists.
        assert!(s.starts_with("table ip mtcp_agent_15001 {}\ndelete table ip mtcp_agent_15001\n"));
        assert!(s.contains("meta mark 0x6d746370 return"));
        assert!(s.contains("ip daddr 198.18.1.2 tcp dport 80 redirect to :15001"));
    }
}
