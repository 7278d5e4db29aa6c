//! A destination that cannot reach the origin takes the connection over from the replicas at
//! the origin's backups: it claims it at each, and restarts from the newest record any of them
//! granted (decisions 32 and 48). [`Pick`] is that choice; the runtime sends the claims.

use crate::auth::Cid;
use crate::record::StateRecord;
use crate::stream::{Refusal, ServerStream, Snap};

/// What the origin's backups answered to one takeover's claims.
#[derive(Debug)]
pub struct Pick {
    cid: Cid,
    epoch: u64,
    /// The newest record granted, and its size on the wire.
    best: Option<(StateRecord, u64)>,
    reached: usize,
    unreachable: Vec<String>,
}

impl Pick {
    /// Claims of connection `cid` at the MIGRATE's `epoch`.
    pub fn new(cid: Cid, epoch: u64) -> Self {
        Pick {
            cid,
            epoch,
            best: None,
            reached: 0,
            unreachable: Vec::new(),
        }
    }

    /// Backup `from` granted the claim with `rec` (`size` bytes encoded). A record of another
    /// connection, or of an epoch before the MIGRATE's, is refused: the backup is broken. One
    /// labelled past it is newer: a silent holder was superseded.
    pub fn granted(&mut self, from: &str, rec: StateRecord, size: u64) -> Result<(), Refusal> {
        self.reached += 1;
        if rec.cid != self.cid || rec.epoch < self.epoch {
            return Err(Refusal::internal(format!(
                "backup {from} sent the replica of another connection"
            )));
        }
        let key = |r: &StateRecord| (r.epoch, r.snap_out, r.snap_in);
        if self.best.as_ref().is_none_or(|(b, _)| key(&rec) > key(b)) {
            self.best = Some((rec, size));
        }
        Ok(())
    }

    /// A backup granted the claim and holds no record.
    pub fn granted_nothing(&mut self) {
        self.reached += 1;
    }

    /// A backup could not be reached (its claim may have been granted with the answer lost).
    pub fn unreachable(&mut self, why: String) {
        self.unreachable.push(why);
    }

    /// The record to restart from: the newest granted or, when the backups hold none (no
    /// snapshot was ever committed), the implicit restart point of a new connection. Refused
    /// `OriginUnreachable` when no backup answered.
    pub fn finish(self, origin: &str) -> Result<(StateRecord, u64), Refusal> {
        if self.reached == 0 {
            return Err(Refusal::origin_unreachable(format!(
                "origin {origin} and its backups are unreachable: {}",
                self.unreachable.join("; ")
            )));
        }
        Ok(self.best.unwrap_or_else(|| {
            let start = Snap {
                state: None,
                in_off: 0,
                out_off: 0,
            };
            let rec = ServerStream::replica_record(self.cid, self.epoch, &start);
            let n = rec.encode().len() as u64;
            (rec, n)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RefuseCode;

    fn rec(epoch: u64, out: u64) -> StateRecord {
        let s = Snap {
            state: Some(bytes::Bytes::from_static(b"abc")),
            in_off: 0,
            out_off: out,
        };
        ServerStream::replica_record(Cid([7; 16]), epoch, &s)
    }

    #[test]
    fn the_newest_record_by_epoch_then_position_wins() {
        let mut p = Pick::new(Cid([7; 16]), 3);
        p.granted("s2", rec(3, 500), 10).unwrap();
        p.granted("s3", rec(4, 100), 11).unwrap();
        p.granted("s4", rec(3, 900), 12).unwrap();
        p.unreachable("s5: timed out".into());
        let (r, n) = p.finish("s1").unwrap();
        assert_eq!((r.epoch, r.snap_out, n), (4, 100, 11));
    }

    #[test]
    fn a_record_of_another_connection_or_an_older_epoch_is_refused() {
        let mut p = Pick::new(Cid([7; 16]), 3);
        assert_eq!(
            p.granted("s2", rec(2, 0), 1).unwrap_err().code,
            RefuseCode::Internal
        );
        let mut other = rec(3, 0);
        other.cid = Cid([8; 16]);
        let e = p.granted("s3", other, 1).unwrap_err();
        assert!(e.reason.contains("backup s3"), "{e:?}");
    }

    #[test]
    fn no_record_restarts_from_the_beginning_and_no_answer_is_unreachable() {
        let mut p = Pick::new(Cid([7; 16]), 5);
        p.granted_nothing();
        let (r, n) = p.finish("s1").unwrap();
        assert_eq!((r.epoch, r.snap_out, r.snap_in), (5, 0, 0));
        assert!(r.snapshot.is_none());
        assert_eq!(n, r.encode().len() as u64);
        let mut p = Pick::new(Cid([7; 16]), 5);
        p.unreachable("s2: refused".into());
        let e = p.finish("s1").unwrap_err();
        assert_eq!(e.code, RefuseCode::OriginUnreachable);
        assert!(e.reason.contains("s2: refused"), "{e:?}");
    }
}
