//! A server's three listeners: accept, secure with TLS when the cluster has `[tls]`, and hand
//! the stream to the port's handler. A plain M-TCP client on a TLS port is answered in plain
//! M-TCP with a refusal that says so, at once, instead of a failed handshake it would have to
//! guess about (decision 45).

use crate::registry::ServerInner;
use crate::stream::Stream;
use mtcp_proto::wire::{Msg, RefuseCode, MAGIC};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Data,
    Peer,
    Admin,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Data => "data",
            Port::Peer => "peer",
            Port::Admin => "admin",
        }
    }
}

/// How long a TLS handshake may take (and a client may wait before its first byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn accept_loop(l: TcpListener, inner: Arc<ServerInner>, port: Port) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                crate::tcpopt::internal(&s);
                tokio::spawn(serve(inner.clone(), s, from, port));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Both steps are boxed: the task then holds only the step it is in, and a live session's task
/// carries no room for a handshake it finished long ago (issue 13: memory per idle connection).
async fn serve(inner: Arc<ServerInner>, s: TcpStream, from: SocketAddr, port: Port) {
    // A data session counts against the caps from its accept, so connections that stall in
    // their TLS handshake are bounded by the caps too, not only by HANDSHAKE_TIMEOUT. One over
    // a cap still gets its handshake and preamble: its refusal names the cap.
    let admitted = (port == Port::Data).then(|| inner.sessions.admit(&inner.limits, from.ip()));
    let s = match &inner.tls {
        None => Stream::Tcp(s),
        Some(_) => match Box::pin(secure(&inner, s, port)).await {
            Some(s) => s,
            None => return,
        },
    };
    match port {
        Port::Data => {
            let admitted = admitted.expect("admitted on the data port");
            Box::pin(crate::session::handle_session(inner, s, from, admitted)).await
        }
        Port::Peer => Box::pin(crate::peer_serve::serve_peer(inner, s, from)).await,
        Port::Admin => Box::pin(crate::peer_serve::serve_admin(inner, s, from)).await,
    }
}

/// The TLS handshake on an accepted connection; `None` if it failed (logged, rate-limited) or
/// the client speaks plain M-TCP (refused by name).
async fn secure(inner: &ServerInner, mut s: TcpStream, port: Port) -> Option<Stream> {
    let tls = inner.tls.as_ref()?;
    // A TLS record starts with its content type (22, handshake); a plain M-TCP channel with the
    // preamble's magic. One byte tells them apart.
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, s.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == MAGIC[0] => {
            refuse_plain(inner, &mut s, port).await;
            return None;
        }
        Ok(Ok(1)) => {}
        // Closed before a byte (an agent's unused spare), or silent.
        _ => return None,
    }
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(s)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            if let Some(suppressed) = crate::session_io::noisy_event_admitted() {
                tracing::info!(%peer, suppressed, "{} port: TLS handshake failed: {e}", port.name());
            }
            None
        }
        Err(_) => {
            if let Some(suppressed) = crate::session_io::noisy_event_admitted() {
                tracing::info!(%peer, suppressed, "{} port: no TLS handshake within {HANDSHAKE_TIMEOUT:?}", port.name());
            }
            None
        }
    }
}

/// Answers a plain M-TCP client on a TLS port: our preamble and a refusal naming the fix, in the
/// clear (it can read nothing else), then close.
async fn refuse_plain(inner: &ServerInner, s: &mut TcpStream, port: Port) {
    let reason = format!(
        "server {} requires TLS on its {} port (the cluster file has [tls]): give the agent --tls-ca with the cluster's CA, and every server the same [tls] section",
        inner.id,
        port.name()
    );
    if let Some(suppressed) = crate::session_io::noisy_event_admitted() {
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%peer, suppressed, "{} port: a plain M-TCP client; refused", port.name());
    }
    if port == Port::Data {
        crate::metrics::refused(RefuseCode::Unauthenticated);
    }
    let mut out = mtcp_proto::wire::preamble(mtcp_proto::PROTOCOL_VERSION).to_vec();
    out.extend_from_slice(
        &Msg::Refused {
            code: RefuseCode::Unauthenticated,
            reason,
        }
        .to_frame(),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.write_all(&out).await;
        let _ = s.shutdown().await;
        // Read what the client sent until it closes: closing with unread bytes would send a
        // reset, which can overtake the refusal.
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match s.read(&mut sink).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    })
    .await;
}
