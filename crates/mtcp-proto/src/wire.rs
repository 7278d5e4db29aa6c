//! Wire format shared by the session (agent ↔ server), peer (server ↔ server) and admin channels.
//!
//! Every connection starts with a 6-byte preamble from each side: `MTCP` and the protocol
//! version (u16, big endian). Then frames: `[kind: u8][len: u32 BE][payload]`. Kind 0 is stream
//! data (payload = raw bytes, no copy on decode); kind 1 is a control message encoded with
//! postcard. Frame sizes are limited by the decoder, so a peer can never make us buffer more
//! than one frame's worth.

use crate::auth::{Cid, Token};
pub use crate::sum::SumSeg;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Magic bytes every M-TCP connection starts with.
pub const MAGIC: [u8; 4] = *b"MTCP";
/// Length of the preamble: magic + version.
pub const PREAMBLE_LEN: usize = 6;
/// Length of a frame header.
pub const HEADER_LEN: usize = 5;
/// Default maximum frame payload on session channels (data frames are cut to this).
pub const MAX_SESSION_FRAME: usize = 1 << 20;

const KIND_DATA: u8 = 0;
const KIND_MSG: u8 = 1;

/// The preamble to send for `version`.
pub fn preamble(version: u16) -> [u8; PREAMBLE_LEN] {
    let v = version.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
}

/// Parses a peer's preamble and returns its protocol version.
pub fn parse_preamble(b: &[u8; PREAMBLE_LEN]) -> Result<u16, WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    Ok(u16::from_be_bytes([b[4], b[5]]))
}

/// Errors decoding bytes from the network. Each one ends the channel it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an M-TCP peer (bad magic bytes)")]
    BadMagic,
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A frame of a peer or admin channel failed its per-frame authentication.
    #[error("frame authentication failed: {0}")]
    Mac(#[from] crate::channel::MacError),
}

/// Which state-transfer mode a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// The destination fetches the state from the live origin at migration time.
    Lazy,
    /// Snapshots are pushed to backups as they are taken (crash survival).
    Eager,
}

/// A server the agent may move to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: String,
    /// Where agents connect (`host:port`).
    pub data: String,
}

/// Why a server refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    VersionMismatch,
    BadToken,
    StaleEpoch,
    UnknownConnection,
    OriginUnreachable,
    Busy,
    Draining,
    Divergence,
    Malformed,
    TooLarge,
    Unauthenticated,
    Internal,
    /// The connection already ended in order (the agent has every byte); nothing to move.
    Closed,
}

impl RefuseCode {
    /// Every code, in wire order.
    pub const ALL: [RefuseCode; 13] = [
        RefuseCode::VersionMismatch,
        RefuseCode::BadToken,
        RefuseCode::StaleEpoch,
        RefuseCode::UnknownConnection,
        RefuseCode::OriginUnreachable,
        RefuseCode::Busy,
        RefuseCode::Draining,
        RefuseCode::Divergence,
        RefuseCode::Malformed,
        RefuseCode::TooLarge,
        RefuseCode::Unauthenticated,
        RefuseCode::Internal,
        RefuseCode::Closed,
    ];

    /// The code's name as a metric label (`mtcp_refusals_total{code="bad_token"}`).
    pub fn name(self) -> &'static str {
        match self {
            RefuseCode::VersionMismatch => "version_mismatch",
            RefuseCode::BadToken => "bad_token",
            RefuseCode::StaleEpoch => "stale_epoch",
            RefuseCode::UnknownConnection => "unknown_connection",
            RefuseCode::OriginUnreachable => "origin_unreachable",
            RefuseCode::Busy => "busy",
            RefuseCode::Draining => "draining",
            RefuseCode::Divergence => "divergence",
            RefuseCode::Malformed => "malformed",
            RefuseCode::TooLarge => "too_large",
            RefuseCode::Unauthenticated => "unauthenticated",
            RefuseCode::Internal => "internal",
            RefuseCode::Closed => "closed",
        }
    }
}

/// Why a server hints a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HintReason {
    Drain,
    Overload,
    Balance,
}

impl HintReason {
    /// The reason's name as a metric label (`mtcp_hints_total{reason="drain"}`).
    pub fn name(self) -> &'static str {
        match self {
            HintReason::Drain => "drain",
            HintReason::Overload => "overload",
            HintReason::Balance => "balance",
        }
    }
}

