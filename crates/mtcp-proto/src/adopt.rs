//! Who may hand a client's TCP connection to a server (the kernel fast path's ADOPT), and what
//! it may hand over, as pure functions of what the server found out about the session.
//!
//! An ADOPT makes the server recreate a TCP connection with `TCP_REPAIR`: whatever remote
//! address, sequence numbers and queue contents it names. The fast path only works with agent
//! and servers on one host (the recreated socket binds the agent's listening address), so the
//! server asks its own kernel who owns the other end of the session: only a process of a
//! trusted uid (root, or the server's own) may hand connections over, and only connections to a
//! listening address of its own that the cluster file admits, which its socket held when the
//! session began (so the remote address is its client's, not one of its choosing). The queues are what an agent's
//! freshly accepted socket can hold: nothing it wrote (the agent never writes to the client),
//! and at most [`MAX_ADOPT_QUEUE`] received bytes.

/// Most bytes of a handed-over connection's receive queue (what the client sent before the
/// agent froze the socket: a request or two). The server sizes the socket's forced buffer to
/// it, so it also bounds what one ADOPT can make the kernel hold.
pub const MAX_ADOPT_QUEUE: usize = 4 << 20;

/// Whether a session whose other end belongs to `session_uid` (`None`: no local process owns
/// it, so it comes from another host or network namespace) may open a fast-path connection
/// on a server running as `server_uid`.
pub fn admit_session(session_uid: Option<u32>, server_uid: u32) -> Result<(), String> {
    match session_uid {
        None => Err(
            "fast path: the session does not come from a process on this host (ADOPT is for a local agent)"
                .into(),
        ),
        Some(u) if u == 0 || u == server_uid => Ok(()),
        Some(u) => Err(format!(
            "fast path: the session's process runs as uid {u}; only root or uid {server_uid} may hand connections over"
        )),
    }
}

/// What an ADOPT names, as the server checks it.
#[derive(Debug, Clone, Copy)]
pub struct Handover {
    /// Whether the connection's local address is listed under `fast_path`.
    pub local_admitted: bool,
    /// Owner of the listening socket on the connection's local address (`None`: nothing
    /// listens there).
    pub listener_uid: Option<u32>,
    /// Owner of the session's other end (already admitted by [`admit_session`]).
    pub session_uid: u32,
    /// Whether a socket of `session_uid` held this very connection (local and remote address)
    /// when the session began: the agent's client, accepted and not yet frozen.
    pub held: bool,
    /// Output queued on the handed-over socket, and how much of it was never sent.
    pub send_queue: usize,
    pub unsent: usize,
    /// Input received and not read.
    pub recv_queue: usize,
}

/// Whether the server may recreate the connection an ADOPT names.
pub fn admit_handover(h: &Handover) -> Result<(), String> {
    if !h.local_admitted {
        return Err("the connection is not one this cluster's fast path admits (`fast_path` in the cluster file lists the agents' listening addresses)".into());
    }
    match h.listener_uid {
        None => {
            return Err(
                "nothing listens on the connection's local address: no agent accepted it".into(),
            )
        }
        Some(u) if u != h.session_uid => {
            return Err(format!(
                "the connection's local address is another process's (uid {u}), not the session's (uid {})",
                h.session_uid
            ))
        }
        Some(_) => {}
    }
    if h.send_queue > h.unsent {
        return Err(format!(
            "{} bytes of output sent on the connection: an agent never writes to its client",
            h.send_queue - h.unsent
        ));
    }
    if h.recv_queue > MAX_ADOPT_QUEUE {
        return Err(format!(
            "{} bytes of input queued; at most {MAX_ADOPT_QUEUE} are taken over",
            h.recv_queue
        ));
    }
    if !h.held {
        return Err("the connection is not one the session's agent held when the session began: an agent hands over only a client connection it accepted".into());
    }
    Ok(())
}

/// Who handed a socket over on this host (decision 56): the agent of a session (ADOPTHANDED)
/// or an origin (HANDEDSTATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hander {
    /// The other end of a session; `fast_path`: a fast-path agent's session, admitted by
    /// [`admit_session`].
    Agent {
        /// Whether the session is a fast-path agent's.
        fast_path: bool,
    },
    /// An origin on this host handing a connection it served over to this destination.
    Origin,
}

