//! Session caps on the data port: at most so many sessions in all and from one source address
//! (`Limits::max_sessions`, `max_sessions_per_source`). The newest session over a cap is
//! refused with `Busy` and a reason; sessions already admitted are never touched. The decision
//! is `mtcp_proto::bounds::admit`; this module counts.

use crate::config::Limits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Sessions open in all, and by source address.
type Counts = Mutex<(usize, HashMap<IpAddr, usize>)>;

/// Open sessions, in all and by source address.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_source: Arc<Counts>,
}

/// One admitted session; its count is given back when it is dropped.
pub(crate) struct Slot {
    counts: Arc<Counts>,
    source: IpAddr,
}

impl Sessions {
    /// Admits a session from `source`, or says why not.
    pub(crate) fn admit(&self, l: &Limits, source: IpAddr) -> Result<Slot, String> {
        let mut g = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by) = &mut *g;
        let here = by.get(&source).copied().unwrap_or(0);
        mtcp_proto::bounds::admit(*total, here, l.max_sessions, l.max_sessions_per_source)
            .map_err(|why| format!("{why} (from {source})"))?;
        *total += 1;
        *by.entry(source).or_default() += 1;
        Ok(Slot {
            counts: self.by_source.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = by.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.source);
            }
        }
    }
}
