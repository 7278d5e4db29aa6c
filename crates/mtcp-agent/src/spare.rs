//! Spare connections: one TCP connection per server, opened ahead of time and kept fresh, so a
//! migration's MIGRATE goes out at once instead of after a TCP handshake — one client round trip
//! per migration instead of two. A spare carries nothing until it is used; servers close data
//! connections that send no preamble within 5 s, so spares are replaced after [`MAX_AGE`].

use crate::dialer::Dialer;
use mtcp::stream::Stream;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A spare older than this is not used (servers wait 5 s for a preamble)...
pub const MAX_AGE: Duration = Duration::from_secs(3);
/// ... and the keeper replaces it well before, so there always is a usable one.
const REPLACE_AT: Duration = Duration::from_secs(2);
/// How often spares are checked.
const TICK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub(crate) struct Spares {
    /// Servers (data addresses) to keep a spare for, and the spare if there is one.
    by_addr: Mutex<HashMap<String, Option<(Stream, Instant)>>>,
    /// How spares are opened (the socket mark, TLS: a spare's TLS handshake is done ahead too).
    dialer: Mutex<Dialer>,
}

impl Spares {
    /// Keep spares for these servers from now on.
    pub fn want<'a>(&self, addrs: impl IntoIterator<Item = &'a str>) {
        let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        for a in addrs {
            m.entry(a.to_string()).or_insert(None);
        }
    }

    /// A fresh spare to `addr`, if there is one; another is opened at once.
    pub fn take(self: &std::sync::Arc<Self>, addr: &str) -> Option<Stream> {
        let got = {
            let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
            match m.get_mut(addr)?.take() {
                Some((s, at)) if at.elapsed() < MAX_AGE => Some(s),
                _ => None,
            }
        };
        let (this, addr) = (std::sync::Arc::downgrade(self), addr.to_string());
        tokio::spawn(async move { Self::refill(&this, &addr).await });
        got
    }

    /// Opens a spare to `addr` if it has none.
    async fn refill(this: &std::sync::Weak<Spares>, addr: &str) {
        let Some(dialer) = this
            .upgrade()
            .map(|sp| sp.dialer.lock().unwrap_or_else(|p| p.into_inner()).clone())
        else {
            return;
        };
        let s = tokio::time::timeout(Duration::from_secs(1), dialer.dial(addr)).await;
        let Some(sp) = this.upgrade() else { return };
        if let Ok(Ok(s)) = s {
            if let Some(slot @ None) = sp
                .by_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(addr)
            {
                *slot = Some((s, Instant::now()));
            }
        }
    }

    /// Keeps one fresh spare per wanted server, until the agent is gone.
    pub async fn keep(this: std::sync::Weak<Spares>, dialer: Dialer) {
        if let Some(sp) = this.upgrade() {
            *sp.dialer.lock().unwrap_or_else(|p| p.into_inner()) = dialer;
        }
        loop {
            tokio::time::sleep(TICK).await;
            let Some(sp) = this.upgrade() else { return };
            let due: Vec<String> = {
                let mut m = sp.by_addr.lock().unwrap_or_else(|p| p.into_inner());
                m.iter_mut()
                    .filter_map(|(a, s)| {
                        // Replace a spare before the server gives up on it.
                        if s.as_ref().is_some_and(|(_, at)| at.elapsed() >= REPLACE_AT) {
                            *s = None;
                        }
                        s.is_none().then(|| a.clone())
                    })
                    .collect()
            };
            drop(sp);
            for a in due {
                Self::refill(&this, &a).await;
            }
        }
    }
}
