//! The delay line: this kernel has no netem, so a delayed (or lossy) link is two TUN devices
//! (one in the host's namespace, one in the router's) and two threads that read each packet
//! from one and write it to the other after the one-way delay, in order, dropping the link's
//! loss percentage of them at random.
//!
//! Loss is done here rather than by nftables because only here is every packet a real,
//! MTU-sized packet: the TUN devices take no GSO super-packets (the kernel segments before
//! handing them over), while a veth link and the router's forwarding carry 64 KiB TSO
//! super-packets that an nftables rule would drop whole. Rate (tc) and blackhole (nftables)
//! act on the TUN devices exactly as on a veth pair.
//!
//! Each direction holds at most [`QUEUE_LIMIT`] bytes; a packet that would exceed it is dropped
//! (a bounded bottleneck buffer, not unbounded memory).

use crate::error::{io_err, Error, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most bytes queued in one direction of a delay line.
pub const QUEUE_LIMIT: usize = 32 << 20;
/// Packets read in a row before due packets are written.
const BATCH: usize = 128;
/// Longest sleep: how soon a stop request is noticed.
const MAX_WAIT: Duration = Duration::from_millis(20);
/// Spare packet buffers kept per direction.
const POOL: usize = 4096;

/// What one direction of a delay line did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    /// Dropped because the queue was full.
    pub dropped: u64,
    /// Dropped at random (the link's loss).
    pub lost: u64,
    /// Writes the kernel refused (e.g. the device was down).
    pub write_errors: u64,
}

/// A running delay line between two packet file descriptors (TUN devices, or any
/// packet-preserving fds such as a SOCK_SEQPACKET pair in tests). Dropping it stops it.
pub struct DelayLine {
    params: Arc<Params>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<DirStats>>,
}

/// What both directions apply, changeable while they run.
struct Params {
    one_way_us: AtomicU64,
    /// Loss in units of 0.01 %.
    loss: AtomicU32,
}

impl DelayLine {
    /// Starts forwarding `a → b` and `b → a`, each packet held `rtt_ms / 2` ms and dropped
    /// with probability `loss_pct` %. `a` and `b` must be non-blocking.
    pub fn start(
        label: &str,
        a: OwnedFd,
        b: OwnedFd,
        rtt_ms: u32,
        loss_pct: f64,
    ) -> Result<DelayLine> {
        let params = Arc::new(Params {
            one_way_us: AtomicU64::new(one_way_us(rtt_ms)),
            loss: AtomicU32::new(loss_units(loss_pct)),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (Arc::new(a), Arc::new(b));
        let mut threads = Vec::new();
        for (name, src, dst) in [("ab", &a, &b), ("ba", &b, &a)] {
            let (src, dst) = (src.clone(), dst.clone());
            let (p, s) = (params.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("delay-{label}-{name}"))
                .spawn(move || pump(&src, &dst, &p, &s))
                .map_err(io_err("start a delay-line thread"));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(DelayLine {
            params,
            stop,
            threads,
        })
    }

    /// Changes the round-trip delay and the loss; packets already queued keep their time
    /// (order is kept).
    pub fn set(&self, rtt_ms: u32, loss_pct: f64) {
        self.params
            .one_way_us
            .store(one_way_us(rtt_ms), Ordering::Relaxed);
        self.params
            .loss
            .store(loss_units(loss_pct), Ordering::Relaxed);
    }

    /// Stops both directions (within `MAX_WAIT`) and returns what they did; the fds close.
    pub fn stop(mut self) -> [DirStats; 2] {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> [DirStats; 2] {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = [DirStats::default(); 2];
        for (i, t) in self.threads.drain(..).enumerate() {
            out[i.min(1)] = t.join().unwrap_or_default();
        }
        out
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn one_way_us(rtt_ms: u32) -> u64 {
    u64::from(rtt_ms) * 500
}

fn loss_units(pct: f64) -> u32 {
    (pct * 100.0).round().clamp(0.0, 10000.0) as u32
}

/// xorshift64*: a fast generator for loss decisions (no need for quality beyond that).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let tid = u64::from(std::process::id()) << 32;
        let x = &t as *const u64 as u64;
        Rng((t ^ tid ^ x.rotate_left(17)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `units` / 10000.
    fn chance(&mut self, units: u32) -> bool {
        units > 0 && (self.next() >> 32) % 10000 < u64::from(units)
    }
}

/// One direction: read every packet `src` has, drop the lost ones, stamp the others with their
/// due time, write the due ones to `dst`, sleep until the next is due or `src` is readable.
fn pump(src: &OwnedFd, dst: &OwnedFd, params: &Params, stop: &AtomicBool) -> DirStats {
    // SAFETY: prctl with an integer argument; a 1 µs timer slack keeps the delay exact.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let mut rng = Rng::seeded();
    let mut st = DirStats::default();
    let mut scratch = vec![0u8; 65536];
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut queued = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let delay = Duration::from_micros(params.one_way_us.load(Ordering::Relaxed));
        let loss = params.loss.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut broken = false;
        for _ in 0..BATCH {
            // SAFETY: reads into a buffer we own, of its length.
            let n =
                unsafe { libc::read(src.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) };
            if n <= 0 {
                let e = std::io::Error::last_os_error().kind();
                // EAGAIN: nothing more. Anything else (the device is gone): poll would not
                // sleep, so the wait below must not poll.
                broken = n == 0
                    || !matches!(
                        e,
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    );
                break;
            }
            let n = n as usize;
            if rng.chance(loss) {
                st.lost += 1;
                continue;
            }
            if queued + n > QUEUE_LIMIT {
                st.dropped += 1;
                continue;
            }
            let mut p = pool.pop().unwrap_or_default();
            p.clear();
            p.extend_from_slice(&scratch[..n]);
            queued += n;
            queue.push_back((now + delay, p));
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, p) = queue.pop_front().expect("front exists");
            queued -= p.len();
            // SAFETY: writes a buffer we own, of its length.
            let w = unsafe { libc::write(dst.as_raw_fd(), p.as_ptr().cast(), p.len()) };
            if w < 0 {
                st.write_errors += 1;
            } else {
                st.packets += 1;
                st.bytes += p.len() as u64;
            }
            if pool.len() < POOL {
                pool.push(p);
            }
        }
        let wait = queue
            .front()
            .map_or(MAX_WAIT, |(due, _)| due.saturating_duration_since(now))
            .min(MAX_WAIT);
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd: src.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if broken {
            std::thread::sleep(wait.max(Duration::from_millis(1)));
            continue;
        }
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    }
    st
}

/// Creates TUN device `name` (layer 3, no packet information header, non-blocking) inside the
/// network namespace `ns`. It lives as long as the returned fd.
pub fn open_tun(ns: &OwnedFd, name: &str) -> Result<OwnedFd> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(Error::NoTun);
    }
    let what = format!("create TUN device {name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            // The device is created in the namespace of the thread that asks for it.
            crate::ns::enter(ns).map_err(io_err(what.clone()))?;
            // SAFETY: valid C string; the fd is owned below.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io_err(what.clone())(std::io::Error::last_os_error()));
            }
            // SAFETY: fd was just opened and is ours alone.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ifreq is plain old data; zeroed is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            if name.is_empty() || name.len() >= req.ifr_name.len() {
                return Err(Error::Invalid(format!("bad device name {name:?}")));
            }
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF takes a pointer to an ifreq that lives across the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
                return Err(io_err(what.clone())(std::io::Error::last_os_error()));
            }
            Ok(fd)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A non-blocking SOCK_SEQPACKET pair: packet boundaries are kept, like a TUN device's.
    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors, which we then own.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both were just created.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, b: &[u8]) {
        // SAFETY: writes a buffer we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(n as usize, b.len());
    }

