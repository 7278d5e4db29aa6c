//! Answers on peer channels, and what they mean to the server that asked: the origin's answer
//! to FETCH (the state record, with a fast-path connection's TCP side), a backup's answers to
//! REPLICATE, to CLAIMREPLICA and FENCEEPOCH, and to RELEASECLAIM. The runtime
//! (`mtcp/src/peer.rs`) sends the request and waits for the reply; these read it.

use crate::custody::Custody;
use crate::record::StateRecord;
use crate::refusal::Refusal;
use crate::wire::{Msg, RefuseCode};

/// A frozen fast-path connection's TCP side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectTcp {
    /// Frozen with `TCP_REPAIR`, to be recreated.
    Repaired {
        /// An encoded `mtcp_repair::TcpState`.
        tcp: Vec<u8>,
        /// The origin's fence table, where the client's flow is fenced until the destination
        /// lifts it (decision 54).
        fence: String,
    },
    /// The socket itself went to the destination's hand-over listener under `nonce`
    /// (decision 56).
    Handed { nonce: [u8; 16] },
}

impl DirectTcp {
    /// Bytes it adds to the state that crosses the peer channel.
    pub fn len(&self) -> usize {
        match self {
            DirectTcp::Repaired { tcp, .. } => tcp.len(),
            DirectTcp::Handed { nonce } => nonce.len(),
        }
    }

    /// Whether it adds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A frozen connection: its state record and, for a fast-path connection, its TCP side.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub rec: StateRecord,
    pub tcp: Option<DirectTcp>,
}

/// The origin's answer to FETCH carrying the connection: its encoded record `record`, as STATE,
/// or as DIRECTSTATE or HANDEDSTATE with a fast-path connection's TCP side.
pub fn state_msg(record: Vec<u8>, tcp: Option<DirectTcp>) -> Msg {
    match tcp {
        None => Msg::State(record),
        Some(DirectTcp::Repaired { tcp, fence }) => Msg::DirectState { record, tcp, fence },
        Some(DirectTcp::Handed { nonce }) => Msg::HandedState { record, nonce },
    }
}

/// Reads origin `origin`'s reply to FETCH: the frozen connection and the bytes it took on the
/// wire. A record over `max_record` bytes is refused before it is decoded (decoding costs about
/// 1.6 times its size again); a record that does not decode, or a reply that is no answer, is
/// `Internal`; a refusal keeps its code, the origin named in its reason.
pub fn read_state(origin: &str, reply: Msg, max_record: usize) -> Result<(Frozen, u64), Refusal> {
    let (record, tcp) = match reply {
        Msg::State(record) => (record, None),
        Msg::DirectState { record, tcp, fence } => {
            (record, Some(DirectTcp::Repaired { tcp, fence }))
        }
        Msg::HandedState { record, nonce } => (record, Some(DirectTcp::Handed { nonce })),
        Msg::Refused { code, reason } => {
            return Err(Refusal::new(code, format!("origin {origin}: {reason}")))
        }
        other => {
            return Err(Refusal::internal(format!(
                "origin {origin} answered {}",
                other.name()
            )))
        }
    };
    crate::bounds::record_fits(record.len(), max_record)
        .map_err(|e| Refusal::too_large(format!("origin {origin}: {e}")))?;
    let rec = StateRecord::decode(&record)
        .map_err(|e| Refusal::internal(format!("origin {origin}: {e}")))?;
    let n = (record.len() + tcp.as_ref().map_or(0, DirectTcp::len)) as u64;
    Ok((Frozen { rec, tcp }, n))
}

/// Why a backup did not store a replica (REPLICATE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotStored {
    /// The backup's refusal code (`StaleEpoch` for TAKEN); `None`: no refusal (not reached,
    /// or an answer that is none).
    pub code: Option<RefuseCode>,
    pub why: String,
    /// A destination took the connection over from that backup's replica (TAKEN).
    pub taken: Option<Custody>,
    /// The backup's peer port refused the connection: no server process runs there (set by
    /// the runtime, which sees the connection fail; never by a reply).
    pub down: bool,
}

/// Reads backup `to`'s reply to REPLICATE: stored, or why not.
pub fn read_replicated(to: &str, reply: Msg) -> Result<(), NotStored> {
    let not = |code, why| NotStored {
        code,
        why,
        taken: None,
        down: false,
    };
    match reply {
        Msg::ReplicaStored { .. } => Ok(()),
        Msg::Taken {
            cid,
            epoch,
            by,
            label,
        } => Err(NotStored {
            code: Some(RefuseCode::StaleEpoch),
            why: format!("{to}: connection {cid} at epoch {epoch} was taken over by {by}"),
            taken: Some(Custody {
                epoch,
                holder: by,
                label,
            }),
            down: false,
        }),
        Msg::Refused { code, reason } => Err(not(
            Some(code),
            format!("{to} refused ({code:?}): {reason}"),
        )),
        other => Err(not(None, format!("{to} answered {}", other.name()))),
    }
}

/// Reads backup `to`'s reply to CLAIMREPLICA or FENCEEPOCH: the replica it hands over
/// (`Some` encoded record), none at that epoch (`None`: the claim is recorded all the same), or
/// its refusal.
pub fn read_claimed(to: &str, reply: Msg) -> Result<Option<Vec<u8>>, Refusal> {
    match reply {
        Msg::State(b) if b.is_empty() => Ok(None),
        Msg::State(b) => Ok(Some(b)),
        Msg::Refused { code, reason } => Err(Refusal::new(code, format!("backup {to}: {reason}"))),
        other => Err(Refusal::internal(format!(
            "backup {to} answered {}",
            other.name()
        ))),
    }
}

/// Reads a backup's reply to RELEASECLAIM (or DROPREPLICA): acknowledged, or the name of what
/// came instead.
pub fn read_released(reply: &Msg) -> Result<(), &'static str> {
    match reply {
        Msg::ReplicaStored { .. } => Ok(()),
        other => Err(other.name()),
    }
}

#[cfg(test)]
mod tests;
