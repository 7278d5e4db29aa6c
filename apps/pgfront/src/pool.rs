//! Warm backends: a session that ends cleanly (its client said Terminate) or moves away while
//! at rest gives its backend connection back here, reset (`ROLLBACK`, `DISCARD ALL`) and out of
//! the fence registry; the next session with the same startup parameters — a new client, or a
//! session moving in — takes it instead of opening a connection (a process fork, login and
//! catalog warm-up in PostgreSQL: ~3 ms here, and CPU the database then lacks).
//!
//! Safety against the fence: a backend is pooled only after [`Registry::release`] deleted its
//! row. A fence deletes the rows it terminates in the same statement, so exactly one of the two
//! wins the row: a backend a fence claimed is never pooled, and one that is pooled can no longer
//! be claimed. It had rolled back before — or, for a session that moved away between
//! transactions, had no transaction open and is released first and only reset afterwards (the
//! session's task sends it nothing else), so that the destination's fence does not terminate
//! it — and holds nothing of the session it served.
//!
//! [`Registry::release`]: crate::registry::Registry::release

use crate::backend::Backend;
use crate::codec;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a pooled backend may stay idle before it is closed.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// Most time a reset may take before the backend is dropped instead.
const RESET_LIMIT: Duration = Duration::from_secs(2);

/// Startup parameters, sorted: what a backend's session was opened with.
type Key = Vec<(String, String)>;

pub struct Pool {
    max: usize,
    idle: Mutex<HashMap<Key, Vec<(Backend, Instant)>>>,
}

impl Pool {
    /// A pool holding at most `max` idle backends (0: none, every session connects).
    pub fn new(max: usize) -> Self {
        Pool {
            max,
            idle: Mutex::new(HashMap::new()),
        }
    }

    fn key(params: &[(String, String)]) -> Key {
        let mut k = params.to_vec();
        k.sort();
        k
    }

    /// An idle backend opened with `params`, if one is there and still healthy.
    pub fn take(&self, params: &[(String, String)]) -> Option<Backend> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&Self::key(params))?;
        while let Some((mut be, _)) = list.pop() {
            // Anything it sent while idle (an administrator's termination, a timeout) or its
            // end of stream: not usable.
            if be.quiet() {
                return Some(be);
            }
        }
        None
    }

    /// Resets `be` (opened with `params`) and keeps it if `release` (the registry's consent)
    /// says it is no longer registered; otherwise, or on any error, it is closed. The release
    /// comes after the reset, or before it when `release_first`: only for a backend with no
    /// transaction open, whose session sends it nothing but the reset afterwards.
    pub async fn put<F>(
        &self,
        params: &[(String, String)],
        mut be: Backend,
        release: F,
        release_first: bool,
    ) where
        F: std::future::Future<Output = bool>,
    {
        if self.held() >= self.max {
            // Full (or off): no reset and release for a backend that would be dropped.
            let _ = be.send(&codec::terminate()).await;
            return;
        }
        let mut release = std::pin::pin!(release);
        if release_first && !release.as_mut().await {
            let _ = be.send(&codec::terminate()).await;
            return;
        }
        let reset = async {
            // Two queries: DISCARD ALL cannot run inside the implicit transaction of a
            // multi-statement query string.
            be.send(&codec::query("ROLLBACK")).await?;
            be.send(&codec::query("DISCARD ALL")).await?;
            be.collect(2).await
        };
        let ok = matches!(tokio::time::timeout(RESET_LIMIT, reset).await, Ok(Ok(_)));
        if !ok || (!release_first && !release.await) {
            let _ = be.send(&codec::terminate()).await;
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Filled up meanwhile: dropped, the socket closes and the backend exits.
        if held(&idle) < self.max {
            idle.entry(Self::key(params))
                .or_default()
                .push((be, Instant::now()));
        }
    }

    fn held(&self) -> usize {
        held(&self.idle.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Closes backends idle longer than [`IDLE_FOR`]; returns how many are left.
    pub fn expire(&self) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in idle.values_mut() {
            list.retain(|(_, since)| since.elapsed() < IDLE_FOR);
        }
        idle.retain(|_, l| !l.is_empty());
        held(&idle)
    }
}

/// Idle backends in `idle`.
fn held(idle: &HashMap<Key, Vec<(Backend, Instant)>>) -> usize {
    idle.values().map(Vec::len).sum()
}
