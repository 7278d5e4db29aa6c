//! Moves a live loopback TCP connection from one socket to another with `TCP_REPAIR`, three
//! times, each time with output in flight (sent and unacknowledged) and never sent, unread input
//! queued, and the listener that accepted it still bound to the port; the flow is fenced with an
//! nftables rule during each move, as the fast path will do; the middle move leaves the output
//! never sent behind and carries the state encoded (`try_freeze_encoded`, as a fast-path origin
//! does), and the writer writes that output again.
//! Then checks every byte in both directions by hash. Needs root (CAP_NET_ADMIN, nftables); without it the test says so loudly
//! and checks only the refusal.

use mtcp_repair::{freeze, restore, try_freeze_encoded, RepairError, TcpState};
use std::hash::Hasher;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use twox_hash::XxHash3_64;

const DOWN: usize = 24 << 20;
const UP: usize = 3 << 20;
/// Upload sent before the move: small enough to sit whole in the server's receive queue, so
/// the client has nothing unsent (and no zero-window probes) while the connection moves.
const UP_BEFORE: usize = 48 << 10;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn set_buf(s: &TcpStream, opt: libc::c_int, v: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: `v` outlives the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt");
}

/// An nftables table that drops the client's packets to the server's port while it lives
/// (deleted on drop, also when the test fails).
struct Fence(String);

