//! Moves under load, the move latency of one session, and the front-ends' restart timings
//! from their logs.

use super::*;

/// `migrate --all` every `every` until `stop` (or `limit`); returns the counts and each
/// request's duration, µs.
pub(super) async fn mover(
    admin_addr: String,
    every: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (MoveStats, Vec<u64>) {
    let mut st = MoveStats::default();
    let mut us = Vec::new();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = Request::Migrate {
            conn: None,
            to: None,
        };
        let t = Instant::now();
        let ans = tokio::time::timeout(STEP_LIMIT, admin::request(&admin_addr, &req)).await;
        st.requests += 1;
        match ans {
            Ok(Ok(Response::Migrated { results })) => {
                if results.is_empty() {
                    st.empty += 1;
                } else {
                    us.push(t.elapsed().as_micros() as u64);
                }
                for r in results {
                    if r.ok {
                        st.moved += 1;
                    } else if r.ended {
                        st.ended += 1;
                    } else {
                        st.failed += 1;
                        if st.failures.len() < 5 {
                            st.failures.push(format!("{}: {}", r.cid, r.detail));
                        }
                    }
                }
            }
            other => {
                st.errors += 1;
                if st.failures.len() < 5 {
                    st.failures.push(format!("{other:?}"));
                }
            }
        }
    }
    (st, us)
}

/// A tokio-postgres session to `host:port`, database [`DB`], its connection driven by a task.
pub(super) async fn connect(host: &str, port: u16) -> Result<tokio_postgres::Client> {
    let cfg = format!("host={host} port={port} user=postgres dbname={DB} connect_timeout=10");
    let (client, conn) = tokio::time::timeout(
        STEP_LIMIT,
        tokio_postgres::connect(&cfg, tokio_postgres::NoTls),
    )
    .await
    .with_context(|| format!("connecting to {host}:{port} timed out"))?
    .with_context(|| format!("connecting to {host}:{port}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("bench session: {e}");
        }
    });
    Ok(client)
}

/// Runs one simple-protocol statement; returns the first column of its rows.
pub(super) async fn q(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>> {
    let msgs = tokio::time::timeout(STEP_LIMIT, c.simple_query(sql))
        .await
        .with_context(|| format!("{sql:?} timed out"))?
        .with_context(|| format!("{sql:?}"))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect())
}

pub(super) async fn select1(c: &tokio_postgres::Client) -> Result<()> {
    let rows = q(c, "SELECT 1").await?;
    if rows != ["1"] {
        bail!("SELECT 1 returned {rows:?}");
    }
    Ok(())
}

/// Median `SELECT 1` round trip over one open session (200 after 20 unmeasured), µs.
pub(super) async fn select1_p50(host: &str, port: u16) -> Result<u64> {
    let c = connect(host, port).await?;
    let mut us = Vec::new();
    for i in 0..220 {
        let t = Instant::now();
        select1(&c).await?;
        if i >= 20 {
            us.push(t.elapsed().as_micros() as u64);
        }
    }
    us.sort_unstable();
    Ok(pct(&us, 0.5))
}

/// Connects through the agent; returns the session and its connection id at the agent.
pub(super) async fn agent_session(lc: &LocalCluster) -> Result<(tokio_postgres::Client, String)> {
    let before: Vec<String> = lc
        .status_async()
        .await?
        .into_iter()
        .map(|c| c.cid)
        .collect();
    let (h, port) = split(&lc.agent_listen);
    let c = connect(&h, port).await?;
    select1(&c).await?;
    let cid = lc
        .status_async()
        .await?
        .into_iter()
        .find(|s| s.is_live() && !before.contains(&s.cid))
        .context("the bench session is not at the agent")?
        .cid;
    Ok((c, cid))
}

