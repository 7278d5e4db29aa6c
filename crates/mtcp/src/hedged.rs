//! TCP connects that one lost SYN or SYN-ACK does not hold up for a second (decision 71).
//!
//! Linux retransmits an unanswered SYN after its initial RTO of one second, and a server its
//! SYN-ACK likewise; no socket option shortens that for one connection. On a path losing a
//! few percent, that second landed inside the bounds a move waits on its peers (a fence of the
//! epoch a dead destination held, a FETCH from the origin), which are a few hundred
//! milliseconds: the peer was alive and answering, and the move failed anyway. So a connect
//! not answered within [`mtcp_proto::timing::hedge_after`] gets a second one beside it, with
//! its own SYN, and later a third; the first to complete is used and the others are dropped
//! (a socket dropped mid-handshake is closed; one the server already accepted sees its peer
//! close before the preamble). On loopback, and on any path where the first handshake is
//! answered in time, nothing more happens than one `connect`.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Connects under way at once at most, the first included.
pub const MAX_ATTEMPTS: usize = 3;

static HEDGES: AtomicU64 = AtomicU64::new(0);

/// Attempts started beside an unanswered one, in this process so far
/// (`mtcp_connect_hedges_total`).
pub fn hedges() -> u64 {
    HEDGES.load(Ordering::Relaxed)
}

/// Runs `start()` and, each time `hedge` passes with none of the attempts done, one more
/// (up to [`MAX_ATTEMPTS`]); returns the first to finish, with how long that attempt took from
/// its own start (a sample of the path, not inflated by the hedge). An error is the path's
/// answer (a reset: nobody listens there; unreachable) and is returned at once, as a single
/// connect would return it.
pub async fn race<T, F, Fut>(mut start: F, hedge: Duration) -> std::io::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let t0 = Instant::now();
    let mut first = pin!(start());
    // The common case, and every case on loopback: answered before the hedge.
    if let Ok(r) = tokio::time::timeout(hedge, first.as_mut()).await {
        return r.map(|s| (s, t0.elapsed()));
    }
    HEDGES.fetch_add(1, Ordering::Relaxed);
    let mut more: Vec<(Instant, Pin<Box<Fut>>)> = vec![(Instant::now(), Box::pin(start()))];
    let mut next = pin!(tokio::time::sleep(hedge));
    poll_fn(|cx| loop {
        if let Poll::Ready(r) = first.as_mut().poll(cx) {
            return Poll::Ready(r.map(|s| (s, t0.elapsed())));
        }
        for (t, f) in more.iter_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                return Poll::Ready(r.map(|s| (s, t.elapsed())));
            }
        }
        if 1 + more.len() >= MAX_ATTEMPTS || next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        HEDGES.fetch_add(1, Ordering::Relaxed);
        more.push((Instant::now(), Box::pin(start())));
        next.as_mut().reset(Instant::now() + hedge);
    })
    .await
}

/// [`race`] of plain `TcpStream::connect`s to `addr`.
pub async fn connect(
    addr: &str,
    hedge: Duration,
) -> std::io::Result<(tokio::net::TcpStream, Duration)> {
    race(|| tokio::net::TcpStream::connect(addr), hedge).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MS: Duration = Duration::from_millis(1);

    /// Attempt `i` finishes after `delays[i]` with `Ok(i)` (or `Err` when `fails[i]`).
    async fn run(delays: &[u64], fails: &[bool], hedge: u64) -> (std::io::Result<usize>, usize) {
        let started = AtomicUsize::new(0);
        let r = race(
            || {
                let i = started.fetch_add(1, Ordering::SeqCst);
                let (d, f) = (delays[i], fails.get(i).copied().unwrap_or(false));
                async move {
                    tokio::time::sleep(MS * d as u32).await;
                    match f {
                        true => Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                        false => Ok(i),
                    }
                }
            },
            MS * hedge as u32,
        )
        .await;
        (r.map(|(i, _)| i), started.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn an_answered_connect_is_the_only_one() {
        let (r, n) = run(&[10, 1, 1], &[], 200).await;
        assert_eq!((r.unwrap(), n), (0, 1));
    }

    #[tokio::test]
    async fn a_connect_stuck_on_a_lost_syn_is_overtaken_by_the_next() {
        // Other tests run beside this one: the count only grows, by at least this test's.
        let before = hedges();
        // The first waits out the kernel's 1 s retransmission; the second, started after the
        // 100 ms hedge, is answered 10 ms later, well before a third would start.
        let (r, n) = run(&[1000, 10, 10], &[], 100).await;
        assert_eq!((r.unwrap(), n), (1, 2));
        // The second is lost too: the third wins, and no fourth is started.
        let (r, n) = run(&[1000, 1000, 10], &[], 100).await;
        assert_eq!((r.unwrap(), n), (2, 3));
        let (r, n) = run(&[1000, 1000, 1000], &[], 100).await;
        assert_eq!((r.unwrap(), n), (0, MAX_ATTEMPTS));
        assert!(
            hedges() >= before + 1 + 2 + 2,
            "every attempt after the first is counted"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_the_answer() {
        let (r, n) = run(&[5], &[true], 200).await;
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(n, 1);
        // Refused while a later attempt is still under way: refused.
        let (r, _) = run(&[1000, 10, 1000], &[false, true, false], 100).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn the_winner_is_timed_from_its_own_start() {
        let started = AtomicUsize::new(0);
        let (_, took) = race(
            || {
                let i = started.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(MS * [1000, 20][i]).await;
                    Ok(i)
                }
            },
            300 * MS,
        )
        .await
        .unwrap();
        // At least its own 20 ms; timed from the race's start it would be past 320 ms (the
        // margin between is a loaded machine's scheduling).
        assert!(took >= 20 * MS && took < 250 * MS, "{took:?}");
    }

    #[tokio::test]
    async fn connects_to_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (s, took) = connect(&addr, 200 * MS).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        assert_eq!(s.local_addr().unwrap(), a.peer_addr().unwrap());
        assert!(took < Duration::from_secs(5));
    }
}
