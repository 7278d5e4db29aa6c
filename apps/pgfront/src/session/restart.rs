//! Restarts and restart points: a session that moved here rebuilt on its new backend (a commit
//! that was under way finished, one that was not safe rolled back), the snapshot of the
//! session, and the restart point taken at Idle.

use super::commit::not_committed;
use super::*;

/// The replay's bound on lock waits, set for the session (decision 76).
pub(super) struct ReplayBound {
    /// The client's own `lock_timeout` (`None`: the default), put back at the next Idle.
    own: Option<String>,
    /// The replay is over: inside the transaction it ran in, the client's value holds again.
    lifted: bool,
}

impl Session {
    /// A session that moved here: fence the old backend, rebuild the session, finish a commit
    /// that was under way or roll back one that was not yet safe, then serve.
    pub(super) async fn restart(&mut self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let key = self.cancel_key();
        let epoch = self.conn.epoch();
        let fenced = self
            .front
            .registry
            .register_and_fence(&self.cid, epoch, self.be.pid, key)
            .await?;
        let t1 = t0.elapsed();
        // Transactions an origin prepared and died (or hung) before their commit point was
        // durable: asked along with the restore, after the fence; rolled back below. (The
        // function, not the `pg_prepared_xacts` view: planning the view's joins cost more than
        // running it, on every restart.)
        let check = format!(
            "SELECT gid FROM pg_prepared_xact() WHERE gid LIKE 'mtcp:{}:%'",
            self.cid
        );
        let sets = self.restore(&check).await?;
        let prepared: Vec<String> = sets
            .last()
            .into_iter()
            .flatten()
            .filter_map(|r| r.first().cloned().flatten())
            .collect();
        tracing::debug!(cid = %self.cid, fenced, register_and_fence = ?t1, restore = ?(t0.elapsed() - t1), "session restarting here");
        match self.state.stage.clone() {
            Stage::Pinned { reason } => {
                return Err(SessionError::Fatal(
                    "57P01",
                    format!("terminating connection: the session moved to another server but cannot move ({reason})"),
                ));
            }
            Stage::Commit {
                gid,
                xid,
                reply,
                echo,
            } => {
                if let Some(gid) = &gid {
                    let q = format!("SELECT 1 FROM pg_prepared_xacts WHERE gid = '{gid}'");
                    if !self.be.simple(&q).await?.concat().is_empty() {
                        self.be.simple(&format!("COMMIT PREPARED '{gid}'")).await?;
                    }
                }
                let q = format!("SELECT pg_xact_status('{}'::xid8)", xid.replace('\'', ""));
                let status = self.be.simple(&q).await?.concat();
                let status = status.first().and_then(|r| r.first().cloned()).flatten();
                tracing::info!(cid = %self.cid, %xid, ?gid, ?status, "finishing a commit that was under way");
                match status.as_deref() {
                    Some("committed") if !reply.is_empty() => self.out.extend_from_slice(&reply),
                    Some("committed") => {
                        // Its COMMIT messages on an idle backend: the same answer, less the
                        // "no transaction in progress" warning.
                        self.be.send(&echo).await?;
                        let r = self.answer().await?.unwrap_or_else(|e| e);
                        self.out.extend_from_slice(&r);
                    }
                    Some("aborted") => self.out.extend_from_slice(&not_committed()),
                    _ => {
                        return Err(SessionError::Fatal(
                            "08007",
                            format!("the outcome of transaction {xid} is unknown"),
                        ))
                    }
                }
                self.state.txseq += 1;
                self.flush().await?;
                self.restart_point().await?;
            }
            Stage::Idle => {}
        }
        // Prepared by an origin that died before its commit point was durable — this point's
        // transaction, or (restarting from a Commit point whose Idle successor never reached
        // the backups) a later one: its client was told nothing, and it is replayed from the
        // input below. Its locks would block that replay for good.
        for gid in prepared
            .iter()
            .filter(|g| snapshot::left_over(g, &self.cid, self.state.txseq, epoch))
        {
            tracing::info!(cid = %self.cid, %gid, "rolling back a transaction prepared by a server that did not finish it");
            self.be
                .simple(&format!("ROLLBACK PREPARED '{gid}'"))
                .await?;
        }
        self.bound_replay().await?;
        self.serve().await
    }

