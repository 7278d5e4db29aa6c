//! Issue 13, descriptors: an agent whose open-files limit leaves no room for another
//! connection refuses the newest client at once, says why in its log, and keeps serving every
//! connection it holds; once some end, new clients are admitted again.

mod common;

use common::*;
use mtcp_harness::client::Client;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The open-files limit the agent runs under (soft and hard: it cannot raise it).
const LIMIT: usize = 200;
/// What the agent admits under it: two descriptors per relayed connection, 128 kept aside
/// (`bounds::AGENT_FD_BASE` + `MAX_CONCURRENT_MOVES`).
const ADMITTED: usize = (LIMIT - 128) / 2;

/// One GET of the test file on `c`, its SHA-256 checked.
async fn get(c: &mut Client, want: &str) -> anyhow::Result<()> {
    let r = c.request("GET", "/small.bin", &[]).await?;
    anyhow::ensure!(r.status == 200 && r.digest == want, "wrong answer: {r:?}");
    Ok(())
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_at_its_descriptor_limit_refuses_the_newest_client_and_serves_the_rest() {
    let dir = TempDir::new("descriptor-limit");
    let want = file(&dir, "small.bin", 64 << 10, 5);
    let lc = tokio::task::block_in_place(|| cluster(&dir, 1));
    let listen = format!("127.0.0.1:{}", mtcp_harness::local::free_port());
    let log = dir.path().join("limited-agent.log");
    // `ulimit -n` in sh sets the soft and the hard limit.
    let agent = Agent(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\""))
            .arg(exe())
            .args([
                "agent",
                "--connect",
                &lc.servers[0].data,
                "--listen",
                &listen,
            ])
            .arg("--admin")
            .arg(dir.path().join("limited-agent.sock"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the agent"),
    );
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "the agent never listened on {listen}");
    // (The probe connections above end at once; wait until the agent counted them out.)
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut held = Vec::new();
    for i in 0..ADMITTED {
        let mut c = Client::connect(&listen).await.expect("connect");
        get(&mut c, &want)
            .await
            .unwrap_or_else(|e| panic!("connection {i} of {ADMITTED}: {e:#}"));
        held.push(c);
    }

    // One more: the kernel accepts it, the agent closes it without serving it.
    let mut extra = Client::connect(&listen).await.expect("connect");
    let r = tokio::time::timeout(Duration::from_secs(5), get(&mut extra, &want))
        .await
        .expect("the refused client is told within 5 s");
    assert!(r.is_err(), "a client over the limit was served");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!(
            "refusing a new client: the open-files limit ({LIMIT})"
        )),
        "the agent's log does not say why it refused:\n{text}"
    );

    // Every connection it holds still answers.
    for (i, c) in held.iter_mut().enumerate() {
        get(c, &want)
            .await
            .unwrap_or_else(|e| panic!("held connection {i} after the refusal: {e:#}"));
    }

    // Five end; a new client is admitted and served again.
    held.truncate(ADMITTED - 5);
    let mut admitted = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = Client::connect(&listen).await.expect("connect");
        if get(&mut c, &want).await.is_ok() {
            admitted = Some(c);
            break;
        }
    }
    assert!(admitted.is_some(), "no client admitted after five ended");
    for (i, c) in held.iter_mut().enumerate() {
        get(c, &want)
            .await
            .unwrap_or_else(|e| panic!("held connection {i} at the end: {e:#}"));
    }
    drop(agent);
    drop(lc);
}
