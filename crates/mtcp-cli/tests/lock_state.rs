//! `lock_state`: a migration requested while the application holds the lock waits for the
//! unlock; afterwards the origin's application sees *migrated* and the connection continues on
//! the destination (the seed's Example 3 pattern: lock, act, snapshot, unlock).

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
        while let Some(line) = read_line(&mut conn).await? {
            match line.as_str() {
                "PING" => {
                    conn.write_all(format!("PONG {id}\n").as_bytes()).await?;
                    conn.set_state(&b"idle"[..])?;
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

async fn lock_test(fast_path: bool) {
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
    let (ev_tx, mut ev) = mpsc::unbounded_channel();
    let unlock = Arc::new(Notify::new());
    for id in ["s1", "s2"] {
        let mut server = Server::bind(cluster.clone(), id, Limits::default())
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
    let (r, mut w) = client.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    w.write_all(b"PING\n").await.unwrap();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "PONG s1\n");

    w.write_all(b"LOCK\n").await.unwrap();
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "locked\n");
    assert_eq!(ev.recv().await, Some(Event::Locked("s1".into())));

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
