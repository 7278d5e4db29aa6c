//! Byte-offset bookkeeping: a log of a stream's bytes by absolute offset (the agent's upstream
//! retention, the server's output log) and the destination's replay verifier, which decides for
//! each byte a restarted application writes whether to compare it, skip it or send it.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// Errors of offset arithmetic; each means the two ends disagree about a stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffsetError {
    #[error("offset {off} is outside the retained range [{start}, {end})")]
    OutOfRange { off: u64, start: u64, end: u64 },
}

/// The bytes of a stream from `start()` to `end()`, held as shared chunks (no copies on push).
#[derive(Debug, Clone, Default)]
pub struct ByteLog {
    start: u64,
    len: u64,
    chunks: VecDeque<Bytes>,
}

impl ByteLog {
    pub fn new(start: u64) -> Self {
        Self { start, len: 0, chunks: VecDeque::new() }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes at `end()`.
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len() as u64;
            self.chunks.push_back(b);
        }
    }

    /// Forgets bytes below `off` (no-op for offsets at or below `start()`; clamps at `end()`).
    pub fn trim_to(&mut self, off: u64) {
        let off = off.min(self.end());
        while off > self.start {
            let front = self.chunks.front_mut().expect("len > 0 while start < end");
            let drop = (off - self.start).min(front.len() as u64) as usize;
            if drop == front.len() {
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(drop);
            }
            self.start += drop as u64;
            self.len -= drop as u64;
        }
    }

    /// The chunks covering `[from, end())`, sharing memory with the log.
    pub fn chunks_from(&self, from: u64) -> Result<Vec<Bytes>, OffsetError> {
        self.check(from)?;
        let mut skip = from - self.start;
        let mut out = Vec::new();
        for c in &self.chunks {
            let l = c.len() as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            out.push(c.slice(skip as usize..));
            skip = 0;
        }
        Ok(out)
    }

    /// A contiguous copy of `[from, to)`.
    pub fn copy_range(&self, from: u64, to: u64) -> Result<Bytes, OffsetError> {
        self.check(from)?;
        self.check(to)?;
        let mut out = BytesMut::with_capacity(to.saturating_sub(from) as usize);
        let mut pos = self.start;
        for c in &self.chunks {
            let (cs, ce) = (pos, pos + c.len() as u64);
            pos = ce;
            if ce <= from {
                continue;
            }
            if cs >= to {
                break;
            }
            let a = from.max(cs) - cs;
            let b = to.min(ce) - cs;
            out.extend_from_slice(&c[a as usize..b as usize]);
        }
        Ok(out.freeze())
    }

    /// Copies bytes starting at `off` into `dst`; returns how many (0 at or past `end()`).
    pub fn read_at(&self, off: u64, dst: &mut [u8]) -> usize {
        if off < self.start || off >= self.end() {
            return 0;
        }
        let mut skip = off - self.start;
        let mut n = 0;
        for c in &self.chunks {
            let l = c.len() as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            let src = &c[skip as usize..];
            let k = src.len().min(dst.len() - n);
            dst[n..n + k].copy_from_slice(&src[..k]);
            n += k;
            skip = 0;
            if n == dst.len() {
                break;
            }
        }
        n
    }

    /// Forgets bytes at and above `off` (no-op at or past `end()`; clamps at `start()`).
    pub fn truncate_end(&mut self, off: u64) {
        let off = off.max(self.start);
        while self.end() > off {
            let excess = self.end() - off;
            let back = self.chunks.back_mut().expect("len > 0 while end > start");
            let drop = excess.min(back.len() as u64) as usize;
            if drop == back.len() {
                self.chunks.pop_back();
            } else {
                back.truncate(back.len() - drop);
            }
            self.len -= drop as u64;
        }
    }

    fn check(&self, off: u64) -> Result<(), OffsetError> {
        if off < self.start || off > self.end() {
            return Err(OffsetError::OutOfRange { off, start: self.start, end: self.end() });
        }
        Ok(())
    }
}

/// The regenerated output differs from what the origin wrote.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("divergence at downstream offset {offset}: the restarted application wrote different bytes than the origin")]
pub struct Divergence {
    pub offset: u64,
}

/// Decides, at a destination, what happens to each byte the restarted application writes.
///
/// The application restarts at `snap_out`. Bytes below `origin_end` were written by the origin
/// too and are compared with its output log (any difference is a [`Divergence`]); bytes below
/// `down_recv` are already at the client and are not sent.
#[derive(Debug, Clone)]
pub struct ReplayVerifier {
    pos: u64,
    down_recv: u64,
    log: ByteLog,
}

impl ReplayVerifier {
    /// `log` is the origin's output log; it must cover `[min(down_recv, snap_out), end)` with
    /// `down_recv <= log.end()`.
    pub fn new(snap_out: u64, down_recv: u64, log: ByteLog) -> Result<Self, OffsetError> {
        log.check(snap_out)?;
        log.check(down_recv)?;
        log.check(down_recv.min(snap_out))?;
        Ok(Self { pos: snap_out, down_recv, log })
    }

    /// Output-log bytes the client lacks that come before the restart point: send these first.
    pub fn tail_to_send(&self) -> Result<Bytes, OffsetError> {
        if self.down_recv < self.pos {
            self.log.copy_range(self.down_recv, self.pos)
        } else {
            Ok(Bytes::new())
        }
    }

    /// Next offset the application will write.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether every byte the origin wrote has been regenerated and checked.
    pub fn done(&self) -> bool {
        self.pos >= self.log.end()
    }

