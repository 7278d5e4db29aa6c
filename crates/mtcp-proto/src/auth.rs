//! Connection ids, migration tokens and the peer-channel handshake, all keyed by the cluster key.
//!
//! A token is HMAC-SHA256 under the cluster key over (cid, epoch): it proves that whoever
//! presents it was told it by a server of the cluster for that epoch of that connection. Every
//! migration moves the connection to a new epoch, so old tokens stop working.

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

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
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

    /// Proof sent by the server that opens a peer or admin channel, answering the acceptor's
    /// challenge `server_nonce` with its own `client_nonce`.
    pub fn peer_proof(
        &self,
        server_nonce: &[u8; 16],
        client_nonce: &[u8; 16],
        from: &str,
    ) -> [u8; 32] {
        self.mac(&[
            b"mtcp-peer-connect-v1",
            server_nonce,
            client_nonce,
            from.as_bytes(),
        ])
    }

    pub fn check_peer_proof(
        &self,
        server_nonce: &[u8; 16],
        client_nonce: &[u8; 16],
        from: &str,
        proof: &[u8; 32],
    ) -> bool {
        self.verify(
            &[
                b"mtcp-peer-connect-v1",
                server_nonce,
                client_nonce,
                from.as_bytes(),
            ],
            proof,
        )
    }

    /// The acceptor's proof back to the opener (mutual authentication).
    pub fn peer_accept_proof(&self, server_nonce: &[u8; 16], client_nonce: &[u8; 16]) -> [u8; 32] {
        self.mac(&[b"mtcp-peer-accept-v1", server_nonce, client_nonce])
    }

    pub fn check_peer_accept_proof(
        &self,
        server_nonce: &[u8; 16],
        client_nonce: &[u8; 16],
        proof: &[u8; 32],
    ) -> bool {
        self.verify(&[b"mtcp-peer-accept-v1", server_nonce, client_nonce], proof)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn peer_proofs_are_bound_to_nonces_and_id() {
        let k = key(1);
        let (s, c) = ([1u8; 16], [2u8; 16]);
        let p = k.peer_proof(&s, &c, "s1");
        assert!(k.check_peer_proof(&s, &c, "s1", &p));
        assert!(!k.check_peer_proof(&s, &c, "s2", &p));
        assert!(!k.check_peer_proof(&c, &s, "s1", &p));
        assert!(!key(2).check_peer_proof(&s, &c, "s1", &p));
        let a = k.peer_accept_proof(&s, &c);
        assert!(k.check_peer_accept_proof(&s, &c, &a));
        assert!(!k.check_peer_accept_proof(&c, &s, &a));
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