    /// Before a replay of statements the client was already answered (its open transaction,
    /// rebuilt on this backend): the backend waits at most `replay_lock_timeout` for a lock.
    /// The fence released the old backend's locks, and a session that was waiting for one may
    /// have taken it before this replay got there — a session whose client may be blocked on
    /// this one (pgbench's `PQprepare` waits for this session while its thread holds the other
    /// transaction open): no party could break that wait. Past the bound the replay's answer
    /// differs from the one the client has, and the runtime closes the client's connection —
    /// the transaction never committed, and nobody hangs (decision 76). Set for the session,
    /// here at Idle (a `SET` inside a transaction that rolls back would be undone).
    async fn bound_replay(&mut self) -> Result<()> {
        let bound = self.front.replay_lock_timeout;
        if bound.is_zero() || !self.conn.replaying() {
            return Ok(());
        }
        let own = self.client_setting("lock_timeout");
        self.be
            .simple(&format!("SET lock_timeout = {}", bound.as_millis().max(1)))
            .await?;
        self.replay_locks = Some(ReplayBound { own, lifted: false });
        Ok(())
    }

    /// Once the replay is over (everything the client had is regenerated), before the first
    /// statement the client was not answered for: inside a transaction the client's own value
    /// holds for its rest (`SET LOCAL`; nothing to do in a failed one, whose statements all
    /// fail at once); with the backend idle, the client's value is put back for the session.
    pub(super) async fn end_replay_bound(&mut self) -> Result<()> {
        let Some(b) = &self.replay_locks else {
            return Ok(());
        };
        if !b.lifted && self.conn.replaying() {
            return Ok(());
        }
        // The backend is idle at Idle, and before a deferred BEGIN was sent.
        if self.status == IDLE || self.begin.is_some() {
            let sql = match &b.own {
                Some(v) => set_config("lock_timeout", v, false)?,
                None => "RESET lock_timeout".into(),
            };
            self.be.simple(&sql).await?;
            self.replay_locks = None;
        } else if !b.lifted {
            if self.status == IN_TXN {
                let sql = match &b.own {
                    Some(v) => set_config("lock_timeout", v, true)?,
                    None => "SET LOCAL lock_timeout TO DEFAULT".into(),
                };
                self.be.simple(&sql).await?;
            }
            if let Some(b) = &mut self.replay_locks {
                b.lifted = true;
            }
        }
        Ok(())
    }

