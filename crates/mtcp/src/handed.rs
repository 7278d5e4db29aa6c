//! Taking a socket handed over on this host (decision 56) into service: checks that it is a
//! connection the fast path may serve, and, from an agent, one it held, as
//! [`mtcp_proto::adopt::admit_handed`] rules.

use crate::registry::ServerInner;
use mtcp_proto::adopt::{self, Handed, Hander};
use std::net::SocketAddr;
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
    let from = Hander::Agent {
        fast_path: agent.is_some(),
    };
    adopt::may_take_handed(from).map_err(|e| e.to_string())?;
    let fd = inner
        .handoff
        .take(nonce, adopt::HANDED_WAIT)
        .await
        .ok_or_else(|| {
            format!(
                "the agent's socket did not arrive within {:?}",
                adopt::HANDED_WAIT
            )
        })?;
    let held = agent.map_or(&[][..], |a| &a.held[..]);
    let (sock, client) = adopt_handed(fd, &inner.cluster.fast_path, from, held)?;
    tracing::info!(%client, "fast path: the agent handed the client's socket over");
    Ok(sock)
}

/// The client's socket handed over on this host by `from` (decision 56), if it is a TCP
/// connection that [`adopt::admit_handed`] admits: to an address this cluster's fast path
/// lists (`allowed`) and, from an agent, one of those it `held`. Returned nonblocking and
/// registered with tokio, with its client's address.
pub(crate) fn adopt_handed(
    fd: std::os::fd::OwnedFd,
    allowed: &[SocketAddr],
    from: Hander,
    held: &[(SocketAddr, SocketAddr)],
) -> Result<(TcpStream, SocketAddr), String> {
    let kind = socket2::SockRef::from(&fd)
        .r#type()
        .map_err(|e| format!("handed socket: {e}"))?;
    if kind != socket2::Type::STREAM {
        return Err("the handed descriptor is not a stream socket".into());
    }
    let sock = std::net::TcpStream::from(fd);
    let (local, remote) = sock
        .local_addr()
        .and_then(|l| sock.peer_addr().map(|r| (l, r)))
        .map_err(|e| format!("the handed descriptor is not a connected TCP socket: {e}"))?;
    let named = (
        crate::sockowner::norm(local),
        crate::sockowner::norm(remote),
    );
    adopt::admit_handed(&Handed {
        from,
        local: named.0,
        remote: named.1,
        listed: allowed.contains(&local),
        held: held.contains(&named),
    })
    .map_err(|e| e.to_string())?;
    sock.set_nonblocking(true)
        .map_err(|e| format!("handed socket: {e}"))?;
    let sock = TcpStream::from_std(sock).map_err(|e| format!("handed socket: {e}"))?;
    Ok((sock, named.1))
}
