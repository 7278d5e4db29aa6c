//! Whether a server takes a new connection's HELLO, as a pure function of what it found out
//! about the session: a fast-path agent must be allowed by the cluster file and be a local
//! process of a trusted uid ([`crate::adopt::admit_session`], decision 39), and a draining
//! server takes no new connection at all.

use crate::auth::{Cid, Token};
use crate::refusal::Refusal;
use crate::takeover::Destination;
use crate::wire::{Migrate, Mode, Msg, RefuseCode, Welcome, CAP_DIRECT};

/// What the server knows when a HELLO arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The agent asks for the kernel fast path (`CAP_DIRECT`).
    pub fast_path: bool,
    /// The cluster file lists fast-path addresses (`fast_path`).
    pub fast_path_listed: bool,
    /// Owner of the session's other end (`None`: no local process). Asked of the kernel only
    /// for a fast-path agent the cluster admits ([`Hello::needs_owner`]).
    pub session_uid: Option<u32>,
    /// The server's own uid.
    pub server_uid: u32,
    /// The server is draining.
    pub draining: bool,
}

impl Hello {
    /// Whether the session's owner matters (so is worth a look at the socket table).
    pub fn needs_owner(fast_path: bool, fast_path_listed: bool) -> bool {
        fast_path && fast_path_listed
    }
}

/// Whether server `server` takes HELLO `h`. Checked in this order: a fast-path agent where the
/// cluster admits none, then its uid, then draining.
pub fn admit_hello(h: &Hello, server: &str) -> Result<(), Refusal> {
    if h.fast_path && !h.fast_path_listed {
        return Err(Refusal::new(
            RefuseCode::Unauthenticated,
            "this cluster admits no fast-path agents (list the agent's --listen address under `fast_path` in the cluster file)",
        ));
    }
    if h.fast_path {
        crate::adopt::admit_session(h.session_uid, h.server_uid)
            .map_err(|why| Refusal::new(RefuseCode::Unauthenticated, why))?;
    }
    if h.draining {
        return Err(Refusal::new(
            RefuseCode::Draining,
            format!("server {server} is draining"),
        ));
    }
    Ok(())
}

/// What a session opens with: its first message, sorted (a server's data port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// HELLO: a new connection; `fast_path` when the agent asks for the kernel fast path
    /// (`CAP_DIRECT`: the client's connection itself follows WELCOME).
    Hello { fast_path: bool },
    /// MIGRATE: a connection moving here.
    Migrate(Migrate),
    /// WATCH: an agent watches its connections here.
    Watch { cid: Cid, epoch: u64, token: Token },
    /// PROBE: an agent measures the path to this server.
    Probe { t: u64 },
}

/// Sorts a session's first message; anything else is refused as malformed.
pub fn opening(first: Msg) -> Result<Opening, Refusal> {
    match first {
        Msg::Hello { caps, .. } => Ok(Opening::Hello {
            fast_path: caps & CAP_DIRECT != 0,
        }),
        Msg::Migrate(m) => Ok(Opening::Migrate(m)),
        Msg::Watch { cid, epoch, token } => Ok(Opening::Watch { cid, epoch, token }),
        Msg::Probe { t } => Ok(Opening::Probe { t }),
        other => Err(Refusal::new(
            RefuseCode::Malformed,
            format!(
                "expected HELLO, MIGRATE, WATCH or PROBE, got {}",
                other.name()
            ),
        )),
    }
}

/// The WELCOME for new connection `cid`, at epoch 0 with its token, from server `at`.
pub fn welcome(at: Destination<'_>, cid: Cid, token: Token, mode: Mode) -> Welcome {
    Welcome {
        server: at.id.to_string(),
        cid,
        epoch: 0,
        token,
        alternates: at.alternates,
        mode,
        heartbeat_ms: at.heartbeat_ms,
        idle_ms: at.idle_ms,
    }
}

/// How a fast-path agent passes the client's connection after WELCOME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// ADOPT: frozen with `TCP_REPAIR` (an encoded `mtcp_repair::TcpState`), to be recreated.
    Repaired(Vec<u8>),
    /// ADOPTHANDED: the socket itself, handed to this host's hand-over listener under a nonce.
    Handed([u8; 16]),
}