/// Why a socket handed over on this host is not taken into service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandedRefusal {
    /// ADOPTHANDED on a session that is not a fast-path agent's.
    #[error("a handed socket from a session that is not a fast-path agent's")]
    NotFastPath,
    /// A connection to an address the cluster's `fast_path` does not list.
    #[error("a connection to {local} is not one this cluster's fast path admits")]
    NotListed {
        /// The connection's local address.
        local: std::net::SocketAddr,
    },
    /// From an agent: a connection its socket did not hold when the session began.
    #[error("the handed connection {remote} -> {local} is not one the agent held when the session began")]
    NotHeld {
        /// The connection's local address.
        local: std::net::SocketAddr,
        /// The connection's remote address (the client's).
        remote: std::net::SocketAddr,
    },
}

/// A socket handed over on this host, as the server checks it.
#[derive(Debug, Clone, Copy)]
pub struct Handed {
    /// Who handed it over.
    pub from: Hander,
    /// Its local address (the agent's listening address).
    pub local: std::net::SocketAddr,
    /// Its remote address.
    pub remote: std::net::SocketAddr,
    /// Whether `local` is listed under `fast_path` in the cluster file.
    pub listed: bool,
    /// From an agent: whether its socket held this very connection when the session began
    /// (ignored for an origin).
    pub held: bool,
}

/// Whether the server may wait for the socket an ADOPTHANDED names: only on a fast-path
/// agent's session (an origin's is always awaited).
pub fn may_take_handed(from: Hander) -> Result<(), HandedRefusal> {
    match from {
        Hander::Agent { fast_path: false } => Err(HandedRefusal::NotFastPath),
        _ => Ok(()),
    }
}

/// Whether the server may serve a socket handed over on this host: handed by a fast-path
/// agent or an origin, to a listed address, and from an agent one it held — refused for the
/// first rule it breaks, in that order. The socket's kind (a connected TCP socket) is the
/// runtime's to check before.
pub fn admit_handed(h: &Handed) -> Result<(), HandedRefusal> {
    may_take_handed(h.from)?;
    if !h.listed {
        return Err(HandedRefusal::NotListed { local: h.local });
    }
    if matches!(h.from, Hander::Agent { .. }) && !h.held {
        return Err(HandedRefusal::NotHeld {
            local: h.local,
            remote: h.remote,
        });
    }
    Ok(())
}

/// How long a server waits for a socket handed over on this host: an origin's, before its
/// HANDEDSTATE, or a fast-path agent's, before its ADOPTHANDED. Each sends the socket before
/// its message, so it is normally there already.
pub const HANDED_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The refusal of a takeover whose handed socket did not come within [`HANDED_WAIT`].
pub fn handed_late() -> crate::refusal::Refusal {
    crate::refusal::Refusal::internal(format!(
        "the origin's socket did not arrive within {HANDED_WAIT:?}"
    ))
}

/// How a fast-path connection's socket came to be served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recreated {
    /// An agent's ADOPT: recreated from its state, the flow fenced by the agent.
    AgentRepaired,
    /// An agent's ADOPTHANDED: the socket itself, nothing fenced.
    AgentHanded,
    /// An origin's HANDEDSTATE: the socket itself, live.
    OriginHanded,
    /// An origin's DIRECTSTATE: recreated from its state; whether the origin's fence around the
    /// flow came down here.
    OriginRepaired {
        /// The destination took the origin's fence down.
        fence_lifted: bool,
    },
}

/// How a fast-path connection's client flow starts (decisions 54 and 56).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Fenced (an agent's hand-over of a new connection, or an origin's fence that was not
    /// up here): output waits for KICK.
    Fenced,
    /// Recreated here and the origin's fence lifted: a window probe restarts the flow at once,
    /// and another on KICK.
    Lifted,
    /// The socket itself was handed over by an origin (decision 56): nothing to restart.
    Live,
    /// The socket itself was handed over by the agent (a new connection): nothing to restart,
    /// but output waits for KICK, which the agent sends once the connection is in its table
    /// (so a client that got an answer finds its connection listed there).
    Waiting,
}

/// The flow a connection recreated as `r` starts with.
pub fn flow(r: Recreated) -> Flow {
    match r {
        Recreated::AgentRepaired => Flow::Fenced,
        Recreated::AgentHanded => Flow::Waiting,
        Recreated::OriginHanded => Flow::Live,
        Recreated::OriginRepaired { fence_lifted: true } => Flow::Lifted,
        Recreated::OriginRepaired {
            fence_lifted: false,
        } => Flow::Fenced,
    }
}

#[cfg(test)]
mod tests;
