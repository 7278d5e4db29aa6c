//! Eager mode: one watch connection per server, shared by every connection the agent holds
//! there (decisions 15 and 45; issue 13: liveness watching per agent–server pair, not per
//! connection). The first connection's `WATCH` opens it; every later one is added with another
//! `WATCH` on it. Its end (the server process died) or its silence (it hangs) ends every
//! connection's [`Watch`] with [`WatchEnd::Gone`]; a `WatchHint` ends that connection's with
//! [`WatchEnd::Hint`]. The connection to the server closes when the last [`Watch`] on it is
//! dropped.

use crate::channel::{connect, fault};
use crate::dialer::Dialer;
use mtcp_proto::agent::{
    watch_msg, watch_opening, watch_silence, WatchGone, WatchOpening, WatchStep,
};
use mtcp_proto::wire::Msg;
use mtcp_proto::{Cid, Token};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Why a connection's watch ended.
pub(crate) enum WatchEnd {
    /// The server process is gone or hung.
    Gone(WatchGone),
    /// The server hinted the connection away (drain, overload): the HINT came on the watch
    /// connection, where no data is queued ahead of it.
    Hint(Msg),
}

/// One connection's place on its server's watch connection; dropping it takes it off.
pub(crate) struct Watch {
    pub ended: oneshot::Receiver<WatchEnd>,
    pair: Arc<Pair>,
    cid: Cid,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut conns = self.pair.lock();
        // A newer watch of the same connection (a session replacing this one) stays.
        if conns.get(&self.cid).is_some_and(|(id, _)| *id == self.id) {
            conns.remove(&self.cid);
        }
    }
}

/// A connection's entry on a watch connection: which [`Watch`] it is, and how to tell it.
type Entry = (u64, oneshot::Sender<WatchEnd>);

/// The watch connection to one server.
struct Pair {
    /// The connections on it, told when it ends.
    conns: Mutex<HashMap<Cid, Entry>>,
    /// WATCHes to write on it.
    add: mpsc::UnboundedSender<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl Pair {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Cid, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent's watch connections, by server data address.
#[derive(Default)]
pub(crate) struct Watches {
    pairs: Mutex<HashMap<String, Weak<Pair>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Watches {
    /// Puts the connection `cid` at `epoch` on the watch connection to the server at `addr`,
    /// opening it if there is none (or the last one ended).
    #[allow(clippy::too_many_arguments)]
    pub fn watch(
        &self,
        addr: &str,
        cid: Cid,
        epoch: u64,
        token: Token,
        limit: Duration,
        heartbeat: Duration,
        dialer: Dialer,
    ) -> Watch {
        let (tx, ended) = oneshot::channel();
        let m = Msg::Watch { cid, epoch, token };
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        let pair = match pairs.get(addr).and_then(Weak::upgrade) {
            Some(p) if !p.task.is_finished() => p,
            _ => {
                let p = open(addr.to_string(), limit, heartbeat, dialer);
                pairs.insert(addr.to_string(), Arc::downgrade(&p));
                p
            }
        };
        // Forget servers no connection uses any more.
        pairs.retain(|_, p| p.strong_count() > 0);
        drop(pairs);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pair.lock().insert(cid, (id, tx));
        let _ = pair.add.send(m);
        Watch {
            ended,
            pair,
            cid,
            id,
        }
    }
}

/// Starts the task that opens and reads the watch connection to `addr`.
fn open(addr: String, limit: Duration, heartbeat: Duration, dialer: Dialer) -> Arc<Pair> {
    let (add, add_rx) = mpsc::unbounded_channel();
    Arc::new_cyclic(|me: &Weak<Pair>| {
        let me = me.clone();
        let task = tokio::spawn(async move {
            let why = run(&addr, limit, watch_silence(heartbeat), &dialer, add_rx, &me).await;
            // None: no watch could be opened. The sessions alone tell when the server is gone;
            // the connections on this one keep their senders, so none takes this for a death,
            // and the next connection to this server tries to open a new one.
            if let Some(why) = why {
                tracing::info!(server = %addr, "watch connection: {why}");
                if let Some(p) = me.upgrade() {
                    for (_, (_, tx)) in p.lock().drain() {
                        let _ = tx.send(WatchEnd::Gone(why.clone()));
                    }
                }
            }
        });
        Pair {
            conns: Mutex::new(HashMap::new()),
            add,
            task,
        }
    })
}

/// Reads the watch connection until it ends: `Some(why)` when the server is gone or hung,
/// `None` when no watch could be opened. What each answer, timeout and failure means is the
/// core's ([`watch_opening`], [`watch_msg`]).
async fn run(
    addr: &str,
    limit: Duration,
    silence: Duration,
    dialer: &Dialer,
    mut add: mpsc::UnboundedReceiver<Msg>,
    me: &Weak<Pair>,
) -> Option<WatchGone> {
    let first = add.recv().await?;
    let opened = match connect(addr, limit, &first, dialer).await {
        Ok((mut r, w)) => r.next_msg(limit).await.map(|m| (m, r, w)),
        Err(e) => Err(e),
    };
    let (mut r, mut w) = match opened {
        Ok((m, r, w)) => match watch_opening(Ok(&m), limit) {
            WatchOpening::Watching => (r, w),
            _ => {
                tracing::debug!(server = %addr, "watch not accepted: {m:?}");
                return None;
            }
        },
        Err(e) => {
            let shown = e.to_string();
            return match watch_opening(Err(&fault(e)), limit) {
                WatchOpening::Gone(why) => Some(why),
                _ => {
                    tracing::debug!(server = %addr, "cannot open a watch connection: {shown}");
                    None
                }
            };
        }
    };
    loop {
        tokio::select! {
            m = add.recv() => {
                let m = m?;
                if mtcp::framed::write_msg(&mut w, &m).await.is_err() {
                    return Some(WatchGone::WriteFailed);
                }
            }
            m = r.next_msg(silence) => match watch_msg(m.map_err(fault), silence) {
                WatchStep::Alive => {}
                WatchStep::Hint(cid, hint) => {
                    let tx = me.upgrade().and_then(|p| p.lock().remove(&cid));
                    if let Some((_, tx)) = tx {
                        let _ = tx.send(WatchEnd::Hint(hint));
                    }
                }
                WatchStep::Gone(why) => return Some(why),
            }
        }
    }
}
