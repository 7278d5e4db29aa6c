//! Connection ids, migration tokens and the peer-channel handshake, all keyed by the cluster key.
//!
//! A token is HMAC-SHA256 under the cluster key over (cid, epoch): it proves that whoever
//! presents it was told it by a server of the cluster for that epoch of that connection. Every
//! migration moves the connection to a new epoch, so old tokens stop working.
//!
//! A peer or admin channel is authenticated both ways with proofs bound to the whole channel
//! context ([`ChannelContext`]: port kind, both ids, both nonces), and every frame after the
//! handshake carries a MAC under a per-direction key derived from that context (see
//! [`crate::channel`]).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The cluster's shared secret (32 bytes). Servers hold it; agents never do.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a cluster key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("cluster key must be 64 hex characters (32 bytes), got {0} characters")]
    Length(usize),
    #[error("cluster key is not valid hex: {0}")]
    Hex(String),
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(KeyError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| KeyError::Hex(e.to_string()))?;
        Ok(Self(out))
    }

    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn verify(&self, parts: &[&[u8]], tag: &[u8; 32]) -> bool {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        // Constant-time comparison.
        m.verify_slice(tag).is_ok()
    }

    /// The migration token of `cid` at `epoch`.
    pub fn token(&self, cid: Cid, epoch: u64) -> Token {
        Token(self.mac(&[b"mtcp-token-v1", &cid.0, &epoch.to_be_bytes()]))
    }

    /// Whether `token` is the token of `cid` at `epoch`.
    pub fn check_token(&self, cid: Cid, epoch: u64, token: &Token) -> bool {
        self.verify(&[b"mtcp-token-v1", &cid.0, &epoch.to_be_bytes()], &token.0)
    }

    /// Proof sent by whoever opens a peer or admin channel (a server, or `mtcp drain`). It
    /// covers everything that names the channel: the port kind, the opener's id, the id of
    /// the server it means to reach and both nonces. A proof made for one server or one kind
    /// of port is therefore worthless anywhere else, so a listener that merely receives it
    /// (for example on the address of a member that is down) cannot relay it.
    pub fn peer_proof(&self, ctx: &ChannelContext<'_>) -> [u8; 32] {
        self.mac(&ctx.parts(b"mtcp-peer-connect-v2"))
    }

    /// Whether `proof` is the opener's proof for exactly this channel context.
    pub fn check_peer_proof(&self, ctx: &ChannelContext<'_>, proof: &[u8; 32]) -> bool {
        self.verify(&ctx.parts(b"mtcp-peer-connect-v2"), proof)
    }

    /// The acceptor's proof back to the opener (mutual authentication), over the same context.
    pub fn peer_accept_proof(&self, ctx: &ChannelContext<'_>) -> [u8; 32] {
        self.mac(&ctx.parts(b"mtcp-peer-accept-v2"))
    }

    pub fn check_peer_accept_proof(&self, ctx: &ChannelContext<'_>, proof: &[u8; 32]) -> bool {
        self.verify(&ctx.parts(b"mtcp-peer-accept-v2"), proof)
    }

    /// The acceptor's check of an opener's `PeerAuth`: `ctx` holds what the acceptor knows to
    /// be true (its own id as `acceptor`, the kind of the port the channel came in on, its own
    /// nonce), `claimed_to` the server the opener says it meant to reach. Each refusal names
    /// its reason; a proof that would hold on the other kind of port is named as such.
    pub fn verify_opener(
        &self,
        ctx: &ChannelContext<'_>,
        claimed_to: &str,
        proof: &[u8; 32],
    ) -> Result<(), AuthError> {
        if claimed_to != ctx.acceptor {
            return Err(AuthError::WrongServer {
                meant: claimed_to.to_string(),
                here: ctx.acceptor.to_string(),
            });
        }
        if self.check_peer_proof(ctx, proof) {
            return Ok(());
        }
        let other = ChannelContext {
            kind: ctx.kind.other(),
            ..*ctx
        };
        if self.check_peer_proof(&other, proof) {
            return Err(AuthError::WrongKind {
                proof: other.kind,
                port: ctx.kind,
            });
        }
        Err(AuthError::BadProof)
    }
}

/// The kind of port a peer-to-peer channel is opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// State transfer between servers.
    Peer,
    /// Drain and status (`mtcp drain`).
    Admin,
}

impl PortKind {
    fn label(self) -> &'static [u8] {
        match self {
            PortKind::Peer => b"peer",
            PortKind::Admin => b"admin",
        }
    }

    fn other(self) -> Self {
        match self {
            PortKind::Peer => PortKind::Admin,
            PortKind::Admin => PortKind::Peer,
        }
    }
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortKind::Peer => "peer",
            PortKind::Admin => "admin",
        })
    }
}