    /// The application wrote `data` at `position()`: checks the part the origin also wrote and
    /// returns the part to send to the client.
    pub fn on_write(&mut self, data: Bytes) -> Result<Bytes, Divergence> {
        let start = self.pos;
        let end = start + data.len() as u64;
        let check_end = end.min(self.log.end());
        if check_end > start {
            let theirs = self
                .log
                .copy_range(start, check_end)
                .expect("start >= snap_out >= log.start and check_end <= log.end");
            let ours = &data[..(check_end - start) as usize];
            if let Some(i) = ours.iter().zip(theirs.iter()).position(|(a, b)| a != b) {
                return Err(Divergence { offset: start + i as u64 });
            }
            // Compared bytes are no longer needed.
            self.log.trim_to(check_end.min(self.down_recv.max(start)));
        }
        self.pos = end;
        let send_from = self.down_recv.clamp(start, end);
        Ok(data.slice((send_from - start) as usize..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_of(start: u64, data: &[u8], chunk: usize) -> ByteLog {
        let mut l = ByteLog::new(start);
        for c in data.chunks(chunk.max(1)) {
            l.push(Bytes::copy_from_slice(c));
        }
        l
    }

    proptest! {
        #[test]
        fn byte_log_ranges_match_a_flat_copy(data in proptest::collection::vec(any::<u8>(), 0..2000),
                                            chunk in 1usize..300, start in 0u64..1<<50,
                                            trim in 0usize..2000, a in 0usize..2000, b in 0usize..2000) {
            let mut l = log_of(start, &data, chunk);
            prop_assert_eq!(l.end(), start + data.len() as u64);
            let trim = trim.min(data.len());
            l.trim_to(start + trim as u64);
            prop_assert_eq!(l.start(), start + trim as u64);
            let (a, b) = (a.clamp(trim, data.len()), b.clamp(trim, data.len()));
            let (a, b) = (a.min(b), a.max(b));
            prop_assert_eq!(&l.copy_range(start + a as u64, start + b as u64).unwrap()[..], &data[a..b]);
            let joined: Vec<u8> = l.chunks_from(start + a as u64).unwrap().concat();
            prop_assert_eq!(&joined[..], &data[a..]);
            prop_assert!(l.copy_range(start + trim as u64 - (trim > 0) as u64, l.end()).is_err() || trim == 0);
            prop_assert!(l.chunks_from(l.end() + 1).is_err());
            let mut dst = vec![0u8; b - a];
            prop_assert_eq!(l.read_at(start + a as u64, &mut dst), b - a);
            prop_assert_eq!(&dst[..], &data[a..b]);
            let mut t = l.clone();
            t.truncate_end(start + b as u64);
            prop_assert_eq!(t.end(), start + b.max(trim) as u64);
            prop_assert_eq!(&t.copy_range(t.start(), t.end()).unwrap()[..], &data[trim..b.max(trim)]);
        }

        /// Whatever the restart point and the client's position, a deterministic application's
        /// regenerated output turns into exactly the bytes the client lacks, in order.
        #[test]
        fn replay_delivers_exactly_the_missing_suffix(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            out_start in 0usize..3000, snap in 0usize..3000, recv in 0usize..3000,
            origin_end in 0usize..3000, extra in 0usize..500, wchunk in 1usize..400)
        {
            // Offsets: out_start <= min(recv, snap), snap, recv <= origin_end <= data.len()
            let origin_end = origin_end % (data.len() + 1);
            let snap = snap % (origin_end + 1);
            let recv = recv % (origin_end + 1);
            let out_start = out_start % (snap.min(recv) + 1);
            let log = log_of(0, &data[..origin_end], 97);
            let mut log = log;
            log.trim_to(out_start as u64);
            let mut v = ReplayVerifier::new(snap as u64, recv as u64, log).unwrap();
            let mut client: Vec<u8> = data[..recv].to_vec();
            client.extend_from_slice(&v.tail_to_send().unwrap());
            let total = (origin_end + extra).min(data.len());
            let mut pos = snap;
            while pos < total {
                let e = (pos + wchunk).min(total);
                client.extend_from_slice(&v.on_write(Bytes::copy_from_slice(&data[pos..e])).unwrap());
                pos = e;
            }
            prop_assert_eq!(&client[..], &data[..total.max(recv)]);
        }

        #[test]
        fn replay_catches_any_changed_byte(data in proptest::collection::vec(any::<u8>(), 1..1000),
                                           snap in 0usize..1000, flip in 0usize..1000) {
            let snap = snap % data.len();
            let flip = snap + flip % (data.len() - snap);
            let mut v = ReplayVerifier::new(snap as u64, data.len() as u64, log_of(0, &data, 50)).unwrap();
            let mut changed = data[snap..].to_vec();
            changed[flip - snap] ^= 0x55;
            prop_assert_eq!(v.on_write(Bytes::from(changed)), Err(Divergence { offset: flip as u64 }));
        }
    }

    #[test]
    fn verifier_rejects_logs_that_do_not_cover() {
        let mut l = log_of(0, b"hello world", 3);
        l.trim_to(5);
        assert!(ReplayVerifier::new(3, 8, l.clone()).is_err(), "snapshot before log");
        assert!(ReplayVerifier::new(6, 12, l.clone()).is_err(), "client ahead of origin");
        assert!(ReplayVerifier::new(6, 4, l).is_err(), "client behind the log");
    }
}
