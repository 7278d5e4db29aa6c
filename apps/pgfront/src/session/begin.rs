//! A plain BEGIN answered at once and sent with the transaction's first statement (decision
//! 68): one round trip to PostgreSQL less per explicit transaction.
//!
//! At Idle, a unit that is exactly a plain `BEGIN` — a simple Query
//! ([`crate::sql::plain_begin`]) or an extended-protocol batch that runs nothing else
//! ([`crate::plan::begin::batch_begin`]) — is answered with the reply PostgreSQL gives it and
//! kept. The next unit the backend runs takes it along in the same write, as extended-protocol
//! messages with no Sync (a Query's text as Parse/Bind/Execute, a batch less its Sync), then the
//! unit. If the BEGIN fails, PostgreSQL skips everything up to a Sync, so the unit never runs
//! outside a transaction; the front-end ends the session with the error (the client was told
//! BEGIN succeeded). Before a Flush inside a batch and before the commit path's own queries
//! (an empty transaction's COMMIT) the BEGIN runs by itself first.
//!
//! A restart point is taken only at Idle, so the BEGIN is in the input a restart replays;
//! replayed, it is answered the same way with the same bytes.

use super::*;
use crate::plan::begin::{judge, Sent, Step};

/// A BEGIN the client was told succeeded and the backend has not run yet.
pub(super) struct Deferred {
    /// The client's messages: its Query, or its extended-protocol batch up to its Sync.
    frames: Vec<Frame>,
    /// Its command tag.
    tag: &'static str,
}

impl Session {
    /// Answers the client's plain BEGIN (`frames`, tagged `tag`) with `answer`, what
    /// PostgreSQL would send, and keeps it for the next unit.
    pub(super) fn defer_begin(&mut self, frames: Vec<Frame>, answer: &[u8], tag: &'static str) {
        self.out.extend_from_slice(answer);
        self.status = IN_TXN;
        self.begin = Some(Deferred { frames, tag });
    }

    /// Sends a unit's messages (one Query, or a batch ending with Sync), preceded in the same
    /// write by a deferred BEGIN if there is one, whose answer is read and checked here. The
    /// BEGIN goes as extended-protocol messages with no Sync: a Query as Parse/Bind/Execute of
    /// its text, a batch as its own messages less its Sync. If it fails, PostgreSQL skips the
    /// unit up to the next Sync — the unit's own, or one sent after a Query.
    pub(super) async fn send_unit(&mut self, frames: &[Frame]) -> Result<()> {
        let Some(d) = self.begin.take() else {
            return self.send_all(frames).await;
        };
        let mut b =
            BytesMut::with_capacity(128 + frames.iter().map(|f| f.raw.len()).sum::<usize>());
        match &d.frames[..] {
            [q] if q.tag() == b'Q' => {
                let FrontMsg::Query { sql } = codec::parse_front(q)? else {
                    unreachable!("a Query frame holds a Query");
                };
                b.extend_from_slice(&codec::parse(b"", sql, &[]));
                b.extend_from_slice(&codec::bind_unnamed());
                b.extend_from_slice(&codec::execute_unnamed());
            }
            [batch @ .., _sync] => batch.iter().for_each(|f| b.extend_from_slice(&f.raw)),
            [] => unreachable!("a deferred BEGIN has messages"),
        }
        for f in frames {
            b.extend_from_slice(&f.raw);
        }
        self.be.send(&b).await?;
        let synced = frames.last().is_some_and(|f| f.tag() == b'S');
        self.begin_answer(d.tag, Sent::Extended, synced).await
    }

    /// Runs a deferred BEGIN by itself, if there is one, and checks its answer.
    pub(super) async fn begin_alone(&mut self) -> Result<()> {
        let Some(d) = self.begin.take() else {
            return Ok(());
        };
        self.send_all(&d.frames).await?;
        self.begin_answer(d.tag, Sent::Query, true).await
    }

    /// Reads the answer to a deferred BEGIN, as [`plan::begin::judge`] says: passes on what
    /// PostgreSQL may send at any time, ends the session on anything but the expected answer.
    /// `synced`: a Sync (or the Query's end) follows the BEGIN, so a failed one is followed by
    /// ReadyForQuery without one more Sync.
    async fn begin_answer(&mut self, tag: &'static str, sent: Sent, synced: bool) -> Result<()> {
        let mut tagged = false;
        loop {
            let f = self.be.frame().await?;
            match judge(&codec::parse_back(&f)?, sent, tag, tagged) {
                Step::Next { tagged: t } => tagged = t,
                Step::Pass => self.out.extend_from_slice(&f.raw),
                Step::Done => return Ok(()),
                Step::Failed { code, message } => {
                    // Bring the backend to ReadyForQuery before the session ends.
                    if !synced {
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
