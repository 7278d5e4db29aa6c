//! The answer to a BEGIN the front-end answered before it ran (decision 68), judged message by
//! message: a pure function of what came so far and the next backend message.

use crate::codec::{self, BackMsg, Frame, FrontMsg};
use crate::plan::IN_TXN;
use crate::sql::plain_begin;

/// How the deferred BEGIN was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Extended-protocol messages with no Sync, the client's next unit behind them: the answer
    /// ends with the CommandComplete (what follows is the next unit's).
    Extended,
    /// The client's own messages, Sync or Query included: the answer ends with ReadyForQuery.
    Query,
}

/// If the simple Query `sql` is a plain BEGIN, the answer PostgreSQL gives it (CommandComplete,
/// ReadyForQuery `T`) and its tag.
pub fn query_begin(sql: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    let tag = plain_begin(sql)?;
    let mut out = Vec::new();
    end_answer(&mut out, tag);
    Some((out, tag))
}

/// The end of every deferred BEGIN's answer: its CommandComplete and ReadyForQuery `T`.
fn end_answer(out: &mut Vec<u8>, tag: &str) {
    out.extend_from_slice(&codec::command_complete(tag));
    out.extend_from_slice(&codec::ready_for_query(IN_TXN));
}

/// If the extended-protocol batch `frames` (ending with its Sync) runs nothing but a plain
/// BEGIN, the answer PostgreSQL gives it and the BEGIN's tag. Its shape must be exactly:
/// an optional Parse of the unnamed statement with a plain BEGIN and no parameter types, a
/// Bind of that statement (or, with no Parse, of a named statement `named` says is a plain
/// BEGIN) with no parameters, an optional Describe of that portal or statement, an Execute of
/// that portal, Sync. So the answer cannot differ from what PostgreSQL will send: each of these
/// succeeds for a BEGIN at Idle.
pub fn batch_begin(
    frames: &[Frame],
    named: impl Fn(&[u8]) -> Option<&'static str>,
) -> Option<(Vec<u8>, &'static str)> {
    let msgs: Vec<FrontMsg<'_>> = frames
        .iter()
        .map(codec::parse_front)
        .collect::<Result<_, _>>()
        .ok()?;
    let mut out = Vec::new();
    let mut at = 0;
    let parsed = match msgs.first() {
        Some(FrontMsg::Parse { name, sql, types }) if name.is_empty() && types.is_empty() => {
            at = 1;
            out.extend_from_slice(&codec::parse_complete());
            Some(plain_begin(sql)?)
        }
        _ => None,
    };
    let Some(FrontMsg::Bind { portal, statement }) = msgs.get(at) else {
        return None;
    };
    if bind_parameters(&frames[at]) != Some(0) {
        return None;
    }
    let tag = match parsed {
        Some(t) if statement.is_empty() => t,
        None if !statement.is_empty() => named(statement)?,
        _ => return None,
    };
    out.extend_from_slice(&codec::bind_complete());
    at += 1;
    if let Some(FrontMsg::Describe { kind, name }) = msgs.get(at) {
        match kind {
            b'P' if name == portal => {}
            b'S' if name == statement => {
                out.extend_from_slice(&codec::parameter_description(&[]));
            }
            _ => return None,
        }
        out.extend_from_slice(&codec::no_data());
        at += 1;
    }
    match msgs.get(at) {
        Some(FrontMsg::Execute { portal: p, .. }) if p == portal => {}
        _ => return None,
    }
    if !(matches!(msgs.get(at + 1), Some(FrontMsg::Sync)) && msgs.len() == at + 2) {
        return None;
    }
    end_answer(&mut out, tag);
    Some((out, tag))
}

