//! The state record: everything a destination needs to restart a connection's application from
//! its last snapshot and continue the byte streams exactly where the client is.
//!
//! Encoded as `[version: u16 BE][postcard body]`, so a record from an incompatible version is
//! rejected with a clear error rather than misread.

use crate::auth::Cid;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Snapshot plus the byte ranges around it.
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
    /// Downstream bytes `[out_start, out_start + output.len())` that the origin wrote: every byte
    /// the client may lack, and every byte written since the snapshot (for exact verification).
    pub out_start: u64,
    pub output: Bytes,
}

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
            return Err(RecordError::Version { ours: crate::PROTOCOL_VERSION, theirs: v });
        }
        let r: StateRecord =
            postcard::from_bytes(&b[2..]).map_err(|e| RecordError::Malformed(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// Upstream bytes the origin had received (the agent resends from here).
    pub fn up_recv(&self) -> u64 {
        self.snap_in + self.input.len() as u64
    }

    /// Downstream bytes the origin's application had written.
    pub fn out_end(&self) -> u64 {
        self.out_start + self.output.len() as u64
    }

    fn validate(&self) -> Result<(), RecordError> {
        if self.out_start > self.snap_out || self.snap_out > self.out_end() {
            return Err(RecordError::Inconsistent("output log does not reach the snapshot"));
        }
        if self.snap_in.checked_add(self.input.len() as u64).is_none()
            || self.out_start.checked_add(self.output.len() as u64).is_none()
        {
            return Err(RecordError::Inconsistent("offset overflow"));
        }
        if let Some(f) = self.up_fin {
            if f != self.up_recv() {
                return Err(RecordError::Inconsistent("end of input is not at the end of the input"));
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
                              output in proptest::collection::vec(any::<u8>(), 0..100),
                              snap_in in 0u64..1<<40, out_start in 0u64..1<<40, k in 0usize..100, fin: bool) {
            let k = k.min(output.len()) as u64;
            let r = StateRecord {
                cid: Cid([3; 16]), epoch: 9, snapshot: snap.map(Bytes::from),
                snap_in, snap_out: out_start + k, input: Bytes::from(input.clone()),
                up_fin: fin.then_some(snap_in + input.len() as u64),
                out_start, output: Bytes::from(output),
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
            cid: Cid([0; 16]), epoch: 0, snapshot: None, snap_in: 0, snap_out: 0,
            input: Bytes::new(), up_fin: None, out_start: 0, output: Bytes::new(),
        }
        .encode();
        b[1] = 99;
        assert_eq!(StateRecord::decode(&b), Err(RecordError::Version { ours: 1, theirs: 99 }));
    }
}
