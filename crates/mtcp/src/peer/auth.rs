//! The handshake of peer and admin channels, both sides: mutual challenge–response
//! authentication under the cluster key, then a MAC on every frame.

use crate::framed::{self, ChannelError, FrameReader, MacWriter};
use crate::peer_pool::Channel;
use crate::stream::Stream;
use crate::tls::ClientTls;
use mtcp_proto::handshake::{Acceptor, HandshakeError, Opener as HandshakeOpener};
use mtcp_proto::{ClusterKey, PortKind};
use std::time::Duration;
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
    let acceptor = Acceptor {
        kind,
        me,
        nonce: rand::random(),
    };
    framed::write_msg(&mut w, &acceptor.challenge()).await?;
    let answer = reader.next_msg(AUTH_TIMEOUT).await?;
    let admitted = match acceptor.on_auth(key, answer) {
        Ok(a) => a,
        Err(e) => {
            if let Some(m) = e.reply() {
                let _ = framed::write_msg(&mut w, &m).await;
            }
            return Err(channel_error(e));
        }
    };
    framed::write_msg(&mut w, &admitted.accept).await?;
    reader.set_mac(admitted.keys.recv);
    Ok((
        (reader, MacWriter::new(w, admitted.keys.send)),
        admitted.from,
    ))
}

/// A failed handshake as the channel's error.
fn channel_error(e: HandshakeError) -> ChannelError {
    match e {
        HandshakeError::Auth(e) => ChannelError::Auth(e),
        e => ChannelError::Unexpected(e.to_string()),
    }
}

/// Who opens a peer or admin channel: the cluster key, the id it authenticates as and, in a
/// cluster with TLS, the client side that checks the acceptor's certificate.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    pub key: &'a ClusterKey,
    pub from: &'a str,
    pub tls: Option<&'a ClientTls>,
    /// How long the TCP handshake may go unanswered before a second is started beside it
    /// ([`crate::hedged`]; [`mtcp_proto::timing::hedge_after`]).
    pub hedge: Duration,
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
    let (s, _) = tokio::time::timeout(limit, crate::hedged::connect(addr, opener.hedge))
        .await
        .map_err(|_| ChannelError::Timeout)??;
    crate::tcpopt::internal(&s);
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
    let me = HandshakeOpener {
        kind,
        from,
        to,
        addr,
        nonce: rand::random(),
    };
    let first = reader.next_msg(limit).await?;
    let (challenge, auth) = me.on_challenge(key, first).map_err(channel_error)?;
    framed::write_msg(&mut w, &auth).await?;
    let answer = reader.next_msg(limit).await?;
    let keys = me
        .on_accept(key, challenge, answer)
        .map_err(channel_error)?;
    reader.set_max_frame(max_frame);
    reader.set_mac(keys.recv);
    Ok((reader, MacWriter::new(w, keys.send)))
}