    /// The client's value of a setting, as the session's state holds it.
    fn client_setting(&self, name: &str) -> Option<String> {
        self.state
            .gucs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    /// Recreates the session's settings and prepared statements on the new backend, all sent
    /// at once in one write; `last` is one more query sent along, whose rows come back as the
    /// last result set.
    async fn restore(&mut self, last: &str) -> Result<Vec<crate::backend::Rows>> {
        let mut sql = String::new();
        for (name, value) in &self.state.gucs {
            sql += &set_config(name, value, false)?;
            sql.push(';');
        }
        // All of it in one write.
        let mut out = BytesMut::new();
        let mut answers = 0;
        if !sql.is_empty() {
            out.extend_from_slice(&codec::query(&sql));
            answers += 1;
        }
        // Each SQL PREPARE in a query string of its own, after the settings (its
        // search_path): PostgreSQL records the whole query string as the statement's text,
        // which the next `refresh` reads back; sharing a string with the settings, it would
        // look like a PREPARE inside a multi-statement string and pin the session.
        let mut seen = std::collections::HashSet::new();
        for p in self.state.prepared.iter().filter(|p| p.from_sql) {
            if seen.insert(p.sql.clone()) {
                out.extend_from_slice(&codec::query(&String::from_utf8_lossy(&p.sql)));
                answers += 1;
            }
        }
        for p in self.state.prepared.iter().filter(|p| !p.from_sql) {
            out.extend_from_slice(&codec::parse(&p.name, &p.sql, &p.types));
            out.extend_from_slice(&codec::sync());
            answers += 1;
        }
        out.extend_from_slice(&codec::query(last));
        self.be.send(&out).await?;
        Ok(self.be.collect(answers + 1).await?)
    }

    /// The snapshot of the session as it is now, at `stage`.
    pub(super) fn snapshot(&mut self, stage: Stage) -> Vec<u8> {
        // Encoded in place (one per transaction): the session's own state with this stage and
        // the unread input, then its stage put back.
        let stage = std::mem::replace(&mut self.state.stage, stage);
        self.state.leftover.clear();
        self.state.leftover.extend_from_slice(&self.inbuf);
        let v = self.state.encode();
        self.state.stage = stage;
        v
    }

    /// A restart point at Idle (everything sent so far is answered): refreshes the settings and
    /// prepared statements first if they may have changed. A pinned session leaves a marker
    /// instead, so that a move ends it clearly.
    pub(super) async fn restart_point(&mut self) -> Result<()> {
        if self.dirty {
            self.refresh().await?;
        }
        let stage = match &self.pinned {
            Some(reason) => Stage::Pinned {
                reason: reason.clone(),
            },
            None => Stage::Idle,
        };
        let snap = self.snapshot(stage);
        match self.conn.set_state_barrier(snap) {
            // Restarted here and still regenerating what the client already has (its position
            // lies past this point): the restart point this session came with stays the one
            // to use until that is checked, and a restart from it reaches this same point.
            Err(StateError::Replaying) => {
                tracing::debug!(cid = %self.cid, "restart point skipped while the replay is checked");
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Reads the session's settings and prepared statements back from the backend.
    pub(super) async fn refresh(&mut self) -> Result<()> {
        let sets = self
            .be
            .simple(
                "SELECT name, setting FROM pg_settings WHERE source = 'session' ORDER BY name;
                 SELECT name, statement, from_sql, parameter_types::oid[]::text
                   FROM pg_prepared_statements ORDER BY prepare_time, name",
            )
            .await?;
        let get =
            |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        self.state.gucs = sets.first().map_or(Vec::new(), |rows| {
            rows.iter().map(|r| (get(r, 0), get(r, 1))).collect()
        });
        if let Some(ReplayBound { own, .. }) = &self.replay_locks {
            // The replay's bound is not the client's setting: the client's value stays.
            self.state.gucs.retain(|(n, _)| n != "lock_timeout");
            if let Some(v) = own {
                self.state.gucs.push(("lock_timeout".into(), v.clone()));
                self.state.gucs.sort();
            }
        }
        self.state.prepared = sets.get(1).map_or(Vec::new(), |rows| {
            rows.iter()
                .map(|r| Prepared {
                    name: get(r, 0).into_bytes(),
                    sql: get(r, 1).into_bytes(),
                    from_sql: get(r, 2) == "t",
                    types: get(r, 3)
                        .trim_matches(|c| c == '{' || c == '}')
                        .split(',')
                        .filter_map(|t| t.parse().ok())
                        .collect(),
                })
                .collect()
        });
        if self
            .state
            .prepared
            .iter()
            .any(|p| p.from_sql && classify(&p.sql).statements != 1)
            && self.pinned.is_none()
        {
            self.pinned = Some("a PREPARE inside a multi-statement query string".into());
        }
        self.dirty = false;
        Ok(())
    }
}

/// `SELECT set_config(name, value, local)`, both quoted as literals; a FATAL error when one
/// cannot be.
fn set_config(name: &str, value: &str, local: bool) -> Result<String> {
    let (Some(n), Some(v)) = (literal(name), literal(value)) else {
        return Err(SessionError::Fatal(
            "57P01",
            format!("cannot restore setting {name}"),
        ));
    };
    Ok(format!("SELECT set_config({n}, {v}, {local})"))
}
