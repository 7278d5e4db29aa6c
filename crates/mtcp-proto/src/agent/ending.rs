//! How a session ends, the same for both agent drivers (the relay and the kernel fast path):
//! the server's CLOSED ([`on_closed`]), and a session that stops carrying the connection
//! without one ([`on_session_error`]: the connection moves, or it had ended in order).

use super::watch::WatchGone;
use super::MoveReason;
use std::time::Duration;

/// How a read on a channel to a server failed, as the agent's rules tell failures apart (the
/// drivers map their I/O errors to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFault {
    /// Nothing came within the read's time bound.
    TimedOut,
    /// The read failed, or the channel ended without an M-TCP close (EOF, reset, bad frame):
    /// the text says which.
    Failed(String),
}

/// Why a session stopped carrying the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionFault {
    /// The server said nothing (no byte, heartbeat or pong) for this bound.
    Silent(Duration),
    /// Reading the session failed, or it ended without an M-TCP close.
    Read(String),
    /// Writing to the session failed.
    Write,
    /// The server's watch connection says the server process is gone or hung (eager mode).
    Watch(WatchGone),
}

impl SessionFault {
    /// A read bounded by `bound` failed: a timeout is the server's silence.
    pub fn read(fault: ReadFault, bound: Duration) -> Self {
        match fault {
            ReadFault::TimedOut => SessionFault::Silent(bound),
            ReadFault::Failed(why) => SessionFault::Read(why),
        }
    }
}

/// What a session's fault leaves the connection with ([`on_session_error`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFault {
    /// The server had closed the stream and every byte of it arrived: deliver what is pending
    /// and end the connection in order.
    Done,
    /// Move the connection, for this reason.
    Move(MoveReason),
}

/// The session with `server` stopped with `fault`; the server said the stream ends at
/// `closed_at` (CLOSED) if it did, and `arrived` downstream bytes came, those not yet delivered
/// included. The one rule of both drivers: a session read that ends once every byte up to the
/// close arrived is the server's orderly end; anything else moves the connection, named as a
/// silence or as a broken session (a failed write, the watch connection's end, a read that ends
/// short). The fast path sees no bytes and ends at CLOSED itself ([`on_closed`]), so it passes
/// no close.
pub fn on_session_error(
    server: &str,
    fault: SessionFault,
    closed_at: Option<u64>,
    arrived: u64,
) -> AfterFault {
    match fault {
        SessionFault::Read(_) if closed_at.is_some_and(|t| arrived >= t) => AfterFault::Done,
        SessionFault::Silent(bound) => AfterFault::Move(MoveReason::silence(bound)),
        SessionFault::Read(why) => AfterFault::Move(MoveReason::session_broke(server, why)),
        SessionFault::Write => AfterFault::Move(MoveReason::session_broke(server, "write failed")),
        SessionFault::Watch(gone) => AfterFault::Move(MoveReason::session_broke(server, gone)),
    }
}

/// What the server's CLOSED{down_total} means for the connection ([`on_closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Every byte up to the close was delivered: end in order.
    Done,
    /// Bytes before the close are still on their way: end once they are delivered.
    Pending,
    /// The close is behind what was already delivered: the server contradicts the client.
    Short,
}

/// The server closed the stream at `down_total`; the agent delivered `delivered` downstream
/// bytes (the relay), or sees none of them (`None`: the fast path, where the kernel's socket
/// carries every byte from the server to the client, so the close ends the connection now).
pub fn on_closed(down_total: u64, delivered: Option<u64>) -> Closing {
    match delivered {
        None => Closing::Done,
        Some(d) if down_total < d => Closing::Short,
        Some(d) if down_total == d => Closing::Done,
        Some(_) => Closing::Pending,
    }
}

/// What a connection does after a move of it failed (every candidate refused or silent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailedMove {
    /// It stays on its server, on the session it had (the fast path KICKs the fenced flow
    /// there); if that session cannot be written either, it is given up.
    Stay,
    /// It is given up: the client's connection is ended.
    GiveUp,
}