/// Sent by the agent to a destination to take a connection over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migrate {
    pub cid: Cid,
    pub epoch: u64,
    pub token: Token,
    /// Id of the server that serves the connection now.
    pub origin: String,
    /// Downstream bytes the agent has received (and delivered to the client program).
    pub down_recv: u64,
    /// Start of the range that `down_sum` covers.
    pub sum_from: u64,
    /// Checksum (see [`crate::sum`]) of downstream bytes `[sum_from, down_recv)`.
    pub down_sum: u64,
    /// Upstream bytes the agent has sent so far.
    pub up_sent: u64,
    /// The oldest upstream byte the agent still retains.
    pub up_base: u64,
    /// Eager mode: finished checksum ranges before `sum_from`, back to the newest snapshot a
    /// backup holds, so a destination restarting from a replica can check regenerated bytes.
    pub segs: Vec<SumSeg>,
}

impl Migrate {
    /// Every checksum range the agent sent: the finished ones, then the live one.
    pub fn ranges(&self) -> Vec<SumSeg> {
        let mut v = self.segs.clone();
        v.push(SumSeg {
            from: self.sum_from,
            end: self.down_recv,
            sum: self.down_sum,
        });
        v
    }
}

/// The server's answer to HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub server: String,
    pub cid: Cid,
    pub epoch: u64,
    pub token: Token,
    pub alternates: Vec<ServerInfo>,
    pub mode: Mode,
    pub heartbeat_ms: u32,
}

/// The destination's answer to a successful MIGRATE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    pub server: String,
    pub epoch: u64,
    pub token: Token,
    /// The agent resends retained upstream bytes from this offset.
    pub up_from: u64,
    pub alternates: Vec<ServerInfo>,
    pub heartbeat_ms: u32,
    /// Size of the state record that was transferred (for measurements).
    pub state_bytes: u64,
    /// Downstream offset of the restart point the destination restarted from: the agent keeps
    /// its checksum ranges from there (eager mode).
    pub restart_out: u64,
    /// Whether the state came from a backup's replica (the origin was unreachable).
    pub from_replica: bool,
}

/// Per-server numbers returned over the admin channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub id: String,
    /// Connections with an agent attached.
    pub connections: u32,
    /// Connections whose agent went away; their state is kept for a while (dead-session bound).
    pub detached: u32,
    pub draining: bool,
    pub migrated_in: u64,
    pub migrated_out: u64,
    /// Eager mode: replicas of other servers' connections held here.
    pub replicas_held: u32,
    /// Connections whose agent closed their session to move them, not fetched yet (not
    /// counted in `detached`).
    pub leaving: u32,
}

