//! Taking a socket handed over on this host (decision 56) into service: checks that it is a
//! connection the fast path may serve, and, from an agent, one it held.

use crate::registry::ServerInner;
use std::time::Duration;
use tokio::net::TcpStream;

/// The client's socket a fast-path agent handed over under `nonce` (decision 56): taken from
/// the hand-over listener (it was sent just before the ADOPTHANDED that names it) and admitted
/// like an ADOPT's connection — to a listed address, one the agent held on its listener when
/// the session began.
pub(crate) async fn adopt_from_agent(
    inner: &ServerInner,
    nonce: &crate::handoff::Nonce,
    agent: Option<&crate::direct::Adopter>,
) -> Result<TcpStream, String> {
    let Some(agent) = agent else {
        return Err("a handed socket from a session that is not a fast-path agent's".into());
    };
    let fd = inner
        .handoff
        .take(nonce, Duration::from_secs(1))
        .await
        .ok_or("the agent's socket did not arrive within 1s")?;
    let sock = adopt_handed(fd, &inner.cluster.fast_path)?;
    let named = match (sock.local_addr(), sock.peer_addr()) {
        (Ok(l), Ok(r)) => (crate::sockowner::norm(l), crate::sockowner::norm(r)),
        _ => return Err("the handed socket has no addresses".into()),
    };
    if !agent.held.contains(&named) {
        return Err(format!(
            "the handed connection {} -> {} is not one the agent held when the session began",
            named.1, named.0
        ));
    }
    tracing::info!(client = %named.1, "fast path: the agent handed the client's socket over");
    Ok(sock)
}

/// The client's socket an origin on this host handed over (decision 56), if it is a TCP
/// connection to an address this cluster's fast path admits; returned nonblocking and
/// registered with tokio.
pub(crate) fn adopt_handed(
    fd: std::os::fd::OwnedFd,
    allowed: &[std::net::SocketAddr],
) -> Result<TcpStream, String> {
    let kind = socket2::SockRef::from(&fd)
        .r#type()
        .map_err(|e| format!("handed socket: {e}"))?;
    if kind != socket2::Type::STREAM {
        return Err("the handed descriptor is not a stream socket".into());
    }
    let sock = std::net::TcpStream::from(fd);
    let (local, _) = sock
        .local_addr()
        .and_then(|l| sock.peer_addr().map(|r| (l, r)))
        .map_err(|e| format!("the handed descriptor is not a connected TCP socket: {e}"))?;
    if !allowed.contains(&local) {
        return Err(format!(
            "a connection to {local} is not one this cluster's fast path admits"
        ));
    }
    sock.set_nonblocking(true)
        .map_err(|e| format!("handed socket: {e}"))?;
    TcpStream::from_std(sock).map_err(|e| format!("handed socket: {e}"))
}
