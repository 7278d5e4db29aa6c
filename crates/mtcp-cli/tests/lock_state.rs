//! `lock_state`: a migration requested while the application holds the lock waits for the
//! unlock; afterwards the origin's application sees *migrated* and the connection continues on
//! the destination (the seed's Example 3 pattern: lock, act, snapshot, unlock).
//!
//! `soft_lock` (decision 55): a fast-path migration waits for a soft section to end, but only
//! for `Limits::soft_wait`; then it splits the section and the destination replays it. A relayed
//! one does not wait.
//!
//! And the fast path on one host needs no privilege (decision 56): the same cluster, run as uid
//! 65534, hands the client's socket over and moves it.

mod common;

use mtcp::{Cluster, Limits, Server, Start};
use mtcp_agent::{Agent, AgentConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Notify};

#[derive(Debug, PartialEq)]
enum Event {
    Locked(String),
    Unlocked(String),
    SawMigrated(String),
}

/// Reads one line byte by byte (no read-ahead, so snapshots stay exact).
async fn read_line(conn: &mut mtcp::Connection) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if conn.read(&mut b).await? == 0 {
            return Ok(None);
        }
        if b[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(b[0]);
    }
}

async fn app(
    mut conn: mtcp::Connection,
    id: String,
    unlock: Arc<Notify>,
    ev: mpsc::UnboundedSender<Event>,
) {
    let r: std::io::Result<()> = async {
        if let Start::Migrated(s) = conn.start() {
            assert_eq!(
                &s[..],
                b"idle",
                "restarted from the snapshot taken under the lock"
            );
        }
        // An open soft section (BEGIN .. END): no restart point inside it.
        let mut soft = None;
        while let Some(line) = read_line(&mut conn).await? {
            match line.as_str() {
                "PING" => {
                    conn.write_all(format!("PONG {id}\n").as_bytes()).await?;
                    if soft.is_none() {
                        conn.set_state(&b"idle"[..])?;
                    }
                }
                "BEGIN" => {
                    soft = Some(conn.soft_lock()?);
                    conn.write_all(b"begun\n").await?;
                }
                "END" => {
                    conn.write_all(format!("ended {id}\n").as_bytes()).await?;
                    conn.set_state(&b"idle"[..])?;
                    soft = None;
                }
                "LOCK" => {
                    let guard = conn.lock_state().await?;
                    conn.write_all(b"locked\n").await?;
                    let _ = ev.send(Event::Locked(id.clone()));
                    unlock.notified().await;
                    conn.set_state(&b"idle"[..])?;
                    drop(guard);
                    let _ = ev.send(Event::Unlocked(id.clone()));
                }
                _ => conn.write_all(b"?\n").await?,
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        if mtcp::is_migrated(&e) {
            let _ = ev.send(Event::SawMigrated(id));
        }
    }
}

fn free(host: &str) -> String {
    format!("{host}:{}", mtcp_harness::local::free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_waits_for_unlock_and_origin_sees_migrated() {
    lock_test(false).await;
}

/// The same over the kernel fast path, on IPv6: the origin stops serving the client's socket
/// only after the unlock. Needs root (TCP_REPAIR, nftables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_migration_waits_for_unlock_and_origin_sees_migrated() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! NOT ROOT: the kernel fast path needs TCP_REPAIR and nftables; this test is NOT run !!!");
        return;
    }
    lock_test(true).await;
}

/// Two servers running [`app`] and an agent in front of them, with one client connected.
struct Setup {
    agent: Agent,
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    ev: mpsc::UnboundedReceiver<Event>,
    unlock: Arc<Notify>,
}

impl Setup {
    /// Sends `line` and returns the answer.
    async fn ask(&mut self, line: &str) -> String {
        self.w.write_all(line.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut answer))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        answer
    }

    /// Starts moving the connection to s2.
    fn move_to_s2(&self) -> tokio::task::JoinHandle<Vec<(String, mtcp_agent::MoveOutcome)>> {
        let agent = self.agent.clone();
        tokio::spawn(async move { agent.migrate(None, Some("s2".into())).await })
    }

    /// The origin's application must see `migrated` from its next call.
    async fn origin_saw_migrated(&mut self) {
        loop {
            let e = tokio::time::timeout(Duration::from_secs(5), self.ev.recv())
                .await
                .expect("the origin's application must see `migrated` from its next call");
            match e {
                Some(Event::SawMigrated(id)) => return assert_eq!(id, "s1"),
                Some(_) => continue,
                None => panic!("the applications' events ended"),
            }
        }
    }
}

async fn setup(fast_path: bool, limits: Limits) -> Setup {
    // The fast path's variant runs on IPv6 (its fences and restored sockets have both families).
    let host = if fast_path { "[::1]" } else { "127.0.0.1" };
    let l = tokio::net::TcpListener::bind(format!("{host}:0"))
        .await
        .unwrap();
    let listen = l.local_addr().unwrap();
    let key = hex::encode(rand::random::<[u8; 32]>());
    let mut text = format!("key = \"{key}\"\n");
    if fast_path {
        text += &format!("fast_path = [\"{listen}\"]\n");
    }
    for id in ["s1", "s2"] {
        text += &format!(
            "[[server]]\nid = \"{id}\"\ndata = \"{}\"\npeer = \"{}\"\nadmin = \"{}\"\n",
            free(host),
            free(host),
            free(host)
        );
    }
    let cluster = Cluster::parse(&text, std::path::Path::new("test.toml")).unwrap();
    let (ev_tx, ev) = mpsc::unbounded_channel();
    let unlock = Arc::new(Notify::new());
    for id in ["s1", "s2"] {
        let mut server = Server::bind(cluster.clone(), id, limits.clone())
            .await
            .unwrap();
        let (unlock, ev_tx) = (unlock.clone(), ev_tx.clone());
        tokio::spawn(async move {
            while let Some(c) = server.accept().await {
                tokio::spawn(app(c, id.to_string(), unlock.clone(), ev_tx.clone()));
            }
        });
    }
    let agent = Agent::new(AgentConfig {
        connect: vec![cluster.servers[0].data.clone()],
        fast_path,
        ..Default::default()
    });
    {
        let agent = agent.clone();
        tokio::spawn(async move { agent.serve(l).await });
    }

    let client = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (r, w) = client.into_split();
    let mut s = Setup {
        agent,
        r: BufReader::new(r),
        w,
        ev,
        unlock,
    };
    assert_eq!(s.ask("PING\n").await, "PONG s1\n");
    s
}

async fn lock_test(fast_path: bool) {
    let mut s = setup(fast_path, Limits::default()).await;
    assert_eq!(s.ask("LOCK\n").await, "locked\n");
    assert_eq!(s.ev.recv().await, Some(Event::Locked("s1".into())));
    let Setup {
        agent,
        mut r,
        mut w,
        mut ev,
        unlock,
    } = s;
    let mut line = String::new();

    // Request the move while the lock is held: it must wait.
    let mover = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.migrate(None, Some("s2".into())).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    if mover.is_finished() {
        let r = mover.await;
        panic!(
            "the migration went ahead while the application held the lock: {r:?}; the agent's connections: {:?}",
            agent.status()
        );
    }
    assert_eq!(agent.status()[0].server, "s1");

    unlock.notify_one();
    let results = tokio::time::timeout(Duration::from_secs(10), mover)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].1, Ok("s2".to_string()), "{results:?}");
    assert_eq!(ev.recv().await, Some(Event::Unlocked("s1".into())));
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), ev.recv())
            .await
            .unwrap(),
        Some(Event::SawMigrated("s1".into())),
        "the origin's application must see `migrated` from its next call"
    );

    // The connection goes on, on s2.
    w.write_all(b"PING\n").await.unwrap();
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "PONG s2\n");
    assert_eq!(agent.status()[0].server, "s2");
    assert_eq!(agent.status()[0].migrations, 1);
    assert_eq!(agent.status()[0].fast_path, fast_path);
    agent.close();
}