/// Everything an authenticated channel is bound to: its proofs and its frame keys cover all of
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelContext<'a> {
    pub kind: PortKind,
    /// Id of the side that opened the channel (a server id, or `"admin"` for `mtcp drain`).
    pub opener: &'a str,
    /// Id of the server the opener means to reach.
    pub acceptor: &'a str,
    /// The acceptor's challenge.
    pub acceptor_nonce: [u8; 16],
    /// The opener's nonce.
    pub opener_nonce: [u8; 16],
}

impl ChannelContext<'_> {
    pub(crate) fn parts<'s>(&'s self, label: &'static [u8]) -> Vec<&'s [u8]> {
        vec![
            label,
            self.kind.label(),
            self.opener.as_bytes(),
            self.acceptor.as_bytes(),
            &self.acceptor_nonce,
            &self.opener_nonce,
        ]
    }
}

/// Which side of a channel we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Opener,
    Acceptor,
}

/// Why an acceptor refused an opener's proof.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the opener meant to reach server {meant:?}, this is {here:?} (a relayed or misdirected handshake)")]
    WrongServer { meant: String, here: String },
    #[error("a proof for a {proof} port presented on a {port} port (a relayed handshake)")]
    WrongKind { proof: PortKind, port: PortKind },
    #[error("the proof does not verify (wrong cluster key, or a relayed or altered handshake)")]
    BadProof,
}

/// A connection id: 128 random bits, chosen by the server that accepts the connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cid(pub [u8; 16]);

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl std::str::FromStr for Cid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s.trim(), &mut out)
            .map_err(|e| format!("connection id must be 32 hex characters: {e}"))?;
        Ok(Cid(out))
    }
}

/// A migration token (HMAC-SHA256 tag).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(pub [u8; 32]);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}..)", hex::encode(&self.0[..4]))
    }
}

