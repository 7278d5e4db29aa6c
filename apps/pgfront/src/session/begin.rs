//! A plain BEGIN answered at once and sent with the transaction's first statement (decision
//! 68): one round trip to PostgreSQL less per explicit transaction.
//!
//! At Idle, a unit that is exactly a plain `BEGIN` ([`crate::sql::plain_begin`]) is answered
//! with the reply PostgreSQL gives it (CommandComplete, ReadyForQuery `T`) and kept. The next
//! unit takes it along:
//! - a simple Query: in the same write, as an extended-protocol Parse/Bind/Execute of the
//!   client's BEGIN text with no Sync, then the Query. If the BEGIN fails, PostgreSQL skips
//!   everything up to a Sync, so the Query never runs outside a transaction; the front-end then
//!   sends the Sync and ends the session with the error (the client was told BEGIN succeeded).
//! - anything else (extended-protocol batches, a Flush, the commit path's own queries): the
//!   client's BEGIN Query by itself first, its answer checked, then the unit as before.
//!
//! A restart point is taken only at Idle, so the BEGIN is in the input a restart replays;
//! replayed, it is answered the same way with the same bytes.

use super::*;
use crate::plan::begin::{judge, Sent, Step};

/// A BEGIN the client was told succeeded and the backend has not run yet.
pub(super) struct Deferred {
    /// The client's Query message.
    query: Frame,
    /// Its command tag.
    tag: &'static str,
}

impl Session {
    /// Answers the client's plain BEGIN (`tag`) at once and keeps it for the next unit.
    pub(super) fn defer_begin(&mut self, query: Frame, tag: &'static str) {
        self.out.extend_from_slice(&codec::command_complete(tag));
        self.out.extend_from_slice(&codec::ready_for_query(IN_TXN));
        self.status = IN_TXN;
        self.begin = Some(Deferred { query, tag });
    }

    /// Sends a unit's messages, preceded by a deferred BEGIN if there is one (in the same write
    /// when the unit is one simple Query), whose answer is read and checked here.
    pub(super) async fn send_unit(&mut self, frames: &[Frame]) -> Result<()> {
        match (&self.begin, frames) {
            (None, _) => self.send_all(frames).await,
            (Some(_), [q]) if q.tag() == b'Q' => {
                let Some(d) = self.begin.take() else {
                    unreachable!("matched Some");
                };
                let FrontMsg::Query { sql } = codec::parse_front(&d.query)? else {
                    unreachable!("a deferred BEGIN is a Query");
                };
                let mut b = BytesMut::with_capacity(64 + q.raw.len());
                b.extend_from_slice(&codec::parse(b"", sql, &[]));
                b.extend_from_slice(&codec::bind_unnamed());
                b.extend_from_slice(&codec::execute_unnamed());
                b.extend_from_slice(&q.raw);
                self.be.send(&b).await?;
                self.begin_answer(d.tag, Sent::Extended).await
            }
            (Some(_), _) => {
                self.begin_alone().await?;
                self.send_all(frames).await
            }
        }
    }

    /// Runs a deferred BEGIN by itself, if there is one, and checks its answer.
    pub(super) async fn begin_alone(&mut self) -> Result<()> {
        let Some(d) = self.begin.take() else {
            return Ok(());
        };
        self.be.send(&d.query.raw).await?;
        self.begin_answer(d.tag, Sent::Query).await
    }

    /// Reads the answer to a deferred BEGIN, as [`plan::begin::judge`] says: passes on what
    /// PostgreSQL may send at any time, ends the session on anything but the expected answer.
    async fn begin_answer(&mut self, tag: &'static str, sent: Sent) -> Result<()> {
        let mut tagged = false;
        loop {
            let f = self.be.frame().await?;
            match judge(&codec::parse_back(&f)?, sent, tag, tagged) {
                Step::Next { tagged: t } => tagged = t,
                Step::Pass => self.out.extend_from_slice(&f.raw),
                Step::Done => return Ok(()),
                Step::Failed { code, message } => {
                    // Bring the backend to ReadyForQuery before the session ends.
                    if sent == Sent::Extended {
                        self.be.send(&codec::sync()).await?;
                    }
                    while !matches!(
                        codec::parse_back(&self.be.frame().await?)?,
                        BackMsg::ReadyForQuery { .. }
                    ) {}
                    let msg = format!(
                        "terminating connection: the transaction's {tag}, answered before it ran, failed: {message}"
                    );
                    tracing::warn!(cid = %self.cid, %code, "{msg}");
                    return Err(SessionError::Fatal(fatal_code(&code), msg));
                }
                Step::Unexpected => {
                    return Err(SessionError::Fatal(
                        "XX000",
                        format!(
                        "terminating connection: unexpected answer {:?} to the transaction's {tag}",
                        f.tag() as char
                    ),
                    ))
                }
            }
        }
    }
}

/// `SessionError::Fatal` takes a static SQLSTATE: the common ones a BEGIN can fail with, else
/// `XX000`.
fn fatal_code(code: &str) -> &'static str {
    ["57014", "57P01", "53200", "25001", "40001"]
        .into_iter()
        .find(|c| *c == code)
        .unwrap_or("XX000")
}