/// Relayed, the agent stops forwarding input when it moves the connection, so the section
/// could not end: the move does not wait for it, and the destination replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_migration_does_not_wait_for_a_soft_section() {
    let limits = Limits {
        soft_wait: Duration::from_secs(30),
        ..Limits::default()
    };
    let mut s = setup(false, limits).await;
    assert_eq!(s.ask("BEGIN\n").await, "begun\n");
    let results = tokio::time::timeout(Duration::from_secs(10), s.move_to_s2())
        .await
        .expect("a relayed move waited for a soft section")
        .unwrap();
    assert_eq!(results[0].1, Ok("s2".to_string()), "{results:?}");
    s.origin_saw_migrated().await;
    assert_eq!(s.ask("END\n").await, "ended s2\n");
    assert_eq!(s.ask("PING\n").await, "PONG s2\n");
    s.agent.close();
}

/// Over the kernel fast path the origin serves the client's socket while it waits, so a soft
/// section can end (root: TCP_REPAIR, nftables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_soft_sections() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! NOT ROOT: the kernel fast path needs TCP_REPAIR and nftables; this test is NOT run !!!");
        return;
    }
    soft_ends_in_time(true).await;
    soft_lasts(true).await;
}

/// A soft section that ends within `soft_wait`: the move waits for its end, and the
/// destination restarts from the restart point after it (nothing replayed).
async fn soft_ends_in_time(fast_path: bool) {
    let limits = Limits {
        soft_wait: Duration::from_secs(5),
        ..Limits::default()
    };
    let mut s = setup(fast_path, limits).await;
    assert_eq!(s.ask("BEGIN\n").await, "begun\n");
    let mover = s.move_to_s2();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !mover.is_finished(),
        "the move went ahead inside a soft section, well before soft_wait: {:?}",
        s.agent.status()
    );
    // The section ends on s1, then the move goes ahead.
    assert_eq!(s.ask("END\n").await, "ended s1\n");
    let results = tokio::time::timeout(Duration::from_secs(10), mover)
        .await
        .expect("the move did not finish after the soft section ended")
        .unwrap();
    assert_eq!(results[0].1, Ok("s2".to_string()), "{results:?}");
    s.origin_saw_migrated().await;
    assert_eq!(s.ask("PING\n").await, "PONG s2\n");
    assert_eq!(s.agent.status()[0].migrations, 1);
    assert_eq!(s.agent.status()[0].fast_path, fast_path);
    s.agent.close();
}

