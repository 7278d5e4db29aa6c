//! Why a server refused a request: the code and the reason it sends in REFUSED.

use crate::wire::{Msg, RefuseCode};

/// A refusal: its code and the reason, sent to the requester as [`Msg::Refused`] and shown
/// (in logs and errors) as `Code: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {reason}")]
pub struct Refusal {
    pub code: RefuseCode,
    pub reason: String,
}

impl Refusal {
    /// Refusal `code`, for `reason`. The codes refused most often have short forms below.
    pub fn new(code: RefuseCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    pub fn stale_epoch(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::StaleEpoch, reason)
    }

    pub fn unknown_connection(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::UnknownConnection, reason)
    }

    pub fn origin_unreachable(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::OriginUnreachable, reason)
    }

    pub fn busy(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::Busy, reason)
    }

    pub fn divergence(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::Divergence, reason)
    }

    pub fn too_large(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::TooLarge, reason)
    }

    pub fn internal(reason: impl Into<String>) -> Self {
        Self::new(RefuseCode::Internal, reason)
    }
}

impl From<Refusal> for Msg {
    /// The REFUSED that carries the refusal.
    fn from(r: Refusal) -> Self {
        Msg::Refused {
            code: r.code,
            reason: r.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_shows_as_its_code_and_reason_and_goes_out_as_refused() {
        let r = Refusal::busy("server s1: 4 takeovers running");
        assert_eq!(r.to_string(), "Busy: server s1: 4 takeovers running");
        assert_eq!(
            Msg::from(r),
            Msg::Refused {
                code: RefuseCode::Busy,
                reason: "server s1: 4 takeovers running".into(),
            }
        );
    }

    #[test]
    fn each_short_form_carries_its_code() {
        let cases = [
            (Refusal::stale_epoch("r"), RefuseCode::StaleEpoch),
            (
                Refusal::unknown_connection("r"),
                RefuseCode::UnknownConnection,
            ),
            (
                Refusal::origin_unreachable("r"),
                RefuseCode::OriginUnreachable,
            ),
            (Refusal::busy("r"), RefuseCode::Busy),
            (Refusal::divergence("r"), RefuseCode::Divergence),
            (Refusal::too_large("r"), RefuseCode::TooLarge),
            (Refusal::internal("r"), RefuseCode::Internal),
        ];
        for (r, code) in cases {
            assert_eq!(r, Refusal::new(code, "r"));
        }
    }
}
