//! The admin port's requests and the numbers a server reports on it (`mtcp status`, `drain`,
//! `undrain`). The server's driver (`crates/mtcp/src/peer_serve.rs`, `serve_admin`) reads a
//! request, carries it out and answers with the status [`Tally`] counts.

use crate::wire::Msg;

/// A request on the admin port; each is answered with the server's status after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Refuse new connections and hint those here away.
    Drain,
    /// Take new connections again and stop hinting.
    Undrain,
    /// Only the status.
    Status,
}

/// A message that is not an admin request: the admin port closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unexpected {0}")]
pub struct Unexpected(pub &'static str);

/// What `msg` asks of the admin port.
pub fn request(msg: &Msg) -> Result<Request, Unexpected> {
    match msg {
        Msg::AdminDrain => Ok(Request::Drain),
        Msg::AdminUndrain => Ok(Request::Undrain),
        Msg::AdminStatus => Ok(Request::Status),
        other => Err(Unexpected(other.name())),
    }
}

/// The connections here, counted for a status: with an agent attached, detached (kept for an
/// agent that may come back) and leaving (detached by an agent that said it moves them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Served here with a session (or a fast-path socket served without one).
    pub attached: u32,
    /// Detached without a LEAVING.
    pub detached: u32,
    /// Detached after a LEAVING, not fetched yet.
    pub leaving: u32,
}

impl Tally {
    /// Counts one connection: one fenced and kept only as its taker's keeper (`taken`) is not
    /// served here and not counted; a `detached` one counts as leaving if its agent said it is
    /// `leaving`, else as detached; any other as attached.
    pub fn add(&mut self, taken: bool, detached: bool, leaving: bool) {
        match (taken, detached, leaving) {
            (true, _, _) => {}
            (false, true, true) => self.leaving += 1,
            (false, true, false) => self.detached += 1,
            (false, false, _) => self.attached += 1,
        }
    }

    /// The connections a status reports as served with an agent: the attached ones and the
    /// `handing_over` being handed to a destination (frozen here, not fetched yet).
    pub fn connections(&self, handing_over: u32) -> u32 {
        self.attached + handing_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_undrain_and_status_are_the_admin_requests_and_anything_else_closes() {
        assert_eq!(request(&Msg::AdminDrain), Ok(Request::Drain));
        assert_eq!(request(&Msg::AdminUndrain), Ok(Request::Undrain));
        assert_eq!(request(&Msg::AdminStatus), Ok(Request::Status));
        for m in [Msg::Working, Msg::Close, Msg::Heartbeat] {
            let e = request(&m).unwrap_err();
            assert_eq!(e.to_string(), format!("unexpected {}", m.name()));
        }
    }

    #[test]
    fn a_connection_kept_only_for_its_taker_is_not_counted() {
        let mut t = Tally::default();
        for (detached, leaving) in [(false, false), (true, false), (true, true)] {
            t.add(true, detached, leaving);
        }
        assert_eq!(t, Tally::default());
        assert_eq!(t.connections(0), 0);
    }

    #[test]
    fn a_detached_connection_is_leaving_if_its_agent_said_so_and_an_attached_one_never_is() {
        let mut t = Tally::default();
        t.add(false, true, true);
        t.add(false, true, false);
        t.add(false, true, false);
        // LEAVING is the session's last message: until it detaches, the connection is attached.
        t.add(false, false, true);
        t.add(false, false, false);
        assert_eq!(
            t,
            Tally {
                attached: 2,
                detached: 2,
                leaving: 1
            }
        );
    }

    #[test]
    fn connections_being_handed_over_count_as_served_with_their_agent() {
        let mut t = Tally::default();
        t.add(false, false, false);
        t.add(false, true, false);
        assert_eq!(t.connections(0), 1);
        assert_eq!(t.connections(3), 4);
    }
}
