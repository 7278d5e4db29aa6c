//! Carrying a run out: the requests, the faults injected at their offsets, the checks, and
//! healing the cluster afterwards.

use super::*;
use anyhow::{bail, Context, Result};
use mtcp_harness::client::Client;
use mtcp_harness::local::{self, LocalCluster};
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The agent's view of connection `cid`: (server, state).
pub(super) async fn conn_of(lc: &LocalCluster, cid: &str) -> Result<(String, String)> {
    lc.status_async()
        .await?
        .into_iter()
        .find(|c| c.cid == cid)
        .map(|c| (c.server, c.state))
        .with_context(|| format!("the agent no longer lists connection {cid}"))
}

/// Waits until connection `cid` is live on a server other than `from`; returns that server.
pub(super) async fn wait_moved(lc: &LocalCluster, cid: &str, from: &str) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let (server, state) = conn_of(lc, cid).await?;
        if state != "live" {
            bail!("the connection ended instead of moving off {from}: {state}");
        }
        if server != from {
            return Ok(server);
        }
        if t0.elapsed() > MOVE_BOUND {
            bail!("the connection is still on {from} after {MOVE_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many moves of connection `cid` for silence the agent has logged.
pub(super) fn silent_moves(agent_log: &Path, cid: &str) -> usize {
    std::fs::read_to_string(agent_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("migrating: server silent") && l.contains(cid))
        .count()
}

/// Waits until the run's body bytes reach `offset`; false if the run's requests ended first.
pub(super) async fn reach(progress: &AtomicU64, offset: u64, finished: &Cell<bool>) -> bool {
    loop {
        if progress.load(Ordering::Relaxed) >= offset {
            return true;
        }
        if finished.get() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Injects the plan's faults as the run's bytes pass their offsets.
#[allow(clippy::too_many_arguments)]
pub(super) async fn inject(
    mode: Mode,
    lc: &mut LocalCluster,
    cid: &str,
    plan: &Plan,
    progress: &AtomicU64,
    finished: &Cell<bool>,
    killed_at: &Cell<Option<Instant>>,
    ev: &Events,
    counts: &RefCell<Counts>,
    drained: &RefCell<HashSet<String>>,
) -> Result<()> {
    if let Some(off) = plan.kill_all {
        if !reach(progress, off, finished).await {
            ev.note("kill-all: the requests ended before its offset; not injected");
            return Ok(());
        }
        counts.borrow_mut().kill_all += 1;
        ev.note(format!(
            "kill-all at {} B",
            progress.load(Ordering::Relaxed)
        ));
        let ids: Vec<String> = lc.servers.iter().map(|s| s.id.clone()).collect();
        for id in &ids {
            lc.kill(id)?;
        }
        killed_at.set(Some(Instant::now()));
        return Ok(());
    }
    for (i, &(off, fault)) in plan.faults.iter().enumerate() {
        if !reach(progress, off, finished).await {
            let left = (plan.faults.len() - i) as u64;
            counts.borrow_mut().skipped += left;
            ev.note(format!("requests ended; {left} fault(s) not injected"));
            return Ok(());
        }
        let (server, state) = conn_of(lc, cid).await?;
        if state != "live" {
            bail!(
                "before {}: the connection is not live: {state}",
                fault.name()
            );
        }
        counts.borrow_mut().add(fault);
        ev.note(format!(
            "{} of {server} at {} B",
            fault.name(),
            progress.load(Ordering::Relaxed)
        ));
        let to = match fault {
            Fault::Drain => {
                drained.borrow_mut().insert(server.clone());
                lc.drain(&server, DRAIN_BOUND)
                    .await
                    .with_context(|| format!("draining {server}"))?;
                lc.undrain(&server)
                    .await
                    .with_context(|| format!("undraining {server}"))?;
                drained.borrow_mut().remove(&server);
                conn_of(lc, cid).await?.0
            }
            Fault::Manual(n) => {
                let mut path = server.clone();
                for k in 0..n {
                    let moved = lc
                        .migrate(Some(cid), None)
                        .await
                        .with_context(|| format!("manual migration {} of {n}", k + 1))?;
                    let to = moved
                        .into_iter()
                        .next()
                        .map(|(_, to)| to)
                        .unwrap_or_default();
                    path += " -> ";
                    path += &to;
                }
                if n > 1 {
                    ev.note(format!("burst of {n}: {path}"));
                }
                conn_of(lc, cid).await?.0
            }
            Fault::Kill => {
                lc.kill(&server)?;
                let to = wait_moved(lc, cid, &server)
                    .await
                    .with_context(|| format!("after SIGKILL of {server}"))?;
                lc.restart_server_async(&server)
                    .await
                    .with_context(|| format!("restarting {server}"))?;
                ev.note(format!("{server} restarted"));
                to
            }
            Fault::AfterMove { stop, after_ms } => {
                let moved = lc
                    .migrate(Some(cid), None)
                    .await
                    .context("the move before the fault")?;
                let to = moved
                    .into_iter()
                    .next()
                    .map(|(_, to)| to)
                    .context("the move named no server")?;
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                ev.note(format!(
                    "moved {server} -> {to}; {} {to} {after_ms} ms later",
                    if stop { "SIGSTOP" } else { "SIGKILL" }
                ));
                if stop {
                    lc.sigstop(&to)?;
                    let moved = wait_moved(lc, cid, &to).await;
                    lc.sigcont(&to)?;
                    moved.with_context(|| {
                        format!("after SIGSTOP of {to} {after_ms} ms after a move")
                    })?
                } else {
                    lc.kill(&to)?;
                    let next = wait_moved(lc, cid, &to).await.with_context(|| {
                        format!("after SIGKILL of {to} {after_ms} ms after a move")
                    })?;
                    lc.restart_server_async(&to)
                        .await
                        .with_context(|| format!("restarting {to}"))?;
                    ev.note(format!("{to} restarted"));
                    next
                }
            }
            Fault::Stop if mode == Mode::Eager => {
                lc.sigstop(&server)?;
                let moved = wait_moved(lc, cid, &server).await;
                lc.sigcont(&server)?;
                moved.with_context(|| format!("after SIGSTOP of {server}"))?
            }
            Fault::Stop => {
                // Lazy: the destination needs the origin's state, so the origin runs again
                // once the agent has noticed its silence and started to move the connection.
                let log = lc.dir.join("agent.log");
                let before = silent_moves(&log, cid);
                lc.sigstop(&server)?;
                let t0 = Instant::now();
                while silent_moves(&log, cid) == before && t0.elapsed() < MOVE_BOUND {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let noticed = silent_moves(&log, cid) > before;
                if noticed {
                    ev.note(format!(
                        "the agent noticed after {:.3} s",
                        t0.elapsed().as_secs_f64()
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                lc.sigcont(&server)?;
                if !noticed {
                    bail!("the agent did not notice the SIGSTOP of {server} within {MOVE_BOUND:?}");
                }
                wait_moved(lc, cid, &server)
                    .await
                    .with_context(|| format!("after SIGSTOP and SIGCONT of {server}"))?
            }
        };
        ev.note(format!("{} done: connection on {to}", fault.name()));
    }
    Ok(())
}

/// Whether a client error is the clean end expected when every server is gone: the
/// connection reset or closed, not a garbled response.
pub(super) fn is_clean_end(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}").to_ascii_lowercase();
    m.contains("closed") || m.contains("reset") || m.contains("broken pipe")
}

/// Checks one response against the bytes it must carry.
pub(super) fn check(
    i: usize,
    req: &Req,
    files: &[Served],
    resp: &mtcp_harness::client::Response,
    ev: &Events,
) -> Result<()> {
    let f = &files[req.file];
    let want = &f.bytes[req.start as usize..req.end as usize];
    let what = format!(
        "request {i} (GET /{}{})",
        f.name,
        req.range
            .as_deref()
            .map(|r| format!(" Range: {r}"))
            .unwrap_or_default()
    );
    let code = if req.range.is_some() { 206 } else { 200 };
    if resp.status != code {
        bail!("{what}: status {} instead of {code}", resp.status);
    }
    if resp.body_len != want.len() as u64 {
        bail!(
            "{what}: {} body bytes instead of {}",
            resp.body_len,
            want.len()
        );
    }
    let sha = hex::encode(Sha256::digest(want));
    if resp.digest != sha {
        bail!(
            "CORRUPTION: {what}: the body's SHA-256 is {} instead of {sha} ({} bytes)",
            resp.digest,
            want.len()
        );
    }
    if req.range.is_some() {
        let cr = format!("bytes {}-{}/{}", req.start, req.end - 1, f.bytes.len());
        if resp.header("content-range") != Some(cr.as_str()) {
            bail!(
                "{what}: Content-Range {:?} instead of {cr:?}",
                resp.header("content-range")
            );
        }
    }
    ev.note(format!("{what}: {code}, {} B, sha256 ok", resp.body_len));
    Ok(())
}

/// The client side of a run: its requests in order, each checked.
pub(super) async fn requests(
    client: &mut Client,
    files: &[Served],
    plan: &Plan,
    killed_at: &Cell<Option<Instant>>,
    ev: &Events,
) -> Result<Ended> {
    let err_after_kill = |e: anyhow::Error, what: String| -> Result<Ended> {
        match killed_at.get() {
            Some(t) if plan.kill_all.is_some() => {
                if !is_clean_end(&e) {
                    bail!("{what}: after every server was killed, an unexpected error: {e:#}");
                }
                ev.note(format!(
                    "{what}: clean error {:.3} s after the kill: {e:#}",
                    t.elapsed().as_secs_f64()
                ));
                Ok(Ended::CleanError)
            }
            _ => Err(e.context(what)),
        }
    };
    for (i, req) in plan.reqs.iter().enumerate() {
        let path = format!("/{}", files[req.file].name);
        let hdr = req.range.as_ref().map(|r| format!("Range: {r}"));
        let extra: Vec<&str> = hdr.iter().map(String::as_str).collect();
        match client.request("GET", &path, &extra).await {
            Ok(resp) => check(i, req, files, &resp, ev)?,
            Err(e) => {
                let what = format!(
                    "request {i} (GET {path}{}) after {} body bytes of the run",
                    hdr.as_deref().map(|h| format!(" {h}")).unwrap_or_default(),
                    client.progress.load(Ordering::Relaxed)
                );
                return err_after_kill(e, what);
            }
        }
    }
    if killed_at.get().is_some() {
        // Every server is gone but the responses were already on their way: the next request
        // on the connection must fail.
        for i in plan.reqs.len().. {
            let req = &plan.reqs[0];
            match client
                .request("GET", &format!("/{}", files[req.file].name), &[])
                .await
            {
                Ok(resp) => check(i, req, files, &resp, ev)?,
                Err(e) => return err_after_kill(e, format!("extra request {i}")),
            }
        }
    }
    Ok(Ended::Complete)
}

/// One run: connect, find the connection at the agent, run the requests while injecting the
/// faults, close, and check the agent lets the connection go.
#[allow(clippy::too_many_arguments)]
pub(super) async fn one_run(
    mode: Mode,
    lc: &mut LocalCluster,
    files: &[Served],
    plan: &Plan,
    seen: &mut HashSet<String>,
    ev: &Events,
    counts: &RefCell<Counts>,
    drained: &RefCell<HashSet<String>>,
) -> Result<Ended> {
    seen.extend(lc.status_async().await?.into_iter().map(|c| c.cid));
    let mut client = Client::connect(&lc.agent_listen).await?;
    client.rate = plan.rate;
    let t0 = Instant::now();
    let (cid, server) = loop {
        let mut new: Vec<_> = lc
            .status_async()
            .await?
            .into_iter()
            .filter(|c| c.is_live() && !seen.contains(&c.cid))
            .collect();
        // Nothing else connects to the agent: one new live connection is the client's.
        if new.len() == 1 {
            let c = new.remove(0);
            break (c.cid, c.server);
        }
        if t0.elapsed() > OPEN_BOUND {
            bail!(
                "the agent lists {} new live connections {OPEN_BOUND:?} after the client connected (expected 1)",
                new.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    seen.insert(cid.clone());
    ev.note(format!("connection {cid} on {server}"));

    let progress = client.progress.clone();
    let finished = Cell::new(false);
    let killed_at = Cell::new(None);
    let ended = {
        let client_side = async {
            let r = requests(&mut client, files, plan, &killed_at, ev).await;
            finished.set(true);
            r
        };
        let faults = inject(
            mode, lc, &cid, plan, &progress, &finished, &killed_at, ev, counts, drained,
        );
        let kill_bound = async {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(t) = killed_at.get() {
                    if t.elapsed() > KILL_ALL_BOUND {
                        return;
                    }
                }
            }
        };
        tokio::pin!(client_side, faults, kill_bound);
        let mut injected = false;
        let ended = loop {
            tokio::select! {
                r = &mut client_side => break r,
                r = &mut faults, if !injected => {
                    // A fault that could not be injected as planned fails the run now.
                    r?;
                    injected = true;
                }
                _ = &mut kill_bound => bail!(
                    "the client saw no error {KILL_ALL_BOUND:?} after every server was killed \
                     ({} body bytes received)",
                    progress.load(Ordering::Relaxed)
                ),
            }
        };
        // The requests are over: the fault in progress (if any) finishes; later ones are
        // skipped.
        let fault = if injected { Ok(()) } else { faults.await };
        match (ended, fault) {
            (Ok(e), Ok(())) => e,
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
            (Err(c), Err(f)) => bail!("{c:#}; and the fault in progress: {f:#}"),
        }
    };
    drop(client);
    if ended == Ended::Complete {
        let t0 = Instant::now();
        loop {
            let (server, state) = conn_of(lc, &cid).await?;
            if state != "live" {
                ev.note(format!("connection ended: {state}"));
                if state != "closed" {
                    bail!("after the client closed, the agent says the connection {state}");
                }
                break;
            }
            if t0.elapsed() > CLOSE_BOUND {
                bail!(
                    "the agent still lists the connection as live on {server} {CLOSE_BOUND:?} after the client closed"
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(ended)
}

/// After a run: stopped servers continue, drained ones are undrained, missing ones start
/// again. Returns the servers that exited on their own (the run fails, the session goes on);
/// an error (the agent exited, a server cannot start again) ends the session.
pub(super) async fn heal(
    lc: &mut LocalCluster,
    drained: &RefCell<HashSet<String>>,
    ev: &Events,
) -> Result<Vec<String>> {
    let mut crashed = Vec::new();
    for (name, st) in lc.reap_exited() {
        let log = lc.dir.join(format!("{name}.log"));
        let last = local::last_log_line(&log);
        ev.note(format!("{name} exited on its own ({st}): {last}"));
        if name == "agent" {
            bail!("the agent exited ({st}): {last}; see {}", log.display());
        }
        crashed.push(format!(
            "{name} exited ({st}): {last}; see {}",
            log.display()
        ));
    }
    let ids: Vec<String> = lc.servers.iter().map(|s| s.id.clone()).collect();
    for id in &ids {
        if lc.is_stopped(id) {
            lc.sigcont(id)?;
        }
    }
    let to_undrain: Vec<String> = drained.borrow_mut().drain().collect();
    for id in &to_undrain {
        if lc.is_started(id) {
            lc.undrain(id)
                .await
                .with_context(|| format!("undraining {id}"))?;
        }
    }
    for id in &ids {
        if !lc.is_started(id) {
            lc.restart_server_async(id)
                .await
                .with_context(|| format!("starting {id} again"))?;
            ev.note(format!("{id} started again"));
        }
    }
    Ok(crashed)
}
