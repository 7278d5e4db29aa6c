//! The handshake of peer and admin channels, both sides: mutual challenge–response
//! authentication under the cluster key, then a MAC on every frame.

use crate::framed::{self, ChannelError, FrameReader, MacWriter};
use crate::peer_pool::Channel;
use crate::stream::Stream;
use crate::tls::ClientTls;
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::{ChannelContext, ClusterKey, PortKind, Role};
use std::time::Duration;
use tokio::net::TcpStream;
pub(crate) const AUTH_FRAME: usize = 4 << 10;

const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Acceptor side: preamble, challenge, check the opener's proof, prove ourselves; from then on
/// every frame both ways carries a MAC. `me` is this server's id and `kind` the port the
/// connection came in on: the opener's proof must name both. Returns the channel and the
/// opener's id.
pub(crate) async fn accept_authenticated(
    mut s: Stream,
    key: &ClusterKey,
    me: &str,
    kind: PortKind,
) -> Result<(Channel, String), ChannelError> {
    tokio::time::timeout(AUTH_TIMEOUT, framed::exchange_preamble(&mut s))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, AUTH_FRAME);
    let nonce: [u8; 16] = rand::random();
    framed::write_msg(&mut w, &Msg::PeerChallenge { nonce }).await?;
    let (from, to, theirs, proof) = match reader.next_msg(AUTH_TIMEOUT).await? {
        Msg::PeerAuth {
            from,
            to,
            nonce,
            proof,
        } => (from, to, nonce, proof),
        other => {
            return Err(ChannelError::Unexpected(format!(
                "expected authentication, got {}",
                other.name()
            )))
        }
    };
    let ctx = ChannelContext {
        kind,
        opener: &from,
        acceptor: me,
        acceptor_nonce: nonce,
        opener_nonce: theirs,
    };
    if let Err(e) = key.verify_opener(&ctx, &to, &proof) {
        let _ = framed::write_msg(
            &mut w,
            &Msg::Refused {
                code: RefuseCode::Unauthenticated,
                reason: e.to_string(),
            },
        )
        .await;
        return Err(ChannelError::Auth(e));
    }
    let proof = key.peer_accept_proof(&ctx);
    framed::write_msg(&mut w, &Msg::PeerAccept { proof }).await?;
    let (send, recv) = key.channel_macs(&ctx, Role::Acceptor);
    reader.set_mac(recv);
    Ok(((reader, MacWriter::new(w, send)), from))
}

/// Who opens a peer or admin channel: the cluster key, the id it authenticates as and, in a
/// cluster with TLS, the client side that checks the acceptor's certificate.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    pub key: &'a ClusterKey,
    pub from: &'a str,
    pub tls: Option<&'a ClientTls>,
}

/// Opener side: connects to `addr`, the `kind` port of server `to`, and authenticates as
/// `opener.from`; the channel's frames then carry MACs both ways. With TLS, the acceptor's
/// certificate must name `to` and be signed by the cluster CA, and the handshake below runs
/// inside TLS (decision 45).
pub async fn connect_authenticated(
    addr: &str,
    opener: Opener<'_>,
    to: &str,
    kind: PortKind,
    max_frame: usize,
    limit: Duration,
) -> Result<Channel, ChannelError> {
    let (key, from) = (opener.key, opener.from);
    let s = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let _ = s.set_nodelay(true);
    let mut s = match opener.tls {
        None => Stream::Tcp(s),
        Some(tls) => {
            let name =
                crate::tls::name_of_id(to).map_err(|e| ChannelError::Unexpected(e.to_string()))?;
            tokio::time::timeout(limit, tls.connect(name, s))
                .await
                .map_err(|_| ChannelError::Timeout)??
        }
    };
    tokio::time::timeout(limit, framed::exchange_preamble(&mut s))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, AUTH_FRAME);
    let theirs = match reader.next_msg(limit).await? {
        Msg::PeerChallenge { nonce } => nonce,
        // E.g. a TLS port's answer to a plain client.
        Msg::Refused { reason, .. } => {
            return Err(ChannelError::Unexpected(format!("refused: {reason}")))
        }
        _ => return Err(ChannelError::Unexpected("expected a challenge".into())),
    };
    let nonce: [u8; 16] = rand::random();
    let ctx = ChannelContext {
        kind,
        opener: from,
        acceptor: to,
        acceptor_nonce: theirs,
        opener_nonce: nonce,
    };
    let proof = key.peer_proof(&ctx);
    framed::write_msg(
        &mut w,
        &Msg::PeerAuth {
            from: from.to_string(),
            to: to.to_string(),
            nonce,
            proof,
        },
    )
    .await?;
    match reader.next_msg(limit).await? {
        Msg::PeerAccept { proof } if key.check_peer_accept_proof(&ctx, &proof) => {}
        Msg::PeerAccept { .. } => {
            return Err(ChannelError::Unexpected(format!(
                "{addr} failed to prove the cluster key as the {kind} port of {to}"
            )))
        }
        Msg::Refused { reason, .. } => {
            return Err(ChannelError::Unexpected(format!("refused: {reason}")))
        }
        other => {
            return Err(ChannelError::Unexpected(format!(
                "expected acceptance, got {}",
                other.name()
            )))
        }
    }
    reader.set_max_frame(max_frame);
    let (send, recv) = key.channel_macs(&ctx, Role::Opener);
    reader.set_mac(recv);
    Ok((reader, MacWriter::new(w, send)))
}
