//! The segments a move is cut into, by where its steps are stamped: the relay's, the fast
//! path's, and the steps inside the fast path's freeze.

/// A point of a move: which process, which step (a step named with a trailing `*` matches any
/// step with that prefix: `migrate_tx*` is `migrate_tx_spare` or `migrate_tx_connect`).
pub(super) type Point = (&'static str, &'static str);

/// The segments of a move, in order along its critical path (trigger to the first resumed
/// byte at the agent), then the two that run beside it.
pub(super) const SEGMENTS: &[(&str, Point, Point)] = &[
    (
        "agent: trigger -> the connection's task sees it",
        ("agent", "trigger"),
        ("agent", "seen"),
    ),
    (
        "agent: a turn among the moves under way",
        ("agent", "seen"),
        ("agent", "turn"),
    ),
    (
        "agent: LEAVING written on the old session",
        ("agent", "turn"),
        ("agent", "leaving_tx"),
    ),
    (
        "agent: old session closed",
        ("agent", "leaving_tx"),
        ("agent", "old_closed"),
    ),
    (
        "agent: -> MIGRATE written (spare or connect)",
        ("agent", "old_closed"),
        ("agent", "migrate_tx*"),
    ),
    (
        "wire: MIGRATE -> destination has read it",
        ("agent", "migrate_tx*"),
        ("destination", "migrate_rx"),
    ),
    (
        "destination: token, epoch, drain checks",
        ("destination", "migrate_rx"),
        ("destination", "admitted"),
    ),
    (
        "destination: takeover slot",
        ("destination", "admitted"),
        ("destination", "slot"),
    ),
    (
        "destination: -> FETCH (peer channel)",
        ("destination", "slot"),
        ("destination", "fetch_call"),
    ),
    (
        "wire: FETCH -> origin has read it",
        ("destination", "fetch_call"),
        ("origin", "fetch_rx"),
    ),
    (
        "origin: WORKING written",
        ("origin", "fetch_rx"),
        ("origin", "working_tx"),
    ),
    (
        "origin: hand-over slot",
        ("origin", "working_tx"),
        ("origin", "slot"),
    ),
    (
        "origin: freeze (+ fences in eager mode)",
        ("origin", "slot"),
        ("origin", "frozen"),
    ),
    (
        "origin: encode the record",
        ("origin", "frozen"),
        ("origin", "encoded"),
    ),
    (
        "origin: record written",
        ("origin", "encoded"),
        ("origin", "state_tx"),
    ),
    (
        "wire: record -> destination has read it",
        ("origin", "state_tx"),
        ("destination", "state_rx"),
    ),
    (
        "destination: decode and check the record",
        ("destination", "state_rx"),
        ("destination", "record_checked"),
    ),
    (
        "destination: restart the connection (+ protect in eager mode)",
        ("destination", "record_checked"),
        ("destination", "restarted"),
    ),
    (
        "destination: -> RESUMED written",
        ("destination", "restarted"),
        ("destination", "resumed_tx"),
    ),
    (
        "destination: application restart (-> its first write)",
        ("destination", "resumed_tx"),
        ("destination", "app_first_write"),
    ),
    (
        "destination: regenerate + checksum output the client has",
        ("destination", "app_first_write"),
        ("destination", "first_new_byte_queued"),
    ),
    (
        "destination: session writer writes it",
        ("destination", "first_new_byte_queued"),
        ("destination", "first_new_byte_written"),
    ),
    (
        "wire: first new byte -> agent",
        ("destination", "first_new_byte_written"),
        ("agent", "first_byte_rx"),
    ),
    (
        "beside it: wire: RESUMED -> agent has read it",
        ("destination", "resumed_tx"),
        ("agent", "resumed_rx"),
    ),
    (
        "beside it: agent: resend of retained upstream written",
        ("agent", "resumed_rx"),
        ("agent", "resend_tx"),
    ),
];

/// Critical-path segments: all but the last two of [`SEGMENTS`].
pub(super) const CRITICAL: usize = SEGMENTS.len() - 2;