/// Every control message of every channel. New variants go at the end (postcard encodes the
/// variant index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    // ---- session, agent → server
    /// Opens a new connection. `orig_dst` is the client program's original destination in
    /// transparent mode.
    Hello {
        caps: u32,
        orig_dst: Option<String>,
    },
    Migrate(Migrate),
    /// Downstream progress, so the server can trim its output log.
    Ack {
        down_recv: u64,
        sum_from: u64,
    },
    Ping {
        t: u64,
    },
    /// The client program finished sending at `up_total`.
    UpFin {
        up_total: u64,
    },
    /// The agent ends the session (client program gone).
    Close,
    // ---- session, server → agent
    Welcome(Welcome),
    Resumed(Resumed),
    Refused {
        code: RefuseCode,
        reason: String,
    },
    /// A snapshot covering upstream `[0, in_off)` and downstream `[0, out_off)` is safe.
    Snap {
        in_off: u64,
        out_off: u64,
    },
    Hint {
        reason: HintReason,
        target: Option<String>,
    },
    Pong {
        t: u64,
    },
    Heartbeat,
    /// The application closed the connection after writing `down_total` bytes.
    Closed {
        down_total: u64,
    },
    // ---- peer and admin channels
    PeerChallenge {
        nonce: [u8; 16],
    },
    /// Opener → acceptor. `to` is the server the opener means to reach (its id in the cluster
    /// file); the proof covers it, the port kind, `from` and both nonces
    /// ([`crate::auth::ChannelContext`]).
    PeerAuth {
        from: String,
        to: String,
        nonce: [u8; 16],
        proof: [u8; 32],
    },
    PeerAccept {
        proof: [u8; 32],
    },
    /// Destination → origin: freeze connection `cid` at `epoch` and send its state record for a
    /// client holding `down_recv` downstream bytes (checksum `down_sum` from `sum_from`).
    Fetch {
        cid: Cid,
        epoch: u64,
        down_recv: u64,
        sum_from: u64,
        down_sum: u64,
    },
    /// Origin → destination: the encoded [`crate::StateRecord`].
    State(#[serde(with = "serde_bytes")] Vec<u8>),
    AdminDrain,
    AdminUndrain,
    AdminStatus,
    AdminStatusReply(ServerStatus),
    // ---- eager mode
    /// Server → agent: a backup holds the snapshot at `in_off`/`out_off`; upstream bytes before
    /// `in_off` need not be retained any more.
    Committed {
        in_off: u64,
        out_off: u64,
    },
    /// Origin → backup: store this encoded [`crate::StateRecord`] (replacing an older one).
    Replicate(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Backup → origin: the record for `cid` at `epoch` up to `out_off` is stored (also the
    /// answer to DROPREPLICA, with `out_off` 0).
    ReplicaStored {
        cid: Cid,
        epoch: u64,
        out_off: u64,
    },
    /// Destination → backup: hand over the replica of `cid` at `epoch`; the backup refuses
    /// every later claim and every older update (fencing).
    ClaimReplica {
        cid: Cid,
        epoch: u64,
    },
    /// Origin → backup: the connection closed or moved; forget replicas up to `epoch`.
    DropReplica {
        cid: Cid,
        epoch: u64,
    },
    /// Origin → destination: the FETCH arrived and is being worked on (the origin is alive,
    /// maybe waiting for a `lock_state` section to end). Also destination → agent on a
    /// MIGRATE's connection: sent every heartbeat interval until RESUMED or REFUSED, so the agent can give up on a silent candidate after an RTT-derived bound
    /// instead of a fixed one.
    Working,
    /// Agent → server on a *watch* connection (eager mode): one TCP connection per agent and
    /// server, beside the sessions, that carries only heartbeats and hints. The first WATCH
    /// opens it (answered by a HEARTBEAT); each later one adds a connection to it. Its end tells
    /// the agent at once that the server process died, while the sessions may still be
    /// delivering bytes the dead process had already written.
    Watch {
        cid: Cid,
        epoch: u64,
        token: Token,
    },
    // ---- trigger policies
    /// Server → agent, in the session: at this point of the stream `queued` more downstream
    /// bytes were waiting to be sent (the throughput-floor policy counts only time when the
    /// server has data waiting). Sent at most every 200 ms, only while data waits behind what
    /// is being written.
    Backlog {
        queued: u64,
    },
    /// Agent → server, first message (and every later one) of a *probe* connection to the data
    /// port: an RTT probe, `t` the agent's clock in µs. At most one per second per server.
    Probe {
        t: u64,
    },
    /// Server → agent: the answer to `Probe{t}`.
    ProbeReply {
        t: u64,
    },
    // ---- kernel fast path (HELLO with [`CAP_DIRECT`])
    /// Agent → server, after WELCOME: the client program's TCP connection itself (an encoded
    /// `mtcp_repair::TcpState`); the server recreates it and serves the client directly. The
    /// session then carries control messages only.
    Adopt(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Server → agent: the client's connection is recreated and served here.
    Adopted,
    /// Agent → server: the fence around the client's flow is down; send the client a window
    /// probe so the flow restarts at once (its ACKs were dropped while fenced).
    Kick,
    /// Origin → destination: a fast-path connection's state record (encoded
    /// [`crate::StateRecord`]) and its TCP connection (encoded `mtcp_repair::TcpState`). The
    /// origin fenced the client's flow before freezing it, in its fence table `fence`; the
    /// destination lifts that fence once it recreated the connection (decision 54).
    DirectState {
        #[serde(with = "serde_bytes")]
        record: Vec<u8>,
        #[serde(with = "serde_bytes")]
        tcp: Vec<u8>,
        fence: String,
    },
    /// Destination → backup (eager mode): the takeover for which this destination claimed `cid`
    /// at `epoch` failed before it served a byte; the claim is withdrawn and the entry is
    /// claimable again (by anyone, this destination included). A backup ignores it unless the
    /// entry is still claimed by the sender at that epoch. Answered with REPLICASTORED.
    ReleaseClaim {
        cid: Cid,
        epoch: u64,
    },
    /// Keeper → a holder's backup (eager mode): claim `cid` at `epoch`, the epoch a silent or
    /// dead destination would resume at, so it can never store or serve it
    /// (`mtcp_proto::custody`). Answered as CLAIMREPLICA; unlike it, the claim is plain (never
    /// a custody). A destination holding that epoch there is passed over only if it gives its
    /// successor up; the answer's record is then labelled past it (decision 48).
    FenceEpoch {
        cid: Cid,
        epoch: u64,
    },
    /// Keeper → holder (eager mode): give up epoch `epoch` of `cid` unless the agent has used
    /// it (spoken on the session its RESUMED went out on); answered STATE when given up —
    /// empty if no RESUMED for that epoch went out (no agent holds its token, so the keeper
    /// needs no fence), one byte if one did — and REFUSED otherwise
    /// (`mtcp_proto::custody::Gate`).
    Yield {
        cid: Cid,
        epoch: u64,
    },
    /// Server → agent on a watch connection: a HINT for one of the connections watched on it,
    /// which arrives ahead of whatever data that connection's session has queued.
    WatchHint {
        cid: Cid,
        reason: HintReason,
    },
    /// Agent → server, last message of a session it closes to move the connection elsewhere:
    /// until a destination fetches the state, the server counts the connection as moving, not
    /// as kept for a dead agent (`ServerStatus::leaving`).
    Leaving,
    /// Backup → server (eager mode), the answer to REPLICATE for an epoch a destination took
    /// over from this backup's replica: `by` claimed it and resumes past `label`. The server
    /// lets the connection go but keeps its state as that destination's keeper (decision 48).
    Taken {
        cid: Cid,
        epoch: u64,
        by: String,
        label: u64,
    },
}

impl Msg {
    /// The message's name, for logs and errors (what it is, never what it carries).
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Migrate(..) => "Migrate",
            Msg::Ack { .. } => "Ack",
            Msg::Ping { .. } => "Ping",
            Msg::UpFin { .. } => "UpFin",
            Msg::Close => "Close",
            Msg::Welcome(..) => "Welcome",
            Msg::Resumed(..) => "Resumed",
            Msg::Refused { .. } => "Refused",
            Msg::Snap { .. } => "Snap",
            Msg::Hint { .. } => "Hint",
            Msg::Pong { .. } => "Pong",
            Msg::Heartbeat => "Heartbeat",
            Msg::Closed { .. } => "Closed",
            Msg::PeerChallenge { .. } => "PeerChallenge",
            Msg::PeerAuth { .. } => "PeerAuth",
            Msg::PeerAccept { .. } => "PeerAccept",
            Msg::Fetch { .. } => "Fetch",
            Msg::State(..) => "State",
            Msg::AdminDrain => "AdminDrain",
            Msg::AdminUndrain => "AdminUndrain",
            Msg::AdminStatus => "AdminStatus",
            Msg::AdminStatusReply(..) => "AdminStatusReply",
            Msg::Committed { .. } => "Committed",
            Msg::Replicate(..) => "Replicate",
            Msg::ReplicaStored { .. } => "ReplicaStored",
            Msg::ClaimReplica { .. } => "ClaimReplica",
            Msg::DropReplica { .. } => "DropReplica",
            Msg::Working => "Working",
            Msg::Watch { .. } => "Watch",
            Msg::Backlog { .. } => "Backlog",
            Msg::Probe { .. } => "Probe",
            Msg::ProbeReply { .. } => "ProbeReply",
            Msg::Adopt(..) => "Adopt",
            Msg::Adopted => "Adopted",
            Msg::Kick => "Kick",
            Msg::DirectState { .. } => "DirectState",
            Msg::ReleaseClaim { .. } => "ReleaseClaim",
            Msg::FenceEpoch { .. } => "FenceEpoch",
            Msg::Yield { .. } => "Yield",
            Msg::WatchHint { .. } => "WatchHint",
            Msg::Leaving => "Leaving",
            Msg::Taken { .. } => "Taken",
        }
    }
}

/// HELLO capability: the kernel fast path (the agent hands the client's TCP connection over,
/// see [`Msg::Adopt`]).
pub const CAP_DIRECT: u32 = 1;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Bytes),
    Msg(Msg),
}

