//! Eager mode: replicas, COMMITTED, custody — what makes a crash survivable.

use super::*;
use mtcp_proto::record::StateRecord;
use mtcp_proto::stream::ServerStream;
use mtcp_proto::wire::Msg;

impl World {
    /// `s`'s backup (the next server in the ring), if it is up.
    pub(super) fn backup_of(&self, s: usize) -> Option<usize> {
        let b = (s + 1) % SERVERS.len();
        self.servers[b].down_until.is_none().then_some(b)
    }

    /// Eager mode: whether the serving server's death would lose nothing: its backup holds its
    /// epoch, or — a move not confirmed yet — its keeper is up and its backup can be fenced.
    /// (Two faults at once are not simulated.)
    pub(super) fn recoverable(&self) -> bool {
        let Some(h) = self.servers[self.serving].conn.as_ref() else {
            return false;
        };
        let Some(b) = self.backup_of(self.serving) else {
            return false;
        };
        let stored = self.servers[b]
            .replica
            .as_ref()
            .is_some_and(|r| r.epoch == h.epoch);
        // A keeper with custody of the state the serving server holds (it resumed at the
        // custody's label + 1); one that is the serving server itself (a re-attach) dies with
        // it. Decided from the servers alone: whether the agent can reach that keeper (its
        // lineage) is what the run checks.
        let kept = self.servers.iter().enumerate().any(|(k, s)| {
            k != self.serving
                && s.down_until.is_none()
                && s.custody.as_ref().is_some_and(|(c, _)| {
                    c.holder == SERVERS[self.serving] && c.label + 1 == h.epoch
                })
        });
        stored || kept
    }

    /// Eager mode: `holder` stored its epoch at its backup: its keeper forgets the custody.
    pub(super) fn confirmed(&mut self, holder: usize, epoch: u64) {
        for s in &mut self.servers {
            if s.custody
                .as_ref()
                .is_some_and(|(c, _)| c.holder == SERVERS[holder] && c.label + 1 == epoch)
            {
                s.custody = None;
            }
        }
    }

    /// Eager mode: `holder` stores `rec` at its backup; false if the backup is down or fenced
    /// that epoch.
    pub(super) fn store(&mut self, holder: usize, rec: StateRecord) -> bool {
        let Some(b) = self.backup_of(holder) else {
            return false;
        };
        if self.servers[b].fenced.is_some_and(|f| rec.epoch <= f) {
            return false;
        }
        let epoch = rec.epoch;
        self.servers[b].replica = Some(rec);
        self.confirmed(holder, epoch);
        true
    }

    /// Eager mode: the serving server pushes its newest restart point the client has to its
    /// backup, and tells the agent (COMMITTED).
    pub(super) fn replicate(&mut self) {
        let serving = self.serving;
        let now = self.now + self.link.delay;
        let cid = self.at.cid;
        let Some(h) = self.servers[serving].conn.as_ref().filter(|h| h.attached) else {
            return;
        };
        let Some(snap) = h.stream.replicable(h.committed).cloned() else {
            return;
        };
        let rec = ServerStream::replica_record(cid, h.epoch, &snap);
        if !self.store(serving, rec) {
            return;
        }
        let h = self.servers[serving].conn.as_mut().expect("checked");
        h.committed = Some((snap.out_off, snap.in_off));
        let (in_off, out_off) = (snap.in_off, snap.out_off);
        self.link
            .down
            .push_back((now, Down::Msg(Msg::Committed { in_off, out_off })));
    }
}
