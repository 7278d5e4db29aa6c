//! The watch connection's rules: tokens, late connections, and its end.

use super::*;
use std::collections::HashSet;

const DEAD: Duration = Duration::from_secs(120);

/// Connections here, as the server sees them (key, epoch), and those attached to the watch.
#[derive(Default)]
struct Server {
    here: HashSet<(u32, u64)>,
    attached: Vec<u32>,
}

impl Server {
    fn attach(&mut self, k: u32, epoch: u64) -> bool {
        let here = self.here.contains(&(k, epoch));
        if here {
            self.attached.push(k);
        }
        here
    }
}

fn sweep(w: &mut Watched<u32>, s: &mut Server, now: Instant) -> Watching {
    let here = s.here.clone();
    w.sweep(now, |k, e| here.contains(&(k, e)), |k, e| s.attach(k, e))
}

#[test]
fn a_bad_first_token_refuses_the_watch_and_attaches_nothing() {
    let t0 = Instant::now();
    let mut s = Server::default();
    s.here.insert((1, 3));
    let mut w = Watched::new(DEAD);
    assert_eq!(w.add(t0, 1, 3, false, || s.attach(1, 3)), Added::Refused);
    assert!(w.is_empty());
    assert!(s.attached.is_empty());
}

#[test]
fn a_bad_later_token_is_ignored_and_the_watch_goes_on() {
    let t0 = Instant::now();
    let mut s = Server::default();
    s.here.insert((1, 3));
    s.here.insert((2, 5));
    let mut w = Watched::new(DEAD);
    assert_eq!(w.add(t0, 1, 3, true, || s.attach(1, 3)), Added::Attached);
    assert_eq!(w.add(t0, 2, 5, false, || s.attach(2, 5)), Added::Ignored);
    assert_eq!(s.attached, vec![1]);
    assert_eq!(w.len(), 1);
    // A good token for it later is taken.
    assert_eq!(w.add(t0, 2, 5, true, || s.attach(2, 5)), Added::Attached);
    assert_eq!(w.len(), 2);
}

#[test]
fn a_connection_not_here_yet_is_attached_when_it_appears_within_the_bound() {
    let t0 = Instant::now();
    let mut s = Server::default();
    let mut w = Watched::new(DEAD);
    // The first WATCH opens the watch even for a connection not here yet.
    assert_eq!(w.add(t0, 1, 3, true, || s.attach(1, 3)), Added::Awaited);
    assert_eq!(w.add(t0, 2, 4, false, || s.attach(2, 4)), Added::Ignored);
    let almost = t0 + APPEAR_WITHIN - Duration::from_millis(1);
    assert_eq!(sweep(&mut w, &mut s, almost), Watching::Open);
    assert_eq!(w.len(), 1);
    s.here.insert((1, 3));
    assert_eq!(sweep(&mut w, &mut s, almost), Watching::Open);
    assert_eq!(s.attached, vec![1]);
    // Attached, it stays watched past the bound while it is here, and is attached once only.
    assert_eq!(
        sweep(&mut w, &mut s, t0 + 10 * APPEAR_WITHIN),
        Watching::Open
    );
    assert_eq!((w.len(), s.attached.len()), (1, 1));
}

#[test]
fn a_connection_that_never_appears_or_appears_at_another_epoch_is_forgotten() {
    let t0 = Instant::now();
    let mut s = Server::default();
    s.here.insert((1, 4));
    let mut w = Watched::new(DEAD);
    assert_eq!(w.add(t0, 1, 3, true, || s.attach(1, 3)), Added::Awaited);
    assert_eq!(sweep(&mut w, &mut s, t0 + APPEAR_WITHIN), Watching::Open);
    assert!(w.is_empty());
    assert!(s.attached.is_empty());
}

#[test]
fn a_watched_connection_that_leaves_or_moves_on_an_epoch_is_forgotten() {
    let t0 = Instant::now();
    let mut s = Server::default();
    s.here.insert((1, 3));
    s.here.insert((2, 3));
    let mut w = Watched::new(DEAD);
    w.add(t0, 1, 3, true, || s.attach(1, 3));
    w.add(t0, 2, 3, true, || s.attach(2, 3));
    s.here.remove(&(1, 3));
    s.here.remove(&(2, 3));
    s.here.insert((2, 4));
    assert_eq!(sweep(&mut w, &mut s, t0), Watching::Open);
    assert!(w.is_empty());
}

#[test]
fn the_watch_closes_once_nothing_has_been_watched_for_the_dead_session_bound() {
    let t0 = Instant::now();
    let mut s = Server::default();
    s.here.insert((1, 3));
    let mut w = Watched::new(DEAD);
    w.add(t0, 1, 3, true, || s.attach(1, 3));
    s.here.clear();
    // Empty from the first sweep that finds it so; closed only past the bound.
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(sweep(&mut w, &mut s, t1), Watching::Open);
    assert_eq!(sweep(&mut w, &mut s, t1 + DEAD), Watching::Open);
    assert_eq!(
        sweep(&mut w, &mut s, t1 + DEAD + Duration::from_millis(1)),
        Watching::Close
    );
}

#[test]
fn a_connection_watched_again_restarts_the_dead_session_bound() {
    let t0 = Instant::now();
    let mut s = Server::default();
    let mut w = Watched::new(DEAD);
    assert_eq!(w.add(t0, 1, 3, true, || s.attach(1, 3)), Added::Awaited);
    let t1 = t0 + APPEAR_WITHIN;
    assert_eq!(sweep(&mut w, &mut s, t1), Watching::Open);
    // Nothing watched since t1; a new WATCH before the bound keeps the watch open.
    s.here.insert((2, 1));
    let t2 = t1 + DEAD - Duration::from_secs(1);
    assert_eq!(w.add(t2, 2, 1, true, || s.attach(2, 1)), Added::Attached);
    assert_eq!(sweep(&mut w, &mut s, t2), Watching::Open);
    assert_eq!(sweep(&mut w, &mut s, t1 + 2 * DEAD), Watching::Open);
    s.here.clear();
    let t3 = t1 + 3 * DEAD;
    assert_eq!(sweep(&mut w, &mut s, t3), Watching::Open);
    assert_eq!(
        sweep(&mut w, &mut s, t3 + DEAD + Duration::from_secs(1)),
        Watching::Close
    );
}
