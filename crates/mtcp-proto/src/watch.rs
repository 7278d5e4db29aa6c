//! A server's side of a watch connection (eager mode, decisions 15 and 45): which of the
//! connections named on it are watched, and when it ends.
//!
//! The agent opens a watch connection with the WATCH of one of its connections here and adds
//! every further connection it holds here with another WATCH on it. Each names the connection,
//! its epoch and its token: a bad token refuses the first WATCH (nothing is watched, the
//! connection is refused) and is ignored on a later one. A connection named but not here yet at
//! that epoch (its WATCH can overtake the end of its own setup) is awaited for
//! [`APPEAR_WITHIN`]; one that was here and left is forgotten. Once nothing has been watched for
//! the dead-session bound, the server closes the watch connection.
//!
//! Whether a connection is here is the caller's to say: [`Watched`] asks through the closures it
//! is given, which also point the connection's hints at this watch (an *attach*).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a connection named on a watch connection may take to appear here.
pub const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// What became of a WATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Watched: the connection is here and its hints now go to this watch.
    Attached,
    /// Watched once it appears here (within [`APPEAR_WITHIN`]).
    Awaited,
    /// A later WATCH with a bad token: not watched, the watch connection goes on.
    Ignored,
    /// The first WATCH with a bad token: the watch connection is refused (`BadToken`).
    Refused,
}

/// Whether the watch connection stays open after a [`Watched::sweep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watching {
    /// Something is watched, or nothing has been for less than the dead-session bound.
    Open,
    /// Nothing has been watched for the dead-session bound: the server closes the connection.
    Close,
}

/// The connections watched on one watch connection, named by `K`: at which epoch, and since
/// when each is awaited if it is not here yet.
#[derive(Debug)]
pub struct Watched<K> {
    conns: HashMap<K, (u64, Option<Instant>)>,
    /// Whether a WATCH was accepted (the connection is open).
    opened: bool,
    /// Since when nothing has been watched.
    empty_since: Option<Instant>,
    dead_session: Duration,
}

impl<K: Copy + Eq + Hash> Watched<K> {
    /// A watch connection not opened yet, closed once nothing has been watched on it for
    /// `dead_session`.
    pub fn new(dead_session: Duration) -> Self {
        Self {
            conns: HashMap::new(),
            opened: false,
            empty_since: None,
            dead_session,
        }
    }

    /// A WATCH for `key` at `epoch`, received at `now`, whose token checked `token_ok`.
    /// `attach` is asked only for a good token: it points the connection's hints at this watch
    /// and says whether the connection is here at `epoch`.
    pub fn add(
        &mut self,
        now: Instant,
        key: K,
        epoch: u64,
        token_ok: bool,
        attach: impl FnOnce() -> bool,
    ) -> Added {
        if !token_ok {
            return if self.opened {
                Added::Ignored
            } else {
                Added::Refused
            };
        }
        self.opened = true;
        let here = attach();
        self.conns.insert(key, (epoch, (!here).then_some(now)));
        if here {
            Added::Attached
        } else {
            Added::Awaited
        }
    }

    /// The periodic check at `now`: an attached connection that is no longer `here` at its
    /// epoch is forgotten; an awaited one is attached if `attach` finds it here, and forgotten
    /// once awaited for [`APPEAR_WITHIN`]. Then whether the watch connection stays open.
    pub fn sweep(
        &mut self,
        now: Instant,
        mut here: impl FnMut(K, u64) -> bool,
        mut attach: impl FnMut(K, u64) -> bool,
    ) -> Watching {
        self.conns.retain(|&key, (epoch, waiting)| match waiting {
            None => here(key, *epoch),
            Some(since) => {
                if attach(key, *epoch) {
                    *waiting = None;
                    true
                } else {
                    now.saturating_duration_since(*since) < APPEAR_WITHIN
                }
            }
        });
        if !self.conns.is_empty() {
            self.empty_since = None;
            Watching::Open
        } else if now.saturating_duration_since(*self.empty_since.get_or_insert(now))
            > self.dead_session
        {
            Watching::Close
        } else {
            Watching::Open
        }
    }

    /// How many connections are watched or awaited.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is watched or awaited.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

#[cfg(test)]
mod tests;
