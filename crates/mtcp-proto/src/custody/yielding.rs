//! A holder's answer to a keeper's YIELD (decisions 48 and 66): what the holder answers, how it
//! goes on the wire, how the keeper reads it, and whether the keeper still needs to fence the
//! epoch afterwards. The runtime's holder (`mtcp/src/registry.rs`, `give_up`) and keeper
//! (`mtcp/src/eager/handover.rs`, `ask_holder`) only carry these out.

use super::Verdict;
use crate::wire::{Holding, Msg, RefuseCode};
use crate::Cid;

/// A holder's answer to YIELD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YieldAnswer {
    /// Given up before any RESUMED for the epoch went out: no agent holds its token.
    Unanswered,
    /// Given up after RESUMED went out (the connection built for it is let go): the agent
    /// never spoke on that session, but may hold the epoch's token — unless the asker's word
    /// rules that out (decision 66): with the agent's MIGRATE number it resumed for (0: not
    /// known).
    LetGo(u64),
    /// Refused: the agent uses the epoch, or the request is for an older MIGRATE than the one
    /// the holder resumed for.
    Refused,
}

/// A reply to YIELD that is none of the answers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("answered {0}")]
pub struct NotAnAnswer(pub &'static str);

impl YieldAnswer {
    /// The holder's answer, from its gate's verdict on the yield and the MIGRATE number the
    /// epoch was served for (`None`: refused before the gate, the request being for an older
    /// MIGRATE, [`Holding::stale_for`]).
    pub fn of(gate: Option<(Verdict, u64)>) -> Self {
        match gate {
            Some((Verdict::Go, _)) => YieldAnswer::Unanswered,
            Some((Verdict::LetGo, served)) => YieldAnswer::LetGo(served),
            Some((Verdict::Refuse, _)) | None => YieldAnswer::Refused,
        }
    }

    /// Whether a holder giving `epoch` up lets go of its connection, which it serves at
    /// `serving`: only after RESUMED went out, and only the connection built for that epoch (one
    /// at another epoch is not that one).
    pub fn lets_go(self, serving: u64, epoch: u64) -> bool {
        matches!(self, YieldAnswer::LetGo(_)) && serving == epoch
    }

    /// The answer on the wire, from server `me` for `epoch` of `cid`: STATE with nothing
    /// (unanswered), STATE with one byte and the MIGRATE number (8 bytes, little-endian: let
    /// go), or REFUSED `StaleEpoch`.
    pub fn to_msg(self, me: &str, cid: Cid, epoch: u64) -> Msg {
        match self {
            YieldAnswer::Unanswered => Msg::State(Vec::new()),
            YieldAnswer::LetGo(attempt) => {
                let mut b = vec![1];
                b.extend_from_slice(&attempt.to_le_bytes());
                Msg::State(b)
            }
            YieldAnswer::Refused => Msg::Refused {
                code: RefuseCode::StaleEpoch,
                reason: format!(
                    "server {me} already answered the agent for epoch {epoch} of {cid}, or took it over for a later MIGRATE"
                ),
            },
        }
    }

    /// The keeper reads a holder's reply. A STATE too short to carry the MIGRATE number
    /// (an older holder's) reads as let go for an unknown one (0), which rules nothing out.
    pub fn read(reply: &Msg) -> Result<Self, NotAnAnswer> {
        match reply {
            Msg::State(b) if b.is_empty() => Ok(YieldAnswer::Unanswered),
            Msg::State(b) => Ok(YieldAnswer::LetGo(
                b.get(1..9)
                    .and_then(|n| n.try_into().ok())
                    .map_or(0, u64::from_le_bytes),
            )),
            Msg::Refused { .. } => Ok(YieldAnswer::Refused),
            other => Err(NotAnAnswer(other.name())),
        }
    }

    /// Whether, after this answer, a fence of `epoch` is needless: no agent will ever use it —
    /// given up before any RESUMED for it went out, or after, for a MIGRATE the agent's word
    /// rules out ([`Holding::rules_out`]).
    pub fn needs_no_fence(self, word: &Holding, epoch: u64) -> bool {
        match self {
            YieldAnswer::Unanswered => true,
            YieldAnswer::LetGo(attempt) => word.rules_out(attempt, epoch),
            YieldAnswer::Refused => false,
        }
    }
}

/// What a fencer does after asking a holder to give its epoch up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterYield {
    /// The holder keeps the epoch (the agent uses it): refused.
    Keeps,
    /// No agent will ever use the epoch ([`YieldAnswer::needs_no_fence`]): a fence need not
    /// land.
    Unanswered,
    /// The epoch must be fenced at the holder's backups, and the fence must land.
    Fence,
}

/// A backup whose claim a fence found held by a candidate (`fence_here`, decision 48), after
/// asking that holder to yield `epoch` (`None`: not reached): a holder not reached keeps the
/// epoch — it may be serving the agent, cut off only from this backup — as does one that
/// refuses; one that gave the epoch up is passed over, after a fence of its backups unless no
/// agent will use the epoch.
pub fn before_pass(answer: Option<YieldAnswer>, word: &Holding, epoch: u64) -> AfterYield {
    match answer {
        None | Some(YieldAnswer::Refused) => AfterYield::Keeps,
        Some(a) if a.needs_no_fence(word, epoch) => AfterYield::Unanswered,
        Some(_) => AfterYield::Fence,
    }
}

