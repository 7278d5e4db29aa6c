//! The agent's watch connection to a server (eager mode, decisions 15, 45 and 46): one per
//! server, shared by every connection the agent holds there. The server answers the first WATCH
//! with a HEARTBEAT and beats on it; it hints a connection away with WATCHHINT. What each
//! message, timeout and failure on it means is decided here; the driver keeps the socket.

use crate::wire::Msg;
use crate::Cid;
use std::time::Duration;

use super::ending::ReadFault;

/// Why a server counts as gone (its process died) or hung, seen on its watch connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchGone {
    /// No heartbeat for this long.
    #[error("server silent on its watch connection for {0:?}")]
    Silent(Duration),
    /// The watch connection ended or failed (the text says how).
    #[error("its watch connection ended ({0}): server process gone")]
    Ended(String),
    /// Writing a WATCH on it failed.
    #[error("its watch connection broke: server process gone")]
    WriteFailed,
    /// The server sent something a watch connection never carries (its `Debug` form).
    #[error("unexpected {0} on the watch connection")]
    Unexpected(String),
    /// The server did not answer the opening WATCH within this limit.
    #[error("server silent: its watch connection was not answered within {0:?}")]
    Unanswered(Duration),
}

/// What a message (or a failed read) on an open watch connection means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStep {
    /// A heartbeat: the server lives.
    Alive,
    /// The server hints this connection away: the HINT to handle as if it came on the
    /// connection's session, with no target (the move tries every server in order).
    Hint(Cid, Msg),
    /// The server is gone or hung: every connection on the watch connection moves.
    Gone(WatchGone),
}

/// How the opening of a watch connection went ([`watch_opening`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchOpening {
    /// The server answered HEARTBEAT: the connections are watched.
    Watching,
    /// Nothing is watched: the server does not take the watch (it answered something else), or
    /// the connection failed outright (a process that died closes the sessions too). The
    /// sessions alone tell when the server is gone.
    NotWatched,
    /// The server did not answer in time: it is taken for hung (it may have stopped right after
    /// a connection moved to it, before any of that connection's data), so idle connections on
    /// it still move — their sessions expect nothing (decision 46).
    Gone(WatchGone),
}

/// The first answer to the opening WATCH (or why none came), read within `limit`: only a
/// HEARTBEAT opens the watch.
pub fn watch_opening(first: Result<&Msg, &ReadFault>, limit: Duration) -> WatchOpening {
    match first {
        Ok(Msg::Heartbeat) => WatchOpening::Watching,
        Ok(_) | Err(ReadFault::Failed(_)) => WatchOpening::NotWatched,
        Err(ReadFault::TimedOut) => WatchOpening::Gone(WatchGone::Unanswered(limit)),
    }
}

/// A message (or a failed read) on an open watch connection read with `silence` as its bound:
/// a timeout is the server's silence, any other failure or unexpected message its end.
pub fn watch_msg(m: Result<Msg, ReadFault>, silence: Duration) -> WatchStep {
    match m {
        Ok(Msg::Heartbeat) => WatchStep::Alive,
        Ok(Msg::WatchHint { cid, reason }) => WatchStep::Hint(
            cid,
            Msg::Hint {
                reason,
                target: None,
            },
        ),
        Ok(other) => WatchStep::Gone(WatchGone::Unexpected(format!("{other:?}"))),
        Err(ReadFault::TimedOut) => WatchStep::Gone(WatchGone::Silent(silence)),
        Err(ReadFault::Failed(why)) => WatchStep::Gone(WatchGone::Ended(why)),
    }
}

/// How long a watch connection may stay without a heartbeat before the server counts as hung:
/// three beats, and at least one beat plus two of TCP's minimum retransmission timeouts
/// (200 ms each), so one lost heartbeat — retransmitted after 200 ms, with the beats behind it
/// queued — is never taken for a hang.
pub fn watch_silence(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(heartbeat + Duration::from_millis(400)) + Duration::from_millis(20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HintReason, RefuseCode};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn only_a_heartbeat_opens_the_watch_and_only_a_timeout_while_opening_counts_as_gone() {
        assert_eq!(
            watch_opening(Ok(&Msg::Heartbeat), 500 * MS),
            WatchOpening::Watching
        );
        let refused = Msg::Refused {
            code: RefuseCode::UnknownConnection,
            reason: "no such connection".into(),
        };
        assert_eq!(
            watch_opening(Ok(&refused), 500 * MS),
            WatchOpening::NotWatched
        );
        assert_eq!(
            watch_opening(Ok(&Msg::Pong { t: 1 }), 500 * MS),
            WatchOpening::NotWatched
        );
        assert_eq!(
            watch_opening(
                Err(&ReadFault::Failed("connection refused".into())),
                500 * MS
            ),
            WatchOpening::NotWatched
        );
        let gone = watch_opening(Err(&ReadFault::TimedOut), 500 * MS);
        assert_eq!(gone, WatchOpening::Gone(WatchGone::Unanswered(500 * MS)));
        let WatchOpening::Gone(g) = gone else {
            unreachable!()
        };
        assert_eq!(
            g.to_string(),
            "server silent: its watch connection was not answered within 500ms"
        );
    }

    #[test]
    fn a_heartbeat_keeps_the_watch_and_a_watchhint_becomes_a_hint_with_no_target() {
        let s = 820 * MS;
        assert_eq!(watch_msg(Ok(Msg::Heartbeat), s), WatchStep::Alive);
        let cid = Cid([3; 16]);
        for reason in [HintReason::Drain, HintReason::Overload, HintReason::Balance] {
            assert_eq!(
                watch_msg(Ok(Msg::WatchHint { cid, reason }), s),
                WatchStep::Hint(
                    cid,
                    Msg::Hint {
                        reason,
                        target: None
                    }
                )
            );
        }
    }

    #[test]
    fn on_an_open_watch_a_timeout_is_silence_and_anything_else_means_the_server_is_gone() {
        let s = 820 * MS;
        assert_eq!(
            watch_msg(Err(ReadFault::TimedOut), s),
            WatchStep::Gone(WatchGone::Silent(s))
        );
        let ended = watch_msg(
            Err(ReadFault::Failed("peer closed the connection".into())),
            s,
        );
        let WatchStep::Gone(g) = ended else {
            panic!("{ended:?}")
        };
        assert_eq!(
            g.to_string(),
            "its watch connection ended (peer closed the connection): server process gone"
        );
        assert_eq!(
            watch_msg(Ok(Msg::Pong { t: 9 }), s),
            WatchStep::Gone(WatchGone::Unexpected("Pong { t: 9 }".into()))
        );
        assert_eq!(
            WatchGone::WriteFailed.to_string(),
            "its watch connection broke: server process gone"
        );
    }

    #[test]
    fn a_watch_tolerates_one_lost_heartbeat_and_otherwise_three_beats() {
        // A short beat: one beat plus two minimum retransmission timeouts.
        assert_eq!(watch_silence(100 * MS), 520 * MS);
        // A long one: three beats.
        assert_eq!(watch_silence(1000 * MS), 3020 * MS);
    }
}
