//! Reading the client's units: the next simple Query or extended-protocol batch (backend output
//! that arrives meanwhile passed on), and what its statements do to the session.

use super::*;

impl Session {
    /// Session-level effects a statement may have.
    pub(super) fn note(&mut self, c: &Classified) {
        self.dirty |= c.session_change;
        self.notify |= c.notify;
        if c.pins_session && self.pinned.is_none() {
            self.pinned = Some(
                "temporary objects, LISTEN, session advisory locks or WITH HOLD cursors".into(),
            );
        }
    }

    /// The statements a batch executes, classified, and bookkeeping of its Parse/Bind/Close.
    pub(super) fn batch_execs(&mut self, frames: &[Frame]) -> Result<Vec<Option<Classified>>> {
        let mut execs = Vec::new();
        for f in frames {
            match codec::parse_front(f)? {
                FrontMsg::Parse { name, sql, .. } => {
                    let c = classify(sql);
                    self.note(&c);
                    if name.is_empty() {
                        self.unnamed = Some(c);
                    } else {
                        self.dirty = true;
                        self.stmts.insert(name.to_vec(), c);
                        match crate::sql::plain_begin(sql) {
                            Some(tag) => self.begin_stmts.insert(name.to_vec(), tag),
                            None => self.begin_stmts.remove(name),
                        };
                    }
                }
                FrontMsg::Bind { portal, statement } => {
                    let c = if statement.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.stmts.get(statement).cloned()
                    };
                    self.portals.insert(portal.to_vec(), c);
                }
                FrontMsg::Execute { portal, .. } => {
                    execs.push(self.portals.get(portal).cloned().flatten());
                }
                FrontMsg::Close { kind: b'S', name } => {
                    self.dirty = true;
                    self.begin_stmts.remove(name);
                }
                _ => {}
            }
        }
        Ok(execs)
    }

    /// Reads the client's next unit. Backend output that arrives meanwhile (notices,
    /// notifications, answers to a Flush) is passed on at once.
    pub(super) async fn next_unit(&mut self) -> Result<Unit> {
        self.at_rest = true;
        let mut batch: Vec<Frame> = Vec::new();
        let mut held = 0usize;
        loop {
            while let Some(f) = codec::split_frame(&mut self.inbuf, self.front.max_message)? {
                match codec::parse_front(&f)? {
                    FrontMsg::Query { .. } if batch.is_empty() => return Ok(Unit::Query(f)),
                    FrontMsg::Query { .. } => {
                        return Err(SessionError::Fatal(
                            "08P01",
                            "Query message inside an unfinished extended-protocol batch".into(),
                        ))
                    }
                    FrontMsg::Terminate => return Ok(Unit::End),
                    FrontMsg::Sync => {
                        batch.push(f);
                        return Ok(Unit::Batch(batch));
                    }
                    FrontMsg::Flush => {
                        // The client waits for answers before its Sync: send what it has.
                        self.at_rest = false;
                        self.begin_alone().await?;
                        batch.push(f);
                        self.send_all(&batch).await?;
                        batch.clear();
                    }
                    FrontMsg::CopyData | FrontMsg::CopyDone | FrontMsg::CopyFail { .. } => {
                        // Outside COPY the server ignores these too.
                    }
                    FrontMsg::Other { tag } => {
                        return Err(SessionError::Fatal(
                            "08P01",
                            format!("unexpected message type {:?}", tag as char),
                        ))
                    }
                    _ => {
                        held += f.raw.len();
                        if held > MAX_BATCH {
                            return Err(SessionError::Fatal(
                                "54000",
                                format!("more than {MAX_BATCH} bytes of messages without a Sync"),
                            ));
                        }
                        batch.push(f);
                    }
                }
            }
            self.flush().await?;
            self.inbuf.reserve(8 << 10);
            tokio::select! {
                // The client first (no random pick): its input is what the loop waits for.
                biased;
                n = self.conn.read_buf(&mut self.inbuf) => {
                    if n? == 0 {
                        return Ok(Unit::End);
                    }
                }
                r = self.be.fill() => {
                    r?;
                    while let Some(f) = self.be.buffered_frame()? {
                        self.out.extend_from_slice(&f.raw);
                    }
                }
            }
        }
    }
}