/// A keeper handing a connection out again (`rehand`), after asking the holder it supersedes
/// to yield `epoch` (`None`: not reached): only a refusal keeps it. A holder not reached is
/// dead, or cut off from everyone, and serves no one once its backups are fenced. (The keeper
/// fences in every case, for the holder's newer restart point; [`AfterYield::Unanswered`]
/// says that fence need not land.)
pub fn before_supersede(answer: Option<YieldAnswer>, word: &Holding, epoch: u64) -> AfterYield {
    match answer {
        Some(YieldAnswer::Refused) => AfterYield::Keeps,
        Some(a) if a.needs_no_fence(word, epoch) => AfterYield::Unanswered,
        None | Some(_) => AfterYield::Fence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid() -> Cid {
        Cid([7; 16])
    }

    #[test]
    fn the_gate_s_verdict_becomes_the_answer_and_a_stale_request_is_refused() {
        assert_eq!(
            YieldAnswer::of(Some((Verdict::Go, 4))),
            YieldAnswer::Unanswered
        );
        assert_eq!(
            YieldAnswer::of(Some((Verdict::LetGo, 4))),
            YieldAnswer::LetGo(4)
        );
        assert_eq!(
            YieldAnswer::of(Some((Verdict::Refuse, 4))),
            YieldAnswer::Refused
        );
        assert_eq!(YieldAnswer::of(None), YieldAnswer::Refused);
    }

    #[test]
    fn only_a_let_go_lets_go_and_only_the_connection_built_for_that_epoch() {
        assert!(YieldAnswer::LetGo(1).lets_go(3, 3));
        assert!(!YieldAnswer::LetGo(1).lets_go(4, 3));
        assert!(!YieldAnswer::Unanswered.lets_go(3, 3));
        assert!(!YieldAnswer::Refused.lets_go(3, 3));
    }

    #[test]
    fn every_answer_reads_back_as_itself() {
        for a in [
            YieldAnswer::Unanswered,
            YieldAnswer::LetGo(0),
            YieldAnswer::LetGo(7),
            YieldAnswer::LetGo(u64::MAX),
            YieldAnswer::Refused,
        ] {
            let m = a.to_msg("s2", cid(), 5);
            let mut buf = bytes::BytesMut::new();
            m.encode(&mut buf);
            let Some(crate::Frame::Msg(back)) =
                crate::FrameDecoder::new(1 << 20).decode(&mut buf).unwrap()
            else {
                panic!("{m:?} did not decode as a message")
            };
            assert_eq!(YieldAnswer::read(&back), Ok(a), "{m:?}");
        }
        let Msg::Refused { code, reason } = YieldAnswer::Refused.to_msg("s2", cid(), 5) else {
            panic!()
        };
        assert_eq!(code, RefuseCode::StaleEpoch);
        assert!(
            reason.contains("server s2") && reason.contains("epoch 5"),
            "{reason}"
        );
    }

    #[test]
    fn a_short_let_go_names_no_migrate_and_other_replies_are_not_answers() {
        assert_eq!(
            YieldAnswer::read(&Msg::State(vec![1])),
            Ok(YieldAnswer::LetGo(0))
        );
        assert_eq!(
            YieldAnswer::read(&Msg::State(vec![1, 2, 3])),
            Ok(YieldAnswer::LetGo(0))
        );
        let e = YieldAnswer::read(&Msg::Pong { t: 1 }).unwrap_err();
        assert_eq!(e.to_string(), "answered Pong");
    }

    #[test]
    fn a_fence_is_needless_after_an_unanswered_epoch_or_a_let_go_the_word_rules_out() {
        let word = Holding {
            attempt: 3,
            epochs: vec![6],
        };
        assert!(YieldAnswer::Unanswered.needs_no_fence(&word, 5));
        // Let go after RESUMED for MIGRATE 2, epoch 5 not held: the agent cannot use it.
        assert!(YieldAnswer::LetGo(2).needs_no_fence(&word, 5));
        // Held still, or served for this MIGRATE or a later one, or for an unknown one: fence.
        assert!(!YieldAnswer::LetGo(2).needs_no_fence(&word, 6));
        assert!(!YieldAnswer::LetGo(3).needs_no_fence(&word, 5));
        assert!(!YieldAnswer::LetGo(0).needs_no_fence(&word, 5));
        assert!(!YieldAnswer::Refused.needs_no_fence(&word, 5));
        // A word that says nothing rules nothing out.
        assert!(!YieldAnswer::LetGo(2).needs_no_fence(&Holding::default(), 5));
    }

    #[test]
    fn a_pass_keeps_an_unreached_or_refusing_holder_and_a_supersede_only_a_refusing_one() {
        let word = Holding {
            attempt: 3,
            epochs: vec![6],
        };
        let cases = [
            (None, AfterYield::Keeps, AfterYield::Fence),
            (
                Some(YieldAnswer::Refused),
                AfterYield::Keeps,
                AfterYield::Keeps,
            ),
            (
                Some(YieldAnswer::Unanswered),
                AfterYield::Unanswered,
                AfterYield::Unanswered,
            ),
            // Let go for an earlier MIGRATE at an epoch not held: no agent will use it.
            (
                Some(YieldAnswer::LetGo(2)),
                AfterYield::Unanswered,
                AfterYield::Unanswered,
            ),
            // Let go at an epoch the agent may hold: fenced first.
            (
                Some(YieldAnswer::LetGo(3)),
                AfterYield::Fence,
                AfterYield::Fence,
            ),
        ];
        for (answer, pass, supersede) in cases {
            assert_eq!(before_pass(answer, &word, 5), pass, "{answer:?}");
            assert_eq!(before_supersede(answer, &word, 5), supersede, "{answer:?}");
        }
    }
}