    /// Next packet within `limit`, with the time it arrived.
    fn recv(fd: &OwnedFd, limit: Duration) -> Option<(Vec<u8>, Instant)> {
        let t0 = Instant::now();
        let mut buf = [0u8; 2048];
        while t0.elapsed() < limit {
            // SAFETY: reads into a buffer we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Some((buf[..n as usize].to_vec(), Instant::now()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    }

    #[test]
    fn delays_each_direction_by_half_the_rtt_in_order() {
        let (a_outer, a_inner) = pair();
        let (b_inner, b_outer) = pair();
        let dl = DelayLine::start("t", a_inner, b_inner, 40, 0.0).unwrap();
        let t0 = Instant::now();
        for i in 0..50u8 {
            send(&a_outer, &[i; 100]);
        }
        send(&b_outer, b"back");
        for i in 0..50u8 {
            let (p, at) = recv(&b_outer, Duration::from_secs(2)).expect("packet a→b");
            assert_eq!(p, vec![i; 100], "in order");
            let d = at - t0;
            assert!(d >= Duration::from_millis(20), "{d:?}");
            assert!(d < Duration::from_millis(200), "{d:?}");
        }
        let (p, at) = recv(&a_outer, Duration::from_secs(2)).expect("packet b→a");
        assert_eq!(p, b"back");
        assert!(at - t0 >= Duration::from_millis(20));
        dl.set(0, 0.0);
        std::thread::sleep(Duration::from_millis(30));
        let t1 = Instant::now();
        send(&a_outer, b"fast");
        let (p, at) = recv(&b_outer, Duration::from_secs(2)).expect("packet after set_rtt_ms");
        assert_eq!(p, b"fast");
        assert!(at - t1 < Duration::from_millis(15), "{:?}", at - t1);
        let [ab, ba] = dl.stop();
        assert_eq!((ab.packets, ba.packets), (51, 1));
        assert_eq!(ab.dropped + ba.dropped + ab.lost + ba.lost, 0);
    }

    #[test]
    fn loses_the_given_share() {
        let (a_outer, a_inner) = pair();
        let (b_inner, b_outer) = pair();
        let dl = DelayLine::start("t", a_inner, b_inner, 0, 30.0).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            while recv(&b_outer, Duration::from_millis(300)).is_some() {
                got += 1;
            }
            got
        });
        for i in 0..1000u32 {
            send(&a_outer, &i.to_be_bytes());
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let got = reader.join().unwrap();
        let [ab, _] = dl.stop();
        assert_eq!(ab.lost + ab.packets, 1000, "{ab:?}");
        assert_eq!(got, ab.packets);
        assert!((600..=800).contains(&got), "{got} of 1000 with 30 % loss");
    }

    #[test]
    fn rng_chance() {
        let mut r = Rng::seeded();
        assert!(!(0..1000).any(|_| r.chance(0)));
        assert!((0..1000).all(|_| r.chance(10000)));
        let n = (0..100_000).filter(|_| r.chance(2500)).count();
        assert!((24_000..26_000).contains(&n), "{n}");
    }
}
