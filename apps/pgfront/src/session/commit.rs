//! Running a unit as [`plan::decide`] says — forwarded, under the state lock, wrapped in a
//! hidden BEGIN, or committed — and the commit path with its durable commit point.

use super::*;

impl Session {
    /// Runs one unit as `mode` says.
    pub(super) async fn run_unit(
        &mut self,
        mode: Mode,
        frames: &[Frame],
        copy_in: bool,
    ) -> Result<()> {
        tracing::trace!(cid = %self.cid, ?mode, status = %(self.status as char), "unit");
        // Whether the restart point after the unit was already taken (inside a lock).
        let mut taken = false;
        if !matches!(mode, Mode::Forward | Mode::Locked) {
            // The commit path sends queries of its own first.
            self.begin_alone().await?;
        }
        match mode {
            Mode::Forward => {
                self.send_unit(frames).await?;
                self.status = self.pump(false).await?;
                self.flush().await?;
            }
            Mode::Locked => {
                let guard = self.conn.lock_state().await?;
                self.send_unit(frames).await?;
                self.status = self.pump(false).await?;
                self.flush().await?;
                if self.status == IDLE {
                    // It may have committed: never restart before this point.
                    self.state.txseq += 1;
                    self.restart_point().await?;
                    taken = true;
                }
                drop(guard);
            }
            Mode::Wrap => {
                self.be.send(&codec::query("BEGIN")).await?;
                self.send_all(frames).await?;
                // The check rides along unless COPY input must follow the statement.
                let check = "SELECT pg_current_xact_id_if_assigned()";
                if !copy_in {
                    self.be.send(&codec::query(check)).await?;
                }
                self.be.collect(1).await?;
                let status = self.pump(true).await?;
                let xid = if copy_in {
                    self.be.send(&codec::query(check)).await?;
                    self.be.collect(1).await
                } else {
                    self.be.collect(1).await
                };
                // The transaction id if it wrote anything (an error leaves none to read).
                let xid = xid
                    .ok()
                    .and_then(|sets| sets.concat().first().and_then(|r| r.first().cloned()))
                    .flatten();
                match xid {
                    Some(xid) if status == IN_TXN => {
                        // PostgreSQL commits a simple Query's implicit transaction before it
                        // sends the last statement's CommandComplete, so a commit that fails
                        // (a deferred constraint) is answered by the error alone: that
                        // CommandComplete waits for the commit, in the reply. What came before
                        // it goes out now, ahead of the commit's durable restart point.
                        let done = match frames.first() {
                            Some(f) if f.tag() == b'Q' => self.take_last_complete(),
                            _ => Vec::new(),
                        };
                        self.flush().await?;
                        self.commit(&[], Some(xid), done).await?;
                        taken = true;
                    }
                    _ => {
                        // Read-only or failed: ending it twice would change nothing.
                        let end = if status == IN_TXN {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        self.be.simple(end).await?;
                        self.out.extend_from_slice(&codec::ready_for_query(IDLE));
                        self.flush().await?;
                    }
                }
                self.status = IDLE;
            }
            Mode::Commit => {
                self.commit(frames, None, Vec::new()).await?;
                self.status = IDLE;
                taken = true;
            }
        }
        if self.status == IDLE && !taken {
            self.notify = false;
            self.restart_point().await?;
        }
        Ok(())
    }

    /// The commit path (seed Examples 2 and 3). Under `lock_state`, and before the transaction
    /// can commit, a durable restart point records its id (and, with two-phase commit, its
    /// gid): a restart from it learns from PostgreSQL whether it committed and tells the
    /// client exactly that. With two-phase commit: `PREPARE TRANSACTION`, durable point,
    /// `COMMIT PREPARED`; without: durable point, `COMMIT`. Then the reply and an Idle restart
    /// point. `client` are the client's COMMIT messages (none for a wrapped statement, whose
    /// reply is `done` — its withheld CommandComplete, if any — and ReadyForQuery, and whose
    /// id `xid` is known).
    async fn commit(&mut self, client: &[Frame], xid: Option<String>, done: Vec<u8>) -> Result<()> {
        let guard = match self.conn.lock_state().await {
            Ok(g) => g,
            Err(e) => {
                let _ = self.be.simple("ROLLBACK").await;
                return Err(e.into());
            }
        };
        let xid = match xid {
            Some(x) => x,
            None => {
                let sets = self
                    .be
                    .simple("SELECT pg_current_xact_id_if_assigned()")
                    .await?;
                match sets
                    .concat()
                    .first()
                    .and_then(|r| r.first().cloned())
                    .flatten()
                {
                    Some(x) => x,
                    None => {
                        // Read-only: committing it again after a move changes nothing.
                        self.send_all(client).await?;
                        self.status = self.pump(false).await?;
                        self.flush().await?;
                        self.state.txseq += 1;
                        self.restart_point().await?;
                        drop(guard);
                        return Ok(());
                    }
                }
            }
        };
        // The commit point is a restart point: a restart from it finishes the commit and
        // serves on with the session it carries. Settings and prepared statements changed in
        // this transaction (a first `pgbench -M prepared` transaction parses every statement)
        // are read back now, or a restart would serve on without them (found by `lab_pg`:
        // "prepared statement P_1 does not exist"). Read again at the next Idle point, which
        // also sees what a failed commit undid.
        if self.dirty {
            self.refresh().await?;
            self.dirty = true;
        }
        let wrapped = client.is_empty();
        // A wrapped statement's reply: its withheld CommandComplete (`done`), ReadyForQuery.
        let wrapped_reply = [&done[..], &codec::ready_for_query(IDLE)[..]].concat();
        let echo: Vec<u8> = client.iter().flat_map(|f| f.raw.iter().copied()).collect();
        let gid = self
            .rules()
            .prepare_allowed()
            .then(|| snapshot::gid(&self.cid, self.state.txseq, self.conn.epoch()));
        let reply = if let Some(gid) = &gid {
            self.be
                .send(&codec::query(&format!("PREPARE TRANSACTION '{gid}'")))
                .await?;
            self.send_all(client).await?;
            let prepared = self.answer().await?;
            let echoed = if wrapped {
                None
            } else {
                Some(self.answer().await?)
            };
            if let Err(err) = prepared {
                // Refused (a deferred constraint, a serialization failure, …): the transaction
                // is gone and the client hears why, as from its COMMIT.
                self.out.extend_from_slice(&err);
                self.out.extend_from_slice(&codec::ready_for_query(IDLE));
                self.flush().await?;
                self.state.txseq += 1;
                self.restart_point().await?;
                drop(guard);
                return Ok(());
            }
            match echoed {
                Some(r) => r.unwrap_or_else(|e| e).to_vec(),
                None => wrapped_reply,
            }
        } else if wrapped {
            wrapped_reply
        } else {
            // Known only once COMMIT ran; a restart regenerates it from `echo`.
            Vec::new()
        };
        let snap = self.snapshot(Stage::Commit {
            gid: gid.clone(),
            xid: xid.clone(),
            reply: reply.clone(),
            echo: if reply.is_empty() { echo } else { Vec::new() },
        });
        self.front.crash_point(CrashPoint::Prepared);
        if let Err(e) = self.conn.set_state_durable(snap).await {
            if !matches!(e, StateError::NotDurable(_)) {
                return Err(e.into());
            }
            // The point may be on some backup: whoever restarts from it asks PostgreSQL, which
            // will say "aborted" — and so does this server now.
            tracing::warn!(cid = %self.cid, "{e}; rolling the transaction back");
            match &gid {
                Some(g) => self.be.simple(&format!("ROLLBACK PREPARED '{g}'")).await?,
                None => self.be.simple("ROLLBACK").await?,
            };
            self.out.extend_from_slice(&not_committed());
            self.flush().await?;
            self.state.txseq += 1;
            self.restart_point().await?;
            drop(guard);
            return Ok(());
        }
        self.front.crash_point(CrashPoint::Durable);
        let reply = match &gid {
            Some(g) => {
                self.be.simple(&format!("COMMIT PREPARED '{g}'")).await?;
                reply
            }
            None if wrapped => {
                self.be.simple("COMMIT").await?;
                reply
            }
            None => {
                self.send_all(client).await?;
                self.answer().await?.unwrap_or_else(|e| e).to_vec()
            }
        };
        self.front.crash_point(CrashPoint::Committed);
        self.state.txseq += 1;
        self.out.extend_from_slice(&reply);
        self.flush().await?;
        self.front.crash_point(CrashPoint::Replied);
        self.restart_point().await?;
        drop(guard);
        Ok(())
    }
}

/// What a client whose COMMIT did not commit hears: a serialization failure (retryable), then
/// ReadyForQuery.
pub(super) fn not_committed() -> Vec<u8> {
    let mut b = codec::error_response(
        "ERROR",
        "40001",
        "could not serialize access: the transaction was rolled back while its session moved between servers",
    )
    .to_vec();
    b.extend_from_slice(&codec::ready_for_query(IDLE));
    b
}
