//! How the front-end runs one unit of client work — a simple Query, or an extended-protocol
//! batch up to its Sync — so that no move or crash ever commits it twice. A pure function of
//! the session's transaction status and what the unit executes; the I/O is in `session`.

use crate::sql::{Classified, TxnControl};

pub mod begin;

/// What to do with one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass it through. Nothing commits: the session is inside a transaction (a restart
    /// replays it from the Idle before its BEGIN) or the unit executes nothing.
    Forward,
    /// An autocommit unit: run it inside a `BEGIN` the client does not see, then finish that
    /// transaction through the commit path (nothing to commit if it wrote nothing).
    Wrap,
    /// The client's `COMMIT`/`END` of its open transaction: the commit path.
    Commit,
    /// Anything else that may commit or cannot be wrapped (transaction control in a
    /// multi-statement string, `VACUUM`, `COMMIT AND CHAIN`, a statement the front-end does
    /// not know): run under `lock_state`, so a live move never splits it, followed by a
    /// barrier restart point. (A crash inside it may leave its outcome unknown.)
    Locked,
}

/// Transaction status of ReadyForQuery.
pub const IDLE: u8 = b'I';
pub const IN_TXN: u8 = b'T';
pub const FAILED: u8 = b'E';

/// Whether the commit path may use two-phase commit for the current transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRules {
    /// `--two-phase on`.
    pub two_phase: bool,
    /// The session holds temp objects, LISTEN, … (PREPARE TRANSACTION refuses those).
    pub pinned: bool,
    /// The transaction mentioned NOTIFY (PREPARE TRANSACTION refuses it).
    pub notify: bool,
}

impl CommitRules {
    /// Whether the commit path may PREPARE (else it records the transaction id and asks
    /// `pg_xact_status` after a crash).
    pub fn prepare_allowed(&self) -> bool {
        self.two_phase && !self.pinned && !self.notify
    }
}

/// Decides how to run a unit that executes `execs` (one entry per statement execution: a
/// simple Query's string, or each Execute's statement; `None` when the statement is not known)
/// with the session in transaction `status`. `points`: commits need a durable commit point
/// (eager mode, where another server may restart the session from a backup without this one,
/// or two-phase commit); without, the commit path is [`Mode::Locked`] — a live move waits for
/// it, and nothing else can restart the session.
pub fn decide(status: u8, execs: &[Option<&Classified>], points: bool) -> Mode {
    match decide_with_points(status, execs) {
        Mode::Commit | Mode::Wrap if !points => Mode::Locked,
        m => m,
    }
}

fn decide_with_points(status: u8, execs: &[Option<&Classified>]) -> Mode {
    if execs.iter().any(Option::is_none) {
        return Mode::Locked;
    }
    let execs = || execs.iter().flatten();
    let single = |c: TxnControl| {
        let mut e = execs();
        matches!((e.next(), e.next()), (Some(x), None) if x.statements == 1 && x.first == c)
    };
    let risky = execs().any(|c| c.has_txn_control || c.non_transactional);
    match status {
        IN_TXN if single(TxnControl::Commit) => Mode::Commit,
        IN_TXN | FAILED if risky => Mode::Locked,
        IN_TXN | FAILED => Mode::Forward,
        _ if execs().all(|c| c.statements == 0) => Mode::Forward,
        _ if single(TxnControl::Begin) => Mode::Forward,
        _ if risky => Mode::Locked,
        _ => Mode::Wrap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify;

    const TWO_PHASE: CommitRules = CommitRules {
        two_phase: true,
        pinned: false,
        notify: false,
    };

    fn mode(status: u8, sqls: &[&str], rules: CommitRules) -> Mode {
        let cs: Vec<Classified> = sqls.iter().map(|s| classify(s.as_bytes())).collect();
        let execs: Vec<Option<&Classified>> = cs.iter().map(Some).collect();
        let _ = rules;
        decide(status, &execs, true)
    }

    #[test]
    fn commits_go_through_the_commit_path_or_the_lock() {
        assert_eq!(mode(IN_TXN, &["COMMIT"], TWO_PHASE), Mode::Commit);
        assert_eq!(mode(IN_TXN, &["end;"], TWO_PHASE), Mode::Commit);
        let plain = CommitRules {
            two_phase: false,
            ..TWO_PHASE
        };
        assert_eq!(mode(IN_TXN, &["COMMIT"], plain), Mode::Commit);
        assert!(!plain.prepare_allowed());
        let pinned = CommitRules {
            pinned: true,
            ..TWO_PHASE
        };
        assert_eq!(mode(IN_TXN, &["COMMIT"], pinned), Mode::Commit);
        assert!(!pinned.prepare_allowed() && TWO_PHASE.prepare_allowed());
        assert_eq!(mode(IN_TXN, &["COMMIT AND CHAIN"], TWO_PHASE), Mode::Locked);
        assert_eq!(
            mode(IN_TXN, &["UPDATE t SET a = 1; COMMIT"], TWO_PHASE),
            Mode::Locked
        );
        assert_eq!(mode(FAILED, &["ROLLBACK"], TWO_PHASE), Mode::Locked);
    }

    #[test]
    fn autocommit_work_is_wrapped_and_transactions_pass() {
        assert_eq!(
            mode(IDLE, &["INSERT INTO t VALUES (1)"], TWO_PHASE),
            Mode::Wrap
        );
        assert_eq!(mode(IDLE, &["SELECT 1; SELECT 2"], TWO_PHASE), Mode::Wrap);
        assert_eq!(mode(IDLE, &["BEGIN"], TWO_PHASE), Mode::Forward);
        assert_eq!(
            mode(
                IDLE,
                &["BEGIN; INSERT INTO t VALUES (1); COMMIT"],
                TWO_PHASE
            ),
            Mode::Locked
        );
        assert_eq!(mode(IDLE, &["VACUUM t"], TWO_PHASE), Mode::Locked);
        assert_eq!(mode(IDLE, &[""], TWO_PHASE), Mode::Forward);
        assert_eq!(mode(IDLE, &[], TWO_PHASE), Mode::Forward);
        assert_eq!(
            mode(IN_TXN, &["UPDATE t SET a = 1"], TWO_PHASE),
            Mode::Forward
        );
        assert_eq!(
            mode(IN_TXN, &["SAVEPOINT a", "ROLLBACK TO a"], TWO_PHASE),
            Mode::Forward
        );
        assert_eq!(decide(IN_TXN, &[None], true), Mode::Locked);
    }

    #[test]
    fn without_durable_points_commits_run_locked() {
        let cs: Vec<Classified> = ["COMMIT", "INSERT INTO t VALUES (1)", "BEGIN", "SELECT 1"]
            .iter()
            .map(|s| classify(s.as_bytes()))
            .collect();
        let one = |status, i: usize| decide(status, &[Some(&cs[i])], false);
        assert_eq!(one(IN_TXN, 0), Mode::Locked);
        assert_eq!(one(IDLE, 1), Mode::Locked);
        assert_eq!(one(IDLE, 2), Mode::Forward);
        assert_eq!(one(IN_TXN, 3), Mode::Forward);
        assert_eq!(one(IN_TXN, 1), Mode::Forward);
        // With points, the same units take the commit path.
        assert_eq!(decide(IN_TXN, &[Some(&cs[0])], true), Mode::Commit);
        assert_eq!(decide(IDLE, &[Some(&cs[1])], true), Mode::Wrap);
    }
}
