//! How the agent connects to servers: in transparent mode with its socket mark (so nftables
//! does not redirect its own connections back to it), and with TLS when it was given the
//! cluster's CA (`--tls-ca`, decision 45), checking each server's certificate against the
//! address it dials.

use mtcp::stream::Stream;
use mtcp::tls::ClientTls;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Default)]
pub struct Dialer {
    /// Transparent mode: connections carry [`crate::transparent::MARK`].
    pub mark: bool,
    /// TLS to every server, trusting the cluster CA only.
    pub tls: Option<ClientTls>,
}

impl Dialer {
    /// Connects to `addr` (TCP, then the TLS handshake when configured).
    pub async fn dial(&self, addr: &str) -> std::io::Result<Stream> {
        let s = self.tcp(addr).await?;
        let _ = s.set_nodelay(true);
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
