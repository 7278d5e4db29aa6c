//! Talking to the admin ports: drains (`mtcp drain`, and what one did), undrain, the agent's
//! status, moves, and `mtcp` commands run to completion.

use super::*;

/// `mtcp drain`: tells server `id` (admin address `admin`) to hint every connection away, and
/// waits until none with an agent attached is left. Returns the server's last status.
pub async fn drain_server(
    admin: &str,
    key: &mtcp::proto::ClusterKey,
    tls: Option<&mtcp::tls::ClientTls>,
    id: &str,
    timeout: Duration,
) -> Result<mtcp::proto::wire::ServerStatus> {
    let mut ch = mtcp::peer::AdminChannel::open(admin, key, tls, id).await?;
    Ok(drain_until_empty(&mut ch, id, timeout).await?.1)
}

/// Starts a drain and waits until no connection with an agent is left; the status when the
/// drain began and at the end.
/// Every request goes over one admin channel: a poll costs the draining server no handshake.
async fn drain_until_empty(
    ch: &mut mtcp::peer::AdminChannel,
    id: &str,
    timeout: Duration,
) -> Result<(
    mtcp::proto::wire::ServerStatus,
    mtcp::proto::wire::ServerStatus,
)> {
    use mtcp::proto::wire::Msg;
    let t0 = Instant::now();
    let first = ch.request(&Msg::AdminDrain).await?;
    let mut st = first.clone();
    while st.connections > 0 {
        if t0.elapsed() > timeout {
            bail!(
                "{} connection(s) still on {id} after {timeout:?}",
                st.connections
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        st = ch.request(&Msg::AdminStatus).await?;
    }
    Ok((first, st))
}

/// What a drain did: connections moved off the server, connections that ended there meanwhile,
/// connections whose agent is gone (kept until the dead-session bound), and connections still
/// on their way to another server when the drain's time ran out.
#[derive(Debug, Clone)]
pub struct DrainReport {
    pub moved: u64,
    pub ended: u64,
    pub kept_for_dead_agent: u32,
    pub still_moving: u32,
    /// From the drain request until no connection was left live or on its way to another
    /// server (before the counts settled).
    pub empty_after: Duration,
}

/// How long the counts must stay the same, once no connection is live or on its way, before a
/// drain is reported.
const DRAIN_SETTLE: Duration = Duration::from_millis(100);

/// How long a drain waits, once no connection is live, for those the agent said it is moving
/// to be fetched. Past it they are reported as still moving: in eager mode a destination that
/// got no answer from this server within `origin_wait_ms` takes the connection from a backup's
/// replica, and this server's copy stays until the dead-session bound.
const LEAVING_WAIT: Duration = Duration::from_secs(2);

/// [`drain_server`], then what happened, once every connection whose agent said it is moving
/// it (`Msg::Leaving`) has been fetched and the counts have settled (`mtcp drain`).
pub async fn drain_server_report(
    admin: &str,
    key: &mtcp::proto::ClusterKey,
    tls: Option<&mtcp::tls::ClientTls>,
    id: &str,
    timeout: Duration,
) -> Result<DrainReport> {
    use mtcp::proto::wire::Msg;
    let t0 = Instant::now();
    let mut ch = mtcp::peer::AdminChannel::open(admin, key, tls, id).await?;
    let (first, mut st) = drain_until_empty(&mut ch, id, timeout).await?;
    let mut empty_after = (st.leaving == 0).then(|| t0.elapsed());
    let empty = Instant::now();
    let mut stable = Instant::now();
    while ((st.leaving > 0 && empty.elapsed() < LEAVING_WAIT) || stable.elapsed() < DRAIN_SETTLE)
        && t0.elapsed() < timeout
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = ch.request(&Msg::AdminStatus).await?;
        if (
            next.detached,
            next.leaving,
            next.migrated_out,
            next.connections,
        ) != (st.detached, st.leaving, st.migrated_out, st.connections)
        {
            stable = Instant::now();
        }
        st = next;
        if st.leaving == 0 && st.connections == 0 && empty_after.is_none() {
            empty_after = Some(t0.elapsed());
        }
    }
    let moved = st.migrated_out.saturating_sub(first.migrated_out);
    let before =
        u64::from(first.connections) + u64::from(first.detached) + u64::from(first.leaving);
    Ok(DrainReport {
        moved,
        ended: before.saturating_sub(moved + u64::from(st.detached) + u64::from(st.leaving)),
        kept_for_dead_agent: st.detached,
        still_moving: st.leaving,
        empty_after: empty_after.unwrap_or_else(|| t0.elapsed()),
    })
}

impl LocalCluster {
    /// The admin address of server `id`.
    pub fn admin_of(&self, id: &str) -> Result<&str> {
        self.servers
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.admin.as_str())
            .with_context(|| format!("unknown server {id}"))
    }

    /// `mtcp drain` of server `id`: waits until no connection with an agent is left on it.
    pub async fn drain(&self, id: &str, timeout: Duration) -> Result<()> {
        drain_server(
            self.admin_of(id)?,
            &self.key,
            self.tls.as_ref(),
            id,
            timeout,
        )
        .await?;
        Ok(())
    }

    /// Ends a drain of server `id`: it accepts new and migrated connections again.
    pub async fn undrain(&self, id: &str) -> Result<()> {
        use mtcp::proto::wire::Msg;
        let st = mtcp::peer::admin_request_over(
            self.admin_of(id)?,
            &self.key,
            self.tls.as_ref(),
            id,
            Msg::AdminUndrain,
        )
        .await?;
        if st.draining {
            bail!("{id} still says it is draining");
        }
        Ok(())
    }

    /// Runs `mtcp ARGS…` to completion and returns its stdout (error with stderr on failure).
    pub fn mtcp(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.exe)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "mtcp {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's status over its admin port (from synchronous code, e.g. tests).
    pub fn status(&self) -> Result<Vec<mtcp_agent::ConnStatus>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(self.status_async())
    }

    /// The agent's status over its admin port.
    pub async fn status_async(&self) -> Result<Vec<mtcp_agent::ConnStatus>> {
        match mtcp_agent::admin::request(&self.agent_admin, &mtcp_agent::admin::Request::Status)
            .await
        {
            Ok(mtcp_agent::admin::Response::Status { connections }) => Ok(connections),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(e) => bail!(e),
        }
    }

    /// Moves every live connection of the agent (`mtcp migrate --all`); errors unless at least
    /// one moved and none failed.
    pub async fn migrate_all(&self) -> Result<()> {
        self.migrate(None, None).await.map(|_| ())
    }

    /// Moves connection `cid` (every live one when `None`; `mtcp migrate --conn CID` /
    /// `--all`), to server `to` or the agent's choice. Returns `(cid, new server)` of each;
    /// errors unless at least one moved and none failed.
    pub async fn migrate(
        &self,
        cid: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        use mtcp_agent::admin::{request, Request, Response};
        let req = Request::Migrate {
            conn: cid.map(str::to_string),
            to: to.map(str::to_string),
        };
        match request(&self.agent_admin, &req).await {
            Ok(Response::Migrated { results })
                if !results.is_empty() && results.iter().all(|r| r.ok) =>
            {
                Ok(results.into_iter().map(|r| (r.cid, r.detail)).collect())
            }
            other => bail!("migration failed: {other:?}"),
        }
    }
}
