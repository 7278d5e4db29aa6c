//! What the database and the agent show, for the message of a failed run: prepared
//! transactions, sessions and who waits for whom; the agent's connections.

use super::*;

/// What the database is doing (for an error message): prepared transactions, sessions of
/// the bench database and who waits for whom.
pub(super) fn db_view(pg: &PgCluster) -> String {
    let sql = "SET statement_timeout = '10s'; SELECT 'prepared ' || gid || ' at ' || prepared FROM pg_prepared_xacts \
               UNION ALL SELECT 'backend ' || pid || ' ' || coalesce(state, '') || ' wait ' || \
               coalesce(wait_event_type || '/' || wait_event, '-') || ' blocked by ' || \
               pg_blocking_pids(pid)::text || ': ' || left(query, 80) \
               FROM pg_stat_activity WHERE datname = 'bench'";
    let out = tokio::task::block_in_place(|| pg.psql("postgres", sql));
    match out {
        Ok(s) => format!("the database:\n{s}"),
        Err(e) => format!("the database: {e:#}"),
    }
}

/// The agent's connections, one line each (for an error message).
pub(super) async fn agent_view(lc: &LocalCluster) -> String {
    let st = match lc.status_async().await {
        Ok(st) => st,
        Err(e) => return format!("agent status: {e:#}"),
    };
    let mut out = String::from("the agent's connections:");
    for c in st.iter().filter(|c| c.state != "closed") {
        let last = c.timeline.last().map(|e| {
            format!(
                "last move {}->{} at {} ms ok {} {:?}",
                e.from,
                e.to.as_deref().unwrap_or("-"),
                e.at_ms,
                e.ok,
                e.refusals
            )
        });
        out += &format!(
            "\n  {} on {} {} up {} down {} moves {} {}",
            c.cid,
            c.server,
            c.state,
            c.bytes_up,
            c.bytes_down,
            c.migrations,
            last.unwrap_or_default()
        );
    }
    out
}
