//! The peer and admin channels' handshake, both sides, as message-in, message-out steps: the
//! acceptor challenges, the opener proves it holds the cluster key for exactly this channel
//! (`PEERAUTH`), the acceptor proves it back (`PEERACCEPT`); then both hold the channel's frame
//! keys. The runtime (`mtcp/src/peer/auth.rs`) writes and reads the frames, with timeouts.

use crate::auth::{AuthError, ChannelContext, ClusterKey, PortKind, Role};
use crate::channel::ChannelMac;
use crate::wire::{Msg, RefuseCode};

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The acceptor refused the opener's proof; the opener hears [`Msg::Refused`].
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The other side refused (its reason).
    #[error("refused: {0}")]
    Refused(String),
    /// The acceptor's proof does not hold for the channel the opener meant to open.
    #[error("{acceptor} failed to prove the cluster key as the {kind} port of {to}")]
    BadAcceptor {
        acceptor: String,
        kind: PortKind,
        to: String,
    },
    /// A message out of place.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl HandshakeError {
    /// What the acceptor answers an opener whose handshake failed so: a refused proof is
    /// refused with its reason; a message out of place gets nothing.
    pub fn reply(&self) -> Option<Msg> {
        match self {
            HandshakeError::Auth(e) => Some(Msg::Refused {
                code: RefuseCode::Unauthenticated,
                reason: e.to_string(),
            }),
            _ => None,
        }
    }
}

/// The two frame keys of an authenticated channel: for what this side sends, and for what it
/// receives.
#[derive(Clone)]
pub struct Keys {
    pub send: ChannelMac,
    pub recv: ChannelMac,
}

impl std::fmt::Debug for Keys {
    /// Names the keys, never shows them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

fn keys(key: &ClusterKey, ctx: &ChannelContext<'_>, me: Role) -> Keys {
    let (send, recv) = key.channel_macs(ctx, me);
    Keys { send, recv }
}

/// The acceptor's side: server `me`, on its `kind` port, with its fresh challenge `nonce`.
#[derive(Debug, Clone)]
pub struct Acceptor<'a> {
    pub kind: PortKind,
    pub me: &'a str,
    pub nonce: [u8; 16],
}

/// An opener admitted by an [`Acceptor`].
#[derive(Debug)]
pub struct Admitted {
    /// Who opened the channel.
    pub from: String,
    /// The answer that proves this side back.
    pub accept: Msg,
    pub keys: Keys,
}

impl Acceptor<'_> {
    /// The challenge the acceptor sends first.
    pub fn challenge(&self) -> Msg {
        Msg::PeerChallenge { nonce: self.nonce }
    }

    /// The opener's answer to the challenge. On an error, the opener is told what
    /// [`HandshakeError::reply`] says.
    pub fn on_auth(&self, key: &ClusterKey, answer: Msg) -> Result<Admitted, HandshakeError> {
        let Msg::PeerAuth {
            from,
            to,
            nonce,
            proof,
        } = answer
        else {
            return Err(HandshakeError::Unexpected {
                expected: "authentication",
                got: answer.name(),
            });
        };
        let ctx = ChannelContext {
            kind: self.kind,
            opener: &from,
            acceptor: self.me,
            acceptor_nonce: self.nonce,
            opener_nonce: nonce,
        };
        key.verify_opener(&ctx, &to, &proof)?;
        let accept = Msg::PeerAccept {
            proof: key.peer_accept_proof(&ctx),
        };
        let keys = keys(key, &ctx, Role::Acceptor);
        Ok(Admitted { from, accept, keys })
    }
}

/// The opener's side: `from` opens the `kind` port of server `to` (at address `addr`, named in
/// errors), with its fresh `nonce`.
#[derive(Debug, Clone)]
pub struct Opener<'a> {
    pub kind: PortKind,
    pub from: &'a str,
    pub to: &'a str,
    pub addr: &'a str,
    pub nonce: [u8; 16],
}

impl Opener<'_> {
    fn ctx(&self, challenge: [u8; 16]) -> ChannelContext<'_> {
        ChannelContext {
            kind: self.kind,
            opener: self.from,
            acceptor: self.to,
            acceptor_nonce: challenge,
            opener_nonce: self.nonce,
        }
    }

    /// The acceptor's first message: its challenge, answered with this side's proof; returns
    /// the challenge (for [`Opener::on_accept`]) and the answer to send.
    pub fn on_challenge(
        &self,
        key: &ClusterKey,
        first: Msg,
    ) -> Result<([u8; 16], Msg), HandshakeError> {
        let challenge = match first {
            Msg::PeerChallenge { nonce } => nonce,
            // E.g. a TLS port's answer to a plain client.
            Msg::Refused { reason, .. } => return Err(HandshakeError::Refused(reason)),
            other => {
                return Err(HandshakeError::Unexpected {
                    expected: "a challenge",
                    got: other.name(),
                })
            }
        };
        let auth = Msg::PeerAuth {
            from: self.from.to_string(),
            to: self.to.to_string(),
            nonce: self.nonce,
            proof: key.peer_proof(&self.ctx(challenge)),
        };
        Ok((challenge, auth))
    }

    /// The acceptor's answer to this side's proof: its own proof, for the channel's keys.
    pub fn on_accept(
        &self,
        key: &ClusterKey,
        challenge: [u8; 16],
        answer: Msg,
    ) -> Result<Keys, HandshakeError> {
        let ctx = self.ctx(challenge);
        match answer {
            Msg::PeerAccept { proof } if key.check_peer_accept_proof(&ctx, &proof) => {
                Ok(keys(key, &ctx, Role::Opener))
            }
            Msg::PeerAccept { .. } => Err(HandshakeError::BadAcceptor {
                acceptor: self.addr.to_string(),
                kind: self.kind,
                to: self.to.to_string(),
            }),
            Msg::Refused { reason, .. } => Err(HandshakeError::Refused(reason)),
            other => Err(HandshakeError::Unexpected {
                expected: "acceptance",
                got: other.name(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