/// How many parameter values a Bind message carries (after its portal and statement names and
/// its parameter format codes); `None` if it is cut short.
fn bind_parameters(f: &Frame) -> Option<u16> {
    let b = f.body();
    let mut at = 0;
    for _ in 0..2 {
        at += b.get(at..)?.iter().position(|&c| c == 0)? + 1;
    }
    let u16_at = |i: usize| b.get(i..i + 2).map(|x| u16::from_be_bytes([x[0], x[1]]));
    let formats = usize::from(u16_at(at)?);
    u16_at(at + 2 + 2 * formats)
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
        BackMsg::ParseComplete
        | BackMsg::BindComplete
        | BackMsg::NoData
        | BackMsg::Other { tag: b't' }
            if !tagged =>
        {
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
        // A batch's answer: its ParseComplete, BindComplete, ParameterDescription and NoData
        // come before the tag, never after it.
        for m in [
            BackMsg::ParseComplete,
            BackMsg::BindComplete,
            BackMsg::NoData,
            BackMsg::Other { tag: b't' },
        ] {
            assert_eq!(judge(&m, q, "BEGIN", false), Step::Next { tagged: false });
            assert_eq!(judge(&m, q, "BEGIN", true), Step::Unexpected);
        }
        assert_eq!(
            judge(&BackMsg::Other { tag: b'T' }, q, "BEGIN", false),
            Step::Unexpected
        );
    }

    fn frames(msgs: &[bytes::Bytes]) -> Vec<Frame> {
        msgs.iter().map(|b| Frame { raw: b.clone() }).collect()
    }

    fn bind(portal: &[u8], statement: &[u8], params: u16) -> bytes::Bytes {
        let mut body = Vec::new();
        body.extend_from_slice(portal);
        body.push(0);
        body.extend_from_slice(statement);
        body.extend_from_slice(&[0, 0]); // no parameter format codes
        body.extend_from_slice(&params.to_be_bytes());
        for _ in 0..params {
            body.extend_from_slice(&1i32.to_be_bytes());
            body.push(b'1');
        }
        body.extend_from_slice(&[0, 0]); // no result format codes
        let mut raw = vec![b'B'];
        raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        raw.extend_from_slice(&body);
        raw.into()
    }

    fn describe(kind: u8, name: &[u8]) -> bytes::Bytes {
        let mut raw = vec![b'D', 0, 0, 0, (6 + name.len()) as u8, kind];
        raw.extend_from_slice(name);
        raw.push(0);
        raw.into()
    }

    fn execute(portal: &[u8]) -> bytes::Bytes {
        let mut raw = vec![b'E', 0, 0, 0, (9 + portal.len()) as u8];
        raw.extend_from_slice(portal);
        raw.extend_from_slice(&[0, 0, 0, 0, 0]);
        raw.into()
    }

    fn none(_: &[u8]) -> Option<&'static str> {
        None
    }

    #[test]
    fn a_batch_that_runs_only_a_plain_begin_is_answered_as_postgresql_would() {
        let parse = |sql: &str| codec::parse(b"", sql.as_bytes(), &[]);
        // pgbench -M extended: Parse, Bind, Describe portal, Execute, Sync.
        let b = frames(&[
            parse("BEGIN;"),
            bind(b"", b"", 0),
            describe(b'P', b""),
            execute(b""),
            codec::sync(),
        ]);
        let want = [
            &codec::parse_complete()[..],
            &codec::bind_complete(),
            &codec::no_data(),
            &codec::command_complete("BEGIN"),
            &codec::ready_for_query(IN_TXN),
        ]
        .concat();
        assert_eq!(batch_begin(&b, none), Some((want, "BEGIN")));
        // pgbench -M prepared: Bind of a named statement known to be a plain BEGIN, Describe of
        // the statement.
        let b = frames(&[
            bind(b"", b"P0_0", 0),
            describe(b'S', b"P0_0"),
            execute(b""),
            codec::sync(),
        ]);
        let known = |n: &[u8]| (n == b"P0_0").then_some("START TRANSACTION");
        let want = [
            &codec::bind_complete()[..],
            &codec::parameter_description(&[]),
            &codec::no_data(),
            &codec::command_complete("START TRANSACTION"),
            &codec::ready_for_query(IN_TXN),
        ]
        .concat();
        assert_eq!(batch_begin(&b, known), Some((want, "START TRANSACTION")));
        assert_eq!(
            batch_begin(&b, none),
            None,
            "a named statement not known as a BEGIN"
        );
        // No Describe.
        let b = frames(&[
            parse("begin"),
            bind(b"", b"", 0),
            execute(b""),
            codec::sync(),
        ]);
        assert!(batch_begin(&b, none).is_some());
    }

    #[test]
    fn a_plain_begin_query_is_answered_as_postgresql_would() {
        let want = [
            &codec::command_complete("START TRANSACTION")[..],
            &codec::ready_for_query(IN_TXN),
        ]
        .concat();
        assert_eq!(
            query_begin(b"start transaction;"),
            Some((want, "START TRANSACTION"))
        );
        assert_eq!(query_begin(b"BEGIN READ ONLY"), None);
    }

    #[test]
    fn any_other_batch_runs_when_it_comes() {
        let parse = |sql: &str| codec::parse(b"", sql.as_bytes(), &[]);
        let ok = [
            parse("BEGIN"),
            bind(b"", b"", 0),
            execute(b""),
            codec::sync(),
        ];
        let cases: Vec<Vec<bytes::Bytes>> = vec![
            // Not a plain BEGIN, or more than one.
            vec![
                parse("BEGIN ISOLATION LEVEL SERIALIZABLE"),
                bind(b"", b"", 0),
                execute(b""),
                codec::sync(),
            ],
            vec![
                parse("SELECT 1"),
                bind(b"", b"", 0),
                execute(b""),
                codec::sync(),
            ],
            [&ok[..3], &[execute(b"")], &ok[3..]].concat(),
            [&ok[..], &ok[..]].concat(),
            // Parameters on the Bind, parameter types on the Parse, a named Parse.
            vec![
                parse("BEGIN"),
                bind(b"", b"", 1),
                execute(b""),
                codec::sync(),
            ],
            vec![
                codec::parse(b"", b"BEGIN", &[23]),
                bind(b"", b"", 0),
                execute(b""),
                codec::sync(),
            ],
            vec![
                codec::parse(b"s", b"BEGIN", &[]),
                bind(b"", b"s", 0),
                execute(b""),
                codec::sync(),
            ],
            // The Bind of another statement, an Execute of another portal, a Describe of others.
            vec![
                parse("BEGIN"),
                bind(b"", b"other", 0),
                execute(b""),
                codec::sync(),
            ],
            vec![
                parse("BEGIN"),
                bind(b"p", b"", 0),
                execute(b"q"),
                codec::sync(),
            ],
            vec![
                parse("BEGIN"),
                bind(b"p", b"", 0),
                describe(b'P', b"q"),
                execute(b"p"),
                codec::sync(),
            ],
            vec![
                parse("BEGIN"),
                bind(b"", b"", 0),
                describe(b'S', b"x"),
                execute(b""),
                codec::sync(),
            ],
            // The unnamed statement without its Parse, no Sync, nothing.
            vec![bind(b"", b"", 0), execute(b""), codec::sync()],
            ok[..3].to_vec(),
            vec![],
        ];
        let known = |n: &[u8]| (n == b"other").then_some("BEGIN");
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(batch_begin(&frames(c), known), None, "case {i}");
        }
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
