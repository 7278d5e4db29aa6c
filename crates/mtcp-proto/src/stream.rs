//! The server's side of one connection's byte streams, without I/O: the input log and unread
//! input, the output log, the restart points (snapshots), the agent's acknowledgements, the
//! state record a migration takes, and the replay check of a restarted application.
//!
//! The runtime (`mtcp::conn`) wraps this with wakers, the session's queue and the connection's
//! phase; every offset decision is made here.

use crate::auth::Cid;
use crate::offsets::{ByteLog, Divergence, OffsetError, ReplayVerifier};
use crate::record::{Check, StateRecord};
use crate::sum::checksum;
use crate::wire::RefuseCode;
use bytes::Bytes;
use std::collections::VecDeque;

/// Most restart points kept per connection.
pub const MAX_SNAPS: usize = 512;

/// One restart point: the application's snapshot and the stream offsets it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// `None`: the implicit restart point of a new connection (start over from offset 0).
    pub state: Option<Bytes>,
    pub in_off: u64,
    pub out_off: u64,
}

/// Why a state record could not be built (sent to the destination as a refusal).
pub type Refusal = (RefuseCode, String);

/// One connection's streams at a server.
#[derive(Debug, Clone)]
pub struct ServerStream {
    /// Upstream from the oldest restart point's `in_off`: the input log, then unread input.
    input: ByteLog,
    /// Upstream bytes the application has read.
    in_off: u64,
    up_fin: Option<u64>,
    /// Downstream `[out_start, out_off)`: what the client may still need.
    out: ByteLog,
    /// Downstream bytes the agent acknowledged.
    acked: u64,
    /// Where the agent's downstream checksum starts.
    agent_sum_from: u64,
    /// Highest downstream offset the agent may report (the client's position at a restart).
    down_high: u64,
    /// Whether the output log still reaches back to the restart points.
    migratable: bool,
    /// At a destination, until the regenerated output the client already has is checked.
    verifier: Option<ReplayVerifier>,
    /// Restart points, oldest first, never empty. Older ones are kept while the client has not
    /// yet received everything up to a newer one, so a restart needs no output it lacks.
    snaps: VecDeque<Snap>,
}

impl ServerStream {
    /// A new connection: nothing read or written, the implicit restart point at 0.
    pub fn new() -> Self {
        let start = Snap {
            state: None,
            in_off: 0,
            out_off: 0,
        };
        Self::at(start, ByteLog::new(0), ByteLog::new(0), 0)
    }

    fn at(start: Snap, input: ByteLog, out: ByteLog, down: u64) -> Self {
        Self {
            in_off: start.in_off,
            input,
            up_fin: None,
            out,
            acked: down,
            agent_sum_from: down,
            down_high: down,
            migratable: true,
            verifier: None,
            snaps: VecDeque::from([start]),
        }
    }

    /// A connection restarting from `rec`; returns it and the tail to send the client first.
    pub fn restart(rec: &StateRecord) -> (Self, Bytes) {
        let down = rec.client_down();
        let verifier = ReplayVerifier::new(rec.snap_out, rec.checks.clone());
        let mut out = ByteLog::new(rec.snap_out - rec.tail.len() as u64);
        out.push(rec.tail.clone());
        let mut input = ByteLog::new(rec.snap_in);
        input.push(rec.input.clone());
        let start = Snap {
            state: rec.snapshot.clone(),
            in_off: rec.snap_in,
            out_off: rec.snap_out,
        };
        let mut s = Self::at(start, input, out, down);
        s.up_fin = rec.up_fin;
        s.verifier = (!verifier.done()).then_some(verifier);
        (s, rec.tail.clone())
    }

    /// Downstream bytes the application has written.
    pub fn out_off(&self) -> u64 {
        self.out.end()
    }

    /// Upstream bytes the application has read.
    pub fn in_off(&self) -> u64 {
        self.in_off
    }

    /// Upstream bytes received from the agent.
    pub fn up_recv(&self) -> u64 {
        self.input.end()
    }