/// The segments of a move over the kernel fast path (`--fast-path`): the origin fences the
/// client's flow and freezes the client's TCP connection itself, the destination restores it,
/// lifts the fence and sends the client a window probe — the flow restarts there (decision 54).
/// The agent sees no bytes; its RESUMED and KICK, and the application's restart, run beside.
pub(super) const FAST_SEGMENTS: &[(&str, Point, Point)] = &[
    (
        "agent: trigger -> MIGRATE written (spare or connect)",
        ("agent", "trigger"),
        ("agent", "migrate_tx*"),
    ),
    (
        "wire: MIGRATE -> destination has read it",
        ("agent", "migrate_tx*"),
        ("destination", "migrate_rx"),
    ),
    (
        "destination: checks, takeover slot, -> FETCH",
        ("destination", "migrate_rx"),
        ("destination", "fetch_call"),
    ),
    (
        "wire: FETCH -> origin has read it",
        ("destination", "fetch_call"),
        ("origin", "fetch_rx"),
    ),
    (
        "origin: WORKING written, hand-over slot",
        ("origin", "fetch_rx"),
        ("origin", "slot"),
    ),
    (
        "origin: stop the pump, fence the flow (nftables, netlink)",
        ("origin", "slot"),
        ("origin", "fenced"),
    ),
    (
        "origin: freeze (TCP_REPAIR, read the queues)",
        ("origin", "fenced"),
        ("origin", "frozen"),
    ),
    (
        "origin: encode and write the record",
        ("origin", "frozen"),
        ("origin", "state_tx"),
    ),
    (
        "wire: record -> destination has read it",
        ("origin", "state_tx"),
        ("destination", "state_rx"),
    ),
    (
        "destination: decode and check the record",
        ("destination", "state_rx"),
        ("destination", "record_checked"),
    ),
    (
        "destination: restore the TCP connection",
        ("destination", "record_checked"),
        ("destination", "restored"),
    ),
    (
        "destination: lift the origin's fence",
        ("destination", "restored"),
        ("destination", "lifted"),
    ),
    (
        "destination: restart, pump started, window probe sent",
        ("destination", "lifted"),
        ("destination", "resumed_ready"),
    ),
    (
        "beside it: destination: -> RESUMED written",
        ("destination", "resumed_ready"),
        ("destination", "resumed_tx"),
    ),
    (
        "beside it: wire: RESUMED -> agent has read it",
        ("destination", "resumed_tx"),
        ("agent", "resumed_rx"),
    ),
    (
        "beside it: agent: KICK written",
        ("agent", "resumed_rx"),
        ("agent", "kick_tx"),
    ),
    (
        "beside it: destination: application restart (-> its first write)",
        ("destination", "resumed_tx"),
        ("destination", "app_first_write"),
    ),
    (
        "beside it: destination: first byte the client lacks written",
        ("destination", "app_first_write"),
        ("destination", "first_new_byte_queued"),
    ),
];

/// Critical-path segments of a fast-path move: all but the last five of [`FAST_SEGMENTS`].
pub(super) const FAST_CRITICAL: usize = FAST_SEGMENTS.len() - 5;

/// The steps inside the origin's fast-path pump stop, fence and freeze (`slot` -> `frozen`),
/// shown after the segments (they split two of them).
pub(super) const FREEZE_SEGMENTS: &[(&str, Point, Point)] = &[
    (
        "  freeze: hand-over checks, -> pump stop asked",
        ("origin", "slot"),
        ("origin", "pump_stop"),
    ),
    (
        "  freeze: -> the pump task sees the stop",
        ("origin", "pump_stop"),
        ("origin", "pump_saw_stop"),
    ),
    (
        "  freeze: -> the pump handed back",
        ("origin", "pump_saw_stop"),
        ("origin", "pump_stopped"),
    ),
    (
        "  freeze: fence the flow (nftables, netlink)",
        ("origin", "pump_stopped"),
        ("origin", "fenced"),
    ),
    (
        "  freeze: TCP_REPAIR on",
        ("origin", "fenced"),
        ("origin", "repair_on"),
    ),
    (
        "  freeze: TCP_INFO, queue sizes, window",
        ("origin", "repair_on"),
        ("origin", "info_read"),
    ),
    (
        "  freeze: peek the receive queue",
        ("origin", "info_read"),
        ("origin", "recv_queue_read"),
    ),
    (
        "  freeze: the send queue peeked into the encoded state",
        ("origin", "recv_queue_read"),
        ("origin", "send_queue_read"),
    ),
    (
        "  freeze: the state record",
        ("origin", "send_queue_read"),
        ("origin", "record_built"),
    ),
    (
        "  freeze: close the socket in repair mode",
        ("origin", "record_built"),
        ("origin", "discarded"),
    ),
    (
        "  freeze: -> back in the peer channel",
        ("origin", "discarded"),
        ("origin", "frozen"),
    ),
];

/// The segments of a fast-path move on one host (decision 56): the origin stops the pump and
/// hands the client's socket itself to the destination, which starts its pump on it. The
/// same beside-segments as [`FAST_SEGMENTS`] follow.
pub(super) const HANDED_SEGMENTS: &[(&str, Point, Point)] = &[
    FAST_SEGMENTS[0],
    FAST_SEGMENTS[1],
    FAST_SEGMENTS[2],
    FAST_SEGMENTS[3],
    FAST_SEGMENTS[4],
    (
        "origin: stop the pump",
        ("origin", "slot"),
        ("origin", "pump_stopped"),
    ),
    (
        "origin: connect to the destination's hand-over socket",
        ("origin", "pump_stopped"),
        ("origin", "handoff_connected"),
    ),
    (
        "origin: the state record",
        ("origin", "handoff_connected"),
        ("origin", "record_built"),
    ),
    (
        "origin: send the socket (SCM_RIGHTS)",
        ("origin", "record_built"),
        ("origin", "handed"),
    ),
    (
        "origin: encode and write the record",
        ("origin", "handed"),
        ("origin", "state_tx"),
    ),
    FAST_SEGMENTS[8],
    FAST_SEGMENTS[9],
    (
        "destination: take the handed socket",
        ("destination", "record_checked"),
        ("destination", "restored"),
    ),
    (
        "destination: restart, pump started",
        ("destination", "restored"),
        ("destination", "resumed_ready"),
    ),
    FAST_SEGMENTS[13],
    FAST_SEGMENTS[14],
    FAST_SEGMENTS[15],
    FAST_SEGMENTS[16],
    FAST_SEGMENTS[17],
];

/// Critical-path segments of a handed-over move: all but the last five.
pub(super) const HANDED_CRITICAL: usize = HANDED_SEGMENTS.len() - 5;