impl Msg {
    /// Appends this message as a frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let body = postcard::to_stdvec(self).expect("postcard encodes to a Vec without failing");
        out.reserve(HEADER_LEN + body.len());
        out.put_u8(KIND_MSG);
        out.put_u32(body.len() as u32);
        out.put_slice(&body);
    }

    /// This message as one frame.
    pub fn to_frame(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// The header of a data frame carrying `len` bytes.
pub fn data_header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [KIND_DATA, l[0], l[1], l[2], l[3]]
}

/// If `buf` starts with the header of a data frame, its payload length.
pub fn data_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() >= HEADER_LEN && buf[0] == KIND_DATA {
        Some(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize)
    } else {
        None
    }
}

/// Incremental frame decoder with a size limit.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// If `buf` starts with a complete frame header, the length of the whole frame (header and
    /// payload), which may not all be there yet. Refuses unknown kinds and frames over the
    /// limit. Consumes nothing.
    pub fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buf[0];
        if kind != KIND_DATA && kind != KIND_MSG {
            return Err(WireError::UnknownKind(kind));
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Takes one complete frame off the front of `buf`, or returns `Ok(None)` if more bytes are
    /// needed. On error the channel must be closed: the stream can't be resynchronised.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(total) = self.frame_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let kind = buf[0];
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(total - HEADER_LEN);
        match kind {
            KIND_DATA => Ok(Some(Frame::Data(payload.freeze()))),
            _ => match postcard::take_from_bytes::<Msg>(&payload) {
                Ok((m, [])) => Ok(Some(Frame::Msg(m))),
                Ok((_, rest)) => Err(WireError::Malformed(format!(
                    "{} stray bytes after the message",
                    rest.len()
                ))),
                Err(e) => Err(WireError::Malformed(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuse_codes_are_all_listed_in_wire_order_with_distinct_names() {
        for (i, c) in RefuseCode::ALL.iter().enumerate() {
            assert_eq!(postcard::to_stdvec(c).unwrap(), [i as u8], "{c:?}");
        }
        let past = [RefuseCode::ALL.len() as u8];
        assert!(postcard::from_bytes::<RefuseCode>(&past).is_err());
        let names: std::collections::BTreeSet<_> =
            RefuseCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), RefuseCode::ALL.len());
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        let cid = any::<[u8; 16]>().prop_map(Cid);
        let token = any::<[u8; 32]>().prop_map(Token);
        let server =
            (any::<String>(), any::<String>()).prop_map(|(id, data)| ServerInfo { id, data });
        prop_oneof![
            (any::<u32>(), proptest::option::of(any::<String>()))
                .prop_map(|(caps, orig_dst)| Msg::Hello { caps, orig_dst }),
            (
                cid.clone(),
                any::<u64>(),
                token.clone(),
                any::<String>(),
                any::<[u64; 4]>()
            )
                .prop_map(|(cid, epoch, token, origin, n)| Msg::Migrate(Migrate {
                    cid,
                    epoch,
                    token,
                    origin,
                    down_recv: n[0],
                    sum_from: n[1],
                    down_sum: n[2],
                    up_sent: n[3],
                    up_base: n[0],
                    segs: vec![SumSeg {
                        from: n[1],
                        end: n[2],
                        sum: n[3]
                    }],
                })),
            (any::<u64>(), any::<u64>()).prop_map(|(down_recv, sum_from)| Msg::Ack {
                down_recv,
                sum_from
            }),
            any::<u64>().prop_map(|t| Msg::Ping { t }),
            any::<u64>().prop_map(|up_total| Msg::UpFin { up_total }),
            Just(Msg::Close),
            (
                any::<String>(),
                cid.clone(),
                any::<u64>(),
                token.clone(),
                proptest::collection::vec(server.clone(), 0..4),
                any::<u32>()
            )
                .prop_map(|(server, cid, epoch, token, alternates, heartbeat_ms)| {
                    Msg::Welcome(Welcome {
                        server,
                        cid,
                        epoch,
                        token,
                        alternates,
                        mode: Mode::Lazy,
                        heartbeat_ms,
                    })
                }),
            (
                any::<String>(),
                any::<u64>(),
                token,
                any::<u64>(),
                proptest::collection::vec(server, 0..4)
            )
                .prop_map(|(server, epoch, token, up_from, alternates)| Msg::Resumed(
                    Resumed {
                        server,
                        epoch,
                        token,
                        up_from,
                        alternates,
                        heartbeat_ms: 100,
                        state_bytes: 7,
                        restart_out: up_from / 2,
                        from_replica: up_from % 2 == 0,
                    }
                )),
            any::<String>().prop_map(|reason| Msg::Refused {
                code: RefuseCode::BadToken,
                reason
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(in_off, out_off)| Msg::Snap { in_off, out_off }),
            proptest::option::of(any::<String>()).prop_map(|target| Msg::Hint {
                reason: HintReason::Drain,
                target
            }),
            (cid.clone(), any::<[u64; 4]>()).prop_map(|(cid, n)| Msg::Fetch {
                cid,
                epoch: n[0],
                down_recv: n[1],
                sum_from: n[2],
                down_sum: n[3]
            }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::State),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Replicate),
            (cid.clone(), any::<[u64; 3]>()).prop_map(|(cid, n)| Msg::ReplicaStored {
                cid,
                epoch: n[0],
                out_off: n[1]
            }),
            (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::ClaimReplica { cid, epoch }),
            (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::DropReplica { cid, epoch }),
            (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::ReleaseClaim { cid, epoch }),
            (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::FenceEpoch { cid, epoch }),
            (cid.clone(), any::<u64>()).prop_map(|(cid, epoch)| Msg::Yield { cid, epoch }),
            (cid.clone(), any::<[u64; 2]>(), "[a-z0-9]{0,12}").prop_map(|(cid, n, by)| {
                Msg::Taken {
                    cid,
                    epoch: n[0],
                    by,
                    label: n[1],
                }
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(in_off, out_off)| Msg::Committed { in_off, out_off }),
            Just(Msg::Working),
            Just(Msg::Leaving),
            (cid.clone(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(cid, epoch, t)| Msg::Watch {
                cid,
                epoch,
                token: Token(t)
            }),
            (cid.clone(), any::<bool>()).prop_map(|(cid, d)| Msg::WatchHint {
                cid,
                reason: if d {
                    HintReason::Drain
                } else {
                    HintReason::Overload
                }
            }),
            (
                any::<String>(),
                any::<String>(),
                any::<[u8; 16]>(),
                any::<[u8; 32]>()
            )
                .prop_map(|(from, to, nonce, proof)| Msg::PeerAuth {
                    from,
                    to,
                    nonce,
                    proof
                }),
            any::<u64>().prop_map(|queued| Msg::Backlog { queued }),
            any::<u64>().prop_map(|t| Msg::Probe { t }),
            any::<u64>().prop_map(|t| Msg::ProbeReply { t }),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip_in_any_split(msgs in proptest::collection::vec(arb_msg(), 1..8),
                                            data in proptest::collection::vec(any::<u8>(), 0..2000),
                                            cut in 1usize..64) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                m.encode(&mut wire);
                wire.extend_from_slice(&data_header(data.len()));
                wire.extend_from_slice(&data);
            }
            // Feed the decoder in pieces of `cut` bytes: frames must come out whole and in order.
            let dec = FrameDecoder::new(MAX_SESSION_FRAME);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    out.push(f);
                }
            }
            prop_assert!(buf.is_empty());
            let mut expect = Vec::new();
            for m in msgs {
                expect.push(Frame::Msg(m));
                expect.push(Frame::Data(Bytes::from(data.clone())));
            }
            prop_assert_eq!(out, expect);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let dec = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_rejected() {
        let dec = FrameDecoder::new(100);
        let mut b = BytesMut::from(&data_header(101)[..]);
        assert_eq!(
            dec.decode(&mut b),
            Err(WireError::TooLarge { len: 101, max: 100 })
        );
        let mut b = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert_eq!(dec.decode(&mut b), Err(WireError::UnknownKind(9)));
        let mut b = BytesMut::from(&[KIND_MSG, 0, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(dec.decode(&mut b), Err(WireError::Malformed(_))));
    }

    proptest! {
        /// A message's name is its variant's, for every message (logs and errors name it so).
        #[test]
        fn a_message_is_named_by_its_variant(m in arb_msg()) {
            let debug = format!("{m:?}");
            let variant = debug.split(|c: char| !c.is_alphanumeric()).next().unwrap();
            prop_assert_eq!(m.name(), variant);
        }
    }

    #[test]
    fn preamble_checks_magic() {
        assert_eq!(parse_preamble(&preamble(7)), Ok(7));
        assert_eq!(parse_preamble(b"GET / "), Err(WireError::BadMagic));
    }
}