    /// Received upstream bytes the application has not read yet.
    pub fn unread(&self) -> u64 {
        self.input.end() - self.in_off
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Output written but not yet acknowledged by the agent: what the output log must keep
    /// whatever the restart points (the runtime bounds it, see `Limits::max_unacked`).
    pub fn unacked(&self) -> u64 {
        self.out_off().saturating_sub(self.acked)
    }

    pub fn migratable(&self) -> bool {
        self.migratable
    }

    pub fn restart_points(&self) -> &VecDeque<Snap> {
        &self.snaps
    }

    /// Bytes kept so that the connection can restart elsewhere: the input and output logs
    /// (unread input included) and the restart points' snapshots.
    pub fn kept_bytes(&self) -> u64 {
        let snaps: usize = self
            .snaps
            .iter()
            .map(|s| s.state.as_ref().map_or(0, Bytes::len))
            .sum();
        self.input.len() + self.out.len() + snaps as u64
    }

    /// Upstream data from the agent.
    pub fn receive(&mut self, b: Bytes) -> Result<(), &'static str> {
        if self.up_fin.is_some() {
            return Err("data after end of input");
        }
        self.input.push(b);
        Ok(())
    }

    /// Upstream data the application reads at once as it arrives (the kernel fast path, where
    /// the application's own read takes it from the client's socket): logged like
    /// [`ServerStream::receive`], and consumed. Only when nothing received is still unread, so
    /// the input stays in order.
    pub fn receive_read(&mut self, b: Bytes) -> Result<(), &'static str> {
        if self.unread() != 0 {
            return Err("input read past unread input");
        }
        let n = b.len() as u64;
        self.receive(b)?;
        self.in_off += n;
        Ok(())
    }

    /// The client finished sending at `up_total`.
    pub fn finish_input(&mut self, up_total: u64) -> Result<(), String> {
        if up_total != self.input.end() {
            return Err(format!(
                "end of input at {up_total} but {} bytes arrived",
                self.input.end()
            ));
        }
        self.up_fin = Some(up_total);
        Ok(())
    }

    /// The application reads into `dst`: `Some(n)` bytes (0 = end of input), or `None` when it
    /// must wait for more.
    pub fn read(&mut self, dst: &mut [u8]) -> Option<usize> {
        let n = self.input.read_at(self.in_off, dst);
        if n > 0 {
            self.in_off += n as u64;
            return Some(n);
        }
        (self.up_fin == Some(self.in_off)).then_some(0)
    }

    /// The application wrote `chunk`: logs it and returns what to send to the client (nothing
    /// of what a restarted application regenerates below the client's position). With the
    /// output log over `max_log` bytes the connection stops being migratable until its next
    /// snapshot; the returned flag is true on the write that crossed the limit.
    pub fn write(&mut self, chunk: Bytes, max_log: u64) -> Result<(Bytes, bool), Divergence> {
        let to_send = match self.verifier.as_mut() {
            None => chunk.clone(),
            Some(v) => v.on_write(chunk.clone())?,
        };
        if self.verifier.as_ref().is_some_and(|v| v.done()) {
            self.verifier = None;
        }
        self.out.push(chunk);
        let mut became_unmigratable = false;
        if self.out.len() > max_log && self.migratable {
            self.migratable = false;
            became_unmigratable = true;
        }
        if !self.migratable {
            self.out.trim_to(self.acked);
            let keep = self.snaps.len() - 1;
            self.snaps.drain(..keep);
        }
        Ok((to_send, became_unmigratable))
    }

    /// `set_state`: a restart point at the current offsets. Returns the offsets to announce to
    /// the agent (SNAP), or `None` when the snapshot is ignored because a restarted application
    /// is still regenerating output the client already has (the restart point it came with stays
    /// the one to use until that output is checked).
    pub fn snapshot(&mut self, state: Bytes) -> Option<(u64, u64)> {
        self.snapshot_at(state, false)
    }

    /// A *barrier* restart point: like [`ServerStream::snapshot`], but every older restart point
    /// is forgotten at once, so no migration ever restarts before it — a record for a client
    /// that lacks some output before it carries that output as its tail. An application uses
    /// one after an effect that must not be repeated (a database commit): restarting from an
    /// older point would repeat it.
    pub fn snapshot_barrier(&mut self, state: Bytes) -> Option<(u64, u64)> {
        self.snapshot_at(state, true)
    }

    fn snapshot_at(&mut self, state: Bytes, barrier: bool) -> Option<(u64, u64)> {
        if self.verifier.is_some() {
            return None;
        }
        let (in_off, out_off) = (self.in_off, self.out_off());
        if !self.migratable || barrier {
            // The output log no longer reaches the older restart points: only this one is valid.
            self.snaps.clear();
        } else if self.snaps.len() >= MAX_SNAPS {
            self.snaps.pop_front();
        }
        self.snaps.push_back(Snap {
            state: Some(state),
            in_off,
            out_off,
        });
        self.migratable = true;
        self.trim();
        Some((in_off, out_off))
    }

    /// Forgets restart points, input and output no restart can need any more.
    pub fn trim(&mut self) {
        while self.snaps.len() >= 2 && self.snaps[1].out_off <= self.acked {
            self.snaps.pop_front();
        }
        let first = &self.snaps[0];
        let (in_keep, out_keep) = (
            first.in_off,
            self.acked.min(self.agent_sum_from).min(first.out_off),
        );
        self.input.trim_to(in_keep);
        if self.migratable {
            self.out.trim_to(out_keep);
        }
    }

    /// The agent reported downstream progress.
    pub fn on_ack(&mut self, down_recv: u64, sum_from: u64) {
        let high = self.out_off().max(self.down_high);
        self.acked = self.acked.max(down_recv.min(high));
        self.agent_sum_from = self.agent_sum_from.max(sum_from.min(self.acked));
        self.trim();
    }

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
        let internal = |e: OffsetError| (RefuseCode::Internal, format!("output log: {e}"));
        if !self.migratable {
            return Err((
                RefuseCode::Busy,
                "connection has no usable snapshot (output since it too large)".into(),
            ));
        }
        let high = self.out_off().max(self.down_high);
        if down_recv > high || sum_from > down_recv {
            return Err((
                RefuseCode::Divergence,
                format!("agent claims downstream [{sum_from}, {down_recv}) but only {high} bytes were sent"),
            ));
        }
        // The client must hold exactly what was sent: compare the agent's checksum (hashed in
        // the log, not over a copy: a move's freeze waits on it).
        let ours = if sum_from == down_recv {
            checksum(&[])
        } else {
            crate::sum::log_checksum(&self.out, sum_from, down_recv).map_err(internal)?
        };
        if ours != down_sum {
            return Err((
                RefuseCode::Divergence,
                format!("the client received different bytes in [{sum_from}, {down_recv}) than this server sent"),
            ));
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
                return Err((
                    RefuseCode::Internal,
                    format!("client at {down_recv} while replay expects {end}"),
                ));
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
                crate::sum::log_checksum(&self.out, s.out_off, down_recv).map_err(internal)?;
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
        return Err((
            RefuseCode::Divergence,
            format!(
                "the agent no longer retains upstream from {} (it has from {up_base})",
                rec.snap_in
            ),
        ));
    }
    rec.input = Bytes::new();
    rec.up_fin = None;
    if down < rec.snap_out {
        let tail_start = rec.snap_out - rec.tail.len() as u64;
        if down < tail_start {
            return Err((
                RefuseCode::Divergence,
                format!(
                    "the replica restarts at {} but the client is at {down} and the replica holds no bytes before {tail_start}",
                    rec.snap_out
                ),
            ));
        }
        rec.tail = rec.tail.slice((down - tail_start) as usize..);
        rec.checks = Vec::new();
    } else {
        rec.tail = Bytes::new();
        rec.checks = crate::sum::checks_from(ranges, rec.snap_out, down).ok_or((
            RefuseCode::Divergence,
            format!(
                "cannot check the client's bytes [{}, {down}): the agent has no checksum from the replica's restart point",
                rec.snap_out
            ),
        ))?;
    }
    Ok(rec)
}

