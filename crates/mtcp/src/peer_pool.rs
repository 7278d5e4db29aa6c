//! Idle authenticated channels to the other servers of the cluster, kept for reuse, and the
//! round-trip estimate towards each.

use crate::framed::{FrameReader, MacWriter};
use crate::stream::{ReadHalf, WriteHalf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// An authenticated peer or admin channel: frames in and out carry MACs.
pub type Channel = (FrameReader<ReadHalf>, MacWriter<WriteHalf>);

/// Idle authenticated channels to other servers, by server id, and the round-trip estimate
/// towards each (time to a peer's immediate first answer).
#[derive(Default)]
pub(crate) struct PeerPool {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Channel>>>,
    rtts: std::sync::Mutex<std::collections::HashMap<String, mtcp_proto::trigger::Rtt>>,
    background: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

/// Background requests (confirmations to keepers) to one peer at once: beyond it they wait
/// their turn. Spawned one per move, a drain's 9 000 of them exhausted the pool and dialled,
/// authenticated and closed a channel for every other move (measured: half an `accept` per
/// eager move at the origin).
const BACKGROUND: usize = 8;

impl PeerPool {
    /// The RTT estimate towards server `id` (empty before the first answer).
    pub(crate) fn rtt(&self, id: &str) -> mtcp_proto::trigger::Rtt {
        self.rtts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or_default()
    }

    /// The turns of background requests to server `id` ([`BACKGROUND`] at once).
    pub(crate) fn background(&self, id: &str) -> Arc<Semaphore> {
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(BACKGROUND)))
            .clone()
    }

    pub(crate) fn sample(&self, id: &str, d: Duration) {
        self.rtts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .sample(d);
    }

    /// Channels kept per peer: as many as takeovers may run at once, so a burst of moves (a
    /// drain) reuses its channels instead of opening and authenticating one per move.
    const MAX_IDLE: usize = mtcp_proto::bounds::MAX_TAKEOVERS;

    pub(crate) fn take(&self, id: &str) -> Option<Channel> {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)?
            .pop()
    }

    pub(crate) fn put(&self, id: &str, ch: Channel) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let v = idle.entry(id.to_string()).or_default();
        if v.len() < Self::MAX_IDLE {
            v.push(ch);
        }
    }
}
