//! Why a connection moves (both agent drivers use these): a cause from a fixed set (the `reason` label of
//! `mtcp_moves_total`) and the sentence the log and the timeline show.

use crate::wire::HintReason;
use std::time::Duration;

/// What triggered a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MoveCause {
    /// `mtcp migrate`, or `Agent::migrate`.
    Manual,
    /// A server's HINT while it drains.
    Drain,
    /// A server's HINT when it holds more than `--max-connections`.
    Overload,
    /// A server's HINT to balance load (not sent today).
    Balance,
    /// The session's TCP connection failed, or its watch connection ended.
    SessionBroke,
    /// No byte, heartbeat or pong from the server within the silence bound.
    Silence,
    /// The throughput-floor policy.
    Floor,
    /// The RTT policy.
    Rtt,
}

impl MoveCause {
    /// Every cause, for label sets shown before their first move.
    pub const ALL: [MoveCause; 8] = [
        MoveCause::Manual,
        MoveCause::Drain,
        MoveCause::Overload,
        MoveCause::Balance,
        MoveCause::SessionBroke,
        MoveCause::Silence,
        MoveCause::Floor,
        MoveCause::Rtt,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            MoveCause::Manual => "manual",
            MoveCause::Drain => "drain",
            MoveCause::Overload => "overload",
            MoveCause::Balance => "balance",
            MoveCause::SessionBroke => "session_broke",
            MoveCause::Silence => "silence",
            MoveCause::Floor => "floor",
            MoveCause::Rtt => "rtt",
        }
    }
}

impl From<HintReason> for MoveCause {
    fn from(r: HintReason) -> Self {
        match r {
            HintReason::Drain => MoveCause::Drain,
            HintReason::Overload => MoveCause::Overload,
            HintReason::Balance => MoveCause::Balance,
        }
    }
}

/// A move's cause and the sentence that explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveReason {
    pub cause: MoveCause,
    pub text: String,
}

impl MoveReason {
    pub fn new(cause: MoveCause, text: impl Into<String>) -> Self {
        MoveReason {
            cause,
            text: text.into(),
        }
    }

    /// The server said nothing for `bound` while the agent expected it to: the same cause and
    /// words on the relay and the fast path.
    pub fn silence(bound: Duration) -> Self {
        MoveReason::new(MoveCause::Silence, format!("server silent for {bound:?}"))
    }

    /// The session with `server` failed without an M-TCP close (reset, EOF, bad frame).
    pub fn session_broke(server: &str, why: impl std::fmt::Display) -> Self {
        MoveReason::new(
            MoveCause::SessionBroke,
            format!("session with {server} broke: {why}"),
        )
    }
}

impl std::fmt::Display for MoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_and_a_broken_session_are_told_apart() {
        let r = MoveReason::silence(Duration::from_millis(1400));
        assert_eq!(r.cause, MoveCause::Silence);
        assert_eq!(r.cause.label(), "silence");
        assert_eq!(r.to_string(), "server silent for 1.4s");
        let r = MoveReason::session_broke("s2", "peer closed the connection");
        assert_eq!(r.cause, MoveCause::SessionBroke);
        assert_eq!(r.cause.label(), "session_broke");
        assert_eq!(r.text, "session with s2 broke: peer closed the connection");
    }

    #[test]
    fn every_hint_reason_has_its_own_cause() {
        let causes = [HintReason::Drain, HintReason::Overload, HintReason::Balance]
            .map(|h| MoveCause::from(h).label());
        assert_eq!(causes, ["drain", "overload", "balance"]);
        let mut labels: Vec<_> = MoveCause::ALL.iter().map(|c| c.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(
            labels.len(),
            MoveCause::ALL.len(),
            "labels must be distinct"
        );
    }
}
