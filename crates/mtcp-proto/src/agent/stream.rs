//! The relayed stream as the agent keeps it across sessions: upstream bytes retained until a
//! restart point covers them, downstream bytes counted and checksummed, acknowledgements, and
//! the end of the stream. The relay feeds it what it reads and delivers; it answers with the
//! frames to send.

use super::{on_closed, Closing, MoveError, StreamPos};
use crate::custody::{Lineage, Step};
use crate::offsets::ByteLog;
use crate::sum::DownTracker;
use crate::wire::{Msg, Resumed};
use bytes::Bytes;

/// Downstream bytes between periodic ACKs (they let the server trim its output log). Each ACK
/// is a write at the agent and a wake-up of the server's session reader: 1 MiB instead of
/// 256 KiB cut the CPU per GiB through the agent by about 7 % (stop 7, `mtcp bench
/// throughput`).
pub const ACK_EVERY: u64 = 1 << 20;

/// What a stream message asks of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStep {
    /// Nothing to send.
    Continue,
    /// Send this ACK.
    Send(Msg),
    /// The server closed the stream and every byte was delivered: send this last ACK and end
    /// the connection in order.
    Finish(Msg),
    /// The server contradicts what was delivered: reset the client's connection.
    Abort(String),
}

/// What a resumed session starts with: the retained upstream bytes from the destination's
/// restart point, and the end of upstream if the client program had closed its side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resend {
    /// The retained upstream bytes from the destination's restart point, in order.
    pub chunks: Vec<Bytes>,
    /// The end of upstream (UPFIN's `up_total`), if the client program had closed its side.
    pub up_fin: Option<u64>,
    /// Speak at once on the new session, before the resent bytes (a PING: eager mode). Until
    /// the destination hears the agent there, a keeper may still have it give the epoch up
    /// (the agent might have moved on), and it holds COMMITTED back (decision 48).
    pub speak_first: bool,
}

/// One relayed connection's stream.
#[derive(Debug, Clone)]
pub struct RelayStream {
    /// Upstream bytes not yet covered by a restart point (eager: one a backup holds).
    pub retained: ByteLog,
    pub down: DownTracker,
    /// Downstream offset last acknowledged.
    acked: u64,
    /// The client program ended its input (UPFIN sent).
    client_eof: bool,
    /// Eager mode: upstream is retained back to the snapshot a backup holds (COMMITTED), and
    /// downstream checksum ranges are kept from there.
    eager: bool,
    /// Eager mode: the epochs moved away from whose destination has not confirmed (COMMITTED)
    /// that its backups hold the new one (decision 43).
    pub lineage: Lineage,
    /// The server closed the stream at this downstream offset (CLOSED) and bytes before it are
    /// still on their way.
    closed_at: Option<u64>,
}

impl RelayStream {
    pub fn new(eager: bool) -> Self {
        let mut down = DownTracker::new(0);
        down.keep_ranges(eager);
        RelayStream {
            retained: ByteLog::new(0),
            down,
            acked: 0,
            client_eof: false,
            eager,
            lineage: Lineage::default(),
            closed_at: None,
        }
    }

    pub fn eager(&self) -> bool {
        self.eager
    }

    pub fn client_eof(&self) -> bool {
        self.client_eof
    }

    /// Where the server said the stream ends, if it did.
    pub fn closed_at(&self) -> Option<u64> {
        self.closed_at
    }

    /// Every downstream byte up to the server's close was delivered.
    pub fn complete(&self) -> bool {
        self.closed_at == Some(self.down.received())
    }

    /// The stream's position, for MIGRATE.
    pub fn position(&self) -> StreamPos {
        StreamPos {
            down_recv: self.down.received(),
            sum_from: self.down.sum_from(),
            down_sum: self.down.sum(),
            up_sent: self.retained.end(),
            up_base: self.retained.start(),
            segs: self.down.finished(),
        }
    }

    /// The client program sent `chunk`: retain it until a restart point covers it.
    pub fn on_upstream(&mut self, chunk: Bytes) {
        self.retained.push(chunk);
    }

    /// The client program ended its input (or reset): the UPFIN to send.
    pub fn on_client_eof(&mut self) -> Msg {
        self.client_eof = true;
        Msg::UpFin {
            up_total: self.retained.end(),
        }
    }

