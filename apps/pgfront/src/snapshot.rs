//! The per-session snapshot: what the front-end exports with `set_state` and restarts from.
//!
//! Encoded as `[version: u16 BE][postcard body]`; a snapshot of another version is refused with
//! a clear error rather than misread.

use serde::{Deserialize, Serialize};

/// Version of the snapshot encoding. Bumped on any incompatible change.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Where the session is when the snapshot is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Between transactions: the backend is idle; a restart replays the input that follows.
    Idle,
    /// Inside the commit path, before the transaction commits and before the client is told:
    /// a restart finds out whether transaction `xid` committed — committing the prepared `gid`
    /// first if there is one still prepared — and then sends the client `reply` (or the answer
    /// its own COMMIT messages `echo` get on an idle backend), or a serialization failure if it
    /// did not commit.
    Commit {
        gid: Option<String>,
        /// The transaction id (`pg_current_xact_id()`, decimal).
        xid: String,
        #[serde(with = "serde_bytes")]
        reply: Vec<u8>,
        #[serde(with = "serde_bytes")]
        echo: Vec<u8>,
    },
    /// The session holds state that cannot move (temp tables, LISTEN, session advisory locks,
    /// WITH HOLD cursors): a restart ends it with a FATAL error.
    Pinned { reason: String },
}

/// A prepared statement the session created (SQL `PREPARE` or a named protocol-level Parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// For `from_sql`: the whole `PREPARE name AS …` text; otherwise the statement's text.
    #[serde(with = "serde_bytes")]
    pub sql: Vec<u8>,
    /// Parameter type OIDs (protocol-level statements).
    pub types: Vec<u32>,
    pub from_sql: bool,
}

/// Everything a front-end needs to continue a session on its own backend connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stage: Stage,
    /// The client's startup parameters, in order (`user`, `database`, …).
    pub startup: Vec<(String, String)>,
    /// Transactions committed through the commit path so far (names the next one's gid).
    pub txseq: u64,
    /// Settings the session changed (`pg_settings` with `source = 'session'`): name, value.
    pub gucs: Vec<(String, String)>,
    pub prepared: Vec<Prepared>,
    /// Input read from the client but not consumed yet (pipelined messages).
    #[serde(with = "serde_bytes")]
    pub leftover: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot too short")]
    Short,
    #[error("snapshot version {0}, this front-end reads version {SNAPSHOT_VERSION}")]
    Version(u16),
    #[error("snapshot undecodable: {0}")]
    Body(#[from] postcard::Error),
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        // Serializing plain data into a Vec cannot fail.
        postcard::to_extend(self, v).expect("snapshot encodes")
    }

    pub fn decode(b: &[u8]) -> Result<Self, SnapshotError> {
        let (v, body) = b.split_first_chunk::<2>().ok_or(SnapshotError::Short)?;
        let v = u16::from_be_bytes(*v);
        if v != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(v));
        }
        Ok(postcard::from_bytes(body)?)
    }
}

/// The gid of transaction `txseq` of connection `cid`, prepared at `epoch`. The epoch is in
/// it so that a server still restarting an older epoch, rolling back what an origin left
/// prepared, can never touch what a newer holder of the connection prepared.
pub fn gid(cid: &str, txseq: u64, epoch: u64) -> String {
    format!("mtcp:{cid}:{txseq}:{epoch}")
}

/// The transaction number and epoch of a gid of `cid`, if `gid` is one.
pub fn gid_parts(gid: &str, cid: &str) -> Option<(u64, u64)> {
    let (txseq, epoch) = gid.strip_prefix(&format!("mtcp:{cid}:"))?.split_once(':')?;
    Some((txseq.parse().ok()?, epoch.parse().ok()?))
}

/// Whether prepared transaction `gid` was left by a server that did not finish it, for a
/// session restarting at `epoch` whose first transaction not resolved by its restart point is
/// `first_open`: a gid of `cid` from an older epoch for that transaction or a later one. (Its
/// commit point never became durable, so its client was told nothing. A newer epoch's gid is
/// a newer holder's own.)
pub fn left_over(gid: &str, cid: &str, first_open: u64, epoch: u64) -> bool {
    gid_parts(gid, cid).is_some_and(|(t, e)| t >= first_open && e < epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_gids() {
        assert_eq!(gid_parts(&gid("ab", 7, 3), "ab"), Some((7, 3)));
        assert_eq!(gid_parts(&gid("ab", 7, 3), "a"), None);
        assert_eq!(gid_parts("mtcp:ab:7", "ab"), None);
        assert_eq!(gid_parts("mtcp:ab:x:3", "ab"), None);
        // Restarting at epoch 5 with transaction 7 the first open one.
        assert!(left_over(&gid("ab", 7, 2), "ab", 7, 5));
        assert!(left_over(&gid("ab", 8, 4), "ab", 7, 5));
        assert!(
            !left_over(&gid("ab", 6, 2), "ab", 7, 5),
            "resolved by the point"
        );
        assert!(!left_over(&gid("ab", 7, 5), "ab", 7, 5), "our own epoch's");
        assert!(!left_over(&gid("ab", 7, 6), "ab", 7, 5), "a newer holder's");
        assert!(
            !left_over(&gid("cd", 7, 2), "ab", 7, 5),
            "another connection's"
        );
    }

    #[test]
    fn round_trip_and_version_check() {
        let s = Snapshot {
            stage: Stage::Commit {
                gid: Some(gid("ab", 3, 2)),
                xid: "771".into(),
                reply: b"C\0\0\0\x0bCOMMIT\0".to_vec(),
                echo: Vec::new(),
            },
            startup: vec![("user".into(), "postgres".into())],
            txseq: 3,
            gucs: vec![("work_mem".into(), "8192".into())],
            prepared: vec![Prepared {
                name: b"P0_1".to_vec(),
                sql: b"SELECT $1".to_vec(),
                types: vec![23],
                from_sql: false,
            }],
            leftover: b"Q\0\0\0\x05x".to_vec(),
        };
        let b = s.encode();
        assert_eq!(Snapshot::decode(&b).unwrap(), s);
        let mut other = b.clone();
        other[1] = 9;
        assert!(matches!(
            Snapshot::decode(&other),
            Err(SnapshotError::Version(9))
        ));
        assert!(Snapshot::decode(&b[..1]).is_err());
        assert!(Snapshot::decode(&b[..b.len() - 1]).is_err());
    }
}