impl Default for ServerStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_LIMIT: u64 = u64::MAX;

    #[test]
    fn kept_bytes_count_logs_and_snapshots_until_the_agent_has_them() {
        let mut st = ServerStream::new();
        st.receive(Bytes::from_static(b"abcd")).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(st.read(&mut b), Some(4));
        st.write(Bytes::from_static(b"012345"), NO_LIMIT).unwrap();
        assert_eq!(
            st.kept_bytes(),
            10,
            "input and output since the implicit point at 0"
        );
        st.snapshot(Bytes::from_static(b"ss")).unwrap();
        assert_eq!(
            st.kept_bytes(),
            12,
            "the client lacks the output up to the new point"
        );
        st.on_ack(6, 6);
        assert_eq!(st.kept_bytes(), 2, "only the snapshot is left");
    }

    #[test]
    fn input_read_on_arrival_is_logged_in_order() {
        let mut st = ServerStream::new();
        st.receive(Bytes::from_static(b"ab")).unwrap();
        // Unread input comes first: reading past it would reorder the stream.
        assert!(st.receive_read(Bytes::from_static(b"cd")).is_err());
        let mut b = [0u8; 8];
        assert_eq!(st.read(&mut b), Some(2));
        st.receive_read(Bytes::from_static(b"cd")).unwrap();
        assert_eq!((st.in_off(), st.up_recv(), st.unread()), (4, 4, 0));
        assert_eq!(st.read(&mut b), None, "consumed on arrival");
        // A snapshot at 1 byte in keeps the input after it for a restart.
        let mut st = ServerStream::new();
        st.receive_read(Bytes::from_static(b"x")).unwrap();
        st.snapshot(Bytes::from_static(b"s")).unwrap();
        st.receive_read(Bytes::from_static(b"yz")).unwrap();
        let rec = st
            .record(Cid([0; 16]), 0, 0, 0, crate::sum::checksum(&[]))
            .unwrap();
        assert_eq!((rec.snap_in, &rec.input[..]), (1, &b"yz"[..]));
        st.finish_input(3).unwrap();
        assert!(
            st.receive_read(Bytes::from_static(b"!")).is_err(),
            "after the end"
        );
    }

    proptest! {
        /// Whatever the snapshots, acknowledgements and client position, the record an origin
        /// builds lets a deterministic application restarted elsewhere continue the client's
        /// stream exactly: tail first, then regenerated bytes past what the client has, the
        /// regenerated bytes it already has checked.
        #[test]
        fn record_and_replay_continue_the_stream_exactly(
            len in 1usize..20_000,
            chunk in 1usize..3000,
            snaps in proptest::collection::btree_set(1usize..20_000, 0..12),
            acks in proptest::collection::btree_set(1usize..20_000, 0..6),
            recv in 0usize..20_000,
            rchunk in 1usize..3000,
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut st = ServerStream::new();
            // The agent's checksum restarts at the newest snapshot it has all bytes up to.
            let agent_sum_from = |d: usize| snaps.iter().copied().filter(|&s| s <= d && s < len).max().unwrap_or(0) as u64;
            let recv = recv % (len + 1);
            let mut pos = 0;
            let mut taken = 0;
            while pos < len {
                // Writes end at snapshot points, as in a real application.
                let next_snap = snaps.range(pos + 1..).next().copied().unwrap_or(usize::MAX);
                let e = (pos + chunk).min(len).min(next_snap);
                st.write(Bytes::copy_from_slice(&data[pos..e]), NO_LIMIT).unwrap();
                pos = e;
                if snaps.contains(&pos) && pos < len {
                    prop_assert!(st.snapshot(Bytes::from(pos.to_string())).is_some());
                    taken += 1;
                }
                for &a in acks.range(..=pos.min(recv)) {
                    st.on_ack(a as u64, agent_sum_from(a));
                }
            }
            prop_assert_eq!(taken, snaps.iter().filter(|&&s| s < len).count());
            let sf = agent_sum_from(recv).min(recv as u64);
            let rec = st.record(Cid([1; 16]), 0, recv as u64, sf, checksum(&data[sf as usize..recv])).unwrap();
            // The destination: the client has `recv` bytes; restart at the snapshot.
            let restart = match &rec.snapshot {
                None => 0,
                Some(b) => std::str::from_utf8(b).unwrap().parse::<usize>().unwrap(),
            };
            prop_assert_eq!(restart as u64, rec.snap_out);
            prop_assert_eq!(rec.client_down(), recv as u64);
            let (mut dest, tail) = ServerStream::restart(&rec);
            let mut client = data[..recv].to_vec();
            client.extend_from_slice(&tail);
            let mut p = restart;
            while p < len {
                let e = (p + rchunk).min(len);
                client.extend_from_slice(&dest.write(Bytes::copy_from_slice(&data[p..e]), NO_LIMIT).unwrap().0);
                p = e;
            }
            prop_assert_eq!(client, data);
        }
    }

    proptest! {
        /// Eager mode: whatever replicated restart point a backup holds and wherever the client
        /// is past it, restarting from the replica with the agent's checksum ranges continues
        /// the stream exactly; and a changed regenerated byte is caught.
        #[test]
        fn replica_and_agent_ranges_continue_the_stream_exactly(
            len in 1usize..20_000,
            snaps in proptest::collection::btree_set(1usize..20_000, 1..12),
            pick in 0usize..12,
            recv in 0usize..20_000,
            rchunk in 1usize..3000,
            flip in proptest::option::of(0usize..20_000),
        ) {
            use crate::sum::{DownTracker, SumSeg};
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let snaps: Vec<usize> = snaps.into_iter().filter(|&s| s < len).collect();
            prop_assume!(!snaps.is_empty());
            let snap = snaps[pick % snaps.len()];
            let recv = snap + recv % (len - snap + 1);
            // The agent: ranges cut at every snapshot it saw, in stream order.
            let mut t = DownTracker::new(0);
            t.keep_ranges(true);
            let mut st = ServerStream::new();
            let mut pos = 0;
            for &sp in snaps.iter().chain([len].iter()) {
                st.write(Bytes::copy_from_slice(&data[pos..sp]), NO_LIMIT).unwrap();
                let upto = sp.min(recv).max(pos);
                t.on_data(&data[pos.min(upto)..upto]);
                pos = sp;
                if sp < len {
                    st.snapshot(Bytes::from(sp.to_string()));
                    if sp <= recv {
                        t.on_snap(sp as u64);
                    }
                }
            }
            st.on_ack(snap as u64, t.sum_from().min(snap as u64));
            let chosen = st.restart_points().iter().find(|s| s.out_off == snap as u64).cloned().unwrap();
            let rec = ServerStream::replica_record(Cid([1; 16]), 5, &chosen);
            let rec = StateRecord::decode(&rec.encode()).unwrap();
            let mut ranges = t.finished();
            ranges.push(SumSeg { from: t.sum_from(), end: t.received(), sum: t.sum() });
            let rec = replica_for_client(rec, recv as u64, &ranges, 0).unwrap();
            prop_assert_eq!(rec.client_down(), recv as u64);
            let (mut dest, tail) = ServerStream::restart(&rec);
            prop_assert!(tail.is_empty());
            let mut regen = data.clone();
            if let Some(f) = flip {
                let i = snap + f % (len - snap);
                regen[i] ^= 0x40;
            }
            let changed_below_recv = regen[..recv] != data[..recv];
            let mut client = data[..recv].to_vec();
            let mut p = snap;
            let mut diverged = false;
            while p < len {
                let e = (p + rchunk).min(len);
                match dest.write(Bytes::copy_from_slice(&regen[p..e]), NO_LIMIT) {
                    Ok((sent, _)) => client.extend_from_slice(&sent),
                    Err(_) => { diverged = true; break; }
                }
                p = e;
            }
            prop_assert_eq!(diverged, changed_below_recv);
            if !diverged {
                prop_assert_eq!(client, regen);
            }
        }
    }

    #[test]
    fn a_wrong_client_checksum_is_refused() {
        let mut st = ServerStream::new();
        st.write(Bytes::from_static(b"hello world"), NO_LIMIT)
            .unwrap();
        let e = st
            .record(Cid([1; 16]), 0, 11, 0, checksum(b"hello_world"))
            .unwrap_err();
        assert_eq!(e.0, RefuseCode::Divergence);
        assert!(
            st.record(Cid([1; 16]), 0, 12, 0, 0).is_err(),
            "client ahead of what was sent"
        );
        assert!(st
            .record(Cid([1; 16]), 0, 11, 0, checksum(b"hello world"))
            .is_ok());
    }

    #[test]
    fn over_the_log_limit_only_a_later_snapshot_is_a_restart_point() {
        let mut st = ServerStream::new();
        assert!(!st.write(Bytes::from(vec![1u8; 100]), 150).unwrap().1);
        st.snapshot(Bytes::from_static(b"a"));
        assert!(st.write(Bytes::from(vec![2u8; 100]), 150).unwrap().1);
        assert!(!st.migratable());
        assert_eq!(
            st.record(Cid([1; 16]), 0, 0, 0, checksum(&[]))
                .unwrap_err()
                .0,
            RefuseCode::Busy
        );
        st.on_ack(200, 0);
        st.snapshot(Bytes::from_static(b"b"));
        assert!(st.migratable());
        assert_eq!(
            st.restart_points().len(),
            1,
            "the stale restart points are gone"
        );
        let rec = st.record(Cid([1; 16]), 0, 200, 200, checksum(&[])).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_barrier_is_never_restarted_before() {
        let mut st = ServerStream::new();
        st.receive(Bytes::from_static(b"q1q2")).unwrap();
        let mut b = [0u8; 2];
        st.read(&mut b);
        st.write(Bytes::from_static(b"r1"), NO_LIMIT).unwrap();
        st.snapshot(Bytes::from_static(b"idle1"));
        st.read(&mut b);
        st.write(Bytes::from_static(b"r2"), NO_LIMIT).unwrap();
        // A plain snapshot: a client holding only "r1" restarts from idle1 (regenerates r2).
        let mut plain = st.clone();
        plain.snapshot(Bytes::from_static(b"idle2"));
        let rec = plain
            .record(Cid([1; 16]), 0, 2, 0, checksum(b"r1"))
            .unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"idle1"[..]));
        // A barrier: the same client restarts after it and gets "r2" as the tail.
        assert_eq!(
            st.snapshot_barrier(Bytes::from_static(b"done")),
            Some((4, 4))
        );
        assert_eq!(st.restart_points().len(), 1);
        let rec = st.record(Cid([1; 16]), 0, 2, 0, checksum(b"r1")).unwrap();
        assert_eq!(rec.snapshot.as_deref(), Some(&b"done"[..]));
        assert_eq!(&rec.tail[..], b"r2");
        assert_eq!((rec.snap_in, rec.snap_out), (4, 4));
        // Even a client with nothing: the tail reaches back to what it acknowledged.
        let rec = st.record(Cid([1; 16]), 0, 0, 0, checksum(&[])).unwrap();
        assert_eq!(&rec.tail[..], b"r1r2");
    }

    #[test]
    fn reads_wait_then_see_end_of_input() {
        let mut st = ServerStream::new();
        let mut b = [0u8; 4];
        assert_eq!(st.read(&mut b), None);
        st.receive(Bytes::from_static(b"abcdef")).unwrap();
        assert_eq!(st.read(&mut b), Some(4));
        assert_eq!(
            st.finish_input(5).unwrap_err(),
            "end of input at 5 but 6 bytes arrived"
        );
        st.finish_input(6).unwrap();
        assert_eq!(st.read(&mut b), Some(2));
        assert_eq!(st.read(&mut b), Some(0));
        assert!(st.receive(Bytes::from_static(b"x")).is_err());
    }
}