/// A soft section that outlasts `soft_wait`: the move goes ahead without its end, the
/// destination replays the section's input from the restart point before it (regenerating
/// "begun", which the client already has), and the section ends there.
async fn soft_lasts(fast_path: bool) {
    let wait = Duration::from_millis(300);
    let limits = Limits {
        soft_wait: wait,
        ..Limits::default()
    };
    let mut s = setup(fast_path, limits).await;
    assert_eq!(s.ask("BEGIN\n").await, "begun\n");
    let asked = std::time::Instant::now();
    let mover = s.move_to_s2();
    let results = tokio::time::timeout(Duration::from_secs(10), mover)
        .await
        .expect("a soft section held the move past soft_wait")
        .unwrap();
    assert_eq!(results[0].1, Ok("s2".to_string()), "{results:?}");
    assert!(
        asked.elapsed() >= wait,
        "the move did not wait for the soft section at all: {:?}",
        asked.elapsed()
    );
    s.origin_saw_migrated().await;
    assert_eq!(s.ask("END\n").await, "ended s2\n");
    assert_eq!(s.ask("PING\n").await, "PONG s2\n");
    assert_eq!(s.agent.status()[0].migrations, 1);
    s.agent.close();
}

/// Run by [`fast_path_needs_no_root_on_one_host`] as uid 65534: the agent hands the client's
/// socket to s1 and s1 hands it to s2 (decision 56) with no capability at all — a fence or
/// `TCP_REPAIR` would fail here with EPERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by fast_path_needs_no_root_on_one_host as uid 65534"]
async fn fast_path_unprivileged_child() {
    if std::env::var("MTCP_UNPRIVILEGED_CHILD").is_err() {
        return;
    }
    let mut s = setup(true, Limits::default()).await;
    let results = tokio::time::timeout(Duration::from_secs(10), s.move_to_s2())
        .await
        .expect("the move did not finish")
        .unwrap();
    assert_eq!(results[0].1, Ok("s2".to_string()), "{results:?}");
    s.origin_saw_migrated().await;
    assert_eq!(s.ask("PING\n").await, "PONG s2\n");
    let st = s.agent.status();
    assert!(st[0].fast_path && st[0].migrations == 1, "{st:?}");
    s.agent.close();
    // SAFETY: geteuid has no preconditions.
    println!("CHILD-OK uid {}", unsafe { libc::geteuid() });
}

#[test]
fn fast_path_needs_no_root_on_one_host() {
    if !common::is_root() {
        eprintln!("!!! NOT ROOT: this test switches to uid 65534 with setpriv; the unprivileged fast path is NOT tested !!!");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("unprivileged-fast-path");
    let bin = dir.path().join("lock_state-nobody");
    std::fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args([
            "--ignored",
            "--exact",
            "fast_path_unprivileged_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MTCP_UNPRIVILEGED_CHILD", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let done = common::wait_child(&mut c, "the unprivileged child", Duration::from_secs(60));
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        done && text.contains("CHILD-OK uid 65534"),
        "the unprivileged fast path failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
