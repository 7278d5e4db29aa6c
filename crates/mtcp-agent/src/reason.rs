//! Why a connection moves: a cause from a fixed set (the `reason` label of
//! `mtcp_moves_total`) and the sentence the log and the timeline show.

use mtcp_proto::wire::HintReason;

/// What triggered a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
pub(crate) struct MoveReason {
    pub cause: MoveCause,
    pub text: String,
}

impl MoveReason {
    pub(crate) fn new(cause: MoveCause, text: impl Into<String>) -> Self {
        MoveReason {
            cause,
            text: text.into(),
        }
    }
}

impl std::fmt::Display for MoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}
