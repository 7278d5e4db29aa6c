//! Byte-offset bookkeeping: a log of a stream's bytes by absolute offset (the agent's upstream
//! retention, the server's output log) and the destination's replay verifier, which decides for
//! each byte a restarted application writes whether to compare it, skip it or send it.

use crate::record::Check;
use crate::sum::StreamSum;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::hash::Hasher;
use twox_hash::XxHash3_64;

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
        Self {
            start,
            len: 0,
            chunks: VecDeque::new(),
        }
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

    /// Passes the log's bytes `[from, to)` to `f`, in order, in the pieces they are stored in
    /// (no copy).
    pub fn visit_range(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), OffsetError> {
        self.check(from)?;
        self.check(to)?;
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
            f(&c[a as usize..b as usize]);
        }
        Ok(())
    }

    /// A contiguous copy of `[from, to)`.
    pub fn copy_range(&self, from: u64, to: u64) -> Result<Bytes, OffsetError> {
        let mut out = BytesMut::with_capacity(to.saturating_sub(from) as usize);
        self.visit_range(from, to, |b| out.extend_from_slice(b))?;
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
            return Err(OffsetError::OutOfRange {
                off,
                start: self.start,
                end: self.end(),
            });
        }
        Ok(())
    }
}

/// The regenerated output differs from what the client received.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("divergence in downstream bytes [{from}, {to}): the restarted application wrote different bytes than the client received")]
pub struct Divergence {
    pub from: u64,
    pub to: u64,
}

/// Decides, at a destination, what happens to each byte the restarted application writes.
///
/// The application restarts at `snap_out`; the client already holds the bytes up to the last
/// check's `end`. Regenerated bytes below that are not sent: they are checksummed range by
/// range, and every range's checksum must equal what the client received there before any byte
/// past the last range goes out.
#[derive(Debug, Clone)]
pub struct ReplayVerifier {
    pos: u64,
    start: u64,
    checks: Vec<Check>,
    /// The range being summed now.
    idx: usize,
    sum: StreamSum,
}

impl ReplayVerifier {
    /// `checks` must be consecutive ranges after `snap_out` (as a validated
    /// [`crate::StateRecord`] has them).
    pub fn new(snap_out: u64, checks: Vec<Check>) -> Self {
        Self {
            pos: snap_out,
            start: snap_out,
            checks,
            idx: 0,
            sum: StreamSum::new(snap_out),
        }
    }

    /// Next offset the application will write.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Where the bytes the client already has end.
    pub fn check_end(&self) -> u64 {
        self.checks.last().map_or(self.start, |c| c.end)
    }

    /// Whether every regenerated byte the client already had has been checked.
    pub fn done(&self) -> bool {
        self.pos >= self.check_end()
    }

    /// Where the checks start and the checks (handed on whole if the connection moves again
    /// before they are complete).
    pub fn expected(&self) -> (u64, &[Check]) {
        (self.start, &self.checks)
    }

    /// The application wrote `data` at `position()`: checks the part the client already has and
    /// returns the part to send.
    pub fn on_write(&mut self, data: Bytes) -> Result<Bytes, Divergence> {
        let skip = self.check_write(&data)?;
        Ok(data.slice(skip..))
    }

    /// Like [`ReplayVerifier::on_write`], but returns how many leading bytes of `data` the client
    /// already has (checked, not to be sent).
    pub fn check_write(&mut self, data: &[u8]) -> Result<usize, Divergence> {
        let start = self.pos;
        let end = start + data.len() as u64;
        let mut p = start;
        while let Some(c) = self.checks.get(self.idx).copied() {
            let upto = c.end.min(end);
            if upto > p {
                self.sum
                    .update(&data[(p - start) as usize..(upto - start) as usize]);
                p = upto;
            }
            if p < c.end {
                break;
            }
            if self.sum.value() != c.sum {
                return Err(Divergence {
                    from: self.sum.from(),
                    to: c.end,
                });
            }
            self.sum.reset(c.end);
            self.idx += 1;
        }
        self.pos = end;
        let send_from = self.check_end().clamp(start, end);
        Ok((send_from - start) as usize)
    }
}

