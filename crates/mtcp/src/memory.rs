//! Giving freed memory back to the system. Connections allocate their buffers when data comes
//! and free them when idle; the allocator (glibc's malloc) keeps freed memory in its arenas,
//! where thousands of idle connections' freed buffers, interleaved with what the connections
//! still hold, would stay resident. A periodic trim returns the free pages.

use std::time::{Duration, Instant};

/// How often the allocator is asked to return free pages.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Asks the allocator to return free memory to the system; how long it took.
pub fn trim() -> Duration {
    let t0 = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
    t0.elapsed()
}

/// Trims every [`TRIM_EVERY`] for the life of the runtime (servers and agents).
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Off the runtime's threads: the walk takes the arena locks, up to milliseconds
            // with a large heap.
            let took = tokio::task::spawn_blocking(trim).await.unwrap_or_default();
            tracing::trace!(took_us = took.as_micros() as u64, "malloc_trim");
        }
    })
}
