//! How the agent connects to servers: in transparent mode with its socket mark (so nftables
//! does not redirect its own connections back to it), and with TLS when it was given the
//! cluster's CA (`--tls-ca`, decision 45), checking each server's certificate against the
//! address it dials. Every TCP handshake is also a sample of the path to that server
//! ([`Paths`]): no queued data delays it, unlike a session's PING/PONG.

use mtcp::stream::Stream;
use mtcp::tls::ClientTls;
use mtcp_proto::trigger::Rtt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Default)]
pub struct Dialer {
    /// Transparent mode: connections carry [`crate::transparent::MARK`].
    pub mark: bool,
    /// TLS to every server, trusting the cluster CA only.
    pub tls: Option<ClientTls>,
    /// The round trip to each server, from the handshakes made here.
    pub paths: Paths,
}

/// The round trip to each server address the agent dialled, one sample per TCP handshake (the
/// time `connect` took). A handshake is answered by the server's kernel, so it measures the
/// path without the queues a busy session puts in front of its PONGs.
#[derive(Debug, Clone, Default)]
pub struct Paths(Arc<Mutex<HashMap<String, Rtt>>>);

/// Addresses remembered at most: the servers of a cluster are far fewer; past it the map
/// starts again rather than grow with addresses that come and go.
const MAX_PATHS: usize = 4096;

impl Paths {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Rtt>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn sample(&self, addr: &str, took: Duration) {
        let mut m = self.lock();
        // Allocates the key only for a new address: this runs on every dial.
        if let Some(r) = m.get_mut(addr) {
            r.sample(took);
            return;
        }
        if m.len() >= MAX_PATHS {
            m.clear();
        }
        m.entry(addr.to_string()).or_default().sample(took);
    }

    /// The estimate toward `addr`, if a handshake to it was timed.
    pub fn get(&self, addr: &str) -> Option<Rtt> {
        self.lock().get(addr).copied()
    }
}

impl Dialer {
    /// Connects to `addr` (TCP, then the TLS handshake when configured).
    pub async fn dial(&self, addr: &str) -> std::io::Result<Stream> {
        // A handshake unanswered for a few round trips (a lost SYN or SYN-ACK, retransmitted
        // only after a second) gets a second one beside it (decision 71).
        let hedge = mtcp_proto::timing::hedge_after(&self.paths.get(addr).unwrap_or_default());
        let (s, took) = mtcp::hedged::race(|| self.tcp(addr), hedge).await?;
        self.paths.sample(addr, took);
        mtcp::tcpopt::internal(&s);
        match &self.tls {
            None => Ok(Stream::Tcp(s)),
            Some(tls) => {
                let name = mtcp::tls::name_of_addr(addr).map_err(std::io::Error::other)?;
                tls.connect(name, s).await
            }
        }
    }

    async fn tcp(&self, addr: &str) -> std::io::Result<TcpStream> {
        if !self.mark {
            return TcpStream::connect(addr).await;
        }
        let mut last = None;
        for a in tokio::net::lookup_host(addr).await? {
            let sock = if a.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket2::SockRef::from(&sock).set_mark(crate::transparent::MARK)?;
            match sock.connect(a).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr}: no address"))))
    }
}