/// Reads what follows WELCOME on a fast-path session; anything else is refused as malformed.
pub fn adoption(next: Msg) -> Result<Adoption, Refusal> {
    match next {
        Msg::Adopt(tcp) => Ok(Adoption::Repaired(tcp)),
        Msg::AdoptHanded { nonce } => Ok(Adoption::Handed(nonce)),
        other => Err(Refusal::new(
            RefuseCode::Malformed,
            format!("expected ADOPT, got {}", other.name()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAYED: Hello = Hello {
        fast_path: false,
        fast_path_listed: false,
        session_uid: None,
        server_uid: 1000,
        draining: false,
    };
    const FAST: Hello = Hello {
        fast_path: true,
        fast_path_listed: true,
        session_uid: Some(1000),
        ..RELAYED
    };

    fn code(h: Hello) -> Option<RefuseCode> {
        admit_hello(&h, "s1").err().map(|r| r.code)
    }

    #[test]
    fn a_relaying_agent_is_taken_from_anywhere_unless_draining() {
        assert_eq!(admit_hello(&RELAYED, "s1"), Ok(()));
        let r = admit_hello(
            &Hello {
                session_uid: Some(4242),
                fast_path_listed: true,
                ..RELAYED
            },
            "s1",
        );
        assert_eq!(r, Ok(()), "its uid does not matter");
        assert_eq!(
            admit_hello(
                &Hello {
                    draining: true,
                    ..RELAYED
                },
                "s1"
            ),
            Err(Refusal::new(RefuseCode::Draining, "server s1 is draining"))
        );
    }

    #[test]
    fn a_fast_path_agent_needs_the_cluster_to_list_fast_path_addresses() {
        assert_eq!(code(FAST), None);
        let r = admit_hello(
            &Hello {
                fast_path_listed: false,
                ..FAST
            },
            "s1",
        )
        .unwrap_err();
        assert_eq!(r.code, RefuseCode::Unauthenticated);
        assert!(r
            .reason
            .starts_with("this cluster admits no fast-path agents"));
    }

    #[test]
    fn a_fast_path_agent_must_be_a_local_process_of_a_trusted_uid() {
        for uid in [0, 1000] {
            assert_eq!(
                code(Hello {
                    session_uid: Some(uid),
                    ..FAST
                }),
                None
            );
        }
        for uid in [None, Some(1001)] {
            let r = admit_hello(
                &Hello {
                    session_uid: uid,
                    ..FAST
                },
                "s1",
            )
            .unwrap_err();
            assert_eq!(r.code, RefuseCode::Unauthenticated);
            assert_eq!(
                r.reason,
                crate::adopt::admit_session(uid, 1000).unwrap_err()
            );
        }
    }

    #[test]
    fn an_unauthorised_fast_path_agent_is_told_so_even_by_a_draining_server() {
        let draining = Hello {
            draining: true,
            ..FAST
        };
        assert_eq!(code(draining), Some(RefuseCode::Draining));
        let unlisted = Hello {
            fast_path_listed: false,
            ..draining
        };
        assert_eq!(code(unlisted), Some(RefuseCode::Unauthenticated));
        let foreign = Hello {
            session_uid: None,
            ..draining
        };
        assert_eq!(code(foreign), Some(RefuseCode::Unauthenticated));
    }

    #[test]
    fn the_owner_is_looked_up_only_for_an_admitted_fast_path_agent() {
        assert!(Hello::needs_owner(true, true));
        assert!(!Hello::needs_owner(true, false));
        assert!(!Hello::needs_owner(false, true));
    }

    #[test]
    fn a_session_opens_with_hello_migrate_watch_or_probe_and_nothing_else() {
        let hello = |caps| Msg::Hello {
            caps,
            orig_dst: None,
        };
        assert_eq!(opening(hello(0)), Ok(Opening::Hello { fast_path: false }));
        assert_eq!(
            opening(hello(CAP_DIRECT | 0x100)),
            Ok(Opening::Hello { fast_path: true })
        );
        assert_eq!(opening(Msg::Probe { t: 5 }), Ok(Opening::Probe { t: 5 }));
        let (cid, token) = (Cid([2; 16]), Token([3; 32]));
        assert_eq!(
            opening(Msg::Watch {
                cid,
                epoch: 4,
                token
            }),
            Ok(Opening::Watch {
                cid,
                epoch: 4,
                token
            })
        );
        for m in [Msg::Kick, Msg::Ping { t: 1 }, Msg::Adopted] {
            let name = m.name();
            let r = opening(m).unwrap_err();
            assert_eq!(r.code, RefuseCode::Malformed);
            assert_eq!(
                r.reason,
                format!("expected HELLO, MIGRATE, WATCH or PROBE, got {name}")
            );
        }
    }

    #[test]
    fn a_new_connection_is_welcomed_at_epoch_zero_with_the_server_s_settings() {
        let at = Destination {
            id: "s2",
            alternates: vec![],
            heartbeat_ms: 250,
            idle_ms: 30_000,
        };
        let (cid, token) = (Cid([2; 16]), Token([3; 32]));
        let w = welcome(at, cid, token, Mode::Eager);
        assert_eq!((w.server.as_str(), w.cid, w.epoch), ("s2", cid, 0));
        assert_eq!((w.token, w.mode), (token, Mode::Eager));
        assert_eq!((w.heartbeat_ms, w.idle_ms), (250, 30_000));
    }

    #[test]
    fn a_fast_path_agent_follows_welcome_with_its_client_s_connection_only() {
        assert_eq!(
            adoption(Msg::Adopt(vec![1, 2])),
            Ok(Adoption::Repaired(vec![1, 2]))
        );
        assert_eq!(
            adoption(Msg::AdoptHanded { nonce: [9; 16] }),
            Ok(Adoption::Handed([9; 16]))
        );
        let r = adoption(Msg::Kick).unwrap_err();
        assert_eq!(
            (r.code, r.reason.as_str()),
            (RefuseCode::Malformed, "expected ADOPT, got Kick")
        );
    }
}