/// Moves connection `cid` through the agent's admin port; the request's duration, µs.
pub(super) async fn move_one(lc: &LocalCluster, cid: &str) -> Result<u64> {
    let req = Request::Migrate {
        conn: Some(cid.to_string()),
        to: None,
    };
    let t = Instant::now();
    let ans = tokio::time::timeout(STEP_LIMIT, admin::request(&lc.agent_admin, &req))
        .await
        .context("the agent did not answer the migrate request")?;
    let us = t.elapsed().as_micros() as u64;
    match ans {
        Ok(Response::Migrated { results }) if results.len() == 1 && results[0].ok => Ok(us),
        other => bail!("moving {cid}: {other:?}"),
    }
}

/// Move latency samples → report, with the agent's trigger→RESUMED of the session's moves.
pub(super) async fn latency(
    lc: &LocalCluster,
    cid: &str,
    mut mv: Vec<u64>,
    mut total: Vec<u64>,
) -> Result<MoveLatency> {
    let st = lc.status_async().await?;
    let mut resumed: Vec<u64> = st
        .iter()
        .filter(|c| c.cid == cid)
        .flat_map(|c| c.timeline.iter())
        .filter(|e| e.ok)
        .filter_map(|e| e.resumed_us)
        .collect();
    mv.sort_unstable();
    total.sort_unstable();
    resumed.sort_unstable();
    Ok(MoveLatency {
        moves: mv.len(),
        move_us_p50: pct(&mv, 0.5),
        move_us_p99: pct(&mv, 0.99),
        move_us_max: mv.last().copied().unwrap_or(0),
        move_query_us_p50: pct(&total, 0.5),
        move_query_us_p99: pct(&total, 0.99),
        move_query_us_max: total.last().copied().unwrap_or(0),
        resumed_us_p50: pct(&resumed, 0.5),
        resumed_us_p99: pct(&resumed, 0.99),
        cpu_us_per_move: CpuPerMove::default(),
    })
}

/// The baseline for the moves' CPU: `n` rounds of `SELECT 1` and the pause between moves on an
/// idle session, with no move (what PostgreSQL and the processes spend meanwhile anyway:
/// autovacuum after the runs, statistics, timers).
pub(super) async fn quiet_rounds(lc: &LocalCluster, n: u32) -> Result<()> {
    let (c, _) = agent_session(lc).await?;
    for _ in 0..n {
        select1(&c).await?;
        tokio::time::sleep(MOVE_PAUSE).await;
    }
    Ok(())
}

/// An idle session: move, then `SELECT 1`, `moves` times.
pub(super) async fn idle_moves(lc: &LocalCluster, moves: u32) -> Result<MoveLatency> {
    let (c, cid) = agent_session(lc).await?;
    let (mut mv, mut total) = (Vec::new(), Vec::new());
    for i in 0..moves {
        let t = Instant::now();
        mv.push(
            move_one(lc, &cid)
                .await
                .with_context(|| format!("move {i}"))?,
        );
        select1(&c)
            .await
            .with_context(|| format!("SELECT 1 after move {i}"))?;
        total.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(MOVE_PAUSE).await;
    }
    let r = latency(lc, &cid, mv, total).await;
    drop(c);
    r
}

/// A session inside a transaction: BEGIN; UPDATE a row; SELECT it; move; SELECT it again;
/// COMMIT — `moves` times. Returns the latency and whether the row's balance ends exactly
/// `moves` higher (no transaction lost or applied twice).
pub(super) async fn txn_moves(lc: &LocalCluster, moves: u32) -> Result<(MoveLatency, bool)> {
    let (c, cid) = agent_session(lc).await?;
    let read = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {AID}");
    let balance = |rows: Vec<String>| -> Result<i64> {
        rows.first()
            .context("no such account row")?
            .parse()
            .context("abalance")
    };
    let start = balance(q(&c, &read).await?)?;
    let (mut mv, mut total) = (Vec::new(), Vec::new());
    for i in 0..moves {
        q(&c, "BEGIN").await?;
        q(
            &c,
            &format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {AID}"),
        )
        .await?;
        let before = balance(q(&c, &read).await?)?;
        let t = Instant::now();
        mv.push(
            move_one(lc, &cid)
                .await
                .with_context(|| format!("move {i}"))?,
        );
        let after = balance(
            q(&c, &read)
                .await
                .with_context(|| format!("SELECT after move {i}"))?,
        )?;
        total.push(t.elapsed().as_micros() as u64);
        if after != before {
            bail!("move {i}: the row read {before} before the move and {after} after");
        }
        q(&c, "COMMIT").await?;
        tokio::time::sleep(MOVE_PAUSE).await;
    }
    let end = balance(q(&c, &read).await?)?;
    let ok = end == start + moves as i64;
    if !ok {
        progress(format!(
            "!!! account {AID}: balance {start} before, {end} after {moves} committed increments"
        ));
    }
    let r = latency(lc, &cid, mv, total).await?;
    drop(c);
    Ok((r, ok))
}

