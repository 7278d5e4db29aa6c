//! The peer port's requests: who may open a peer channel, and which messages it serves. The
//! server's driver (`crates/mtcp/src/peer_serve.rs`, `serve_peer`) screens each request here,
//! then carries it out.

use crate::refusal::Refusal;
use crate::wire::Msg;

/// Why a peer channel is closed without an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// The authenticated opener is not a server of the cluster (an admin key holder, or a
    /// cluster file that dropped it).
    #[error("{0:?} is not a server of the cluster")]
    NotAServer(String),
    /// A message the peer port does not serve.
    #[error("unexpected {0}")]
    Unexpected(&'static str),
}

/// Whether a peer channel authenticated as `from` may go on: only from a server of the cluster
/// (`is_server`).
pub fn admit_opener(from: &str, is_server: bool) -> Result<(), Closed> {
    match is_server {
        true => Ok(()),
        false => Err(Closed::NotAServer(from.to_string())),
    }
}

/// What the peer port does with request `m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screened {
    /// Serve it.
    Serve,
    /// Answer with this refusal, and go on.
    Refuse(Refusal),
}

/// Screens request `m` (`is_server`: whether an id names a server of the cluster): the
/// requests a peer serves — FETCH, REPLICATE, CLAIMREPLICA, YIELD, FENCEEPOCH, RELEASECLAIM,
/// DROPREPLICA and the keep-warm PING — are served, except a FENCEEPOCH for a fencer that is no
/// server of the cluster: its claim could never be passed over or confirmed (decision 63's one
/// claimer per epoch), so it is refused. Anything else closes the channel.
pub fn screen(m: &Msg, is_server: impl Fn(&str) -> bool) -> Result<Screened, Closed> {
    match m {
        Msg::FenceEpoch { cid, epoch, by, .. } if !is_server(by) => {
            Ok(Screened::Refuse(Refusal::internal(format!(
                "fence of epoch {epoch} of {cid} for {by:?}, not a server of the cluster"
            ))))
        }
        Msg::Fetch { .. }
        | Msg::Replicate(_)
        | Msg::ClaimReplica { .. }
        | Msg::Yield { .. }
        | Msg::FenceEpoch { .. }
        | Msg::ReleaseClaim { .. }
        | Msg::DropReplica { .. }
        | Msg::Ping { .. } => Ok(Screened::Serve),
        other => Err(Closed::Unexpected(other.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Holding, RefuseCode};
    use crate::Cid;

    fn members(id: &str) -> bool {
        ["s1", "s2", "s3"].contains(&id)
    }

    #[test]
    fn only_a_server_of_the_cluster_opens_a_peer_channel() {
        assert_eq!(admit_opener("s2", true), Ok(()));
        let e = admit_opener("admin", false).unwrap_err();
        assert_eq!(e.to_string(), "\"admin\" is not a server of the cluster");
    }

    #[test]
    fn peer_requests_are_served_and_anything_else_closes_the_channel() {
        let cid = Cid([1; 16]);
        for m in [
            Msg::ClaimReplica {
                cid,
                epoch: 1,
                holding: Holding::default(),
            },
            Msg::Yield {
                cid,
                epoch: 1,
                attempt: 0,
            },
            Msg::ReleaseClaim { cid, epoch: 1 },
            Msg::DropReplica { cid, epoch: 1 },
            Msg::Replicate(vec![]),
            Msg::Ping { t: 0 },
        ] {
            assert_eq!(screen(&m, members), Ok(Screened::Serve), "{m:?}");
        }
        for m in [Msg::AdminDrain, Msg::Kick, Msg::Pong { t: 0 }, Msg::Leaving] {
            let name = m.name();
            assert_eq!(screen(&m, members), Err(Closed::Unexpected(name)));
        }
    }

    #[test]
    fn a_fence_for_a_fencer_outside_the_cluster_is_refused_and_the_channel_goes_on() {
        let fence = |by: &str| Msg::FenceEpoch {
            cid: Cid([1; 16]),
            epoch: 4,
            by: by.into(),
            holding: Holding::default(),
        };
        assert_eq!(screen(&fence("s3"), members), Ok(Screened::Serve));
        let Ok(Screened::Refuse(r)) = screen(&fence("s9"), members) else {
            panic!("not refused")
        };
        assert_eq!(r.code, RefuseCode::Internal);
        assert!(
            r.reason.contains("for \"s9\", not a server"),
            "{}",
            r.reason
        );
    }
}