impl Fence {
    fn new(client_port: u16, server_port: u16) -> Fence {
        // Tests run in parallel threads of one process: each fence gets its own table.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("mtcp_repair_test_{}_{n}", std::process::id());
        let rules = format!(
            "table inet {name} {{\n chain out {{\n type filter hook output priority 0;\n \
             tcp sport {client_port} tcp dport {server_port} drop\n }}\n}}\n"
        );
        nft(&rules);
        Fence(name)
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

fn nft(rules: &str) {
    use std::process::{Command, Stdio};
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft is needed as root (scripts/test.sh installs nftables)");
    c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft -f: {rules}");
}

fn hash(b: &[u8]) -> u64 {
    XxHash3_64::oneshot(b)
}

/// A listener and a connection accepted from it: (listener, client, server). A small client
/// window and a large server send buffer: a move always finds output queued that was never
/// sent.
fn connected() -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    set_buf(&client, libc::SO_RCVBUF, 64 << 10);
    set_buf(&server, libc::SO_SNDBUF, 2 << 20);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (listener, client, server)
}

/// Lets delayed ACKs and window updates go out, fences the client's packets to the server's
/// port, then has the server write as much more of `down` as it takes: that output is sent
/// but its acknowledgements are dropped, so a move now carries output in flight.
fn fence_and_fill(
    listener: &TcpListener,
    client: &TcpStream,
    server: &TcpStream,
    down: &[u8],
    written: &mut usize,
) -> Fence {
    std::thread::sleep(Duration::from_millis(50));
    let fence = Fence::new(
        client.local_addr().unwrap().port(),
        listener.local_addr().unwrap().port(),
    );
    *written += write_until_full(server, &down[*written..]);
    std::thread::sleep(Duration::from_millis(20));
    fence
}

/// Writes as much of `data` as the socket takes without blocking.
fn write_until_full(s: &TcpStream, data: &[u8]) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut off = 0;
    loop {
        match (&*s).write(&data[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    off
}

#[test]
fn a_live_connection_moves_to_a_new_socket_with_every_byte_intact() {
    if !is_root() {
        eprintln!(
            "!!! NOT ROOT: TCP_REPAIR (CAP_NET_ADMIN) NOT tested; checking the refusal only !!!"
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(matches!(freeze(s), Err(RepairError::NotPermitted)));
        return;
    }
    let down = pattern(7, DOWN);
    let up = pattern(11, UP);
    let (listener, mut client, mut server) = connected();

    let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
    let (mut up_sent, mut written) = (0, 0);
    for round in 0..3 {
        // Before each move: the client uploads a little and the server reads part of it; the
        // server writes until its buffers are full, and the client reads all of that.
        client.write_all(&up[up_sent..up_sent + UP_BEFORE]).unwrap();
        up_sent += UP_BEFORE;
        let mut b = vec![0u8; 5000];
        server.read_exact(&mut b).unwrap();
        got_up.extend_from_slice(&b);
        written += write_until_full(&server, &down[written..]);
        // The client takes everything written so far: the server's queue drains and the
        // client's window is open.
        let mut b = vec![0u8; written - got_down.len()];
        client.read_exact(&mut b).unwrap();
        got_down.extend_from_slice(&b);
        // Let delayed ACKs and window updates go out, then fence the flow: from here nothing
        // from the client reaches the port (no socket holds the connection for a moment). The
        // server's next output is sent but its acknowledgements are dropped, so the move also
        // carries output that is in flight.
        let fence = fence_and_fill(&listener, &client, &server, &down, &mut written);

        let t0 = Instant::now();
        let encoded = round == 1;
        let (st, dropped) = if encoded {
            let frozen = try_freeze_encoded(server, &mut |_| {})
                .map_err(|(e, _)| e)
                .expect("freeze");
            let dropped = frozen.dropped;
            let st = TcpState::decode(&frozen.discard()).expect("decodes");
            (st, dropped)
        } else {
            let frozen = freeze(server).expect("freeze");
            (frozen.discard(), 0)
        };
        server = restore(&st).expect("restore");
        // Socket options are the new owner's to set again, as the app set them at first.
        set_buf(&server, libc::SO_SNDBUF, 2 << 20);
        drop(fence);
        eprintln!(
            "move {round} (encoded: {encoded}): {:?}; {} bytes of output queued ({} never sent, {dropped} left behind), {} bytes of input unread",
            t0.elapsed(),
            st.send_queue.len(),
            st.unsent,
            st.recv_queue.len()
        );
        if encoded {
            assert!(dropped > 0, "the move must find output never sent");
            assert_eq!(st.unsent, 0, "and leave it out");
            let sent = written - dropped;
            assert_eq!(
                st.send_queue,
                &down[sent - st.send_queue.len()..sent],
                "the output carried is what was sent last"
            );
            // Never on the wire and not carried: the writer writes it again.
            written = sent;
        } else {
            assert!(st.unsent > 0, "the move must find output never sent");
        }
        assert!(
            st.send_queue.len() > st.unsent as usize,
            "and output sent but not acknowledged"
        );
        let unread = &up[got_up.len()..up_sent];
        assert_eq!(st.recv_queue, unread, "unread input moves whole");
        assert_eq!(st.local, listener.local_addr().unwrap());
        let unsent = st.unsent_bytes();
        assert_eq!(
            unsent,
            &down[written - unsent.len()..written],
            "unsent output is the newest"
        );
        // Never on the wire, so ordinary output again: the writer goes on from before it.
        written -= unsent.len();
    }

    // After the last move: the newest socket finishes both directions.
    let down_c = down.clone();
    let mut server_w = server.try_clone().unwrap();
    let server_side = std::thread::spawn(move || {
        server_w.write_all(&down_c[written..]).unwrap();
        server_w.shutdown(Shutdown::Write).unwrap();
    });
    let up_c = up.clone();
    let mut client_w = client.try_clone().unwrap();
    let client_up = std::thread::spawn(move || {
        client_w.write_all(&up_c[up_sent..]).unwrap();
        client_w.shutdown(Shutdown::Write).unwrap();
    });
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let server_reads = std::thread::spawn(move || {
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        rest
    });
    client.read_to_end(&mut got_down).unwrap();
    server_side.join().unwrap();
    client_up.join().unwrap();
    got_up.extend(server_reads.join().unwrap());

    assert_eq!(got_down.len(), DOWN, "download length");
    assert_eq!(hash(&got_down), hash(&down), "download bytes");
    assert_eq!(got_up.len(), UP, "upload length");
    assert_eq!(hash(&got_up), hash(&up), "upload bytes");
    let mut h = XxHash3_64::with_seed(0);
    h.write(&got_down);
    eprintln!(
        "download {DOWN} B and upload {UP} B intact over 3 moves (xxh3 {:016x})",
        h.finish()
    );
}

/// A scratch directory, removed on drop (also when the test fails).
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let d = std::env::temp_dir().join(format!("mtcp-repair-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed and reaped on drop if it is still running (also when the test fails).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Environment of the child process in [`a_connection_moves_to_another_process`].
const CHILD_STATE: &str = "MTCP_REPAIR_TEST_STATE";
const CHILD_WRITTEN: &str = "MTCP_REPAIR_TEST_WRITTEN";
const CHILD_UP_READ: &str = "MTCP_REPAIR_TEST_UP_READ";

/// The connection is frozen in this process, its state crosses to another process as bytes
/// (`TcpState::encode`), and the other process restores it and finishes the transfer.
#[test]
fn a_connection_moves_to_another_process() {
    if !is_root() {
        eprintln!(
            "!!! NOT ROOT: moving a connection to another process (TCP_REPAIR) NOT tested !!!"
        );
        return;
    }
    let down = pattern(7, DOWN);
    let up = pattern(11, UP);
    let (listener, mut client, mut server) = connected();
    client.write_all(&up[..UP_BEFORE]).unwrap();
    let mut first = vec![0u8; 5000];
    server.read_exact(&mut first).unwrap();
    let mut written = write_until_full(&server, &down);
    let mut got_down = vec![0u8; written];
    client.read_exact(&mut got_down).unwrap();
    let fence = fence_and_fill(&listener, &client, &server, &down, &mut written);

    let frozen = freeze(server).expect("freeze");
    let st = frozen.state.clone();
    let dir = Scratch::new();
    let file = dir.0.join("state.bin");
    std::fs::write(&file, st.encode()).unwrap();
    frozen.discard();
    // The writer goes on from before the output that was never sent (the child writes it).
    written -= st.unsent as usize;

    let mut child = Reaped(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_takes_over_a_connection",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_STATE, &file)
            .env(CHILD_WRITTEN, written.to_string())
            .env(CHILD_UP_READ, "5000")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Lift the fence once the child holds the connection.
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let t0 = Instant::now();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the child ended before restoring the connection");
        // (The test harness may print its "test … " prefix on the same line.)
        if let Some(i) = line.find("RESTORED") {
            eprintln!("child: {}", line[i..].trim());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "child never restored"
        );
    }
    drop(fence);

    let up_c = up.clone();
    let mut client_w = client.try_clone().unwrap();
    let uploader = std::thread::spawn(move || {
        client_w.write_all(&up_c[UP_BEFORE..]).unwrap();
        client_w.shutdown(Shutdown::Write).unwrap();
    });
    client.read_to_end(&mut got_down).unwrap();
    uploader.join().unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
    assert_eq!(got_down.len(), DOWN, "download length");
    assert_eq!(hash(&got_down), hash(&down), "download bytes");
}

#[test]
#[ignore = "helper: a_connection_moves_to_another_process runs it in a child process"]
fn child_takes_over_a_connection() {
    let file = std::env::var(CHILD_STATE).expect("run by a_connection_moves_to_another_process");
    let written: usize = std::env::var(CHILD_WRITTEN).unwrap().parse().unwrap();
    let up_read: usize = std::env::var(CHILD_UP_READ).unwrap().parse().unwrap();
    let down = pattern(7, DOWN);
    let up = pattern(11, UP);
    let st = TcpState::decode(&std::fs::read(file).unwrap()).expect("decode");
    let mut s = restore(&st).expect("restore in the child");
    println!(
        "RESTORED in process {}: {} bytes queued ({} never sent), {} unread",
        std::process::id(),
        st.send_queue.len(),
        st.unsent,
        st.recv_queue.len()
    );
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&down[written..]).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // The unread input is back in the socket's receive queue: it is read like any input.
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), UP - up_read, "upload length in the child");
    assert_eq!(
        hash(&got),
        hash(&up[up_read..]),
        "upload bytes in the child"
    );
}