/// The checksum of bytes `[from, to)` of `log`, hashed where they lie (the same value as
/// [`checksum`](crate::sum::checksum) of a copy of them).
pub fn log_checksum(log: &ByteLog, from: u64, to: u64) -> Result<u64, OffsetError> {
    let mut h = XxHash3_64::with_seed(0);
    log.visit_range(from, to, |b| h.write(b))?;
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sum::checksum;
    use crate::sum::tests::bounds;
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
            snap in 0usize..3000, recv in 0usize..3000, wchunk in 1usize..400)
        {
            let snap = snap % (data.len() + 1);
            let recv = recv % (data.len() + 1);
            // The origin ships the tail below the snapshot, or a checksum above it.
            let (check_end, tail) = if recv < snap { (snap, &data[recv..snap]) } else { (recv, &data[..0]) };
            let checks = if check_end > snap { vec![Check { end: check_end as u64, sum: checksum(&data[snap..check_end]) }] } else { vec![] };
            let mut v = ReplayVerifier::new(snap as u64, checks);
            let mut client: Vec<u8> = data[..recv].to_vec();
            client.extend_from_slice(tail);
            let mut pos = snap;
            while pos < data.len() {
                let e = (pos + wchunk).min(data.len());
                client.extend_from_slice(&v.on_write(Bytes::copy_from_slice(&data[pos..e])).unwrap());
                pos = e;
            }
            prop_assert!(v.done());
            prop_assert_eq!(&client[..], &data[..]);
        }

        #[test]
        fn replay_catches_any_changed_byte_and_sends_nothing_past_it(
            data in proptest::collection::vec(any::<u8>(), 2..1000),
            snap in 0usize..1000, flip in 0usize..1000, wchunk in 1usize..300)
        {
            let snap = snap % (data.len() - 1);
            let recv = data.len() - 1;
            let flip = snap + flip % (recv - snap);
            // The client's checksums come in ranges cut at arbitrary points.
            let cut = snap + 1 + (flip * 7) % (recv - snap);
            let mut checks = vec![Check { end: cut as u64, sum: checksum(&data[snap..cut]) }];
            if cut < recv {
                checks.push(Check { end: recv as u64, sum: checksum(&data[cut..recv]) });
            }
            let mut v = ReplayVerifier::new(snap as u64, checks);
            let mut changed = data.clone();
            changed[flip] ^= 0x55;
            let mut pos = snap;
            let mut failed = false;
            while pos < changed.len() {
                let e = (pos + wchunk).min(changed.len());
                match v.on_write(Bytes::copy_from_slice(&changed[pos..e])) {
                    Ok(sent) => prop_assert!(sent.is_empty(), "sent bytes before the check completed"),
                    Err(d) => {
                        let range = if flip < cut { (snap, cut) } else { (cut, recv) };
                        prop_assert_eq!(d, Divergence { from: range.0 as u64, to: range.1 as u64 });
                        failed = true;
                        break;
                    }
                }
                pos = e;
            }
            prop_assert!(failed);
        }
    }

    proptest! {
        #[test]
        fn a_log_range_sums_as_its_copy(data in proptest::collection::vec(any::<u8>(), 0..5000),
                                        cuts in proptest::collection::vec(0usize..5000, 0..10),
                                        a in 0usize..5000, b in 0usize..5000, trim in 0usize..5000) {
            // The log starts at 100, holds `data` in the pieces `cuts` make, and has its first
            // `trim` bytes dropped; any range inside sums as a copy of it does.
            let mut log = ByteLog::new(100);
            let cuts = bounds(cuts, data.len());
            for w in cuts.windows(2) {
                log.push(bytes::Bytes::copy_from_slice(&data[w[0]..w[1]]));
            }
            let trim = trim % (data.len() + 1);
            log.trim_to(100 + trim as u64);
            let (mut a, mut b) = (trim + a % (data.len() - trim + 1), trim + b % (data.len() - trim + 1));
            if a > b {
                std::mem::swap(&mut a, &mut b);
            }
            prop_assert_eq!(log_checksum(&log, 100 + a as u64, 100 + b as u64).unwrap(), checksum(&data[a..b]));
            prop_assert!(log_checksum(&log, 100 + data.len() as u64 + 1, 100 + data.len() as u64 + 1).is_err());
            if trim > 0 {
                prop_assert!(log_checksum(&log, 99 + trim as u64, 100 + b as u64).is_err());
            }
        }
    }
}
