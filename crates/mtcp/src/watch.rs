//! Watch connections (eager mode, decisions 15 and 45): one TCP connection per agent and
//! server beside the sessions, carrying only heartbeats and hints. The agent opens it with the
//! first WATCH of one of its connections here and adds every further connection it holds here
//! with another WATCH on it; each is checked against its token. Its end tells the agent at once
//! that this process died (while sessions may still deliver what it had written), its silence
//! that it hangs. A HINT for a watched connection goes here too (`WatchHint`), ahead of whatever
//! that connection's session has queued.

use crate::framed::{self, FrameReader};
use crate::server::{refuse, ServerInner, BAD_TOKEN};
use crate::stream::{ReadHalf, WriteHalf};
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
    let (tx, mut hints) = mpsc::unbounded_channel::<Msg>();
    // The connections watched here and their epochs (one entry per connection, however often
    // it is named).
    let mut watched: HashMap<Cid, u64> = HashMap::new();
    if let Err((code, why)) = register(inner, &tx, cid, epoch, &token) {
        refuse(&mut w, code, why).await;
        return;
    }
    watched.insert(cid, epoch);
    let mut gone_since: Option<Instant> = None;
    let mut beat = tokio::time::interval(inner.cluster.heartbeat);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            f = reader.next() => match f {
                Ok(Frame::Msg(Msg::Watch { cid, epoch, token })) => {
                    match register(inner, &tx, cid, epoch, &token) {
                        Ok(()) => {
                            watched.insert(cid, epoch);
                        }
                        // It may have moved on since: the agent hears of that on its session.
                        Err((code, why)) => tracing::debug!(%cid, ?code, "not watched: {why}"),
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
                watched.retain(|c, e| inner.get(c).is_some_and(|s| s.lock().epoch == *e));
                if !watched.is_empty() {
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

/// Adds `cid` at `epoch` to the watch connection whose hints go to `tx`.
fn register(
    inner: &ServerInner,
    tx: &mpsc::UnboundedSender<Msg>,
    cid: Cid,
    epoch: u64,
    token: &Token,
) -> Result<(), (RefuseCode, String)> {
    if !inner.cluster.key.check_token(cid, epoch, token) {
        return Err((RefuseCode::BadToken, BAD_TOKEN.into()));
    }
    match inner.get(&cid) {
        Some(c) if c.lock().epoch == epoch => {
            *c.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
            Ok(())
        }
        _ => Err((
            RefuseCode::UnknownConnection,
            format!(
                "server {} does not serve connection {cid} at epoch {epoch}",
                inner.id
            ),
        )),
    }
}
