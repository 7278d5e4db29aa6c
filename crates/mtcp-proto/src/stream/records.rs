//! The state records a server stream hands out: for a migration (FETCH), and in eager mode for
//! replication to the backups and for a destination restarting from a replica.

use super::{Refusal, ServerStream, Snap};
use crate::auth::Cid;
use crate::offsets::OffsetError;
use crate::record::{Check, StateRecord};
use crate::sum::checksum;
use bytes::Bytes;

impl ServerStream {
    /// The state record for a client holding `down_recv` downstream bytes whose checksum from
    /// `sum_from` is `down_sum`: the agent's checksum is checked against the output log, and the
    /// newest restart point the client has everything up to is chosen.
    pub fn record(
        &self,
        cid: Cid,
        epoch: u64,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
    ) -> Result<StateRecord, Refusal> {
        let internal = |e: OffsetError| Refusal::internal(format!("output log: {e}"));
        if !self.migratable {
            return Err(Refusal::busy(
                "connection has no usable snapshot (output since it too large)",
            ));
        }
        let high = self.out_off().max(self.down_high);
        if down_recv > high || sum_from > down_recv {
            return Err(Refusal::divergence(format!(
                "agent claims downstream [{sum_from}, {down_recv}) but only {high} bytes were sent"
            )));
        }
        // The client must hold exactly what was sent: compare the agent's checksum (hashed in
        // the log, not over a copy: a move's freeze waits on it).
        let ours = if sum_from == down_recv {
            checksum(&[])
        } else {
            crate::offsets::log_checksum(&self.out, sum_from, down_recv).map_err(internal)?
        };
        if ours != down_sum {
            return Err(Refusal::divergence(format!(
                "the client received different bytes in [{sum_from}, {down_recv}) than this server sent"
            )));
        }
        let base = |s: &Snap, tail: Bytes, checks: Vec<Check>| -> Result<StateRecord, Refusal> {
            Ok(StateRecord {
                cid,
                epoch,
                snapshot: s.state.clone(),
                snap_in: s.in_off,
                snap_out: s.out_off,
                input: self
                    .input
                    .copy_range(s.in_off, self.input.end())
                    .map_err(internal)?,
                up_fin: self.up_fin,
                tail,
                checks,
            })
        };
        if let Some(v) = &self.verifier {
            // Still replaying what the client had at the last move: hand the same check on.
            let (from, checks) = v.expected();
            let end = v.check_end();
            if down_recv != end {
                return Err(Refusal::internal(format!(
                    "client at {down_recv} while replay expects {end}"
                )));
            }
            let s = self
                .snaps
                .iter()
                .find(|s| s.out_off == from)
                .unwrap_or(&self.snaps[0]);
            return base(s, Bytes::new(), checks.to_vec());
        }
        // The newest restart point the client has everything up to, else the oldest one.
        let s = self
            .snaps
            .iter()
            .rev()
            .find(|s| s.out_off <= down_recv)
            .unwrap_or(&self.snaps[0]);
        if down_recv < s.out_off {
            let tail = self
                .out
                .copy_range(down_recv, s.out_off)
                .map_err(internal)?;
            base(s, tail, vec![])
        } else {
            // Hashed in the log, not over a copy (up to a snapshot interval of output).
            let sum =
                crate::offsets::log_checksum(&self.out, s.out_off, down_recv).map_err(internal)?;
            let checks = if down_recv > s.out_off {
                vec![Check {
                    end: down_recv,
                    sum,
                }]
            } else {
                vec![]
            };
            base(s, Bytes::new(), checks)
        }
    }
}

impl ServerStream {
    /// Eager mode: the newest restart point the agent has received every byte up to, newer than
    /// `after` (`(out_off, in_off)` of the last one replicated), if there is one worth
    /// replicating (the implicit restart point of a new connection is not).
    pub fn replicable(&self, after: Option<(u64, u64)>) -> Option<&Snap> {
        if self.verifier.is_some() || !self.migratable {
            return None;
        }
        self.snaps
            .iter()
            .rev()
            .find(|s| s.out_off <= self.acked)
            .filter(|s| s.state.is_some() && after.is_none_or(|a| (s.out_off, s.in_off) > a))
    }

    /// Eager mode: the record a backup keeps for the newest restart point *now*, even one past
    /// what the client has received: the output it lacks before that point (from what the
    /// agent acknowledged) rides along as the tail, so a takeover can continue the client's
    /// stream from anywhere at or after the acknowledged position. `None` while a replay is
    /// being checked or when the output log no longer reaches back that far.
    pub fn durable_record(&self, cid: Cid, epoch: u64) -> Option<StateRecord> {
        if self.verifier.is_some() || !self.migratable {
            return None;
        }
        let s = self.snaps.back()?;
        let from = self.acked.min(s.out_off);
        let tail = self.out.copy_range(from, s.out_off).ok()?;
        let mut r = Self::replica_record(cid, epoch, s);
        r.tail = tail;
        Some(r)
    }

    /// Eager mode: the record a destination's backups keep for the restart point it restarted
    /// from (`rec`, the record it took the connection over with), at its new `epoch`: the
    /// bytes before that point the client still lacks ride along as the tail.
    pub fn restarted_replica(rec: &StateRecord, epoch: u64) -> StateRecord {
        let snap = Snap {
            state: rec.snapshot.clone(),
            in_off: rec.snap_in,
            out_off: rec.snap_out,
        };
        let mut r = Self::replica_record(rec.cid, epoch, &snap);
        r.tail = rec.tail.clone();
        r
    }

    /// Eager mode: the record a backup keeps for restart point `s` (no input: the agent retains
    /// it; no tail: the agent has every byte up to `s`).
    pub fn replica_record(cid: Cid, epoch: u64, s: &Snap) -> StateRecord {
        StateRecord {
            cid,
            epoch,
            snapshot: s.state.clone(),
            snap_in: s.in_off,
            snap_out: s.out_off,
            input: Bytes::new(),
            up_fin: None,
            tail: Bytes::new(),
            checks: Vec::new(),
        }
    }
}

/// Eager mode, at a destination taking over from a replica: turns the backup's record into one
/// for the client's real position — `down` downstream bytes received, `ranges` the agent's
/// checksum ranges, `up_base` the oldest upstream byte it still retains — or refuses when the
/// stream cannot be continued exactly.
pub fn replica_for_client(
    mut rec: StateRecord,
    down: u64,
    ranges: &[crate::sum::SumSeg],
    up_base: u64,
) -> Result<StateRecord, Refusal> {
    if up_base > rec.snap_in {
        return Err(Refusal::divergence(format!(
            "the agent no longer retains upstream from {} (it has from {up_base})",
            rec.snap_in
        )));
    }
    rec.input = Bytes::new();
    rec.up_fin = None;
    if down < rec.snap_out {
        let tail_start = rec.snap_out - rec.tail.len() as u64;
        if down < tail_start {
            return Err(Refusal::divergence(format!(
                "the replica restarts at {} but the client is at {down} and the replica holds no bytes before {tail_start}",
                rec.snap_out
            )));
        }
        rec.tail = rec.tail.slice((down - tail_start) as usize..);
        rec.checks = Vec::new();
    } else {
        rec.tail = Bytes::new();
        rec.checks = crate::sum::checks_from(ranges, rec.snap_out, down).ok_or(
            Refusal::divergence(format!(
                "cannot check the client's bytes [{}, {down}): the agent has no checksum from the replica's restart point",
                rec.snap_out
            )),
        )?;
    }
    Ok(rec)
}