/// Where the servers' logs of a cluster ended, to read what they say afterwards.
pub(super) struct LogMark {
    pub(super) files: Vec<(std::path::PathBuf, u64)>,
}

impl LogMark {
    pub(super) fn new(lc: &LocalCluster) -> Self {
        let files = lc
            .servers
            .iter()
            .map(|s| {
                let p = lc.dir.join(format!("{}.log", s.id));
                let len = std::fs::metadata(&p).map_or(0, |m| m.len());
                (p, len)
            })
            .collect();
        LogMark { files }
    }

    /// The front-ends' per-restart timings logged since the mark (`backend connected
    /// connect=…`, `session restarting here … fenced=… register_and_fence=… restore=…`).
    pub(super) fn phases(&self) -> Phases {
        let (mut connect, mut fence, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        let mut ready = Vec::new();
        let (mut fenced, mut restarts) = (0, 0);
        for (path, from) in &self.files {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let text =
                String::from_utf8_lossy(&bytes[(*from as usize).min(bytes.len())..]).into_owned();
            // When each connection last arrived here (seconds of the day).
            let mut arrived: std::collections::HashMap<String, f64> = Default::default();
            for line in text.lines().map(strip_ansi) {
                if line.contains("connection migrated here") {
                    if let (Some(cid), Some(t)) = (field(&line, "cid"), log_time(&line)) {
                        arrived.insert(cid.to_string(), t);
                    }
                } else if line.contains("backend connected") {
                    connect.extend(field(&line, "connect").and_then(parse_duration_us));
                } else if line.contains("session restarting here") {
                    restarts += 1;
                    fence.extend(field(&line, "register_and_fence").and_then(parse_duration_us));
                    restore.extend(field(&line, "restore").and_then(parse_duration_us));
                    fenced += field(&line, "fenced")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    let cid = field(&line, "cid").unwrap_or_default();
                    if let (Some(t0), Some(t1)) = (arrived.remove(cid), log_time(&line)) {
                        ready.push(((t1 - t0).rem_euclid(86_400.0) * 1e6).round() as u64);
                    }
                }
            }
        }
        for v in [&mut connect, &mut fence, &mut restore, &mut ready] {
            v.sort_unstable();
        }
        Phases {
            restarts,
            connect_us_p50: pct(&connect, 0.5),
            connect_us_p99: pct(&connect, 0.99),
            register_and_fence_us_p50: pct(&fence, 0.5),
            register_and_fence_us_p99: pct(&fence, 0.99),
            restore_us_p50: pct(&restore, 0.5),
            restore_us_p99: pct(&restore, 0.99),
            fenced,
            resumed_to_ready_us_p50: pct(&ready, 0.5),
            resumed_to_ready_us_p99: pct(&ready, 0.99),
        }
    }
}

/// A log line's time of day in seconds (`2026-12-05T01:45:42.458934Z …`).
pub(super) fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The value of ` name=value` in a log line.
pub(super) fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    line[at..].split_whitespace().next()
}

/// A `Duration`'s Debug form (`812.5µs`, `1.234ms`, `2.1s`, `900ns`) in µs.
pub(super) fn parse_duration_us(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let x: f64 = num.parse().ok()?;
    let us = match unit {
        "ns" => x / 1e3,
        "µs" | "us" => x,
        "ms" => x * 1e3,
        "s" => x * 1e6,
        _ => return None,
    };
    Some(us.round() as u64)
}