/// Whether `a` and `b` are equal, in time that depends on neither (both are hashed first, so
/// not even their lengths leak): for secrets compared with what a client sent, such as an
/// agent's admin token.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content_only() {
        assert!(secrets_equal(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!secrets_equal(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!secrets_equal(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!secrets_equal(b"", b"x"));
        assert!(secrets_equal(b"", b""));
    }

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes([b; 32])
    }

    #[test]
    fn token_checks_cid_epoch_and_key() {
        let k = key(7);
        let cid = Cid([1; 16]);
        let t = k.token(cid, 3);
        assert!(k.check_token(cid, 3, &t));
        assert!(!k.check_token(cid, 4, &t), "other epoch");
        assert!(!k.check_token(Cid([2; 16]), 3, &t), "other cid");
        assert!(!key(8).check_token(cid, 3, &t), "other key");
        let mut bad = t;
        bad.0[31] ^= 1;
        assert!(!k.check_token(cid, 3, &bad));
    }

    fn ctx<'a>(kind: PortKind, opener: &'a str, acceptor: &'a str) -> ChannelContext<'a> {
        ChannelContext {
            kind,
            opener,
            acceptor,
            acceptor_nonce: [1; 16],
            opener_nonce: [2; 16],
        }
    }

    #[test]
    fn peer_proofs_are_bound_to_nonces_ids_target_and_kind() {
        let k = key(1);
        let c = ctx(PortKind::Peer, "s1", "s2");
        let p = k.peer_proof(&c);
        assert!(k.check_peer_proof(&c, &p));
        assert_eq!(k.verify_opener(&c, "s2", &p), Ok(()));
        assert!(!k.check_peer_proof(&ChannelContext { opener: "s3", ..c }, &p));
        assert!(!key(2).check_peer_proof(&c, &p), "other key");
        // Swapped nonces.
        let swapped = ChannelContext {
            acceptor_nonce: c.opener_nonce,
            opener_nonce: c.acceptor_nonce,
            ..c
        };
        assert!(!k.check_peer_proof(&swapped, &p));
        assert_eq!(
            k.verify_opener(&swapped, "s2", &p),
            Err(AuthError::BadProof)
        );
        // Opener and acceptor swapped (a reflected proof).
        assert!(!k.check_peer_proof(&ctx(PortKind::Peer, "s2", "s1"), &p));
    }

    #[test]
    fn a_proof_for_one_server_is_refused_by_another() {
        let k = key(1);
        // A dials B; a relay hands the proof to C (with C's challenge, so the nonces match).
        let for_b = ctx(PortKind::Peer, "a", "b");
        let p = k.peer_proof(&for_b);
        let at_c = ctx(PortKind::Peer, "a", "c");
        assert!(!k.check_peer_proof(&at_c, &p));
        // Whether the relay forwards the PeerAuth as is ("b") or rewrites its target ("c").
        assert_eq!(
            k.verify_opener(&at_c, "b", &p),
            Err(AuthError::WrongServer {
                meant: "b".into(),
                here: "c".into()
            })
        );
        assert_eq!(k.verify_opener(&at_c, "c", &p), Err(AuthError::BadProof));
    }

    #[test]
    fn peer_and_admin_proofs_do_not_cross_ports() {
        let k = key(1);
        let peer = ctx(PortKind::Peer, "s1", "s2");
        let admin = ctx(PortKind::Admin, "s1", "s2");
        let p = k.peer_proof(&peer);
        let a = k.peer_proof(&admin);
        assert_ne!(p, a);
        assert!(
            !k.check_peer_proof(&admin, &p),
            "peer proof on an admin port"
        );
        assert!(!k.check_peer_proof(&peer, &a), "admin proof on a peer port");
        assert_eq!(
            k.verify_opener(&admin, "s2", &p),
            Err(AuthError::WrongKind {
                proof: PortKind::Peer,
                port: PortKind::Admin
            })
        );
        assert_eq!(
            k.verify_opener(&peer, "s2", &a),
            Err(AuthError::WrongKind {
                proof: PortKind::Admin,
                port: PortKind::Peer
            })
        );
    }

    #[test]
    fn accept_proofs_are_mutual_and_bound_to_the_same_context() {
        let k = key(1);
        let c = ctx(PortKind::Peer, "s1", "s2");
        let a = k.peer_accept_proof(&c);
        assert!(k.check_peer_accept_proof(&c, &a));
        // The acceptor's proof is not the opener's, so one cannot be reflected as the other.
        assert!(!k.check_peer_proof(&c, &a));
        assert!(!k.check_peer_accept_proof(&c, &k.peer_proof(&c)));
        for other in [
            ctx(PortKind::Admin, "s1", "s2"),
            ctx(PortKind::Peer, "s1", "s3"),
            ctx(PortKind::Peer, "s3", "s2"),
            ChannelContext {
                acceptor_nonce: c.opener_nonce,
                opener_nonce: c.acceptor_nonce,
                ..c
            },
        ] {
            assert!(!k.check_peer_accept_proof(&other, &a), "{other:?}");
        }
        assert!(!key(2).check_peer_accept_proof(&c, &a));
    }

    #[test]
    fn ids_cannot_be_shifted_between_parts() {
        // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        let k = key(1);
        let p = k.peer_proof(&ctx(PortKind::Peer, "ab", "c"));
        assert!(!k.check_peer_proof(&ctx(PortKind::Peer, "a", "bc"), &p));
    }

    #[test]
    fn channel_keys_differ_by_direction_and_context() {
        let k = key(1);
        let c = ctx(PortKind::Peer, "s1", "s2");
        let (o_send, o_recv) = k.channel_macs(&c, Role::Opener);
        let (a_send, a_recv) = k.channel_macs(&c, Role::Acceptor);
        assert_eq!(o_send.key(), a_recv.key());
        assert_eq!(a_send.key(), o_recv.key());
        assert_ne!(o_send.key(), o_recv.key(), "directions share a key");
        let (admin_send, _) = k.channel_macs(&ctx(PortKind::Admin, "s1", "s2"), Role::Opener);
        assert_ne!(admin_send.key(), o_send.key());
        let other_nonce = ChannelContext {
            opener_nonce: [9; 16],
            ..c
        };
        assert_ne!(
            k.channel_macs(&other_nonce, Role::Opener).0.key(),
            o_send.key()
        );
        assert_ne!(key(2).channel_macs(&c, Role::Opener).0.key(), o_send.key());
    }

    #[test]
    fn key_parsing_errors_are_clear() {
        assert_eq!(
            ClusterKey::from_hex("abc").unwrap_err(),
            KeyError::Length(3)
        );
        assert!(matches!(
            ClusterKey::from_hex(&"zz".repeat(32)),
            Err(KeyError::Hex(_))
        ));
        assert!(ClusterKey::from_hex(&"ab".repeat(32)).is_ok());
    }

    #[test]
    fn cid_round_trips_through_hex() {
        let c = Cid([0xab; 16]);
        assert_eq!(c.to_string().parse::<Cid>().unwrap(), c);
        assert!("xyz".parse::<Cid>().is_err());
    }
}