/// After a failed move: a connection stays where it was only if its old session is still
/// open — the fast path keeps it through a move unless the session broke, while the relay
/// said LEAVING on it before the MIGRATE (its server detached the connection) and so has no
/// session to stay on.
pub fn after_failed_move(session_kept: bool) -> AfterFailedMove {
    match session_kept {
        true => AfterFailedMove::Stay,
        false => AfterFailedMove::GiveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::MoveCause;

    const MS: Duration = Duration::from_millis(1);

    fn cause(a: AfterFault) -> Option<MoveCause> {
        match a {
            AfterFault::Done => None,
            AfterFault::Move(r) => Some(r.cause),
        }
    }

    #[test]
    fn a_session_that_ends_once_everything_up_to_the_close_arrived_ended_in_order() {
        let eof = || SessionFault::Read("peer closed the connection".into());
        assert_eq!(
            on_session_error("s1", eof(), Some(10), 10),
            AfterFault::Done
        );
        assert_eq!(on_session_error("s1", eof(), Some(0), 0), AfterFault::Done);
        // Short of the close, or with no close at all: the session broke.
        assert_eq!(
            on_session_error("s1", eof(), Some(10), 9),
            AfterFault::Move(MoveReason::session_broke(
                "s1",
                "peer closed the connection"
            ))
        );
        assert_eq!(
            cause(on_session_error("s1", eof(), None, 1 << 20)),
            Some(MoveCause::SessionBroke)
        );
    }

    #[test]
    fn silence_a_failed_write_or_the_watch_moves_the_connection_even_after_the_close() {
        let all = |f| on_session_error("s2", f, Some(4), 4);
        assert_eq!(
            all(SessionFault::Silent(1400 * MS)),
            AfterFault::Move(MoveReason::silence(1400 * MS))
        );
        assert_eq!(
            all(SessionFault::Write),
            AfterFault::Move(MoveReason::session_broke("s2", "write failed"))
        );
        let gone = WatchGone::Silent(900 * MS);
        assert_eq!(
            all(SessionFault::Watch(gone.clone())),
            AfterFault::Move(MoveReason::session_broke("s2", &gone))
        );
        assert_eq!(
            all(SessionFault::Watch(gone)),
            AfterFault::Move(MoveReason::new(
                MoveCause::SessionBroke,
                "session with s2 broke: server silent on its watch connection for 900ms"
            ))
        );
    }

    #[test]
    fn a_read_that_times_out_is_the_servers_silence_and_any_other_failure_a_broken_session() {
        assert_eq!(
            SessionFault::read(ReadFault::TimedOut, 700 * MS),
            SessionFault::Silent(700 * MS)
        );
        assert_eq!(
            SessionFault::read(ReadFault::Failed("i/o: reset".into()), 700 * MS),
            SessionFault::Read("i/o: reset".into())
        );
        // The fast path passes no close: its timeout and its reset read as the relay's would.
        let f = SessionFault::read(ReadFault::TimedOut, 700 * MS);
        assert_eq!(
            cause(on_session_error("s1", f, None, 0)),
            Some(MoveCause::Silence)
        );
        let f = SessionFault::read(ReadFault::Failed("i/o: reset".into()), 700 * MS);
        assert_eq!(
            on_session_error("s1", f, None, 0),
            AfterFault::Move(MoveReason::session_broke("s1", "i/o: reset"))
        );
    }

    #[test]
    fn closed_ends_the_fast_path_at_once_and_the_relay_once_every_byte_was_delivered() {
        for total in [0, 7, u64::MAX] {
            assert_eq!(on_closed(total, None), Closing::Done, "fast path, {total}");
        }
        assert_eq!(on_closed(6, Some(6)), Closing::Done);
        assert_eq!(on_closed(6, Some(4)), Closing::Pending);
        assert_eq!(on_closed(3, Some(4)), Closing::Short);
    }

    #[test]
    fn a_failed_move_keeps_the_connection_only_on_a_session_still_open() {
        // Fast path, session intact: stays and is kicked.
        assert_eq!(after_failed_move(true), AfterFailedMove::Stay);
        // Fast path with a broken session, or the relay after LEAVING: given up.
        assert_eq!(after_failed_move(false), AfterFailedMove::GiveUp);
    }
}
