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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_processes_of_trusted_uids_open_fast_path_sessions() {
        assert!(admit_session(Some(0), 0).is_ok());
        assert!(admit_session(Some(1000), 1000).is_ok());
        assert!(admit_session(Some(0), 1000).is_ok());
        let e = admit_session(Some(65534), 0).unwrap_err();
        assert!(e.contains("uid 65534"), "{e}");
        let e = admit_session(None, 0).unwrap_err();
        assert!(e.contains("not come from a process on this host"), "{e}");
    }

    fn ok() -> Handover {
        Handover {
            local_admitted: true,
            listener_uid: Some(0),
            session_uid: 0,
            held: true,
            send_queue: 0,
            unsent: 0,
            recv_queue: 100,
        }
    }

    #[test]
    fn a_handover_names_the_agents_own_listener_and_small_input_only() {
        assert!(admit_handover(&ok()).is_ok());
        let e = admit_handover(&Handover {
            local_admitted: false,
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("fast_path"), "{e}");
        let e = admit_handover(&Handover {
            listener_uid: None,
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("nothing listens"), "{e}");
        let e = admit_handover(&Handover {
            listener_uid: Some(7),
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("uid 7"), "{e}");
        let e = admit_handover(&Handover {
            send_queue: 10,
            unsent: 4,
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("never writes"), "{e}");
        // A connection the agent did not hold (a remote address of its choosing).
        let e = admit_handover(&Handover {
            held: false,
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("accepted"), "{e}");
        // Unsent output is dropped before the restore: allowed.
        assert!(admit_handover(&Handover {
            send_queue: 10,
            unsent: 10,
            ..ok()
        })
        .is_ok());
        assert!(admit_handover(&Handover {
            recv_queue: MAX_ADOPT_QUEUE,
            ..ok()
        })
        .is_ok());
        let e = admit_handover(&Handover {
            recv_queue: MAX_ADOPT_QUEUE + 1,
            ..ok()
        })
        .unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn a_handover_wrong_in_every_way_is_refused_for_the_first_rule_it_breaks() {
        let mut h = Handover {
            local_admitted: false,
            listener_uid: None,
            session_uid: 0,
            held: false,
            send_queue: 10,
            unsent: 0,
            recv_queue: MAX_ADOPT_QUEUE + 1,
        };
        let mut seen = Vec::new();
        let fixes: [fn(&mut Handover); 5] = [
            |h| h.local_admitted = true,
            |h| h.listener_uid = Some(0),
            |h| h.unsent = 10,
            |h| h.recv_queue = 0,
            |h| h.held = true,
        ];
        for fix in fixes {
            seen.push(admit_handover(&h).unwrap_err());
            fix(&mut h);
        }
        assert!(admit_handover(&h).is_ok());
        let want = [
            "fast_path",
            "nothing listens",
            "10 bytes of output sent",
            "bytes of input queued",
            "not one the session's agent held",
        ];
        for (e, w) in seen.iter().zip(want) {
            assert!(e.contains(w), "{e} (wanted {w})");
        }
    }
}
