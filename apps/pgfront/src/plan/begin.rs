//! The answer to a BEGIN the front-end answered before it ran (decision 68), judged message by
//! message: a pure function of what came so far and the next backend message.

use crate::codec::{self, BackMsg};
use crate::plan::IN_TXN;

/// How the deferred BEGIN was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Parse/Bind/Execute with no Sync, the client's next Query behind it: the answer ends with
    /// the CommandComplete (what follows is the Query's).
    Extended,
    /// The client's own Query message: the answer ends with ReadyForQuery.
    Query,
}

/// What one backend message means while the deferred BEGIN's answer is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Part of the answer (ParseComplete, BindComplete; the CommandComplete of a Query): read on.
    Next { tagged: bool },
    /// A message PostgreSQL may send at any time (ParameterStatus, notice, notification): pass
    /// it to the client, read on.
    Pass,
    /// The answer is complete and is what the client was told.
    Done,
    /// The BEGIN failed (SQLSTATE, message). PostgreSQL has skipped what followed it up to a
    /// Sync (`Sent::Extended`) or ends the Query with ReadyForQuery: the session must end.
    Failed { code: String, message: String },
    /// Anything else: the session must end.
    Unexpected,
}

/// Judges `msg`, given how the BEGIN was `sent`, its command `tag` and whether its
/// CommandComplete came already (`tagged`).
pub fn judge(msg: &BackMsg<'_>, sent: Sent, tag: &str, tagged: bool) -> Step {
    match msg {
        BackMsg::ParseComplete | BackMsg::BindComplete if sent == Sent::Extended && !tagged => {
            Step::Next { tagged: false }
        }
        BackMsg::CommandComplete { tag: t } if !tagged && *t == tag.as_bytes() => match sent {
            Sent::Extended => Step::Done,
            Sent::Query => Step::Next { tagged: true },
        },
        BackMsg::ReadyForQuery { status: IN_TXN } if tagged && sent == Sent::Query => Step::Done,
        BackMsg::ParameterStatus { .. }
        | BackMsg::NoticeResponse { .. }
        | BackMsg::NotificationResponse => Step::Pass,
        BackMsg::ErrorResponse { fields } => {
            let text =
                |c| String::from_utf8_lossy(codec::field(fields, c).unwrap_or(b"")).into_owned();
            let code = Some(text(b'C'))
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "XX000".into());
            Step::Failed {
                code,
                message: text(b'M'),
            }
        }
        _ => Step::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &'static [u8]) -> BackMsg<'static> {
        BackMsg::ErrorResponse {
            fields: vec![
                (b'S', b"ERROR"),
                (b'C', code),
                (b'M', b"canceling statement"),
            ],
        }
    }

    #[test]
    fn an_extended_begin_ends_with_its_command_complete() {
        let ext = Sent::Extended;
        assert_eq!(
            judge(&BackMsg::ParseComplete, ext, "BEGIN", false),
            Step::Next { tagged: false }
        );
        assert_eq!(
            judge(&BackMsg::BindComplete, ext, "BEGIN", false),
            Step::Next { tagged: false }
        );
        let begin = BackMsg::CommandComplete { tag: b"BEGIN" };
        assert_eq!(judge(&begin, ext, "BEGIN", false), Step::Done);
        // The client was told START TRANSACTION: BEGIN's tag is not its answer.
        assert_eq!(
            judge(&begin, ext, "START TRANSACTION", false),
            Step::Unexpected
        );
        // No ReadyForQuery is part of it (no Sync was sent).
        let rfq = BackMsg::ReadyForQuery { status: IN_TXN };
        assert_eq!(judge(&rfq, ext, "BEGIN", false), Step::Unexpected);
    }

    #[test]
    fn a_query_begin_ends_with_ready_for_query_in_a_transaction() {
        let q = Sent::Query;
        let begin = BackMsg::CommandComplete { tag: b"BEGIN" };
        assert_eq!(
            judge(&begin, q, "BEGIN", false),
            Step::Next { tagged: true }
        );
        assert_eq!(judge(&begin, q, "BEGIN", true), Step::Unexpected);
        assert_eq!(
            judge(&BackMsg::ReadyForQuery { status: IN_TXN }, q, "BEGIN", true),
            Step::Done
        );
        assert_eq!(
            judge(
                &BackMsg::ReadyForQuery { status: IN_TXN },
                q,
                "BEGIN",
                false
            ),
            Step::Unexpected
        );
        assert_eq!(
            judge(&BackMsg::ReadyForQuery { status: b'I' }, q, "BEGIN", true),
            Step::Unexpected
        );
        assert_eq!(
            judge(&BackMsg::ParseComplete, q, "BEGIN", false),
            Step::Unexpected
        );
    }

    #[test]
    fn errors_fail_it_and_asynchronous_messages_pass() {
        for sent in [Sent::Extended, Sent::Query] {
            assert_eq!(
                judge(&err(b"57014"), sent, "BEGIN", false),
                Step::Failed {
                    code: "57014".into(),
                    message: "canceling statement".into()
                }
            );
            let status = BackMsg::ParameterStatus {
                name: "TimeZone",
                value: "UTC",
            };
            assert_eq!(judge(&status, sent, "BEGIN", false), Step::Pass);
            assert_eq!(
                judge(&BackMsg::NotificationResponse, sent, "BEGIN", true),
                Step::Pass
            );
            assert_eq!(
                judge(&BackMsg::EmptyQueryResponse, sent, "BEGIN", false),
                Step::Unexpected
            );
        }
        let no_code = BackMsg::ErrorResponse {
            fields: vec![(b'M', b"odd")],
        };
        assert_eq!(
            judge(&no_code, Sent::Query, "BEGIN", false),
            Step::Failed {
                code: "XX000".into(),
                message: "odd".into()
            }
        );
    }
}
