//! Eager mode: replicas, COMMITTED, custody — what makes a crash survivable.

use super::*;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::Msg;

impl World {
    /// Eager mode: whether the serving server's death would lose nothing (one fault): its
    /// backup holds its epoch, unclaimed; or — a move not confirmed yet — a live origin keeps
    /// custody of the state it handed it; or it took the connection from a replica at a backup
    /// whose origin is down, which keeps that custody. Decided from the servers alone: whether
    /// the agent finds the way (its lineage) is what the run checks.
    pub(super) fn recoverable(&self) -> bool {
        let serving = self.serving;
        let Some(h) = self.servers[serving].conn.as_ref() else {
            return false;
        };
        let stored = self.backups(serving).into_iter().any(|b| {
            self.reachable(b)
                && self.servers[b]
                    .entry
                    .as_ref()
                    .is_some_and(|(s, r)| s.epoch == h.epoch && !s.claimed() && r.is_some())
        });
        let me = SERVERS[serving];
        let kept = (0..SERVERS.len()).any(|k| {
            k != serving
                && self.reachable(k)
                && self.servers[k]
                    .custody
                    .as_ref()
                    .is_some_and(|(c, _)| c.holder == me && c.label + 1 == h.epoch)
        });
        let claimed = (0..SERVERS.len()).any(|k| {
            k != serving
                && self.reachable(k)
                && (0..SERVERS.len())
                    .any(|o| self.servers[o].down_until.is_some() && self.backups(o).contains(&k))
                && self.servers[k].entry.as_ref().is_some_and(|(s, _)| {
                    s.custody && s.claimer.as_deref() == Some(me) && s.label + 1 == h.epoch
                })
        });
        stored || kept || claimed
    }

    /// The agent spoke on `holder`'s new session: COMMITTED for what its backup holds, and its
    /// keepers may forget (decisions 43, 48).
    pub(super) fn heard(&mut self, holder: usize) {
        let now = self.now + self.link.delay;
        let h = self.servers[holder].conn.as_mut().expect("held");
        let step = h.commit.on_heard();
        let epoch = h.epoch;
        self.commit_step(holder, epoch, step, now);
    }

    /// What `mtcp_proto::commit` says after an event, done: COMMITTED down the link, the
    /// keepers told.
    fn commit_step(&mut self, holder: usize, epoch: u64, step: CommitStep, now: usize) {
        if let Some((out_off, in_off)) = step.tell {
            self.link
                .down
                .push_back((now, Down::Msg(Msg::Committed { in_off, out_off })));
        }
        if step.confirm {
            self.confirmed(holder, epoch);
        }
    }

    /// Eager mode: the serving server pushes its newest restart point the client has to its
    /// backup, and tells the agent (COMMITTED) once it heard it. A detached holder (a woken
    /// origin, a racer) pushes too: refused, it lets the connection go.
    pub(super) fn replicate(&mut self) {
        let cid = self.at.cid;
        for (s, id) in SERVERS.iter().enumerate() {
            if s == self.serving || !self.reachable(s) {
                continue;
            }
            let Some(h) = self.servers[s]
                .conn
                .as_ref()
                .filter(|h| !h.attached && h.taken.is_none())
            else {
                continue;
            };
            // Its newest restart point again (a push in flight when it hung is retried).
            let Some(snap) = h.stream.replicable(None).cloned() else {
                continue;
            };
            let epoch = h.epoch;
            let rec = ServerStream::replica_record(cid, epoch, &snap);
            // Refused by a backup: it lets go; if a destination took it over from the replica
            // at its epoch (TAKEN), it keeps the stream as that destination's keeper.
            let refused_at = self.push(s, &rec).refused_at;
            if !refused_at.is_empty() {
                let taken = refused_at.iter().find_map(|&b| {
                    self.servers[b]
                        .entry
                        .as_ref()
                        .and_then(|(slot, _)| slot.taken(epoch, id))
                });
                self.trace(format!(
                    "{}'s push refused: it lets go (taken: {taken:?})",
                    SERVERS[s]
                ));
                match taken {
                    Some(c) => self.servers[s].conn.as_mut().expect("held").taken = Some(c),
                    None => self.servers[s].conn = None,
                }
                self.stale_refused += 1;
            }
        }
        let serving = self.serving;
        if !self.reachable(serving) {
            return;
        }
        let now = self.now + self.link.delay;
        let Some(h) = self.servers[serving].conn.as_ref().filter(|h| h.attached) else {
            return;
        };
        let Some(snap) = h.stream.replicable(h.commit.committed()).cloned() else {
            return;
        };
        let rec = ServerStream::replica_record(cid, h.epoch, &snap);
        // Every backup must store it.
        if !self.push(serving, &rec).stored {
            return;
        }
        let h = self.servers[serving].conn.as_mut().expect("checked");
        let step = h.commit.stored((snap.out_off, snap.in_off));
        let epoch = h.epoch;
        self.commit_step(serving, epoch, step, now);
    }
}
