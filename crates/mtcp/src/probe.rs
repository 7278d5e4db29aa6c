//! What a server watches besides its sessions: the agents' probe connections, the overload
//! policy that hints connections away, and the pacing test hook.

use crate::framed::{self, FrameReader};
use crate::registry::ServerInner;
use crate::session_io::refuse;
use crate::stream::{ReadHalf, WriteHalf};
use mtcp_proto::wire::{HintReason, Msg};
use mtcp_proto::Cid;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How often the overload policy looks at the connections.
const OVERLOAD_EVERY: Duration = Duration::from_millis(100);
/// Probe connections served now ([`mtcp_proto::probe::MAX_PROBE_CONNS`] at most).
static PROBE_CONNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Test hook (`Limits::pacing_rate`): caps the socket's send rate at `rate` bytes per second.
pub(crate) fn set_pacing_rate(s: &TcpStream, rate: u64) {
    use std::os::fd::AsRawFd;
    let v: libc::c_ulong = rate as libc::c_ulong;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live value of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            &v as *const libc::c_ulong as *const libc::c_void,
            std::mem::size_of::<libc::c_ulong>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::warn!("SO_MAX_PACING_RATE: {}", std::io::Error::last_os_error());
    }
}

/// A probe connection: answers each `PROBE{t}` with `PROBE_REPLY{t}` (after
/// `Limits::probe_delay`, a test hook) until [`mtcp_proto::probe`] closes it: the agent closes
/// it, stays quiet for `PROBE_IDLE`, probes faster than one per `PROBE_MIN_GAP`, or sends
/// anything else. At most `MAX_PROBE_CONNS` at once; more are refused `Busy`.
pub(crate) async fn probe(
    inner: &Arc<ServerInner>,
    mut reader: FrameReader<ReadHalf>,
    mut w: WriteHalf,
    t: u64,
) {
    use mtcp_proto::probe::{next, open, Step, PROBE_IDLE};
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            PROBE_CONNS.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _slot = Slot;
    let mut step = open(PROBE_CONNS.fetch_add(1, Ordering::Relaxed), t);
    if let Step::Busy(r) = step {
        refuse(&mut w, r.code, r.reason).await;
        return;
    }
    tracing::debug!(server = %inner.id, "probe connection");
    loop {
        let Step::Reply { t } = step else { return };
        let at = Instant::now();
        if !inner.limits.probe_delay.is_zero() {
            tokio::time::sleep(inner.limits.probe_delay).await;
        }
        if framed::write_msg(&mut w, &Msg::ProbeReply { t })
            .await
            .is_err()
        {
            return;
        }
        let msg = reader.next_msg(PROBE_IDLE).await.ok();
        step = next(at.elapsed(), msg.as_ref());
    }
}

/// Overload: while more than `max` connections with an agent are live here, hints the newest
/// away (`HINT{Overload}`), paced by [`OverloadPolicy`](mtcp_proto::policy::OverloadPolicy).
/// Idle while draining (every connection is hinted then anyway).
pub(crate) async fn overload_loop(inner: std::sync::Weak<ServerInner>, max: usize) {
    use mtcp_proto::policy::{LiveConn, OverloadConfig, OverloadPolicy};
    let mut policy = OverloadPolicy::new(OverloadConfig::new(max));
    let mut tick = tokio::time::interval(OVERLOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.draining.load(Ordering::Relaxed) {
            continue;
        }
        let conns = inner.all();
        let live: Vec<LiveConn<Cid>> = conns
            .iter()
            .filter_map(|c| {
                let st = c.lock();
                st.phase()
                    .sheddable(st.detached_at.is_some())
                    .then_some(LiveConn {
                        key: c.cid,
                        arrived: st.arrived,
                    })
            })
            .collect();
        for cid in policy.poll(Instant::now(), &live) {
            let Some(c) = conns.iter().find(|c| c.cid == cid) else {
                continue;
            };
            let mut st = c.lock();
            if st.phase().hintable() {
                tracing::info!(%cid, live = live.len(), max, "overloaded: hinting the connection away");
                c.hint(&mut st, HintReason::Overload);
            }
        }
    }
}
