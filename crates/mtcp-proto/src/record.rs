//! The state record: everything a destination needs to restart a connection's application from
//! its last snapshot and continue the byte streams exactly where the client is.
//!
//! Encoded as `[version: u16 BE][postcard body]`, so a record from an incompatible version is
//! rejected with a clear error rather than misread.

use crate::auth::Cid;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Snapshot plus the byte ranges around it.
///
/// Only what cannot be regenerated crosses the network: the snapshot, the input since it, the
/// downstream bytes before the snapshot that the client still lacks (the *tail*), and a checksum
/// of the downstream bytes after the snapshot that the client already has, against which the
/// destination verifies its regenerated output before sending anything new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub cid: Cid,
    pub epoch: u64,
    /// The application's snapshot, `None` when it never took one (restart as a new connection,
    /// replaying all input from offset 0).
    pub snapshot: Option<Bytes>,
    /// Upstream bytes the application had consumed at the snapshot.
    pub snap_in: u64,
    /// Downstream bytes the application had written at the snapshot.
    pub snap_out: u64,
    /// Upstream bytes `[snap_in, snap_in + input.len())`: the input log since the snapshot, then
    /// the input the origin had received but its application not yet read.
    pub input: Bytes,
    /// Upstream end of stream, if the client already finished sending.
    pub up_fin: Option<u64>,
    /// Downstream bytes `[snap_out - tail.len(), snap_out)` the client lacks: sent first.
    pub tail: Bytes,
    /// The client holds the downstream bytes after `snap_out` up to the last check's `end`;
    /// these are consecutive ranges `[previous end (or snap_out), end)` with the checksum
    /// ([`crate::sum`]) of what the client received there. Empty when a tail is sent.
    pub checks: Vec<Check>,
}

/// One checked downstream range (see [`StateRecord::checks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub end: u64,
    pub sum: u64,
}

/// Most checked ranges a record may carry.
pub const MAX_CHECKS: usize = 4096;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("state record is truncated")]
    Truncated,
    #[error("state record version {theirs} is not supported (this server reads version {ours})")]
    Version { ours: u16, theirs: u16 },
    #[error("state record is malformed: {0}")]
    Malformed(String),
    #[error("state record is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = crate::PROTOCOL_VERSION.to_be_bytes().to_vec();
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, RecordError> {
        if b.len() < 2 {
            return Err(RecordError::Truncated);
        }
        let v = u16::from_be_bytes([b[0], b[1]]);
        if v != crate::PROTOCOL_VERSION {
            return Err(RecordError::Version {
                ours: crate::PROTOCOL_VERSION,
                theirs: v,
            });
        }
        let r: StateRecord = match postcard::take_from_bytes(&b[2..]) {
            Ok((r, [])) => r,
            Ok((_, rest)) => {
                return Err(RecordError::Malformed(format!(
                    "{} stray bytes after the record",
                    rest.len()
                )))
            }
            Err(e) => return Err(RecordError::Malformed(e.to_string())),
        };
        r.validate()?;
        Ok(r)
    }

    /// About how many bytes the record takes encoded: its byte payloads plus the fixed fields
    /// and checks (an upper bound for the varint-encoded fields). An origin checks it against
    /// the destination's frame limit before it freezes a connection.
    pub fn encoded_len_bound(&self) -> usize {
        const FIXED: usize = 2 + 16 + 5 * 10 + 3 * 10 + 1;
        FIXED
            + self.snapshot.as_ref().map_or(0, |s| s.len())
            + self.input.len()
            + self.tail.len()
            + self.checks.len() * 20
    }

    /// Upstream bytes the origin had received (the agent resends from here).
    pub fn up_recv(&self) -> u64 {
        self.snap_in + self.input.len() as u64
    }

    /// Downstream offset the client holds: where the destination's output continues.
    pub fn client_down(&self) -> u64 {
        if self.tail.is_empty() {
            self.check_end()
        } else {
            self.snap_out - self.tail.len() as u64
        }
    }

    /// Where the checked ranges end (`snap_out` when there are none).
    pub fn check_end(&self) -> u64 {
        self.checks.last().map_or(self.snap_out, |c| c.end)
    }

    fn validate(&self) -> Result<(), RecordError> {
        if self.snap_in.checked_add(self.input.len() as u64).is_none() {
            return Err(RecordError::Inconsistent("offset overflow"));
        }
        if (self.tail.len() as u64) > self.snap_out {
            return Err(RecordError::Inconsistent("tail reaches below offset 0"));
        }
        if !self.tail.is_empty() && !self.checks.is_empty() {
            return Err(RecordError::Inconsistent(
                "a record with a tail cannot also check bytes after the snapshot",
            ));
        }
        if self.checks.len() > MAX_CHECKS {
            return Err(RecordError::Inconsistent("too many checked ranges"));
        }
        let mut at = self.snap_out;
        for c in &self.checks {
            if c.end <= at {
                return Err(RecordError::Inconsistent(
                    "checked ranges are not consecutive ranges after the snapshot",
                ));
            }
            at = c.end;
        }
        if let Some(f) = self.up_fin {
            if f != self.up_recv() {
                return Err(RecordError::Inconsistent(
                    "end of input is not at the end of the input",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip(snap in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)),
                              input in proptest::collection::vec(any::<u8>(), 0..100),
                              tail in proptest::collection::vec(any::<u8>(), 0..100),
                              snap_in in 0u64..1<<40, snap_out in 100u64..1<<40, ahead in 0u64..1000,
                              fin: bool, sum: u64) {
            let r = StateRecord {
                cid: Cid([3; 16]), epoch: 9, snapshot: snap.map(Bytes::from),
                snap_in, snap_out, input: Bytes::from(input.clone()),
                up_fin: fin.then_some(snap_in + input.len() as u64),
                checks: if tail.is_empty() && ahead > 0 { vec![Check { end: snap_out + ahead, sum }, Check { end: snap_out + 2 * ahead, sum: !sum }] } else { vec![] },
                tail: Bytes::from(tail),
            };
            prop_assert_eq!(StateRecord::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StateRecord::decode(&b);
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let mut b = StateRecord {
            cid: Cid([0; 16]),
            epoch: 0,
            snapshot: None,
            snap_in: 0,
            snap_out: 0,
            input: Bytes::new(),
            up_fin: None,
            tail: Bytes::new(),
            checks: vec![],
        }
        .encode();
        b[1] = 99;
        assert_eq!(
            StateRecord::decode(&b),
            Err(RecordError::Version {
                ours: crate::PROTOCOL_VERSION,
                theirs: 99
            })
        );
    }
}
