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

/// A wanted server's spare.
#[derive(Default)]
enum Slot {
    #[default]
    Empty,
    /// One is being opened: a burst of moves that finds the slot empty opens no more (each
    /// extra would be a connect, an accept and a close for nothing).
    Dialing,
    Ready(Stream, Instant),
}

#[derive(Default)]
pub(crate) struct Spares {
    /// Servers (data addresses) to keep a spare for, and their spare.
    by_addr: Mutex<HashMap<String, Slot>>,
    /// How spares are opened (the socket mark, TLS: a spare's TLS handshake is done ahead too).
    dialer: Mutex<Dialer>,
}

impl Spares {
    /// Keep spares for these servers from now on.
    pub fn want<'a>(&self, addrs: impl IntoIterator<Item = &'a str>) {
        let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        for a in addrs {
            m.entry(a.to_string()).or_default();
        }
    }

    /// A fresh spare to `addr`, if there is one; another is opened at once unless one is
    /// being opened already.
    pub fn take(self: &std::sync::Arc<Self>, addr: &str) -> Option<Stream> {
        let got = {
            let mut m = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
            let slot = m.get_mut(addr)?;
            if matches!(slot, Slot::Dialing) {
                return None;
            }
            match std::mem::replace(slot, Slot::Dialing) {
                Slot::Ready(s, at) if at.elapsed() < MAX_AGE => Some(s),
                _ => None,
            }
        };
        let (this, addr) = (std::sync::Arc::downgrade(self), addr.to_string());
        tokio::spawn(async move { Self::refill(&this, &addr).await });
        got
    }

    /// Opens a spare to `addr`, whose slot the caller set to [`Slot::Dialing`].
    async fn refill(this: &std::sync::Weak<Spares>, addr: &str) {
        let Some(dialer) = this
            .upgrade()
            .map(|sp| sp.dialer.lock().unwrap_or_else(|p| p.into_inner()).clone())
        else {
            return;
        };
        let s = tokio::time::timeout(Duration::from_secs(1), dialer.dial(addr)).await;
        let Some(sp) = this.upgrade() else { return };
        let mut m = sp.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot @ Slot::Dialing) = m.get_mut(addr) {
            // A failed dial leaves the slot empty: the keeper tries again on its next tick.
            *slot = match s {
                Ok(Ok(s)) => Slot::Ready(s, Instant::now()),
                _ => Slot::Empty,
            };
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
                        let due = match s {
                            Slot::Empty => true,
                            Slot::Dialing => false,
                            Slot::Ready(_, at) => at.elapsed() >= REPLACE_AT,
                        };
                        due.then(|| {
                            *s = Slot::Dialing;
                            a.clone()
                        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Accepts on a loopback listener for `for_`, counting connections.
    async fn count_accepts(l: tokio::net::TcpListener, for_: Duration) -> usize {
        let mut held = Vec::new();
        let _ = tokio::time::timeout(for_, async {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    held.push(s);
                }
            }
        })
        .await;
        held.len()
    }

    #[tokio::test]
    async fn a_burst_of_takes_opens_one_spare_not_one_each() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let sp = Arc::new(Spares::default());
        sp.want([addr.as_str()]);
        // Twenty moves find no spare at once: one is opened for them all.
        for _ in 0..20 {
            assert!(sp.take(&addr).is_none());
        }
        assert_eq!(count_accepts(l, Duration::from_millis(300)).await, 1);
        // The next move gets it, and one more is opened behind it.
        assert!(sp.take(&addr).is_some());
        assert!(sp.take(&addr).is_none());
        // An unwanted server gets no spare and no dial.
        assert!(sp.take("127.0.0.1:1").is_none());
    }
}
