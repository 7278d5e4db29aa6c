//! Bounded concurrency with a bounded wait: the takeovers a destination runs at once
//! (`Limits::max_takeovers`) and the hand-overs an origin runs at once
//! (`Limits::max_handovers`). A request over the cap waits for a slot, then is refused with the
//! cap's reason (the caller answers `Busy`).

use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub(crate) struct Slots {
    active: Mutex<usize>,
    freed: tokio::sync::Notify,
}

/// One slot, given back when dropped.
pub(crate) struct Slot<'a>(&'a Slots);

impl Slots {
    /// Takes a slot under `max`, waiting up to `wait` for one to be given back; `admit` says
    /// whether `active` slots leave room, and why not (`mtcp_proto::bounds`).
    pub(crate) async fn take(
        &self,
        max: usize,
        wait: Duration,
        admit: fn(usize, usize) -> Result<(), String>,
    ) -> Result<Slot<'_>, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let why = {
                let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
                match admit(*n, max) {
                    Ok(()) => {
                        *n += 1;
                        return Ok(Slot(self));
                    }
                    Err(why) => why,
                }
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(format!("{why} (waited {wait:?})"));
            }
            // Woken when one is given back; re-checked every 100 ms all the same.
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(100)),
                self.freed.notified(),
            )
            .await;
        }
    }

    /// Slots taken now.
    #[cfg(test)]
    fn active(&self) -> usize {
        *self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.active.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtcp_proto::bounds::admit_handover;

    #[tokio::test]
    async fn over_the_cap_a_request_waits_for_a_slot_then_is_refused() {
        let s = Slots::default();
        let wait = Duration::from_millis(150);
        let first = s.take(1, wait, admit_handover).await.expect("a free slot");
        let t0 = std::time::Instant::now();
        let refused = s
            .take(1, wait, admit_handover)
            .await
            .err()
            .expect("refused");
        assert!(t0.elapsed() >= wait, "refused after {:?}", t0.elapsed());
        assert!(refused.contains("maximum of 1"), "{refused}");
        assert_eq!(s.active(), 1);
        // A waiter gets the slot as soon as it is given back.
        let waiter = s.take(1, Duration::from_secs(5), admit_handover);
        let give_back = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(first);
        };
        let (got, ()) = tokio::join!(waiter, give_back);
        assert!(got.is_ok());
        assert_eq!(s.active(), 1);
        drop(got);
        assert_eq!(s.active(), 0);
    }
}