    /// Downstream data reaching offset `arrived` came from the session.
    pub fn on_arrival(&self, arrived: u64) -> Result<(), String> {
        match self.closed_at {
            Some(t) if arrived > t => Err("server sent data past its close".into()),
            _ => Ok(()),
        }
    }

    /// Downstream bytes `d` were delivered to the client program: the ACK to send, if one is
    /// due — every [`ACK_EVERY`] bytes, at the end of the stream, and in eager mode when the
    /// client reached a snapshot (its server may replicate it then).
    pub fn on_delivered(&mut self, d: &[u8]) -> Option<Msg> {
        let cut = self.down.on_data(d);
        let recv = self.down.received();
        (recv - self.acked >= ACK_EVERY || self.complete() || (cut && self.eager))
            .then(|| self.ack())
    }

    /// The periodic tick: acknowledge what arrived since the last ACK (the server drops its
    /// copy now rather than after [`ACK_EVERY`] more bytes that may never come).
    pub fn on_tick(&mut self) -> Option<Msg> {
        self.unacked().then(|| self.ack())
    }

    /// Whether bytes were delivered that no ACK covers yet.
    pub fn unacked(&self) -> bool {
        self.down.received() > self.acked
    }

    fn ack(&mut self) -> Msg {
        self.acked = self.down.received();
        Msg::Ack {
            down_recv: self.acked,
            sum_from: self.down.sum_from(),
        }
    }

    /// A stream message from the serving server (`server`, for the error text).
    pub fn on_msg(&mut self, m: Msg, server: &str) -> StreamStep {
        match m {
            Msg::Snap { in_off, out_off } => {
                if !self.eager {
                    self.retained.trim_to(in_off);
                }
                if self.down.on_snap(out_off) && self.eager {
                    return StreamStep::Send(self.ack());
                }
            }
            Msg::Committed { in_off, out_off } if self.eager => {
                // The serving server's backups hold this point, hence its epoch: upstream before
                // it and the epochs before this one are no longer needed.
                self.retained.trim_to(in_off);
                self.down.retain_from(out_off);
                self.lineage.confirmed();
            }
            Msg::Closed { down_total } => {
                let recv = self.down.received();
                match on_closed(down_total, Some(recv)) {
                    Closing::Short => {
                        return StreamStep::Abort(format!(
                            "server {server} closed the stream at {down_total} but {recv} bytes were already delivered"
                        ));
                    }
                    Closing::Done => {
                        self.closed_at = Some(down_total);
                        return StreamStep::Finish(self.ack());
                    }
                    Closing::Pending => self.closed_at = Some(down_total),
                }
            }
            _ => {}
        }
        StreamStep::Continue
    }

    /// Whether RESUMED's restart point is one the agent can resend from.
    fn check_resume(&self, r: &Resumed) -> Result<(), MoveError> {
        let (start, end) = (self.retained.start(), self.retained.end());
        if r.up_from < start || r.up_from > end {
            return Err(MoveError::NotRetained {
                want: r.up_from,
                start,
                end,
            });
        }
        Ok(())
    }

    /// The connection resumed on a new server: restart the downstream checksum where the
    /// destination's check ends, and return what to resend. `from`: the epoch the MIGRATE named
    /// and its origin — in eager mode a fallback until the destination confirms (COMMITTED):
    /// its keeper can hand the state out again if the destination dies first. A restart point
    /// the agent cannot resend from is refused before anything changes.
    pub fn resume(&mut self, r: &Resumed, from: Step) -> Result<Resend, MoveError> {
        self.check_resume(r)?;
        if self.eager {
            self.lineage.moved(from);
            // The live range restarts at our position (where the destination's output log and
            // its idea of our checksum start), and the ranges before it are kept from the
            // destination's restart point: its backups hold that point now, and a later
            // takeover from a replica checks from there.
            self.down.cut_here();
            self.down.retain_from(r.restart_out);
        } else {
            // The destination checked everything up to our position with the origin: the
            // downstream checksum restarts there.
            self.down = DownTracker::new(self.down.received());
        }
        let chunks = self
            .retained
            .chunks_from(r.up_from)
            .map_err(|_| MoveError::NotRetained {
                want: r.up_from,
                start: self.retained.start(),
                end: self.retained.end(),
            })?;
        Ok(Resend {
            chunks,
            up_fin: self.client_eof.then(|| self.retained.end()),
            speak_first: self.eager,
        })
    }
}
