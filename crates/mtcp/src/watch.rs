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
use mtcp_proto::watch::{Added, Watched, Watching};
use mtcp_proto::wire::{Msg, RefuseCode};
use mtcp_proto::Frame;
use mtcp_proto::{Cid, Token};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Serves a watch connection opened by `WATCH{cid, epoch, token}`, until the agent closes it,
/// sends anything but WATCH, or none of its connections has been here for the dead-session
/// bound. Which connections are watched, and when the watch ends, is
/// [`Watched`](mtcp_proto::watch::Watched)'s; this function only attaches and writes.
pub(crate) async fn serve(
    inner: &Arc<ServerInner>,
    mut reader: FrameReader<ReadHalf>,
    mut w: WriteHalf,
    cid: Cid,
    epoch: u64,
    token: Token,
) {
    let (tx, mut hints) = mpsc::unbounded_channel::<Msg>();
    let mut watched = Watched::new(inner.limits.dead_session);
    let ok = inner.cluster.key.check_token(cid, epoch, &token);
    let first = watched.add(Instant::now(), cid, epoch, ok, || {
        attach(inner, &tx, cid, epoch)
    });
    if first == Added::Refused {
        refuse(&mut w, RefuseCode::BadToken, BAD_TOKEN.into()).await;
        return;
    }
    let mut beat = tokio::time::interval(inner.cluster.heartbeat);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            f = reader.next() => match f {
                Ok(Frame::Msg(Msg::Watch { cid, epoch, token })) => {
                    let ok = inner.cluster.key.check_token(cid, epoch, &token);
                    let added = watched.add(Instant::now(), cid, epoch, ok, || attach(inner, &tx, cid, epoch));
                    if added == Added::Ignored {
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
                let here = |cid, epoch| at_epoch(inner, cid, epoch).is_some();
                let attach = |cid, epoch| attach(inner, &tx, cid, epoch);
                if watched.sweep(Instant::now(), here, attach) == Watching::Close {
                    return;
                }
            }
        }
    }
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
