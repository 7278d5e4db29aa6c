//! A move: the agent's plan, the destination's takeover, the FETCH (from the origin, a
//! keeper's custody or a backup's replica).

use super::*;
use mtcp_proto::agent::{self, MoveError, MovePlan};
use mtcp_proto::custody::{Custody, Fence, Handout, Step};
use mtcp_proto::stream::{replica_for_client, ServerStream};
use mtcp_proto::takeover;
use mtcp_proto::wire::{Migrate, Msg, RefuseCode};
use mtcp_proto::Token;
use rand::Rng;

impl World {
    /// A move: MIGRATE to candidates in order until one resumes the connection.
    pub(super) fn move_connection(&mut self, broken: bool) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        if !broken {
            // The agent closes the session it leaves: what was in flight is lost with it.
            self.link.up.clear();
            self.link.down.clear();
            if let Some(h) = self.servers[self.serving].conn.as_mut() {
                h.attached = false;
            }
        }
        let to = self
            .rng
            .gen_bool(0.5)
            .then(|| SERVERS[self.rng.gen_range(0..SERVERS.len())]);
        let mut plan =
            MovePlan::new(&self.at, self.stream.position(), to).map_err(|e| e.to_string())?;
        let cands = self.at.candidates(to).map_err(|e| e.to_string())?;
        let mut tried = 0;
        let lineage = self.stream.lineage.clone();
        while let Some(a) = plan.next(&lineage) {
            tried += 1;
            let dest = server_index(&a.cand.id);
            let refuse = |code, why: &str| MoveError::Refused {
                code,
                reason: why.into(),
            };
            if self.servers[dest].down_until.is_some() {
                plan.refused(&a.cand, &MoveError::Channel("connection refused".into()));
                continue;
            }
            // A candidate may be busy while a live one comes after it in this round.
            let i = (tried - 1) % cands.len();
            let later_live = cands[i + 1..]
                .iter()
                .any(|c| self.servers[server_index(&c.id)].down_until.is_none());
            if later_live && self.rng.gen_bool(0.2) {
                plan.refused(&a.cand, &refuse(RefuseCode::Busy, "busy"));
                continue;
            }
            let m = &a.migrate;
            takeover::admit(m, true, false, SERVERS[dest])
                .map_err(|(c, why)| format!("{c:?}: {why}"))?;
            let Some(Fetched {
                rec,
                claimed,
                keeper,
            }) = self.fetch(m, dest)?
            else {
                plan.refused(
                    &a.cand,
                    &refuse(RefuseCode::OriginUnreachable, "no origin, no replica"),
                );
                continue;
            };
            let kept = rec.clone();
            let (rec, from_replica) =
                takeover::restart_record(m, rec, claimed, false).map_err(|(code, why)| {
                    format!("destination refused the record ({code:?}): {why}")
                })?;
            let (stream, tail) = ServerStream::restart(&rec);
            let at = takeover::Destination {
                id: SERVERS[dest],
                alternates: self.at.alternates.clone(),
                heartbeat_ms: 100,
            };
            let epoch = takeover::next_epoch(&rec);
            let token = Token([epoch as u8; 32]);
            let resumed = takeover::resumed(&rec, at, token, 0, from_replica);
            let r = agent::answer(Msg::Resumed(resumed)).map_err(|e| e.to_string())?;
            let from = Step {
                server: m.origin.clone(),
                epoch: m.epoch,
                token: m.token,
            };
            let resend = self.stream.resume(&r, from).map_err(|e| e.to_string())?;
            self.at.resumed(&r, &a.cand.data);
            let mut held = Held::new(stream, App::restore(rec.snapshot.as_ref()), epoch);
            let now = self.now + self.link.delay;
            if !tail.is_empty() {
                self.link.down.push_back((now, Down::Data(tail.clone())));
            }
            if let Some(k) = keeper {
                // Whoever gave the state out keeps it until the destination confirms.
                self.servers[k].custody = Some((Custody::new(m.epoch, SERVERS[dest]), kept));
            }
            if self.eager && self.rng.gen_bool(0.6) {
                // The destination's backup holds the new epoch before RESUMED (the runtime's
                // `protect_takeover`); the agent hears COMMITTED. Otherwise (the push timed
                // out) the move stays unconfirmed: the keeper's custody and the agent's lineage
                // cover it until a later push.
                let replica = ServerStream::restarted_replica(&rec, epoch);
                if self.store(dest, replica) {
                    held.committed = Some((rec.snap_out, rec.snap_in));
                    let (in_off, out_off) = (rec.snap_in, rec.snap_out);
                    self.link
                        .down
                        .push_back((now, Down::Msg(Msg::Committed { in_off, out_off })));
                }
            }
            self.servers[dest].conn = Some(held);
            self.serving = dest;
            for c in resend.chunks {
                self.send_up(Up::Data(c));
            }
            if let Some(total) = resend.up_fin {
                self.send_up(Up::Fin(total));
            }
            self.moves += 1;
            self.trace(format!(
                "moved: MIGRATE epoch {} origin {} -> {} at epoch {epoch} (claimed {claimed}, protected {}, lineage {:?})",
                m.epoch, m.origin, SERVERS[dest], self.servers[dest].conn.as_ref().unwrap().committed.is_some(), self.stream.lineage
            ));
            return Ok(());
        }
        Err(format!(
            "no candidate took the connection: {}",
            plan.failure()
        ))
    }

    /// A destination gets the state for MIGRATE `m`: from the origin, which checks the agent's
    /// position against what it sent and lets the connection go; or, in eager mode, from a
    /// keeper that still has custody of that epoch (it fences the holder's successor epoch at
    /// the holder's backup first: `Custody::supersede`); or, with the origin down, from the
    /// replica a live backup holds at that epoch (claimed: no one else gets it), made into a
    /// record for the client's position. `None`: none of them is there.
    pub(super) fn fetch(&mut self, m: &Migrate, dest: usize) -> Result<Option<Fetched>, String> {
        let origin = server_index(&m.origin);
        if let Some(held) = self.servers[origin].conn.take() {
            if held.epoch != m.epoch {
                return Err(format!(
                    "origin at epoch {} asked for {}",
                    held.epoch, m.epoch
                ));
            }
            let rec = held
                .stream
                .record(m.cid, m.epoch, m.down_recv, m.sum_from, m.down_sum)
                .map_err(|(code, why)| format!("origin refused the record ({code:?}): {why}"))?;
            let keeper = self.eager.then_some(origin);
            return Ok(Some(Fetched {
                rec,
                claimed: false,
                keeper,
            }));
        }
        if !self.eager {
            return Ok(None);
        }
        let keeper = (0..SERVERS.len()).find(|&k| {
            self.servers[k].down_until.is_none()
                && self.servers[k]
                    .custody
                    .as_ref()
                    .is_some_and(|(c, _)| c.epoch == m.epoch)
        });
        if let Some(k) = keeper {
            let (mut custody, kept) = self.servers[k].custody.take().expect("found");
            let next = custody
                .successor(m.epoch)
                .map_err(|(c, why)| format!("custody: {c:?}: {why}"))?;
            let holder = server_index(&custody.holder);
            let b = (holder + 1) % SERVERS.len();
            let fence = if self.servers[b].down_until.is_some() {
                Fence::Unreachable
            } else {
                self.servers[b].fenced = Some(next);
                match self.servers[b].replica.as_ref().filter(|r| r.epoch == next) {
                    Some(r) => Fence::Record(r.snap_out, r.snap_in),
                    None => Fence::Nothing,
                }
            };
            let (handout, label) = custody
                .supersede(SERVERS[dest], &[fence], 0, false)
                .map_err(|(c, why)| format!("supersede: {c:?}: {why}"))?;
            let mut rec = match handout {
                Handout::Kept => kept.clone(),
                Handout::Successor(_) => self.servers[b].replica.clone().expect("fenced"),
            };
            rec.epoch = label;
            self.servers[k].custody = Some((custody, kept));
            self.fallbacks += 1;
            return Ok(Some(Fetched {
                rec,
                claimed: false,
                keeper: None,
            }));
        }
        if self.servers[origin].down_until.is_none() {
            return Ok(None);
        }
        let Some(b) = (0..SERVERS.len()).find(|&b| {
            self.servers[b].down_until.is_none()
                && self.servers[b]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.epoch == m.epoch)
        }) else {
            return Ok(None);
        };
        let raw = self.servers[b].replica.take().expect("found");
        let rec = replica_for_client(raw.clone(), m.down_recv, &m.ranges(), m.up_base)
            .map_err(|(code, why)| format!("replica refused for the client ({code:?}): {why}"))?;
        // The backup whose replica was claimed keeps it until the new holder confirms.
        Ok(Some(Fetched {
            rec,
            claimed: true,
            keeper: Some(b),
        }))
    }
}
