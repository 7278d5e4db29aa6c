//! Watch connections (eager mode, decisions 15 and 45): one TCP connection per agent and
//! server beside the sessions, carrying only heartbeats and hints. The agent opens it with the
//! first WATCH of one of its connections here and adds every further connection it holds here
//! with another WATCH on it; each is checked against its token. Its end tells the agent at once
//! that this process died (while sessions may still deliver what it had written), its silence
//! that it hangs. A HINT for a watched connection goes here too (`WatchHint`), ahead of whatever
//! that connection's session has queued.

use crate::framed::{self, FrameReader};
use crate::registry::ServerInner;
use crate::session_io::refuse;
use crate::stream::{ReadHalf, WriteHalf};
use mtcp_proto::takeover::BAD_TOKEN;
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::Frame;
use mtcp_proto::{Cid, Token};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Serves a watch connection opened by `WATCH{cid, epoch, token}`, until the agent closes it,
/// sends anything but WATCH, or none of its connections has been here for the dead-session
/// bound.
pub(crate) async fn serve(
    inner: &Arc<ServerInner>,
    mut reader: FrameReader<ReadHalf>,
    mut w: WriteHalf,
    cid: Cid,
    epoch: u64,
    token: Token,
) {
    if !inner.cluster.key.check_token(cid, epoch, &token) {
        refuse(&mut w, RefuseCode::BadToken, BAD_TOKEN.into()).await;
        return;
    }
    let (tx, mut hints) = mpsc::unbounded_channel::<Msg>();
    let mut watched = Watched::default();
    watched.add(inner, &tx, cid, epoch);
    let mut gone_since: Option<Instant> = None;
    let mut beat = tokio::time::interval(inner.cluster.heartbeat);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            f = reader.next() => match f {
                Ok(Frame::Msg(Msg::Watch { cid, epoch, token })) => {
                    if inner.cluster.key.check_token(cid, epoch, &token) {
                        watched.add(inner, &tx, cid, epoch);
                    } else {
                        tracing::debug!(%cid, "not watched: {BAD_TOKEN}");
                    }
                }
                // The agent closed it, or sent something it should not have.
                _ => return,
            },
            _ = beat.tick() => {
                // Heartbeats here are never queued behind data: a hung process is seen at once.
                if framed::write_msg(&mut w, &Msg::Heartbeat).await.is_err() {
                    return;
                }
                crate::metrics::heartbeat_sent(true);
            }
            Some(m) = hints.recv() => {
                if framed::write_msg(&mut w, &m).await.is_err() {
                    return;
                }
            }
            _ = check.tick() => {
                watched.sweep(inner, &tx, Instant::now());
                if !watched.0.is_empty() {
                    gone_since = None;
                } else if gone_since.get_or_insert_with(Instant::now).elapsed()
                    > inner.limits.dead_session
                {
                    return;
                }
            }
        }
    }
}

/// How long a connection named on a watch connection may take to appear here (its WATCH can
/// overtake the end of its own setup).
const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// The connections watched on one watch connection: at which epoch, and since when each is
/// awaited if it is not here yet.
#[derive(Default)]
struct Watched(HashMap<Cid, (u64, Option<Instant>)>);

impl Watched {
    /// Adds `cid` at `epoch` (its token checked): its hints go to `tx` from now on, or once it
    /// is here.
    fn add(&mut self, inner: &ServerInner, tx: &mpsc::UnboundedSender<Msg>, cid: Cid, epoch: u64) {
        let waiting = (!attach(inner, tx, cid, epoch)).then(Instant::now);
        self.0.insert(cid, (epoch, waiting));
    }

    /// Attaches connections that appeared, forgets those that left or never came.
    fn sweep(&mut self, inner: &ServerInner, tx: &mpsc::UnboundedSender<Msg>, now: Instant) {
        self.0.retain(|&cid, (epoch, waiting)| match waiting {
            None => here(inner, cid, *epoch),
            Some(since) => {
                if attach(inner, tx, cid, *epoch) {
                    *waiting = None;
                    true
                } else {
                    now.duration_since(*since) < APPEAR_WITHIN
                }
            }
        });
    }
}

fn here(inner: &ServerInner, cid: Cid, epoch: u64) -> bool {
    at_epoch(inner, cid, epoch).is_some()
}

/// Points `cid`'s hints (at `epoch`) at `tx`; false if the connection is not here at that epoch.
fn attach(inner: &ServerInner, tx: &mpsc::UnboundedSender<Msg>, cid: Cid, epoch: u64) -> bool {
    at_epoch(inner, cid, epoch)
        .map(|c| *c.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone()))
        .is_some()
}

/// The connection `cid` if this server serves it at `epoch`.
fn at_epoch(inner: &ServerInner, cid: Cid, epoch: u64) -> Option<Arc<crate::conn_state::Shared>> {
    inner.get(&cid).filter(|c| c.lock().epoch == epoch)
}
