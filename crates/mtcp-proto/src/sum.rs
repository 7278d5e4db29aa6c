//! The downstream checksum: a streaming XXH3-64 over a range of the downstream byte stream.
//!
//! The agent keeps one from its last known snapshot's `out_off`; a destination recomputes it over
//! the origin's output log to prove that what the client really received is what the origin
//! sent, before it lets regenerated output continue the stream.

use xxhash_rust::xxh3::Xxh3;

/// A checksum of stream bytes `[from, from + len)`.
#[derive(Clone)]
pub struct StreamSum {
    from: u64,
    len: u64,
    h: Box<Xxh3>,
}

impl std::fmt::Debug for StreamSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StreamSum[{}..{}]={:016x}",
            self.from,
            self.end(),
            self.value()
        )
    }
}

impl StreamSum {
    pub fn new(from: u64) -> Self {
        Self {
            from,
            len: 0,
            h: Box::new(Xxh3::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
        self.len += bytes.len() as u64;
    }

    pub fn from(&self) -> u64 {
        self.from
    }

    pub fn end(&self) -> u64 {
        self.from + self.len
    }

    pub fn value(&self) -> u64 {
        self.h.digest()
    }

    /// Restarts the sum at `at`.
    pub fn reset(&mut self, at: u64) {
        self.from = at;
        self.len = 0;
        self.h.reset();
    }
}

/// The checksum of a whole slice, as [`StreamSum`] would compute it.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The agent's view of the downstream stream: how much arrived and the checksum since the last
/// snapshot it knows of.
#[derive(Debug, Clone)]
pub struct DownTracker {
    sum: StreamSum,
    /// A snapshot `out_off` announced ahead of the bytes it covers.
    pending: Option<u64>,
}

impl Default for DownTracker {
    fn default() -> Self {
        Self::new(0)
    }
}

impl DownTracker {
    pub fn new(at: u64) -> Self {
        Self {
            sum: StreamSum::new(at),
            pending: None,
        }
    }

    /// Downstream bytes received so far.
    pub fn received(&self) -> u64 {
        self.sum.end()
    }

    pub fn sum_from(&self) -> u64 {
        self.sum.from()
    }

    pub fn sum(&self) -> u64 {
        self.sum.value()
    }

    /// Records bytes delivered to the client program.
    pub fn on_data(&mut self, mut bytes: &[u8]) {
        if let Some(at) = self.pending {
            let upto = at.saturating_sub(self.sum.end()).min(bytes.len() as u64) as usize;
            self.sum.update(&bytes[..upto]);
            bytes = &bytes[upto..];
            if self.sum.end() == at {
                self.sum.reset(at);
                self.pending = None;
            }
        }
        self.sum.update(bytes);
    }

    /// A snapshot at downstream offset `out_off` became safe.
    pub fn on_snap(&mut self, out_off: u64) {
        let end = self.sum.end();
        if out_off == end {
            self.sum.reset(out_off);
            self.pending = None;
        } else if out_off > end {
            self.pending = Some(out_off);
        }
        // out_off < end: the sum already reaches past it; keep the older start, which the
        // server's output log still covers.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn streaming_equals_one_shot(data in proptest::collection::vec(any::<u8>(), 0..5000),
                                     cuts in proptest::collection::vec(0usize..5000, 0..10)) {
            let mut s = StreamSum::new(10);
            let mut cuts = cuts;
            cuts.push(0);
            cuts.push(data.len());
            cuts.iter_mut().for_each(|c| *c = (*c).min(data.len()));
            cuts.sort();
            for w in cuts.windows(2) {
                s.update(&data[w[0]..w[1]]);
            }
            prop_assert_eq!(s.value(), checksum(&data));
            prop_assert_eq!(s.end(), 10 + data.len() as u64);
        }

        #[test]
        fn tracker_sums_from_the_newest_reachable_snapshot(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            snap in 0usize..3000, split in 0usize..3000)
        {
            let snap = snap % (data.len() + 1);
            let split = split % (data.len() + 1);
            let mut t = DownTracker::new(0);
            t.on_data(&data[..split]);
            t.on_snap(snap as u64);
            t.on_data(&data[split..]);
            prop_assert_eq!(t.received(), data.len() as u64);
            let from = t.sum_from() as usize;
            // Either the snapshot was reachable (at or ahead of the bytes) or the sum stays at 0.
            if snap >= split { prop_assert_eq!(from, snap); } else { prop_assert_eq!(from, 0); }
            prop_assert_eq!(t.sum(), checksum(&data[from..]));
        }
    }
}
