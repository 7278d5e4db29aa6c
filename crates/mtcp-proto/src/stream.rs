//! The server's side of one connection's byte streams, without I/O: the input log and unread
//! input, the output log, the restart points (snapshots), the agent's acknowledgements, the
//! state record a migration takes, and the replay check of a restarted application.
//!
//! The runtime (`mtcp::conn`) wraps this with wakers, the session's queue and the connection's
//! phase; every offset decision is made here.

use crate::offsets::{ByteLog, Divergence, ReplayVerifier};
use crate::record::StateRecord;
use bytes::Bytes;
use std::collections::VecDeque;

mod records;

/// Why a state record could not be built (sent to the destination as a refusal).
pub use crate::refusal::Refusal;
pub use records::replica_for_client;

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
        let (skip, over) = self.log_write(chunk.clone(), max_log)?;
        Ok((chunk.slice(skip..), over))
    }

    /// Whether a restarted application is still regenerating output the client already has
    /// (its input so far is, in part, input it was answered for before the move).
    pub fn replaying(&self) -> bool {
        self.verifier.is_some()
    }

    /// Like [`ServerStream::write`], without a second handle on `chunk`: returns how many of
    /// its leading bytes the client already has (regenerated output, checked), and whether the
    /// connection just became unmigratable. The caller sends the rest from its own copy.
    pub fn log_write(&mut self, chunk: Bytes, max_log: u64) -> Result<(usize, bool), Divergence> {
        let skip = match self.verifier.as_mut() {
            None => 0,
            Some(v) => v.check_write(&chunk)?,
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
        Ok((skip, became_unmigratable))
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
}

impl Default for ServerStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
